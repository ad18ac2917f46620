"""The paper's baselines: plain SVD, FWSVD (Hsu et al. 2022) and ASVD (Yuan et al. 2023)."""
from __future__ import annotations

from typing import Any

from torch import Tensor

from ..whitening import Factorization, scaled_svd
from .base import LayerStats, Method

EPS = 1e-6


def _svd(weight: Tensor, stats: LayerStats, k: int, cfg: Any) -> tuple[Factorization, dict[str, Any]]:
    return scaled_svd(weight, k), {}


def _fwsvd(weight: Tensor, stats: LayerStats, k: int, cfg: Any) -> tuple[Factorization, dict[str, Any]]:
    assert stats.fisher is not None
    row = stats.fisher.double().sqrt()
    row = row.clamp_min(max(row.max().item(), 1e-30) * EPS)  # rows with no gradient keep a tiny weight
    return scaled_svd(weight, k, row_scale=row), {}


def _asvd(weight: Tensor, stats: LayerStats, k: int, cfg: Any) -> tuple[Factorization, dict[str, Any]]:
    assert stats.abs_sum is not None and stats.tokens > 0
    mean_abs = stats.abs_sum.double() / stats.tokens
    col = mean_abs.clamp_min(max(mean_abs.max().item(), 1e-30) * EPS) ** cfg.asvd_alpha  # dead inputs
    return scaled_svd(weight, k, col_scale=col), {}


SVD = Method("svd", _svd, frozenset(), "plain truncated SVD of W")
FWSVD = Method("fwsvd", _fwsvd, frozenset({"fisher"}), "SVD of diag(√Fisher)·W (row importance from squared gradients)")
ASVD = Method("asvd", _asvd, frozenset({"abs"}), "SVD of W·diag(mean|x|)^α (activation-scaled)")

__all__ = ["SVD", "FWSVD", "ASVD"]
