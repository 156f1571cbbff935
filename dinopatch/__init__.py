"""DinoPatch: anomaly detection on aligned parts from DINOv2 patch memories."""
from . import kernels
from ._version import __version__
from .detector import DinoPatch, NotFittedError, Result

__all__ = ["DinoPatch", "NotFittedError", "Result", "kernels", "__version__"]
