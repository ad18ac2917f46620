"""Choose refinement's learning rate on calibration text alone: the held-out error of chosen blocks.

Takes a saved compressed SmolLM2 (the closed form), runs the dense and compressed calibration streams block by block,
and at each chosen block refines a copy of the compressed block at each learning rate, as the block loop would
(``refine_block``: the same windows, steps, held-out windows and stopping).  The measure is the fall of the held-out
calibration windows' output error from the closed form's: nothing here reads evaluation text.

    svdllm compress --ratio 0.6 --eval '' --out OUT_0.6
    python benchmarks/refine_lr.py --compressed OUT_0.6 --lrs 3e-4,6e-4,1e-3,1.5e-3 --results benchmarks/results/refine-lr
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

import svdllm
from svdllm.architecture import decoder_blocks
from svdllm.cache import MemoryStore
from svdllm.calibration import COMPRESSED, DENSE, NEXT, ActivationStream
from svdllm.data import bos_token, load_text, sample_windows, tokenize
from svdllm.refine import RefineOptions, refine_block

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import commit, markdown_table, save_figure, write_json  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--compressed", required=True, help="a folder svdllm compressed SmolLM2 into")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--blocks", default="4,14,24")
    ap.add_argument("--nsamples", type=int, default=64)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--lrs", default="3e-4,6e-4,1e-3,1.5e-3")
    ap.add_argument("--results", type=Path, required=True)
    args = ap.parse_args()
    torch.manual_seed(0)
    blocks = sorted(int(b) for b in args.blocks.split(","))
    lrs = [float(v) for v in args.lrs.split(",")]

    dense, tok = svdllm.load_model(args.model, dtype="float32")
    comp = svdllm.load(args.compressed, dtype="float32")
    record = svdllm.read_record(args.compressed)
    cal = record.calibration  # the compressed model's own window length and seed, more windows (best's)
    windows = sample_windows(tokenize(tok, load_text(cal["data"])), args.nsamples, cal["seqlen"], cal["seed"],
                             bos_token(tok, dense.config))
    _, dense_blocks = decoder_blocks(dense)
    _, comp_blocks = decoder_blocks(comp)
    cpu, batch = torch.device("cpu"), 4
    stream = ActivationStream.capture(dense, dense_blocks, windows, batch, (DENSE, COMPRESSED), MemoryStore(cpu), cpu)
    rows = []
    for i in range(blocks[-1] + 1):
        with torch.no_grad():  # the dense block's outputs: refinement's targets, then the dense lane (``advance``)
            for j in range(len(stream)):
                stream.put(NEXT, j, stream.run_block(dense_blocks[i], i, j, stream.hidden(DENSE, j, cpu)))
        for lr in lrs if i in blocks else []:
            block = copy.deepcopy(comp_blocks[i])
            start = time.perf_counter()
            rec = refine_block(block, i, stream, args.nsamples, batch, RefineOptions(steps=args.steps, lr=lr))
            rec.update(lr=lr, seconds=round(time.perf_counter() - start, 1),
                       fall=1 - rec["heldout_after"] / rec["heldout_before"])
            print(json.dumps(rec), flush=True)
            rows.append(rec)
        stream.advance(comp_blocks[i], i)

    means = {f"{lr:g}": sum(r["fall"] for r in rows if r["lr"] == lr) / len(blocks) for lr in lrs}
    args.results.mkdir(parents=True, exist_ok=True)
    write_json(args.results / "results.json",
               {"commit": commit(), "compressed": {"ratio": record.ratio, **record.calibration}, "nsamples": args.nsamples,
                "steps": args.steps, "rows": rows, "mean_fall": means})
    table = markdown_table(["block", "lr", "steps", "outcome", "held-out error fall", "seconds"],
                           [[r["block"], f"{r['lr']:g}", r["steps"], r["outcome"],
                             f"{100 * r['fall']:.2f}%", r["seconds"]] for r in rows])
    table += "\n" + markdown_table(["lr", "mean fall over the blocks"],
                                    [[k, f"{100 * v:.2f}%"] for k, v in means.items()])
    (args.results / "table.md").write_text(table)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for lr in lrs:
        ax.plot(blocks, [100 * r["fall"] for r in rows if r["lr"] == lr], "o-", label=f"lr {lr:g}")
    ax.set(xlabel="block", ylabel="held-out error fall (%)", title="refinement's learning rate on calibration windows")
    ax.legend()
    save_figure(fig, args.results / "variants.png")


if __name__ == "__main__":
    main()
