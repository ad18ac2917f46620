"""The block-by-block compression loop (GPTQ-style) and the public `compress`."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from . import __version__
from .architecture import block_linears, count_parameters, decoder_blocks, parse_layers
from .calibration import (
    BlockCall,
    GramAccumulator,
    capture_block_inputs,
    fisher_rows,
    recorded_inputs,
    run_block,
    sample_windows,
)
from .config import CompressionConfig
from .lowrank import dense_weight, from_factors
from .methods import METHODS, LayerStats
from .ranks import rank_for_ratio, worth_factorising

log = logging.getLogger("svdllm")


@dataclass
class CompressionReport:
    config: dict[str, Any]
    params_before: int = 0
    params_after: int = 0
    linear_params_before: int = 0
    linear_params_after: int = 0
    records: list[dict[str, Any]] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)

    def add_time(self, phase: str, seconds: float) -> None:
        self.timings[phase] = self.timings.get(phase, 0.0) + seconds

    @property
    def remedies(self) -> list[dict[str, Any]]:
        return [r for r in self.records if r.get("remedy")]


class _Clock:
    def __init__(self, report: CompressionReport, phase: str) -> None:
        self.report, self.phase = report, phase

    def __enter__(self) -> None:
        self.t0 = time.perf_counter()

    def __exit__(self, *exc: object) -> None:
        self.report.add_time(self.phase, time.perf_counter() - self.t0)


def _compress_linear(
    name: str, module: nn.Module, stats: LayerStats, cfg: CompressionConfig, report: CompressionReport
) -> nn.Module:
    weight, _ = dense_weight(module)
    m, n = weight.shape
    k = rank_for_ratio(m, n, cfg.ratio)
    record: dict[str, Any] = {"name": name, "shape": [m, n], "rank": k}
    report.linear_params_before += m * n
    if not worth_factorising(m, n, k):
        record.update(rank=None, kept_dense="rank too high to save parameters")
        report.linear_params_after += m * n
        report.records.append(record)
        return module
    f, info = METHODS[cfg.method].factorize(weight, stats, k, cfg)
    record.update(info)
    if f.remedy:
        record["remedy"] = f.remedy
        log.warning("%s: singular statistic, %s", name, f.remedy)
    report.linear_params_after += k * (m + n)
    report.records.append(record)
    return from_factors(module, f.u, f.v)


def _set_child(root: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, new)


@torch.no_grad()
def compress(
    model: nn.Module,
    tokenizer: Any = None,
    config: CompressionConfig | None = None,
    calib_tokens: Tensor | None = None,
    progress: bool = True,
    stats_cache: dict | None = None,
) -> nn.Module:
    """Compress every decoder-block linear of ``model`` in place and return it.

    Calibration text comes from ``config.calib`` through ``tokenizer`` unless
    ``calib_tokens`` (1-D token ids) is given.  The report lands in
    ``model.svdllm_report`` and the ranks in ``model.config.svdllm``.

    ``stats_cache``: a dict kept by the caller across calls on copies of the same
    dense model.  Statistics of the dense model alone (Fisher, dense Grams, mean
    |x|) are stored there and reused by later calls with the same calibration
    windows, whatever their ratio or method.
    """
    cfg = config or CompressionConfig()
    cfg.validate()
    method = METHODS[cfg.method]
    auto_beta = cfg.method == "svdllm-ec" and cfg.beta == "auto"
    needs = method.needs | {"gram"} if auto_beta else method.needs
    report = CompressionReport(config=cfg.to_dict())
    report.params_before = count_parameters(model)
    if cfg.device:
        model.to(cfg.device)
    device = next(model.parameters()).device
    store = torch.device("cpu") if cfg.offload else device
    was_cache = getattr(model.config, "use_cache", None)
    model.eval()

    prefix, blocks = decoder_blocks(model)
    skip = parse_layers(cfg.skip_layers, len(blocks)) if cfg.skip_layers else set()
    targets = {i: block_linears(b, f"{prefix}.{i}", cfg.targets) for i, b in enumerate(blocks) if i not in skip}
    if not any(targets.values()):
        raise ValueError(f"--targets {cfg.targets!r} matches no linear layer in the decoder blocks")

    samples = None
    if method.needs:
        if calib_tokens is None:
            from .data import load_text, tokenize

            with _Clock(report, "load calibration text"):
                calib_tokens = tokenize(tokenizer, load_text(cfg.calib))
        samples = sample_windows(calib_tokens, cfg.nsamples, cfg.seqlen, cfg.seed)
        report.config["calib_tokens"] = int(samples.numel())

    cache: dict | None = None
    if stats_cache is not None and samples is not None and not method.sequential:
        key = (tuple(samples.shape), int(samples.sum()), cfg.targets, cfg.skip_layers, cfg.batch_size)
        cache = stats_cache.setdefault(key, {})
        needs = needs | ({"gram", "abs"} if needs & {"gram", "abs"} else frozenset())  # one pass serves both

    fisher: dict[str, Tensor] = {}
    if "fisher" in method.needs and cache is not None:
        fisher = cache.get("fisher", {})
    if "fisher" in method.needs and not fisher:
        assert samples is not None
        with torch.enable_grad(), _Clock(report, "fisher (backward passes)"):
            fisher = fisher_rows(model, samples, {n: m for t in targets.values() for n, m in t.items()})
        if cache is not None:
            cache["fisher"] = fisher

    calls: list[BlockCall] = []
    comp_hidden: list[Tensor] | None = None
    cached_blocks = cache.get("blocks", {}) if cache is not None else {}
    if needs - {"fisher"} and len(cached_blocks) < len(blocks):
        assert samples is not None
        with _Clock(report, "calibration forward"):
            calls = capture_block_inputs(model, blocks[0], samples, cfg.batch_size, store)
        comp_hidden = [c.hidden.clone() for c in calls] if method.sequential else None
    # beta="auto": the last calibration batches are held out to choose β, then folded back in
    n_fit = len(calls) - max(1, round(len(calls) * cfg.holdout)) if auto_beta else len(calls)
    if auto_beta and n_fit < 1:
        raise ValueError("--beta auto needs at least two calibration batches (raise --nsamples or lower --batch-size)")

    for i, block in enumerate(tqdm(blocks, desc=f"compress {cfg.method}", disable=not progress, unit="block")):
        linears = targets.get(i, {})
        acc, held = cached_blocks.get(i) or GramAccumulator(needs, device), GramAccumulator(needs, device)
        dense_next: list[Tensor] = []
        if calls:
            with recorded_inputs(linears) as seen:
                for j, call in enumerate(calls):
                    with _Clock(report, "calibration forward"):
                        dense_next.append(run_block(block, call).to(store))
                        dense_in = dict(seen)
                        comp_in = None
                        if comp_hidden is not None and linears:
                            run_block(block, call, comp_hidden[j])
                            comp_in = dict(seen)
                    if linears:
                        with _Clock(report, "gram accumulation"):
                            (acc if j < n_fit else held).add(dense_in, comp_in)
        with _Clock(report, "decompositions"):
            for name, module in linears.items():
                stats = acc.for_linear(name) if acc.groups else LayerStats()
                if held.groups:
                    stats.holdout = held.for_linear(name)
                if name in fisher:
                    stats = LayerStats(tokens=stats.tokens, fisher=fisher[name])
                _set_child(model, name, _compress_linear(name, module, stats, cfg, report))
        if cache is not None and calls:
            cache.setdefault("blocks", {})[i] = acc
        del acc, held
        if calls:
            if comp_hidden is not None:
                with _Clock(report, "calibration forward"):
                    comp_hidden = [run_block(block, c, h).to(store) for c, h in zip(calls, comp_hidden)]
            for call, h in zip(calls, dense_next):
                call.hidden = h

    if was_cache is not None:
        model.config.use_cache = was_cache
    report.params_after = count_parameters(model)
    ranks = {r["name"]: r["rank"] for r in report.records if r.get("rank")}
    model.config.svdllm = {
        "format_version": 1,
        "svdllm_version": __version__,
        "method": cfg.method,
        "ratio": cfg.ratio,
        "calibration": {"data": cfg.calib, "nsamples": cfg.nsamples, "seqlen": cfg.seqlen} if method.needs else None,
        "seed": cfg.seed,
        "beta": cfg.beta if cfg.method == "svdllm-ec" else None,
        "ranks": ranks,
    }
    model.svdllm_report = report
    return model
