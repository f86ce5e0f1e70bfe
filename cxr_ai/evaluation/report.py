"""HTML report (self-contained: figures as base64 PNG) and the same numbers as JSON."""

from __future__ import annotations

import base64
import html
import io
import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from sklearn.metrics import ConfusionMatrixDisplay, RocCurveDisplay

from cxr_ai.evaluation.evaluate import attribute_column
from cxr_ai.evaluation.metrics import DEFAULT_FLAG_METRICS, METRICS, PREVALENCE_DEPENDENT

logger = logging.getLogger(__name__)

GAP_METRICS: tuple[str, ...] = DEFAULT_FLAG_METRICS
#: Column headings: FNR is the underdiagnosis rate (one column, see cxr_ai.evaluation.metrics).
METRIC_HEADINGS: dict[str, str] = {
    "auroc": "AUROC", "sensitivity": "TPR", "specificity": "TNR", "fpr": "FPR",
    "fnr": "FNR (under&shy;diagnosis)", "ece": "ECE", "ppv": "PPV", "npv": "NPV",
}
MAX_ROC_GROUPS = 10
DPI = 80


def _png(fig: plt.Figure) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _img(b64: str, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{b64}">'


def strip_frames(obj: Any) -> Any:
    """Drop in-memory frames (key ``frame``) and make the structure JSON-safe (no NaN)."""
    if isinstance(obj, Mapping):
        return {str(k): strip_frames(v) for k, v in obj.items() if k != "frame"}
    if isinstance(obj, (list, tuple)):
        return [strip_frames(v) for v in obj]
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return None if not math.isfinite(float(obj)) else float(obj)
    if isinstance(obj, np.bool_):
        return bool(obj)
    return obj


# --- Figures ---------------------------------------------------------------------------------

def roc_figure(frame: pd.DataFrame, finding: str, attribute: str | tuple[str, ...]) -> str | None:
    name, groups = attribute_column(frame, attribute)
    labelled = frame[finding].notna().to_numpy()
    y = frame[finding].to_numpy(float)[labelled].astype(int)
    s = frame[f"p_{finding}"].to_numpy(float)[labelled]
    g = groups.to_numpy()[labelled]
    fig, ax = plt.subplots(figsize=(5, 4.5))
    drawn = 0
    if len(set(y)) == 2:
        RocCurveDisplay.from_predictions(y, s, ax=ax, name="overall", curve_kwargs={"color": "black", "lw": 2})
        drawn += 1
    sizes = pd.Series(g).value_counts()
    for group in sizes.index[:MAX_ROC_GROUPS]:
        m = g == group
        if len(set(y[m])) == 2:
            RocCurveDisplay.from_predictions(y[m], s[m], ax=ax, name=f"{group} (n={m.sum()})")
            drawn += 1
    if not drawn:
        plt.close(fig)
        return None
    ax.plot([0, 1], [0, 1], ls=":", color="grey")
    ax.set_title(f"ROC: {finding} by {name}")
    ax.legend(fontsize=7, loc="lower right")
    return _png(fig)


def calibration_figure(result: Mapping[str, Any], finding: str) -> str | None:
    fig, ax = plt.subplots(figsize=(5, 4.5))
    drawn = 0
    cal = result["calibration"]
    if cal["status"] == "ok":
        ax.plot(cal["prob_pred"], cal["prob_true"], "k-o", lw=2, ms=3,
                label=f"overall (ECE {cal['ece']:.3f})")
        drawn += 1
    for gr in result["groups"][:MAX_ROC_GROUPS]:
        c = gr["calibration"]
        if c["status"] == "ok":
            ax.plot(c["prob_pred"], c["prob_true"], "-o", ms=3,
                    label=f"{gr['group']} (ECE {c['ece']:.3f})")
            drawn += 1
    if not drawn:
        plt.close(fig)
        return None
    ax.plot([0, 1], [0, 1], ls=":", color="grey")
    ax.set_xlabel("mean predicted probability")
    ax.set_ylabel("observed fraction positive")
    ax.set_title(f"Calibration: {finding} by {result['attribute']}")
    ax.legend(fontsize=7)
    return _png(fig)


def gap_figure(result: Mapping[str, Any], finding: str, metrics: Sequence[str] = GAP_METRICS) -> str:
    """Gap bars with CIs; red = a flagged gap (the same decision as the report's flag list)."""
    flagged = {(f["group"], f["metric"]) for f in result.get("flagged", ())}
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.2 * len(metrics), 0.45 * len(result["groups"]) + 1.6),
                             sharey=True)
    labels = [gr["group"] for gr in result["groups"]]
    for ax, metric in zip(np.atleast_1d(axes), metrics):
        vals, lo, hi, colors = [], [], [], []
        for gr in result["groups"]:
            gap = gr["gap_to_overall"][metric]
            d = gap["difference"]
            v = d["value"] if d["value"] is not None else 0.0
            ci = d["ci"] or [v, v]
            vals.append(v)
            lo.append(v - ci[0])
            hi.append(ci[1] - v)
            colors.append("#c0392b" if (gr["group"], metric) in flagged
                          else "#95a5a6" if gr["small"] or d["value"] is None else "#2e86c1")
        yy = np.arange(len(labels))
        ax.barh(yy, vals, xerr=[lo, hi], color=colors, capsize=3)
        ax.axvline(0, color="black", lw=0.8)
        ax.set_yticks(yy, labels)
        ax.set_title(f"{metric} − overall", fontsize=9)
    fig.subplots_adjust(left=0.16, right=0.98, bottom=0.12, top=0.8, wspace=0.15)
    fig.suptitle(f"{finding}: gaps by {result['attribute']} (95% CI; red = flagged; grey = small/not estimable)",
                 fontsize=9)
    return _png(fig)


def confusion_figure(result: Mapping[str, Any], overall_cm: Sequence[Sequence[int]], finding: str) -> str:
    panels = [("overall", overall_cm)] + [(f"{g['group']}", g["confusion_matrix"]) for g in result["groups"][:7]]
    fig, axes = plt.subplots(1, len(panels), figsize=(2.3 * len(panels), 2.6))
    for ax, (title, cm) in zip(np.atleast_1d(axes), panels):
        ConfusionMatrixDisplay(np.asarray(cm), display_labels=["neg", "pos"]).plot(ax=ax, colorbar=False)
        ax.set_title(title, fontsize=8)
    fig.subplots_adjust(left=0.06, right=0.98, bottom=0.12, top=0.78, wspace=0.5)
    fig.suptitle(f"{finding}: confusion matrices by {result['attribute']}", fontsize=9)
    return _png(fig)


def embedding_figure(analysis: Mapping[str, Any], colour_by: Sequence[str]) -> str | None:
    frame = analysis.get("frame")
    if frame is None or "PC2" not in frame:
        return None
    cols = [c for c in colour_by if c in frame]
    fig, axes = plt.subplots(1, len(cols), figsize=(4 * len(cols), 3.8))
    for ax, col in zip(np.atleast_1d(axes), cols):
        for value in sorted(frame[col].astype(str).unique()):
            m = frame[col].astype(str) == value
            ax.scatter(frame.loc[m, "PC1"], frame.loc[m, "PC2"], s=6, alpha=0.6, label=value)
        ax.set_title(f"PCA coloured by {col}", fontsize=9)
        ax.set_xlabel("PC1")
        ax.set_ylabel("PC2")
        ax.legend(fontsize=6, markerscale=2)
    return _png(fig)


# --- HTML ------------------------------------------------------------------------------------

CSS = """body{font-family:system-ui,sans-serif;margin:1.5em;max-width:1400px;color:#222}
table{border-collapse:collapse;margin:.5em 0;font-size:12px}td,th{border:1px solid #ccc;padding:2px 6px;text-align:right}
th{background:#f3f3f3}td.l,th.l{text-align:left}.bad{background:#fadbd8}.small{color:#888}.ne{color:#a0522d;font-style:italic}
img{max-width:100%;margin:4px}h2{border-bottom:2px solid #2e86c1}.note{font-size:12px;color:#555}"""


def _fmt(cell: Mapping[str, Any] | None) -> str:
    if cell is None:
        return ""
    if cell["value"] is None:
        return f'<span class="ne" title="{html.escape(cell["status"])}">not estimable</span>'
    s = f"{cell['value']:.3f}"
    if cell.get("ci"):
        s += f" <small>[{cell['ci'][0]:.3f}, {cell['ci'][1]:.3f}]</small>"
    return s


def _prevalence(n_pos: int, n: int) -> str:
    return f"{n_pos / n:.3f}" if n else ""


def _group_table(result: Mapping[str, Any], flagged: Sequence[Mapping[str, Any]] = ()) -> str:
    """Groups × metrics; a red cell is a flagged gap (``flagged``: only the metrics asked for,
    so PPV/NPV, beside the prevalence they follow, are red only when asked for)."""
    head = "".join(f'<th{" class=prev" if m in PREVALENCE_DEPENDENT else ""}>{METRIC_HEADINGS.get(m, m)}</th>'
                   for m in METRICS)
    rows = [f'<tr><td class="l"><b>overall</b></td><td>{result["n"]}</td><td>{result["n_pos"]}</td>'
            f'<td>{_prevalence(result["n_pos"], result["n"])}</td><td></td>'
            + "".join(f"<td>{_fmt(result['overall'][m])}</td>" for m in METRICS) + "</tr>"]
    red = {(f["group"], f["metric"]) for f in flagged}
    for gr in result["groups"]:
        cls = "small" if gr["small"] else ""
        cells = []
        for m in METRICS:
            bad = (gr["group"], m) in red
            cells.append(f'<td class="{"bad" if bad else ""}">{_fmt(gr["metrics"][m])}</td>')
        rows.append(f'<tr class="{cls}"><td class="l">{html.escape(gr["group"])}</td><td>{gr["n"]}</td>'
                    f'<td>{gr["n_pos"]}</td><td>{_prevalence(gr["n_pos"], gr["n"])}</td>'
                    f'<td class="l">{html.escape(gr["status"])}</td>' + "".join(cells) + "</tr>")
    return (f'<table><tr><th class="l">group</th><th>n</th><th>n pos</th><th>prevalence</th>'
            f'<th class="l">status</th>{head}</tr>{"".join(rows)}</table>')


def _gap_table(result: Mapping[str, Any], flag_metrics: Sequence[str] = DEFAULT_FLAG_METRICS) -> str:
    rows = []
    for gr in result["groups"]:
        for ref in ("gap_to_overall", "gap_to_best"):
            cells = []
            for m in METRICS:
                g = gr[ref][m]
                bad = g["significant"] and g["worse"] and not gr["small"] and m in flag_metrics
                cells.append(f'<td class="{"bad" if bad else ""}">{_fmt(g["difference"])}<br>'
                             f'<small>ratio {_fmt(g["ratio"])}</small></td>')
            rows.append(f'<tr><td class="l">{html.escape(gr["group"])}</td><td class="l">{ref[7:]}</td>'
                        + "".join(cells) + "</tr>")
    head = "".join(f"<th>{METRIC_HEADINGS.get(m, m)}</th>" for m in METRICS)
    best = ", ".join(f"{m}: {html.escape(str(b))}" for m, b in result["best_group"].items())
    return (f'<p class="note">Best group per metric: {best}</p><table><tr><th class="l">group</th>'
            f'<th class="l">vs</th>{head}</tr>{"".join(rows)}</table>')


def _classification_table(report: Mapping[str, Any]) -> str:
    rows = []
    for label, vals in report.items():
        if isinstance(vals, Mapping):
            rows.append(f'<tr><td class="l">{html.escape(label)}</td>' + "".join(
                f"<td>{vals.get(k, 0):.3f}</td>" if k != "support" else f"<td>{int(vals.get(k, 0))}</td>"
                for k in ("precision", "recall", "f1-score", "support")) + "</tr>")
        else:
            rows.append(f'<tr><td class="l">{html.escape(label)}</td><td colspan="4">{vals:.3f}</td></tr>')
    return ('<table><tr><th class="l"></th><th>precision</th><th>recall</th><th>f1</th><th>support</th></tr>'
            + "".join(rows) + "</table>")


def _joins_html(joins: Sequence[Mapping[str, Any]], gate: Mapping[str, Any]) -> str:
    rows = "".join(
        f'<tr><td class="l">{html.escape(j["name"])}</td><td class="l">{html.escape(", ".join(j["keys"]))}</td>'
        f'<td>{j["n_left"]}</td><td>{j["n_right"]}</td><td>{j["n_matched"]}</td>'
        f'<td>{j["n_left_unmatched"]}</td><td>{j["n_right_unmatched"]}</td>'
        f'<td class="l">{html.escape("; ".join(j["examples_left_unmatched"]))}</td>'
        f'<td class="l">{html.escape("; ".join(j["examples_right_unmatched"]))}</td></tr>' for j in joins)
    return ('<table><tr><th class="l">join</th><th class="l">keys</th><th>left</th><th>right</th><th>matched</th>'
            '<th>left unmatched</th><th>right unmatched</th><th class="l">examples left</th>'
            f'<th class="l">examples right</th></tr>{rows}</table>'
            f'<p class="note">Gate: {html.escape(json.dumps(gate))}</p>')


def _side_by_side(test_sets: Sequence[Mapping[str, Any]]) -> str:
    """Per finding and attribute: AUROC and FNR (underdiagnosis) per group, one column per test set."""
    parts = []
    findings = sorted({f for ts in test_sets for f, r in ts["findings"].items() if "attributes" in r})
    for finding in findings:
        attrs = sorted({a for ts in test_sets for a in ts["findings"].get(finding, {}).get("attributes", {})})
        for attr in attrs:
            groups: list[str] = []
            for ts in test_sets:
                for gr in ts["findings"].get(finding, {}).get("attributes", {}).get(attr, {}).get("groups", []):
                    if gr["group"] not in groups:
                        groups.append(gr["group"])
            head = "".join(f'<th colspan="3">{html.escape(ts["name"])}</th>' for ts in test_sets)
            sub = "<th>n</th><th>AUROC</th><th>FNR (underdiagnosis)</th>" * len(test_sets)
            rows = []
            for group in ["overall", *groups]:
                cells = []
                for ts in test_sets:
                    r = ts["findings"].get(finding, {}).get("attributes", {}).get(attr)
                    if r is None:
                        cells.append("<td></td>" * 3)
                        continue
                    if group == "overall":
                        cells.append(f"<td>{r['n']}</td><td>{_fmt(r['overall']['auroc'])}</td>"
                                     f"<td>{_fmt(r['overall']['fnr'])}</td>")
                        continue
                    gr = next((x for x in r["groups"] if x["group"] == group), None)
                    cells.append("<td></td>" * 3 if gr is None else
                                 f"<td>{gr['n']}</td><td>{_fmt(gr['metrics']['auroc'])}</td>"
                                 f"<td>{_fmt(gr['metrics']['fnr'])}</td>")
                rows.append(f'<tr><td class="l">{html.escape(group)}</td>{"".join(cells)}</tr>')
            parts.append(f"<h3>{html.escape(finding)} by {html.escape(attr)}</h3><table><tr><th></th>{head}</tr>"
                         f"<tr><th></th>{sub}</tr>{''.join(rows)}</table>")
    return "".join(parts)


def _policy_html(policy: Mapping[str, Any]) -> str:
    rows = "".join(
        f'<tr><td class="l">{html.escape(col)}</td><td>{c["n_rows"]}</td><td>{c["n_positive"]}</td>'
        f'<td>{c["n_negative"]}</td><td>{c["n_uncertain"]}</td><td>{c["n_blank"]}</td></tr>'
        for col, c in policy["columns"].items())
    unc = {"u_ones": "counted as positive", "u_zeros": "counted as negative",
           "ignore": "left out"}.get(policy["uncertain_policy"], policy["uncertain_policy"])
    blank = {"negative": "counted as negative (CheXpert convention)",
             "ignore": "left out"}.get(policy["blank_policy"], policy["blank_policy"])
    return (f"<p>Uncertain (&minus;1) labels: <b>{html.escape(policy['uncertain_policy'])}</b>, "
            f"{html.escape(unc)}. Blank (unmentioned) labels: <b>{html.escape(policy['blank_policy'])}</b>, "
            f"{html.escape(blank)}.</p><table><tr><th class=\"l\">column</th><th>rows</th><th>1.0</th>"
            f"<th>0.0</th><th>uncertain</th><th>blank</th></tr>{rows}</table>")


def _answer_html(test_sets: Sequence[Mapping[str, Any]], settings: Mapping[str, Any]) -> str:
    """The answer first: which gaps, for whom, how sure; then where the details are."""
    flag_metrics = tuple(settings.get("flag_metrics") or DEFAULT_FLAG_METRICS)
    metrics = settings.get("metrics", {})
    level = metrics.get("ci_level", 0.95)
    how = (f"A gap is flagged when a group is worse than overall by at least "
           f"{settings.get('gap_bound', 0.05):g} on {', '.join(flag_metrics)} and its {level:.0%} "
           f"stratified bootstrap interval ({metrics.get('n_boot', '?')} resamples) excludes 0; groups "
           f"under {metrics.get('min_group_size', '?')} images are never flagged. Many groups and metrics "
           f"are tested at once, so expect about {1 - level:.0%} of chance intervals to exclude 0; the "
           "bound keeps chance gaps small enough not to be flagged.")
    parts = ["<h2>Answer</h2>"]
    for ts in test_sets:
        for finding, res in ts["findings"].items():
            label = f"{html.escape(ts['name'])} &middot; {html.escape(finding)}"
            if "attributes" not in res:
                parts.append(f'<p><b>{label}</b>: <span class="ne">{html.escape(res.get("status", ""))}</span></p>')
                continue
            flags = [f for r in res["attributes"].values() for f in r["flagged"]]
            auroc = res.get("overall", {}).get("auroc", {})
            head = f"<b>{label}</b> (n = {res['n']}, overall AUROC {_fmt(auroc)})"
            if not flags:
                parts.append(f"<p>{head}: <b>no harmful gap flagged</b>.</p>")
                continue
            items = "".join(
                f"<li><b>{html.escape(f['attribute'])} = {html.escape(f['group'])}</b>: "
                f"{METRIC_HEADINGS.get(f['metric'], f['metric'])} {f['difference']:+.3f} vs overall "
                f"[{f['ci'][0]:+.3f}, {f['ci'][1]:+.3f}] (n = {f.get('n', '?')}"
                + (f", prevalence {f['prevalence']:.3f}" if f.get("prevalence") is not None else "")
                + ")</li>" for f in flags)
            parts.append(f'<p>{head}: <b>{len(flags)} harmful gap(s)</b>:</p><ul class="bad">{items}</ul>')
    parts.append(f'<p class="note">{html.escape(how)}</p>')
    return "".join(parts)


def render_html(test_sets: Sequence[Mapping[str, Any]], *, title: str = "cxr-ai evaluation",
                settings: Mapping[str, Any] | None = None, plot_attributes: Sequence[str] | None = None,
                embeddings: Mapping[str, Any] | None = None) -> str:
    """The report. ``test_sets`` are :func:`~cxr_ai.evaluation.evaluate.evaluate_frames` results
    (with their ``frame``); figures are drawn for ``plot_attributes`` (default: the single
    attributes; intersections get tables only)."""
    settings = settings or {}
    flag_metrics = tuple(settings.get("flag_metrics") or DEFAULT_FLAG_METRICS)
    body = [f"<h1>{html.escape(title)}</h1>", _answer_html(test_sets, settings)]
    if len(test_sets) > 1:
        body.append("<h2>Test sets side by side</h2>" + _side_by_side(test_sets))
    body.append(_reading_note(flag_metrics))
    for ts in test_sets:
        body += _test_set_html(ts, flag_metrics=flag_metrics, plot_attributes=plot_attributes)
    if embeddings:
        body += _embeddings_html(embeddings)
    if settings:
        body.append("<details><summary>Settings</summary><pre class=note>"
                    f"{html.escape(json.dumps(strip_frames(settings), indent=1))}</pre></details>")
    return (f'<!DOCTYPE html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{CSS}</style></head><body>{''.join(body)}</body></html>")


def _reading_note(flag_metrics: tuple[str, ...]) -> str:
    """How to read the tables: FNR as underdiagnosis, PPV/NPV and prevalence, flagged gaps."""
    return (
        '<h2>How to read the details</h2><p class="note">Metrics at the bundle operating threshold. '
        "<b>FNR</b> is the underdiagnosis rate: Seyyed-Kalantari et al. (Nat Med 2021) define "
        "underdiagnosis as the false-positive rate of the &lsquo;no finding&rsquo; decision, which for one "
        "finding is its FNR, so the two are one column. TPR = 1 &minus; FNR and TNR = 1 &minus; FPR are "
        "shown for reading convenience. <b>PPV/NPV follow each group&rsquo;s prevalence</b> (shown beside "
        "them): a model equally good for everyone has different PPVs where prevalence differs, so they are "
        f"not flagged{' here' if not set(flag_metrics) & set(PREVALENCE_DEPENDENT) else ' (flagging was asked for)'}. "
        "Gaps are group &minus; overall (and group &minus; best group) with stratified bootstrap CIs; red "
        f"cells: a flagged gap ({html.escape(', '.join(flag_metrics))}: harmful direction, at least the gap "
        "bound, CI excluding 0). Small groups are greyed and never flagged; a metric a group cannot define "
        "is &lsquo;not estimable&rsquo; (hover for why).</p>")


def _test_set_html(ts: Mapping[str, Any], *, flag_metrics: tuple[str, ...],
                   plot_attributes: Sequence[str] | None) -> list[str]:
    """One test set: label policies, joins and gate, then per finding the overall report and,
    per attribute, the group and gap tables and the figures."""
    body: list[str] = []
    body.append(f"<h2>Test set: {html.escape(ts['name'])}</h2>")
    if ts.get("label_policy"):
        body.append("<h3>Label policies</h3>" + _policy_html(ts["label_policy"]))
    body.append("<h3>Joins and gate</h3>" + _joins_html(ts.get("joins", []), ts.get("gate", {})))
    frame = ts.get("frame")
    for finding, res in ts["findings"].items():
        body.append(f"<h3>{html.escape(finding)}</h3>")
        if "attributes" not in res:
            body.append(f'<p class="ne">{html.escape(res.get("status", ""))}</p>')
            continue
        body.append(f"<p>n = {res['n']} (unlabelled: {res['n_unlabelled']}), thresholds "
                    f"{res['thresholds']}</p>")
        body.append("<h4>Classification report (overall)</h4>" + _classification_table(res["classification_report"]))
        plotted = [a for a in res["attributes"] if (a in plot_attributes if plot_attributes is not None
                                                    else " × " not in a)]
        confusion_attr = "race" if "race" in plotted else (plotted[0] if plotted else None)
        for attr, r in res["attributes"].items():
            body.append(f"<h4>{html.escape(finding)} by {html.escape(attr)}</h4>")
            body.append(_group_table(r, r.get("flagged", ())))
            body.append("<details><summary>gaps (difference, ratio) to overall and to the best group"
                        "</summary>" + _gap_table(r, flag_metrics) + "</details>")
            if (attr not in plot_attributes) if plot_attributes is not None else (" × " in attr):
                continue  # default: figures for single attributes, tables for intersections
            figs = []
            if frame is not None:
                key: str | tuple[str, ...] = tuple(attr.split(" × ")) if " × " in attr else attr
                b = roc_figure(frame, finding, key)
                if b:
                    figs.append(_img(b, f"ROC {finding} by {attr}"))
            b = calibration_figure(r, finding)
            if b:
                figs.append(_img(b, f"calibration {finding} by {attr}"))
            figs.append(_img(gap_figure(r, finding), f"gaps {finding} by {attr}"))
            if attr == confusion_attr:
                figs.append(_img(confusion_figure(r, res["confusion_matrix"], finding),
                                 f"confusion matrices {finding} by {attr}"))
            body.append("<div>" + "".join(figs) + "</div>")
    return body


def _embeddings_html(embeddings: Mapping[str, Any]) -> list[str]:
    """The embedding space: PCA figure and the per-group KS tests on its components."""
    body: list[str] = []
    body.append("<h2>Embedding space</h2>")
    if embeddings.get("status") != "ok":
        body.append(f'<p class="ne">{html.escape(embeddings.get("status", ""))}</p>')
    else:
        ev = ", ".join(f"{v:.3f}" for v in embeddings["explained_variance_ratio"])
        body.append(f"<p>n = {embeddings['n']} (without embedding: {embeddings['n_without_embedding']}); "
                    f"explained variance ratio: {ev}</p>")
        colour = [c for c in embeddings["frame"].columns if not str(c).startswith("PC")]
        b = embedding_figure(embeddings, colour)
        if b:
            body.append(_img(b, "embedding PCA"))
        rows = "".join(
            f'<tr class="{"bad" if t["significant"] else ""}"><td class="l">{html.escape(t["attribute"])}</td>'
            f'<td class="l">{html.escape(t["group"])}</td><td>{t["component"]}</td><td>{t["n_group"]}</td>'
            f'<td>{t["statistic"]:.3f}</td><td>{t["p_value"]:.2e}</td><td>{t["p_bonferroni"]:.2e}</td></tr>'
            for t in embeddings["tests"])
        body.append('<table><tr><th class="l">attribute</th><th class="l">group vs rest</th><th>component</th>'
                    f"<th>n</th><th>KS D</th><th>p</th><th>p (Bonferroni)</th></tr>{rows}</table>")
    return body


def write_report(out_dir: str | os.PathLike, test_sets: Sequence[Mapping[str, Any]], *,
                 settings: Mapping[str, Any] | None = None, embeddings: Mapping[str, Any] | None = None,
                 plot_attributes: Sequence[str] | None = None, title: str = "cxr-ai evaluation"
                 ) -> tuple[Path, Path]:
    """Write ``report.html`` and ``report.json`` to ``out_dir``; return their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    payload = {"title": title, "settings": settings or {}, "test_sets": list(test_sets),
               "embeddings": embeddings}
    json_path = out / "report.json"
    json_path.write_text(json.dumps(strip_frames(payload), indent=1, allow_nan=False), encoding="utf-8")
    html_path = out / "report.html"
    html_path.write_text(render_html(test_sets, title=title, settings=settings, embeddings=embeddings,
                                     plot_attributes=plot_attributes), encoding="utf-8")
    logger.info("wrote %s and %s", html_path, json_path)
    return html_path, json_path
