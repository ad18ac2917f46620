"""The paper's baselines: plain SVD, FWSVD (Hsu et al. 2022) and ASVD (Yuan et al. 2023)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from torch import Tensor

from ..whitening import Factorization, scaled_svd
from ..calibration import Stat
from .base import MethodOptions, check_range, register

if TYPE_CHECKING:
    from ..calibration import LayerStats

EPS = 1e-6


@dataclass(frozen=True)
class SVDOptions(MethodOptions):
    name = "svd"


@dataclass(frozen=True)
class FWSVDOptions(MethodOptions):
    name = "fwsvd"


@dataclass(frozen=True)
class ASVDOptions(MethodOptions):
    name = "asvd"
    asvd_alpha: float = 0.5  # exponent of the mean |x| column scaling (past 4 the scales leave float64's range)

    def validate(self) -> None:
        check_range(self, "asvd_alpha", 0.0, 4.0)


@register(SVDOptions, frozenset(), "plain truncated SVD of W")
def svd(weight: Tensor, stats: LayerStats, k: int, opts: SVDOptions) -> tuple[Factorization, dict[str, Any]]:
    return scaled_svd(weight, k), {}


@register(FWSVDOptions, frozenset({Stat.ROW_FISHER}), "SVD of diag(√Fisher)·W (row importance from squared gradients)")
def fwsvd(weight: Tensor, stats: LayerStats, k: int, opts: FWSVDOptions) -> tuple[Factorization, dict[str, Any]]:
    assert stats.fisher is not None
    row = stats.fisher.double().sqrt()
    row = row.clamp_min(max(row.max().item(), 1e-30) * EPS)  # rows with no gradient keep a tiny weight
    return scaled_svd(weight, k, row_scale=row), {}


@register(ASVDOptions, frozenset({Stat.ABS}), "SVD of W·diag(mean|x|)^α (activation-scaled)")
def asvd(weight: Tensor, stats: LayerStats, k: int, opts: ASVDOptions) -> tuple[Factorization, dict[str, Any]]:
    assert stats.abs_sum is not None and stats.tokens > 0
    mean_abs = stats.abs_sum.double() / stats.tokens
    col = mean_abs.clamp_min(max(mean_abs.max().item(), 1e-30) * EPS) ** opts.asvd_alpha  # dead inputs
    return scaled_svd(weight, k, col_scale=col), {}
