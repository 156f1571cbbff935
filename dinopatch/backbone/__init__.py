"""DINOv2 patch-token extractors.

A backbone turns a batch of canonical images into patch tokens ``[B, h, w, D]``.
The torch engine (timm, :mod:`.torch_engine`) is the reference every faster
engine is compared with; pre-processing (:func:`preprocess`) is numpy so that
every engine sees identical input.

Modules: :mod:`.specs` (the registry of backbones), :mod:`.weights` (hub,
checkpoint files, fingerprints), :mod:`.torch_engine`, :mod:`.onnx_engine`
(ONNX Runtime and its export cache), :mod:`.openvino_engine` (the export on
OpenVINO, CPU), :mod:`.onnx_export` (the graph, checked against torch),
:mod:`.engines` (the engine registry: names to classes), :mod:`.device` (where it runs),
:mod:`.graph_file` (an export's hash and the checks before it is opened).
Importing this package imports neither torch, onnxruntime nor openvino.
"""
from .device import DeviceUnavailableError
from .engines import (
           ENGINES,
           RUNTIMES,
           TORCH_FREE_ENGINES,
           EngineCache,
           auto_engine,
           canonical_engine,
           embed,
           make_backbone,
)
from .onnx_engine import ONNX_FORMAT, PRECISIONS, OnnxBackbone, find_or_export_onnx, onnx_cache_path
from .openvino_engine import OV_PRECISIONS, OpenVinoBackbone, cpu_has_bf16
from .specs import BACKBONES, BackboneSpec, check_image_size, check_positions, get_spec, preprocess
from .torch_engine import TorchBackbone
from .weights import WeightsUnavailableError, build_model, cache_dir, weights_fingerprint

__all__ = ["BACKBONES", "ENGINES", "RUNTIMES", "TORCH_FREE_ENGINES", "EngineCache", "ONNX_FORMAT", "OV_PRECISIONS",
           "PRECISIONS", "BackboneSpec", "DeviceUnavailableError", "OnnxBackbone", "OpenVinoBackbone", "TorchBackbone",
           "WeightsUnavailableError", "auto_engine", "build_model", "cache_dir", "canonical_engine",
           "check_image_size", "check_positions", "cpu_has_bf16", "embed", "find_or_export_onnx", "get_spec",
           "make_backbone", "onnx_cache_path", "preprocess", "weights_fingerprint"]
