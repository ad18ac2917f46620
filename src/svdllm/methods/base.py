"""What a method needs from calibration, and the signature every method implements."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

from torch import Tensor

from ..whitening import Factorization

if TYPE_CHECKING:
    from ..config import CompressionConfig


@dataclass
class LayerStats:
    """Calibration statistics of one linear's input (row-major X: tokens × n).

    gram = XᵀX of the dense model's stream, comp_gram = X′ᵀX′ of the compressed
    model's stream, cross = XᵀX′; abs_sum = Σ|x| per input dim; fisher = per
    output-row Fisher information of the weight.
    """

    tokens: int = 0
    gram: Tensor | None = None
    comp_gram: Tensor | None = None
    cross: Tensor | None = None
    abs_sum: Tensor | None = None
    fisher: Tensor | None = None
    holdout: "LayerStats | None" = None  # the same statistics on held-out calibration windows

    def merged(self) -> "LayerStats":
        """Fit and held-out statistics summed: all the calibration data."""
        h = self.holdout
        if h is None:
            return self

        def add(a: Tensor | None, b: Tensor | None) -> Tensor | None:
            return a if b is None else b if a is None else a + b

        return LayerStats(self.tokens + h.tokens, add(self.gram, h.gram), add(self.comp_gram, h.comp_gram),
                          add(self.cross, h.cross), add(self.abs_sum, h.abs_sum), self.fisher)


Factorizer = Callable[[Tensor, LayerStats, int, "CompressionConfig"], tuple[Factorization, dict[str, Any]]]


@dataclass(frozen=True)
class Method:
    name: str
    factorize: Factorizer
    needs: frozenset[str]  # subset of {"gram", "abs", "fisher", "comp" (X′X′ᵀ), "cross" (XX′ᵀ)}
    summary: str

    @property
    def sequential(self) -> bool:
        """Needs the compressed model's own activations (X′), so blocks go in order."""
        return "comp" in self.needs
