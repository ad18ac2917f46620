"""Compression: a plan, activation streams, and a short block loop (GPTQ-style, one block on the device at a time)."""
from __future__ import annotations

import hashlib
import json
import logging
import time
from contextlib import AbstractContextManager, contextmanager
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterator

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from . import __version__, distributed
from .architecture import count_parameters, decoder_blocks, dense_weight
from .calibration import (
    COMPRESSED,
    DENSE,
    ActivationStream,
    GramAccumulator,
    LayerStats,
    TensorStore,
    block_device,
    fisher_rows,
    windows_digest,
)
from .checkpoint import RunDir, atomic_write_text
from .evaluate import all_reduce_result, stream_perplexity
from .importance import held_out_losses, interpolate, output_sensitivity, whitened_spectra
from .methods import ErrorCorrectedOptions, MethodOptions, method_of, options_for
from .modeling_svdllm import LowRankLinear, apply_ranks, replace_module, swapped
from .onload import BlockHost, return_freed_memory
from .plan import CompressionPlan, make_plan
from .ranks import allocate, per_type

if TYPE_CHECKING:
    from pathlib import Path

    from .io import ShardSource

log = logging.getLogger("svdllm")
OFFLOAD = ("none", "cpu", "disk")
ALLOCATIONS = ("loss", "v2", "fisher", "search")  # rank rules decided from the model's own statistics
GRADIENT_RULES = ("fisher", "search")  # these need the whole model in memory
SEARCH_STEPS = (0.0, 0.25, 0.5, 0.75, 1.0)  # --ranks search: uniform (0) to fisher (1)


@dataclass
class CompressionConfig:
    method: MethodOptions | str = field(default_factory=ErrorCorrectedOptions)  # a name takes that method's defaults
    ratio: float = 0.2  # parameter reduction of each compressed matrix
    targets: list[str] = field(default_factory=lambda: ["*"])  # globs over module names
    skip_layers: list[int] = field(default_factory=list)  # blocks left dense
    rank_rule: str = "uniform"  # uniform, or one of ALLOCATIONS (from the model's statistics)
    rank_floor: float = 0.5  # allocated ranks stay within [floor, cap] × the uniform rank
    rank_cap: float = 2.0
    batch_size: int = 4  # windows per forward
    device: str | None = None  # where blocks run (one at a time); None: where the model is
    offload: str = "none"  # where activations wait between blocks: none (the device), cpu, or disk
    true_sequential: bool = True  # sequential methods: fit q/k/v, o, gate/up, down in turn on the X′ the earlier produce

    def __post_init__(self) -> None:
        if isinstance(self.method, str):
            self.method = options_for(self.method)
        if not isinstance(self.method, MethodOptions):
            raise TypeError(f"method must be a method name or its options, got {type(self.method).__name__}")

    def validate(self) -> None:
        if not 0.0 < self.ratio < 1.0:
            raise ValueError(f"--ratio must be in (0, 1), got {self.ratio}")
        if self.batch_size < 1:
            raise ValueError(f"--batch-size must be positive, got {self.batch_size}")
        if self.rank_rule not in ("uniform", *ALLOCATIONS):
            raise ValueError(f"--ranks must be one of uniform, {', '.join(ALLOCATIONS)}, got {self.rank_rule!r}")
        if not 0.0 <= self.rank_floor <= 1.0 <= self.rank_cap:
            raise ValueError(f"--rank-floor must be in [0, 1] and --rank-cap at least 1, got {self.rank_floor}, "
                             f"{self.rank_cap}")
        if self.offload not in OFFLOAD:
            raise ValueError(f"--offload must be one of {', '.join(OFFLOAD)}, got {self.offload!r}")
        self.method.validate()  # type: ignore[union-attr]

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
    perplexity: dict[str, dict[str, float]] = field(default_factory=dict)
    timings: Timings = field(default_factory=Timings)
    processes: dict[str, Any] = field(default_factory=dict)  # world size and each rank's timings (torchrun)
    rank_search: dict[str, Any] = field(default_factory=dict)  # --ranks search: held-out loss of each candidate
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

    def write(self, path: "str | Path") -> None:
        from pathlib import Path

        atomic_write_text(Path(path), json.dumps(self.to_dict(), indent=2) + "\n")


def _factorise(name: str, module: nn.Module, stats: LayerStats, k: int | None, opts: MethodOptions
               ) -> tuple[tuple[Tensor, Tensor] | None, dict[str, Any]]:
    """The factors (u, v) of ``module`` at rank ``k`` (None when the plan keeps it dense) and its record."""
    weight, _ = dense_weight(module)
    record: dict[str, Any] = {"name": name, "shape": list(weight.shape), "rank": k}
    if k is None:
        return None, record
    f, info = method_of(opts).factorize(weight, stats, k, opts)
    record.update(info)
    if f.remedy:
        record["remedy"] = f.remedy
        log.warning("%s: singular statistic, %s", name, f.remedy)
    return (f.u, f.v), record


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


def _fit_block(model: nn.Module, block: nn.Module, linears: dict[str, nn.Module], calib: ActivationStream | None,
               plan: CompressionPlan, cfg: CompressionConfig, fisher: dict[str, Tensor], report: CompressionReport) -> None:
    """Record the statistics of ``linears``, factorise each at its plan rank and swap the factors in.  All at once,
    or (true-sequential) group by group in forward order (q/k/v, o, gate/up, down), each group fitted on the
    compressed stream that the groups before it already produce."""
    opts = cfg.method
    assert isinstance(opts, MethodOptions)
    method, device = method_of(opts), block_device(block)  # the block is on the compute device
    groups = [list(linears)]
    if calib is not None and cfg.true_sequential and method.sequential and linears:
        with report.timings.clock("forward passes and statistics"):
            groups = calib.input_order(block, linears)
    for g, names in enumerate(groups):
        group, acc = {n: linears[n] for n in names}, GramAccumulator(method.needs, device, fisher)
        with report.timings.clock("forward passes and statistics"):
            if calib is not None:
                calib.record(block, group, acc, _dense_view(model, linears), keep_output=g == len(groups) - 1)
        with report.timings.clock("decompositions"):
            acc.all_reduce()
            for name, (factors, record) in _decompose_block(group, acc, plan, opts, device).items():
                report.account(record)
                if factors is not None:
                    replace_module(model, name, LowRankLinear.from_factors(linears[name], *factors))


def _dense_view(model: nn.Module, linears: dict[str, nn.Module]) -> Callable[[], AbstractContextManager]:
    """A context that puts back the dense modules of the linears already swapped for their factors."""
    return lambda: swapped(model, {n: m for n, m in linears.items() if model.get_submodule(n) is not m})


def _allocate(model: nn.Module, windows: Tensor, plan: CompressionPlan, cfg: CompressionConfig,
              device: torch.device, source: "ShardSource | None", report: CompressionReport) -> dict[str, int]:
    """Ranks under the uniform budget from the dense whitened spectra σ²: ``loss`` keeps the components with the
    largest share σᵢ²/Σσ² of their matrix's output energy, ``fisher`` those with the largest f·σᵢ² (f: the loss's
    sensitivity to that output), ``v2`` is SVD-LLM V2's per-type rule, and ``search`` scores interpolations
    between uniform and fisher on held-out calibration windows (the last quarter, left out of the statistics)."""
    held = max(1, len(windows) // 4) if cfg.rank_rule == "search" else 0
    if held and len(windows) < 2:
        raise ValueError("--ranks search needs at least 2 calibration windows per process (a quarter is held out)")
    fit = windows[: len(windows) - held]
    shapes = {n: (plan.shapes[n][0], plan.shapes[n][1]) for n in plan.ranks}
    spectra = whitened_spectra(model, fit, plan, device, cfg.batch_size, source)
    if cfg.rank_rule == "v2":
        return per_type(shapes, cfg.ratio, {n: float(spectra[n][k:].sum()) for n, k in plan.ranks.items()},
                        cfg.rank_floor, cfg.rank_cap)
    if cfg.rank_rule == "loss":
        weight = {n: 1.0 / float(s.sum()) for n, s in spectra.items()}
    else:
        weight = output_sensitivity(model, fit, list(plan.ranks))
    ranks = allocate(shapes, cfg.ratio, {n: (weight[n] * spectra[n]).tolist() for n in plan.ranks},
                     cfg.rank_floor, cfg.rank_cap)
    if cfg.rank_rule != "search":
        return ranks
    candidates = {f"{t:g}": interpolate(plan.ranks, ranks, t) for t in SEARCH_STEPS}
    losses = held_out_losses(model, fit, windows[len(windows) - held:], plan, candidates, device, cfg.batch_size)
    report.rank_search = {"held_out_windows": held, "loss_by_step": losses, "chosen": min(losses, key=losses.get)}
    return candidates[report.rank_search["chosen"]]


def fingerprint(model: nn.Module, cfg: CompressionConfig, windows: Tensor | None,
                eval_windows: dict[str, Tensor]) -> str:
    """What a checkpoint must match to be resumed: the model's config and embeddings, the options, the data."""
    emb = model.get_input_embeddings().weight.detach()
    rows = emb[:: max(1, emb.shape[0] // 64)]  # a sample: a copy of the whole table would cost its size again
    probe = float(rows.double().abs().sum()) if emb.device.type != "meta" else 0.0
    blob = json.dumps([model.config.to_diff_dict(), probe, cfg.to_dict(), distributed.world()[1], windows_digest(windows),
                       {k: windows_digest(v) for k, v in sorted(eval_windows.items())}], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


@torch.no_grad()
def compress(
    model: nn.Module,
    windows: Tensor | None,
    config: CompressionConfig | None = None,
    *,
    eval_windows: dict[str, Tensor] | None = None,
    run_dir: RunDir | None = None,
    source: "ShardSource | None" = None,
    progress: bool = True,
    on_block: Callable[[int], None] | None = None,
) -> nn.Module:
    """Compress the decoder-block linears of ``model`` in place, one block at a time, and return it.

    ``windows`` (nsamples × seqlen token ids) calibrate; ``eval_windows`` (name →
    windows) are carried through the dense and the compressed blocks so that the
    report holds both perplexities without a second pass.  With ``run_dir`` each
    finished block is checkpointed and a run resumes where the folder left off.
    With ``source`` the model is a meta skeleton whose blocks are read from
    shards (``run_dir`` then holds the finished blocks).  The report lands in
    ``model.svdllm_report`` and the ranks in ``model.config.svdllm``.
    """
    cfg = config or CompressionConfig()
    cfg.validate()
    opts = cfg.method
    assert isinstance(opts, MethodOptions)
    method, evals = method_of(opts), eval_windows or {}
    if method.needs and windows is None:
        raise ValueError(f"method {opts.name} needs calibration windows")
    if source is not None and (run_dir is None or "fisher" in method.needs):
        raise ValueError("streaming from disk needs a run folder and a method without gradients (not fwsvd)")
    if cfg.rank_rule in ALLOCATIONS and windows is None:
        raise ValueError(f"--ranks {cfg.rank_rule} needs calibration windows")
    if cfg.rank_rule in GRADIENT_RULES and source is not None:
        raise ValueError(f"--ranks {cfg.rank_rule} needs the whole model in memory (gradients): drop --low-memory, "
                         "or use --ranks uniform, loss or v2")
    plan = make_plan(model, cfg.ratio, cfg.targets, cfg.skip_layers,
                     cfg.rank_rule if cfg.rank_rule not in ALLOCATIONS else "uniform")
    calib_info = {} if windows is None or not method.needs else {
        "nsamples": windows.shape[0], "seqlen": windows.shape[1], "sha256": windows_digest(windows)}
    report = CompressionReport(cfg.to_dict(), plan.to_dict(), calib_info, params_before=count_parameters(model))
    model.eval()
    prefix, blocks = decoder_blocks(model)
    device = torch.device(cfg.device) if cfg.device else next(p.device for p in model.parameters()
                                                                if p.device.type != "meta")
    host = BlockHost(model, prefix, blocks, device, source)
    if source is not None:
        return_freed_memory()
    if windows is not None:
        windows = distributed.shard(windows)
    evals = {name: distributed.shard(w) for name, w in evals.items()}
    fisher = fisher_rows(model, windows, {n: model.get_submodule(n) for n in plan.ranks}) \
        if "fisher" in method.needs else {}
    distributed.all_reduce_(list(fisher.values()))
    if cfg.rank_rule in ALLOCATIONS:
        with report.timings.clock("rank allocation"):
            plan.ranks = _allocate(model, windows, plan, cfg, device, source, report)
        report.plan = plan.to_dict()
    store = TensorStore(run_dir.stream_folder if cfg.offload == "disk" and run_dir else
                        torch.device("cpu") if cfg.offload != "none" else device)
    streams = _open_streams(model, blocks[0], host, windows if method.needs - {"fisher"} else None,
                            method.sequential, evals, cfg.batch_size, store, report)
    host.park_outside()
    start = _resume(model, plan, host, run_dir, streams, report) if run_dir else 0
    calib = streams.get("calib")
    for i in tqdm(range(start, plan.n_blocks), desc=f"compress {opts.name}", unit="block",
                  disable=not progress or not distributed.is_writer()):
        block = host.onload(i)
        linears = {name: model.get_submodule(name) for name in plan.block(i)}
        with report.timings.clock("forward passes and statistics"):
            for name in evals:
                streams[name].propagate(block, DENSE)
        _fit_block(model, block, linears, calib, plan, cfg, fisher, report)
        with report.timings.clock("forward passes and statistics"):
            if calib is not None:
                calib.advance(block)
            for name in evals:
                streams[name].propagate(block, COMPRESSED)
        if run_dir is not None:
            with report.timings.clock("checkpoint"):
                _checkpoint(run_dir, i, host, streams, report)
        host.offload(i)
        if on_block is not None:
            on_block(i)
    with report.timings.clock("evaluation"), host.outside_blocks():
        report.perplexity = {lane: {name: all_reduce_result(stream_perplexity(
            model, blocks, streams[name], lane, evals[name], cfg.batch_size, device)).perplexity for name in evals}
            for lane in (DENSE, COMPRESSED)} if evals else {}
    store.close()
    if distributed.active():
        report.processes = {"world_size": distributed.world()[1], "timings": distributed.gather_objects(report.timings)}
    report.params_after = count_parameters(model)
    model.config.svdllm = {
        "format_version": 1, "svdllm_version": __version__, "method": opts.name, "options": opts.to_dict(),
        "ratio": cfg.ratio, "rank_rule": cfg.rank_rule, "calibration": calib_info or None,
        # every low-rank layer of the model, an earlier pass's too: a rank left out would reload at random
        "ranks": {n: m.rank for n, m in model.named_modules() if isinstance(m, LowRankLinear)},
    }
    model.svdllm_report = report
    return model


def _open_streams(model: nn.Module, first_block: nn.Module, host: BlockHost, windows: Tensor | None, sequential: bool,
                  evals: dict[str, Tensor], batch_size: int, store: TensorStore,
                  report: CompressionReport) -> dict[str, ActivationStream]:
    """Capture the first block's inputs: calibration (dense, and compressed if the method is sequential) and
    each evaluation set (dense and compressed)."""
    jobs = {name: (w, (DENSE, COMPRESSED)) for name, w in evals.items()}
    if windows is not None:
        jobs["calib"] = (windows, (DENSE, COMPRESSED) if sequential else (DENSE,))
    with report.timings.clock("capture block inputs"), host.outside_blocks():
        # stream keys name files: an evaluation set's name may be a path, so the streams are numbered; each
        # rank's stream is its own (a checkpoint holds them side by side)
        rank = f".rank{distributed.world()[0]}" if distributed.active() else ""
        return {name: ActivationStream.capture(model, first_block, w, batch_size, lanes, store, host.device,
                                               (name if name == "calib" else f"eval{k}") + rank)
                for k, (name, (w, lanes)) in enumerate(jobs.items())}


def _checkpoint(run_dir: RunDir, i: int, host: BlockHost, streams: dict[str, ActivationStream],
                report: CompressionReport) -> None:
    """Commit block i: its tensors, every stream after it, and what the report has gathered so far."""
    run_dir.commit(i, host.state(i) if distributed.is_writer() else {}, lambda folder: [s.save(folder) for s in streams.values()],
                   {"records": report.records, "timings": report.timings,
                    "linear_params": [report.linear_params_before, report.linear_params_after],
                    "tuple_output": any(s.tuple_output for s in streams.values())})


def _resume(model: nn.Module, plan: CompressionPlan, host: BlockHost, run_dir: RunDir,
            streams: dict[str, ActivationStream], report: CompressionReport) -> int:
    """Restore the finished blocks and the streams at their boundary from ``run_dir``; the next block's index."""
    start = run_dir.done
    if start == 0:
        return 0
    log.warning("resuming from %s after %d of %d blocks", run_dir.path, start, plan.n_blocks)
    for i in range(start):
        apply_ranks(model, {n: plan.ranks[n] for n in plan.block(i) if n in plan.ranks})
        if host.source is None:  # in memory: the finished blocks come back as they were
            head = f"{plan.prefix}.{i}."
            state = {k[len(head):]: v for k, v in run_dir.load_block(i).items()}
            host.blocks[i].load_state_dict(state, strict=True)
            host.blocks[i].apply(lambda m: m.use_rank_major() if isinstance(m, LowRankLinear) else None)
    for stream in streams.values():
        stream.load(run_dir.streams_folder(start))
        stream.tuple_output = bool(run_dir.state.get("tuple_output", False))
    report.records = run_dir.state["records"]
    report.timings.update(run_dir.state["timings"])
    report.linear_params_before, report.linear_params_after = run_dir.state["linear_params"]
    return start
