"""The bench's stage registry and timers.

A stage is one function ``fn(args) -> rows`` registered with :func:`stage`;
its rows (dicts) go to the table and the JSON report.  The keys every row of a
stage carries are listed in docs/benchmarks.md, and the bench test
holds each stage to them.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time
from typing import Callable

import numpy as np

STAGES: dict[str, Callable[[argparse.Namespace], list[dict]]] = {}
GROUPS: dict[str, list[str]] = {}


def stage(name: str, groups: tuple[str, ...] = ()):
    """Register ``fn(args) -> rows`` as stage ``name`` (and in each group)."""

    def register(fn):
        STAGES[name] = fn
        for g in groups:
            GROUPS.setdefault(g, []).append(name)
        return fn

    return register


def calls(fn: Callable[[], object], repeats: int) -> list[float]:
    """Seconds of each of ``repeats`` calls, after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def timeit(fn: Callable[[], object], repeats: int) -> tuple[float, float]:
    """(best, median) seconds of ``repeats`` calls after one warm-up call."""
    times = calls(fn, repeats)
    return min(times), statistics.median(times)


def round_robin(fns: dict[str, Callable[[], object]], rounds: int) -> dict[str, list[float]]:
    """Seconds of each function per round, in turn, after one warm-up round.

    Taking turns makes a noisy neighbour on a shared machine slow all of them
    alike.
    """
    times = {name: [] for name in fns}
    for i in range(rounds + 1):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            if i:
                times[name].append(time.perf_counter() - t0)
    return times


def paired_ratio(times: dict[str, list[float]], slow: str, fast: str) -> float:
    """Median over the rounds of :func:`round_robin` of ``slow``'s time over ``fast``'s in the same round.

    On a shared machine the load changes from round to round; a ratio of each
    round's pair follows it, where a ratio of the medians may pair rounds
    taken at different loads.
    """
    return float(np.median(np.asarray(times[slow]) / np.asarray(times[fast])))


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def latency_row(stage_name: str, method: str, seconds: list[float], batch: int = 1, note: str = "") -> dict:
    """A pipeline row: per-image latency percentiles of ``seconds`` per call of ``batch`` images."""
    ms = np.asarray(seconds) * 1e3 / batch
    return {
        "stage": stage_name,
        "method": method,
        "batch": batch,
        "ms_per_image": float(np.median(ms)),
        "ms_p50": float(np.percentile(ms, 50)),
        "ms_p95": float(np.percentile(ms, 95)),
        "ms_p99": float(np.percentile(ms, 99)),
        "images_s": 1e3 / float(np.median(ms)),
        "peak_rss_mib": peak_rss_mib(),
        "note": note,
    }


def target(what: str, goal: str, value: float, ok: Callable[[float], bool], required: bool = False) -> dict:
    """A row of the targets' table: ``goal`` is the condition ``ok`` checks.

    ``required``: a correctness check; ``--strict`` makes the run fail when it
    is not met (speed targets only report).
    """
    return {
        "stage": "target",
        "method": what,
        "target": goal,
        "measured": float(value),
        "met": bool(ok(value)),
        "required": required,
    }
