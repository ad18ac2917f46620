"""What rank allocation needs to know: each linear's whitened truncation spectrum and how much the language-model
loss cares about that linear's output.

Dropping component i of a whitened matrix costs exactly σᵢ² of ‖(W − W′)X‖²; a
perturbation δy of a linear's output costs the loss about ½·δyᵀFδy, with F the
Fisher information of that output.  With F taken isotropic (its mean diagonal
f = E‖∂L/∂y‖²/m), component i of matrix l costs about f_l·σ²_{l,i}: the score
``allocate`` ranks components by.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Iterator

import torch
from torch import Tensor, nn

from . import distributed
from .architecture import decoder_blocks, dense_weight
from .calibration import DENSE, ActivationStream, GramAccumulator, TensorStore
from .evaluate import all_reduce_result, stream_perplexity
from .modeling_svdllm import LowRankLinear, swapped
from .onload import BlockHost
from .plan import CompressionPlan
from .whitening import repaired_cholesky, whiten

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


def _dense_grams(host: BlockHost, stream: ActivationStream, plan: CompressionPlan
                 ) -> Iterator[tuple[nn.Module, dict[str, nn.Module], GramAccumulator]]:
    """Each block in turn, onloaded, with the linears the plan factorises and the Grams of their dense inputs;
    the stream moves past the block when the caller is done with it."""
    for i in range(plan.n_blocks):
        block = host.onload(i)
        linears = {n: host.model.get_submodule(n) for n in plan.block(i) if n in plan.ranks}
        acc = GramAccumulator(frozenset({"gram"}), host.device)
        stream.record(block, linears, acc)
        acc.all_reduce()
        yield block, linears, acc
        acc.stats.clear()  # the caller's loop variable still holds it through the next block
        stream.advance(block)
        host.offload(i)


@torch.no_grad()
def whitened_spectra(model: nn.Module, windows: Tensor, plan: CompressionPlan, device: torch.device,
                     batch_size: int = 4, source: "ShardSource | None" = None) -> dict[str, Tensor]:
    """σ² of W·chol(XXᵀ) for every linear the plan factorises, from one dense pass, one block at a time."""
    prefix, blocks = decoder_blocks(model)
    host, store = BlockHost(model, prefix, blocks, device, source), TensorStore(device)
    with host.outside_blocks():
        stream = ActivationStream.capture(model, blocks[0], windows, batch_size, (DENSE,), store, device, "spectra")
    out: dict[str, Tensor] = {}
    for _, linears, acc in _dense_grams(host, stream, plan):
        for name, module in linears.items():
            s, _, _ = repaired_cholesky(acc.for_linear(name).gram)
            out[name] = torch.linalg.svdvals(dense_weight(module)[0].double() @ s).pow(2).cpu()
    store.close()
    return out


def interpolate(a: dict[str, int], b: dict[str, int], t: float) -> dict[str, int]:
    """⌊(1−t)·a + t·b⌋ per matrix: between two allocations, within their budgets (less under one rank each)."""
    return {n: max(1, int((1 - t) * a[n] + t * b[n] + 1e-9)) for n in a}


@torch.no_grad()
def held_out_losses(model: nn.Module, windows: Tensor, held_out: Tensor, plan: CompressionPlan,
                    candidates: dict[str, dict[str, int]], device: torch.device, batch_size: int = 4) -> dict[str, float]:
    """Mean next-token NLL on ``held_out`` of the model truncated by SVD-LLM(W) at each candidate's ranks.

    One streamed pass: the dense lane of ``windows`` gives each block's Grams, each matrix is whitened
    once at the largest rank a candidate asks for, and each candidate's lane of ``held_out`` runs through
    the block built from its slice of those factors (a rank change is a slice).
    """
    prefix, blocks = decoder_blocks(model)
    host, store, lanes = BlockHost(model, prefix, blocks, device), TensorStore(device), tuple(candidates)
    with host.outside_blocks():
        fit = ActivationStream.capture(model, blocks[0], windows, batch_size, (DENSE,), store, device, "fit")
        held = ActivationStream.capture(model, blocks[0], held_out, batch_size, lanes, store, device, "held")
    for block, linears, acc in _dense_grams(host, fit, plan):
        top = {n: whiten(dense_weight(m)[0], acc.for_linear(n).gram, max(c[n] for c in candidates.values()))
               for n, m in linears.items()}
        for lane, ranks in candidates.items():
            with swapped(model, {n: LowRankLinear.from_factors(m, top[n].u[:, : ranks[n]], top[n].v[: ranks[n]])
                                 for n, m in linears.items()}):
                held.propagate(block, lane)
        del top
    with host.outside_blocks():
        losses = {lane: all_reduce_result(stream_perplexity(model, blocks, held, lane, held_out, batch_size,
                                                            device)).nll for lane in lanes}
    store.close()
    return losses
