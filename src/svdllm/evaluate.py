"""Perplexity over non-overlapping windows; a non-finite window is an error, never dropped."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm


class NonFiniteLossError(RuntimeError):
    pass


@dataclass
class PerplexityResult:
    perplexity: float
    nll: float  # mean negative log-likelihood per predicted token
    tokens: int  # predicted tokens
    windows: int


@torch.no_grad()
def evaluate_perplexity(
    model: nn.Module,
    tokenizer: Any = None,
    data: str | Tensor = "wiki-test",
    seqlen: int = 512,
    max_tokens: int | None = 16384,
    batch_size: int = 4,
    progress: bool = False,
) -> PerplexityResult:
    """Perplexity of ``model`` on ``data`` (a DATA spec or 1-D token ids), windows of ``seqlen`` tokens.

    Windows do not overlap and the last partial window is dropped (every window
    has the same context length); at most ``max_tokens`` tokens are read.
    """
    if isinstance(data, Tensor):
        tokens = data
    else:
        from .data import load_text, tokenize

        tokens = tokenize(tokenizer, load_text(data))
    if max_tokens:
        tokens = tokens[:max_tokens]
    n_windows = tokens.numel() // seqlen
    if n_windows == 0:
        raise ValueError(f"evaluation text has {tokens.numel()} tokens, shorter than one window of {seqlen}")
    windows = tokens[: n_windows * seqlen].view(n_windows, seqlen)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    bar = tqdm(total=n_windows, desc="perplexity", disable=not progress, unit="win")
    try:
        for first in range(0, n_windows, batch_size):
            batch = windows[first : first + batch_size].to(device)
            logits = model(input_ids=batch, use_cache=False).logits[:, :-1].float()
            nll = nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="none"
            ).view(batch.shape[0], -1)
            per_window = nll.sum(1)
            bad = (~torch.isfinite(per_window)).nonzero().flatten().tolist()
            if bad:
                w = first + bad[0]
                raise NonFiniteLossError(
                    f"non-finite loss in evaluation window {w} (tokens {w * seqlen}–{(w + 1) * seqlen - 1}); "
                    "the model produces inf/nan there"
                )
            total += float(per_window.double().sum())
            count += nll.numel()
            bar.update(batch.shape[0])
    finally:
        bar.close()
        model.train(was_training)
    mean = total / count
    return PerplexityResult(math.exp(mean), mean, count, n_windows)
