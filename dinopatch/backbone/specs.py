"""The DINOv2 and DINOv3 backbones DinoPatch knows: specs, registry, and the input every engine is fed.

DINOv2 (patch 14, learned absolute position embedding) is Apache-2.0; DINOv3
(patch 16, four register tokens, rotary position embedding; timm >= 1.0.20)
comes under Meta's DINOv3 licence, which has its own terms of use.
"""
from __future__ import annotations

from dataclasses import dataclass

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
    pretrain: str = "lvd142m"  # timm's tag of the pretrained weights on the hub

    @property
    def hub_tag(self) -> str:
        return f"{self.timm_name}.{self.pretrain}"


def _register(*specs: BackboneSpec) -> dict[str, BackboneSpec]:
    return {s.name: s for s in specs}


BACKBONES = _register(
    BackboneSpec("dinov2_vits14", "vit_small_patch14_dinov2", 384),
    BackboneSpec("dinov2_vitb14", "vit_base_patch14_dinov2", 768),
    BackboneSpec("dinov2_vitl14", "vit_large_patch14_dinov2", 1024),
    BackboneSpec("dinov2_vits14_reg4", "vit_small_patch14_reg4_dinov2", 384),
    BackboneSpec("dinov2_vitb14_reg4", "vit_base_patch14_reg4_dinov2", 768),
    BackboneSpec("dinov2_vitl14_reg4", "vit_large_patch14_reg4_dinov2", 1024),
    BackboneSpec("dinov3_vits16", "vit_small_patch16_dinov3", 384, patch_size=16, pretrain="lvd1689m"),
    BackboneSpec("dinov3_vitb16", "vit_base_patch16_dinov3", 768, patch_size=16, pretrain="lvd1689m"),
)


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


def check_positions(positions, grid: tuple[int, int]) -> np.ndarray:
    """Flat patch indices to run the backbone on: int64 ``[n]``, strictly increasing, within the grid.

    Raises:
        ValueError: empty, not integers, out of ``[0, h * w)``, repeated or unsorted.
    """
    p = np.asarray(positions)
    size = grid[0] * grid[1]
    if p.ndim != 1 or p.size == 0 or not np.issubdtype(p.dtype, np.integer):
        raise ValueError(f"positions must be a non-empty 1-D integer array of flat patch indices, "
                         f"got {p.dtype}{list(p.shape)}")
    if p[0] < 0 or p[-1] >= size or not (np.diff(p) > 0).all():
        raise ValueError(f"positions must be strictly increasing flat indices in [0, {size}) of the "
                         f"{grid[0]}x{grid[1]} patch grid, got range [{p.min()}, {p.max()}] (sorted: "
                         f"{bool((np.diff(p) > 0).all())})")
    return np.ascontiguousarray(p, dtype=np.int64)


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


