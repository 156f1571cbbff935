"""The DinoPatch detector: fit on good parts, score new ones."""
from __future__ import annotations

import inspect
import math
import os
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from . import modelfile
from ._version import __version__
from .align import Aligner, Alignment
from .backbone import check_image_size, get_spec, make_backbone
from .bank import MemoryBank
from .data import load_images
from .postprocess import SCORES, anomaly_map, image_score, segment


@dataclass
class Result:
    """What :meth:`DinoPatch.predict` says about one image.

    Attributes:
        score: image anomaly score, higher = more anomalous (NaN when the image
            gave nothing to score; such a result is always an anomaly).
        anomaly_map: float32 ``[H, W]`` in the input image's frame.
        is_anomaly: ``score > threshold``, or a non-finite score, or an
            alignment that could not be trusted: a frame the detector cannot
            judge (no part in view, part cut by the border) never passes as good.
        aligned: False where alignment could not be trusted.
        mask: bool ``[H, W]`` defect pixels: map above the pixel threshold
            (the largest map value of held-out good parts), cleaned by morphology.
        alignment: the alignment diagnostics (angle, scale, reason, ...).
    """

    score: float
    anomaly_map: np.ndarray
    is_anomaly: bool
    aligned: bool
    mask: np.ndarray
    alignment: Alignment


@dataclass
class PatchDistances:
    """One image's nearest-neighbour distances before post-processing.

    Attributes:
        distances: float32 ``[h, w]`` per-patch distances, canonical frame.
        valid: float32 ``[S, S]`` validity of the canonical image.
        alignment: how the image was put into the canonical frame.
        shape: ``(H, W)`` of the input image.
    """

    distances: np.ndarray
    valid: np.ndarray
    alignment: Alignment
    shape: tuple[int, int]


class NotFittedError(RuntimeError):
    """``predict`` or ``save`` was called before ``fit``."""


class DinoPatch:
    """Anomaly detector from a per-location memory of DINOv2 patch features.

    Parameters are only stored here; :meth:`fit` checks them.

    Args:
        backbone: a key of :data:`dinopatch.backbone.BACKBONES`.
        weights: ``"pretrained"``, ``"random"`` (seeded) or a checkpoint path.
        image_size: backbone input side in pixels (multiple of 14); also the
            side of the canonical frame.
        align: align parts to a canonical pose; False for fixtured parts and
            flat textures.
        engine: ``"torch"``, ``"onnx"``, ``"onnx:int8"``, ``"onnx:fp16"``, a
            path to an ``.onnx`` export, or ``"auto"`` (see
            :func:`dinopatch.backbone.make_backbone`).
        kernel: distance kernel backend, ``"cuda"``, ``"cpp"``, ``"numba"``,
            ``"numpy"`` or ``"auto"``.
        seed: seeds random weights and the calibration split.
        layers: average the patch tokens of the last ``layers`` blocks.
        coreset_ratio: fraction of nominal rows kept per location.
        tolerance: spatial tolerance of the bank, in grid steps.
        bank_dtype: ``"float32"`` or ``"float16"`` bank storage.
        sigma: Gaussian smoothing of the map, in canonical-frame pixels.
        score: image score, one of ``max``, ``mean``, ``p99``, ``topk``.
        topk: fraction of pixels averaged by ``score="topk"``.
        morph_kernel: side of the opening/closing element of the defect mask.
        calibration: fraction of the nominal images held out while fitting to
            set the threshold (then added to the bank).
        false_alarm_rate: the threshold is the ``1 - false_alarm_rate``
            quantile of the held-out nominal scores (0: their maximum).
        mirror: parts can lie on either face (alignment resolves mirroring).
        batch_size: images per backbone call.
        progress: show progress bars.
    """

    def __init__(self, *, backbone="dinov2_vits14", weights="pretrained", image_size=448, align=True,
                 engine="auto", kernel="auto", seed=0, layers=1, coreset_ratio=1.0, tolerance=1,
                 bank_dtype="float32", sigma=4.0, score="max", topk=0.01, morph_kernel=5,
                 calibration=0.2, false_alarm_rate=0.0, mirror=False, batch_size=8, progress=True):
        self.backbone = backbone
        self.weights = weights
        self.image_size = image_size
        self.align = align
        self.engine = engine
        self.kernel = kernel
        self.seed = seed
        self.layers = layers
        self.coreset_ratio = coreset_ratio
        self.tolerance = tolerance
        self.bank_dtype = bank_dtype
        self.sigma = sigma
        self.score = score
        self.topk = topk
        self.morph_kernel = morph_kernel
        self.calibration = calibration
        self.false_alarm_rate = false_alarm_rate
        self.mirror = mirror
        self.batch_size = batch_size
        self.progress = progress
        self._backbone = None
        self._lock = threading.Lock()

    # The seed notebook's configuration: ViT-B/14 at 784 px, 56x56x768 tokens.
    @classmethod
    def seed(cls, **overrides) -> "DinoPatch":
        """The seed notebook's configuration (ViT-B/14 at 784 px, its post-processing)."""
        params = dict(backbone="dinov2_vitb14", image_size=784, layers=1, tolerance=1, sigma=4.0,
                      score="max", morph_kernel=5, coreset_ratio=1.0)
        params.update(overrides)
        return cls(**params)

    def get_params(self) -> dict:
        """Constructor parameters, as scikit-learn estimators expose them."""
        names = [p for p in inspect.signature(type(self).__init__).parameters if p != "self"]
        return {n: getattr(self, n) for n in names}

    # -- fitting ---------------------------------------------------------------

    def _check_params(self) -> None:
        check_image_size(self.image_size, get_spec(self.backbone).patch_size)
        if self.score not in SCORES:
            raise ValueError(f"score {self.score!r} must be one of {SCORES}")
        if self.bank_dtype not in ("float32", "float16"):
            raise ValueError(f"bank_dtype must be 'float32' or 'float16', got {self.bank_dtype!r}")
        if not 0.0 <= self.calibration < 1.0:
            raise ValueError(f"calibration must be in [0, 1), got {self.calibration}")
        if not 0.0 <= self.false_alarm_rate < 1.0:
            raise ValueError(f"false_alarm_rate must be in [0, 1), got {self.false_alarm_rate}")
        if int(self.batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")

    def _get_backbone(self):
        # Several threads may predict at once: build the backbone exactly once.
        with self._lock:
            if self._backbone is None:
                # A loaded detector insists on the weights its bank was fitted with.
                self._backbone = make_backbone(self.engine, getattr(self, "weights_fingerprint_", None),
                                               name=self.backbone, weights=self.weights,
                                               image_size=self.image_size, layers=self.layers, seed=self.seed)
        return self._backbone

    def fit(self, images) -> "DinoPatch":
        """Learn what good parts look like.

        Args:
            images: nominal images: uint8 ``[H, W]`` / ``[H, W, 3]`` BGR arrays
                or paths.

        Returns:
            self
        """
        self._check_params()
        images = load_images(images)
        if len(images) == 0:
            raise ValueError("fit needs at least one nominal image, got none")
        self.aligner_ = Aligner(size=self.image_size, enabled=self.align, mirror=self.mirror).fit(images)
        canon = [self.aligner_.transform(im) for im in images]
        tokens = self._embed([c[0] for c in canon], desc="fit: embedding")
        self.weights_fingerprint_ = self._get_backbone().fingerprint
        flips = np.zeros(len(images), bool)
        self.polarity_ = None
        if self.align:
            self.polarity_ = _polarity_reference(tokens)
            tokens, flips = _orient(tokens, self.polarity_)

        n_cal = int(math.floor(self.calibration * len(images)))
        if n_cal >= 1 and len(images) - n_cal >= 1:
            order = np.random.default_rng(self.seed).permutation(len(images))
            cal, train = order[:n_cal], order[n_cal:]
            self.memory_bank_ = self._make_bank(tokens[train])
            maps = [anomaly_map(d[::-1, ::-1] if flips[i] else d, canon[i][1], self.sigma)
                    for i, d in zip(cal, self._distances(tokens[cal]))]
            self.calibration_scores_ = np.array(
                [image_score(m, canon[i][1], self.score, self.topk) for i, m in zip(cal, maps)])
            q = 1.0 - self.false_alarm_rate
            self.threshold_ = float(np.quantile(self.calibration_scores_, q))
            self.pixel_threshold_ = float(np.quantile([image_score(m, canon[i][1], "max") for i, m in zip(cal, maps)], q))
        else:
            self.calibration_scores_ = np.zeros(0, np.float64)
            self.threshold_ = self.pixel_threshold_ = float("inf")
        # The held-out images join the bank: the threshold was set with a smaller
        # bank, so it errs on the side of fewer false alarms.
        self.memory_bank_ = self._make_bank(tokens)
        return self

    def _make_bank(self, tokens: np.ndarray) -> MemoryBank:
        return MemoryBank.fit(tokens, ratio=self.coreset_ratio, radius=self.tolerance,
                              dtype=np.dtype(self.bank_dtype), backend=self._kernel())

    def _kernel(self):
        return None if self.kernel == "auto" else self.kernel

    def _embed(self, canonical: list[np.ndarray], desc: str) -> np.ndarray:
        backbone = self._get_backbone()
        bs = int(self.batch_size)
        chunks = range(0, len(canonical), bs)
        out = [backbone(np.stack(canonical[i:i + bs]))
               for i in tqdm(chunks, desc=desc, disable=not self.progress or len(chunks) < 2, leave=False)]
        return np.concatenate(out)

    def _distances(self, tokens: np.ndarray) -> np.ndarray:
        return self.memory_bank_.distances(tokens, backend=self._kernel())

    # -- inference -------------------------------------------------------------

    @property
    def threshold(self) -> float:
        """Decision threshold on the image score; settable."""
        self._check_fitted()
        return self.threshold_

    @threshold.setter
    def threshold(self, value: float) -> None:
        self.threshold_ = float(value)

    def _check_fitted(self) -> None:
        if not hasattr(self, "memory_bank_"):
            raise NotFittedError("this DinoPatch is not fitted yet: call fit(images) or DinoPatch.load(path)")

    def predict(self, images) -> list[Result]:
        """Score images; one :class:`Result` per image, in order.

        Args:
            images: uint8 ``[H, W]`` / ``[H, W, 3]`` BGR arrays or paths, any size.
        """
        return [self.result_from(raw) for raw in self.patch_distances(images)]

    def patch_distances(self, images) -> list[PatchDistances]:
        """The per-patch distances of each image, before any post-processing.

        Evaluation sweeps post-processing settings over these without running
        the backbone again (see :meth:`result_from`).
        """
        self._check_fitted()
        images = load_images(images)
        bs = int(self.batch_size)
        out = []
        for i in range(0, len(images), bs):
            out.extend(self.distances_aligned(self.align_images(images[i:i + bs])))
        return out

    def align_images(self, images: list[np.ndarray]) -> list[tuple]:
        """First stage of :meth:`patch_distances`: each image in the canonical frame.

        Returns ``(image, (canonical, valid, alignment))`` per image; the stages
        are public so that :mod:`dinopatch.stream` can overlap them.
        """
        return [(im, self.aligner_.transform(im)) for im in images]

    def distances_aligned(self, batch: list[tuple]) -> list[PatchDistances]:
        """Second stage of :meth:`patch_distances`: backbone and bank on one batch from :meth:`align_images`."""
        images = [im for im, _ in batch]
        aligned = [a for _, a in batch]
        tokens = self._get_backbone()(np.stack([a[0] for a in aligned]))
        flips = np.zeros(len(images), bool)
        if self.polarity_ is not None:
            tokens, flips = _orient(tokens, self.polarity_)
        dists = self._distances(tokens)
        # A grid scored rotated goes back to its canonical image's orientation.
        return [PatchDistances(d[::-1, ::-1] if flip else d, valid, al, im.shape[:2])
                for im, (_, valid, al), d, flip in zip(images, aligned, dists, flips)]

    def result_from(self, raw: PatchDistances, *, threshold: float | None = None,
                    pixel_threshold: float | None = None, **post) -> Result:
        """Post-process one image's patch distances into a :class:`Result`.

        Args:
            raw: from :meth:`patch_distances`.
            threshold: image-score threshold (default: the detector's).
            pixel_threshold: map threshold of the defect mask (default: the detector's).
            **post: overrides of ``sigma``, ``score``, ``topk``, ``morph_kernel``.
        """
        unknown = set(post) - {"sigma", "score", "topk", "morph_kernel"}
        if unknown:
            raise TypeError(f"unknown post-processing settings {sorted(unknown)}")
        p = {k: post.get(k, getattr(self, k)) for k in ("sigma", "score", "topk", "morph_kernel")}
        thr = self.threshold_ if threshold is None else float(threshold)
        pix = self.pixel_threshold_ if pixel_threshold is None else float(pixel_threshold)
        amap = anomaly_map(raw.distances, raw.valid, p["sigma"])
        score = image_score(amap, raw.valid, p["score"], p["topk"])
        amap_in = self.aligner_.inverse_map(amap, raw.alignment, raw.shape)
        trusted = bool(raw.alignment.trusted)
        return Result(score=score, anomaly_map=amap_in, is_anomaly=not (score <= thr and trusted), aligned=trusted,
                      mask=segment(amap_in, pix, p["morph_kernel"]), alignment=raw.alignment)

    def score_images(self, images) -> np.ndarray:
        """Image scores as one float array (higher = more anomalous)."""
        return np.array([r.score for r in self.predict(images)], dtype=np.float64)

    def score_samples(self, images) -> np.ndarray:
        """scikit-learn's sign: the lower, the more abnormal (``-score``)."""
        return -self.score_images(images)

    def decision_function(self, images) -> np.ndarray:
        """``score_samples - offset_``: negative where the score is above the threshold.

        Scores only: ``Result.is_anomaly`` also flags frames whose alignment
        could not be trusted.
        """
        return self.score_samples(images) - self.offset_

    @property
    def offset_(self) -> float:
        return -self.threshold

    # -- persistence -----------------------------------------------------------

    def save(self, path: str | os.PathLike) -> Path:
        """Write the fitted detector to one model file (no pickle; see :mod:`dinopatch.modelfile`)."""
        self._check_fitted()
        params = self.get_params()
        params["weights"] = os.fspath(params["weights"])
        header = {
            "dinopatch_version": __version__,
            "params": params,
            "threshold": self.threshold_,
            "pixel_threshold": self.pixel_threshold_,
            "grid": list(self.memory_bank_.grid),
            "aligner": self.aligner_.state_dict(),
            "weights_fingerprint": self.weights_fingerprint_,
        }
        arrays = {"bank": self.memory_bank_.features,
                  "calibration_scores": np.asarray(self.calibration_scores_, np.float64)}
        if self.polarity_ is not None:
            arrays["polarity"] = self.polarity_
        return modelfile.write(path, header, arrays)

    @classmethod
    def load(cls, path: str | os.PathLike, **overrides) -> "DinoPatch":
        """A detector from a model file written by :meth:`save`.

        ``overrides`` replace run-time parameters (``engine``, ``kernel``,
        ``batch_size``, ``progress``), not what the bank was fitted with.
        """
        header, arrays = modelfile.read(path)
        runtime = {"engine", "kernel", "batch_size", "progress"}
        if set(overrides) - runtime:
            raise ValueError(f"only {sorted(runtime)} can be overridden on load, got {sorted(overrides)}")
        try:
            params = dict(header["params"], **overrides)
            det = cls(**params)
            det._check_params()
            spec = get_spec(det.backbone)
            grid = tuple(int(g) for g in header["grid"])
            bank = arrays["bank"]
            side = det.image_size // spec.patch_size
            if grid != (side, side) or bank.ndim != 3 or bank.shape[0] != side * side or bank.shape[2] != spec.embed_dim:
                raise modelfile.ModelFileError(
                    f"{path}: bank {bank.shape} on grid {grid} does not fit {det.backbone} at {det.image_size} px "
                    f"([{side * side}, K, {spec.embed_dim}] expected)")
            det.memory_bank_ = MemoryBank(bank, grid, det.tolerance)
            det.threshold_ = float(header["threshold"])
            det.pixel_threshold_ = float(header["pixel_threshold"])
            det.calibration_scores_ = arrays["calibration_scores"]
            det.aligner_ = Aligner.from_state_dict(header["aligner"])
            det.polarity_ = arrays.get("polarity")
            det.weights_fingerprint_ = header.get("weights_fingerprint")
            if det.align and (det.polarity_ is None or det.polarity_.shape != (side, spec.embed_dim)):
                raise modelfile.ModelFileError(f"{path}: polarity reference missing or of the wrong shape")
        except modelfile.ModelFileError:
            raise
        except (KeyError, TypeError, ValueError) as e:
            raise modelfile.ModelFileError(f"{path}: inconsistent model file ({type(e).__name__}: {e})") from None
        return det

    def __repr__(self) -> str:
        changed = {k: v for k, v in self.get_params().items()
                   if v != inspect.signature(type(self).__init__).parameters[k].default}
        return f"DinoPatch({', '.join(f'{k}={v!r}' for k, v in changed.items())})"


def _profile(tokens: np.ndarray) -> np.ndarray:
    """Token grids ``[B, h, w, D]`` -> their profile along the principal (horizontal) axis ``[B, w, D]``."""
    return tokens.mean(axis=1)


def _polarity_reference(tokens: np.ndarray, rounds: int = 3) -> np.ndarray:
    """The nominal profile along the principal axis, each sample in its better orientation.

    Image-level alignment resolves the 180-degree ambiguity from the silhouette;
    this settles the cases it cannot (near-symmetric outlines) from features.
    """
    prof = _profile(tokens)
    ref = prof.mean(axis=0)
    for _ in range(rounds):
        flip = _flip_better(prof, ref)
        ref = np.where(flip[:, None, None], prof[:, ::-1], prof).mean(axis=0)
    return ref.astype(np.float32)


def _flip_better(prof: np.ndarray, ref: np.ndarray) -> np.ndarray:
    keep = ((prof - ref) ** 2).sum(axis=(1, 2))
    flip = ((prof[:, ::-1] - ref) ** 2).sum(axis=(1, 2))
    return flip < keep


def _orient(tokens: np.ndarray, ref: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rotate by 180 degrees each token grid that matches the reference better so."""
    flip = _flip_better(_profile(tokens), ref)
    out = tokens.copy()
    out[flip] = tokens[flip][:, ::-1, ::-1]
    return out, flip
