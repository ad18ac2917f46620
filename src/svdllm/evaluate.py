"""Perplexity over non-overlapping windows; a non-finite window is an error, never dropped.

``evaluate_perplexity`` runs a whole model.  ``stream_perplexity`` finishes
windows whose last hidden states an ``ActivationStream`` carried block by block
(the model's blocks need not be in memory): the model's own head (final norm,
lm_head, soft-capping) runs on them, a few positions at a time.
"""
from __future__ import annotations

import math
from contextlib import closing, contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from . import distributed
from .architecture import check_positions, position_limit  # noqa: F401  (check_positions: callers import it here)
from .calibration import ActivationStream
from .data import eval_windows
from .errors import DataError


class NonFiniteLossError(DataError):
    """A window whose loss is inf or nan: named, never dropped."""


@dataclass
class PerplexityResult:
    perplexity: float
    nll: float  # mean negative log-likelihood per predicted token
    tokens: int  # predicted tokens
    windows: int


class NLLSum:
    """Sums next-token NLL over windows; refuses a non-finite window, naming it."""

    def __init__(self, seqlen: int) -> None:
        self.seqlen, self.total, self.count, self.windows = seqlen, 0.0, 0, 0

    def add(self, logits: Tensor, targets: Tensor, first_window: int) -> None:
        """``logits`` (B, T, V) predict ``targets`` (B, T) of windows first_window … first_window+B−1."""
        nll = nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                          reduction="none").view(targets.shape)
        per_window = nll.sum(1)
        bad = (~torch.isfinite(per_window)).nonzero().flatten().tolist()
        if bad:
            w = first_window + bad[0]
            raise NonFiniteLossError(
                f"non-finite loss in evaluation window {w} (tokens {w * self.seqlen}–{(w + 1) * self.seqlen - 1}); "
                "the model produces inf/nan there"
            )
        self.total += float(per_window.double().sum())
        self.count += nll.numel()

    def result(self) -> PerplexityResult:
        mean = self.total / max(self.count, 1)
        return PerplexityResult(math.exp(mean), mean, self.count, self.windows)


def all_reduce_result(res: PerplexityResult) -> PerplexityResult:
    """The perplexity over every rank's windows, from each rank's own (identity in one process)."""
    if not distributed.active():
        return res
    sums = torch.tensor([res.nll * res.tokens, res.tokens, res.windows], dtype=torch.float64)
    distributed.all_reduce_([sums])
    total, tokens, windows = sums.tolist()
    return PerplexityResult(math.exp(total / max(tokens, 1)), total / max(tokens, 1), int(tokens), int(windows))


@torch.no_grad()
def evaluate_perplexity(
    model: nn.Module,
    tokenizer: Any = None,
    data: str | Tensor = "wiki-test",
    seqlen: int = 512,
    max_tokens: int | None = 16384,
    batch_size: int = 4,
    progress: bool = False,
    bos: int | None | str = "auto",
) -> PerplexityResult:
    """Perplexity of ``model`` on ``data`` (a DATA spec or 1-D token ids), windows of ``seqlen`` tokens.

    Windows do not overlap and the last partial window is dropped (every window
    has the same context length); at most ``max_tokens`` tokens are read.  Each
    window starts with ``bos`` ("auto": where the tokenizer or the model's family
    needs one, as compress decides; the BOS itself is never a target).
    """
    from .data import bos_token, load_text, tokenize

    check_positions(model, seqlen)
    tokens = data if isinstance(data, Tensor) else tokenize(tokenizer, load_text(data))
    if bos == "auto":
        bos = bos_token(tokenizer, model.config) if tokenizer is not None else None
    return windows_perplexity(model, eval_windows(tokens, seqlen, max_tokens, bos), batch_size,  # type: ignore[arg-type]
                              progress)


def windows_perplexity(model: nn.Module, windows: Tensor, batch_size: int = 4, progress: bool = False
                       ) -> PerplexityResult:
    """Perplexity of ``model`` on windows already cut (windows × seqlen token ids)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    acc = NLLSum(windows.shape[1])
    try:
        for first in tqdm(range(0, len(windows), batch_size), desc="perplexity", disable=not progress):
            batch = windows[first : first + batch_size].to(device)
            acc.add(model(input_ids=batch, use_cache=False).logits[:, :-1], batch[:, 1:], first)
    finally:
        model.train(was_training)
    acc.windows = len(windows)
    return acc.result()


@contextmanager
def _replaying(blocks: nn.ModuleList, tuple_output: bool) -> Iterator[list[Tensor]]:
    """While active every block returns ``slot[0]`` whatever its input: the model runs as its head alone."""
    slot: list[Tensor] = []

    def replay(*_: Any, **__: Any) -> Any:
        return (slot[0],) if tuple_output else slot[0]

    for block in blocks:
        block.forward = replay
    try:
        yield slot
    finally:
        for block in blocks:
            del block.forward


@torch.no_grad()
def stream_perplexity(model: nn.Module, blocks: nn.ModuleList, stream: ActivationStream, lane: str,
                      windows: Tensor, batch_size: int, device: torch.device,
                      logits_budget: int = 1 << 21) -> PerplexityResult:
    """Perplexity of ``windows`` from the last hidden states of ``lane``; each head call makes at most
    ``logits_budget`` logits (8 MB in float32), so the head never dominates the memory of a streamed run."""
    acc = NLLSum(windows.shape[1])
    for j in range(len(stream)):
        batch = windows[j * batch_size : (j + 1) * batch_size].to(device)
        with closing(head_logits(model, blocks, stream.tuple_output, stream.hidden(lane, j, device), batch, batch_size,
                                 logits_budget)) as chunks:  # closed on an error too: the blocks get their forward back
            for logits, targets in chunks:
                acc.add(logits, targets, j * batch_size)
    acc.windows = len(windows)
    return acc.result()


def head_logits(model: nn.Module, blocks: nn.ModuleList, tuple_output: bool, hidden: Tensor, ids: Tensor, rows: int,
                logits_budget: int = 1 << 21) -> Iterator[tuple[Tensor, Tensor]]:
    """The model's own head (final norm, lm_head, soft-capping) on ``hidden``, the last block's output for ``ids``, a
    few positions at a time: (logits, the next tokens they predict) with at most ``logits_budget`` logits for
    ``rows`` windows at once (8 MB in float32).  Autograd follows the caller's grad mode; close the generator
    (``contextlib.closing``) so that the blocks get their own forward back even when the caller stops early."""
    vocab = model.get_output_embeddings().weight.shape[0]
    chunk, count = max(1, logits_budget // (rows * vocab)), ids.shape[1] - 1
    with _replaying(blocks, tuple_output) as slot:
        for a in range(0, count, chunk):
            b = min(a + chunk, count)
            slot[:] = [hidden[:, a:b]]
            yield model(input_ids=ids[:, a:b], use_cache=False).logits, ids[:, a + 1 : b + 1]


def window_perplexities(model: nn.Module, windows: dict[str, Tensor], progress: bool = True) -> dict[str, float]:
    """Perplexity on evaluation windows already cut (name → windows × seqlen token ids; whoever cut them checked
    their length against the model's positions), as compress reports it."""
    return {name: windows_perplexity(model, w, progress=progress).perplexity for name, w in windows.items()}
