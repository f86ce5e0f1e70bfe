"""Augmentation for chest films (MONAI transforms).

Small geometric jitter (rotation <= 7 degrees, scale +-7 %, shift +-4 %: patient positioning),
contrast (gamma), intensity scale/shift (exposure, detector) and Gaussian noise (quantum
noise), then clipping to the pipeline's [0, 1] range.

**No left-right flip.** The heart lies left of the midline (situs solitus); a flipped film
shows dextrocardia, an anatomy the model should treat as unusual, not as a normal variant.
Flipping would also teach the cardiomegaly model that the cardiac silhouette may sit on
either side, blurring the very asymmetry (right heart border ~1/3, left ~2/3 of the width)
that the cardiothoracic ratio and an enlarged left ventricle show, and it would mirror
laterality markers. Vertical flips are never anatomical either.
"""

from __future__ import annotations

import math

from monai.transforms import (
    Compose,
    RandAdjustContrast,
    RandAffine,
    RandGaussianNoise,
    RandScaleIntensity,
    RandShiftIntensity,
    ScaleIntensityRange,
)


def chest_augmentation(*, size: int, seed: int, strength: float = 1.0) -> Compose:
    """The training augmentation; ``strength`` scales every range (0 disables)."""
    s = float(strength)
    t = Compose(
        [
            RandAffine(
                prob=0.8 * min(1.0, s),
                rotate_range=(math.radians(7.0) * s,),
                scale_range=(0.07 * s, 0.07 * s),
                translate_range=(0.04 * size * s, 0.04 * size * s),
                padding_mode="zeros",
                mode="bilinear",
            ),
            RandAdjustContrast(prob=0.5 * min(1.0, s), gamma=(1.0 - 0.25 * s, 1.0 + 0.3 * s)),
            RandScaleIntensity(prob=0.3 * min(1.0, s), factors=0.08 * s),
            RandShiftIntensity(prob=0.3 * min(1.0, s), offsets=0.05 * s),
            RandGaussianNoise(prob=0.3 * min(1.0, s), std=0.015 * s),
            ScaleIntensityRange(a_min=0.0, a_max=1.0, b_min=0.0, b_max=1.0, clip=True),
        ]
    )
    t.set_random_state(seed=seed)
    return t
