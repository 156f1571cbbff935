"""The GPU check's end-to-end half (stage ``cuda_e2e``, group ``cuda``): parts per second per engine.

For ViT-S/14 at 448 px and ViT-B/14 at 784 px
(:meth:`DinoPatch.from_preset`, ``"notebook"``), a detector is fitted with
the torch engine on ``--bank`` aligned synthetic screws and predicts a test set
(good screws and each defect) with every engine installed: torch fp32, torch
fp16 autocast, ONNX Runtime (CUDA execution provider), ONNX Runtime TensorRT
on the portable graph (``export --portable``), and the foreground-token path
(a second fit, torch fp32).  Each row gives parts per second and the split of
predict time across align, backbone (pre-processing included), distances
(kernel, background check) and post-processing, with the image AUROC
beside it, so a fast wrong engine shows.  Every engine judges against the same
torch fp32 bank: tokens that drift from the reference lower its AUROC.

An engine that is not installed is a row that says why it was skipped; an
engine that starts on another device or provider than asked is an error row and
a failed required check (``--strict``).  Each engine's timed predict stops
after :data:`PREDICT_BUDGET_S` seconds (the row says how many parts it
scored), and an engine not started within ``--e2e-budget`` seconds of the
stage's start (ONNX Runtime's: :data:`ONNX_RESERVE_S` before) is a row saying
it was skipped for time.  The weights
are random with every LayerScale at 1, so the blocks matter (the GPU machine has
no network).  With ``--kernel cpp`` (the CI dry run) the same code runs on the
CPU; ``--quick`` runs ``--backbone`` at ``--image-size`` only, with a small
test set.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np

from ..registry import stage, target
from .pipeline import labelled

MODELS = (("dinov2_vits14", 448), ("dinov2_vitb14", 784))
# Seconds of timed predict per engine and model at most (it stops after the batch that passes it).
PREDICT_BUDGET_S = 15.0
# An ONNX Runtime engine starts only with this much of --e2e-budget left: its export (and TensorRT's
# engine build) cannot be stopped half way.
ONNX_RESERVE_S = 60.0
TRT_PROVIDER = "TensorrtExecutionProvider"


class _Timed:
    """An engine that adds the seconds of its calls to ``seconds``.

    Tokens left on the GPU (torch with the cuda kernel) are waited for, so
    that their time counts as the backbone's, not the distances'.
    """

    def __init__(self, engine):
        self.inner, self.seconds = engine, 0.0

    def __call__(self, images, positions=None, **kw):
        from dinopatch import kernels

        t0 = time.perf_counter()
        out = self.inner(images, positions, **kw)
        if kernels.on_cuda(out):
            kernels.cuda_runtime().synchronize()
        self.seconds += time.perf_counter() - t0
        return out

    def __getattr__(self, name):
        return getattr(self.inner, name)


def judged_parts(n: int, seed: int = 3) -> tuple[list[np.ndarray], np.ndarray]:
    """The e2e stage's screws (:func:`.pipeline.labelled`), shuffled so that any prefix mixes both classes."""
    test = labelled(n, seed)
    order = np.random.default_rng(seed).permutation(len(test))
    return [test[i][0] for i in order], np.array([test[i][2] for i in order])


def engine_plans(device: str, batch: int, common: dict, folder: Path) -> list[tuple[str, str, object]]:
    """``(label, what it must run on, build() or the reason it is skipped)`` for every engine of the stage."""
    from dinopatch.backbone import make_backbone
    from dinopatch.backbone.device import CPU_PROVIDER, CUDA_PROVIDER, parse_device
    from dinopatch.backbone.engines import installed

    cuda = parse_device(device)[0] == "cuda"
    where = "cuda:0" if cuda else "cpu"
    plans = [(label, where, lambda e=engine: make_backbone(e, device=device, **common))
             for label, engine in (("torch fp32", "torch"), ("torch fp16 autocast", "torch:fp16"))]
    available = []
    if installed("onnxruntime"):
        import onnxruntime as ort

        available = ort.get_available_providers()
    ort_asked = CUDA_PROVIDER if cuda else CPU_PROVIDER
    if not installed("onnxruntime"):
        why = "onnxruntime is not installed"
    elif ort_asked not in available:
        why = f"this onnxruntime has no {ort_asked} (providers: {', '.join(available)}; onnxruntime-gpu has)"
    else:
        why = None
    plans.append(("onnxruntime " + ort_asked, ort_asked,
                  why or (lambda: make_backbone("onnx", device=device, **common))))
    if not cuda:
        why = "TensorRT runs on a GPU only (a CPU dry run)"
    elif why is None and TRT_PROVIDER not in available:
        why = f"this onnxruntime has no {TRT_PROVIDER} (providers: {', '.join(available)})"
    plans.append((f"onnxruntime {TRT_PROVIDER}, portable graph", TRT_PROVIDER,
                  why or (lambda: _tensorrt(device, batch, common, folder))))
    return plans


def _tensorrt(device: str, batch: int, common: dict, folder: Path):
    """ONNX Runtime on TensorRT (CUDA for what it leaves), on the portable export, one shape profile."""
    from dinopatch.backbone import OnnxBackbone, get_spec
    from dinopatch.backbone.device import CPU_PROVIDER, CUDA_PROVIDER, parse_device
    from dinopatch.backbone.onnx_export import export_onnx

    name, size = common["name"], common["image_size"]
    path = export_onnx(name, common["weights"], size, seed=common["seed"], portable=True,
                       out=folder / f"{name}_{size}px_portable.onnx")
    index, n = parse_device(device)[1], (size // get_spec(name).patch_size) ** 2
    (folder / "trt").mkdir(exist_ok=True)
    shapes = lambda b: f"images:{b}x3x{size}x{size},positions:{n}"  # noqa: E731
    options = {"device_id": index, "trt_fp16_enable": False, "trt_engine_cache_enable": True,
               "trt_engine_cache_path": str(folder / "trt"), "trt_profile_min_shapes": shapes(1),
               "trt_profile_opt_shapes": shapes(batch), "trt_profile_max_shapes": shapes(batch)}
    providers = [(TRT_PROVIDER, options), (CUDA_PROVIDER, {"device_id": index}), CPU_PROVIDER]
    return OnnxBackbone(path=path, device=device, providers=providers)


def runs_on(engine) -> str:
    """The device (torch) or execution provider (ONNX Runtime) an engine runs on."""
    return getattr(engine, "provider", None) or str(engine.device)


def predict_split(det, images: list[np.ndarray], labels: np.ndarray, budget: float) -> dict:
    """Predict ``images`` a batch at a time, as :meth:`DinoPatch.predict` does, timing each stage.

    Stops after the batch that passes ``budget`` seconds.  Returns the seconds
    per stage, the parts scored and their image AUROC.
    """
    from dinopatch.metrics import auroc

    engine, bs = det.backbone_for(), det.batch_size
    engine.seconds = 0.0
    t = dict.fromkeys(("align", "distances", "post"), 0.0)
    scores, start = [], time.perf_counter()
    for i in range(0, len(images), bs):
        t0 = time.perf_counter()
        items = det.align_images(images[i:i + bs])
        t1 = time.perf_counter()
        raws = det.distances_aligned(items)
        t2 = time.perf_counter()
        scores += [det.result_from(raw).score for raw in raws]
        t["post"] += time.perf_counter() - t2
        t["align"] += t1 - t0
        t["distances"] += t2 - t1
        if time.perf_counter() - start > budget:
            break
    t["backbone"], t["distances"] = engine.seconds, t["distances"] - engine.seconds
    n = len(scores)
    return dict(t, n=n, auroc=auroc(labels[:n], np.array(scores)))


def _detector(name: str, size: int, weights: str, kernel: str, device: str, batch: int, foreground: bool):
    from dinopatch.detector import DinoPatch

    # A given threshold: calibration would score the bank leave-one-out; AUROC does not need a threshold.
    return DinoPatch.from_preset("notebook", backbone=name, image_size=size, weights=weights, engine="torch",
                                 kernel=kernel, device=device, batch_size=batch, foreground=foreground,
                                 threshold=1.0, progress=False)


class ModelRun:
    """One model: its weights, its two fitted detectors (every token, foreground), and its engines to time."""

    def __init__(self, name: str, size: int, args, folder: Path):
        from dinopatch.backbone import get_spec
        from dinopatch.backbone.weights import write_blocks_matter_checkpoint
        from dinopatch.synthetic import make_images

        self.args, self.model = args, f"{name} {size}px"
        device = "cuda" if args.kernel == "cuda" else "cpu"
        weights = str(write_blocks_matter_checkpoint(get_spec(name), folder / f"{name}_layerscale1.safetensors"))
        common = dict(name=name, weights=weights, image_size=size, layers=1, seed=0)
        self.images, self.labels = judged_parts(1 if args.quick else 6)
        self.plans = engine_plans(device, args.batch, common, folder)
        self.reference = _Timed(self.plans[0][2]())
        bank = make_images("screw", "good", args.bank, seed=1)
        self.fits = {}
        for fg in (False, True):
            det = _detector(name, size, weights, args.kernel, device, args.batch, fg)
            det.use_engine(self.reference)
            t0 = time.perf_counter()
            self.fits[fg] = det.fit(bank), time.perf_counter() - t0
        kept = self.fits[True][0].model_.foreground.fraction
        self.plans.insert(2, (f"foreground tokens ({kept:.0%} kept), torch fp32", self.plans[0][1], None))

    def engine_rows(self, label: str, asked: str, build, deadline: float) -> list[dict]:
        """The engine's row, and its check that it runs on ``asked`` unless it was skipped."""
        args, model = self.args, self.model
        row = dict.fromkeys(("images_s", "ms_per_image", "ms_align", "ms_backbone", "ms_distances", "ms_post",
                             "auroc", "provider", "setup_s"))
        row.update(stage="cuda_e2e", method=f"{model}, {label}", batch=args.batch, note="")
        reserve = ONNX_RESERVE_S if label.startswith("onnxruntime") else 0.0
        if isinstance(build, str) or time.perf_counter() > deadline - reserve:
            row["note"] = f"skipped: {build}" if isinstance(build, str) else \
                f"skipped: the stage's time budget (--e2e-budget {args.e2e_budget:g} s) was spent"
            return [row]
        det, fit_s = self.fits[build is None]

        def check(ok: float) -> dict:
            return target(f"{model}, {label}: runs on {asked}", "== 1", ok, lambda v: v == 1, required=True)

        t0 = time.perf_counter()
        try:
            engine = self.reference if build is None or label == self.plans[0][0] else _Timed(build())
            det.use_engine(engine)
            warm = slice(0, det.batch_size)  # lazy initialisation, cuDNN autotuning, TensorRT's engine build
            predict_split(det, self.images[warm], self.labels[warm], 0.0)
        except Exception as e:  # an engine that cannot start where asked is a failed check, not a crash
            row["note"] = f"error: {type(e).__name__}: {e}"
            return [row, check(0.0)]
        row["provider"], row["setup_s"] = runs_on(engine), time.perf_counter() - t0
        split = predict_split(det, self.images, self.labels, PREDICT_BUDGET_S)
        n, total = split["n"], sum(split[k] for k in ("align", "backbone", "distances", "post"))
        row.update({f"ms_{k}": split[k] / n * 1e3 for k in ("align", "backbone", "distances", "post")})
        row.update(ms_per_image=total / n * 1e3, images_s=n / total, auroc=split["auroc"])
        cut = " (time budget reached)" if n < len(self.images) else ""
        row["note"] = f"{n} of {len(self.images)} test parts{cut}; bank {args.bank}, fit {fit_s:.1f} s; " \
                      f"kernel {args.kernel}"
        return [row, check(float(row["provider"] == asked))]


@stage("cuda_e2e", groups=("cuda",))
def bench_cuda_e2e(args) -> list[dict]:
    """Parts per second and the split of predict time, per engine, for each model (see the module).

    Every model is fitted first, then the torch engines of every model are
    timed, then the ONNX Runtime ones (whose exports and TensorRT engine
    builds take longest): what the time budget leaves out is the least needed.
    """
    deadline = time.perf_counter() + args.e2e_budget
    models = [(args.backbone, args.image_size)] if args.quick else MODELS
    with tempfile.TemporaryDirectory(prefix="dinopatch-cuda-e2e-") as folder:
        runs = [ModelRun(name, size, args, Path(folder)) for name, size in models]
        done = {id(run): [] for run in runs}
        for onnx in (False, True):
            for run in runs:
                for label, asked, build in run.plans:
                    if label.startswith("onnxruntime") == onnx:
                        done[id(run)] += run.engine_rows(label, asked, build, deadline)
    rows = [row for run in runs for row in done[id(run)]]
    return [r for r in rows if r["stage"] != "target"] + [r for r in rows if r["stage"] == "target"]
