"""Training for cxr-ai models: datasets, patient-level splits, MONAI training (single process
or DDP via torchrun), thresholds, embedding heads, export to model bundles.

Entry points (thin ``main(argv=None)`` functions):

- ``python -m training.train --config training/configs/demo.toml --out DIR``
- ``python -m training.embeddings {extract,heads} ...``
- ``python -m training.export --checkpoint DIR/checkpoint.pt --out BUNDLE``
- ``python -m training.evaluate --bundle BUNDLE --config CONFIG``
- ``python -m training.demo`` (regenerates the shipped demo bundle)
"""
