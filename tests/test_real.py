"""The real SmolLM2-135M on real offline text (marked `real`; CI runs them too)."""
from __future__ import annotations

import copy

import pytest
import torch

from svdllm import CompressionConfig, compress, evaluate_perplexity, load, save
from svdllm.architecture import count_parameters
from svdllm.assets import load_model
from svdllm.data import is_test_article, load_text, tokenize, wiki_articles

pytestmark = pytest.mark.real
CALIB = dict(nsamples=8, seqlen=256)


@pytest.fixture(scope="module")
def real():
    model, tok = load_model("smollm2-135m")
    return model, tok, tokenize(tok, load_text("wiki-train")), tokenize(tok, load_text("wiki-test"))[:2048]


def test_wiki_split_is_disjoint_and_deterministic():
    arts = wiki_articles()
    test = {t for t, _ in arts if is_test_article(t)}
    train = {t for t, _ in arts if not is_test_article(t)}
    assert test and train and not test & train
    assert len(arts) > 100 and sum(len(p.split()) for _, p in arts) > 400_000
    assert "{{" not in load_text("wiki-test") and "[[" not in load_text("wiki-test")


def test_real_model_is_gqa_llama(real):
    model, *_ = real
    assert model.config.num_attention_heads == 9 and model.config.num_key_value_heads == 3
    assert count_parameters(model) == 134_515_008


def test_whitening_beats_plain_svd_on_smollm2(real):
    model, tok, calib, test = real
    dense = evaluate_perplexity(model, tok, test, 256, None).perplexity
    ppl = {}
    for method in ("svd", "svdllm-w"):
        m = load_model("smollm2-135m")[0]
        compress(m, tok, CompressionConfig(ratio=0.2, method=method, **CALIB), calib_tokens=calib, progress=False)
        ppl[method] = evaluate_perplexity(m, tok, test, 256, None).perplexity
    assert dense < ppl["svdllm-w"] < ppl["svd"]
    assert ppl["svdllm-w"] < 10 * dense


def test_bfloat16_checkpoint_at_ratio_04(real, tmp_path):
    model, tok, _, test = real
    dense_dir = tmp_path / "dense"
    copy.deepcopy(model).to(torch.bfloat16).save_pretrained(dense_dir)  # tied embeddings stay tied
    dense_size = sum(p.stat().st_size for p in dense_dir.glob("*.safetensors"))
    m = load_model("smollm2-135m")[0]
    compress(m, tok, CompressionConfig(ratio=0.4, method="svd"), progress=False)
    out = save(m, tok, tmp_path / "c", dtype="bfloat16")
    size = sum(p.stat().st_size for p in out.glob("*.safetensors"))
    n = count_parameters(m)
    assert n * 2 <= size <= n * 2 * 1.02  # factors stored as factors, in bf16
    assert size < 0.72 * dense_size  # 40% off the 106M linear parameters, embeddings kept
    print(f"\nbf16 on disk: dense {dense_size / 2**20:.1f} MiB, compressed at 0.4 {size / 2**20:.1f} MiB")
    reloaded = load(out)
    assert reloaded.dtype == torch.bfloat16
    ids = test[:64][None]
    with torch.no_grad():  # exact equality is tested in fp32; here bf16 rounding of the fp32 model
        ref = m(ids).logits
        err = (reloaded(ids).logits.float() - ref).norm() / ref.norm()
    assert err < 0.1  # bf16 through 30 blocks of two matmuls: ~5% seen; a broken load gives ~100%
