"""Running the performance monitor inside the service: on a schedule, after new ground truth,
with confirmed FHIR Observations polled from the hospital's FHIR server, and its values in
``/metrics``.

- :class:`MonitorRunner` owns one thread. It runs :meth:`PerformanceMonitor.update` every
  ``[monitoring] update_minutes``, and soon after the truth log grows (``cxr-ai truth load``
  from another process appends to it; the runner checks its size and modification time every
  ``truth_check_seconds``) or after :meth:`MonitorRunner.notify` (radiologist feedback).
- :class:`FhirTruthPoller` searches the FHIR server for echocardiography LVEF (LOINC 10230-1)
  and confirmed cardiomegaly (SNOMED CT 8186001) Observations, turns them into truth records
  with :func:`cxr_ai.monitoring.truth.truth_from_fhir` and appends the new ones.
- :class:`MonitorCollector` renders :meth:`PerformanceMonitor.metric_values` as Prometheus
  gauges (a ``prometheus_client`` collector registered in the service's registry).
"""

from __future__ import annotations

import datetime as dt
import logging
import re
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import requests
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from cxr_ai.dicom import codes
from cxr_ai.dicom.codes import fhir_system
from cxr_ai.monitoring.performance import PerformanceMonitor
from cxr_ai.monitoring.truth import CONFIRMED_STATUSES, TruthStore, truth_from_fhir

logger = logging.getLogger(__name__)

MSG_FHIR_POLL = (
    "polling {url} for ground-truth Observations failed ({detail}); the next poll is in "
    "{minutes:.0f} min. Check [monitoring] fhir_truth_url and the server."
)

_HELP = {
    "cxr_ai_monitoring_window_predictions": "Predictions in the monitor's current window",
    "cxr_ai_subgroup_n": "Predictions with ground truth per subgroup in the current window",
    "cxr_ai_subgroup_metric": "Subgroup performance in the current window (AUROC, TPR, FPR, ...)",
    "cxr_ai_subgroup_gap": "Subgroup gap to overall in the current window",
    "cxr_ai_fairness_alert": "1 for each gap or drift alert of the last monitor update",
    "cxr_ai_fairness_alerts": "Number of gap and drift alerts of the last monitor update",
}
_LABEL_RE = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


@dataclass(frozen=True)
class RunnerSettings:
    """``[monitoring]`` keys of the scheduled monitor and the FHIR truth feed."""

    update_minutes: float = 15.0
    truth_check_seconds: float = 10.0
    fhir_truth_url: str = ""
    fhir_truth_token: str = ""
    fhir_truth_poll_minutes: float = 15.0
    lvef_cutoff: float = 40.0

    @classmethod
    def from_config(cls, config: Mapping[str, Any], *, token: str = "") -> RunnerSettings:
        m = config.get("monitoring", {})
        return cls(update_minutes=float(m.get("update_minutes", 15.0)),
                   truth_check_seconds=float(m.get("truth_check_seconds", 10.0)),
                   fhir_truth_url=str(m.get("fhir_truth_url", "") or ""), fhir_truth_token=token,
                   fhir_truth_poll_minutes=float(m.get("fhir_truth_poll_minutes", 15.0)),
                   lvef_cutoff=float(m.get("lvef_cutoff", 40.0)))


def split_metric_key(key: str) -> tuple[str, dict[str, str]]:
    """``'name{a="x",b="y"}'`` (a key of :meth:`PerformanceMonitor.metric_values`) → name, labels."""
    name, brace, rest = key.partition("{")
    if not brace:
        return name, {}
    labels = {k: v.replace('\\"', '"').replace("\\\\", "\\") for k, v in _LABEL_RE.findall(rest)}
    return name, labels


def metric_families(values: Mapping[str, float]) -> list[GaugeMetricFamily]:
    """The monitor's flat values as gauge families (one per metric name, labels kept)."""
    grouped: dict[str, list[tuple[dict[str, str], float]]] = {}
    for key, value in values.items():
        name, labels = split_metric_key(key)
        grouped.setdefault(name, []).append((labels, value))
    out = []
    for name, rows in sorted(grouped.items()):
        label_names = sorted({k for labels, _ in rows for k in labels})
        fam = GaugeMetricFamily(name, _HELP.get(name, name), labels=label_names)
        for labels, value in rows:
            fam.add_metric([labels.get(k, "") for k in label_names], value)
        out.append(fam)
    return out


class FhirTruthPoller:
    """Searches a FHIR R4 server for confirmed LVEF and cardiomegaly Observations.

    Each Observation version is read once: the poller remembers ``(id, versionId or
    lastUpdated)`` of what it stored, so an amended Observation is stored again (the truth
    match keeps the last record of a study) and an unchanged one never twice.
    """

    def __init__(self, *, url: str, store: TruthStore, key: bytes, token: str = "", lvef_cutoff: float = 40.0,
                 issuer_for_system: Mapping[str, str] | None = None, timeout: float = 30.0,
                 page_size: int = 100) -> None:
        self.url = url.rstrip("/")
        self.store = store
        self._key = key
        self._token = token
        self.lvef_cutoff = lvef_cutoff
        self.issuer_for_system = dict(issuer_for_system or {})
        self.timeout = timeout
        self.page_size = page_size
        self._seen: set[str] = {str(r["fhir_version"]) for r in store.records() if r.get("fhir_version")}

    def _search_url(self) -> str:
        code = ",".join(f"{fhir_system(c)}|{c.value}" for c in (codes.LVEF_MEASUREMENT, codes.CARDIOMEGALY))
        return (f"{self.url}/Observation?code={requests.utils.quote(code, safe='|,:/')}"
                f"&status={','.join(CONFIRMED_STATUSES)}&_count={self.page_size}")

    def _pages(self) -> Iterable[dict[str, Any]]:
        headers = {"Accept": "application/fhir+json"}
        if self._token:
            headers["Authorization"] = f"Bearer {self._token}"
        url: str | None = self._search_url()
        pages = 0
        while url and pages < 1000:
            r = requests.get(url, headers=headers, timeout=self.timeout)
            r.raise_for_status()
            bundle = r.json()
            yield bundle
            pages += 1
            url = next((link.get("url") for link in bundle.get("link", []) if link.get("relation") == "next"), None)

    def poll(self) -> int:
        """One search; appends the new truth records. Returns how many were added."""
        new: list[dict[str, Any]] = []
        for bundle in self._pages():
            for entry in bundle.get("entry", []):
                res = entry.get("resource") or {}
                if res.get("resourceType") != "Observation":
                    continue
                meta = res.get("meta", {})
                version = f"Observation/{res.get('id')}/{meta.get('versionId') or meta.get('lastUpdated') or ''}"
                if version in self._seen:
                    continue
                records = truth_from_fhir(res, key=self._key, lvef_cutoff=self.lvef_cutoff,
                                          issuer_for_system=self.issuer_for_system)
                self._seen.add(version)
                new += [{**r, "fhir_version": version} for r in records]
        if new:
            self.store.add(new)
            logger.info("FHIR truth feed: %d new truth records", len(new))
        return len(new)


class MonitorRunner:
    """Runs a :class:`PerformanceMonitor` in a thread: on a schedule, after new truth, on demand.

    Parameters
    ----------
    monitor
        The monitor; its truth store's file is watched for growth.
    settings
        Schedule and FHIR feed.
    poller
        The FHIR truth feed, or None.
    clock
        Wall clock for ``now`` of each update (tests move it).
    """

    def __init__(self, monitor: PerformanceMonitor, *, settings: RunnerSettings = RunnerSettings(),
                 poller: FhirTruthPoller | None = None,
                 clock: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.timezone.utc)) -> None:
        self.monitor = monitor
        self.settings = settings
        self.poller = poller
        self.clock = clock
        self.last_record: dict[str, Any] | None = None
        self.last_update_at: float | None = None
        self.last_error: str = ""
        self.updates = 0
        self.errors = 0
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._run_lock = threading.Lock()
        self._truth_sig = self._signature()

    def _signature(self) -> tuple[int, int]:
        path = self.monitor.truth_store.path
        try:
            st = path.stat()
        except FileNotFoundError:
            return (0, 0)
        return (st.st_size, st.st_mtime_ns)

    def run_once(self) -> dict[str, Any]:
        """One monitor update now (thread-safe; concurrent callers run one after the other)."""
        with self._run_lock:
            self._truth_sig = self._signature()
            record = self.monitor.update(now=self.clock())
            self.last_record = record
            self.last_update_at = time.time()
            self.updates += 1
            self.last_error = ""
            return record

    def add_truth(self, records: Iterable[Mapping[str, Any]]) -> int:
        """Append truth records (e.g. :func:`cxr_ai.monitoring.truth.truth_from_feedback`
        from the worklist page) and
        update soon. Returns how many were added."""
        n = self.monitor.truth_store.add(records)
        if n:
            self.notify()
        return n

    def notify(self) -> None:
        """New truth arrived (e.g. radiologist feedback): update soon, in the runner's thread."""
        self._wake.set()

    def start(self) -> MonitorRunner:
        self._thread = threading.Thread(target=self._loop, name="cxr-ai-monitor", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _loop(self) -> None:
        s = self.settings
        interval = s.update_minutes * 60.0 if s.update_minutes > 0 else None
        poll_every = s.fhir_truth_poll_minutes * 60.0
        next_update = time.monotonic()  # one update at start, so /metrics has values
        next_poll = time.monotonic()
        while not self._stop.is_set():
            now = time.monotonic()
            due = next_update is not None and now >= next_update
            if self.poller is not None and now >= next_poll:
                next_poll = now + poll_every
                try:
                    due = self.poller.poll() > 0 or due
                except (requests.RequestException, ValueError) as exc:
                    logger.warning(MSG_FHIR_POLL.format(url=self.poller.url, detail=type(exc).__name__,
                                                        minutes=poll_every / 60.0))
            if self._wake.is_set():
                self._wake.clear()
                due = True
            if self._signature() != self._truth_sig:
                logger.info("new ground truth in %s; updating the performance monitor", self.monitor.truth_store.path)
                due = True
            if due and not self._stop.is_set():
                try:
                    self.run_once()
                except Exception as exc:  # broad on purpose: a failed update must not end the thread
                    self.errors += 1
                    self.last_error = f"{type(exc).__name__}: {exc}"[:300]
                    logger.exception("performance monitor update failed; next try on schedule")
                next_update = time.monotonic() + interval if interval is not None else None
            waits = [s.truth_check_seconds]
            if next_update is not None:
                waits.append(next_update - time.monotonic())
            if self.poller is not None:
                waits.append(next_poll - time.monotonic())
            self._wake.wait(max(0.05, min(waits)))


class MonitorCollector(Collector):
    """The runner's latest monitor values as Prometheus gauges, plus its own health."""

    def __init__(self, runner: MonitorRunner) -> None:
        self.runner = runner

    def collect(self) -> Iterable[GaugeMetricFamily]:
        yield from metric_families(self.runner.monitor.metric_values())
        yield GaugeMetricFamily("cxr_ai_monitoring_updates", "Performance monitor updates since start",
                                value=self.runner.updates)
        yield GaugeMetricFamily("cxr_ai_monitoring_update_errors", "Failed performance monitor updates since start",
                                value=self.runner.errors)
        if self.runner.last_update_at is not None:
            yield GaugeMetricFamily("cxr_ai_monitoring_last_update_timestamp_seconds",
                                    "Unix time of the last performance monitor update",
                                    value=self.runner.last_update_at)


def runner_from_config(config: Mapping[str, Any], *, token: str = "") -> MonitorRunner:
    """The service's runner: monitor, truth store and FHIR feed from ``[monitoring]`` (paths
    already resolved by the caller; ``token`` is the FHIR bearer token, read at the edge)."""
    monitor = PerformanceMonitor.from_config(config)
    settings = RunnerSettings.from_config(config, token=token)
    poller = None
    if settings.fhir_truth_url:
        poller = poller_from_config(config, url=settings.fhir_truth_url, store=monitor.truth_store, token=token)
    return MonitorRunner(monitor, settings=settings, poller=poller)


def poller_from_config(config: Mapping[str, Any], *, url: str, store: Any, token: str = "") -> FhirTruthPoller:
    """The FHIR truth feed as the service and ``cxr-ai truth poll-fhir`` both poll it: the same
    pseudonym key, LVEF cut-off and issuers of the configured patient identifier systems, so
    both make the same patient keys."""
    from cxr_ai.monitoring.log import resolve_pseudonym_key

    issuers = {m["system"]: m["issuer"] for m in config.get("fhir", {}).get("patient_identifier_systems", [])
               if "system" in m and "issuer" in m}
    return FhirTruthPoller(url=url, store=store, key=resolve_pseudonym_key(config), token=token,
                           lvef_cutoff=RunnerSettings.from_config(config).lvef_cutoff, issuer_for_system=issuers)
