"""The engine registry: engine names to the classes that run them, read by the API, the CLI, serve and archives.

An engine name is ``RUNTIME[:PRECISION]`` (``onnx`` is ``onnx:fp32``), ``"auto"``,
or a path to an ``.onnx`` export (ONNX Runtime on that file).
"""
from __future__ import annotations

import dataclasses
import importlib.util
import os
import threading
import warnings
from collections import OrderedDict

import numpy as np
from tqdm.auto import tqdm

from .device import CUDA_PROVIDER, parse_device
from .onnx_engine import PRECISIONS, OnnxBackbone
from .openvino_engine import OV_PRECISIONS, OpenVinoBackbone, cpu_has_bf16
from .torch_engine import AUTOCAST, TorchBackbone


@dataclasses.dataclass(frozen=True)
class Runtime:
    """What runs an engine name's backbone.

    Args:
        cls: the backbone class, built with ``precision=``, ``device=``, ``fingerprint=`` and the weights.
        precisions: those ``RUNTIME:PRECISION`` may name.
        default: the precision of the bare ``RUNTIME`` name (None: the class decides for this machine).
        needs_torch: runs only where torch is installed.
        runs_export: runs an ONNX export, so it takes the graph's recorded ``sha256=``.
    """

    cls: type
    precisions: tuple[str, ...]
    default: str | None
    needs_torch: bool
    runs_export: bool


RUNTIMES = {
    "torch": Runtime(TorchBackbone, tuple(AUTOCAST), "fp32", needs_torch=True, runs_export=False),
    "onnx": Runtime(OnnxBackbone, PRECISIONS, "fp32", needs_torch=False, runs_export=True),
    # Bare "openvino" is bf16 where the CPU has it, else fp32 (see OpenVinoBackbone).
    "openvino": Runtime(OpenVinoBackbone, OV_PRECISIONS, None, needs_torch=False, runs_export=True),
}
ENGINES = ("auto", *(name for runtime, spec in RUNTIMES.items()
                     for name in (runtime, *(f"{runtime}:{p}" for p in spec.precisions))))
# Engines that run without torch, for the torch-free service and workers.
TORCH_FREE_ENGINES = tuple(e for e in ENGINES if e != "auto" and not RUNTIMES[e.partition(":")[0]].needs_torch)
# Old spellings, accepted with a DeprecationWarning for one release.
DEPRECATED = {"openvino:f32": "openvino:fp32"}


def canonical_engine(engine: str | os.PathLike, warn: bool = True) -> str:
    """The registry's name for ``engine`` (an ``.onnx`` path as it is); ValueError for an unknown one."""
    engine = os.fspath(engine)
    if engine.endswith(".onnx") or engine in ENGINES:
        return engine
    if engine in DEPRECATED:
        if warn:
            warnings.warn(f"engine {engine!r} is spelled {DEPRECATED[engine]!r} now; the old name goes in the next "
                          "release", DeprecationWarning, stacklevel=3)
        return DEPRECATED[engine]
    raise ValueError(f"unknown engine {engine!r}; choose one of {ENGINES} or a path to an .onnx export")


def installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def onnx_has_cuda() -> bool:
    """onnxruntime-gpu is installed (whether a GPU is usable shows only when a session starts)."""
    import onnxruntime as ort

    return CUDA_PROVIDER in ort.get_available_providers()


def torch_has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def auto_engine(device: str = "auto") -> str:
    """The engine ``"auto"`` stands for on this machine and ``device`` (see :func:`make_backbone`)."""
    kind, _ = parse_device(device)
    if kind != "cpu":
        if installed("onnxruntime") and onnx_has_cuda():
            return "onnx"
        if kind == "cuda" or (installed("torch") and torch_has_cuda()):
            return "torch"
    if installed("openvino") and cpu_has_bf16():
        return "openvino:bf16"
    if installed("onnxruntime"):
        return "onnx"
    if installed("openvino"):
        return "openvino:fp32"
    return "torch"


def make_backbone(engine: str | os.PathLike = "auto", fingerprint: str | None = None, device: str = "auto",
                  sha256: str | None = None, **kwargs):
    """A backbone for ``engine`` on ``device``.

    Args:
        engine: a name of :data:`ENGINES`: ``"torch"`` (``"torch:fp16"``,
            ``"torch:bf16"``: autocast); ``"onnx"`` (fp32), ``"onnx:int8"`` or
            ``"onnx:fp16"`` (ONNX Runtime); ``"openvino"`` (bf16 where the CPU
            has it, else fp32), ``"openvino:fp32"`` or ``"openvino:bf16"`` (CPU
            only; ``"openvino:int8"``: quantised on a model's frames, see
            :mod:`.openvino_int8`); a path to an ``.onnx`` export (ONNX Runtime); or ``"auto"``,
            the engine :func:`auto_engine` picks for ``device``:

            * on a GPU (``device`` ``"cuda[:N]"``, or ``"auto"`` where one is
              usable): ``onnx`` when onnxruntime-gpu is installed, else
              ``torch``;
            * on the CPU: ``openvino:bf16`` when openvino is installed and the
              CPU has AVX512-BF16 or AMX (never under ``DINOPATCH_CPU``, see
              :mod:`dinopatch.cpu`); else ``onnx`` (fp32) when
              onnxruntime is installed (OpenVINO fp32 runs the same
              graph no faster, so nothing is gained by the extra runtime); else
              ``openvino:fp32``; else ``torch``.

            int8 engines are never chosen automatically: their accuracy is
            judged per data set, and without VNNI they are slower than fp32
            (docs/benchmarks.md, "Engines").
        fingerprint: the weights fingerprint expected (from a model file).
        device: ``"auto"``, ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.  A GPU
            asked for by name that the engine cannot use raises
            :class:`~dinopatch.backbone.device.DeviceUnavailableError` at once;
            ``"auto"`` logs the device it chose (logger ``dinopatch``), and the
            backbone's ``device`` attribute names it.
        sha256: the graph's hash recorded with a model, for the engines that
            run an export (ONNX Runtime, OpenVINO; unused by torch): another
            graph is refused, or a cached one exported again where torch is.
            Their backbones carry the hash of what they loaded as ``sha256``.
        **kwargs: ``name``, ``weights``, ``image_size``, ``layers``, ``seed``.
    """
    engine = canonical_engine(engine)
    if engine == "auto":
        engine = auto_engine(device)
    if engine.endswith(".onnx"):
        return OnnxBackbone(path=engine, fingerprint=fingerprint, device=device, sha256=sha256, **kwargs)
    name, _, precision = engine.partition(":")
    runtime = RUNTIMES[name]
    extra = {"sha256": sha256} if runtime.runs_export else {}
    return runtime.cls(fingerprint=fingerprint, device=device, precision=precision or runtime.default, **extra,
                       **kwargs)


class EngineCache:
    """Engines by configuration, each built once even when several threads ask at once.

    Keeps the ``size`` most recently built: a detector needs the engine of the
    model in force and, while a refit swaps it, of its replacement.
    """

    def __init__(self, size: int = 2):
        self.size = size
        self._engines: OrderedDict = OrderedDict()
        self._lock = threading.Lock()
        self.pinned = None

    def pin(self, engine) -> None:
        """Answer every request with ``engine``, built elsewhere, from now on (a benchmark times engines)."""
        self.pinned = engine

    def get(self, engine: str | os.PathLike, fingerprint: str | None, **config):
        """The engine ``make_backbone(engine, fingerprint, **config)`` would build, built at most once."""
        if self.pinned is not None:
            if fingerprint is not None and fingerprint != self.pinned.fingerprint:
                raise ValueError(f"engine weights {self.pinned.fingerprint[:16]} differ from the model's "
                                 f"{fingerprint[:16]}")
            return self.pinned
        key = (os.fspath(engine), *sorted(config.items()))
        with self._lock:
            if key not in self._engines:
                self._engines[key] = make_backbone(engine, fingerprint, **config)
                while len(self._engines) > self.size:
                    self._engines.popitem(last=False)
            return self._engines[key]


def embed(engine, images: list[np.ndarray], batch_size: int, progress: bool = False, desc: str = "embedding",
          positions=None):
    """Tokens ``[N, h, w, D]`` (``[N, n, D]`` at ``positions``) of canonical images, ``batch_size`` at a time."""
    chunks = range(0, len(images), batch_size)
    out = [engine(np.stack(images[i:i + batch_size]), positions)
           for i in tqdm(chunks, desc=desc, disable=not progress or len(chunks) < 2, leave=False)]
    return np.concatenate(out)
