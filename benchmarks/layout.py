"""Rank-major vs row-major storage of the U factor: batch-1 decode in one process, interleaved.

    python benchmarks/layout.py

nn.Linear stores U (out, rank) row-major, so its decode GEMV walks rows only
`rank` long; svdllm stores U rank-major (see modeling_svdllm.rank_major).
Model forward with a KV cache, 64 greedy steps, 3 interleaved repeats, medians.
"""
from __future__ import annotations

import copy
import statistics
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import markdown_table, write_json  # noqa: E402
from decode_profile import decode_steps  # noqa: E402

from svdllm import CompressionConfig, compress  # noqa: E402
from svdllm import load_model  # noqa: E402
from svdllm.runtime import LowRankLinear  # noqa: E402

RATIOS = (0.2, 0.4, 0.6)


def decode_tok_s(model: nn.Module, steps: int = 64) -> float:
    return steps / decode_steps(model, steps)


def row_major_copy(model: nn.Module) -> nn.Module:
    other = copy.deepcopy(model)
    for m in other.modules():
        if isinstance(m, LowRankLinear):
            m.svd_u.weight.data = m.svd_u.weight.data.contiguous()  # nn.Linear's default layout
    return other


def main() -> None:
    base, tok = load_model("smollm2-135m")
    models = [base.eval()]
    for r in RATIOS:
        rank_major = compress(copy.deepcopy(base), None, CompressionConfig(ratio=r, method="svd"), progress=False).model.eval()
        models += [rank_major, row_major_copy(rank_major)]
    for m in models:  # warm-up
        decode_tok_s(m, 8)
    samples: list[list[float]] = [[] for _ in models]
    for _ in range(3):
        for i, m in enumerate(models):
            samples[i].append(decode_tok_s(m))
    med = [statistics.median(s) for s in samples]
    rows = []
    for i, r in enumerate(RATIOS):
        a, b = med[1 + 2 * i], med[2 + 2 * i]
        rows.append([r, f"{a:.1f}", f"{b:.1f}", f"{a / b:.2f}", f"{a / med[0]:.2f}", f"{b / med[0]:.2f}"])
    header = ["ratio", "rank-major U tok/s (svdllm)", "row-major U tok/s (nn.Linear default)", "rank-major / row-major",
              "speed-up vs dense, rank-major", "speed-up vs dense, row-major"]
    text = (f"`python {' '.join(sys.argv)}`\n\nCPU, torch threads {torch.get_num_threads()}; dense {med[0]:.1f} tok/s.\n\n"
            + markdown_table(header, rows))
    out = Path("benchmarks/results/layout")
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "results.json", {"dense_tok_s": med[0], "ratios": list(RATIOS), "samples": samples})
    (out / "table.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
