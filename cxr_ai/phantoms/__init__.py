"""Synthetic chest radiograph studies with known ground truth, written as valid DICOM.

The phantoms serve training of the demo model, accuracy and fairness checks, and the demo.
Everything is deterministic for a given seed: the same :class:`PhantomConfig` writes
byte-identical files (UIDs come from :func:`pydicom.uid.generate_uid` with seed-derived
entropy, dates from the random stream, never from the clock).

Ground-truth model (per study, i.e. per patient visit)
------------------------------------------------------
- **LVEF** (float, %) is latent. ``low_ef = LVEF <= 40`` (the HFrEF boundary). Its prevalence
  is ``PhantomConfig.prevalence_low_ef``, modulated by age (older: more) and sex (men: more).
- **Cardiothoracic ratio** ``ctr`` is the *true* ratio, i.e. what a PA film shows:
  max horizontal heart width / max inner thoracic width. ``cardiomegaly = ctr > 0.5``.
  Low EF makes cardiomegaly likely (P = 0.78); the rest of the cardiomegaly prevalence
  (valvular, hypertensive, pericardial causes) falls on normal-EF patients, so the two labels
  are correlated but not identical in either direction.
- **AP films magnify the heart**: on an AP view the drawn heart is ``ctr * m`` wide with
  ``m`` ~ U(1.05, 1.12) (column ``ctr_apparent``), so an AP film may show an apparent CTR up to
  ~0.55 without cardiomegaly. Labels always come from the true ``ctr``.
- **Congestion signs** (perihilar haze, vascular redistribution, Kerley B lines, small pleural
  effusions blunting a costophrenic angle) appear in ~80 % of low-EF visits (more severe for
  lower LVEF) and in ~6 % of normal-EF visits (label noise: fluid overload, HFpEF).
  Low-EF hearts are also more globular.

Acquisition-quality shift
-------------------------
``PhantomConfig.shift_group`` (e.g. ``{"race": "Black"}``) with ``shift_strength`` in [0, 1]
degrades the images of that group only: more quantum noise, mid-frequency mottle, a scatter
veil (lower contrast) and blur. Column ``shifted`` marks them. This is a real image-quality
difference a model can be worse on, so fairness tooling has something to find.

Files
-----
:func:`generate_studies` writes ``out_dir/study_XXXX/img_YY.dcm`` and ``out_dir/labels.csv``
(one row per instance; columns :data:`LABEL_COLUMNS` first, then extras).

Modules
-------
:mod:`~cxr_ai.phantoms.params` (labels, populations, :class:`ChestParams`,
:class:`PhantomConfig`), :mod:`~cxr_ai.phantoms.truth` (truth sampling),
:mod:`~cxr_ai.phantoms.drawing` (drawing), :mod:`~cxr_ai.phantoms.writing` (DICOM writing).
"""


from __future__ import annotations

from cxr_ai.phantoms.params import (
    CR_IMAGE_STORAGE,
    CTR_THRESHOLD,
    DX_IMAGE_STORAGE_FOR_PRESENTATION,
    EXTRA_COLUMNS,
    INSURANCES,
    ISSUER,
    LABEL_COLUMNS,
    LOW_EF_THRESHOLD,
    MANUFACTURER,
    NON_CHEST_PARTS,
    RACES,
    RACE_WEIGHTS,
    SHIFT_KEYS,
    VIEWS,
    ChestParams,
    PhantomConfig,
)
from cxr_ai.phantoms.drawing import (
    render_chest,
    render_image,
)
from cxr_ai.phantoms.truth import (
    sample_chest_params,
    sample_labels,
)
from cxr_ai.phantoms.writing import (
    generate_studies,
    make_phantom_dataset,
)

__all__ = [
    "EXTRA_COLUMNS",
    "LABEL_COLUMNS",
    "ChestParams",
    "PhantomConfig",
    "generate_studies",
    "make_phantom_dataset",
    "render_chest",
    "render_image",
    "sample_chest_params",
    "sample_labels",
]
