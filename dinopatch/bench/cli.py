"""``python -m dinopatch.bench [stages...]``: run stages, print the table, write the JSON."""

from __future__ import annotations

import argparse
import os

from . import report
from .registry import GROUPS, STAGES
from .stages.backbone import ENGINES as BACKBONE_ENGINES


def parser() -> argparse.ArgumentParser:
    names = sorted(STAGES) + sorted(GROUPS)
    p = argparse.ArgumentParser(
        prog="python -m dinopatch.bench",
        description="Throughput of DinoPatch's stages beside their peers, in one run.",
    )
    p.add_argument(
        "stages",
        nargs="*",
        metavar="stage",
        help=f"stages or groups: {', '.join(names)} (default all but the cuda and scale groups)",
    )
    p.add_argument("--quick", action="store_true", help="smaller sizes, for a smoke run")
    p.add_argument("--repeats", type=int, default=5, help="timed calls per measurement (best is reported)")
    p.add_argument("--json", metavar="FILE", help="write hardware, versions and rows here")
    p.add_argument("--backbone", default="dinov2_vits14", help="pipeline stages: backbone name")
    p.add_argument(
        "--image-size",
        type=int,
        help="pipeline and backbone stages: input side in pixels (448; 224 with --quick)",
    )
    p.add_argument("--batch", type=int, default=8, help="pipeline stages: images per backbone call")
    p.add_argument("--bank", type=int, default=40, help="pipeline stages: good images in the memory bank")
    p.add_argument("--engine", default="auto", help="pipeline stages: detector engine")
    p.add_argument(
        "--weights",
        default="random",
        help="pipeline stages: 'random' or a checkpoint path (accuracy figures need weights whose blocks "
        "matter: timm's random init leaves them near the identity)",
    )
    p.add_argument("--engines", default=",".join(BACKBONE_ENGINES),
                   help="backbone stage: engines to compare (one not installed here is a row saying so)")
    p.add_argument(
        "--size",
        metavar="L,K,D",
        help="kernel stages: locations, rows, features "
        "(min_distance 1024,200,384; cuda 3136,200,768; a quarter of L with --quick)",
    )
    p.add_argument("--kernel", default="cuda", help="cuda stages: the kernel timed (cpp for a CPU dry run)")
    p.add_argument(
        "--peak-gbs",
        type=float,
        default=4800.0,
        help="cuda stages: the GPU's memory bandwidth, GB/s (H200: 4800)",
    )
    p.add_argument(
        "--e2e-budget",
        type=float,
        default=150.0,
        help="cuda_e2e stage: seconds after which engines not yet started are skipped (reported as such)",
    )
    p.add_argument(
        "--strict", action="store_true", help="exit 1 when a required check (a correctness target) is not met"
    )
    return p


def main(argv: list[str] | None = None) -> int:
    p = parser()
    args = p.parse_args(argv)
    if args.repeats < 1:
        p.error("--repeats must be >= 1")
    if args.size is not None:
        try:
            args.size = tuple(int(v) for v in args.size.split(","))
        except ValueError:
            args.size = ()
        if len(args.size) != 3 or min(args.size) < 1:
            p.error(f"--size takes three positive integers L,K,D, got {args.size!r}")
    args.image_size = args.image_size or (224 if args.quick else 448)
    if args.quick:
        args.bank = min(args.bank, 12)
    chosen = []
    named_only = set(GROUPS.get("cuda", [])) | set(GROUPS.get("scale", []))
    for s in args.stages or [n for n in sorted(STAGES) if n not in named_only]:
        if s not in STAGES and s not in GROUPS:
            p.error(f"unknown stage {s!r}; choose from {', '.join(sorted(STAGES) + sorted(GROUPS))}")
        chosen += [n for n in GROUPS.get(s, [s]) if n not in chosen]
    run = {"hardware": report.hardware(), "versions": report.versions(), "args": vars(args), "rows": []}
    for name in chosen:
        run["rows"] += STAGES[name](args)
    run["load_avg_after"] = os.getloadavg()
    print(report.show(run))
    if args.json:
        report.write_json(run, args.json)
    failed = [r["method"] for r in run["rows"] if r.get("required") and not r["met"]]
    if failed and args.strict:
        print(f"FAILED required checks: {failed}")
        return 1
    return 0
