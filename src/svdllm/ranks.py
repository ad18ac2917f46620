"""Rank of each factorised matrix from a parameter-reduction ratio."""
from __future__ import annotations

import math


def rank_for_ratio(m: int, n: int, ratio: float) -> int:
    """k = ⌊(1−r)·m·n/(m+n)⌋: the factors u (m×k) and v (k×n) keep (1−r) of m·n."""
    if not 0.0 < ratio < 1.0:
        raise ValueError(f"ratio must be in (0, 1), got {ratio}")
    return max(1, math.floor((1.0 - ratio) * m * n / (m + n)))


def worth_factorising(m: int, n: int, k: int) -> bool:
    """A rank-k pair is smaller (and faster) than the dense matrix only if k(m+n) < m·n."""
    return k * (m + n) < m * n
