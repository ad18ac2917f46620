"""Low-rank layers for svdllm models.

This file is self-contained (torch and transformers only): `svdllm.save` copies
it into every saved model folder so that plain transformers can load the model
with ``trust_remote_code=True`` and no svdllm installed.
"""
from __future__ import annotations

import inspect
import json
import logging
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn
from transformers.cache_utils import DynamicCache, DynamicLayer, DynamicSlidingWindowLayer

logger = logging.getLogger(__name__)


def rank_major(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` (out, rank) with the same values, stored rank-major: ``.t()`` is contiguous.

    nn.Linear computes x·Uᵀ.  With U stored (out, rank) the decode GEMV walks
    rows only ``rank`` long; stored rank-major, Uᵀ is a plain row-major matrix
    with rows ``out`` long.  On a CPU this made batch-1 decode 1.07–1.17× faster
    (benchmarks/results/layout).
    """
    return weight.t().contiguous().t()


class LowRankLinear(nn.Module):
    """y = U (V x) + b with V: in→rank and U: rank→out, both ordinary nn.Linear.

    U is kept rank-major in memory (see ``rank_major``); V keeps nn.Linear's
    layout, whose rows (length ``in``) are already the long side.
    """

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True) -> None:
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.svd_v = nn.Linear(in_features, rank, bias=False)
        self.svd_u = nn.Linear(rank, out_features, bias=bias)
        self.use_rank_major()

    def use_rank_major(self) -> None:
        """Restore U's rank-major storage (a load or a merge may hand back a row-major tensor)."""
        w = self.svd_u.weight
        if type(w.data) is torch.Tensor and not w.t().is_contiguous():  # quantized factors keep their own layout
            w.data = rank_major(w.data)

    @classmethod
    def from_factors(cls, module: nn.Module, u: torch.Tensor, v: torch.Tensor) -> "LowRankLinear":
        """u·v·x + b with the bias of ``module`` (nn.Linear or Conv1D), in its dtype and on its device."""
        bias = getattr(module, "bias", None)
        out = cls(v.shape[1], u.shape[0], u.shape[1], bias=bias is not None)
        out.to(device=module.weight.device, dtype=module.weight.dtype)
        with torch.no_grad():
            out.svd_u.weight.copy_(u)
            out.svd_v.weight.copy_(v)
            if bias is not None:
                out.svd_u.bias.copy_(bias)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.svd_u(self.svd_v(x))

    @property
    def weight(self) -> torch.Tensor:  # some model code reads .weight.dtype/.device
        return self.svd_u.weight

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


def restore_rank_major(model: nn.Module) -> nn.Module:
    """``use_rank_major`` on every LowRankLinear of ``model`` (after a load or a LoRA merge)."""
    for module in model.modules():
        if isinstance(module, LowRankLinear):
            module.use_rank_major()
    return model


def replace_module(root: nn.Module, name: str, new: nn.Module) -> nn.Module:
    """Put ``new`` at the dotted path ``name`` under ``root``; returns the module it replaced."""
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    old = getattr(parent, child)
    setattr(parent, child, new)
    return old


@contextmanager
def swapped(root: nn.Module, modules: dict[str, nn.Module]) -> Iterator[None]:
    """While active, ``modules`` sit at their dotted paths under ``root``; the replaced ones come back after."""
    old = {name: replace_module(root, name, m) for name, m in modules.items()}
    try:
        yield
    finally:
        for name, m in old.items():
            replace_module(root, name, m)


def apply_ranks(model: nn.Module, ranks: dict[str, int]) -> nn.Module:
    """Replace each named linear (nn.Linear or GPT-2 Conv1D) by an empty LowRankLinear of the given rank."""
    for name, rank in ranks.items():
        old = model.get_submodule(name)
        if isinstance(old, nn.Linear):
            n_in, n_out = old.in_features, old.out_features
        else:  # Conv1D keeps its weight as (in, out)
            n_in, n_out = old.weight.shape
        new = LowRankLinear(n_in, n_out, int(rank), bias=getattr(old, "bias", None) is not None)
        replace_module(model, name, new.to(device=old.weight.device, dtype=old.weight.dtype))
    return model


def svdllm_class(base: type) -> type:
    """A subclass of a transformers model class that builds its low-rank layers from config.svdllm."""

    class SVDLLMForCausalLM(base):  # type: ignore[misc, valid-type]
        def __init__(self, config, *args, **kwargs) -> None:
            super().__init__(config, *args, **kwargs)
            section = getattr(config, "svdllm", None) or {}
            apply_ranks(self, section.get("ranks", {}))

        @classmethod
        def from_pretrained(cls, path, *args, output_loading_info: bool = False, **kwargs):  # type: ignore[no-untyped-def]
            """Strict: every tensor of the model from the shards and every tensor of the shards used, else an error
            (a dropped or edited rank would otherwise leave a randomly initialised layer).  Quantized factors load
            through ``load_quantized``."""
            config = kwargs.get("config")
            if not hasattr(config, "svdllm"):
                config = cls.config_class.from_pretrained(path)
            quantization = (getattr(config, "svdllm", None) or {}).get("quantization")
            if quantization:
                model = load_quantized(cls, path, config, quantization, kwargs.get("dtype"))
                device_map = kwargs.get("device_map")
                if isinstance(device_map, (str, torch.device)):
                    model.to(device_map)
                elif device_map is not None:
                    raise ValueError("models with quantized factors take one device, not a device map")
                return (model, {}) if output_loading_info else model
            model, info = super().from_pretrained(path, *args, output_loading_info=True, **kwargs)
            for kind in ("missing_keys", "unexpected_keys", "mismatched_keys"):
                found = sorted(info.get(kind) or [])
                if found:
                    name = found[0][0] if isinstance(found[0], tuple) else found[0]
                    raise ValueError(f"the weights do not match config.json's svdllm ranks: "
                                     f"{kind.replace('_', ' ')[:-1]} {name} ({len(found)} in all)")
            restore_rank_major(model)
            return (model, info) if output_loading_info else model

        latent_cache_default = False  # svdllm.load(..., latent_cache=True) sets it

        def generate(self, *args, latent_cache: bool | None = None, **kwargs):  # type: ignore[no-untyped-def]
            """transformers' generate; with ``latent_cache=True`` and no cache passed, the KV cache keeps the rank-r
            latents of the low-rank k_proj/v_proj (``LatentCache``), or says why not and keeps the ordinary one."""
            wanted = self.latent_cache_default if latent_cache is None else latent_cache
            if wanted and all(kwargs.get(n) is None for n in ("cache", "past_key_values")):
                try:
                    kwargs[cache_argument(self)] = LatentCache(self)
                except ValueError as exc:  # the reason, in one line
                    logger.warning("%s; using the ordinary cache", exc)
            return super().generate(*args, **kwargs)

    SVDLLMForCausalLM.__name__ = SVDLLMForCausalLM.__qualname__ = "SVDLLMForCausalLM"
    return SVDLLMForCausalLM


# ---------------------------------------------------------------------------------------------------------------
# Quantized factors: config.svdllm["quantization"]["modules"] maps linear names to optimum-quanto weight types and
# group sizes; the shards hold quanto's own flattened tensors (int8 data, or int4 packed two per byte, with scales
# and shifts).  Loading rebuilds those modules with quanto and reads the shards strictly.
# ---------------------------------------------------------------------------------------------------------------

def float_weight(linear: nn.Module) -> torch.Tensor:
    """The float weight of a linear, dequantized if quanto quantized it."""
    w = linear.weight
    return w.dequantize() if type(w.data) is not torch.Tensor else w


def _guard_int8_cpu_kernel() -> None:
    """quanto sends bfloat16 inputs of width divisible by 4 to torch's CPU kernel ``_weight_int8pack_mm``, which kills
    the process (torch 2.13, segmentation fault) unless the width is a multiple of 16, as factor widths (ranks)
    often are not; those go to quanto's generic dequantize-and-matmul path instead."""
    from optimum.quanto.library import qbytes_mm as library

    if getattr(library, "_svdllm_guarded", False):
        return
    kernel = library.qbytes_int8pack_mm

    def guarded(activations: torch.Tensor, weights: torch.Tensor, output_scales: torch.Tensor) -> torch.Tensor:
        if activations.shape[-1] % 16:
            return library.qbytes_mm(activations, weights, output_scales)
        return kernel(activations, weights, output_scales)

    library.qbytes_int8pack_mm, library._svdllm_guarded = guarded, True


def quantize_modules(model: nn.Module, modules: dict[str, dict[str, Any]]) -> None:
    """Make each named nn.Linear an optimum-quanto QLinear of its recorded weight type and group size; ``freeze``
    then quantizes their weights, or ``load_state_dict`` reads quantized ones."""
    try:
        from optimum.quanto import quantize
    except ImportError:
        raise ImportError("this model's weights are quantized with optimum-quanto: pip install optimum-quanto") from None
    _guard_int8_cpu_kernel()
    by_type: dict[str, list[str]] = {}
    for name, spec in modules.items():
        by_type.setdefault(spec["weights"], []).append(name)
        weight = model.get_submodule(name).weight
        weight.data = weight.data.contiguous()  # quanto keeps the float layout's strides: U's rank-major one breaks it
    for weights, names in by_type.items():
        quantize(model, weights=weights, include=names)
    for name, spec in modules.items():
        module = model.get_submodule(name)
        if getattr(module, "weight_qtype", None) is None:
            raise ValueError(f"{name} is not a linear optimum-quanto can quantize ({type(module).__name__})")
        module.weight_group_size = spec.get("group_size")


def tied_parameter_names(model: nn.Module) -> set[str]:
    """Names under which a parameter shared with an earlier name appears (a tied head): not saved, not missing."""
    return {n for n, _ in model.named_parameters(remove_duplicate=False)} - {n for n, _ in model.named_parameters()}


def load_quantized(cls: type, path: str | os.PathLike, config: Any, quantization: dict[str, Any],
                   dtype: Any = None) -> nn.Module:
    """A model with quantized factors from a local folder: built without initialising weights, its quantized
    linears made by quanto, then every tensor read from the shards (strictly: nothing missing, nothing unused)."""
    from safetensors.torch import load_file

    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # transformers 4
        from transformers.modeling_utils import no_init_weights

    folder = Path(path)
    if not folder.is_dir():
        raise ValueError(f"{path}: models with quantized factors load from a local folder")
    saved = getattr(torch, quantization["dtype"])  # scales and every unquantized tensor are in it
    wanted = getattr(torch, dtype) if isinstance(dtype, str) and dtype != "auto" else dtype
    if wanted not in (None, "auto", saved):
        raise ValueError(f"quantized factors load in their saved dtype {saved}, not {wanted}")
    with no_init_weights():
        model = cls._from_config(config, dtype=saved)
    quantize_modules(model, quantization["modules"])
    model.tie_weights()  # a tied head is saved once, under the embedding's name
    index = folder / "model.safetensors.index.json"
    files = set(json.loads(index.read_text())["weight_map"].values()) if index.is_file() else {"model.safetensors"}
    state: dict[str, torch.Tensor] = {}
    for file in sorted(files):
        # copies: safetensors' tensors sit at arbitrary byte offsets, and torch's CPU int8 kernel crashes on them
        state.update({k: v.clone() for k, v in load_file(str(folder / file)).items()})
    result = model.load_state_dict(state, strict=False)
    missing = sorted(set(result.missing_keys) - tied_parameter_names(model))
    for kind, found in (("missing key", missing), ("unexpected key", sorted(result.unexpected_keys))):
        if found:
            raise ValueError(f"the weights do not match config.json's svdllm quantization: {kind} {found[0]} "
                             f"({len(found)} in all)")
    restore_rank_major(model)
    return model.eval()


# ---------------------------------------------------------------------------------------------------------------
# Latent KV cache: a low-rank k_proj/v_proj is U·(V·x), so the cache can hold the rank-r latent V·x instead of the
# keys and values (Palu, arXiv 2407.21118).  Keys are rebuilt as RoPE(k_norm(U·latent)) when attention reads them.
# Values are rebuilt as U·latent in multi-token steps; in decode steps attention reads the latents and v_proj's U is
# applied to its output instead (an o_proj pre-hook).
# ---------------------------------------------------------------------------------------------------------------

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
