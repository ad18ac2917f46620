"""Rank rules: matrix shapes and a parameter-reduction ratio in, ``{name: rank}`` out."""
from __future__ import annotations

import math
from typing import Callable

RankRule = Callable[[dict[str, tuple[int, int]], float], dict[str, int]]


def rank_for_ratio(m: int, n: int, ratio: float) -> int:
    """k = ⌊(1−r)·m·n/(m+n)⌋: the factors u (m×k) and v (k×n) keep (1−r) of m·n."""
    if not 0.0 < ratio < 1.0:
        raise ValueError(f"ratio must be in (0, 1), got {ratio}")
    return max(1, math.floor((1.0 - ratio) * m * n / (m + n)))


def worth_factorising(m: int, n: int, k: int) -> bool:
    """A rank-k pair is smaller (and faster) than the dense matrix only if k(m+n) < m·n."""
    return k * (m + n) < m * n


def uniform(shapes: dict[str, tuple[int, int]], ratio: float) -> dict[str, int]:
    """The paper's rule: every matrix loses the same fraction ``ratio`` of its parameters."""
    return {name: rank_for_ratio(m, n, ratio) for name, (m, n) in shapes.items()}


RANK_RULES: dict[str, RankRule] = {"uniform": uniform}
