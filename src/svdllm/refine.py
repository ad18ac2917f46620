"""Block refinement: a factorised block's low-rank factors fitted jointly, by Adam, to the dense block's output.

The closed forms fit each matrix with the others fixed; a block's matrices act together through attention's
softmax, RoPE and the MLP's gate, which no per-matrix closed form sees.  Here, inside the block loop, after block i
is factorised: the inputs are the compressed stream (what the compressed and refined blocks before it give), the
targets the dense block's outputs on the dense stream, the loss the mean squared error of the block's output, and
the trainable parameters the block's ``svd_u`` / ``svd_v`` weights only (biases and norms stay as the dense model
has them).  The last calibration windows are held out: a block keeps its refined factors only where their held-out
error is below the closed form's, at the best of the evaluations made; everything is fixed before any text is read.

Steps walk the training windows in their global order, ``windows_per_step`` at a time, so that a step sees the
same windows in memory, streamed, and under torchrun (each process adds the gradient of the windows it holds and the
gradients are summed): the factors are those of one process, up to the order of sums.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from . import distributed
from .calibration import COMPRESSED, NEXT, ActivationStream, block_device
from .errors import OptionError
from .runtime import LowRankLinear


@dataclass
class RefineOptions:
    """Block refinement; ``steps`` 0 leaves the closed-form factors as they are."""

    steps: int = 0  # Adam steps per block
    lr: float = 1e-3  # chosen on held-out calibration windows (benchmarks/results/refine-schedule*)
    windows_per_step: int = 4
    holdout: float = 0.125  # share of the calibration windows (the last ones) held out to choose and stop on
    eval_every: int = 8  # steps between held-out evaluations (and after the last step)
    patience: int = 2  # evaluations without a new best before the block stops

    def validate(self) -> None:
        if not isinstance(self.steps, int) or self.steps < 0:
            raise OptionError("refine.steps", f"must be a non-negative integer, got {self.steps!r}")
        for name in ("windows_per_step", "eval_every", "patience"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise OptionError(f"refine.{name}", f"must be a positive integer, got {getattr(self, name)!r}")
        for name, high in (("lr", 1.0), ("holdout", 0.5)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= high:
                raise OptionError(f"refine.{name}", f"must be in (0, {high:g}], got {value!r}")

    @property
    def active(self) -> bool:
        return self.steps > 0

    def split(self, n_windows: int) -> tuple[int, int]:
        """(training windows, held-out windows) of ``n_windows``: the held-out ones are the last."""
        held = max(1, round(n_windows * self.holdout))
        if n_windows - held < 1:
            raise OptionError("refine.holdout", f"leaves no calibration window to train on out of {n_windows}: "
                              "give at least 2 windows")
        return n_windows - held, held


class _Rows:
    """Where each global calibration window lies in this process's stream: (batch, row) per window index."""

    def __init__(self, n_windows: int, batch: int) -> None:
        local = distributed.shard(torch.arange(n_windows)).tolist()
        self.where = {g: (pos // batch, pos % batch) for pos, g in enumerate(local)}

    def batches(self, windows: list[int]) -> dict[int, list[int]]:
        """Batch → its rows among ``windows`` (those this process holds)."""
        out: dict[int, list[int]] = {}
        for g in windows:
            if g in self.where:
                j, row = self.where[g]
                out.setdefault(j, []).append(row)
        return out


def _factors(block: nn.Module) -> list[nn.Parameter]:
    return [p for m in block.modules() if isinstance(m, LowRankLinear) for p in (m.svd_u.weight, m.svd_v.weight)]


def refine_block(block: nn.Module, i: int, stream: ActivationStream, n_windows: int, batch: int,
                 opts: RefineOptions, progress: bool = False) -> dict[str, Any]:
    """Refine block ``i``'s factors in place (or leave them) and return its record.  ``stream`` holds the block's
    inputs in its compressed lane and the dense block's outputs in ``NEXT``."""
    params = _factors(block)
    record: dict[str, Any] = {"block": i, "steps": 0}
    if not params:
        return record
    train_n, held_n = opts.split(n_windows)
    rows = _Rows(n_windows, batch)
    held = rows.batches(list(range(train_n, n_windows)))
    device = block_device(block)
    dtype = params[0].dtype
    amp = dtype != torch.float32  # fp32 master factors, the block's own dtype in its matmuls
    others = {p: p.requires_grad for p in block.parameters()}
    for p in block.parameters():
        p.requires_grad_(False)
    for p in params:
        p.data = p.data.float()
        p.requires_grad_(True)
    closed_form = [p.detach().clone() for p in params]  # float32, the state kept unless a step beats it

    def error(batches: dict[int, list[int]], count: int, train: bool) -> float:
        """Mean squared error of the block's output over the windows named (summed over processes); with
        ``train`` its gradient is added to the factors'."""
        total = torch.zeros((), dtype=torch.float64, device=device)
        for j, idx in sorted(batches.items()):
            with torch.autocast(device.type, dtype=dtype, enabled=amp), torch.set_grad_enabled(train):
                out = stream.run_block(block, i, j, stream.hidden(COMPRESSED, j, device))
                target = stream.hidden(NEXT, j, device)
                rows_ = torch.tensor(idx, device=device)
                sq = (out.index_select(0, rows_).float() - target.index_select(0, rows_).float()).pow(2).sum()
                if train:
                    (sq / count).backward()
            total += sq.detach().double()
        distributed.all_reduce_([total])
        return float(total) / count

    target_shape = stream.hidden(NEXT, 0, device).shape
    per_window = math.prod(target_shape[1:])
    held_count = held_n * per_window
    best = error(held, held_count, train=False)
    record.update(heldout_before=best, heldout_after=best, outcome="closed form kept")
    best_state = closed_form
    optimizer = torch.optim.Adam(params, lr=opts.lr)
    stale, step = 0, 0
    bar = tqdm(total=opts.steps, desc=f"refine block {i}", unit="step", leave=False,
               disable=not progress or not distributed.is_writer())
    try:
        for step in range(1, opts.steps + 1):
            first = (step - 1) * opts.windows_per_step
            windows = [(first + w) % train_n for w in range(min(opts.windows_per_step, train_n))]
            for p in params:
                p.grad = torch.zeros_like(p)  # every process sums a gradient, the idle ones a zero
            loss = error(rows.batches(windows), len(windows) * per_window, train=True)
            distributed.all_reduce_([p.grad for p in params])  # type: ignore[misc]
            if not math.isfinite(loss) or not all(torch.isfinite(p.grad).all() for p in params):  # type: ignore[arg-type]
                record["outcome"] = f"stopped at step {step}: the loss is not finite; closed form kept"
                best_state, best = closed_form, record["heldout_before"]
                break
            optimizer.step()
            record["steps"] = step
            bar.update()
            if step % opts.eval_every and step != opts.steps:
                continue
            now = error(held, held_count, train=False)
            if now < best:
                best, best_state, stale = now, [p.detach().clone() for p in params], 0
                record.update(heldout_after=now, outcome=f"refined (best at step {step})")
            else:
                stale += 1
                if stale >= opts.patience:
                    break
    finally:
        bar.close()
        with torch.no_grad():
            for p, keep in zip(params, best_state):
                p.grad = None
                p.data = keep.to(dtype)
        for p, flag in others.items():
            p.requires_grad_(flag)
    return record

