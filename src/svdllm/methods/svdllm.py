"""SVD-LLM (W), SVD-LLM with its closed-form update, and our error-corrected whitening."""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..whitening import Factorization, relative_error, target_error, update_left, whiten, whiten_towards
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


def _ec_fit(weight: Tensor, stats: LayerStats, beta: float, k: int, damp: float) -> Factorization:
    """Optimal rank-k fit of W(βX + (1−β)X′) from X′: Trunc_k(W·D_β·S′⁻ᵀ)·S′⁻¹."""
    assert stats.comp_gram is not None and stats.cross is not None
    c = stats.comp_gram
    target = c if beta == 0 else beta * stats.cross + (1 - beta) * c
    return whiten_towards(weight, target, c, k, damp)


def _ec_guarded(weight: Tensor, stats: LayerStats, beta: float, k: int, cfg: Any) -> tuple[Factorization, float, float]:
    """The fit for β, with β halved (to 0 at last) while ‖W′‖_F exceeds cfg.ec_norm_cap·‖W‖_F.

    Large β regresses W·X on X′; where X′ has little variance that regression can
    blow the weight up (11× seen on SmolLM2) and the model falls off a cliff on new
    text even though the calibration fit looks better.  The guard keeps the gain.
    """
    w_norm = float(weight.double().norm())
    while True:
        f = _ec_fit(weight, stats, beta, k, cfg.ec_damp)
        ratio = float((f.u @ f.v).norm()) / max(w_norm, 1e-300)
        if beta == 0 or cfg.ec_norm_cap is None or ratio <= cfg.ec_norm_cap:
            return f, beta, ratio
        beta = beta / 2 if beta > 1 / 16 else 0.0


def held_out_error(weight: Tensor, f: Factorization, held: LayerStats) -> float:
    """‖W·X − W′·X′‖² / ‖W·X‖² on held-out windows: how well W′ reproduces the dense layer."""
    assert held.gram is not None and held.comp_gram is not None and held.cross is not None
    w = weight.double()
    dense = float(torch.einsum("ij,jk,ik->", w, held.gram.double(), w))
    return target_error(weight, f.u @ f.v, held.gram, held.cross, held.comp_gram) / max(dense, 1e-300)


def _svdllm_ec(weight: Tensor, stats: LayerStats, k: int, cfg: Any) -> tuple[Factorization, dict[str, Any]]:
    """Fixed β, or β = "auto": per matrix, the β of cfg.beta_grid with the lowest held-out error, refit on all data."""
    info: dict[str, Any] = {}
    beta = cfg.beta
    if beta == "auto":
        assert stats.holdout is not None
        scores = {b: held_out_error(weight, _ec_fit(weight, stats, b, k, cfg.ec_damp), stats.holdout)
                  for b in cfg.beta_grid}
        beta = min(scores, key=lambda b: scores[b])
        info["beta_scores"] = scores
        stats = stats.merged()
    f, used, norm = _ec_guarded(weight, stats, float(beta), k, cfg)
    assert stats.comp_gram is not None
    info.update(loss=_rel(weight, f, stats.comp_gram), beta=used, norm_ratio=norm)
    if used != beta:
        info["beta_requested"] = beta
    return f, info


SVDLLM_W = Method("svdllm-w", _svdllm_w, frozenset({"gram"}), "SVD-LLM(W): truncation-aware whitening")
SVDLLM = Method("svdllm", _svdllm, frozenset({"gram", "comp"}), "SVD-LLM(W) + layer-wise closed-form update of U")
SVDLLM_EC = Method(
    "svdllm-ec", _svdllm_ec, frozenset({"comp", "cross"}), "error-corrected whitening towards W(βX + (1−β)X′) (ours)"
)
