"""Update: operator-confirmed good parts join a fitted model, and the model file says so.

A model file keeps the good parts it was made of (:class:`GoodParts`: their
pixels as read, their names, one SHA-256 per part).  :meth:`DinoPatch.update`
judges the new parts with the current model first: a part it scores as a clear
defect (:func:`refusals`) is refused unless forced.  Then the model is fitted
again on the kept parts followed by the new ones, with the same parameters and
seed, through the same path as :meth:`DinoPatch.fit`: the aligner's pose
statistics, the good-set check, the bank (its coreset chosen again on the
union), every ``"auto"`` with its evidence, the threshold and the drift
reference are all measured on the enlarged good set, so an update gives the
model a fit on the union gives.  The price is the fit's: every kept part is
embedded again.

The new model records its lineage (:data:`LINEAGE_KEYS`): per update, the
parent's model id, how many parts were added and how many the check kept, the
SHA-256 of each added part's pixels, the parts forced in, and when (UTC).
Load checks every entry's form and that the last update's kept parts are among
the parts the file holds.
"""
from __future__ import annotations

import dataclasses
import hashlib
import re
from datetime import datetime, timezone

import numpy as np

from . import goodset

LINEAGE_KEYS = ("parent", "added", "kept", "sha256", "forced", "time")
_HEX64 = re.compile(r"[0-9a-f]{64}")
_PARENT = re.compile(r"[0-9a-f]{12}|unsaved")


def part_hash(image: np.ndarray) -> str:
    """SHA-256 of one part's pixels as read (uint8 ``[H, W]`` / ``[H, W, 3]``), shape included: the same
    part given as a file or as an array hashes alike."""
    h = hashlib.sha256(repr(image.shape).encode())
    h.update(np.ascontiguousarray(image, np.uint8).tobytes())
    return h.hexdigest()


@dataclasses.dataclass(frozen=True)
class GoodParts:
    """The good parts a model was made of, in fit order, and how they came to be.

    Attributes:
        images: uint8 ``[H, W]`` / ``[H, W, 3]`` arrays, every part fit was given, those its good-set check
            left out included: with more parts, the check may judge them otherwise.
        names: each part's name (its path, or ``#index``).
        lineage: one dict of :data:`LINEAGE_KEYS` per update, oldest first; empty after a fit.
    """

    images: tuple
    names: tuple
    lineage: tuple = ()

    @classmethod
    def of(cls, images: list[np.ndarray], names: list[str]) -> "GoodParts":
        """A good set as given to fit (``names`` may be empty: ``#index`` then)."""
        return cls(tuple(images), tuple(names) if names else tuple(f"#{i}" for i in range(len(images))))

    @property
    def hashes(self) -> list[str]:
        return [part_hash(im) for im in self.images]

    def state(self) -> tuple[dict, dict]:
        """``(header entry, arrays)`` for the model file: the pixels as one flat uint8 array."""
        header = {"names": list(self.names), "shapes": [list(im.shape) for im in self.images],
                  "sha256": self.hashes, "lineage": [dict(e) for e in self.lineage]}
        pixels = np.concatenate([im.ravel() for im in self.images]) if self.images else np.zeros(0, np.uint8)
        return header, {"good_pixels": pixels}

    @classmethod
    def from_state(cls, header, arrays: dict, kept: list[int] | None) -> "GoodParts | None":
        """The parts of a model file, checked: shapes, sizes, every part's hash, and the last update's
        entry against the parts it added (the last ones) and ``kept``, the indices the fit report kept
        (None: all); None where the file keeps none (written before update).

        Raises:
            ValueError: malformed, or a part or the lineage disagrees with what the file holds.
        """
        if header is None:
            if "good_pixels" in arrays:
                raise ValueError("good parts' pixels without their record")
            return None
        if not isinstance(header, dict) or set(header) != {"names", "shapes", "sha256", "lineage"}:
            raise ValueError(f"good parts record malformed: {header!r:.200}")
        names, shapes, hashes = header["names"], header["shapes"], header["sha256"]
        if not (isinstance(names, list) and isinstance(shapes, list) and isinstance(hashes, list)) \
                or not len(names) == len(shapes) == len(hashes) >= 1:
            raise ValueError("good parts' names, shapes and hashes are not lists of one length")
        if not all(isinstance(n, str) for n in names):
            raise ValueError("good parts' names are not strings")
        if not all(isinstance(s, list) and len(s) in (2, 3) and (len(s) == 2 or s[2] == 3)
                   and all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in s) for s in shapes):
            raise ValueError("good parts' shapes are not [H, W] or [H, W, 3]")
        pixels = arrays.get("good_pixels")
        sizes = [int(np.prod(s)) for s in shapes]
        if pixels is None or pixels.dtype != np.uint8 or pixels.ndim != 1 or pixels.size != sum(sizes):
            raise ValueError(f"good parts' pixels missing or not uint8[{sum(sizes)}]")
        ends = np.cumsum(sizes)
        images = tuple(pixels[e - n:e].reshape(s) for e, n, s in zip(ends, sizes, shapes))
        parts = cls(images, tuple(names), _lineage(header["lineage"]))
        if parts.hashes != hashes:
            raise ValueError("a good part's pixels disagree with its recorded SHA-256: the file was edited")
        if parts.lineage:
            last = parts.lineage[-1]
            first = len(hashes) - last["added"]
            if first < 0 or hashes[first:] != last["sha256"]:
                raise ValueError("the last update's hashes are not those of the file's last parts: the file was edited")
            if sum(i >= first for i in (range(len(hashes)) if kept is None else kept)) != last["kept"]:
                raise ValueError(f"the last update says the check kept {last['kept']} of its parts, the fit report "
                                 "says otherwise: the file was edited")
        return parts

    def updated(self, parent_id: str, added: int, forced: list[str], refit: "GoodParts", kept: list[int],
                when: datetime | None = None) -> "GoodParts":
        """The parts of ``refit`` (fitted on this record's parts then ``added`` new ones; ``kept``: the indices
        its good-set check kept) with this record's lineage and one entry for the update appended."""
        first = len(refit.images) - added
        entry = {"parent": parent_id, "added": added, "kept": sum(i >= first for i in kept),
                 "sha256": refit.hashes[first:],
                 "forced": list(forced),
                 "time": (when or datetime.now(timezone.utc)).strftime("%Y-%m-%dT%H:%M:%SZ")}
        return dataclasses.replace(refit, lineage=self.lineage + (entry,))


def with_lineage(parent, model, added: int, forced: list[str]):
    """``model`` (a :class:`~.fitted.Fitted` refitted on ``parent``'s parts then ``added`` new ones) with
    ``parent``'s lineage and one entry for this update."""
    good = parent.good.updated(parent.model_id, added, forced, model.good, model.report.kept())
    return dataclasses.replace(model, good=good)


def _lineage(entries) -> tuple:
    if not isinstance(entries, list):
        raise ValueError("lineage is not a list")
    for e in entries:
        if not isinstance(e, dict) or set(e) != set(LINEAGE_KEYS):
            raise ValueError(f"lineage entry malformed: {e!r:.200}")
        if not isinstance(e["parent"], str) or not _PARENT.fullmatch(e["parent"]):
            raise ValueError(f"lineage parent id malformed ({e['parent']!r})")
        counts = (e["added"], e["kept"])
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in counts) or not 0 <= e["kept"] <= e["added"]:
            raise ValueError(f"lineage counts {counts!r} are not 0 <= kept <= added")
        if not isinstance(e["sha256"], list) or len(e["sha256"]) != e["added"] \
                or not all(isinstance(h, str) and _HEX64.fullmatch(h) for h in e["sha256"]):
            raise ValueError("lineage hashes are not one SHA-256 per added part")
        if not isinstance(e["forced"], list) or not all(isinstance(n, str) for n in e["forced"]):
            raise ValueError("lineage forced parts are not names")
        try:
            datetime.strptime(e["time"], "%Y-%m-%dT%H:%M:%SZ")
        except (TypeError, ValueError):
            raise ValueError(f"lineage time {e['time']!r} is not UTC ISO 8601 (YYYY-MM-DDTHH:MM:SSZ)") from None
    return tuple(dict(e) for e in entries)


def refusals(results: list, names: list[str], threshold) -> list[tuple[str, str]]:
    """``(name, reason)`` for each part the current model scores as a clear defect.

    A flagged part is what an operator confirms as good (a false alarm), and at ``false_alarm_rate=0`` every
    flagged part has the smallest p-value, so neither is enough: refused are the parts the model cannot
    place or score, and flagged parts whose score is above every one of ``threshold``'s calibration scores
    (the smallest p-value) and beyond what the good-set check lets a good part have among them
    (:func:`.goodset.outlier_limit`, from :data:`.goodset.MIN_IMAGES` scores on: the limit at which fit
    names a good image whose whole map is raised; the scores alone do not say where a part differs).
    """
    scores = np.asarray(threshold.scores, float)
    limit = float(scores.max()) if scores.size else -np.inf
    if scores.size >= goodset.MIN_IMAGES:
        limit = max(limit, goodset.outlier_limit(list(scores)))
    out = []
    for name, r in zip(names, results):
        if not r.aligned:
            out.append((name, f"the model cannot place it ({r.alignment.reason or 'pose not trusted'})"))
        elif not np.isfinite(r.score):
            out.append((name, "it gives nothing to score"))
        elif r.is_anomaly and r.score > limit:
            out.append((name, f"scored {r.score:.4g}, above the threshold {r.threshold:.4g} and beyond "
                              f"{limit:.4g}, the most a good part may score among the model's good parts"))
    return out


def union(det, images, force: bool) -> tuple[list[np.ndarray], list[str], list[np.ndarray], list[str]]:
    """The union to fit on, after the current model judged the new parts.

    Returns:
        ``(images, names, added, forced names)``: the model's parts then the ``added`` new ones.

    Raises:
        ValueError: the model keeps no good parts, or a new part is a clear defect and ``force`` is False.
    """
    good = det.model_.good
    if good is None:
        raise ValueError("this model keeps no good parts (fitted with keep_parts=False, or written before update "
                         "existed): fit it again on its good parts and the new ones")
    new, names = goodset.load_named(images)
    names = names or [f"#{i}" for i in range(len(new))]
    refused = refusals(det.predict(new), names, det.model_.threshold)
    if refused and not force:
        raise ValueError("the current model scores these parts as clear defects; update refuses them:\n  "
                         + "\n  ".join(f"{n}: {why}" for n, why in refused)
                         + "\nif an operator confirmed them good, update with force=True (--force)")
    forced = [n for n, _ in refused]
    return list(good.images) + new, list(good.names) + names, len(new), forced
