"""Choosing an engine by name: the registry the API, the CLI and the bench read."""
from __future__ import annotations

import importlib.util
import os

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
