"""resunet_jax: U-Net and ResUNet image segmentation in JAX/Flax."""

__version__ = '0.1.0'
