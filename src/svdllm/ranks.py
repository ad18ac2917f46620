"""Rank rules: matrix shapes and a parameter-reduction ratio in, ``{name: rank}`` out."""
from __future__ import annotations

import heapq
import math
import re
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


def per_type(shapes: dict[str, tuple[int, int]], ratio: float, losses: dict[str, float], floor: float = 0.5,
             cap: float = 2.0) -> dict[str, int]:
    """SVD-LLM V2's heterogeneous ratios, within each type (the same module path in every block: all q_proj, ...).

    ``losses[name]`` is the matrix's truncation loss at its uniform rank.  Matrix i of a type group G gets
    the ratio R·|G|·wᵢ/Σ_G w with wᵢ = 1/ln(e·Lᵢ/min_G L): the V2 paper's 1/log L, with L in units of the
    group's smallest loss (raw 1/log L changes with the number of calibration tokens and fails for L ≤ 1).
    As ranks: kᵢ ∝ 1 − ratioᵢ, clipped to [floor, cap] × the uniform rank and below the dense break-even,
    the group's rank sum kept; a type's matrices share a shape, so the parameter budget is the uniform one
    less under one rank per matrix.
    """
    uni = uniform(shapes, ratio)
    groups: dict[str, list[str]] = {}
    for name in shapes:
        groups.setdefault(re.sub(r"\.\d+\.", ".#.", name), []).append(name)
    ranks: dict[str, int] = {}
    for names in groups.values():
        low = min(max(losses[n], 1e-300) for n in names)
        w = {n: 1.0 / math.log(math.e * max(losses[n], 1e-300) / low) for n in names}
        mean_w = sum(w.values()) / len(names)
        want = {n: uni[n] * (1 - ratio * w[n] / mean_w) / (1 - ratio) for n in names}
        lo = {n: max(1.0, floor * uni[n]) for n in names}
        hi = {n: float(max(lo[n], min(cap * uni[n], max_useful_rank(*shapes[n])))) for n in names}
        total, got = sum(uni[n] for n in names), {n: min(max(want[n], lo[n]), hi[n]) for n in names}
        for _ in range(4 * len(names)):  # rescale the matrices that can still move to keep the group's rank sum
            gap = total - sum(got.values())
            free = [n for n in names if (got[n] < hi[n] if gap > 0 else got[n] > lo[n])]
            if abs(gap) < 1e-9 or not free:
                break
            scale = 1 + gap / sum(got[n] for n in free)
            got = {n: min(max(got[n] * scale, lo[n]), hi[n]) if n in free else got[n] for n in names}
        ranks.update({n: max(1, math.floor(got[n] + 1e-9)) for n in names})
    return ranks


RANK_RULES: dict[str, RankRule] = {"uniform": uniform}
