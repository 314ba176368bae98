"""Initial selection within each seed's candidates (all checkpoints and samples together).

In order: candidates whose aspects could not be read are `unscored`; with `exec_filter`, those whose
solution does not run are `exec_failed`; then, best score first (ties: smaller cand_id), exact duplicates, other
answers to the same problem (case and spacing aside) and near duplicates of a better candidate are `duplicate`,
`duplicate_problem` / `near_duplicate`; those under the threshold are
`below_threshold`; beyond the top k, `not_top_k`. The rest are selected.
"""
from __future__ import annotations

import hashlib
from typing import Sequence

import numpy as np
import pandas as pd

from scoder_ray.config import ScoreConf
from scoder_ray.evaluate.decontam import minhash, shingles
from scoder_ray.quality import problem_key


def feature_names(conf: ScoreConf) -> list[str]:
    return [a.name for a in conf.aspects] + ["execution"]


def features(df: pd.DataFrame, conf: ScoreConf) -> np.ndarray:
    """The aspect matrix (one column per aspect, then execution: 9 if it ran, else 0)."""
    cols = [df[f"aspect_{a.name}"].to_numpy(dtype=float) for a in conf.aspects]
    cols.append(np.where(df["exec_verdict"].to_numpy() == "passed", 9.0, 0.0))
    return np.stack(cols, axis=1)


def select_group(group: pd.DataFrame, conf: ScoreConf, weights: Sequence[float]) -> pd.DataFrame:
    """One seed's candidates -> the same rows with `score`, `selected` and `drop_reason`."""
    group = group.copy()
    x = features(group, conf)
    unscored = (x[:, :-1] < 0).any(axis=1)
    group["score"] = np.where(unscored, np.nan, x @ np.asarray(weights, dtype=float))
    reason = np.where(unscored, "unscored", "").astype(object)
    if conf.exec_filter:
        reason[(reason == "") & (group["exec_verdict"].to_numpy() != "passed")] = "exec_failed"
    order = sorted(range(len(group)), key=lambda i: (-np.nan_to_num(group["score"].iat[i], nan=-1.0), group["cand_id"].iat[i]))
    seen_exact: set[str] = set()
    seen_problems: set[str] = set()
    kept_sketches: list = []
    kept = 0
    for i in order:
        if reason[i]:
            continue
        text = group["problem"].iat[i] + "\n" + group["solution"].iat[i]
        digest = hashlib.sha1(" ".join(text.split()).encode()).hexdigest()
        if digest in seen_exact:
            reason[i] = "duplicate"
            continue
        key = problem_key(group["problem"].iat[i])
        if key in seen_problems:
            reason[i] = "duplicate_problem"
            continue
        m = minhash(shingles(text), 64)
        if any(m.jaccard(other) >= conf.near_dup_threshold for other in kept_sketches):
            reason[i] = "near_duplicate"
            continue
        seen_exact.add(digest)
        seen_problems.add(key)
        kept_sketches.append(m)
        if group["score"].iat[i] < conf.threshold:
            reason[i] = "below_threshold"
        elif kept >= conf.top_k:
            reason[i] = "not_top_k"
        else:
            kept += 1
    group["drop_reason"] = reason
    group["selected"] = reason == ""
    return group
