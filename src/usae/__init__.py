"""Universal Sparse Autoencoders."""

__version__ = "0.1.0"
