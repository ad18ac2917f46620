"""The other commands as library workflows: ``run_finetune``, ``run_quantize``, ``run_eval``, ``run_generate`` and
``run_bench``, each a function on its options dataclass, as ``run_compression`` is.  Each validates every option
before any model is loaded; the CLI maps its flags to these options and prints what they return.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .checkpoint import OutputLock
from .errors import FormatError, OptionError
from .finetune import FinetuneConfig, StageResult
from .quantize import QuantizeOptions
from .distributed import default_device
from .workflow import EVAL_DEFAULT

DEFAULT_PROMPT_TOKENS = 16  # bench: a prompt cut from wiki-test


@dataclass
class EvalTexts:
    """Evaluation texts and their windows, shared by every command that reports perplexity."""

    data: tuple[str, ...] = EVAL_DEFAULT  # '' or () skips
    seqlen: int = 512
    max_tokens: int | None = 8192

    def validate(self) -> None:
        from .data import check_spec

        if self.seqlen < 2:
            raise OptionError("eval_seqlen", f"must be at least 2 tokens, got {self.seqlen}")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise OptionError("max_tokens", f"must be positive, got {self.max_tokens}")
        for spec in self.data:
            check_spec(spec)


def perplexities(model: Any, tok: Any, texts: EvalTexts, progress: bool = True) -> dict[str, float]:
    """Perplexity of each evaluation text, cut into windows exactly as ``svdllm compress`` cuts them."""
    from .architecture import check_positions
    from .data import bos_token, eval_windows, load_text, tokenize
    from .evaluate import window_perplexities

    if texts.data:
        check_positions(model, texts.seqlen, "eval_seqlen")
    bos = bos_token(tok, model.config)
    windows = {s: eval_windows(tokenize(tok, load_text(s)), texts.seqlen, texts.max_tokens, bos) for s in texts.data}
    return window_perplexities(model, windows, progress)


# ---------------------------------------------------------------- finetune


@dataclass
class FolderCommand:
    """What every command that reads a model and writes a new folder takes."""

    model: str
    out: str
    eval: EvalTexts = field(default_factory=EvalTexts)  # perplexity before and after
    device: str | None = None
    force: bool = False  # replace an output folder svdllm wrote
    progress: bool = True


@dataclass
class FinetuneOptions(FolderCommand):
    """``model``: a folder written by svdllm compress."""

    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)


@dataclass
class FinetuneOutcome:
    out: Path
    stages: list[StageResult]
    before: dict[str, float]
    after: dict[str, float]


def run_finetune(options: FinetuneOptions) -> FinetuneOutcome:
    """LoRA on the Wu then Wv factors of a compressed folder, merged back, evaluated before and after, saved."""
    from .data import check_spec
    from .finetune import finetune, record_part
    from .folder import check_out_dir, read_record, save
    from .source import load_model
    from .workflow import write_loss_curve

    options.finetune.validate()
    options.eval.validate()
    check_spec(options.finetune.data)
    out = check_out_dir(options.out, options.force)
    record = read_record(options.model)
    if record.quantization:
        raise OptionError("model", f"{options.model} has quantized weights: fine-tune before quantizing (compress "
                          "with `finetune` and `quantize` does both in that order)")
    with OutputLock(out):
        model, tok = load_model(options.model, device=default_device(options.device))
        before = perplexities(model, tok, options.eval, options.progress)
        model, stages = finetune(model, tok, options.finetune, progress=options.progress)
        after = perplexities(model, tok, options.eval, options.progress)
        record = record.with_parts(finetune=record_part(options.finetune, stages), perplexity=after or None)
        save(model, tok, out, record, force=options.force,
             write_extra=lambda folder: write_loss_curve(stages, folder))
    return FinetuneOutcome(out, stages, before, after)


# ---------------------------------------------------------------- quantize


@dataclass
class QuantizeFolderOptions(FolderCommand):
    """``model``: a folder written by svdllm (or, with ``quantize.dense``, any model)."""

    quantize: QuantizeOptions = field(default_factory=QuantizeOptions)
    dtype: str = "bfloat16"  # of everything left in floating point, scales included


@dataclass
class QuantizeOutcome:
    out: Path
    part: dict[str, Any]  # the record's quantization section
    bytes_before: int
    bytes_after: int
    before: dict[str, float]
    after: dict[str, float]


def run_quantize(options: QuantizeFolderOptions) -> QuantizeOutcome:
    """int8/int4/int2 factors (and, as asked, dense linears) of a saved model, evaluated before and after, saved."""
    from .folder import DTYPES, check_out_dir, save
    from .generation import weight_bytes
    from .quantize import quantize_model, require_library
    from .source import load_model

    options.quantize.validate()
    options.eval.validate()
    if options.dtype not in DTYPES:
        raise OptionError("dtype", f"must be one of {', '.join(DTYPES)}, got {options.dtype!r}")
    require_library()  # before any model is loaded
    out = check_out_dir(options.out, options.force)
    record = _record_to_quantize(options.model, options.quantize)
    with OutputLock(out):
        model, tok = load_model(options.model, dtype=DTYPES[options.dtype], device=default_device(options.device))
        bytes_before, before = weight_bytes(model), perplexities(model, tok, options.eval, options.progress)
        part = quantize_model(model, options.quantize, record)
        bytes_after, after = weight_bytes(model), perplexities(model, tok, options.eval, options.progress)
        save(model, tok, out, record.with_parts(quantization=part, perplexity=after or record.perplexity),
             force=options.force)
    return QuantizeOutcome(out, part, bytes_before, bytes_after, before, after)


def _record_to_quantize(model: str, options: QuantizeOptions) -> Any:
    from .folder import read_record
    from .record import SvdllmRecord

    try:
        record = read_record(model)
    except FormatError:  # not an svdllm folder: a dense model, or a name load_model resolves
        if not options.dense:
            raise OptionError("model", f"{model} is not compressed by svdllm: compress it first, or quantize its "
                              "dense linears with `quantize.dense` ['*']") from None
        record = SvdllmRecord(ranks={})
    if record.quantization:
        raise OptionError("model", f"{model}: the model's weights are already quantized")
    return record


# ---------------------------------------------------------------- eval


@dataclass
class EvalOptions:
    model: str
    eval: EvalTexts = field(default_factory=EvalTexts)
    tasks: str = ""  # lm-eval tasks, comma-separated
    include_path: str | None = None
    limit: int | None = None
    device: str | None = None
    json: str | None = None  # write the result here (with tasks: lm-eval's whole output too)
    progress: bool = True


def run_eval(options: EvalOptions) -> dict[str, Any]:
    """Perplexity, parameters, weight bytes and (as asked) lm-eval scores of a model."""
    from .architecture import count_parameters
    from .folder import check_new_file
    from .generation import weight_bytes
    from .source import load_model
    from .zeroshot import resolve_tasks

    options.eval.validate()
    if options.json:
        check_new_file(options.json, "json")
    tasks = resolve_tasks(options.tasks, options.include_path, "tasks") if options.tasks.strip() or \
        options.include_path else None
    model, tok = load_model(options.model, device=default_device(options.device))
    result: dict[str, Any] = {"model": options.model, "perplexity": perplexities(model, tok, options.eval,
                                                                                  options.progress),
                              "parameters": count_parameters(model), "seqlen": options.eval.seqlen,
                              "max_tokens": options.eval.max_tokens, "weight_bytes": weight_bytes(model)}
    if tasks:
        from .zeroshot import zero_shot

        result["lm_eval"] = zero_shot(model, tok, *tasks, limit=options.limit)
    if options.json:
        from .files import atomic_write_text

        atomic_write_text(Path(options.json), json.dumps(result, indent=2, default=str) + "\n")
    return result


# ---------------------------------------------------------------- generate


@dataclass
class GenerateOptions:
    model: str
    prompt: str
    max_new_tokens: int = 40
    sample: bool = False  # sample instead of greedy decoding
    seed: int = 0
    device: str | None = None
    fast: bool = False  # static KV cache and a compiled decode step
    latent_cache: bool = False  # rank-r latents of low-rank k_proj/v_proj in the KV cache


@dataclass
class GenerateOutcome:
    text: str
    notes: list[str]  # what the run chose on the way (the cache it used), one line each


def run_generate(options: GenerateOptions) -> GenerateOutcome:
    from .architecture import check_positions
    from .runtime import LatentCache, cache_argument, cache_bytes_per_token
    from .source import load_model

    if options.fast and options.latent_cache:
        raise OptionError("fast", "does not combine with `latent_cache`: the latent cache grows, the static one "
                          "is fixed")
    if not options.prompt:
        raise OptionError("prompt", "is empty")
    if options.max_new_tokens < 1:
        raise OptionError("max_new_tokens", f"must be positive, got {options.max_new_tokens}")
    torch.manual_seed(options.seed)
    model, tok = load_model(options.model, device=default_device(options.device))
    ids = tok(options.prompt, return_tensors="pt").to(next(model.parameters()).device)
    if ids["input_ids"].shape[1] == 0:
        raise OptionError("prompt", "has no tokens")
    check_positions(model, ids["input_ids"].shape[1] + options.max_new_tokens, "max_new_tokens")
    extra: dict[str, Any] = {}
    notes: list[str] = []
    if options.fast:
        from .generation import fast_options

        extra |= fast_options(model)
    if options.latent_cache:
        try:
            extra[cache_argument(model)] = LatentCache(model)
        except ValueError as exc:  # the model has no low-rank k/v: the reason, in one line
            notes.append(f"{exc}; using the ordinary cache")
        else:
            dense, latent = cache_bytes_per_token(model, False), cache_bytes_per_token(model, True)
            notes.append(f"KV cache {latent} bytes/token latent against {dense} dense ({latent / dense:.3f}x)")
    out = model.generate(**ids, max_new_tokens=options.max_new_tokens, do_sample=options.sample,
                         pad_token_id=tok.pad_token_id or tok.eos_token_id, **extra)
    return GenerateOutcome(tok.decode(out[0], skip_special_tokens=True), notes)


# ---------------------------------------------------------------- bench


@dataclass
class BenchOptions:
    model: str
    dense: str | None = None  # the uncompressed model to compare with
    fast: bool = False  # also through the fast path (static cache, compiled decode)
    new_tokens: int = 64
    repeats: int = 3
    device: str | None = None
    json: str | None = None


def run_bench(options: BenchOptions) -> dict[str, dict[str, float]]:
    """Batch-1 greedy decode speed and weight bytes per model (and the speed-up over ``dense`` with its limit)."""
    from .data import load_text, tokenize
    from .folder import check_new_file
    from .generation import bytes_read_per_token, decode_speed, weight_bytes
    from .source import load_model

    for name in ("new_tokens", "repeats"):
        if getattr(options, name) < 1:
            raise OptionError(name, f"must be at least 1, got {getattr(options, name)}")
    if options.json:
        check_new_file(options.json, "json")
    models, tok = {}, None
    for spec in [options.model] + ([options.dense] if options.dense else []):
        models[spec], tok = load_model(spec, device=default_device(options.device))
    prompt = tokenize(tok, load_text("wiki-test"))[:DEFAULT_PROMPT_TOKENS]
    paths = {"eager": decode_speed(models, prompt, options.new_tokens, options.repeats, fast=False)}
    if options.fast:
        paths["fast"] = decode_speed(models, prompt, options.new_tokens, options.repeats, fast=True)
    rows = {spec: {"weight_bytes": weight_bytes(m), "bytes_read_per_token": bytes_read_per_token(m),
                   **{f"{p}_tok_s": speed[spec] for p, speed in paths.items()}} for spec, m in models.items()}
    if options.dense:
        c, d = rows[options.model], rows[options.dense]
        rows["speed_up"] = {p: c[f"{p}_tok_s"] / d[f"{p}_tok_s"] for p in paths} | \
            {"limit": d["bytes_read_per_token"] / c["bytes_read_per_token"]}
    if options.json:
        from .files import atomic_write_text

        atomic_write_text(Path(options.json), json.dumps(rows, indent=2) + "\n")
    return rows
