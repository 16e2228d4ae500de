"""moezoo.zoo"""
