"""What rank allocation and FWSVD read: each linear's whitened truncation spectrum, and gradient statistics.

Dropping component i of a whitened matrix costs exactly σᵢ² of ‖(W − W′)X‖²; a perturbation δy of a linear's
output costs the loss about ½·δyᵀFδy, with F the Fisher information of that output.  With F taken isotropic (its
mean diagonal f = E‖∂L/∂y‖²/m), component i of matrix l costs about f_l·σ²_{l,i}: the score ``allocate`` ranks
components by.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from . import distributed
from .architecture import dense_weight
from .calibration import DENSE, ActivationStream, GramAccumulator, TensorStore
from .errors import DataError
from .evaluate import _replaying
from .source import ModelSource
from .plan import CompressionPlan
from .whitening import repaired_cholesky


@dataclass
class GradientStats:
    """Sums over the calibration windows, one backward pass each (the loss of one window, as FWSVD defines it)."""

    sensitivity: dict[str, float] = field(default_factory=dict)  # E‖∂L/∂y‖² / m per linear output y
    row_fisher: dict[str, Tensor] = field(default_factory=dict)  # Σ (∂L/∂W)² summed over each output row (FWSVD)


def gradient_statistics(source: ModelSource, windows: Tensor, names: list[str], sensitivity: bool = True,
                        row_fisher: bool = False, store: TensorStore | None = None) -> GradientStats:
    """The one backward loop, streamed block by block: the LM loss of each window, backpropagated through one block
    at a time, never the whole model.

    A forward pass keeps each block's input (``store``: CPU memory, or files on disk for a streamed model); the head
    gives ∂L/∂h at the last block's output; then the blocks are onloaded in reverse, each recomputed from its kept
    input and backpropagated alone, handing ∂L/∂h at its input to the block before.  On the way each named linear
    gives the gradient at its output (``sensitivity``) and, if asked, at its weight (``row_fisher``, FWSVD's).  The
    result equals a whole-model backward's (a test holds it to one).  A non-finite loss or gradient is an error
    naming the window and the block, before anything is written.
    """
    store = store or TensorStore(torch.device("cpu"))
    model, device, n = source.model, source.device, len(windows)
    index = {name: j for j, name in enumerate(names)}
    sums = torch.zeros(len(names), dtype=torch.float64)
    width = torch.zeros(len(names), dtype=torch.float64)
    rows: dict[str, Tensor] = {}
    with source.outside_blocks():
        stream = ActivationStream.capture(model, source.blocks, windows, 1, (DENSE,), store, device, "grad")
    with torch.no_grad():
        for i, block in source.walk():
            for j in range(n):
                h = stream.hidden(DENSE, j, device)
                store.put(f"grad.in{i}.{j}", h)
                stream.store.put(stream._key(DENSE, j), stream.run_block(block, i, j, h))
    with source.outside_blocks():  # ∂L/∂h at the last block's output, from the model's own head and loss
        for j in range(n):
            h = stream.hidden(DENSE, j, device).requires_grad_(True)
            ids = windows[j : j + 1].to(device)
            with _replaying(source.blocks, stream.tuple_output) as slot, torch.enable_grad():
                slot[:] = [h]
                loss = model(input_ids=ids, labels=ids, use_cache=False).loss
                if not torch.isfinite(loss):
                    raise DataError(f"non-finite loss in calibration window {j}; the model overflows on it")
                loss.backward()
            store.put(f"grad.out.{j}", h.grad)
    for i, block in source.walk(reverse=True):
        linears = {name: model.get_submodule(name) for name in names if name.startswith(f"{source.prefix}.{i}.")}
        required = {p: p.requires_grad for p in block.parameters()}
        for p in block.parameters():
            p.requires_grad_(row_fisher and any(p is m.weight for m in linears.values()))
        handles = [m.register_forward_hook(_sensitivity_hook(sums, width, index[name])) for name, m in linears.items()
                   if sensitivity]
        try:
            for j in range(n):
                h = store.get(f"grad.in{i}.{j}", device).requires_grad_(True)
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
                         if sensitivity else {}, {name: rows[name] for name in names if name in rows})


def _sensitivity_hook(sums: Tensor, width: Tensor, j: int):
    def hook(_: nn.Module, __: tuple, out: Tensor) -> None:
        width[j] = out.shape[-1]
        if out.requires_grad:
            out.register_hook(lambda g: sums.__setitem__(j, sums[j] + g.detach().double().pow(2).sum().cpu()))
    return hook


@torch.no_grad()
def whitened_spectra(source: ModelSource, windows: Tensor, plan: CompressionPlan,
                     batch_size: int = 4) -> dict[str, Tensor]:
    """σ² of W·chol(XXᵀ) for every linear the plan factorises, from one dense pass, one block at a time."""
    store = TensorStore(source.device)
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
            s, _, _ = repaired_cholesky(acc.for_linear(name).gram)
            out[name] = torch.linalg.svdvals(dense_weight(module)[0].double() @ s).pow(2).cpu()
        del acc
        stream.advance(block, i)
    store.close()
    return out
