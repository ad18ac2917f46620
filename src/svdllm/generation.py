"""The fast generation path: transformers' static KV cache with its decode step compiled by torch.compile.

    model.generate(**inputs, max_new_tokens=64, **fast_options(model))

Eager decode pays a fixed cost per token outside the matrix products (Python, norms, RoPE, the cache), and that
cost does not shrink with the weights: it dilutes what compression saves.  A static cache keeps every shape fixed,
so the decode step compiles once into one graph (CUDA graphs on a GPU).  Prefill runs eagerly.
"""
from __future__ import annotations

import logging
from typing import Any, Callable

import torch
from torch import nn

logger = logging.getLogger(__name__)


def has_sliding_layers(model: nn.Module) -> bool:
    config = model.config.get_text_config(decoder=True)
    types = getattr(config, "layer_types", None)
    return "sliding_attention" in types if types else getattr(config, "sliding_window", None) is not None


def fast_options(model: nn.Module, backend: str | Callable[..., Any] = "inductor") -> dict[str, Any]:
    """``generate`` keyword arguments for the fast path; dense and compressed models take the same ones.

    Dynamo's guards stay on: they cost 1.6 (dense) to 2.0 ms (0.6) per token for SmolLM2 on a CPU, and
    ``torch.compiler.skip_guard_on_all_nn_modules_unsafe`` cut that to 0.3 ms, but then two models in one
    process shared one compiled graph (a benchmark comparing them crashed), so it is not used.

    Models with sliding-window layers get no options (with a notice): transformers' static sliding layer makes
    the compiled decode step recompile at every token."""
    from transformers import CompileConfig

    if has_sliding_layers(model):
        logger.warning("fast path: sliding-window layers recompile at every token with transformers' static "
                       "cache; generating on the ordinary path")
        return {}
    cuda_graphs = next(model.parameters()).device.type == "cuda" and backend == "inductor"
    # fullgraph: a graph break (in LowRankLinear or anywhere) is an error, not a silent slowdown
    config = CompileConfig(fullgraph=True, dynamic=False, backend=backend,
                           mode="reduce-overhead" if cuda_graphs else "default")
    config._compile_all_devices = True  # transformers compiles on accelerators only unless told
    return {"cache_implementation": "static", "compile_config": config}


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the model's weights as stored: every tensor of its state dict, a tied one once.  Quantized weights
    count their packed data, scales and shifts, exactly what a saved folder's shards hold."""
    tensors = {(t.data_ptr(), t.dtype, tuple(t.shape)): t for t in model.state_dict().values()}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def bytes_read_per_token(model: nn.Module) -> int:
    """Weight bytes a batch-1 decode step streams: all of them but the input-embedding tables (one row is read),
    unless a table is tied to the output head, which reads it whole.  Its dense/compressed ratio bounds the
    decode speed-up."""
    head = model.get_output_embeddings()
    head_id = id(head.weight) if head is not None else None
    total = weight_bytes(model)
    for m in model.modules():
        if isinstance(m, nn.Embedding) and id(m.weight) != head_id:
            total -= (m.weight.shape[0] - 1) * m.weight.shape[1] * m.weight.element_size()
    return total


def timed(fn: Callable[[], Any], device: torch.device) -> float:
    """Seconds ``fn()`` takes, with the device's queued work finished before and after (CUDA)."""
    import time

    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0


def generate_seconds(model: nn.Module, ids: torch.Tensor, new_tokens: int, fast: bool = False) -> float:
    """Seconds of one greedy ``generate`` of exactly ``new_tokens`` after ``ids`` (batch × tokens), through the
    fast path if ``fast``."""
    device = next(model.parameters()).device
    x = ids.to(device)
    kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0,
              attention_mask=torch.ones_like(x), **(fast_options(model) if fast else {}))
    return timed(lambda: model.generate(x, **kw), device)


def decode_speed(models: dict[str, nn.Module], prompt: torch.Tensor, new_tokens: int, repeats: int,
                 fast: bool) -> dict[str, float]:
    """Batch-1 greedy decode tokens/s of each model after ``prompt``, interleaved repeat by repeat (median).  A
    warm-up call of the same shapes comes first: the fast path compiles there."""
    import statistics

    for model in models.values():
        generate_seconds(model, prompt[None], new_tokens, fast)
    samples: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(repeats):
        for name, model in models.items():
            samples[name].append(new_tokens / generate_seconds(model, prompt[None], new_tokens, fast))
    return {name: statistics.median(s) for name, s in samples.items()}
