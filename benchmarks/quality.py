"""Perplexity of every method at several ratios on one model (the paper's Table 1, reproduced).

    python benchmarks/quality.py --methods svd,fwsvd,asvd,svdllm-w,svdllm,svdllm-ec --ratios 0.2,0.4,0.6,0.8

A method may carry a β for svdllm-ec as ``svdllm-ec@0.5`` (``svdllm-ec@0.75!``: no norm guard), and a rank
rule as ``svdllm-ec+fisher`` or ``+uniform`` (``+fisher:0.8:1.5`` sets the floor and cap),
and ``/ts`` at the end for the true-sequential order inside a block (``svdllm-ec+fisher/ts``); ``/ow`` adds
output-aware whitening (``/ow0``: with the diagonal of every output-gradient Gram, not the full Gram).
Writes results.json (updated after every run, so partial results survive),
table.md and perplexity.png to --out.  Calibration windows, evaluation tokens
and the dense model's statistics are computed once and shared by all runs, so
a method's compression time excludes statistics an earlier run already made.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import PeakRSS, markdown_table, write_json  # noqa: E402

from svdllm import CompressionConfig, compress, evaluate_perplexity, load_model, sample_windows  # noqa: E402
from svdllm.methods import MethodOptions, options_for  # noqa: E402
from svdllm.data import load_text, tokenize  # noqa: E402


def parse_rule(spec: str) -> dict:
    """'svdllm-ec+fisher:0.8:1.5/ts' → rank_rule fisher, floor 0.8, cap 1.5, true_sequential (CompressionConfig
    fields)."""
    spec, *flags = spec.split("/")
    ts = "ts" in flags
    _, plus, rule = spec.partition("+")
    out: dict = {"rank_rule": "uniform", **({"true_sequential": True} if ts else {})}  # no rule named: uniform
    if not plus:
        return out
    name, *bounds = rule.split(":")
    return dict(out, rank_rule=name, **dict(zip(("rank_floor", "rank_cap"), map(float, bounds))))


def parse_method(spec: str) -> MethodOptions:
    """'svdllm-ec@0.5' → β 0.5; a trailing '!' ('svdllm-ec@1!') turns the norm guard off; '/ow', '/ow0': output-aware
    whitening with full (diagonal) output-gradient Grams."""
    spec, *flags = spec.split("/")
    name, _, beta = spec.partition("+")[0].partition("@")
    values: dict = {}
    if name in ("svdllm-w", "svdllm", "svdllm-ec"):  # one-sided unless asked, whatever the method's default
        values["output_whitening"] = "ow" in flags or "ow0" in flags
    if "ow0" in flags:
        values["output_full_width"] = 0
    if beta.endswith("!"):
        beta, values["norm_cap"] = beta[:-1], 0.0
    if beta:
        values["beta"] = float(beta)
    return options_for(name, **values)


def plot(results: dict, path: Path, data: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    by_method: dict[str, list[tuple[float, float]]] = {}
    for run in results["runs"]:
        by_method.setdefault(run["method"], []).append((run["ratio"], run["perplexity"][data]))
    for method, pts in by_method.items():
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=method)
    ax.axhline(results["dense"][data], color="black", linestyle="--", label="dense")
    ax.set_yscale("log")
    ax.set_xlabel("parameter reduction ratio")
    ax.set_ylabel(f"perplexity on {data}")
    ax.set_title(f"{results['model']}: perplexity against compression")
    ax.legend(fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def table(results: dict) -> str:
    methods = list(dict.fromkeys(r["method"] for r in results["runs"]))
    ratios = sorted({r["ratio"] for r in results["runs"]})
    cells = {(r["method"], r["ratio"]): r for r in results["runs"]}
    evals = list(results["dense"])
    out = f"Perplexity ({' / '.join(evals)}), dense: {' / '.join(f'{v:.2f}' for v in results['dense'].values())}\n\n"
    rows = []
    for ratio in ratios:
        row = [f"{ratio:g}"]
        for m in methods:
            r = cells.get((m, ratio))
            row.append(" / ".join(f"{r['perplexity'][e]:.1f}" for e in evals) if r else "")
        rows.append(row)
    out += markdown_table(["ratio"] + methods, rows)
    out += "\nCompression wall time (s) / peak RSS (GiB)\n\n"
    rows = [[f"{ratio:g}"] + [
        f"{cells[(m, ratio)]['compress_seconds']:.0f} / {cells[(m, ratio)]['peak_rss_gib']:.2f}" if (m, ratio) in cells else ""
        for m in methods] for ratio in ratios]
    return out + markdown_table(["ratio"] + methods, rows)


def render(results: dict, out: Path) -> None:
    write_json(out / "results.json", results)
    notes = "".join(f"\n{note}\n" for note in results.get("notes", []))
    (out / "table.md").write_text(f"`{results['command']}`\n\n" + table(results) + notes)
    plot(results, out / "perplexity.png", next(iter(results["dense"])))


def merge(out: Path, other: Path) -> None:
    """Runs made in parallel elsewhere (same model, calibration and evaluation) join this table."""
    results = json.loads((out / "results.json").read_text())
    extra = json.loads((other / "results.json").read_text())
    if extra["dense"] != results["dense"]:
        raise SystemExit(f"{other} was evaluated differently (dense perplexity {extra['dense']} != {results['dense']})")
    seen = {(r["method"], r["ratio"]) for r in results["runs"]}
    results["runs"] += [r for r in extra["runs"] if (r["method"], r["ratio"]) not in seen]
    results["command"] += f"`\n\n`{extra['command']}"
    render(results, out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--methods", default="svd,fwsvd,asvd,svdllm-w,svdllm,svdllm-ec")
    p.add_argument("--ratios", default="0.2,0.4,0.6,0.8")
    p.add_argument("--calib", default="wiki-train")
    p.add_argument("--nsamples", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval", default="wiki-test,news")
    p.add_argument("--max-tokens", type=int, default=8192)
    p.add_argument("--out", default="benchmarks/results/quality")
    p.add_argument("--append", action="store_true", help="add runs to an existing results.json in --out")
    p.add_argument("--merge-from", default="", help="only merge the runs of another --out folder into --out, re-render")
    args = p.parse_args()
    if args.merge_from:
        merge(Path(args.out), Path(args.merge_from))
        return

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    base, tok = load_model(args.model)
    calib = tokenize(tok, load_text(args.calib))
    evals = {e: tokenize(tok, load_text(e))[: args.max_tokens] for e in args.eval.split(",")}
    command = " ".join(["python"] + sys.argv)
    if args.append and (out / "results.json").exists():
        results = json.loads((out / "results.json").read_text())
        results["command"] += f"`\n\n`{command}"
    else:
        results = {"model": args.model, "command": command, "args": vars(args),
                   "torch_threads": torch.get_num_threads(), "runs": []}
        results["dense"] = {e: evaluate_perplexity(base, tok, ids, args.seqlen, None).perplexity
                            for e, ids in evals.items()}
    print("dense", results["dense"], flush=True)
    windows = sample_windows(calib, args.nsamples, args.seqlen, args.seed)
    for ratio in [float(r) for r in args.ratios.split(",")]:
        for spec in args.methods.split(","):
            cfg = CompressionConfig(ratio=ratio, method=parse_method(spec), **parse_rule(spec))
            model = copy.deepcopy(base)
            with PeakRSS() as rss:
                t0 = time.perf_counter()
                report = compress(model, windows, cfg, progress=False).report
                seconds = time.perf_counter() - t0
            ppl = {e: evaluate_perplexity(model, tok, ids, args.seqlen, None).perplexity for e, ids in evals.items()}
            run = {"method": spec, "ratio": ratio, "perplexity": ppl, "compress_seconds": seconds,
                   "phases": report.timings, "peak_rss_gib": rss.peak / 2**30,
                   "remedies": len(report.remedies),
                   "beta_reduced": sum(1 for r in report.records if "beta_requested" in r),
                   "max_norm_ratio": max((r.get("norm_ratio", 0.0) for r in report.records), default=0.0)}
            results["runs"].append(run)
            print(spec, ratio, {k: round(v, 2) for k, v in ppl.items()}, f"{seconds:.0f}s", flush=True)
            del model
            render(results, out)


if __name__ == "__main__":
    main()
