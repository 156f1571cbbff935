"""Images in HTTP request bodies: PNG, JPEG or raw pixels, sized from the header before anything is decoded.

A body that claims gigabytes of pixels is refused from its first bytes; every
refusal is a :class:`RequestError` with the HTTP status that says why.
"""
from __future__ import annotations

import math

import cv2
import numpy as np

from .data import load_image


class RequestError(Exception):
    """A request the service refuses, with the HTTP status that says why."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_JPEG_MAGIC = b"\xff\xd8\xff"
# JPEG start-of-frame markers (they carry the size); C4, C8 and CC are other segments.
_JPEG_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def image_size(body: bytes) -> tuple[str, int, int]:
    """``(format, height, width)`` from a PNG or JPEG header, before any pixel is decoded.

    The size is checked before decoding because a few kilobytes of PNG or
    JPEG can claim gigabytes of pixels.
    """
    if body.startswith(_PNG_MAGIC):
        if len(body) < 24 or body[12:16] != b"IHDR":
            raise RequestError(400, "PNG without an IHDR header")
        return "png", int.from_bytes(body[20:24], "big"), int.from_bytes(body[16:20], "big")
    if body.startswith(_JPEG_MAGIC):
        i = 2
        while i + 4 <= len(body):
            if body[i] != 0xFF:
                raise RequestError(400, f"damaged JPEG: no marker at byte {i}")
            marker = body[i + 1]
            if marker == 0xFF:  # fill byte
                i += 1
                continue
            if marker == 0x01 or 0xD0 <= marker <= 0xD8:  # markers without a length
                i += 2
                continue
            length = int.from_bytes(body[i + 2:i + 4], "big")
            if marker in _JPEG_SOF:
                if length < 7 or i + 9 > len(body):
                    raise RequestError(400, "damaged JPEG: short frame header")
                return "jpeg", int.from_bytes(body[i + 5:i + 7], "big"), int.from_bytes(body[i + 7:i + 9], "big")
            if length < 2:
                raise RequestError(400, f"damaged JPEG: segment of length {length} at byte {i}")
            i += 2 + length
        raise RequestError(400, "JPEG without a frame header")
    raise RequestError(415, "the body is neither a PNG nor a JPEG file; send raw pixels with ?shape=H,W[,C]")


def _parse_shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise RequestError(400, f"shape must be H,W or H,W,C in integers, got {text!r}") from None
    if len(shape) not in (2, 3) or min(shape) < 1 or (len(shape) == 3 and shape[2] not in (1, 3, 4)):
        raise RequestError(400, f"shape must be H,W or H,W,C with C in 1, 3, 4 and sizes >= 1, got {text!r}")
    return shape


def decode_image(body: bytes, shape: str | None = None, max_pixels: int = 40_000_000) -> np.ndarray:
    """One request body as a uint8 ``[H, W]`` / ``[H, W, 3]`` image, as :func:`dinopatch.data.read_image` reads files.

    Args:
        body: PNG or JPEG bytes, or raw uint8 pixels in C order when ``shape`` is given.
        shape: ``"H,W"`` or ``"H,W,C"`` for raw pixels.
        max_pixels: largest ``H * W`` accepted (413 beyond).

    Raises:
        RequestError: with the HTTP status and a message for the client.
    """
    if not body:
        raise RequestError(400, "empty body: send a PNG, a JPEG or raw pixels")
    if shape is not None:
        dims = _parse_shape(shape)
        h, w = dims[:2]
        if h * w > max_pixels:
            raise RequestError(413, f"{h}x{w} pixels exceed the limit of {max_pixels}")
        if len(body) != math.prod(dims):
            raise RequestError(400, f"raw uint8 pixels of shape {dims} are {math.prod(dims)} bytes, got {len(body)}")
        image = np.frombuffer(body, np.uint8).reshape(dims)
    else:
        fmt, h, w = image_size(body)
        if h < 1 or w < 1:
            raise RequestError(400, f"{fmt.upper()} header claims {h}x{w} pixels")
        if h * w > max_pixels:
            raise RequestError(413, f"{fmt.upper()} of {h}x{w} pixels exceeds the limit of {max_pixels}")
        try:
            image = cv2.imdecode(np.frombuffer(body, np.uint8), cv2.IMREAD_UNCHANGED)
        except cv2.error as e:
            raise RequestError(400, f"damaged {fmt.upper()}: {e}") from None
        if image is None or image.shape[:2] != (h, w):
            raise RequestError(400, f"damaged {fmt.upper()}: it does not decode to the {h}x{w} its header claims")
    try:
        return load_image(image)
    except (TypeError, ValueError) as e:
        raise RequestError(400, str(e)) from None
