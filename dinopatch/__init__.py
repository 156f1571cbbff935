"""DinoPatch: anomaly detection on aligned parts from DINOv2 patch memories."""
__version__ = "0.1.0"

from . import kernels  # noqa: E402
from .detector import DinoPatch, NotFittedError, Result  # noqa: E402

__all__ = ["DinoPatch", "NotFittedError", "Result", "kernels", "__version__"]
