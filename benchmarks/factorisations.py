"""How to factorise a whitened matrix: float64 SVD, float32 SVD, or the eigendecomposition of its smaller Gram.

    python benchmarks/factorisations.py            # about 6 min on 2 cores, alone on the machine

Two parts, in one process:
- seconds on LLaMA-2-7B shapes (4096×4096, 11008×4096, 4096×11008; random matrices, whose timing does not depend on
  their values): SVD with vectors in float64 and float32, the smaller Gram's eigendecomposition in float64 and float32,
  and for spectra only: svdvals against eigvalsh;
- accuracy on SmolLM2's real matrices (blocks 0, 14 and 29, every linear, whitened by the Cholesky factor of its
  input Gram over 16×512 calibration tokens), at the uniform rank of ratios 0.2 and 0.6: the loss identity
  |‖T − u·v‖² − Σ discarded σ²| / Σ discarded σ², and the discarded energy against float64 SVD's.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import commit, markdown_table, save_figure, write_json  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "factorisations"
SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008)]


def svd_split(dtype: torch.dtype) -> Callable[[torch.Tensor, int], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    def split(t: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        u, s, vh = torch.linalg.svd(t.to(dtype), full_matrices=False)
        u, s, vh = u.double(), s.double(), vh.double()
        return u[:, :k] * s[:k].sqrt(), s[:k].sqrt()[:, None] * vh[:k], s
    return split


def eigh32_split(t: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The eigen route with the Gram and its eigendecomposition in float32."""
    t32 = t.float()
    wide = t.shape[0] <= t.shape[1]
    evals, evecs = torch.linalg.eigh(t32 @ t32.T if wide else t32.T @ t32)
    sigma = evals.double().flip(0).clamp_min(0).sqrt()
    top = evecs.double()[:, -k:].flip(1)
    return (top, top.T @ t, sigma) if wide else (t @ top, top.T, sigma)


def routes() -> dict[str, Callable]:
    from svdllm.whitening import truncate

    return {"svd float64": svd_split(torch.float64), "svd float32": svd_split(torch.float32),
            "eigh float64 (svdllm)": truncate, "eigh float32": eigh32_split}


def timed(f: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    f()
    return time.perf_counter() - t0


def speed() -> list[dict[str, Any]]:
    from svdllm.whitening import sigma_squared

    rows = []
    for m, n in SHAPES:
        t = torch.randn(m, n, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
        k = int(0.8 * m * n / (m + n))
        row: dict[str, Any] = {"shape": [m, n], "k": k}
        for name, split in routes().items():
            row[name] = timed(lambda: split(t, k))
        row["svdvals float64"] = timed(lambda: torch.linalg.svdvals(t))
        row["eigvalsh float64 (svdllm)"] = timed(lambda: sigma_squared(t))
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def real_targets() -> list[tuple[str, torch.Tensor]]:
    """SmolLM2's whitened matrices W·S (S Sᵀ = the input Gram) of three blocks."""
    from svdllm.architecture import block_linears, dense_weight
    from svdllm.cache import MemoryStore
    from svdllm.calibration import DENSE, ActivationStream, GramAccumulator, Stat
    from svdllm.data import token_windows
    from svdllm.source import open_source
    from svdllm.whitening import repaired_cholesky

    source, tok = open_source("smollm2-135m", False, "cpu")
    windows, _, _ = token_windows(tok, source.model.config, "wiki-train", 16, 512, 0, (), 512, None)
    cpu = torch.device("cpu")
    stream = ActivationStream.capture(source.model, source.blocks, windows, 4, (DENSE,), MemoryStore(cpu), cpu)
    out = []
    with torch.no_grad():
        for i, block in enumerate(source.blocks):
            if i in (0, 14, 29):
                linears = block_linears(block, f"model.layers.{i}")
                acc = GramAccumulator(frozenset({Stat.GRAM}), cpu)
                stream.record(block, i, linears, acc)
                for name, module in linears.items():
                    s, _, _ = repaired_cholesky(acc.for_linear(name).gram)
                    out.append((name, dense_weight(module)[0].double() @ s))
            stream.propagate(block, i, DENSE)
    return out


def accuracy() -> list[dict[str, Any]]:
    rows = []
    targets = real_targets()
    for ratio in (0.2, 0.6):
        for name, split in routes().items():
            worst_identity = worst_energy = 0.0
            for _, t in targets:
                m, n = t.shape
                k = int((1 - ratio) * m * n / (m + n))
                ref = torch.linalg.svdvals(t)[k:].pow(2).sum().item()
                u, v, sigma = split(t, k)
                discarded = sigma[k:].pow(2).sum().item()
                residual = (t - u @ v).pow(2).sum().item()
                worst_identity = max(worst_identity, abs(residual - discarded) / ref)
                worst_energy = max(worst_energy, abs(residual - ref) / ref)
            rows.append({"ratio": ratio, "route": name, "matrices": len(targets),
                         "loss identity, worst relative error": worst_identity,
                         "residual against the optimum, worst relative excess": worst_energy})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", default=str(RESULTS))
    args = ap.parse_args()
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    data = {"commit": commit(), "device": "CPU (2 cores), nothing else running", "threads": torch.get_num_threads(),
            "speed": speed(), "accuracy": accuracy()}
    write_json(results / "results.json", data)
    names = [k for k in data["speed"][0] if k not in ("shape", "k")]
    text = (f"`python benchmarks/factorisations.py` at {data['commit']} ({data['device']}, {data['threads']} "
            "threads)\n\nSeconds for one matrix (rank k = the uniform rank at 0.2):\n\n"
            + markdown_table(["shape (m × n)", "k"] + names,
                             [[f"{r['shape'][0]} × {r['shape'][1]}", r["k"]] + [f"{r[k]:.1f}" for k in names]
                              for r in data["speed"]])
            + "\nAccuracy on SmolLM2's whitened matrices (worst over the linears of blocks 0, 14 and 29):\n\n"
            + markdown_table(["ratio", "route", "loss identity (relative error)", "residual over the optimum"],
                             [[r["ratio"], r["route"], f"{r['loss identity, worst relative error']:.1e}",
                               f"{r['residual against the optimum, worst relative excess']:.1e}"]
                              for r in data["accuracy"]]))
    (results / "table.md").write_text(text)
    plot(data, results / "factorisations.png")
    print(text)


def plot(data: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [k for k in data["speed"][0] if k not in ("shape", "k")]
    fig, ax = plt.subplots(figsize=(8, 3.8))
    width = 0.8 / len(names)
    for j, name in enumerate(names):
        ax.bar([i + j * width for i in range(len(data["speed"]))], [r[name] for r in data["speed"]], width, label=name)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(data["speed"]))],
                  [f"{r['shape'][0]}×{r['shape'][1]}" for r in data["speed"]])
    ax.set_ylabel("seconds (2 CPU cores)")
    ax.set_title("one 7B-shaped matrix")
    ax.legend(fontsize=7)
    save_figure(fig, path)


if __name__ == "__main__":
    main()
