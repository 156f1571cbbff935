"""The bench's stages; importing this package registers them all."""

from . import backbone, cuda, foreground, kernels, pipeline, serve  # noqa: F401
