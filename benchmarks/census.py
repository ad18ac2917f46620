"""What a 7B-shaped run holds in memory, and when: the scale benchmark's default `svdllm compress --low-memory` of
one LLaMA-2-7B-shaped block, in a fresh process whose resident memory is sampled every 0.1 s, with a census of its
live torch tensors (each storage once, the largest by shape) and the main thread's svdllm stack every 3 s and at each
new high.

    python benchmarks/census.py                       # about 7 min on 2 cores
    python benchmarks/census.py --blocks 2 --results /tmp/census-2

The tensors a census finds are the ones Python reaches (module weights, statistics, a fit's locals); what LAPACK
allocates inside a call (an eigendecomposition's workspace) shows as the gap between RSS and the tensors.
"""
from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import commit, folders, markdown_table, save_figure, write_json  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "census"
MiB = 2**20


def _status() -> dict[str, int]:
    """Resident memory in MiB: all, anonymous and file-backed (the shards' mapped pages)."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "RssAnon", "RssFile"):
            out[key] = int(value.split()[0]) // 1024
    return out


def _tensors() -> tuple[int, list[tuple[int, list[int], str]]]:
    """Bytes of the live CPU tensors' storages (each once) and the 16 largest as (MiB, shape, dtype)."""
    import torch

    seen, total, items = set(), 0, []
    for obj in gc.get_objects():
        try:
            if not isinstance(obj, torch.Tensor) or obj.device.type != "cpu" or obj.is_meta:
                continue
            storage = obj.untyped_storage()
        except Exception:  # a tensor subclass or one being torn down in another thread
            continue
        if storage.data_ptr() in seen or storage.nbytes() == 0:
            continue
        seen.add(storage.data_ptr())
        total += storage.nbytes()
        items.append((storage.nbytes() // MiB, list(obj.shape), str(obj.dtype).removeprefix("torch.")))
    return total, sorted(items, reverse=True)[:16]


def probe(out: Path, argv: list[str]) -> None:
    """In this fresh process: import what the run imports, then run the CLI under the sampler."""
    import accelerate.utils  # noqa: F401
    import safetensors.torch  # noqa: F401
    import transformers  # noqa: F401
    from transformers.models.llama import modeling_llama  # noqa: F401

    import svdllm.cli

    base, main, stop = _status(), threading.get_ident(), threading.Event()
    t0 = time.perf_counter()

    def sample() -> None:
        last, top = -10.0, 0
        with out.open("w") as fh:
            while not stop.is_set():
                now, rss = time.perf_counter() - t0, _status()
                row: dict[str, Any] = {"t": round(now, 2), **{k: v - base[k] for k, v in rss.items()}}
                if now - last > 3 or row["VmRSS"] > top + 64:
                    last, top = now, max(top, row["VmRSS"])
                    total, largest = _tensors()
                    frame = sys._current_frames().get(main)
                    stack = [f.splitlines()[0].strip() for f in traceback.format_stack(frame) if "svdllm" in f]
                    row.update(tensors=total // MiB, largest=largest, stack=stack[-4:])
                fh.write(json.dumps(row) + "\n")
                time.sleep(0.1)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    code = svdllm.cli.main(argv)
    stop.set()
    thread.join()
    raise SystemExit(code)


def render(res: dict[str, Any], results: Path) -> None:
    rows = res["timeline"]
    peak = max(rows, key=lambda r: r["VmRSS"])
    counted = [r for r in rows if "tensors" in r]
    at_peak = min(counted, key=lambda r: abs(r["t"] - peak["t"]))
    lines = [f"`python benchmarks/census.py {' '.join(res['args'])}` at {res['commit']} "
             f"(one process, {res['blocks']} 7B-shaped block(s), `svdllm {' '.join(res['argv'])}`)\n",
             f"Peak RSS over the import baseline: **{peak['VmRSS']} MiB** at {peak['t']:.0f} s of {rows[-1]['t']:.0f} s "
             f"(anonymous {peak['RssAnon']}, file-backed {peak['RssFile']}).\n",
             f"The census nearest the peak ({at_peak['t']:.0f} s, RSS {at_peak['VmRSS']} MiB): live tensors "
             f"{at_peak['tensors']} MiB, in `{at_peak['stack'][-1] if at_peak['stack'] else '?'}`\n",
             markdown_table(["MiB", "shape", "dtype"], [[n, "×".join(map(str, s)), d] for n, s, d in at_peak["largest"]])]
    (results / "table.md").write_text("\n".join(lines))
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4))
    ax.plot([r["t"] for r in rows], [r["VmRSS"] for r in rows], label="RSS over baseline")
    ax.plot([r["t"] for r in counted], [r["tensors"] for r in counted], ".", ms=3, label="live torch tensors")
    ax.axhline(3072, color="gray", ls="--", lw=0.8, label="3 GiB")
    ax.set_xlabel("seconds")
    ax.set_ylabel("MiB")
    ax.legend()
    ax.set_title(f"{res['blocks']} 7B-shaped block(s), svdllm compress --low-memory, at {res['commit'][:9]}")
    save_figure(fig, results / "memory.png")


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--probe":
        return probe(Path(sys.argv[2]), sys.argv[3:])
    import scale

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--blocks", type=int, default=1)
    args, work, results = folders(ap, RESULTS, "svdllm-census-")
    tok = work / "tokenizer"
    if not (tok / "tokenizer.json").exists():
        scale.tokenizer(tok)
    folder = scale.write_model(work / f"llama7b-{args.blocks}", args.blocks, tok)
    out = work / f"census-out-{args.blocks}"
    argv = ["-q", "compress", str(folder), "--low-memory", "--nsamples", "4", "--seqlen", "128", "--eval",
            "wiki-test", "--eval-seqlen", "128", "--max-tokens", "1024", "--dtype", "bfloat16", "--out", str(out),
            "--force"]  # the scale benchmark's run
    at = commit()
    timeline = work / "census.jsonl"
    proc = subprocess.run([sys.executable, __file__, "--probe", str(timeline), *argv], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"the run failed:\n{proc.stderr[-3000:]}")
    samples = [json.loads(line) for line in timeline.read_text().splitlines()]
    peak = max(samples, key=lambda r: r["VmRSS"])
    kept = [r for i, r in enumerate(samples) if "tensors" in r or i % 5 == 0 or r is peak]  # every 0.5 s, censuses
    res = {"commit": at, "args": sys.argv[1:], "argv": argv, "blocks": args.blocks, "timeline": kept}
    write_json(results / "results.json", res)
    render(res, results)
    print((results / "table.md").read_text())


if __name__ == "__main__":
    main()
