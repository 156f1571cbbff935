"""Deployment targets of the backbone: ONNX export (``python -m dinopatch export``).

Importable as ``dinopatch.export``: wheels map this folder there, and a source
checkout finds it through ``dinopatch/__init__.py``.
"""
from .onnx_export import CHECK_TOLERANCES, export_backbone, export_onnx, main

__all__ = ["CHECK_TOLERANCES", "export_backbone", "export_onnx", "main"]
