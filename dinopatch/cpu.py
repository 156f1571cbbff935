"""The CPU features the package assumes: this machine's own, or fewer through ``DINOPATCH_CPU``.

``DINOPATCH_CPU`` makes a process run as it would on a lesser x86-64 CPU, so
that a model or a test run can be checked here as on the machines it will meet:

- ``avx2``: an AVX2-only CPU (AVX2, FMA, F16C; no AVX-512, no VNNI, no bf16, no AMX);
- ``avx512``: AVX-512 F/CD/BW/DQ/VL without VNNI, bf16 or AMX (Skylake-SP);
- unset or empty: the machine's own features.

An override only takes features away: a level this CPU does not reach is an
error, and so is an unknown value.  What follows it:

- :func:`flags`, the CPU flags the package reasons with (the engine choice's
  machine fingerprint hashes them, so a choice measured on the full CPU is not
  reused under an override);
- OpenVINO bf16 (``backbone.cpu_has_bf16`` is False under either level);
- the instruction set of the cpp kernel (``dinopatch.kernels`` caps it at import);
- through :func:`apply`, run when ``dinopatch`` is first imported and so before
  these libraries load: oneDNN in torch and in OpenVINO's CPU plugin
  (``ONEDNN_MAX_CPU_ISA``; OpenVINO's own kernels read ``OV_CPU_MAX_ISA``, which
  release builds may ignore), torch's ATen kernels (``ATEN_CPU_CAPABILITY``)
  and numba's code generation (``NUMBA_CPU_NAME``, with ``NUMBA_CPU_FEATURES``
  empty so that the named CPU's features replace this one's).  A variable already set is kept.

ONNX Runtime follows nothing: its MLAS kernels are chosen from the CPU's own
report and no setting caps them.
"""
from __future__ import annotations

import dataclasses
import os
import platform
import sys
import warnings
from functools import lru_cache

VARIABLE = "DINOPATCH_CPU"


@dataclasses.dataclass(frozen=True)
class Level:
    """One level of :data:`LEVELS`: the flags it needs and keeps, and what each library is told."""

    requires: tuple[str, ...]  # /proc/cpuinfo flags the CPU must have
    keeps: tuple[str, ...]  # the AVX-512 flags it keeps (every other avx* beyond avx2, and amx*, goes)
    isa: str  # the highest instruction set of dinopatch._C
    environment: dict  # library variables set before the libraries load


LEVELS = {
    "avx2": Level(("avx2", "fma", "f16c"), (), "avx2",
                  {"ONEDNN_MAX_CPU_ISA": "AVX2", "OV_CPU_MAX_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2",
                   "NUMBA_CPU_NAME": "haswell", "NUMBA_CPU_FEATURES": ""}),
    "avx512": Level(("avx2", "fma", "f16c", "avx512f", "avx512cd", "avx512bw", "avx512dq", "avx512vl"),
                    ("avx512f", "avx512cd", "avx512bw", "avx512dq", "avx512vl"), "avx512",
                    {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE", "OV_CPU_MAX_ISA": "AVX512_CORE",
                     "ATEN_CPU_CAPABILITY": "avx512", "NUMBA_CPU_NAME": "skylake-avx512", "NUMBA_CPU_FEATURES": ""}),
}


@lru_cache(maxsize=None)
def _cpuinfo() -> tuple[str, frozenset]:
    """The CPU's model name and flags from /proc/cpuinfo (platform's name and no flags where it is absent)."""
    try:
        with open("/proc/cpuinfo") as f:
            lines = f.read().splitlines()
    except OSError:
        lines = []
    model = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")),
                 platform.processor())
    found = next((line.split(":", 1)[1].split() for line in lines if line.startswith("flags")), [])
    return model, frozenset(found)


def model_name() -> str:
    """The CPU's model name."""
    return _cpuinfo()[0]


def level() -> str | None:
    """The level ``DINOPATCH_CPU`` asks for (a key of :data:`LEVELS`), or None for the machine's own features.

    Raises:
        ValueError: an unknown value, or a level this CPU does not reach.
    """
    name = os.environ.get(VARIABLE, "").strip().lower()
    if not name:
        return None
    if name not in LEVELS:
        raise ValueError(f"{VARIABLE}={os.environ[VARIABLE]!r} is not a CPU level; choose one of "
                         f"{', '.join(LEVELS)}, or leave it unset for this machine's own features")
    missing = [f for f in LEVELS[name].requires if f not in _cpuinfo()[1]]
    if missing:
        raise ValueError(f"{VARIABLE}={name} asks for {', '.join(missing)}, which this CPU "
                         f"({model_name() or 'flags unknown'}) lacks: the override can only take features away")
    return name


def flags() -> frozenset:
    """This CPU's flags as the package assumes them: /proc/cpuinfo's, less those the level removes."""
    native = _cpuinfo()[1]
    name = level()
    if name is None:
        return native
    keeps = set(LEVELS[name].keeps)
    return frozenset(f for f in native
                     if f in keeps or not (f.startswith("amx") or (f.startswith("avx") and f not in ("avx", "avx2"))))


def kernel_isa() -> str | None:
    """The highest instruction set the cpp kernel may use, or None for the best this CPU has."""
    name = level()
    return None if name is None else LEVELS[name].isa


def apply() -> None:
    """Tell oneDNN, torch and numba the level, before they load (``dinopatch`` runs this on import).

    Raises ValueError for a value :func:`level` refuses.  A library loaded
    already may have read its settings: that is warned about, since its kernels
    may then use features the level removes.
    """
    name = level()
    if name is None:
        return
    for key, value in LEVELS[name].environment.items():
        os.environ.setdefault(key, value)
    early = [lib for lib in ("torch", "openvino", "numba") if lib in sys.modules]
    if early:
        warnings.warn(f"{VARIABLE}={name}: {', '.join(early)} loaded before dinopatch, so its kernels may not follow "
                      f"the level; import dinopatch first or set {', '.join(LEVELS[name].environment)} yourself",
                      RuntimeWarning, stacklevel=2)
