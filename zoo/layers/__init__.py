"""moezoo.zoo.layers"""
