"""The engine a model runs on, chosen by measuring every installed candidate on this machine.

Each candidate of :data:`CANDIDATES` that can run here is built, run once on
the model's golden set (:mod:`.golden`) and timed on :data:`REPEATS` more
passes (the quickest counts: milliseconds a part of the golden frames through
the backbone, the bank and the post-processing, which only the backbone makes
differ).  It qualifies with **zero verdict flips** against the reference's
scores at the model's threshold and a largest score deviation within
:data:`MAX_DEVIATION` of the threshold; among those qualifying, the fastest
is used, and candidates within :data:`TIE` of the fastest are a tie, settled
by the smaller deviation, then by the order of :data:`CANDIDATES`.

The record (:func:`measure`) holds the machine (:func:`machine`), the bound,
and per candidate ``ms_per_part``, ``flips``, ``max_deviation`` and
``refused`` (why it was not eligible, None where it was).  :func:`choose`
derives the choice from the rows alone, so :func:`check_record` re-derives it
on every load and refuses a record whose choice disagrees.  The record made
at fit goes into the model file; a load on another machine (another
:func:`machine` fingerprint) measures again and keeps that record as JSON
beside the engine cache (``$DINOPATCH_CACHE/engine_choice``), read back as
data and checked like the file's.
"""
from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import json
import math
import os
import re
import sys
import time
import warnings
from pathlib import Path

import numpy as np

from . import cpu, golden
from .backbone import weights
from .backbone.engines import installed, make_backbone

# Candidates in order of preference among ties: the reference first, then fp32, then reduced precisions.
CANDIDATES = ("torch", "onnx:fp32", "openvino:fp32", "openvino:bf16", "onnx:int8", "openvino:int8",
              "onnx:fp16", "torch:fp16")
REFERENCE = "torch"
# Largest score change a candidate may make on a golden frame, as a share of the image threshold: a part
# whose score is this close to the threshold is the most that a qualifying engine may judge differently.
MAX_DEVIATION = 0.02
TIE = 0.05  # candidates within 5% of the fastest time are a tie
REPEATS = 3
MAX_RECORD_BYTES = 64 << 10
_CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_int8", "amx_tile")
_LIBRARIES = ("torch", "onnxruntime", "openvino", "timm", "nncf")
_LIBRARY = {"torch": "torch", "onnx": "onnxruntime", "openvino": "openvino"}  # what each runtime needs


class EngineMismatchError(RuntimeError):
    """An engine asked for by hand flips a verdict of the golden set (strict mode)."""


def machine() -> str:
    """A short fingerprint of what decides engine speed here: CPU model and flags (at the ``DINOPATCH_CPU``
    level, named where one is set), core count, library versions."""
    versions = {}
    for lib in _LIBRARIES:
        try:
            versions[lib] = importlib.metadata.version(lib)
        except importlib.metadata.PackageNotFoundError:
            versions[lib] = None
    key = {"cpu": cpu.model_name(), "flags": sorted(cpu.flags() & set(_CPU_FLAGS)), "cores": os.cpu_count(),
           "versions": versions}
    if cpu.level() is not None:
        key["cpu_level"] = cpu.level()
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def skip_reason(name: str) -> str | None:
    """Why candidate ``name`` cannot run on this machine, or None where it can."""
    runtime, _, precision = name.partition(":")
    library = _LIBRARY[runtime]
    if not installed(library):
        return f"{library} is not installed"
    if precision == "fp16":
        from .backbone.engines import onnx_has_cuda, torch_has_cuda

        return None if (torch_has_cuda if runtime == "torch" else onnx_has_cuda)() else \
            f"GPU only, and {library} sees no GPU here"
    if runtime == "openvino" and precision == "int8" and not installed("nncf"):
        return "OpenVINO int8 is quantised by NNCF (pip install nncf), not installed"
    if precision == "bf16":
        from .backbone.openvino_engine import cpu_has_bf16

        return None if cpu_has_bf16() else "the CPU has neither AVX512-BF16 nor AMX"
    return None


def candidate_row(name: str, ms, flips, deviation, refused: str | None, sha256: str | None = None) -> dict:
    """One candidate's evidence; ``sha256``: the graph it ran, where it runs an export."""
    return {"engine": name, "ms_per_part": ms, "flips": flips, "max_deviation": deviation, "refused": refused,
            "sha256": sha256}


def judge(name: str, scores: np.ndarray, reference: np.ndarray, threshold: float, ms: float) -> dict:
    """The row of a candidate that ran: its flips and deviation against the reference, and whether it qualifies."""
    flips = int(((scores > threshold) != (reference > threshold)).sum())
    deviation = float(np.max(np.abs(scores - reference)) / threshold) if np.isfinite(scores).all() else math.inf
    refused = None
    if flips:
        refused = f"{flips} verdict flip(s) on the golden set"
    elif not deviation <= MAX_DEVIATION:
        refused = f"score deviation {deviation:.4f} of the threshold > {MAX_DEVIATION}"
    return candidate_row(name, round(ms, 3), flips, round(deviation, 6) if math.isfinite(deviation) else None,
                         refused)


def measure(det, model, candidates=CANDIDATES, build=None, repeats: int = REPEATS, progress=print,
            forbid=()) -> dict:
    """Run and time every candidate on ``model``'s golden set; the record with the choice.

    Args:
        det: the detector (its stages score the golden frames).
        model: the :class:`~.fitted.Fitted` with a golden set.
        candidates: engine names to try.
        build: ``build(name) -> engine`` (default: :func:`make_backbone` with the model's weights, on the CPU,
            for the candidates :func:`skip_reason` does not rule out; a given one is asked for every candidate).
        repeats: timed passes over the golden set after the first.
        progress: called with one line per candidate (None: silent).
        forbid: engine names, runtimes or precisions never to choose (kept in the record, see :func:`choose`).
    """
    g = model.golden
    if g is None:
        raise ValueError("this model has no golden set (fitted before golden sets existed): refit it to measure")
    given, build = build is not None, build or _builder(model)
    t = float(model.threshold.image)
    reference = golden.scores(model.post, g.distances, g.valid)
    rows = []
    for name in candidates:
        reason = "forbidden" if forbidden(name, forbid) else None if given else skip_reason(name)
        if reason is not None:
            row = candidate_row(name, None, None, None, f"skipped: {reason}")
        else:
            try:
                engine = build(name)
                scores = _scores(det, model, engine)
                passes = []
                for _ in range(repeats):
                    start = time.perf_counter()
                    _scores(det, model, engine)
                    passes.append(time.perf_counter() - start)
                # The quickest pass: a neighbour on shared cores only ever adds time.
                ms = min(passes) * 1000 / len(g.frames)
                row = dict(judge(name, scores, reference, t, ms), sha256=getattr(engine, "sha256", None))
            except Exception as e:  # a candidate that cannot run here is refused, with its reason
                row = candidate_row(name, None, None, None, f"failed: {type(e).__name__}: {str(e)[:160]}")
        rows.append(row)
        if progress:
            progress(format_row(row))
    record = {"machine": machine(), "bound": MAX_DEVIATION, "tie": TIE, "reference": g.reference, "rows": rows,
              "forbid": sorted(set(forbid))}
    record["chosen"] = choose(record)
    return record


def _scores(det, model, engine) -> np.ndarray:
    """The golden frames' image scores by ``model`` with ``engine``."""
    g = model.golden
    return golden.scores(model.post, golden.distances(det, model, engine, g.frames, g.valid), g.valid)


def _builder(model):
    p = model.params

    def build(name: str):
        extra = {}
        if name == "openvino:int8":  # quantised on the blends, so the golden set's nominal frames check it
            fg = model.foreground
            extra["calibration"] = (model.golden.blends, None if fg is None else fg.positions)
        return make_backbone(name, model.fingerprint, device="cpu", name=p["backbone"], weights=p["weights"],
                             image_size=p["image_size"], layers=p["layers"], seed=p["seed"], **extra)
    return build


def choose(record: dict, forbid=()) -> str | None:
    """The fastest qualifying candidate of ``record["rows"]`` (ties: smaller deviation, then candidate order).

    ``forbid`` (with the record's own ``forbid``): engine names, runtimes or precisions (``"int8"``) not to
    choose.  None where none qualifies.
    """
    banned = set(forbid) | set(record.get("forbid", ()))
    ok = [r for r in record["rows"] if r["refused"] is None and not forbidden(r["engine"], banned)]
    if not ok:
        return None
    fastest = min(r["ms_per_part"] for r in ok)
    tied = [r for r in ok if r["ms_per_part"] <= fastest * (1 + record["tie"])]
    order = {name: i for i, name in enumerate(CANDIDATES)}
    return min(tied, key=lambda r: (r["max_deviation"], order.get(r["engine"], len(order))))["engine"]


def forbidden(name: str, banned) -> bool:
    """Whether ``banned`` names the engine, its runtime or its precision (a bare name is fp32)."""
    runtime, _, precision = name.partition(":")
    return bool({name, runtime, precision or "fp32"} & set(banned))


def with_forbidden(record: dict, forbid) -> dict:
    """``record`` with ``forbid`` added to its own and the choice derived again (nothing measured)."""
    out = dict(record, forbid=sorted(set(record["forbid"]) | set(forbid)))
    out["chosen"] = choose(out)
    return out


def check_record(record) -> dict | None:
    """A stored record, every value checked and the choice derived again (ValueError saying what is wrong)."""
    if record is None:
        return None
    if not isinstance(record, dict) or set(record) != {"machine", "bound", "tie", "reference", "rows", "forbid",
                                                        "chosen"}:
        raise ValueError(f"engine choice record malformed ({str(record)[:80]!r})")
    if record["bound"] != MAX_DEVIATION or record["tie"] != TIE:
        raise ValueError(f"engine choice made with bound {record['bound']!r} and tie {record['tie']!r}; this "
                         f"version uses {MAX_DEVIATION} and {TIE}: measure again (dinopatch tune-engine)")
    if not isinstance(record["machine"], str) or not isinstance(record["rows"], list) or not record["rows"]:
        raise ValueError("engine choice record without machine or rows")
    if not isinstance(record["forbid"], list) or not all(isinstance(f, str) for f in record["forbid"]):
        raise ValueError("engine choice record: forbid must be a list of names")
    for r in record["rows"]:
        if not isinstance(r, dict) or set(r) != {"engine", "ms_per_part", "flips", "max_deviation", "refused",
                                                 "sha256"} or r["engine"] not in CANDIDATES \
                or not (r["sha256"] is None or re.fullmatch(r"[0-9a-f]{64}", str(r["sha256"]))):
            raise ValueError(f"engine choice row malformed ({str(r)[:80]!r})")
        if r["refused"] is None:
            ms, flips, dev = r["ms_per_part"], r["flips"], r["max_deviation"]
            if not (isinstance(ms, (int, float)) and math.isfinite(ms) and ms > 0 and flips == 0
                    and isinstance(dev, (int, float)) and 0 <= dev <= MAX_DEVIATION):
                raise ValueError(f"engine choice row {r['engine']!r} qualifies without the evidence for it")
        elif not isinstance(r["refused"], str):
            raise ValueError(f"engine choice row {r['engine']!r}: refused must be a reason")
    if record["chosen"] != choose(record):
        raise ValueError(f"engine choice {record['chosen']!r} disagrees with its evidence ({choose(record)!r}): "
                         "the record was edited")
    return record


def format_row(row: dict) -> str:
    ms = "-" if row["ms_per_part"] is None else f"{row['ms_per_part']:.1f}"
    flips = "-" if row["flips"] is None else str(row["flips"])
    dev = "-" if row["max_deviation"] is None else f"{row['max_deviation']:.4f}"
    return f"  {row['engine']:<14} {ms:>9} ms/part  flips {flips:>2}  deviation {dev:>7}  " \
           f"{row['refused'] or 'qualifies'}"


def table(record: dict, forbid=()) -> str:
    """The record as lines of text: one per candidate, then the choice."""
    head = (f"engine choice on machine {record['machine']} (bound {record['bound']} of the threshold, "
            f"ties within {record['tie']:.0%}):")
    chosen = choose(record, forbid)
    banned = sorted(set(forbid) | set(record["forbid"]))
    tail = f"  chosen: {chosen}" + (f" (forbidden: {', '.join(banned)})" if banned else "")
    return "\n".join([head, *(format_row(r) for r in record["rows"]), tail])


def cache_path(model_id: str, machine_id: str) -> Path:
    return weights.cache_dir() / "engine_choice" / f"{model_id}-{machine_id}.json"


def _read_cached(path: Path) -> dict | None:
    """A cached record (JSON, size-capped, checked), or None where there is none or it is not valid."""
    if not path.is_file() or path.stat().st_size > MAX_RECORD_BYTES:
        return None
    try:
        return check_record(json.loads(path.read_text()))
    except (ValueError, UnicodeDecodeError) as e:
        warnings.warn(f"{path}: ignoring an invalid engine choice record ({e}); measuring again", stacklevel=3)
        return None


def write_cached(model, record: dict) -> Path:
    from . import atomic

    path = cache_path(model.model_id, record["machine"])
    path.parent.mkdir(parents=True, exist_ok=True)
    data = json.dumps(record, indent=1).encode()
    return atomic.write(path, lambda f: f.write(data))


def after_fit(det, model, canon: list, strict: bool = False):
    """``model`` with its golden set (scored by the reference) and, for ``engine="auto"``, the measured choice.

    Where torch is not installed the fit's own engine is the reference, named as such in the golden record.
    """
    if skip_reason(REFERENCE) is None:
        reference, name = (det.backbone_for(model) if det.engine in (REFERENCE, "torch:fp32")
                           else _builder(model)(REFERENCE)), REFERENCE
    else:
        reference, name = det.backbone_for(model), str(det.engine)
    model = dataclasses.replace(model, golden=golden.build(det, model, canon, reference, name))
    if det.engine == "auto":
        return dataclasses.replace(model, engine_choice=measure(det, model, progress=None))
    check_by_hand(det, model, strict)
    return model


def on_load(det, model, strict: bool = False):
    """A loaded ``model`` ready to run: for ``engine="auto"`` this machine's choice, else the hand engine checked."""
    if det.engine == "auto":
        return for_this_machine(det, model)
    check_by_hand(det, model, strict)
    return model


def for_this_machine(det, model, progress=None):
    """``model`` with the engine choice of this machine: the file's, the cached one, or measured now and cached."""
    record = model.engine_choice
    if record is None or model.golden is None or record["machine"] == machine():
        return model
    path = cache_path(model.model_id, machine())
    cached = _read_cached(path)
    if cached is None:
        print(f"dinopatch: this machine ({machine()}) is new to model {model.model_id}: timing each engine on its "
              f"golden set once; the choice is kept in {path}", file=sys.stderr, flush=True)
        cached = measure(det, model, progress=progress)
        try:
            write_cached(model, cached)
        except OSError as e:  # a read-only cache costs a measurement at every load, not the load itself
            warnings.warn(f"could not keep the engine choice in {path} ({e}): the next load measures again",
                          stacklevel=3)
    return dataclasses.replace(model, engine_choice=cached)


def in_force(engine: str, model) -> tuple[str, str | None]:
    """The engine name that runs ``model`` for the detector's ``engine`` setting, and the hash of the graph it
    must run (the one measured, or the one fit ran; None: none recorded)."""
    record = model.engine_choice
    if engine == "auto" and record is not None and record["chosen"] is not None:
        return record["chosen"], next(r["sha256"] for r in record["rows"] if r["engine"] == record["chosen"])
    return engine, model.graph_sha256(engine)


def check_by_hand(det, model, strict: bool = False) -> dict | None:
    """Run an engine asked for by hand on the golden set: its row, a loud warning on a flip (strict: an error)."""
    if model.golden is None or det.engine in ("auto", REFERENCE, "torch:fp32"):
        return None
    g = model.golden
    row = judge(str(det.engine), _scores(det, model, det.backbone_for(model)),
                golden.scores(model.post, g.distances, g.valid), float(model.threshold.image), 0.0)
    if row["refused"]:
        message = (f"engine {det.engine!r} does not reproduce the reference on this model's golden set: "
                   f"{row['refused']} (largest deviation {row['max_deviation']} of the threshold)")
        if strict:
            raise EngineMismatchError(message)
        warnings.warn("WARNING: " + message, UserWarning, stacklevel=3)
    return row
