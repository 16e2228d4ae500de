"""moezoo.encoders"""
