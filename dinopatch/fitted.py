"""What :meth:`DinoPatch.fit` learns, the checks it must pass, and its model-file form.

:class:`Fitted` is immutable: the detector swaps it whole.  :func:`check_params`
(the parameter table, :mod:`.params`) validates parameters at fit and at load, so a file that
would misjudge parts later (an edited threshold, a tolerance of 2^63, an
aligner for another frame size) fails at load with :class:`ModelFileError`.
The container (zip of arrays, checksum, signature) is :mod:`.modelfile`.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
from pathlib import Path

import numpy as np

from . import autotune, engine_choice, kernels, margin, modelfile, tolerance
from . import params as param_table
from ._version import __version__
from .align import Aligner
from .backbone import get_spec
from .bank import MemoryBank
from .calibration import METHODS, Threshold
from .drift import Reference
from .foreground import Foreground
from .golden import GoldenSet
from .goodset import FitReport
from .modelfile import ModelFileError
from .nominal import finish
from .postprocess import PostProcess
from .result import PatchDistances, Result
from .update import GoodParts

# How to run, not what was fitted: these may differ between save and load.
RUNTIME_PARAMS = param_table.runtime_names()
# A threshold above every distance the bank can produce never flags a part: distances
# are at most |q| + |b|, and query tokens are normed like the bank's rows.
THRESHOLD_REACH = 4.0


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
        the auto record keeps only the choices not set here."""
        settings = dataclasses.asdict(dataclasses.replace(self.post, **post))
        return dataclasses.replace(self, params=dict(self.params, **settings), threshold=threshold,
                                   model_id="unsaved", auto=autotune.without(self.auto, settings))

    def align(self, images: list[np.ndarray]) -> list[tuple]:
        """Items ``(model, image, canonical, valid, alignment)`` for :meth:`patch_distances`, one per image."""
        return [(self, im, *self.aligner.transform(im)) for im in images]

    def patch_distances(self, items: list[tuple], engine, backend: str | None = None) -> list[PatchDistances]:
        """:class:`~.result.PatchDistances` of items from :meth:`align`."""
        dists = self.distances(engine, np.stack([c for _, _, c, _, _ in items]), backend)
        return [PatchDistances(d, valid, al, im.shape[:2], self) for (_, im, _, valid, al), d in zip(items, dists)]

    def distances(self, engine, frames: np.ndarray, backend: str | None = None) -> np.ndarray:
        """Patch distances ``[B, h, w]`` of canonical frames ``[B, S, S, 3]``, as this model scores them.

        Torch on a GPU and the cuda kernel: the kernel reads the tokens there, not through the host.
        """
        fg = self.foreground
        if fg is not None:
            tokens = fg.scatter(engine(frames, fg.positions))
        elif getattr(engine, "engine", None) == "torch" and str(engine.device).startswith("cuda") \
                and kernels.resolve(backend) == "cuda":
            tokens = engine(frames, on_device=True)
        else:
            tokens = engine(frames)
        return finish(self.bank.distances(tokens, backend=backend), fg, frames)


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


def save_detector(path: str | os.PathLike, model: Fitted, runtime: dict) -> tuple[Fitted, Path]:
    """Write ``model`` (with the run-time parameters in force) to ``path``; the model gets its id."""
    params = check_params(dict(model.params, **runtime))
    t = model.threshold
    header = {
        "dinopatch_version": __version__,
        "params": params,
        "threshold": {"image": t.image, "pixel": t.pixel, "source": t.source},
        "grid": list(model.bank.grid),
        "aligner": model.aligner.state_dict(),
        "weights_fingerprint": model.fingerprint,
        "graph": model.graph,
        "auto": model.auto,
        "fit_report": None if model.report is None else model.report.record(),
    }
    arrays = {"bank": model.bank.features, "calibration_scores": np.asarray(t.scores, np.float64),
              "calibration_maxima": np.asarray(t.maxima, np.float64),
              "calibration_distances": np.asarray(t.distances, np.float32)}
    if model.bank.global_features is not None:
        arrays["global_bank"] = model.bank.global_features
    if model.offsets is not None:
        arrays["tolerance_offsets"] = np.asarray(model.offsets, np.int64)
    if isinstance(model.bank.radius, np.ndarray):
        arrays["tolerance_map"] = model.bank.radius.astype(np.uint8)
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
    header["model_id"] = _content_id(header, arrays)
    path = modelfile.write(path, header, arrays)
    return dataclasses.replace(model, params=params, model_id=header["model_id"]), path


def _content_id(header: dict, arrays: dict) -> str:
    h = hashlib.sha256(json.dumps(header, sort_keys=True).encode())
    for name in sorted(arrays):
        h.update(name.encode())
        h.update(np.ascontiguousarray(arrays[name]).tobytes())
    return h.hexdigest()[:12]


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
        model = dataclasses.replace(model, threshold=Threshold.given(threshold))
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
        fg = Foreground.from_state(header["foreground"], arrays, (side, side))
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
            or aligner.size_tolerance != params["size_tolerance"]:
        raise ValueError(f"aligner for {aligner.size} px (enabled={aligner.enabled}, size_tolerance "
                         f"{aligner.size_tolerance:g}) does not fit image_size {params['image_size']} "
                         f"(align={params['align']}, size_tolerance {params['size_tolerance']:g})")
    if "polarity" in arrays:  # an older DinoPatch's: it turned token grids after the backbone
        raise ValueError("a token-grid polarity: written by a DinoPatch that settled the half turn after the "
                         "backbone, which this one does in the image; fit the model again")
    fingerprint = header["weights_fingerprint"]
    if not isinstance(fingerprint, str) or not re.fullmatch(r"[0-9a-f]{64}", fingerprint):
        raise ValueError(f"weights fingerprint missing or malformed ({fingerprint!r})")
    threshold = _threshold(header["threshold"], arrays, bank, side)
    model_id = header["model_id"]
    if not isinstance(model_id, str) or not re.fullmatch(r"[0-9a-f]{12}", model_id):
        raise ValueError(f"model id malformed ({model_id!r})")
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
    radius = _radius(chosen["tolerance"], arrays.get("tolerance_map"), offsets, side)
    rows = arrays.get("global_bank") if chosen["match"] != "local" else None
    if rows is not None and not np.isfinite(rows).all():
        raise ValueError("global bank holds non-finite values")
    membank = MemoryBank(bank, (side, side), radius, None if fg is None else fg.positions, chosen["match"], rows)
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
    return Fitted(params, aligner, membank, threshold, fingerprint, model_id, fg, graph, auto,
                  offsets, report, drift, gold, choice, good), params


def _radius(chosen, stored, offsets, side: int):
    """The bank's radius: the chosen one, or for ``"map"`` the map derived again from its evidence."""
    if not (isinstance(chosen, str) and chosen == "map"):
        if stored is not None:
            raise ValueError(f"a tolerance map in a model whose tolerance is {chosen!r}")
        return chosen
    if offsets is None or stored is None:
        raise ValueError("tolerance 'map' without its map or its evidence (tolerance_map, tolerance_offsets)")
    if stored.shape != (side * side,) or not np.isin(stored, tolerance.RADII).all():
        raise ValueError(f"tolerance map {stored.dtype}{list(stored.shape)} is not {side * side} values in "
                         f"{set(tolerance.RADII)}")
    derived = tolerance.tolerance_map(offsets, (side, side), side - 1)
    if (stored != derived).any():
        raise ValueError("the tolerance map disagrees with its evidence (tolerance_offsets): the file was edited")
    return derived


def _threshold(record: dict, arrays: dict, bank: np.ndarray, side: int) -> Threshold:
    source = record["source"]
    if not isinstance(source, dict) or source.get("method") not in METHODS:
        raise ValueError(f"threshold source {source!r} is not one of {METHODS}")
    # Files from before per-location masks have no held-out distances: their masks use the one pixel value.
    distances = arrays.get("calibration_distances", np.zeros((0, side, side), np.float32))
    if distances.size and distances.shape[1:] != (side, side):
        raise ValueError(f"held-out distances {list(distances.shape)} do not fit the [{side}, {side}] grid")
    t = Threshold(record["image"], record["pixel"], source, arrays["calibration_scores"],
                  arrays["calibration_maxima"], distances)
    # One location at a time: a float32 copy of a large fp16 bank would double its memory.
    reach = THRESHOLD_REACH * math.sqrt(max(float(np.einsum("kd,kd->k", rows, rows, dtype=np.float32).max())
                                            for rows in bank))
    grid_max = float(t.pixel_grid.max()) if t.pixel_grid is not None else 0.0
    for name, value in (("image", t.image), ("pixel", t.pixel), ("per-location mask", grid_max)):
        if value > reach:
            raise ValueError(f"{name} threshold {value:g} is beyond any distance this bank can produce "
                             f"(~{reach:.3g}): every part would pass")
    if source["method"] in ("leave-one-out", "k-fold", "held-out"):
        remeasured = t.at_false_alarm_rate(source["false_alarm_rate"])
        if not (math.isclose(remeasured.image, t.image) and math.isclose(remeasured.pixel, t.pixel)):
            raise ValueError(f"threshold {t.image:g} disagrees with its own calibration scores' conformal "
                             f"quantile ({remeasured.image:g}): the file was edited, or written before "
                             "thresholds were conformal (refit it)")
    return t
