"""What the default compression costs, in plain forwards of the same model over the same calibration windows.

    python benchmarks/cost.py                       # SmolLM2 at 0.2, 0.4 and 0.6 (about 35 min on 2 cores)
    python benchmarks/cost.py --ratios 0.2          # one ratio
    python benchmarks/cost.py --render              # table and plot again from results.json

In one process, alone on the machine: a plain forward of the model over the calibration windows (no gradient, the
batch compress uses), a forward with the loss's backward over them (the floor of any pass that needs gradients), then
for each ratio the default ``CompressionConfig`` run stage by stage on a fresh copy of the model, each stage timed and
its decoder-block calls counted (a call stopped early by a recording hook counts whole: an upper bound).  Evaluation
is not timed: the perplexity on 8192 tokens of wiki-test and news is taken after, on the compressed model.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import commit, markdown_table, measure_then_render, save_figure, write_json  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "cost"
# what this design cannot do without: its passes (forwards, backward, the head) and one factorisation per matrix
# (and one spectrum per matrix for the rank allocation)
HEAD = "head (its forward; its backward is in backward)"
FLOOR = ("block forwards", "backward", HEAD, "factorisations")


class BlockCalls:
    """Decoder-block forwards that do work, in windows: ``complete`` ran the whole block, ``stopped`` were cut short
    by a recording hook once the linears it watched had their inputs (each less than a whole block).  Stand-ins
    (the capture's and the head's replay, which only pass tensors on) are not counted."""

    def __init__(self, blocks: Any) -> None:
        self.complete = self.started = 0
        self._handles = [h for b in blocks for h in (b.register_forward_pre_hook(self._pre, with_kwargs=True),
                                                     b.register_forward_hook(self._post, with_kwargs=True))]

    @staticmethod
    def _windows(module: Any, args: tuple, kwargs: dict) -> int:
        if "forward" in vars(module):  # a stand-in
            return 0
        h = args[0] if args else kwargs.get("hidden_states")
        return int(h.shape[0]) if h is not None else 0

    def _pre(self, module: Any, args: tuple, kwargs: dict) -> None:
        self.started += self._windows(module, args, kwargs)

    def _post(self, module: Any, args: tuple, kwargs: dict, _out: Any) -> None:
        self.complete += self._windows(module, args, kwargs)

    def snapshot(self) -> tuple[int, int]:
        return self.complete, self.started - self.complete

    def close(self) -> None:
        for h in self._handles:
            h.remove()


class WorkClocks:
    """Seconds of the work a compression is made of, each call timed exclusive of the timed calls inside it:
    block forwards (every lane, stopped early or whole, and the reverse pass's recomputation), the backward through the
    blocks, the head's forward and backward, factorisations (the reverse pass's spectra, the block loop's fits) and
    the Gram products (input and output-gradient Grams, float32 products summed in float64, and the spectra's
    W·XᵀX·Wᵀ summed from the linears' outputs; a fit's own products from kept inputs count as factorisations).
    What is left of the total is bookkeeping (copies, stores, the Σg² sums, the calibration capture)."""

    KINDS = {"block forwards": [("svdllm.calibration", "ActivationStream.run_block")],
             "backward": [("torch.autograd", "backward")],
             HEAD: [("svdllm.importance", "_head_backward")],
             "factorisations": [("svdllm.importance", "whitened_spectrum"), ("svdllm.blockloop", "_factorise")],
             "Gram products": [("svdllm.calibration", "GramAccumulator._add_product"),
                               ("svdllm.importance", "add_product_"), ("svdllm.calibration", "add_outputs_gram_")]}
    # the Gram products by statistic (what ``parts`` splits them into): by the function, or by the record's field
    PARTS = {"add_product_": "output-gradient Grams C_g", "add_outputs_gram_": "W·XᵀX·Wᵀ from the outputs (spectra)",
             "gram": "XᵀX (spectra)", "comp_gram": "X′ᵀX′", "cross": "XᵀX′",
             "weighted_cross": "W·XᵀX′ from the outputs"}

    def __init__(self) -> None:
        import importlib

        self.seconds = {kind: 0.0 for kind in self.KINDS}
        self.parts: dict[str, float] = {}  # the Gram products by statistic
        self._inner: list[float] = []
        self._patched: list[tuple[Any, str, Any]] = []
        for kind, targets in self.KINDS.items():
            for module, attr in targets:
                owner: Any = importlib.import_module(module)
                *path, name = attr.split(".")
                for part in path:
                    owner = getattr(owner, part)
                original = getattr(owner, name)
                self._patched.append((owner, name, original))
                setattr(owner, name, self._timed(kind, original, name if kind == "Gram products" else None))

    def _timed(self, kind: str, fn: Any, part: str | None = None) -> Any:
        import torch

        sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)  # kernels are asynchronous

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            self._inner.append(0.0)
            sync()
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                sync()
                spent = time.perf_counter() - t0
                inner = self._inner.pop()
                self.seconds[kind] += spent - inner
                if part is not None:  # GramAccumulator._add_product(self, stats, field, a, b): by the field
                    label = self.PARTS[args[2] if part == "_add_product" else part]
                    self.parts[label] = self.parts.get(label, 0.0) + spent - inner
                if self._inner:
                    self._inner[-1] += spent
        return wrapper

    def close(self) -> None:
        for owner, name, original in reversed(self._patched):
            setattr(owner, name, original)


def plain_passes(model: Any, windows: Any, batch: int) -> dict[str, float]:
    """Seconds of one forward over ``windows`` without gradients, and of one forward plus the loss's backward."""
    import torch

    model.eval()
    t0 = time.perf_counter()
    with torch.no_grad():
        for b in windows.split(batch):
            model(input_ids=b, use_cache=False)
    forward = time.perf_counter() - t0
    flags = {p: p.requires_grad for p in model.parameters()}
    for p in flags:
        p.requires_grad_(True)
    t0 = time.perf_counter()
    for b in windows.split(batch):
        model(input_ids=b, labels=b, use_cache=False).loss.backward()
    backward = time.perf_counter() - t0
    for p, flag in flags.items():
        p.grad = None
        p.requires_grad_(flag)
    return {"forward": forward, "forward_backward": backward}


def compress_by_stage(model: Any, windows: Any, ratio: float, device: str) -> dict[str, Any]:
    """The default compression of ``model`` at ``ratio``, as ``pipeline.compress`` runs it, each stage timed and its
    block calls counted; then the perplexities (untimed)."""
    import torch

    from svdllm.config import CompressionConfig
    from svdllm.pipeline import plan_passes
    from svdllm.source import ModelSource
    from svdllm.stages import open_run

    cfg = CompressionConfig(ratio=ratio, device=device)
    cfg.validate()
    source = ModelSource(model, cfg.device)
    calls = BlockCalls(source.blocks)
    clocks = WorkClocks()
    stages = plan_passes(cfg, evaluate=False)
    rows = []
    t_all = time.perf_counter()
    with torch.no_grad():
        run = open_run(source, windows, {}, cfg, None, False)
        try:
            for stage in stages:
                (c0, s0), t0 = calls.snapshot(), time.perf_counter()
                stage.run(run)
                c1, s1 = calls.snapshot()
                rows.append({"stage": type(stage).__name__, "seconds": time.perf_counter() - t0,
                             "block_windows_complete": c1 - c0, "block_windows_stopped": s1 - s0})
        finally:
            run.close()
    total = time.perf_counter() - t_all
    calls.close()
    clocks.close()
    return {"stages": rows, "seconds": total, "work": clocks.seconds, "gram_parts": clocks.parts,
            "phases": dict(run.report.timings),
            "batch": run.batch,
            "n_blocks": len(source.blocks), "model": source.model}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ratios", default="0.2,0.4,0.6")
    ap.add_argument("--device", default="cpu", help="where the model and every pass run (cuda on a GPU)")
    measure_then_render(ap, RESULTS, measure, render)


def measure(args: argparse.Namespace, results: Path) -> None:
    import torch

    from svdllm.data import token_windows
    from svdllm.evaluate import window_perplexities
    from svdllm.source import open_source
    from svdllm.workflow import CompressOptions

    opts = CompressOptions()
    source, tok = open_source(opts.model, False, "cpu")
    dense = source.model
    windows, evals, _ = token_windows(tok, dense.config, opts.calib, opts.nsamples, opts.seqlen, opts.seed,
                                      opts.eval, opts.eval_seqlen, opts.max_tokens)
    batch = source.default_batch
    out: dict[str, Any] = {"commit": commit(), "device": "CPU (2 cores), nothing else running" if args.device == "cpu"
                           else torch.cuda.get_device_name() if args.device.startswith("cuda") else args.device,
                           "torch_threads": torch.get_num_threads(), "model": opts.model,
                           "calibration": f"{opts.nsamples}x{opts.seqlen} {opts.calib}", "batch": batch,
                           "eval_tokens": opts.max_tokens, "runs": []}
    out["plain"] = plain_passes(dense.to(args.device), windows.to(args.device), batch)
    dense.to("cpu")  # compress moves one block at a time to the device
    print(json.dumps(out["plain"]), flush=True)
    for ratio in [float(r) for r in args.ratios.split(",")]:
        res = compress_by_stage(copy.deepcopy(dense), windows, ratio, args.device)
        model = res.pop("model")
        with torch.no_grad():
            res["perplexity"] = window_perplexities(model, evals, progress=False)
        del model
        res["ratio"] = ratio
        out["runs"].append(res)
        print(json.dumps(res), flush=True)
        write_json(results / "results.json", out)


def render(results: Path) -> None:
    data = json.loads((results / "results.json").read_text())
    fwd, fb = data["plain"]["forward"], data["plain"]["forward_backward"]
    header = ["ratio", "stage", "seconds", "× a plain forward", "whole block forwards, in plain forwards",
              "forwards stopped early, in plain forwards"]
    rows: list[list[Any]] = []
    for run in data["runs"]:
        per_forward = run["n_blocks"] * int(data["calibration"].split("x")[0])  # block-windows in one forward
        for st in run["stages"]:
            counted = "block_windows_complete" in st  # results before the count of windows have no such column
            rows.append([run["ratio"], st["stage"], f"{st['seconds']:.1f}", f"{st['seconds'] / fwd:.2f}",
                         f"{st['block_windows_complete'] / per_forward:.2f}" if counted else "",
                         f"{st['block_windows_stopped'] / per_forward:.2f}" if counted else ""])
        ppl = " / ".join(f"{v:.2f}" for v in run["perplexity"].values())
        rows.append([run["ratio"], f"**total** (perplexity {ppl})", f"{run['seconds']:.1f}",
                     f"**{run['seconds'] / fwd:.2f}**", "", ""])
    phases = sorted({k for r in data["runs"] for k in r["phases"]})
    phase_rows = [[k] + [f"{r['phases'].get(k, 0):.1f}" for r in data["runs"]] for k in phases]
    text = (f"`python benchmarks/cost.py` at {data['commit']} ({data['device']}, {data['torch_threads']} threads; "
            f"{data['model']}, calibration {data['calibration']}, batch {data['batch']})\n\n"
            f"A plain forward over the calibration windows: {fwd:.1f} s; a forward with the loss's backward: {fb:.1f} s "
            f"({fb / fwd:.2f}×).\n\n" + markdown_table(header, rows)
            + "\nPhases inside the stages (seconds; the report's clocks):\n\n"
            + markdown_table(["phase"] + [f"ratio {r['ratio']}" for r in data["runs"]], phase_rows))
    runs = [r for r in data["runs"] if "work" in r]
    if runs:
        kinds = list(runs[0]["work"])
        work_rows = [[k] + [f"{r['work'][k]:.1f} ({r['work'][k] / fwd:.2f})" for r in runs] for k in kinds]
        work_rows.append(["bookkeeping (the rest)"] + [f"{r['seconds'] - sum(r['work'].values()):.1f}" for r in runs])
        floor = [sum(v for k, v in r["work"].items() if k in FLOOR) for r in runs]
        work_rows.append(["**the floor**: " + " + ".join(FLOOR)] + [f"**{f:.1f} ({f / fwd:.2f})**" for f in floor])
        work_rows.append(["total over the floor"] + [f"**{r['seconds'] / f:.2f}×**" for r, f in zip(runs, floor)])
        parts = list(dict.fromkeys(k for r in runs for k in r.get("gram_parts", {})))
        work_rows += [[f"Gram products: {k}"] + [f"{r['gram_parts'].get(k, 0):.1f} ({r['gram_parts'].get(k, 0) / fwd:.2f})"
                                                 if "gram_parts" in r else "" for r in runs] for k in parts]
        text += ("\nWhere the time goes (seconds, in plain forwards; each call timed exclusive of the timed calls inside "
                 "it, `WorkClocks`):\n\n"
                 + markdown_table(["work"] + [f"ratio {r['ratio']}" for r in runs], work_rows))
    (results / "table.md").write_text(text)
    plot(data, results / "cost.png")
    print(text)


def plot(data: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fwd = data["plain"]["forward"]
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    labels = [f"{r['ratio']:g}" for r in data["runs"]]
    bottom = [0.0] * len(labels)
    for stage in dict.fromkeys(s["stage"] for r in data["runs"] for s in r["stages"]):
        vals = [next((s["seconds"] / fwd for s in r["stages"] if s["stage"] == stage), 0.0) for r in data["runs"]]
        ax.bar(labels, vals, bottom=bottom, label=stage)
        bottom = [b + v for b, v in zip(bottom, vals)]
    ax.axhline(4, color="tab:red", ls=":", label="4× a plain forward")
    ax.set_xlabel("ratio")
    ax.set_ylabel("× a plain forward")
    ax.set_title(f"{data['model']}: the default compression, stage by stage")
    ax.legend(fontsize=7)
    save_figure(fig, path)


if __name__ == "__main__":
    main()
