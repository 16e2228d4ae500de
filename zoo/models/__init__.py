"""moezoo.zoo.models"""
