"""The low-rank module that replaces a dense linear, and the module swap."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .modeling_svdllm import LowRankLinear, apply_ranks  # single source, also shipped with saved models

__all__ = ["LowRankLinear", "apply_ranks", "dense_weight", "from_factors"]


def dense_weight(module: nn.Module) -> tuple[Tensor, Tensor | None]:
    """(W as (out, in), bias) for nn.Linear and GPT-2's transposed Conv1D."""
    if isinstance(module, nn.Linear):
        return module.weight.data, module.bias.data if module.bias is not None else None
    if type(module).__name__ == "Conv1D":  # transformers.pytorch_utils.Conv1D: y = x W + b, W (in, out)
        return module.weight.data.T, module.bias.data
    raise TypeError(f"not a linear layer: {type(module).__name__}")


def from_factors(module: nn.Module, u: Tensor, v: Tensor) -> LowRankLinear:
    """A LowRankLinear computing u·v·x + b, in the dtype and device of ``module``."""
    weight, bias = dense_weight(module)
    out = LowRankLinear(v.shape[1], u.shape[0], u.shape[1], bias=bias is not None)
    out.to(device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        out.svd_u.weight.copy_(u)
        out.svd_v.weight.copy_(v)
        if bias is not None:
            out.svd_u.bias.copy_(bias)
    return out
