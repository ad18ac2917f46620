"""Generic model walk: decoder blocks and the linears inside them, for any HF causal LM."""
from __future__ import annotations

from torch import Tensor, nn

from .errors import FormatError, OptionError
from .runtime import LowRankLinear


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
        raise FormatError(f"cannot find the decoder blocks of {type(model).__name__}")
    return best


def block_linears(block: nn.Module, prefix: str) -> dict[str, nn.Module]:
    """Full name → module for every dense nn.Linear/Conv1D in ``block`` (factors of a LowRankLinear excluded)."""
    found = {}
    for name, module in block.named_modules():
        if isinstance(module, LowRankLinear) or not is_linear(module):
            continue
        if any(name.endswith(s) for s in (".svd_u", ".svd_v")):
            continue
        found[f"{prefix}.{name}"] = module
    return found


def linear_shape(module: nn.Module) -> tuple[int, int]:
    """(out, in) of an nn.Linear or GPT-2 Conv1D (whose weight is stored (in, out)); works on meta weights."""
    rows, cols = module.weight.shape
    return (cols, rows) if type(module).__name__ == "Conv1D" else (rows, cols)


def dense_weight(module: nn.Module) -> tuple[Tensor, Tensor | None]:
    """(W as (out, in), bias) for nn.Linear and GPT-2's transposed Conv1D."""
    if isinstance(module, nn.Linear):
        return module.weight.data, module.bias.data if module.bias is not None else None
    if type(module).__name__ == "Conv1D":  # transformers.pytorch_utils.Conv1D: y = x W + b, W (in, out)
        return module.weight.data.T, module.bias.data
    raise TypeError(f"not a linear layer: {type(module).__name__}")


def count_parameters(model: nn.Module) -> int:
    """Unique parameters (tied embeddings counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def position_limit(model: nn.Module) -> int | None:
    """How many positions a model with learned absolute position embeddings (GPT-2, OPT) can take: the size of its
    position table, read from the config; None for rotary models, which have no table to index past."""
    config = model.config.get_text_config()
    limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if limit is None:
        return None
    inputs = model.get_input_embeddings()
    tables = [m for m in model.modules() if isinstance(m, nn.Embedding) and m is not inputs and m.num_embeddings >= limit]
    return limit if tables else None


def check_positions(model: nn.Module, longest: int, option: str = "seqlen") -> None:
    """Refuse, before any work, a window longer than the model's learned positions (it fails deep inside), naming
    the option that set its length."""
    limit = position_limit(model)
    if limit is not None and longest > limit:
        raise OptionError(option, f"windows of {longest} tokens exceed the model's {limit} positions")
