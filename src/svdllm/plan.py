"""The compression plan: which linears of which blocks to factorise, at which rank.

A plan is plain data (it round-trips through JSON): the report, the saved
config and a resume checkpoint all record it, and rank allocation only has to
produce one.
"""
from __future__ import annotations

import fnmatch
from dataclasses import asdict, dataclass, field
from typing import Any

from torch import nn

from .architecture import block_linears, decoder_blocks, linear_shape
from .ranks import RANK_RULES, worth_factorising


@dataclass
class CompressionPlan:
    prefix: str  # module path of the decoder-block list, e.g. "model.layers"
    n_blocks: int
    shapes: dict[str, list[int]]  # every targeted linear → [out, in]
    ranks: dict[str, int]  # the linears to factorise → rank
    kept_dense: dict[str, str] = field(default_factory=dict)  # targeted but left dense → why

    def block(self, i: int) -> list[str]:
        """Names of the targeted linears of block ``i``, in module order."""
        head = f"{self.prefix}.{i}."
        return [name for name in self.shapes if name.startswith(head)]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "CompressionPlan":
        return cls(**data)


def make_plan(model: nn.Module, ratio: float, targets: list[str] | None = None, skip_layers: list[int] | None = None,
              rule: str = "uniform") -> CompressionPlan:
    """Plan for every decoder-block linear matching a glob of ``targets`` outside ``skip_layers``.

    Works on a model whose weights are on the meta device: only shapes are read.
    """
    prefix, blocks = decoder_blocks(model)
    skip = set(skip_layers or [])
    bad = sorted(i for i in skip if not 0 <= i < len(blocks))
    if bad:
        raise ValueError(f"--skip-layers: block {bad[0]} does not exist (the model has {len(blocks)} blocks, 0-{len(blocks) - 1})")
    if len(skip) == len(blocks):
        raise ValueError(f"--skip-layers leaves none of the {len(blocks)} blocks to compress")
    patterns = targets or ["*"]
    shapes: dict[str, list[int]] = {}
    for i, block in enumerate(blocks):
        if i in skip:
            continue
        for name, module in block_linears(block, f"{prefix}.{i}").items():
            local = name[len(prefix) + len(str(i)) + 2:]
            if any(fnmatch.fnmatch(name, p) or fnmatch.fnmatch(local, p) for p in patterns):
                shapes[name] = list(linear_shape(module))
    if not shapes:
        raise ValueError(f"--targets {','.join(patterns)!r} matches no linear layer of the decoder blocks")
    if rule not in RANK_RULES:
        raise ValueError(f"unknown rank rule {rule!r}; choose from {', '.join(RANK_RULES)}")
    ranks = RANK_RULES[rule]({n: (m, k) for n, (m, k) in shapes.items()}, ratio)
    kept = {n: "rank too high to save parameters" for n, k in ranks.items() if not worth_factorising(*shapes[n], k)}
    return CompressionPlan(prefix, len(blocks), shapes, {n: k for n, k in ranks.items() if n not in kept}, kept)
