"""Second-opinion latency for one 2k x 2k DICOM and for a PNG of it, against `cxr-ai batch` on
the same file, measured in one run on this machine (small: one file, one timed run each).

- ``second_opinion_dicom_s``: :func:`cxr_ai.second_opinion.second_opinion` on the DICOM bytes
  with the pipeline loaded (as the web server holds it): gate, decode, pixel pipeline, model,
  Grad-CAM, SR + SC + Parametric Map + FHIR Bundle, overlay PNGs.
- ``second_opinion_png_s``: the same on an 8-bit PNG export of that image (no DICOM objects).
- ``batch_in_process_s``: :func:`cxr_ai.batch.run_batch` on a folder holding that one DICOM,
  with heatmaps and result objects (loads the pipeline itself, as each batch run does).
- ``batch_cli_s``: ``cxr-ai batch`` as a new process (interpreter start + imports + model load
  + the same work): what a user waits for with the command line.

One warm-up call of the second opinion precedes the timed ones (model and Grad-CAM hooks
warm); then three interleaved rounds of (DICOM, PNG, batch in process), medians reported
with every run; the batch CLI runs once. Ratios are what to compare across machines. Run:
``.venv/bin/python benchmarks/bench_second_opinion.py``; writes
``benchmarks/results/second_opinion.json``.
"""

from __future__ import annotations

import io
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_info, write_result  # noqa: E402

from cxr_ai import batch  # noqa: E402
from cxr_ai.config import load_config  # noqa: E402
from cxr_ai.dicom.reader import read_radiograph  # noqa: E402
from cxr_ai.imaging import display_array  # noqa: E402
from cxr_ai.phantoms import PhantomConfig, generate_studies  # noqa: E402
from cxr_ai.pipeline import Pipeline  # noqa: E402
from cxr_ai.second_opinion import second_opinion  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
ROUNDS = 3


def main() -> int:
    tmp = Path(tempfile.mkdtemp(prefix="cxr-ai-bench-so-"))
    labels = generate_studies(tmp / "ph", PhantomConfig(n_studies=1, seed=3, size=2048, fraction_lateral=0.0,
                                                        fraction_non_chest=0.0))
    src = tmp / "ph" / labels["file"].iloc[0]
    one = tmp / "one"
    one.mkdir()
    dcm = one / "image.dcm"
    dcm.write_bytes(src.read_bytes())
    rg = read_radiograph(dcm, decode=True)
    display, _ = display_array(rg.dataset, rg.pixels())
    buf = io.BytesIO()
    Image.fromarray(np.rint(display * 255).astype(np.uint8)).save(buf, format="PNG")
    png = buf.getvalue()
    data = dcm.read_bytes()

    config = load_config(env={})
    config["monitoring"]["dir"] = str(tmp / "mon")
    config["monitoring"]["enabled"] = False
    pipeline = Pipeline(config=config)
    second_opinion(data, "warm.dcm", pipeline=pipeline)  # warm-up
    times: dict[str, list[float]] = {"so_dicom": [], "so_png": [], "batch": []}
    for r in range(ROUNDS):  # interleaved, so load from other processes hits all three alike
        t0 = time.perf_counter()
        ans_d = second_opinion(data, "image.dcm", pipeline=pipeline)
        times["so_dicom"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        ans_p = second_opinion(png, "image.png", pipeline=pipeline)
        times["so_png"].append(time.perf_counter() - t0)
        assert ans_d.accepted and ans_p.accepted
        t0 = time.perf_counter()
        summary = batch.run_batch(batch.scan_inputs([one]),
                                  options=batch.BatchOptions(out_dir=tmp / f"b1-{r}", progress=False), config=config)
        times["batch"].append(time.perf_counter() - t0)
        assert not summary.failed
    so_dicom, so_png, batch_inproc = (statistics.median(times[k]) for k in ("so_dicom", "so_png", "batch"))

    site = tmp / "site.toml"
    site.write_text(f'[monitoring]\nenabled = false\ndir = "{tmp / "mon2"}"\n')
    env = dict(os.environ, PYTHONPATH=str(REPO))
    t0 = time.perf_counter()
    run = subprocess.run([sys.executable, "-m", "cxr_ai", "batch", str(one), "--out", str(tmp / "b2"), "--config",
                          str(site), "--no-progress"], env=env, capture_output=True, text=True, timeout=600)
    batch_cli = time.perf_counter() - t0
    assert run.returncode == 0, run.stderr[-2000:]

    result = {
        "machine": machine_info(),
        "image": {"rows": rg.rows, "columns": rg.columns, "dicom_bytes": len(data), "png_bytes": len(png),
                  "transfer_syntax": rg.transfer_syntax_uid},
        "second_opinion_dicom_s": round(so_dicom, 3),
        "second_opinion_png_s": round(so_png, 3),
        "batch_in_process_s": round(batch_inproc, 3),
        "batch_cli_s": round(batch_cli, 3),
        "ratio_dicom_vs_batch_in_process": round(so_dicom / batch_inproc, 3),
        "ratio_png_vs_dicom": round(so_png / so_dicom, 3),
        "ratio_dicom_vs_batch_cli": round(so_dicom / batch_cli, 3),
        "dicom_timings": {k: round(v, 3) for k, v in ans_d.timings.items()},
        "png_timings": {k: round(v, 3) for k, v in ans_p.timings.items()},
        "runs_s": {k: [round(x, 3) for x in v] for k, v in times.items()},
        "min_s": {k: round(min(v), 3) for k, v in times.items()},
        "note": f"median of {ROUNDS} interleaved rounds (batch CLI: one run); shared, busy machine",
    }
    write_result(REPO / "benchmarks" / "results" / "second_opinion.json", result)
    for k, v in result.items():
        if k != "machine":
            print(f"{k}: {v}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
