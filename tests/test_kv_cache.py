"""The latent KV cache: same greedy tokens and logits as the ordinary cache, and exactly the bytes of its formula."""
from __future__ import annotations

import pytest
import torch
import transformers

from conftest import record_of, with_spectral_decay
from svdllm import CompressionConfig, compress, load, sample_windows, save
from svdllm.cli import main
from svdllm.runtime import LatentCache, cache_argument, cache_bytes_per_token, latent_rank

COMMON = dict(bos_token_id=0, eos_token_id=0, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
# Windows shorter than the generated sequence, so that sliding layers drop positions during the test.
FAMILIES = {
    "llama": lambda: transformers.LlamaConfig(**COMMON),
    "mistral": lambda: transformers.MistralConfig(**COMMON, sliding_window=9),
    "qwen2": lambda: transformers.Qwen2Config(**COMMON),
    "qwen3": lambda: transformers.Qwen3Config(**COMMON, head_dim=16),
    "gemma2": lambda: transformers.Gemma2Config(**COMMON, head_dim=16, sliding_window=7),
    "gemma3": lambda: transformers.Gemma3TextConfig(**COMMON, head_dim=16, sliding_window=7,
                                                    layer_types=["sliding_attention", "full_attention", "sliding_attention"]),
}


def compressed(family: str, vocab: int, calib_tokens: torch.Tensor, attn: str = "eager") -> transformers.PreTrainedModel:
    torch.manual_seed(0)
    config = FAMILIES[family]()
    config.vocab_size, config._attn_implementation = vocab, attn
    cls = transformers.Gemma3ForCausalLM if family == "gemma3" else transformers.AutoModelForCausalLM
    model = with_spectral_decay(cls(config) if family == "gemma3" else cls.from_config(config)).eval()
    compress(model, sample_windows(calib_tokens, 8, 32, 0), CompressionConfig(ratio=0.4, method="svdllm-w"),
             progress=False)
    return model


def cache_bytes(cache: LatentCache) -> int:
    tensors = [t for layer in cache.layers for t in (layer.keys, layer.values)]
    tensors += [t for store in cache.rope_stores for t in (store.layer.keys, store.layer.values)]
    return sum(t.numel() * t.element_size() for t in tensors)


@pytest.mark.parametrize("family, attn, fold", [(f, "eager", True) for f in FAMILIES] + [
    ("llama", "eager", False), ("gemma3", "eager", False), ("llama", "sdpa", True), ("gemma3", "sdpa", True)])
def test_latent_cache_generates_the_same_tokens_and_logits(family, attn, fold, tokenizer, calib_tokens):
    model = compressed(family, len(tokenizer), calib_tokens, attn)
    # Two rows, the second left-padded: each row's positions (hence RoPE) differ.
    ids = torch.stack([calib_tokens[:10], torch.cat([torch.zeros(3, dtype=torch.long), calib_tokens[20:27]])])
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    kw = dict(attention_mask=mask, max_new_tokens=14, do_sample=False, pad_token_id=0, output_scores=True,
              return_dict_in_generate=True)
    ref = model.generate(ids, **kw)
    cache = LatentCache(model, fold_values=fold)
    out = model.generate(ids, **kw, **{cache_argument(model): cache})
    assert torch.equal(out.sequences, ref.sequences)
    assert max((a - b).abs().max().item() for a, b in zip(out.scores, ref.scores)) < 1e-4

    attns = [layer.self_attn for layer in model.model.layers]
    for layer, attn in zip(cache.layers, attns):  # the cache holds latents of exactly the low-rank widths
        assert layer.keys.shape[-1] == latent_rank(attn.k_proj) and layer.values.shape[-1] == latent_rank(attn.v_proj)
    tokens = out.sequences.shape[1] - 1  # the last token is generated but never cached
    windows = [getattr(layer, "sliding_window", None) for layer in cache.layers]
    if any(windows):  # a full window keeps its last window-1 positions, and so does its RoPE store
        assert all(layer.keys.shape[-2] == (w - 1 if w else tokens) for layer, w in zip(cache.layers, windows))
    else:
        assert cache_bytes(cache) == cache_bytes_per_token(model, latent=True) * tokens * ids.shape[0]
        assert cache_bytes_per_token(model, latent=True) < 0.75 * cache_bytes_per_token(model, latent=False)


def test_forward_with_gradients_matches_too(tokenizer, calib_tokens):
    model = compressed("gemma3", len(tokenizer), calib_tokens)  # k_norm and sliding layers
    ids = calib_tokens[:12][None]
    logits = {}
    for name, cache in (("ordinary", None), ("latent", LatentCache(model))):
        kw = {cache_argument(model): cache} if cache else {}
        out = model(ids[:, :8], use_cache=True, **kw)  # grad mode: the differentiable rebuild
        logits[name] = model(ids[:, 8:], **{cache_argument(model): out[cache_argument(model)]}).logits
    assert (logits["latent"] - logits["ordinary"]).abs().max() < 1e-4
    logits["latent"].sum().backward()
    assert model.model.layers[0].self_attn.k_proj.svd_u.weight.grad is not None


def test_bytes_formula_by_hand(tokenizer, calib_tokens):
    model = compressed("llama", len(tokenizer), calib_tokens)
    attns = [layer.self_attn for layer in model.model.layers]
    ranks = sum(a.k_proj.rank + a.v_proj.rank for a in attns)
    assert cache_bytes_per_token(model, latent=False) == 4 * 3 * 2 * (2 * 16)  # fp32, 3 layers, k and v, 2×16
    assert cache_bytes_per_token(model, latent=True) == 4 * (ranks + 2 * 16)  # + cos and sin of one RoPE


def test_unsupported_families_and_dense_projections_are_refused(make_model, tokenizer, calib_tokens):
    gpt2 = make_model("gpt2")
    compress(gpt2, sample_windows(calib_tokens, 8, 32, 0), CompressionConfig(ratio=0.4, method="svdllm-w"),
             progress=False)
    with pytest.raises(ValueError, match="gpt2 attention is not supported"):
        LatentCache(gpt2)
    with pytest.raises(ValueError, match="no k_proj or v_proj is low-rank"):
        LatentCache(make_model("llama"))


def test_load_with_latent_cache_and_cli(make_model, tokenizer, calib_tokens, tmp_path, capsys):
    model = compressed("qwen2", len(tokenizer), calib_tokens)
    out = save(model, tokenizer, tmp_path / "c", record_of(model))
    ids = calib_tokens[:8][None]
    loaded = load(out, latent_cache=True)
    res = loaded.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0, return_dict_in_generate=True)
    assert isinstance(res[cache_argument(loaded)], LatentCache)
    ordinary = loaded.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0, latent_cache=False,
                               return_dict_in_generate=True)
    assert not isinstance(ordinary[cache_argument(loaded)], LatentCache)
    assert torch.equal(res.sequences, ordinary.sequences)

    assert main(["generate", str(out), "the river", "--max-new-tokens", "6"]) == 0
    plain = capsys.readouterr().out
    assert main(["generate", str(out), "the river", "--max-new-tokens", "6", "--latent-cache"]) == 0
    latent = capsys.readouterr()
    assert latent.out == plain
    dense, small = cache_bytes_per_token(loaded, False), cache_bytes_per_token(loaded, True)
    assert f"KV cache {small} bytes/token latent against {dense} dense" in latent.err

    gpt2 = compress(make_model("gpt2"), sample_windows(calib_tokens, 8, 32, 0),
                    CompressionConfig(ratio=0.4, method="svdllm-w"), progress=False)
    assert main(["generate", str(save(gpt2, tokenizer, tmp_path / "g")), "the", "--max-new-tokens", "3",
                 "--latent-cache"]) == 0
    err = capsys.readouterr().err
    assert "latent cache: gpt2 attention is not supported" in err and "using the ordinary cache" in err
