"""A LLaMA-2-7B-shaped (or 70B-shaped) run on this machine: the default `svdllm compress` under --low-memory.

    python benchmarks/scale.py --blocks 2,4        # about 46 min on 2 cores (a block takes about 7)
    python benchmarks/scale.py --blocks 4 --merge  # add N = 4 to the table
    python benchmarks/scale.py --blocks "" --merge # the table and plot again from results.json
    git worktree add /tmp/svdllm-080 5df4d64       # a tree to compare with (0.8.0 here), then:
    python benchmarks/scale.py --blocks 1,2 --base /tmp/svdllm-080
    python benchmarks/scale.py --blocks 1 --shape 70b --results benchmarks/results/scale-70b

Each model has N LLaMA-2-7B decoder blocks (hidden 4096, intermediate 11008, 32 heads, vocabulary 32000; 202M
parameters a block; 70B: hidden 8192, intermediate 28672, 64 heads, 8 KV heads, 856M) with random bf16 weights, written as safetensors shards (one per block, one for the rest), and a
byte-level BPE tokenizer of 32000 tokens trained on the offline Wikipedia text.  Each run is a fresh process (peak RSS
over its import baseline, `memory.py --probe`).  Per-block seconds come from the report's phases; the extrapolation
to the whole depth (32 or 80 blocks) adds the per-block cost to the fixed cost (the part that does not grow with N).  Random weights have flat
spectra, so the perplexities say nothing about quality: this measures time and memory only.  With ``--base`` each
N is run by that tree's svdllm first (PYTHONPATH at its src/, the same venv), then by this one, one after the other.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import commit, folders, markdown_table, save_figure, write_json  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "scale"
# (LlamaConfig fields, blocks of the whole model, parameters a block); --shape picks one
MODELS = {"7b": (dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
                      vocab_size=32000, max_position_embeddings=4096, tie_word_embeddings=False), 32, "202M"),
          "70b": (dict(hidden_size=8192, intermediate_size=28672, num_attention_heads=64, num_key_value_heads=8,
                       vocab_size=32000, max_position_embeddings=4096, tie_word_embeddings=False), 80, "856M")}
SHAPE, FULL_DEPTH, BLOCK_PARAMS = MODELS["7b"]


def tokenizer(folder: Path) -> Any:
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    from svdllm.data import load_text

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator([load_text("wiki-train")], vocab_size=SHAPE["vocab_size"], min_frequency=2,
                            special_tokens=["<s>", "</s>"], show_progress=False)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, bos_token="<s>", eos_token="</s>",
                                  pad_token="</s>")
    tok.save_pretrained(folder)
    return tok


def write_model(folder: Path, blocks: int, tok_folder: Path) -> Path:
    """N random 7B-shaped blocks in bf16 shards, written tensor by tensor (never the whole model in memory)."""
    import shutil

    import torch
    from accelerate import init_empty_weights
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    if (folder / "config.json").exists():
        return folder
    folder.mkdir(parents=True)
    cfg = LlamaConfig(num_hidden_layers=blocks, bos_token_id=0, eos_token_id=1, dtype="bfloat16", **SHAPE)
    with init_empty_weights():
        model = LlamaForCausalLM(cfg)
    gen = torch.Generator().manual_seed(0)
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for name, p in model.named_parameters():
        shard = f"block{name.split('.')[2]}" if name.startswith("model.layers.") else "rest"
        value = torch.ones(p.shape) if p.dim() == 1 else torch.randn(p.shape, generator=gen) * 0.02
        groups.setdefault(shard, {})[name] = value.to(torch.bfloat16)
    order = [f"block{i}" for i in range(blocks)] + ["rest"]
    weight_map, total = {}, 0
    for k, shard in enumerate(order, 1):
        file = f"model-{k:05d}-of-{len(order):05d}.safetensors"
        save_file(groups[shard], str(folder / file), {"format": "pt"})
        weight_map.update(dict.fromkeys(groups[shard], file))
        total += sum(t.numel() * 2 for t in groups[shard].values())
        del groups[shard]
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                     "weight_map": weight_map}))
    cfg.save_pretrained(folder)
    for f in tok_folder.iterdir():
        shutil.copy(f, folder / f.name)
    return folder


def block_flops(tokens: int, full_width: int = 8192) -> dict[str, float]:
    """Dominant multiply-adds of one block's factorisations and the float64 sums around them, counted from the
    code's steps and the routes it takes at ``tokens`` calibration tokens (``spectra_from_outputs``,
    ``sums_from_outputs``); float32 products are counted at a quarter (``F64_COST``).

    Per linear (m outputs, n inputs, p = min, q = max, k its rank; C_g full when m ≤ ``full_width``):
    - spectra (in the reverse pass, counted against its phase "gradients"): from the inputs (fewer tokens than
      outputs), Z = X·Wᵀ·R (float64, t·m·n + t·m²) and its t × t Gram's eigenvalues (0.56·t²·m + 4t³/3); from the
      outputs, y = x·Wᵀ (float32, t·m·n) and yᵀy (t·m²), then Rᵀ·G·R (m³, R triangular) and the eigenvalues
      (4m³/3); from XᵀX, its Cholesky (n³/3, once per linear), W·S (m·n²), Rᵀ·(W·S) (m²·n) and the smaller Gram's
      eigenvalues (0.56·q·p² + 4p³/3; a side Gram is made up to its diagonal blocks);
    - the fit: from the kept inputs, X·Wᵀ, X′·Wᵀ and the blend's product with X′ (3·t·m·n), else W·XᵀX′ and
      W·X′ᵀX′ (m·n² each); X′ᵀX′'s Cholesky (n³/3), R (m³/3), the solve (m·n²) and Rᵀ·T (m²·n), the smaller Gram
      and its eigenvectors (0.56·q·p² + about 5p³), the projection (k·m·n), the back-solves (m²·k + k·n²), and the
      reported loss (from the inputs t·(n + m)·k; else v·C·vᵀ, k²·n, and k·m·n).
    """
    from svdllm.calibration import F64_COST, spectra_from_inputs, spectra_from_outputs, sums_from_outputs

    h, i = SHAPE["hidden_size"], SHAPE["intermediate_size"]
    kv = h // SHAPE["num_attention_heads"] * SHAPE["num_key_value_heads"]
    groups = [[(h, h), (kv, h), (kv, h)], [(h, h)], [(i, h)] * 2, [(h, i)]]  # q/k/v, o, gate/up, down (out, in)
    t, spectra, fit = tokens, 0.0, 0.0
    for group in groups:
        n = group[0][1]
        outs = [m for m, _ in group]
        by_inputs = spectra_from_inputs(t, outs)
        by_outputs = not by_inputs and spectra_from_outputs(t, n, outs)
        kept = sums_from_outputs(t, n, sum(outs), statistic_needed=True)  # the inputs kept for the fit
        for m, _ in group:
            p, q = min(m, n), max(m, n)
            full = m <= full_width
            k = int(0.8 * m * n / (m + n))
            if by_inputs:
                spectra += t * m * n + (t * m * m if full else 0) + 0.56 * t * t * m + 4 * t**3 / 3
            elif by_outputs:
                spectra += t * m * n / F64_COST + t * m * m + (m**3 if full else 0) + 4 * m**3 / 3
            else:
                spectra += n**3 / 3 + m * n**2 + (m**2 * n if full else 0) + 0.56 * q * p**2 + 4 * p**3 / 3
            products_and_loss = 3 * t * m * n + t * (n + m) * k if kept else 2 * m * n**2 + k * k * n + k * m * n
            fit += (products_and_loss + n**3 / 3 + m * n**2 + ((m**3 / 3 + m**2 * n + m**2 * k) if full else 0)
                    + 0.56 * q * p**2 + 5 * p**3 + k * m * n + k * n**2)
    return {"gradients": spectra, "decompositions": fit}


def extrapolation(rows: list[dict[str, Any]], per_block: dict[str, float], gpu_tflops: float, tokens: int) -> str:
    """The whole model's depth on this CPU from the measured growth, and on one GPU from the counted FLOPs at an assumed rate."""
    small, large = rows[0], rows[-1]
    block_s = (large["wall_s"] - small["wall_s"]) / (large["blocks"] - small["blocks"])
    flops = block_flops(tokens)
    measured = {k: per_block.get(f"compress: {k}", 0.0) for k in flops}
    cpu_rate = sum(flops.values()) / max(sum(measured.values()), 1e-9)
    gpu_block = 2 * sum(flops.values()) / (gpu_tflops * 1e12)  # a multiply-add is two flops
    lines = [f"Per block: {block_s:.0f} s of wall time; a {FULL_DEPTH}-block model on this CPU: about "
             f"{(small['wall_s'] + (FULL_DEPTH - small['blocks']) * block_s) / 3600:.1f} h with this calibration.",
             "",
             "| per block | counted float64 T multiply-adds | measured here (s) | implied G/s |",
             "|---|---:|---:|---:|"]
    lines += [f"| {k} | {v / 1e12:.1f} | {measured[k]:.0f} | {v / max(measured[k], 1e-9) / 1e9:.0f} |"
              for k, v in flops.items()]
    lines += ["",
              f"The decompositions and the spectra are {sum(measured.values()) / max(block_s, 1e-9):.0%} "
              f"of a block's time here; the counted multiply-adds run at {cpu_rate / 1e9:.0f} G/s on these 2 cores. "
              f"On one GPU at an assumed {gpu_tflops:g} TFLOP/s of float64 factorisation throughput (an assumption, "
              f"not a measurement: an H100/H200 peaks at 67 TFLOP/s in float64, but the eigendecomposition's tridiagonal "
              f"reduction is bound by memory traffic and reaches a few percent of that), a block's "
              f"decompositions take about {gpu_block:.0f} s and a {FULL_DEPTH}-block model's about {FULL_DEPTH * gpu_block / 60:.0f} min; "
              f"the forward and backward passes (about 12 passes of 2·{BLOCK_PARAMS}·{tokens} = "
              f"{2 * float(BLOCK_PARAMS[:-1]) * 1e6 * tokens * 12 / 1e12:.1f} TFLOP a block in bf16) add little. Not measured on a GPU: `benchmarks/gpu_check.sh` runs this "
              f"benchmark on one when a GPU is lent."]
    return "\n".join(lines) + "\n"


def run(folder: Path, out: Path, args: argparse.Namespace, tree: Path | None = None) -> dict[str, Any]:
    argv = ["-q", "compress", str(folder), "--low-memory", "--nsamples", str(args.nsamples), "--seqlen",
            str(args.seqlen), "--eval", "wiki-test", "--eval-seqlen", str(args.seqlen), "--max-tokens",
            str(args.max_tokens), "--dtype", "bfloat16", "--out", str(out), "--force"]
    probe = Path(__file__).resolve().parent / "memory.py"
    shutil.rmtree(out.parent / f".{out.name}.svdllm-run", ignore_errors=True)  # a killed run's would be resumed
    env = dict(os.environ, PYTHONPATH=str(tree / "src")) if tree else None  # that tree's svdllm, this venv's libraries
    proc = subprocess.run([sys.executable, str(probe), "--probe", *argv], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"{folder} failed:\n{proc.stderr[-3000:]}")
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    report = json.loads((out / "svdllm_report.json").read_text())
    return dict(res, timings=report["timings"], rank_rule=report["config"]["rank_rule"],
                perplexity=report["perplexity"])


def plot(rows: list[dict[str, Any]], path: Path, base_rows: list[dict[str, Any]] | None = None) -> None:
    """Seconds by phase (stacked) and peak RSS over baseline, per number of blocks (the base tree's bars first)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = (base_rows or []) + rows
    labels = [f"N = {r['blocks']}" + (f"\n{r['commit'][:7]}" if base_rows else "") for r in rows]
    phases = [k for k in dict.fromkeys(k for r in rows for k in r["timings"]) if k.startswith("compress: ")]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.8))
    bottom = [0.0] * len(rows)
    for k in phases:
        vals = [r["timings"].get(k, 0.0) for r in rows]
        a.bar(labels, vals, bottom=bottom, label=k.removeprefix("compress: "))
        bottom = [x + y for x, y in zip(bottom, vals)]
    a.set_ylabel("seconds")
    a.set_title(f"blocks of {BLOCK_PARAMS} parameters, --low-memory, 2 CPU cores")
    a.legend(fontsize=7)
    b.bar(labels, [r["peak_over_base"] / 2**30 for r in rows], color="tab:gray")
    b.axhline(float(BLOCK_PARAMS[:-1]) * 1e6 * 4 / 2**30, color="tab:red", ls=":", label="one block in float32")
    b.set_ylabel("peak RSS over baseline (GiB)")
    b.legend(fontsize=7)
    save_figure(fig, path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--blocks", default="1,2")
    ap.add_argument("--shape", choices=sorted(MODELS), default="7b", help="LLaMA-2-7B or LLaMA-2-70B blocks")
    ap.add_argument("--nsamples", type=int, default=4)
    ap.add_argument("--seqlen", type=int, default=128)
    ap.add_argument("--max-tokens", type=int, default=1024)
    ap.add_argument("--gpu-tflops", type=float, default=2.0,
                    help="assumed float64 factorisation throughput of one GPU, for the extrapolation only")
    ap.add_argument("--merge", action="store_true", help="keep the rows of results.json for the N not run now")
    ap.add_argument("--base", default=None, help="a worktree of the commit to compare with, run first for each N")
    args, work, results = folders(ap, RESULTS, "svdllm-scale-")
    global SHAPE, FULL_DEPTH, BLOCK_PARAMS
    SHAPE, FULL_DEPTH, BLOCK_PARAMS = MODELS[args.shape]
    tok_folder = work / "tokenizer"
    if not (tok_folder / "tokenizer.json").exists():
        tokenizer(tok_folder)
    wanted = [int(n) for n in args.blocks.split(",") if n]  # none, with --merge: the table from results.json
    at = commit()  # the code each run imports: read before the first
    old = json.loads((results / "results.json").read_text()) if args.merge else {}
    rows = [r for r in old.get("rows", []) if r["blocks"] not in wanted]
    base_rows = [r for r in old.get("base_rows", []) if r["blocks"] not in wanted] if not args.base else []
    for n in wanted:
        folder = write_model(work / f"llama{args.shape}-{n}", n, tok_folder)
        if args.base:
            res = run(folder, work / f"base-{n}", args, Path(args.base))
            base_rows.append(dict(res, blocks=n, commit=commit(Path(args.base))))
            print(json.dumps(base_rows[-1]), flush=True)
        res = run(folder, work / f"out-{n}", args)
        rows.append(dict(res, blocks=n, weight_bytes=sum(f.stat().st_size for f in folder.glob("*.safetensors")),
                         commit=at))
        print(json.dumps(rows[-1]), flush=True)
        rows.sort(key=lambda r: r["blocks"])
        write_json(results / "results.json", {"device": "CPU (2 cores), nothing else running", "args": vars(args),
                                              "rows": rows, "base_rows": base_rows})
    # per block: the growth of each phase from the smallest to the largest N
    small, large = rows[0], rows[-1]
    span = large["blocks"] - small["blocks"]
    phases = list(dict.fromkeys(k for r in rows for k in r["timings"]))
    per_block = {k: (large["timings"].get(k, 0) - small["timings"].get(k, 0)) / span for k in phases} if span else {}
    fixed = small["wall_s"] - small["blocks"] * sum(v for k, v in per_block.items() if not k.startswith("compress: "))
    table = markdown_table(
        ["phase"] + [f"N = {r['blocks']} (s)" for r in rows] + (["per block (s)"] if span else []),
        [[k.replace("compress: ", "&nbsp;&nbsp;")] + [f"{r['timings'].get(k, 0):.1f}" for r in rows]
         + ([f"{per_block[k]:.1f}"] if span else []) for k in phases]
        + [["**wall**"] + [f"{r['wall_s']:.0f}" for r in rows] + ([""] if span else [])]
        + [["**peak RSS over baseline (MiB)**"] + [f"{r['peak_over_base'] / 2**20:.0f}" for r in rows]
           + ([""] if span else [])])
    extra = "\n\n" + extrapolation(rows, per_block, args.gpu_tflops, args.nsamples * args.seqlen) if span else ""
    cmd = "python benchmarks/scale.py --blocks " + ",".join(str(r["blocks"]) for r in rows) \
        + (f" --shape {args.shape}" if args.shape != "7b" else "") \
        + (f" --base (a worktree of {base_rows[0]['commit'][:7]})" if base_rows else "")
    at = ", ".join(sorted({str(r.get("commit", "an unrecorded commit")) for r in rows}))
    (results / "table.md").write_text(f"`{cmd}` at {at} (calibration {args.nsamples}×{args.seqlen} tokens, evaluation "
                                      f"{args.max_tokens} tokens of wiki-test)\n\nDevice: CPU (2 cores), one run at a "
                                      f"time; LLaMA-2-{args.shape.upper()}-shaped blocks, random bf16 weights, default method "
                                      f"(svdllm-ec, Fisher ranks, true-sequential) under --low-memory.\n\n{table}{extra}")
    if len(base_rows) > 1 and span:
        with (results / "table.md").open("a") as f:
            f.write("\n" + against_base(base_rows, rows))
    plot(rows, results / "scale.png", base_rows)
    print((results / "table.md").read_text())


def against_base(base_rows: list[dict[str, Any]], rows: list[dict[str, Any]]) -> str:
    """Per-block seconds (the growth from the smallest to the largest N) and peaks of the base tree and this one,
    run one after the other in this run."""
    def per_block(rs: list[dict[str, Any]], key: str) -> float:
        return (rs[-1]["timings"].get(key, 0) - rs[0]["timings"].get(key, 0)) / (rs[-1]["blocks"] - rs[0]["blocks"])

    def wall(rs: list[dict[str, Any]]) -> float:
        return (rs[-1]["wall_s"] - rs[0]["wall_s"]) / (rs[-1]["blocks"] - rs[0]["blocks"])

    keys = [k for k in dict.fromkeys(k for r in base_rows + rows for k in r["timings"]) if k.startswith("compress: ")]
    lines = [f"Against {base_rows[0]['commit'][:7]} (run first for each N, same machine, same run):", "",
             f"| per block (s) | {base_rows[0]['commit'][:7]} | this | this / base |", "|---|---:|---:|---:|"]
    for label, b, t in [(k.removeprefix("compress: "), per_block(base_rows, k), per_block(rows, k)) for k in keys] \
            + [("**wall**", wall(base_rows), wall(rows))]:
        lines.append(f"| {label} | {b:.1f} | {t:.1f} | {t / b:.2f} |" if b > 0.05 else f"| {label} | {b:.1f} | {t:.1f} | |")
    lines += [f"| peak RSS over baseline, N = {b['blocks']} (MiB) | {b['peak_over_base'] / 2**20:.0f} | "
              f"{t['peak_over_base'] / 2**20:.0f} | {t['peak_over_base'] / b['peak_over_base']:.2f} |"
              for b, t in zip(base_rows, rows)]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
