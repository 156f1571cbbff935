"""What a running service counts, per model, in Prometheus' text format (``GET /metrics``).

Series (``model`` is a name the service serves; a request for a name it
does not have is counted under ``model=""``, so that callers cannot create
series):

- ``dinopatch_requests_total{model,status}``: requests answered, by HTTP status.
- ``dinopatch_errors_total{model,status}``: those answered 4xx or 5xx.
- ``dinopatch_verdicts_total{model,verdict}``: ``good``, ``anomaly`` or ``unaligned`` (the part could not be
  aligned, so it was not judged), one per image answered 200.
- ``dinopatch_request_seconds{model}``: histogram of the time from request to answer.
- ``dinopatch_batch_images{model}``: histogram of how many images were scored together with each one.
- ``dinopatch_model_version{model}``: the version number now in service (1 at start, +1 per swap).
- ``dinopatch_model_swaps_total{model,result}``: swaps ``done``, and new files ``refused`` by their checks.
- ``dinopatch_drift_flag{model}``: 1 while the drift flag of the version in service is up (a swap lowers it).
- ``dinopatch_drift_flags_total{model}``: how many times the flag rose.
- ``dinopatch_drift_cusum{model,chart}``: each CUSUM chart's sum (``chart``: a statistic and its direction,
  as ``brightness-``: a fixed set); the chart over ``dinopatch.drift.H`` is the one that raised the flag.

The counts live in the service's gateway process (one per service); a
Prometheus server scrapes them with the service's bearer token.
"""
from __future__ import annotations

# Seconds: a 112 px part answers in tens of milliseconds, a large one aligned and mapped back in seconds.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def verdict(record: dict) -> str:
    """``unaligned``, ``anomaly`` or ``good``: what a record of :mod:`dinopatch.records` says of its part."""
    if not record.get("aligned", True):
        return "unaligned"
    return "anomaly" if record.get("is_anomaly") else "good"


class ServiceMetrics:
    """The service's counters and histograms, in a registry of their own (not the process-wide default).

    Args:
        names: the models served; each gets its series at zero from the start, so rates start from zero.
    """

    def __init__(self, names: list[str]):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        self.names = set(names)
        self._flagged: set[str] = set()
        self.requests = Counter("dinopatch_requests", "Requests answered, by HTTP status", ["model", "status"],
                                registry=self.registry)
        self.errors = Counter("dinopatch_errors", "Requests answered 4xx or 5xx", ["model", "status"],
                              registry=self.registry)
        self.verdicts = Counter("dinopatch_verdicts", "Images judged, by verdict", ["model", "verdict"],
                                registry=self.registry)
        self.latency = Histogram("dinopatch_request_seconds", "Time from request to answer", ["model"],
                                 buckets=LATENCY_BUCKETS, registry=self.registry)
        self.batch = Histogram("dinopatch_batch_images", "Images scored together with each image", ["model"],
                               buckets=BATCH_BUCKETS, registry=self.registry)
        self.version = Gauge("dinopatch_model_version", "Version number in service", ["model"],
                             registry=self.registry)
        self.swaps = Counter("dinopatch_model_swaps", "Model files swapped in or refused", ["model", "result"],
                             registry=self.registry)
        self.drift_flag = Gauge("dinopatch_drift_flag", "1 while the drift flag is up", ["model"],
                                registry=self.registry)
        self.drift_flags = Counter("dinopatch_drift_flags", "Drift flags raised", ["model"], registry=self.registry)
        self.drift_cusum = Gauge("dinopatch_drift_cusum", "CUSUM sum of each drift chart", ["model", "chart"],
                                 registry=self.registry)
        for name in names:
            self.drift_flag.labels(name)
            self.drift_flags.labels(name)
            for v in ("good", "anomaly", "unaligned"):
                self.verdicts.labels(name, v)
            self.latency.labels(name)
            self.batch.labels(name)
            for result in ("done", "refused"):
                self.swaps.labels(name, result)

    def _label(self, name: str | None) -> str:
        return name if name in self.names else ""

    def answered(self, name: str | None, status: int, seconds: float, record: dict | None = None) -> None:
        """Count one ``/predict`` request; ``record`` is its answer when it was 200."""
        model = self._label(name)
        self.requests.labels(model, str(status)).inc()
        if status >= 400:
            self.errors.labels(model, str(status)).inc()
        self.latency.labels(model).observe(seconds)
        if status == 200 and record is not None:
            self.verdicts.labels(model, verdict(record)).inc()
            self.batch.labels(model).observe(record.get("batch", 1))

    def in_service(self, name: str, number: int) -> None:
        self.version.labels(self._label(name)).set(number)

    def swapped(self, name: str, done: bool) -> None:
        self.swaps.labels(self._label(name), "done" if done else "refused").inc()

    def drift(self, name: str, monitor) -> None:
        """Show ``monitor`` (the :class:`dinopatch.drift.Monitor` of ``name``'s version in service)."""
        model = self._label(name)
        if monitor.flag and model not in self._flagged:
            self.drift_flags.labels(model).inc()
        # A fresh monitor (a swap) starts with the flag down: the next rise counts again.
        self._flagged.discard(model)
        if monitor.flag:
            self._flagged.add(model)
        self.drift_flag.labels(model).set(int(monitor.flag))
        for chart, total in monitor.summary()["cusum"].items():
            self.drift_cusum.labels(model, chart).set(total)

    def text(self) -> bytes:
        """The Prometheus text exposition of every series."""
        from prometheus_client import generate_latest

        return generate_latest(self.registry)
