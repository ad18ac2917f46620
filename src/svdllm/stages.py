"""The plan of passes: which stages a compression run makes, what each needs and makes, in order.

A stage is one small object with one job (as llm-compressor's modifiers are to its pipelines).
``pipeline.plan_passes`` turns the options into the list of stages before any model work; ``compress`` runs them in
order and only hands products between them through ``Run``.  Products are typed: a stage names the types it reads and makes, and the plan
is refused if a need is made by no earlier stage.

| stage          | makes                                 | rides on                                                  |
|----------------|---------------------------------------|-----------------------------------------------------------|
| ReversePass    | GradientStats (+ whitened spectra)    | one dense forward keeping block inputs, one streamed backward whose block recomputations give the input Grams |
| AllocateRanks  | CompressionPlan (allocated ranks)     | no pass: a heap over the spectra                          |
| BlockLoop      | Streams (the evaluation streams)      | the block loop's forwards (``blockloop``)                 |
| Evaluate       | Perplexities                          | the head over the streams' last hidden states             |
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, TypeVar

import torch
from torch import Tensor

from . import distributed
from .architecture import count_parameters
from .cache import DiskStore, MemoryStore, Offload, StoredTensors, TensorStore
from .calibration import COMPRESSED, DENSE, windows_digest
from .checkpoint import RunDir, read_checked_json, write_checked_json
from .config import CompressionConfig, CompressionReport
from .errors import DataError
from .evaluate import all_reduce_result, stream_perplexity
from .files import load_tensors, save_tensors
from .importance import GRAM_PREFIX, GradientStats, Spectra, gradient_statistics
from .methods import MethodOptions, method_of
from .plan import CompressionPlan, make_plan
from .ranks import allocate
from .source import ModelSource

T = TypeVar("T")


class Streams(dict):
    """name → ActivationStream: the calibration stream and each evaluation set's, after the last block."""


class Perplexities(dict):
    """lane (dense, compressed) → evaluation set → perplexity."""


@dataclass
class Run:
    """One compression run: its inputs, where its activations wait, and the products its stages hand on."""

    source: ModelSource
    windows: Tensor | None  # this process's share of the calibration windows
    evals: dict[str, Tensor]
    cfg: CompressionConfig
    report: CompressionReport
    offload: Offload
    run_dir: RunDir | None
    progress: bool
    data_key: list[Any]  # digests of the calibration and evaluation windows (all processes' windows)
    products: dict[type, Any] = field(default_factory=dict)
    made_from: dict[type, Any] = field(default_factory=dict)

    @property
    def method(self) -> MethodOptions:
        assert isinstance(self.cfg.method, MethodOptions)
        return self.cfg.method

    @property
    def calibration_tokens(self) -> int:
        """The calibration's tokens over every process (what a statistic's route is chosen by, alike on each)."""
        return self.report.calibration.get("nsamples", 0) * self.report.calibration.get("seqlen", 0)

    @property
    def batch(self) -> int:
        return self.cfg.batch_size or self.source.default_batch

    def get(self, kind: type[T]) -> T:
        return self.products[kind]

    def put(self, value: Any, made_from: Any = None) -> None:
        self.products[type(value)] = value
        self.made_from[type(value)] = made_from

    def kept(self, name: str, made_from: Any, make: Callable[[Path | None], T], read: Callable[[Path], T]) -> T:
        """A product a rerun may reuse: through the run folder when there is one (``RunDir.kept``)."""
        if self.run_dir is None:
            return make(None)
        return self.run_dir.kept(name, made_from, make, read)

    def close(self) -> None:
        self.offload.close()


class Stage:
    """One step of the plan: ``run`` reads the products ``needs`` names and puts those ``makes`` names."""

    phase: ClassVar[str] = ""  # its line in the report's timings ("": the stage times its own parts)
    rides_on: ClassVar[str] = ""

    @property
    def needs(self) -> tuple[type, ...]:
        return ()

    @property
    def makes(self) -> tuple[type, ...]:
        return ()

    def run(self, run: Run) -> None:
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        return {"stage": type(self).__name__, "needs": [t.__name__ for t in self.needs],
                "makes": [t.__name__ for t in self.makes], "rides_on": self.rides_on}


@dataclass
class ReversePass(Stage):
    """The gradient statistics (and the spectra allocation reads), kept in the run folder as one product."""

    sensitivity: bool
    row_fisher: bool
    output_grams: bool
    full_width: int
    spectra: Spectra | None
    phase: ClassVar[str] = "gradients"
    rides_on: ClassVar[str] = "a dense forward keeping each block's inputs, then a streamed backward"

    @property
    def needs(self) -> tuple[type, ...]:
        return (CompressionPlan,)

    @property
    def makes(self) -> tuple[type, ...]:
        return (GradientStats,)

    def run(self, run: Run) -> None:
        names = list(run.get(CompressionPlan).ranks)
        out_side = self.spectra.out_side if self.spectra else None
        made_from = ["gradients", run.data_key[0], names, self.sensitivity, self.row_fisher, self.output_grams,
                     self.full_width, self.spectra is not None,  # and what the two-sided spectra read of the options
                     [out_side.output_damp, out_side.output_shrinkage] if out_side else None]
        run.put(run.kept("gradients", made_from, lambda folder: self._make(run, names, folder),
                         lambda folder: self._read(folder, names)), made_from)

    def _make(self, run: Run, names: list[str], folder: Path | None) -> GradientStats:
        store = run.offload.store("reverse-stream")
        try:
            grads = gradient_statistics(run.source, run.windows, names, self.sensitivity, self.row_fisher, store,
                                        self.output_grams, self.full_width, gram_store=_gram_store(folder),
                                        spectra=self.spectra, tokens=run.calibration_tokens, batch=run.batch)
        finally:
            store.close()
        if folder is not None and distributed.is_writer():  # the Grams are already in their folder
            save_tensors({"sensitivity": torch.tensor([grads.sensitivity.get(n, 0.0) for n in names],
                                                      dtype=torch.float64),
                          **{f"rows.{n}": r.contiguous() for n, r in grads.row_fisher.items()},
                          **{f"spectra.{n}": s.contiguous() for n, s in grads.spectra.items()}},
                         folder / "stats.safetensors")
        return grads

    def _read(self, folder: Path, names: list[str]) -> GradientStats:
        saved = load_tensors(folder / "stats.safetensors")
        part = lambda prefix: {n: saved[prefix + n] for n in names if prefix + n in saved}  # noqa: E731
        return GradientStats(dict(zip(names, saved["sensitivity"].tolist())) if self.sensitivity else {},
                             part("rows."), StoredTensors(_gram_store(folder), names, GRAM_PREFIX)
                             if self.output_grams else {}, part("spectra."))


def _gram_store(folder: Path | None) -> TensorStore:
    """Output-gradient Grams: files of the run's gradient product (one folder per process), else CPU memory."""
    if folder is None:
        return MemoryStore(torch.device("cpu"))
    return DiskStore(folder / distributed.process_name("grams"))


@dataclass
class AllocateRanks(Stage):
    """Ranks under the uniform plan's budget from the spectra: two-sided σ² are already in loss units, one-sided σ²
    are weighted by the output's isotropic Fisher."""

    two_sided: bool
    phase: ClassVar[str] = "rank allocation"
    rides_on: ClassVar[str] = "no pass: the reverse pass's spectra"

    @property
    def needs(self) -> tuple[type, ...]:
        return (CompressionPlan, GradientStats)

    @property
    def makes(self) -> tuple[type, ...]:
        return (CompressionPlan,)

    def run(self, run: Run) -> None:
        plan, cfg = run.get(CompressionPlan), run.cfg
        made_from = ["ranks", run.made_from[GradientStats], plan.to_dict(), cfg.rank_floor, cfg.rank_cap]
        run.put(run.kept("ranks", made_from, lambda folder: self._make(run, plan, folder),
                         lambda folder: CompressionPlan.from_dict(read_checked_json(folder / "plan.json",
                                                                                    "the kept ranks"))), made_from)
        run.report.plan = run.get(CompressionPlan).to_dict()

    def _make(self, run: Run, plan: CompressionPlan, folder: Path | None) -> CompressionPlan:
        grads, cfg = run.get(GradientStats), run.cfg
        shapes = {n: (plan.shapes[n][0], plan.shapes[n][1]) for n in plan.ranks}
        scores = {n: (grads.spectra[n] if self.two_sided else grads.sensitivity[n] * grads.spectra[n]).tolist()
                  for n in plan.ranks}
        allocated = CompressionPlan.from_dict({**plan.to_dict(), "ranks": allocate(
            shapes, cfg.ratio, scores, cfg.rank_floor, cfg.rank_cap)})
        if folder is not None and distributed.is_writer():
            write_checked_json(folder / "plan.json", allocated.to_dict())
        return allocated


class Evaluate(Stage):
    """Perplexity of each evaluation set, dense and compressed, from the streams the block loop carried."""

    phase: ClassVar[str] = "evaluation"
    rides_on: ClassVar[str] = "the model's head over the last hidden states of each stream"

    @property
    def needs(self) -> tuple[type, ...]:
        return (Streams,)

    @property
    def makes(self) -> tuple[type, ...]:
        return (Perplexities,)

    def run(self, run: Run) -> None:
        streams, source = run.get(Streams), run.source
        with source.outside_blocks():
            result = Perplexities({lane: {name: all_reduce_result(stream_perplexity(
                source.model, source.blocks, streams[name], lane, w, run.batch, source.device)).perplexity
                for name, w in run.evals.items()} for lane in (DENSE, COMPRESSED)})
        run.put(result)
        run.report.perplexity = dict(result)


def calibrated(cfg: CompressionConfig) -> bool:
    """Whether the run reads calibration windows at all."""
    assert isinstance(cfg.method, MethodOptions)
    return bool(method_of(cfg.method).needs_for(cfg.method)) or cfg.resolved_rank_rule() == "fisher" \
        or cfg.refine.active


def open_run(source: ModelSource, windows: Tensor | None, evals: dict[str, Tensor], cfg: CompressionConfig,
             run_dir: RunDir | None, progress: bool) -> Run:
    """The run's report, its uniform plan, its offload (chosen here, once, for every pass) and its data."""
    if calibrated(cfg) and windows is None:
        raise DataError(f"method {cfg.method.name} with {cfg.resolved_rank_rule()} ranks needs calibration windows")
    plan = make_plan(source.model, cfg.ratio, cfg.targets, cfg.skip_layers)
    calib_info = {"nsamples": windows.shape[0], "seqlen": windows.shape[1], "sha256": windows_digest(windows)} \
        if windows is not None and calibrated(cfg) else {}
    report = CompressionReport(cfg.to_dict(), plan.to_dict(), calib_info, params_before=count_parameters(source.model))
    offload = Offload.resolve(cfg.offload, source.default_offload, source.device,
                              run_dir.path if run_dir is not None else None)
    data_key = [windows_digest(windows), {k: windows_digest(v) for k, v in sorted(evals.items())}]
    run = Run(source, distributed.shard(windows) if windows is not None else None,
              {name: distributed.shard(w) for name, w in evals.items()}, cfg, report, offload, run_dir, progress,
              data_key)
    run.put(plan)
    return run
