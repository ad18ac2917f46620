"""The block loop stage: one block on the device at a time (GPTQ's shape), each fitted from the statistics its
method declares and swapped for its factors; the calibration and evaluation streams advance through it.

Dense and compressed lanes of every stream ride on the same loop: an evaluation set's perplexity before and after
costs no pass of its own.  With a run folder each finished block is committed and a rerun resumes after it.
"""
from __future__ import annotations

import logging
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from . import distributed
from .architecture import dense_weight
from .blas import release_workspace
from .cache import TensorStore
from .calibration import COMPRESSED, DENSE, ActivationStream, GramAccumulator, LayerStats, Stat
from .checkpoint import RunDir
from .config import CompressionReport
from .errors import DataError
from .importance import GradientStats
from .methods import MethodOptions, method_of
from .plan import CompressionPlan
from .refine import RefineOptions, refine_block
from .runtime import LowRankLinear, replace_module, swapped
from .source import ModelSource
from .stages import Run, Stage, Streams
from .whitening import balanced

log = logging.getLogger("svdllm")


@dataclass
class BlockLoop(Stage):
    """Fit each block's linears (all at once, or true-sequential group by group) and carry every stream through."""

    stats: frozenset[Stat]  # what the method's factoriser reads
    sequential: bool  # the method fits on the compressed stream X′
    true_sequential: bool
    refine: RefineOptions = field(default_factory=RefineOptions)
    rides_on: ClassVar[str] = ("one forward per lane and block (dense and compressed), per true-sequential group; "
                               "with refinement, a forward and backward of the block per step")

    @property
    def needs(self) -> tuple[type, ...]:
        return (CompressionPlan, GradientStats) if self.stats & Stat.from_reverse_pass() else (CompressionPlan,)

    @property
    def makes(self) -> tuple[type, ...]:
        return (Streams,)

    def run(self, run: Run) -> None:
        plan, source, report = run.get(CompressionPlan), run.source, run.report
        grads = run.products.get(GradientStats, GradientStats())
        start = run.run_dir.finished_blocks(["blocks", run.cfg.to_dict(), run.data_key]) if run.run_dir else 0
        if run.run_dir is not None:
            source.keep_finished_in(run.run_dir.path)  # written once, as the checkpoint's block files
        store = run.offload.store("stream")
        streams = _open_streams(run, self.stats & Stat.from_forwards(), store, self.refine.active)
        if start:
            _resume(source, plan, run.run_dir, streams, report)  # type: ignore[arg-type]
        commit = (lambda i: _checkpoint(run.run_dir, i, source, streams, report)) if run.run_dir else None
        bar = tqdm(total=plan.n_blocks, initial=start, desc=f"compress {run.method.name}", unit="block",
                   disable=not run.progress or not distributed.is_writer())
        for i, block in source.walk(start, finish=True, then=commit):
            self._block(run, i, block, plan, streams, grads)
            bar.update()
        bar.close()
        run.put(streams)

    def _block(self, run: Run, i: int, block: nn.Module, plan: CompressionPlan, streams: Streams,
               grads: GradientStats) -> None:
        """Block i: the evaluation streams' dense lanes through it, its linears fitted and swapped, then every
        compressed lane (and the calibration stream's dense lane) through the compressed block."""
        source, report = run.source, run.report
        linears = {name: source.model.get_submodule(name) for name in plan.block(i)}
        calib = streams.get("calib")
        with report.timings.clock("forward passes and statistics"):
            for name in run.evals:
                streams[name].propagate(block, i, DENSE)
        groups = [list(linears)]
        if calib is not None and self.true_sequential and self.sequential and linears:
            with report.timings.clock("forward passes and statistics"):
                groups = calib.input_order(block, i, linears)
        for g, names in enumerate(groups):
            _fit_group(run, block, i, {n: linears[n] for n in names}, linears, calib, plan, grads,
                       keep_output=g == len(groups) - 1, compressed=Stat.COMP in self.stats)
        if calib is not None and self.refine.active:
            with report.timings.clock("refinement"):
                report.refinement.append(refine_block(block, i, calib, run.report.calibration["nsamples"], run.batch,
                                                      self.refine, run.progress))
        with report.timings.clock("forward passes and statistics"):
            if calib is not None:
                calib.advance(block, i)
            for name in run.evals:
                streams[name].propagate(block, i, COMPRESSED)


def _fit_group(run: Run, block: nn.Module, i: int, group: dict[str, nn.Module], linears: dict[str, nn.Module],
               calib: ActivationStream | None, plan: CompressionPlan, grads: GradientStats, keep_output: bool,
               compressed: bool) -> None:
    """Record the statistics of ``group``, factorise each at its plan rank and swap the factors in."""
    model, report, device = run.source.model, run.report, run.source.device
    acc = GramAccumulator(method_of(run.method).needs_for(run.method), device, grads.row_fisher, grads.output_grams,
                          {name: dense_weight(m)[0] for name, m in group.items()}, run.calibration_tokens)
    with report.timings.clock("forward passes and statistics"):
        if calib is not None:
            calib.record(block, i, group, acc, _dense_view(model, linears), keep_output=keep_output,
                         compressed=compressed)
    if keep_output:  # the dense lane has passed the whole block: the dense modules already swapped out are let go
        for name in [n for n, m in linears.items() if model.get_submodule(n) is not m]:
            del linears[name]  # (600 MB of a 7B block while its down_proj is fitted)
    with report.timings.clock("decompositions"):
        acc.all_reduce()
        for name, (factors, record) in _decompose_block(group, acc, plan, run.method, device).items():
            report.account(record)
            if factors is not None:
                replace_module(model, name, LowRankLinear.from_factors(group[name], *factors))


def _factorise(name: str, module: nn.Module, stats: LayerStats, k: int | None, opts: MethodOptions
               ) -> tuple[tuple[Tensor, Tensor] | None, dict[str, Any]]:
    """The factors (u, v) of ``module`` at rank ``k`` (None when the plan keeps it dense) and its record."""
    weight, _ = dense_weight(module)
    record: dict[str, Any] = {"name": name, "shape": list(weight.shape), "rank": k}
    if k is None:
        return None, record
    f, info = method_of(opts).factorize(weight, stats, k, opts)
    release_workspace()
    if not (torch.isfinite(f.u).all() and torch.isfinite(f.v).all()):
        values = ", ".join(f"`{key}` {v}" for key, v in opts.to_dict().items() if isinstance(v, float))
        raise DataError(f"{name}: the {opts.name} factors are not finite ({values or 'no float options'}); "
                        "a statistic or an option is out of the range the math holds in")
    record.update(info)
    if f.remedy:
        record["remedy"] = f.remedy
        log.warning("%s: singular statistic, %s", name, f.remedy)
    return balanced(f.u, f.v), record


def _decompose_block(linears: dict[str, nn.Module], acc: GramAccumulator, plan: CompressionPlan,
                     opts: MethodOptions, device: torch.device
                     ) -> dict[str, tuple[tuple[Tensor, Tensor] | None, dict[str, Any]]]:
    """Each linear's factors and record.  With several processes each matrix is decomposed on one rank
    (balanced by m·n·min(m, n)) and broadcast, so that every rank ends with the same block."""
    rank = distributed.world()[0]
    shapes = {name: plan.shapes[name] for name in linears if name in plan.ranks}
    owner = distributed.owners({name: m * n * min(m, n) for name, (m, n) in shapes.items()})
    out = {name: _factorise(name, m, acc.take(name), plan.ranks.get(name), opts)
           for name, m in linears.items() if owner.get(name, rank) == rank}
    for name, src in owner.items() if distributed.active() else ():
        factors, record = out.get(name, (None, None))
        record = distributed.broadcast_object(record, src)
        u, v = distributed.broadcast_tensors(list(factors) if factors else None, src, device)
        out[name] = ((u, v), record)
    return {name: out[name] for name in linears}


def _dense_view(model: nn.Module, linears: dict[str, nn.Module]) -> Callable[[], AbstractContextManager]:
    """A context that puts back the dense modules of the linears already swapped for their factors."""
    return lambda: swapped(model, {n: m for n, m in linears.items() if model.get_submodule(n) is not m})


def _open_streams(run: Run, stats: frozenset[Stat], store: TensorStore, refine: bool) -> Streams:
    """Capture the first block's inputs and every block's context: calibration when the factoriser reads forward
    statistics or blocks are refined (dense, and compressed if the statistics include X′ or blocks are refined) and
    each evaluation set (dense and compressed)."""
    source, report = run.source, run.report
    jobs = {name: (w, (DENSE, COMPRESSED)) for name, w in run.evals.items()}
    if (stats or refine) and run.windows is not None:
        jobs["calib"] = (run.windows, (DENSE, COMPRESSED) if Stat.COMP in stats or refine else (DENSE,))
    with report.timings.clock("capture block inputs"), source.outside_blocks():
        # stream keys name files: an evaluation set's name may be a path, so the streams are numbered; each
        # rank's stream is its own (a checkpoint holds them side by side)
        rank = f".rank{distributed.world()[0]}" if distributed.active() else ""
        return Streams({name: ActivationStream.capture(source.model, source.blocks, w, run.batch, lanes, store,
                                                       source.device, (name if name == "calib" else f"eval{k}") + rank)
                        for k, (name, (w, lanes)) in enumerate(jobs.items())})


def _checkpoint(run_dir: RunDir, i: int, source: ModelSource, streams: dict[str, ActivationStream],
                report: CompressionReport) -> None:
    """Commit block i: its tensors, every stream after it, and what the report has gathered so far."""
    with report.timings.clock("checkpoint"):
        run_dir.commit(i, source, lambda folder: [s.save(folder) for s in streams.values()],
                       {"records": report.records, "refinement": report.refinement, "timings": report.timings,
                        "plan": report.plan,
                        "linear_params": [report.linear_params_before, report.linear_params_after],
                        "tuple_output": any(s.tuple_output for s in streams.values())})


def _resume(source: ModelSource, plan: CompressionPlan, run_dir: RunDir, streams: dict[str, ActivationStream],
            report: CompressionReport) -> None:
    """Restore the finished blocks and the streams at their boundary from ``run_dir``."""
    start = run_dir.done
    log.warning("resuming from %s after %d of %d blocks", run_dir.path, start, plan.n_blocks)
    for i in range(start):
        source.restore(i, {n: plan.ranks[n] for n in plan.block(i) if n in plan.ranks}, run_dir.block_file(i))
    for stream in streams.values():
        stream.load(run_dir.streams_folder(start))
        stream.tuple_output = bool(run_dir.state.get("tuple_output", False))
    report.records = run_dir.state["records"]
    report.refinement = run_dir.state.get("refinement", [])
    report.timings.update(run_dir.state["timings"])
    report.linear_params_before, report.linear_params_after = run_dir.state["linear_params"]
