"""What :meth:`DinoPatch.fit` learns, the checks it must pass, and its model-file form.

:class:`Fitted` is immutable: the detector swaps it whole.  :func:`check_params`
(the parameter table, :mod:`.params`) validates parameters at fit and at load, so a file that
would misjudge parts later (an edited threshold, a tolerance of 2^63, an
aligner for another frame size) fails at load with :class:`ModelFileError`.
The container (zip of arrays, checksum, signature) is :mod:`.modelfile`.
"""
from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path

import numpy as np

from . import autotune, engine_choice, evidence, kernels, margin, modelfile, tolerance
from . import params as param_table
from ._version import __version__
from .align import Aligner
from .backbone import get_spec
from .bank import MemoryBank
from .calibration import METHODS, Threshold, measured_with
from .coreset import GoodTokens
from .drift import Reference
from .foreground import Foreground
from .golden import GoldenSet
from .goodset import FitReport
from .modelfile import ModelFileError
from .nominal import FoldPlan, NominalSet, finish
from .postprocess import PostProcess
from .result import PatchDistances, Result
from .update import GoodParts

# How to run, not what was fitted: these may differ between save and load.
RUNTIME_PARAMS = param_table.runtime_names()


@dataclasses.dataclass(frozen=True)
class Fitted:
    """Everything fit learned, with the parameters it was learned with."""

    params: dict
    aligner: Aligner
    bank: MemoryBank
    threshold: Threshold
    fingerprint: str
    model_id: str
    foreground: Foreground | None = None  # the region the backbone runs on, and the background check
    # {"engine", "sha256"}: the exact graph the engine used at fit ran, where it ran one.
    graph: dict | None = None
    # What fit chose for the parameters set to "auto", and its evidence (:func:`.autotune.resolve`).
    auto: dict | None = None
    # Held-out patches at each offset per location (:func:`.tolerance.offset_counts`): the tolerance map's evidence.
    offsets: np.ndarray | None = None
    # What fit made of its good set (:mod:`.goodset`); None in model files from before the check.
    report: FitReport | None = None
    # The good parts' statistics the drift monitor compares the line with (:class:`.drift.Reference`).
    drift: Reference | None = None
    # Canonical frames with the reference's scores and verdicts (:mod:`.golden`): what every engine must reproduce.
    golden: GoldenSet | None = None
    # The fastest engine that reproduces the golden verdicts, with its evidence (:mod:`.engine_choice`).
    engine_choice: dict | None = None
    # The good parts the model was made of, and its updates (:mod:`.update`); None in files from before update.
    good: GoodParts | None = None
    # Every good part's tokens where the bank is a coreset: its rows' and held-out maps' evidence (:mod:`.coreset`).
    coreset: GoodTokens | None = None

    def graph_sha256(self, engine) -> str | None:
        """The recorded hash of the graph ``engine`` must run, where fit ran the same engine."""
        return self.graph["sha256"] if self.graph and self.graph["engine"] == os.fspath(engine) else None

    @property
    def resolved(self) -> dict:
        """The parameters with every ``"auto"`` replaced by fit's choice."""
        return autotune.resolved(self.params, self.auto)

    @property
    def post(self) -> PostProcess:
        p = self.resolved
        return PostProcess(p["sigma"], p["score"], p["topk"], p["morph_kernel"])

    def judge(self, raw: PatchDistances, threshold: float | None = None, pixel_threshold: float | None = None,
              **post) -> Result:
        """The :class:`~.result.Result` of one image's patch distances; ``threshold``, ``pixel_threshold`` (one
        value for the defect mask instead of the per-location grid) and ``**post`` override the model's."""
        t = self.threshold if threshold is None else Threshold.given(threshold)
        pixel = None if pixel_threshold is None else float(pixel_threshold)
        return dataclasses.replace(self.post, **post).judge(raw, self.aligner, t, pixel)

    def tuned(self, threshold: Threshold, **post) -> "Fitted":
        """This model judging with a threshold and post-processing measured elsewhere (by evaluation);
        the auto record keeps only the choices not set here.  A calibrated threshold is read again from its
        held-out parts scored with the new post-processing."""
        new = dataclasses.replace(self.post, **post)
        if threshold.measured_with not in (None, measured_with(new)):
            threshold = threshold.rescored(new)
        settings = dataclasses.asdict(new)
        return dataclasses.replace(self, params=dict(self.params, **settings), threshold=threshold,
                                   model_id="unsaved", auto=autotune.without(self.auto, settings))

    def check_threshold(self, threshold: Threshold | None = None) -> None:
        """ValueError naming the value of ``threshold`` (default: the model's) that its evidence, or the bank's
        reach for a user's, does not support (:func:`.evidence.check_threshold`)."""
        evidence.check_threshold(self.threshold if threshold is None else threshold, self)

    def align(self, images: list[np.ndarray]) -> list[tuple]:
        """Items ``(model, image, canonical, valid, alignment)`` for :meth:`patch_distances`, one per image."""
        return [(self, im, *self.aligner.transform(im)) for im in images]

    def patch_distances(self, items: list[tuple], engine, kernel: str | None = None) -> list[PatchDistances]:
        """:class:`~.result.PatchDistances` of items from :meth:`align`."""
        dists = self.distances(engine, np.stack([c for _, _, c, _, _ in items]),
                               np.stack([v for _, _, _, v, _ in items]), kernel)
        return [PatchDistances(d, valid, al, im.shape[:2], self) for (_, im, _, valid, al), d in zip(items, dists)]

    def distances(self, engine, frames: np.ndarray, valid: np.ndarray, kernel: str | None = None) -> np.ndarray:
        """Patch distances ``[B, h, w]`` of canonical frames ``[B, S, S, 3]`` with their valid masks ``[B, S, S]``,
        as this model scores them.

        Torch on a GPU and the cuda kernel: the kernel reads the tokens there, not through the host.
        """
        fg = self.foreground
        if fg is not None:
            tokens = fg.scatter(engine(frames, fg.positions))
        elif getattr(engine, "engine", None) == "torch" and str(engine.device).startswith("cuda") \
                and kernels.resolve(kernel) == "cuda":
            tokens = engine(frames, on_device=True)
        else:
            tokens = engine(frames)
        return finish(self.bank.distances(tokens, kernel), fg, frames, valid)


def by_model(items: list[tuple]) -> list[tuple[Fitted, list[tuple]]]:
    """Items of :meth:`Fitted.align` in runs of one model each (items aligned across a refit)."""
    runs: list = []
    for item in items:
        if runs and runs[-1][0] is item[0]:
            runs[-1][1].append(item)
        else:
            runs.append((item[0], [item]))
    return runs


class NotFittedError(ValueError, AttributeError):
    """``predict`` or ``save`` was called before ``fit`` (scikit-learn's bases)."""


def backbone_config(params: dict) -> dict:
    """What selects the backbone's weights and graph (the engine is chosen at run time)."""
    return {"name": params["backbone"], **{k: params[k] for k in ("weights", "image_size", "layers", "seed")}}


def graph_record(engine_name, engine) -> dict | None:
    """What a model file records of the graph an engine ran (torch runs none)."""
    digest = getattr(engine, "sha256", None)
    return {"engine": os.fspath(engine_name), "sha256": digest} if digest else None


def check_params(params: dict) -> dict:
    """Validated, JSON-able copy of the detector's parameters (:func:`.params.check`); ValueError naming the first
    bad one.  At fit and on every model file's header at load."""
    return param_table.check(params)


def learned(params: dict, nominal: NominalSet, auto: dict | None, threshold: Threshold, engine, engine_name,
            report: FitReport, images: list[np.ndarray], names: list[str]) -> Fitted:
    """What a fit on ``images`` learned: the nominal set's aligner, region and bank (with the settings ``auto``
    chose), ``threshold``, the good set's ``report``, the drift reference of the images it kept, and, where
    ``params["keep_parts"]``, the good parts themselves; ``engine`` ran as ``engine_name``."""
    kept = [images[i] for i in report.kept()]
    bank = nominal.bank(autotune.resolved(params, auto))
    return Fitted(params, nominal.aligner, bank, threshold,
                  engine.fingerprint, "unsaved", nominal.foreground, graph_record(engine_name, engine), auto,
                  nominal.offsets, report, Reference.measure(kept, nominal.alignments, params["image_size"]),
                  good=GoodParts.of(images, names) if params["keep_parts"] else None,
                  coreset=GoodTokens.of(nominal.tokens, bank))


def save_detector(path: str | os.PathLike, model: Fitted, runtime: dict) -> tuple[Fitted, Path]:
    """Write ``model`` (with the run-time parameters in force) to ``path``; the model gets its id."""
    params = check_params(dict(model.params, **runtime))
    t = model.threshold
    model.check_threshold()  # what load would refuse is not written
    header = {
        "dinopatch_version": __version__,
        "params": params,
        "threshold": {"image": t.image, "pixel": t.pixel, "source": t.source, "measured_with": t.measured_with,
                      "pixel_tuned": t.pixel_tuned},
        "grid": list(model.bank.grid),
        "aligner": model.aligner.state_dict(),
        "weights_fingerprint": model.fingerprint,
        "graph": model.graph,
        "auto": model.auto,
        "fit_report": None if model.report is None else model.report.record(),
    }
    arrays = {"bank": model.bank.features, "calibration_scores": np.asarray(t.scores, np.float64),
              "calibration_maxima": np.asarray(t.maxima, np.float64),
              "calibration_distances": np.asarray(t.distances, np.float32),
              "calibration_valid": np.packbits(t.valid.reshape(len(t.valid), params["image_size"] ** 2), axis=1),
              "tuning_scores": np.asarray(t.tuning_scores, np.float64),
              "tuning_labels": np.asarray(t.tuning_labels, bool),
              "calibration_fold_rows": np.asarray(t.fold_rows, np.int32),
              "tuning_mask_kernels": np.asarray(t.mask_kernels, np.int64),
              "tuning_mask_thresholds": np.asarray(t.mask_thresholds, np.float64),
              "tuning_mask_counts": np.asarray(t.mask_counts, np.int64)}
    if model.coreset is not None:
        arrays.update(model.coreset.state())
    if model.bank.global_features is not None:
        arrays["global_bank"] = model.bank.global_features
    if model.offsets is not None:
        arrays["tolerance_offsets"] = np.asarray(model.offsets, np.int64)
    if isinstance(model.bank.tolerance, np.ndarray):
        arrays["tolerance_map"] = model.bank.tolerance.astype(np.uint8)
    if model.foreground is not None:
        header["foreground"], fg_arrays = model.foreground.state()
        arrays.update(fg_arrays)
    if model.drift is not None:
        header["drift"], drift_arrays = model.drift.state()
        arrays.update(drift_arrays)
    if model.golden is not None:
        header["golden"], golden_arrays = model.golden.state(model.post, t.image)
        arrays.update(golden_arrays)
        header["engine_choice"] = model.engine_choice
    if model.good is not None:
        header["good_parts"], good_arrays = model.good.state()
        arrays.update(good_arrays)
    path = modelfile.write(path, header, arrays)
    return dataclasses.replace(model, params=params, model_id=_model_id(modelfile.content_digest(header, arrays))), path


def _model_id(digest: str) -> str:
    """A model's id: the first 12 hex digits of its file's checksum, so any edit gives another id."""
    return digest[:12]


def load_detector(path: str | os.PathLike, runtime: dict, threshold: float | None = None,
                  false_alarm_rate: float | None = None) -> tuple[Fitted, dict]:
    """The fitted model and parameters of a model file, every value checked; raises :class:`ModelFileError`.

    ``threshold`` replaces the file's (its source becomes the user); ``false_alarm_rate`` re-reads the
    file's calibration scores at that rate.
    """
    bad = set(runtime) - set(RUNTIME_PARAMS)
    if bad:
        raise ValueError(f"only {list(RUNTIME_PARAMS)} can be overridden on load, got {sorted(bad)}")
    if threshold is not None and false_alarm_rate is not None:
        raise ValueError("give threshold or false_alarm_rate, not both")
    # A wrong run-time value is the caller's, not the file's: say so before reading the file.
    check_params(dict(param_table.defaults(), **runtime))
    header, arrays = modelfile.read(path)
    try:
        model, params = _unpack(header, arrays, runtime)
    except ModelFileError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise ModelFileError(f"{path}: invalid model file ({type(e).__name__}: {e})") from None
    if threshold is not None:
        given = Threshold.given(threshold)
        model.check_threshold(given)
        model = dataclasses.replace(model, threshold=given)
    elif false_alarm_rate is not None:
        model = dataclasses.replace(model, threshold=model.threshold.at_false_alarm_rate(false_alarm_rate))
    return model, params


def _unpack(header: dict, arrays: dict, runtime: dict) -> tuple[Fitted, dict]:
    if not isinstance(header.get("params"), dict):
        raise TypeError("params is not a mapping")
    unknown = sorted(set(header["params"]) - set(param_table.table()))
    if unknown:
        raise ModelFileError(f"unknown parameters {unknown}: the file was written by a newer DinoPatch (it says "
                             f"{header.get('dinopatch_version')!r}, this is {__version__}); upgrade to load it")
    params = check_params(dict(header["params"], **runtime))
    spec = get_spec(params["backbone"])
    side = params["image_size"] // spec.patch_size
    grid = header["grid"]
    if grid != [side, side]:
        raise ValueError(f"grid {grid} does not fit {spec.name} at {params['image_size']} px ([{side}, {side}])")
    fg = None
    if header.get("foreground") is not None:
        if not params["align"]:
            raise ValueError("a foreground region without alignment")
        fg = Foreground.from_state(header["foreground"], arrays, (side, side),
                                   lambda m: FoldPlan.seeded(m, params["seed"]).folds)
        margin.check_record(fg.margin, len(fg.positions))
        if header["aligner"].get("padding") != "background":
            raise ValueError("a foreground region with an aligner that pads by reflection")
    locations = side * side if fg is None else len(fg.positions)
    bank = arrays["bank"]
    if bank.ndim != 3 or bank.shape[0] != locations or bank.shape[2] != spec.embed_dim or bank.shape[1] < 1 \
            or bank.dtype.name != params["bank_dtype"]:
        raise ValueError(f"bank {bank.dtype}{list(bank.shape)} does not fit {spec.name} at {params['image_size']} px "
                         f"({params['bank_dtype']}[{locations}, K, {spec.embed_dim}] expected)")
    if not np.isfinite(bank).all():
        raise ValueError("bank holds non-finite values")
    aligner = Aligner.from_state_dict(header["aligner"])
    if aligner.size != params["image_size"] or aligner.enabled != params["align"] \
            or aligner.size_tolerance != params["size_tolerance"] or aligner.register != params["register"]:
        raise ValueError(f"aligner for {aligner.size} px (enabled={aligner.enabled}, size_tolerance "
                         f"{aligner.size_tolerance:g}, register={aligner.register!r}) does not fit image_size "
                         f"{params['image_size']} (align={params['align']}, size_tolerance "
                         f"{params['size_tolerance']:g}, register={params['register']!r})")
    if "polarity" in arrays:  # an older DinoPatch's: it turned token grids after the backbone
        raise ValueError("a token-grid polarity: written by a DinoPatch that settled the half turn after the "
                         "backbone, which this one does in the image; fit the model again")
    fingerprint = header["weights_fingerprint"]
    if not isinstance(fingerprint, str) or not re.fullmatch(r"[0-9a-f]{64}", fingerprint):
        raise ValueError(f"weights fingerprint missing or malformed ({fingerprint!r})")
    threshold = _threshold(header["threshold"], arrays, side, params["image_size"])
    model_id = _model_id(header["sha256"])
    if header.get("model_id", model_id) != model_id:
        raise ValueError(f"stored model id {header['model_id']!r} is not the file's content id {model_id!r}: a model "
                         "id is derived from the content, never stored")
    graph = header.get("graph")
    if graph is not None and (set(graph) != {"engine", "sha256"} or not isinstance(graph["engine"], str)
                              or not re.fullmatch(r"[0-9a-f]{64}", str(graph["sha256"]))):
        raise ValueError(f"graph record malformed ({graph!r})")
    offsets = arrays.get("tolerance_offsets")
    if offsets is not None:
        offsets = tolerance.check_offsets(offsets, (side, side), None if fg is None else fg.positions)
    auto = autotune.check_record(header.get("auto"), params, side, offsets)
    report = None if header.get("fit_report") is None else FitReport.from_record(header["fit_report"])
    if report is not None and report.outliers != params["outliers"]:
        raise ValueError(f"fit report's policy {report.outliers!r} is not the parameters' outliers "
                         f"{params['outliers']!r}: the file was edited")
    if report is not None and threshold.source["method"] in ("leave-one-out", "k-fold") \
            and threshold.source["images"] != report.used:
        raise ValueError(f"threshold measured on {threshold.source['images']} images but the fit report used "
                         f"{report.used}: the file was edited")
    chosen = check_params(autotune.resolved(params, auto))
    steps = _tolerance(chosen["tolerance"], arrays.get("tolerance_map"), offsets, side)
    rows = arrays.get("global_bank") if chosen["match"] != "local" else None
    if rows is not None and not np.isfinite(rows).all():
        raise ValueError("global bank holds non-finite values")
    membank = MemoryBank(bank, (side, side), steps, None if fg is None else fg.positions, chosen["match"], rows)
    if report is None and params["coreset_ratio"] < 1:
        raise ValueError("a coreset bank without the fit report that says how many good parts it was chosen from")
    coreset = None if report is None else GoodTokens.from_state(arrays, bank, report.used, params["coreset_ratio"])
    drift = Reference.from_state(header.get("drift"), arrays)
    gold = None
    if header.get("golden") is not None:
        post = PostProcess(chosen["sigma"], chosen["score"], chosen["topk"], chosen["morph_kernel"])
        gold = GoldenSet.from_state(header["golden"], arrays, params["image_size"], side, post, threshold.image)
    elif any(name.startswith("golden_") for name in arrays) or header.get("engine_choice") is not None:
        raise ValueError("golden arrays or an engine choice without the golden record")
    choice = engine_choice.check_record(header.get("engine_choice")) if gold is not None else None
    # A file without a fit report (from before the check) kept every part it was given.
    good = GoodParts.from_state(header.get("good_parts"), arrays, None if report is None else report.kept())
    if params["keep_parts"] != (good is not None):
        raise ValueError(f"keep_parts is {params['keep_parts']} but the file {'lacks' if good is None else 'holds'} "
                         "good parts: the file was edited")
    if good is not None and report is not None and len(good.images) != report.images:
        raise ValueError(f"the file holds {len(good.images)} good parts but its fit report was given "
                         f"{report.images}: the file was edited")
    model = Fitted(params, aligner, membank, threshold, fingerprint, model_id, fg, graph, auto,
                   offsets, report, drift, gold, choice, good, coreset)
    evidence.check_bank(model)
    evidence.check_background(model)  # first: the threshold's maps outside the region follow from these samples
    model.check_threshold()
    return model, params


def _tolerance(chosen, stored, offsets, side: int):
    """The bank's tolerance: the chosen one, or for ``"map"`` the map derived again from its evidence."""
    if not (isinstance(chosen, str) and chosen == "map"):
        if stored is not None:
            raise ValueError(f"a tolerance map in a model whose tolerance is {chosen!r}")
        return chosen
    if offsets is None or stored is None:
        raise ValueError("tolerance 'map' without its map or its evidence (tolerance_map, tolerance_offsets)")
    if stored.shape != (side * side,) or not np.isin(stored, tolerance.STEPS).all():
        raise ValueError(f"tolerance map {stored.dtype}{list(stored.shape)} is not {side * side} values in "
                         f"{set(tolerance.STEPS)}")
    derived = tolerance.tolerance_map(offsets, (side, side), side - 1)
    if (stored != derived).any():
        raise ValueError("the tolerance map disagrees with its evidence (tolerance_offsets): the file was edited")
    return derived


def _threshold(record: dict, arrays: dict, side: int, size: int) -> Threshold:
    """The threshold record and its evidence arrays, each checked for form (:func:`.evidence.check_threshold`
    checks them against each other once the bank is built)."""
    if not isinstance(record, dict) or set(record) != {"image", "pixel", "source", "measured_with", "pixel_tuned"}:
        raise ValueError(f"threshold record malformed ({str(record)[:80]!r})")
    source = record["source"]
    if not isinstance(source, dict) or source.get("method") not in METHODS:
        raise ValueError(f"threshold source {source!r} is not one of {METHODS}")
    post = record["measured_with"]
    if post is not None and not (isinstance(post, dict) and set(post) == {"sigma", "score", "topk"}):
        raise ValueError(f"threshold's measured_with {post!r} is not {{'sigma', 'score', 'topk'}}")
    if not isinstance(record["pixel_tuned"], bool):
        raise ValueError(f"threshold's pixel_tuned {record['pixel_tuned']!r} is not true or false")
    distances, scores = arrays["calibration_distances"], arrays["calibration_scores"]
    if distances.size and distances.shape[1:] != (side, side):
        raise ValueError(f"held-out distances {list(distances.shape)} do not fit the [{side}, {side}] grid")
    packed = arrays["calibration_valid"]
    if packed.dtype != np.uint8 or packed.shape != (len(distances), -(-size * size // 8)):
        raise ValueError(f"held-out valid masks {packed.dtype}{list(packed.shape)} are not {len(distances)} packed "
                         f"{size} x {size} masks")
    valid = np.unpackbits(packed, axis=1, count=size * size).reshape(-1, size, size).astype(bool)
    labels = arrays["tuning_labels"]
    if labels.dtype != bool:
        raise ValueError(f"tuning labels are {labels.dtype}, not bool")
    fold_rows = arrays["calibration_fold_rows"]
    if fold_rows.dtype != np.int32 or fold_rows.ndim != 2:
        raise ValueError(f"held-out folds' coreset rows {fold_rows.dtype}{list(fold_rows.shape)} are not int32 [L, K]")
    sweep = {name: arrays[f"tuning_{name}"] for name in ("mask_kernels", "mask_thresholds", "mask_counts")}
    for name, value in sweep.items():
        if value.dtype != (np.float64 if name == "mask_thresholds" else np.int64):
            raise ValueError(f"the mask sweep's {name[5:]} are {value.dtype}")
    return Threshold(record["image"], record["pixel"], source, scores, arrays["calibration_maxima"], distances,
                     valid, post, arrays["tuning_scores"], labels, record["pixel_tuned"], fold_rows.astype(np.int64),
                     **sweep)
