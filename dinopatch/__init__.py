"""DinoPatch: anomaly detection on aligned parts from DINOv2 patch memories."""
from . import kernels

__version__ = "0.1.0"
__all__ = ["kernels", "__version__"]
