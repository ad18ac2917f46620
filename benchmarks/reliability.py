"""Issue 35's two measurements on SmolLM2-135M at ratio 0.2 (the README's default method):

1. calibration size: one-sided whitening, the output-aware default of 0.8.0 (the output Gram alone,
   ``output_shrinkage=0``) and today's default (shrunk towards μI by w/(w + tokens)), at five calibration sizes;
2. factor scale: the default at 32×512 with its factors as the factoriser makes them and balanced
   (‖u_i‖ = ‖v_i‖, ``whitening.balanced``), evaluated in float32, bfloat16, and with int8 / int4 factors.

    python benchmarks/reliability.py                     # both, about an hour on 2 cores
    python benchmarks/reliability.py --sizes 4x128 --no-scale
    python benchmarks/reliability.py --sizes '' --scale-size 8x512 --results benchmarks/results/reliability-scale

Writes results.json (after every run, with the commit), table.md and calibration.png to --results.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import commit, markdown_table, save_figure, write_json  # noqa: E402

import svdllm.pipeline  # noqa: E402
from svdllm import CompressionConfig, compress, evaluate_perplexity, load_model, sample_windows  # noqa: E402
from svdllm.calibration import eval_windows  # noqa: E402
from svdllm.data import bos_token, load_text, tokenize  # noqa: E402
from svdllm.methods import ErrorCorrectedOptions  # noqa: E402
from svdllm.runtime import LowRankLinear  # noqa: E402
from svdllm.whitening import balanced  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "reliability"
VARIANTS = {"one-sided": ErrorCorrectedOptions(output_whitening=False),
            "0.8.0 default (output Gram alone)": ErrorCorrectedOptions(output_shrinkage=0.0),
            "default (shrunk by w/(w+t))": ErrorCorrectedOptions()}
EVALS = ("wiki-test", "news")


def perplexities(model: torch.nn.Module, evals: dict[str, torch.Tensor]) -> dict[str, float]:
    return {name: evaluate_perplexity(model, None, w.flatten(), w.shape[1], None).perplexity
            for name, w in evals.items()}


def factor_scale(model: torch.nn.Module) -> dict[str, float]:
    """Median |entry| of every U and of every V, and the largest entry of either."""
    us = torch.cat([m.svd_u.weight.detach().abs().flatten() for m in model.modules() if isinstance(m, LowRankLinear)])
    vs = torch.cat([m.svd_v.weight.detach().abs().flatten() for m in model.modules() if isinstance(m, LowRankLinear)])
    return {"median_u": float(us.median()), "median_v": float(vs.median()), "max": float(max(us.max(), vs.max()))}


def stored_as(model: torch.nn.Module, how: str, record) -> torch.nn.Module:
    from svdllm.quantize import QuantizeOptions, quantize_model
    from svdllm.folder import cast_parameters as _cast_parameters

    model = copy.deepcopy(model)
    if how != "float32":
        _cast_parameters(model, "bfloat16")
    if how in ("int8", "int4"):
        quantize_model(model, QuantizeOptions(bits=int(how[3:]), group_size=128), record)
    return model


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="4x128,8x256,8x512,16x512,32x512")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="which of the variants, in this order")
    ap.add_argument("--merge", default=None, help="a results.json of an earlier run to add these rows to (same commit)")
    ap.add_argument("--ratio", type=float, default=0.2)
    ap.add_argument("--max-tokens", type=int, default=4096)
    ap.add_argument("--no-scale", action="store_true", help="skip the factor-scale table")
    ap.add_argument("--scale-size", default="32x512", help="calibration of the factor-scale run")
    ap.add_argument("--results", default=str(RESULTS))
    args = ap.parse_args()
    out = Path(args.results)
    out.mkdir(parents=True, exist_ok=True)
    model, tok = load_model("smollm2-135m")
    bos = bos_token(tok, model.config)
    train = tokenize(tok, load_text("wiki-train"))
    evals = {s: eval_windows(tokenize(tok, load_text(s)), 512, args.max_tokens, bos) for s in EVALS}
    res: dict = {"commit": commit(), "ratio": args.ratio, "max_tokens": args.max_tokens, "threads":
                 torch.get_num_threads(), "dense": perplexities(model, evals), "calibration": [], "scale": {},
                 "scale_size": args.scale_size}
    if args.merge:  # rows of an earlier run of this script, kept as they were
        earlier = json.loads(Path(args.merge).read_text())
        res["calibration"], res["earlier_commit"] = earlier["calibration"], earlier["commit"]
    write_json(out / "results.json", res)
    chosen = [v for v in args.variants.split(",") if v]
    for size in filter(None, args.sizes.split(",")):
        n, seqlen = map(int, size.split("x"))
        windows = sample_windows(train, n, seqlen, 0, bos)
        for label in chosen:
            opts = VARIANTS[label]
            t0 = time.perf_counter()
            result = compress(copy.deepcopy(model), windows, CompressionConfig(method=opts, ratio=args.ratio),
                              eval_windows=evals, progress=False)
            row = {"size": size, "tokens": n * seqlen, "variant": label, "seconds": time.perf_counter() - t0,
                   **result.report.perplexity["compressed"]}
            res["calibration"].append(row)
            print(row, flush=True)
            write_json(out / "results.json", res)
    if not args.no_scale:
        n, seqlen = map(int, args.scale_size.split("x"))
        windows = sample_windows(train, n, seqlen, 0, bos)
        kept = svdllm.pipeline.balanced
        svdllm.pipeline.balanced = lambda u, v: (u, v)  # the factors as the factoriser makes them (0.8.0)
        try:
            result = compress(copy.deepcopy(model), windows, CompressionConfig(ratio=args.ratio), progress=False)
        finally:
            svdllm.pipeline.balanced = kept
        raw = result.model
        fixed = copy.deepcopy(raw)
        for m in fixed.modules():
            if isinstance(m, LowRankLinear):
                u, v = balanced(m.svd_u.weight.data.double(), m.svd_v.weight.data.double())
                m.svd_u.weight.data, m.svd_v.weight.data = u.float(), v.float()
        for label, mdl in (("as factorised", raw), ("balanced", fixed)):
            res["scale"][label] = {"factors": factor_scale(mdl), **{
                how: perplexities(stored_as(mdl, how, result.record), evals)
                for how in ("float32", "bfloat16", "int8", "int4")}}
            print(label, res["scale"][label], flush=True)
            write_json(out / "results.json", res)
    write_tables(res, out)


def write_tables(res: dict, out: Path) -> None:
    d = res["dense"]
    commits = res["commit"][:7] + (f" (earlier rows: {res['earlier_commit'][:7]})" if res.get("earlier_commit") else "")
    text = (f"SmolLM2-135M, svdllm-ec at ratio {res['ratio']} (Fisher ranks, true-sequential), perplexity on "
            f"{res['max_tokens']} tokens of wiki-test / news (dense {d['wiki-test']:.2f} / {d['news']:.2f}); "
            f"commit {commits}, {res['threads']} threads, cores shared with other work (times are not clean).\n")
    sizes = list(dict.fromkeys(r["size"] for r in res["calibration"]))
    cell = {(r["size"], r["variant"]): r for r in res["calibration"]}
    if sizes:
        text += "\n## Calibration size\n\n" + markdown_table(["calibration (windows×tokens)", *VARIANTS], [
            [s, *(f"{cell[s, v]['wiki-test']:.2f} / {cell[s, v]['news']:.2f}" if (s, v) in cell else ""
                  for v in VARIANTS)] for s in sizes])
    if res["scale"]:
        text += f"\n## Factor scale (the default, calibrated on {res['scale_size']} tokens)\n\n" + markdown_table(
            ["factors", "median abs(U)", "median abs(V)", "max entry", "float32", "bfloat16", "int8 factors (bf16)",
             "int4 factors (bf16, group 128)"],
            [[label, f"{r['factors']['median_u']:.3g}", f"{r['factors']['median_v']:.3g}",
              f"{r['factors']['max']:.3g}",
              *(f"{r[h]['wiki-test']:.2f} / {r[h]['news']:.2f}" for h in ("float32", "bfloat16", "int8", "int4"))]
             for label, r in res["scale"].items()])
    (out / "table.md").write_text(text)
    if res["calibration"]:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4))
        for v in VARIANTS:
            pts = [(cell[s, v]["tokens"], cell[s, v]["wiki-test"]) for s in sizes if (s, v) in cell]
            ax.plot(*zip(*pts), marker="o", label=v)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("calibration tokens")
        ax.set_ylabel("wiki-test perplexity")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        save_figure(fig, out / "calibration.png")


if __name__ == "__main__":
    main()
