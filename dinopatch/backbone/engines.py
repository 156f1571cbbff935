"""Choosing an engine by name: the registry the API, the CLI and the bench read."""
from __future__ import annotations

import importlib.util
import os
import threading
from collections import OrderedDict

import numpy as np
from tqdm.auto import tqdm

from .device import CUDA_PROVIDER, parse_device
from .onnx_engine import PRECISIONS, OnnxBackbone
from .openvino_engine import OV_PRECISIONS, OpenVinoBackbone, cpu_has_bf16
from .torch_engine import AUTOCAST, TorchBackbone

ENGINES = ("auto", "torch", "torch:fp16", "torch:bf16", "onnx", "onnx:int8", "onnx:fp16", "openvino",
           "openvino:f32", "openvino:bf16")


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
        return "openvino:f32"
    return "torch"


def make_backbone(engine: str | os.PathLike = "auto", fingerprint: str | None = None, device: str = "auto",
                  sha256: str | None = None, **kwargs):
    """A backbone for ``engine`` on ``device``.

    Args:
        engine: ``"torch"`` (``"torch:fp16"``, ``"torch:bf16"``: autocast);
            ``"onnx"`` (fp32), ``"onnx:int8"`` or ``"onnx:fp16"`` (ONNX
            Runtime); ``"openvino"`` (bf16 where the CPU has it, else f32),
            ``"openvino:f32"`` or ``"openvino:bf16"`` (CPU only); a path to an
            ``.onnx`` export (ONNX Runtime); or ``"auto"``, the fastest
            installed engine for ``device`` by this rule, from ViT-S/14 at
            448 px (README, "Engines"):

            * on a GPU (``device`` ``"cuda[:N]"``, or ``"auto"`` where one is
              usable): ``onnx`` when onnxruntime-gpu is installed, else
              ``torch``;
            * on the CPU: ``openvino:bf16`` when openvino is installed and the
              CPU has AVX512-BF16 or AMX (1.8x ONNX Runtime fp32, token cosine
              0.99999, measured in issue 14 on such a CPU); else ``onnx`` (fp32)
              when onnxruntime is installed: on an AVX2-only CPU (no VNNI)
              OpenVINO f32 predicted as fast as it end to end on foreground
              tokens (845 against 838 ms a part, 33% of the tokens, one
              round-robin run at load 8-9), so nothing is gained by the extra
              runtime; else ``openvino:f32``; else ``torch``.

            int8 engines are never chosen automatically: their accuracy is
            judged per data set, by AUROC, and without VNNI they are slower
            (ONNX Runtime int8 0.81x of fp32 end to end on that CPU; OpenVINO
            int8 quantised with NNCF 0.51x of OpenVINO f32 at batch 1 and 8, near idle).
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
    engine = os.fspath(engine)
    if engine == "auto":
        engine = auto_engine(device)
    if engine.endswith(".onnx"):
        return OnnxBackbone(path=engine, fingerprint=fingerprint, device=device, sha256=sha256, **kwargs)
    kind, _, precision = engine.partition(":")
    if kind == "torch" and precision in ("", *AUTOCAST):
        return TorchBackbone(fingerprint=fingerprint, device=device, precision=precision or "fp32", **kwargs)
    if kind == "onnx" and precision in ("", *PRECISIONS):
        return OnnxBackbone(precision=precision or "fp32", fingerprint=fingerprint, device=device, sha256=sha256,
                            **kwargs)
    if kind == "openvino" and precision in ("", *OV_PRECISIONS):
        return OpenVinoBackbone(precision=precision or None, fingerprint=fingerprint, device=device, sha256=sha256,
                                **kwargs)
    raise ValueError(f"unknown engine {engine!r}; choose one of {ENGINES} or a path to an .onnx export")


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
