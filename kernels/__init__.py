"""moezoo.kernels"""
