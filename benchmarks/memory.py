"""Peak memory and wall time of `svdllm compress`, in memory and streaming blocks from disk (--low-memory).

    python benchmarks/memory.py                       # SmolLM2-135M (real) and an 0.9 GB random LLaMA
    python benchmarks/memory.py --models smollm2

Each run is a fresh process that imports everything, resets its peak RSS
(VmHWM), runs the CLI and reads the peak: "peak over baseline" is what the
run itself needed, torch and transformers excluded.  The figure to watch is
peak / weights: in memory it must exceed 1 (the model is held); streaming it
is embeddings + one block + its statistics + a fixed ~80 MB of BLAS/LAPACK
workspace and allocator state, whatever the number of blocks.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import folders, markdown_table, save_figure, peak_rss, peak_rss_reset, write_json  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "memory"
RANDOM = dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=24, num_attention_heads=12,
              num_key_value_heads=4, tie_word_embeddings=False)
RUNS = {  # model → the CLI options of its runs (both modes use the same)
    # the README's default command (Fisher ranks from the streamed reverse pass, in both modes since 0.7.0)
    "smollm2": ["--method", "svdllm-ec", "--ratio", "0.2"],
    "random-llama": ["--method", "svdllm-w", "--ratio", "0.2", "--nsamples", "16", "--seqlen", "256", "--eval", ""],
}


def probe(argv: list[str]) -> None:
    """In this fresh process: import, reset the peak, run the CLI, print the peak and wall time as JSON."""
    import accelerate.utils  # noqa: F401  everything the run imports, before the baseline
    import safetensors.torch  # noqa: F401
    import transformers  # noqa: F401
    from transformers.models.llama import modeling_llama  # noqa: F401

    import torch

    import svdllm.cli

    peak_rss_reset()
    base = peak_rss()
    t0 = time.perf_counter()
    code = svdllm.cli.main(argv)
    print(json.dumps({"code": code, "peak_over_base": peak_rss() - base, "wall_s": time.perf_counter() - t0,
                      "threads": torch.get_num_threads()}))


def random_llama(folder: Path) -> Path:
    """A LLaMA of SmolLM2's vocabulary with random weights, saved in 200 MB shards (made once)."""
    if (folder / "config.json").exists():
        return folder
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from svdllm.assets import named_model_dir

    tok = AutoTokenizer.from_pretrained(named_model_dir("smollm2-135m"))
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, **RANDOM)
    LlamaForCausalLM(cfg).save_pretrained(folder, max_shard_size="200MB")
    tok.save_pretrained(folder)
    return folder


def weight_bytes(folder: Path) -> int:
    from svdllm.source import Shards

    return Shards(folder).nbytes


def run(model_dir: Path, mode: str, options: list[str], out: Path) -> dict[str, Any]:
    argv = ["-q", "compress", str(model_dir), *options, "--out", str(out), "--force"]
    argv += ["--low-memory"] if mode == "low-memory" else []
    shutil.rmtree(out.parent / f".{out.name}.svdllm-run", ignore_errors=True)  # a killed run's would be resumed
    proc = subprocess.run([sys.executable, __file__, "--probe", *argv], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{model_dir} {mode} failed:\n{proc.stderr[-3000:]}")
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    report = json.loads((out / "svdllm_report.json").read_text())
    return dict(res, perplexity=report["perplexity"].get("compressed", {}),
                dense_perplexity=report["perplexity"].get("dense", {}))


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5))
    labels = [f"{r['model']}\n{r['mode']} #{r.get('run', 1)}" for r in rows]
    ax.bar(labels, [r["peak_over_base"] / r["weight_bytes"] for r in rows],
           color=["tab:gray" if r["mode"] == "in-memory" else "tab:blue" for r in rows])
    ax.axhline(1.0, color="k", lw=0.8, ls="--", label="the model's weight bytes")
    ax.axhline(0.6, color="tab:red", lw=0.8, ls=":", label="0.6× (the streaming target)")
    ax.set_ylabel("peak RSS over baseline / weights")
    ax.legend(fontsize=8)
    save_figure(fig, path)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--probe":
        return probe(sys.argv[2:])
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="smollm2,random-llama")
    ap.add_argument("--modes", default="in-memory,low-memory")
    ap.add_argument("--repeat", type=int, default=1, help="fresh runs of each model and mode (peaks vary run to run)")
    args, work, results = folders(ap, RESULTS, "svdllm-memory-")
    from svdllm.assets import named_model_dir

    rows = []
    for name in args.models.split(","):
        folder = named_model_dir("smollm2-135m") if name == "smollm2" else random_llama(work / name)
        for mode in args.modes.split(","):
            for repeat in range(1, args.repeat + 1):
                res = run(folder, mode, RUNS[name], work / f"out-{name}-{mode}")
                rows.append(dict(res, model=name, mode=mode, run=repeat, weight_bytes=weight_bytes(folder),
                                 options=RUNS[name]))
                print(json.dumps(rows[-1]), flush=True)
    write_json(results / "results.json", {"device": "CPU (2 cores)", "rows": rows})
    table = markdown_table(
        ["model", "mode", "run", "threads", "weights MiB", "peak RSS over baseline MiB", "peak / weights", "wall s",
         "perplexity"],
        [[r["model"], r["mode"], r["run"], r.get("threads", "-"), f"{r['weight_bytes'] / 2**20:.0f}",
          f"{r['peak_over_base'] / 2**20:.0f}",
          f"{r['peak_over_base'] / r['weight_bytes']:.2f}", f"{r['wall_s']:.0f}",
          ", ".join(f"{k} {v:.2f}" for k, v in r["perplexity"].items()) or "-"] for r in rows])
    cmd = "python benchmarks/memory.py" + (f" --models {args.models}" if args.models != "smollm2,random-llama" else "") \
        + (f" --modes {args.modes}" if args.modes != "in-memory,low-memory" else "") \
        + (f" --repeat {args.repeat}" if args.repeat != 1 else "")
    (results / "table.md").write_text(f"`{cmd}`\n\nDevice: CPU (2 cores); each run a fresh process.\n\n{table}")
    plot(rows, results / "memory.png")
    print(table)


if __name__ == "__main__":
    main()
