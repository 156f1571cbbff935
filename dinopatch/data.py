"""Images in: readers of image files and arrays, and the MVTec AD folder layout.

The synthetic inspection line that stands in for MVTec AD lives in
:mod:`dinopatch.synthetic`; the runtime path never imports it.
"""
from __future__ import annotations

import os
import struct
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
            otherwise clipped to ``[0, 255]``), of at most :func:`max_pixels`.

    Returns:
        a contiguous uint8 array; ``x`` itself when it already is one.

    Raises:
        TypeError: ``x`` is not an array.
        ValueError: a shape, dtype or size an image cannot have, or non-finite values.
    """
    if not isinstance(x, np.ndarray):
        raise TypeError(f"an image must be a numpy array, got {type(x).__name__}")
    if x.ndim == 3 and x.shape[2] in (1, 4):
        x = x[..., 0] if x.shape[2] == 1 else x[..., :3]
    if not (x.ndim == 2 or (x.ndim == 3 and x.shape[2] == 3)):
        raise ValueError(f"an image must be [H, W], [H, W, 1], [H, W, 3] or [H, W, 4], got shape {x.shape}")
    if x.size == 0:
        raise ValueError(f"an image must not be empty, got shape {x.shape}")
    _check_pixels(x.shape[1], x.shape[0], "an image")
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
    """Decode an image file, its size checked from its header first (see :func:`read_image`)."""
    path = Path(os.fspath(path))
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    cap = max_pixels()
    if path.stat().st_size > _MAX_BYTES_PER_PIXEL * cap + _HEADER_SLACK:
        raise ValueError(f"{path}: {path.stat().st_size} bytes, more than any image of at most {cap} pixels "
                         f"needs (the cap; set DINOPATCH_MAX_PIXELS to change it)")
    data = np.fromfile(str(path), np.uint8)
    width, height = image_size(data, path)
    _check_pixels(width, height, str(path))
    try:
        # imdecode of the bytes, not imread: it reads paths of any encoding.
        im = cv2.imdecode(data, flags)
    except cv2.error as e:
        raise ValueError(f"{path}: not a readable image ({str(e).strip().splitlines()[-1]})") from None
    if im is None:
        raise ValueError(f"{path}: not a readable image (damaged or truncated)")
    return im


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Read an image file as uint8 ``[H, W]`` gray or ``[H, W, 3]`` BGR (see :func:`as_image`).

    The image's width and height are read from the file's header and checked
    against :func:`max_pixels` before anything is decoded, so a small file
    that would inflate to gigabytes costs nothing. Only formats whose size
    this module can read from the header are decoded: PNG, JPEG, BMP, TIFF,
    WebP and PNM (PGM/PPM/PBM); any other file is refused rather than decoded
    blind, since its size would only be known after the memory is spent.

    Raises:
        FileNotFoundError: no such file.
        ValueError: naming the path: an unknown format, a damaged or truncated
            file, or an image over the pixel cap.
    """
    return as_image(_decode(path, cv2.IMREAD_UNCHANGED))


MAX_PIXELS = 100_000_000
"""The default cap on width x height of any image read or passed in (100 MP);
the environment variable ``DINOPATCH_MAX_PIXELS`` overrides it."""
MAX_PIXELS_ENV = "DINOPATCH_MAX_PIXELS"
_MAX_BYTES_PER_PIXEL = 16  # float32 RGBA TIFF, uncompressed: the most a supported format spends on a pixel
_HEADER_SLACK = 1 << 20


def write_png(path: str | os.PathLike, picture: np.ndarray) -> Path:
    """Write ``picture`` (uint8 or uint16, gray or BGR) as a PNG at ``path``, creating its folder.

    Encoded in memory and written through Python's file API, never ``cv2.imwrite``: OpenCV
    mishandles (and may crash on) names that are not valid UTF-8, which Python writes as they are.
    """
    path = Path(os.fspath(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    ok, data = cv2.imencode(".png", picture)
    if not ok:
        raise OSError(f"could not encode {path}")
    with open(os.fsencode(path), "wb") as f:
        f.write(data.tobytes())
    return path


def max_pixels() -> int:
    """The pixel cap in force: ``$DINOPATCH_MAX_PIXELS``, else :data:`MAX_PIXELS`."""
    text = os.environ.get(MAX_PIXELS_ENV)
    if text is None:
        return MAX_PIXELS
    try:
        cap = int(text)
    except ValueError:
        cap = 0
    if cap <= 0:
        raise ValueError(f"{MAX_PIXELS_ENV}={text!r} is not a positive whole number of pixels")
    return cap


def _check_pixels(width: int, height: int, what: str) -> None:
    cap = max_pixels()
    if width * height > cap:
        raise ValueError(f"{what}: {width}x{height} = {width * height} pixels, over the cap of {cap} "
                         f"(set {MAX_PIXELS_ENV} to change it)")


def image_size(data: np.ndarray, path: str | os.PathLike = "image") -> tuple[int, int]:
    """``(width, height)`` of an encoded image, read from its header without decoding.

    Args:
        data: the file's bytes as uint8.
        path: names the file in errors.

    Raises:
        ValueError: not PNG, JPEG, BMP, TIFF, WebP or PNM, or a header that is
            truncated or gives a size of zero.
    """
    head = memoryview(data)
    for magic, reader in _SIZE_READERS:
        if bytes(head[:len(magic)]) == magic:
            try:
                width, height = reader(head)
            except (struct.error, ValueError, IndexError) as e:
                raise ValueError(f"{path}: not a readable image (damaged header: "
                                 f"{str(e) or type(e).__name__})") from None
            if width <= 0 or height <= 0:
                raise ValueError(f"{path}: not a readable image (its header gives a size of "
                                 f"{width}x{height})")
            return width, height
    raise ValueError(f"{path}: not a readable image (not PNG, JPEG, BMP, TIFF, WebP or PNM)")


def _png_size(b: memoryview) -> tuple[int, int]:
    if bytes(b[12:16]) != b"IHDR":
        raise ValueError("no IHDR chunk first")
    return struct.unpack_from(">II", b, 16)


def _jpeg_size(b: memoryview) -> tuple[int, int]:
    # Segments up to the first start-of-frame; C4 (DHT), C8 (JPG) and CC (DAC) share its range.
    sof = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
    i = 2
    while True:
        if b[i] != 0xFF:
            raise ValueError(f"no marker at byte {i}")
        marker = b[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in (0x01, *range(0xD0, 0xD8)):  # markers without a length
            i += 2
            continue
        if marker in (0xD9, 0xDA):
            raise ValueError("no frame header before the scan")
        if marker in sof:
            height, width = struct.unpack_from(">HH", b, i + 5)
            return width, height
        i += 2 + struct.unpack_from(">H", b, i + 2)[0]


def _bmp_size(b: memoryview) -> tuple[int, int]:
    if struct.unpack_from("<I", b, 14)[0] == 12:  # OS/2 BITMAPCOREHEADER: 16-bit sizes
        return struct.unpack_from("<HH", b, 18)
    width, height = struct.unpack_from("<ii", b, 18)
    return width, abs(height)  # a negative height is a top-down bitmap


def _tiff_size(b: memoryview) -> tuple[int, int]:
    """The first image's size (the one OpenCV decodes); BigTIFF included."""
    e = "<" if bytes(b[:2]) == b"II" else ">"
    big = struct.unpack_from(e + "H", b, 2)[0] == 43
    offset = struct.unpack_from(e + ("Q" if big else "I"), b, 8 if big else 4)[0]
    count_fmt, entry, first = ("Q", 20, 8) if big else ("H", 12, 2)
    count = struct.unpack_from(e + count_fmt, b, offset)[0]
    types = {3: "H", 4: "I", 16: "Q"}  # SHORT, LONG, LONG8
    size = {}
    for k in range(min(count, 4096)):
        at = offset + first + k * entry
        tag, kind = struct.unpack_from(e + "HH", b, at)
        if tag in (256, 257) and kind in types:
            size[tag] = struct.unpack_from(e + types[kind], b, at + (12 if big else 8))[0]
    if len(size) != 2:
        raise ValueError("no ImageWidth and ImageLength in the first directory")
    return size[256], size[257]


def _webp_size(b: memoryview) -> tuple[int, int]:
    if bytes(b[8:12]) != b"WEBP":
        raise ValueError("a RIFF file that is not WebP")
    chunk = bytes(b[12:16])
    if chunk == b"VP8 ":  # lossy: a frame tag, a start code, 14-bit sizes
        if bytes(b[23:26]) != b"\x9d\x01\x2a":
            raise ValueError("no VP8 start code")
        width, height = struct.unpack_from("<HH", b, 26)
        return width & 0x3FFF, height & 0x3FFF
    if chunk == b"VP8L":  # lossless: a signature byte, then 14 bits each of width-1 and height-1
        bits = struct.unpack_from("<I", b, 21)[0]
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if chunk == b"VP8X":  # extended: 24 bits each of canvas width-1 and height-1
        w0, w1, w2, h0, h1, h2 = b[24:30]
        return (w0 | w1 << 8 | w2 << 16) + 1, (h0 | h1 << 8 | h2 << 16) + 1
    raise ValueError(f"unknown WebP chunk {chunk!r}")


def _pnm_size(b: memoryview) -> tuple[int, int]:
    """Width and height: the first two numbers after the magic, comments skipped."""
    numbers, i, end = [], 2, min(len(b), 4096)
    while len(numbers) < 2:
        while i < end and chr(b[i]).isspace():
            i += 1
        if i < end and b[i] == ord("#"):
            while i < end and b[i] not in (10, 13):
                i += 1
            continue
        j = i
        while j < end and chr(b[j]).isdigit():
            j += 1
        if j == i or j - i > 12:
            raise ValueError("no width and height after the magic")
        numbers.append(int(bytes(b[i:j])))
        i = j
    return numbers[0], numbers[1]


_SIZE_READERS = [(b"\x89PNG\r\n\x1a\n", _png_size), (b"\xff\xd8", _jpeg_size), (b"BM", _bmp_size),
                 (b"II*\x00", _tiff_size), (b"MM\x00*", _tiff_size), (b"II+\x00", _tiff_size),
                 (b"MM\x00+", _tiff_size), (b"RIFF", _webp_size),
                 *((f"P{k}".encode(), _pnm_size) for k in range(1, 7))]


def load_images(images) -> list[np.ndarray]:
    """Read a list of images given as arrays and/or paths (str or ``os.PathLike``).

    Returns:
        one uint8 ``[H, W]`` / ``[H, W, 3]`` array per item.
    """
    return [load_image(item, i) for i, item in enumerate(image_list(images))]


def image_list(images) -> list:
    """The items of a list of images (arrays and/or paths), not read yet; TypeError for anything else."""
    if isinstance(images, (np.ndarray, str, bytes, os.PathLike)):
        raise TypeError(f"pass a list of images, got a single {type(images).__name__}; wrap it: [image]")
    try:
        return list(images)
    except TypeError:
        raise TypeError(f"pass a list of images (arrays or paths), got {type(images).__name__}") from None


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
