"""The batch worklist processor: the pipeline over a folder, a DICOMDIR or studies from PACS.

Same core as the listener (:class:`cxr_ai.pipeline.Pipeline`), other driver. A run:

1. **resolves the worklist** into instances (:class:`~cxr_ai.batch.inputs.WorkItem`): files under folders
   (recursive), the instances a DICOMDIR lists (pydicom :class:`~pydicom.fileset.FileSet`), or
   studies found on a PACS (C-FIND by Study Instance UID, accession number, date range,
   modality) and fetched by C-GET / C-MOVE (:mod:`cxr_ai.net.query`) or by DICOMweb
   (``dicomweb-client``) into ``<out>/retrieved``;
2. **skips** what this model version already finished (resumable, idempotent): a small SQLite
   state database ``<out>/batch-state.sqlite`` keyed by SOP Instance UID + model name +
   model version. ``processed`` and ``not_applicable`` are final; ``failed`` is retried on the
   next run; ``force=True`` reprocesses everything;
3. **processes** the rest (:func:`~cxr_ai.batch.pools.run_items`): a pool of worker processes (``[batch] pool``;
   each holds the pipeline, inherited by fork or loaded once) reads, gates, decodes and
   preprocesses each instance and hands only the small model input to the driver, which runs
   the model on batches made in worklist order (on the GPU when there is one; on the CPU in
   one single-threaded "lane" per core, :func:`~cxr_ai.batch.pools.model_plan`); the worker that prepared an
   instance then computes its Grad-CAM maps (CPU models), builds its result objects, writes
   them and makes its table row — no Python work competes with the model loop for the GIL and
   no full-resolution image crosses between processes. A thread pool does the same where
   processes cannot start, and for results-table-only runs (``pool = "auto"``);
4. **writes** per instance the SR / heatmap SC / Parametric Map / FHIR bundle into
   ``<out>/studies/<StudyInstanceUID>/`` under deterministic names
   (``<SOPInstanceUID>_<kind><n>.dcm``, ``<SOPInstanceUID>_fhir.json``): each file is written
   under a temporary name, fsynced and renamed, and only then the instance is recorded (one
   transaction). A run killed at any point leaves no half-recorded instance, and re-running
   rewrites the same names, so there are never duplicate outputs;
5. **tabulates** every recorded instance (``results.csv`` and ``results.parquet``, columns
   :data:`~cxr_ai.batch.table.TABLE_COLUMNS` + one ``p_/thr_/pred_`` triple per finding), sorted by study and
   instance so that runs compare equal row by row; beside it ``skipped_inputs.csv`` names every
   input not processed (non-DICOM files, duplicates and the file processed in their place).

On Dask (``scheduler=`` or ``workers=``) the worklist is cut into partitions of whole studies;
each worker process loads the bundle once (:func:`~cxr_ai.batch.pools._worker_pipeline`) and writes outputs into
the same output folder, which must therefore be a path all workers see (a shared volume);
rows come back to the client, the only writer of the state database.

Patients appear in the table only as ``patient_key``, an HMAC-SHA256 pseudonym of
IssuerOfPatientID + PatientID under a site key (:func:`~cxr_ai.batch.state.patient_key`), never as the ID.

Modules: :mod:`~cxr_ai.batch.inputs` (worklists from folders, DICOMDIRs, study CSVs, PACS and
DICOMweb), :mod:`~cxr_ai.batch.state` (output-folder names, pseudonym keys, the state database),
:mod:`~cxr_ai.batch.table` (the results table), :mod:`~cxr_ai.batch.stages` (prepare, infer,
finish one instance), :mod:`~cxr_ai.batch.pools` (stage pools, model plan, :func:`run_items`),
:mod:`~cxr_ai.batch.run` (:func:`run_batch`, Dask), :mod:`~cxr_ai.batch.cli` (the command line).
The public names are re-exported here (``from cxr_ai.batch import run_batch``); the command line
lives in :mod:`~cxr_ai.batch.cli`.
"""

from __future__ import annotations

from cxr_ai.batch.inputs import (
    ACCESSION_COLUMNS,
    MSG_CSV_COLUMNS,
    STUDY_COLUMNS,
    BatchInputs,
    WorkItem,
    parse_peer,
    read_study_csv,
    retrieve_studies,
    scan_inputs,
)
from cxr_ai.batch.pools import (
    MSG_BAD_POOL,
    MSG_POOL_FALLBACK,
    POOL_KINDS,
    BatchWorkerError,
    ModelPlan,
    model_plan,
    pool_kind,
    run_items,
    usable_cores,
)
from cxr_ai.batch.run import (
    BatchOptions,
    BatchSummary,
    partition_studies,
    run_batch,
)
from cxr_ai.batch.stages import (
    pipeline_finding_keys,
    prepare,
    write_outputs,
)
from cxr_ai.batch.report import (
    SKIPPED_INPUTS_NAME,
)
from cxr_ai.batch.state import (
    RETRIEVED_DIR,
    STATE_DB_NAME,
    STUDIES_DIR,
    TMP_PREFIX,
    BatchState,
    load_or_create_key,
    patient_key,
)
from cxr_ai.batch.table import (
    outcome_row,
)

__all__ = [
    "ACCESSION_COLUMNS",
    "BatchInputs",
    "BatchOptions",
    "BatchState",
    "BatchSummary",
    "BatchWorkerError",
    "MSG_BAD_POOL",
    "MSG_CSV_COLUMNS",
    "MSG_POOL_FALLBACK",
    "ModelPlan",
    "POOL_KINDS",
    "RETRIEVED_DIR",
    "SKIPPED_INPUTS_NAME",
    "STATE_DB_NAME",
    "STUDIES_DIR",
    "STUDY_COLUMNS",
    "TMP_PREFIX",
    "WorkItem",
    "load_or_create_key",
    "model_plan",
    "outcome_row",
    "parse_peer",
    "partition_studies",
    "patient_key",
    "pipeline_finding_keys",
    "pool_kind",
    "prepare",
    "read_study_csv",
    "retrieve_studies",
    "run_batch",
    "run_items",
    "scan_inputs",
    "usable_cores",
    "write_outputs",
]
