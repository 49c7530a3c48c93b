"""fnlearn: the classic PyTorch tutorial workloads, rebuilt as pure JAX functions."""
__version__ = "0.1.0"
