"""KV-cache bytes, peak memory and decode speed with the latent cache against the ordinary one.

    python benchmarks/kv_cache.py                                   # SmolLM2 at 0.2/0.4/0.6, prompts 512/2048/8176
    python benchmarks/kv_cache.py --ratios 0.4 --prompts 512,2048

The models are SmolLM2-135M compressed by ``svdllm compress --method svdllm-w --ranks uniform`` (made once in
``--work``): the cache depends on the ranks of k_proj and v_proj only, and uniform ranks make them the formula's
k = ⌊(1−r)·m·n/(m+n)⌋.  Each (model, cache, prompt) runs in a fresh process: load, reset the peak RSS, prefill the
prompt (512-token chunks, logits of the last position only), then ``--decode`` greedy steps, timed.  "peak" is the
resident memory the generation added to the loaded model; the cache bytes are counted from the cache's tensors
after the last step and compared with ``cache_bytes_per_token`` × tokens.  Greedy outputs of the two caches are
compared in this process (``--check-tokens`` new tokens after a 512-token prompt).
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import markdown_table, peak_rss, peak_rss_reset, write_json  # noqa: E402

from svdllm import load_model  # noqa: E402
from svdllm.data import load_text, tokenize  # noqa: E402
from svdllm.runtime import LatentCache, cache_argument, cache_bytes_per_token  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "kv_cache"
DENSE = "smollm2-135m"
MODES = ("ordinary", "latent", "latent-rebuild")  # latent: values folded into o_proj in decode; -rebuild: V rebuilt


def prompt_tokens(tokenizer: Any, length: int) -> torch.Tensor:
    return tokenize(tokenizer, load_text("wiki-test"))[:length][None]


def make_cache(model: Any, mode: str) -> Any:
    from transformers import DynamicCache

    if mode == "ordinary":
        return DynamicCache(config=model.config)
    return LatentCache(model, fold_values=mode == "latent")  # "latent-rebuild" rebuilds V instead of folding U


def tensors_bytes(cache: Any) -> int:
    tensors = [t for layer in cache.layers for t in (layer.keys, layer.values)]
    tensors += [t for store in getattr(cache, "rope_stores", []) for t in (store.layer.keys, store.layer.values)]
    return sum(t.numel() * t.element_size() for t in tensors)


def prefill(model: Any, ids: torch.Tensor, cache: Any, chunk_size: int = 512) -> torch.Tensor:
    """Prefill in chunks, as servers do, so that the cache rather than one long forward's activations sets the
    peak; returns the greedy next token."""
    for chunk in ids.split(chunk_size, dim=1):
        out = model(chunk, **{cache_argument(model): cache}, use_cache=True, logits_to_keep=1)
    return out.logits[:, -1:].argmax(-1)


def decode_step(model: Any, token: torch.Tensor, cache: Any) -> torch.Tensor:
    return model(token, **{cache_argument(model): cache}, use_cache=True).logits[:, -1:].argmax(-1)


def probe(model_spec: str, mode: str, prompt: int, decode: int) -> dict[str, Any]:
    """In a fresh process: the memory of prefilling ``prompt`` tokens and ``decode`` greedy steps."""
    model, tok = load_model(model_spec)
    ids = prompt_tokens(tok, prompt)
    cache = make_cache(model, mode)
    with torch.inference_mode():
        model(ids[:, :8])  # touch every weight first: a memory-mapped load pages them in on first use
        peak_rss_reset()
        base = peak_rss()
        token = prefill(model, ids, cache)
        for _ in range(decode):
            token = decode_step(model, token, cache)
    tokens = prompt + decode
    return {"model": model_spec, "mode": mode, "prompt": prompt, "tokens": tokens, "cache_bytes": tensors_bytes(cache),
            "formula_bytes": cache_bytes_per_token(model, mode != "ordinary") * tokens,
            "bytes_per_token": cache_bytes_per_token(model, mode != "ordinary"), "peak_over_loaded": peak_rss() - base}


def cache_decode_speed(model_spec: str, prompt: int, rounds: int, steps: int) -> dict[str, float]:
    """Decode tokens/s of each cache after the same prompt, in one process, interleaved round by round (median)."""
    model, tok = load_model(model_spec)
    ids = prompt_tokens(tok, prompt)
    times: dict[str, list[float]] = {mode: [] for mode in MODES}
    with torch.inference_mode():
        state = {mode: (cache := make_cache(model, mode), prefill(model, ids, cache)) for mode in MODES}
        for _ in range(rounds):
            for mode, (cache, token) in state.items():
                for _ in range(steps):
                    t0 = time.perf_counter()
                    token = decode_step(model, token, cache)
                    times[mode].append(time.perf_counter() - t0)
                state[mode] = (cache, token)
    return {mode: 1 / statistics.median(t) for mode, t in times.items()}


def same_greedy(model_spec: str, new_tokens: int) -> dict[str, Any]:
    """Greedy generation after a 512-token prompt with each cache: same tokens?  Largest logit difference?"""
    model, tok = load_model(model_spec)
    ids = prompt_tokens(tok, 512)
    kw = dict(max_new_tokens=new_tokens, do_sample=False, output_scores=True, return_dict_in_generate=True,
              pad_token_id=tok.eos_token_id)
    ref = model.generate(ids, **kw)
    res = {"new_tokens": new_tokens}
    for fold in (True, False):
        out = model.generate(ids, **kw, **{cache_argument(model): LatentCache(model, fold_values=fold)})
        res |= {("same_tokens" if fold else "same_tokens_v_rebuilt"): bool(torch.equal(ref.sequences, out.sequences)),
                ("max_logit_diff" if fold else "max_logit_diff_v_rebuilt"):
                    max((a - b).abs().max().item() for a, b in zip(ref.scores, out.scores))}
    return res


def compressed(work: Path, ratio: float) -> Path:
    out = work / f"svdllm-w-uniform-{ratio}"
    if not (out / "config.json").exists():
        subprocess.run([sys.executable, "-m", "svdllm", "-q", "compress", DENSE, "--method", "svdllm-w",
                        "--ranks", "uniform", "--ratio", str(ratio), "--eval", "", "--out", str(out)], check=True)
    return out


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for key in dict.fromkeys((r["label"], r["mode"]) for r in rows):
        pts = sorted((r["prompt"], r["cache_bytes"] / 2**20, r["peak_over_loaded"] / 2**20)
                     for r in rows if (r["label"], r["mode"]) == key)
        style = "--" if key[1] == "latent" else "-"
        for ax, col in zip(axes, (1, 2)):
            ax.plot([p[0] for p in pts], [p[col] for p in pts], style, marker="o", label=f"{key[0]} {key[1]}")
    for ax, title in zip(axes, ("KV cache (MiB)", "peak RSS over the loaded model (MiB)")):
        ax.set_xlabel("prompt tokens")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("SmolLM2-135M fp32, svdllm-w uniform ranks: ordinary (solid) vs latent (dashed) KV cache")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_probe(*argv: str) -> Any:
    proc = subprocess.run([sys.executable, __file__, *argv], capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ratios", default="0.2,0.4,0.6")
    parser.add_argument("--prompts", default="512,2048,8176", help="SmolLM2's context is 8192 tokens")
    parser.add_argument("--decode", type=int, default=16, help="greedy steps after the prompt (memory runs)")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds of --steps decode steps per cache")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--check-tokens", type=int, default=32)
    parser.add_argument("--work", default=str(Path.home() / ".cache" / "svdllm" / "bench-kv-cache"))
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument("--probe", nargs=4, metavar=("MODEL", "MODE", "PROMPT", "DECODE"), help=argparse.SUPPRESS)
    parser.add_argument("--speed-probe", nargs=4, metavar=("MODEL", "PROMPT", "ROUNDS", "STEPS"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.probe:
        spec, mode, prompt, decode = args.probe
        print(json.dumps(probe(spec, mode, int(prompt), int(decode))))
        return
    if args.speed_probe:
        spec, prompt, rounds, steps = args.speed_probe
        print(json.dumps(cache_decode_speed(spec, int(prompt), int(rounds), int(steps))))
        return

    work, out = Path(args.work), Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    models = {"dense": DENSE} | {f"{r}": str(compressed(work, float(r))) for r in args.ratios.split(",")}
    checks = {label: same_greedy(spec, args.check_tokens) for label, spec in models.items() if label != "dense"}
    rows = []
    for prompt in map(int, args.prompts.split(",")):
        for label, spec in models.items():
            for mode in ("ordinary",) if label == "dense" else ("ordinary", "latent"):
                rows.append({"label": label, **run_probe("--probe", spec, mode, str(prompt), str(args.decode))})
            if label != "dense":
                speed = run_probe("--speed-probe", spec, str(prompt), str(args.rounds), str(args.steps))
                for row in rows[-2:]:
                    row["decode_tok_s"] = speed
            print(f"{label} {prompt}: " + ", ".join(f"{r['mode']} {r['cache_bytes'] / 2**20:.1f} MiB cache, "
                                                   f"peak +{r['peak_over_loaded'] / 2**20:.0f} MiB"
                                                   for r in rows[-2:]), rows[-1].get("decode_tok_s"), flush=True)
    write_json(out / "results.json", {"checks": checks, "rows": rows, "torch": torch.__version__,
                                      "threads": torch.get_num_threads()})

    mib = lambda b: f"{b / 2**20:.1f}"  # noqa: E731
    table = []
    for r in rows:
        if r["mode"] != "latent":
            continue
        o = next(x for x in rows if (x["label"], x["prompt"], x["mode"]) == (r["label"], r["prompt"], "ordinary"))
        tok = r["decode_tok_s"]
        table.append([r["label"], r["prompt"], o["bytes_per_token"], r["bytes_per_token"],
                      f"{r['bytes_per_token'] / o['bytes_per_token']:.4f}", mib(o["cache_bytes"]), mib(r["cache_bytes"]),
                      f"{r['cache_bytes'] / o['cache_bytes']:.4f}", f"{o['peak_over_loaded'] / 2**20:.0f}",
                      f"{r['peak_over_loaded'] / 2**20:.0f}", f"{tok['ordinary']:.1f}", f"{tok['latent']:.1f}",
                      f"{tok['latent-rebuild']:.1f}", f"{tok['latent'] / tok['ordinary']:.2f}"])
    text = markdown_table(["ratio", "prompt", "bytes/token ordinary", "bytes/token latent", "formula latent/ordinary",
                           "cache MiB ordinary", "cache MiB latent", "measured latent/ordinary",
                           "peak MiB ordinary", "peak MiB latent", "decode tok/s ordinary", "latent",
                           "latent, V rebuilt", "latent / ordinary"], table)
    text += "\n" + markdown_table(["model", "prompt", "cache MiB", "peak MiB"],
                                  [[r["label"], r["prompt"], mib(r["cache_bytes"]), f"{r['peak_over_loaded'] / 2**20:.0f}"]
                                   for r in rows if r["label"] == "dense"])
    text += "\n" + markdown_table(
        ["ratio", "same greedy tokens", "max abs Δ logit", "same, V rebuilt", "max abs Δ logit, V rebuilt", "new tokens"],
        [[k, c["same_tokens"], f"{c['max_logit_diff']:.2e}", c["same_tokens_v_rebuilt"],
          f"{c['max_logit_diff_v_rebuilt']:.2e}", c["new_tokens"]] for k, c in checks.items()])
    (out / "table.md").write_text(text)
    plot(rows, out / "kv_cache.png")
    print(text)


if __name__ == "__main__":
    main()
