"""moezoo.app"""
