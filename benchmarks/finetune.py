"""Perplexity before and after the sequential LoRA update, for both stage orders, on one compressed model.

    python benchmarks/finetune.py --ratio 0.4 --method svdllm --steps 10
"""
from __future__ import annotations

import argparse
import copy
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import markdown_table, write_json  # noqa: E402

from svdllm import CompressionConfig, compress, evaluate_perplexity, load_model, sample_windows  # noqa: E402
from svdllm.data import load_text, tokenize  # noqa: E402
from svdllm.finetune import FinetuneConfig, finetune  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--ratio", type=float, default=0.4)
    p.add_argument("--method", default="svdllm")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--eval", default="wiki-test,news")
    p.add_argument("--max-tokens", type=int, default=4096)
    p.add_argument("--out", default="benchmarks/results/finetune")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    t0 = time.perf_counter()
    base, tok = load_model(args.model)
    train = tokenize(tok, load_text("wiki-train"))
    evals = {e: tokenize(tok, load_text(e))[: args.max_tokens] for e in args.eval.split(",")}
    compress(base, sample_windows(train, 32, 512, 0), CompressionConfig(ratio=args.ratio, method=args.method), progress=False)

    def ppl(m: torch.nn.Module) -> dict[str, float]:
        return {e: evaluate_perplexity(m, tok, ids, 512, None).perplexity for e, ids in evals.items()}

    results = {"command": " ".join(["python"] + sys.argv), "args": vars(args), "compressed": ppl(base), "runs": []}
    print("compressed", results["compressed"], flush=True)
    for order in ("u-first", "v-first"):
        cfg = FinetuneConfig(order=order, steps=args.steps, batch_size=args.batch_size, seqlen=args.seqlen, lr=args.lr)
        t = time.perf_counter()
        model, stages = finetune(copy.deepcopy(base), tok, cfg, tokens=train, progress=False)
        seconds = time.perf_counter() - t
        run = {"order": order, "perplexity": ppl(model), "seconds": seconds,
               "stages": [asdict(s) for s in stages]}
        results["runs"].append(run)
        print(order, run["perplexity"], f"{seconds:.0f}s", flush=True)
        write_json(out / "results.json", results)
    results["total_seconds"] = time.perf_counter() - t0
    write_json(out / "results.json", results)
    evs = list(evals)
    rows = [["compressed (no fine-tuning)"] + [f"{results['compressed'][e]:.1f}" for e in evs] + ["", ""]]
    for r in results["runs"]:
        val = "; ".join(f"{s['stage']} {s['val_before']:.1f}→{s['val_after']:.1f}" for s in r["stages"])
        rows.append([r["order"]] + [f"{r['perplexity'][e]:.1f}" for e in evs] + [val, f"{r['seconds']:.0f}"])
    text = f"`{results['command']}`\n\n{args.model}, {args.method} at ratio {args.ratio}; LoRA r=8, α=16, " \
           f"{args.steps} steps × {args.batch_size}×{args.seqlen} tokens per stage; perplexity on " \
           f"{args.max_tokens} tokens, 512-token windows; total {results['total_seconds']:.0f}s.\n\n"
    text += markdown_table(["order"] + evs + ["held-out validation per stage", "seconds"], rows)
    (out / "table.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
