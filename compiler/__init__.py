"""slimc: a hardware-aware, compiler-style optimizer for convolutional networks."""

__version__ = "0.1.0"
