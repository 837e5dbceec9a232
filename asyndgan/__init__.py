"""AsynDGAN: a central generator trained by per-hospital discriminators over gRPC."""

import os

__version__ = "0.1.0"

# gRPC's core logs (e.g. each failed TLS handshake, at INFO) go straight to stderr and would break the CLI's
# one-line errors; set GRPC_VERBOSITY yourself to see them. Must happen before grpc is imported.
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
