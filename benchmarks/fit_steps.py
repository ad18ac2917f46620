"""The steps of one error-corrected fit, timed one by one, on a LLaMA-2-7B down_proj shape (4096 × 11008).

    python benchmarks/fit_steps.py            # about 2 minutes on 2 cores, alone on the machine

Random bf16 weights and random calibration inputs (512 tokens by default, the scale benchmark's 4×128); the
compressed inputs are the dense ones plus noise.  W·XᵀX′ and W·X′ᵀX′ are timed both ways: as float64 products with
the n×n statistics, and summed from the outputs (what ``calibration.sums_from_outputs`` picks at this size).
Writes results.json (with the commit), table.md and steps.png to --results.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import commit, markdown_table, save_figure, write_json  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "fit-steps"


def main() -> None:
    import torch

    from svdllm.calibration import add_product_, sums_from_outputs
    from svdllm.whitening import output_factor, output_shrinkage, repaired_cholesky, truncate

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--m", type=int, default=4096)
    ap.add_argument("--n", type=int, default=11008)
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--results", default=str(RESULTS))
    args = ap.parse_args()
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    at = commit()
    m, n, t = args.m, args.n, args.tokens
    gen = torch.Generator().manual_seed(0)
    w = (torch.randn(m, n, generator=gen) / 100).bfloat16()
    x = torch.randn(t, n, generator=gen)
    xc = x + 0.1 * torch.randn(t, n, generator=gen)
    g = torch.randn(t, m, generator=gen)
    steps: dict[str, float] = {}

    def timed(label: str, fn: Callable[[], Any]) -> Any:
        t0 = time.perf_counter()
        out = fn()
        steps[label] = time.perf_counter() - t0
        print(f"{label}: {steps[label]:.1f} s", flush=True)
        return out

    w64 = w.double()
    comp = timed("X′ᵀX′ (float32 slabs into float64)", lambda: add_product_(None, xc, xc))
    cross = timed("XᵀX′ (float32 slabs into float64)", lambda: add_product_(None, x, xc))
    w_cross = timed("W·XᵀX′ as a float64 product", lambda: w64 @ cross)
    w_comp = timed("W·X′ᵀX′ as a float64 product", lambda: w64 @ comp)
    x64, xc64 = x.double(), xc.double()
    out_cross = timed("W·XᵀX′ from the outputs (float64)", lambda: (x64 @ w64.T).T @ xc64)
    out_comp = timed("W·X′ᵀX′ from the outputs (float64)", lambda: (xc64 @ w64.T).T @ xc64)
    gap = max(float((out_cross - w_cross).norm() / w_cross.norm()), float((out_comp - w_comp).norm() / w_comp.norm()))
    factor = timed("Cholesky of X′ᵀX′ (ridge 1e-4)", lambda: repaired_cholesky(comp, 1e-4))
    target = timed("triangular solve", lambda: torch.linalg.solve_triangular(
        factor[0].T, torch.lerp(w_comp, w_cross, 0.25), upper=True, left=False))
    out_gram = add_product_(None, g, g)
    r = timed("output factor R", lambda: output_factor(out_gram, 0.01, output_shrinkage(m, t))[0])
    target = timed("Rᵀ·target", lambda: r.T @ target)
    k = int(0.8 * m * n / (m + n))
    _, vs, _ = timed("eigen split (truncate)", lambda: truncate(target, k))
    v = timed("back-solve v·S⁻¹", lambda: torch.linalg.solve_triangular(factor[0], vs, upper=False, left=False))
    timed("loss terms (v·vᵀ, W·X′ᵀX′·vᵀ)", lambda: (vs @ vs.T, w_comp @ v.T))
    routes = {"XᵀX′": sums_from_outputs(t, n, m, statistic_needed=False),
              "X′ᵀX′": sums_from_outputs(t, n, m, statistic_needed=True)}
    write_json(results / "results.json", {"commit": at, "device": "CPU (2 cores), nothing else running",
                                          "shape": [m, n], "tokens": t, "steps_s": steps,
                                          "routes_from_outputs": routes, "products_relative_gap": gap})
    table = markdown_table(["step", "seconds"], [[k, f"{v:.1f}"] for k, v in steps.items()])
    (results / "table.md").write_text(
        f"`python benchmarks/fit_steps.py` at {at} (CPU, 2 cores, alone): one {m} × {n} error-corrected fit with "
        f"{t} calibration tokens, step by step.\n\n{table}\nThe products from the outputs equal the float64 products "
        f"with the statistics to {gap:.1e} (relative); `sums_from_outputs` takes the outputs for "
        f"{', '.join(k for k, v in routes.items() if v) or 'neither'} at this size.\n")
    plot(steps, results / "steps.png")
    print((results / "table.md").read_text())


def plot(steps: dict[str, float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    labels = list(steps)
    ax.barh(labels[::-1], [steps[k] for k in labels[::-1]],
            color=["tab:green" if "outputs" in k else "tab:blue" for k in labels[::-1]])
    ax.set_xlabel("seconds")
    ax.set_title("one 4096 × 11008 error-corrected fit, step by step (green: from the outputs)", fontsize=9)
    save_figure(fig, path)


if __name__ == "__main__":
    main()
