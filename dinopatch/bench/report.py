"""The bench's report: machine and library versions, an aligned table, JSON.

The JSON layout is documented in docs/benchmarks.md:
``{"hardware", "versions", "args", "rows", "load_avg_after"}``.
"""

from __future__ import annotations

import json
import os
import platform

import numpy as np

from .. import kernels

COLUMNS = [
    ("stage", "{}"),
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
    if kernels._C is not None:
        out["dinopatch._C isa"] = kernels._C.isa()
    return out


def hardware() -> dict:
    info = {"machine": platform.machine(), "cpus": os.cpu_count(), "load_avg": os.getloadavg()}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        import psutil

        info["memory_gib"] = round(psutil.virtual_memory().total / 2**30, 1)
    except ImportError:
        pass
    cuda = kernels._cuda()
    info["cuda_devices"] = cuda.device_count() if cuda is not None else 0
    return info


def format_table(rows: list[dict], columns) -> str:
    """Aligned text table of the columns any row has."""
    cols = [(c, f) for c, f in columns if any(r.get(c) not in (None, "") for r in rows)]
    cells = [[c for c, _ in cols]]
    for r in rows:
        cells.append([f.format(r[c]) if r.get(c) not in (None, "") else "" for c, f in cols])
    widths = [max(len(row[i]) for row in cells) for i in range(len(cols))]
    lines = ["  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def show(report: dict) -> str:
    """The report as text: one line of machine and versions, the rows, the targets."""
    hw = report["hardware"]
    rows = [r for r in report["rows"] if r["stage"] != "target"]
    targets = [r for r in report["rows"] if r["stage"] == "target"]
    parts = [
        f"{hw.get('cpu', '?')}, {hw['cpus']} cpus; load {hw['load_avg'][0]:.2f} -> "
        f"{report['load_avg_after'][0]:.2f}; {report['versions']}",
        format_table(rows, COLUMNS),
    ]
    if targets:
        parts += ["", format_table(targets, TARGET_COLUMNS)]
    return "\n".join(parts)


def write_json(report: dict, path: str) -> None:
    with open(path, "w") as f:
        json.dump(report, f, indent=1)
