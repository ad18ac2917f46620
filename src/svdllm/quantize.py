"""Weight-only int8/int4/int2 quantization of the low-rank factors (and of dense linears a user names).

Factors are ordinary nn.Linear layers, so a maintained weight-only quantizer applies to them unchanged.  svdllm uses
optimum-quanto: the same format runs on CPU and CUDA, and its flattened tensors (int8 data, or int4 packed two per
byte, with per-row or per-group scales and shifts) are plain safetensors.  torchao's int4 needs CUDA or extra kernel
packages here, and its safetensors support is a prototype.

    plan = quantize_model(model, QuantizeOptions(bits=4, group_size=128))
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from .architecture import block_linears, decoder_blocks
from .errors import OptionError, SvdllmError
from .plan import matches
from .record import SvdllmRecord
from .runtime import LowRankLinear, quantize_modules

LIBRARY = "optimum-quanto"
WEIGHT_TYPES = {8: "qint8", 4: "qint4", 2: "qint2"}


@dataclass(frozen=True)
class QuantizeOptions:
    bits: int = 8
    group_size: int = 128  # int4, int2: weights per scale and shift along an input row (quanto's default)
    dense: tuple[str, ...] = ()  # globs over dense linears in the decoder blocks to quantize as well
    VERSION: ClassVar[int] = 1

    def validate(self) -> None:
        if self.bits not in WEIGHT_TYPES:
            raise OptionError("quantize.bits", f"must be 8, 4 or 2, got {self.bits}")
        if self.group_size < 32 or self.group_size % 16:
            raise OptionError("quantize.group_size", f"must be a multiple of 16, at least 32; got {self.group_size}")


def group_size_for(out_features: int, in_features: int, group_size: int, dtype: torch.dtype, bits: int = 4
                   ) -> int | None:
    """The int4/int2 group size of one (out, in) weight: ``group_size`` if it divides ``in``, else the largest multiple
    of 16 down to half of it that does, else None (one scale and shift per row).  quanto's bfloat16 CPU int4 kernel,
    which it picks for groups of 128, needs ``out`` divisible by 16, so 128 is skipped where it is not."""
    for g in range(group_size, group_size // 2 - 1, -16):
        tinygemm = g == 128 and bits == 4 and dtype == torch.bfloat16
        if in_features % g == 0 and in_features > g and not (tinygemm and out_features % 16):
            return g
    return None


def quantization_plan(model: nn.Module, options: QuantizeOptions) -> dict[str, dict[str, Any]]:
    """{linear name: {"weights", "group_size", "shape"}}: both factors of every LowRankLinear, then the dense
    linears of the decoder blocks that match ``options.dense``."""
    prefix, blocks = decoder_blocks(model)
    names = [f"{n}.{f}" for n, m in model.named_modules() if isinstance(m, LowRankLinear) for f in ("svd_u", "svd_v")]
    hits = dict.fromkeys(options.dense, 0)
    for i, block in enumerate(blocks):
        for name, module in block_linears(block, f"{prefix}.{i}").items():
            local = name[len(prefix) + len(str(i)) + 2:]
            found = [g for g in options.dense if matches(name, local, [g])]
            for g in found:
                hits[g] += 1
            if found:
                if not isinstance(module, nn.Linear):
                    raise OptionError("quantize.dense", f"{name} is a {type(module).__name__}: optimum-quanto "
                                      "quantizes nn.Linear only")
                names.append(name)
    unmatched = [g for g, n in hits.items() if not n]
    if unmatched:
        raise OptionError("quantize.dense", f"{unmatched[0]!r} matches no dense linear of the decoder blocks")
    if not names:
        raise OptionError("quantize.dense", "nothing to quantize: the model has no low-rank factors; name dense "
                          "linears to quantize (e.g. '*')")
    plan = {}
    for name in names:
        weight = model.get_submodule(name).weight
        out_f, in_f = weight.shape
        group = group_size_for(out_f, in_f, options.group_size, weight.dtype, options.bits) if options.bits < 8 else None
        plan[name] = {"weights": WEIGHT_TYPES[options.bits], "group_size": group, "shape": [out_f, in_f]}
    return plan


def require_library() -> None:
    """Raise one clear line if optimum-quanto is not installed (before any long work that ends in quantizing)."""
    import importlib.util

    try:
        found = importlib.util.find_spec("optimum.quanto") is not None
    except ModuleNotFoundError:  # no optimum package at all
        found = False
    if not found:
        raise SvdllmError(f"quantization needs {LIBRARY}: pip install 'svdllm[quantize]'")


def quantize_model(model: nn.Module, options: QuantizeOptions, record: SvdllmRecord | None = None) -> dict[str, Any]:
    """Quantize ``model`` in place (weights in their current dtype); returns the saved record's ``quantization``
    part.  A model whose ``record`` says it is already quantized is refused."""
    from importlib.metadata import version

    require_library()
    from optimum.quanto import freeze

    options.validate()
    if record is not None and record.quantization:
        raise OptionError("quantize", "the model's weights are already quantized")
    plan = quantization_plan(model, options)
    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
    if len(dtypes) != 1:
        raise OptionError("quantize", f"the model mixes floating dtypes {sorted(map(str, dtypes))}: cast it to one "
                          "first")
    quantize_modules(model, plan)
    freeze(model)
    return {"library": LIBRARY, "library_version": version(LIBRARY), "bits": options.bits,
            "group_size": options.group_size if options.bits < 8 else None,
            "dtype": str(dtypes.pop()).removeprefix("torch."), "options_version": options.VERSION, "modules": plan}
