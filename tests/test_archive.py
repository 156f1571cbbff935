"""Archive scoring on Ray Data (a real local Ray of 2 CPUs), compared with in-process predict.

Scores may differ from ``predict`` by float32 reassociation only (ONNX
Runtime batches differently in the workers); see ``tests/test_serve.py``.
"""
import base64
import os

import cv2
import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import screws

from dinopatch import DinoPatch
from dinopatch.archive import done_paths, list_images, main, score_archive

RTOL = 1e-5


@pytest.fixture(scope="module")
def local_ray():
    import ray

    # Its own Ray, on loopback, even where another is running on this machine.
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             _node_ip_address="127.0.0.1")
    try:
        yield
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    """200 screws (150 good, 50 defective) as PNG files in two folders, and one file that is no image."""
    root = tmp_path_factory.mktemp("archive")
    ims = screws("good", 150, seed=21) + screws("bent_thread", 25, seed=22) + screws("extra_object", 25, seed=23)
    paths = []
    for i, im in enumerate(ims):
        p = root / ("line1" if i % 2 else "line2") / f"{i:03d}.png"
        p.parent.mkdir(exist_ok=True)
        cv2.imwrite(str(p), im)
        paths.append(str(p))
    broken = root / "line1" / "broken.png"
    broken.write_bytes(b"not a png")
    return root, paths, str(broken)


def _read(out) -> dict[str, dict]:
    rows = pq.read_table(out).to_pylist()
    by_path = {r["path"]: r for r in rows}
    assert len(by_path) == len(rows), "a path was scored twice"
    return by_path


def test_archive_equals_predict_and_resumes(local_ray, archive, onnx_model, tmp_path, capsys):
    root, paths, broken = archive
    model, onnx = onnx_model
    out = tmp_path / "scores.parquet"
    first = tmp_path / "first.txt"
    first.write_text("# the first 120, as a list file\n" + "\n".join(paths[:120]) + "\n")

    s = score_archive(first, model, out, engine=str(onnx), batch_size=8, rows_per_part=50, progress=False)
    assert (s["images"], s["skipped"], s["scored"], s["errors"]) == (120, 0, 120, 0)
    assert len(list(out.glob("part-*.parquet"))) == 3  # 50 + 50 + 20 rows
    # The folder, after an interruption: only what is missing is scored.
    s = score_archive(root, model, out, engine=str(onnx), batch_size=8, rows_per_part=50, progress=False)
    assert (s["images"], s["skipped"], s["scored"], s["errors"]) == (201, 120, 81, 1)

    rows = _read(out)
    assert set(rows) == {*paths, broken}
    refs = DinoPatch.load(model, engine=str(onnx), progress=False).predict(paths)
    for path, ref in zip(paths, refs):
        r = rows[path]
        assert r["error"] is None
        assert r["score"] == pytest.approx(ref.score, rel=RTOL)
        assert (r["is_anomaly"], r["aligned"], r["reason"]) == (ref.is_anomaly, ref.aligned, ref.alignment.reason)
        assert r["threshold_source"] == ref.threshold_source
    assert {r["is_anomaly"] for r in rows.values() if r["error"] is None} == {False, True}
    bad = rows[broken]
    assert "not a readable image" in bad["error"] and bad["score"] is None and bad["is_anomaly"] is None

    # A third run, through the command: everything is there already but the unreadable file, tried again.
    assert main([str(root), "-m", str(model), "-o", str(out), "--engine", str(onnx), "--no-progress"]) == 0
    assert "1 scored (1 with errors), 200 already in" in capsys.readouterr().out
    assert set(_read(out)) == {*paths, broken}


def test_a_worker_takes_the_model_from_the_object_store_not_a_disk(local_ray, archive, onnx_model, tmp_path):
    import ray

    from dinopatch.archive import ArchiveScorer

    _, paths, _ = archive
    model, onnx = onnx_model
    copy = tmp_path / "gone.npz"
    copy.write_bytes(open(model, "rb").read())
    ref = ray.put(copy.read_bytes())
    copy.unlink()  # no file left to read: the worker has the bytes or nothing
    scorer = ArchiveScorer([ref], str(onnx), "auto", 4)
    out = scorer({"path": np.array([os.fsencode(p) for p in paths[:4]], dtype=object)})
    refs = DinoPatch.load(model, engine=str(onnx), progress=False).predict(paths[:4])
    assert out["model_id"] == [DinoPatch.load(model).model_id] * 4 and out["error"] == [None] * 4
    assert out["score"] == pytest.approx([r.score for r in refs], rel=RTOL)


def test_inputs_folder_glob_and_list(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    for name in ("a/1.png", "a/b/2.JPG", "a/notes.txt"):
        (tmp_path / name).write_bytes(b"x")
    want = [str(tmp_path / "a" / "1.png"), str(tmp_path / "a" / "b" / "2.JPG")]
    assert list_images(tmp_path / "a") == want
    assert list_images(str(tmp_path / "a" / "**" / "*.*")) == sorted(want + [str(tmp_path / "a" / "notes.txt")])
    listing = tmp_path / "a" / "list.txt"
    listing.write_text("1.png\n\n# skipped\nb/2.JPG\n1.png\n")
    assert list_images(listing) == want  # relative to the list, repeats dropped
    with pytest.raises(FileNotFoundError):
        list_images(tmp_path / "missing")
    with pytest.raises(ValueError, match="no images"):
        list_images(str(tmp_path / "*.tif"))


def test_output_that_is_not_ours_is_refused(tmp_path, onnx_model):
    model, onnx = onnx_model
    (tmp_path / "img.png").write_bytes(b"x")
    # A folder of somebody else's files, e.g. the images themselves.
    with pytest.raises(ValueError, match="other content"):
        score_archive(tmp_path / "img.png", model, tmp_path, engine=str(onnx), progress=False)
    with pytest.raises(ValueError, match="not a score-archive output folder"):
        score_archive(tmp_path / "img.png", model, tmp_path / "img.png", engine=str(onnx), progress=False)
    out = tmp_path / "out"
    out.mkdir()
    (out / ".part-x.parquet.tmp").write_bytes(b"half written")
    (out / "part-x.parquet").write_bytes(b"damaged")
    with pytest.raises(ValueError, match="part-x.parquet: not a readable"):
        done_paths(out)
    assert not (out / ".part-x.parquet.tmp").exists()  # the interrupted write is cleared away
    with pytest.raises(ValueError, match="batch_size"):
        score_archive(tmp_path / "img.png", model, tmp_path / "new", batch_size=0, progress=False)
    assert main([str(tmp_path / "missing"), "-m", str(model), "-o", str(tmp_path / "o2")]) == 2
    assert np.all([not (tmp_path / p).exists() for p in ("new", "o2")])


def test_errors_are_retried_models_never_mixed_and_any_name_taken(local_ray, onnx_model, tmp_path):
    model, onnx = onnx_model
    other = DinoPatch.load(model, false_alarm_rate=0.4).save(tmp_path / "other.npz")  # another model id
    images = tmp_path / "in"
    images.mkdir()
    odd = os.fsdecode(b"part\xff.png")  # not UTF-8: a lone surrogate in the str path
    for name, im in zip(["a.png", odd], screws("good", 2, seed=5)):
        with open(os.fsencode(images / name), "wb") as f:
            f.write(cv2.imencode(".png", im)[1].tobytes())
    late = images / "late.png"
    late.write_bytes(b"\x89PNG still being written")
    out = tmp_path / "out"
    run = dict(engine=str(onnx), batch_size=2, progress=False)

    s = score_archive(images, model, out, **run)
    assert (s["scored"], s["errors"]) == (3, 1)
    rows = _read(out)
    odd_row = next(r for r in rows.values() if r["path_base64"])
    assert odd_row["error"] is None and odd_row["path"].endswith("part\\xff.png")
    assert os.fsdecode(base64.b64decode(odd_row["path_base64"])) == str(images / odd)
    assert rows[str(late)]["error"] is not None

    late.write_bytes(cv2.imencode(".png", screws("good", 1, seed=6)[0])[1].tobytes())  # the file is complete now
    s = score_archive(images, model, out, **run)
    assert (s["skipped"], s["scored"], s["errors"]) == (2, 1, 0)  # the error row was retried, not counted done
    rows = _read(out)
    assert len(rows) == 3 and all(r["error"] is None for r in rows.values())

    with pytest.raises(ValueError, match="another model.*--rescore"):
        score_archive(images, other, out, **run)
    s = score_archive(images, other, out, rescore=True, **run)
    assert (s["skipped"], s["scored"]) == (0, 3)
    other_id = DinoPatch.load(other).model_id
    assert {r["model_id"] for r in _read(out).values()} == {other_id}
