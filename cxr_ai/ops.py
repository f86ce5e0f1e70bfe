"""The operations view as data: health, queues, dead letters, throughput and latency, and the
live fairness windows. Plain functions returning typed records (no HTML); the web page and the
CLI render them, :mod:`cxr_ai.plots` draws them.

Sources, all read-only except :func:`requeue_dead`:

- the running :class:`cxr_ai.service.Service` (listener, workers, destinations, monitor);
- the job store's SQLite file, read through its own read-only connection (``mode=ro``), so a
  page view never takes a write lock from the listener;
- the monitor's last performance record and the truth log.
"""

from __future__ import annotations

import datetime as dt
import getpass
import json
import logging
import os
import shutil
import sqlite3
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cxr_ai.store.jobs import DeliveryState, InstanceState, JobStore, StudyState

logger = logging.getLogger(__name__)

#: Subgroups the operations page shows, in order (an intersection is "a × b", the evaluator's label).
OPS_ATTRIBUTES: tuple[str, ...] = ("sex", "age_band", "race", "insurance", "race × sex")
#: The metrics of the fairness table, with the names the page shows.
#: Underdiagnosis is the FNR (Seyyed-Kalantari 2021; the evaluator keeps one column for both).
OPS_METRICS: dict[str, str] = {"auroc": "AUROC", "sensitivity": "TPR", "fpr": "FPR",
                               "fnr": "Underdiagnosis (FNR)"}
TOO_SMALL = "group too small"
#: Metrics that are one quantity seen from the other side (FPR = 1 - specificity; FNR =
#: underdiagnosis = 1 - sensitivity): a gap flagged on one is flagged on the others.
SAME_QUANTITY: dict[str, tuple[str, ...]] = {
    "fpr": ("specificity",), "specificity": ("fpr",),
    "sensitivity": ("fnr", "underdiagnosis"), "fnr": ("sensitivity", "underdiagnosis"),
    "underdiagnosis": ("sensitivity", "fnr"),
}
MSG_NOT_RECORDED = ("{attribute}: not recorded in the prediction log (DICOM headers carry no {attribute}); "
                    "nothing to show")
MSG_NOT_CONFIGURED = "{attribute}: not among [monitoring] attributes / intersections; add it to see it"


# -- health -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class ComponentHealth:
    """One line of the health panel."""

    component: str  # "listener", "workers", "model bundle", "disk", "destination <name>", "monitor"
    ok: bool
    detail: str


def bundle_health(config: Mapping[str, Any]) -> ComponentHealth:
    """The ``[models] bundle`` (or the shipped demo bundle) is present and its metadata reads."""
    from cxr_ai.errors import BundleError
    from cxr_ai.models.bundle import read_metadata
    from cxr_ai.models.engine import default_bundle_path

    path = Path(config.get("models", {}).get("bundle") or default_bundle_path())
    try:
        meta = read_metadata(path)
    except (BundleError, OSError, ValueError) as exc:
        return ComponentHealth("model bundle", False, f"{path}: {str(exc)[:200]}")
    weights = path / str(meta["cxr_ai"]["weights"].get("file", "models/model.pt"))
    if not weights.is_file():
        return ComponentHealth("model bundle", False, f"{weights} is missing")
    return ComponentHealth("model bundle", True, f"{meta['cxr_ai']['name']} {meta.get('version', '')} at {path}")


def disk_health(path: str | os.PathLike, *, min_free_bytes: int) -> ComponentHealth:
    """Free space of the spool's file system against the listener's watermark."""
    free = shutil.disk_usage(path).free
    ok = free >= min_free_bytes
    detail = f"{free / 2**30:.1f} GiB free on the spool; watermark {min_free_bytes / 2**20:.0f} MiB"
    if not ok:
        detail += " (below: C-STOREs are refused with 0xA700 until space is freed)"
    return ComponentHealth("disk", ok, detail)


def service_health(service: Any) -> list[ComponentHealth]:
    """Listener, workers, model bundle, disk, each destination and the monitor of a running
    :class:`cxr_ai.service.Service`."""
    out: list[ComponentHealth] = []
    try:
        port = service.scp.port
        out.append(ComponentHealth("listener", True, f"{service.settings.listener.ae_title} on "
                                   f"{service.settings.listener.host}:{port}"))
    except (RuntimeError, AttributeError, TypeError):
        out.append(ComponentHealth("listener", False, "not listening"))
    alive = service.workers.alive()
    problems = list(service.workers.errors)
    out.append(ComponentHealth("workers", alive and not problems,
                               "; ".join(problems) if problems else
                               f"{service.settings.workers} running" if alive else "a worker thread stopped"))
    out.append(bundle_health(service.config))
    out.append(disk_health(service.spool.root, min_free_bytes=service.settings.listener.min_free_bytes))
    out += destination_health(service.settings.db_path, [d.name for d in service.settings.destinations])
    runner = getattr(service, "monitor_runner", None)
    if runner is not None:
        when = (dt.datetime.fromtimestamp(runner.last_update_at, dt.timezone.utc).isoformat(timespec="seconds")
                if runner.last_update_at else "not yet")
        out.append(ComponentHealth("monitor", not runner.last_error,
                                   runner.last_error or f"last update {when}; {runner.updates} since start"))
    return out


def _ro(db_path: str | os.PathLike) -> sqlite3.Connection:
    conn = sqlite3.connect(f"file:{Path(db_path)}?mode=ro", uri=True, timeout=5.0)
    conn.row_factory = sqlite3.Row
    return conn


def destination_health(db_path: str | os.PathLike, names: Sequence[str]) -> list[ComponentHealth]:
    """Per destination: dead letters and retrying deliveries (with the last error), else ok."""
    out = []
    with _ro(db_path) as conn:
        for name in names:
            rows = conn.execute("SELECT state, COUNT(*) AS n, MAX(attempts) AS a FROM outbox WHERE destination=? "
                                "GROUP BY state", (name,)).fetchall()
            by = {r["state"]: (r["n"], r["a"]) for r in rows}
            last = conn.execute("SELECT last_error FROM outbox WHERE destination=? AND last_error!='' "
                                "ORDER BY updated_at DESC LIMIT 1", (name,)).fetchone()
            dead = by.get(DeliveryState.DEAD.value, (0, 0))[0]
            pending, max_attempts = by.get(DeliveryState.PENDING.value, (0, 0))
            retrying = pending and (max_attempts or 0) > 0
            if dead or retrying:
                detail = (f"{dead} dead letters, " if dead else "") + f"{pending} pending"
                if last:
                    detail += f"; last error: {last['last_error'][:200]}"
                out.append(ComponentHealth(f"destination {name}", False, detail))
            else:
                sent = by.get(DeliveryState.SENT.value, (0, 0))[0]
                out.append(ComponentHealth(f"destination {name}", True, f"{sent} sent, {pending} pending"))
    return out


# -- queues and dead letters -------------------------------------------------------------------
@dataclass(frozen=True)
class QueueView:
    depth: int  # studies received, not yet processed
    oldest_queued_seconds: float | None
    studies: dict[str, int]
    instances: dict[str, int]
    outbox: dict[str, int]


def queue_view(db_path: str | os.PathLike, *, now: float | None = None) -> QueueView:
    now = time.time() if now is None else now
    with _ro(db_path) as conn:
        counts: dict[str, dict[str, int]] = {}
        for table, enum_ in (("studies", StudyState), ("instances", InstanceState), ("outbox", DeliveryState)):
            got = {r["state"]: r["n"] for r in conn.execute(f"SELECT state, COUNT(*) AS n FROM {table} GROUP BY state")}
            counts[table] = {s.value: int(got.get(s.value, 0)) for s in enum_}
        oldest = conn.execute("SELECT MIN(created_at) AS t FROM studies WHERE state=?",
                              (StudyState.RECEIVED.value,)).fetchone()["t"]
    return QueueView(depth=counts["studies"][StudyState.RECEIVED.value],
                     oldest_queued_seconds=None if oldest is None else max(0.0, now - oldest),
                     studies=counts["studies"], instances=counts["instances"], outbox=counts["outbox"])


@dataclass(frozen=True)
class DeadLetter:
    delivery_id: int
    job_id: str
    destination: str
    attempts: int
    reason: str
    created_at: float
    items: int


def dead_letters(db_path: str | os.PathLike) -> list[DeadLetter]:
    with _ro(db_path) as conn:
        rows = conn.execute("SELECT * FROM outbox WHERE state=? ORDER BY id", (DeliveryState.DEAD.value,)).fetchall()
    return [DeadLetter(delivery_id=r["id"], job_id=r["job_id"], destination=r["destination"], attempts=r["attempts"],
                       reason=r["last_error"] or "(no error recorded)", created_at=r["created_at"],
                       items=len(json.loads(r["items"]))) for r in rows]


def requeue_dead(store: JobStore, *, audit_path: str | os.PathLike, actor: str | None = None, client: str = "",
                 destination: str | None = None, delivery_ids: Sequence[int] | None = None) -> int:
    """Put dead letters back in the queue (all, one destination's, or the given ids) and audit
    it: the action of ``cxr-ai jobs --retry-dead`` (``actor`` the OS user) and of the page's
    re-queue button (the signed-in user and the page's ``client`` address)."""
    from cxr_ai.audit import AuditLog

    n = store.retry_dead(destination=destination, ids=delivery_ids)
    AuditLog(audit_path).write("requeue-dead", user=actor or getpass.getuser(), client=client,
                               destination=destination,
                               delivery_ids=list(delivery_ids) if delivery_ids is not None else None, requeued=n)
    logger.info("%d dead-lettered deliveries queued again by %s", n, actor or "the operator")
    return n


# -- throughput and latency --------------------------------------------------------------------
WINDOWS = {"hour": (3600.0, 12), "day": (86400.0, 24)}  # span, bins (5 min / 1 h)
#: Stage name -> (start column, end column) of the studies table.
STAGES = {"receive (association + quiet period)": ("created_at", "ready_at"),
          "queue + pipeline": ("ready_at", "processed_at"),
          "delivery": ("processed_at", "results_sent_at"),
          "end to end": ("created_at", "results_sent_at")}


@dataclass(frozen=True)
class Throughput:
    window: str
    bin_seconds: float
    bin_starts: list[float]  # Unix times
    instances_received: list[int]
    studies_processed: list[int]
    results_sent: list[int]


@dataclass(frozen=True)
class StageLatency:
    stage: str
    n: int
    p50_s: float | None
    p90_s: float | None
    max_s: float | None


def throughput(db_path: str | os.PathLike, *, window: str = "hour", now: float | None = None) -> Throughput:
    """Counts per bin over the last hour (5-minute bins) or day (hourly bins)."""
    span, bins = WINDOWS[window]
    now = time.time() if now is None else now
    start = now - span
    edges = np.linspace(start, now, bins + 1)
    with _ro(db_path) as conn:
        def hist(sql: str) -> list[int]:
            t = np.array([r[0] for r in conn.execute(sql, (start,)).fetchall()], dtype=float)
            return np.histogram(t, bins=edges)[0].astype(int).tolist()

        received = hist("SELECT received_at FROM instances WHERE received_at>=?")
        processed = hist("SELECT processed_at FROM studies WHERE processed_at>=?")
        sent = hist("SELECT results_sent_at FROM studies WHERE results_sent_at>=?")
    return Throughput(window=window, bin_seconds=span / bins, bin_starts=edges[:-1].tolist(),
                      instances_received=received, studies_processed=processed, results_sent=sent)


def stage_latency(db_path: str | os.PathLike, *, window: str = "hour", now: float | None = None) -> list[StageLatency]:
    """Per-stage latency of the studies that finished that stage within the window."""
    span, _ = WINDOWS[window]
    now = time.time() if now is None else now
    out = []
    with _ro(db_path) as conn:
        for stage, (a, b) in STAGES.items():
            rows = conn.execute(f"SELECT {b} - {a} FROM studies WHERE {a} IS NOT NULL AND {b} IS NOT NULL "
                                f"AND {b}>=?", (now - span,)).fetchall()
            # a study can be taken by a worker before its association's close stamps ready_at
            # (the close moves ready_at past the start of processing): its wait counts as 0
            d = np.clip(np.array([r[0] for r in rows], dtype=float), 0.0, None)
            if len(d):
                out.append(StageLatency(stage, len(d), float(np.percentile(d, 50)), float(np.percentile(d, 90)),
                                        float(d.max())))
            else:
                out.append(StageLatency(stage, 0, None, None, None))
    return out


# -- fairness ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class MetricCell:
    """One number of the table, or why there is none (``value`` None: ``text`` says why)."""

    value: float | None
    ci: tuple[float, float] | None
    text: str


@dataclass(frozen=True)
class GapCell:
    difference: float | None
    ci: tuple[float, float] | None
    flagged: bool
    text: str


@dataclass(frozen=True)
class CalibrationCurve:
    group: str
    prob_pred: list[float]
    prob_true: list[float]
    ece: float | None
    text: str


@dataclass(frozen=True)
class GroupRow:
    group: str
    n: int
    n_pos: int
    too_small: bool
    metrics: dict[str, MetricCell]
    gaps: dict[str, GapCell]
    calibration: CalibrationCurve


@dataclass(frozen=True)
class AttributeView:
    finding: str
    attribute: str
    available: bool
    note: str
    overall: dict[str, MetricCell] = field(default_factory=dict)
    groups: list[GroupRow] = field(default_factory=list)


@dataclass(frozen=True)
class DriftAlert:
    finding: str
    attribute: str
    group: str
    ks_statistic: float
    p_value: float
    n_current: int
    n_reference: int


@dataclass(frozen=True)
class FairnessView:
    computed_at: str | None
    window_days: float | None
    n_predictions: int
    findings: list[str]
    tables: list[AttributeView]
    flagged: list[dict[str, Any]]
    drift: list[DriftAlert]
    note: str = ""

    def table(self, finding: str, attribute: str) -> AttributeView:
        return next(t for t in self.tables if t.finding == finding and t.attribute == attribute)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _ci(cell: Mapping[str, Any]) -> tuple[float, float] | None:
    ci = cell.get("ci")
    return (float(ci[0]), float(ci[1])) if ci else None


def _metric_cell(cell: Mapping[str, Any], *, small: bool, n: int, min_n: int | None) -> MetricCell:
    if small:
        return MetricCell(None, None, f"{TOO_SMALL} (n={n}" + (f" < {min_n})" if min_n else ")"))
    if cell.get("value") is None:
        return MetricCell(None, None, str(cell.get("status", "not estimable")))
    v, ci = float(cell["value"]), _ci(cell)
    return MetricCell(v, ci, f"{v:.3f}" + (f" ({ci[0]:.3f}-{ci[1]:.3f})" if ci else ""))


def _min_n(status: str) -> int | None:
    import re

    m = re.search(r"< (\d+)\)", status or "")
    return int(m.group(1)) if m else None


def fairness_view(record: Mapping[str, Any] | None, *, attributes: Sequence[str] = OPS_ATTRIBUTES,
                  metrics: Mapping[str, str] = OPS_METRICS) -> FairnessView:
    """The latest performance record of the monitor as tables per finding and subgroup.

    Small groups say :data:`TOO_SMALL` instead of a number; attributes the log does not hold
    (insurance, unless a site adds it) or the monitor was not configured for say so.
    """
    if not record:
        return FairnessView(None, None, 0, [], [], [], [], note="the monitor has not run yet")
    alerts = record.get("alerts", [])
    flagged = [a for a in alerts if a["kind"] == "gap"]
    flagged_keys = {(a["finding"], a["attribute"], a["group"], a["metric"]) for a in flagged}
    drift = [DriftAlert(a["finding"], a["attribute"], a["group"], float(a["ks_statistic"]), float(a["p_value"]),
                        int(a["n_current"]), int(a["n_reference"])) for a in alerts if a["kind"] == "drift"]
    findings = record.get("result", {}).get("findings", {})
    tables: list[AttributeView] = []
    for f, res in findings.items():
        attrs = res.get("attributes", {})
        for attribute in attributes:
            r = attrs.get(attribute)
            if r is None:
                note = (MSG_NOT_RECORDED if attribute == "insurance" else MSG_NOT_CONFIGURED).format(attribute=attribute)
                tables.append(AttributeView(f, attribute, False, note))
                continue
            overall = {m: _metric_cell(r["overall"][m], small=False, n=r["n"], min_n=None) for m in metrics}
            rows = []
            for g in r["groups"]:
                small = bool(g["small"])
                min_n = _min_n(g.get("status", ""))
                cells = {m: _metric_cell(g["metrics"][m], small=small, n=g["n"], min_n=min_n) for m in metrics}
                gaps = {}
                for m in metrics:
                    d = g["gap_to_overall"][m]["difference"]
                    is_flagged = any((f, attribute, g["group"], k) in flagged_keys
                                     for k in (m, *SAME_QUANTITY.get(m, ())))
                    if small:
                        gaps[m] = GapCell(None, None, False, f"{TOO_SMALL} (n={g['n']})")
                    elif d.get("value") is None:
                        gaps[m] = GapCell(None, None, False, str(d.get("status", "not estimable")))
                    else:
                        ci = _ci(d)
                        gaps[m] = GapCell(float(d["value"]), ci, is_flagged,
                                          f"{d['value']:+.3f}" + (f" ({ci[0]:+.3f} to {ci[1]:+.3f})" if ci else "")
                                          + (" FLAGGED" if is_flagged else ""))
                cal = g.get("calibration", {})
                if small:
                    curve = CalibrationCurve(g["group"], [], [], None, f"{TOO_SMALL} (n={g['n']})")
                elif cal.get("status") == "ok":
                    curve = CalibrationCurve(g["group"], list(cal["prob_pred"]), list(cal["prob_true"]),
                                             float(cal["ece"]), f"ECE {cal['ece']:.3f}")
                else:
                    curve = CalibrationCurve(g["group"], [], [], None, str(cal.get("status", "not estimable")))
                rows.append(GroupRow(g["group"], int(g["n"]), int(g.get("n_pos", 0)), small, cells, gaps, curve))
            tables.append(AttributeView(f, attribute, True, "", overall, rows))
    note = "" if findings else "no prediction in the window has ground truth yet"
    return FairnessView(record.get("computed_at"), record.get("window_days"), int(record.get("n_predictions", 0)),
                        list(findings), tables, flagged, drift, note)


def last_performance_record(path: str | os.PathLike) -> dict[str, Any] | None:
    """The last line of the performance log (what the monitor computed last), or None."""
    p = Path(path)
    if not p.is_file():
        return None
    last = None
    with open(p, encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                last = line
    return json.loads(last) if last else None


# -- truth coverage ---------------------------------------------------------------------------
TRUTH_SOURCES = ("csv", "fhir", "feedback")


def source_kind(source: str | None) -> str:
    """The kind of a truth record's ``source``: csv, fhir, feedback (radiologist) or other."""
    s = (source or "").lower()
    if s.startswith("fhir"):
        return "fhir"
    if s.startswith(("feedback", "radiologist", "worklist")):
        return "feedback"
    if s.startswith("csv") or s.endswith(".csv"):
        return "csv"
    return "other"


@dataclass(frozen=True)
class TruthCoverage:
    finding: str
    n_predictions: int  # accepted predictions in the window
    n_with_truth: int  # with independent truth (radiologist feedback is not)
    by_source: dict[str, int]  # source kind -> predictions its records matched
    truth_records: dict[str, int]  # source kind -> records in the truth log

    @property
    def fraction(self) -> float | None:
        return self.n_with_truth / self.n_predictions if self.n_predictions else None


def truth_coverage(monitor: Any, *, now: dt.datetime | None = None) -> list[TruthCoverage]:
    """How many predictions of the monitor's current window have ground truth, and from where.

    ``n_with_truth`` counts the predictions with independent truth, the truth the performance
    figures use; radiologist feedback (the reader saw the model's answer) is counted in
    ``by_source["feedback"]`` only. Each source kind is matched on its own, so a prediction with
    truth from two sources counts once in ``n_with_truth`` and in both sources."""
    from cxr_ai.monitoring.truth import match_truth

    s = monitor.settings
    logs = monitor.read_logs()
    joined, _, _ = monitor.window_frame(now=now, logs=logs)
    records = logs[1]
    kinds = {k: [r for r in records if source_kind(r.get("source")) == k] for k in (*TRUTH_SOURCES, "other")}
    out = []
    accepted = joined[joined["gate_accepted"].astype(bool)] if len(joined) else joined
    for f in s.findings:
        n = int(len(accepted))
        with_truth = int(accepted[f].notna().sum()) if n else 0
        by_source, n_records = {}, {}
        for k, recs in kinds.items():
            n_records[k] = sum(1 for r in recs if r.get("finding") == f)
            if not n or not n_records[k]:
                by_source[k] = 0
                continue
            base = accepted.drop(columns=[c for c in s.findings if c in accepted]).reset_index(drop=True)
            m, _ = match_truth(base, recs, findings=(f,), window_days=s.truth_window_days)
            by_source[k] = int(m[f].notna().sum())
        out.append(TruthCoverage(f, n, with_truth, by_source, n_records))
    return out


# -- Prometheus gauges for the alert rules (deploy/prometheus) ---------------------------------
class OpsCollector:
    """Gauges the alert rules need beyond the job store's: the age of the oldest queued study,
    the disk watermark, and whether the model bundle is present. Registered by the service."""

    def __init__(self, *, db_path: str | os.PathLike, config: Mapping[str, Any], min_free_bytes: int) -> None:
        self.db_path = Path(db_path)
        self.config = config
        self.min_free_bytes = min_free_bytes

    def collect(self) -> Any:
        from prometheus_client.core import GaugeMetricFamily

        q = queue_view(self.db_path)
        yield GaugeMetricFamily("cxr_ai_oldest_queued_seconds",
                                "Age of the oldest study received and not yet processed (0 when none)",
                                value=q.oldest_queued_seconds or 0.0)
        yield GaugeMetricFamily("cxr_ai_spool_min_free_bytes",
                                "Free-space watermark of the spool ([listener] min_free_mb)",
                                value=self.min_free_bytes)
        yield GaugeMetricFamily("cxr_ai_model_bundle_present", "1 when the model bundle is present and readable",
                                value=1.0 if bundle_health(self.config).ok else 0.0)
