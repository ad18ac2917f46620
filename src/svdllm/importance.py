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
from .source import ModelSource
from .plan import CompressionPlan
from .whitening import repaired_cholesky


@dataclass
class GradientStats:
    """Sums over the calibration windows, one backward pass each (the loss of one window, as FWSVD defines it)."""

    sensitivity: dict[str, float] = field(default_factory=dict)  # E‖∂L/∂y‖² / m per linear output y
    row_fisher: dict[str, Tensor] = field(default_factory=dict)  # Σ (∂L/∂W)² summed over each output row (FWSVD)


def gradient_statistics(model: nn.Module, windows: Tensor, names: list[str], sensitivity: bool = True,
                        row_fisher: bool = False) -> GradientStats:
    """The one backward loop: for each window, the LM loss's gradient with respect to each named linear's output
    (``sensitivity``) and, if asked, to its weight (``row_fisher``).  A non-finite loss or gradient is an error
    naming the window."""
    device = next(p.device for p in model.parameters() if p.device.type != "meta")
    modules = {n: model.get_submodule(n) for n in names}
    sums = torch.zeros(len(names), dtype=torch.float64)
    width = torch.zeros(len(names), dtype=torch.float64)
    conv = {n for n, m in modules.items() if type(m).__name__ == "Conv1D"}
    rows = {n: torch.zeros(m.weight.shape[1] if n in conv else m.weight.shape[0], dtype=torch.float64)
            for n, m in modules.items()} if row_fisher else {}

    def watch(j: int):
        def hook(_: nn.Module, __: tuple, out: Tensor) -> None:
            width[j] = out.shape[-1]
            if out.requires_grad:
                out.register_hook(lambda g: sums.__setitem__(j, sums[j] + g.detach().double().pow(2).sum().cpu()))
        return hook

    handles = [m.register_forward_hook(watch(j)) for j, m in enumerate(modules.values())] if sensitivity else []
    handles.append(model.get_input_embeddings().register_forward_hook(lambda _m, _a, out: out.requires_grad_(True)))
    wants_grad = {id(m.weight) for m in modules.values()} if row_fisher else set()
    required = {n: p.requires_grad for n, p in model.named_parameters()}
    was_training, tokens = model.training, torch.zeros(1, dtype=torch.float64)
    model.eval()
    try:
        for p in model.parameters():
            p.requires_grad_(id(p) in wants_grad)
        with torch.enable_grad():
            for w, window in enumerate(windows):
                model.zero_grad(set_to_none=True)
                ids = window[None].to(device)
                loss = model(input_ids=ids, labels=ids, use_cache=False).loss
                if not torch.isfinite(loss):
                    raise DataError(f"non-finite loss in calibration window {w}; the model overflows on it")
                loss.backward()
                tokens += ids.numel()
                for n, acc in rows.items():
                    g2 = modules[n].weight.grad.detach().double() ** 2
                    acc += (g2.sum(0) if n in conv else g2.sum(1)).cpu()
        if not torch.isfinite(sums).all() or not all(torch.isfinite(r).all() for r in rows.values()):
            raise DataError("a non-finite gradient in the calibration windows; try float32")
    finally:
        for h in handles:
            h.remove()
        model.zero_grad(set_to_none=True)
        for n, p in model.named_parameters():
            p.requires_grad_(required[n])
        model.train(was_training)
    distributed.all_reduce_([sums, tokens, *rows.values()])
    return GradientStats({n: float(sums[j] / (tokens * width[j])) for j, n in enumerate(names)} if sensitivity else {},
                         rows)


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
