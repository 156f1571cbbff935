"""A coreset bank carries the good parts' tokens it was chosen from: its rows, its held-out folds' rows and the
held-out maps are derived again from them at load, and a consistent edit of any is refused by name."""
import numpy as np
import pytest
from conftest import FAST, edited_copy, screws

from dinopatch import DinoPatch, coreset
from dinopatch.modelfile import ModelFileError

CONFIGS = {"local": dict(coreset_ratio=0.5), "region": dict(coreset_ratio=0.3, foreground=True, outliers="keep"),
           "global16": dict(coreset_ratio=0.5, match="local+global", bank_dtype="float16"),
           "held-out": dict(coreset_ratio=0.4, calibration=0.5)}


@pytest.fixture(scope="module", params=list(CONFIGS))
def saved(request, tmp_path_factory):
    det = DinoPatch(**dict(FAST, **CONFIGS[request.param])).fit(screws("good", 8, seed=1))
    return det, det.save(tmp_path_factory.mktemp("coreset") / "m.npz")


def _load(path, tmp_path, edit):
    return DinoPatch.load(edited_copy(path, tmp_path / "edited.npz", edit, golden=True))


def _scaled(factor, pixel=True):
    """Held-out maps, scores, maxima and threshold scaled together: what loaded before the coreset's evidence
    (the mask threshold too, unless an evaluation tuned it)."""
    def edit(header, arrays):
        t = header["threshold"]
        t.update(image=t["image"] * factor, pixel=t["pixel"] * (factor if pixel else 1.0))
        for name in ("calibration_scores", "calibration_maxima", "calibration_distances"):
            arrays[name] = (arrays[name] * factor).astype(arrays[name].dtype)
    return edit


def test_a_coreset_model_loads_as_saved_and_predicts_with_the_coreset(saved):
    det, path = saved
    loaded = DinoPatch.load(path)
    assert loaded.model_id == det.model_id
    n, k = loaded.model_.report.used, loaded.model_.bank.size
    assert k < n and loaded.model_.coreset.tokens.shape[1] == n  # evidence of all n, the bank of k
    assert loaded.model_.coreset.tokens.dtype == np.float16
    good = screws("good", 2, seed=5)
    assert [r.score for r in loaded.predict(good)] == pytest.approx([r.score for r in det.predict(good)], rel=1e-6)


def test_held_out_maps_scaled_with_the_threshold_are_refused(saved, tmp_path):
    _, path = saved
    for factor in (1.05, 3.0):
        with pytest.raises(ModelFileError, match="held-out distance .* is not (its distance to the bank's other "
                                                 "parts|the background term its samples give)"):
            _load(path, tmp_path, _scaled(factor))


def test_a_bank_row_that_is_not_k_centers_pick_is_refused(saved, tmp_path):
    _, path = saved

    def swap(header, arrays):
        rows, tokens = arrays["coreset_rows"].copy(), arrays["coreset_tokens"].astype(np.float32)
        at = int(np.argmax(tokens.var(axis=1).sum(-1)))  # where the parts differ most (not a uniform background)
        left = np.setdiff1d(np.arange(tokens.shape[1]), rows[at])
        # The left-out token nearest the first pick: the last one greedy k-center would take.
        other = left[np.argmin(np.linalg.norm(tokens[at, left] - tokens[at, rows[at, 0]], axis=-1))]
        rows[at, -1] = other
        bank = arrays["bank"].copy()
        bank[at, -1] = tokens[at, other].astype(bank.dtype)
        arrays.update(coreset_rows=rows, bank=bank)
        if "global_bank" in arrays:
            arrays["global_bank"] = bank.reshape(-1, bank.shape[2])

    with pytest.raises(ModelFileError, match="the bank's coreset at location \\d+ is not what greedy k-center picks"):
        _load(path, tmp_path, swap)
    with pytest.raises(ModelFileError, match="bank row 1 at location 2 is not good part"):
        _load(path, tmp_path, lambda h, a: a.update(bank=_nudged(a["bank"], (2, 1))))


def _nudged(values, at):
    values = values.copy()
    values[at] *= 1.5
    return values


def test_a_folds_rows_that_are_not_k_centers_picks_are_refused(saved, tmp_path):
    _, path = saved

    def reversed_picks(header, arrays):
        rows = arrays["calibration_fold_rows"].copy()
        at = int(np.argmax(arrays["coreset_tokens"].astype(np.float32).var(axis=1).sum(-1)))
        rows[at, :2] = rows[at, 1::-1]  # the first fold's first two picks swapped: not the greedy trace
        arrays["calibration_fold_rows"] = rows

    with pytest.raises(ModelFileError, match="a held-out fold's (coreset at location \\d+ is not what greedy "
                                             "k-center picks|bank without a coreset is not its parts in order)"):
        _load(path, tmp_path, reversed_picks)


def test_missing_or_malformed_evidence_is_refused(saved, tmp_path):
    _, path = saved
    with pytest.raises(ModelFileError, match="a coreset bank .* without its evidence"):
        _load(path, tmp_path, lambda h, a: a.pop("coreset_tokens"))
    with pytest.raises(ModelFileError, match="coreset tokens float32"):
        _load(path, tmp_path, lambda h, a: a.update(coreset_tokens=a["coreset_tokens"].astype(np.float32)))
    with pytest.raises(ModelFileError, match="coreset tokens hold non-finite values"):
        _load(path, tmp_path, lambda h, a: a.update(coreset_tokens=_nudged(a["coreset_tokens"], (0, 0, 0)) * np.inf))
    with pytest.raises(ModelFileError, match="coreset rows name parts outside"):
        _load(path, tmp_path, lambda h, a: a.update(coreset_rows=a["coreset_rows"] + 100))
    with pytest.raises(ModelFileError, match="coreset ratio 0.9 of 8 good parts keeps 8"):
        _load(path, tmp_path, lambda h, a: h["params"].update(coreset_ratio=0.9))


def test_the_background_checks_worst_distances_follow_from_the_coreset_evidence(tmp_path):
    det = DinoPatch(**dict(FAST, **CONFIGS["region"])).fit(screws("good", 8, seed=1))
    path = det.save(tmp_path / "m.npz")
    with pytest.raises(ModelFileError, match="background check's worst distance"):
        _load(path, tmp_path, lambda h, a: a.update(background_worst=a["background_worst"] * 0.5))


def test_check_trace_takes_any_pick_of_a_tie_and_refuses_another():
    x = np.array([[[0.0, 0.0], [1.0, 0.0], [-1.0, 0.0], [0.2, 0.0]]], np.float16)
    coreset.check_trace(x, np.array([[0, 1]]), "picks")
    coreset.check_trace(x, np.array([[0, 2]]), "picks")  # as far as 1: a tie
    with pytest.raises(ValueError, match="picks at location 0 is not what greedy k-center picks"):
        coreset.check_trace(x, np.array([[0, 3]]), "picks")
    with pytest.raises(ValueError, match="picks at location 0"):
        coreset.check_trace(x, np.array([[1, 2]]), "picks")  # the first pick is the token nearest the mean


def test_a_coreset_model_tuned_by_an_evaluation_keeps_its_evidence(tmp_path):
    """Threshold "good" keeps the calibrated threshold, read with the tuned settings: its held-out maps are still
    derived from the coreset's evidence."""
    from dinopatch.data import MVTecFolder
    from dinopatch.evaluate import evaluate
    from dinopatch.synthetic import synthesize

    folder = MVTecFolder(synthesize("screw", tmp_path / "screw", n_train=6, n_test_good=4, n_test_defect=2, size=128,
                                    seed=1))
    det = DinoPatch(**dict(FAST, coreset_ratio=0.5)).fit(folder.train_paths())
    m = evaluate(det, folder, tmp_path / "r", threshold="good", progress=False, save_model=tmp_path / "t.npz")
    tuned = DinoPatch.load(m["saved_model"])
    assert tuned.model_.coreset is not None and tuned.threshold_.fold_rows.size and tuned.threshold_.pixel_tuned
    with pytest.raises(ModelFileError, match="held-out distance"):
        _load(m["saved_model"], tmp_path, _scaled(2.0, pixel=False))


def test_global_rows_are_the_banks_rows_where_they_are_few_enough_to_be_all(tmp_path):
    det = DinoPatch(**dict(FAST, match="local+global")).fit(screws("good", 6, seed=1))
    path = det.save(tmp_path / "m.npz")
    assert DinoPatch.load(path).model_id == det.model_id
    with pytest.raises(ModelFileError, match="global rows \\[384, 384\\] are not the bank's 384 rows"):
        _load(path, tmp_path, lambda h, a: a.update(global_bank=a["global_bank"] * np.float32(1.5)))
