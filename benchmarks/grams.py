"""What a Gram of one calibration batch costs: the former routine (the full product of X with itself, 2048 output
rows at a time) against ``calibration.add_product_``'s symmetric one (slabs up to the diagonal, mirrored), and the
product with another tensor of the same shape (what a cross Gram X·X′ᵀ costs); float32 products summed in float64.

    python benchmarks/grams.py                  # widths 576, 1536 (SmolLM2), 4096 (LLaMA-7B), 2048 tokens
    python benchmarks/grams.py --render         # table and plot again from results.json

Alone on the machine: each product is run once to warm up, then timed as the median of ``--repeats`` runs; the
largest difference between the two totals is given relative to the largest entry.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import commit, markdown_table, measure_then_render, save_figure, write_json  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "grams"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--widths", default="576,1536,4096")
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--repeats", type=int, default=15)
    measure_then_render(ap, RESULTS, measure, render)


def _median_seconds(fn: Any, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def former_gram(x: Any, slab: int = 2048) -> Any:
    """X·Xᵀ as svdllm made it until bb1884d: the full float32 product, ``slab`` output rows at a time, into float64."""
    import torch

    total = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64)
    for r in range(0, x.shape[1], slab):
        total[r:r + slab].add_(x[:, r:r + slab].T @ x)
    return total


def measure(args: argparse.Namespace, results: Path) -> None:
    import torch

    from svdllm.calibration import add_product_

    out: dict[str, Any] = {"commit": commit(), "device": "CPU (2 cores), nothing else running",
                           "torch_threads": torch.get_num_threads(), "tokens": args.tokens, "repeats": args.repeats,
                           "rows": []}
    gen = torch.Generator().manual_seed(0)
    for n in [int(w) for w in args.widths.split(",")]:
        x = torch.randn(args.tokens, n, generator=gen)
        twin = x.clone()  # the same values in another tensor: BLAS cannot use X·Xᵀ's symmetry or its cache reuse
        full = _median_seconds(lambda: former_gram(x), args.repeats)
        sym = _median_seconds(lambda: add_product_(None, x, x), args.repeats)
        cross = _median_seconds(lambda: add_product_(None, x, twin), args.repeats)
        a, b = former_gram(x), add_product_(None, x, x)
        out["rows"].append({"width": n, "full_s": full, "symmetric_s": sym, "cross_s": cross,
                            "max_rel_difference": float((a - b).abs().max() / a.abs().max())})
        print(json.dumps(out["rows"][-1]), flush=True)
    write_json(results / "results.json", out)


def render(results: Path) -> None:
    data = json.loads((results / "results.json").read_text())
    rows = [[r["width"], f"{r['full_s'] * 1e3:.1f}", f"{r['symmetric_s'] * 1e3:.1f}",
             f"{r['full_s'] / r['symmetric_s']:.2f}", f"{r['max_rel_difference']:.1e}", f"{r['cross_s'] * 1e3:.1f}"]
            for r in data["rows"]]
    text = (f"`python benchmarks/grams.py` at {data['commit']} ({data['device']}, {data['torch_threads']} threads; "
            f"a batch of {data['tokens']} tokens; the median of {data.get('repeats', '?')} runs each; this machine's "
            "timings of one product vary by up to 2× from run to run, so compare within a row)\n\n"
            + markdown_table(["width", "former full product ms", "symmetric ms (now)", "speed-up", "largest difference",
                            "product with another tensor ms (a cross Gram)"], rows))
    (results / "table.md").write_text(text)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    labels = [str(r["width"]) for r in data["rows"]]
    xs = range(len(labels))
    ax.bar([i - 0.2 for i in xs], [r["full_s"] * 1e3 for r in data["rows"]], 0.4, label="former full product")
    ax.bar([i + 0.2 for i in xs], [r["symmetric_s"] * 1e3 for r in data["rows"]], 0.4, label="symmetric (now)")
    ax.set_xticks(list(xs), labels)
    ax.set_yscale("log")
    ax.set_xlabel("width")
    ax.set_ylabel("ms per batch")
    ax.set_title("one Gram of a calibration batch")
    ax.legend()
    save_figure(fig, results / "grams.png")
    print(text)


if __name__ == "__main__":
    main()
