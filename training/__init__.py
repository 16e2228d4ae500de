"""moezoo.training"""
