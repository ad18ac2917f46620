"""Summarise how svdllm-ec's β behaves, from the svdllm_report.json of a `--beta auto` run.

    svdllm compress --method svdllm-ec --beta auto --beta-grid 0,0.25,0.5,0.75,1 --ratio 0.4 --out out/diag
    python benchmarks/beta_diagnostics.py out/diag/svdllm_report.json

For every candidate β it prints the median held-out error ‖WX − W′X′‖²/‖WX‖²
(on calibration windows the fit never saw), how often β wins, and the same
split by module kind and by depth; then the norm growth ‖W′‖/‖W‖ of the chosen fits.
"""
from __future__ import annotations

import json
import statistics
import sys
from collections import Counter, defaultdict


def main(path: str) -> None:
    records = [r for r in json.loads(open(path).read())["records"] if "beta_scores" in r]
    grid = sorted(float(b) for b in records[0]["beta_scores"])
    print(f"{len(records)} matrices; candidates {grid}\n")
    wins = Counter(float(r["beta"]) for r in records)
    print("| β | median held-out error | wins |\n|---|---:|---:|")
    for b in grid:
        med = statistics.median(r["beta_scores"][str(b) if str(b) in r["beta_scores"] else b] for r in records)
        print(f"| {b:g} | {med:.4f} | {wins.get(b, 0)} |")
    by_kind: dict[str, list[float]] = defaultdict(list)
    by_depth: dict[str, list[float]] = defaultdict(list)
    for r in records:
        parts = r["name"].split(".")
        by_kind[parts[-1]].append(float(r["beta"]))
        layer = next(int(p) for p in parts if p.isdigit())
        by_depth[f"{layer // 10 * 10:02d}-{layer // 10 * 10 + 9:02d}"].append(float(r["beta"]))
    print("\n| module | mean chosen β |\n|---|---:|")
    for k, v in sorted(by_kind.items()):
        print(f"| {k} | {statistics.mean(v):.2f} |")
    print("\n| layers | mean chosen β |\n|---|---:|")
    for k, v in sorted(by_depth.items()):
        print(f"| {k} | {statistics.mean(v):.2f} |")
    norms = [r["norm_ratio"] for r in records if "norm_ratio" in r]
    if norms:
        print(f"\nnorm ratio ‖W′‖/‖W‖ of the chosen fits: median {statistics.median(norms):.3f}, max {max(norms):.3f}")


if __name__ == "__main__":
    main(sys.argv[1])
