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
from .cache import MemoryStore, StoredTensors, TensorStore
from .calibration import (DENSE, ActivationStream, GramAccumulator, InputRecorder, LayerStats, Stat, add_product_,
                          joined)
from .errors import DataError
from .evaluate import head_logits
from .source import ModelSource
from .whitening import (DAMP_STEPS, left_whiten_, output_factor, outputs_of, promoted_product, repaired_cholesky,
                        sigma_squared)

if TYPE_CHECKING:
    from .methods import OutputAwareOptions


@dataclass
class GradientStats:
    """Sums over the calibration windows, one backward pass each (the loss of one window, as FWSVD defines it)."""

    sensitivity: dict[str, float] = field(default_factory=dict)  # E‖∂L/∂y‖² / m per linear output y
    row_fisher: dict[str, Tensor] = field(default_factory=dict)  # Σ (∂L/∂W)² summed over each output row (FWSVD)
    output_grams: Mapping[str, Tensor] = field(default_factory=dict)  # Σ g gᵀ of ∂L/∂y (m, m), or its diagonal (m,)
    spectra: dict[str, Tensor] = field(default_factory=dict)  # whitened σ² per linear (``Spectra``), for allocation


@dataclass(frozen=True)
class Spectra:
    """Ask the reverse pass for each linear's whitened truncation spectrum, from the dense input Grams its block
    recomputation already sees: one-sided (σ² of W·S), or two-sided (of Rᵀ·W·S, R from the output Gram shrunk and
    damped as ``out_side`` says, exactly as the factorisation will)."""

    out_side: OutputAwareOptions | None = None


# A full output-gradient Gram costs m²·8 bytes in float64: 512 MiB at m = 8192 (LLaMA-7B's q/k/v/o and down_proj are
# 4096 wide: 128 MiB each).  Wider outputs (the 11008-wide gate/up of LLaMA-7B, 28672 of 70B) keep the diagonal.
FULL_GRAM_WIDTH = 8192
GRAM_PREFIX = "gram."  # the store's key of a linear's output-gradient Gram


@dataclass
class _Sums:
    """What the reverse pass accumulates, per linear."""

    names: list[str]
    sensitivity: bool
    row_fisher: bool
    grams: dict[str, Tensor] | None
    full_width: int
    gram_store: TensorStore
    spectra: Spectra | None
    tokens: int  # the whole calibration's, what the spectra's route is chosen by
    batch: int  # windows whose Grams are one float32 product (the block loop's batch)
    sums: Tensor = field(init=False)
    width: Tensor = field(init=False)
    rows: dict[str, Tensor] = field(default_factory=dict)
    out_spectra: dict[str, Tensor] = field(default_factory=dict)
    pending: dict[str, list[Tensor]] = field(default_factory=dict)  # output gradients not yet in their Gram

    def add_gram(self, name: str, g: Tensor | None = None) -> None:
        """Add one window's ``g`` (tokens × m) to the Gram of ``name``'s output gradients, ``batch`` windows at a
        time; without ``g``, what is pending."""
        assert self.grams is not None
        pending = self.pending.setdefault(name, [])
        if g is not None:
            pending.append(g)
        if pending and (g is None or len(pending) >= self.batch):
            batch = pending[0] if len(pending) == 1 else torch.cat(pending)
            self.grams[name] = add_product_(self.grams.get(name), batch, batch)
            pending.clear()

    def __post_init__(self) -> None:
        self.sums = torch.zeros(len(self.names), dtype=torch.float64)
        self.width = torch.zeros(len(self.names), dtype=torch.float64)


def gradient_statistics(source: ModelSource, windows: Tensor, names: list[str], sensitivity: bool = True,
                        row_fisher: bool = False, store: TensorStore | None = None, output_grams: bool = False,
                        full_width: int = FULL_GRAM_WIDTH, logits_budget: int = 1 << 21,
                        gram_store: TensorStore | None = None, spectra: Spectra | None = None,
                        tokens: int = 0, batch: int = 1) -> GradientStats:
    """The one backward loop, streamed block by block: the LM loss of each window, backpropagated through one block
    at a time, never the whole model.

    A forward pass keeps each block's input (``store``: CPU memory unless given); the head gives ∂L/∂h at the last
    block's output; then the blocks are onloaded in reverse, each recomputed from its kept input and backpropagated
    alone, handing ∂L/∂h at its input to the block before.  On the way each named linear gives the gradient at its
    output (``sensitivity``; with ``output_grams`` also Σ g gᵀ, the diagonal alone for outputs wider than
    ``full_width``) and, if asked, at its weight (``row_fisher``, FWSVD's); with ``spectra`` the recomputation's
    dense inputs give each linear's whitened spectrum, with no pass of its own (from W·XᵀX·Wᵀ where that costs less
    for the calibration's ``tokens``, every process's: ``calibration.spectra_from_outputs``; from X itself where the
    tokens are fewer than the outputs: ``spectra_from_inputs``).  The Grams are float32 products of ``batch``
    windows summed in float64, as the block loop's (a 1536-wide Gram of one 512-token window at a time ran 25%
    slower than of four: docs/cost.md).  Each block's Grams go to
    ``gram_store`` (CPU memory unless given) as soon as its windows are done, so that memory holds one block's
    worth.  The result equals a whole-model backward's (a test holds it to one).  A non-finite loss or gradient is
    an error naming the window and the block, before anything is written.
    """
    store = store or MemoryStore(torch.device("cpu"))
    acc = _Sums(names, sensitivity, row_fisher, {} if output_grams else None, full_width,
                gram_store or MemoryStore(torch.device("cpu")), spectra, tokens, batch)
    stream = _forward_keeping_inputs(source, windows, store)
    with source.outside_blocks():  # ∂L/∂h at the last block's output, from the model's own head
        for j in range(len(windows)):
            h = stream.hidden(DENSE, j, source.device).requires_grad_(True)
            _head_backward(source.model, source.blocks, stream.tuple_output, h, windows[j : j + 1].to(source.device),
                           j, logits_budget)
            store.put(f"grad.out.{j}", h.grad)
    for i, block in source.walk(reverse=True):
        _backward_block(source, stream, store, acc, i, block, len(windows))
    if not torch.isfinite(acc.sums).all():
        raise DataError("a non-finite gradient in the calibration windows; try float32")
    tokens = torch.tensor([float(windows.numel())], dtype=torch.float64)
    distributed.all_reduce_([acc.sums, tokens, *(acc.rows[name] for name in names if name in acc.rows)])
    return GradientStats({name: float(acc.sums[j] / (tokens * acc.width[j])) for j, name in enumerate(names)}
                         if sensitivity else {}, {name: acc.rows[name] for name in names if name in acc.rows},
                         StoredTensors(acc.gram_store, names, GRAM_PREFIX) if output_grams else {}, acc.out_spectra)


@torch.no_grad()
def _forward_keeping_inputs(source: ModelSource, windows: Tensor, store: TensorStore) -> ActivationStream:
    """A dense forward, one window at a time, keeping every block's input (``grad.in{i}.{j}``) in ``store``; the
    stream is left at the last block's output."""
    with source.outside_blocks():
        stream = ActivationStream.capture(source.model, source.blocks, windows, 1, (DENSE,), store, source.device,
                                          "grad")
    for i, block in source.walk():
        for j in range(len(windows)):
            h = stream.hidden(DENSE, j, source.device)
            store.put(f"grad.in{i}.{j}", h)
            stream.put(DENSE, j, stream.run_block(block, i, j, h))
    return stream


def _backward_block(source: ModelSource, stream: ActivationStream, store: TensorStore, acc: _Sums, i: int,
                    block: nn.Module, n: int) -> None:
    """Block i recomputed from its kept inputs and backpropagated, window by window; its statistics are complete
    (summed over the processes) when it returns."""
    model, device = source.model, source.device
    index = {name: j for j, name in enumerate(acc.names)}
    linears = {name: model.get_submodule(name) for name in acc.names if name.startswith(f"{source.prefix}.{i}.")}
    inputs = GramAccumulator(frozenset({Stat.GRAM}), device, weights={n: dense_weight(m)[0] for n, m in linears.items()},
                             tokens=acc.tokens, for_spectra=True) if acc.spectra is not None else None
    required = {p: p.requires_grad for p in block.parameters()}
    for p in block.parameters():
        p.requires_grad_(acc.row_fisher and any(p is m.weight for m in linears.values()))
    handles = [m.register_forward_hook(_output_hook(acc, index[name], name))
               for name, m in linears.items() if acc.sensitivity or acc.grams is not None]
    try:
        # the recomputation makes every output: those of linears with no more outputs than inputs are kept, for
        # spectra summed from W·XᵀX·Wᵀ (``spectra_from_outputs``)
        narrow = [n for n, m in linears.items() if dense_weight(m)[0].shape[0] <= dense_weight(m)[0].shape[1]]
        with InputRecorder(linears if inputs is not None else {}, outputs_of=narrow) as recorder:
            seen: list[tuple[dict[str, Tensor], dict[str, Tensor]]] = []  # windows not yet in their Grams
            for j in range(n):
                h = store.take(f"grad.in{i}.{j}", device).detach().requires_grad_(True)
                with torch.enable_grad():
                    torch.autograd.backward(stream.run_block(block, i, j, h), store.get(f"grad.out.{j}", device))
                if not torch.isfinite(h.grad).all():
                    raise DataError(f"non-finite gradient in calibration window {j} at block {i}; try float32")
                store.put(f"grad.out.{j}", h.grad)
                if inputs is not None:
                    seen.append((recorder.take(), recorder.take_outputs()))
                    if j == n - 1 or len(seen) >= acc.batch:
                        ins, outs = zip(*seen)
                        inputs.add_batch(joined(list(ins)), None, joined(list(outs)))
                        seen.clear()
                        recorder.outputs_of = inputs.outputs_read()  # the routes are chosen: keep only what they read
                _add_row_fisher(acc, linears)
        for name in linears if acc.grams is not None else ():
            acc.add_gram(name)
        _finish_block(acc, linears, inputs)
    finally:
        for handle in handles:
            handle.remove()
        for p, flag in required.items():
            p.requires_grad_(flag)


def _add_row_fisher(acc: _Sums, linears: dict[str, nn.Module]) -> None:
    for name, m in linears.items() if acc.row_fisher else ():
        g2 = m.weight.grad.detach().double() ** 2
        row = (g2.sum(0) if type(m).__name__ == "Conv1D" else g2.sum(1)).cpu()
        acc.rows[name] = row if name not in acc.rows else acc.rows[name].add_(row)
        m.weight.grad = None


def _finish_block(acc: _Sums, linears: dict[str, nn.Module], inputs: GramAccumulator | None) -> None:
    """This block's output Grams summed over the processes and stored; its spectra from its input Grams."""
    grams: dict[str, Tensor] = {}
    if acc.grams is not None:
        for name, m in linears.items():  # an output that never reached the loss: a zero Gram, repaired later
            out = dense_weight(m)[0].shape[0]
            grams[name] = acc.grams.pop(name).cpu() if name in acc.grams else \
                torch.zeros((out, out) if out <= acc.full_width else (out,), dtype=torch.float64)
        distributed.all_reduce_(list(grams.values()))
    if inputs is not None:
        inputs.all_reduce()
        two_sided = acc.spectra.out_side if acc.spectra is not None and grams else None
        for name, module in linears.items():
            acc.out_spectra[name] = whitened_spectrum(name, dense_weight(module)[0], inputs.take(name),
                                                      grams.get(name), two_sided)
    for name, gram in grams.items():
        acc.gram_store.put(GRAM_PREFIX + name, gram)


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


def _output_hook(acc: _Sums, j: int, name: str):
    """Forward hook of one linear: when its output's gradient arrives, add Σg² (and Σ g gᵀ, or its diagonal)."""
    def add(g: Tensor) -> None:
        g = g.detach().reshape(-1, g.shape[-1])
        acc.sums[j] += g.double().pow(2).sum().cpu()
        if acc.grams is None:
            return
        if g.shape[1] <= acc.full_width:  # float32 products summed in float64, as the input Grams (docs/cost.md)
            acc.add_gram(name, g)
        else:
            part = g.double().pow(2).sum(0)
            acc.grams[name] = part if name not in acc.grams else acc.grams[name].add_(part)

    def hook(_: nn.Module, __: tuple, out: Tensor) -> None:
        acc.width[j] = out.shape[-1]
        if out.requires_grad:
            out.register_hook(add)
    return hook


def whitened_spectrum(name: str, weight: Tensor, stats: LayerStats, out_gram: Tensor | None,
                      out_side: OutputAwareOptions | None) -> Tensor:
    """σ² of W·chol(XXᵀ), or with ``out_side`` of Rᵀ·W·chol(XXᵀ) (R Rᵀ = C_g, damped and shrunk as the factorisation
    will): two-sided, in units of the loss, and zero for an output that never reaches the loss.  Given W·XXᵀ·Wᵀ
    (``stats.weighted_gram``), they are its eigenvalues (or Rᵀ·W·XXᵀ·Wᵀ·R's): the same σ², with no Cholesky
    factor and no ridge (an input no token reaches adds nothing to them, as it adds nothing to the loss).  Given
    the inputs X themselves (``stats.inputs``: fewer tokens than outputs), they are those of Z = X·Wᵀ·R, from Z's
    smaller Gram, the same σ² again with zeros past the tokens' rank."""
    r = None
    if out_gram is not None and out_side is not None:
        if not torch.isfinite(out_gram).all():  # one-sided σ² here would mix activation units into loss units
            raise DataError(f"{name}: its output-gradient Gram is not finite; try float32")
        r, _ = output_factor(out_gram, out_side.output_damp, out_side.shrinkage(out_gram.shape[0], stats.tokens))
    if stats.inputs is not None:  # fewer tokens than outputs: σ² of Z = X·Wᵀ·R from its t × t Gram, zeros past t
        z = outputs_of(stats.inputs, weight)
        stats.let_go("inputs")
        if r is not None:
            z = z * r if r.dim() == 1 else z @ r
        spectrum = sigma_squared(z)[:min(weight.shape)].cpu()
        release_workspace()
        return torch.nn.functional.pad(spectrum, (0, min(weight.shape) - spectrum.shape[0]))
    if stats.weighted_gram is not None:
        gram = stats.weighted_gram.double()
        stats.let_go("weighted_gram")
        if r is not None:  # Rᵀ·(W·XXᵀ·Wᵀ)·R, R applied on the left twice (the Gram is symmetric), in place
            if not stats.handed_over and gram is stats.weighted_gram:
                gram = gram.clone()  # the caller's
            gram = left_whiten_(r, left_whiten_(r, gram).T.contiguous())
        spectrum = torch.linalg.eigvalsh(gram).flip(0).clamp_min_(0).cpu()
        release_workspace()
        return spectrum
    assert stats.gram is not None
    # a Gram of fewer tokens than inputs is singular: its unridged Cholesky would only fail (a 7B block with 512
    # calibration tokens spent 25 s on such tries), so it starts at the first ridge step
    s, _, _ = repaired_cholesky(stats.gram, DAMP_STEPS[0] if stats.tokens < stats.gram.shape[0] else 0.0,
                                consume=stats.owned)
    stats.let_go("gram")
    target = promoted_product(weight, s)
    if r is not None:
        target = left_whiten_(r, target)
    spectrum = sigma_squared(target).cpu()
    release_workspace()
    return spectrum
