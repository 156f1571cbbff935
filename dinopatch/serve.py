"""``python -m dinopatch serve``: DinoPatch models behind HTTP, as a Ray Serve application.

Two deployments.  :class:`Scorer` replicas each hold up to ``max_models``
models within a ``memory`` budget (:mod:`dinopatch.loaded_models`: loaded on
first use, least recently used dropped), decode and check the images they
are sent, and score them in dynamic batches per model (``@serve.batch``).  One :class:`Gateway` takes the
HTTP requests from Ray Serve's proxies: it keeps the version of each model in
service (:mod:`dinopatch.catalog`), caps the request size, bounds every
request by a deadline (503 when it passes), retries a request whose replica
died on another one, counts (:mod:`dinopatch.serve_metrics`) and answers JSON.

HTTP (``{name}`` is a model's part number in a manifest, else its file's name without ``.npz``):

- ``POST /predict/{name}`` (``POST /predict`` when the service has one model): the body is a PNG or JPEG
  file, or raw uint8 pixels with ``?shape=H,W`` or ``?shape=H,W,C`` (C = 1, 3 for BGR, or 4 for BGRA).
  Query: ``mask=1`` adds the defect mask as a base64 PNG (0/255, the input's
  size); ``timeout_s=T`` shortens the server's deadline for this request.
  Answers ``score``, ``is_anomaly``, ``aligned``, ``reason``, ``threshold``,
  ``threshold_source``, ``model``, ``model_id`` and ``model_version`` (the version that judged the image),
  ``latency_ms``, ``batch`` (how many images were scored together) and ``drift`` (``{"flag", "reason"}``:
  the drift monitor of the model's version in service, :mod:`dinopatch.serve_drift`).  A non-finite
  score or threshold is ``null``.
- ``GET /models``: each model's name, id, version number, SHA-256, file time, what its checks found
  (``checks``: golden frames and flips, estimated resident bytes), the last new file refused since
  (``refused``: its SHA-256, why and when) and drift state; never a path.
- ``GET /model/{name}`` (``/model`` with one model): model id and version, DinoPatch version, threshold and
  its source, backbone, image size, engine name and the service's limits; never a path of the serving machine.
- ``POST /models/{name}/reload``: check the model file now and swap it in (422 with ``error``, the version
  ``in_service`` and the ``refused`` record when it fails its checks: the old version stays).  The gateway
  also looks at the files every ``poll_s`` and swaps a changed one.
- ``GET /metrics``: the counts in Prometheus' text format.
- ``GET /health``: 200 when a scorer replica answers, else 503.

A swap checks the new file's bytes before any request goes to them
(:func:`dinopatch.catalog.check_version`: the model file's checks, its golden
set run again with the replicas' engine with zero verdict flips, its
estimated size within the memory budget); requests sent before the swap are
answered by the old version, later ones by the new, which each replica loads
beside the old (checking the golden set on its own engine) before using it.

Who is calling: with a token (``$DINOPATCH_TOKEN`` or ``--token-file``), every
route but ``/health`` answers 401 unless the request carries
``Authorization: Bearer <token>``; only the token's SHA-256 travels to the
replicas.  The command refuses to listen on a host that is not loopback
without a token.  A local Ray it starts has its node on loopback and no
dashboard.  A model key (``$DINOPATCH_MODEL_KEY``) set where the command runs
goes to every scorer replica through Ray's runtime environment, and a replica
of such a deployment that has no key to verify the model with refuses to
start.

Errors answer ``{"error": message}``: 400 malformed, 404/405 wrong route or
method, 413 too large (bytes or pixels), 415 neither PNG, JPEG nor raw, 422
decoded but not scorable, 503 no answer before the deadline or overloaded,
500 a bug.

This module imports Ray only where it is used.  Answers are the records of
:mod:`dinopatch.records`, as ``predict`` writes them; request bodies are
decoded by :mod:`dinopatch.request_images`.  Replicas stay
torch-free: only ONNX engines are accepted.
"""
from __future__ import annotations

import argparse
import ipaddress
import logging
import math
import os
import signal
import sys
import time
from dataclasses import InitVar, dataclass, field
from pathlib import Path

import numpy as np

from . import __version__, params
from .backbone import TORCH_FREE_ENGINES, canonical_engine
from .catalog import CatalogError, ModelVersion, check_version, load_bytes, model_files
from .gateway import Gateway, token_digest
from .loaded_models import LoadedModels, ModelUnavailableError
from .memory_budget import size_argument
from .modelfile import KEY_ENV
from .request_images import RequestError, decode_image, image_size  # noqa: F401 (the service's API)

APP_NAME = "dinopatch"
# A resource only Ray's head node has.
HEAD_NODE = "node:__internal_head__"
# The bearer token clients must send, when no --token-file is given.
TOKEN_ENV = "DINOPATCH_TOKEN"

log = logging.getLogger("dinopatch.serve")


# ----------------------------------------------------------------------------- the service

@dataclass
class ServiceConfig:
    """What ``python -m dinopatch serve`` runs.

    Attributes:
        models: model files, folders of them (every ``*.npz`` inside) or manifests (``*.json``, see
            :mod:`dinopatch.catalog`), readable where the command runs; one name per model (its part number, or
            its file's stem).  Resolved to ``{name: absolute path}`` in ``files``.
        engine: a name of :data:`dinopatch.backbone.TORCH_FREE_ENGINES` (ONNX Runtime or OpenVINO)
            or an ``.onnx`` export (readable on every node); never torch, nor ``"auto"``, which may pick it.
        kernel: the distance kernel (``"auto"``, ``"cpp"``, ...).
        replicas: scorer replicas, each holding up to ``max_models`` models.
        max_models: models a replica keeps loaded; beyond, the least recently used is dropped.
        memory: bytes a replica's loaded models may take, by their estimated resident size
            (:mod:`dinopatch.memory_budget`; None: no bound); beyond, the least recently used are dropped,
            and a model larger than the whole budget is refused.
        poll_s: how often the model files are looked at for a new version.
        num_cpus: CPUs Ray reserves for each scorer replica.
        max_batch: most images scored in one backbone call.
        batch_wait_ms: how long a replica waits for a batch to fill.
        timeout_s: deadline of a request; 503 when it passes.
        max_bytes: largest request body (413 beyond).
        max_pixels: largest image, in pixels (413 beyond).
        token: the bearer token clients must send (None: anyone may call); only its SHA-256 is kept.
        signed: the models must be signed (default: whether ``$DINOPATCH_MODEL_KEY`` is set here);
            a replica without the key refuses to start.
    """

    models: str | list[str]
    engine: str = "onnx"
    kernel: str = "auto"
    replicas: int = 1
    max_models: int = 4
    memory: int | None = None
    poll_s: float = 1.0
    num_cpus: float = 1.0
    max_batch: int = 8
    batch_wait_ms: float = 10.0
    timeout_s: float = 30.0
    max_bytes: int = 32 << 20
    max_pixels: int = 40_000_000
    token: InitVar[str | None] = None
    token_sha256: str | None = None
    signed: bool | None = None
    files: dict[str, str] = field(default_factory=dict, init=False)

    def __post_init__(self, token):
        if token is not None:
            if not isinstance(token, str) or not token.strip():
                raise ValueError("the token must be a non-empty string")
            self.token_sha256 = token_digest(token)
        if self.signed is None:
            self.signed = os.environ.get(KEY_ENV) is not None
        if isinstance(self.models, (str, os.PathLike)):
            self.models = [self.models]
        # Absolute, because the gateway may start in another folder.
        self.models = [os.path.abspath(m) for m in self.models]
        self.files = model_files(self.models)
        try:
            self.engine = canonical_engine(self.engine)
        except ValueError:
            pass  # refused below, with the service's own choices
        if self.engine not in TORCH_FREE_ENGINES and not self.engine.endswith(".onnx"):
            raise ValueError(f"the service runs without torch: engine must be one of {TORCH_FREE_ENGINES} or an "
                             f".onnx export, got {self.engine!r}")
        if self.engine.endswith(".onnx"):
            self.engine = os.path.abspath(self.engine)
        for name in ("replicas", "max_models", "max_batch", "max_bytes", "max_pixels"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        for name in ("timeout_s", "poll_s"):
            value = getattr(self, name)
            if not (value > 0 and math.isfinite(value)):
                raise ValueError(f"{name} must be a positive number of seconds, got {value}")
        if not 0 <= self.batch_wait_ms <= 1000 * self.timeout_s:
            raise ValueError(f"batch_wait_ms must be in [0, timeout], got {self.batch_wait_ms}")
        if self.memory is not None and (isinstance(self.memory, bool) or not isinstance(self.memory, (int, np.integer))
                                        or self.memory < 1):
            raise ValueError(f"memory must be a number of bytes >= 1 (None: no budget), got {self.memory!r}")
        if self.num_cpus < 0:
            raise ValueError(f"num_cpus must be >= 0, got {self.num_cpus}")

    @property
    def runtime(self) -> dict:
        """How replicas run a model: :meth:`DinoPatch.load`'s keywords."""
        return {"engine": self.engine, "kernel": self.kernel, "batch_size": self.max_batch}


class Scorer:
    """A Ray Serve replica: decodes, checks and scores images with the models it holds, in dynamic batches."""

    def __init__(self, config: ServiceConfig):
        from ray import serve

        if config.signed and not os.environ.get(KEY_ENV):
            raise RuntimeError(f"this deployment serves signed models, but {KEY_ENV} is not set where this replica "
                               "runs: it cannot verify the model and refuses to start")
        self.config = config
        # Batched per model, with the sizes of this service.
        batch = serve.batch(max_batch_size=config.max_batch, batch_wait_timeout_s=config.batch_wait_ms / 1e3)
        self.models = LoadedModels(self._load, batch, config.max_models, config.memory)

    def _load(self, version: ModelVersion):
        """The detector of ``version``, checked and with its engine running (a worker thread runs this)."""
        import ray

        data = version.data if isinstance(version.data, bytes) else ray.get(version.data)
        # Strict: this replica's engine must reproduce the golden set too (it may run on another machine than
        # the gateway that checked the version).
        det = load_bytes(data, strict=True, **self.config.runtime)
        if det.model_id != version.model_id:
            raise RuntimeError(f"{version.name}: version {version.number} is model {version.model_id}, "
                               f"its bytes load as {det.model_id}")
        # Load the engine now: a model that cannot run fails here, before any request is queued on it.
        det.predict([np.zeros((det.image_size,) * 2, np.uint8)])
        return det

    async def predict(self, version: ModelVersion, body: bytes, shape: str | None, mask: bool) -> dict:
        """``{"status": HTTP status, "body": JSON}`` for one request body, scored by ``version`` or a newer one."""
        try:
            image = decode_image(body, shape, self.config.max_pixels)
        except RequestError as e:
            return {"status": e.status, "body": {"error": e.message}}
        model = await self._model(version)
        if isinstance(model, dict):
            return model
        record = await model.predict((image, mask))
        if record["error"] is not None:
            return {"status": 422, "body": {"error": f"the image could not be scored: {record['error']}"}}
        return {"status": 200, "body": dict(record, model=version.name, model_id=model.det.model_id)}

    async def _model(self, version: ModelVersion):
        """The loaded model for ``version``, or the 503 answer where this replica cannot run it."""
        try:
            return await self.models.get(version)
        except ModelUnavailableError as e:
            return {"status": 503, "body": {"error": str(e)}}

    async def info(self, version: ModelVersion) -> dict:
        """``{"status", "body"}`` of ``GET /model``."""
        model = await self._model(version)
        if isinstance(model, dict):
            return model
        det = model.det
        # Names, never paths: a caller learns nothing of the serving machine's folders.
        return {"status": 200, "body": {"backbone": det.backbone, "image_size": det.image_size, "align": det.align,
                "engine": Path(os.fspath(det.engine)).name, "kernel": det.kernel, "threshold": det.threshold_.image,
                "threshold_source": det.threshold_.describe(), **version.describe(),
                "signed": self.config.signed, "dinopatch_version": __version__,
                "torch_imported": "torch" in sys.modules, "replicas": self.config.replicas,
                "max_models": self.config.max_models, "memory": self.config.memory,
                "max_batch": self.config.max_batch,
                "batch_wait_ms": self.config.batch_wait_ms, "timeout_s": self.config.timeout_s,
                "max_bytes": self.config.max_bytes, "max_pixels": self.config.max_pixels}}

    def ping(self) -> bool:
        return True


def is_loopback(host: str) -> bool:
    """Whether ``host`` is a loopback address (or ``localhost``)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def read_token(token_file: str | None) -> str | None:
    """The bearer token: the first line of ``token_file``, else ``$DINOPATCH_TOKEN``, else None."""
    if token_file is None:
        token = os.environ.get(TOKEN_ENV)
    else:
        lines = Path(token_file).read_text().splitlines()
        token = lines[0] if lines else ""
    if token is not None and not token.strip():
        raise ValueError(f"the token ({token_file or TOKEN_ENV}) is empty")
    return None if token is None else token.strip()


def build_app(config: ServiceConfig):
    """The Ray Serve application of ``config``: a :class:`Gateway` in front of :class:`Scorer` replicas."""
    from ray import serve

    options = {"num_cpus": config.num_cpus}
    gateway_options = {"num_cpus": 0}
    key = os.environ.get(KEY_ENV)
    if config.signed and key:
        # The gateway checks each version and every replica verifies it with the key of this deployment,
        # on whichever node Ray starts them.
        options["runtime_env"] = gateway_options["runtime_env"] = {"env_vars": {KEY_ENV: key}}
    scorer = serve.deployment(
        Scorer, name="Scorer", num_replicas=config.replicas,
        ray_actor_options=options,
        # Enough requests in a replica to fill a batch while the previous one runs; beyond a few batches
        # per replica waiting, a flood is answered 503 at once instead of holding bodies until the deadline.
        max_ongoing_requests=2 * config.max_batch, max_queued_requests=8 * config.max_batch * config.replicas,
        # A replica that cannot start fails the deployment quickly instead of retrying for minutes.
        max_constructor_retry_count=2,
        # A lost replica is noticed in seconds (the check runs beside the scoring, not behind it).
        health_check_period_s=2)
    # One gateway: it holds the model versions in service and the service's counts.
    # On the head node, which lives as long as the cluster: losing a worker node loses scorers, never the
    # versions in service (their bytes belong to the gateway) nor the counts.
    gateway_options["resources"] = {HEAD_NODE: 0.001}
    gateway = serve.deployment(Gateway, name="Gateway", ray_actor_options=gateway_options,
                               max_ongoing_requests=16 * config.max_batch * config.replicas)
    return gateway.bind(scorer.bind(config), config)


def deploy(config: ServiceConfig, host: str = "127.0.0.1", port: int = 8000, proxies: str = "EveryNode") -> str:
    """Start Ray Serve's HTTP proxies and run the application on the Ray that is connected; its URL.

    ``proxies``: ``"EveryNode"`` (each machine of a cluster answers on ``host:port``) or ``"HeadOnly"``
    (one proxy: nodes that share a machine, as in tests, would otherwise claim one port twice).

    The proxy's own request timeout is a backstop a little after the
    gateway's deadline (it answers 408, and clients can lift it with a header).
    """
    from ray import serve

    serve.start(proxy_location=proxies,
                http_options={"host": host, "port": int(port), "request_timeout_s": config.timeout_s + 10})
    serve.run(build_app(config), name=APP_NAME, route_prefix="/")
    return f"http://{host}:{port}"


def check_models(config: ServiceConfig) -> None:
    """Check every model of ``config`` here as a swap checks a new version (:func:`check_version`: the file,
    the golden set on the service's engine, the memory budget), or SystemExit saying which and why.

    Run where the command starts, so that a wrong file fails in seconds
    instead of after Ray has started a gateway that cannot check it.
    """
    from .engine_choice import EngineMismatchError

    if config.engine.endswith(".onnx") and not Path(config.engine).is_file():
        raise SystemExit(f"dinopatch: {config.engine}: no such ONNX export "
                         "(make one with `python -m dinopatch export`)")
    for name, path in config.files.items():
        try:
            check_version(name, Path(path).read_bytes(), config.runtime, config.memory)
        except (OSError, ValueError, EngineMismatchError) as e:
            raise SystemExit(f"dinopatch: {path}: {e}") from None


def main(argv: list[str] | None = None) -> int:
    """``python -m dinopatch serve``: run the service until Ctrl-C or SIGTERM."""
    defaults = ServiceConfig.__dataclass_fields__
    p = argparse.ArgumentParser(prog="python -m dinopatch serve",
                                description="Serve DinoPatch models over HTTP with Ray Serve.")
    p.add_argument("models", nargs="*", metavar="MODEL", help="model files, folders of them (*.npz), or manifests "
                   "(*.json: {\"models\": {\"PART-NUMBER\": \"file.npz\", ...}}, paths from the manifest's folder); "
                   "each is served as POST /predict/{its part number, or its file name without .npz}")
    p.add_argument("-m", "--model", action="append", default=[], help="a model file (as MODEL; may repeat)")
    p.add_argument("--max-models", type=int, default=defaults["max_models"].default,
                   help="models a replica keeps loaded; beyond, the least recently used is dropped")
    p.add_argument("--memory", type=size_argument, default=None, metavar="SIZE",
                   help="memory a replica's models may take by their estimated size (file arrays, engine, one "
                   "batch), e.g. 2GB or 1.5GiB; beyond, the least recently used are dropped (default: no bound)")
    p.add_argument("--poll-s", type=float, default=defaults["poll_s"].default,
                   help="how often the model files are looked at: a changed file is checked and swapped in")
    p.add_argument("--replicas", type=int, default=defaults["replicas"].default, help="scorer replicas")
    p.add_argument("--host", default="127.0.0.1", help="address the HTTP proxies listen on (0.0.0.0: all; "
                   "a host that is not loopback needs a token)")
    p.add_argument("--token-file", help=f"a file whose first line is the bearer token clients must send "
                   f"(default: ${TOKEN_ENV}; none: anyone on the host may call)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-batch", type=int, default=defaults["max_batch"].default, help="images per backbone call")
    p.add_argument("--batch-wait-ms", type=float, default=defaults["batch_wait_ms"].default,
                   help="how long a replica waits for a batch to fill")
    p.add_argument("--address", help="join this Ray cluster (HOST:6379, or 'auto'); default: start a local Ray")
    params.add_flags(p, ["engine", "kernel"], defaults={"engine": defaults["engine"].default},
                     helps={"engine": f"{', '.join(TORCH_FREE_ENGINES)} or an .onnx export (on every node)"})
    p.add_argument("--timeout-s", type=float, default=defaults["timeout_s"].default,
                   help="deadline of a request; 503 after it")
    p.add_argument("--max-mb", type=float, default=defaults["max_bytes"].default / 2**20,
                   help="largest request body in MiB; 413 beyond")
    p.add_argument("--max-pixels", type=int, default=defaults["max_pixels"].default,
                   help="largest image in pixels; 413 beyond")
    p.add_argument("--num-cpus", type=float, default=defaults["num_cpus"].default,
                   help="CPUs Ray reserves for each replica")
    args = p.parse_args(argv)
    try:
        token = read_token(args.token_file)
    except (OSError, ValueError) as e:
        print(f"dinopatch: error: --token-file: {e}", file=sys.stderr)
        return 2
    if token is None and not is_loopback(args.host):
        print(f"dinopatch: error: --host {args.host} is not loopback: anyone who reaches it could call the service; "
              f"set {TOKEN_ENV} or give --token-file", file=sys.stderr)
        return 2
    try:
        config = ServiceConfig(models=args.models + args.model, engine=args.engine, kernel=args.kernel,
                               replicas=args.replicas,
                               num_cpus=args.num_cpus, max_batch=args.max_batch, batch_wait_ms=args.batch_wait_ms,
                               timeout_s=args.timeout_s, max_bytes=int(args.max_mb * 2**20),
                               max_pixels=args.max_pixels, token=token, max_models=args.max_models,
                               memory=args.memory,
                               poll_s=args.poll_s)
    except CatalogError as e:
        raise SystemExit(f"dinopatch: {e}") from None
    except ValueError as e:
        p.error(str(e))
    check_models(config)

    import ray
    from ray import serve

    # A local Ray keeps its node on loopback, without a dashboard: only the HTTP proxy listens on --host.
    if args.address:
        ray.init(address=args.address)
    else:
        ray.init(_node_ip_address="127.0.0.1", include_dashboard=False)
    # SIGTERM (a service manager stopping us) takes the same way out as Ctrl-C.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        url = deploy(config, args.host, args.port)
        print(f"serving {', '.join(config.files)} at {url} with {config.replicas} replica(s): "
              "POST /predict/{name}, GET /models, GET /metrics, GET /health; Ctrl-C stops", flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        return 0
    except RuntimeError as e:  # serve.run: the application failed to deploy
        print(f"dinopatch: the service did not start: {e}", file=sys.stderr)
        return 1
    finally:
        # On a shared cluster only our application goes; a local Ray goes entirely.
        if args.address:
            serve.delete(APP_NAME)
        else:
            serve.shutdown()
        ray.shutdown()
