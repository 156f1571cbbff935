"""The ONNX Runtime engine and its export cache.

The engine imports neither torch nor timm once its export exists, so an
inspection PC needs only onnxruntime, numpy and OpenCV.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np

from .specs import check_image_size, check_positions, get_spec, preprocess
from .weights import cache_dir, weights_record_path

# 2: the graph takes the patch positions to run as an input ``positions`` (int64 [n]) and
# gives ``tokens`` [B, n, D]; format 1 had only ``images`` and gave [B, h, w, D].
ONNX_FORMAT = "dinopatch-backbone-tokens/2"
# Bumped when the exported graph changes (same inputs and outputs, faster ops),
# so that a cache made by an older DinoPatch is not reused.
GRAPH_VERSION = 3
PRECISIONS = ("fp32", "int8", "fp16")


def onnx_cache_path(name: str, image_size: int, layers: int, precision: str, fingerprint: str) -> Path:
    """The cached export of one configuration; named by the weights' fingerprint."""
    return (cache_dir() / "onnx"
            / f"{name}_{image_size}px_l{layers}_{precision}_g{GRAPH_VERSION}_{fingerprint[:16]}.onnx")


def find_or_export_onnx(name: str, weights, image_size: int, layers: int = 1, precision: str = "fp32",
                        seed: int = 0, fingerprint: str | None = None) -> Path:
    """The cached export of a configuration, made first (with torch) when missing.

    Args:
        fingerprint: the weights' fingerprint when known (from a model file):
            the cache is then searched without torch, and an export from other
            weights is refused.

    Returns:
        path of the ``.onnx`` file.
    """
    if fingerprint is None:
        record = weights_record_path(name, weights, image_size, seed)
        if record is not None and record.is_file():
            fingerprint = record.read_text().strip()
    if fingerprint is not None:
        path = onnx_cache_path(name, image_size, layers, precision, fingerprint)
        if path.is_file():
            return path
    try:
        import torch  # noqa: F401  (only to say clearly why no export can be made)
    except ImportError:
        raise FileNotFoundError(
            f"no cached ONNX export of {name} at {image_size} px (layers={layers}, {precision}, weights "
            f"{(fingerprint or 'unknown')[:16]}) in {cache_dir() / 'onnx'}, and torch is not installed to make one: "
            f"run `python -m dinopatch export` where torch is and copy the file here, or pass the .onnx path "
            f"as the engine") from None
    from .onnx_export import export_onnx

    return export_onnx(name, weights, image_size, layers=layers, precision=precision, seed=seed,
                       fingerprint=fingerprint)


def read_onnx_metadata(session, path) -> dict:
    """The DinoPatch metadata of an export open in ``session``, checked; ValueError if foreign."""
    meta = session.get_modelmeta().custom_metadata_map
    if meta.get("format") != ONNX_FORMAT:
        raise ValueError(f"{path}: not a DinoPatch backbone export (metadata format {meta.get('format')!r}, "
                         f"expected {ONNX_FORMAT!r}); make one with `python -m dinopatch export`")
    try:
        out = {k: int(meta[k]) for k in ("image_size", "patch_size", "embed_dim", "layers")}
        out.update({k: tuple(float(v) for v in json.loads(meta[k])) for k in ("mean", "std")})
        out.update({k: meta[k] for k in ("backbone", "precision", "weights_fingerprint", "dinopatch_version")})
    except (KeyError, ValueError, TypeError) as e:
        raise ValueError(f"{path}: damaged DinoPatch metadata ({type(e).__name__}: {e})") from None
    side = out["image_size"]
    inputs, outputs = session.get_inputs(), session.get_outputs()
    if ([i.name for i in inputs] != ["images", "positions"] or inputs[0].shape[1:] != [3, side, side]
            or inputs[1].type != "tensor(int64)" or [o.name for o in outputs] != ["tokens"]):
        raise ValueError(f"{path}: expected inputs 'images' [B, 3, {side}, {side}] and 'positions' int64 [n], "
                         f"and output 'tokens', found "
                         f"{[(i.name, i.shape) for i in inputs]} -> {[(o.name, o.shape) for o in outputs]}")
    return out


class OnnxBackbone:
    """DINOv2 patch tokens from an ONNX export, on ONNX Runtime; called like :class:`TorchBackbone`.

    Give ``path`` to run a given export, or a configuration whose export is
    taken from the cache (:func:`cache_dir`) and made with torch when missing.
    Neither torch nor timm is imported when the export exists.

    Args:
        name: a key of :data:`BACKBONES` (default ``dinov2_vits14``; with
            ``path``, checked against the file when given).
        weights: ``"pretrained"``, ``"random"`` or a checkpoint path (unused with ``path``).
        image_size: input side in pixels (default 448; checked with ``path``).
        layers: mean of the last ``layers`` blocks (default 1; checked with ``path``).
        seed: for ``weights="random"``.
        precision: ``"fp32"``, ``"int8"`` (dynamic quantisation, CPU) or
            ``"fp16"`` (GPU); default fp32, checked with ``path``.
        path: an ``.onnx`` file made by :func:`dinopatch.export.export_onnx`.
        fingerprint: the weights fingerprint the caller expects (from a model
            file); an export from other weights is refused.
        threads: intra-op threads (default: ONNX Runtime's, one per physical core).
        providers: execution providers by preference (default: CUDA, when
            onnxruntime-gpu is installed, then CPU).
    """

    engine = "onnx"

    def __init__(self, name=None, weights="pretrained", image_size=None, layers=None, seed=0, precision=None,
                 path=None, fingerprint=None, threads=None, providers=None):
        import onnxruntime as ort

        if precision is not None and precision not in PRECISIONS:
            raise ValueError(f"precision {precision!r} must be one of {PRECISIONS}")
        if path is None:
            cfg_name = name or "dinov2_vits14"
            path = find_or_export_onnx(cfg_name, weights, check_image_size(image_size or 448, get_spec(cfg_name).patch_size),
                                       int(layers or 1), precision or "fp32", seed, fingerprint)
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such ONNX file")
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.intra_op_num_threads = int(threads or 0)
        so.inter_op_num_threads = 1
        # A spinning pool burns the cores the kernels and post-processing need between calls.
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if providers is None:
            available = ort.get_available_providers()
            providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
        try:
            self.session = ort.InferenceSession(str(path), so, providers=providers)
        except Exception as e:  # onnxruntime raises its own exception types for unreadable models
            raise ValueError(f"{path}: not a readable ONNX model ({type(e).__name__}: {e})") from None
        meta = read_onnx_metadata(self.session, path)
        wanted = {"backbone": name, "image_size": image_size, "layers": layers, "precision": precision}
        wrong = {k: (v, meta[k]) for k, v in wanted.items() if v is not None and v != meta[k]}
        if wrong:
            raise ValueError(f"{path}: export does not match the configuration: "
                             + ", ".join(f"{k} {want!r} wanted, file has {got!r}" for k, (want, got) in wrong.items()))
        if fingerprint is not None and fingerprint != meta["weights_fingerprint"]:
            raise ValueError(f"{path}: exported from weights {meta['weights_fingerprint'][:16]}..., but the detector "
                             f"was fitted with {fingerprint[:16]}...; export the right weights")
        self.path = path
        self.spec = get_spec(meta["backbone"])
        if (self.spec.patch_size, self.spec.embed_dim) != (meta["patch_size"], meta["embed_dim"]):
            raise ValueError(f"{path}: patch size / width {meta['patch_size']}/{meta['embed_dim']} do not match "
                             f"{self.spec.name}")
        self.image_size, self.layers, self.precision = meta["image_size"], meta["layers"], meta["precision"]
        self.mean, self.std = meta["mean"], meta["std"]
        self.fingerprint = meta["weights_fingerprint"]
        self.provider = self.session.get_providers()[0]
        if self.precision == "fp16" and self.provider == "CPUExecutionProvider":
            warnings.warn(f"{path}: an fp16 export on the CPU provider runs slower than fp32; fp16 is for GPUs",
                          stacklevel=2)

    @property
    def grid(self) -> tuple[int, int]:
        side = self.image_size // self.spec.patch_size
        return side, side

    def __call__(self, images: np.ndarray, positions=None) -> np.ndarray:
        """uint8 BGR ``[B, H, W, 3]`` -> float32 tokens ``[B, h, w, D]``, or ``[B, n, D]`` at ``positions``."""
        x = preprocess(images, self.image_size, self.mean, self.std)
        h, w = self.grid
        pos = np.arange(h * w, dtype=np.int64) if positions is None else check_positions(positions, self.grid)
        if self.provider == "CUDAExecutionProvider":
            # One upload, tokens written straight into host memory.
            binding = self.session.io_binding()
            binding.bind_cpu_input("images", x)
            binding.bind_cpu_input("positions", pos)
            binding.bind_output("tokens", "cpu")
            self.session.run_with_iobinding(binding)
            tokens = binding.copy_outputs_to_cpu()[0]
        else:
            tokens = self.session.run(["tokens"], {"images": x, "positions": pos})[0]
        return tokens.reshape(len(x), h, w, -1) if positions is None else tokens
