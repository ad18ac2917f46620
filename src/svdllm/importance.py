"""What rank allocation needs to know: each linear's whitened truncation spectrum and how much the language-model
loss cares about that linear's output.

Dropping component i of a whitened matrix costs exactly σᵢ² of ‖(W − W′)X‖²; a
perturbation δy of a linear's output costs the loss about ½·δyᵀFδy, with F the
Fisher information of that output.  With F taken isotropic (its mean diagonal
f = E‖∂L/∂y‖²/m), component i of matrix l costs about f_l·σ²_{l,i}: the score
``allocate`` ranks components by.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from . import distributed
from .architecture import decoder_blocks, dense_weight
from .calibration import DENSE, ActivationStream, GramAccumulator, TensorStore
from .onload import BlockHost
from .plan import CompressionPlan
from .whitening import repaired_cholesky

if TYPE_CHECKING:
    from .io import ShardSource


def output_sensitivity(model: nn.Module, windows: Tensor, names: list[str], batch_size: int = 1) -> dict[str, float]:
    """E‖∂L/∂y‖² / m for each named linear's output y (m features), over the tokens of ``windows``.

    Gradients flow to the activations only (no weight gradients are kept): one
    forward and backward of the whole model per batch.
    """
    device = next(p.device for p in model.parameters() if p.device.type != "meta")
    sums = torch.zeros(len(names), dtype=torch.float64)
    width = torch.zeros(len(names), dtype=torch.float64)

    def watch(j: int):
        def hook(_: nn.Module, __: tuple, out: Tensor) -> None:
            width[j] = out.shape[-1]
            if out.requires_grad:
                out.register_hook(lambda g: sums.__setitem__(j, sums[j] + g.detach().double().pow(2).sum().cpu()))
        return hook

    handles = [model.get_submodule(n).register_forward_hook(watch(j)) for j, n in enumerate(names)]
    handles.append(model.get_input_embeddings().register_forward_hook(lambda _m, _a, out: out.requires_grad_(True)))
    was_training, tokens = model.training, torch.zeros(1, dtype=torch.float64)
    model.eval()
    try:
        with torch.enable_grad():
            for batch in windows.split(batch_size):
                ids = batch.to(device)
                model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
                tokens += ids.numel()
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    distributed.all_reduce_([sums, tokens])
    return {n: float(sums[j] / (tokens * width[j])) for j, n in enumerate(names)}


@torch.no_grad()
def whitened_spectra(model: nn.Module, windows: Tensor, plan: CompressionPlan, device: torch.device,
                     batch_size: int = 4, source: "ShardSource | None" = None) -> dict[str, Tensor]:
    """σ² of W·chol(XXᵀ) for every linear the plan factorises, from one dense pass, one block at a time."""
    prefix, blocks = decoder_blocks(model)
    host = BlockHost(model, prefix, blocks, device, source)
    store = TensorStore(device)
    with host.outside_blocks():
        stream = ActivationStream.capture(model, blocks[0], windows, batch_size, (DENSE,), store, device, "spectra")
    out: dict[str, Tensor] = {}
    for i in range(plan.n_blocks):
        block = host.onload(i)
        linears = {n: model.get_submodule(n) for n in plan.block(i) if n in plan.ranks}
        acc = GramAccumulator(frozenset({"gram"}), device)
        stream.record(block, linears, acc)
        acc.all_reduce()
        for name, module in linears.items():
            s, _, _ = repaired_cholesky(acc.for_linear(name).gram)
            out[name] = torch.linalg.svdvals(dense_weight(module)[0].double() @ s).pow(2).cpu()
        del acc
        stream.advance(block)
        host.offload(i)
    store.close()
    return out
