"""Choosing an engine by name: the registry the API, the CLI and the bench read."""
from __future__ import annotations

import importlib.util
import os

from .onnx_engine import PRECISIONS, OnnxBackbone
from .openvino_engine import OV_PRECISIONS, OpenVinoBackbone, cpu_has_bf16
from .torch_engine import TorchBackbone

ENGINES = ("auto", "torch", "onnx", "onnx:int8", "onnx:fp16", "openvino", "openvino:f32", "openvino:bf16")


def installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def auto_engine() -> str:
    """The engine ``"auto"`` stands for on this machine (see :func:`make_backbone`)."""
    if installed("openvino") and cpu_has_bf16():
        return "openvino:bf16"
    if installed("onnxruntime"):
        return "onnx"
    if installed("openvino"):
        return "openvino:f32"
    return "torch"


def make_backbone(engine: str | os.PathLike = "auto", fingerprint: str | None = None, **kwargs):
    """A backbone for ``engine``.

    Args:
        engine: ``"torch"``; ``"onnx"`` (fp32), ``"onnx:int8"`` or
            ``"onnx:fp16"`` (ONNX Runtime); ``"openvino"`` (bf16 where the CPU
            has it, else f32), ``"openvino:f32"`` or ``"openvino:bf16"``; a
            path to an ``.onnx`` export (ONNX Runtime); or ``"auto"``, the
            fastest installed engine by this rule, from ViT-S/14 at 448 px on
            2 cores (README, "Engines"):

            1. ``openvino:bf16`` when openvino is installed and the CPU has
               AVX512-BF16 or AMX: 1.8x ONNX Runtime fp32, token cosine 0.99999;
            2. else ``onnx`` (fp32) when onnxruntime is installed: OpenVINO f32
               is no faster than ONNX Runtime fp32 on an AVX2-only CPU;
            3. else ``openvino:f32`` when openvino is installed;
            4. else ``torch``.

            int8 engines are never chosen automatically: their accuracy is
            judged per data set, by AUROC.
        fingerprint: the weights fingerprint expected (from a model file).
        **kwargs: ``name``, ``weights``, ``image_size``, ``layers``, ``seed``.
    """
    engine = os.fspath(engine)
    if engine == "auto":
        engine = auto_engine()
    if engine == "torch":
        return TorchBackbone(fingerprint=fingerprint, **kwargs)
    if engine.endswith(".onnx"):
        return OnnxBackbone(path=engine, fingerprint=fingerprint, **kwargs)
    kind, _, precision = engine.partition(":")
    if kind == "onnx" and precision in ("", *PRECISIONS):
        return OnnxBackbone(precision=precision or "fp32", fingerprint=fingerprint, **kwargs)
    if kind == "openvino" and precision in ("", *OV_PRECISIONS):
        return OpenVinoBackbone(precision=precision or None, fingerprint=fingerprint, **kwargs)
    raise ValueError(f"unknown engine {engine!r}; choose one of {ENGINES} or a path to an .onnx export")
