"""One workflow: validate every option once, open the model, compress, then fine-tune / quantize / score as asked,
and save.  ``svdllm compress`` maps its flags to ``CompressOptions`` and calls ``run_compression``; so does Python.

    result = svdllm.run_compression(svdllm.CompressOptions(model="smollm2-135m", out="out/smol-20"))
    result.report.perplexity  # {"dense": {...}, "compressed": {...}}
"""
from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from . import distributed
from .architecture import check_positions
from .checkpoint import OutputLock, RunDir
from .data import token_windows
from .distributed import default_device  # noqa: F401  (its home is distributed; callers import it here too)
from .evaluate import window_perplexities
from .errors import OptionError
from .finetune import FinetuneConfig, StageResult
from .folder import DTYPES, check_not_quantized, check_out_dir, save
from .pipeline import CompressionConfig, CompressionReport, Timings, compress
from .quantize import QuantizeOptions
from .record import SvdllmRecord
from .zeroshot import kept_rows
from .source import should_stream

log = logging.getLogger("svdllm")
EVAL_DEFAULT = ("wiki-test", "news")


@dataclass
class CompressOptions:
    """Everything one compression run needs; defaults are the README's command."""

    model: str = "smollm2-135m"  # a named model, a local folder, a .gguf file or a hub id
    compression: CompressionConfig = field(default_factory=CompressionConfig)
    calib: str = "wiki-train"  # calibration text
    nsamples: int = 32
    seqlen: int = 512
    seed: int = 0
    eval: tuple[str, ...] = EVAL_DEFAULT  # evaluation texts, dense and compressed perplexity carried block by block
    eval_seqlen: int = 512
    max_tokens: int | None = 8192  # per evaluation text
    eval_tasks: str = ""  # lm-eval tasks scored on the dense and the final model
    include_path: str | None = None
    limit: int | None = None
    low_memory: bool | None = None  # stream blocks from the shards; None: when the weights exceed half the memory
    trust_remote_code: bool = False  # let a model folder's own Python code (config.json's auto_map) run
    resume: bool = False  # insist on continuing an interrupted run (a rerun of the same run continues anyway)
    dist_timeout: int = 1800  # under torchrun: seconds a process waits for the others
    finetune: FinetuneConfig | None = None  # LoRA recovery after compressing
    quantize: QuantizeOptions | None = None  # quantized factors after that
    dtype: str = "float32"  # of the saved model
    out: str | None = None  # default out/MODEL-METHOD-RATIO
    force: bool = False  # replace an output folder svdllm wrote
    progress: bool = True

    def out_dir(self) -> Path:
        if self.out is not None:  # '' is refused by the output check, never the default folder
            return Path(self.out)
        stem = Path(self.model).stem if self.model.endswith(".gguf") else Path(self.model).name
        name = re.sub(r"[^A-Za-z0-9_.-]+", "-", stem)
        return Path("out") / f"{name}-{self.compression.method.name}-{self.compression.ratio:g}"  # type: ignore[union-attr]


PRESETS = ("fast", "balanced", "best")


def preset(name: str, **changes: Any) -> CompressOptions:
    """A named point on the quality–cost front, as plain options (``changes`` set further fields):

    - ``fast``: SVD-LLM(W) with the paper's uniform ranks: one dense forward with input Grams, one factorisation per
      matrix, no reverse pass;
    - ``balanced``: the default (output-aware, error-corrected, true-sequential ``svdllm-ec``, ranks from the
      two-sided spectra);
    - ``best``: the default on twice its calibration (64 windows), each block then refined by up to 64 Adam steps
      (``RefineOptions``), in about 3× the default's time.

    Their cost and quality on SmolLM2: docs/refinement.md."""
    from .refine import RefineOptions

    presets = {"fast": lambda: CompressOptions(compression=CompressionConfig(method="svdllm-w", rank_rule="uniform")),
               "balanced": CompressOptions,
               "best": lambda: CompressOptions(nsamples=64,
                                               compression=CompressionConfig(refine=RefineOptions(steps=64)))}
    if name not in presets:
        raise OptionError("preset", f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
    return replace(presets[name](), **changes)


@dataclass
class CompressOutcome:
    out: Path
    report: CompressionReport
    record: SvdllmRecord
    finetune_stages: list[StageResult] = field(default_factory=list)

    @property
    def params_before(self) -> int:
        return self.report.params_before

    @property
    def params_after(self) -> int:
        """The compressed model's (fine-tuning merges its LoRA; quantization stores the same weights in fewer
        bytes)."""
        return self.report.params_after


@dataclass
class _Checked:
    """What validation resolved before any model work."""

    out: Path
    run_path: Path
    streamed: bool
    tasks: Any = None


def validate(options: CompressOptions) -> _Checked:
    """Every option and every combination, before any model is loaded; raises OptionError naming the field."""
    from .zeroshot import resolve_tasks

    out_dir = options.out_dir()
    _check_values(options)
    asked = options.eval_tasks.strip() or options.include_path  # else lm-eval is not imported
    tasks = resolve_tasks(options.eval_tasks, options.include_path) if asked else None
    out = check_out_dir(out_dir, options.force)
    run_path = out.parent / f".{out.name}.svdllm-run"
    if options.resume and not (run_path / "state.json").is_file():
        raise OptionError("resume", f"no interrupted run to continue for {out}")
    check_not_quantized(options.model)
    streamed = should_stream(options.model, options.low_memory)
    many = distributed.launched()
    if options.eval_tasks.strip() and (streamed or many):
        raise OptionError("eval_tasks", "needs the whole model in one process: compress, then score the saved "
                          "folder with svdllm eval")
    for part, name in ((options.finetune, "finetune"), (options.quantize, "quantize")):
        if part is not None and streamed:
            raise OptionError(name, f"needs the whole model in memory: compress without `low_memory`, or run "
                              f"svdllm {name} on the saved folder")
    if options.finetune is not None and many:
        raise OptionError("finetune", "runs in one process: compress under torchrun, then run svdllm finetune")
    return _Checked(out, run_path, streamed, tasks)


def _check_values(options: CompressOptions) -> None:
    """Each option alone: ranges, names, texts, the parts' own options, the libraries they need."""
    from .data import check_spec

    options.compression.validate()
    for name, least in (("nsamples", 1), ("seqlen", 2), ("eval_seqlen", 2), ("dist_timeout", 1)):
        if getattr(options, name) < least:
            raise OptionError(name, f"must be at least {least}, got {getattr(options, name)}")
    if options.max_tokens is not None and options.max_tokens < 1:
        raise OptionError("max_tokens", f"must be positive, got {options.max_tokens}")
    if options.dtype not in DTYPES:
        raise OptionError("dtype", f"must be one of {', '.join(DTYPES)}, got {options.dtype!r}")
    for spec in [options.calib, *options.eval]:
        check_spec(spec)
    if options.finetune is not None:
        options.finetune.validate()
    if options.quantize is not None:
        from .quantize import require_library

        options.quantize.validate()
        require_library()  # before any model is loaded or compressed


def run_compression(options: CompressOptions) -> CompressOutcome:
    """Validate, open the model once (in memory or streamed), compress with a resumable run folder, then fine-tune,
    quantize and score as asked, and save the folder with its record and report.  Under torchrun every process
    calls this; rank 0 writes."""
    from .source import open_source

    checked, timings = validate(options), Timings()
    cfg = replace(options.compression, device=distributed.init_from_env(options.compression.device,
                                                                         options.dist_timeout))
    with OutputLock(checked.out):
        with timings.clock("load model"):
            source, tok = open_source(options.model, checked.streamed, cfg.device, options.trust_remote_code)
        check_positions(source.model, options.seqlen)
        if options.eval:
            check_positions(source.model, options.eval_seqlen, "eval_seqlen")
        with timings.clock("load text"):
            windows, evals, bos = token_windows(tok, source.model.config, options.calib, options.nsamples,
                                                options.seqlen, options.seed, options.eval, options.eval_seqlen,
                                                options.max_tokens)
        run = RunDir(checked.run_path, source.key(), distributed.world()[1], options.resume)
        with timings.clock("zero-shot tasks, dense"):
            dense_rows = kept_rows(run, [options.eval_tasks, options.include_path, options.limit], source.model, tok,
                                   *checked.tasks, options.limit) if checked.tasks else []
        with timings.clock("compress"):
            result = compress(source, windows, cfg, eval_windows=evals, run_dir=run, progress=options.progress)
        if distributed.is_writer():
            outcome = _finish(options, checked, result, tok, evals, bos, dense_rows, timings, cfg.device)
            run.remove()
        else:
            outcome = CompressOutcome(checked.out, result.report, result.record)
        source.close()
        return outcome


def _finish(options: CompressOptions, checked: _Checked, result: Any, tok: Any, evals: dict[str, torch.Tensor],
            bos: int | None, dense_rows: list, timings: Timings, device: str) -> CompressOutcome:
    """Fine-tune, quantize, score and save what ``compress`` gave, as the options ask (the writing process)."""
    from .folder import cast_parameters

    report, record, model = result.report, result.record, result.source.model
    if report.calibration:
        report.calibration.update(data=options.calib, seed=options.seed, bos=bos is not None)
        record = record.with_parts(calibration=dict(report.calibration))
    model, record, stages = _recover(options, model, tok, evals, record, report, timings, device)
    if checked.tasks:
        from .zeroshot import score_rows, zero_shot

        with timings.clock("zero-shot tasks, compressed"):
            rows = score_rows(zero_shot(model, tok, *checked.tasks, limit=options.limit))
        report.zero_shot = {"dense": dense_rows, "compressed": rows, "limit": options.limit}
        record = record.with_parts(zero_shot={f"{t} {m}": v for t, m, v, _ in rows})
    if options.dtype != "float32" and options.quantize is None and not result.source.streamed:
        with timings.clock(f"evaluate {options.dtype}"):  # the saved model's own figure, not float32's
            cast_parameters(model, options.dtype)
            report.perplexity[options.dtype] = window_perplexities(model, evals, options.progress)
    final = next((report.perplexity[k] for k in ("quantized", options.dtype, "finetuned", "compressed")
                  if report.perplexity.get(k)), None)
    record = record.with_parts(perplexity=final)
    report.timings = Timings({**timings, **{f"compress: {k}": v for k, v in report.timings.items()}})
    with timings.clock("save"):
        out = save(replace(result, record=record) if model is result.source.model else model, tok, checked.out,
                   record, report=report, dtype=options.dtype, force=options.force,
                   write_extra=(lambda folder: write_loss_curve(stages, folder)) if stages else None)
    report.timings["save"] = timings["save"]
    return CompressOutcome(out, report, record, stages)


def _recover(options: CompressOptions, model: Any, tok: Any, evals: dict[str, torch.Tensor], record: SvdllmRecord,
             report: CompressionReport, timings: Timings, device: str) -> tuple[Any, SvdllmRecord, list[StageResult]]:
    """LoRA fine-tuning, then quantized factors, each evaluated on the run's evaluation windows, as asked."""
    from .folder import cast_parameters

    stages: list[StageResult] = []
    if options.finetune is not None:
        from .finetune import finetune, record_part

        model.to(device)
        with timings.clock("finetune"):
            model, stages = finetune(model, tok, options.finetune, progress=options.progress)
        with timings.clock("evaluate finetuned"):
            report.perplexity["finetuned"] = window_perplexities(model, evals, options.progress)
        record = record.with_parts(finetune=record_part(options.finetune, stages))
    if options.quantize is not None:
        from .quantize import quantize_model

        with timings.clock("quantize"):
            cast_parameters(model, options.dtype)
            record = record.with_parts(quantization=quantize_model(model, options.quantize, record))
        with timings.clock("evaluate quantized"):
            report.perplexity["quantized"] = window_perplexities(model, evals, options.progress)
    return model, record, stages


def write_loss_curve(results: list[StageResult], out: Path) -> None:
    """The fine-tuning losses as JSON, and a plot where matplotlib is installed."""
    from dataclasses import asdict

    from .finetune import plot_losses

    (out / "finetune_losses.json").write_text(json.dumps([asdict(r) for r in results], indent=2) + "\n")
    try:
        plot_losses(results, str(out / "finetune_losses.png"))
    except ImportError:
        log.warning("no loss plot: pip install 'svdllm[plot]' (matplotlib) for one")
