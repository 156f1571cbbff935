"""The foreground region's margin, chosen at fit by measuring it on the good parts.

The region (:func:`.foreground.region`) is the union of the aligned good parts'
silhouettes, dilated by a margin of whole patches for the pose noise of new
parts and for defects just outside the outline.  Every patch dropped is
backbone time saved, but a margin too tight takes away context a token's
attention used, or the place an edge defect shows.  So fit builds the nominal
set on the region at each margin of :data:`.foreground.MARGINS` it needs, and
measures with the documented default settings (:func:`.autotune.defaults`):

* the **golden verdicts**: the golden frames (:func:`.golden.make_frames`,
  blends of neighbouring good frames and the same with a pasted defect, so
  each frame's right verdict is known) scored against a bank of every good
  part, judged at that region's held-out threshold (the largest held-out score
  of the good parts, the default threshold);
* the **held-out separation**: defects pasted into good frames
  (:func:`.autotune.pasted_defects`) against the good frames, each scored by a
  bank of the folds without it, image AUROC.

The widest margin is the reference.  The margin is the narrowest that flips
none of the reference's right golden verdicts (a good frame it passes stays
passed, a defect it catches stays caught; where the reference itself is wrong,
the frame shows nothing about what the narrower region lost) and whose held-out
AUROC is not worse: in fewer than ``1 - ALPHA`` of :data:`.autotune.RESAMPLES` paired,
stratified bootstrap resamples of the same images is the reference's AUROC
above it (a tie is not worse, and the narrower region, being faster, keeps
it).  The margins are measured from the narrowest up after the reference; the
first that qualifies ends the search.  Without a qualifying one the reference
is used.

The record (the model file's ``foreground.margin``) holds which golden frames
carry a defect and, per margin measured, its patch count, golden verdicts, AUROC
and the share of resamples in which the reference beat it; :func:`check_record`
derives the choice from it again on load.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from . import golden, metrics
from .autotune import ALPHA, RESAMPLES, pasted_defects
from .foreground import MARGINS, plan
from .nominal import NominalSet, finish
from .postprocess import PostProcess

_KEYS = {"margin", "patches", "verdicts", "auroc", "worse_share"}


def nominal_set(placed: list, aligner, engine, params: dict, settings: dict, kernel: str | None) -> NominalSet:
    """The nominal set fit goes on with: on the region whose margin the evidence chooses, or on every patch.

    Args:
        placed: the nominal images' :class:`~.align.Placement` by ``aligner``.
        params: the detector's checked parameters (``foreground``, ``seed``, ``batch_size``, ``progress``).
        settings: bank and post-processing settings the evidence is measured with (defaults for "auto").
    """
    regions = plan(params["foreground"], aligner, placed, engine.grid)
    build = dict(seed=params["seed"], batch_size=params["batch_size"], kernel=kernel, progress=params["progress"])
    if regions is None:
        return NominalSet.build([aligner.transform(p) for p in placed], aligner, engine, **build)
    aligner = aligner.padded("background")
    canon = [aligner.transform(p) for p in placed]
    frames, valid, defect = golden.make_frames(canon, int(params["seed"]))
    defect = [bool(d) for d in defect]
    pasted, origin = pasted_defects(np.stack([c[0] for c in canon]), np.stack([c[1] for c in canon]),
                                    np.random.default_rng([params["seed"], 3]))
    post = PostProcess(settings["sigma"], settings["score"], settings["topk"], settings["morph_kernel"])

    def measured(m: int) -> tuple[NominalSet, dict, np.ndarray]:
        nominal = NominalSet.build(canon, aligner, engine, positions=regions[m], **build)
        good, defect = nominal.held_out(settings, extra=nominal.queries(pasted, origin))
        scores = np.array([post.score_map(d, nominal.valid[i])[1] for i, d in enumerate(good)]
                          + [post.score_map(d, nominal.valid[j])[1] for d, j in zip(defect, origin)])
        y = np.r_[np.zeros(len(good), bool), np.ones(len(defect), bool)]
        bank = nominal.bank(settings)
        tokens = nominal.queries(list(frames), np.zeros(len(frames), int)).tokens
        gold = golden.scores(post, finish(bank.distances(tokens, kernel), nominal.foreground, frames, valid), valid)
        ok = np.isfinite(scores)  # a frame with nothing valid to score ties in the bootstrap, as in auto
        auroc = metrics.auroc(y[ok], scores[ok]) if ok[y].any() and ok[~y].any() else float("nan")
        row = {"margin": m, "patches": len(regions[m]),
               "verdicts": [bool(v) for v in gold > np.max(scores[~y & ok], initial=-np.inf)],
               "auroc": round(auroc, 4) if np.isfinite(auroc) else None, "worse_share": None}
        return nominal, row, scores

    widest = MARGINS[-1]
    chosen, ref_row, ref_scores = measured(widest)
    y = np.r_[np.zeros(len(canon), bool), np.ones(len(pasted), bool)]
    rows = [ref_row]
    for m in MARGINS[:-1]:
        nominal, row, scores = measured(m)
        boot = metrics.bootstrap_aurocs(y, [ref_scores, scores], RESAMPLES, np.random.default_rng([params["seed"], 4]))
        row["worse_share"] = round(float(np.mean(boot[0] > boot[1])), 4)
        rows.append(row)
        if _qualifies(row, ref_row, defect):
            chosen = nominal
            break
    record = {"reference": widest, "alpha": ALPHA, "resamples": RESAMPLES, "defect": defect,
              "chosen": choose(rows, defect), "candidates": rows}
    return dataclasses.replace(chosen, foreground=dataclasses.replace(chosen.foreground, margin=record))


def flips(row: dict, reference: dict, defect: list[bool]) -> tuple[int, int]:
    """Golden verdicts of ``row`` that differ from the reference's: ``(where the reference was right, where
    it was wrong)``."""
    pairs = [(r == d, r != c) for r, c, d in zip(reference["verdicts"], row["verdicts"], defect)]
    return sum(right and f for right, f in pairs), sum(not right and f for right, f in pairs)


def _qualifies(row: dict, reference: dict, defect: list[bool]) -> bool:
    return flips(row, reference, defect)[0] == 0 and row["worse_share"] < 1 - ALPHA


def choose(rows: list[dict], defect: list[bool]) -> int:
    """The margin the rows give: the narrowest (after the reference, the first row) that qualifies, else the
    reference's; ``defect``: which golden frames carry a defect."""
    return next((r["margin"] for r in rows[1:] if _qualifies(r, rows[0], defect)), rows[0]["margin"])


def check_record(record, patches: int) -> dict:
    """A model file's margin record, checked against its own evidence and the region's ``patches``
    (never executed).

    Raises:
        ValueError: malformed, or its choice is not the one its evidence gives (the file was edited).
    """
    if record is None:
        raise ValueError("a foreground region without the evidence its margin was chosen on")
    if not isinstance(record, dict) \
            or set(record) != {"reference", "alpha", "resamples", "defect", "chosen", "candidates"} \
            or record["reference"] != MARGINS[-1] or record["alpha"] != ALPHA or record["resamples"] != RESAMPLES:
        raise ValueError(f"margin record malformed or not this version's: {record!r:.200}")
    rows, defect = record["candidates"], record["defect"]
    if not isinstance(defect, list) or not defect or not all(isinstance(d, bool) for d in defect):
        raise ValueError(f"margin record's golden labels malformed: {defect!r:.200}")
    if not isinstance(rows, list) or not rows or not all(isinstance(r, dict) and set(r) == _KEYS for r in rows):
        raise ValueError("margin record's candidates malformed")
    for i, r in enumerate(rows):
        share, auroc = r["worse_share"], r["auroc"]
        if not (isinstance(r["patches"], int) and not isinstance(r["patches"], bool) and r["patches"] > 0
                and isinstance(r["verdicts"], list) and len(r["verdicts"]) == len(defect)
                and all(isinstance(v, bool) for v in r["verdicts"])
                and (auroc is None or isinstance(auroc, (int, float)) and not isinstance(auroc, bool)
                     and 0 <= auroc <= 1)
                and ((share is None) if i == 0 else
                     isinstance(share, (int, float)) and not isinstance(share, bool) and 0 <= share <= 1)):
            raise ValueError(f"margin record's candidate malformed: {r!r:.200}")
    margins = [r["margin"] for r in rows]
    chosen = choose(rows, defect)
    narrower = MARGINS[:-1] if chosen == MARGINS[-1] else MARGINS[:MARGINS.index(chosen) + 1]
    searched = [MARGINS[-1], *narrower]
    if margins != searched:
        raise ValueError(f"margin record measured margins {margins}, not the search {searched} its evidence makes")
    if record["chosen"] != chosen:
        raise ValueError(f"margin record chose {record['chosen']!r} but its evidence gives {chosen}: "
                         "the file was edited")
    sizes = [rows[margins.index(m)]["patches"] for m in sorted(margins)]
    if sizes != sorted(sizes) or rows[margins.index(chosen)]["patches"] != patches:
        raise ValueError(f"margin record's patch counts {sizes} do not fit the region of {patches} patches")
    return record


def describe(fg) -> str:
    """A line a person reads about a :class:`~.foreground.Foreground`: the region's size and why its margin."""
    record, patches, total = fg.margin, len(fg.positions), fg.grid[0] * fg.grid[1]
    rows = {r["margin"]: r for r in record["candidates"]}
    ref, got = rows[record["reference"]], rows[record["chosen"]]
    if got is ref:
        return (f"foreground: {patches} of {total} patches, margin {ref['margin']} (the widest: no narrower "
                f"margin kept its right golden verdicts and its held-out AUROC {_auc(ref)})")
    _, freed = flips(got, ref, record["defect"])
    return (f"foreground: {patches} of {total} patches, margin {got['margin']}: every right golden verdict of "
            f"margin {ref['margin']} ({ref['patches']} patches) kept ({freed} of its wrong ones differ), held-out "
            f"AUROC {_auc(got)} against {_auc(ref)} (the wider is better in "
            f"{got['worse_share']:.0%} of resamples)")


def _auc(row: dict) -> str:
    return "n/a" if row["auroc"] is None else f"{row['auroc']:.3f}"
