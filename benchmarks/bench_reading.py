"""Read + pixel pipeline throughput on RG1, per transfer syntax, against bare dcmread + decode.

Both are measured in the same run on the same files; the figure of merit is the ratio
(pipeline images/s) / (bare images/s), i.e. what the reader, gate and pixel pipeline cost on
top of the unavoidable parse and decode.

Run: ``.venv/bin/python benchmarks/bench_reading.py [--repeats N]``; writes
``benchmarks/results/reading.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import pydicom

from cxr_ai.dicom.gate import check_applicability
from cxr_ai.imaging import PixelPipelineSpec, preprocess

NAMES = ("RG1_UNCR", "RG1_J2KR", "RG1_UNCI", "RG1_J2KI")


def _bare(path: Path) -> None:
    pydicom.dcmread(path).pixel_array  # noqa: B018


def _ours(path: Path, spec: PixelPipelineSpec) -> None:
    decision, rg = check_applicability(path)
    assert decision.accepted and rg is not None
    preprocess(rg, spec)


def _rate(fn, repeats: int) -> float:
    fn()  # warm-up (imports, plugin discovery, page cache)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1.0 / statistics.median(times)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--size", type=int, default=224)
    args = parser.parse_args(argv)
    import data_store

    data = Path(os.path.dirname(data_store.__file__)) / "data"
    spec = PixelPipelineSpec(size=args.size)
    rows = []
    for name in NAMES:
        path = data / f"{name}.dcm"
        bare = _rate(lambda: _bare(path), args.repeats)
        ours = _rate(lambda: _ours(path, spec), args.repeats)
        ts = pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID.name
        rows.append({"file": name, "transfer_syntax": ts, "bare_img_per_s": round(bare, 2),
                     "pipeline_img_per_s": round(ours, 2), "ratio": round(ours / bare, 3)})
    print(f"{'file':<10} {'transfer syntax':<45} {'bare img/s':>10} {'ours img/s':>10} {'ratio':>6}")
    for r in rows:
        print(f"{r['file']:<10} {r['transfer_syntax']:<45} {r['bare_img_per_s']:>10} "
              f"{r['pipeline_img_per_s']:>10} {r['ratio']:>6}")
    result = {"benchmark": "reading", "size": args.size, "repeats": args.repeats,
              "cpu_count": os.cpu_count(), "rows": rows}
    out = Path(__file__).parent / "results" / "reading.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
