"""What compression buys and what it costs: memory and speed of compressed vs dense, and compression time.

    python benchmarks/speed.py --ratios 0.2,0.4,0.6            # compresses SmolLM2 itself
    python benchmarks/speed.py --models out/a,out/b --dense smollm2-135m

Every model is measured in one process, interleaved repeat by repeat, and the
figures quoted are medians and compressed/dense ratios.  Beside each decode
ratio stands its limit: decode at batch 1 streams every weight once per token,
so the best speed-up is the ratio of bytes read per token.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import PeakRSS, markdown_table, write_json  # noqa: E402

from svdllm import CompressionConfig, compress  # noqa: E402
from svdllm.assets import load_model  # noqa: E402
from svdllm.data import load_text, tokenize  # noqa: E402


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def weight_bytes(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in {id(p): p for p in model.parameters()}.values())


def bytes_read_per_token(model: nn.Module) -> int:
    """Weights a batch-1 decode step streams: everything but input-embedding tables (one row is read),
    unless the table is tied to the output head, which reads it whole."""
    head = model.get_output_embeddings()
    head_id = id(head.weight) if head is not None else None
    total = 0
    for p in {id(p): p for p in model.parameters()}.values():
        total += p.numel() * p.element_size()
    for m in model.modules():
        if isinstance(m, nn.Embedding) and id(m.weight) != head_id:
            total -= (m.weight.shape[0] - 1) * m.weight.shape[1] * m.weight.element_size()
    return total


def timed(fn: Callable[[], Any], device: torch.device) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


@torch.no_grad()
def measure(model: nn.Module, ids: torch.Tensor, args: argparse.Namespace) -> dict[str, float]:
    device = next(model.parameters()).device
    out: dict[str, float] = {}
    for n in args.prefill:
        x = ids[:, :n].to(device)
        out[f"prefill_{n}_tok_s"] = n / timed(lambda: model(input_ids=x, use_cache=True), device)
    for b in args.batch:
        x = ids[:1, :16].repeat(b, 1).to(device)
        gen = lambda: model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=args.new_tokens,  # noqa: E731
                                     min_new_tokens=args.new_tokens, do_sample=False, pad_token_id=0)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
            t = timed(gen, device)
            out[f"decode_b{b}_peak_extra_mib"] = (torch.cuda.max_memory_allocated(device) - base) / 2**20
        else:
            with PeakRSS(0.01) as rss:
                before = rss.peak
                t = timed(gen, device)
            out[f"decode_b{b}_peak_extra_mib"] = (rss.peak - before) / 2**20
        out[f"decode_b{b}_tok_s"] = b * args.new_tokens / t
    return out


@torch.no_grad()
def compression_cost(base: nn.Module, tok: Any, calib: torch.Tensor, ratio: float, method: str) -> dict[str, Any]:
    """Compress a copy with the full pipeline; beside it, one plain forward over the same calibration tokens."""
    cfg = CompressionConfig(ratio=ratio, method=method)
    from svdllm.calibration import sample_windows

    windows = sample_windows(calib, cfg.nsamples, cfg.seqlen, cfg.seed)
    device = next(base.parameters()).device
    floor = timed(lambda: [base(input_ids=w.to(device), use_cache=False) for w in windows.split(cfg.batch_size)], device)
    model = copy.deepcopy(base)
    with PeakRSS() as rss:
        t = timed(lambda: compress(model, tok, cfg, calib_tokens=calib, progress=False), device)
    return {"model": model, "seconds": t, "phases": model.svdllm_report.timings, "peak_rss_gib": rss.peak / 2**30,
            "forward_floor_seconds": floor, "kept_dense": sum(1 for r in model.svdllm_report.records if r.get("kept_dense"))}


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


def table(results: dict) -> str:
    dense = results["models"]["dense"]
    keys = [k for k in dense["median"] if k.endswith("tok_s")]
    out = f"`{results['command']}`\n\nDevice: {results['device']}, torch threads {results['threads']}, " \
          f"{results['args']['repeats']} interleaved repeats, medians.\n\n"
    rows = []
    for name, m in results["models"].items():
        if name == "dense":
            continue
        row = [f"{m['ratio']:g}", f"{m['weight_bytes'] / dense['weight_bytes']:.3f}"]
        row += [f"{m['median'][k] / dense['median'][k]:.2f}" for k in keys]
        row.append(f"{dense['bytes_per_token'] / m['bytes_per_token']:.2f}")
        rows.append(row)
    header = ["ratio", "weight memory (c/d)"] + [k.replace("_tok_s", "") + " speed-up" for k in keys] + ["decode limit"]
    out += markdown_table(header, rows)
    out += "\nAbsolute medians (tokens/s; peak extra MiB during generate):\n\n"
    names = list(results["models"])
    mkeys = list(dense["median"])
    out += markdown_table(["model"] + mkeys, [[n] + [f"{results['models'][n]['median'][k]:.1f}" for k in mkeys]
                                             for n in names])
    if results.get("cost"):
        out += "\nCompression cost (method " + results["args"]["method"] + "):\n\n"
        rows = []
        for ratio, c in results["cost"].items():
            phases = ", ".join(f"{k} {v:.1f}s" for k, v in c["phases"].items())
            rows.append([ratio, f"{c['seconds']:.1f}", f"{c['forward_floor_seconds']:.1f}",
                         f"{c['seconds'] / c['forward_floor_seconds']:.1f}×", f"{c['peak_rss_gib']:.2f}", phases,
                         c["kept_dense"]])
        out += markdown_table(["ratio", "compress s", "plain forward s", "cost / floor", "peak RSS GiB", "split",
                               "layers kept dense"], rows)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dense", default="smollm2-135m")
    p.add_argument("--models", default="", help="compressed model folders, comma-separated")
    p.add_argument("--ratios", default="0.2,0.4,0.6", help="compress --dense at these ratios (when no --models)")
    p.add_argument("--method", default="svdllm-ec", help="method for the compression-cost runs")
    p.add_argument("--cost-ratios", default="0.4", help="ratios at which to time --method ('' skips)")
    p.add_argument("--prefill", default="128,1024")
    p.add_argument("--batch", default="1,8")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default="benchmarks/results/speed")
    args = p.parse_args()
    args.prefill = [int(x) for x in args.prefill.split(",")]
    args.batch = [int(x) for x in args.batch.split(",")]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    base, tok = load_model(args.dense, device=args.device)
    calib = tokenize(tok, load_text("wiki-train"))
    models: dict[str, tuple[nn.Module, float]] = {"dense": (base, 0.0)}
    cost: dict[str, Any] = {}
    if args.models:
        for d in args.models.split(","):
            m, _ = load_model(d, device=args.device)
            models[d] = (m, float(m.config.svdllm["ratio"]))
    else:
        # ranks, hence speed, depend on the ratio only: plain SVD builds the models fast
        for r in [float(x) for x in args.ratios.split(",")]:
            m = compress(copy.deepcopy(base), tok, CompressionConfig(ratio=r, method="svd"), progress=False)
            models[f"ratio {r:g}"] = (m, r)
    for r in [float(x) for x in args.cost_ratios.split(",") if x.strip()]:
        c = compression_cost(base, tok, calib, r, args.method)
        c.pop("model")
        cost[f"{r:g}"] = c
        print(f"{args.method} at {r}: {c['seconds']:.1f}s (plain forward {c['forward_floor_seconds']:.1f}s)", flush=True)
    ids = calib[: max(args.prefill)][None]
    samples: dict[str, list[dict[str, float]]] = {k: [] for k in models}
    for name, (m, _) in models.items():  # warm-up
        measure(m, ids, argparse.Namespace(**{**vars(args), "new_tokens": 8, "prefill": [32]}))
    for rep in range(args.repeats):
        for name, (m, _) in models.items():
            samples[name].append(measure(m, ids, args))
        print(f"repeat {rep + 1}/{args.repeats} done", flush=True)
    results: dict[str, Any] = {
        "command": " ".join(["python"] + sys.argv), "args": vars(args), "dense": args.dense,
        "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else f"CPU ({torch.get_num_threads()} threads)",
        "threads": torch.get_num_threads(), "models": {}, "cost": cost,
    }
    for name, (m, ratio) in models.items():
        med = {k: statistics.median(s[k] for s in samples[name]) for k in samples[name][0]}
        results["models"][name] = {"ratio": ratio, "weight_bytes": weight_bytes(m),
                                   "bytes_per_token": bytes_read_per_token(m), "median": med, "samples": samples[name]}
    write_json(out / "results.json", results)
    (out / "table.md").write_text(table(results))
    plot(results, out / "speed.png")
    print(table(results))


if __name__ == "__main__":
    main()
