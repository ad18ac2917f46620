"""Low-rank layers and the model class of svdllm models: shipped in every saved folder.

Self-contained (torch and transformers only): a saved folder holds this file and a
generated ``modeling_svdllm.py`` that builds ``SVDLLMForCausalLM`` from it, so plain
transformers loads the model with ``trust_remote_code=True`` and no svdllm installed.
The latent KV cache and the quantized-factor loader live in files of their own,
shipped only with the models that use them.
"""
from __future__ import annotations

import inspect
import logging
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import torch
from torch import nn

logger = logging.getLogger(__name__)


class WeightsMismatch(ValueError):
    """The shards and config.json's svdllm section disagree: a tensor missing, unexpected or of another shape."""


def rank_major(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` (out, rank) with the same values, stored rank-major: ``.t()`` is contiguous.

    nn.Linear computes x·Uᵀ.  With U stored (out, rank) the decode GEMV walks
    rows only ``rank`` long; stored rank-major, Uᵀ is a plain row-major matrix
    with rows ``out`` long.  On a CPU this made batch-1 decode 1.07–1.17× faster
    (benchmarks/results/layout).
    """
    return weight.t().contiguous().t()


class LowRankLinear(nn.Module):
    """y = U (V x) + b with V: in→rank and U: rank→out, both ordinary nn.Linear.

    U is kept rank-major in memory (see ``rank_major``); V keeps nn.Linear's
    layout, whose rows (length ``in``) are already the long side.
    """

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True) -> None:
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.svd_v = nn.Linear(in_features, rank, bias=False)
        self.svd_u = nn.Linear(rank, out_features, bias=bias)
        self.use_rank_major()

    def use_rank_major(self) -> None:
        """Restore U's rank-major storage (a load or a merge may hand back a row-major tensor)."""
        w = self.svd_u.weight
        if type(w.data) is torch.Tensor and not w.t().is_contiguous():  # quantized factors keep their own layout
            w.data = rank_major(w.data)

    @classmethod
    def from_factors(cls, module: nn.Module, u: torch.Tensor, v: torch.Tensor) -> "LowRankLinear":
        """u·v·x + b with the bias of ``module`` (nn.Linear or Conv1D), in its dtype and on its device."""
        bias = getattr(module, "bias", None)
        out = cls(v.shape[1], u.shape[0], u.shape[1], bias=bias is not None)
        out.to(device=module.weight.device, dtype=module.weight.dtype)
        with torch.no_grad():
            out.svd_u.weight.copy_(u)
            out.svd_v.weight.copy_(v)
            if bias is not None:
                out.svd_u.bias.copy_(bias)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.svd_u(self.svd_v(x))

    @property
    def weight(self) -> torch.Tensor:  # some model code reads .weight.dtype/.device
        return self.svd_u.weight

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


def restore_rank_major(model: nn.Module) -> nn.Module:
    """``use_rank_major`` on every LowRankLinear of ``model`` (after a load or a LoRA merge)."""
    for module in model.modules():
        if isinstance(module, LowRankLinear):
            module.use_rank_major()
    return model


def replace_module(root: nn.Module, name: str, new: nn.Module) -> nn.Module:
    """Put ``new`` at the dotted path ``name`` under ``root``; returns the module it replaced."""
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    old = getattr(parent, child)
    setattr(parent, child, new)
    return old


@contextmanager
def swapped(root: nn.Module, modules: dict[str, nn.Module]) -> Iterator[None]:
    """While active, ``modules`` sit at their dotted paths under ``root``; the replaced ones come back after."""
    old = {name: replace_module(root, name, m) for name, m in modules.items()}
    try:
        yield
    finally:
        for name, m in old.items():
            replace_module(root, name, m)


def apply_ranks(model: nn.Module, ranks: dict[str, int]) -> nn.Module:
    """Replace each named linear (nn.Linear or GPT-2 Conv1D) by an empty LowRankLinear of the given rank."""
    for name, rank in ranks.items():
        old = model.get_submodule(name)
        if isinstance(old, nn.Linear):
            n_in, n_out = old.in_features, old.out_features
        else:  # Conv1D keeps its weight as (in, out)
            n_in, n_out = old.weight.shape
        new = LowRankLinear(n_in, n_out, int(rank), bias=getattr(old, "bias", None) is not None)
        replace_module(model, name, new.to(device=old.weight.device, dtype=old.weight.dtype))
    return model


def float_weight(linear: nn.Module) -> torch.Tensor:
    """The float weight of a linear, dequantized if optimum-quanto quantized it."""
    w = linear.weight
    return w.dequantize() if type(w.data) is not torch.Tensor else w


def tied_parameter_names(model: nn.Module) -> set[str]:
    """Names under which a parameter shared with an earlier name appears (a tied head): not saved, not missing."""
    return {n for n, _ in model.named_parameters(remove_duplicate=False)} - {n for n, _ in model.named_parameters()}


def _check_loading_info(info: dict) -> None:
    """Every tensor of the model came from the shards and every tensor of the shards was used."""
    for kind in ("missing_keys", "unexpected_keys", "mismatched_keys"):
        found = sorted(info.get(kind) or [])
        if found:
            name = found[0][0] if isinstance(found[0], tuple) else found[0]
            raise WeightsMismatch(f"the weights do not match config.json's svdllm ranks: "
                                  f"{kind.replace('_', ' ')[:-1]} {name} ({len(found)} in all)")


def _quantized(cls: type, path: Any, config: Any, quantization: dict, kwargs: dict,
               load_quantized: Callable[..., nn.Module] | None) -> nn.Module:
    """A folder with quantized factors, through the loader it ships, on the one device asked for."""
    if load_quantized is None:
        raise ValueError("config.json records quantized factors, but the folder has no svdllm_quantized.py")
    model = load_quantized(cls, path, config, quantization, kwargs.get("dtype"))
    device_map = kwargs.get("device_map")
    if isinstance(device_map, (str, torch.device)):
        model.to(device_map)
    elif device_map is not None:
        raise ValueError("models with quantized factors take one device, not a device map")
    return model


def svdllm_class(base: type, load_quantized: Callable[..., nn.Module] | None = None,
                 latent_cache: Callable[[nn.Module], Any] | None = None) -> type:
    """A subclass of a transformers model class that builds its low-rank layers from config.svdllm.

    ``load_quantized(cls, path, config, quantization, dtype)`` loads folders with quantized factors and
    ``latent_cache(model)`` makes the latent KV cache; a saved folder passes only those it ships."""

    class SVDLLMForCausalLM(base):  # type: ignore[misc, valid-type]
        def __init__(self, config, *args, **kwargs) -> None:
            super().__init__(config, *args, **kwargs)
            section = getattr(config, "svdllm", None) or {}
            apply_ranks(self, section.get("ranks", {}))

        @classmethod
        def from_pretrained(cls, path, *args, output_loading_info: bool = False, **kwargs):  # type: ignore[no-untyped-def]
            """Strict: every tensor of the model from the shards and every tensor of the shards used, else an error
            (a dropped or edited rank would otherwise leave a randomly initialised layer)."""
            config = kwargs.get("config")
            if not hasattr(config, "svdllm"):
                config = cls.config_class.from_pretrained(path)
            quantization = (getattr(config, "svdllm", None) or {}).get("quantization")
            if quantization:
                model = _quantized(cls, path, config, quantization, kwargs, load_quantized)
                return (model, {}) if output_loading_info else model
            model, info = super().from_pretrained(path, *args, output_loading_info=True, **kwargs)
            _check_loading_info(info)
            restore_rank_major(model)
            return (model, info) if output_loading_info else model

        latent_cache_default = False  # svdllm.load(..., latent_cache=True) sets it

        def generate(self, *args, latent_cache: bool | None = None, **kwargs):  # type: ignore[no-untyped-def]
            """transformers' generate; with ``latent_cache=True`` and no cache passed, the KV cache keeps the rank-r
            latents of the low-rank k_proj/v_proj, or says why not and keeps the ordinary one."""
            wanted = self.latent_cache_default if latent_cache is None else latent_cache
            if wanted and all(kwargs.get(n) is None for n in ("cache", "past_key_values")):
                try:
                    if make_cache is None:
                        raise ValueError("latent cache: this model family is not supported")
                    cache = make_cache(self)
                    kwargs["cache" if "cache" in inspect.signature(self.forward).parameters else "past_key_values"] = cache
                except ValueError as exc:  # the reason, in one line
                    logger.warning("%s; using the ordinary cache", exc)
            return super().generate(*args, **kwargs)

    make_cache = latent_cache
    SVDLLMForCausalLM.__name__ = SVDLLMForCausalLM.__qualname__ = "SVDLLMForCausalLM"
    return SVDLLMForCausalLM
