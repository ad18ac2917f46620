"""Calibration: sample token windows, capture block inputs, record linear inputs, Fisher rows."""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
from torch import Tensor, nn

from .methods import LayerStats


def sample_windows(tokens: Tensor, nsamples: int, seqlen: int, seed: int) -> Tensor:
    """``nsamples`` random windows of ``seqlen`` tokens, reproducible from ``seed``."""
    if tokens.numel() < seqlen + 1:
        raise ValueError(
            f"calibration text has {tokens.numel()} tokens, shorter than one window of {seqlen}; "
            "give more text or a smaller --seqlen"
        )
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, tokens.numel() - seqlen, (nsamples,), generator=gen)
    return torch.stack([tokens[s : s + seqlen] for s in starts.tolist()])


class _Stop(Exception):
    pass


@dataclass
class BlockCall:
    """One batch at a decoder block's door: hidden states plus whatever else the model passed."""

    hidden: Tensor
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)


def _to(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, Tensor):
        return obj.to(device)
    if isinstance(obj, (tuple, list)):
        return type(obj)(_to(o, device) for o in obj)
    return obj


@torch.no_grad()
def capture_block_inputs(
    model: nn.Module, first_block: nn.Module, samples: Tensor, batch_size: int, store: torch.device
) -> list[BlockCall]:
    """Run the model up to its first block for each batch and keep what the block receives."""
    device = next(model.parameters()).device
    calls: list[BlockCall] = []

    def grab(_: nn.Module, args: tuple, kwargs: dict) -> None:
        kwargs = {k: v for k, v in kwargs.items() if k not in ("past_key_value", "past_key_values")}
        if args:
            hidden, rest = args[0], args[1:]
        else:
            hidden, rest = kwargs.pop("hidden_states"), ()
        calls.append(BlockCall(hidden.detach().to(store), _to(rest, store), _to(kwargs, store)))
        raise _Stop

    handle = first_block.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        for batch in samples.split(batch_size):
            try:
                model(input_ids=batch.to(device), use_cache=False)
            except _Stop:
                pass
    finally:
        handle.remove()
    return calls


@torch.no_grad()
def run_block(block: nn.Module, call: BlockCall, hidden: Tensor | None = None) -> Tensor:
    """The block's output hidden states for ``call`` (optionally with other input hidden states)."""
    device = next(block.parameters()).device
    h = (call.hidden if hidden is None else hidden).to(device)
    out = block(h, *_to(call.args, device), **_to(call.kwargs, device))
    return out[0] if isinstance(out, (tuple, list)) else out


@contextmanager
def recorded_inputs(linears: dict[str, nn.Module]) -> Iterator[dict[str, Tensor]]:
    """While active, maps each linear's name to its last input (as given, not copied)."""
    seen: dict[str, Tensor] = {}
    handles = [
        m.register_forward_pre_hook(lambda _m, args, name=name: seen.__setitem__(name, args[0]))
        for name, m in linears.items()
    ]
    try:
        yield seen
    finally:
        for h in handles:
            h.remove()


def shared_input_groups(inputs: dict[str, Tensor]) -> list[list[str]]:
    """Linears that read the very same tensor (q/k/v, gate/up) share one Gram."""
    groups: dict[tuple, list[str]] = {}
    for name, x in inputs.items():
        groups.setdefault((x.data_ptr(), tuple(x.shape)), []).append(name)
    return list(groups.values())


class GramAccumulator:
    """Sums the statistics a method needs for each group of linears sharing an input.

    Per-batch products run in float32 (fast BLAS) and are summed in float64, so
    rounding does not grow with the number of calibration tokens.
    """

    def __init__(self, needs: frozenset[str], device: torch.device) -> None:
        self.needs, self.device = needs, device
        self.groups: list[list[str]] | None = None
        self.stats: dict[str, LayerStats] = {}

    def _add(self, st: LayerStats, attr: str, value: Tensor) -> None:
        cur = getattr(st, attr)
        value = value.to(self.device, torch.float64)
        setattr(st, attr, value if cur is None else cur.add_(value))

    def add(self, dense: dict[str, Tensor], comp: dict[str, Tensor] | None) -> None:
        if self.groups is None:
            self.groups = shared_input_groups(dense)
        for group in self.groups:
            st = self.stats.setdefault(group[0], LayerStats())
            x = dense[group[0]].reshape(-1, dense[group[0]].shape[-1]).float()
            st.tokens += x.shape[0]
            if "gram" in self.needs:
                self._add(st, "gram", x.T @ x)
            if "abs" in self.needs:
                self._add(st, "abs_sum", x.abs().sum(0))
            if comp is not None:
                xc = comp[group[0]].reshape(-1, x.shape[-1]).float()
                self._add(st, "comp_gram", xc.T @ xc)
                if "cross" in self.needs:
                    self._add(st, "cross", x.T @ xc)

    def for_linear(self, name: str) -> LayerStats:
        assert self.groups is not None
        for group in self.groups:
            if name in group:
                return self.stats[group[0]]
        raise KeyError(name)


def fisher_rows(model: nn.Module, samples: Tensor, linears: dict[str, nn.Module]) -> dict[str, Tensor]:
    """FWSVD's row importance: Σ over windows of the squared LM-loss gradient, summed per output row.

    One window per backward pass, so memory is one forward/backward of the model.
    """
    device = next(model.parameters()).device
    params = {name: m.weight for name, m in linears.items()}
    fisher = {name: torch.zeros(p.shape[1] if type(linears[name]).__name__ == "Conv1D" else p.shape[0],
                                dtype=torch.float64) for name, p in params.items()}
    was_training = model.training
    model.eval()
    req = {n: p.requires_grad for n, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params.values():
        p.requires_grad_(True)
    try:
        for window in samples:
            model.zero_grad(set_to_none=True)
            ids = window[None].to(device)
            model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
            for name, p in params.items():
                g2 = p.grad.detach().double() ** 2
                fisher[name] += (g2.sum(0) if type(linears[name]).__name__ == "Conv1D" else g2.sum(1)).cpu()
    finally:
        model.zero_grad(set_to_none=True)
        for n, p in model.named_parameters():
            p.requires_grad_(req[n])
        model.train(was_training)
    return fisher
