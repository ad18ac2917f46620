"""Quantized factors of svdllm models: shipped only in folders whose factors are quantized.

config.svdllm["quantization"]["modules"] maps linear names to optimum-quanto weight types and group sizes; the
shards hold quanto's own flattened tensors (int8 data, or int4 packed two per byte, with scales and shifts).
Loading rebuilds those modules with quanto and reads the shards strictly.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .svdllm_lowrank import WeightsMismatch, restore_rank_major, tied_parameter_names


def _guard_int8_cpu_kernel() -> None:
    """quanto sends bfloat16 inputs of width divisible by 4 to torch's CPU kernel ``_weight_int8pack_mm``, which kills
    the process (torch 2.13, segmentation fault) unless the width is a multiple of 16, as factor widths (ranks)
    often are not; those go to quanto's generic dequantize-and-matmul path instead."""
    from optimum.quanto.library import qbytes_mm as library

    if getattr(library, "_svdllm_guarded", False):
        return
    kernel = library.qbytes_int8pack_mm

    def guarded(activations: torch.Tensor, weights: torch.Tensor, output_scales: torch.Tensor) -> torch.Tensor:
        if activations.shape[-1] % 16:
            return library.qbytes_mm(activations, weights, output_scales)
        return kernel(activations, weights, output_scales)

    library.qbytes_int8pack_mm, library._svdllm_guarded = guarded, True


def quantize_modules(model: nn.Module, modules: dict[str, dict[str, Any]]) -> None:
    """Make each named nn.Linear an optimum-quanto QLinear of its recorded weight type and group size; ``freeze``
    then quantizes their weights, or ``load_state_dict`` reads quantized ones."""
    try:
        from optimum.quanto import quantize
    except ImportError:
        raise ImportError("this model's weights are quantized with optimum-quanto: pip install optimum-quanto") from None
    _guard_int8_cpu_kernel()
    by_type: dict[str, list[str]] = {}
    for name, spec in modules.items():
        by_type.setdefault(spec["weights"], []).append(name)
        weight = model.get_submodule(name).weight
        weight.data = weight.data.contiguous()  # quanto keeps the float layout's strides: U's rank-major one breaks it
    for weights, names in by_type.items():
        quantize(model, weights=weights, include=names)
    for name, spec in modules.items():
        module = model.get_submodule(name)
        if getattr(module, "weight_qtype", None) is None:
            raise ValueError(f"{name} is not a linear optimum-quanto can quantize ({type(module).__name__})")
        module.weight_group_size = spec.get("group_size")


def load_quantized(cls: type, path: str | os.PathLike, config: Any, quantization: dict[str, Any],
                   dtype: Any = None) -> nn.Module:
    """A model with quantized factors from a local folder: built without initialising weights, its quantized
    linears made by quanto, then every tensor read from the shards (strictly: nothing missing, nothing unused)."""
    from safetensors.torch import load_file

    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # transformers 4
        from transformers.modeling_utils import no_init_weights

    folder = Path(path)
    if not folder.is_dir():
        raise ValueError(f"{path}: models with quantized factors load from a local folder")
    saved = getattr(torch, quantization["dtype"])  # scales and every unquantized tensor are in it
    wanted = getattr(torch, dtype) if isinstance(dtype, str) and dtype != "auto" else dtype
    if wanted not in (None, "auto", saved):
        raise ValueError(f"quantized factors load in their saved dtype {saved}, not {wanted}")
    with no_init_weights():
        model = cls._from_config(config, dtype=saved)
    quantize_modules(model, quantization["modules"])
    model.tie_weights()  # a tied head is saved once, under the embedding's name
    index = folder / "model.safetensors.index.json"
    files = set(json.loads(index.read_text())["weight_map"].values()) if index.is_file() else {"model.safetensors"}
    state: dict[str, torch.Tensor] = {}
    for file in sorted(files):
        # copies: safetensors' tensors sit at arbitrary byte offsets, and torch's CPU int8 kernel crashes on them
        state.update({k: v.clone() for k, v in load_file(str(folder / file)).items()})
    result = model.load_state_dict(state, strict=False)
    missing = sorted(set(result.missing_keys) - tied_parameter_names(model))
    for kind, found in (("missing key", missing), ("unexpected key", sorted(result.unexpected_keys))):
        if found:
            raise WeightsMismatch(f"the weights do not match config.json's svdllm quantization: {kind} {found[0]} "
                             f"({len(found)} in all)")
    restore_rank_major(model)
    return model.eval()


