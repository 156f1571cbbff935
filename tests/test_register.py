"""Registration of fixtured frames (align=False): shifts recovered, used only where it explains the good frames,
judged at predict, kept in the model file and refused when edited."""
import warnings

import cv2
import numpy as np
import pytest
from conftest import FAST

from dinopatch import DinoPatch, metrics
from dinopatch.align import Aligner
from dinopatch.benchmark_sets import make_set
from dinopatch.pose import SIDE
from dinopatch.register import MIN_REACH, RESIDUAL, Registration, check_register, gray


def _boards(n: int, size: int = SIDE, seed: int = 0) -> list[np.ndarray]:
    return make_set("circuit", n_train=n, n_test_good=0, n_test_defect=0, size=size, seed=seed)["train"]


def _moved(image: np.ndarray, dx: float, dy: float) -> np.ndarray:
    m = np.array([[1.0, 0, dx], [0, 1.0, dy]])
    return cv2.warpAffine(image, m, image.shape[1::-1], flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101)


def test_shifts_of_one_board_moved_by_known_amounts_are_recovered():
    board = _boards(1)[0]
    truth = np.array([[0.0, 0.0], [1.5, -0.75], [-2.25, 1.0], [0.5, 2.5], [-1.0, -1.75], [2.0, 0.25]])
    reg = Registration.fit([gray(_moved(board, *t)) for t in truth], "auto")
    assert reg.used and reg.residual_after <= RESIDUAL < reg.residual_before
    # Shifts are relative to the good parts' median place: compare differences.
    found = reg.shifts - reg.shifts[0]
    np.testing.assert_allclose(found, truth - truth[0], atol=0.15)


def test_auto_registers_fixtured_boards_and_leaves_textures_alone():
    boards = Registration.fit([gray(b) for b in _boards(10)], "auto")
    weaves = make_set("weave", n_train=10, n_test_good=0, n_test_defect=0, size=SIDE, seed=0)["train"]
    weave = Registration.fit([gray(w) for w in weaves], "auto")
    assert boards.used and boards.template is not None
    assert not weave.used and weave.template is None and weave.residual_after > RESIDUAL
    assert "not registered" in weave.describe() and "registered by shift" in boards.describe()
    assert Registration.fit([gray(w) for w in weaves[:4]], "on").used


def test_a_registered_frame_lands_on_the_unmoved_one():
    boards = _boards(8, size=224)
    al = Aligner(size=224, enabled=False, register="auto").fit(boards)
    still, _, a0 = al.transform(boards[0])
    moved, valid, a1 = al.transform(_moved(boards[0], 3.0, -2.0))
    assert a0.trusted and a1.trusted and a1.reason == ""
    inner = (slice(12, -12), slice(12, -12))
    assert np.abs(moved[inner].astype(int) - still[inner]).mean() < 2.0
    # Unregistered, the same move is a misplaced board.
    plain = Aligner(size=224, enabled=False, register="off").fit(boards)
    assert np.abs(plain.transform(_moved(boards[0], 3.0, -2.0))[0][inner].astype(int)
                  - plain.transform(boards[0])[0][inner]).mean() > 4 * np.abs(moved[inner].astype(int)
                                                                     - still[inner]).mean()
    assert valid.min() == 0 and valid.mean() > 0.9  # the strip the shift uncovers is padding
    # The map comes back to the input frame through the same shift.
    amap = np.zeros((224, 224), np.float32)
    amap[100:110, 100:110] = 1
    back = al.inverse_map(amap, a1, moved.shape)
    ys, xs = np.nonzero(back > 0.5)
    # The frame's centre (111.5) came from the input's a1.centre: the square moved with it.
    assert abs(xs.mean() - (104.5 + a1.centre[0] - 111.5)) < 1.0
    assert abs(ys.mean() - (104.5 + a1.centre[1] - 111.5)) < 1.0


def test_a_frame_moved_beyond_the_reach_or_flat_is_not_trusted():
    boards = _boards(8)
    al = Aligner(size=SIDE, enabled=False, register="auto").fit(boards)
    reach = al.registration_.reach
    assert reach >= MIN_REACH
    far = al.place(_moved(boards[0], reach + 6, 0.0)).alignment
    assert not far.trusted and "registration reaches" in far.reason
    flat = al.place(np.full((SIDE, SIDE, 3), 90, np.uint8)).alignment
    assert not flat.trusted and "flat" in flat.reason
    # Unregistered (a texture), a dark frame with sensor noise is no frame to judge either.
    weave = make_set("weave", n_train=4, n_test_good=0, n_test_defect=0, size=SIDE, seed=0)["train"]
    texture = Aligner(size=SIDE, enabled=False, register="auto").fit(weave)
    assert not texture.registration_.used and texture.place(weave[0]).alignment.trusted
    noise = np.clip(np.random.default_rng(0).normal(3, 1, (SIDE, SIDE, 3)), 0, 255).astype(np.uint8)
    dark = texture.place(noise).alignment
    assert not dark.trusted and dark.reason == "nothing in the frame: it is flat"
    with pytest.raises(ValueError, match="all 3 are flat"):
        Registration.fit([gray(noise)] * 3, "on", texture.flat_level_)
    # Where the good frames are plain themselves (a painted panel), a plain frame is one of them.
    panels = [np.clip(np.random.default_rng(i).normal(128, 1.5, (SIDE, SIDE, 3)), 0, 255).astype(np.uint8)
              for i in range(4)]
    plain = Aligner(size=SIDE, enabled=False, register="auto").fit(panels)
    assert plain.place(panels[0]).alignment.trusted and not plain.place(np.full_like(panels[0], 128)).alignment.trusted
    assert Aligner.from_state_dict(plain.state_dict()).flat_level_ == plain.flat_level_ < 2.0


def test_state_round_trip_and_edits_refused():
    al = Aligner(size=SIDE, enabled=False, register="auto").fit(_boards(8))
    state = al.state_dict()
    again = Aligner.from_state_dict(state)
    probe = _moved(_boards(1, seed=3)[0], 1.25, -0.5)
    np.testing.assert_array_equal(again.place(probe).matrix, al.place(probe).matrix)
    # Evidence that says registration explains nothing, beside a template: the recorded choice is refused.
    edited = dict(state, registration=dict(state["registration"], residual_after=0.5))
    with pytest.raises(ValueError, match="must not hold its template"):
        Aligner.from_state_dict(edited)
    with pytest.raises(ValueError, match="register="):
        Aligner.from_state_dict(dict(state, register="on"))
    with pytest.raises(ValueError, match="missing"):
        Aligner.from_state_dict(dict(state, registration=None))
    with pytest.raises(ValueError, match="within"):
        Aligner.from_state_dict(dict(state, registration=dict(state["registration"], shifts=[[1e9, 0.0]])))
    with pytest.raises(ValueError, match="template"):
        Aligner.from_state_dict(dict(state, registration=dict(state["registration"], template=[[1.0]])))
    with pytest.raises(ValueError, match="flat level"):
        Aligner.from_state_dict(dict(state, flat_level=50.0))
    # A state from before registration: fixtured frames resized as they came.
    old = {k: v for k, v in state.items() if k not in ("register", "registration", "flat_level")}
    assert Aligner.from_state_dict(old).register == "off" and Aligner.from_state_dict(old).flat_level_ == 0.0


def test_register_parameter_checked():
    assert check_register("auto", True) == "auto"
    with pytest.raises(ValueError, match="align=False"):
        check_register("on", True)
    with pytest.raises(ValueError, match="one of"):
        check_register(True, False)
    with pytest.raises(ValueError, match="register"):
        DinoPatch(**dict(FAST, register="on")).fit(_boards(3, size=112))


def test_registered_boards_lower_the_threshold_and_catch_defects(tmp_path):
    d = make_set("circuit", n_train=10, n_test_good=4, n_test_defect=2, size=112, seed=0)
    labels = np.array(d["defects"]) != "good"
    out = {}
    for mode in ("off", "auto"):
        det = DinoPatch(**dict(FAST, align=False, register=mode))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            det.fit(d["train"])
        scores = np.array([r.score for r in det.predict(d["test"])])
        out[mode] = det.threshold_.image, metrics.auroc(labels, scores), det, scores
    assert out["auto"][0] < 0.5 * out["off"][0]
    assert out["auto"][1] >= out["off"][1] + 0.2
    det = out["auto"][2]
    assert det.model_.aligner.registration_.used and det.model_.params["register"] == "auto"
    loaded = DinoPatch.load(det.save(tmp_path / "board.dinopatch"))
    np.testing.assert_allclose([r.score for r in loaded.predict(d["test"])], out["auto"][3], rtol=1e-5)


def test_a_defective_board_hidden_among_registered_good_ones_is_named():
    # 224 px: at 112 a missing pad fills enough of a patch to stand out at any tolerance.
    d = make_set("circuit", n_train=12, n_test_good=0, n_test_defect=1, size=224, seed=0)
    bad = d["test"][d["defects"].index("missing_pad")]
    images = d["train"][:5] + [np.zeros_like(bad)] + d["train"][5:] + [bad]
    det = DinoPatch(**dict(FAST, image_size=224, align=False, tolerance="auto"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        det.fit(images)
    # The flat frame has nothing to register; the defect is judged at tolerance 0, where auto's choice for
    # registered boards lies and a neighbour's match cannot hide it.
    assert [(f.name, f.reason) for f in det.fit_report_.flagged] == [("#5", "no part"), ("#13", "outlier")]
    assert "flat" in det.fit_report_.flagged[0].detail
    assert det.threshold_.source["images"] == 12
