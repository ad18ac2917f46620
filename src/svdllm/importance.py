"""What rank allocation and FWSVD read: each linear's whitened truncation spectrum, and gradient statistics.

Dropping component i of a whitened matrix costs exactly σᵢ² of ‖(W − W′)X‖²; a perturbation δy of a linear's
output costs the loss about ½·δyᵀFδy, with F the Fisher information of that output.  With F taken isotropic (its
mean diagonal f = E‖∂L/∂y‖²/m), component i of matrix l costs about f_l·σ²_{l,i}: the score ``allocate`` ranks
components by.
"""
from __future__ import annotations

import math
from contextlib import closing, contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterator, Mapping

import torch
from torch import Tensor, nn

from . import distributed
from .architecture import dense_weight
from .blas import release_workspace
from .calibration import DENSE, ActivationStream, GramAccumulator, StoredTensors, TensorStore
from .errors import DataError
from .evaluate import head_logits
from .source import ModelSource
from .plan import CompressionPlan
from .whitening import left_whitened, output_factor, repaired_cholesky

if TYPE_CHECKING:
    from .methods import OutputAwareOptions


@dataclass
class GradientStats:
    """Sums over the calibration windows, one backward pass each (the loss of one window, as FWSVD defines it)."""

    sensitivity: dict[str, float] = field(default_factory=dict)  # E‖∂L/∂y‖² / m per linear output y
    row_fisher: dict[str, Tensor] = field(default_factory=dict)  # Σ (∂L/∂W)² summed over each output row (FWSVD)
    output_grams: Mapping[str, Tensor] = field(default_factory=dict)  # Σ g gᵀ of ∂L/∂y (m, m), or its diagonal (m,)


# A full output-gradient Gram costs m²·8 bytes in float64: 512 MiB at m = 8192 (LLaMA-7B's q/k/v/o and down_proj are
# 4096 wide: 128 MiB each).  Wider outputs (the 11008-wide gate/up of LLaMA-7B, 28672 of 70B) keep the diagonal.
FULL_GRAM_WIDTH = 8192
GRAM_PREFIX = "gram."  # the store's key of a linear's output-gradient Gram


def gradient_statistics(source: ModelSource, windows: Tensor, names: list[str], sensitivity: bool = True,
                        row_fisher: bool = False, store: TensorStore | None = None, output_grams: bool = False,
                        full_width: int = FULL_GRAM_WIDTH, logits_budget: int = 1 << 21,
                        gram_store: TensorStore | None = None) -> GradientStats:
    """The one backward loop, streamed block by block: the LM loss of each window, backpropagated through one block
    at a time, never the whole model.

    A forward pass keeps each block's input (``store``: CPU memory, or files on disk for a streamed model); the head
    gives ∂L/∂h at the last block's output; then the blocks are onloaded in reverse, each recomputed from its kept
    input and backpropagated alone, handing ∂L/∂h at its input to the block before.  On the way each named linear
    gives the gradient at its output (``sensitivity``; with ``output_grams`` also Σ g gᵀ, the diagonal alone for
    outputs wider than ``full_width``) and, if asked, at its weight (``row_fisher``, FWSVD's).  Each block's Grams
    go to ``gram_store`` (CPU memory unless given) as soon as its windows are done, so that memory holds one block's
    worth: the result reads them from there.  The result equals a whole-model backward's (a test holds it to one).
    A non-finite loss or gradient is an error naming the window and the block, before anything is written.
    """
    store = store or TensorStore(torch.device("cpu"))
    gram_store = gram_store or TensorStore(torch.device("cpu"))
    model, device, n = source.model, source.device, len(windows)
    index = {name: j for j, name in enumerate(names)}
    sums = torch.zeros(len(names), dtype=torch.float64)
    width = torch.zeros(len(names), dtype=torch.float64)
    rows: dict[str, Tensor] = {}
    grams: dict[str, Tensor] | None = {} if output_grams else None
    with source.outside_blocks():
        stream = ActivationStream.capture(model, source.blocks, windows, 1, (DENSE,), store, device, "grad")
    with torch.no_grad():
        for i, block in source.walk():
            for j in range(n):
                h = stream.hidden(DENSE, j, device)
                store.put(f"grad.in{i}.{j}", h)
                stream.store.put(stream._key(DENSE, j), stream.run_block(block, i, j, h))
    with source.outside_blocks():  # ∂L/∂h at the last block's output, from the model's own head
        for j in range(n):
            h = stream.hidden(DENSE, j, device).requires_grad_(True)
            _head_backward(model, source.blocks, stream.tuple_output, h, windows[j : j + 1].to(device), j,
                           logits_budget)
            store.put(f"grad.out.{j}", h.grad)
    for i, block in source.walk(reverse=True):
        linears = {name: model.get_submodule(name) for name in names if name.startswith(f"{source.prefix}.{i}.")}
        required = {p: p.requires_grad for p in block.parameters()}
        for p in block.parameters():
            p.requires_grad_(row_fisher and any(p is m.weight for m in linears.values()))
        handles = [m.register_forward_hook(_output_hook(sums, width, index[name], name, grams, full_width))
                   for name, m in linears.items() if sensitivity or output_grams]
        try:
            for j in range(n):
                h = store.take(f"grad.in{i}.{j}", device).detach().requires_grad_(True)
                g = store.get(f"grad.out.{j}", device)
                with torch.enable_grad():
                    torch.autograd.backward(stream.run_block(block, i, j, h), g)
                if not torch.isfinite(h.grad).all():
                    raise DataError(f"non-finite gradient in calibration window {j} at block {i}; try float32")
                store.put(f"grad.out.{j}", h.grad)
                for name, m in linears.items() if row_fisher else ():
                    g2 = m.weight.grad.detach().double() ** 2
                    row = (g2.sum(0) if type(m).__name__ == "Conv1D" else g2.sum(1)).cpu()
                    rows[name] = row if name not in rows else rows[name].add_(row)
                    m.weight.grad = None
            if grams is not None:  # this block's Grams are complete: summed over the processes, then stored
                for name, m in linears.items():  # an output that never reached the loss: a zero Gram, repaired later
                    if name not in grams:
                        out = dense_weight(m)[0].shape[0]
                        grams[name] = torch.zeros((out, out) if out <= full_width else (out,), dtype=torch.float64)
                done = [name for name in names if name in linears]
                distributed.all_reduce_([grams[name] for name in done])
                for name in done:
                    gram_store.put(GRAM_PREFIX + name, grams.pop(name))
        finally:
            for handle in handles:
                handle.remove()
            for p, flag in required.items():
                p.requires_grad_(flag)
    if not torch.isfinite(sums).all():
        raise DataError("a non-finite gradient in the calibration windows; try float32")
    tokens = torch.tensor([float(windows.numel())], dtype=torch.float64)
    distributed.all_reduce_([sums, tokens, *(rows[name] for name in names if name in rows)])
    return GradientStats({name: float(sums[j] / (tokens * width[j])) for j, name in enumerate(names)}
                         if sensitivity else {}, {name: rows[name] for name in names if name in rows},
                         StoredTensors(gram_store, names, GRAM_PREFIX) if output_grams else {})


def _head_backward(model: nn.Module, blocks: nn.ModuleList, tuple_output: bool, h: Tensor, ids: Tensor, window: int,
                   logits_budget: int) -> None:
    """Backpropagate the window's mean next-token loss (what ``labels=ids`` gives) from the model's own head to ``h``,
    the last block's output, a few positions at a time: at most ``logits_budget`` logits exist at once (8 MB), so the
    head never dominates a streamed run's memory."""
    count, total = ids.shape[1] - 1, 0.0
    chunks = head_logits(model, blocks, tuple_output, h, ids, 1, logits_budget)
    with _frozen(model), torch.enable_grad(), closing(chunks):
        for logits, targets in chunks:
            nll = nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                              reduction="sum") / count
            total += float(nll.detach())
            nll.backward()
    if not math.isfinite(total):
        raise DataError(f"non-finite loss in calibration window {window}; the model overflows on it")


@contextmanager
def _frozen(model: nn.Module) -> Iterator[None]:
    """No parameter asks for a gradient (the head's would be vocabulary × hidden, accumulated for nothing)."""
    flags = {p: p.requires_grad for p in model.parameters()}
    for p in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)


def _output_hook(sums: Tensor, width: Tensor, j: int, name: str, grams: dict[str, Tensor] | None, full_width: int):
    """Forward hook of one linear: when its output's gradient arrives, add Σg² (and Σ g gᵀ, or its diagonal)."""
    def add(g: Tensor) -> None:
        g = g.detach().double().reshape(-1, g.shape[-1])
        sums[j] += g.pow(2).sum().cpu()
        if grams is not None:
            part = (g.T @ g if g.shape[1] <= full_width else g.pow(2).sum(0)).cpu()
            grams[name] = part if name not in grams else grams[name].add_(part)

    def hook(_: nn.Module, __: tuple, out: Tensor) -> None:
        width[j] = out.shape[-1]
        if out.requires_grad:
            out.register_hook(add)
    return hook


@torch.no_grad()
def whitened_spectra(source: ModelSource, windows: Tensor, plan: CompressionPlan, batch_size: int = 4,
                     out_grams: Mapping[str, Tensor] | None = None, out_side: OutputAwareOptions | None = None,
                     store: TensorStore | None = None) -> dict[str, Tensor]:
    """σ² of W·chol(XXᵀ) for every linear the plan factorises, from one dense pass, one block at a time; with
    ``out_grams``, of Rᵀ·W·chol(XXᵀ) (R Rᵀ = C_g, damped and shrunk as ``out_side`` says, exactly as the
    factorisation will): two-sided, in units of the loss, and zero for an output that never reaches the loss.
    The pass's activations wait in ``store`` (the device unless given)."""
    store = store or TensorStore(source.device)
    with source.outside_blocks():
        stream = ActivationStream.capture(source.model, source.blocks, windows, batch_size, (DENSE,), store,
                                          source.device, "spectra")
    out: dict[str, Tensor] = {}
    for i, block in source.walk():
        linears = {n: source.model.get_submodule(n) for n in plan.block(i) if n in plan.ranks}
        acc = GramAccumulator(frozenset({"gram"}), source.device)
        stream.record(block, i, linears, acc)
        acc.all_reduce()
        for name, module in linears.items():
            stats = acc.for_linear(name)
            s, _, _ = repaired_cholesky(stats.gram)
            target = dense_weight(module)[0].double() @ s
            if out_grams is not None and out_side is not None:
                gram = out_grams[name]
                if not torch.isfinite(gram).all():  # one-sided σ² here would mix activation units into loss units
                    raise DataError(f"{name}: its output-gradient Gram is not finite; try float32")
                r, _ = output_factor(gram, out_side.output_damp, out_side.shrinkage(gram.shape[0], stats.tokens))
                target = left_whitened(r, target)
            out[name] = torch.linalg.svdvals(target).pow(2).cpu()
            release_workspace()
        del acc
        stream.advance(block, i)
    store.close()
    return out
