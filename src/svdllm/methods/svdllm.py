"""SVD-LLM (W), SVD-LLM with its closed-form update, and our error-corrected whitening."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

import torch
from torch import Tensor

from ..errors import OptionError
from ..whitening import (Factorization, fit_product, output_factor, output_shrinkage, outputs_of, promoted_product,
                         relative_error, relative_error_on, repaired_cholesky, update_left, whiten)
from ..calibration import Stat
from .base import MethodOptions, check_range, register

if TYPE_CHECKING:
    from ..calibration import LayerStats


# A ridge is relative to the Gram's mean diagonal: past 1e4 it is the identity to float64's precision, and at 1e200 its
# square overflows (a factor of 1e50 in float32 was seen).
MAX_RIDGE = 1e4


@dataclass(frozen=True)
class OutputAwareOptions(MethodOptions):
    """The output side, shared by every whitening method: Rᵀ·W·S with R Rᵀ = C_g, the loss's output-gradient Gram."""

    output_whitening: bool = False  # also whiten the output side with the loss's gradient Gram (K-FAC)
    output_damp: float = 0.01  # ridge on that Gram, relative to its mean diagonal
    output_full_width: int = 8192  # outputs wider keep the Gram's diagonal only (a full one costs width²·8 bytes)
    # weight α of the scaled identity in a full output Gram; None: w/(w + tokens) (whitening.output_shrinkage), so
    # that few calibration tokens per output fall back towards one-sided whitening (0: the Gram alone, as 0.8.0)
    output_shrinkage: float | None = None

    def validate(self) -> None:
        check_range(self, "output_damp", 0.0, MAX_RIDGE)
        if isinstance(self.output_full_width, bool) or not isinstance(self.output_full_width, int) \
                or self.output_full_width < 0:
            raise OptionError("output_full_width", f"must be a non-negative whole number, got {self.output_full_width!r}")
        if self.output_shrinkage is not None:
            check_range(self, "output_shrinkage", 0.0, 1.0)

    def extra_needs(self) -> frozenset[Stat]:
        return frozenset({Stat.OUT_GRAM}) if self.output_whitening else frozenset()

    def shrinkage(self, width: int, tokens: int) -> float:
        """α for a full output Gram of ``width`` outputs gathered over ``tokens`` calibration tokens."""
        return output_shrinkage(width, tokens) if self.output_shrinkage is None else float(self.output_shrinkage)


@dataclass(frozen=True)
class WhiteningOptions(OutputAwareOptions):
    name = "svdllm-w"
    damp: float = 0.0  # whitening ridge added before Cholesky, relative to the mean diagonal (0: only when needed)

    def validate(self) -> None:
        super().validate()
        check_range(self, "damp", 0.0, MAX_RIDGE)


@dataclass(frozen=True)
class SVDLLMOptions(WhiteningOptions):
    name = "svdllm"
    update_damp: float = 1e-6  # ridge of the closed-form update's normal equations

    def validate(self) -> None:
        super().validate()
        check_range(self, "update_damp", 0.0, MAX_RIDGE)


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
        check_range(self, "beta", 0.0, 1.0)
        check_range(self, "norm_cap", 0.0, 1e6)
        check_range(self, "ec_damp", 0.0, MAX_RIDGE)


def _whitening_record(weight: Tensor, f: Factorization, gram: Tensor) -> dict[str, Any]:
    """loss against the raw Gram, and loss_whitened = Σ discarded σ² / Σ σ², exact for the (damped) Gram used."""
    total = float((f.sigma**2).sum())
    return {"loss": relative_error(weight, f.u, f.v, gram), "loss_whitened": f.discarded_energy / max(total, 1e-300)}


@register(WhiteningOptions, frozenset({Stat.GRAM}), "SVD-LLM(W): truncation-aware whitening")
def svdllm_w(weight: Tensor, stats: LayerStats, k: int, opts: WhiteningOptions) -> tuple[Factorization, dict[str, Any]]:
    assert stats.gram is not None
    side = _output_side(stats, opts)
    f = whiten(weight, stats.gram, k, opts.damp, **side)
    return f, {**_whitening_record(weight, f, stats.gram), **_shrinkage_record(side)}


@register(SVDLLMOptions, frozenset({Stat.GRAM, Stat.COMP}), "SVD-LLM(W) + layer-wise closed-form update of U")
def svdllm(weight: Tensor, stats: LayerStats, k: int, opts: SVDLLMOptions) -> tuple[Factorization, dict[str, Any]]:
    """Whitening from the dense stream, then U re-solved against W·X′ on the compressed stream."""
    assert stats.gram is not None and stats.comp_gram is not None
    side = _output_side(stats, opts)
    f = whiten(weight, stats.gram, k, opts.damp, **side)  # U re-solved below: R cancels
    before = relative_error(weight, f.u, f.v, stats.comp_gram)
    f.u = update_left(weight, f.v, stats.comp_gram, stats.comp_gram, opts.update_damp)
    return f, {**_shrinkage_record(side), "loss_before_update": before,
               "loss": relative_error(weight, f.u, f.v, stats.comp_gram)}


def _shrinkage_record(side: dict[str, Any]) -> dict[str, Any]:
    """The α a full output Gram was shrunk by, for the report (a diagonal one is never shrunk)."""
    return {"output_shrinkage": side["out_shrink"]} if side and side["out_gram"].dim() == 2 else {}


def _output_side(stats: LayerStats, opts: OutputAwareOptions) -> dict[str, Any]:
    """The output side's arguments of the whitening functions: none for one-sided whitening."""
    if not opts.output_whitening:
        return {}
    if stats.out_gram is None:
        raise RuntimeError("output whitening asked for, but no output-gradient Gram was gathered")
    return {"out_gram": stats.out_gram, "out_damp": opts.output_damp,
            "out_shrink": opts.shrinkage(stats.out_gram.shape[0], stats.tokens)}


@register(ErrorCorrectedOptions, frozenset({Stat.COMP, Stat.CROSS}),
          "error-corrected whitening towards W(βX + (1−β)X′) (ours)")
def svdllm_ec(weight: Tensor, stats: LayerStats, k: int,
              opts: ErrorCorrectedOptions) -> tuple[Factorization, dict[str, Any]]:
    """The fit for β, with β halved (to 0 at last) while ‖W′‖_F exceeds norm_cap·‖W‖_F.

    Large β regresses W·X on X′; where X′ has little variance that regression can
    blow the weight up (11× seen on SmolLM2) and the model falls off a cliff on new
    text even though the calibration fit looks better.  The guard keeps the gain.
    """
    assert stats.comp_gram is not None and any(t is not None for t in (stats.cross, stats.weighted_cross, stats.inputs))
    # W in float64 is made where it is read and not kept: no (m, n) float64 copy of it lives through the fit
    w_norm = float(weight.double().norm())
    blend: Callable[[float], Tensor]  # W·(βX + (1−β)X′)ᵀX′, made anew for each β the guard tries
    from_outputs = stats.inputs is not None
    if from_outputs:  # few tokens: from the outputs Y = X·Wᵀ and Y′ = X′·Wᵀ, (tokens × m) each
        assert stats.comp_inputs is not None
        x_c = stats.comp_inputs.double()
        y, y_c = outputs_of(stats.inputs, weight), outputs_of(x_c, weight)
        blend = lambda b: torch.lerp(y_c, y, b).T @ x_c  # noqa: E731
        stats.let_go("inputs", "comp_inputs")
    else:  # from the statistics: W·XᵀX′ and W·X′ᵀX′, (m, n) each
        w_cross = stats.weighted_cross.double() if stats.weighted_cross is not None \
            else promoted_product(weight, stats.cross.double())
        stats.let_go("cross", "weighted_cross")  # each statistic let go as soon as it is read
        w_comp = promoted_product(weight, stats.comp_gram.double())
        blend = lambda b: torch.lerp(w_comp, w_cross, b)  # noqa: E731
    factor = repaired_cholesky(stats.comp_gram, opts.ec_damp, consume=stats.owned)
    stats.let_go("comp_gram")
    beta, side = opts.beta, _output_side(stats, opts)
    # R made once for every β tried, and C_g let go before the first fit (128 MB for a 7B down_proj)
    out_factor = output_factor(side["out_gram"], side["out_damp"], side["out_shrink"]) if side else None
    shrinkage = _shrinkage_record(side)
    del side
    stats.let_go("out_gram")
    while True:  # R⁻ᵀ·Trunc_k(Rᵀ·W·D_β·S′⁻ᵀ)·S′⁻¹, R = I unless output-aware
        f = fit_product(weight, None if beta == 0 else blend(beta), None, k,
                        factor=factor, with_v_gram=not from_outputs, out_factor=out_factor)
        ratio = math.sqrt(max(float(((f.u.T @ f.u) * (f.v @ f.v.T)).sum()), 0.0)) / max(w_norm, 1e-300)  # ‖uv‖_F
        if beta == 0 or not opts.norm_cap or ratio <= opts.norm_cap:
            break
        beta = beta / 2 if beta > 1 / 16 else 0.0
    del blend, factor, out_factor
    if from_outputs:
        loss = relative_error_on(f.u, f.v, x_c, y_c)
    else:
        del w_cross
        loss = relative_error(weight, f.u, f.v, None, w_comp, f.v_gram)
    info: dict[str, Any] = {**shrinkage, "loss": loss, "beta": beta, "norm_ratio": ratio}
    if beta != opts.beta:
        info["beta_requested"] = opts.beta
    return f, info
