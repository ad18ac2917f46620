"""The runtime that saved models carry: these files are copied into a saved folder beside a generated
``modeling_svdllm.py``, each only where the model uses it (``svdllm.folder.runtime_files``).

- ``svdllm_lowrank``: ``LowRankLinear``, the module swap and ``svdllm_class`` (every folder);
- ``svdllm_latent_cache``: the latent KV cache (folders of the families it supports);
- ``svdllm_quantized``: loading quantized factors with optimum-quanto (folders with quantized factors).
"""
from __future__ import annotations

from .svdllm_latent_cache import LATENT_CACHE_FAMILIES, LatentCache, cache_argument, cache_bytes_per_token, latent_rank
from .svdllm_lowrank import (
    LowRankLinear,
    WeightsMismatch,
    apply_ranks,
    float_weight,
    rank_major,
    replace_module,
    restore_rank_major,
    svdllm_class,
    swapped,
    tied_parameter_names,
)
from .svdllm_quantized import load_quantized, quantize_modules


def model_class(base: type) -> type:
    """``svdllm_class`` with everything the library has: quantized loading and the latent cache."""
    return svdllm_class(base, load_quantized=load_quantized, latent_cache=LatentCache)


__all__ = ["LATENT_CACHE_FAMILIES", "LatentCache", "LowRankLinear", "apply_ranks", "cache_argument",
           "cache_bytes_per_token", "float_weight", "latent_rank", "load_quantized", "model_class", "quantize_modules", "rank_major",
           "replace_module", "restore_rank_major", "svdllm_class", "swapped", "tied_parameter_names", "WeightsMismatch"]
