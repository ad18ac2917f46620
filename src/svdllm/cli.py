"""Command line: flags in, options out.  Every decision is the library's (``svdllm.workflow``); this module maps
flags to options, prints what the library returns, and maps the options named in errors back to flags."""
from __future__ import annotations

import argparse
import json
import logging
import os
import re
import signal
import sys
from pathlib import Path
from typing import Any

EVAL_DEFAULT = "wiki-test,news"


def _ratio(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"must be in (0, 1), got {value}")
    return value


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    return value


def _layers(text: str) -> list[int]:
    """'0,3-5' → [0, 3, 4, 5]; '-1' is the last block (the library resolves negative indices)."""
    out: list[int] = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        lo, sep, hi = part.partition("-") if not part.startswith("-") else (part, "", "")
        try:
            idx = list(range(int(lo), int(hi) + 1)) if sep else [int(lo)]
        except ValueError:
            raise argparse.ArgumentTypeError(f"bad layer list {text!r} (use e.g. '0,29' or '0-2')") from None
        if not idx:
            raise argparse.ArgumentTypeError(f"the range {part!r} is empty (write the lower block first)")
        out += [i for i in idx if i not in out]
    return out


def _globs(text: str) -> list[str]:
    return [p.strip() for p in text.split(",") if p.strip()]


def _patterns(text: str) -> list[str]:
    """Every comma-separated pattern, an empty one kept so that the library refuses it."""
    return [p.strip() for p in text.split(",")]


def _specs(text: str) -> tuple[str, ...]:
    return tuple(s.strip() for s in text.split(",") if s.strip())


def _zero_shot_options(p: argparse.ArgumentParser, flag: str) -> None:
    g = p.add_argument_group("zero-shot accuracy (lm-evaluation-harness: pip install 'svdllm[eval]')")
    g.add_argument(flag, default="", help="lm-eval tasks, comma-separated: 'offline' (svdllm_cloze, "
                   "svdllm_next_sentence: built from the offline texts), 'paper' (the paper's seven; needs the hub), "
                   "or any lm-eval task name")
    g.add_argument("--include-path", default=None, help="a folder of your own lm-eval task YAMLs")
    g.add_argument("--limit", type=_positive, default=None, help="at most N examples per task (quick runs)")


def _common_eval(p: argparse.ArgumentParser, seqlen: bool = True) -> None:
    if seqlen:
        p.add_argument("--seqlen", type=_positive, default=512, help="window length in tokens (default 512)")
    p.add_argument("--max-tokens", type=_positive, default=8192, help="tokens read per evaluation set (default 8192)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")


def _finetune_options(p: argparse.ArgumentParser, prefix: str = "") -> None:
    from .finetune import FinetuneConfig

    d = FinetuneConfig()
    g = p.add_argument_group("fine-tuning" + (" (with --finetune)" if prefix else ""))
    g.add_argument(f"--{prefix}order", default=d.order, choices=["u-first", "v-first"])
    g.add_argument(f"--{prefix}lora-r", type=int, default=d.lora_r)
    g.add_argument(f"--{prefix}lora-alpha", type=int, default=d.lora_alpha)
    g.add_argument(f"--{prefix}lr", type=_number, default=d.lr)
    g.add_argument(f"--{prefix}steps", type=int, default=d.steps, help="optimizer steps per stage")
    g.add_argument(f"--{prefix}batch-size", type=int, default=d.batch_size)
    g.add_argument(f"--{prefix}seqlen" if prefix else "--seqlen", type=int, default=d.seqlen)
    g.add_argument(f"--{prefix}dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="training dtype (default float32 on CPU, bfloat16 on GPU; float16 is refused)")
    g.add_argument(f"--{prefix}keep-best", action="store_true", help="undo a stage that worsens validation perplexity")
    if not prefix:
        g.add_argument("--seed", type=int, default=d.seed)


def _finetune_config(args: argparse.Namespace, prefix: str = "", data: str | None = None) -> Any:
    from .finetune import FinetuneConfig

    a, key = vars(args), prefix.replace("-", "_")
    return FinetuneConfig(data=data or args.data, seed=args.seed, **{f: a[f"{key}{f}"] for f in (
        "order", "lora_r", "lora_alpha", "lr", "steps", "batch_size", "seqlen", "dtype", "keep_best")})


def build_parser() -> argparse.ArgumentParser:
    from .methods import METHODS

    parser = argparse.ArgumentParser(prog="svdllm", description="Compress LLMs with SVD-LLM and friends.")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error (or SVDLLM_DEBUG=1)")
    sub = parser.add_subparsers(dest="command", required=True)

    c = sub.add_parser("compress", help="compress a model, report perplexity, save it")
    c.add_argument("model", nargs="?", default="smollm2-135m", help="named model, folder, .gguf or hub id")
    c.add_argument("--ratio", type=_ratio, default=0.2, help="parameter reduction per matrix, in (0, 1)")
    c.add_argument("--method", default="svdllm-ec", help=f"one of {', '.join(METHODS)} (default svdllm-ec)")
    c.add_argument("--calib", default="wiki-train", help="calibration DATA (default wiki-train)")
    c.add_argument("--nsamples", type=int, default=32, help="calibration windows (default 32)")
    c.add_argument("--seqlen", type=int, default=512, help="calibration window length in tokens (default 512)")
    c.add_argument("--seed", type=int, default=0, help="seeds the calibration sampling")
    m = c.add_argument_group("method options (each applies to the methods named)")
    m.add_argument("--beta", type=float, default=None,
                   help="svdllm-ec: target blend in [0, 1] (1 = dense inputs; default 0.25)")
    m.add_argument("--norm-cap", type=float, default=None,
                   help="svdllm-ec: halve β for a matrix while ||W'|| > cap·||W|| (default 1.5; 0 turns it off)")
    m.add_argument("--damp", type=float, default=None, help="svdllm-w, svdllm: whitening ridge (default 0: only when needed)")
    m.add_argument("--output-whitening", action=argparse.BooleanOptionalAction, default=None,
                   help="svdllm-w, svdllm, svdllm-ec: whiten the output side too, with the Gram of the loss's gradient "
                        "at each output (K-FAC, docs/output-aware.md; default: on for svdllm-ec, off for the others)")
    m.add_argument("--output-damp", type=_number, default=None,
                   help="with --output-whitening: ridge on that Gram, relative to its mean diagonal (default 0.01)")
    m.add_argument("--output-full-width", type=int, default=None,
                   help="with --output-whitening: outputs wider than this keep the Gram's diagonal only (default 8192; "
                        "a full Gram costs width²×8 bytes)")
    m.add_argument("--output-shrinkage", type=float, default=None,
                   help="with --output-whitening: weight in [0, 1] of the scaled identity in each full output Gram "
                        "(default: outputs/(outputs + calibration tokens); 0: the Gram alone, as 0.8.0)")
    m.add_argument("--asvd-alpha", type=_number, default=None, help="asvd: activation exponent (default 0.5)")
    c.add_argument("--ranks", default="auto", choices=["auto", "uniform", "fisher"],
                   help="rank per matrix: uniform (the paper), or allocated under the same parameter budget from the "
                        "whitened spectra weighted by the loss's sensitivity to each output (fisher); auto (default): "
                        "fisher for svdllm-ec (in memory, --low-memory and torchrun alike), else uniform")
    c.add_argument("--true-sequential", action=argparse.BooleanOptionalAction, default=True,
                   help="svdllm, svdllm-ec: fit q/k/v, then o, then gate/up, then down, each on the inputs the "
                        "already compressed ones produce (default; --no-true-sequential fits a block's linears at once)")
    c.add_argument("--rank-floor", type=float, default=0.5, help="allocated ranks stay ≥ floor × uniform (default 0.5)")
    c.add_argument("--rank-cap", type=float, default=2.0, help="allocated ranks stay ≤ cap × uniform (default 2)")
    c.add_argument("--targets", default="*", help="globs over module names, e.g. '*mlp*'")
    c.add_argument("--skip-layers", type=_layers, default=[], help="blocks to leave dense, e.g. '0,29' or '0-2'")
    c.add_argument("--batch-size", type=int, default=None,
                   help="windows per forward (default 4 in memory, 1 with --low-memory)")
    c.add_argument("--offload", default="auto", choices=["auto", "none", "cpu", "disk"],
                   help="where activations wait between blocks: none (on the device), cpu, disk; auto (default): on "
                        "the device, or on disk with --low-memory")
    c.add_argument("--low-memory", action="store_true", default=None,
                   help="never hold the whole model: read one block at a time from the safetensors shards "
                        "(automatic when the weights exceed half the available memory)")
    c.add_argument("--trust-remote-code", action="store_true",
                   help="let the model folder's own Python code (config.json's auto_map) run; off: it never runs")
    c.add_argument("--dist-timeout", type=_positive, default=1800,
                   help="under torchrun: seconds a process waits for the others before the run fails (default 1800)")
    c.add_argument("--resume", action="store_true",
                   help="continue an interrupted run of the same command (rerunning it does too)")
    c.add_argument("--eval", default=EVAL_DEFAULT, help=f"evaluation DATA, comma-separated (default {EVAL_DEFAULT}); '' skips")
    c.add_argument("--eval-seqlen", type=int, default=512, help="evaluation window length (default 512)")
    c.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="saved dtype")
    c.add_argument("--out", default=None, help="output folder (default out/MODEL-METHOD-RATIO)")
    c.add_argument("--force", action="store_true", help="replace a non-empty --out")
    c.add_argument("--finetune", action="store_true", help="then run the LoRA recovery step (see `finetune`)")
    c.add_argument("--quantize", type=int, default=None, choices=[8, 4, 2], metavar="BITS",
                   help="then quantize the factors to 8, 4 or 2 bits (see `quantize`; --dtype bfloat16 for the "
                        "smallest folder)")
    c.add_argument("--quantize-group-size", type=int, default=128, help="with --quantize 4 (default 128)")
    _common_eval(c, seqlen=False)
    _zero_shot_options(c, "--eval-tasks")
    _finetune_options(c, prefix="ft-")

    f = sub.add_parser("finetune", help="LoRA on the Wu then Wv factors of a compressed model, merged back")
    f.add_argument("model", help="a folder written by svdllm compress")
    f.add_argument("--data", default="wiki-train", help="training DATA (.txt, .jsonl with text or Alpaca rows)")
    f.add_argument("--out", required=True)
    f.add_argument("--force", action="store_true")
    f.add_argument("--eval", default=EVAL_DEFAULT, help="evaluation DATA before and after; '' skips")
    f.add_argument("--eval-seqlen", type=int, default=512, help="evaluation window (default 512, as compress)")
    _common_eval(f, seqlen=False)
    _finetune_options(f)

    e = sub.add_parser("eval", help="perplexity of a model")
    e.add_argument("model")
    e.add_argument("--data", default=EVAL_DEFAULT, help="comma-separated DATA")
    e.add_argument("--json", default=None, help="write results here (with --tasks: lm-eval's whole output too)")
    _common_eval(e)
    _zero_shot_options(e, "--tasks")

    g = sub.add_parser("generate", help="greedy or sampled generation")
    g.add_argument("model")
    g.add_argument("prompt")
    g.add_argument("--max-new-tokens", type=int, default=40)
    g.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--device", default=None)
    g.add_argument("--fast", action="store_true",
                   help="static KV cache and a compiled decode step (torch.compile; the first call compiles)")
    g.add_argument("--latent-cache", action="store_true",
                   help="keep the rank-r latents of low-rank k_proj/v_proj in the KV cache instead of keys and values")

    b = sub.add_parser("bench", help="batch-1 decode speed and weight bytes, against a dense model and its limit")
    b.add_argument("model")
    b.add_argument("--dense", default=None, help="the uncompressed model to compare with (MODEL)")
    b.add_argument("--fast", action="store_true", help="also through the fast path (static cache, compiled decode)")
    b.add_argument("--new-tokens", type=int, default=64)
    b.add_argument("--repeats", type=int, default=3)
    b.add_argument("--device", default=None)
    b.add_argument("--json", default=None, help="write the figures here")

    q = sub.add_parser("quantize", help="int8/int4/int2 weights for the factors of a compressed model (optimum-quanto)")
    q.add_argument("model", help="a folder written by svdllm (or, with --dense, any model)")
    q.add_argument("--bits", type=int, required=True, choices=[8, 4, 2])
    q.add_argument("--group-size", type=int, default=128,
                   help="4 and 2 bits: weights per scale and shift along a row (default 128; smaller where it does "
                        "not divide a factor's width)")
    q.add_argument("--dense", default="", help="globs over dense linears in the decoder blocks to quantize too, "
                                               "e.g. '*' (every one: quantization alone)")
    q.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"],
                   help="dtype of everything left in floating point, scales included (default bfloat16)")
    q.add_argument("--out", required=True)
    q.add_argument("--force", action="store_true", help="replace a non-empty --out")
    q.add_argument("--eval", default=EVAL_DEFAULT, help="evaluation DATA before and after; '' skips")
    _common_eval(q)

    i = sub.add_parser("info", help="the svdllm section and per-module ranks of a saved model")
    i.add_argument("model")
    i.add_argument("--plot", default=None, help="also draw the kept fraction per block and projection to this PNG")
    return parser


def cmd_compress(args: argparse.Namespace) -> int:
    from .methods import options_for
    from .pipeline import CompressionConfig
    from .quantize import QuantizeOptions
    from .workflow import CompressOptions, run_compression

    method = options_for(args.method, beta=args.beta, norm_cap=args.norm_cap, damp=args.damp,
                         asvd_alpha=args.asvd_alpha, output_whitening=args.output_whitening,
                         output_damp=args.output_damp, output_full_width=args.output_full_width,
                         output_shrinkage=args.output_shrinkage)
    config = CompressionConfig(method=method, ratio=args.ratio, targets=_patterns(args.targets),
                               skip_layers=args.skip_layers, rank_rule=args.ranks, rank_floor=args.rank_floor,
                               rank_cap=args.rank_cap, batch_size=args.batch_size, device=args.device,
                               offload=args.offload, true_sequential=args.true_sequential)
    options = CompressOptions(
        model=args.model, compression=config, calib=args.calib, nsamples=args.nsamples, seqlen=args.seqlen,
        seed=args.seed, eval=_specs(args.eval), eval_seqlen=args.eval_seqlen, max_tokens=args.max_tokens,
        eval_tasks=args.eval_tasks, include_path=args.include_path, limit=args.limit, low_memory=args.low_memory,
        resume=args.resume, dist_timeout=args.dist_timeout, trust_remote_code=args.trust_remote_code,
        dtype=args.dtype, out=args.out, force=args.force,
        finetune=_finetune_config(args, "ft-", data=args.calib) if args.finetune else None,
        quantize=QuantizeOptions(args.quantize, args.quantize_group_size) if args.quantize else None,
        progress=not args.quiet)
    outcome = run_compression(options)
    from . import distributed

    if distributed.is_writer():
        _print_summary(args, outcome)
    return 0


def _print_summary(args: argparse.Namespace, outcome: Any) -> None:
    from .folder import is_svdllm_folder

    report, p0, p1 = outcome.report, outcome.params_before, outcome.params_after
    before, after = report.perplexity.get("dense", {}), outcome.record.perplexity or {}
    given = "before" if Path(args.model).is_dir() and is_svdllm_folder(Path(args.model)) else "dense"  # the input
    print(f"\nsvdllm compress {args.model}: method {args.method}, ratio {args.ratio}, {report.plan.get('n_blocks')} "
          f"blocks, {outcome.record.rank_rule} ranks, calibration {args.nsamples}×{args.seqlen} tokens of {args.calib}, "
          f"seed {args.seed}")
    if before:
        label = f"compressed, int{args.quantize} factors" if report.perplexity.get("quantized") else \
            f"compressed, {args.dtype}" if report.perplexity.get(args.dtype) else "compressed"
        print(f"\n| perplexity ({args.eval_seqlen}-token windows, ≤{args.max_tokens} tokens) | {given} | {label} | "
              "change |")
        print("|---|---:|---:|---:|")
        for k in before:
            print(f"| {k} | {before[k]:.2f} | {after[k]:.2f} | {100 * (after[k] / before[k] - 1):+.1f}% |")
    if report.zero_shot:
        from .zeroshot import markdown

        print(f"\nzero-shot (lm-eval{f', --limit {args.limit}' if args.limit else ''}):\n")
        print(markdown({k: report.zero_shot[k] for k in ("dense", "compressed")}))
    print(f"\n| parameters | {given} | compressed | reduction |\n|---|---:|---:|---:|")
    print(f"| whole model | {p0:,} | {p1:,} | {100 * (1 - p1 / p0):.1f}% |")
    lb, la = report.linear_params_before, report.linear_params_after
    print(f"| compressed linears | {lb:,} | {la:,} | {100 * (1 - la / max(lb, 1)):.1f}% |")
    print("\n| phase | seconds |\n|---|---:|")
    for k, v in report.timings.items():
        print(f"| {k.replace('compress: ', '&nbsp;&nbsp;')} | {v:.1f} |")
    if report.remedies:
        print(f"\n{len(report.remedies)} singular statistics repaired (see svdllm_report.json)")
    print(f"\nsaved to {outcome.out}")


def _perplexities(model: Any, tok: Any, specs: tuple[str, ...], seqlen: int, max_tokens: int, quiet: bool,
                  cache: dict) -> dict[str, float]:
    from .data import load_text, tokenize
    from .evaluate import evaluate_perplexity

    out = {}
    for spec in specs:
        if spec not in cache:
            cache[spec] = tokenize(tok, load_text(spec))
        out[spec] = evaluate_perplexity(model, tok, cache[spec], seqlen, max_tokens, progress=not quiet).perplexity
    return out


def cmd_finetune(args: argparse.Namespace) -> int:
    from .checkpoint import OutputLock
    from .folder import check_out_dir

    ft = _finetune_config(args)
    ft.validate()
    out = check_out_dir(args.out, args.force)
    with OutputLock(out):
        return _finetune_into(args, ft, out)


def _finetune_into(args: argparse.Namespace, ft: Any, out: Path) -> int:
    from .data import check_spec
    from .finetune import finetune, record_part
    from .folder import read_record, save
    from .source import load_model
    from .workflow import default_device, write_loss_curve

    record = read_record(args.model)
    if record.quantization:
        raise ValueError(f"{args.model} has quantized weights: fine-tune before quantizing (compress --finetune "
                         "--quantize does both in that order)")
    evals = _specs(args.eval)
    for spec in [ft.data, *evals]:
        check_spec(spec)
    model, tok = load_model(args.model, device=default_device(args.device))
    before = _perplexities(model, tok, evals, args.eval_seqlen, args.max_tokens, args.quiet, {})
    model, stages = finetune(model, tok, ft, progress=not args.quiet)
    for r in stages:
        flag = "" if r.kept else " (reverted by --keep-best)"
        print(f"LoRA on {r.stage}: validation perplexity {r.val_before:.3f} -> {r.val_after:.3f}{flag}; "
              f"training loss {r.losses[0]:.3f} -> {r.losses[-1]:.3f}")
    after = _perplexities(model, tok, evals, args.eval_seqlen, args.max_tokens, args.quiet, {})
    for k in after:
        print(f"{k}: perplexity {before[k]:.3f} -> {after[k]:.3f}")
    record = record.with_parts(finetune=record_part(ft, stages), perplexity=after or None)
    save(model, tok, out, record, force=args.force, write_extra=lambda folder: write_loss_curve(stages, folder))
    print(f"saved to {out}")
    return 0


def cmd_quantize(args: argparse.Namespace) -> int:
    from .checkpoint import OutputLock
    from .folder import check_out_dir
    from .quantize import QuantizeOptions, require_library

    options = QuantizeOptions(bits=args.bits, group_size=args.group_size, dense=tuple(_globs(args.dense)))
    options.validate()
    require_library()  # before any model is loaded
    out = check_out_dir(args.out, args.force)
    with OutputLock(out):
        return _quantize_into(args, options, out)


def _quantize_into(args: argparse.Namespace, options: Any, out: Path) -> int:
    import torch

    from .data import check_spec
    from .errors import FormatError
    from .folder import read_record, save
    from .generation import weight_bytes
    from .quantize import quantize_model
    from .record import SvdllmRecord
    from .source import load_model
    from .workflow import default_device

    try:
        record = read_record(args.model)
    except FormatError:  # not an svdllm folder: a dense model, or a name load_model resolves
        if not options.dense:
            raise ValueError(f"{args.model} is not compressed by svdllm: compress it first, or quantize its dense "
                             "linears with --dense '*'") from None
        record = SvdllmRecord(ranks={})
    if record.quantization:
        raise ValueError(f"{args.model}: the model's weights are already quantized")
    evals = _specs(args.eval)
    for spec in evals:
        check_spec(spec)
    model, tok = load_model(args.model, dtype=getattr(torch, args.dtype), device=default_device(args.device))
    tokens: dict = {}
    before_bytes = weight_bytes(model)
    before = _perplexities(model, tok, evals, args.seqlen, args.max_tokens, args.quiet, tokens)
    part = quantize_model(model, options, record)
    after_bytes = weight_bytes(model)
    after = _perplexities(model, tok, evals, args.seqlen, args.max_tokens, args.quiet, tokens)
    groups = sorted({str(m["group_size"] or "row") for m in part["modules"].values()}) if args.bits < 8 else []
    print(f"\nsvdllm quantize {args.model}: {len(part['modules'])} linears to int{args.bits} with "
          f"{part['library']} {part['library_version']}" + (f", groups {', '.join(groups)}" if groups else ""))
    print(f"\n| | {args.dtype} | int{args.bits} | change |\n|---|---:|---:|---:|")
    print(f"| weight bytes | {before_bytes:,} | {after_bytes:,} | {100 * (after_bytes / before_bytes - 1):+.1f}% |")
    for k in before:
        print(f"| perplexity {k} | {before[k]:.2f} | {after[k]:.2f} | {100 * (after[k] / before[k] - 1):+.1f}% |")
    save(model, tok, out, record.with_parts(quantization=part, perplexity=after or record.perplexity),
         force=args.force)
    print(f"\nsaved to {out}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from .architecture import count_parameters
    from .generation import weight_bytes
    from .data import check_spec
    from .folder import check_new_file
    from .source import load_model
    from .workflow import default_device

    specs = _specs(args.data)
    for spec in specs:
        check_spec(spec)
    if args.json:
        check_new_file(args.json, "json")
    tasks = _tasks(args.tasks, args.include_path)
    model, tok = load_model(args.model, device=default_device(args.device))
    ppl = _perplexities(model, tok, specs, args.seqlen, args.max_tokens, args.quiet, {})
    result: dict[str, Any] = {"model": args.model, "perplexity": ppl, "parameters": count_parameters(model),
                              "seqlen": args.seqlen, "max_tokens": args.max_tokens}
    for k, v in ppl.items():
        print(f"{k}: perplexity {v:.3f}")
    result["weight_bytes"] = weight_bytes(model)
    print(f"parameters: {result['parameters']:,}")
    print(f"weight bytes: {result['weight_bytes']:,} ({result['weight_bytes'] / 2**20:.1f} MiB)")
    if tasks:
        from .zeroshot import markdown, score_rows, zero_shot

        result["lm_eval"] = zero_shot(model, tok, *tasks, limit=args.limit)
        print("\n" + markdown({"value": score_rows(result["lm_eval"])}))
    if args.json:
        from .files import atomic_write_text

        atomic_write_text(Path(args.json), json.dumps(result, indent=2, default=str) + "\n")
    return 0


def _tasks(spec: str, include_path: str | None) -> tuple[list[str], Any] | None:
    """lm-eval task names and manager for ``--tasks``/``--eval-tasks``, checked before any model is loaded."""
    if not spec.strip():
        if include_path:
            raise ValueError("--include-path needs --tasks naming the tasks to run")
        return None
    from .zeroshot import resolve_tasks

    return resolve_tasks(spec, include_path)


def cmd_generate(args: argparse.Namespace) -> int:
    import torch

    from .runtime import LatentCache, cache_argument, cache_bytes_per_token
    from .source import load_model
    from .workflow import default_device

    if args.fast and args.latent_cache:
        raise ValueError("--fast and --latent-cache do not combine: the latent cache grows, the static cache is fixed")
    if not args.prompt:
        raise ValueError("the prompt is empty")
    torch.manual_seed(args.seed)
    model, tok = load_model(args.model, device=default_device(args.device))
    ids = tok(args.prompt, return_tensors="pt").to(next(model.parameters()).device)
    if ids["input_ids"].shape[1] == 0:
        raise ValueError("the prompt has no tokens")
    from .evaluate import check_positions

    check_positions(model, ids["input_ids"].shape[1] + args.max_new_tokens, "max_new_tokens")
    extra: dict[str, Any] = {}
    if args.fast:
        from .generation import fast_options

        extra |= fast_options(model)
    if args.latent_cache:
        try:
            extra[cache_argument(model)] = LatentCache(model)
        except ValueError as exc:  # the reason, in one line
            print(f"svdllm generate: {exc}; using the ordinary cache", file=sys.stderr)
        else:
            dense, latent = cache_bytes_per_token(model, False), cache_bytes_per_token(model, True)
            print(f"svdllm generate: KV cache {latent} bytes/token latent against {dense} dense "
                  f"({latent / dense:.3f}x)", file=sys.stderr)
    out = model.generate(**ids, max_new_tokens=args.max_new_tokens, do_sample=args.sample,
                         pad_token_id=tok.pad_token_id or tok.eos_token_id, **extra)
    print(tok.decode(out[0], skip_special_tokens=True))
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from .data import load_text, tokenize
    from .generation import bytes_read_per_token, decode_speed, weight_bytes
    from .folder import check_new_file
    from .source import load_model
    from .workflow import default_device

    if args.new_tokens < 1 or args.repeats < 1:
        raise ValueError("--new-tokens and --repeats must be at least 1")
    if args.json:
        check_new_file(args.json, "json")
    models, tok = {}, None
    for spec in [args.model] + ([args.dense] if args.dense else []):
        models[spec], tok = load_model(spec, device=default_device(args.device))
    prompt = tokenize(tok, load_text("wiki-test"))[:16]
    paths = {"eager": decode_speed(models, prompt, args.new_tokens, args.repeats, fast=False)}
    if args.fast:
        paths["fast"] = decode_speed(models, prompt, args.new_tokens, args.repeats, fast=True)
    rows = {spec: {"weight_bytes": weight_bytes(m), "bytes_read_per_token": bytes_read_per_token(m),
                   **{f"{p}_tok_s": speed[spec] for p, speed in paths.items()}} for spec, m in models.items()}
    print(f"batch-1 greedy decode, {args.new_tokens} tokens after a 16-token prompt, median of {args.repeats}\n")
    print("| model | weights MiB | read per token MiB | " + " | ".join(f"{p} tok/s" for p in paths) + " |")
    print("|---|---:|---:|" + "---:|" * len(paths))
    for spec, r in rows.items():
        print(f"| {spec} | {r['weight_bytes'] / 2**20:.1f} | {r['bytes_read_per_token'] / 2**20:.1f} | "
              + " | ".join(f"{r[f'{p}_tok_s']:.1f}" for p in paths) + " |")
    if args.dense:
        c, d = rows[args.model], rows[args.dense]
        limit = d["bytes_read_per_token"] / c["bytes_read_per_token"]
        rows["speed_up"] = {p: c[f"{p}_tok_s"] / d[f"{p}_tok_s"] for p in paths} | {"limit": limit}
        print("\nspeed-up over dense: " + ", ".join(f"{p} {c[f'{p}_tok_s'] / d[f'{p}_tok_s']:.2f}x "
                                                   f"({100 * c[f'{p}_tok_s'] / d[f'{p}_tok_s'] / limit:.0f}% of the "
                                                   f"{limit:.2f}x bytes limit)" for p in paths))
    if args.json:
        from .files import atomic_write_text

        atomic_write_text(Path(args.json), json.dumps(rows, indent=2) + "\n")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from .folder import MANIFEST_FILE, check_new_file, verify

    if args.plot:
        check_new_file(args.plot, "plot")
    checked = verify(args.model)
    section, shapes, tensor_bytes = asdict(checked.record), checked.dense_shapes, checked.tensor_bytes
    ranks, shards = section.pop("ranks"), section.pop("shards")
    quantization = dict(section.pop("quantization", None) or {})
    quantized = quantization.pop("modules", {})
    print(json.dumps(section, indent=2))
    print(f"shards: {', '.join(shards)} (sha256 verified)")
    print(f"files: {checked.files}, each matching {MANIFEST_FILE}; code: {checked.code}")
    print(f"weight bytes: {tensor_bytes:,} ({tensor_bytes / 2**20:.1f} MiB) in the shards")
    if quantized:
        print(f"quantization: {json.dumps(quantization)}; {len(quantized)} linears, their stored tensors checked")
    print("\n| module | shape | rank | parameters kept |" + (" factors |\n" if quantized else "\n")
          + "|---|---|---:|---:|" + ("---|" if quantized else ""))
    natural = lambda name: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]  # noqa: E731
    kept = {n: k * sum(shapes[n]) / (shapes[n][0] * shapes[n][1]) for n, k in ranks.items()}
    for name, rank in sorted(ranks.items(), key=lambda kv: natural(kv[0])):
        row = f"| {name} | {shapes[name][0]}×{shapes[name][1]} | {rank} | {100 * kept[name]:.1f}% |"
        if quantized:
            specs = [quantized.get(f"{name}.svd_{f}") for f in "uv"]
            row += " " + ", ".join(f"{s['weights']}" + (f"/g{s['group_size']}" if s.get("group_size") else "")
                                   if s else "float" for s in specs) + " |"
        print(row)
    if args.plot:
        _plot_kept(kept, Path(args.plot), f"{Path(args.model).name}: {section.get('rank_rule', 'uniform')} ranks")
        print(f"\nplot: {args.plot}")
    return 0


def _plot_kept(kept: dict[str, float], path: Path, title: str) -> None:
    """Kept fraction of each matrix's parameters against its block, a line per projection type."""
    try:
        import matplotlib
    except ImportError:
        raise RuntimeError("--plot needs matplotlib: pip install matplotlib") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines: dict[str, list[tuple[int, float]]] = {}
    for name, frac in kept.items():
        block = next((int(t) for t in reversed(name.split(".")) if t.isdigit()), 0)
        lines.setdefault(name.rsplit(".", 1)[-1], []).append((block, frac))
    fig, ax = plt.subplots(figsize=(8, 4))
    for kind, pts in lines.items():
        pts.sort()
        ax.plot([b for b, _ in pts], [f for _, f in pts], marker=".", label=kind)
    ax.set_xlabel("block")
    ax.set_ylabel("parameters kept (k(m+n)/mn)")
    ax.set_title(title)
    ax.legend(fontsize=8, ncol=4)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


COMMANDS = {"compress": cmd_compress, "finetune": cmd_finetune, "quantize": cmd_quantize, "eval": cmd_eval,
            "generate": cmd_generate, "bench": cmd_bench, "info": cmd_info}
# an option named in an error → its flag, where the flag is not --OPTION-NAME
FLAGS = {
    "compress": {"model": "MODEL", "rank_rule": "--ranks", "eval_tasks": "--eval-tasks", "quantize.bits": "--quantize",
                 "quantize.group_size": "--quantize-group-size", "low_memory": "--low-memory", "method": "--method",
                 **{f"finetune.{f}": f"--ft-{f.replace('_', '-')}" for f in ("order", "lora_r", "lora_alpha", "lr",
                                                                            "steps", "batch_size", "seqlen", "dtype")}},
    "finetune": {f"finetune.{f}": f"--{f.replace('_', '-')}" for f in ("order", "lora_r", "lora_alpha", "lr", "steps",
                                                                       "batch_size", "seqlen", "dtype", "data")},
    "quantize": {"quantize.bits": "--bits", "quantize.group_size": "--group-size", "quantize.dense": "--dense"},
    "eval": {"eval_tasks": "--tasks", "eval_seqlen": "--seqlen"},
}


def flag_for(command: str, option: str) -> str:
    """The flag of ``command`` that sets ``option`` (a library field name)."""
    return FLAGS.get(command, {}).get(option) or "--" + option.rsplit(".", 1)[-1].replace("_", "-")


def _one_line(command: str, exc: BaseException) -> str:
    from . import distributed
    from .errors import OptionError

    text = f"{flag_for(command, exc.option)}: {exc.detail}" if isinstance(exc, OptionError) else str(exc).strip()
    text = re.sub(r"`([a-z_.]+)`", lambda m: flag_for(command, m.group(1)), text)
    msg = text.splitlines()[0] if text else type(exc).__name__
    if distributed.active() and not isinstance(exc, distributed.PeerLost):
        msg = f"rank {distributed.world()[0]}: {msg}"
    return f"svdllm {command}: error: {msg}"


def main(argv: list[str] | None = None) -> int:
    import errno

    import torch

    from . import distributed
    from .errors import SvdllmError

    parser = build_parser()
    args = parser.parse_args(argv)
    debug = args.debug or os.environ.get("SVDLLM_DEBUG", "") not in ("", "0")
    logging.basicConfig(level=logging.WARNING, format="svdllm: %(message)s")
    if args.quiet:
        os.environ["TQDM_DISABLE"] = os.environ["HF_DATASETS_DISABLE_PROGRESS_BARS"] = "1"
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()

    def interrupt(*_: Any) -> None:
        raise KeyboardInterrupt  # a SIGTERM cleans up like Ctrl-C: no half-written folder is left

    signal.signal(signal.SIGTERM, interrupt)
    try:
        return COMMANDS[args.command](args)
    except (SvdllmError, ValueError, FileNotFoundError, FileExistsError, PermissionError, torch.OutOfMemoryError,
            OSError) as exc:
        user = not isinstance(exc, OSError) or isinstance(exc, (FileNotFoundError, FileExistsError, PermissionError)) \
            or exc.errno in (errno.ENOSPC, errno.EDQUOT)
        if debug or not user:
            raise
        hint = " (the disk is full: nothing half-written was kept; free space and rerun)" \
            if getattr(exc, "errno", None) in (errno.ENOSPC, errno.EDQUOT) else \
            " (out of memory: try --low-memory, a smaller --batch-size or a smaller window)" \
            if isinstance(exc, torch.OutOfMemoryError) else ""
        print(_one_line(args.command, exc) + hint, file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("svdllm: interrupted", file=sys.stderr)
        return 130
    finally:  # torchrun's SIGTERM, sent when a peer died, lands here after the one line: nothing left to clean up
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        try:
            distributed.shutdown()
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    sys.exit(main())
