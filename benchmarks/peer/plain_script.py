"""The plainest script a user would write: pydicom read -> MONAI transforms -> model -> highdicom SR.

One image at a time, one process, no pools. Used by ``benchmarks/bench_peer.py`` as the peer
when the MONAI Deploy App SDK cannot run, and beside it otherwise. Needs torch, monai, pydicom
and highdicom only (no cxr-ai), so that it runs in the peer's own environment.

Run: ``python plain_script.py --input FOLDER --model model.ts --out OUT`` (the model is a
TorchScript module mapping (B, 1, S, S) in [0, 1] to logits (B, F)); prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import torch
from monai.transforms import Compose, EnsureChannelFirst, Resize, ScaleIntensity
from pydicom.sr.codedict import codes


def build_sr(ds: pydicom.Dataset, probabilities: list[float], labels: list[str], index: int) -> hd.sr.ComprehensiveSR:
    items = [
        hd.sr.NumContentItem(
            name=hd.sr.CodedConcept(value=f"{i}", scheme_designator="99PEER", meaning=label),
            value=round(float(p), 4),
            unit=hd.sr.CodedConcept(value="1", scheme_designator="UCUM", meaning="no units"),
            relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
        )
        for i, (label, p) in enumerate(zip(labels, probabilities))
    ]
    root = hd.sr.ContainerContentItem(name=codes.DCM.ImagingMeasurementReport)
    root.ContentSequence = items
    return hd.sr.ComprehensiveSR(
        evidence=[ds], content=root, series_instance_uid=hd.UID(), series_number=900,
        sop_instance_uid=hd.UID(), instance_number=index, manufacturer="peer-script",
    )


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--input", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--labels", default="cardiomegaly,low_ef")
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    model = torch.jit.load(args.model, map_location="cpu").eval()
    transform = Compose([EnsureChannelFirst(channel_dim="no_channel"), ScaleIntensity(),
                         Resize(spatial_size=(args.size, args.size), mode="area")])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    labels = args.labels.split(",")
    n = 0
    for i, path in enumerate(sorted(Path(args.input).rglob("*.dcm")), start=1):
        ds = pydicom.dcmread(path)
        image = ds.pixel_array.astype(np.float32)
        if ds.get("PhotometricInterpretation") == "MONOCHROME1":
            image = image.max() - image
        t = transform(image)
        x = (t.as_tensor() if hasattr(t, "as_tensor") else torch.as_tensor(t))[None]
        with torch.inference_mode():
            probs = torch.sigmoid(model(x.float()))[0].tolist()
        build_sr(ds, probs, labels, i).save_as(out / f"{ds.SOPInstanceUID}_sr.dcm", enforce_file_format=True)
        n += 1
    print(json.dumps({"peer": "plain script (pydicom -> MONAI transforms -> TorchScript model -> highdicom SR)",
                      "images": n, "seconds_in_process": round(time.perf_counter() - t0, 3)}))


if __name__ == "__main__":
    sys.exit(main())
