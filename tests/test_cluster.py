"""The service and the archive on Ray's own multi-node test cluster: two raylets on loopback, one CPU each.

Service: the scorer replicas (one CPU each) can only sit one on each node;
the gateway and the one HTTP proxy sit on the head.  The model reaches the
worker node through Ray's object store, not its disk.  Removing the worker
node under load must give only 200 answers, or 503 with Retry-After, and the
answers must go on from the head's replica.

Archive: two engines (one CPU each) score on both nodes, the model's bytes
taken from the object store; the worker node is removed once the first parts
are written; a second run on the same output scores what is missing and
nothing twice.
"""
import contextlib
import socket
import threading
import time
import urllib.error
import urllib.request

import cv2
import pytest
from conftest import screws

from dinopatch import DinoPatch
from dinopatch.serve import ServiceConfig, deploy

TIMEOUT_S = 8.0
CLIENT_TIMEOUT = TIMEOUT_S + 15
RTOL = 1e-5


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url: str, body: bytes) -> tuple[int, dict, str | None]:
    import json

    req = urllib.request.Request(url + "/predict", data=body, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=CLIENT_TIMEOUT) as r:
            return r.status, json.loads(r.read()), r.headers.get("Retry-After")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read()), e.headers.get("Retry-After")


def _scorer_nodes() -> dict[str, str]:
    """``{replica actor id: node id}`` of the live scorer replicas."""
    import ray

    return {a["ActorID"]: a["Address"]["NodeID"] for a in ray._private.state.actors().values()
            if a["ActorClassName"].endswith("Scorer") and a["State"] == "ALIVE"}


@contextlib.contextmanager
def two_nodes(monkeypatch):
    """``(cluster, worker node)``: a head and a worker of one CPU each on loopback, this process connected."""
    import ray
    from ray import serve
    from ray.cluster_utils import Cluster

    # Ray swaps a loopback address for this machine's "reachable" one, which a test host may not answer on:
    # every node and the driver stay on loopback.
    monkeypatch.setattr("ray._private.services.get_node_ip_address", lambda address=None: "127.0.0.1")
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "node_ip_address": "127.0.0.1",
                                                            "include_dashboard": False})
    try:
        worker = cluster.add_node(num_cpus=1, node_ip_address="127.0.0.1")
        ray.init(address=cluster.address, log_to_driver=False)
        yield cluster, worker
    finally:
        if ray.is_initialized():
            serve.shutdown()
            ray.shutdown()
        cluster.shutdown()


@pytest.mark.slow
def test_service_spread_over_two_nodes_survives_losing_one(onnx_model, monkeypatch):

    model, onnx = onnx_model
    det = DinoPatch.load(model, engine=str(onnx), progress=False)
    [ref] = det.predict(screws("good", 1, seed=51))
    body = cv2.imencode(".png", screws("good", 1, seed=51)[0])[1].tobytes()
    with two_nodes(monkeypatch) as (cluster, worker):
        config = ServiceConfig(models=model, engine=str(onnx), replicas=2, num_cpus=1, timeout_s=TIMEOUT_S)
        url = deploy(config, "127.0.0.1", _free_port(), proxies="HeadOnly")
        nodes = _scorer_nodes()
        assert len(nodes) == 2 and len(set(nodes.values())) == 2  # one replica on each node
        assert worker.node_id in nodes.values()

        answers: list[tuple[float, int, dict, str | None]] = []
        failures: list[BaseException] = []
        stop = threading.Event()

        def client():
            while not stop.is_set():
                t0 = time.monotonic()
                try:
                    answers.append((t0, *_post(url, body)))
                except Exception as e:  # noqa: BLE001  (a client timeout is a hung request)
                    failures.append(e)
                    return

        threads = [threading.Thread(target=client) for _ in range(2)]
        for t in threads:
            t.start()
        time.sleep(2.0)
        t_remove = time.monotonic()
        cluster.remove_node(worker)
        resumed = None
        while resumed is None and time.monotonic() - t_remove < 30:
            resumed = next((t0 for t0, status, _, _ in list(answers) if t0 > t_remove + 1 and status == 200), None)
            time.sleep(0.2)
        stop.set()
        for t in threads:
            t.join(CLIENT_TIMEOUT)
        statuses = [status for _, status, _, _ in answers]
        print(f"{statuses.count(200)} answered 200, {statuses.count(503)} 503; a request sent "
              f"{resumed - t_remove if resumed else None} s after the removal answered 200")
        assert not failures, failures
        assert resumed is not None, "no answer after the node was removed"
        assert {status for _, status, _, _ in answers} <= {200, 503}
        assert all(retry == "1" for _, status, _, retry in answers if status == 503)
        assert any(t0 < t_remove for t0, *_ in answers) and any(t0 > t_remove for t0, *_ in answers)
        for _, status, rec, _ in answers:
            if status == 200:
                assert rec["score"] == pytest.approx(ref.score, rel=RTOL) and rec["model_id"] == det.model_id
        assert set(_scorer_nodes().values()) == {cluster.head_node.node_id}


@pytest.mark.slow
def test_archive_over_two_nodes_with_one_removed_then_rerun(onnx_model, monkeypatch, tmp_path):
    import pyarrow.parquet as pq

    from dinopatch.archive import score_archive

    model, onnx = onnx_model
    ims = screws("good", 40, seed=61) + screws("extra_object", 8, seed=62)
    paths = []
    for i, im in enumerate(ims):
        paths.append(str(tmp_path / "in" / f"{i:03d}.png"))
        (tmp_path / "in").mkdir(exist_ok=True)
        cv2.imwrite(paths[-1], im)
    out = tmp_path / "out"
    det = DinoPatch.load(model, engine=str(onnx), progress=False)
    refs = dict(zip(paths, det.predict(ims)))
    with two_nodes(monkeypatch) as (cluster, worker):
        outcome: list = []

        def first_run():
            try:
                outcome.append(score_archive(tmp_path / "in", model, out, engine=str(onnx), batch_size=2,
                                             workers=2, rows_per_part=4, progress=False))
            except Exception as e:  # noqa: BLE001  (losing a node may end the run: the rerun must finish it)
                outcome.append(e)

        run = threading.Thread(target=first_run)
        run.start()
        t0 = time.monotonic()
        while not list(out.glob("part-*.parquet")) and time.monotonic() - t0 < 60:
            time.sleep(0.1)
        cluster.remove_node(worker)
        run.join(120)
        assert not run.is_alive(), "the run hangs after losing a node"
        before = {p.name: p.stat().st_mtime_ns for p in out.glob("part-*.parquet")}
        assert before
        summary = score_archive(tmp_path / "in", model, out, engine=str(onnx), batch_size=2, workers=1,
                                rows_per_part=4, progress=False)
    print(f"first run: {outcome[0]!r}; parts before the rerun: {len(before)}; rerun: {summary}")
    rows = pq.read_table(out).to_pylist()
    assert sorted(r["path"] for r in rows) == sorted(paths)  # every image once: nothing scored twice
    assert summary["skipped"] == len(paths) - summary["scored"] and summary["scored"] < len(paths)
    # Parts written before the rerun are left as they were.
    assert {n: (out / n).stat().st_mtime_ns for n in before} == before
    for r in rows:
        assert r["error"] is None
        assert r["score"] == pytest.approx(refs[r["path"]].score, rel=RTOL)
