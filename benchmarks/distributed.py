"""Wall time and peak memory per process of `svdllm compress` on one process against several (torchrun).

    python benchmarks/distributed.py                  # this machine: 1 process × 2 threads, 2 processes × 1 thread
    python benchmarks/distributed.py --gpus 4         # a GPU machine: 1 GPU against 4 (NCCL)

Every run is the README's default command with uniform ranks (SmolLM2-135M,
svdllm-ec at 0.2, 32×512 calibration tokens, wiki-test and news).  Peak RSS is sampled every
0.1 s for each worker process (torchrun's own agent excluded).  The perplexity
of every run is printed beside the single-process one: they must agree.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import markdown_table, write_json  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "distributed"
COMMAND = ["-q", "compress", "smollm2-135m", "--method", "svdllm-ec", "--ratio", "0.2", "--ranks", "uniform"]


def launch(processes: int, threads: int, out: Path, extra: list[str]) -> dict[str, Any]:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), TQDM_DISABLE="1")
    head = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}"] \
        if processes > 1 else [sys.executable]
    cmd = [*head, "-m", "svdllm", *COMMAND, *extra, "--out", str(out), "--force"]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    root, peaks = psutil.Process(proc.pid), {}
    while proc.poll() is None:
        try:
            workers = root.children() if processes > 1 else [root]
            for w in workers:
                peaks[w.pid] = max(peaks.get(w.pid, 0), w.memory_info().rss)
        except psutil.Error:
            pass
        time.sleep(0.1)
    wall = time.perf_counter() - t0
    stdout, stderr = proc.communicate()
    if proc.returncode != 0:
        raise SystemExit(f"{processes} processes failed:\n{stderr[-3000:]}")
    report = json.loads((out / "svdllm_report.json").read_text())
    timings = report["processes"].get("timings") or [
        {k.removeprefix("compress: "): v for k, v in report["timings"].items()}]
    return {"processes": processes, "threads": threads, "wall_s": wall, "peak_rss_per_process": sorted(peaks.values()),
            "perplexity": report["perplexity"]["compressed"], "dense_perplexity": report["perplexity"]["dense"],
            "phases_per_process": timings, "command": " ".join(cmd[cmd.index("-m", 1 if processes > 1 else 0):])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gpus", type=int, default=0, help="compare 1 GPU with this many (NCCL); 0: CPU processes")
    ap.add_argument("--results", default=str(RESULTS))
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="svdllm-dist-"))
    cores = os.cpu_count() or 2
    runs = [(1, cores), (cores, 1)] if not args.gpus else [(1, 1), (args.gpus, 1)]
    extra = ["--device", "cuda"] if args.gpus else ["--device", "cpu"]
    rows = [launch(p, t, work / f"out-{p}", extra) for p, t in runs]
    base = rows[0]
    for r in rows:
        r["perplexity_vs_one_process"] = {k: v / base["perplexity"][k] - 1 for k, v in r["perplexity"].items()}
        r["speedup"] = base["wall_s"] / r["wall_s"]
        print(json.dumps(r), flush=True)
    device = f"{args.gpus} GPUs" if args.gpus else f"CPU ({cores} cores)"
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    write_json(results / "results.json", {"device": device, "rows": rows})
    phase = lambda r, k: max(t.get(f"{k}", 0.0) for t in r["phases_per_process"])  # noqa: E731
    table = markdown_table(
        ["processes × threads", "wall s", "speedup", "statistics s (slowest rank)", "decompositions s",
         "peak RSS per process MiB", "wiki-test", "news", "Δ vs 1 process"],
        [[f"{r['processes']} × {r['threads']}", f"{r['wall_s']:.0f}", f"{r['speedup']:.2f}×",
          f"{phase(r, 'forward passes and statistics'):.0f}", f"{phase(r, 'decompositions'):.0f}",
          ", ".join(f"{p / 2**20:.0f}" for p in r["peak_rss_per_process"]),
          f"{r['perplexity']['wiki-test']:.3f}", f"{r['perplexity']['news']:.3f}",
          ", ".join(f"{100 * v:+.4f}%" for v in r["perplexity_vs_one_process"].values())] for r in rows])
    cmd = "python benchmarks/distributed.py" + (f" --gpus {args.gpus}" if args.gpus else "")
    (results / "table.md").write_text(f"`{cmd}`\n\nDevice: {device}; the README's default command "
                                      f"(`svdllm {' '.join(COMMAND[1:])}`).\n\n{table}")
    print(table)


if __name__ == "__main__":
    main()
