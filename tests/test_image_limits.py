"""Bounded images: sizes are read from file headers and capped before anything is decoded."""
import os
import struct
import zlib

import cv2
import numpy as np
import pytest

from dinopatch import data
from dinopatch.data import as_image, image_size, load_image, read_image, read_mask

FORMATS = [".png", ".jpg", ".bmp", ".tif", ".webp", ".ppm", ".pgm", ".pbm"]


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def _png_of_zeros(width: int, height: int) -> bytes:
    """A valid 8-bit gray PNG of zeros, compressed 1000:1 and built in a second from repeated blocks.

    After a full flush deflate starts afresh, so each later block of rows
    compresses to the same bytes.
    """
    rows = 1000
    assert height % rows == 0
    block = bytes((width + 1) * rows)  # each row: filter byte 0, then the pixels
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    first = c.compress(block) + c.flush(zlib.Z_FULL_FLUSH)
    again = c.compress(block) + c.flush(zlib.Z_FULL_FLUSH)
    adler = 1
    for _ in range(height // rows):
        adler = zlib.adler32(block, adler)
    idat = b"\x78\xda" + first + again * (height // rows - 1) + c.flush() + struct.pack(">I", adler)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b""))


def test_image_bomb_is_refused_from_its_header(tmp_path, measured_read):
    """A 30000x30000 PNG of zeros (under 1 MB): ValueError naming size and cap, under 200 MB spent."""
    path = tmp_path / "bomb.png"
    path.write_bytes(_png_of_zeros(30_000, 30_000))
    assert path.stat().st_size < 1 << 20
    said, peak_mb = measured_read("dinopatch.data.read_image", path)
    assert "VALUEERROR" in said, said
    assert "30000x30000" in said["VALUEERROR"] and f"cap of {data.MAX_PIXELS}" in said["VALUEERROR"]
    assert peak_mb < 200, f"refusing the bomb cost {peak_mb:.0f} MB"


def test_over_opencvs_own_limit_is_a_valueerror(tmp_path, monkeypatch):
    """40000x40000 is past OpenCV's limit too: ours answers first, and where the cap is raised
    past OpenCV's, OpenCV's refusal comes out as a ValueError naming the path, not cv2.error."""
    path = tmp_path / "huge.png"
    path.write_bytes(_png_of_zeros(40_000, 40_000))
    with pytest.raises(ValueError, match=r"huge\.png: 40000x40000 = 1600000000 pixels, over the cap"):
        read_image(path)
    monkeypatch.setenv(data.MAX_PIXELS_ENV, str(2_000_000_000))
    with pytest.raises(ValueError, match=r"huge\.png: not a readable image"):
        read_image(path)


def _encoded(ext, h=20, w=30):
    im = np.random.default_rng(0).integers(0, 256, (h, w, 3), np.uint8)
    ok, buf = cv2.imencode(ext, im if ext not in (".pgm", ".pbm") else im[..., 0])
    assert ok
    return buf.tobytes()


@pytest.mark.parametrize("ext", FORMATS)
def test_header_size_matches_the_decoded_size(ext):
    encoded = _encoded(ext)
    decoded = cv2.imdecode(np.frombuffer(encoded, np.uint8), cv2.IMREAD_UNCHANGED)
    assert image_size(np.frombuffer(encoded, np.uint8)) == (decoded.shape[1], decoded.shape[0]) == (30, 20)


@pytest.mark.parametrize("params", [[cv2.IMWRITE_WEBP_QUALITY, 80], [cv2.IMWRITE_WEBP_QUALITY, 101]],
                         ids=["lossy-alpha-VP8X", "lossless-VP8L"])
def test_webp_variants(params):
    im = np.random.default_rng(0).integers(0, 256, (20, 30, 4), np.uint8)
    _, buf = cv2.imencode(".webp", im, params)
    assert image_size(buf.reshape(-1)) == (30, 20)


@pytest.mark.parametrize("order", ["<", ">"])
@pytest.mark.parametrize("big", [False, True], ids=["tiff", "bigtiff"])
def test_tiff_headers_of_either_byte_order(order, big):
    """Hand-made first directories: width as SHORT, height as LONG (or LONG8 in BigTIFF)."""
    magic = (b"II" if order == "<" else b"MM") + struct.pack(order + "H", 43 if big else 42)
    if big:
        head = magic + struct.pack(order + "HHQ", 8, 0, 16) + struct.pack(order + "Q", 2)
        entries = (struct.pack(order + "HHQ", 256, 3, 1) + struct.pack(order + "H", 70_000 % 65536) + bytes(6)
                   + struct.pack(order + "HHQQ", 257, 16, 1, 123_456))
    else:
        head = magic + struct.pack(order + "I", 8) + struct.pack(order + "H", 2)
        entries = (struct.pack(order + "HHI", 256, 3, 1) + struct.pack(order + "H", 4464) + bytes(2)
                   + struct.pack(order + "HHII", 257, 4, 1, 123_456))
    assert image_size(np.frombuffer(head + entries, np.uint8)) == (4464, 123_456)


@pytest.mark.parametrize("ext", FORMATS)
def test_every_format_is_capped_before_decoding(tmp_path, monkeypatch, ext):
    path = tmp_path / f"im{ext}"
    path.write_bytes(_encoded(ext))
    assert read_image(path).shape[:2] == (20, 30)
    monkeypatch.setenv(data.MAX_PIXELS_ENV, "599")

    def no_decoding(*args):
        raise AssertionError("decoded an image over the cap")

    monkeypatch.setattr(cv2, "imdecode", no_decoding)
    with pytest.raises(ValueError, match=rf"im\{ext}: 30x20 = 600 pixels, over the cap of 599"):
        read_image(path)
    with pytest.raises(ValueError, match="over the cap"):
        read_mask(path, (20, 30))


def test_arrays_over_the_cap(monkeypatch):
    monkeypatch.setenv(data.MAX_PIXELS_ENV, "1000")
    assert as_image(np.zeros((25, 40), np.uint8)).shape == (25, 40)
    for shape in [(25, 41), (41, 25, 3), (50, 50, 4)]:
        with pytest.raises(ValueError, match=r"an image: \d+x\d+ = \d+ pixels, over the cap of 1000"):
            load_image(np.zeros(shape, np.uint8))


def test_file_too_big_for_the_cap_is_not_read(tmp_path, monkeypatch):
    monkeypatch.setenv(data.MAX_PIXELS_ENV, "1000")
    path = tmp_path / "big.bmp"
    path.write_bytes(b"BM" + bytes(2 << 20))
    monkeypatch.setattr(np, "fromfile", lambda *a, **k: pytest.fail("read a file that no capped image fills"))
    with pytest.raises(ValueError, match=r"big\.bmp: \d+ bytes, more than any image of at most 1000 pixels"):
        read_image(path)


@pytest.mark.parametrize("value", ["0", "-5", "lots", "1e6", ""])
def test_bad_cap_setting(monkeypatch, value):
    monkeypatch.setenv(data.MAX_PIXELS_ENV, value)
    with pytest.raises(ValueError, match=data.MAX_PIXELS_ENV):
        as_image(np.zeros((2, 2), np.uint8))


@pytest.mark.parametrize("ext", FORMATS)
def test_damaged_files_are_valueerrors_naming_the_path(tmp_path, ext):
    """Truncated anywhere, or a valid magic followed by garbage: ValueError with the path, never cv2.error."""
    encoded = _encoded(ext, 64, 96)
    rng = np.random.default_rng(1)
    cuts = sorted({*range(40), *rng.integers(40, len(encoded), 40).tolist()})
    for k, cut in enumerate(cuts):
        path = tmp_path / f"cut{k}{ext}"
        path.write_bytes(encoded[:cut])
        with pytest.raises(ValueError, match=rf"cut{k}\{ext}"):
            read_image(path)
    garbage = tmp_path / f"garbage{ext}"
    for k in range(20):
        garbage.write_bytes(encoded[:2] + rng.integers(0, 256, 200, np.uint8).tobytes())
        try:
            read_image(garbage)
        except ValueError as e:
            assert str(garbage) in str(e)


def test_unknown_formats_are_refused(tmp_path):
    path = tmp_path / "x.png"
    path.write_bytes(b"GIF89a" + bytes(100))
    with pytest.raises(ValueError, match=r"x\.png: not a readable image \(not PNG, JPEG, BMP, TIFF, WebP or PNM"):
        read_image(path)
    path.write_bytes(os.urandom(1000))
    with pytest.raises(ValueError, match="not a readable image"):
        read_image(path)
