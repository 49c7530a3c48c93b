"""fnlearn: the classic PyTorch tutorial workloads, rebuilt as pure JAX functions."""
from fnlearn.ops import flags as _flags

# XLA reads XLA_FLAGS once, when the first computation starts the backend: importing
# fnlearn first applies its measured CPU settings (the user's own XLA_FLAGS win).
_flags.apply()

__version__ = "0.1.0"
