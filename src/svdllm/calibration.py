"""Calibration: token windows, the activation stream between blocks, and the statistics of linear inputs.

``ActivationStream`` is the one owner of the hidden states that flow between
decoder blocks (the dense stream X, the compressed stream X′, evaluation
windows) and of where they are kept: on the compute device, in CPU memory, or
in safetensors files on disk.  ``GramAccumulator`` owns one block's statistics.  (Gradient statistics: ``importance``.)
"""
from __future__ import annotations

import enum
import math
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from collections.abc import Mapping
from typing import Any, Callable, Iterable

import torch
from torch import Tensor, nn

from . import distributed
from .architecture import dense_weight
from .cache import DiskStore, TensorStore
from .data import eval_windows, sample_windows, windows_digest  # noqa: F401  (their home is data; here for callers)
from .whitening import add_gram_

DENSE, COMPRESSED = "dense", "compressed"
NEXT = "next"  # where ``record`` keeps the dense block's outputs until ``advance`` makes them the dense lane
GRAM_SLAB = 2048  # rows of a product summed at a time
# what a float64 product costs in float32 products of the same size on this CPU (37–65 against ~160 GFLOP/s,
# docs/cost.md): ``sums_from_outputs`` weighs XᵀX′'s float32 sums against the float64 products of both routes
F64_COST = 4.0
SYMMETRIC_SLAB = 512  # rows of a Gram summed at a time (a smaller slab leaves less of it to mirror)


# ---------------------------------------------------------------- statistics


class Stat(enum.Enum):
    """A statistic a factoriser reads (what a method declares it needs)."""

    GRAM = "gram"  # XᵀX of the dense stream
    ABS = "abs"  # Σ|x| per input dimension
    COMP = "comp"  # X′ᵀX′ of the compressed stream (the method runs blocks in order: sequential)
    CROSS = "cross"  # XᵀX′
    ROW_FISHER = "row_fisher"  # Σ (∂L/∂W)² per output row, from the reverse pass
    OUT_GRAM = "out_gram"  # Σ g gᵀ of the loss's gradient at the output, from the reverse pass

    @classmethod
    def from_reverse_pass(cls) -> frozenset["Stat"]:
        return frozenset({cls.ROW_FISHER, cls.OUT_GRAM})

    @classmethod
    def from_forwards(cls) -> frozenset["Stat"]:
        return frozenset({cls.GRAM, cls.ABS, cls.COMP, cls.CROSS})


@dataclass
class LayerStats:
    """Calibration statistics of one linear's input (row-major X: tokens × n).

    gram = XᵀX of the dense stream, comp_gram = X′ᵀX′ of the compressed stream,
    cross = XᵀX′; abs_sum = Σ|x| per input dim; fisher = per output-row Fisher
    information of the weight (from ``importance.gradient_statistics``).  inputs = X and comp_inputs = X′
    (tokens × n, float32) where the error-corrected fit's products W·XᵀX′ and W·X′ᵀX′ cost less from the outputs
    (``sums_from_outputs``): few tokens against the width; cross is then not made.  weighted_cross = W·XᵀX′ summed
    as Σ y·x′ᵀ from the outputs y = W·x the dense forward made anyway, where that costs less than XᵀX′ (fewer
    outputs than inputs, as a down_proj: ``cross_from_outputs``).  Likewise weighted_gram =
    W·XᵀX·Wᵀ for the spectra (``spectra_from_outputs``), gram then not made; or, fewer tokens than outputs, X itself
    for the spectra (``spectra_from_inputs``).
    """

    tokens: int = 0
    gram: Tensor | None = None
    comp_gram: Tensor | None = None
    cross: Tensor | None = None
    abs_sum: Tensor | None = None
    fisher: Tensor | None = None
    out_gram: Tensor | None = None  # Σ g gᵀ of the loss's gradient at the output (or its diagonal), output whitening
    inputs: Tensor | None = None
    comp_inputs: Tensor | None = None
    weighted_gram: Tensor | None = None  # W·XᵀX·Wᵀ (m × m), where the spectra read it instead of gram
    weighted_cross: Tensor | None = None  # W·XᵀX′ (m × n) summed from the dense outputs, where it replaces cross
    handed_over: bool = False  # given by ``GramAccumulator.take``: the factoriser may drop what it has used
    sole_reader: bool = False  # and no other linear reads these tensors (an input of its own)

    @property
    def owned(self) -> bool:
        """The factoriser may overwrite the tensors once it has read them (a Gram factorised in its own storage)."""
        return self.handed_over and self.sole_reader

    def let_go(self, *names: str) -> None:
        """Drop the named statistics once read, when this record was handed over (``GramAccumulator.take``): the last
        reader's drop frees them (970 MB per Gram for a 7B down_proj, 6.6 GB for a 70B one)."""
        if self.handed_over:
            for name in names:
                setattr(self, name, None)


class InputRecorder:
    """Pre-hooks on ``linears`` that keep each one's last input (as given, not copied) in ``seen`` while the
    recorder is entered.  Those named in ``outputs_of`` also keep their outputs x·Wᵀ (in ``outputs``, while
    ``keep_outputs`` is set) where the forward made them in float32 or float64 and without a bias (subtracting it
    would leave its rounding, a tail W's rank does not have): a statistic summed from them costs no product.  With
    ``stop_when_complete`` set, a forward raises ``_Stop`` as soon as every linear has its input (and, while
    outputs are kept, those named their outputs), so the rest of the block is not run."""

    def __init__(self, linears: dict[str, nn.Module], outputs_of: Iterable[str] = ()) -> None:
        self.linears, self.seen, self.stop_when_complete = linears, {}, False
        self.outputs_of, self.outputs, self.keep_outputs = set(outputs_of), {}, True
        self._made: set[str] = set()  # outputs_of whose outputs this forward made (kept or not)
        self._handles: list[Any] = []

    def _hook(self, name: str, args: tuple) -> None:
        self.seen[name] = args[0]
        self._stop_if_complete()

    def _output_hook(self, name: str, module: nn.Module, out: Tensor) -> None:
        self._made.add(name)
        exact = out.dtype in (torch.float32, torch.float64) and dense_weight(module)[1] is None
        if self.keep_outputs and name in self.outputs_of and exact:
            self.outputs[name] = out.detach()
        self._stop_if_complete()

    def _stop_if_complete(self) -> None:
        if self.stop_when_complete and len(self.seen) == len(self.linears) \
                and (not self.keep_outputs or self._made >= self.outputs_of):
            raise _Stop

    def take(self) -> dict[str, Tensor]:
        """The inputs seen so far; the recorder starts afresh."""
        taken, self.seen, self._made = self.seen, {}, set()
        return taken

    def take_outputs(self) -> dict[str, Tensor]:
        """The outputs kept so far; the recorder starts afresh."""
        taken, self.outputs = self.outputs, {}
        return taken

    def __enter__(self) -> "InputRecorder":
        self._handles = [m.register_forward_pre_hook(lambda _m, args, name=name: self._hook(name, args))
                         for name, m in self.linears.items()]
        self._handles += [m.register_forward_hook(lambda m, _a, out, name=name: self._output_hook(name, m, out))
                          for name, m in self.linears.items() if name in self.outputs_of]
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()


def shared_input_groups(inputs: dict[str, Tensor]) -> list[list[str]]:
    """Linears that read the very same tensor (q/k/v, gate/up) share one Gram."""
    groups: dict[tuple, list[str]] = {}
    for name, x in inputs.items():
        groups.setdefault((x.data_ptr(), tuple(x.shape)), []).append(name)
    return list(groups.values())


def joined(batches: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    """Several batches of recorded inputs as one, tokens stacked in order; linears that shared an input share the
    joined one (``shared_input_groups`` still finds them)."""
    if len(batches) == 1:
        return batches[0]
    out: dict[str, Tensor] = {}
    for group in shared_input_groups(batches[0]):
        x = torch.cat([b[group[0]].reshape(-1, b[group[0]].shape[-1]) for b in batches])
        out.update(dict.fromkeys(group, x))
    return out


def symmetric_slab(n: int) -> int:
    """Rows of an n-wide Gram made at a time: n/4 up to a multiple of 64, at most SYMMETRIC_SLAB (at 2048 tokens,
    the fastest here by a few percent: 384 rows of a 1536-wide Gram took 43 ms against 46 at 512; docs/cost.md)."""
    return min(SYMMETRIC_SLAB, 64 * math.ceil(n / 256))


def add_product_(total: Tensor | None, a: Tensor, b: Tensor, device: torch.device | None = None) -> Tensor:
    """``total`` + aᵀb (rows of a and b are tokens): float32 products summed into a float64 total (made on ``device``
    if None) a slab of output rows at a time, so that the float32 temporary is a slab, not an n×n matrix (485 MB for
    a 7B down_proj, 3.3 GB for a 70B one) and rounding does not grow with the number of tokens.  A Gram (``b is a``)
    computes each slab's rows up to its diagonal block and mirrors them: about a third fewer flops (docs/cost.md)."""
    symmetric = b is a
    a = a.float()
    b = a if symmetric else b.float()
    n = a.shape[1]
    if total is None:
        total = torch.zeros(n, b.shape[1], dtype=torch.float64, device=device or a.device)
    if not symmetric:
        for r in range(0, n, GRAM_SLAB):
            total[r:r + GRAM_SLAB].add_((a[:, r:r + GRAM_SLAB].T @ b).to(total.device))
        return total
    return add_gram_(total, a, symmetric_slab(n))


def sums_from_outputs(tokens: int, width: int, outs: int, statistic_needed: bool) -> bool:
    """Whether W·A, for the ``outs`` × ``width`` weights of a group reading one input and A = Σ x x′ᵀ over
    ``tokens``, costs less summed from the outputs, Σ (Wx) x′ᵀ (two float64 products of t·outs·width), than as the
    float64 product W·A (outs·width²) after A is summed in float32 products (t·width², F64_COST times cheaper a
    flop; nothing when A is made anyway, as X′ᵀX′ is for its Cholesky factor).  Float64 keeps the products at
    least as exact as W·A.  Few tokens per input favour the outputs: a 7B down_proj with 512 tokens (92 GFLOP
    against 1 TFLOP a product); SmolLM2's 16384 tokens keep the Grams."""
    by_outputs = 2 * tokens * outs
    by_statistic = outs * width + (0 if statistic_needed else tokens * width / F64_COST)
    return 0 < by_outputs < by_statistic


def add_outputs_gram_(total: Tensor | None, inputs: Tensor, weight: Tensor, device: torch.device,
                      outputs: Tensor | None = None) -> Tensor:
    """``total`` + yᵀy for the outputs y = x·Wᵀ (rows of ``inputs`` are tokens; ``outputs``, if the forward made
    them): W·XᵀX·Wᵀ summed from the outputs.  y in float32, yᵀy in float64 (up to its diagonal and mirrored):
    float32 products would give it a tail of rounding that W's rank does not have (the allocation then spent ranks
    on it; a test with weights of exactly the kept rank saw it)."""
    y = (inputs.float() @ weight.to(inputs.device, torch.float32).T if outputs is None
         else outputs.reshape(-1, outputs.shape[-1])).double()
    m = y.shape[1]
    gram = add_gram_(torch.zeros(m, m, dtype=torch.float64, device=y.device), y, symmetric_slab(m))
    return gram.to(device) if total is None else total.add_(gram.to(device))


def cross_from_outputs(width: int, outs: list[int]) -> bool:
    """Whether W·XᵀX′ for a group of linears reading one input of ``width`` costs less summed as Σ y·x′ᵀ from the
    outputs y = W·x the dense forward made anyway (t·Σm·width) than from XᵀX′ (t·width²): when the group has fewer
    outputs than inputs, as a down_proj (SmolLM2's: 576 against 1536)."""
    return bool(outs) and sum(outs) < width


def spectra_from_outputs(tokens: int, width: int, outs: list[int]) -> bool:
    """Whether the spectra of a group of linears reading one input of ``width`` cost less from each one's Gram of
    outputs, W·XᵀX·Wᵀ (outs × outs, from y = x·Wᵀ: t·m·width in float32, then yᵀy, t·m², in float64), than from
    the shared XᵀX (t·width²·⅔ in float32) with, per linear, its Cholesky factor S, W·S and W·S's smaller Gram
    (float64, at F64_COST times a float32 flop).  Both end in an eigendecomposition of the smaller side, so only a
    group whose every linear has no more outputs than inputs may take the outputs.  With SmolLM2's 16384 tokens only
    down_proj does (by 5%); with a 7B block and 512 tokens q/k/v, o and down_proj do (a 7B down_proj up to ~140k)."""
    if tokens <= 0 or not outs or any(m > width for m in outs):
        return False
    by_outputs = sum(tokens * m * width + F64_COST * tokens * m * m for m in outs)
    by_gram = tokens * width * width * 2 / 3 + F64_COST * sum(width**3 / 3 + m * width**2 + m * m * width
                                                                 for m in outs)
    return by_outputs < by_gram


def spectra_from_inputs(tokens: int, outs: list[int]) -> bool:
    """Whether the spectra of a group reading one input are made from its calibration inputs X themselves: when
    there are fewer tokens than any of its linears has outputs.  σ² of Rᵀ·W·S (S Sᵀ = XᵀX) are then the
    eigenvalues of the t × t Gram of Z = X·Wᵀ·R (t·m·n + t·m² + t²·m), where both Gram routes end in an m × m or
    n × n eigendecomposition (a 7B block at the scale benchmark's 512 tokens: 45–70 s of its spectra)."""
    return tokens > 0 and bool(outs) and all(tokens < m for m in outs)


@dataclass(frozen=True)
class Route:
    """Which statistics of a group of linears sharing an input are summed from the linears' outputs."""

    spectra_inputs: bool = False  # X kept for the spectra, no Gram at all (``spectra_from_inputs``)
    spectra: bool = False  # each linear's W·XᵀX·Wᵀ for its spectrum, no XᵀX (``spectra_from_outputs``)
    inputs: bool = False  # X and X′ kept for the error-corrected fit, no XᵀX′ (``sums_from_outputs``)
    cross: bool = False  # W·XᵀX′ summed from the dense forward's outputs, no XᵀX′ (``cross_from_outputs``)


class GramAccumulator:
    """Sums the statistics a method needs for each group of linears sharing an input (one block's worth).

    Per-batch products run in float32 (fast BLAS) and are summed in float64, so
    rounding does not grow with the number of calibration tokens.  Given the group's dense ``weights`` and the
    calibration's ``tokens`` (every process's), a group whose fit reads W·XᵀX′ and W·X′ᵀX′ more cheaply from its
    outputs (``sums_from_outputs``: few tokens against the width) keeps X and X′ themselves instead of XᵀX′ (6.6 GB
    for a 70B down_proj): each linear's fit makes its own product from them when its turn comes, so no linear's
    (m, n) product waits beside another's.  ``for_spectra``: XᵀX is read only by the spectra, so a group whose
    spectra cost less from each linear's W·XᵀX·Wᵀ (``spectra_from_outputs``) gets those (``weighted_gram``) instead.
    """

    def __init__(self, needs: frozenset[Stat], device: torch.device, fisher: dict[str, Tensor] | None = None,
                 out_grams: Mapping[str, Tensor] | None = None, weights: Mapping[str, Tensor] | None = None,
                 tokens: int = 0, for_spectra: bool = False) -> None:
        self.needs, self.device, self.fisher = needs, device, fisher or {}  # fisher rows: from the gradient pass
        self.out_grams = out_grams or {}  # output-gradient Grams: from the gradient pass
        self.weights, self.tokens, self.for_spectra = weights or {}, tokens, for_spectra
        self.groups: list[list[str]] = []
        self.stats: dict[str, LayerStats] = {}
        self.weighted: dict[str, dict[str, Tensor]] = {}  # per linear: its weighted_gram total
        self.kept: dict[str, dict[str, list[Tensor]]] = {}  # per group: its batches of inputs and comp_inputs
        self._routes: dict[str, Route] = {}  # per group (keyed by its first linear)
        self._taken: set[str] = set()

    def route(self, group: list[str], width: int, made: bool = False) -> Route:
        """Which of the group's statistics are summed from its linears' outputs, decided once per group from the
        whole calibration's token count (the same on every process) and whether the dense forward ``made`` them
        (the same for every batch)."""
        if group[0] not in self._routes:
            known = all(name in self.weights for name in group)
            outs = [self.weights[name].shape[0] for name in group] if known else []
            for_spectra = known and self.for_spectra and Stat.GRAM in self.needs
            from_inputs = for_spectra and spectra_from_inputs(self.tokens, outs)
            inputs = known and Stat.CROSS in self.needs \
                and sums_from_outputs(self.tokens, width, sum(outs), statistic_needed=True)
            self._routes[group[0]] = Route(
                spectra_inputs=from_inputs,
                spectra=for_spectra and not from_inputs and spectra_from_outputs(self.tokens, width, outs),
                inputs=inputs,
                cross=known and made and not inputs and Stat.CROSS in self.needs and cross_from_outputs(width, outs))
        return self._routes[group[0]]

    def outputs_read(self) -> set[str]:
        """The linears whose dense outputs the routes chosen so far read."""
        return {name for group in self.groups for name in group
                if (route := self._routes.get(group[0])) is not None and (route.spectra or route.cross)}

    def outputs_for(self, linears: list[str], whole_block: bool = False) -> list[str]:
        """The linears whose dense outputs W·x a forward should keep, for W·XᵀX′ summed from them
        (``cross_from_outputs``): of ``linears`` (one group sharing an input), the group if it qualifies; with
        ``whole_block`` (several groups, their outputs made anyway), each linear with fewer outputs than inputs."""
        if Stat.CROSS not in self.needs or any(name not in self.weights for name in linears):
            return []
        if whole_block:
            return [name for name, (m, n) in ((name, self.weights[name].shape) for name in linears)
                    if cross_from_outputs(n, [m])]
        width, outs = self.weights[linears[0]].shape[1], [self.weights[name].shape[0] for name in linears]
        narrow = cross_from_outputs(width, outs) and not sums_from_outputs(self.tokens, width, sum(outs), True)
        return list(linears) if narrow else []

    def _add(self, st: LayerStats, attr: str, value: Tensor) -> None:
        """Sum a float32 batch statistic into its float64 total, promoting element by element (no float64 copy)."""
        cur = getattr(st, attr)
        value = value.to(self.device)
        setattr(st, attr, value.double() if cur is None else cur.add_(value))

    @torch.no_grad()
    def add_batch(self, dense: dict[str, Tensor], comp: dict[str, Tensor] | None,
                  outputs: Mapping[str, Tensor] | None = None) -> None:
        """One batch's inputs of the dense (and compressed) stream, and the dense ``outputs`` x·Wᵀ the forward made
        (``InputRecorder.outputs_of``), where some statistic may be summed from them instead."""
        outputs = outputs or {}
        if not self.groups:
            self.groups = shared_input_groups(dense)
        for group in self.groups:
            st = self.stats.setdefault(group[0], LayerStats())
            x = dense[group[0]].detach().reshape(-1, dense[group[0]].shape[-1]).float()
            st.tokens += x.shape[0]
            route = self.route(group, x.shape[-1], made=all(name in outputs for name in group))
            if route.spectra_inputs:  # a copy: the stream may reuse its buffers
                self.kept.setdefault(group[0], {"inputs": []})["inputs"].append(x.to(self.device, copy=True))
            elif route.spectra:
                for name in group:
                    sums = self.weighted.setdefault(name, {})
                    sums["weighted_gram"] = add_outputs_gram_(sums.get("weighted_gram"), x, self.weights[name],
                                                              self.device, outputs.get(name))
            elif Stat.GRAM in self.needs:
                self._add_product(st, "gram", x, x)
            if Stat.ABS in self.needs:
                self._add(st, "abs_sum", x.abs().sum(0))
            if comp is not None:
                xc = comp[group[0]].reshape(-1, x.shape[-1]).float()
                self._add_product(st, "comp_gram", xc, xc)
                if route.inputs:  # copies: the stream may reuse its buffers
                    kept = self.kept.setdefault(group[0], {"inputs": [], "comp_inputs": []})
                    kept["inputs"].append(x.to(self.device, copy=True))
                    kept["comp_inputs"].append(xc.to(self.device, copy=True))
                elif route.cross:  # W·XᵀX′ = Σ y·x′ᵀ, float32 products summed in float64
                    for name in group:
                        y = outputs[name].reshape(-1, outputs[name].shape[-1])
                        self._add_product(self.weighted.setdefault(name, {}), "weighted_cross", y, xc)
                elif Stat.CROSS in self.needs:
                    self._add_product(st, "cross", x, xc)

    def _add_product(self, sums: LayerStats | dict[str, Tensor], key: str, a: Tensor, b: Tensor) -> None:
        """The statistic ``key`` of ``sums`` (a record's field, or a linear's ``weighted`` entry) += aᵀb."""
        if isinstance(sums, dict):
            sums[key] = add_product_(sums.get(key), a, b, self.device)
        else:
            setattr(sums, key, add_product_(getattr(sums, key), a, b, self.device))

    def all_reduce(self) -> None:
        """Sum the statistics over the ranks of a process group (each saw its share of the windows)."""
        if not distributed.active():
            return
        for st in self.stats.values():  # the same groups in the same order on every rank
            tokens = torch.tensor([st.tokens], dtype=torch.float64, device=self.device)
            distributed.all_reduce_([tokens, *(t for t in (st.gram, st.comp_gram, st.cross, st.abs_sum)
                                               if t is not None)])
            st.tokens = int(tokens.item())
        for group in self.groups:  # the same linears in the same order on every rank
            distributed.all_reduce_([t for name in group for _, t in sorted(self.weighted.get(name, {}).items())])
            for batches in self.kept.get(group[0], {}).values():  # every rank's tokens, in rank order
                batches[:] = [distributed.all_gather_rows(torch.cat(batches))]

    def for_linear(self, name: str) -> LayerStats:
        """The statistics of ``name``: a record of its own whose tensors are its group's (shared, never copied)."""
        if name in self.fisher:
            return LayerStats(fisher=self.fisher[name])
        for group in self.groups:
            if name in group:
                kept = self.kept.get(group[0], {})
                for batches in kept.values():  # joined once for the group
                    if len(batches) > 1:
                        batches[:] = [torch.cat(batches)]
                return replace(self.stats[group[0]], out_gram=self.out_grams.get(name),
                               **self.weighted.get(name, {}), **{k: b[0] for k, b in kept.items()})
        return LayerStats(out_gram=self.out_grams.get(name))

    def take(self, name: str) -> LayerStats:
        """``for_linear``, handing the statistics over: once every linear of a group has taken its record the
        accumulator lets go of the group's tensors, so a factoriser that drops a tensor from its record frees it
        (a 7B down_proj's Grams are 970 MB each)."""
        stats = replace(self.for_linear(name), handed_over=True,
                        sole_reader=any(group == [name] for group in self.groups))
        self.weighted.pop(name, None)
        self._taken.add(name)
        for group in self.groups:
            if name in group and self._taken.issuperset(group):
                self.stats.pop(group[0], None)
                self.kept.pop(group[0], None)
        return stats


# ---------------------------------------------------------------- the activation stream


class _Stop(Exception):
    pass


@dataclass
class BlockContext:
    """What the model passes to a decoder block besides the hidden states (masks, positions, rotary tables)."""

    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)


def _to(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, Tensor):
        return obj.to(device)
    if isinstance(obj, (tuple, list)):
        return type(obj)(_to(o, device) for o in obj)
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    return obj


def _shared(contexts: list[BlockContext]) -> list[BlockContext]:
    """The same context object for blocks passed the very same tensors (one per kind of layer, in practice)."""
    out: list[BlockContext] = []
    for ctx in contexts:
        twin = next((o for o in out if _same(o, ctx)), None)
        out.append(twin or ctx)
    return out


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, BlockContext):
        return isinstance(b, BlockContext) and _same(a.args, b.args) and _same(a.kwargs, b.kwargs)
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        return a is b
    if isinstance(a, (tuple, list)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return a == b


def block_device(block: nn.Module) -> torch.device:
    return next(block.parameters()).device


class ActivationStream:
    """Hidden states of a set of windows at one block boundary, in named lanes.

    Every lane starts as the first block's input.  The dense lane runs through
    dense blocks (X), the compressed lane through compressed blocks (X′).  Each
    block has its own context (mask, rotary table: Gemma's sliding and full
    layers differ), the same for every lane; ``i`` names the block a call runs.
    """

    def __init__(self, contexts: list[list[BlockContext]], lanes: tuple[str, ...], store: TensorStore,
                 name: str = "calib") -> None:
        self.contexts, self.lanes, self.store, self.name = contexts, lanes, store, name
        self.tuple_output = False  # whether the blocks return (hidden, ...) rather than hidden

    def _key(self, lane: str, j: int) -> str:
        return f"{self.name}.{lane}.{j}"

    def __len__(self) -> int:
        return len(self.contexts)

    def hidden(self, lane: str, j: int, device: torch.device) -> Tensor:
        return self.store.get(self._key(lane, j), device)

    def put(self, lane: str, j: int, value: Tensor) -> None:
        self.store.put(self._key(lane, j), value)

    @classmethod
    @torch.no_grad()
    def capture(cls, model: nn.Module, blocks: nn.ModuleList, windows: Tensor, batch_size: int,
                lanes: tuple[str, ...], store: TensorStore, device: torch.device, name: str = "calib"
                ) -> "ActivationStream":
        """Run the model over each batch of windows with every block stood in for by a recorder: keep what the first
        block receives and what each block is passed besides (its own mask and rotary table).  The blocks' weights
        are never touched (they may be on the meta device); the run stops at the last block."""
        contexts: list[list[BlockContext]] = []
        keep = torch.device("cpu") if isinstance(store, DiskStore) else store.device  # type: ignore[attr-defined]
        seen: list[BlockContext] = []
        hidden: list[Tensor] = []

        def stand_in(i: int) -> Any:
            def forward(*args: Any, **kwargs: Any) -> Any:
                kwargs = {k: v for k, v in kwargs.items() if k not in ("past_key_value", "past_key_values", "cache")}
                h, rest = (args[0], args[1:]) if args else (kwargs.pop("hidden_states"), ())
                if i == 0:
                    hidden.append(h.detach())
                seen.append(BlockContext(_to(rest, keep), _to(kwargs, keep)))
                if i == len(blocks) - 1:
                    raise _Stop
                return h
            return forward

        for i, block in enumerate(blocks):
            block.forward = stand_in(i)
        stream = cls(contexts, lanes, store, name)
        try:
            for j, batch in enumerate(windows.split(batch_size)):
                try:
                    model(input_ids=batch.to(device), use_cache=False)
                except _Stop:
                    pass
                contexts.append(_shared(seen))
                seen.clear()
                for lane in lanes:
                    store.put(stream._key(lane, j), hidden[j])
                hidden[j] = torch.empty(0)  # the store holds it now
        finally:
            for block in blocks:
                del block.forward
        return stream

    def run_block(self, block: nn.Module, i: int, j: int, h: Tensor) -> Tensor:
        """Block i's output for batch j given its input ``h`` (with autograd, if it is on)."""
        device = block_device(block)
        ctx = self.contexts[j][i]
        out = block(h, *_to(ctx.args, device), **_to(ctx.kwargs, device))
        self.tuple_output = isinstance(out, (tuple, list))
        return out[0] if self.tuple_output else out

    @torch.no_grad()
    def _run(self, block: nn.Module, i: int, j: int, h: Tensor) -> Tensor | None:
        """Block i's output for batch j, or None when a recording hook stopped the block early."""
        try:
            return self.run_block(block, i, j, h)
        except _Stop:
            return None

    def propagate(self, block: nn.Module, i: int, lane: str) -> None:
        """Replace ``lane`` by its image through block ``i``."""
        device = block_device(block)
        for j in range(len(self)):
            self.store.put(self._key(lane, j), self._run(block, i, j, self.hidden(lane, j, device)))

    def input_order(self, block: nn.Module, i: int, linears: dict[str, nn.Module]) -> list[list[str]]:
        """The linears of ``block`` in groups sharing an input, in the order the forward reaches them
        (q/k/v, o, gate/up, down), from the dense lane's first batch."""
        with InputRecorder(linears) as recorder:
            recorder.stop_when_complete = True  # the rest of the block tells nothing
            self._run(block, i, 0, self.hidden(DENSE, 0, block_device(block)))
            return shared_input_groups(recorder.seen)

    @torch.no_grad()
    def record(self, block: nn.Module, i: int, linears: dict[str, nn.Module], acc: GramAccumulator,
               dense_view: Callable[[], AbstractContextManager] = nullcontext, keep_output: bool = True,
               compressed: bool = True) -> None:
        """Statistics of the inputs of ``linears``: the dense lane through the dense block (``dense_view`` puts
        back the dense modules of linears already compressed) and, if kept and ``compressed``, the compressed lane
        through the block as it is now.  With ``keep_output`` the dense lane's outputs are kept for ``advance``; the
        other forwards stop as soon as every linear has seen its input."""
        device = block_device(block)
        # the dense lane keeps the outputs W·x that W·XᵀX′ may be summed from (running on to make them)
        with InputRecorder(linears, acc.outputs_for(list(linears), whole_block=keep_output)) as recorder:
            for j in range(len(self)):
                recorder.stop_when_complete, recorder.keep_outputs = not keep_output, True
                with dense_view():
                    out = self._run(block, i, j, self.hidden(DENSE, j, device))
                dense_in, dense_out, comp_in = recorder.take(), recorder.take_outputs(), None
                if compressed and COMPRESSED in self.lanes and linears:
                    recorder.stop_when_complete, recorder.keep_outputs = True, False
                    self._run(block, i, j, self.hidden(COMPRESSED, j, device))
                    comp_in = recorder.take()
                if linears:
                    acc.add_batch(dense_in, comp_in, dense_out)
                if keep_output:
                    assert out is not None
                    self.store.put(self._key(NEXT, j), out)

    def advance(self, block: nn.Module, i: int) -> None:
        """After ``record`` and the swap: the compressed lane through the compressed block, the dense lane to
        the outputs ``record`` kept."""
        if COMPRESSED in self.lanes:
            self.propagate(block, i, COMPRESSED)
        for j in range(len(self)):
            self.store.move(self._key(NEXT, j), self._key(DENSE, j))

    def save(self, folder: Path) -> None:
        """Every lane's hidden states into ``folder``, a file per batch (never the whole stream in memory)."""
        for lane in self.lanes:
            for j in range(len(self)):
                self.store.export(self._key(lane, j), folder / f"{self._key(lane, j)}.safetensors")

    def load(self, folder: Path) -> None:
        for lane in self.lanes:
            for j in range(len(self)):
                self.store.restore(self._key(lane, j), folder / f"{self._key(lane, j)}.safetensors")
