"""The ONNX Runtime engine and its export cache.

The engine imports neither torch nor timm once its export exists, so an
inspection PC needs only onnxruntime, numpy and OpenCV.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np

from .device import CPU_PROVIDER, CUDA_PROVIDER, DeviceUnavailableError, onnx_providers, parse_device
from .graph_file import ONNX_FORMAT, PRECISIONS, check_graph_file, graph_sha256, onnx_cache_path
from .specs import check_image_size, check_positions, get_spec, preprocess
from .weights import cache_dir, weights_record_path


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


def read_export_metadata(meta: dict, path, inputs, outputs) -> dict:
    """The DinoPatch metadata of an export, checked against its signature; ValueError if foreign.

    Args:
        meta: the file's metadata (key -> string), as the runtime that opened it reads it.
        inputs: ``(name, shape, element type)`` of the graph's inputs, the type as numpy names it.
        outputs: ``(name, shape)`` of its outputs.
    """
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
    if ([n for n, _, _ in inputs] != ["images", "positions"] or list(inputs[0][1][1:]) != [3, side, side]
            or len(inputs[1][1]) != 1 or inputs[1][2] != "int64" or [n for n, _ in outputs] != ["tokens"]):
        raise ValueError(f"{path}: expected inputs 'images' [B, 3, {side}, {side}] and 'positions' int64 [n], "
                         f"and output 'tokens', found {inputs} -> {outputs}")
    out["spec"] = spec = get_spec(out["backbone"])
    if (spec.patch_size, spec.embed_dim) != (out["patch_size"], out["embed_dim"]):
        raise ValueError(f"{path}: patch size / width {out['patch_size']}/{out['embed_dim']} do not match "
                         f"{spec.name}")
    return out


def check_export_matches(meta: dict, path, fingerprint=None, **wanted) -> None:
    """Refuse an export whose configuration (``wanted``: name -> value or None) or weights differ."""
    wrong = {k: (v, meta[k]) for k, v in wanted.items() if v is not None and v != meta[k]}
    if wrong:
        raise ValueError(f"{path}: export does not match the configuration: "
                         + ", ".join(f"{k} {want!r} wanted, file has {got!r}" for k, (want, got) in wrong.items()))
    if fingerprint is not None and fingerprint != meta["weights_fingerprint"]:
        raise ValueError(f"{path}: exported from weights {meta['weights_fingerprint'][:16]}..., but the detector "
                         f"was fitted with {fingerprint[:16]}...; export the right weights")


# ONNX Runtime's names of the input types, as numpy names them.
_ORT_TYPES = {"tensor(float)": "float32", "tensor(int64)": "int64"}

# ONNX Runtime's exception types that mean the file itself is not a model it can read.
_UNREADABLE = ("InvalidProtobuf", "InvalidGraph", "NoModel", "NoSuchFile")


def _start_session(ort, path: Path, options, providers: list):
    """An InferenceSession; an unreadable file is a ValueError, any other start-up failure a RuntimeError."""
    if any(p[0] == CUDA_PROVIDER for p in providers if isinstance(p, tuple)) and hasattr(ort, "preload_dlls"):
        # CUDA and cuDNN installed from pip are found only once loaded (or after torch was imported).
        ort.preload_dlls()
    try:
        return ort.InferenceSession(str(path), options, providers=providers)
    except Exception as e:  # onnxruntime raises its own exception types, one per status code
        if type(e).__name__ in _UNREADABLE:
            raise ValueError(f"{path}: not a readable ONNX model ({type(e).__name__}: {e})") from None
        names = [p[0] if isinstance(p, tuple) else p for p in providers]
        raise RuntimeError(f"{path}: ONNX Runtime could not start a session on {names} "
                           f"({type(e).__name__}: {e})") from e


def open_graph(name, weights, image_size, layers, seed, precision, path, fingerprint, sha256=None):
    """The export to run, checked as bytes before any runtime opens it; ``(path, sha256)``.

    ``path`` when given, else the cached export of the configuration (made
    with torch when missing).  The file must pass
    :func:`~dinopatch.backbone.graph_file.check_graph_file`.  With ``sha256``
    (from a model file) a given file whose hash differs is refused; a cached one
    is exported again where torch is installed (a warning if the fresh export,
    checked against torch, still hashes otherwise: other library versions),
    and refused where it is not.
    """
    given = path is not None
    if not given:
        name = name or "dinov2_vits14"
        image_size = check_image_size(image_size or 448, get_spec(name).patch_size)
        path = find_or_export_onnx(name, weights, image_size, int(layers or 1), precision or "fp32", seed,
                                   fingerprint)
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such ONNX file")
    digest = graph_sha256(check_graph_file(path))
    if sha256 is None or digest == sha256:
        return path, digest
    differs = f"{path}: sha256 {digest[:16]}... differs from the {sha256[:16]}... recorded with the model"
    if given:
        raise ValueError(f"{differs}: not the graph the model was checked with; refused")
    try:
        import torch  # noqa: F401  (only to say clearly why the graph cannot be made again)
    except ImportError:
        raise ValueError(f"{differs}, and torch is not installed to export it again: refused; copy the "
                         f"model's own graph here or export it where torch is") from None
    from .onnx_export import export_onnx

    export_onnx(name, weights, image_size, int(layers or 1), precision or "fp32", out=path, seed=seed,
                fingerprint=fingerprint)
    digest = graph_sha256(check_graph_file(path))
    if digest != sha256:
        warnings.warn(f"{differs}; exported again and checked against torch, it hashes {digest[:16]}... "
                      f"(other torch/onnx versions than at fit)", stacklevel=3)
    return path, digest


class ExportedBackbone:
    """What every engine that runs an export knows of it: the checked metadata, and the token grid."""

    def _adopt(self, meta: dict, path: Path) -> None:
        self.path = path
        self.spec = meta["spec"]
        self.image_size, self.layers = meta["image_size"], meta["layers"]
        self.mean, self.std = meta["mean"], meta["std"]
        self.fingerprint = meta["weights_fingerprint"]

    @property
    def grid(self) -> tuple[int, int]:
        side = self.image_size // self.spec.patch_size
        return side, side

    def positions(self, positions=None) -> np.ndarray:
        """The graph's ``positions`` input: the checked flat indices, or every patch when None."""
        h, w = self.grid
        return np.arange(h * w, dtype=np.int64) if positions is None else check_positions(positions, self.grid)

    def shape_tokens(self, tokens: np.ndarray, positions=None) -> np.ndarray:
        """The graph's ``[B, n, D]`` tokens, as the grid ``[B, h, w, D]`` when every patch ran."""
        return tokens.reshape(len(tokens), *self.grid, -1) if positions is None else tokens


class OnnxBackbone(ExportedBackbone):
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
        device: ``"auto"`` (the first GPU when onnxruntime-gpu can use it,
            else the CPU), ``"cpu"``, ``"cuda"`` or ``"cuda:N"``; a GPU asked
            for by name that the session cannot run on raises
            :class:`~dinopatch.backbone.device.DeviceUnavailableError`.
        sha256: the graph's hash recorded with a model (see :func:`open_graph`).
        providers: ONNX Runtime providers (with options) to ask for instead of
            ``device``'s, e.g. TensorRT's first; a session that does not run on
            the first of them raises
            :class:`~dinopatch.backbone.device.DeviceUnavailableError`.

    Attributes:
        device: where the session runs (``"cpu"`` or ``"cuda:N"``).
        sha256: the hash of the graph file(s) loaded
            (:func:`~dinopatch.backbone.graph_file.graph_sha256`).
        provider: the execution provider the session runs on.
    """

    engine = "onnx"

    def __init__(self, name=None, weights="pretrained", image_size=None, layers=None, seed=0, precision=None,
                 path=None, fingerprint=None, threads=None, device="auto", sha256=None, providers=None):
        import onnxruntime as ort

        if precision is not None and precision not in PRECISIONS:
            raise ValueError(f"precision {precision!r} must be one of {PRECISIONS}")
        self.device, default = onnx_providers(device, ort.get_available_providers())
        providers = list(providers or default)
        path, self.sha256 = open_graph(name, weights, image_size, layers, seed, precision, path, fingerprint,
                                       sha256)
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.intra_op_num_threads = int(threads or 0)
        so.inter_op_num_threads = 1
        # A spinning pool burns the cores the kernels and post-processing need between calls.
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = _start_session(ort, path, so, providers)
        meta = read_export_metadata(self.session.get_modelmeta().custom_metadata_map, path,
                                    [(i.name, i.shape, _ORT_TYPES.get(i.type, i.type))
                                     for i in self.session.get_inputs()],
                                    [(o.name, o.shape) for o in self.session.get_outputs()])
        check_export_matches(meta, path, fingerprint, backbone=name, image_size=image_size, layers=layers,
                             precision=precision)
        self._adopt(meta, path)
        self.precision = meta["precision"]
        self.provider = self.session.get_providers()[0]
        asked = providers[0][0] if isinstance(providers[0], tuple) else providers[0]
        if asked not in (CUDA_PROVIDER, CPU_PROVIDER) and self.provider != asked:
            raise DeviceUnavailableError(f"{path}: ONNX Runtime could not start {asked} (see its log above) and "
                                         f"would run on {self.provider}")
        if self.device != "cpu" and self.provider != CUDA_PROVIDER and asked == CUDA_PROVIDER:
            # onnxruntime-gpu without usable CUDA libraries or device falls back to the CPU, logging to stderr only.
            if parse_device(device)[0] == "cuda":
                raise DeviceUnavailableError(f"device {device!r} asked for, but ONNX Runtime could not start "
                                             f"{CUDA_PROVIDER} on it (no such GPU, or the CUDA/cuDNN libraries "
                                             f"are missing; see its log above) and would run on {self.provider}")
            warnings.warn(f"{path}: ONNX Runtime runs on {self.provider}, not {CUDA_PROVIDER} as asked "
                          f"(see its log above)", stacklevel=2)
            self.device = "cpu"
        # On a GPU, input and output are bound to host buffers: one upload, tokens written straight to host memory.
        self.io_binding = self.provider != CPU_PROVIDER
        if self.precision == "fp16" and self.provider == CPU_PROVIDER:
            warnings.warn(f"{path}: an fp16 export on the CPU provider runs slower than fp32; fp16 is for GPUs",
                          stacklevel=2)

    def __call__(self, images: np.ndarray, positions=None) -> np.ndarray:
        """uint8 BGR ``[B, H, W, 3]`` -> float32 tokens ``[B, h, w, D]``, or ``[B, n, D]`` at ``positions``."""
        x = preprocess(images, self.image_size, self.mean, self.std)
        pos = self.positions(positions)
        if self.io_binding:
            binding = self.session.io_binding()
            binding.bind_cpu_input("images", x)
            binding.bind_cpu_input("positions", pos)
            binding.bind_output("tokens", "cpu")
            self.session.run_with_iobinding(binding)
            tokens = binding.copy_outputs_to_cpu()[0]
        else:
            tokens = self.session.run(["tokens"], {"images": x, "positions": pos})[0]
        return self.shape_tokens(tokens, positions)
