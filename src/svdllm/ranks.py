"""Rank rules: matrix shapes and a parameter-reduction ratio in, ``{name: rank}`` out."""
from __future__ import annotations

import heapq
import math

from .errors import OptionError


def check_ratio(ratio: float) -> None:
    """The one check of a parameter-reduction ratio (nan and ±inf fail it too)."""
    if not 0.0 < ratio < 1.0:
        raise OptionError("ratio", f"must be in (0, 1), got {ratio}")


def rank_for_ratio(m: int, n: int, ratio: float) -> int:
    """k = ⌊(1−r)·m·n/(m+n)⌋: the factors u (m×k) and v (k×n) keep (1−r) of m·n."""
    check_ratio(ratio)
    return max(1, math.floor((1.0 - ratio) * m * n / (m + n)))


def worth_factorising(m: int, n: int, k: int) -> bool:
    """A rank-k pair is smaller (and faster) than the dense matrix only if k(m+n) < m·n."""
    return k * (m + n) < m * n


def uniform(shapes: dict[str, tuple[int, int]], ratio: float) -> dict[str, int]:
    """The paper's rule: every matrix loses the same fraction ``ratio`` of its parameters."""
    return {name: rank_for_ratio(m, n, ratio) for name, (m, n) in shapes.items()}


def max_useful_rank(m: int, n: int) -> int:
    """The largest k whose factors are still smaller than the dense matrix."""
    return (m * n - 1) // (m + n)


def allocate(shapes: dict[str, tuple[int, int]], ratio: float, scores: dict[str, list[float]],
             floor: float = 0.5, cap: float = 2.0) -> dict[str, int]:
    """Per-matrix ranks under the uniform plan's parameter budget: the components with the largest score per
    parameter are kept.

    ``scores[name][i]`` (descending in i) is what dropping component i of that matrix costs the model (for
    example importance·σᵢ² of its whitened spectrum); a component costs m+n parameters.  Every rank stays in
    [⌊floor·k⌋, ⌈cap·k⌉] around its uniform rank k, at least 1 and below the dense break-even.  The budget
    Σ k(m+n) never exceeds the uniform plan's and falls short of it by less than one component of a matrix
    that could still grow.
    """
    uni = uniform(shapes, ratio)
    budget = sum(k * sum(shapes[n]) for n, k in uni.items())
    lo = {n: max(1, math.floor(floor * k)) for n, k in uni.items()}
    hi = {n: max(lo[n], min(math.ceil(cap * k), max_useful_rank(*shapes[n]), len(scores[n]))) for n, k in uni.items()}
    ranks, spent = dict(lo), sum(k * sum(shapes[n]) for n, k in lo.items())
    heap = [(-scores[n][ranks[n]] / sum(shapes[n]), n) for n in shapes if ranks[n] < hi[n]]
    heapq.heapify(heap)
    while heap:
        _, n = heapq.heappop(heap)
        if spent + sum(shapes[n]) > budget:
            continue  # its later components cost as much and score less: this matrix is done
        ranks[n] += 1
        spent += sum(shapes[n])
        if ranks[n] < hi[n]:
            heapq.heappush(heap, (-scores[n][ranks[n]] / sum(shapes[n]), n))
    return ranks
