"""Command line: a thin layer over the library. Every user error is one line and exit code 2."""
from __future__ import annotations

import argparse
import json
import logging
import os
import re
import signal
import sys
from pathlib import Path
from typing import Any, Callable

EVAL_DEFAULT = "wiki-test,news"


def _ratio(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"must be in (0, 1), got {value}")
    return value


def parse_layers(spec: str, n_blocks: int) -> list[int]:
    """'0,3-5' → [0, 3, 4, 5]; negative indices count from the end."""
    out: set[int] = set()
    for part in filter(None, (p.strip() for p in spec.split(","))):
        lo, sep, hi = part.partition("-") if not part.startswith("-") else (part, "", "")
        try:
            idx = range(int(lo), int(hi) + 1) if sep else [int(lo)]
        except ValueError:
            raise ValueError(f"--skip-layers: bad layer list {spec!r} (use e.g. '0,29' or '0-2')") from None
        if not idx:
            raise ValueError(f"--skip-layers: the range {part!r} is empty (write the lower block first)")
        for i in idx:
            j = i + n_blocks if i < 0 else i
            if not 0 <= j < n_blocks:
                raise ValueError(f"--skip-layers: layer {i} out of range for {n_blocks} blocks")
            out.add(j)
    return sorted(out)


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _globs(text: str) -> list[str]:
    return [p.strip() for p in text.split(",") if p.strip()] or ["*"]


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
    g.add_argument(f"--{prefix}lr", type=float, default=d.lr)
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

    a = vars(args)
    key = prefix.replace("-", "_")
    return FinetuneConfig(
        data=data or args.data, order=a[f"{key}order"], lora_r=a[f"{key}lora_r"], lora_alpha=a[f"{key}lora_alpha"],
        lr=a[f"{key}lr"], steps=a[f"{key}steps"], batch_size=a[f"{key}batch_size"], seqlen=a[f"{key}seqlen"],
        seed=args.seed, dtype=a[f"{key}dtype"], keep_best=a[f"{key}keep_best"],
    )


def _write_loss_curve(results: list, out: Path) -> None:
    from dataclasses import asdict

    from .finetune import plot_losses

    (out / "finetune_losses.json").write_text(json.dumps([asdict(r) for r in results], indent=2) + "\n")
    try:
        plot_losses(results, str(out / "finetune_losses.png"))
    except ImportError:
        logging.getLogger("svdllm").warning("no loss plot: pip install 'svdllm[plot]' (matplotlib) for one")


def build_parser() -> argparse.ArgumentParser:
    from .methods import METHODS

    parser = argparse.ArgumentParser(prog="svdllm", description="Compress LLMs with SVD-LLM and friends.")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
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
    m.add_argument("--asvd-alpha", type=float, default=None, help="asvd: activation exponent (default 0.5)")
    c.add_argument("--ranks", default="auto", choices=["auto", "uniform", "loss", "v2", "fisher", "search"],
                   help="rank per matrix: uniform (the paper), or allocated under the same parameter budget from the "
                        "whitened spectra (loss), SVD-LLM V2's per-type rule (v2), the spectra weighted by the loss's "
                        "sensitivity to each output (fisher), or the best of uniform-to-fisher interpolations on "
                        "held-out calibration windows (search); auto (default): fisher for svdllm-ec with the model "
                        "in memory, else uniform")
    c.add_argument("--true-sequential", action=argparse.BooleanOptionalAction, default=True,
                   help="svdllm, svdllm-ec: fit q/k/v, then o, then gate/up, then down, each on the inputs the "
                        "already compressed ones produce (default; --no-true-sequential fits a block's linears at once)")
    c.add_argument("--rank-floor", type=float, default=0.5, help="allocated ranks stay ≥ floor × uniform (default 0.5)")
    c.add_argument("--rank-cap", type=float, default=2.0, help="allocated ranks stay ≤ cap × uniform (default 2)")
    c.add_argument("--targets", default="*", help="globs over module names, e.g. '*mlp*'")
    c.add_argument("--skip-layers", default="", help="blocks to leave dense, e.g. '0,29' or '0-2'")
    c.add_argument("--batch-size", type=int, default=4, help="windows per forward")
    c.add_argument("--offload", default="none", choices=["none", "cpu", "disk"],
                   help="where activations wait between blocks (default: on the device; --low-memory uses disk)")
    c.add_argument("--low-memory", action="store_true",
                   help="never hold the whole model: read one block at a time from the safetensors shards "
                        "(automatic when the weights exceed half the available memory)")
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


def _device(name: str | None) -> str:
    import torch

    if name:
        if name.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"--device {name}: CUDA is not available here")
        return name
    return "cuda" if torch.cuda.is_available() else "cpu"


def _perplexities(model: Any, tok: Any, specs: list[str], args: argparse.Namespace, cache: dict) -> dict[str, float]:
    from .data import load_text, tokenize
    from .evaluate import evaluate_perplexity

    out = {}
    for spec in specs:
        if spec not in cache:
            cache[spec] = tokenize(tok, load_text(spec))
        res = evaluate_perplexity(model, tok, cache[spec], args.seqlen, args.max_tokens, progress=not args.quiet)
        out[spec] = res.perplexity
    return out


def _window_perplexities(model: Any, windows: dict[str, Any], progress: bool) -> dict[str, float]:
    """Perplexity on evaluation windows already cut (name → windows × seqlen token ids), as compress reports it."""
    from .evaluate import evaluate_perplexity

    return {name: evaluate_perplexity(model, None, w.flatten(), w.shape[1], None, progress=progress).perplexity
            for name, w in windows.items()}


def _memory_available() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def _wants_low_memory(args: argparse.Namespace) -> bool:
    """--low-memory, or a local safetensors folder whose float32 weights exceed half the available memory."""
    if args.low_memory:
        return True
    from .assets import resolve_model
    from .io import FormatError, ShardSource

    where, gguf = resolve_model(args.model)
    if gguf or not isinstance(where, Path):
        return False
    try:
        # bf16 shards become float32; the processes torchrun started on this machine each hold a copy
        need = ShardSource(where).nbytes * 2 * int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    except FormatError:
        return False
    if need > _memory_available() // 2:
        logging.getLogger("svdllm").warning("the weights (%.1f GiB as float32) exceed half the available memory: "
                                            "streaming blocks from disk (--low-memory)", need / 2**30)
        return True
    return False


def _rank_rule(choice: str, opts: Any, low_memory: bool) -> str:
    """``auto``: Fisher-weighted allocation for svdllm-ec with the model in memory (it beat uniform ranks at 0.2, 0.4
    and 0.6 on both evaluation sets; svdllm-w lost at 0.6), otherwise the paper's uniform ranks."""
    from .methods import ErrorCorrectedOptions

    if choice != "auto":
        return choice
    return "fisher" if isinstance(opts, ErrorCorrectedOptions) and not low_memory else "uniform"


def cmd_compress(args: argparse.Namespace) -> int:
    import torch
    from transformers import AutoTokenizer

    from . import CompressionConfig, compress, distributed, eval_windows, sample_windows
    from .architecture import count_parameters
    from .assets import resolve_model
    from .checkpoint import RunDir
    from .data import check_spec, load_text, tokenize
    from .io import check_out_dir, load_model, load_skeleton, save, save_streamed
    from .methods import options_for
    from .pipeline import Timings, fingerprint

    opts = options_for(args.method, beta=args.beta, norm_cap=args.norm_cap, damp=args.damp, asvd_alpha=args.asvd_alpha)
    if args.nsamples < 1 or args.seqlen < 2 or args.eval_seqlen < 2:
        raise ValueError("--nsamples must be positive and --seqlen, --eval-seqlen at least 2")
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", Path(args.model).stem if args.model.endswith(".gguf") else Path(args.model).name)
    out = check_out_dir(args.out or f"out/{name}-{args.method}-{args.ratio:g}", args.force)
    run_path = out.parent / f".{out.name}.svdllm-run"
    if args.resume and not (run_path / "state.json").is_file():
        raise FileNotFoundError(f"--resume: no interrupted run to continue for --out {out}")
    evals = [s for s in args.eval.split(",") if s.strip()]
    for spec in [args.calib, *evals]:
        check_spec(spec)
    low_memory = _wants_low_memory(args)
    tasks = _tasks(args.eval_tasks, args.include_path)
    if tasks and (low_memory or distributed.launched()):
        raise ValueError("--eval-tasks needs the whole model in one process: compress, then run "
                         f"`svdllm eval OUT --tasks {args.eval_tasks}` on the saved folder")
    if low_memory and args.finetune:
        raise ValueError("--finetune needs the whole model in memory; drop --low-memory or fine-tune afterwards")
    if low_memory and args.quantize:
        raise ValueError("--quantize needs the whole model in memory: compress, then run `svdllm quantize OUT`")
    quantize_options = _quantize_options(args.quantize, args.quantize_group_size, "") if args.quantize else None
    if distributed.launched() and args.finetune:
        raise ValueError("--finetune runs in one process: compress under torchrun, then run `svdllm finetune`")
    timings = Timings()
    device = distributed.init_from_env(_device(args.device), args.dist_timeout)
    with timings.clock("load model"):
        if low_memory:
            from .onload import return_freed_memory

            return_freed_memory()  # before the tokenizer and texts: what they free goes back to the OS
            where, _ = resolve_model(args.model)
            (model, source), tok = load_skeleton(where), AutoTokenizer.from_pretrained(where)
        else:
            (model, tok), source = load_model(args.model), None
    params_before = count_parameters(model)
    cfg = CompressionConfig(method=opts, ratio=args.ratio, targets=_globs(args.targets), batch_size=args.batch_size,
                            rank_rule=_rank_rule(args.ranks, opts, low_memory), rank_floor=args.rank_floor,
                            rank_cap=args.rank_cap, true_sequential=args.true_sequential,
                            skip_layers=parse_layers(args.skip_layers, model.config.get_text_config().num_hidden_layers),
                            device=device, offload="disk" if low_memory else args.offload)
    cfg.validate()
    with timings.clock("load text"):
        windows = sample_windows(tokenize(tok, load_text(args.calib)), args.nsamples, args.seqlen, args.seed)
        ev = {s: eval_windows(tokenize(tok, load_text(s)), args.eval_seqlen, args.max_tokens) for s in evals}
    if low_memory:
        from .onload import trim_heap

        trim_heap()  # the texts and their tokenisation leave ~50 MB of freed heap on SmolLM2
    run = RunDir(run_path, fingerprint(model, cfg, windows, ev))
    zero_shot: dict[str, list] = {}
    if tasks:
        from .zeroshot import score_rows, zero_shot as run_tasks

        with timings.clock("zero-shot tasks, dense"):
            zero_shot["dense"] = _dense_scores(run, [args.eval_tasks, args.include_path, args.limit],
                                               lambda: score_rows(run_tasks(model, tok, *tasks, limit=args.limit)))
    if run.done and distributed.is_writer():
        print(f"resuming {run_path} after {run.done} finished blocks", file=sys.stderr)
    with timings.clock("compress"):
        compress(model, windows, cfg, eval_windows=ev, run_dir=run, source=source, progress=not args.quiet)
    if not distributed.is_writer():
        return 0  # rank 0 writes the model, the report and the summary
    report = model.svdllm_report
    if report.calibration:
        model.config.svdllm["calibration"].update(data=args.calib, seed=args.seed)
        report.calibration.update(data=args.calib, seed=args.seed)
    after = report.perplexity.get("compressed", {})
    stages: list = []
    if args.finetune:
        from .finetune import finetune

        ft = _finetune_config(args, "ft-", data=args.calib)
        model.to(device)
        with timings.clock("finetune"):
            model, stages = finetune(model, tok, ft, progress=not args.quiet)
        with timings.clock("evaluate finetuned"):
            after = report.perplexity["finetuned"] = _window_perplexities(model, ev, not args.quiet)
    if quantize_options:
        from .quantize import quantize_model

        with timings.clock("quantize"):
            for param in model.parameters():  # buffers (RoPE frequencies) keep float32, as a load gives them
                param.data = param.data.to(getattr(torch, args.dtype))
            quantize_model(model, quantize_options)
        with timings.clock("evaluate quantized"):
            after = report.perplexity["quantized"] = _window_perplexities(model, ev, not args.quiet)
    if tasks:
        with timings.clock("zero-shot tasks, compressed"):
            zero_shot["compressed"] = score_rows(run_tasks(model, tok, *tasks, limit=args.limit))
        report.zero_shot = {**zero_shot, "limit": args.limit}
        model.config.svdllm["zero_shot"] = {f"{t} {m}": v for t, m, v, _ in zero_shot["compressed"]}
    report.timings = Timings({**timings, **{f"compress: {k}": v for k, v in report.timings.items()}})
    with timings.clock("save"):
        if low_memory:
            blocks = [run.block_file(i) for i in range(report.plan["n_blocks"])]
            save_streamed(model, tok, out, blocks, dtype=args.dtype, force=args.force, perplexity=after)
        else:
            save(model, tok, out, dtype=args.dtype, force=args.force, perplexity=after,
                 write_extra=(lambda folder: _write_loss_curve(stages, folder)) if stages else None)
    run.remove()
    _print_summary(args, report, params_before, count_parameters(model), dict(timings), out)
    return 0


def _dense_scores(run: Any, key: list, score: Callable[[], list]) -> list:
    """The dense model's zero-shot rows, kept in the run folder so that a resumed run does not score them again."""
    from .checkpoint import atomic_write_text

    path, key = run.path / "zero_shot_dense.json", [run.fingerprint, *key]
    if path.is_file():
        kept = json.loads(path.read_text())
        if kept.get("key") == key:
            return [tuple(row) for row in kept["rows"]]
    rows = score()
    atomic_write_text(path, json.dumps({"key": key, "rows": rows}))
    return rows


def _quantize_options(bits: int, group_size: int, dense: str) -> Any:
    from .quantize import QuantizeOptions, require_library

    options = QuantizeOptions(bits=bits, group_size=group_size, dense=tuple(g for g in _globs(dense) if dense.strip()))
    options.validate()
    require_library()  # before any model is loaded or compressed
    return options


def cmd_quantize(args: argparse.Namespace) -> int:
    import torch

    from .data import check_spec
    from .generation import weight_bytes
    from .io import FormatError, check_out_dir, load_model, read_section, save
    from .quantize import quantize_model

    options = _quantize_options(args.bits, args.group_size, args.dense)
    out = check_out_dir(args.out, args.force)
    try:
        if read_section(args.model).get("quantization"):
            raise ValueError(f"{args.model}: the model's weights are already quantized")
    except FormatError:
        pass  # not an svdllm folder: a dense model, or a name load_model resolves
    evals = [s for s in args.eval.split(",") if s.strip()]
    for spec in evals:
        check_spec(spec)
    model, tok = load_model(args.model, dtype=getattr(torch, args.dtype), device=_device(args.device))
    if getattr(model.config, "svdllm", None) is None:
        if not options.dense:
            raise ValueError(f"{args.model} is not compressed by svdllm: compress it first, or quantize its dense "
                             "linears with --dense '*'")
        model.config.svdllm = {"method": "none", "ratio": 0.0, "ranks": {}}
    tokens: dict = {}
    before_bytes, before = weight_bytes(model), _perplexities(model, tok, evals, args, tokens)
    section = quantize_model(model, options)
    after_bytes, after = weight_bytes(model), _perplexities(model, tok, evals, args, tokens)
    groups = sorted({str(m["group_size"] or "row") for m in section["modules"].values()}) if args.bits < 8 else []
    print(f"\nsvdllm quantize {args.model}: {len(section['modules'])} linears to int{args.bits} with "
          f"{section['library']} {section['library_version']}" + (f", groups {', '.join(groups)}" if groups else ""))
    print(f"\n| | {args.dtype} | int{args.bits} | change |\n|---|---:|---:|---:|")
    print(f"| weight bytes | {before_bytes:,} | {after_bytes:,} | {100 * (after_bytes / before_bytes - 1):+.1f}% |")
    for k in before:
        print(f"| perplexity {k} | {before[k]:.2f} | {after[k]:.2f} | {100 * (after[k] / before[k] - 1):+.1f}% |")
    save(model, tok, out, force=args.force, perplexity=after or None)
    print(f"\nsaved to {out}")
    return 0


def cmd_finetune(args: argparse.Namespace) -> int:
    from .data import check_spec
    from .finetune import finetune
    from .io import check_out_dir, load_model, read_section, save

    ft = _finetune_config(args)
    ft.validate()
    out = check_out_dir(args.out, args.force)
    if read_section(args.model).get("quantization"):
        raise ValueError(f"{args.model} has quantized weights: fine-tune before quantizing (compress --finetune "
                         "--quantize does both in that order)")
    evals = [s for s in args.eval.split(",") if s.strip()]
    for spec in [ft.data, *evals]:
        check_spec(spec)
    model, tok = load_model(args.model, device=_device(args.device))
    args.seqlen = args.eval_seqlen
    before = _perplexities(model, tok, evals, args, {}) if evals else {}
    model, stages = finetune(model, tok, ft, progress=not args.quiet)
    for r in stages:
        flag = "" if r.kept else " (reverted by --keep-best)"
        print(f"LoRA on {r.stage}: validation perplexity {r.val_before:.3f} -> {r.val_after:.3f}{flag}; "
              f"training loss {r.losses[0]:.3f} -> {r.losses[-1]:.3f}")
    after = _perplexities(model, tok, evals, args, {}) if evals else {}
    for k in after:
        print(f"{k}: perplexity {before[k]:.3f} -> {after[k]:.3f}")
    save(model, tok, out, force=args.force, perplexity=after, write_extra=lambda folder: _write_loss_curve(stages, folder))
    print(f"saved to {out}")
    return 0


def _print_summary(args: argparse.Namespace, report: Any, p0: int, p1: int, phases: dict[str, float],
                   out: Path) -> None:
    before, after = report.perplexity.get("dense", {}), report.perplexity.get("quantized") or \
        report.perplexity.get("finetuned") or report.perplexity.get("compressed", {})
    print(f"\nsvdllm compress {args.model}: method {args.method}, ratio {args.ratio}, "
          f"calibration {args.nsamples}×{args.seqlen} tokens of {args.calib}, seed {args.seed}")
    if before:
        label = f"compressed, int{args.quantize} factors" if report.perplexity.get("quantized") else "compressed"
        print(f"\n| perplexity ({args.eval_seqlen}-token windows, ≤{args.max_tokens} tokens) | dense | {label} | change |")
        print("|---|---:|---:|---:|")
        for k in before:
            print(f"| {k} | {before[k]:.2f} | {after[k]:.2f} | {100 * (after[k] / before[k] - 1):+.1f}% |")
    if report.zero_shot:
        from .zeroshot import markdown

        print(f"\nzero-shot (lm-eval{f', --limit {args.limit}' if args.limit else ''}):\n")
        print(markdown({k: report.zero_shot[k] for k in ("dense", "compressed")}))
    print("\n| parameters | dense | compressed | reduction |\n|---|---:|---:|---:|")
    print(f"| whole model | {p0:,} | {p1:,} | {100 * (1 - p1 / p0):.1f}% |")
    lb, la = report.linear_params_before, report.linear_params_after
    print(f"| compressed linears | {lb:,} | {la:,} | {100 * (1 - la / max(lb, 1)):.1f}% |")
    print("\n| phase | seconds |\n|---|---:|")
    for k, v in report.timings.items():
        print(f"| {k.replace('compress: ', '&nbsp;&nbsp;')} | {v:.1f} |")
    if report.remedies:
        print(f"\n{len(report.remedies)} singular statistics repaired (see svdllm_report.json)")
    print(f"\nsaved to {out}")


def cmd_eval(args: argparse.Namespace) -> int:
    from .architecture import count_parameters
    from .generation import weight_bytes
    from .io import load_model
    from .data import check_spec

    specs = [s for s in args.data.split(",") if s.strip()]
    for spec in specs:
        check_spec(spec)
    tasks = _tasks(args.tasks, args.include_path)
    model, tok = load_model(args.model, device=_device(args.device))
    ppl = _perplexities(model, tok, specs, args, {})
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
        from .checkpoint import atomic_write_text

        atomic_write_text(Path(args.json), json.dumps(result, indent=2, default=str) + "\n")
    return 0


def _tasks(spec: str, include_path: str | None) -> tuple[list[str], Any] | None:
    """lm-eval task names and manager for ``--tasks``/``--eval-tasks``, checked before any model is loaded."""
    if not spec.strip():
        if include_path:
            raise ValueError("--include-path needs --tasks (or --eval-tasks) naming the tasks to run")
        return None
    from .zeroshot import resolve_tasks

    return resolve_tasks(spec, include_path)


def cmd_generate(args: argparse.Namespace) -> int:
    import torch

    from .io import load_model
    from .modeling_svdllm import LatentCache, cache_argument, cache_bytes_per_token

    if args.fast and args.latent_cache:
        raise ValueError("--fast and --latent-cache do not combine: the latent cache grows, the static cache is fixed")
    torch.manual_seed(args.seed)
    model, tok = load_model(args.model, device=_device(args.device))
    ids = tok(args.prompt, return_tensors="pt").to(next(model.parameters()).device)
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
    from .io import load_model

    if args.new_tokens < 1 or args.repeats < 1:
        raise ValueError("--new-tokens and --repeats must be at least 1")
    if args.json and Path(args.json).exists():
        raise FileExistsError(f"--json {args.json} exists; give a new file name")
    models, tok = {}, None
    for spec in [args.model] + ([args.dense] if args.dense else []):
        models[spec], tok = load_model(spec, device=_device(args.device))
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
        from .checkpoint import atomic_write_text

        atomic_write_text(Path(args.json), json.dumps(rows, indent=2) + "\n")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from .io import verify

    if args.plot and Path(args.plot).exists():
        raise FileExistsError(f"--plot {args.plot} exists; give a new file name")
    section = verify(args.model)
    ranks, shapes = section.pop("ranks"), section.pop("dense_shapes")
    shards, tensor_bytes = section.pop("shards", {}), section.pop("tensor_bytes")
    quantization = section.pop("quantization", None) or {}
    quantized = quantization.pop("modules", {})
    print(json.dumps(section, indent=2))
    print(f"shards: {', '.join(shards)} (sha256 verified)")
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


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="svdllm: %(message)s")
    if args.quiet:
        os.environ["TQDM_DISABLE"] = "1"
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    from .io import FormatError

    def interrupt(*_: Any) -> None:
        raise KeyboardInterrupt  # a SIGTERM cleans up like Ctrl-C: no half-written folder is left

    signal.signal(signal.SIGTERM, interrupt)
    from . import distributed

    try:
        return COMMANDS[args.command](args)
    except (ValueError, FileNotFoundError, FileExistsError, RuntimeError, FormatError, OSError) as exc:
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if distributed.active() and not isinstance(exc, distributed.PeerLost):
            msg = f"rank {distributed.world()[0]}: {msg}"
        print(f"svdllm {args.command}: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("svdllm: interrupted", file=sys.stderr)
        return 130
    finally:
        distributed.shutdown()


if __name__ == "__main__":
    sys.exit(main())
