"""The memory/quality front: weight bytes against perplexity for SVD-LLM, quantization, and both.

    python benchmarks/memory_quality.py                        # SmolLM2-135M, ratios 0.2/0.4/0.6, int8 and int4
    python benchmarks/memory_quality.py --ratios 0.4 --max-tokens 2048

Every model is bfloat16 with optimum-quanto weights where quantized (int4, int2: groups of ``--group-size``):
  - dense, and "quantization alone": every linear of the decoder blocks int8, int4 or int2
    (``svdllm quantize --dense '*'``);
  - the default method (``svdllm compress``, svdllm-ec with Fisher ranks; made once in ``--work``) at each ratio,
    with bfloat16, int8 and int4 factors (``svdllm quantize``).
The embeddings (tied to the head) stay bfloat16 everywhere: 54 MiB of SmolLM2's 257.  "weight bytes" is every
tensor the saved folder holds (packed data, scales and shifts included; the tests check that it equals the shards).
Perplexity: ``--seqlen``-token windows, at most ``--max-tokens`` tokens of wiki-test and of news.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import markdown_table, write_json  # noqa: E402

from svdllm import evaluate_perplexity, load_model  # noqa: E402
from svdllm.architecture import decoder_blocks  # noqa: E402
from svdllm.data import load_text, tokenize  # noqa: E402
from svdllm.generation import weight_bytes  # noqa: E402
from svdllm.quantize import QuantizeOptions, quantize_model  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "memory_quality"
DENSE = "smollm2-135m"
DATA = ("wiki-test", "news")


def compressed(work: Path, ratio: float) -> Path:
    """The default method's model at ``ratio``, made once (float32 on disk; loaded here as bfloat16)."""
    out = work / f"svdllm-ec-{ratio}"
    if not (out / "config.json").exists():
        subprocess.run([sys.executable, "-m", "svdllm", "-q", "compress", DENSE, "--ratio", str(ratio), "--eval", "",
                        "--out", str(out)], check=True)
    return out


def measure(spec: str, bits: int | None, dense: bool, args: argparse.Namespace, tokens: dict[str, torch.Tensor]
            ) -> dict[str, Any]:
    model, _ = load_model(spec, dtype=torch.bfloat16)
    if bits:
        quantize_model(model, QuantizeOptions(bits=bits, group_size=args.group_size, dense=("*",) if dense else ()))
    t0 = time.perf_counter()
    ppl = {name: evaluate_perplexity(model, None, t, args.seqlen, args.max_tokens).perplexity
           for name, t in tokens.items()}
    # block_bytes: the weights inside the decoder blocks, what compression and quantization act on
    return {"weight_bytes": weight_bytes(model), "block_bytes": weight_bytes(decoder_blocks(model)[1]),
            "perplexity": ppl, "eval_s": time.perf_counter() - t0}


def front(rows: list[dict[str, Any]], data: str) -> list[dict[str, Any]]:
    """The rows no other row beats on both weight bytes and ``data`` perplexity, by bytes."""
    return [r for r in sorted(rows, key=lambda r: r["weight_bytes"])
            if not any(o["weight_bytes"] <= r["weight_bytes"] and o["perplexity"][data] < r["perplexity"][data]
                       for o in rows if o is not r)]


def budgets(rows: list[dict[str, Any]], data: str) -> list[list[Any]]:
    """At each row's byte count as a budget: the best quantization-alone model and the best SVD(+quantization) model
    that fit in it."""
    out = []
    for budget in sorted({r["weight_bytes"] for r in rows}):
        best = {}
        for family in ("quantization alone", "svd"):
            fits = [r for r in rows if r["weight_bytes"] <= budget and (r["ratio"] == 0) == (family != "svd")]
            best[family] = min(fits, key=lambda r: r["perplexity"][data]) if fits else None
        q, s = best["quantization alone"], best["svd"]
        winner = "—" if not (q or s) else ("quantization alone" if not s or (q and q["perplexity"][data] <=
                                                                                 s["perplexity"][data]) else "SVD")
        out.append([f"{budget / 2**20:.1f}", q["label"] if q else "—", f"{q['perplexity'][data]:.2f}" if q else "—",
                    s["label"] if s else "—", f"{s['perplexity'][data]:.2f}" if s else "—", winner])
    return out


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(DATA), figsize=(12, 4.5))
    for ax, data in zip(axes, DATA):
        for name, pick in (("quantization alone", lambda r: r["ratio"] == 0),
                           *((f"svdllm-ec {q}", lambda r, q=q: r["ratio"] > 0 and r["factors"] == q)
                             for q in ("bf16", "int8", "int4"))):
            pts = sorted((r["weight_bytes"] / 2**20, r["perplexity"][data], r["label"]) for r in rows if pick(r))
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
            for x, y, label in pts:
                ax.annotate(label.split(" ")[0] if name != "quantization alone" else label, (x, y), fontsize=7,
                            textcoords="offset points", xytext=(3, 3))
        best = front(rows, data)
        ax.plot([r["weight_bytes"] / 2**20 for r in best], [r["perplexity"][data] for r in best], "k:", lw=1,
                label="front")
        ax.set_yscale("log")
        ax.set_xlabel("weight bytes (MiB; embeddings 54 MiB in bf16 in every model)")
        ax.set_ylabel(f"perplexity, {data}")
        ax.grid(alpha=0.3, which="both")
    axes[0].legend(fontsize=8)
    fig.suptitle("SmolLM2-135M: SVD-LLM (svdllm-ec), optimum-quanto weight-only quantization, and both")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ratios", default="0.2,0.4,0.6")
    parser.add_argument("--bits", default="8,4", help="bit widths of the factors")
    parser.add_argument("--dense-bits", default="8,4,2", help="bit widths of quantization alone")
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--max-tokens", type=int, default=8192)
    parser.add_argument("--work", default=str(Path.home() / ".cache" / "svdllm" / "bench-memory-quality"))
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()
    work, out = Path(args.work), Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    tok = load_model(DENSE)[1]
    tokens = {d: tokenize(tok, load_text(d)) for d in DATA}
    bits = [int(b) for b in args.bits.split(",")]
    runs = [("dense bf16", DENSE, 0.0, None, True)] + [(f"dense int{b}", DENSE, 0.0, int(b), True)
                                                       for b in args.dense_bits.split(",")]
    for ratio in map(float, args.ratios.split(",")):
        spec = str(compressed(work, ratio))
        runs += [(f"{ratio} bf16", spec, ratio, None, False)] + [(f"{ratio} int{b}", spec, ratio, b, False)
                                                                for b in bits]
    rows = []
    for label, spec, ratio, b, dense in runs:
        row = {"label": label, "ratio": ratio, "factors": f"int{b}" if b else "bf16",
               **measure(spec, b, dense, args, tokens)}
        rows.append(row)
        print(f"{label}: {row['weight_bytes'] / 2**20:.1f} MiB, "
              + ", ".join(f"{d} {v:.2f}" for d, v in row["perplexity"].items()), flush=True)
    write_json(out / "results.json", {"rows": rows, "args": vars(args), "torch": torch.__version__,
                                      "threads": torch.get_num_threads()})
    dense = rows[0]
    table = markdown_table(
        ["model", "weight MiB", "of dense", "decoder-block MiB", *(f"perplexity {d}" for d in DATA)],
        [[r["label"], f"{r['weight_bytes'] / 2**20:.1f}", f"{r['weight_bytes'] / dense['weight_bytes']:.3f}",
          f"{r['block_bytes'] / 2**20:.1f}", *(f"{r['perplexity'][d]:.2f}" for d in DATA)] for r in rows])
    for d in DATA:
        table += f"\n**Budgets, {d}**: the best model of each family within each budget\n\n" + markdown_table(
            ["budget MiB", "quantization alone", "perplexity", "SVD (+ quantization)", "perplexity", "better"],
            budgets(rows, d))
        table += f"\nFront ({d}): " + " → ".join(r["label"] for r in front(rows, d)) + "\n"
    (out / "table.md").write_text(table)
    plot(rows, out / "front.png")
    print("\n" + table)


if __name__ == "__main__":
    main()
