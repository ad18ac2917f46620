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


def _finetune_options(p: argparse.ArgumentParser, prefix: str = "") -> None:
    from .finetune import FinetuneConfig
    from .folder import DTYPES

    d = FinetuneConfig()
    g = p.add_argument_group("fine-tuning" + (" (with --finetune)" if prefix else ""))
    g.add_argument(f"--{prefix}data", default=d.data, help=f"training DATA (.txt, .jsonl with text or Alpaca rows; "
                   f"default {d.data})")
    g.add_argument(f"--{prefix}order", default=d.order, choices=["u-first", "v-first"])
    g.add_argument(f"--{prefix}lora-r", type=int, default=d.lora_r)
    g.add_argument(f"--{prefix}lora-alpha", type=int, default=d.lora_alpha)
    g.add_argument(f"--{prefix}lr", type=_number, default=d.lr)
    g.add_argument(f"--{prefix}steps", type=int, default=d.steps, help="optimizer steps per stage")
    g.add_argument(f"--{prefix}batch-size", type=int, default=d.batch_size)
    g.add_argument(f"--{prefix}seqlen" if prefix else "--seqlen", type=int, default=d.seqlen)
    g.add_argument(f"--{prefix}seed", type=int, default=d.seed)
    g.add_argument(f"--{prefix}dtype", default=d.dtype, choices=[t for t in DTYPES if t != "float16"],
                   help="training dtype (default float32 on CPU, bfloat16 on GPU; float16 is refused)")
    g.add_argument(f"--{prefix}keep-best", action="store_true", help="undo a stage that worsens validation perplexity")


def _finetune_config(args: argparse.Namespace, prefix: str = "") -> Any:
    from .finetune import FinetuneConfig

    a, key = vars(args), prefix.replace("-", "_")
    return FinetuneConfig(**{f: a[f"{key}{f}"] for f in ("data", "order", "lora_r", "lora_alpha", "lr", "steps",
                                                          "batch_size", "seqlen", "seed", "dtype", "keep_best")})


def build_parser() -> argparse.ArgumentParser:
    """Every command's flags; each default is read from the option dataclass the flag maps to (one place states a
    default, and ``tests/test_workflow.py`` checks that the default command line gives the default options)."""
    from .commands import BenchOptions, EvalTexts, GenerateOptions, QuantizeFolderOptions
    from .folder import DTYPES
    from .methods import METHODS
    from .quantize import QuantizeOptions
    from .workflow import PRESETS, CompressOptions

    D, Q, T = CompressOptions(), QuantizeOptions(), EvalTexts()
    C = D.compression
    R = C.refine
    evals = ",".join(T.data)
    parser = argparse.ArgumentParser(prog="svdllm", description="Compress LLMs with SVD-LLM and friends.")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error (or SVDLLM_DEBUG=1)")
    sub = parser.add_subparsers(dest="command", required=True)

    c = sub.add_parser("compress", help="compress a model, report perplexity, save it")
    c.add_argument("model", nargs="?", default=D.model, help="named model, folder, .gguf or hub id")
    c.add_argument("--ratio", type=_number, default=C.ratio, help=f"parameter reduction per matrix, in (0, 1) "
                   f"(default {C.ratio})")
    # a flag a preset sets defaults to None: unset, it takes the preset's value (or the default options')
    c.add_argument("--preset", default=None, choices=list(PRESETS),
                   help="fast (svdllm-w, uniform ranks), balanced (the default) or best (the default with block "
                        "refinement); flags given beside it override its choices (docs/refinement.md)")
    c.add_argument("--method", default=None, help=f"one of {', '.join(METHODS)} (default {C.method.name})")
    c.add_argument("--calib", default=D.calib, help=f"calibration DATA (default {D.calib})")
    c.add_argument("--nsamples", type=int, default=None, help=f"calibration windows (default {D.nsamples})")
    c.add_argument("--seqlen", type=int, default=None, help=f"calibration window length (default {D.seqlen})")
    c.add_argument("--seed", type=int, default=D.seed, help="seeds the calibration sampling")
    m = c.add_argument_group("method options (each applies to the methods named; unset: the method's default)")
    m.add_argument("--beta", type=float, default=None, help="svdllm-ec: target blend in [0, 1] (1 = dense inputs)")
    m.add_argument("--norm-cap", type=float, default=None,
                   help="svdllm-ec: halve β for a matrix while ||W'|| > cap·||W|| (0 turns it off)")
    m.add_argument("--damp", type=float, default=None, help="svdllm-w, svdllm: whitening ridge (0: only when needed)")
    m.add_argument("--output-whitening", action=argparse.BooleanOptionalAction, default=None,
                   help="svdllm-w, svdllm, svdllm-ec: whiten the output side too, with the Gram of the loss's gradient "
                        "at each output (K-FAC, docs/output-aware.md; on for svdllm-ec, off for the others)")
    m.add_argument("--output-damp", type=_number, default=None,
                   help="with --output-whitening: ridge on that Gram, relative to its mean diagonal")
    m.add_argument("--output-full-width", type=int, default=None,
                   help="with --output-whitening: outputs wider than this keep the Gram's diagonal only (a full Gram "
                        "costs width²×8 bytes)")
    m.add_argument("--output-shrinkage", type=float, default=None,
                   help="with --output-whitening: weight in [0, 1] of the scaled identity in each full output Gram "
                        "(unset: outputs/(outputs + calibration tokens); 0: the Gram alone, as 0.8.0)")
    m.add_argument("--asvd-alpha", type=_number, default=None, help="asvd: activation exponent")
    c.add_argument("--ranks", default=None, choices=["auto", "uniform", "fisher"],
                   help="rank per matrix: uniform (the paper), or allocated under the same parameter budget from the "
                        "whitened spectra weighted by the loss's sensitivity to each output (fisher); auto (default): "
                        "fisher for svdllm-ec, else uniform")
    c.add_argument("--true-sequential", action=argparse.BooleanOptionalAction, default=None,
                   help="svdllm, svdllm-ec: fit q/k/v, then o, then gate/up, then down, each on the inputs the "
                        "already compressed ones produce (default; --no-true-sequential fits a block's linears at once)")
    r = c.add_argument_group("block refinement (docs/refinement.md)")
    r.add_argument("--refine-steps", type=int, default=None,
                   help=f"Adam steps per block on its output error against the dense block (default {R.steps}: off)")
    r.add_argument("--refine-lr", type=_number, default=None, help=f"their learning rate (default {R.lr:g})")
    r.add_argument("--refine-windows", type=_positive, default=None,
                   help=f"calibration windows per step (default {R.windows_per_step})")
    c.add_argument("--rank-floor", type=float, default=C.rank_floor,
                   help=f"allocated ranks stay ≥ floor × uniform (default {C.rank_floor})")
    c.add_argument("--rank-cap", type=float, default=C.rank_cap,
                   help=f"allocated ranks stay ≤ cap × uniform (default {C.rank_cap:g})")
    c.add_argument("--targets", default=",".join(C.targets), help="globs over module names, e.g. '*mlp*'")
    c.add_argument("--skip-layers", type=_layers, default=list(C.skip_layers),
                   help="blocks to leave dense, e.g. '0,29' or '0-2'")
    c.add_argument("--batch-size", type=int, default=C.batch_size,
                   help="windows per forward (default 4 in memory, 1 with --low-memory)")
    c.add_argument("--offload", default=C.offload, choices=["auto", "none", "cpu", "disk"],
                   help="where every pass's activations wait: none (on the device), cpu, disk; auto (default): CPU "
                        "memory, or disk with --low-memory")
    c.add_argument("--low-memory", action="store_true", default=D.low_memory,
                   help="never hold the whole model: read one block at a time from the safetensors shards "
                        "(automatic when the weights exceed half the available memory)")
    c.add_argument("--trust-remote-code", action="store_true",
                   help="let the model folder's own Python code (config.json's auto_map) run; off: it never runs")
    c.add_argument("--dist-timeout", type=_positive, default=D.dist_timeout,
                   help=f"under torchrun: seconds a process waits for the others (default {D.dist_timeout})")
    c.add_argument("--resume", action="store_true",
                   help="insist on continuing an interrupted run of the same command (rerunning it continues too)")
    c.add_argument("--eval", default=",".join(D.eval), help=f"evaluation DATA, comma-separated (default "
                   f"{','.join(D.eval)}); '' skips")
    c.add_argument("--eval-seqlen", type=int, default=D.eval_seqlen, help=f"evaluation window (default {D.eval_seqlen})")
    c.add_argument("--max-tokens", type=_positive, default=D.max_tokens,
                   help=f"tokens read per evaluation set (default {D.max_tokens})")
    c.add_argument("--device", default=C.device, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    c.add_argument("--dtype", default=D.dtype, choices=list(DTYPES), help=f"saved dtype (default {D.dtype})")
    c.add_argument("--out", default=D.out, help="output folder (default out/MODEL-METHOD-RATIO)")
    c.add_argument("--force", action="store_true", help="replace a non-empty --out")
    c.add_argument("--finetune", action="store_true", help="then run the LoRA recovery step (see `finetune`)")
    c.add_argument("--quantize", type=int, default=None, choices=[8, 4, 2], metavar="BITS",
                   help="then quantize the factors to 8, 4 or 2 bits (see `quantize`; --dtype bfloat16 for the "
                        "smallest folder)")
    c.add_argument("--quantize-group-size", type=int, default=Q.group_size,
                   help=f"with --quantize 4 or 2 (default {Q.group_size})")
    _zero_shot_options(c, "--eval-tasks")
    _finetune_options(c, prefix="ft-")

    f = sub.add_parser("finetune", help="LoRA on the Wu then Wv factors of a compressed model, merged back")
    f.add_argument("model", help="a folder written by svdllm compress")
    f.add_argument("--out", required=True)
    f.add_argument("--force", action="store_true")
    _eval_texts(f, T, "--eval-seqlen")
    _finetune_options(f)

    e = sub.add_parser("eval", help="perplexity of a model")
    e.add_argument("model")
    e.add_argument("--data", default=evals, help=f"comma-separated DATA (default {evals})")
    e.add_argument("--json", default=None, help="write results here (with --tasks: lm-eval's whole output too)")
    _eval_texts(e, T, "--seqlen", texts=False)
    _zero_shot_options(e, "--tasks")

    G = GenerateOptions("", "")
    g = sub.add_parser("generate", help="greedy or sampled generation")
    g.add_argument("model")
    g.add_argument("prompt")
    g.add_argument("--max-new-tokens", type=int, default=G.max_new_tokens)
    g.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    g.add_argument("--seed", type=int, default=G.seed)
    g.add_argument("--device", default=G.device)
    g.add_argument("--fast", action="store_true",
                   help="static KV cache and a compiled decode step (torch.compile; the first call compiles)")
    g.add_argument("--latent-cache", action="store_true",
                   help="keep the rank-r latents of low-rank k_proj/v_proj in the KV cache instead of keys and values")

    B = BenchOptions("")
    b = sub.add_parser("bench", help="batch-1 decode speed and weight bytes, against a dense model and its limit")
    b.add_argument("model")
    b.add_argument("--dense", default=B.dense, help="the uncompressed model to compare with (MODEL)")
    b.add_argument("--fast", action="store_true", help="also through the fast path (static cache, compiled decode)")
    b.add_argument("--new-tokens", type=int, default=B.new_tokens)
    b.add_argument("--repeats", type=int, default=B.repeats)
    b.add_argument("--device", default=B.device)
    b.add_argument("--json", default=B.json, help="write the figures here")

    QF = QuantizeFolderOptions("", "")
    q = sub.add_parser("quantize", help="int8/int4/int2 weights for the factors of a compressed model (optimum-quanto)")
    q.add_argument("model", help="a folder written by svdllm (or, with --dense, any model)")
    q.add_argument("--bits", type=int, required=True, choices=[8, 4, 2])
    q.add_argument("--group-size", type=int, default=Q.group_size,
                   help=f"4 and 2 bits: weights per scale and shift along a row (default {Q.group_size}; smaller "
                        "where it does not divide a factor's width)")
    q.add_argument("--dense", default=",".join(Q.dense), help="globs over dense linears in the decoder blocks to "
                   "quantize too, e.g. '*' (every one: quantization alone)")
    q.add_argument("--dtype", default=QF.dtype, choices=list(DTYPES),
                   help=f"dtype of everything left in floating point, scales included (default {QF.dtype})")
    q.add_argument("--out", required=True)
    q.add_argument("--force", action="store_true", help="replace a non-empty --out")
    _eval_texts(q, T, "--seqlen")

    i = sub.add_parser("info", help="the svdllm section and per-module ranks of a saved model")
    i.add_argument("model")
    i.add_argument("--plot", default=None, help="also draw the kept fraction per block and projection to this PNG")
    return parser


def _eval_texts(p: argparse.ArgumentParser, d: Any, seqlen: str, texts: bool = True) -> None:
    """The evaluation flags of finetune, eval and quantize (``commands.EvalTexts``)."""
    if texts:
        p.add_argument("--eval", default=",".join(d.data), help=f"evaluation DATA before and after (default "
                       f"{','.join(d.data)}); '' skips")
    p.add_argument(seqlen, type=_positive, default=d.seqlen, help=f"window length in tokens (default {d.seqlen})")
    p.add_argument("--max-tokens", type=_positive, default=d.max_tokens,
                   help=f"tokens read per evaluation set (default {d.max_tokens})")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")


def compress_options(args: argparse.Namespace) -> Any:
    """``svdllm compress``'s flags as ``CompressOptions``."""
    from dataclasses import replace

    from .methods import options_for
    from .pipeline import CompressionConfig
    from .quantize import QuantizeOptions
    from .workflow import CompressOptions, preset

    base = preset(args.preset) if args.preset else CompressOptions()
    B = base.compression
    pick = lambda given, fallback: fallback if given is None else given  # noqa: E731
    refine = replace(B.refine, steps=pick(args.refine_steps, B.refine.steps), lr=pick(args.refine_lr, B.refine.lr),
                     windows_per_step=pick(args.refine_windows, B.refine.windows_per_step))
    method = options_for(pick(args.method, B.method.name), beta=args.beta, norm_cap=args.norm_cap, damp=args.damp,
                         asvd_alpha=args.asvd_alpha, output_whitening=args.output_whitening,
                         output_damp=args.output_damp, output_full_width=args.output_full_width,
                         output_shrinkage=args.output_shrinkage)
    config = CompressionConfig(method=method, ratio=args.ratio, targets=_patterns(args.targets),
                               skip_layers=args.skip_layers, rank_rule=pick(args.ranks, B.rank_rule),
                               rank_floor=args.rank_floor, rank_cap=args.rank_cap, batch_size=args.batch_size,
                               device=args.device, offload=args.offload,
                               true_sequential=pick(args.true_sequential, B.true_sequential), refine=refine)
    return CompressOptions(
        model=args.model, compression=config, calib=args.calib, nsamples=pick(args.nsamples, base.nsamples),
        seqlen=pick(args.seqlen, base.seqlen),
        seed=args.seed, eval=_specs(args.eval), eval_seqlen=args.eval_seqlen, max_tokens=args.max_tokens,
        eval_tasks=args.eval_tasks, include_path=args.include_path, limit=args.limit, low_memory=args.low_memory,
        resume=args.resume, dist_timeout=args.dist_timeout, trust_remote_code=args.trust_remote_code,
        dtype=args.dtype, out=args.out, force=args.force,
        finetune=_finetune_config(args, "ft-") if args.finetune else None,
        quantize=QuantizeOptions(args.quantize, args.quantize_group_size) if args.quantize else None,
        progress=not args.quiet)


def cmd_compress(args: argparse.Namespace) -> int:
    from . import distributed
    from .workflow import run_compression

    outcome = run_compression(compress_options(args))
    if distributed.is_writer():
        _print_summary(args, outcome)
    return 0


def _print_summary(args: argparse.Namespace, outcome: Any) -> None:
    from .folder import is_svdllm_folder

    report, p0, p1 = outcome.report, outcome.params_before, outcome.params_after
    before, after = report.perplexity.get("dense", {}), outcome.record.perplexity or {}
    given = "before" if Path(args.model).is_dir() and is_svdllm_folder(Path(args.model)) else "dense"  # the input
    cal, refine = report.calibration, report.config["refine"]
    calib = f"calibration {cal['nsamples']}×{cal['seqlen']} tokens of {args.calib}, " if cal else ""
    print(f"\nsvdllm compress {args.model}: {f'preset {args.preset}, ' if args.preset else ''}method "
          f"{outcome.record.method}, ratio {args.ratio}, {report.plan.get('n_blocks')} blocks, "
          f"{outcome.record.rank_rule} ranks, {calib}"
          f"{'refinement %d steps a block, ' % refine['steps'] if refine['steps'] else ''}seed {args.seed}")
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
    if report.refinement:
        kept = [r for r in report.refinement if r.get("outcome", "").startswith("refined")]
        falls = [1 - r["heldout_after"] / r["heldout_before"] for r in kept if r["heldout_before"] > 0]
        print(f"\nrefinement: {len(kept)} of {len(report.refinement)} blocks refined"
              + (f", held-out block error −{100 * sum(falls) / len(falls):.1f}% on average" if falls else "")
              + " (see svdllm_report.json)")
    if report.remedies:
        print(f"\n{len(report.remedies)} singular statistics repaired (see svdllm_report.json)")
    print(f"\nsaved to {outcome.out}")


def _eval_options(args: argparse.Namespace, seqlen: int, data: str | None = None) -> Any:
    from .commands import EvalTexts

    return EvalTexts(_specs(args.eval if data is None else data), seqlen, args.max_tokens)


def cmd_finetune(args: argparse.Namespace) -> int:
    from .commands import FinetuneOptions, run_finetune

    done = run_finetune(FinetuneOptions(args.model, args.out, _eval_options(args, args.eval_seqlen), args.device,
                                        args.force, not args.quiet, finetune=_finetune_config(args)))
    for r in done.stages:
        flag = "" if r.kept else " (reverted by --keep-best)"
        print(f"LoRA on {r.stage}: validation perplexity {r.val_before:.3f} -> {r.val_after:.3f}{flag}; "
              f"training loss {r.losses[0]:.3f} -> {r.losses[-1]:.3f}")
    for k in done.after:
        print(f"{k}: perplexity {done.before[k]:.3f} -> {done.after[k]:.3f}")
    print(f"saved to {done.out}")
    return 0


def cmd_quantize(args: argparse.Namespace) -> int:
    from .commands import QuantizeFolderOptions, run_quantize
    from .quantize import QuantizeOptions

    options = QuantizeOptions(bits=args.bits, group_size=args.group_size, dense=tuple(_globs(args.dense)))
    done = run_quantize(QuantizeFolderOptions(args.model, args.out, _eval_options(args, args.seqlen), args.device,
                                              args.force, not args.quiet, quantize=options, dtype=args.dtype))
    part, bits = done.part, args.bits
    groups = sorted({str(m["group_size"] or "row") for m in part["modules"].values()}) if bits < 8 else []
    print(f"\nsvdllm quantize {args.model}: {len(part['modules'])} linears to int{bits} with "
          f"{part['library']} {part['library_version']}" + (f", groups {', '.join(groups)}" if groups else ""))
    print(f"\n| | {args.dtype} | int{bits} | change |\n|---|---:|---:|---:|")
    print(f"| weight bytes | {done.bytes_before:,} | {done.bytes_after:,} | "
          f"{100 * (done.bytes_after / done.bytes_before - 1):+.1f}% |")
    for k, v in done.before.items():
        print(f"| perplexity {k} | {v:.2f} | {done.after[k]:.2f} | {100 * (done.after[k] / v - 1):+.1f}% |")
    print(f"\nsaved to {done.out}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from .commands import EvalOptions, run_eval

    result = run_eval(EvalOptions(args.model, _eval_options(args, args.seqlen, args.data), args.tasks,
                                  args.include_path, args.limit, args.device, args.json, not args.quiet))
    for k, v in result["perplexity"].items():
        print(f"{k}: perplexity {v:.3f}")
    print(f"parameters: {result['parameters']:,}")
    print(f"weight bytes: {result['weight_bytes']:,} ({result['weight_bytes'] / 2**20:.1f} MiB)")
    if "lm_eval" in result:
        from .zeroshot import markdown, score_rows

        print("\n" + markdown({"value": score_rows(result["lm_eval"])}))
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from .commands import GenerateOptions, run_generate

    done = run_generate(GenerateOptions(args.model, args.prompt, args.max_new_tokens, args.sample, args.seed,
                                        args.device, args.fast, args.latent_cache))
    for note in done.notes:
        print(f"svdllm generate: {note}", file=sys.stderr)
    print(done.text)
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from .commands import DEFAULT_PROMPT_TOKENS, BenchOptions, run_bench

    rows = run_bench(BenchOptions(args.model, args.dense, args.fast, args.new_tokens, args.repeats, args.device,
                                  args.json))
    paths = [k[: -len("_tok_s")] for k in rows[args.model] if k.endswith("_tok_s")]
    print(f"batch-1 greedy decode, {args.new_tokens} tokens after a {DEFAULT_PROMPT_TOKENS}-token prompt, median of "
          f"{args.repeats}\n")
    print("| model | weights MiB | read per token MiB | " + " | ".join(f"{p} tok/s" for p in paths) + " |")
    print("|---|---:|---:|" + "---:|" * len(paths))
    for spec, r in rows.items():
        if spec != "speed_up":
            print(f"| {spec} | {r['weight_bytes'] / 2**20:.1f} | {r['bytes_read_per_token'] / 2**20:.1f} | "
                  + " | ".join(f"{r[f'{p}_tok_s']:.1f}" for p in paths) + " |")
    if "speed_up" in rows:
        up = rows["speed_up"]
        print("\nspeed-up over dense: " + ", ".join(f"{p} {up[p]:.2f}x ({100 * up[p] / up['limit']:.0f}% of the "
                                                   f"{up['limit']:.2f}x bytes limit)" for p in paths))
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
    "compress": {"rank_rule": "--ranks", "refine.windows_per_step": "--refine-windows",
                 **{f"refine.{f}": f"--refine-{f}" for f in ("steps", "lr", "holdout", "eval_every", "patience")},
                 "quantize.bits": "--quantize", "quantize.group_size": "--quantize-group-size",
                 **{f"finetune.{f}": f"--ft-{f.replace('_', '-')}" for f in (
                     "data", "order", "lora_r", "lora_alpha", "lr", "steps", "batch_size", "seqlen", "seed", "dtype")}},
    "quantize": {"quantize.bits": "--bits", "quantize.group_size": "--group-size", "quantize.dense": "--dense",
                 "eval_seqlen": "--seqlen"},
    "eval": {"eval_seqlen": "--seqlen"},
    "generate": {"prompt": "PROMPT"},
}


def flag_for(command: str, option: str) -> str:
    """The flag of ``command`` that sets ``option`` (a library field name): FLAGS where it is not --OPTION-NAME."""
    if option == "model":
        return "MODEL"
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
        code = COMMANDS[args.command](args)
        distributed.barrier()  # no rank tears gloo down while a peer's last collective is in flight (a rare SIGABRT)
        return code
    except (SvdllmError, torch.OutOfMemoryError, OSError) as exc:  # a ValueError of torch's is a bug's traceback
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
