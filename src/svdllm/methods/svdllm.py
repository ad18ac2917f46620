"""SVD-LLM (W), SVD-LLM with its closed-form update, and our error-corrected whitening."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from ..errors import OptionError
from ..whitening import Factorization, fit_product, relative_error, update_left, whiten
from .base import MethodOptions, register

if TYPE_CHECKING:
    from ..calibration import LayerStats


@dataclass(frozen=True)
class OutputAwareOptions(MethodOptions):
    """The output side, shared by every whitening method: Rᵀ·W·S with R Rᵀ = C_g, the loss's output-gradient Gram."""

    output_whitening: bool = False  # also whiten the output side with the loss's gradient Gram (K-FAC)
    output_damp: float = 0.01  # ridge on that Gram, relative to its mean diagonal
    output_full_width: int = 8192  # outputs wider keep the Gram's diagonal only (a full one costs width²·8 bytes)

    def validate(self) -> None:
        if not self.output_damp >= 0:
            raise OptionError("output_damp", f"must be non-negative, got {self.output_damp}")
        if not self.output_full_width >= 0:
            raise OptionError("output_full_width", f"must be non-negative, got {self.output_full_width}")


@dataclass(frozen=True)
class WhiteningOptions(OutputAwareOptions):
    name = "svdllm-w"
    damp: float = 0.0  # whitening ridge added before Cholesky, relative to the mean diagonal (0: only when needed)

    def validate(self) -> None:
        super().validate()
        if not self.damp >= 0:
            raise OptionError("damp", f"must be non-negative, got {self.damp}")


@dataclass(frozen=True)
class SVDLLMOptions(WhiteningOptions):
    name = "svdllm"
    update_damp: float = 1e-6  # ridge of the closed-form update's normal equations


@dataclass(frozen=True)
class ErrorCorrectedOptions(OutputAwareOptions):
    name = "svdllm-ec"
    # output whitening is on by default since 0.8.0: it beat the one-sided default at 0.2, 0.4 and 0.6 on both
    # evaluation sets (benchmarks/results/output-aware)
    output_whitening: bool = True
    beta: float = 0.25  # target blend: 1 = dense inputs X, 0 = compressed inputs X′
    norm_cap: float = 1.5  # halve β for a matrix while ‖W′‖_F > cap·‖W‖_F (0: off)
    ec_damp: float = 1e-4  # ridge on X′X′ᵀ, relative to its mean diagonal

    def validate(self) -> None:
        super().validate()
        if not 0.0 <= self.beta <= 1.0:  # also refuses nan
            raise OptionError("beta", f"must be in [0, 1], got {self.beta}")
        if not self.norm_cap >= 0:
            raise OptionError("norm_cap", f"must be positive (or 0 for off), got {self.norm_cap}")
        if not self.ec_damp >= 0:
            raise OptionError("ec_damp", f"must be non-negative, got {self.ec_damp}")


def _whitening_record(weight: Tensor, f: Factorization, gram: Tensor) -> dict[str, Any]:
    """loss against the raw Gram, and loss_whitened = Σ discarded σ² / Σ σ², exact for the (damped) Gram used."""
    total = float((f.sigma**2).sum())
    return {"loss": relative_error(weight, f.u, f.v, gram), "loss_whitened": f.discarded_energy / max(total, 1e-300)}


@register(WhiteningOptions, frozenset({"gram"}), "SVD-LLM(W): truncation-aware whitening")
def svdllm_w(weight: Tensor, stats: LayerStats, k: int, opts: WhiteningOptions) -> tuple[Factorization, dict[str, Any]]:
    assert stats.gram is not None
    f = whiten(weight, stats.gram, k, opts.damp, _out(stats, opts), opts.output_damp)
    return f, _whitening_record(weight, f, stats.gram)


@register(SVDLLMOptions, frozenset({"gram", "comp"}), "SVD-LLM(W) + layer-wise closed-form update of U")
def svdllm(weight: Tensor, stats: LayerStats, k: int, opts: SVDLLMOptions) -> tuple[Factorization, dict[str, Any]]:
    """Whitening from the dense stream, then U re-solved against W·X′ on the compressed stream."""
    assert stats.gram is not None and stats.comp_gram is not None
    f = whiten(weight, stats.gram, k, opts.damp, _out(stats, opts), opts.output_damp)  # U re-solved below: R cancels
    before = relative_error(weight, f.u, f.v, stats.comp_gram)
    f.u = update_left(weight, f.v, stats.comp_gram, stats.comp_gram, opts.update_damp)
    return f, {"loss_before_update": before, "loss": relative_error(weight, f.u, f.v, stats.comp_gram)}


def _out(stats: LayerStats, opts: OutputAwareOptions) -> Tensor | None:
    """The output-gradient Gram when the options ask for output whitening."""
    if opts.output_whitening and stats.out_gram is None:
        raise RuntimeError("output whitening asked for, but no output-gradient Gram was gathered")
    return stats.out_gram if opts.output_whitening else None


@register(ErrorCorrectedOptions, frozenset({"comp", "cross"}),
          "error-corrected whitening towards W(βX + (1−β)X′) (ours)")
def svdllm_ec(weight: Tensor, stats: LayerStats, k: int,
              opts: ErrorCorrectedOptions) -> tuple[Factorization, dict[str, Any]]:
    """The fit for β, with β halved (to 0 at last) while ‖W′‖_F exceeds norm_cap·‖W‖_F.

    Large β regresses W·X on X′; where X′ has little variance that regression can
    blow the weight up (11× seen on SmolLM2) and the model falls off a cliff on new
    text even though the calibration fit looks better.  The guard keeps the gain.
    """
    assert stats.comp_gram is not None and stats.cross is not None
    w = weight.double()
    w_norm = float(w.norm())
    # W·(βX + (1−β)X′)X′ᵀ as a blend of two (m, n) products, made once for every β the guard tries
    w_cross, w_comp = w @ stats.cross, w @ stats.comp_gram
    beta = opts.beta
    while True:  # R⁻ᵀ·Trunc_k(Rᵀ·W·D_β·S′⁻ᵀ)·S′⁻¹, R = I unless output-aware
        f = fit_product(w, None if beta == 0 else torch.lerp(w_comp, w_cross, beta), stats.comp_gram, k,
                        opts.ec_damp, _out(stats, opts), opts.output_damp)
        ratio = float((f.u @ f.v).norm()) / max(w_norm, 1e-300)
        if beta == 0 or not opts.norm_cap or ratio <= opts.norm_cap:
            break
        beta = beta / 2 if beta > 1 / 16 else 0.0
    info: dict[str, Any] = {"loss": relative_error(weight, f.u, f.v, stats.comp_gram), "beta": beta,
                            "norm_ratio": ratio}
    if beta != opts.beta:
        info["beta_requested"] = opts.beta
    return f, info
