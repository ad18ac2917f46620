"""Compression: a plan of passes, then the passes in order (``stages``), one block on the device at a time.

``compress`` only moves data: ``plan_passes`` decides from the options which passes run and what each
reads; ``stages.open_run`` chooses once where activations wait; each stage does its one job and hands its products
on.  What to do with the result (fine-tune, quantize, save) is the workflow's.
"""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from . import distributed
from .architecture import count_parameters
from .calibration import COMPRESSED
from .checkpoint import RunDir
from .config import RANK_RULES, CompressionConfig, CompressionReport, Timings
from .record import SvdllmRecord
from .runtime import LowRankLinear
from .source import ModelSource
from .blockloop import BlockLoop
from .calibration import Stat
from .importance import FULL_GRAM_WIDTH, Spectra
from .methods import MethodOptions, method_of
from .plan import CompressionPlan
from .stages import AllocateRanks, Evaluate, ReversePass, Run, Stage, open_run

__all__ = ["RANK_RULES", "CompressionConfig", "CompressionReport", "CompressionResult", "Timings", "compress",
           "plan_passes"]


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


def plan_passes(cfg: CompressionConfig, evaluate: bool) -> list[Stage]:
    """The stages the options ask for, in order, each need checked against what the stages before it make."""
    opts = cfg.method
    assert isinstance(opts, MethodOptions)
    method, rule = method_of(opts), cfg.resolved_rank_rule()
    needs = method.needs_for(opts)
    out_side = opts if Stat.OUT_GRAM in needs else None
    stages: list[Stage] = []
    if needs & Stat.from_reverse_pass() or rule == "fisher":
        stages.append(ReversePass(rule == "fisher", Stat.ROW_FISHER in needs, out_side is not None,
                                  getattr(out_side, "output_full_width", FULL_GRAM_WIDTH),
                                  Spectra(out_side) if rule == "fisher" else None))
    if rule == "fisher":
        stages.append(AllocateRanks(two_sided=out_side is not None))
    stages.append(BlockLoop(needs, method.sequential, cfg.true_sequential, cfg.refine))
    if evaluate:
        stages.append(Evaluate())
    made: set[type] = {CompressionPlan}
    for stage in stages:
        missing = [t.__name__ for t in stage.needs if t not in made]
        assert not missing, f"{type(stage).__name__} needs {missing}, which no earlier stage makes"
        made.update(stage.makes)
    return stages


@torch.no_grad()
def compress(model: nn.Module | ModelSource, windows: Tensor | None, config: CompressionConfig | None = None, *,
             eval_windows: dict[str, Tensor] | None = None, run_dir: RunDir | None = None,
             progress: bool = True) -> CompressionResult:
    """Compress the decoder-block linears of ``model`` (in memory, or a source that streams it) one block at a time.

    ``windows`` (nsamples × seqlen token ids) calibrate; ``eval_windows`` (name → windows) are carried through the
    dense and the compressed blocks so that the report holds both perplexities without a second pass.  With
    ``run_dir`` every product a rerun may reuse is kept there, and a run resumes after its last finished block.
    """
    cfg = config or CompressionConfig()
    cfg.validate()
    source = model if isinstance(model, ModelSource) else ModelSource(model, cfg.device)
    stages = plan_passes(cfg, evaluate=bool(eval_windows))
    run = open_run(source, windows, eval_windows or {}, cfg, run_dir, progress)
    run.report.passes = [stage.describe() for stage in stages]
    try:
        for stage in stages:
            with run.report.timings.clock(stage.phase) if stage.phase else nullcontext():
                stage.run(run)
    finally:
        run.close()
    return CompressionResult(source, run.report, _record(run))


def _record(run: Run) -> SvdllmRecord:
    """The record a saved folder carries, with the processes' timings in the report under torchrun."""
    report, cfg, model = run.report, run.cfg, run.source.model
    if distributed.active():
        report.processes = {"world_size": distributed.world()[1], "timings": distributed.gather_objects(report.timings)}
    report.params_after = count_parameters(model)
    return SvdllmRecord(
        method=run.method.name, options=run.method.to_dict(), ratio=cfg.ratio, rank_rule=cfg.resolved_rank_rule(),
        calibration=report.calibration or None,
        # every low-rank layer of the model, an earlier pass's too: a rank left out would reload at random
        ranks={n: m.rank for n, m in model.named_modules() if isinstance(m, LowRankLinear)},
        perplexity=report.perplexity.get(COMPRESSED) or None)
