"""What compression buys and what it costs: memory and speed of compressed vs dense, and compression time.

    python benchmarks/speed.py --ratios 0.2,0.4,0.6            # compresses SmolLM2 itself
    python benchmarks/speed.py --models out/a,out/b --dense smollm2-135m

Every model is measured in one process, interleaved repeat by repeat, and the
figures quoted are medians and compressed/dense ratios.  Beside each decode
ratio stands its limit: decode at batch 1 streams every weight once per token,
so the best speed-up is the ratio of bytes read per token.

Memory while generating and the compression cost are each measured in a fresh
process (``--probe-*``), so that memory freed earlier cannot hide what they need.
``--cost-from`` reuses the cost section of an earlier results.json.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import markdown_table, peak_rss, peak_rss_reset, write_json  # noqa: E402

from svdllm import CompressionConfig, compress, load_model, sample_windows, save  # noqa: E402
from svdllm.data import load_text, tokenize  # noqa: E402
from svdllm.generation import bytes_read_per_token, generate_seconds, timed, weight_bytes  # noqa: E402


@torch.no_grad()
def measure(model: nn.Module, ids: torch.Tensor, args: argparse.Namespace) -> dict[str, float]:
    """Throughputs in tokens/s.  Memory is measured apart, each in a fresh process (see ``probe_generate``)."""
    device = next(model.parameters()).device
    out: dict[str, float] = {}
    for n in args.prefill:
        x = ids[:, :n].to(device)
        out[f"prefill_{n}_tok_s"] = n / timed(lambda: model(input_ids=x, use_cache=True), device)
    for path in args.paths:
        prefix = "fast_" if path == "fast" else ""
        for b in args.batch:
            seconds = generate_seconds(model, ids[:, :16].repeat(b, 1), args.new_tokens, fast=path == "fast")
            out[f"{prefix}decode_b{b}_tok_s"] = b * args.new_tokens / seconds
    return out


def own_copies(model: nn.Module) -> None:
    """Copy every weight out of the memory-mapped checkpoint into process memory.

    Otherwise RSS counts mapped file pages only once touched, and a rank-major
    copy of U made at load leaves the mapped original counted too (clean file
    pages the kernel could drop, but RSS shows them).  With own copies, dense and
    compressed RSS both count each weight exactly once.
    """
    import ctypes

    done: set[int] = set()
    for module in model.modules():
        for p in module._parameters.values():
            if p is not None and id(p) not in done:  # tied weights are one Parameter: copy once
                done.add(id(p))
                p.data = p.data.clone()  # keeps strides, so U stays rank-major
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


@torch.no_grad()
def probe_generate(spec: str, batch: int, args: argparse.Namespace) -> dict[str, float]:
    """In a fresh process: load, then one generate; peak memory while generating (whole process on CPU).

    Fresh because an allocator that already holds freed memory (from earlier
    runs in the same process) would hide what generation needs.
    """
    model, tok = load_model(spec, device=args.device)
    own_copies(model)
    prompt = tokenize(tok, load_text("wiki-train"))[None, :16].repeat(batch, 1)  # the prompt ``measure`` uses
    gen = lambda: generate_seconds(model, prompt, args.new_tokens)  # noqa: E731
    if args.device.startswith("cuda"):
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        gen()
        return {"peak_mib": torch.cuda.max_memory_allocated() / 2**20,
                "extra_mib": (torch.cuda.max_memory_allocated() - base) / 2**20, "kind": "torch.cuda.max_memory_allocated"}
    import psutil

    base = psutil.Process().memory_info().rss
    if not peak_rss_reset():
        raise SystemExit("cannot reset the peak RSS (/proc/self/clear_refs)")
    gen()
    return {"peak_mib": peak_rss() / 2**20, "extra_mib": (peak_rss() - base) / 2**20, "kind": "process peak RSS (VmHWM)"}


@torch.no_grad()
def probe_compress(ratio: float, args: argparse.Namespace) -> dict[str, Any]:
    """In a fresh process: one plain forward over the calibration windows (the floor), then the full
    compression, timed, with the peak memory of compressing alone."""
    base, tok = load_model(args.dense, device=args.device)
    calib = tokenize(tok, load_text("wiki-train"))
    cfg = CompressionConfig(ratio=ratio, method=args.method)
    windows = sample_windows(calib, 32, 512, 0)
    device = next(base.parameters()).device
    floor = timed(lambda: [base(input_ids=w.to(device), use_cache=False) for w in windows.split(cfg.batch_size)], device)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    else:
        peak_rss_reset()
    results = []
    t = timed(lambda: results.append(compress(base, windows, cfg, progress=False)), device)
    peak = torch.cuda.max_memory_allocated() if cuda else peak_rss()
    report = results[0].report
    return {"seconds": t, "phases": report.timings, "peak_gib": peak / 2**30,
            "peak_kind": "torch.cuda.max_memory_allocated" if cuda else "process peak RSS (VmHWM)",
            "forward_floor_seconds": floor, "kept_dense": sum(1 for r in report.records if r.get("kept_dense"))}


def in_child(flag: str, value: str, args: argparse.Namespace, extra: list[str] = ()) -> dict[str, Any]:
    """Run this script with ``flag value`` in a fresh Python process; its last stdout line is JSON."""
    cmd = [sys.executable, __file__, flag, value, "--dense", args.dense, "--device", args.device,
           "--new-tokens", str(args.new_tokens), "--method", args.method, *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dense = results["models"]["dense"]
    rows = [(m["ratio"], m) for k, m in results["models"].items() if k != "dense"]
    rows.sort(key=lambda r: r[0])
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for b in results["args"]["batch"]:
        key = f"decode_b{b}_tok_s"
        axes[0].plot([r for r, _ in rows], [m["median"][key] for _, m in rows], marker="o", label=f"batch {b}")
        axes[0].axhline(dense["median"][key], linestyle="--", color="gray")
    axes[0].set_xlabel("parameter reduction ratio")
    axes[0].set_ylabel("decode tokens/s (dashed: dense)")
    axes[0].legend()
    axes[1].plot([r for r, _ in rows], [m["weight_bytes"] / 2**20 for _, m in rows], marker="o", label="compressed")
    axes[1].axhline(dense["weight_bytes"] / 2**20, linestyle="--", color="gray", label="dense")
    axes[1].set_xlabel("parameter reduction ratio")
    axes[1].set_ylabel("weight memory (MiB)")
    axes[1].legend()
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.suptitle(f"{results['dense']} on {results['device']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _f(x: float, nd: int = 1) -> str:
    return f"{x:.{nd}f}"


def table(results: dict) -> str:
    dense = results["models"]["dense"]
    med = lambda m, k: m["median"][k]  # noqa: E731
    b1 = [k for k in ("decode_b1_tok_s", "fast_decode_b1_tok_s") if k in dense["median"]]
    keys = [k for k in dense["median"] if k not in b1]
    out = f"`{results['command']}`\n\nDevice: {results['device']}, torch threads {results['threads']}, " \
          f"{results['args']['repeats']} interleaved repeats, medians; memory probes each in a fresh process. " \
          "`fast_`: static KV cache and compiled decode (`svdllm.generation.fast_options`), dense through the " \
          "same path.\n\n"
    rows = []
    mem_keys = sorted(dense.get("memory", {}))
    for name, m in results["models"].items():
        if name == "dense":
            continue
        row = [f"{m['ratio']:g}", _f(m["weight_bytes"] / dense["weight_bytes"], 3)]
        row += [_f(m["memory"][k]["peak_mib"] / dense["memory"][k]["peak_mib"], 3) for k in mem_keys]
        limit = dense["bytes_per_token"] / m["bytes_per_token"]
        for k in b1:
            row += [_f(med(m, k) / med(dense, k), 2), f"{100 * med(m, k) / med(dense, k) / limit:.0f}%"]
        row += [_f(limit, 2)] if b1 else []
        row += [_f(med(m, k) / med(dense, k), 2) for k in keys]
        rows.append(row)
    header = ["ratio", "weight memory (c/d)"] + [f"peak memory generating {k} (c/d)" for k in mem_keys]
    for k in b1:
        header += [f"**{k.replace('_tok_s', '')} speed-up**", "share of the limit"]
    header += ["**the limit** (bytes read per token, d/c)"] if b1 else []
    header += [k.replace("_tok_s", "") + " speed-up" for k in keys]
    out += markdown_table(header, rows)
    kind = next(iter(dense.get("memory", {}).values()), {}).get("kind", "")
    out += f"\nAbsolute medians (tokens/s; memory in MiB, {kind}):\n\n"
    tkeys = list(dense["median"])
    header = ["model", "weights MiB"] + [f"peak {k} MiB (extra over loaded)" for k in mem_keys] + tkeys
    rows = []
    for n, m in results["models"].items():
        row = [n, _f(m["weight_bytes"] / 2**20)]
        row += [f"{m['memory'][k]['peak_mib']:.0f} (+{m['memory'][k]['extra_mib']:.0f})" for k in mem_keys]
        rows.append(row + [_f(med(m, k)) for k in tkeys])
    out += markdown_table(header, rows)
    if results.get("cost"):
        out += "\nCompression cost (method " + results["args"]["method"] + ", each ratio in a fresh process):\n\n"
        phases = sorted({p for c in results["cost"].values() for p in c["phases"]})
        rows = []
        for ratio, c in results["cost"].items():
            rows.append([ratio, _f(c["seconds"]), _f(c["forward_floor_seconds"]),
                         f"{c['seconds'] / c['forward_floor_seconds']:.1f}×", _f(c["peak_gib"], 2)]
                        + [_f(c["phases"].get(p, 0.0)) for p in phases] + [c["kept_dense"]])
        out += markdown_table(["ratio", "compress s", "plain forward s (floor)", "cost / floor", "peak memory GiB"]
                              + [f"{p} s" for p in phases] + ["layers kept dense"], rows)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dense", default="smollm2-135m")
    p.add_argument("--models", default="", help="compressed model folders, comma-separated")
    p.add_argument("--ratios", default="0.2,0.4,0.6", help="compress --dense at these ratios (when no --models)")
    p.add_argument("--method", default="svdllm-ec", help="method for the compression-cost runs")
    p.add_argument("--cost-ratios", default="0.2,0.4,0.6", help="ratios at which to time --method ('' skips)")
    p.add_argument("--prefill", default="128,1024")
    p.add_argument("--batch", default="1,8")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--paths", default="eager,fast", help="eager: generate as is; fast: static cache + compiled decode")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default="benchmarks/results/speed")
    p.add_argument("--cost-from", help="reuse the compression-cost section of an earlier results.json")
    p.add_argument("--probe-generate", metavar="MODEL", help=argparse.SUPPRESS)
    p.add_argument("--probe-compress", metavar="RATIO", type=float, help=argparse.SUPPRESS)
    args = p.parse_args()
    args.prefill = [int(x) for x in args.prefill.split(",")]
    args.batch = [int(x) for x in args.batch.split(",")]
    args.paths = args.paths.split(",")
    if args.probe_generate:
        print(json.dumps(probe_generate(args.probe_generate, args.batch[0], args)))
        return
    if args.probe_compress is not None:
        print(json.dumps(probe_compress(args.probe_compress, args)))
        return
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    base, tok = load_model(args.dense, device=args.device)
    ids = tokenize(tok, load_text("wiki-train"))[: max(args.prefill)][None]
    models: dict[str, tuple[nn.Module, float, str]] = {"dense": (base, 0.0, args.dense)}
    tmp = tempfile.TemporaryDirectory(prefix="svdllm-speed-")
    if args.models:
        for d in args.models.split(","):
            m, _ = load_model(d, device=args.device)
            models[d] = (m, float(m.config.svdllm["ratio"]), d)
    else:
        # ranks, hence speed, depend on the ratio only: plain SVD builds the models fast
        for r in [float(x) for x in args.ratios.split(",")]:
            result = compress(copy.deepcopy(base), None, CompressionConfig(ratio=r, method="svd"), progress=False)
            models[f"ratio {r:g}"] = (result.model, r, str(save(result, tok, Path(tmp.name) / f"ratio-{r:g}")))
    samples: dict[str, list[dict[str, float]]] = {k: [] for k in models}
    for name, (m, *_) in models.items():  # warm-up; the fast path compiles here, for the measured shapes
        measure(m, ids, argparse.Namespace(**{**vars(args), "prefill": [32]}))
    for rep in range(args.repeats):
        for name, (m, *_) in models.items():
            samples[name].append(measure(m, ids, args))
        print(f"repeat {rep + 1}/{args.repeats} done", flush=True)
    results: dict[str, Any] = {
        "command": " ".join(["python"] + sys.argv), "args": vars(args), "dense": args.dense,
        "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else f"CPU ({os.cpu_count()} cores)",
        "threads": torch.get_num_threads(), "models": {}, "cost": {},
    }
    for name, (m, ratio, spec) in models.items():
        med = {k: statistics.median(s[k] for s in samples[name]) for k in samples[name][0]}
        memory = {f"b{b}": in_child("--probe-generate", spec, args, ["--batch", str(b)]) for b in args.batch}
        results["models"][name] = {"ratio": ratio, "weight_bytes": weight_bytes(m), "memory": memory,
                                   "bytes_per_token": bytes_read_per_token(m), "median": med, "samples": samples[name]}
        print(f"memory probed: {name}", flush=True)
    del models, base
    tmp.cleanup()
    if args.cost_from:
        results["cost"] = json.loads(Path(args.cost_from).read_text())["cost"]
        results["cost_from"] = args.cost_from
    for r in [float(x) for x in args.cost_ratios.split(",") if x.strip()]:
        c = in_child("--probe-compress", str(r), args)
        results["cost"][f"{r:g}"] = c
        print(f"{args.method} at {r}: {c['seconds']:.1f}s (plain forward {c['forward_floor_seconds']:.1f}s)", flush=True)
    write_json(out / "results.json", results)
    (out / "table.md").write_text(table(results))
    plot(results, out / "speed.png")
    print(table(results))


if __name__ == "__main__":
    main()
