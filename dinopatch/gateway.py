"""The service's HTTP ingress: routes, token, size cap, deadline, retries, model versions and counts.

One :class:`Gateway` replica of :mod:`dinopatch.serve` takes the requests of
Ray Serve's proxies.  It keeps the version of each model in service
(:class:`dinopatch.catalog.ModelCatalog`, swapping in a model file that changes),
sends each image with that version to the scorer replicas, bounds every
request by a deadline, retries one whose replica died on another replica,
counts every answer (:mod:`dinopatch.serve_metrics`) and answers JSON, or
Prometheus text on ``/metrics``.  Routes are listed in :mod:`dinopatch.serve`.
"""
from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import time

from .catalog import CatalogError, ModelCatalog, ModelVersion, check_version
from .request_images import RequestError
from .serve_drift import ServiceDrift
from .serve_metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from .serve_metrics import ServiceMetrics

log = logging.getLogger("dinopatch.serve")


def token_digest(token: str) -> str:
    """The SHA-256 (hex) of a bearer token: all of it that the service keeps."""
    return hashlib.sha256(token.encode()).hexdigest()


class Gateway:
    """The HTTP ingress: routes, size cap, deadline, retries on lost replicas, model versions, metrics, JSON."""

    # A replica lost mid-request is replaced by Serve; the request goes to another one meanwhile.
    ATTEMPTS = 3

    def __init__(self, scorer, config):
        """``scorer``: the handle of the scorer deployment; ``config``: the :class:`dinopatch.serve.ServiceConfig`."""
        import ray

        self.scorer = scorer
        self.config = config
        # The check keeps each version's drift reference; a monitor per model follows the parts answered.
        self.drift = ServiceDrift()
        # Each version's bytes in the object store: replicas on any node fetch them from there.
        self.catalog = ModelCatalog(config.files, self._check, put=ray.put)
        self.metrics = ServiceMetrics(self.catalog.names)
        for name in self.catalog.names:
            self._in_service(self.catalog.current(name))
        self._watcher: asyncio.Task | None = None

    def _check(self, name: str, data: bytes) -> tuple[str, dict]:
        """The catalog's check of a new version (:func:`check_version` with the replicas' engine and budget);
        keeps its drift reference."""
        det, checks = check_version(name, data, self.config.runtime, self.config.memory)
        return self.drift.know(det), checks

    async def __call__(self, request):
        from starlette.responses import JSONResponse, Response

        t0 = time.perf_counter()
        if self._watcher is None:
            self._watcher = asyncio.get_running_loop().create_task(self._watch())
        path = request.url.path.rstrip("/") or "/"
        name = None
        try:
            method, handler, name = self._route(path)
            if path != "/health":
                self._authorize(request)
            if request.method != method:
                raise RequestError(405, f"{path} takes {method}, got {request.method}")
            status, body = await handler(request, name)
        except RequestError as e:
            status, body = e.status, {"error": e.message}
        except Exception as e:  # a bug answers 500 and the service stays up
            log.exception("request failed")
            status, body = 500, {"error": f"internal error: {type(e).__name__}: {e}"}
        if path.startswith("/predict"):
            if status == 200:
                body["latency_ms"] = (time.perf_counter() - t0) * 1e3
            self.metrics.answered(name, status, time.perf_counter() - t0, body)
        if path == "/metrics" and status == 200:
            return Response(self.metrics.text(), media_type=METRICS_CONTENT_TYPE)
        headers = {"Retry-After": "1"} if status == 503 else {"WWW-Authenticate": "Bearer"} if status == 401 else None
        return JSONResponse(body, status_code=status, headers=headers)

    def _route(self, path: str):
        """``(method, handler, model name or None)`` of a path; RequestError 404 for no route."""
        fixed = {"/predict": ("POST", self._predict), "/health": ("GET", self._health),
                 "/model": ("GET", self._model), "/models": ("GET", self._models),
                 "/metrics": ("GET", self._metrics)}
        if path in fixed:
            name = self.catalog.names[0] if len(self.catalog.names) == 1 else None
            return (*fixed[path], name)
        parts = path.split("/")
        if len(parts) == 3 and parts[1] in ("predict", "model") and parts[2] in self.catalog.files:
            return (*fixed["/" + parts[1]], parts[2])
        if len(parts) == 4 and parts[1] == "models" and parts[3] == "reload" and parts[2] in self.catalog.files:
            return "POST", self._reload, parts[2]
        if len(parts) in (3, 4) and parts[1] in ("predict", "model", "models"):
            raise RequestError(404, f"no model {parts[2]!r}; the models are {self.catalog.names}")
        raise RequestError(404, f"no route {path}; use POST /predict/{{name}}, GET /models, GET /model/{{name}}, "
                           "POST /models/{name}/reload, GET /health or GET /metrics")

    def _authorize(self, request) -> None:
        """401 unless the request carries the service's bearer token (when it has one)."""
        want = self.config.token_sha256
        if want is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token_digest(given.strip()), want):
            raise RequestError(401, "missing or wrong bearer token (send Authorization: Bearer <token>)")

    def _version(self, name: str | None) -> ModelVersion:
        if name is None:
            raise RequestError(404, f"this service has {len(self.catalog.names)} models: name one, as in "
                               f"/predict/{{name}}; the models are {self.catalog.names}")
        return self.catalog.current(name)

    async def _predict(self, request, name: str | None) -> tuple[int, dict]:
        query = dict(request.query_params)
        unknown = set(query) - {"shape", "mask", "timeout_s"}
        if unknown:
            raise RequestError(400, f"unknown query parameters {sorted(unknown)}; known: shape, mask, timeout_s")
        mask = query.get("mask", "0").lower()
        if mask not in ("0", "1", "true", "false"):
            raise RequestError(400, f"mask must be 0 or 1, got {mask!r}")
        timeout = self.config.timeout_s
        if "timeout_s" in query:
            try:
                asked = float(query["timeout_s"])
            except ValueError:
                asked = float("nan")
            if not asked > 0:
                raise RequestError(400, f"timeout_s must be a positive number, got {query['timeout_s']!r}")
            timeout = min(timeout, asked)
        version = self._version(name)
        deadline = time.monotonic() + timeout
        try:
            body = await asyncio.wait_for(self._read_body(request), timeout)
        except asyncio.TimeoutError:
            raise RequestError(503, f"the body did not arrive within {timeout:g} s") from None
        answer = await self._call(
            lambda: self.scorer.predict.remote(version, body, query.get("shape"), mask in ("1", "true")),
            deadline, timeout)
        if answer["status"] == 200:
            self.drift.answer(version.name, answer["body"])
            self.metrics.drift(version.name, self.drift.monitor(version.name))
        return answer["status"], answer["body"]

    async def _read_body(self, request) -> bytes:
        cap = self.config.max_bytes
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > cap:
            raise RequestError(413, f"body of {int(declared)} bytes exceeds the limit of {cap}")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > cap:
                raise RequestError(413, f"body exceeds the limit of {cap} bytes")
        return bytes(body)

    async def _call(self, remote, deadline: float, timeout: float):
        """Await ``remote()`` before ``deadline``; again on another replica when one dies meanwhile.

        Raises:
            RequestError: 503 when the deadline passes, the replicas keep
                dying, or the scorers are overloaded.
        """
        from ray.exceptions import RayActorError
        from ray.serve.exceptions import BackPressureError

        for attempt in range(1, self.ATTEMPTS + 1):
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                return await asyncio.wait_for(remote(), left)
            except asyncio.TimeoutError:
                break
            except BackPressureError as e:
                raise RequestError(503, f"overloaded, try again: {e}") from None
            except RayActorError as e:
                log.warning("replica lost (attempt %d of %d): %s", attempt, self.ATTEMPTS, e)
                if attempt == self.ATTEMPTS:
                    raise RequestError(503, f"replicas lost {attempt} times in a row; try again") from None
        raise RequestError(503, f"no answer within {timeout:g} s; try again")

    async def _health(self, request, name) -> tuple[int, dict]:
        timeout = min(5.0, self.config.timeout_s)
        await self._call(lambda: self.scorer.ping.remote(), time.monotonic() + timeout, timeout)
        return 200, {"status": "ok"}

    async def _model(self, request, name) -> tuple[int, dict]:
        version = self._version(name)
        timeout = self.config.timeout_s
        answer = await self._call(lambda: self.scorer.info.remote(version), time.monotonic() + timeout, timeout)
        return answer["status"], answer["body"]

    async def _models(self, request, name) -> tuple[int, dict]:
        return 200, {"models": [dict(m, drift=self.drift.state(m["name"])) for m in self.catalog.listing()]}

    async def _metrics(self, request, name) -> tuple[int, dict]:
        return 200, {}

    async def _reload(self, request, name) -> tuple[int, dict]:
        """Read the model file now; 200 with the version in service, 422 when the new file fails its checks
        (with the version that stays in service and the refusal)."""
        before = self.catalog.current(name)
        try:
            version = await self._swap(name, force=True)
        except CatalogError as e:
            return 422, {"error": str(e), "in_service": self.catalog.current(name).describe(),
                         "refused": self.catalog.refused(name)}
        return 200, dict(version.describe(), swapped=version is not before)

    async def _swap(self, name: str, force: bool = False) -> ModelVersion:
        """Check ``name``'s file and put a new version in service (in a thread: checking loads the model)."""
        before = self.catalog.current(name)
        try:
            version = await asyncio.to_thread(self.catalog.refresh, name, force)
        except CatalogError:
            self.metrics.swapped(name, False)
            raise
        if version is not before:
            log.info("%s: version %d (model %s) in service", name, version.number, version.model_id)
            self.metrics.swapped(name, True)
            self._in_service(version)
        return version

    def _in_service(self, version: ModelVersion) -> None:
        """Count ``version`` as in service, with a fresh drift monitor (its reference is the new file's)."""
        self.drift.start(version.name, version.number, version.model_id)
        self.metrics.in_service(version.name, version.number)
        self.metrics.drift(version.name, self.drift.monitor(version.name))

    async def _watch(self) -> None:
        """Swap in each model file that changes, every ``poll_s``, for as long as the service runs."""
        while True:
            await asyncio.sleep(self.config.poll_s)
            for name in self.catalog.changed():
                try:
                    await self._swap(name)
                except CatalogError as e:
                    log.warning("%s", e)
