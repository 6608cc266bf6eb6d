"""Hand-bound library kernels for where XLA's own lowering is slow: oneDNN convolutions on CPU."""

from resunet_jax.kernels import onednn

__all__ = ['onednn']
