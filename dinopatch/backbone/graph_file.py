"""An export file as bytes: its content hash, and the checks made before any runtime opens it.

A model file records the sha256 of the exact graph it was checked with
(:func:`graph_sha256`), so a cached or given graph is trusted by content, not
by its name or metadata.  Before a session is created, :func:`check_graph_file`
refuses what would let a file reach outside its folder or allocate without
bound:

* external data outside the graph's folder, not a regular file (a link), or
  over :data:`MAX_GRAPH_BYTES` with the graph;
* a stored tensor (initializer or Constant) over :data:`MAX_TENSOR_BYTES`;
* ops that allocate by a value and which the exporter never emits (random
  generators, Tile, Range, Pad, Resize...), and control flow (subgraphs);
* ``ConstantOfShape`` or ``Expand`` whose shape is a stored constant of more
  than :data:`MAX_SHAPE_ELEMENTS` elements.  The exporter's own use of them
  takes a shape computed from the input's; a shape computed at run time is not
  bounded here: the recorded sha256 is what guarantees the graph.

The file is read with a small protobuf reader (the ONNX fields named below),
so neither the ``onnx`` package nor a runtime is needed.

The export's format, precisions and cache path are here too: the exporter
writes what the engine reads, and neither needs the other for it.
"""
from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

from .weights import cache_dir

# 2: the graph takes the patch positions to run as an input ``positions`` (int64 [n]) and
# gives ``tokens`` [B, n, D]; format 1 had only ``images`` and gave [B, h, w, D].
ONNX_FORMAT = "dinopatch-backbone-tokens/2"
# Bumped when the exported graph changes (same inputs and outputs, faster ops),
# so that a cache made by an older DinoPatch is not reused.
GRAPH_VERSION = 3
PRECISIONS = ("fp32", "int8", "fp16")


def onnx_cache_path(name: str, image_size: int, layers: int, precision: str, fingerprint: str,
                    portable: bool = False) -> Path:
    """The cached export of one configuration; named by the weights' fingerprint."""
    kind = "_portable" if portable else ""
    return (cache_dir() / "onnx"
            / f"{name}_{image_size}px_l{layers}_{precision}{kind}_g{GRAPH_VERSION}_{fingerprint[:16]}.onnx")


MAX_GRAPH_BYTES = 4 << 30
MAX_TENSOR_BYTES = 1 << 30
MAX_SHAPE_ELEMENTS = 1 << 26
# Ops that allocate by a value or loop, none of which the exporter emits (fused, portable, int8, fp16).
REFUSED_OPS = frozenset({"Tile", "Range", "Pad", "Resize", "Upsample", "RandomNormal", "RandomUniform",
                         "RandomNormalLike", "RandomUniformLike", "Multinomial", "Bernoulli", "Loop", "If", "Scan",
                         "SequenceConstruct", "SplitToSequence", "ConcatFromSequence"})
_SHAPED_OPS = {"ConstantOfShape": 0, "Expand": 1}  # op -> index of its shape input
# TensorProto.DataType -> bytes per element (strings and unknown types count 1).
_ITEM_BYTES = {1: 4, 2: 1, 3: 1, 4: 2, 5: 2, 6: 4, 7: 8, 9: 1, 10: 2, 11: 8, 12: 4, 13: 8, 14: 8, 15: 16, 16: 2}
_CHUNK = 1 << 20


class _Fields:
    """The fields of one protobuf message: ``(number, wire type, value)``; bytes fields as memoryviews."""

    def __init__(self, data: memoryview):
        self.data = data

    def __iter__(self):
        data, pos, end = self.data, 0, len(self.data)
        while pos < end:
            key, pos = _varint(data, pos)
            number, wire = key >> 3, key & 7
            if wire == 0:
                value, pos = _varint(data, pos)
            elif wire == 1:
                value, pos = bytes(data[pos:pos + 8]), pos + 8
            elif wire == 2:
                size, pos = _varint(data, pos)
                value, pos = data[pos:pos + size], pos + size
            elif wire == 5:
                value, pos = bytes(data[pos:pos + 4]), pos + 4
            else:
                raise ValueError(f"protobuf wire type {wire}")
            if pos > end:
                raise ValueError("truncated protobuf field")
            yield number, wire, value


def _varint(data: memoryview, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(data) or shift > 63:
            raise ValueError("bad protobuf varint")
        byte = data[pos]
        value |= (byte & 0x7F) << shift
        pos, shift = pos + 1, shift + 7
        if not byte & 0x80:
            return value, pos


def _ints(wire: int, value) -> list[int]:
    """A repeated int64 field: one varint, or a packed run of them."""
    if wire == 0:
        return [value]
    out, pos = [], 0
    while pos < len(value):
        v, pos = _varint(value, pos)
        out.append(v)
    return out


def _signed(v: int) -> int:
    return v - (1 << 64) if v >= 1 << 63 else v


class _Tensor:
    """What the checks need of a TensorProto: name, declared size, external data, int64 values."""

    def __init__(self, data: memoryview):
        self.name, self.dims, self.dtype, self.external, self.location = "", [], 0, {}, 0
        self.raw, self.int64 = None, []
        for number, wire, value in _Fields(data):
            if number == 1:
                self.dims += [_signed(v) for v in _ints(wire, value)]
            elif number == 2:
                self.dtype = value
            elif number == 8:
                self.name = bytes(value).decode("utf-8", "replace")
            elif number == 9:
                self.raw = value
            elif number == 7:
                self.int64 += [_signed(v) for v in _ints(wire, value)]
            elif number == 13:
                entry = {k: bytes(v).decode("utf-8", "replace") for k, _, v in _Fields(value) if k in (1, 2)}
                self.external[entry.get(1, "")] = entry.get(2, "")
            elif number == 14:
                self.location = value

    @property
    def elements(self) -> int:
        n = 1
        for d in self.dims:
            n *= max(d, 0)
        return n

    @property
    def nbytes(self) -> int:
        return self.elements * _ITEM_BYTES.get(self.dtype, 1)

    def values(self) -> list[int] | None:
        """int64 contents when stored in the file, else None."""
        if self.dtype != 7:
            return None
        if self.raw is not None:
            raw = bytes(self.raw)
            return [_signed(int.from_bytes(raw[i:i + 8], "little")) for i in range(0, len(raw) - 7, 8)]
        return self.int64 if self.location != 1 else None


def _read_graph(data: memoryview) -> tuple[list[tuple], list[_Tensor]]:
    """Nodes ``(op_type, inputs, outputs, attribute tensors, has subgraph)`` and initializers of the main graph."""
    graphs = [value for number, wire, value in _Fields(data) if number == 7 and wire == 2]
    if len(graphs) != 1:
        raise ValueError(f"{len(graphs)} graphs in the model")
    nodes, tensors = [], []
    for number, wire, value in _Fields(graphs[0]):
        if number == 5 and wire == 2:
            tensors.append(_Tensor(value))
        elif number == 15 and wire == 2:
            raise ValueError("sparse initializers, which the exporter never writes")
        elif number == 1 and wire == 2:
            op, inputs, outputs, attr_tensors, subgraph = "", [], [], [], False
            for n, w, v in _Fields(value):
                if n == 4:
                    op = bytes(v).decode("utf-8", "replace")
                elif n in (1, 2):
                    (inputs if n == 1 else outputs).append(bytes(v).decode("utf-8", "replace"))
                elif n == 5:
                    for an, aw, av in _Fields(v):
                        if an in (5, 10) and aw == 2:
                            attr_tensors.append(_Tensor(av))
                        elif an in (6, 11, 22, 23):
                            subgraph = True
            nodes.append((op, inputs, outputs, attr_tensors, subgraph))
    return nodes, tensors


def _external_files(path: Path, tensors: list[_Tensor]) -> list[Path]:
    """The external data files of ``tensors``, each a regular file inside the graph's folder."""
    folder = path.resolve().parent
    files = set()
    for t in tensors:
        if t.location != 1:
            continue
        location = t.external.get("location", "")
        candidate = folder / location
        if (not location or Path(location).is_absolute() or ".." in Path(location).parts
                or not candidate.resolve().is_relative_to(folder)):
            raise ValueError(f"{path}: tensor {t.name!r} keeps its data at {location!r}, outside the graph's folder")
        try:
            mode = os.lstat(candidate).st_mode
        except OSError:
            raise ValueError(f"{path}: tensor {t.name!r}: external data {location!r} is missing") from None
        if not stat.S_ISREG(mode):
            raise ValueError(f"{path}: tensor {t.name!r}: external data {location!r} is not a regular file")
        files.add(candidate)
    return sorted(files)


def check_graph_file(path: str | os.PathLike) -> list[Path]:
    """Refuse a graph file that reaches outside its folder or allocates without bound (module docstring).

    Returns:
        the graph file and its external data files, in the order :func:`graph_sha256` hashes them.

    Raises:
        ValueError: naming the file and what is wrong with it.
    """
    path = Path(path)
    size = path.stat().st_size
    if size > MAX_GRAPH_BYTES:
        raise ValueError(f"{path}: {size / 2**30:.1f} GiB, over the {MAX_GRAPH_BYTES >> 30} GiB bound for a graph")
    try:
        nodes, tensors = _read_graph(memoryview(path.read_bytes()))
    except (ValueError, IndexError) as e:
        raise ValueError(f"{path}: not a readable ONNX model ({e})") from None
    constants = {t.name: t for t in tensors}
    for op, _, outputs, attr_tensors, subgraph in nodes:
        if subgraph or op in REFUSED_OPS:
            raise ValueError(f"{path}: a {op} node (control flow or allocation by value), which the DinoPatch "
                             f"exporter never writes: refused")
        tensors += attr_tensors
        if op == "Constant" and attr_tensors and outputs:
            constants[outputs[0]] = attr_tensors[0]
    for t in tensors:
        if t.nbytes > MAX_TENSOR_BYTES:
            raise ValueError(f"{path}: tensor {t.name!r} of shape {t.dims} ({t.nbytes / 2**30:.1f} GiB) is over "
                             f"the {MAX_TENSOR_BYTES >> 30} GiB bound")
    for op, inputs, *_ in nodes:
        shape = constants.get(inputs[_SHAPED_OPS[op]]) if op in _SHAPED_OPS and len(inputs) > _SHAPED_OPS[op] else None
        values = shape.values() if shape is not None else None
        if values is not None:
            elements = 1
            for v in values:
                elements *= max(v, 1)
            if elements > MAX_SHAPE_ELEMENTS or min(values, default=0) < 0:
                raise ValueError(f"{path}: {op} to the stored shape {values} ({elements} elements, bound "
                                 f"{MAX_SHAPE_ELEMENTS}): refused")
    files = [path] + _external_files(path, tensors)
    total = sum(f.stat().st_size for f in files)
    if total > MAX_GRAPH_BYTES:
        raise ValueError(f"{path}: {total / 2**30:.1f} GiB with its external data, over the "
                         f"{MAX_GRAPH_BYTES >> 30} GiB bound")
    return files


def graph_sha256(files: list[Path]) -> str:
    """sha256 of a graph's files (from :func:`check_graph_file`).

    A graph without external data hashes as its file does (``sha256sum``
    gives the same); external data files follow, each after its name relative
    to the graph's folder, so that moving data between files changes the hash.
    """
    h = hashlib.sha256()
    folder = files[0].resolve().parent
    for i, f in enumerate(files):
        if i:
            h.update(b"\0" + str(f.resolve().relative_to(folder)).encode() + b"\0")
        with open(f, "rb") as stream:
            while chunk := stream.read(_CHUNK):
                h.update(chunk)
    return h.hexdigest()
