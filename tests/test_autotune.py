"""Settings chosen from good parts alone (dinopatch.autotune) and the global bank, end to end."""
import json

import cv2
import numpy as np
import pytest
from conftest import FAST, SEED_SETTINGS, screws

from dinopatch import DinoPatch, autotune, modelfile
from dinopatch.bank import MemoryBank
from dinopatch.modelfile import ModelFileError

AUTO = dict(tolerance="auto", sigma="auto", score="auto")
DEFAULTS = {k: v for k, v in FAST.items() if k not in SEED_SETTINGS}  # the constructor's "auto"


def _det(**kwargs) -> DinoPatch:
    return DinoPatch(**dict(FAST, **kwargs))


def _pattern(seed: int = 3, side: int = 200) -> np.ndarray:
    """A fixed part: coarse random blocks, so every patch of the grid looks different from its neighbours."""
    rng = np.random.default_rng(seed)
    return cv2.resize(rng.integers(0, 256, (side // 25, side // 25, 3), dtype=np.uint8), (side, side),
                      interpolation=cv2.INTER_NEAREST)


def _parts(n: int, shift: int, seed: int = 0) -> list[np.ndarray]:
    """``n`` copies of the part with sensor noise, each moved by up to ``shift`` pixels each way."""
    rng = np.random.default_rng(seed)
    base, out = _pattern(), []
    for _ in range(n):
        dy, dx = rng.integers(-shift, shift + 1, 2) if shift else (0, 0)
        noisy = base.astype(np.int16) + rng.integers(-6, 7, base.shape)
        out.append(np.roll(np.clip(noisy, 0, 255).astype(np.uint8), (int(dy), int(dx)), axis=(0, 1)))
    return out


@pytest.fixture(scope="module")
def auto_screws():
    """Fitted once with every parameter "auto" on good screws (aligned, foreground on)."""
    return DinoPatch(**DEFAULTS, match="auto", foreground=True).fit(screws("good", 6, seed=1))


@pytest.fixture(scope="module")
def jittered():
    """Parts moved by up to 40 px of 200: a grid step is 25 px of the part at 112 px, so 1-2 steps."""
    images = _parts(6, 40)
    return images, _det(align=False, tolerance="auto").fit(images)


def test_tolerance_zero_on_aligned_parts_and_above_on_jittered_ones(jittered):
    still = _det(align=False, tolerance="auto").fit(_parts(6, 0))
    moved = jittered[1]
    assert still.auto_["evidence"]["offset_share"][0] > 0.95
    assert still.auto_["chosen"] == {"tolerance": 0} and still.model_.bank.tolerance == 0
    assert moved.auto_["evidence"]["offset_share"][0] < 0.9
    chosen, steps = moved.auto_["chosen"]["tolerance"], moved.model_.bank.tolerance
    if chosen == "map":  # the incumbent where locations differ: a tolerance for each, above zero where parts moved
        assert isinstance(steps, np.ndarray) and steps.max() > 0
    else:
        assert chosen > 0 and steps == chosen
    assert still.get_params()["tolerance"] == moved.get_params()["tolerance"] == "auto"


def test_auto_is_the_default():
    params = DinoPatch().get_params()
    assert {k: params[k] for k in AUTO} == AUTO and params["match"] == "local"


def test_choice_is_recorded_with_evidence_and_survives_save_load(auto_screws, tmp_path):
    record = auto_screws.auto_
    assert not record["fallback"] and set(record["chosen"]) == {"tolerance", "sigma", "score", "match"}
    test = record["evidence"]["test"]
    level = autotune.ALPHA / len(test["steps"])
    won = [s["candidate"] for s in test["steps"] if s["win_share"] >= 1 - level]
    # The first in search order, or the last candidate that passed the paired test against what was in force.
    assert _chosen_key(record["chosen"]) == ([test["steps"][0]["vs"]] + won)[-1]
    assert auto_screws.model_.bank.match == record["chosen"]["match"]
    assert auto_screws.model_.bank.positions is not None  # measured on the region bank
    loaded = DinoPatch.load(auto_screws.save(tmp_path / "auto.npz"))
    assert loaded.auto_ == record and loaded.get_params()["sigma"] == "auto"
    images = screws("good", 2, seed=5) + screws("extra_object", 2, seed=5)
    np.testing.assert_allclose([r.score for r in loaded.predict(images)],
                               [r.score for r in auto_screws.predict(images)], rtol=1e-6)


def test_settings_tuned_by_hand_leave_the_rest_of_the_choice(auto_screws, tmp_path):
    """What evaluation's --save-model writes: sigma and score tuned, the tolerance and match still auto's."""
    tuned = auto_screws.tuned(auto_screws.threshold_, sigma=2.0, score="p99")
    loaded = DinoPatch.load(tuned.save(tmp_path / "tuned.npz"))
    assert loaded.auto_["chosen"] == {k: auto_screws.auto_["chosen"][k] for k in ("tolerance", "match")}
    assert (loaded.sigma, loaded.score, loaded.get_params()["tolerance"]) == (2.0, "p99", "auto")
    assert loaded.model_.post.sigma == 2.0 and auto_screws.auto_["chosen"]["sigma"] in autotune.SIGMAS


def test_evaluation_report_shows_the_choice(auto_screws, tmp_path):
    from dinopatch.data import MVTecFolder
    from dinopatch.evaluate import evaluate
    from dinopatch.synthetic import synthesize

    folder = MVTecFolder(synthesize("screw", tmp_path / "screw", n_train=1, n_test_good=2, n_test_defect=1, size=128))
    m = evaluate(auto_screws, folder, tmp_path / "report", progress=False)
    assert m["auto"]["chosen"] == auto_screws.auto_["chosen"] and m["detector"]["sigma"] == "auto"
    assert "Chosen at fit from good parts alone" in (tmp_path / "report" / "index.html").read_text()
    assert m["settings"]["sigma"] in autotune.SIGMAS  # the sweep started from the fitted value, not "auto"


def _chosen_key(chosen: dict) -> str:
    return (f"tolerance={chosen['tolerance']} match={chosen['match']} sigma={chosen['sigma']:g} "
            f"score={chosen['score']}")


def _flip_steps(record: dict) -> None:
    """Every step of the paired test passed (or, where that is the recorded choice already, none did)."""
    steps = record["evidence"]["test"]["steps"]
    share = 0.0 if steps[-1]["candidate"] == _chosen_key(record["chosen"]) else 1.0
    current = steps[0]["vs"]
    for step in steps:
        step.update(win_share=share, vs=current)
        current = step["candidate"] if share else current


def test_a_candidate_replaces_the_settings_before_it_only_when_the_paired_test_says_so():
    rng = np.random.default_rng(0)
    y = np.r_[np.zeros(20, bool), np.ones(24, bool)]
    base = rng.normal(size=44) + 0.8 * y
    noise = base + 0.05 * rng.normal(size=44)  # a near-equal candidate: a tie, however its AUROC falls
    better = base + 3.0 * y
    test = autotune._paired_test(y, {"a": base, "b": noise, "c": better, "d": noise}, seed=0)
    level = autotune.ALPHA / 3
    steps = {s["candidate"]: s for s in test["steps"]}
    assert steps["b"]["vs"] == "a" and steps["b"]["win_share"] < 1 - level
    assert steps["c"]["vs"] == "a" and steps["c"]["win_share"] >= 1 - level
    assert steps["d"]["vs"] == "c" and steps["d"]["win_share"] < 0.01
    assert test == autotune._paired_test(y, {"a": base, "b": noise, "c": better, "d": noise}, seed=0)  # seeded


def test_thin_evidence_searches_fewer_coarser_candidates():
    names = ["sigma", "score"]
    params = dict(tolerance=1, match="local", sigma="auto", score="auto")
    thin, full = (autotune._candidates(names, params, (1,), n)
                  for n in (autotune.THIN_IMAGES - 1, autotune.THIN_IMAGES))
    assert len(thin) == 6 and len(full) == 16 and thin[0] == full[0] == (1, "local", 2.0, "max")
    assert {c[2] for c in thin} == {0.0, 2.0, 8.0} and {c[3] for c in thin} == {"max", "mean"}


def test_records_from_before_the_paired_test_keep_their_margin_rule_and_full_search():
    params = dict(tolerance=1, match="local", sigma="auto", score="max", seed=0)
    order = [autotune._key(*c) for c in autotune._candidates(["sigma"], params, (1,), None)]  # searched in full
    assert len(order) == len(autotune.SIGMAS)
    table = dict.fromkeys(order, 0.5) | {order[2]: 0.5 + autotune.WIN_MARGIN + 0.01}
    evidence = {"images": 6, "searched": ["sigma"], "image_auroc": table}
    chosen = autotune._winner(evidence, ["sigma"], params, (1,))
    assert order[2] == autotune._key(1, "local", chosen[0], "max")
    # Such a file (6 images, every sigma searched, no paired test) still loads; its choice is re-derived.
    record = {"chosen": {"sigma": chosen[0]}, "fallback": False, "evidence": evidence}
    assert autotune.check_record(record, params, 8) is record
    with pytest.raises(ValueError, match="edited"):
        autotune.check_record(dict(record, chosen={"sigma": 8.0}), params, 8)


def _another(tolerance):
    return 0 if tolerance == "map" else 1 - tolerance


def _edited(det, tmp_path, name: str, edit) -> str:
    header, arrays = modelfile.read(det.save(tmp_path / "base.npz"))
    header = json.loads(json.dumps({k: v for k, v in header.items() if k not in ("format", "version", "arrays")}))
    edit(header)
    return modelfile.write(tmp_path / f"{name}.npz", header, arrays)


@pytest.mark.parametrize("name, edit, message", [
    ("chosen", lambda h: h["auto"]["chosen"].update(tolerance=_another(h["auto"]["chosen"]["tolerance"])), "edited"),
    ("evidence", lambda h: _flip_steps(h["auto"]), "edited"),
    ("compared", lambda h: h["auto"]["evidence"]["test"]["steps"][1].update(vs="tolerance=9 match=local"), "edited"),
    ("test", lambda h: h["auto"]["evidence"]["test"].update(alpha=0.5), "paired test"),
    ("search", lambda h: h["auto"]["evidence"]["image_auroc"].pop(_chosen_key(h["auto"]["chosen"])), "search"),
    ("shares", lambda h: h["auto"]["evidence"].update(offset_share=[0.1, 0.1, 0.1]), "offset shares"),
    ("missing", lambda h: h["auto"]["chosen"].pop("sigma"), "exactly"),
    ("type", lambda h: h.update(auto="tolerance=0"), "malformed"),
    ("dropped", lambda h: h.update(auto=None), "malformed"),
    ("fallback", lambda h: h["auto"].update(fallback=True), "edited"),
    ("param", lambda h: h["params"].update(sigma="auto2"), "sigma"),
])
def test_edited_or_invalid_record_is_refused(auto_screws, tmp_path, name, edit, message):
    path = _edited(auto_screws, tmp_path, name, edit)
    with pytest.raises(ModelFileError, match=message):
        DinoPatch.load(path)


def test_explicit_values_are_never_overridden():
    det = _det(tolerance=2, sigma="auto", score="p99").fit(screws("good", 4, seed=1))
    assert det.auto_["chosen"].keys() == {"sigma"} and det.model_.bank.tolerance == 2
    assert all(k.startswith("tolerance=2 match=local ") and k.endswith(" score=p99")
               for k in det.auto_["evidence"]["image_auroc"])
    assert det.model_.post.score == "p99" and det.get_params()["tolerance"] == 2


@pytest.mark.parametrize("n", [1, 2])
def test_few_images_fall_back_to_the_documented_defaults(n):
    kwargs = {"threshold": 1.0} if n == 1 else {}  # one image cannot calibrate a threshold either
    det = _det(**AUTO, match="auto", **kwargs).fit(screws("good", n, seed=1))
    assert det.auto_["fallback"] is True and det.auto_["chosen"] == autotune.DEFAULTS
    assert det.model_.bank.tolerance == autotune.DEFAULTS["tolerance"]
    assert np.isfinite(det.predict(screws("good", 1, seed=9))[0].score)


def test_calibration_runs_after_auto_with_the_chosen_settings(jittered):
    images, det = jittered
    fixed = _det(align=False, tolerance=det.auto_["chosen"]["tolerance"]).fit(images)
    assert det.threshold_.source["method"] == "leave-one-out"
    assert det.threshold_.image == fixed.threshold_.image  # calibrated as if the choice had been given


def test_global_and_local_terms():
    """A patch that is nominal elsewhere but not here: only the local term scores it; a patch
    unlike anything: both do; "local+global" scores both kinds."""
    rng = np.random.default_rng(0)
    d = 16
    a, b = (v / np.linalg.norm(v) for v in rng.normal(size=(2, d)).astype(np.float32))
    nominal = np.stack([a, b])[None, :, None, :] + 0.01 * rng.normal(size=(5, 2, 1, d)).astype(np.float32)
    misplaced = np.stack([b, b])[None, :, None, :]
    novel = np.stack([a, -a])[None, :, None, :]
    banks = {m: MemoryBank.fit(nominal.astype(np.float32), match=m) for m in ("local", "global", "local+global")}
    score = {m: (bank.distances(misplaced)[0, 0, 0], bank.distances(novel)[0, 1, 0]) for m, bank in banks.items()}
    assert score["global"][0] < 0.1 < 1.0 < score["local"][0]  # b at a's place: only local sees it
    assert score["global"][1] > 1.0 and score["local"][1] > 1.0  # -a: nothing like it anywhere
    assert score["local+global"][0] > 0.5 and score["local+global"][1] > 1.0
    np.testing.assert_allclose(banks["local+global"].distances(novel),
                               0.5 * (banks["local"].distances(novel) + banks["global"].distances(novel)), rtol=1e-6)


def test_global_bank_is_coreset_bounded_and_saved(tmp_path, monkeypatch):
    from dinopatch import bank

    monkeypatch.setattr(bank, "GLOBAL_ROWS", 50)
    det = _det(match="local+global").fit(screws("good", 4, seed=1))
    rows = det.model_.bank.global_features
    assert rows.shape[0] == 50 and not rows.flags.writeable
    loaded = DinoPatch.load(det.save(tmp_path / "lg.npz"))
    np.testing.assert_array_equal(loaded.model_.bank.global_features, rows)
    images = screws("extra_object", 2, seed=4)
    np.testing.assert_allclose([r.score for r in loaded.predict(images)], [r.score for r in det.predict(images)])


@pytest.mark.parametrize("params, message", [
    (dict(tolerance="Auto"), "tolerance .* may also be 'auto'"), (dict(sigma="automatic"), "sigma .* may also be"),
    (dict(score="best"), "score .* may also be 'auto'"), (dict(match="near"), "match"),
    (dict(tolerance=-1), r"tolerance must be an integer in \[0, 7\], got -1$"),
    (dict(topk=5.0), r"topk must be in \(0, 1\], got 5.0$"),
])
def test_bad_values_are_refused_before_any_work(params, message):
    with pytest.raises(ValueError, match=message):
        _det(**params).fit([np.zeros((8, 8), np.uint8)])


def test_cli_accepts_auto_and_refuses_bad_values(tmp_path, capsys):
    from dinopatch.cli import build_parser, main

    args = build_parser().parse_args(["fit", "x.png", "-o", "m.npz", "--tolerance", "auto", "--sigma", "auto",
                                      "--score", "auto", "--match", "local+global"])
    assert (args.tolerance, args.sigma, args.score, args.match) == ("auto", "auto", "auto", "local+global")
    with pytest.raises(SystemExit) as e:
        main(["fit", "x.png", "-o", str(tmp_path / "m.npz"), "--sigma", "wide"])
    assert e.value.code == 2
    assert "'wide' is not a number or 'auto'" in capsys.readouterr().err
