"""The report of inputs a batch run did not process: non-DICOM files and duplicates.

``skipped_inputs.csv`` is written next to ``results.csv`` on every run (header only when
nothing was skipped, so a report left by an earlier run never stands for this one). One row
per file: ``path``, ``why`` (:data:`NOT_DICOM` or :data:`DUPLICATE`) and ``same_as`` (for a
duplicate, the file that was processed in its place).
"""

from __future__ import annotations

import csv
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

from cxr_ai.batch.state import TMP_PREFIX

__all__ = ["DUPLICATE", "NOT_DICOM", "SKIPPED_INPUTS_NAME", "write_skipped_inputs"]

SKIPPED_INPUTS_NAME = "skipped_inputs.csv"
NOT_DICOM = "not DICOM"
DUPLICATE = "duplicate"
COLUMNS = ("path", "why", "same_as")


def write_skipped_inputs(out_dir: str | os.PathLike, *, ignored: Iterable[str],
                         duplicates: Iterable[Sequence[str]]) -> Path:
    """Write ``out_dir/skipped_inputs.csv`` atomically; ``duplicates`` holds (kept, skipped)
    pairs as :class:`~cxr_ai.batch.inputs.BatchInputs` records them. Returns the path."""
    out = Path(out_dir)
    path, tmp = out / SKIPPED_INPUTS_NAME, out / f"{TMP_PREFIX}{SKIPPED_INPUTS_NAME}"
    with open(tmp, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(COLUMNS)
        for name in ignored:
            writer.writerow([str(name), NOT_DICOM, ""])
        for kept, skipped, *_ in duplicates:
            writer.writerow([str(skipped), DUPLICATE, str(kept)])
    os.replace(tmp, path)
    return path
