"""Prometheus metrics of the listener service (one registry per service instance).

Queue depths and outbox sizes are read from the job store at scrape time, so they are right
even after a restart; counters and latency histograms count what this process did.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterable
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)


class _StoreCollector(Collector):
    def __init__(self, counts: Callable[[], dict[str, dict[str, int]]], spool_root: Path | None) -> None:
        self._counts = counts
        self._spool_root = spool_root

    def collect(self) -> Iterable[GaugeMetricFamily]:
        counts = self._counts()
        studies = GaugeMetricFamily("cxr_ai_studies", "Studies in the job store by state", labels=["state"])
        for state, n in counts["studies"].items():
            studies.add_metric([state], n)
        yield studies
        instances = GaugeMetricFamily("cxr_ai_instances", "Instances in the job store by state", labels=["state"])
        for state, n in counts["instances"].items():
            instances.add_metric([state], n)
        yield instances
        outbox = GaugeMetricFamily("cxr_ai_outbox_deliveries", "Outbox deliveries by state", labels=["state"])
        for state, n in counts["outbox"].items():
            outbox.add_metric([state], n)
        yield outbox
        yield GaugeMetricFamily("cxr_ai_queue_depth", "Studies received and not yet processed",
                                value=counts["studies"].get("received", 0))
        yield GaugeMetricFamily("cxr_ai_dead_letters", "Deliveries that exhausted their retries",
                                value=counts["outbox"].get("dead", 0))
        identity = counts.get("identity", {})
        yield GaugeMetricFamily("cxr_ai_sop_uid_reused_instances", "Instances in the job store whose SOP Instance "
                                "UID is shared with another study or patient",
                                value=identity.get("sop_uid_reused_instances", 0))
        yield GaugeMetricFamily("cxr_ai_study_uid_shared_studies", "Studies in the job store whose Study Instance "
                                "UID was also received for another patient (each a job of its own)",
                                value=identity.get("study_uid_shared_studies", 0))
        if self._spool_root is not None:
            yield GaugeMetricFamily("cxr_ai_spool_free_bytes", "Free bytes on the spool file system",
                                    value=shutil.disk_usage(self._spool_root).free)


class ServiceMetrics:
    """Counters and histograms; pass ``counts`` (the job store's) to expose queue gauges."""

    def __init__(self, *, counts: Callable[[], dict[str, dict[str, int]]] | None = None,
                 spool_root: Path | None = None) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.received = Counter("cxr_ai_cstore_received", "C-STORE requests by response status",
                                ["status"], registry=r)
        self.received_bytes = Counter("cxr_ai_cstore_received_bytes", "Bytes of data sets stored", registry=r)
        self.associations = Counter("cxr_ai_associations", "Associations by outcome", ["outcome"], registry=r)
        self.listener_refusals = Counter(
            "cxr_ai_listener_refusals", "What the listener's receive path refused, by reason (per_address_limit, "
            "pdu_too_long, pdu_timeout, invalid_pdu, low_space, write_failed)", ["reason"], registry=r)
        self.stage_seconds = Histogram("cxr_ai_stage_seconds", "Latency per stage", ["stage"],
                                       buckets=_LATENCY_BUCKETS, registry=r)
        self.instances_processed = Counter("cxr_ai_instances_processed", "Instances by pipeline outcome",
                                           ["outcome"], registry=r)
        self.studies_finished = Counter("cxr_ai_studies_finished", "Studies by final outcome", ["outcome"],
                                        registry=r)
        self.deliveries = Counter("cxr_ai_deliveries", "Delivery attempts by destination and outcome",
                                  ["destination", "outcome"], registry=r)
        self.sop_uid_reused = Counter("cxr_ai_sop_uid_reused", "Instances received whose SOP Instance UID was "
                                      "already received for another study or patient (both kept)", registry=r)
        if counts is not None:
            r.register(_StoreCollector(counts, spool_root))

    def render(self) -> bytes:
        return generate_latest(self.registry)
