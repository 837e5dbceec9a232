"""AsynDGAN: a central generator trained by per-hospital discriminators over gRPC."""

__version__ = "0.1.0"
