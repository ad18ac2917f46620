"""The low-rank module that replaces a dense linear, and the module swap (defined in modeling_svdllm,
which ships inside saved models)."""
from __future__ import annotations

from .modeling_svdllm import LowRankLinear, apply_ranks, replace_module, restore_rank_major

__all__ = ["LowRankLinear", "apply_ranks", "replace_module", "restore_rank_major"]
