"""DinoPatch: anomaly detection on aligned parts from DINOv2 patch memories.

The names below load on first use, so that ``import dinopatch.kernels`` (or the
model-file reader) does not pull in OpenCV and the detector.  The CPU level
of ``DINOPATCH_CPU`` (:mod:`.cpu`) reaches the libraries here, before any of them loads.
"""
import importlib

from . import cpu
from ._version import __version__

cpu.apply()

_LAZY = {"DinoPatch": ".detector", "NotFittedError": ".fitted", "Result": ".result", "kernels": ".kernels"}

__all__ = ["DinoPatch", "NotFittedError", "Result", "kernels", "__version__"]


def __getattr__(name: str):
    if name in _LAZY:
        module = importlib.import_module(_LAZY[name], __name__)
        return module if name == "kernels" else getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
