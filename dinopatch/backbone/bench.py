"""Backbone throughput: eager torch against ONNX Runtime fp32 and int8 and OpenVINO, in one run.

Registered as the ``backbone`` stage of ``python -m dinopatch.bench``; the
pytest-benchmark suite ``benchmarks/test_backbone_bench.py`` times the same
engines.  Engines are timed in turn, round after round, so that a noisy
neighbour on a shared machine slows all of them alike; the median round counts.
"""
from __future__ import annotations

import importlib.util
import os
import time

import numpy as np

ENGINES = ("torch", "onnx", "onnx:int8", "openvino:f32", "openvino:bf16")


def physical_cores() -> int:
    try:
        import psutil

        return psutil.cpu_count(logical=False) or os.cpu_count() or 1
    except ImportError:
        return os.cpu_count() or 1


def build_engines(image_size: int = 448, threads: int | None = None, name: str = "dinov2_vits14",
                  engines=ENGINES) -> dict:
    """The backbones to compare, with deliberate thread counts (one per physical core).

    Random weights: speed does not depend on their values.  ONNX exports come
    from the user cache, made on first use.
    """
    import torch

    from dinopatch.backbone import OnnxBackbone, OpenVinoBackbone, TorchBackbone, cpu_has_bf16

    threads = threads or physical_cores()
    torch.set_num_threads(threads)
    out = {}
    for engine in engines:
        kind, _, precision = engine.partition(":")
        if engine == "torch":
            out[engine] = TorchBackbone(name, "random", image_size)
        elif kind == "openvino":
            # Engines not installed, or bf16 on a CPU without it, are left out of the table, not failed.
            if importlib.util.find_spec("openvino") and (precision != "bf16" or cpu_has_bf16()):
                out[engine] = OpenVinoBackbone(name, "random", image_size, precision=precision, threads=threads)
        else:
            out[engine] = OnnxBackbone(name, "random", image_size, precision=precision or "fp32", threads=threads,
                                       device="cpu")
    return out


def sample_images(batch: int, image_size: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (batch, image_size, image_size, 3), dtype=np.uint8)


def bench_backbone(quick: bool = False, repeats: int = 5, threads: int | None = None) -> list[dict]:
    """Milliseconds per image of each engine, and its speed-up over eager torch.

    Args:
        quick: ViT-S/14 at 224 px, batches 1 and 2 (instead of 448 px, batches 1 and 8).
        repeats: timed rounds (after one warm-up round).
        threads: intra-op threads of every engine (default: physical cores).

    Returns:
        one dict per engine and batch: ``stage``, ``engine``, ``batch``,
        ``image_size``, ``threads``, ``ms_per_image`` (median round),
        ``ms_per_image_min``, ``vs_torch`` (torch's median / this median),
        ``load_avg`` (1-minute load when the run started).
    """
    image_size, batches = (224, (1, 2)) if quick else (448, (1, 8))
    threads = threads or physical_cores()
    load = os.getloadavg()[0]
    engines = build_engines(image_size, threads)
    rows = []
    for batch in batches:
        x = sample_images(batch, image_size)
        times = {e: [] for e in engines}
        for _ in range(repeats + 1):
            for engine, run in engines.items():
                t0 = time.perf_counter()
                run(x)
                times[engine].append((time.perf_counter() - t0) * 1e3 / batch)
        medians = {e: float(np.median(t[1:])) for e, t in times.items()}
        for engine, t in times.items():
            rows.append({"stage": "backbone", "engine": engine, "batch": batch, "image_size": image_size,
                         "threads": threads, "ms_per_image": round(medians[engine], 2),
                         "ms_per_image_min": round(float(np.min(t[1:])), 2),
                         "vs_torch": round(medians["torch"] / medians[engine], 3), "load_avg": round(load, 2)})
    return rows


if __name__ == "__main__":
    import sys

    for row in bench_backbone(quick="--quick" in sys.argv, repeats=5):
        print(row)
