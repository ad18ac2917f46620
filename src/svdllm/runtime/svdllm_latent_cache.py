"""Latent KV cache for svdllm models: shipped only in folders of the families it supports.

A low-rank k_proj/v_proj is U·(V·x), so the cache can hold the rank-r latent V·x instead of the keys and values
(Palu, arXiv 2407.21118).  Keys are rebuilt as RoPE(k_norm(U·latent)) when attention reads them.  Values are
rebuilt as U·latent in multi-token steps; in decode steps attention reads the latents and v_proj's U is applied to
its output instead (an o_proj pre-hook).
"""
from __future__ import annotations

import inspect
from typing import Any, Callable

import torch
from torch import nn
from transformers.cache_utils import DynamicCache, DynamicLayer, DynamicSlidingWindowLayer

from .svdllm_lowrank import LowRankLinear, float_weight

# Attention that computes k = RoPE(norm?(k_proj(x))) with transformers' rotate-half RoPE and passes
# `position_embeddings` to the attention module: the LLaMA pattern.
LATENT_CACHE_FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text")


def latent_rank(proj: nn.Module) -> int | None:
    """The rank of a low-rank projection whose latent is smaller than its output, else None (cache it dense)."""
    return proj.rank if isinstance(proj, LowRankLinear) and proj.rank < proj.out_features else None


def _attention_layers(model: nn.Module) -> dict[int, nn.Module]:
    return {m.layer_idx: m for m in model.modules()
            if hasattr(m, "k_proj") and hasattr(m, "v_proj") and isinstance(getattr(m, "layer_idx", None), int)}


def latent_cache_unsupported(model: nn.Module) -> str | None:
    """Why ``model`` cannot use the latent cache, or None if it can."""
    family = model.config.get_text_config(decoder=True).model_type
    if family not in LATENT_CACHE_FAMILIES:
        return f"{family} attention is not supported (only {', '.join(LATENT_CACHE_FAMILIES)})"
    if not any(latent_rank(a.k_proj) or latent_rank(a.v_proj) for a in _attention_layers(model).values()):
        return "no k_proj or v_proj is low-rank with a rank below its output size"
    return None


class _Tap:
    """What one attention layer's latest forward produced: latents of its low-rank k/v and its RoPE (cos, sin);
    ``fold`` says that attention read value latents, so o_proj's input still needs v_proj's U."""

    k: torch.Tensor | None = None
    v: torch.Tensor | None = None
    rope: tuple[torch.Tensor, torch.Tensor] | None = None
    fold = False


def _unfold_values(attn: nn.Module, tap: _Tap) -> Callable[..., Any]:
    """o_proj pre-hook: when attention ran on value latents, its output per head is P·L (rank r); softmax rows sum
    to 1, so P·(L·Uᵀ + b) = (P·L)·Uᵀ + b gives the ordinary input, at h·r·d work instead of t·r·d to rebuild V."""
    u = attn.v_proj.svd_u

    def hook(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
        if not tap.fold:
            return None
        tap.fold = False
        x = args[0]
        heads_u = float_weight(u).view(-1, attn.head_dim, u.in_features)  # (kv heads, d, r)
        y = torch.einsum("bskgr,kdr->bskgd", x.view(*x.shape[:2], heads_u.shape[0], -1, u.in_features), heads_u)
        if u.bias is not None:
            y = y + u.bias.view(heads_u.shape[0], 1, attn.head_dim)
        return (y.reshape(*x.shape[:2], -1), *args[1:])
    return hook


def _taps(model: nn.Module) -> dict[int, _Tap]:
    """One tap per attention layer, fed by hooks installed once per model (they only keep references)."""
    if not hasattr(model, "_svdllm_taps"):
        taps = {}
        for idx, attn in _attention_layers(model).items():
            tap = taps[idx] = _Tap()
            attn.register_forward_pre_hook(
                lambda m, a, kw, tap=tap: setattr(tap, "rope", kw.get("position_embeddings")), with_kwargs=True)
            for kind in ("k", "v"):
                proj = getattr(attn, f"{kind}_proj")
                if latent_rank(proj):
                    proj.svd_v.register_forward_hook(lambda m, i, out, tap=tap, kind=kind: setattr(tap, kind, out))
            if latent_rank(attn.v_proj):
                attn.o_proj.register_forward_pre_hook(_unfold_values(attn, tap))
        model._svdllm_taps = taps
    return model._svdllm_taps


class _LatentLayer:
    """Mixed into a transformers cache layer: it stores latents (b, 1, t, r) where the parent stores keys or values,
    so the parent's growth, sliding window, crop and beam reorder apply unchanged; ``update`` rebuilds on read."""

    def __init__(self, attn: nn.Module, tap: _Tap, rope_store: Any, fold_values: bool, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.attn, self.tap, self.rope_store, self.fold_values = attn, tap, rope_store, fold_values
        self.latent_k, self.latent_v = latent_rank(attn.k_proj) is not None, latent_rank(attn.v_proj) is not None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
        tap, new = self.tap, key_states.shape[-2]
        seen = self.get_seq_length()
        keys, values = super().update(tap.k.unsqueeze(1) if self.latent_k else key_states,
                                      tap.v.unsqueeze(1) if self.latent_v else value_states, *args, **kwargs)
        cos, sin = self.rope_store.read(seen, tap.rope) if self.latent_k else (None, None)
        tap.k = tap.v = tap.rope = None  # the cache holds its own copy
        past = keys.shape[-2] - new  # the returned states end with this step's tokens: those are the given ones
        if past == 0:
            return key_states, value_states
        if self.latent_k:
            keys = self._keys(keys[:, 0, :past], cos[:, :, :past], sin[:, :, :past], key_states)
        if self.latent_v and self.fold_values and new == 1:
            # A decode step: attention reads the latents and o_proj's pre-hook applies U.  A multi-token step
            # rebuilds V: attention kernels take their fast path only when V's head size is Q's.
            values = values.expand(-1, value_states.shape[1], -1, -1)
            tap.fold = True
        elif self.latent_v:
            values = torch.cat([self._heads(self.attn.v_proj.svd_u(values[:, 0, :past])), value_states], dim=-2)
        return keys, values

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(*x.shape[:2], -1, self.attn.head_dim).transpose(1, 2)

    def _keys(self, latent: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
        """RoPE(k_norm(U·latent)) of the cached positions followed by this step's keys, written in place into one
        tensor (a third less time than ``k*cos + rotate_half(k)*sin`` and a cat, at 8k positions)."""
        k = self._heads(self.attn.k_proj.svd_u(latent))
        if getattr(self.attn, "k_norm", None) is not None:
            k = self.attn.k_norm(k)
        past, half = k.shape[-2], k.shape[-1] // 2
        if torch.is_grad_enabled():  # out= and in-place ops do not differentiate
            rotated = torch.cat((-k[..., half:], k[..., :half]), dim=-1)
            return torch.cat([k * cos + rotated * sin, new], dim=-2)
        out = new.new_empty(*new.shape[:2], past + new.shape[-2], new.shape[-1])
        rotated = out[:, :, :past]
        torch.mul(k, cos, out=rotated)
        rotated[..., :half].addcmul_(k[..., half:], sin[..., :half], value=-1)
        rotated[..., half:].addcmul_(k[..., :half], sin[..., half:])
        out[:, :, past:] = new
        return out


class _RopeStore:
    """The (cos, sin) of every cached position, once per kind of attention layer rather than once per layer; it is a
    cache layer of the same kind as those it serves, so it keeps exactly the positions they keep."""

    def __init__(self, layer: Any) -> None:
        self.layer, self.last = layer, None

    def read(self, seen: int, rope: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        if self.layer.get_seq_length() == seen:  # the first layer of this kind in this forward appends
            cos, sin = rope
            self.last = self.layer.update(cos.unsqueeze(1), sin.unsqueeze(1))
        return self.last


def _latent_class(parent: type) -> type:
    return type(f"Latent{parent.__name__}", (_LatentLayer, parent), {})


class LatentCache(DynamicCache):
    """A DynamicCache whose layers with a low-rank k_proj or v_proj keep the rank-r latents: pass it to
    ``generate(..., past_key_values=LatentCache(model))`` (``cache=`` from transformers 5)."""

    def __init__(self, model: nn.Module, fold_values: bool = True) -> None:
        super().__init__(config=model.config)
        taps, stores = _taps(model), {}
        for idx, attn, kind in _latent_slots(model, self.layers):
            layer_class, window = kind  # Gemma's local and global layers differ in RoPE as in window
            kwargs = {} if window is None else {"sliding_window": window}
            if kind not in stores:
                stores[kind] = _RopeStore(layer_class(**kwargs))
            self.layers[idx] = _latent_class(layer_class)(attn, taps[idx], stores[kind], fold_values, **kwargs)
        self.rope_stores = list(stores.values())


def _latent_slots(model: nn.Module, layers: list[Any]) -> list[tuple[int, nn.Module, tuple[type, int | None]]]:
    """(index, attention, kind) of each ordinary cache layer whose attention has a low-rank k or v, where kind is
    (layer class, sliding window or None); raises ValueError with the reason if the model cannot use the latent
    cache at all."""
    reason = latent_cache_unsupported(model)
    if reason:
        raise ValueError(f"latent cache: {reason}")
    attns, slots = _attention_layers(model), []
    for idx, layer in enumerate(layers):
        attn = attns.get(idx)
        if attn is None or type(layer) not in (DynamicLayer, DynamicSlidingWindowLayer):
            continue
        if latent_rank(attn.k_proj) or latent_rank(attn.v_proj):
            slots.append((idx, attn, (type(layer), getattr(layer, "sliding_window", None))))
    return slots


def cache_argument(model: nn.Module) -> str:
    """The name under which generate takes a cache: ``cache`` from transformers 5, ``past_key_values`` before."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _with_rope_stores(name: str) -> Callable[..., None]:
    def method(self: LatentCache, *args: Any) -> None:
        getattr(DynamicCache, name)(self, *args)
        for store in self.rope_stores:
            if hasattr(store.layer, name):
                getattr(store.layer, name)(*args)
    method.__name__ = name
    return method


for _name in ("reset", "reorder_cache", "crop", "batch_repeat_interleave", "batch_select_indices",
              "activate_past_recording"):
    setattr(LatentCache, _name, _with_rope_stores(_name))


def cache_bytes_per_token(model: nn.Module, latent: bool) -> int:
    """Bytes of KV cache one token adds (while no sliding window is full), in the model's dtype: Σ over layers of
    (rank or kv_heads·head_dim) for keys and for values, plus, with ``latent``, cos and sin (2·head_dim) once per
    kind of layer.  A LatentCache holds exactly this."""
    attns = _attention_layers(model).values()
    size = next(iter(attns)).v_proj.weight.dtype.itemsize
    if not latent:
        return size * sum(a.k_proj.out_features + a.v_proj.out_features for a in attns)
    kinds = {kind for _, _, kind in _latent_slots(model, DynamicCache(config=model.config).layers)}
    rope = 2 * next(iter(attns)).head_dim * len(kinds)
    return size * (rope + sum((latent_rank(a.k_proj) or a.k_proj.out_features)
                              + (latent_rank(a.v_proj) or a.v_proj.out_features) for a in attns))
