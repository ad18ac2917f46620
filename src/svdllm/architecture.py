"""Generic model walk: decoder blocks and the linears inside them, for any HF causal LM."""
from __future__ import annotations

import fnmatch

from torch import nn

from .modeling_svdllm import LowRankLinear


def is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def decoder_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The ModuleList holding the decoder blocks: the longest list of identical-class modules
    whose length matches num_hidden_layers (no per-family table)."""
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        config = config.get_text_config()
    n_layers = getattr(config, "num_hidden_layers", None)
    best: tuple[str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if len({type(m) for m in module}) != 1:
            continue
        if n_layers is not None and len(module) != n_layers:
            continue
        if best is None or len(module) > len(best[1]):
            best = (name, module)
    if best is None:
        raise ValueError(f"cannot find the decoder blocks of {type(model).__name__}")
    return best


def block_linears(block: nn.Module, prefix: str, targets: str = "*") -> dict[str, nn.Module]:
    """Full name → linear for every nn.Linear/Conv1D in ``block`` matching any comma-separated glob."""
    patterns = [p.strip() for p in targets.split(",") if p.strip()] or ["*"]
    found = {}
    for name, module in block.named_modules():
        if isinstance(module, LowRankLinear) or not is_linear(module):
            continue
        if any(name.endswith(s) for s in (".svd_u", ".svd_v")):
            continue
        full = f"{prefix}.{name}"
        if any(fnmatch.fnmatch(full, p) or fnmatch.fnmatch(name, p) for p in patterns):
            found[full] = module
    return found


def parse_layers(spec: str, n_blocks: int) -> set[int]:
    """'0,3-5' → {0, 3, 4, 5}; negative indices count from the end."""
    out: set[int] = set()
    for part in filter(None, (p.strip() for p in spec.split(","))):
        lo, sep, hi = part.partition("-") if not part.startswith("-") else (part, "", "")
        try:
            idx = range(int(lo), int(hi) + 1) if sep else [int(lo)]
        except ValueError as exc:
            raise ValueError(f"bad layer list {spec!r}") from exc
        for i in idx:
            j = i + n_blocks if i < 0 else i
            if not 0 <= j < n_blocks:
                raise ValueError(f"layer {i} out of range for {n_blocks} blocks")
            out.add(j)
    return out


def count_parameters(model: nn.Module) -> int:
    """Unique parameters (tied embeddings counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
