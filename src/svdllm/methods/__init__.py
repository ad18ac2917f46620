"""Registry of compression methods: (weight, statistics, rank) → factors."""
from __future__ import annotations

from .base import LayerStats, Method
from .baselines import ASVD, FWSVD, SVD
from .svdllm import SVDLLM, SVDLLM_EC, SVDLLM_W

METHODS: dict[str, Method] = {m.name: m for m in (SVD, FWSVD, ASVD, SVDLLM_W, SVDLLM, SVDLLM_EC)}

__all__ = ["METHODS", "LayerStats", "Method"]
