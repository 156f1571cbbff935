"""``python -m dinopatch.bench serve``: the HTTP service against in-process predict, same model and engine.

In the group ``scale``, which runs only when named (it starts Ray).

One scorer replica holds all the CPUs (as the in-process detector does);
clients send PNG frames over HTTP from threads of this process, which
therefore share the CPUs with the service, as an on-line camera PC would.
The service holds four models of the same backbone (fitted on different
good frames), as a line with several part numbers would.  Rows: in-process
``predict`` one frame a call and ``--batch`` frames a call, then 1, 4 and 8
concurrent clients all on one model, then 4 clients each on its own model
(four batch queues in the one replica), measured round robin (8 frames each
way a round, ``--repeats`` rounds after one to warm up).
``ms_per_image`` is the median latency of a call or request (p50);
``images_s`` counts frames per second of wall time.
"""
from __future__ import annotations

import json
import os
import socket
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from ..registry import stage

CLIENTS = (1, 4, 8)
# Models the service holds; the last row sends each client to its own.
MODELS = 4


def _row(method: str, seconds: list[float], images_s: float, **extra) -> dict:
    ms = np.asarray(seconds) * 1e3
    return {"stage": "serve", "method": method, "ms_per_image": float(np.median(ms)),
            "ms_p50": float(np.percentile(ms, 50)), "ms_p95": float(np.percentile(ms, 95)),
            "ms_p99": float(np.percentile(ms, 99)), "images_s": images_s, **extra}


def _post(url: str, body: bytes) -> dict:
    req = urllib.request.Request(url, data=body, method="POST")
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.loads(r.read())


def _clients(urls: list[str], bodies: list[bytes], clients: int,
             per_client: int) -> tuple[list[float], float, int, list[int]]:
    """Latencies, wall seconds, frames and batch sizes of ``clients`` threads sending ``per_client`` frames each.

    Client ``c`` sends to ``urls[c % len(urls)]`` (one model's route each).
    """
    lat: list[float] = []
    batches: list[int] = []
    lock = threading.Lock()

    def run(c: int):
        for k in range(per_client):
            t0 = time.perf_counter()
            rec = _post(urls[c % len(urls)], bodies[(c + k) % len(bodies)])
            with lock:
                lat.append(time.perf_counter() - t0)
                batches.append(rec["batch"])

    threads = [threading.Thread(target=run, args=(c,)) for c in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return lat, time.perf_counter() - t0, len(lat), batches


def _in_process(det, frames: list[np.ndarray], per_call: int) -> tuple[list[float], float, int, list[int]]:
    """Like :func:`_clients` for ``predict`` in this process, ``per_call`` frames a call."""
    lat = []
    t0 = time.perf_counter()
    for i in range(0, len(frames), per_call):
        t = time.perf_counter()
        det.predict(frames[i:i + per_call])
        lat.append(time.perf_counter() - t)
    return lat, time.perf_counter() - t0, len(frames), [per_call] * len(lat)


@dataclass
class _Tally:
    """One way of scoring over the rounds."""

    latencies: list[float] = field(default_factory=list)
    wall: float = 0.0
    frames: int = 0
    batches: list[int] = field(default_factory=list)

    def add(self, latencies: list[float], wall: float, frames: int, batches: list[int]) -> None:
        self.latencies += latencies
        self.wall += wall
        self.frames += frames
        self.batches += batches


@stage("serve", groups=("scale",))
def bench_serve(args) -> list[dict]:
    """HTTP throughput and p50 / p99 latency at 1, 4 and 8 clients on one model and 4 on four, beside predict."""
    try:
        import ray
        from ray import serve
    except ImportError:
        return [{"stage": "serve", "method": "not measured: Ray Serve is not installed (pip install "
                 "'dinopatch[serve]')"}]

    from ...backbone.onnx_export import export_onnx
    from ...detector import DinoPatch
    from ...serve import ServiceConfig, deploy
    from ...synthetic import make_images

    frames = make_images("screw", "good", 16, seed=3)
    bodies = [cv2.imencode(".png", f)[1].tobytes() for f in frames]
    per_round = 8  # frames each way of scoring takes per round
    cpus = os.cpu_count() or 1
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "models"
        folder.mkdir()
        for m in range(MODELS):
            det = DinoPatch(backbone=args.backbone, weights="random", image_size=args.image_size, engine="torch",
                            batch_size=args.batch, progress=False).fit(make_images("screw", "good", args.bank,
                                                                                   seed=1 + m))
            det.save(folder / f"part{m}.npz")
        model = folder / "part0.npz"
        onnx = export_onnx(det.backbone, "random", det.image_size, out=Path(tmp) / "backbone.onnx", seed=det.seed)
        peer = DinoPatch.load(model, engine=str(onnx), batch_size=args.batch, progress=False)
        ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)
        try:
            config = ServiceConfig(models=folder, engine=str(onnx), replicas=1, num_cpus=cpus, max_batch=args.batch,
                                   max_models=MODELS, timeout_s=600)
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            url = deploy(config, "127.0.0.1", port)
            ways = {"in-process predict, 1 frame a call": lambda: _in_process(peer, frames[:per_round], 1),
                    f"in-process predict, {args.batch} frames a call":
                        lambda: _in_process(peer, frames[:per_round], args.batch)}
            one = [f"{url}/predict/part0"]
            for c in CLIENTS:
                ways[f"HTTP, {c} client{'s' if c > 1 else ''}, 1 model"] = \
                    lambda c=c: _clients(one, bodies, c, max(1, per_round // c))
            each = [f"{url}/predict/part{m}" for m in range(MODELS)]
            ways[f"HTTP, {MODELS} clients, {MODELS} models"] = \
                lambda: _clients(each, bodies, MODELS, max(1, per_round // MODELS))
            tallies = {name: _Tally() for name in ways}
            # Round robin, so that a noisy neighbour slows every way alike; the first round warms up.
            for r in range(max(1, args.repeats) + 1):
                for name, way in ways.items():
                    result = way()
                    if r:
                        tallies[name].add(*result)
        finally:
            serve.shutdown()
            ray.shutdown()
    rows = [_row(name, t.latencies, t.frames / t.wall, batch=f"{np.mean(t.batches):.1f}")
            for name, t in tallies.items()]
    strong = max(r["images_s"] for r in rows if r["method"].startswith("in-process"))
    for r in rows:
        r["note"] = f"{r['images_s'] / strong:.2f}x the faster in-process throughput"
    rows[1]["note"] += "; latency of the whole call"
    for r in rows[2:]:
        r["note"] += "; batch = mean images a replica scored together"
    return rows
