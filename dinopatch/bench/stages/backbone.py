"""Backbone stage: eager torch against ONNX Runtime (fp32, int8) and OpenVINO (f32, bf16), in one run.

Engines are timed in turn, round after round, so that a noisy neighbour on a
shared machine slows all of them alike; the median round counts.  The
pytest-benchmark suite ``benchmarks/test_backbone_bench.py`` times the same
engines.
"""

from __future__ import annotations

import importlib.util
import os

import numpy as np

from ..registry import round_robin, stage

ENGINES = ("torch", "onnx", "onnx:int8", "openvino:fp32", "openvino:bf16")


def physical_cores() -> int:
    try:
        import psutil

        return psutil.cpu_count(logical=False) or os.cpu_count() or 1
    except ImportError:
        return os.cpu_count() or 1


def build_engines(
    image_size: int = 448, threads: int | None = None, name: str = "dinov2_vits14", engines=ENGINES
) -> dict:
    """The backbones to compare, with deliberate thread counts (one per physical core).

    Random weights: speed does not depend on their values.  ONNX exports come
    from the user cache, made on first use.

    Returns:
        engine name -> the backbone, or the reason it cannot run here (an
        engine not installed, bf16 on a CPU without it): a row says so.
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
            if not importlib.util.find_spec("openvino"):
                out[engine] = "openvino is not installed (pip install dinopatch[openvino])"
            elif precision == "bf16" and not cpu_has_bf16():
                out[engine] = "this CPU has neither AVX512-BF16 nor AMX"
            elif precision == "int8":
                out[engine] = "quantised on a model's own frames: timed by the e2e stage's engine choice"
            else:
                out[engine] = OpenVinoBackbone(name, "random", image_size, precision=precision, threads=threads)
        elif kind == "onnx":
            out[engine] = OnnxBackbone(name, "random", image_size, precision=precision or "fp32", threads=threads,
                                       device="cpu")
        else:
            raise ValueError(f"unknown backbone engine {engine!r}; choose from {ENGINES}")
    return out


def sample_images(batch: int, image_size: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (batch, image_size, image_size, 3), dtype=np.uint8)


@stage("backbone", groups=("pipeline",))
def bench_backbone(args) -> list[dict]:
    """Milliseconds per image of each engine (``--engines``) and its speed-up over eager torch.

    ViT-S/14 (``--backbone``; several, comma-separated, are timed in the same
    rounds, e.g. ``dinov2_vits14,dinov3_vits16``) at ``--image-size`` px,
    batches 1 and 8 (1 and 2 with ``--quick``), one intra-op thread per physical core.
    """
    batches = (1, 2) if args.quick else (1, 8)
    names = tuple(e.strip() for e in args.engines.split(",") if e.strip())
    backbones = [b.strip() for b in args.backbone.split(",") if b.strip()]
    threads = physical_cores()
    load = os.getloadavg()[0]
    built = {}
    for backbone in backbones:
        label = "" if len(backbones) == 1 else f"{backbone} "
        built.update({label + e: run for e, run in build_engines(args.image_size, threads, backbone, names).items()})
    engines = {e: run for e, run in built.items() if not isinstance(run, str)}
    rows = [{"stage": "backbone", "method": e, "batch": None, "ms_per_image": None, "ms_per_image_min": None,
             "vs_torch": None, "note": f"skipped: {why}"} for e, why in built.items() if isinstance(why, str)]
    for batch in batches:
        x = sample_images(batch, args.image_size)
        times = round_robin({e: (lambda run=run: run(x)) for e, run in engines.items()}, args.repeats)
        medians = {e: float(np.median(t)) * 1e3 / batch for e, t in times.items()}
        for engine, t in times.items():
            torch_key = engine.rpartition(" ")[0] + " torch" if " " in engine else "torch"  # the same backbone's
            rows.append(
                {
                    "stage": "backbone",
                    "method": engine,
                    "batch": batch,
                    "ms_per_image": medians[engine],
                    "ms_per_image_min": float(np.min(t)) * 1e3 / batch,
                    "vs_torch": medians[torch_key] / medians[engine] if torch_key in medians else None,
                    "note": f"{args.backbone} at {args.image_size} px, {threads} threads, load {load:.2f}",
                }
            )
    return rows
