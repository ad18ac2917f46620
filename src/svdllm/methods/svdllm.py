"""SVD-LLM (W), SVD-LLM with its closed-form update, and our error-corrected whitening."""
from __future__ import annotations

from typing import Any

from torch import Tensor

from ..whitening import Factorization, relative_error, update_left, whiten, whiten_towards
from .base import LayerStats, Method


def _rel(weight: Tensor, f: Factorization, gram: Tensor) -> float:
    return relative_error(weight, f.u, f.v, gram)


def _svdllm_w(weight: Tensor, stats: LayerStats, k: int, cfg: Any) -> tuple[Factorization, dict[str, Any]]:
    assert stats.gram is not None
    f = whiten(weight, stats.gram, k, cfg.damp)
    return f, {"loss": _rel(weight, f, stats.gram)}


def _svdllm(weight: Tensor, stats: LayerStats, k: int, cfg: Any) -> tuple[Factorization, dict[str, Any]]:
    """Whitening from the dense stream, then U re-solved against W·X′ on the compressed stream."""
    assert stats.gram is not None and stats.comp_gram is not None
    f = whiten(weight, stats.gram, k, cfg.damp)
    before = _rel(weight, f, stats.comp_gram)
    f.u = update_left(weight, f.v, stats.comp_gram, stats.comp_gram, cfg.update_damp)
    return f, {"loss_before_update": before, "loss": _rel(weight, f, stats.comp_gram)}


def _svdllm_ec(weight: Tensor, stats: LayerStats, k: int, cfg: Any) -> tuple[Factorization, dict[str, Any]]:
    """Optimal rank-k fit of W(βX + (1−β)X′) from X′: Trunc_k(W·D_β·S′⁻ᵀ)·S′⁻¹."""
    assert stats.comp_gram is not None and stats.cross is not None
    c = stats.comp_gram
    target = c if cfg.beta == 0 else cfg.beta * stats.cross + (1 - cfg.beta) * c
    f = whiten_towards(weight, target, c, k, cfg.ec_damp)
    return f, {"loss": _rel(weight, f, c), "beta": cfg.beta}


SVDLLM_W = Method("svdllm-w", _svdllm_w, frozenset({"gram"}), "SVD-LLM(W): truncation-aware whitening")
SVDLLM = Method("svdllm", _svdllm, frozenset({"gram", "comp"}), "SVD-LLM(W) + layer-wise closed-form update of U")
SVDLLM_EC = Method(
    "svdllm-ec", _svdllm_ec, frozenset({"comp", "cross"}), "error-corrected whitening towards W(βX + (1−β)X′) (ours)"
)
