"""The bench's report: machine and library versions, an aligned table, JSON.

The JSON layout is documented in docs/benchmarks.md:
``{"hardware", "versions", "args", "rows", "load_avg_after"}``.
"""

from __future__ import annotations

import json
import os
import platform
import textwrap

import numpy as np

from .. import cpu, kernels

COLUMNS = [
    ("method", "{}"),
    ("dtype", "{}"),
    ("batch", "{}"),
    ("radius", "{}"),
    ("ms_per_image", "{:.3f}"),
    ("ms_median", "{:.3f}"),
    ("ms_call", "{:.3f}"),
    ("ms_kernel", "{:.3f}"),
    ("ms_align", "{:.2f}"),
    ("ms_backbone", "{:.2f}"),
    ("ms_distances", "{:.2f}"),
    ("ms_post", "{:.2f}"),
    ("auroc", "{:.3f}"),
    ("provider", "{}"),
    ("setup_s", "{:.1f}"),
    ("ms_p95", "{:.1f}"),
    ("ms_p99", "{:.1f}"),
    ("images_s", "{:.2f}"),
    ("peak_rss_mib", "{:.0f}"),
    ("speedup_vs_notebook", "{:.2f}"),
    ("vs_torch", "{:.2f}"),
    ("GB_s", "{:.1f}"),
    ("of_peak", "{:.1%}"),
    ("of_copy", "{:.1%}"),
    ("GFLOP_s", "{:.1f}"),
    ("roofline", "{:.2f}"),
    ("rel_err", "{:.1e}"),
    ("exact_match", "{:.1e}"),
    ("speedup_vs_numpy", "{:.1f}"),
    ("note", "{}"),
]
TARGET_COLUMNS = [
    ("method", "{}"),
    ("target", "{}"),
    ("measured", "{:.3g}"),
    ("met", "{}"),
    ("required", "{}"),
]


def versions() -> dict:
    out = {"python": platform.python_version(), "numpy": np.__version__}
    for name in ("numba", "torch", "faiss", "onnxruntime"):
        try:
            out[name] = __import__(name).__version__
        except ImportError:
            pass
    if kernels.isa() is not None:
        out["dinopatch._C isa"] = kernels.isa()
    return out


def hardware() -> dict:
    """The machine; ``cpu_level``: the ``DINOPATCH_CPU`` level it ran at, where one was set."""
    info = {"machine": platform.machine(), "cpus": os.cpu_count(), "load_avg": os.getloadavg()}
    if cpu.model_name():
        info["cpu"] = cpu.model_name()
    if cpu.level() is not None:
        info["cpu_level"] = cpu.level()
    try:
        import psutil

        info["memory_gib"] = round(psutil.virtual_memory().total / 2**30, 1)
    except ImportError:
        pass
    cuda = kernels.cuda_runtime()
    info["cuda_devices"] = cuda.device_count() if cuda is not None else 0
    return info


WIDTH = 100  # the printed report fits a terminal of this many columns
KEY_WIDTH = 32  # a longer method name may wrap inside its column, down to this width


def _wrap(text: str, width: int) -> list[str]:
    return textwrap.wrap(text, width, break_long_words=True, break_on_hyphens=False) or [""]


def _render(head: list[str], body: list[list[str]], key_width: int) -> list[str]:
    """Aligned lines of one table; the first column's cells wrap at ``key_width``."""
    widths = [max(len(row[i]) for row in [head] + body) for i in range(len(head))]
    widths[0] = min(widths[0], key_width)
    out = ["  ".join(v.ljust(w) for v, w in zip(head, widths)).rstrip(), "  ".join("-" * w for w in widths)]
    for row in body:
        first = _wrap(row[0], widths[0])
        out.append("  ".join(v.ljust(w) for v, w in zip([first[0], *row[1:]], widths)).rstrip())
        out += first[1:]
    return out


def format_table(rows: list[dict], columns, width: int = WIDTH, key_width: int = KEY_WIDTH) -> str:
    """Aligned text table of the columns any row has, no line over ``width`` characters.

    The first column is the key (the method): where the line would be too long
    it wraps, down to ``key_width``, and the columns that still do not fit go on
    in further tables that repeat it.  Notes are not a column: each distinct
    note follows the table once, wrapped, naming its rows unless all share it.
    """
    cols = [(c, f) for c, f in columns if c != "note" and any(r.get(c) not in (None, "") for r in rows)]
    cells = [[f.format(r[c]) if r.get(c) not in (None, "") else "" for c, f in cols] for r in rows]
    head = [c for c, _ in cols]
    widths = [max(len(row[i]) for row in [head] + cells) for i in range(len(cols))]
    # The key wraps only as far as the other columns need, and never below key_width.
    key_w = min(widths[0], max(key_width, width - sum(2 + w for w in widths[1:])))
    groups, group, used = [], [], key_w
    for i in range(1, len(cols)):
        w = widths[i]
        if group and used + 2 + w > width:
            groups.append(group)
            group, used = [], key_w
        group.append(i)
        used += 2 + w
    groups.append(group)
    lines = []
    for n, group in enumerate(groups):
        pick = [0, *group]
        lines += ([""] if n else []) + _render([head[i] for i in pick], [[row[i] for i in pick] for row in cells],
                                                key_w)
    notes: dict[str, list[str]] = {}
    for r in rows:
        if r.get("note"):
            notes.setdefault(r["note"], []).append(str(r.get("method", "")))
    for note, methods in notes.items():
        who = "" if len(methods) == len(rows) else f" ({', '.join(dict.fromkeys(methods))})"
        lines += _wrap(f"note{who}: {note}", width)
    return "\n".join(lines)


def show(report: dict) -> str:
    """The report as text: machine and versions, one table per stage, the targets; no line over :data:`WIDTH`."""
    hw = report["hardware"]
    versions = ", ".join(f"{k} {v}" for k, v in report["versions"].items())
    level = f" as DINOPATCH_CPU={hw['cpu_level']}" if hw.get("cpu_level") else ""
    parts = _wrap(f"{hw.get('cpu', '?')}{level}, {hw['cpus']} cpus; load {hw['load_avg'][0]:.2f} -> "
                  f"{report['load_avg_after'][0]:.2f}; {versions}", WIDTH)
    stages = list(dict.fromkeys(r["stage"] for r in report["rows"] if r["stage"] != "target"))
    for stage in stages:
        rows = [r for r in report["rows"] if r["stage"] == stage]
        parts += ["", f"== {stage} ==", format_table(rows, COLUMNS)]
    targets = [r for r in report["rows"] if r["stage"] == "target"]
    if targets:
        parts += ["", "== targets ==", format_table(targets, TARGET_COLUMNS)]
    return "\n".join(parts)


def write_json(report: dict, path: str) -> None:
    with open(path, "w") as f:
        json.dump(report, f, indent=1)
