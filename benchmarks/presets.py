"""The presets (fast, balanced = the default, best = the default with block refinement) side by side: perplexity,
compress seconds and peak memory, in one run at one commit.

    python benchmarks/presets.py                                  # SmolLM2 at 0.4 and 0.6, every preset
    python benchmarks/presets.py --ratios 0.4 --presets balanced,best
    python benchmarks/presets.py --ratios 0.4 --presets balanced,best:96 --results benchmarks/results/presets-96
    python benchmarks/presets.py --render                         # table and plot again from results.json

``best:96`` is the ``best`` preset with 96 refinement steps a block instead of its own.

In one process, alone on the machine: a plain forward of the model over the calibration windows (the unit of
cost), then each preset's ``CompressionConfig`` at each ratio on a fresh copy of the model, timed (evaluation not
included), with the process's peak resident memory above what it held before the run; the perplexity on
``--max-tokens`` tokens of wiki-test and news is taken after, on the compressed model.  ``balanced`` is the default
and is rerun here with the same code, never copied from an older results file.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import PeakRSS, commit, markdown_table, measure_then_render, save_figure, write_json  # noqa: E402
from cost import plain_passes  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "presets"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ratios", default="0.4,0.6")
    ap.add_argument("--presets", default="fast,balanced,best")
    ap.add_argument("--max-tokens", type=int, default=4096, help="evaluation tokens per text")
    measure_then_render(ap, RESULTS, measure, render)


def measure(args: argparse.Namespace, results: Path) -> None:
    import torch

    from svdllm import compress
    from svdllm.data import token_windows
    from svdllm.evaluate import window_perplexities
    from svdllm.source import open_source
    from svdllm.workflow import preset

    base = preset("balanced")
    source, tok = open_source(base.model, False, "cpu")
    dense = source.model
    out: dict[str, Any] = {"commit": commit(), "device": "CPU (2 cores), nothing else running",
                           "torch_threads": torch.get_num_threads(), "model": base.model,
                           "eval_tokens": args.max_tokens, "runs": []}
    windows_of: dict[tuple[int, int], Any] = {}
    evals = None
    for ratio in [float(r) for r in args.ratios.split(",")]:
        for name in args.presets.split(","):
            opts = preset(name.partition(":")[0])
            if ":" in name:  # best:96, another number of refinement steps
                opts.compression.refine.steps = int(name.partition(":")[2])
            key = (opts.nsamples, opts.seqlen)
            if key not in windows_of:
                windows_of[key], evals, _ = token_windows(tok, dense.config, opts.calib, opts.nsamples, opts.seqlen,
                                                          opts.seed, opts.eval, opts.eval_seqlen, args.max_tokens)
                if "plain" not in out:
                    out["plain"] = plain_passes(dense, windows_of[key], source.default_batch)
                    out["calibration"] = f"{opts.nsamples}x{opts.seqlen} {opts.calib}"
                    print(json.dumps(out["plain"]), flush=True)
            cfg = replace(opts.compression, ratio=ratio)
            model = copy.deepcopy(dense)
            with PeakRSS() as rss:
                start = rss.peak
                t0 = time.perf_counter()
                result = compress(model, windows_of[key], cfg, progress=False)
                seconds = time.perf_counter() - t0
            with torch.no_grad():
                ppl = window_perplexities(model, evals, progress=False)
            run = {"ratio": ratio, "preset": name, "seconds": seconds, "peak_mib": (rss.peak - start) / 2**20,
                   "calibration": f"{opts.nsamples}x{opts.seqlen}", "config": cfg.to_dict(),
                   "phases": dict(result.report.timings), "refinement": result.report.refinement,
                   "perplexity": ppl}
            del model, result
            out["runs"].append(run)
            print(json.dumps({k: v for k, v in run.items() if k not in ("config", "refinement")}), flush=True)
            write_json(results / "results.json", out)


def render(results: Path) -> None:
    data = json.loads((results / "results.json").read_text())
    fwd = data["plain"]["forward"]
    texts = list(data["runs"][0]["perplexity"]) if data["runs"] else []
    header = ["ratio", "preset", "calibration", *texts, "compress s", "× a plain forward", "refinement s", "peak MiB",
              "blocks refined"]
    rows: list[list[Any]] = []
    for run in data["runs"]:
        base = next((r for r in data["runs"] if r["ratio"] == run["ratio"] and r["preset"] == "balanced"), None)
        cells = []
        for t in texts:
            v = run["perplexity"][t]
            change = f" ({100 * (v / base['perplexity'][t] - 1):+.1f}%)" if base and base is not run else ""
            cells.append(f"{v:.2f}{change}")
        refined = [r for r in run["refinement"] if str(r.get("outcome", "")).startswith("refined")]
        rows.append([run["ratio"], run["preset"], run.get("calibration", data["calibration"]), *cells,
                     f"{run['seconds']:.0f}", f"{run['seconds'] / fwd:.1f}",
                     f"{run['phases'].get('refinement', 0.0):.0f}", f"{run['peak_mib']:.0f}",
                     f"{len(refined)} / {len(run['refinement'])}" if run["refinement"] else ""])
    text = (f"`python benchmarks/presets.py` at {data['commit']} ({data['device']}, {data['torch_threads']} threads; "
            f"{data['model']}, calibration {data['calibration']}, perplexity on {data['eval_tokens']} tokens a text)"
            f"\n\nA plain forward over the {data['calibration']} calibration windows: {fwd:.1f} s (the unit of the × "
            "column, whatever a preset's own calibration). Changes are against `balanced` (the "
            "default) at the same ratio, in this run. Peak MiB is the process's resident memory above what it held "
            "when that compression began; the heap earlier runs freed (the plain forward and backward first) is "
            "reused, so it understates what a fresh process needs (the README's figures come from fresh "
            "processes).\n\n" + markdown_table(header, rows))
    (results / "table.md").write_text(text)
    plot(data, results / "presets.png", texts[0] if texts else "")
    print(text)


def plot(data: dict[str, Any], path: Path, text: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fwd = data["plain"]["forward"]
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for ratio in sorted({r["ratio"] for r in data["runs"]}):
        runs = [r for r in data["runs"] if r["ratio"] == ratio]
        ax.plot([r["seconds"] / fwd for r in runs], [r["perplexity"][text] for r in runs], marker="o",
                label=f"ratio {ratio:g}")
        for r in runs:
            ax.annotate(r["preset"], (r["seconds"] / fwd, r["perplexity"][text]), fontsize=7)
    ax.set_xlabel("compress time, × a plain forward over the calibration")
    ax.set_ylabel(f"perplexity on {text}")
    ax.set_yscale("log")
    ax.set_title(f"{data['model']}: the presets, quality against cost")
    ax.legend(fontsize=7)
    save_figure(fig, path)


if __name__ == "__main__":
    main()
