"""The peer: a chest X-ray classifier app built from MONAI Deploy App SDK 0.5.1 stock operators.

DICOMDataLoaderOperator -> DICOMSeriesSelectorOperator -> DICOMSeriesToVolumeOperator ->
an InferenceOperator (the SDK's abstract base; classification has no stock subclass, so this
one does MONAI transforms + the TorchScript model, as the SDK's MedNIST example does) ->
DICOMTextSRWriterOperator (a Basic Text SR per study).

The application is composed once and run once per study folder in one process, and the
inference operator keeps the TorchScript module the first run loaded (the SDK's executor loads
the model again on every run): the SDK's best case, no per-study start-up. Runs in its own virtual environment (``monai-deploy-app-sdk==0.5.1``
beside torch, MONAI, pydicom, highdicom); cxr-ai is not needed. Used by
``benchmarks/bench_peer.py``. Prints one JSON line.

Run: ``python sdk_app.py --input FOLDER --model model.ts --out OUT``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Text

import monai.deploy.core as md
import numpy as np
import torch
from monai.deploy.core import Application, ExecutionContext, Image, InputContext, IOType, OutputContext
from monai.deploy.operators import (
    DICOMDataLoaderOperator,
    DICOMSeriesSelectorOperator,
    DICOMSeriesToVolumeOperator,
    DICOMTextSRWriterOperator,
    InferenceOperator,
)
from monai.deploy.operators.dicom_utils import ModelInfo
from monai.transforms import Compose, EnsureChannelFirst, Resize, ScaleIntensity

RULES = '{"selections": [{"name": "CXR", "conditions": {"Modality": "(?i)(DX|CR)"}}]}'
SIZE = 224
LABELS = ("cardiomegaly", "low_ef")


@md.input("image", Image, IOType.IN_MEMORY)
@md.output("result_text", Text, IOType.IN_MEMORY)
class CxrClassifierOperator(InferenceOperator):
    """MONAI transforms + the TorchScript model the app context loads; the probabilities as text."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._transform = Compose([EnsureChannelFirst(channel_dim="no_channel"), ScaleIntensity(),
                                   Resize(spatial_size=(SIZE, SIZE), mode="area")])
        self._loaded: tuple[str, torch.nn.Module] | None = None

    def pre_process(self, data, *args, **kwargs):
        return self._transform(data)

    def predict(self, data, *args, **kwargs):
        model = kwargs["model"]
        with torch.inference_mode():
            return torch.sigmoid(model(torch.as_tensor(data)[None].float()))[0].tolist()

    def post_process(self, data, *args, **kwargs):
        return "; ".join(f"{k}: {p:.4f}" for k, p in zip(LABELS, data))

    def compute(self, op_input: InputContext, op_output: OutputContext, context: ExecutionContext):
        volume = np.asarray(op_input.get().asnumpy(), dtype=np.float32)
        plane = volume.reshape(volume.shape[0], volume.shape[1], -1)[:, :, 0].T  # (W, H, D) -> rows x columns
        # The SDK's executor makes new model objects on every run (torch.jit.load, and TorchScript's
        # warm-up, per study); the module loaded by the first run is kept instead (the SDK's best case).
        model = context.models.get()
        if self._loaded is None or self._loaded[0] != str(model.path):
            self._loaded = (str(model.path), model.predictor)
        op_output.set(self.post_process(self.predict(self.pre_process(plane), model=self._loaded[1])), "result_text")


class CxrApp(Application):
    def compose(self):
        loader = DICOMDataLoaderOperator()
        selector = DICOMSeriesSelectorOperator(rules=RULES)
        to_volume = DICOMSeriesToVolumeOperator()
        classifier = CxrClassifierOperator()
        writer = DICOMTextSRWriterOperator(
            copy_tags=True, model_info=ModelInfo("peer", "densenet121", "0", "2.25.1"))
        self.add_flow(loader, selector, {"dicom_study_list": "dicom_study_list"})
        self.add_flow(selector, to_volume, {"study_selected_series_list": "study_selected_series_list"})
        self.add_flow(to_volume, classifier, {"image": "image"})
        self.add_flow(classifier, writer, {"result_text": "classification_result"})
        self.add_flow(selector, writer, {"study_selected_series_list": "study_selected_series_list"})


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--input", required=True, help="folder of study folders")
    ap.add_argument("--model", required=True)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    t0 = time.perf_counter()
    import monai.deploy

    app = CxrApp(do_run=False)
    studies = sorted(p for p in Path(args.input).iterdir() if p.is_dir())
    for study in studies:
        app.run(input=str(study), output=str(Path(args.out) / study.name), model=args.model, log_level="WARNING")
    written = len(list(Path(args.out).rglob("*.dcm")))
    print(json.dumps({"peer": f"MONAI Deploy App SDK {getattr(monai.deploy, '__version__', '?')} stock operators",
                      "studies": len(studies), "sr_written": written,
                      "seconds_in_process": round(time.perf_counter() - t0, 3)}))


if __name__ == "__main__":
    sys.exit(main())
