"""The README's `svdllm compress` run by two source trees one after the other, alone on the machine: phase seconds,
peak memory, perplexity and whether the shards are identical byte for byte.

    git worktree add /tmp/svdllm-base bed5636     # the tree to compare with (0.8.1 here)
    python benchmarks/passes.py --base /tmp/svdllm-base

Each run is a fresh process of the CLI with PYTHONPATH pointing at its tree's src/ (the same venv, the same
libraries).  Writes results.json (with both commits), table.md and phases.png to --results.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import commit, folders, markdown_table, save_figure, write_json  # noqa: E402

HERE = Path(__file__).resolve().parents[1]
RESULTS = HERE / "benchmarks" / "results" / "passes"


def run(tree: Path, out: Path, extra: list[str]) -> dict:
    """The README's command by ``tree``'s svdllm, in a child process; its report, wall time, peak and digests."""
    env = dict(os.environ, PYTHONPATH=str(tree / "src"))
    t0 = time.perf_counter()
    child = subprocess.Popen([sys.executable, "-m", "svdllm", "-q", "compress", "--out", str(out), *extra], env=env,
                             stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(child.pid, 0)  # this child's own peak, not the largest of all children
    wall = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status):
        raise SystemExit(f"{tree}: svdllm compress failed")
    report = json.loads((out / "svdllm_report.json").read_text())
    shards = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.glob("*.safetensors"))}
    return {"commit": commit(tree), "wall_s": wall, "peak_rss_mib": usage.ru_maxrss / 1024,
            "timings": report["timings"], "perplexity": report["perplexity"], "ranks": report["plan"]["ranks"],
            "passes": report.get("passes"), "shards": shards}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", default=None, help="a worktree of the commit to compare with")
    ap.add_argument("--extra", default="", help="more compress flags, space-separated")
    ap.add_argument("--render", action="store_true", help="only redraw table.md and phases.png from results.json")
    args, work, results = folders(ap, RESULTS, "svdllm-passes-")
    if args.render:
        res = json.loads((results / "results.json").read_text())
    elif not args.base:
        ap.error("--base is needed to run (or --render to redraw)")
    else:
        extra = args.extra.split()
        runs = {"base": run(Path(args.base), work / "base", extra), "this": run(HERE, work / "this", extra)}
        res = {"command": "svdllm compress" + (f" {args.extra}" if args.extra else ""), "runs": runs,
               "threads": os.cpu_count(), "same_shards": runs["base"]["shards"] == runs["this"]["shards"],
               "same_ranks": runs["base"]["ranks"] == runs["this"]["ranks"], "alone": True}
        write_json(results / "results.json", res)
    render(res, results)


def render(res: dict, results: Path) -> None:
    rows = res["runs"]
    base, this = rows["base"], rows["this"]
    phases = sorted({k for r in rows.values() for k in r["timings"]}, key=lambda k: (not k.startswith("compress"), k))
    table = [[k, *(f"{r['timings'].get(k, 0.0):.1f}" for r in rows.values())] for k in phases]
    table += [["wall (s)", *(f"{r['wall_s']:.1f}" for r in rows.values())],
              ["peak RSS (MiB)", *(f"{r['peak_rss_mib']:.0f}" for r in rows.values())]]
    table += [[f"perplexity {name}", *(f"{r['perplexity']['compressed'][name]:.2f}" for r in rows.values())]
              for name in this["perplexity"].get("compressed", {})]
    text = (f"# `{res['command']}`: {base['commit'][:7]} against {this['commit'][:7]}\n\n"
            f"Each run alone on the machine, one after the other, {res['threads']} cores. Shards identical byte for "
            f"byte: {res['same_shards']}; ranks identical: {res['same_ranks']}.\n\n"
            + markdown_table(["phase (s)", base["commit"][:7], this["commit"][:7]], table)
            + "\nStages of " + this["commit"][:7] + ": "
            + ", ".join(f"{p['stage']} ({p['rides_on']})" for p in this["passes"] or []) + "\n")
    (results / "table.md").write_text(text)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [k for k in phases if k.startswith("compress: ")]
    fig, ax = plt.subplots(figsize=(8, 4))
    for j, (name, r) in enumerate(rows.items()):
        ax.barh([i + 0.4 * j for i in range(len(shown))], [r["timings"].get(k, 0.0) for k in shown], height=0.4,
                label=f"{name} {r['commit'][:7]}")
    ax.set_yticks([i + 0.2 for i in range(len(shown))], [k.removeprefix("compress: ") for k in shown])
    ax.set_xlabel("seconds")
    ax.legend()
    save_figure(fig, results / "phases.png")
    print(text)


if __name__ == "__main__":
    main()
