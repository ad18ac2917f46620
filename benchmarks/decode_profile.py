"""Where batch-1 decode time goes: weight GEMVs vs everything else, dense vs compressed.

    python benchmarks/decode_profile.py --ratios 0.2,0.4,0.6

Runs greedy decode steps (model forward with a KV cache, no `generate`) under
torch.profiler and splits self time into matrix products (aten::mm/addmm, which
stream the weights) and the rest (norms, RoPE, attention, cache, Python).  Per
weight shape it also gives the bandwidth the product reached.  The bytes-read
limit applies to the first part only; the rest is the same for both models, so
it caps the reachable speed-up (Amdahl).
"""
from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile
from transformers import DynamicCache

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import markdown_table, write_json  # noqa: E402
from svdllm.generation import bytes_read_per_token, fast_options  # noqa: E402

from svdllm import CompressionConfig, compress  # noqa: E402
from svdllm import load_model  # noqa: E402

MATMUL = {"aten::mm", "aten::addmm"}


@torch.no_grad()
def decode_steps(model: nn.Module, steps: int, fast: bool = False) -> float:
    """Greedy decode ``steps`` tokens after a 16-token prompt; returns the seconds of the decode steps.  ``fast``:
    the whole ``generate`` through the fast path (its eager 16-token prefill included)."""
    if fast:
        t0 = time.perf_counter()
        model.generate(torch.arange(100, 116)[None], max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
                       pad_token_id=0, **fast_options(model))
        return time.perf_counter() - t0
    cache = DynamicCache(config=model.config)
    out = model(input_ids=torch.arange(100, 116)[None], past_key_values=cache, use_cache=True)
    t0 = time.perf_counter()
    for _ in range(steps):
        out = model(input_ids=out.logits[:, -1:].argmax(-1), past_key_values=cache, use_cache=True)
    return time.perf_counter() - t0


def profile_decode(model: nn.Module, steps: int, fast: bool = False) -> dict[str, Any]:
    decode_steps(model, steps if fast else 4, fast)  # warm-up (the fast path compiles, for the same shapes)
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        decode_steps(model, steps, fast)
    total = matmul = 0.0
    shapes: dict[str, dict[str, float]] = {}
    for e in prof.key_averages(group_by_input_shape=True):
        total += e.self_cpu_time_total
        if e.key not in MATMUL:
            continue
        matmul += e.self_cpu_time_total
        a, w = e.input_shapes[-2], e.input_shapes[-1]
        if len(a) == 2 and a[0] == 1 and e.count >= steps:  # the one-token products
            us = e.self_cpu_time_total / e.count
            shapes[f"{w[0]}×{w[1]}"] = {"calls_per_token": e.count / steps, "us": us, "gb_s": w[0] * w[1] * 4 / us / 1e3}
    return {"ms_per_token": total / steps / 1e3, "matmul_ms_per_token": matmul / steps / 1e3,
            "other_ms_per_token": (total - matmul) / steps / 1e3, "shapes": shapes}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dense", default="smollm2-135m")
    p.add_argument("--ratios", default="0.2,0.4,0.6")
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--fast", action="store_true", help="profile the fast path (static cache, compiled decode)")
    p.add_argument("--out", default="benchmarks/results/decode-profile")
    args = p.parse_args()
    base, tok = load_model(args.dense)
    models = {"dense": base}
    for r in [float(x) for x in args.ratios.split(",")]:
        models[f"ratio {r:g}"] = compress(copy.deepcopy(base), None, CompressionConfig(ratio=r, method="svd"), progress=False).model
    res = {name: {**profile_decode(m, args.steps, args.fast), "bytes_per_token": bytes_read_per_token(m)} for name, m in models.items()}
    d = res["dense"]
    rows = []
    for name, r in res.items():
        limit = d["bytes_per_token"] / r["bytes_per_token"]
        amdahl = d["ms_per_token"] / (d["matmul_ms_per_token"] / limit + d["other_ms_per_token"])
        rows.append([name, f"{r['ms_per_token']:.1f}", f"{r['matmul_ms_per_token']:.1f}", f"{r['other_ms_per_token']:.1f}",
                     f"{d['ms_per_token'] / r['ms_per_token']:.2f}", f"{d['matmul_ms_per_token'] / r['matmul_ms_per_token']:.2f}",
                     f"{limit:.2f}", f"{amdahl:.2f}"])
    text = (f"`python {' '.join(sys.argv)}`\n\nCPU, torch threads {torch.get_num_threads()}, {args.steps} decode steps "
            "under torch.profiler (self CPU time; the profiler adds overhead of its own).\n\n")
    text += markdown_table(["model", "ms/token", "matmul ms", "other ms", "speed-up", "matmul speed-up",
                            "bytes limit", "limit with the other ms fixed"], rows)
    for name, r in res.items():
        if not r["shapes"]:  # compiled products record no input shapes
            continue
        text += f"\n{name}: bandwidth per one-token product\n\n"
        text += markdown_table(["weight (in×out as multiplied)", "calls/token", "µs", "GB/s"],
                               [[k, f"{v['calls_per_token']:g}", f"{v['us']:.1f}", f"{v['gb_s']:.1f}"]
                                for k, v in sorted(r["shapes"].items(), key=lambda kv: -kv[1]["us"] * kv[1]["calls_per_token"])])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "results.json", {"command": " ".join(sys.argv), "threads": torch.get_num_threads(), "models": res})
    (out / "table.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
