"""DINOv2 patch-token extractors.

A backbone turns a batch of canonical images into patch tokens ``[B, h, w, D]``.
The torch engine (timm, :mod:`.torch_engine`) is the reference every faster
engine is compared with; pre-processing (:func:`preprocess`) is numpy so that
every engine sees identical input.

Modules: :mod:`.specs` (the registry of backbones), :mod:`.weights` (hub,
checkpoint files, fingerprints), :mod:`.torch_engine`, :mod:`.onnx_engine`
(ONNX Runtime and its export cache), :mod:`.onnx_export` (the graph, checked
against torch), :mod:`.engines` (choosing one by name).  Importing this package
imports neither torch nor onnxruntime.
"""
from .engines import ENGINES, EngineCache, embed, make_backbone
from .onnx_engine import ONNX_FORMAT, PRECISIONS, OnnxBackbone, find_or_export_onnx, onnx_cache_path
from .specs import BACKBONES, BackboneSpec, check_image_size, check_positions, get_spec, preprocess
from .torch_engine import TorchBackbone
from .weights import WeightsUnavailableError, build_model, cache_dir, weights_fingerprint

__all__ = ["BACKBONES", "ENGINES", "EngineCache", "embed", "ONNX_FORMAT", "PRECISIONS", "BackboneSpec",
           "OnnxBackbone", "TorchBackbone", "WeightsUnavailableError", "build_model", "cache_dir",
           "check_image_size", "check_positions", "find_or_export_onnx", "get_spec", "make_backbone",
           "onnx_cache_path", "preprocess", "weights_fingerprint"]
