"""The serving API's Prometheus metrics: requests, errors and latency by team, stage timings, the version
served under each alias, fallbacks, shadow agreement.

Two sinks, one set of names:

- :meth:`ServingMetrics.local`: a ``prometheus_client`` registry in this process, which ``/metrics``
  exposes as is. Right when one process sees every request (tests, :class:`~shopsight.serving.app.
  LocalBackend`).
- :meth:`ServingMetrics.cluster`: under Ray Serve, where every replica of the ingress (the ``combined``
  layout's ``api`` replicas, the ``split`` layout's ingress replicas) answers its own share of the
  requests, and a scrape of ``/metrics`` through Serve's proxy reaches one replica chosen at random. A
  per-replica registry would make each scrape report a different replica's counts. So the replicas
  record with :mod:`ray.serve.metrics`; Ray's metrics agent on each node exports them (named
  ``ray_shopsight_*``, labelled with the replica) on the node's metrics port, which a PodMonitor on the Ray
  pods scrapes. ``/metrics`` on any replica reads those exports from every live node and serves their sum
  over replicas, under the same names as the local sink: every scrape agrees, whichever replica answers
  it. Ray exports what a replica recorded every ``metrics_report_interval_ms`` (10 s by default), so
  ``/metrics`` lags the requests by up to that much.
"""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict
from collections.abc import Iterable

import requests
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

log = logging.getLogger("shopsight.serving")

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
# Ray's histograms take positive bounds only: 1e-6 is "the same answer"
DIFFERENCE_BUCKETS = (1e-6, 0.01, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 0.9, 1.0)
CONTENT_TYPE = CONTENT_TYPE_LATEST
_RAY_PREFIX = "ray_"
# the labels Ray adds to each recorded sample: where it was recorded, not what it counts
_RAY_LABELS = frozenset(
    (
        "Component",
        "NodeAddress",
        "SessionName",
        "Version",
        "WorkerId",
        "JobId",
        "application",
        "deployment",
        "replica",
        "route",
        "otel_scope_name",
        "otel_scope_schema_url",
        "otel_scope_version",
    )
)
_EXPORT_TIMEOUT_S = 3.0


class _Family:
    """A metric of either sink, used as ``family.labels(*values).inc()`` (``observe``, ``set``)."""

    def __init__(self, kind, name, documentation, labels, buckets, registry: CollectorRegistry | None):
        self.label_names = tuple(labels)
        self._ray = None
        self._local = None
        if registry is None:  # Ray's sink
            from ray.serve import metrics as ray_metrics

            extra = {"boundaries": list(buckets)} if kind == "histogram" else {}
            cls = getattr(ray_metrics, kind.capitalize())
            self._ray = cls(name, documentation, tag_keys=self.label_names, **extra)
        else:
            cls = {"counter": Counter, "gauge": Gauge, "histogram": Histogram}[kind]
            extra = {"buckets": buckets} if kind == "histogram" else {}
            self._local = cls(name, documentation, list(labels), registry=registry, **extra)

    def labels(self, *values: str):
        if self._local is not None:
            return self._local.labels(*values)
        return _RayChild(self._ray, dict(zip(self.label_names, values, strict=True)))


class _RayChild:
    def __init__(self, metric, tags: dict[str, str]) -> None:
        self.metric = metric
        self.tags = tags

    def inc(self, amount: float = 1.0) -> None:
        self.metric.inc(amount, tags=self.tags)

    def observe(self, value: float) -> None:
        self.metric.observe(value, tags=self.tags)

    def set(self, value: float) -> None:
        self.metric.set(value, tags=self.tags)


class ServingMetrics:
    """The API's metrics (see the module docstring for the two sinks)."""

    def __init__(self, ray: bool = False) -> None:
        self.ray = ray
        self.registry = CollectorRegistry()

        def family(kind, name, documentation, labels, buckets=()):
            return _Family(kind, name, documentation, labels, buckets, None if ray else self.registry)

        self.requests = family(
            "counter",
            "shopsight_requests",
            "HTTP requests by endpoint, status, team.",
            ["endpoint", "status", "team"],
        )
        self.latency = family(
            "histogram",
            "shopsight_request_latency_seconds",
            "Time in the ingress per request, by endpoint and team.",
            ["endpoint", "team"],
            LATENCY_BUCKETS,
        )
        self.stages = family(
            "histogram",
            "shopsight_stage_seconds",
            "Time of each stage of a scored batch (features, model, shadow).",
            ["endpoint", "stage"],
            LATENCY_BUCKETS,
        )
        self.batch_size = family(
            "histogram",
            "shopsight_batch_size",
            "Requests scored together (@serve.batch).",
            ["endpoint"],
            (1, 2, 4, 8, 16, 32, 64),
        )
        self.fallbacks = family(
            "counter",
            "shopsight_fallbacks",
            "Users answered without history (popularity or empty-history fallback).",
            ["endpoint"],
        )
        self.features_unavailable = family(
            "counter",
            "shopsight_features_unavailable",
            "Requests answered without features (a fallback): the online store could not be read.",
            ["endpoint"],
        )
        self.responses = family(
            "counter",
            "shopsight_responses_by_version",
            "Answers by the model version that produced them.",
            ["model", "alias", "version"],
        )
        self.served = family(
            "gauge",
            "shopsight_served_version",
            "1 for the model version last seen answering under each alias.",
            ["model", "alias", "version"],
        )
        self.shadow = family(
            "counter",
            "shopsight_shadow_comparisons",
            "Shadow challenger vs champion: agreement.",
            ["endpoint", "agree"],
        )
        self.shadow_difference = family(
            "histogram",
            "shopsight_shadow_difference",
            "Champion vs shadow challenger: 1 - top-k overlap, or mean |dp|.",
            ["endpoint"],
            DIFFERENCE_BUCKETS,
        )
        self._current: dict[tuple[str, str], str] = {}

    @classmethod
    def local(cls) -> ServingMetrics:
        return cls(ray=False)

    @classmethod
    def cluster(cls) -> ServingMetrics:
        return cls(ray=True)

    def version(self, model: str, alias: str, version: str) -> None:
        previous = self._current.get((model, alias))
        if previous != version:
            if previous is not None:
                self.served.labels(model, alias, previous).set(0)
            self.served.labels(model, alias, version).set(1)
            self._current[(model, alias)] = version

    def outcome(self, endpoint: str, outcome) -> None:
        """Record what a model answered (an :class:`~shopsight.serving.predictor.Outcome`)."""
        if outcome.status != 200:
            return
        for stage, seconds in outcome.timings.items():
            self.stages.labels(endpoint, stage).observe(seconds)
        self.batch_size.labels(endpoint).observe(outcome.batch_size)
        if outcome.fallbacks:
            self.fallbacks.labels(endpoint).inc(outcome.fallbacks)
        if outcome.features_unavailable:
            self.features_unavailable.labels(endpoint).inc()
        model = outcome.response.model
        self.responses.labels(model.name, model.alias, model.version).inc()
        self.version(model.name, model.alias, model.version)
        if outcome.shadow is not None:
            self.shadow.labels(endpoint, str(outcome.shadow.agree).lower()).inc()
            self.shadow_difference.labels(endpoint).observe(outcome.shadow.difference)

    async def exposition(self) -> bytes:
        """What ``/metrics`` serves: this process's registry, or the cluster's sum over replicas."""
        if not self.ray:
            return generate_latest(self.registry)
        texts = await asyncio.gather(*(asyncio.to_thread(_read_export, url) for url in _node_exports()))
        return generate_latest(_Snapshot(summed(t for t in texts if t)))


def _node_exports() -> list[str]:
    """The metrics endpoints of the cluster's live nodes (Ray's metrics agent, one per node)."""
    import ray

    return [
        f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics"
        for node in ray.nodes()
        if node.get("Alive") and node.get("MetricsExportPort")
    ]


def _read_export(url: str) -> str | None:
    try:
        response = requests.get(url, timeout=_EXPORT_TIMEOUT_S)
        response.raise_for_status()
        return response.text
    except requests.RequestException as exc:  # a node going away: its replicas' counts leave with it
        log.warning("metrics of %s not read: %s", url, exc)
        return None


def summed(texts: Iterable[str]) -> list[Metric]:
    """The ``ray_shopsight_*`` families of Ray's exports, under their own names, summed over the replicas
    and nodes that recorded them (gauges: the largest, so a version served by any replica reads 1)."""
    families: dict[str, Metric] = {}
    values: dict[str, dict[tuple, float]] = defaultdict(dict)
    for text in texts:
        for family in text_string_to_metric_families(text):
            if not family.name.startswith(_RAY_PREFIX + "shopsight_"):
                continue
            name = family.name[len(_RAY_PREFIX) :]
            families.setdefault(name, Metric(name, family.documentation, family.type))
            combine = max if family.type == "gauge" else sum
            for sample in family.samples:
                labels = tuple(sorted((k, v) for k, v in sample.labels.items() if k not in _RAY_LABELS))
                key = (sample.name[len(_RAY_PREFIX) :], labels)
                seen = values[name].get(key)
                values[name][key] = sample.value if seen is None else combine((seen, sample.value))
    for name, metric in families.items():
        for (sample_name, labels), value in values[name].items():  # as Ray wrote them: buckets in order
            metric.add_sample(sample_name, dict(labels), value)
    return list(families.values())


class _Snapshot:
    """A registry-like collector over fixed families, for :func:`generate_latest`."""

    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self):
        return iter(self.families)


__all__ = ["CONTENT_TYPE", "ServingMetrics", "summed"]
