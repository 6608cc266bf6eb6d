"""The CPU backend: oneDNN convolutions and host-memory settings for XLA's CPU runtime (optional).

Everything platform-specific lives here, beside the model and never in it:

- `layers.LAYERS` (`layers.layers()` loads it): a `models.Layers` set with the stock set's
  parameters and values, whose convolutions are oneDNN primitives bound as XLA FFI custom
  calls (`onednn`), with conv+bias+ReLU fused, each decoder block's first convolution computed
  per output parity, and pooling/upsampling gradients written for XLA's CPU backend.
- `hostmem`: the process settings of a command-line run on CPU (huge pages, a kept host block,
  synchronous dispatch), applied by a relaunch before any work.

A run picks its layer set once, by `runtime.backend` (`resunet_jax.runtime`). Needs Linux
x86-64, a C++ compiler and the `cpu` extra (`pip install -e '.[cpu]'`: the oneDNN wheels).
Importing this package imports nothing heavy; `layers` imports JAX and Flax.
"""
