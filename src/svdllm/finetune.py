"""SVD-LLM's sequential low-rank update: LoRA on every Wu, merge, then LoRA on every Wv, merge (PEFT)."""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .evaluate import windows_perplexity
from .errors import DataError, OptionError
from .runtime import LowRankLinear, restore_rank_major

log = logging.getLogger("svdllm")
STAGE_TARGET = {"u": "svd_u", "v": "svd_v"}


@dataclass
class FinetuneConfig:
    data: str = "wiki-train"
    order: str = "u-first"  # the paper's text; its best table row used v-first
    lora_r: int = 8
    lora_alpha: int = 16
    lr: float = 2e-4
    steps: int = 50  # optimizer steps per stage
    batch_size: int = 4
    seqlen: int = 256
    seed: int = 0
    dtype: str | None = None  # None: float32 on CPU, bfloat16 on GPU
    val_tokens: int = 4096  # held out from the end of the training text
    keep_best: bool = False

    def validate(self) -> None:
        """Errors name the field as ``finetune.FIELD``."""
        if self.order not in ("u-first", "v-first"):
            raise OptionError("finetune.order", f"must be u-first or v-first, got {self.order!r}")
        if self.dtype == "float16":
            raise OptionError("finetune.dtype", "float16 training is not supported (it collapses); use bfloat16 or "
                              "float32")
        if self.dtype not in (None, "float32", "bfloat16"):
            raise OptionError("finetune.dtype", f"must be float32 or bfloat16, got {self.dtype!r}")
        for name in ("lora_r", "lora_alpha", "steps", "batch_size", "seqlen"):
            if getattr(self, name) < 1:
                raise OptionError(f"finetune.{name}", f"must be positive, got {getattr(self, name)}")
        if not self.lr > 0 or self.lr == float("inf"):  # also refuses nan
            raise OptionError("finetune.lr", f"must be a positive number, got {self.lr}")


@dataclass
class StageResult:
    stage: str
    losses: list[float]
    val_before: float
    val_after: float
    kept: bool


def _split(tokens: Tensor, cfg: FinetuneConfig) -> tuple[Tensor, Tensor]:
    val = min(cfg.val_tokens, tokens.numel() // 5)
    train, held = tokens[:-val], tokens[-val:]
    if train.numel() < cfg.seqlen + 1 or held.numel() < cfg.seqlen:
        raise DataError(f"fine-tuning text has {tokens.numel()} tokens: too short for windows of {cfg.seqlen}")
    return train, held


def factor_state(model: nn.Module, which: str) -> dict[str, Tensor]:
    """Copies of every svd_u or svd_v weight (and bias), keyed by parameter name."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if f".{STAGE_TARGET[which]}." in n}


def _stage(model: nn.Module, which: str, train: Tensor, cfg: FinetuneConfig, gen: torch.Generator,
           progress: bool) -> tuple[nn.Module, list[float]]:
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=0.0, bias="none",
                      target_modules=[STAGE_TARGET[which]])
    peft_model = get_peft_model(model, lora)
    params = [p for p in peft_model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(1, cfg.steps // 10)))
    device = next(model.parameters()).device
    losses: list[float] = []
    peft_model.train()
    bar = tqdm(range(cfg.steps), desc=f"LoRA on W{which}", disable=not progress)
    for _ in bar:
        starts = torch.randint(0, train.numel() - cfg.seqlen, (cfg.batch_size,), generator=gen)
        batch = torch.stack([train[s : s + cfg.seqlen] for s in starts.tolist()]).to(device)
        loss = peft_model(input_ids=batch, labels=batch, use_cache=False).loss
        if not torch.isfinite(loss):
            raise DataError(f"non-finite training loss at step {len(losses)} of stage W{which}; lower the learning "
                            "rate (finetune.lr)")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        bar.set_postfix(loss=f"{sum(losses[-10:]) / len(losses[-10:]):.3f}")
    peft_model.eval()
    return restore_rank_major(peft_model.merge_and_unload()), losses  # a merge may hand back a row-major U


def training_bytes(model: nn.Module, tokens: int, dtype: torch.dtype) -> int:
    """A rough count of what a training step keeps for backward, for ``tokens`` tokens a batch: the float32 logits
    three times over (logits, log-softmax, their gradient) and per block about 34·hidden + 4·intermediate values a
    token (Korthikanti et al. 2022, without attention scores: SDPA does not keep them)."""
    config = model.config.get_text_config()
    hidden = getattr(config, "hidden_size", 0) or getattr(config, "n_embd", 0)
    inner = getattr(config, "intermediate_size", 0) or getattr(config, "ffn_dim", 0) or 4 * hidden
    layers = getattr(config, "num_hidden_layers", 0) or getattr(config, "n_layer", 0)
    per_token = 12 * config.vocab_size + layers * (34 * hidden + 4 * inner) * torch.finfo(dtype).bits // 8
    return tokens * per_token


def _check_fits(model: nn.Module, cfg: FinetuneConfig, device: torch.device, dtype: torch.dtype) -> None:
    """Refuse, before any work, windows past the model's positions and batches whose activations cannot fit."""
    from .source import memory_available

    limit = getattr(model.config.get_text_config(), "max_position_embeddings", None)
    if limit and cfg.seqlen > limit:
        raise OptionError("finetune.seqlen", f"windows of {cfg.seqlen} tokens exceed the model's {limit} positions")
    need = training_bytes(model, cfg.batch_size * cfg.seqlen, dtype)
    free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else memory_available()
    if need > free:
        raise OptionError("finetune.batch_size", f"{cfg.batch_size} windows of {cfg.seqlen} tokens need about "
                          f"{need / 2**30:.1f} GiB of activations, {free / 2**30:.1f} GiB is free: lower it or "
                          "`finetune.seqlen`")


def finetune(model: nn.Module, tokenizer: Any, cfg: FinetuneConfig, tokens: Tensor | None = None,
             progress: bool = True) -> tuple[nn.Module, list[StageResult]]:
    """Run both LoRA stages on a compressed model; returns the merged model (same ranks) and per-stage results
    (``record_part`` turns them into the saved record's ``finetune`` part)."""
    cfg.validate()
    if not any(isinstance(m, LowRankLinear) for m in model.modules()):
        raise DataError("the model has no low-rank layers: compress it first")
    device = next(model.parameters()).device
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}.get(cfg.dtype or "") or (
        torch.bfloat16 if device.type == "cuda" else torch.float32)
    _check_fits(model, cfg, device, dtype)
    model.to(dtype)
    from .data import bos_token, eval_windows, load_text, tokenize

    tokens = tokenize(tokenizer, load_text(cfg.data)) if tokens is None else tokens
    train, held = _split(tokens, cfg)
    held_windows = eval_windows(held, cfg.seqlen, None, bos_token(tokenizer, model.config) if tokenizer is not None else None)
    gen = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    val = lambda m: windows_perplexity(m, held_windows).perplexity  # noqa: E731
    results: list[StageResult] = []
    for which in ("u", "v") if cfg.order == "u-first" else ("v", "u"):
        before = val(model)
        saved = factor_state(model, which)
        model, losses = _stage(model, which, train, cfg, gen, progress)
        after = val(model)
        kept = True
        if after > before:
            log.warning("!! LoRA on W%s made validation perplexity WORSE: %.3f -> %.3f%s", which, before, after,
                        " (reverting: keep_best)" if cfg.keep_best else "")
            if cfg.keep_best:
                with torch.no_grad():
                    for n, p in model.named_parameters():
                        if n in saved:
                            p.copy_(saved[n])
                after, kept = before, False
        results.append(StageResult(f"W{which}", losses, before, after, kept))
    for p in model.parameters():
        p.requires_grad_(True)
    return model, results


def record_part(cfg: FinetuneConfig, results: list[StageResult]) -> dict[str, Any]:
    """The saved record's ``finetune``: the options and each stage's validation perplexities."""
    return dict(asdict(cfg), stages=[{k: v for k, v in asdict(r).items() if k != "losses"} for r in results])


def plot_losses(results: list[StageResult], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    offset = 0
    for r in results:
        ax.plot(range(offset, offset + len(r.losses)), r.losses, label=f"LoRA on {r.stage}")
        offset += len(r.losses)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


__all__ = ["FinetuneConfig", "StageResult", "finetune", "plot_losses", "record_part"]
