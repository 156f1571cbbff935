"""Many models in one service: names, versions checked and swapped under load, replicas' model budget, metrics.

The service test runs a real local Ray (2 CPUs, on loopback) and HTTP; its
answers are compared with in-process ``predict`` of the model each answer
names.  Scores may differ by float32 reassociation only (see test_serve.py).
"""
import asyncio
import hashlib
import json
import os
import socket
import threading
import time
import urllib.error
import urllib.request

import cv2
import pytest
from conftest import FAST, screws

from dinopatch import DinoPatch
from dinopatch.catalog import CatalogError, ModelCatalog, ModelVersion, check_version, load_bytes, model_files
from dinopatch.loaded_models import LoadedModels
from dinopatch.modelfile import read, write
from dinopatch.serve import ServiceConfig, deploy
from dinopatch.serve_metrics import ServiceMetrics, verdict

RTOL = 1e-5
TIMEOUT_S = 8.0
CLIENT_TIMEOUT = TIMEOUT_S + 15
TOKEN = "fleet-secret"


@pytest.fixture(scope="module")
def models(onnx_model, tmp_path_factory):
    """``(folder, onnx, spare)``: four models in one folder (screw, bolt, nut, gear) and one to swap in for bolt."""
    screw, onnx = onnx_model
    folder = tmp_path_factory.mktemp("fleet")
    (folder / "screw.npz").write_bytes(open(screw, "rb").read())
    for name, seed in (("bolt", 21), ("nut", 22), ("gear", 24), ("spare", 23)):
        det = DinoPatch(**FAST).fit(screws("good", 4, seed=seed))
        det.save(folder / f"{name}.npz" if name != "spare" else folder.parent / "spare.npz")
    return folder, onnx, folder.parent / "spare.npz"


def _checker(onnx, memory=None):
    """The gateway's check of a new version, with the service's engine."""
    runtime = {"engine": str(onnx), "kernel": "auto", "batch_size": 8}

    def check(name, data):
        det, checks = check_version(name, data, runtime, memory)
        return det.model_id, checks
    return check


def _golden_flipped(src, dst):
    """A well-formed copy of ``src`` whose golden reference calls every frame a defect (distances and verdicts
    edited together, so the file's own checks pass): the engine that fit it disagrees on the good frames."""
    header, arrays = read(src)
    header = {k: v for k, v in header.items() if k not in ("format", "version", "arrays", "sha256", "signature")}
    assert not all(header["golden"]["verdicts"])  # some frame passes: its verdict will flip
    arrays["golden_distances"] = arrays["golden_distances"] + 10 * DinoPatch.load(src).threshold_.image
    header["golden"]["verdicts"] = [True] * len(header["golden"]["verdicts"])
    write(dst, header, arrays)
    return dst


# ----------------------------------------------------------------------------- without Ray

def test_model_files_names_folders_and_refuses_clashes(tmp_path):
    (tmp_path / "a").mkdir()
    for p in ("a/x.npz", "a/y.npz", "a/notes.txt", "b.npz", "x.npz"):
        (tmp_path / p).write_bytes(b"")
    assert model_files([tmp_path / "a", tmp_path / "b.npz"]) == {
        "x": str(tmp_path / "a/x.npz"), "y": str(tmp_path / "a/y.npz"), "b": str(tmp_path / "b.npz")}
    with pytest.raises(CatalogError, match="two models are named 'x'"):
        model_files([tmp_path / "a", tmp_path / "x.npz"])
    with pytest.raises(CatalogError, match="no such model file"):
        model_files([tmp_path / "missing.npz"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(CatalogError, match="without model files"):
        model_files([tmp_path / "empty"])


def test_catalog_swaps_only_checked_new_bytes(models, tmp_path):
    folder, onnx, spare = models
    path = tmp_path / "bolt.npz"
    path.write_bytes((folder / "bolt.npz").read_bytes())
    catalog = ModelCatalog({"bolt": str(path)}, _checker(onnx))
    v1 = catalog.current("bolt")
    assert (v1.number, v1.model_id) == (1, DinoPatch.load(path).model_id)
    assert set(v1.describe()) == {"name", "model_id", "version", "sha256", "saved_at", "checks"}
    assert v1.checks["golden"] == {"frames": 8, "flips": 0, "engine": onnx.name} and v1.resident_bytes > 0
    assert catalog.refresh("bolt", force=True) is v1  # the same bytes are the same version
    # Half written: the checks refuse it and version 1 stays in service.
    path.write_bytes(spare.read_bytes()[:5000])
    assert catalog.changed() == ["bolt"]
    with pytest.raises(CatalogError, match="fails its checks, version 1 stays in service"):
        catalog.refresh("bolt")
    assert catalog.current("bolt") is v1 and catalog.changed() == []
    assert catalog.listing()[0]["refused"]["error"].startswith("bolt: the new model file fails its checks")
    os.replace(_copy(spare, tmp_path / "bolt.tmp"), path)
    v2 = catalog.refresh("bolt")
    assert (v2.number, v2.model_id, catalog.swaps) == (2, DinoPatch.load(spare).model_id, 1)
    assert v2.newer_than(v1) and not v1.newer_than(v2)
    assert load_bytes(v2.data).model_id == v2.model_id
    assert catalog.refused("bolt") is None  # a swap clears the refusal


def test_a_version_whose_engine_flips_a_golden_verdict_stays_out(models, tmp_path):
    folder, onnx, spare = models
    path = _copy(folder / "bolt.npz", tmp_path / "bolt.npz")
    catalog = ModelCatalog({"bolt": str(path)}, _checker(onnx))
    v1 = catalog.current("bolt")
    bad = _golden_flipped(spare, tmp_path / "bad.npz")
    # The file's own checks pass: a plain load only warns; the swap's check re-runs the golden set and refuses.
    with pytest.warns(UserWarning, match="does not reproduce the reference"):
        assert DinoPatch.load(bad, engine=str(onnx)).model_id != v1.model_id
    os.replace(bad, path)
    with pytest.raises(CatalogError, match=r"version 1 stays in service: EngineMismatchError: .*verdict flip"):
        catalog.refresh("bolt")
    assert catalog.current("bolt") is v1
    [entry] = catalog.listing()
    assert entry["version"] == 1 and entry["model_id"] == v1.model_id
    assert entry["refused"]["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert "golden set" in entry["refused"]["error"] and "/" not in entry["refused"]["error"]
    # The same damaged version does not get in by a later look either; the real one does.
    assert catalog.changed() == [] and catalog.refresh("bolt") is v1
    with pytest.raises(CatalogError):
        catalog.refresh("bolt", force=True)
    os.replace(_copy(spare, tmp_path / "bolt.tmp"), path)
    assert catalog.refresh("bolt").number == 2 and catalog.refused("bolt") is None


def _copy(src, dst):
    dst.write_bytes(src.read_bytes())
    return dst


def _version(name: str, number: int, sha: str = "s", catalog: str = "c") -> ModelVersion:
    return ModelVersion(name, number, f"id-{name}-{number}", sha, "", None, catalog)


def test_replica_loads_on_first_use_drops_least_recent_and_batches_per_model():
    loads = []

    def load(version):
        loads.append((version.name, version.number))
        return version.model_id

    def batch(f):  # everything that arrives together, per model (as serve.batch groups them)
        async def one(item):
            [out] = await f([item])
            return out
        return one

    async def scenario():
        models = LoadedModels(load, batch, max_models=2)
        a = await models.get(_version("a", 1))
        assert await models.get(_version("a", 1)) is a and loads == [("a", 1)]
        await models.get(_version("b", 1))
        await models.get(_version("a", 1))  # a is now the most recent
        await models.get(_version("c", 1))  # b goes
        assert models.names() == ["a", "c"] and "b" not in models
        await models.get(_version("b", 1))
        assert loads == [("a", 1), ("b", 1), ("c", 1), ("b", 1)]
        # A newer version is loaded beside the old; an older one is answered by the newer.
        a2 = await models.get(_version("a", 2))
        assert a2 is not a and a2.det == "id-a-2"
        assert await models.get(_version("a", 1)) is a2
        # Versions of another catalog (a restarted gateway) compare by their bytes.
        assert await models.get(_version("a", 1, sha="s", catalog="other")) is a2
        assert (await models.get(_version("a", 1, sha="t", catalog="other"))).version.sha256 == "t"
        # Concurrent first requests load once.
        await asyncio.gather(*(models.get(_version("d", 1)) for _ in range(5)))
        assert loads.count(("d", 1)) == 1 and models.loads == len(loads)

    asyncio.run(scenario())
    with pytest.raises(ValueError):
        LoadedModels(load, batch, max_models=0)


def test_the_command_refuses_a_model_whose_golden_set_its_engine_flips(models, tmp_path):
    import ray

    from dinopatch.serve import main

    folder, onnx, spare = models
    bad = _golden_flipped(spare, tmp_path / "bad.npz")
    with pytest.raises(SystemExit, match=r"bad.npz: engine 'backbone.onnx' does not reproduce the reference .*flip"):
        main([str(folder / "bolt.npz"), str(bad), "--engine", str(onnx)])
    assert not ray.is_initialized()  # refused before Ray starts


def test_a_version_a_replica_cannot_run_leaves_the_one_before_answering():
    from dinopatch.engine_choice import EngineMismatchError
    from dinopatch.loaded_models import ModelUnavailableError

    loads = []

    def load(version):
        loads.append((version.name, version.number))
        if version.number == 2:
            raise EngineMismatchError(f"{version.name} v2 flips a golden verdict here")
        return version.model_id

    async def scenario():
        models = LoadedModels(load, lambda f: f, max_models=4)
        a1 = await models.get(_version("a", 1))
        # Refused here: version 1 answers on (its answers name it), and version 2 is not tried at every request.
        assert await models.get(_version("a", 2)) is a1
        assert await models.get(_version("a", 2)) is a1 and loads.count(("a", 2)) == 1
        assert (await models.get(_version("a", 3))).version.number == 3  # a later version is tried
        with pytest.raises(ModelUnavailableError, match="b: version 2 cannot run on this replica: "
                                                        "EngineMismatchError: b v2 flips"):
            await models.get(_version("b", 2))

    asyncio.run(scenario())


def test_a_replica_checks_the_golden_set_on_its_own_engine(models, tmp_path):
    from dinopatch.engine_choice import EngineMismatchError
    from dinopatch.serve import Scorer

    folder, onnx, spare = models
    scorer = Scorer(ServiceConfig(models=[folder], engine=str(onnx)))
    bad = _golden_flipped(spare, tmp_path / "bad.npz").read_bytes()
    with pytest.raises(EngineMismatchError, match="verdict flip"):
        scorer._load(ModelVersion("bolt", 2, "x", "s", "", bad))
    good = spare.read_bytes()
    assert scorer._load(ModelVersion("bolt", 2, DinoPatch.load(spare).model_id, "s", "", good)).model_id
    # With no version of its own before, the replica answers 503 for it, to predict and to /model alike.
    scorer.models = LoadedModels(scorer._load, lambda f: f, max_models=4)
    version = ModelVersion("bolt", 2, "x", "s", "", bad)
    for answer in (asyncio.run(scorer.predict(version, cv2.imencode(".png", screws("good", 1, 1)[0])[1].tobytes(),
                                              None, False)), asyncio.run(scorer.info(version))):
        assert answer["status"] == 503 and "bolt: version 2 cannot run on this replica" in answer["body"]["error"]


def test_metrics_count_per_model_and_never_invent_series():
    from prometheus_client.parser import text_string_to_metric_families

    m = ServiceMetrics(["a", "b"])
    m.answered("a", 200, 0.02, {"aligned": True, "is_anomaly": False, "batch": 3})
    m.answered("a", 200, 0.03, {"aligned": False, "is_anomaly": True, "batch": 1})
    m.answered("b", 422, 0.01, {"error": "x"})
    m.answered("no-such-model", 404, 0.001)
    m.swapped("b", True)
    m.in_service("b", 2)
    values = _samples(m.text().decode())
    assert values[("dinopatch_requests_total", (("model", "a"), ("status", "200")))] == 2
    assert values[("dinopatch_errors_total", (("model", "b"), ("status", "422")))] == 1
    assert values[("dinopatch_errors_total", (("model", ""), ("status", "404")))] == 1
    assert values[("dinopatch_verdicts_total", (("model", "a"), ("verdict", "unaligned")))] == 1
    assert values[("dinopatch_verdicts_total", (("model", "a"), ("verdict", "good")))] == 1
    assert values[("dinopatch_batch_images_sum", (("model", "a"),))] == 4
    assert values[("dinopatch_model_version", (("model", "b"),))] == 2
    assert not any(("model", "no-such-model") in labels for _, labels in values)
    assert verdict({"aligned": True, "is_anomaly": True}) == "anomaly"
    assert list(text_string_to_metric_families(m.text().decode()))


def test_a_swap_starts_a_fresh_drift_monitor_and_the_metrics_count_each_rise():
    from types import SimpleNamespace

    import numpy as np

    from dinopatch.drift import STATISTICS, Reference
    from dinopatch.serve_drift import ServiceDrift

    rng = np.random.default_rng(3)
    ref = Reference(STATISTICS, np.array([195.0, 34.0, 1.0]) + rng.standard_normal((20, 3)))
    model = SimpleNamespace(drift=ref, threshold=SimpleNamespace(scores=2.5 + 0.1 * rng.standard_normal(20)))
    drift, m = ServiceDrift(), ServiceMetrics(["a"])
    for model_id in ("v1", "v2"):
        assert drift.know(SimpleNamespace(model_id=model_id, model_=model)) == model_id
    drift.start("a", 1, "v1")

    def part(version: int, brightness: float) -> dict:
        body = {"score": 2.5, "aligned": True, "is_anomaly": False, "error": None, "model_version": version,
                "model_id": f"v{version}", "drift": {"statistics": dict(zip(STATISTICS, (brightness, 34.0, 1.0)))}}
        drift.answer("a", body)
        m.drift("a", drift.monitor("a"))
        return body["drift"]

    assert part(1, 195.0) == {"flag": False, "reason": None}
    fields = [part(1, 100.0) for _ in range(10)]
    assert fields[-1]["flag"] and fields[-1]["reason"].startswith("brightness down")
    assert drift.state("a")["flag"] and drift.state("a")["version"] == 1
    values = _samples(m.text().decode())
    assert values[("dinopatch_drift_flag", (("model", "a"),))] == 1
    assert values[("dinopatch_drift_flags_total", (("model", "a"),))] == 1
    # A swap: version 2's monitor starts down; an answer still judged by version 1 does not move it.
    drift.start("a", 2, "v2")
    m.drift("a", drift.monitor("a"))
    assert part(1, 100.0)["flag"] is None and drift.state("a") == dict(drift.state("a"), flag=False, parts=0)
    assert _samples(m.text().decode())[("dinopatch_drift_flag", (("model", "a"),))] == 0
    for _ in range(10):
        part(2, 100.0)
    values = _samples(m.text().decode())
    assert values[("dinopatch_drift_flag", (("model", "a"),))] == 1
    assert values[("dinopatch_drift_flags_total", (("model", "a"),))] == 2
    assert values[("dinopatch_drift_cusum", (("chart", "brightness-"), ("model", "a")))] > 12


def _samples(text: str) -> dict:
    from prometheus_client.parser import text_string_to_metric_families

    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


# ----------------------------------------------------------------------------- over HTTP

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def service(models, tmp_path_factory):
    """``url`` of a service of the four models (a copy of the folder: the tests replace files in it)."""
    import ray
    from ray import serve

    folder, onnx, _ = models
    served = tmp_path_factory.mktemp("served")
    for f in folder.iterdir():
        _copy(f, served / f.name)
    config = ServiceConfig(models=[served], engine=str(onnx), replicas=2, num_cpus=0.5, max_models=4,
                           poll_s=0.2, max_batch=8, batch_wait_ms=10, timeout_s=TIMEOUT_S, token=TOKEN)
    # Its own Ray, on loopback, even where another is running on this machine.
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             _node_ip_address="127.0.0.1")
    try:
        yield deploy(config, "127.0.0.1", _free_port()), served
    finally:
        serve.shutdown()
        ray.shutdown()


def call(url: str, path: str, body: bytes | None = None, method: str | None = None, raw: bool = False):
    req = urllib.request.Request(url + path, data=body, method=method, headers={"Authorization": f"Bearer {TOKEN}"})
    try:
        with urllib.request.urlopen(req, timeout=CLIENT_TIMEOUT) as r:
            data = r.read()
            return r.status, data.decode() if raw else json.loads(data)
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_models_listed_routed_by_name_and_swapped_under_load(service, models):
    """4 part numbers served at once by 4 clients, each calling all four; bolt's file replaced mid-run (first
    half-written): no request fails, the switch shows in bolt's model ids, every answer is ``predict``'s."""
    url, served = service
    folder, onnx, spare = models
    refs = {}
    for f in [*folder.iterdir(), spare]:
        det = DinoPatch.load(f, engine=str(onnx), progress=False)
        refs[det.model_id] = det
    status, listing = call(url, "/models")
    assert status == 200
    assert {m["name"]: m["version"] for m in listing["models"]} == {"bolt": 1, "gear": 1, "nut": 1, "screw": 1}
    assert not any("/" in str(v) for m in listing["models"] for v in m.values())  # never a path
    assert all(m["checks"]["golden"]["flips"] == 0 and m["refused"] is None for m in listing["models"])
    old_bolt = next(m["model_id"] for m in listing["models"] if m["name"] == "bolt")
    new_bolt = DinoPatch.load(spare).model_id
    assert new_bolt != old_bolt
    status, info = call(url, "/model/bolt")
    assert status == 200 and (info["name"], info["version"], info["model_id"]) == ("bolt", 1, old_bolt)
    assert info["max_models"] == 4 and info["torch_imported"] is False
    status, answer = call(url, "/predict", b"x")
    assert status == 404 and "name one" in answer["error"]
    assert call(url, "/predict/cog", b"x")[0] == 404
    before = _samples(call(url, "/metrics", raw=True)[1])

    ims = screws("good", 3, seed=31) + screws("missing_washer", 1, seed=32)
    bodies = [cv2.imencode(".png", im)[1].tobytes() for im in ims]
    expected = {mid: det.predict(ims) for mid, det in refs.items()}
    answers: list[tuple[str, int, int, dict]] = []
    failures: list[BaseException] = []
    lock = threading.Lock()

    def client(names: list[str], n: int):
        for k in range(n):
            name, i = names[k % len(names)], k % len(ims)
            try:
                status, rec = call(url, f"/predict/{name}", bodies[i])
            except Exception as e:  # noqa: BLE001  (a client timeout is a hung request)
                failures.append(e)
                return
            with lock:
                answers.append((name, i, status, rec))

    names = ["screw", "bolt", "nut", "gear"]
    plan = [(names[k:] + names[:k], 28) for k in range(4)]
    threads = [threading.Thread(target=client, args=p) for p in plan]
    for t in threads:
        t.start()
    time.sleep(1.0)
    bolt = served / "bolt.npz"
    bolt.write_bytes(spare.read_bytes()[:4000])  # a copy still being written
    time.sleep(0.6)
    os.replace(_copy(spare, served / "bolt.part"), bolt)
    deadline = time.monotonic() + 180  # the whole run is bounded, whatever the service does
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    assert not any(t.is_alive() for t in threads), "clients still waiting after 180 s"
    assert not failures, failures
    assert len(answers) == sum(n for _, n in plan)
    assert all(status == 200 for _, _, status, _ in answers), [a for a in answers if a[2] != 200][:3]
    for name, i, _, rec in answers:
        assert rec["model"] == name
        ref = expected[rec["model_id"]][i]
        assert rec["score"] == pytest.approx(ref.score, rel=RTOL) and rec["is_anomaly"] == ref.is_anomaly
        assert rec["threshold"] == ref.threshold
    bolt_ids = [rec["model_id"] for name, _, _, rec in answers if name == "bolt"]
    assert set(bolt_ids) == {old_bolt, new_bolt}  # the switch is in the answers
    assert {rec["model_version"] for name, _, _, rec in answers if name == "bolt"} == {1, 2}
    status, listing = call(url, "/models")
    assert {m["name"]: m["version"] for m in listing["models"]} == {"bolt": 2, "gear": 1, "nut": 1, "screw": 1}

    # The counts moved by what was sent: per model, per status, per verdict.
    after = _samples(call(url, "/metrics", raw=True)[1])

    def moved(key):
        return after.get(key, 0) - before.get(key, 0)

    for model in names:
        sent = [rec for name, _, _, rec in answers if name == model]
        assert moved(("dinopatch_requests_total", (("model", model), ("status", "200")))) == len(sent)
        assert sum(moved(("dinopatch_verdicts_total", (("model", model), ("verdict", v))))
                   for v in ("good", "anomaly", "unaligned")) == len(sent)
        assert moved(("dinopatch_request_seconds_count", (("model", model),))) == len(sent)
    anomalies = sum(rec["is_anomaly"] and rec["aligned"] for name, _, _, rec in answers if name == "nut")
    assert moved(("dinopatch_verdicts_total", (("model", "nut"), ("verdict", "anomaly")))) == anomalies
    assert moved(("dinopatch_model_swaps_total", (("model", "bolt"), ("result", "done")))) == 1
    assert moved(("dinopatch_model_swaps_total", (("model", "bolt"), ("result", "refused")))) >= 1
    assert after[("dinopatch_model_version", (("model", "bolt"),))] == 2


def test_reload_route_checks_before_it_swaps(service, models):
    url, served = service
    folder, _, _ = models
    nut = served / "nut.npz"
    original = DinoPatch.load(nut).model_id
    for path, method in (("/models/nut/reload", "POST"), ("/metrics", "GET"), ("/models", "GET")):
        req = urllib.request.Request(url + path, data=b"" if method == "POST" else None, method=method)
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(req, timeout=CLIENT_TIMEOUT)
        assert e.value.code == 401  # the token is asked for
    status, answer = call(url, "/models/nut/reload", b"", "POST")
    assert status == 200 and answer["swapped"] is False and answer["model_id"] == original
    assert call(url, "/models/nut/reload", None, "GET")[0] == 405
    assert call(url, "/models/cog/reload", b"", "POST")[0] == 404
    # Bytes that fail the checks: 422, and the old version answers on.
    os.replace(_copy(folder / "screw.npz", served / "nut.part"), served / "nut.part2")
    data = bytearray((served / "nut.part2").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (served / "nut.part2").write_bytes(bytes(data))
    os.replace(served / "nut.part2", nut)
    status, answer = call(url, "/models/nut/reload", b"", "POST")
    assert status == 422 and "stays in service" in answer["error"]
    im = cv2.imencode(".png", screws("good", 1, seed=41)[0])[1].tobytes()
    status, rec = call(url, "/predict/nut", im)
    assert status == 200 and rec["model_id"] == original
    # A well-formed file whose golden set the service's engine does not reproduce: kept out, and said so.
    os.replace(_golden_flipped(folder / "screw.npz", served / "nut.part"), nut)
    status, answer = call(url, "/models/nut/reload", b"", "POST")
    assert status == 422 and "verdict flip(s) on the golden set" in answer["error"]
    assert (answer["in_service"]["version"], answer["in_service"]["model_id"]) == (1, original)
    assert answer["refused"]["sha256"] == hashlib.sha256(nut.read_bytes()).hexdigest()
    entry = next(m for m in call(url, "/models")[1]["models"] if m["name"] == "nut")
    assert entry["version"] == 1 and entry["refused"] == answer["refused"]
    assert call(url, "/predict/nut", im)[1]["model_id"] == original
    # The model file's own check is the one applied: a good file swaps in at once.
    os.replace(_copy(folder / "screw.npz", served / "nut.part"), nut)
    status, answer = call(url, "/models/nut/reload", b"", "POST")
    # (The file watcher may have swapped it in first: then the reload finds it in service.)
    assert status == 200 and answer["version"] == 2 and answer["model_id"] == DinoPatch.load(nut).model_id
    assert call(url, "/predict/nut", im)[1]["model_id"] == answer["model_id"]
    assert next(m for m in call(url, "/models")[1]["models"] if m["name"] == "nut")["refused"] is None


def test_grafana_dashboard_asks_only_for_series_the_service_has():
    import re
    from pathlib import Path

    dash = json.loads((Path(__file__).resolve().parent.parent / "export" / "grafana_dashboard.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    m = ServiceMetrics(["a"])
    m.answered("a", 500, 0.1)
    m.in_service("a", 1)
    exposed = {name for name, _ in _samples(m.text().decode())}
    asked = {n for e in exprs for n in re.findall(r"\bdinopatch_\w+", e)}
    assert asked and asked <= exposed, asked - exposed
    # Every panel of every kind of count: requests, errors, verdicts, latency, batches, versions, swaps.
    for family in ("requests", "errors", "verdicts", "request_seconds", "batch_images", "model_version", "swaps"):
        assert any(family in n for n in asked), family
