"""The unbiased pass@k estimator (Chen et al., 2021, "Evaluating Large Language Models Trained on Code")."""
from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np


def pass_at_k(n: int, c: int, k: int) -> float:
    """P(at least one of k samples drawn without replacement from n, c of them correct, is correct)
    = 1 - C(n-c, k) / C(n, k), computed as a stable product."""
    if not 0 <= c <= n:
        raise ValueError(f"need 0 <= c <= n, got n={n}, c={c}")
    if not 1 <= k <= n:
        raise ValueError(f"pass@{k} needs k <= n samples per problem (n={n})")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def mean_pass_at_k(counts: Iterable[tuple[int, int]], ks: Sequence[int]) -> tuple[dict[str, float], list[int]]:
    """Mean pass@k over problems given (n, c) per problem, for each k every problem has samples for.
    Returns the scores and the ks skipped because some problem has fewer than k samples."""
    counts = list(counts)
    if not counts:
        raise ValueError("no problems to score")
    min_n = min(n for n, _ in counts)
    scores, skipped = {}, []
    for k in ks:
        if k > min_n:
            skipped.append(k)
            continue
        scores[f"pass@{k}"] = float(np.mean([pass_at_k(n, c, k) for n, c in counts]))
    return scores, skipped
