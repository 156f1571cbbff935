"""How much memory a loaded model takes, estimated, and the budget a scorer replica keeps its models within.

A scorer replica holds each loaded model's detector and its engine.  The
estimate of one model's resident size, in bytes (:func:`resident_bytes`), is
the sum of

* the model file's members as inflated in memory (bank, global bank, golden
  set, kept good parts, aligner state: the uncompressed sizes in the file's
  zip directory, an upper bound of what the loaded detector keeps);
* the engine's weights: 1.25 times the size of the graph file it runs (an
  ONNX export holds the fp32 weights once; ONNX Runtime keeps them and
  re-packed copies of some of them);
* one batch in flight through a transformer block, 4 bytes a value: per image
  ``tokens x dim x 10`` (residual stream, q, k, v, the attention output and the
  MLP's hidden layer of 4 x dim) plus ``heads x tokens^2`` attention weights,
  with ``heads = dim / 64``, every token of the grid counted.

It errs on the large side: engines of one backbone are counted once per model
although the runtime may share pages, and every member of the file is counted
although not all of them stay in memory.  The budget (``--memory 2GB``)
applies to each replica: beyond it, the least recently used models are
dropped; one model whose estimate alone exceeds it is refused, never loaded
and dropped again at every request.
"""
from __future__ import annotations

import argparse
import io
import os
import re
import zipfile

_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([A-Za-z]+)")
WEIGHT_COPIES = 1.25  # resident bytes per byte of the graph file (see the module's docstring)
ACTIVATION_WIDTH = 10  # values per token and channel that one block holds at once (see the module's docstring)
HEAD_DIM = 64  # DINOv2 and DINOv3 attention heads are 64 channels wide


class MemoryBudgetError(ValueError):
    """A model whose estimated resident size alone exceeds the replica's memory budget."""


def parse_size(text: str) -> int:
    """Bytes of a size written as a number and a unit: ``2GB``, ``1.5 GiB``, ``512MB``, ``800MiB``, ``4096B``.

    Units: B, KB, MB, GB, TB (powers of 1000) and KiB, MiB, GiB, TiB (powers of 1024), in any case.

    Raises:
        ValueError: anything else (no unit, an unknown one, a sign, zero, trailing text), saying what is expected.
    """
    match = _SIZE.fullmatch(text.strip()) if isinstance(text, str) else None
    unit = match and _UNITS.get(match.group(2).upper())
    if not unit:
        raise ValueError(f"a memory size is a number and a unit, such as 2GB, 1.5GiB or 800MB (units: "
                         f"B, KB, MB, GB, TB, KiB, MiB, GiB, TiB); got {text!r}")
    size = int(float(match.group(1)) * unit)
    if size < 1:
        raise ValueError(f"a memory size must be at least 1 byte, got {text!r}")
    return size


def size_argument(text: str) -> int:
    """:func:`parse_size` as an argparse ``type`` (``--memory 2GB``): its message on a mistake."""
    try:
        return parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def format_size(n: int) -> str:
    """``n`` bytes in the largest binary unit that keeps the number >= 1 (``1.5 GiB``)."""
    for unit in ("TiB", "GiB", "MiB", "KiB"):
        if n >= _UNITS[unit.upper()]:
            return f"{n / _UNITS[unit.upper()]:.1f} {unit}"
    return f"{n} B"


def file_members_bytes(data: bytes) -> int:
    """The inflated size of a model file's members (its zip directory's uncompressed sizes; no inflating)."""
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        return sum(info.file_size for info in zf.infolist())


def engine_bytes(engine, batch: int) -> int:
    """The estimate of an engine's weights and of one batch in flight (see the module's docstring).

    ``engine``: a backbone engine running a graph file (``path``, every engine a service runs), with its
    ``spec`` (``embed_dim``) and token ``grid``.
    """
    path = getattr(engine, "path", None)
    if path is None:
        raise ValueError(f"engine {getattr(engine, 'engine', engine)!r} has no graph file to size")
    dim, (h, w) = engine.spec.embed_dim, engine.grid
    tokens = h * w
    activations = 4 * batch * (tokens * dim * ACTIVATION_WIDTH + (dim // HEAD_DIM) * tokens ** 2)
    return int(WEIGHT_COPIES * os.path.getsize(path)) + activations


def resident_bytes(det, data: bytes, batch: int) -> int:
    """The estimated resident size of detector ``det`` loaded from model file bytes ``data``, its engine built,
    scoring batches of ``batch`` images."""
    return file_members_bytes(data) + engine_bytes(det.backbone_for(), batch)


def check_fits(name: str, size: int, budget: int | None) -> None:
    """MemoryBudgetError when a model of estimated ``size`` bytes alone exceeds ``budget`` (None: no budget)."""
    if budget is not None and size > budget:
        raise MemoryBudgetError(f"{name}: the model needs about {format_size(size)} loaded (its file's arrays, its "
                                f"engine and one batch), more than the memory budget of {format_size(budget)}: "
                                "raise --memory or serve it elsewhere")
