"""Compression: a plan, activation streams, and one short block loop (GPTQ-style, one block on the device at a time).

``compress`` only moves data: the source onloads and finishes blocks, the streams carry hidden states, each
method's factoriser does the math.  What to do with the result (fine-tune, quantize, save) is the workflow's.
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
from contextlib import AbstractContextManager, contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from . import distributed
from .architecture import count_parameters, dense_weight
from .calibration import (COMPRESSED, DENSE, ActivationStream, GramAccumulator, LayerStats, StoredTensors, TensorStore,
                          windows_digest)
from .blas import release_workspace
from .checkpoint import RunDir
from .errors import DataError, OptionError
from .evaluate import all_reduce_result, stream_perplexity
from .files import atomic_write_text
from .importance import FULL_GRAM_WIDTH, GRAM_PREFIX, GradientStats, gradient_statistics, whitened_spectra
from .methods import ErrorCorrectedOptions, MethodOptions, OutputAwareOptions, method_of, options_for
from .methods.base import check_range
from .plan import CompressionPlan, make_plan
from .ranks import allocate
from .record import SvdllmRecord
from .runtime import LowRankLinear, replace_module, swapped
from .source import ModelSource
from .whitening import balanced

log = logging.getLogger("svdllm")
OFFLOAD = ("auto", "none", "cpu", "disk")
RANK_RULES = ("auto", "uniform", "fisher")


@dataclass
class CompressionConfig:
    method: MethodOptions | str = field(default_factory=ErrorCorrectedOptions)  # a name takes that method's defaults
    ratio: float = 0.2  # parameter reduction of each compressed matrix
    targets: list[str] = field(default_factory=lambda: ["*"])  # globs over module names (full, or inside the block)
    skip_layers: list[int] = field(default_factory=list)  # blocks left dense; negative indices count from the end
    rank_rule: str = "auto"  # auto, uniform (the paper), or fisher (allocated from the model's statistics)
    rank_floor: float = 0.5  # allocated ranks stay within [floor, cap] × the uniform rank
    rank_cap: float = 2.0
    batch_size: int | None = None  # windows per forward; None: the source's (4 in memory, 1 streamed)
    device: str | None = None  # where blocks run (one at a time); None: where the model is
    offload: str = "auto"  # where activations wait between blocks: none (the device), cpu, disk; auto: the source's
    true_sequential: bool = True  # sequential methods: fit q/k/v, o, gate/up, down in turn on the X′ the earlier produce

    def __post_init__(self) -> None:
        if isinstance(self.method, str):
            self.method = options_for(self.method)
        if not isinstance(self.method, MethodOptions):
            raise OptionError("method", f"must be a method name or its options, got {type(self.method).__name__}")

    def validate(self) -> None:
        if not 0.0 < self.ratio < 1.0:
            raise OptionError("ratio", f"must be in (0, 1), got {self.ratio}")
        if isinstance(self.targets, (str, bytes)) or not isinstance(self.targets, (list, tuple)) or not self.targets \
                or not all(isinstance(p, str) and p.strip() for p in self.targets):
            raise OptionError("targets", f"must be a non-empty list of non-empty glob patterns, got {self.targets!r}")
        if self.batch_size is not None and self.batch_size < 1:
            raise OptionError("batch_size", f"must be positive, got {self.batch_size}")
        if self.rank_rule not in RANK_RULES:
            raise OptionError("rank_rule", f"must be one of {', '.join(RANK_RULES)}, got {self.rank_rule!r}")
        check_range(self, "rank_floor", 0.0, 1.0)
        check_range(self, "rank_cap", 1.0, 1e6)
        if self.offload not in OFFLOAD:
            raise OptionError("offload", f"must be one of {', '.join(OFFLOAD)}, got {self.offload!r}")
        self.method.validate()  # type: ignore[union-attr]

    def resolved_rank_rule(self) -> str:
        """What ``auto`` means, decided here only: Fisher-weighted allocation for svdllm-ec (it beat uniform ranks at
        0.2, 0.4 and 0.6 on both evaluation sets; svdllm-w lost at 0.6), the paper's uniform ranks otherwise."""
        if self.rank_rule != "auto":
            return self.rank_rule
        return "fisher" if isinstance(self.method, ErrorCorrectedOptions) else "uniform"

    def to_dict(self) -> dict[str, Any]:
        return dict(asdict(self), method=self.method.to_dict())  # type: ignore[union-attr]


class Timings(dict):
    """Seconds per named phase, summed over repeats, in first-seen order."""

    @contextmanager
    def clock(self, phase: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self[phase] = self.get(phase, 0.0) + time.perf_counter() - t0


@dataclass
class CompressionReport:
    config: dict[str, Any]
    plan: dict[str, Any]
    calibration: dict[str, Any]
    params_before: int = 0
    params_after: int = 0
    linear_params_before: int = 0
    linear_params_after: int = 0
    records: list[dict[str, Any]] = field(default_factory=list)
    perplexity: dict[str, dict[str, float]] = field(default_factory=dict)  # dense, compressed, finetuned, quantized
    timings: Timings = field(default_factory=Timings)
    processes: dict[str, Any] = field(default_factory=dict)  # world size and each rank's timings (torchrun)
    zero_shot: dict[str, Any] = field(default_factory=dict)  # lm-eval rows (task, metric, value, stderr), dense and after

    @property
    def remedies(self) -> list[dict[str, Any]]:
        return [r for r in self.records if r.get("remedy")]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def account(self, record: dict[str, Any]) -> None:
        """Add one linear's record and its parameters before and after."""
        (m, n), k = record["shape"], record["rank"]
        self.linear_params_before += m * n
        self.linear_params_after += m * n if k is None else k * (m + n)
        if k is None:
            record["kept_dense"] = self.plan["kept_dense"][record["name"]]
        self.records.append(record)

    def write(self, path: str | Path) -> None:
        atomic_write_text(Path(path), json.dumps(self.to_dict(), indent=2) + "\n")


@dataclass
class CompressionResult:
    """What ``compress`` gives back: the source (its model holds the compressed blocks, or, streamed, its finished
    block files do), the report, and the record a saved folder will carry."""

    source: ModelSource
    report: CompressionReport
    record: SvdllmRecord

    @property
    def model(self) -> nn.Module:
        return self.source.model


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
    out = {name: _factorise(name, m, acc.for_linear(name), plan.ranks.get(name), opts)
           for name, m in linears.items() if owner.get(name, rank) == rank}
    for name, src in owner.items() if distributed.active() else ():
        factors, record = out.get(name, (None, None))
        record = distributed.broadcast_object(record, src)
        u, v = distributed.broadcast_tensors(list(factors) if factors else None, src, device)
        out[name] = ((u, v), record)
    return {name: out[name] for name in linears}


def _fit_block(model: nn.Module, block: nn.Module, i: int, linears: dict[str, nn.Module],
               calib: ActivationStream | None, plan: CompressionPlan, cfg: CompressionConfig,
               fisher: dict[str, Tensor], out_grams: Mapping[str, Tensor], report: CompressionReport,
               device: torch.device) -> None:
    """Record the statistics of ``linears``, factorise each at its plan rank and swap the factors in.  All at once,
    or (true-sequential) group by group in forward order (q/k/v, o, gate/up, down), each group fitted on the
    compressed stream that the groups before it already produce."""
    opts = cfg.method
    assert isinstance(opts, MethodOptions)
    method = method_of(opts)
    groups = [list(linears)]
    if calib is not None and cfg.true_sequential and method.sequential and linears:
        with report.timings.clock("forward passes and statistics"):
            groups = calib.input_order(block, i, linears)
    for g, names in enumerate(groups):
        group, acc = {n: linears[n] for n in names}, GramAccumulator(method.needs, device, fisher, out_grams)
        with report.timings.clock("forward passes and statistics"):
            if calib is not None:
                calib.record(block, i, group, acc, _dense_view(model, linears), keep_output=g == len(groups) - 1)
        with report.timings.clock("decompositions"):
            acc.all_reduce()
            for name, (factors, record) in _decompose_block(group, acc, plan, opts, device).items():
                report.account(record)
                if factors is not None:
                    replace_module(model, name, LowRankLinear.from_factors(linears[name], *factors))


def _dense_view(model: nn.Module, linears: dict[str, nn.Module]) -> Callable[[], AbstractContextManager]:
    """A context that puts back the dense modules of the linears already swapped for their factors."""
    return lambda: swapped(model, {n: m for n, m in linears.items() if model.get_submodule(n) is not m})


def fingerprint(source: ModelSource, cfg: CompressionConfig, windows: Tensor | None,
                eval_windows: dict[str, Tensor]) -> str:
    """What a checkpoint must match to be resumed: every weight of the model (the shards' bytes when streamed),
    its config, the options and the data."""
    h = hashlib.sha256()
    source.digest_update(h)
    blob = json.dumps([source.model.config.to_diff_dict(), cfg.to_dict(), windows_digest(windows),
                       {k: windows_digest(v) for k, v in sorted(eval_windows.items())}], sort_keys=True, default=str)
    h.update(blob.encode())
    return h.hexdigest()


@torch.no_grad()
def compress(model: nn.Module | ModelSource, windows: Tensor | None, config: CompressionConfig | None = None, *,
             eval_windows: dict[str, Tensor] | None = None, run_dir: RunDir | None = None,
             progress: bool = True) -> CompressionResult:
    """Compress the decoder-block linears of ``model`` (in memory, or a source that streams it) one block at a time.

    ``windows`` (nsamples × seqlen token ids) calibrate; ``eval_windows`` (name → windows) are carried through the
    dense and the compressed blocks so that the report holds both perplexities without a second pass.  With
    ``run_dir`` each finished block is checkpointed and a run resumes where the folder left off.
    """
    cfg = config or CompressionConfig()
    cfg.validate()
    source = model if isinstance(model, ModelSource) else ModelSource(model, cfg.device)
    opts = cfg.method
    assert isinstance(opts, MethodOptions)
    method, evals = method_of(opts), eval_windows or {}
    rule = cfg.resolved_rank_rule()
    if (method.needs or rule == "fisher") and windows is None:
        raise DataError(f"method {opts.name} with {rule} ranks needs calibration windows")
    plan = make_plan(source.model, cfg.ratio, cfg.targets, cfg.skip_layers)
    calib_info = {} if windows is None or not (method.needs or rule == "fisher") else {
        "nsamples": windows.shape[0], "seqlen": windows.shape[1], "sha256": windows_digest(windows)}
    report = CompressionReport(cfg.to_dict(), plan.to_dict(), calib_info, params_before=count_parameters(source.model))
    if windows is not None:
        windows = distributed.shard(windows)
    evals = {name: distributed.shard(w) for name, w in evals.items()}
    offload = source.default_offload if cfg.offload == "auto" else cfg.offload
    batch = cfg.batch_size or source.default_batch
    allocated = run_dir.state.get("plan") if run_dir is not None and run_dir.done and rule == "fisher" else None
    grads = GradientStats()
    out_side = opts if isinstance(opts, OutputAwareOptions) and opts.output_whitening else None
    two_sided = out_side is not None
    if "fisher" in method.needs or two_sided or (rule == "fisher" and allocated is None):
        with report.timings.clock("gradients"):
            grads = _gradients(source, windows, list(plan.ranks), rule == "fisher", "fisher" in method.needs,
                               run_dir, offload, two_sided,
                               out_side.output_full_width if out_side else FULL_GRAM_WIDTH)
    if rule == "fisher":
        with report.timings.clock("rank allocation"):
            if allocated is not None:  # a resumed run keeps the ranks it started with
                plan = CompressionPlan.from_dict(allocated)
            else:  # one-sided σ² weighted by the output's isotropic Fisher, or two-sided σ², already in loss units
                spectra = whitened_spectra(source, windows, plan, batch,
                                           grads.output_grams if two_sided else None, out_side,
                                           _pass_store(run_dir, offload, "spectra-stream", source.device))
                shapes = {n: (plan.shapes[n][0], plan.shapes[n][1]) for n in plan.ranks}
                scores = {n: (spectra[n] if two_sided else grads.sensitivity[n] * spectra[n]).tolist()
                          for n in plan.ranks}
                plan.ranks = allocate(shapes, cfg.ratio, scores, cfg.rank_floor, cfg.rank_cap)
        report.plan = plan.to_dict()
    if run_dir is not None:
        source.keep_finished_in(run_dir.path)  # written once, as the checkpoint's block files
    store = TensorStore(run_dir.stream_folder if offload == "disk" and run_dir else
                        torch.device("cpu") if offload != "none" else source.device)
    streams = _open_streams(source, windows if method.needs - {"fisher"} else None, method.sequential, evals,
                            batch, store, report)
    start = _resume(source, plan, run_dir, streams, report) if run_dir else 0
    calib, fisher, out_grams = streams.get("calib"), grads.row_fisher, grads.output_grams
    commit = (lambda i: _checkpoint(run_dir, i, source, streams, report)) if run_dir is not None else None
    bar = tqdm(total=plan.n_blocks, initial=start, desc=f"compress {opts.name}", unit="block",
               disable=not progress or not distributed.is_writer())
    for i, block in source.walk(start, finish=True, then=commit):
        linears = {name: source.model.get_submodule(name) for name in plan.block(i)}
        with report.timings.clock("forward passes and statistics"):
            for name in evals:
                streams[name].propagate(block, i, DENSE)
        _fit_block(source.model, block, i, linears, calib, plan, cfg, fisher, out_grams, report, source.device)
        with report.timings.clock("forward passes and statistics"):
            if calib is not None:
                calib.advance(block, i)
            for name in evals:
                streams[name].propagate(block, i, COMPRESSED)
        bar.update()
    bar.close()
    with report.timings.clock("evaluation"), source.outside_blocks():
        report.perplexity = {lane: {name: all_reduce_result(stream_perplexity(
            source.model, source.blocks, streams[name], lane, evals[name], batch, source.device)).perplexity
            for name in evals} for lane in (DENSE, COMPRESSED)} if evals else {}
    store.close()
    if distributed.active():
        report.processes = {"world_size": distributed.world()[1], "timings": distributed.gather_objects(report.timings)}
    report.params_after = count_parameters(source.model)
    record = SvdllmRecord(
        method=opts.name, options=opts.to_dict(), ratio=cfg.ratio, rank_rule=rule, calibration=calib_info or None,
        # every low-rank layer of the model, an earlier pass's too: a rank left out would reload at random
        ranks={n: m.rank for n, m in source.model.named_modules() if isinstance(m, LowRankLinear)},
        perplexity=report.perplexity.get(COMPRESSED) or None)
    return CompressionResult(source, report, record)


def _gradients(source: ModelSource, windows: Tensor, names: list[str], sensitivity: bool, row_fisher: bool,
               run_dir: RunDir | None, offload: str, output_grams: bool = False,
               full_width: int = FULL_GRAM_WIDTH) -> GradientStats:
    """The gradient statistics, from the run folder if a killed run already computed them; else from the streamed
    reverse pass (its block inputs wait on disk when activations do), then kept there.  Output-gradient Grams go
    to files in the run folder when there is one (one block's worth in memory), else stay in memory."""
    kept = run_dir.path / "gradients.safetensors" if run_dir is not None else None
    grams_where = run_dir.process_folder("output-grams") if run_dir is not None else torch.device("cpu")
    key = json.dumps([names, sensitivity, row_fisher, output_grams, full_width])  # what the kept file was made for
    if kept is not None and kept.is_file():
        from .files import load_tensors

        saved = load_tensors(kept)
        if "names" in saved and bytes(saved["names"].tolist()).decode() == key:
            values = saved["sensitivity"].tolist()
            return GradientStats(dict(zip(names, values)) if sensitivity else {},
                                 {n: saved[f"rows.{n}"] for n in names if f"rows.{n}" in saved},
                                 StoredTensors(TensorStore(grams_where), names, GRAM_PREFIX) if output_grams else {})
    store = _pass_store(run_dir, offload, "gradient-stream", torch.device("cpu"))
    try:
        grads = gradient_statistics(source, windows, names, sensitivity, row_fisher, store, output_grams, full_width,
                                    gram_store=TensorStore(grams_where) if output_grams else None)
    finally:
        store.close()
    if kept is not None and distributed.is_writer():  # the Grams are already in their folder (or in memory only)
        from .files import atomic_save_file

        atomic_save_file({"names": torch.tensor(list(key.encode()), dtype=torch.uint8),
                          "sensitivity": torch.tensor([grads.sensitivity.get(n, 0.0) for n in names],
                                                      dtype=torch.float64),
                          **{f"rows.{n}": r.contiguous() for n, r in grads.row_fisher.items()}}, kept)
    return grads


def _pass_store(run_dir: RunDir | None, offload: str, name: str, device: torch.device) -> TensorStore:
    """Where a pass before the block loop keeps its activations: a folder of the run (one per process) when
    activations go to disk."""
    return TensorStore(run_dir.process_folder(name) if offload == "disk" and run_dir is not None else device)


def _open_streams(source: ModelSource, windows: Tensor | None, sequential: bool, evals: dict[str, Tensor],
                  batch_size: int, store: TensorStore, report: CompressionReport) -> dict[str, ActivationStream]:
    """Capture the first block's inputs and every block's context: calibration (dense, and compressed if the method
    is sequential) and each evaluation set (dense and compressed)."""
    jobs = {name: (w, (DENSE, COMPRESSED)) for name, w in evals.items()}
    if windows is not None:
        jobs["calib"] = (windows, (DENSE, COMPRESSED) if sequential else (DENSE,))
    with report.timings.clock("capture block inputs"), source.outside_blocks():
        # stream keys name files: an evaluation set's name may be a path, so the streams are numbered; each
        # rank's stream is its own (a checkpoint holds them side by side)
        rank = f".rank{distributed.world()[0]}" if distributed.active() else ""
        return {name: ActivationStream.capture(source.model, source.blocks, w, batch_size, lanes, store, source.device,
                                               (name if name == "calib" else f"eval{k}") + rank)
                for k, (name, (w, lanes)) in enumerate(jobs.items())}


def _checkpoint(run_dir: RunDir, i: int, source: ModelSource, streams: dict[str, ActivationStream],
                report: CompressionReport) -> None:
    """Commit block i: its tensors, every stream after it, and what the report has gathered so far."""
    with report.timings.clock("checkpoint"):
        run_dir.commit(i, source, lambda folder: [s.save(folder) for s in streams.values()],
                       {"records": report.records, "timings": report.timings, "plan": report.plan,
                        "linear_params": [report.linear_params_before, report.linear_params_after],
                        "tuple_output": any(s.tuple_output for s in streams.values())})


def _resume(source: ModelSource, plan: CompressionPlan, run_dir: RunDir, streams: dict[str, ActivationStream],
            report: CompressionReport) -> int:
    """Restore the finished blocks and the streams at their boundary from ``run_dir``; the next block's index."""
    start = run_dir.done
    if start == 0:
        return 0
    log.warning("resuming from %s after %d of %d blocks", run_dir.path, start, plan.n_blocks)
    for i in range(start):
        source.restore(i, {n: plan.ranks[n] for n in plan.block(i) if n in plan.ranks}, run_dir.block_file(i))
    for stream in streams.values():
        stream.load(run_dir.streams_folder(start))
        stream.tuple_output = bool(run_dir.state.get("tuple_output", False))
    report.records = run_dir.state["records"]
    report.timings.update(run_dir.state["timings"])
    report.linear_params_before, report.linear_params_after = run_dir.state["linear_params"]
    return start
