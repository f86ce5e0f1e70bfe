"""Server-side plots of the operations view as inline SVG text (matplotlib, no pyplot state,
nothing from the internet): fairness gaps with CI whiskers, calibration per group, throughput
and per-stage latency. Each function takes the typed records of :mod:`cxr_ai.ops` and returns
an ``<svg>`` element ready to embed in HTML; text stays text (``svg.fonttype = none``), so a
browser test can read the labels.
"""

from __future__ import annotations

import datetime as dt
import io
from collections.abc import Sequence

import matplotlib
from matplotlib.figure import Figure

from cxr_ai.ops import OPS_METRICS, AttributeView, StageLatency, Throughput

FLAGGED = "#c0392b"
NORMAL = "#4c72b0"
MUTED = "#b0b0b0"


def _svg(fig: Figure) -> str:
    buf = io.StringIO()
    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": "cxr-ai"}):
        fig.savefig(buf, format="svg", bbox_inches="tight", metadata={"Date": None})
    text = buf.getvalue()
    return text[text.index("<svg"):]


def gap_bars_svg(view: AttributeView, *, metric: str = "auroc") -> str:
    """Each group's gap to overall for one metric, as bars with CI whiskers. Flagged gaps are
    red; a group too small (or a gap not estimable) gets no bar, its reason as the label."""
    groups = view.groups
    fig = Figure(figsize=(6.0, 0.45 * max(len(groups), 1) + 1.2))
    ax = fig.add_subplot()
    labels = []
    for i, g in enumerate(groups):
        cell = g.gaps[metric]
        labels.append(f"{g.group} (n={g.n})")
        if cell.difference is None:
            ax.text(0, i, cell.text, va="center", ha="center", fontsize=8, color="#555555")
            continue
        colour = FLAGGED if cell.flagged else NORMAL
        xerr = None
        if cell.ci is not None:
            xerr = [[cell.difference - cell.ci[0]], [cell.ci[1] - cell.difference]]
        ax.barh(i, cell.difference, color=colour, xerr=xerr, capsize=4, ecolor="#333333", height=0.6)
        if cell.flagged:
            ax.text(cell.difference, i, "  flagged", va="center", ha="left" if cell.difference >= 0 else "right",
                    fontsize=8, color=FLAGGED)
    ax.axvline(0, color="#333333", linewidth=0.8)
    ax.set_yticks(range(len(groups)), labels)
    ax.invert_yaxis()
    ax.set_xlabel(f"{OPS_METRICS.get(metric, metric)}: group minus overall")
    ax.set_title(f"{view.finding}: {OPS_METRICS.get(metric, metric)} gap by {view.attribute}", fontsize=10)
    return _svg(fig)


def calibration_svg(view: AttributeView) -> str:
    """Reliability curves per group (predicted vs observed frequency) with the diagonal; groups
    too small or not estimable are listed under the plot instead of drawn."""
    fig = Figure(figsize=(4.8, 4.8))
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], linestyle="--", color=MUTED, label="perfect")
    skipped = []
    for g in view.groups:
        c = g.calibration
        if c.prob_pred:
            ax.plot(c.prob_pred, c.prob_true, marker="o", label=f"{g.group} ({c.text})")
        else:
            skipped.append(f"{g.group}: {c.text}")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("predicted probability")
    ax.set_ylabel("observed frequency")
    ax.set_title(f"{view.finding}: calibration by {view.attribute}", fontsize=10)
    ax.legend(fontsize=7, loc="upper left")
    if skipped:
        fig.text(0.01, -0.02, "\n".join(skipped), fontsize=7, va="top")
    return _svg(fig)


def throughput_svg(tp: Throughput) -> str:
    """Instances received, studies processed and results sent per bin."""
    fig = Figure(figsize=(6.4, 2.8))
    ax = fig.add_subplot()
    t = [dt.datetime.fromtimestamp(s, dt.timezone.utc) for s in tp.bin_starts]
    width = dt.timedelta(seconds=tp.bin_seconds / 3.5)
    for k, (name, values) in enumerate((("instances received", tp.instances_received),
                                        ("studies processed", tp.studies_processed),
                                        ("results sent", tp.results_sent))):
        ax.bar([x + width * k for x in t], values, width=width, label=name, align="edge")
    per = "5 min" if tp.window == "hour" else "hour"
    ax.set_ylabel(f"per {per}")
    ax.set_title(f"Throughput, last {tp.window} (UTC)", fontsize=10)
    ax.legend(fontsize=7)
    fig.autofmt_xdate()
    return _svg(fig)


def latency_svg(stages: Sequence[StageLatency], *, window: str = "hour") -> str:
    """Median and 90th percentile per stage (seconds); a stage with no study says so."""
    fig = Figure(figsize=(6.4, 0.5 * len(stages) + 1.2))
    ax = fig.add_subplot()
    for i, s in enumerate(stages):
        if s.n == 0:
            ax.text(0, i, "  no study in this window", va="center", fontsize=8, color="#555555")
            continue
        ax.barh(i, s.p90_s, color=MUTED, height=0.6, label="p90" if i == 0 else None)
        ax.barh(i, s.p50_s, color=NORMAL, height=0.6, label="median" if i == 0 else None)
    ax.set_yticks(range(len(stages)), [f"{s.stage} (n={s.n})" for s in stages])
    ax.invert_yaxis()
    ax.set_xlabel("seconds")
    ax.set_title(f"Per-stage latency, last {window}", fontsize=10)
    if any(s.n for s in stages):
        ax.legend(fontsize=7)
    return _svg(fig)
