"""slimc: a hardware-aware, compiler-style optimizer for convolutional networks."""

from slimc.threads import default_tvm_threads as _default_tvm_threads

__version__ = "0.1.0"
_default_tvm_threads()
