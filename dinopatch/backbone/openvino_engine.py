"""The OpenVINO engine: the project's fp32 ONNX export compiled for the CPU, in fp32 or bf16.

OpenVINO's ONNX reader takes the export as it is: the fused
``com.microsoft.MultiHeadAttention`` of :mod:`.attention` becomes its own
``ScaledDotProductAttention`` op.  The inference precision is OpenVINO's
(``INFERENCE_PRECISION_HINT``), applied to the fp32 graph, so one export
serves both precisions.  At run time the engine needs only openvino, numpy and
OpenCV: neither torch nor onnxruntime.

bf16 needs AVX512-BF16 or AMX; where the CPU has neither, OpenVINO quietly
runs f32 when asked for bf16, so asking for bf16 there is refused here
rather than reported as bf16.
"""
from __future__ import annotations

import warnings

import numpy as np

from .. import cpu
from .device import cpu_only
from .onnx_engine import ExportedBackbone, check_export_matches, open_graph, read_export_metadata
from .specs import preprocess

OV_PRECISIONS = ("fp32", "bf16", "int8")
# OpenVINO's own spelling; int8 runs what the quantisation left in float in f32.
_HINTS = {"fp32": "f32", "bf16": "bf16", "int8": "f32"}


def cpu_has_bf16() -> bool:
    """Whether OpenVINO's CPU plugin computes in bf16 on this CPU (AVX512-BF16 or AMX), at its ``DINOPATCH_CPU``."""
    if cpu.level() is not None:  # both levels lack AVX512-BF16 and AMX; OpenVINO itself sees the real CPU
        return False
    import openvino as ov

    return "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


def _framework_metadata(model) -> dict:
    """The ONNX file's metadata, which OpenVINO's reader keeps in the model's ``framework`` rt_info."""
    if not model.has_rt_info(["framework"]):
        return {}
    return {k: v.astype(str) for k, v in model.get_rt_info(["framework"]).astype(dict).items()}


def _dims(port) -> list:
    return [d.get_length() if d.is_static else None for d in port.get_partial_shape()]


class OpenVinoBackbone(ExportedBackbone):
    """DINOv2 patch tokens from the ONNX export, compiled by OpenVINO for the CPU.

    Args:
        name, weights, image_size, layers, seed, path, fingerprint, sha256: as for
            :class:`~dinopatch.backbone.OnnxBackbone`; the fp32 export is read, and its
            hash kept as ``sha256``.
        precision: ``"fp32"``, ``"bf16"`` or ``"int8"``; default bf16 where the CPU has it
            (:func:`cpu_has_bf16`), else fp32.  bf16 on a CPU without it is an error.  int8 is
            the export quantised by NNCF (:mod:`.openvino_int8`): made from ``calibration``, or
            read from the cache by its recorded ``sha256``.
            ``"f32"`` is the old spelling of ``"fp32"`` (a DeprecationWarning).
        threads: inference threads (default: one per physical core, OpenVINO's own count).
        calibration: ``(frames [N, S, S, 3] uint8, positions or None)``: a model's nominal canonical
            frames to quantise int8 on.
        device: ``"auto"`` or ``"cpu"``; a GPU asked for by name raises
            :class:`~dinopatch.backbone.device.DeviceUnavailableError`.

    The CPU plugin's threads are not pinned to cores (``ENABLE_CPU_PINNING``
    off), so that the distance kernels' OpenMP threads and OpenCV can share the
    cores between backbone calls; one stream, latency mode, since one caller
    runs one batch at a time.
    """

    engine = "openvino"

    def __init__(self, name=None, weights="pretrained", image_size=None, layers=None, seed=0, precision=None,
                 path=None, fingerprint=None, threads=None, device="auto", sha256=None, calibration=None):
        import openvino as ov

        self.device = cpu_only(device, "openvino")
        if precision is None:
            precision = "bf16" if cpu_has_bf16() else "fp32"
        if precision == "f32":
            warnings.warn("OpenVINO precision 'f32' is spelled 'fp32' now; the old name goes in the next release",
                          DeprecationWarning, stacklevel=2)
            precision = "fp32"
        if precision not in OV_PRECISIONS:
            raise ValueError(f"OpenVINO precision {precision!r} must be one of {OV_PRECISIONS}")
        if precision == "bf16" and not cpu_has_bf16():
            raise ValueError("openvino:bf16 needs a CPU with AVX512-BF16 or AMX, and this one has neither "
                             "(OpenVINO would silently run f32); use engine='openvino:fp32'")
        if precision == "int8" and sha256 is None and calibration is None:
            raise ValueError("openvino:int8 is quantised on a model's own nominal frames, so it is made when the "
                             "engine is measured (engine='auto' at fit, or dinopatch tune-engine), not named by hand")
        fp32_sha = None if precision == "int8" else sha256
        path, self.sha256 = open_graph(name, weights, image_size, layers, seed, "fp32", path, fingerprint, fp32_sha)
        core = ov.Core()
        try:
            model = core.read_model(str(path))
        except Exception as e:  # openvino raises its own RuntimeError subclasses for unreadable files
            raise ValueError(f"{path}: not a readable ONNX model ({type(e).__name__}: {e})") from None
        meta = read_export_metadata(_framework_metadata(model), path,
                                    [(p.any_name, _dims(p), str(p.get_element_type().to_dtype()))
                                     for p in model.inputs],
                                    [(p.any_name, _dims(p)) for p in model.outputs])
        check_export_matches(meta, path, fingerprint, backbone=name, image_size=image_size, layers=layers)
        if meta["precision"] != "fp32":
            raise ValueError(f"{path}: a {meta['precision']} export; OpenVINO reads the fp32 export and applies "
                             f"its own precision")
        self._adopt(meta, path)
        self.precision = precision
        if precision == "int8":
            model, self.sha256 = self._int8(core, model, sha256, calibration)
        config = {"INFERENCE_PRECISION_HINT": _HINTS[precision], "PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": 1,
                  "ENABLE_CPU_PINNING": False}
        if threads:
            config["INFERENCE_NUM_THREADS"] = int(threads)
        self.compiled = core.compile_model(model, "CPU", config)
        self.threads = int(self.compiled.get_property("INFERENCE_NUM_THREADS"))

    def _int8(self, core, model, sha256, calibration):
        """The int8 graph recorded as ``sha256``, or made now from ``(frames, positions)``; and its hash."""
        from . import openvino_int8

        if sha256 is not None:
            return core.read_model(str(openvino_int8.cached(sha256))), sha256
        frames, positions = calibration
        xml, digest = openvino_int8.quantize(model, frames, self.positions(positions), self.image_size, self.mean,
                                             self.std)
        return core.read_model(str(xml)), digest

    def __call__(self, images: np.ndarray, positions=None) -> np.ndarray:
        """uint8 BGR ``[B, H, W, 3]`` -> float32 tokens ``[B, h, w, D]``, or ``[B, n, D]`` at ``positions``."""
        x = preprocess(images, self.image_size, self.mean, self.std)
        # A fresh request per call: the engine may be called from several threads.
        tokens = self.compiled.create_infer_request().infer({"images": x, "positions": self.positions(positions)})
        return self.shape_tokens(tokens[0].copy(), positions)
