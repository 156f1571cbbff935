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
"""
from __future__ import annotations

import os
import socket
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
        raise ValueError(f"image_size {image_size} must be a positive multiple of the patch size {patch_size}")
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
                 device="cpu", model=None):
        self.spec = get_spec(name)
        self.image_size = check_image_size(image_size, self.spec.patch_size)
        if int(layers) < 1:
            raise ValueError(f"layers must be >= 1, got {layers}")
        self.layers = int(layers)
        self.device = device
        self.model = (model if model is not None else build_model(self.spec, weights, self.image_size, seed)).to(device)

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


def make_backbone(engine: str = "torch", **kwargs):
    """A backbone for ``engine`` ("torch"; "auto" takes the best engine present)."""
    if engine in ("torch", "auto"):
        return TorchBackbone(**kwargs)
    raise ValueError(f"unknown engine {engine!r}; choose 'torch' or 'auto'")
