"""``python -m dinopatch score-archive``: score a folder, glob or list of images on Ray Data into Parquet.

The output ``OUT`` is a folder of Parquet parts (``pandas.read_parquet(OUT)``
reads it whole) with one row per image: ``path`` (absolute), ``path_base64``,
``score``, ``is_anomaly``, ``aligned``, ``reason``, ``threshold``,
``threshold_source``, ``model_id`` and ``error`` (null when the image was
scored).  Any file name is taken: one that is not valid UTF-8 has a display
``path`` and its exact bytes in ``path_base64`` (null otherwise; see
:mod:`dinopatch.records`), and a file that cannot be read costs its own error
row, never the run.  Each part is written under a temporary name and then
renamed, so an interrupted run leaves only whole parts.

A run on the same ``OUT`` skips the paths already scored there.  Rows with an
error are dropped from their parts first, so those images are tried again (a
file that was still being written).  All rows of ``OUT`` come from one model:
resuming with a model of another ``model_id`` is refused, unless ``rescore``
(``--rescore``) drops the other model's rows so that their images are scored
again.

Ray Data runs one engine per worker (an actor holding the model); the
driver only lists paths and writes rows, so on a cluster the images must be
readable at the same paths on every node, and ``OUT`` where the command runs.
The model file is read once, where the command runs, and checked there; its
bytes reach the workers through Ray's object store, so no node needs a copy,
and every worker runs the bytes that were checked.  A model key
(``$DINOPATCH_MODEL_KEY``) set where the command runs reaches the workers
through Ray's runtime environment, so each verifies the signature too.
"""
from __future__ import annotations

import argparse
import base64
import glob
import math
import os
import secrets
import sys
import time
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from . import params
from .data import IMAGE_SUFFIXES, load_image
from .modelfile import KEY_ENV
from .records import path_entries, score_images, text

_TEXT = ("path", "path_base64", "reason", "threshold_source", "model_id", "error")
_FLOAT = ("score", "threshold")
_BOOL = ("is_anomaly", "aligned")
COLUMNS = ("path", "path_base64", "score", "is_anomaly", "aligned", "reason", "threshold", "threshold_source",
           "model_id", "error")


def _schema():
    import pyarrow as pa

    types = {**{c: pa.string() for c in _TEXT}, **{c: pa.float64() for c in _FLOAT}, **{c: pa.bool_() for c in _BOOL}}
    return pa.schema([(c, types[c]) for c in COLUMNS])


def list_images(source: str | os.PathLike) -> list[str]:
    """Absolute paths of the images named by ``source``, in order, without repeats.

    Args:
        source: a folder (searched recursively for image suffixes), a glob
            pattern (``**`` recurses), an image file, or a list file with one
            path a line (blank lines and ``#`` comments skipped; relative
            paths are relative to the list file's folder).
    """
    source = os.fspath(source)
    p = Path(source)
    if p.is_dir():
        found = sorted(str(q) for q in p.rglob("*") if q.is_file() and q.suffix.lower() in IMAGE_SUFFIXES)
    elif p.is_file():
        if p.suffix.lower() in IMAGE_SUFFIXES:
            found = [source]
        else:
            raw = p.read_bytes()
            if b"\0" in raw:
                raise ValueError(f"{source}: neither an image (by its suffix) nor a text list of paths")
            lines = os.fsdecode(raw).splitlines()  # names of any encoding, as the file system spells them
            names = [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
            found = [n if os.path.isabs(n) else str(p.parent / n) for n in names]
    elif glob.has_magic(source):
        found = sorted(q for q in glob.glob(source, recursive=True) if os.path.isfile(q))
    else:
        raise FileNotFoundError(f"{source}: no such folder, file or matching files")
    paths = list(dict.fromkeys(os.path.abspath(q) for q in found))
    if not paths:
        raise ValueError(f"{source}: no images (expected files ending in {', '.join(IMAGE_SUFFIXES)})")
    return paths


def done_paths(out: str | os.PathLike, model_id: str | None = None, rescore: bool = False) -> set[str]:
    """Paths already scored in the output folder ``out`` (empty when it does not exist yet).

    Leftover temporary parts of an interrupted run are removed, and so are the
    rows with an error (their images are to be tried again).  With
    ``model_id``, rows of another model are refused, or with ``rescore``
    removed too.

    Returns:
        the paths as :func:`list_images` gives them (names of any encoding).
    """
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    out = Path(out)
    if not out.exists():
        return set()
    if not out.is_dir():
        raise ValueError(f"{out}: exists and is not a score-archive output folder; choose another -o")
    parts = sorted(out.glob("part-*.parquet"))
    if not parts and any(out.iterdir()):
        raise ValueError(f"{out}: a folder with other content than score-archive parts; choose another -o")
    for tmp in out.glob(".part-*.tmp"):
        tmp.unlink()
    tables = {}
    for part in parts:
        try:
            tables[part] = pq.read_table(part)
        except Exception as e:  # noqa: BLE001  (pyarrow raises several types for a damaged file)
            raise ValueError(f"{part}: not a readable score-archive part ({type(e).__name__}: {e}); "
                             f"move it away and run again to rescore its images") from None
    others = sorted({m for t in tables.values() for m in t.column("model_id").to_pylist()} - {model_id, None})
    if model_id is not None and others and not rescore:
        raise ValueError(f"{out} holds scores of another model ({', '.join(others)}; this one is {model_id}): "
                         "choose another -o, or pass --rescore to score those images again with this model")
    done = set()
    for part, table in tables.items():
        keep = pc.is_null(table.column("error"))
        if model_id is not None:
            keep = pc.and_(keep, pc.equal(table.column("model_id"), model_id))
        kept = table.filter(keep)
        if kept.num_rows < table.num_rows:
            if kept.num_rows:
                _write_part(out, part.name, kept.to_pylist())
            else:
                part.unlink()
        b64 = kept.column("path_base64").to_pylist() if "path_base64" in kept.column_names else [None] * len(kept)
        done.update(os.fsdecode(base64.b64decode(b)) if b else p for p, b in zip(kept.column("path").to_pylist(), b64))
    return done


class ArchiveScorer:
    """A Ray Data worker: one detector, scoring batches of paths into rows of :data:`COLUMNS`.

    ``model``: ``[ObjectRef]`` of the model file's bytes (in a list, so that it reaches the constructor as a
    reference and is fetched here, from whichever node holds it).
    """

    def __init__(self, model: list, engine: str, kernel: str, batch_size: int):
        import ray

        from .catalog import load_bytes

        self.det = load_bytes(ray.get(model[0]), engine=engine, kernel=kernel, batch_size=batch_size)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        # Bytes through Ray and Arrow: a name that is not valid UTF-8 is no Arrow string.
        paths = [os.fsdecode(bytes(p)) for p in batch["path"]]
        rows: list[dict] = [{} for _ in paths]
        images, where = [], []
        for i, path in enumerate(paths):
            try:
                images.append(load_image(path))
                where.append(i)
            except Exception as e:  # noqa: BLE001  (an unreadable file is a row with its error)
                rows[i] = {"error": text(f"{type(e).__name__}: {e}")}
        for i, rec in zip(where, score_images(self.det, images) if images else []):
            rows[i] = rec
        model_id = self.det.model_id
        for path, row in zip(paths, rows):
            row.update(path_entries(path), model_id=model_id)
        return {c: [row.get(c) for row in rows] for c in COLUMNS}


def _write_part(out: Path, name: str, rows: list[dict]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pylist(rows, schema=_schema())
    tmp = out / f".{name}.tmp"
    pq.write_table(table, tmp)
    os.replace(tmp, out / name)


def score_archive(source, model, out, *, engine: str = "onnx", kernel: str = "auto", batch_size: int = 8,
                  workers: int | None = None, rows_per_part: int = 1000, address: str | None = None,
                  rescore: bool = False, progress: bool = True) -> dict:
    """Score every image of ``source`` not yet in ``out``; a summary of what was done.

    Uses the Ray this process is connected to, else joins ``address``, else
    starts a local one (and stops what it started).

    Args:
        source: see :func:`list_images`.
        model: model file (where the command runs; the workers get its bytes through Ray).
        out: output folder of Parquet parts; created when missing.
        engine, kernel: as for :meth:`dinopatch.DinoPatch.load`.
        batch_size: images per backbone call in a worker.
        workers: engines running at once (default: the cluster's CPUs).
        rows_per_part: a part is written once this many rows have come
            (about this many images are scored again after an interruption).
        address: Ray cluster to join.
        rescore: score again the images that ``out`` holds scores of another model for (default: refuse).
        progress: show a progress bar.

    Returns:
        ``{"images", "skipped", "scored", "errors", "output"}``.
    """
    from .catalog import load_bytes

    if int(batch_size) < 1 or int(rows_per_part) < 1 or (workers is not None and int(workers) < 1):
        raise ValueError(f"batch_size, rows_per_part and workers must be >= 1, got {batch_size}, "
                         f"{rows_per_part}, {workers}")
    paths = list_images(source)
    out = Path(out)
    # Fail here in a second, not in every worker after Ray has started them; the workers run these bytes.
    data = Path(model).read_bytes()
    try:
        model_id = load_bytes(data, engine=engine, kernel=kernel).model_id
    except ValueError as e:
        raise type(e)(f"{model}: {e}") from None
    done = done_paths(out, model_id, rescore)
    todo = [p for p in paths if p not in done]
    summary = {"images": len(paths), "skipped": len(paths) - len(todo), "scored": 0, "errors": 0,
               "output": str(out)}
    if not todo:
        return summary

    import ray
    import ray.data

    started = not ray.is_initialized()
    if started and address:
        ray.init(address=address)
    elif started:
        ray.init(_node_ip_address="127.0.0.1", include_dashboard=False)  # a local Ray listens on loopback only
    ctx = ray.data.DataContext.get_current()
    bars, ctx.enable_progress_bars = ctx.enable_progress_bars, False  # ours counts images; Ray's count blocks
    try:
        n = int(workers or max(1, math.floor(ray.cluster_resources().get("CPU", 1))))
        ds = ray.data.from_items([{"path": os.fsencode(p)} for p in todo],
                                 override_num_blocks=max(1, min(len(todo) // int(batch_size), 10_000)))
        # Absolute paths: workers may start in another folder (or on another machine).
        engine = os.path.abspath(engine) if os.fspath(engine).endswith(".onnx") else engine
        worker = {"model": [ray.put(data)], "engine": engine, "kernel": kernel, "batch_size": int(batch_size)}
        key = os.environ.get(KEY_ENV)
        ds = ds.map_batches(ArchiveScorer, fn_constructor_kwargs=worker, batch_size=int(batch_size),
                            batch_format="numpy", concurrency=n, num_cpus=1,
                            runtime_env={"env_vars": {KEY_ENV: key}} if key else None)
        out.mkdir(parents=True, exist_ok=True)
        run = f"{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{secrets.token_hex(3)}"
        pending: list[dict] = []
        parts = 0

        def flush():
            nonlocal parts, pending
            if pending:
                _write_part(out, f"part-{run}-{parts:05d}.parquet", pending)
                summary["scored"] += len(pending)
                summary["errors"] += sum(r["error"] is not None for r in pending)
                parts, pending = parts + 1, []

        with tqdm(total=len(todo), desc="score-archive", unit="image", disable=not progress) as bar:
            try:
                for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
                    pending += batch.to_pylist()
                    bar.update(batch.num_rows)
                    if len(pending) >= rows_per_part:
                        flush()
            finally:
                # Ctrl-C keeps what was scored.
                flush()
    finally:
        ctx.enable_progress_bars = bars
        if started:
            ray.shutdown()
    return summary


def main(argv: list[str] | None = None) -> int:
    """``python -m dinopatch score-archive``."""
    p = argparse.ArgumentParser(prog="python -m dinopatch score-archive",
                                description="Score a folder, glob or list of images on Ray Data into Parquet.")
    p.add_argument("input", help="a folder, a glob pattern (quote it), an image, or a text file of paths")
    p.add_argument("-m", "--model", required=True, help="model file, here (its bytes reach every node through Ray)")
    p.add_argument("-o", "--output", required=True, help="output folder of Parquet parts (OUT.parquet); "
                   "paths already in it are skipped")
    p.add_argument("--address", help="join this Ray cluster (HOST:6379, or 'auto'); default: start a local Ray")
    params.add_flags(p, ["engine", "kernel", "batch_size"], defaults={"engine": "onnx"})
    p.add_argument("--workers", type=int, help="engines at once (default: the cluster's CPUs)")
    p.add_argument("--rows-per-part", type=int, default=1000, help="rows per Parquet part")
    p.add_argument("--rescore", action="store_true",
                   help="OUT holds scores of another model: score those images again with this one (default: refuse)")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    args = p.parse_args(argv)
    try:
        s = score_archive(args.input, args.model, args.output, engine=args.engine, kernel=args.kernel,
                          batch_size=args.batch_size, workers=args.workers, rows_per_part=args.rows_per_part,
                          address=args.address, rescore=args.rescore, progress=args.progress)
    except (FileNotFoundError, ValueError) as e:
        print(f"dinopatch: {e}", file=sys.stderr)
        return 2
    print(f"{s['scored']} scored ({s['errors']} with errors), {s['skipped']} already in {s['output']}, "
          f"of {s['images']} images")
    return 0
