"""The embedding space: PCA of image embeddings and two-sample KS tests between groups.

Gichoya et al. (Lancet Digit Health 2022) and Glocker et al. (eBioMedicine 2023) showed that
chest-radiograph features encode sex and race; a KS test per leading principal component,
group vs the rest, is the check used there.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy.stats import ks_2samp
from sklearn.decomposition import PCA

logger = logging.getLogger(__name__)

MSG_EMBEDDINGS = (
    "{path}: cannot read embeddings ({detail}). Give a .npz with a string array 'ids' (dtype str, "
    "not object: save with ids.astype(str)) and a 2-D array 'embeddings', a parquet/CSV with an "
    "'{id_column}' column and one numeric column per dimension, or (from Python) a .npy matrix "
    "with its ids."
)


def load_embeddings(path: str | os.PathLike, *, id_column: str = "id",
                    ids: Sequence[str] | None = None) -> pd.DataFrame:
    """Embeddings as a frame indexed by id (one float column per dimension).

    ``.npz``: arrays ``ids`` (or ``id_column``) and ``embeddings``; ``.npy``: a 2-D matrix with
    ``ids`` given; ``.parquet`` / ``.csv``: an ``id_column`` and numeric columns.
    """
    p = Path(path)
    try:
        if p.suffix == ".npz":
            with np.load(p, allow_pickle=False) as z:
                key = "ids" if "ids" in z else id_column
                ids_arr, mat = z[key].astype(str), z["embeddings"]
        elif p.suffix == ".npy":
            mat = np.load(p, allow_pickle=False)
            if ids is None:
                raise ValueError("a .npy matrix needs its ids (one per row)")
            ids_arr = np.asarray(ids, dtype=str)
        else:
            table = pd.read_parquet(p) if p.suffix == ".parquet" else pd.read_csv(p)
            ids_arr = table.pop(id_column).astype(str).to_numpy()
            mat = table.to_numpy(float)
    except (OSError, KeyError, ValueError) as exc:
        raise ValueError(MSG_EMBEDDINGS.format(path=p, detail=exc, id_column=id_column)) from exc
    if mat.ndim != 2 or len(mat) != len(ids_arr):
        raise ValueError(MSG_EMBEDDINGS.format(path=p, detail=f"shape {mat.shape} vs {len(ids_arr)} ids",
                                               id_column=id_column))
    return pd.DataFrame(np.asarray(mat, dtype=float), index=pd.Index(ids_arr, name="id"))


def embedding_analysis(embeddings: pd.DataFrame, truth: pd.DataFrame, *,
                       attributes: Sequence[str] = ("sex", "race", "age_band"),
                       label: str = "cardiomegaly", n_components: int = 5,
                       random_state: int = 0, alpha: float = 0.05,
                       min_group_size: int = 30) -> dict[str, Any]:
    """PCA (:class:`sklearn.decomposition.PCA`) of the embeddings of the images in ``truth``,
    and :func:`scipy.stats.ks_2samp` of each group vs the rest on each component.

    Returns the components (for plots, key ``"frame"``), explained variance, and a list of
    tests with statistic, p-value and ``significant`` (p < ``alpha`` after a Bonferroni
    correction over all tests reported).
    """
    t = truth.drop_duplicates("id").set_index("id")
    common = embeddings.index.intersection(t.index)
    n_missing = len(t.index.difference(embeddings.index))
    if len(common) < 3:
        return {"status": f"not estimable: only {len(common)} images have embeddings", "tests": []}
    x = embeddings.loc[common].to_numpy(float)
    k = int(min(n_components, x.shape[0], x.shape[1]))
    pca = PCA(n_components=k, random_state=random_state)
    comps = pca.fit_transform(x)
    frame = pd.DataFrame(comps, index=common, columns=[f"PC{i + 1}" for i in range(k)])
    for col in (label, *attributes):
        if col in t:
            frame[col] = t.loc[common, col].to_numpy()
    tests = []
    for attr in attributes:
        if attr not in frame:
            continue
        for group in sorted(frame[attr].astype(str).unique()):
            m = (frame[attr].astype(str) == group).to_numpy()
            if m.sum() < 2 or (~m).sum() < 2:
                continue
            for i in range(k):
                res = ks_2samp(comps[m, i], comps[~m, i])
                tests.append({"attribute": attr, "group": group, "component": f"PC{i + 1}",
                              "n_group": int(m.sum()), "n_rest": int((~m).sum()),
                              "small": bool(m.sum() < min_group_size),
                              "statistic": float(res.statistic), "p_value": float(res.pvalue)})
    n_tests = max(len(tests), 1)
    for test in tests:
        test["p_bonferroni"] = min(1.0, test["p_value"] * n_tests)
        test["significant"] = test["p_bonferroni"] < alpha
    return {"status": "ok", "n": len(common), "n_without_embedding": n_missing,
            "explained_variance_ratio": pca.explained_variance_ratio_.tolist(),
            "tests": tests, "frame": frame}
