"""Choosing an engine by name: the registry the API, the CLI and the bench read."""
from __future__ import annotations

import importlib.util
import os
import threading
from collections import OrderedDict

import numpy as np
from tqdm.auto import tqdm

from .onnx_engine import PRECISIONS, OnnxBackbone
from .torch_engine import TorchBackbone

ENGINES = ("auto", "torch", "onnx", "onnx:int8", "onnx:fp16")


def make_backbone(engine: str | os.PathLike = "auto", fingerprint: str | None = None, **kwargs):
    """A backbone for ``engine``.

    Args:
        engine: ``"torch"``; ``"onnx"`` (fp32), ``"onnx:int8"`` or
            ``"onnx:fp16"``; a path to an ``.onnx`` export; or ``"auto"``:
            onnx when onnxruntime is installed, else torch.
        fingerprint: the weights fingerprint expected (from a model file).
        **kwargs: ``name``, ``weights``, ``image_size``, ``layers``, ``seed``.
    """
    engine = os.fspath(engine)
    if engine == "auto":
        engine = "onnx" if importlib.util.find_spec("onnxruntime") is not None else "torch"
    if engine == "torch":
        return TorchBackbone(fingerprint=fingerprint, **kwargs)
    if engine.endswith(".onnx"):
        return OnnxBackbone(path=engine, fingerprint=fingerprint, **kwargs)
    kind, _, precision = engine.partition(":")
    if kind == "onnx" and precision in ("", *PRECISIONS):
        return OnnxBackbone(precision=precision or "fp32", fingerprint=fingerprint, **kwargs)
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

    def get(self, engine: str | os.PathLike, fingerprint: str | None, **config):
        """The engine ``make_backbone(engine, fingerprint, **config)`` would build, built at most once."""
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
