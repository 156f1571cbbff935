"""Images in: readers of image files and arrays, and the MVTec AD folder layout.

The synthetic inspection line that stands in for MVTec AD lives in
:mod:`dinopatch.synthetic`; the runtime path never imports it.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


# ----------------------------------------------------------------------------- reading

def as_image(x) -> np.ndarray:
    """Coerce one in-memory image to uint8 ``[H, W]`` (gray) or ``[H, W, 3]`` (BGR).

    Args:
        x: ``[H, W]``, ``[H, W, 1]``, ``[H, W, 3]`` or ``[H, W, 4]`` (alpha is
            dropped) array of uint8, uint16 (top 8 bits kept), bool (0/255),
            other integers (clipped) or floats (``[0, 1]`` scaled by 255,
            otherwise clipped to ``[0, 255]``).

    Returns:
        a contiguous uint8 array; ``x`` itself when it already is one.
    """
    if not isinstance(x, np.ndarray):
        raise TypeError(f"an image must be a numpy array, got {type(x).__name__}")
    if x.ndim == 3 and x.shape[2] in (1, 4):
        x = x[..., 0] if x.shape[2] == 1 else x[..., :3]
    if not (x.ndim == 2 or (x.ndim == 3 and x.shape[2] == 3)):
        raise ValueError(f"an image must be [H, W], [H, W, 1], [H, W, 3] or [H, W, 4], got shape {x.shape}")
    if x.size == 0:
        raise ValueError(f"an image must not be empty, got shape {x.shape}")
    if x.dtype == np.uint8:
        return np.ascontiguousarray(x)
    if x.dtype == np.bool_:
        x = x.astype(np.uint8) * 255
    elif x.dtype == np.uint16:
        x = (x >> 8).astype(np.uint8)
    elif np.issubdtype(x.dtype, np.integer):
        x = np.clip(x, 0, 255).astype(np.uint8)
    elif np.issubdtype(x.dtype, np.floating):
        if not np.isfinite(x).all():
            raise ValueError("a float image must be finite, got NaN or inf values")
        if x.min() >= 0 and x.max() <= 1:
            x = x * 255.0
        x = np.clip(np.rint(x), 0, 255).astype(np.uint8)
    else:
        raise ValueError(f"unsupported image dtype {x.dtype}")
    return np.ascontiguousarray(x)


def _decode(path, flags: int) -> np.ndarray:
    path = Path(os.fspath(path))
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    # imdecode of the bytes, not imread: it reads paths of any encoding.
    im = cv2.imdecode(np.fromfile(str(path), np.uint8), flags)
    if im is None:
        raise ValueError(f"{path}: not a readable image")
    return im


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Read an image file as uint8 ``[H, W]`` gray or ``[H, W, 3]`` BGR (see :func:`as_image`)."""
    return as_image(_decode(path, cv2.IMREAD_UNCHANGED))


def load_images(images) -> list[np.ndarray]:
    """Read a list of images given as arrays and/or paths (str or ``os.PathLike``).

    Returns:
        one uint8 ``[H, W]`` / ``[H, W, 3]`` array per item.
    """
    if isinstance(images, (np.ndarray, str, bytes, os.PathLike)):
        raise TypeError(f"pass a list of images, got a single {type(images).__name__}; wrap it: [image]")
    try:
        items = list(images)
    except TypeError:
        raise TypeError(f"pass a list of images (arrays or paths), got {type(images).__name__}") from None
    return [load_image(item, i) for i, item in enumerate(items)]


def load_image(item, index: int = 0) -> np.ndarray:
    """One image given as an array or a path (str or ``os.PathLike``), as uint8 ``[H, W]`` / ``[H, W, 3]``."""
    if isinstance(item, (str, os.PathLike)):
        return read_image(item)
    if isinstance(item, np.ndarray):
        return as_image(item)
    raise TypeError(f"image {index}: expected an array or a path, got {type(item).__name__}")


def read_mask(path: str | os.PathLike, shape: tuple[int, int]) -> np.ndarray:
    """Read a ground-truth mask (nonzero = defect) as bool ``[H, W]`` of ``shape``."""
    m = _decode(path, cv2.IMREAD_UNCHANGED)
    m = m.reshape(m.shape[0], m.shape[1], -1).any(axis=2).astype(np.uint8)
    h, w = int(shape[0]), int(shape[1])
    if m.shape != (h, w):
        m = cv2.resize(m, (w, h), interpolation=cv2.INTER_NEAREST)
    return m > 0


# ----------------------------------------------------------------------------- folder layout

@dataclass
class TestItem:
    """One test image of an :class:`MVTecFolder`: label 0 good, 1 defective."""
    __test__ = False  # a data class, not a pytest test class

    path: Path
    label: int
    defect: str
    mask_path: Path | None


def _images_in(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


class MVTecFolder:
    """A data folder in the MVTec AD layout.

    ``train/good/*``, ``test/good/*``, ``test/<defect>/*`` and
    ``ground_truth/<defect>/<stem>_mask.png``.
    """

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"no such folder: {self.root}")

    def train_paths(self) -> list[Path]:
        """The good training images, sorted."""
        folder = self.root / "train" / "good"
        paths = _images_in(folder)
        if not paths:
            raise ValueError(f"{folder}: no training images (expected files ending in {', '.join(IMAGE_SUFFIXES)})")
        return paths

    def test_items(self) -> list[TestItem]:
        """The test images: ``good`` first, then each defect type alphabetically.

        A defective image without a mask file gets ``mask_path=None``.
        """
        test = self.root / "test"
        kinds = sorted(d.name for d in test.iterdir() if d.is_dir()) if test.is_dir() else []
        kinds.sort(key=lambda d: d != "good")
        items = []
        for kind in kinds:
            for p in _images_in(test / kind):
                mask = self.root / "ground_truth" / kind / f"{p.stem}_mask.png"
                mask = mask if kind != "good" and mask.is_file() else None
                items.append(TestItem(p, int(kind != "good"), kind, mask))
        return items
