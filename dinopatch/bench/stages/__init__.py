"""The bench's stages; importing this package registers them all."""

from . import backbone, cuda, cuda_e2e, foreground, kernels, pipeline, serve  # noqa: F401
