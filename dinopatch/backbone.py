"""DINOv2 patch-token extractors.

A backbone turns a batch of canonical images into patch tokens ``[B, h, w, D]``.
The torch engine (timm) is the reference every faster engine is compared with;
pre-processing lives here in numpy so that every engine sees identical input.

Weights, in the order people reach for them:

* ``"pretrained"``: DINOv2 (LVD-142M) through timm from the hub.  Without a
  route to the hub and no cached copy this fails at once with
  :class:`WeightsUnavailableError`; it never falls back silently.
* a path to a local checkpoint: Meta's ``.pth`` (e.g. ``dinov2_vits14_pretrain.pth``)
  or timm's ``.safetensors``.  Position embeddings are resampled to ``image_size``.
* ``"random"``: timm's initialisation under ``torch.manual_seed(seed)``.

Engines: ``"torch"`` (:class:`TorchBackbone`) and ``"onnx"`` (:class:`OnnxBackbone`,
ONNX Runtime on an export made by :mod:`dinopatch.export`).  The ONNX engine
imports neither torch nor timm once its export exists, so an inspection PC
needs only onnxruntime, numpy and OpenCV.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import os
import socket
import warnings
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class BackboneSpec:
    """What the rest of DinoPatch needs to know about a backbone."""

    name: str
    timm_name: str
    embed_dim: int
    patch_size: int = 14
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    @property
    def hub_tag(self) -> str:
        return f"{self.timm_name}.lvd142m"


def _register(*specs: BackboneSpec) -> dict[str, BackboneSpec]:
    return {s.name: s for s in specs}


BACKBONES = _register(
    BackboneSpec("dinov2_vits14", "vit_small_patch14_dinov2", 384),
    BackboneSpec("dinov2_vitb14", "vit_base_patch14_dinov2", 768),
    BackboneSpec("dinov2_vitl14", "vit_large_patch14_dinov2", 1024),
    BackboneSpec("dinov2_vits14_reg4", "vit_small_patch14_reg4_dinov2", 384),
    BackboneSpec("dinov2_vitb14_reg4", "vit_base_patch14_reg4_dinov2", 768),
    BackboneSpec("dinov2_vitl14_reg4", "vit_large_patch14_reg4_dinov2", 1024),
)


class WeightsUnavailableError(RuntimeError):
    """Pretrained weights were asked for but cannot be had on this machine."""


def get_spec(name: str) -> BackboneSpec:
    try:
        return BACKBONES[name]
    except KeyError:
        raise ValueError(f"unknown backbone {name!r}; choose from {sorted(BACKBONES)}") from None


def check_image_size(image_size: int, patch_size: int = 14) -> int:
    image_size = int(image_size)
    if image_size < patch_size or image_size % patch_size:
        raise ValueError(f"image_size {image_size} must be a positive multiple of {patch_size} (the patch size)")
    return image_size


def preprocess(images: np.ndarray, image_size: int, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> np.ndarray:
    """uint8 BGR ``[B, H, W, 3]`` -> normalised float32 RGB ``[B, 3, S, S]``.

    The upscale is bicubic in OpenCV so that every engine (torch, ONNX Runtime)
    is fed exactly the same array.
    """
    out = np.empty((len(images), 3, image_size, image_size), dtype=np.float32)
    m = np.asarray(mean, np.float32)[:, None, None]
    s = np.asarray(std, np.float32)[:, None, None]
    for i, im in enumerate(images):
        if im.shape[:2] != (image_size, image_size):
            im = cv2.resize(im, (image_size, image_size), interpolation=cv2.INTER_CUBIC)
        rgb = im[..., ::-1].transpose(2, 0, 1).astype(np.float32) / 255.0
        out[i] = (rgb - m) / s
    return out


def _hub_reachable(host: str = "huggingface.co", timeout: float = 3.0) -> bool:
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _read_checkpoint(path: Path) -> dict:
    """A state dict from a file, never executing code from it."""
    import torch

    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    sd = torch.load(str(path), map_location="cpu", weights_only=True)
    for key in ("model", "state_dict", "teacher"):  # training checkpoints nest the weights
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
            sd = sd[key]
    if not isinstance(sd, dict):
        raise ValueError(f"{path} holds a {type(sd).__name__}, not a state dict")
    return sd


def _load_state_dict(model, sd: dict, source: str) -> None:
    """Load Meta- or timm-format DINOv2 weights, resampling position embeddings."""
    from timm.models.vision_transformer import checkpoint_filter_fn

    sd = {k.removeprefix("backbone.").removeprefix("module."): v for k, v in sd.items()}
    sd = checkpoint_filter_fn(sd, model)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"{source} does not match {type(model).__name__} "
            f"(missing {sorted(missing)[:5]}..., unexpected {sorted(unexpected)[:5]}...)"
        )


def build_model(spec: BackboneSpec, weights: str | os.PathLike, image_size: int, seed: int = 0):
    """The timm DINOv2 model for ``spec`` at ``image_size``, weights loaded, in eval mode."""
    import timm
    import torch

    kwargs = dict(img_size=image_size, num_classes=0)
    if weights == "pretrained":
        if not _hub_reachable():
            cached = _cached_hub_file(spec)
            if cached is None:
                raise WeightsUnavailableError(
                    f"pretrained {spec.name} weights cannot be downloaded (no route to the hub) "
                    "and are not cached; pass weights='random' or weights='/path/to/checkpoint' "
                    "(Meta .pth or timm .safetensors)"
                )
            weights = cached
        else:
            return timm.create_model(spec.hub_tag, pretrained=True, **kwargs).eval()
    if weights == "random":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return timm.create_model(spec.timm_name, pretrained=False, **kwargs).eval()
    path = Path(weights)
    if not path.is_file():
        raise FileNotFoundError(f"weights {str(weights)!r}: no such checkpoint file; or use 'pretrained' / 'random'")
    model = timm.create_model(spec.timm_name, pretrained=False, **kwargs)
    _load_state_dict(model, _read_checkpoint(path), str(path))
    return model.eval()


def _cached_hub_file(spec: BackboneSpec) -> Path | None:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    hit = try_to_load_from_cache(f"timm/{spec.hub_tag}", "model.safetensors")
    return Path(hit) if isinstance(hit, str) else None


def weights_fingerprint(model) -> str:
    """sha256 of a model's state dict (names, dtypes, shapes and bytes).

    Model files and ONNX exports record it, so that features from other
    weights are never mixed with a fitted bank silently.
    """
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        a = tensor.detach().cpu().contiguous().numpy()
        h.update(f"{name}:{a.dtype.str}:{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()


class TorchBackbone:
    """The reference engine: timm DINOv2 in eager torch.

    Args:
        name: a key of :data:`BACKBONES`.
        weights: ``"pretrained"``, ``"random"`` or a checkpoint path.
        image_size: input side in pixels, a multiple of 14.
        layers: mean of the patch tokens of the last ``layers`` blocks (each
            through the final norm).
        seed: for ``weights="random"``.
        device: torch device string.
    """

    engine = "torch"

    def __init__(self, name="dinov2_vits14", weights="pretrained", image_size=448, layers=1, seed=0,
                 device="cpu", model=None, fingerprint=None):
        self.spec = get_spec(name)
        self.image_size = check_image_size(image_size, self.spec.patch_size)
        if int(layers) < 1:
            raise ValueError(f"layers must be >= 1, got {layers}")
        self.layers = int(layers)
        self.device = device
        self.model = (model if model is not None else build_model(self.spec, weights, self.image_size, seed)).to(device)
        self._fingerprint = None
        if fingerprint is not None and fingerprint != self.fingerprint:
            raise ValueError(f"weights {str(weights)!r} have fingerprint {self.fingerprint[:16]}..., "
                             f"expected {fingerprint[:16]}... (the detector was fitted with other weights)")

    @property
    def fingerprint(self) -> str:
        """:func:`weights_fingerprint` of the model."""
        if self._fingerprint is None:
            self._fingerprint = weights_fingerprint(self.model)
        return self._fingerprint

    @property
    def grid(self) -> tuple[int, int]:
        side = self.image_size // self.spec.patch_size
        return side, side

    def forward_tensor(self, x):
        """``[B, 3, S, S]`` normalised tensor -> ``[B, h, w, D]`` tokens (differentiable, exportable)."""
        import torch

        feats = self.model.forward_intermediates(
            x, indices=self.layers, norm=True, output_fmt="NLC", intermediates_only=True
        )
        tokens = torch.stack(feats, 0).mean(0) if len(feats) > 1 else feats[0]
        h, w = self.grid
        return tokens.reshape(x.shape[0], h, w, -1)

    def __call__(self, images: np.ndarray) -> np.ndarray:
        """uint8 BGR ``[B, H, W, 3]`` -> float32 tokens ``[B, h, w, D]``."""
        import torch

        x = preprocess(images, self.image_size, self.spec.mean, self.spec.std)
        with torch.inference_mode():
            out = self.forward_tensor(torch.from_numpy(x).to(self.device))
        return out.float().cpu().numpy()


# -- the ONNX engine -----------------------------------------------------------

ONNX_FORMAT = "dinopatch-backbone-tokens/1"
# Bumped when the exported graph changes (same inputs and outputs, faster ops),
# so that a cache made by an older DinoPatch is not reused.
GRAPH_VERSION = 2
PRECISIONS = ("fp32", "int8", "fp16")


def cache_dir() -> Path:
    """Where exports are cached: ``$DINOPATCH_CACHE`` or ``~/.cache/dinopatch``."""
    return Path(os.environ.get("DINOPATCH_CACHE") or Path.home() / ".cache" / "dinopatch")


def onnx_cache_path(name: str, image_size: int, layers: int, precision: str, fingerprint: str) -> Path:
    """The cached export of one configuration; named by the weights' fingerprint."""
    return (cache_dir() / "onnx"
            / f"{name}_{image_size}px_l{layers}_{precision}_g{GRAPH_VERSION}_{fingerprint[:16]}.onnx")


def weights_record_path(name: str, weights, image_size: int, seed: int = 0) -> Path | None:
    """The cache file that remembers the fingerprint of ``weights``, found without loading them.

    The key is what identifies the weights cheaply (seed, hub tag, or file path,
    size and time), with the torch and timm versions, since random
    initialisation and position-embedding resampling depend on them.  None
    where torch is not installed: there the fingerprint comes from a model file.
    """
    try:
        versions = {p: importlib.metadata.version(p) for p in ("torch", "timm")}
    except importlib.metadata.PackageNotFoundError:
        return None
    if weights == "random":
        ident = {"seed": int(seed)}
    elif weights == "pretrained":
        ident = {"hub": get_spec(name).hub_tag}
    else:
        path = Path(weights).resolve()
        if not path.is_file():
            return None
        st = path.stat()
        ident = {"file": str(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    key = json.dumps(dict(ident, backbone=name, image_size=int(image_size), **versions), sort_keys=True)
    return cache_dir() / "onnx" / "weights" / f"{hashlib.sha256(key.encode()).hexdigest()[:24]}.txt"


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
    from .export import export_onnx

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
    if ([i.name for i in inputs] != ["images"] or inputs[0].shape[1:] != [3, side, side]
            or [o.name for o in outputs] != ["tokens"]):
        raise ValueError(f"{path}: expected input 'images' [B, 3, {side}, {side}] and output 'tokens', found "
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

    def __call__(self, images: np.ndarray) -> np.ndarray:
        """uint8 BGR ``[B, H, W, 3]`` -> float32 tokens ``[B, h, w, D]``."""
        x = preprocess(images, self.image_size, self.mean, self.std)
        if self.provider == "CUDAExecutionProvider":
            # One upload, tokens written straight into host memory.
            binding = self.session.io_binding()
            binding.bind_cpu_input("images", x)
            binding.bind_output("tokens", "cpu")
            self.session.run_with_iobinding(binding)
            return binding.copy_outputs_to_cpu()[0]
        return self.session.run(["tokens"], {"images": x})[0]


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
