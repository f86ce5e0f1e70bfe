"""The per-instance stages, shared by the local run and the Dask workers: prepare (read, gate,
decode, preprocess), infer (the model, in batches), finish (result objects, written atomically,
and the table row)."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cxr_ai.batch.inputs import WorkItem
from cxr_ai.batch.state import STUDIES_DIR, TMP_PREFIX
from cxr_ai.batch.table import DEFAULT_FINDINGS, outcome_row
from cxr_ai.contract import StagedPipeline
from cxr_ai.outputs import ImageOutputs, batch_fhir_name, batch_name

if TYPE_CHECKING:  # pragma: no cover
    from cxr_ai.imaging import Preprocessed
    from cxr_ai.pipeline import InstanceOutcome


@dataclass
class Prepared:
    """An instance after the gate and the pixel pipeline (``pre`` is None unless accepted).

    ``ticket`` identifies the instance inside one :func:`~cxr_ai.batch.pools.run_items` call (its position); with a
    process pool, the worker that prepared it keeps the full outcome (radiograph, decoded
    pixels) under that ticket and ``outcome`` here is a light copy without pixel data.
    """

    item: WorkItem
    outcome: InstanceOutcome
    pre: Preprocessed | None = None
    ticket: int = -1


def prepare(pipeline: StagedPipeline, item: WorkItem, *, keep_pixels: bool | None = None) -> Prepared:
    """Read, gate and preprocess one instance (runs in the stage pool): the pipeline's stage 1.

    Unless ``keep_pixels`` (default: the pipeline makes heatmaps), the decoded pixels are
    dropped once preprocessed: the SR, FHIR and table need the header only, and
    ``Radiograph.pixels()`` decodes again should anything ask. Memory per waiting instance then
    is its file's bytes, not twice that.
    """
    outcome, pre = pipeline.prepare(item.path)
    # an unreadable file keeps the UIDs the worklist scan found for it (if any)
    outcome.sop_instance_uid = outcome.sop_instance_uid or item.sop_uid
    outcome.study_instance_uid = outcome.study_instance_uid or item.study_uid
    keep = bool(pipeline.explain) if keep_pixels is None else keep_pixels
    rg = outcome.radiograph
    if pre is not None and rg is not None and not keep:
        rg._pixels = None
    return Prepared(item, outcome, pre)


def infer(pipeline: StagedPipeline, batch: Sequence[Prepared], *, explain: bool | None = None,
          source_maps: bool = True) -> None:
    """Run the model on the accepted instances of ``batch`` (one engine call): stage 2.

    ``explain`` (default: the pipeline's) keeps the forward's Grad-CAM maps; with
    ``source_maps`` they are mapped to the source geometry in the same call, else
    :meth:`~cxr_ai.pipeline.Pipeline.add_heatmaps` does it in stage 3.
    """
    pairs = [(p.outcome, p.pre) for p in batch]
    kwargs: dict[str, Any] = {} if source_maps else {"source_maps": False}
    if explain is None:
        pipeline.infer(pairs, **kwargs)
    else:
        pipeline.infer(pairs, explain=explain, **kwargs)
    for p in batch:
        p.pre = None  # free the tensor


def write_outputs(outcome: InstanceOutcome, out_dir: Path, *, variant: str = "") -> list[str]:
    """Write the instance's result objects under deterministic names (:func:`cxr_ai.outputs.batch_name`);
    return them (relative).

    Temporary names first, fsync, then rename: a kill leaves either nothing or complete files
    under the final names, which a re-run overwrites.
    """
    from cxr_ai.store.spool import fsync_dir, fsync_file, safe_key

    outputs = outcome.outputs
    if outputs.empty:
        return []
    study_dir = out_dir / STUDIES_DIR / safe_key(outcome.study_instance_uid or "unknown")
    study_dir.mkdir(parents=True, exist_ok=True)
    sop = safe_key(outcome.sop_instance_uid) + (f"-{variant}" if variant else "")  # a reused UID: own names
    staged: list[tuple[Path, Path]] = []
    for kind, n, ds in outputs.numbered():
        final = study_dir / batch_name(sop, kind, n)
        tmp = study_dir / f"{TMP_PREFIX}{final.name}"
        ds.save_as(tmp, enforce_file_format=True)
        fsync_file(tmp)
        staged.append((tmp, final))
    bundle = outputs.fhir_json()
    if bundle is not None:
        final = study_dir / batch_fhir_name(sop)
        tmp = study_dir / f"{TMP_PREFIX}{final.name}"
        tmp.write_text(json.dumps(bundle, sort_keys=True), encoding="utf-8")
        fsync_file(tmp)
        staged.append((tmp, final))
    for tmp, final in staged:
        os.replace(tmp, final)
    fsync_dir(study_dir)
    return [str(final.relative_to(out_dir)) for _, final in staged]


@dataclass
class Finished:
    """What one instance produced, ready for the state database."""

    key: str
    row: dict[str, Any]
    outputs: list[str]


def finish(pipeline: StagedPipeline, prepared: Prepared, *, out_dir: Path, pkey: bytes, write: bool = True) -> Finished:
    """Build the result objects of an instance (after :func:`infer`), write them, make its row.

    ``write=False`` is the results-table-only mode: no SR / SC / PM / FHIR object is built.
    """
    outcome = prepared.outcome
    if outcome.result is not None and outcome.result.findings and outcome.radiograph is not None:
        if write:
            pipeline.build_outputs(outcome)  # the same objects as the listener
        else:
            pipeline.build_outputs(outcome, parts=())  # status and message only, no object
    outputs = write_outputs(outcome, out_dir, variant=prepared.item.variant) if write else []
    row = outcome_row(outcome, model=pipeline.model_info, key=pkey,
                      finding_keys=pipeline_finding_keys(pipeline), n_outputs=len(outputs))
    outcome.radiograph = outcome.sc_display = None  # free the pixels
    outcome.outputs = ImageOutputs()  # free the objects
    return Finished(prepared.item.key, row, outputs)


def pipeline_finding_keys(pipeline: StagedPipeline) -> list[str]:
    keys = list(pipeline.engine.finding_keys or [])
    return keys + [k for k in DEFAULT_FINDINGS if k not in keys]


def _prepare_or_finish(pipeline: StagedPipeline, item: WorkItem, ticket: int, *, out_dir: Path, pkey: bytes,
                       write: bool) -> Prepared | Finished:
    """Stage 1; an instance the model will not see (not applicable, failed) is finished at once."""
    prepared = prepare(pipeline, item, keep_pixels=bool(pipeline.explain) and write)
    prepared.ticket = ticket
    if prepared.pre is None:
        return finish(pipeline, prepared, out_dir=out_dir, pkey=pkey, write=write)
    return prepared
