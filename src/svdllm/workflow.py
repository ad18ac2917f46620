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
from .architecture import count_parameters
from .calibration import eval_windows, sample_windows
from .checkpoint import OutputLock, RunDir, read_checked_json, write_checked_json
from .data import bos_token
from .evaluate import check_positions
from .errors import OptionError
from .finetune import FinetuneConfig, StageResult
from .folder import check_out_dir, save
from .pipeline import CompressionConfig, CompressionReport, Timings, compress, model_key
from .quantize import QuantizeOptions
from .record import SvdllmRecord
from .source import should_stream

log = logging.getLogger("svdllm")
EVAL_DEFAULT = ("wiki-test", "news")
DTYPES = ("float32", "bfloat16", "float16")


def default_device(name: str | None = None) -> str:
    """``name`` if this machine has it; else CUDA where available, or the CPU."""
    if name:
        if name.startswith("cuda") and not torch.cuda.is_available():
            raise OptionError("device", f"{name}: CUDA is not available here")
        return name
    return "cuda" if torch.cuda.is_available() else "cpu"


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


@dataclass
class CompressOutcome:
    out: Path
    report: CompressionReport
    record: SvdllmRecord
    params_before: int
    params_after: int
    finetune_stages: list[StageResult] = field(default_factory=list)


@dataclass
class _Checked:
    """What validation resolved before any model work."""

    out: Path
    run_path: Path
    streamed: bool
    tasks: Any = None


def validate(options: CompressOptions) -> _Checked:
    """Every option and every combination, before any model is loaded; raises OptionError naming the field."""
    from .data import check_spec

    cfg = options.compression
    cfg.validate()
    if options.nsamples < 1:
        raise OptionError("nsamples", f"must be positive, got {options.nsamples}")
    for name in ("seqlen", "eval_seqlen"):
        if getattr(options, name) < 2:
            raise OptionError(name, f"must be at least 2 tokens, got {getattr(options, name)}")
    if options.max_tokens is not None and options.max_tokens < 1:
        raise OptionError("max_tokens", f"must be positive, got {options.max_tokens}")
    if options.dtype not in DTYPES:
        raise OptionError("dtype", f"must be one of {', '.join(DTYPES)}, got {options.dtype!r}")
    if options.dist_timeout < 1:
        raise OptionError("dist_timeout", f"must be positive, got {options.dist_timeout}")
    out = check_out_dir(options.out_dir(), options.force)
    run_path = out.parent / f".{out.name}.svdllm-run"
    if options.resume and not (run_path / "state.json").is_file():
        raise OptionError("resume", f"no interrupted run to continue for {out}")
    for spec in [options.calib, *options.eval]:
        check_spec(spec)
    _check_not_quantized(options.model)
    if options.finetune is not None:
        options.finetune.validate()
    if options.quantize is not None:
        from .quantize import require_library

        options.quantize.validate()
        require_library()  # before any model is loaded or compressed
    streamed = should_stream(options.model, options.low_memory)
    many = distributed.launched()
    tasks = None
    if options.eval_tasks.strip():
        from .zeroshot import resolve_tasks

        if streamed or many:
            raise OptionError("eval_tasks", "needs the whole model in one process: compress, then score the saved "
                              "folder with svdllm eval")
        tasks = resolve_tasks(options.eval_tasks, options.include_path)
    elif options.include_path:
        raise OptionError("include_path", "needs eval_tasks naming the tasks to run")
    for part, name in ((options.finetune, "finetune"), (options.quantize, "quantize")):
        if part is not None and streamed:
            raise OptionError(name, f"needs the whole model in memory: compress without `low_memory`, or run "
                              f"svdllm {name} on the saved folder")
    if options.finetune is not None and many:
        raise OptionError("finetune", "runs in one process: compress under torchrun, then run svdllm finetune")
    return _Checked(out, run_path, streamed, tasks)


def _check_not_quantized(model: str) -> None:
    """A folder whose factors or weights are already quantized cannot be compressed (its integer tensors are no
    weights to factorise)."""
    from .folder import is_svdllm_folder, read_record

    where = Path(model).expanduser()
    if where.is_dir() and is_svdllm_folder(where) and read_record(where).quantization:
        raise OptionError("model", f"{model} is already quantized; compress the folder it was quantized from")


def run_compression(options: CompressOptions) -> CompressOutcome:
    """Validate, open the model once (in memory or streamed), compress with a resumable run folder, then fine-tune,
    quantize and score as asked, and save the folder with its record and report.  Under torchrun every process
    calls this; rank 0 writes."""
    from .source import open_source

    checked, timings = validate(options), Timings()
    cfg = replace(options.compression, device=distributed.init_from_env(
        default_device(options.compression.device), options.dist_timeout))
    with OutputLock(checked.out):
        with timings.clock("load model"):
            source, tok = open_source(options.model, checked.streamed, cfg.device, options.trust_remote_code)
        data = _read_data(options, source.model, tok, timings)
        run = RunDir(checked.run_path, model_key(source), distributed.world()[1], options.resume)
        dense_rows = _dense_zero_shot(options, checked, run, source.model, tok, timings)
        with timings.clock("compress"):
            result = compress(source, data.windows, cfg, eval_windows=data.evals, run_dir=run,
                              progress=options.progress)
        if distributed.is_writer():
            outcome = _finish(options, checked, result, tok, data, dense_rows, timings)
            run.remove()
        else:
            outcome = CompressOutcome(checked.out, result.report, result.record, data.params_before,
                                      count_parameters(source.model))
        source.close()
        return outcome


@dataclass
class _Data:
    """The run's token windows, cut once."""

    windows: torch.Tensor
    evals: dict[str, torch.Tensor]
    bos: int | None
    params_before: int


def _read_data(options: CompressOptions, model: Any, tok: Any, timings: Timings) -> _Data:
    """Calibration and evaluation windows, after their lengths are checked against the model's positions."""
    from .data import load_text, tokenize

    check_positions(model, options.seqlen)
    if options.eval:
        check_positions(model, options.eval_seqlen, "eval_seqlen")
    bos = bos_token(tok, model.config)
    with timings.clock("load text"):
        windows = sample_windows(tokenize(tok, load_text(options.calib)), options.nsamples, options.seqlen,
                                 options.seed, bos)
        evals = {s: eval_windows(tokenize(tok, load_text(s)), options.eval_seqlen, options.max_tokens, bos)
                 for s in options.eval}
    return _Data(windows, evals, bos, count_parameters(model))


def _dense_zero_shot(options: CompressOptions, checked: _Checked, run: RunDir, model: Any, tok: Any,
                     timings: Timings) -> list:
    """The dense model's zero-shot rows, a product of the run folder (a resumed run does not score them again)."""
    if not checked.tasks:
        return []
    from .zeroshot import score_rows, zero_shot

    def make(folder: Path) -> list:
        rows = score_rows(zero_shot(model, tok, *checked.tasks, limit=options.limit))
        if distributed.is_writer():
            write_checked_json(folder / "rows.json", rows)
        return rows

    with timings.clock("zero-shot tasks, dense"):
        return run.kept("zero-shot-dense", [options.eval_tasks, options.include_path, options.limit], make,
                        lambda folder: [tuple(r) for r in read_checked_json(folder / "rows.json", "the kept rows")])


def _finish(options: CompressOptions, checked: _Checked, result: Any, tok: Any, data: _Data, dense_rows: list,
            timings: Timings) -> CompressOutcome:
    """Fine-tune, quantize, score and save what ``compress`` gave, as the options ask (the writing process)."""
    report, record, model = result.report, result.record, result.source.model
    if report.calibration:
        report.calibration.update(data=options.calib, seed=options.seed, bos=data.bos is not None)
        record = record.with_parts(calibration=dict(report.calibration))
    model, record, stages = _recover(options, model, tok, data.evals, record, report, timings)
    if checked.tasks:
        from .zeroshot import score_rows, zero_shot

        with timings.clock("zero-shot tasks, compressed"):
            rows = score_rows(zero_shot(model, tok, *checked.tasks, limit=options.limit))
        report.zero_shot = {"dense": dense_rows, "compressed": rows, "limit": options.limit}
        record = record.with_parts(zero_shot={f"{t} {m}": v for t, m, v, _ in rows})
    if options.dtype != "float32" and options.quantize is None and not result.source.streamed:
        with timings.clock(f"evaluate {options.dtype}"):  # the saved model's own figure, not float32's
            _cast_parameters(model, options.dtype)
            report.perplexity[options.dtype] = _window_perplexities(model, data.evals, options.progress)
    final = next((report.perplexity[k] for k in ("quantized", options.dtype, "finetuned", "compressed")
                  if report.perplexity.get(k)), None)
    record = record.with_parts(perplexity=final)
    report.timings = Timings({**timings, **{f"compress: {k}": v for k, v in report.timings.items()}})
    with timings.clock("save"):
        out = save(replace(result, record=record) if model is result.source.model else model, tok, checked.out,
                   record, report=report, dtype=options.dtype, force=options.force,
                   write_extra=(lambda folder: write_loss_curve(stages, folder)) if stages else None)
    report.timings["save"] = timings["save"]
    return CompressOutcome(out, report, record, data.params_before, count_parameters(model), stages)


def _recover(options: CompressOptions, model: Any, tok: Any, evals: dict[str, torch.Tensor], record: SvdllmRecord,
             report: CompressionReport, timings: Timings) -> tuple[Any, SvdllmRecord, list[StageResult]]:
    """LoRA fine-tuning, then quantized factors, each evaluated on the run's evaluation windows, as asked."""
    stages: list[StageResult] = []
    if options.finetune is not None:
        from .finetune import finetune, record_part

        model.to(options.compression.device or default_device())
        with timings.clock("finetune"):
            model, stages = finetune(model, tok, options.finetune, progress=options.progress)
        with timings.clock("evaluate finetuned"):
            report.perplexity["finetuned"] = _window_perplexities(model, evals, options.progress)
        record = record.with_parts(finetune=record_part(options.finetune, stages))
    if options.quantize is not None:
        from .quantize import quantize_model

        with timings.clock("quantize"):
            _cast_parameters(model, options.dtype)
            record = record.with_parts(quantization=quantize_model(model, options.quantize, record))
        with timings.clock("evaluate quantized"):
            report.perplexity["quantized"] = _window_perplexities(model, evals, options.progress)
    return model, record, stages


def _cast_parameters(model: Any, dtype: str) -> None:
    """The parameters in ``dtype``; buffers (RoPE frequencies) keep float32, as a load of the saved folder gives them."""
    for param in model.parameters():
        param.data = param.data.to(getattr(torch, dtype))


def _window_perplexities(model: Any, windows: dict[str, torch.Tensor], progress: bool) -> dict[str, float]:
    """Perplexity on evaluation windows already cut (name → windows × seqlen token ids), as compress reports it."""
    from .evaluate import evaluate_perplexity

    return {name: evaluate_perplexity(model, None, w.flatten(), w.shape[1], None, progress=progress).perplexity
            for name, w in windows.items()}


def write_loss_curve(results: list[StageResult], out: Path) -> None:
    """The fine-tuning losses as JSON, and a plot where matplotlib is installed."""
    from dataclasses import asdict

    from .finetune import plot_losses

    (out / "finetune_losses.json").write_text(json.dumps([asdict(r) for r in results], indent=2) + "\n")
    try:
        plot_losses(results, str(out / "finetune_losses.png"))
    except ImportError:
        log.warning("no loss plot: pip install 'svdllm[plot]' (matplotlib) for one")
