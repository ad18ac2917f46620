"""Rank-major vs row-major storage of the U factor: batch-1 decode in one process, interleaved.

    python benchmarks/layout.py

nn.Linear stores U (out, rank) row-major, so its decode GEMV walks rows only
`rank` long; svdllm stores U rank-major (see modeling_svdllm.rank_major).
Model forward with a KV cache, 64 greedy steps, 3 interleaved repeats, medians.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import markdown_table, write_json  # noqa: E402
import copy
import statistics
import time

import torch
from svdllm import CompressionConfig, compress
from svdllm.assets import load_model
from svdllm.lowrank import LowRankLinear
from transformers import DynamicCache
base, tok = load_model("smollm2-135m"); base.eval()
rows = {}
for r in (0.2, 0.4, 0.6):
    a = compress(copy.deepcopy(base), tok, CompressionConfig(ratio=r, method="svd"), progress=False).eval()
    b = copy.deepcopy(a)
    for m in b.modules():
        if isinstance(m, LowRankLinear):
            m.svd_u.weight.data = m.svd_u.weight.data.contiguous()  # nn.Linear's row-major layout
    rows[r] = (a, b)
@torch.no_grad()
def tps(model, n=64):
    cache = DynamicCache(config=model.config)
    out = model(input_ids=torch.arange(100, 116)[None], past_key_values=cache, use_cache=True)
    t0 = time.perf_counter()
    for _ in range(n):
        out = model(input_ids=out.logits[:, -1:].argmax(-1), past_key_values=cache, use_cache=True)
    return n / (time.perf_counter() - t0)
ms = [base] + [m for p in rows.values() for m in p]
for m in ms: tps(m, 8)
s = [[] for _ in ms]
for _ in range(3):
    for i, m in enumerate(ms): s[i].append(tps(m))
med = [statistics.median(x) for x in s]
header = ["ratio", "rank-major U tok/s (svdllm)", "row-major U tok/s (nn.Linear default)", "rank-major / row-major",
          "speed-up vs dense, rank-major", "speed-up vs dense, row-major"]
table = []
for i, r in enumerate(rows):
    a, b = med[1 + 2 * i], med[2 + 2 * i]
    table.append([r, f"{a:.1f}", f"{b:.1f}", f"{a / b:.2f}", f"{a / med[0]:.2f}", f"{b / med[0]:.2f}"])
text = (f"`python {' '.join(sys.argv)}`\n\nCPU, torch threads {torch.get_num_threads()}; dense {med[0]:.1f} tok/s.\n\n"
        + markdown_table(header, table))
out = Path("benchmarks/results/layout")
out.mkdir(parents=True, exist_ok=True)
write_json(out / "results.json", {"dense_tok_s": med[0], "samples": s, "ratios": list(rows)})
(out / "table.md").write_text(text)
print(text)
