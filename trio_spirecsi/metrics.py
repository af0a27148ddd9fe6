"""Prometheus metrics for one driver process.

Every :class:`Metrics` owns its own ``CollectorRegistry`` (never the global one), so two
daemons in one test process never share counters. No metric has a per-pod or per-volume
label: a node can carry hundreds of pods, and pod names are not the operator's alerting unit.
SVID expiry is summarised at scrape time from a callback instead (see
:meth:`Metrics.set_expiry_source`).

The exposition follows Prometheus conventions: no ``_created`` series (they double the
series count of every counter and histogram and no alert uses them), gauges are exposed as
gauges, and the standard ``process_*`` metrics (resident memory, CPU seconds, open file
descriptors, start time) come from prometheus-client's ProcessCollector, and the standard
``python_gc_*`` counters (collections, collected and uncollectable objects by generation)
from its GCCollector.
"""

from __future__ import annotations

import bisect
import math
import time
from collections.abc import Callable, Iterable, Iterator

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    Info,
    ProcessCollector,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder

from . import __version__

PREFIX = "trio_spirecsi"

PUBLISH_OUTCOMES = (
    "ok",
    "invalid_argument",
    "timeout",
    "agent_unavailable",
    "permission_denied",
    "error",
)
"""Values of the ``outcome`` label of the publish duration histogram."""

SDS_RESOURCES = ("tls_certificate", "validation_context")
"""Values of the ``resource`` label of ``sds_resources_sent_total``."""

PUBLISH_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0)

PUBLISH_PHASES = ("validate", "subscribe", "metadata", "first_svid", "render", "write", "mount")
"""Values of the ``phase`` label of the publish phase histogram, in the order they run
(see :mod:`trio_spirecsi.volumes.trace`)."""

PHASE_BUCKETS = (0.0005, 0.001, 0.0025, 0.01, 0.1, 1.0)
"""Few: a scrape formats every bucket of every phase, in the event loop."""

EXPIRING_WITHIN = (0, 60, 300, 900, 1800, 3600, 7200, 14400, 43200, 86400)
"""Values of the ``within_seconds`` label of ``trio_spirecsi_svids_expiring`` (plus ``+Inf``)."""

ExpirySource = Callable[[], Iterable[float]]


class Metrics:
    """The driver's metrics, registered in ``self.registry``.

    The attributes are plain prometheus-client metrics; callers use them directly
    (``metrics.unpublish_total.inc()``).
    """

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.build_info = Info(f"{PREFIX}_build", "Version of the running driver.", registry=r)
        self.build_info.info({"version": __version__})
        self.volumes_published = Gauge(
            f"{PREFIX}_volumes_published",
            "Volumes this node's driver currently serves (published or resumed).",
            registry=r,
        )
        self.publish_duration = Histogram(
            f"{PREFIX}_publish_duration_seconds",
            "Time NodePublishVolume took, by outcome.",
            ["outcome"],
            buckets=PUBLISH_BUCKETS,
            registry=r,
        )
        for outcome in PUBLISH_OUTCOMES:
            self.publish_duration.labels(outcome=outcome)
        self.publish_phase = Histogram(
            f"{PREFIX}_publish_phase_seconds",
            "Time each phase of a NodePublishVolume that created a volume took, by phase.",
            ["phase"],
            buckets=PHASE_BUCKETS,
            registry=r,
        )
        for phase in PUBLISH_PHASES:
            self.publish_phase.labels(phase=phase)
        self.unpublish_total = Counter(
            f"{PREFIX}_unpublish_total", "NodeUnpublishVolume calls that succeeded.", registry=r
        )
        self.svid_rotations_total = Counter(
            f"{PREFIX}_svid_rotations_total",
            "Times a volume's files were rewritten because the agent sent a new SVID.",
            registry=r,
        )
        self.bundle_updates_total = Counter(
            f"{PREFIX}_bundle_updates_total",
            "Trust bundle updates received from the agent.",
            registry=r,
        )
        self.agent_connected = Gauge(
            f"{PREFIX}_agent_connected",
            "1 while the SPIRE agent's admin socket answers, else 0.",
            registry=r,
        )
        self.agent_reconnects_total = Counter(
            f"{PREFIX}_agent_reconnects_total",
            "Times the connection to the SPIRE agent was re-established after a loss.",
            registry=r,
        )
        self.errors_total = Counter(
            f"{PREFIX}_errors_total",
            "Errors by kind (see docs/operations.md).",
            ["kind"],
            registry=r,
        )
        self.sds_streams_open = Gauge(
            f"{PREFIX}_sds_streams_open",
            "Envoy SDS StreamSecrets streams open on the pods' sockets.",
            registry=r,
        )
        self.sds_resources_sent_total = Counter(
            f"{PREFIX}_sds_resources_sent_total",
            "Secrets sent to Envoy over SDS, by resource kind.",
            ["resource"],
            registry=r,
        )
        for resource in SDS_RESOURCES:
            self.sds_resources_sent_total.labels(resource=resource)
        self.sds_nacks_total = Counter(
            f"{PREFIX}_sds_nacks_total",
            "SDS responses Envoy rejected (NACK); never answered with a resend.",
            registry=r,
        )
        self._expiry_source: ExpirySource = _no_volumes
        r.register(_ExpiryCollector(self))
        ProcessCollector(registry=r)
        GCCollector(registry=r)

    def set_expiry_source(self, fn: ExpirySource) -> None:
        """Use ``fn`` at every scrape to read the ``expires_at`` (unix seconds) of live SVIDs.

        ``fn`` runs in the thread serving the scrape (the Trio thread) and must not block.
        """
        self._expiry_source = fn

    def expiries(self) -> list[float]:
        return [float(e) for e in self._expiry_source() if math.isfinite(e)]

    def render(self, accept: str = "") -> tuple[bytes, str]:
        """The exposition (Prometheus text, or OpenMetrics when ``accept`` asks) and its type."""
        encoder, content_type = choose_encoder(accept)
        return encoder(_WithoutCreated(self.registry)), content_type


class _WithoutCreated:
    """A view of a registry without ``_created`` samples, for the exposition only."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._registry = registry

    def collect(self) -> Iterator[Metric]:
        for family in self._registry.collect():
            family.samples = [s for s in family.samples if not s.name.endswith("_created")]
            yield family


def _no_volumes() -> Iterable[float]:
    return ()


class _ExpiryCollector:
    """Summarises SVID expiry at scrape time, without a series per pod.

    ``trio_spirecsi_svid_expiry_min_seconds``: seconds until the soonest expiry (negative once
    expired); absent when no volume has an SVID. ``trio_spirecsi_svids_expiring``: for each
    bound in :data:`EXPIRING_WITHIN` (label ``within_seconds``), how many volumes' SVIDs expire
    within that many seconds (``0``: already expired; ``+Inf``: every volume with an SVID).
    Plain gauges, so the exposition has no ``_gcount``/``_gsum`` series.
    """

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def describe(self) -> Iterator[Metric]:
        yield GaugeMetricFamily(f"{PREFIX}_svid_expiry_min_seconds", _MIN_DOC)
        yield GaugeMetricFamily(f"{PREFIX}_svids_expiring", _EXPIRING_DOC)

    def collect(self) -> Iterator[Metric]:
        now = time.time()
        remaining = sorted(e - now for e in self._metrics.expiries())
        minimum = GaugeMetricFamily(f"{PREFIX}_svid_expiry_min_seconds", _MIN_DOC)
        if remaining:
            minimum.add_metric([], remaining[0])
        yield minimum
        expiring = GaugeMetricFamily(
            f"{PREFIX}_svids_expiring", _EXPIRING_DOC, labels=["within_seconds"]
        )
        for bound in EXPIRING_WITHIN:
            expiring.add_metric([str(bound)], bisect.bisect_right(remaining, bound))
        expiring.add_metric(["+Inf"], len(remaining))
        yield expiring


_MIN_DOC = "Seconds until the soonest SVID expiry among this node's volumes (negative: expired)."
_EXPIRING_DOC = "Volumes whose SVID expires within within_seconds seconds (0: expired; +Inf: all)."
