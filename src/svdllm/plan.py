"""The compression plan: which linears of which blocks to factorise, at which rank.

A plan is plain data (it round-trips through JSON): the report, the saved
config and a resume checkpoint all record it, and rank allocation only has to
replace its ``{name: rank}``.
"""
from __future__ import annotations

import fnmatch
from dataclasses import asdict, dataclass, field
from typing import Any

from torch import nn

from .architecture import block_linears, decoder_blocks, linear_shape
from .errors import OptionError
from .ranks import uniform, worth_factorising


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


def matches(name: str, local: str, patterns: list[str]) -> bool:
    """The one matching rule for linears: a glob matches the full module name or the name inside its block."""
    return any(fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(local, p) for p in patterns)


def make_plan(model: nn.Module, ratio: float, targets: list[str] | None = None,
              skip_layers: list[int] | None = None) -> CompressionPlan:
    """The paper's uniform plan for every decoder-block linear matching a glob of ``targets`` outside ``skip_layers``
    (negative indices count from the end).  Works on a model whose weights are on the meta device: only shapes are
    read.
    """
    prefix, blocks = decoder_blocks(model)
    n = len(blocks)
    bad = sorted(i for i in skip_layers or [] if not -n <= i < n)
    if bad:
        raise OptionError("skip_layers", f"block {bad[0]} does not exist (the model has {n} blocks, 0-{n - 1})")
    skip = {i % n for i in skip_layers or []}
    if len(skip) == n:
        raise OptionError("skip_layers", f"leaves none of the {n} blocks to compress")
    patterns = targets or ["*"]
    shapes: dict[str, list[int]] = {}
    for i, block in enumerate(blocks):
        if i in skip:
            continue
        for name, module in block_linears(block, f"{prefix}.{i}").items():
            if matches(name, name[len(prefix) + len(str(i)) + 2:], patterns):
                shapes[name] = list(linear_shape(module))
    if not shapes:
        raise OptionError("targets", f"{','.join(patterns)!r} matches no linear layer of the decoder blocks")
    ranks = uniform({n: (m, k) for n, (m, k) in shapes.items()}, ratio)
    kept = {n: "rank too high to save parameters" for n, k in ranks.items() if not worth_factorising(*shapes[n], k)}
    return CompressionPlan(prefix, len(blocks), shapes, {n: k for n, k in ranks.items() if n not in kept}, kept)
