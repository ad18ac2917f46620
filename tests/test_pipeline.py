"""compress() on tiny models of every supported family."""
from __future__ import annotations

import pytest
import torch

from conftest import ARCHS
from svdllm import CompressionConfig, compress
from svdllm.architecture import block_linears, decoder_blocks
from svdllm.lowrank import LowRankLinear
from svdllm.methods import METHODS

SMALL = dict(nsamples=8, seqlen=32, batch_size=4)


def linear_names(model) -> list[str]:
    prefix, blocks = decoder_blocks(model)
    return [n for i, b in enumerate(blocks) for n in block_linears(b, f"{prefix}.{i}")]


def rel_logit_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / (b - b.mean(-1, keepdim=True)).norm())


@pytest.mark.parametrize("arch", ARCHS)
def test_every_architecture_compresses_and_generates(arch, make_model, calib_tokens):
    model = make_model(arch)
    names = linear_names(model)
    ids = calib_tokens[:48][None]
    with torch.no_grad():
        dense = model(ids).logits
    compress(model, None, CompressionConfig(ratio=0.05, method="svdllm-ec", **SMALL), calib_tokens=calib_tokens,
             progress=False)
    swapped = [n for n, m in model.named_modules() if isinstance(m, LowRankLinear)]
    assert sorted(swapped) == sorted(names) and names
    with torch.no_grad():
        logits = model(ids).logits
    assert torch.isfinite(logits).all()
    assert rel_logit_error(logits, dense) < 0.2  # GQA k/v keep 20 of 32 dims at this ratio
    out = model.generate(ids[:, :8], max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 13)


@pytest.mark.parametrize("method", list(METHODS))
def test_every_method_reaches_the_ratio(method, make_model, calib_tokens):
    ratio = 0.3
    model = make_model("mistral", hidden=256)  # ranks ≥ 100, so flooring k moves the count < 1%
    before = sum(p.numel() for p in model.parameters())
    compress(model, None, CompressionConfig(ratio=ratio, method=method, **SMALL), calib_tokens=calib_tokens,
             progress=False)
    rep = model.svdllm_report
    after = sum(p.numel() for p in model.parameters())
    assert rep.linear_params_after / rep.linear_params_before == pytest.approx(1 - ratio, rel=0.01)
    assert (before - after) / rep.linear_params_before == pytest.approx(ratio, abs=0.01)
    for r in rep.records:
        m = model.get_submodule(r["name"])
        assert isinstance(m, LowRankLinear) and m.rank == r["rank"]
    assert model.config.svdllm["ranks"] == {r["name"]: r["rank"] for r in rep.records}


def test_seed_fixes_the_factors(make_model, calib_tokens):
    def factors(seed: int) -> torch.Tensor:
        m = make_model("llama")
        compress(m, None, CompressionConfig(ratio=0.4, method="svdllm-w", seed=seed, **SMALL),
                 calib_tokens=calib_tokens, progress=False)
        return m.model.layers[1].mlp.down_proj.svd_v.weight.detach().clone()

    a, b, c = factors(1), factors(1), factors(2)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


def test_dead_input_never_crashes(make_model, calib_tokens):
    model = make_model("llama")
    with torch.no_grad():
        for layer in model.model.layers:
            layer.input_layernorm.weight[5] = 0.0  # q/k/v never see input dimension 5
    for method in ("svdllm-w", "svdllm", "svdllm-ec", "asvd"):
        m = make_model("llama")
        m.load_state_dict(model.state_dict())
        compress(m, None, CompressionConfig(ratio=0.4, method=method, **SMALL), calib_tokens=calib_tokens,
                 progress=False)
        assert torch.isfinite(m(calib_tokens[:32][None]).logits).all()
        if method.startswith("svdllm-w"):
            assert any("q_proj" in r["name"] for r in m.svdllm_report.remedies)


def test_error_correction_lowers_output_error(make_model, calib_tokens):
    """On held-out tokens, svdllm-ec's final hidden states are closer to the dense model's than svdllm-w's."""
    held_out = calib_tokens[-256:].view(4, 64)
    dense = make_model("llama")
    with torch.no_grad():
        ref = dense(held_out, output_hidden_states=True).hidden_states[-1]
    errs = {}
    for method in ("svdllm-w", "svdllm-ec"):
        m = make_model("llama")
        compress(m, None, CompressionConfig(ratio=0.5, method=method, nsamples=16, seqlen=64),
                 calib_tokens=calib_tokens[:-256], progress=False)
        with torch.no_grad():
            errs[method] = float((m(held_out, output_hidden_states=True).hidden_states[-1] - ref).norm())
    assert errs["svdllm-ec"] < errs["svdllm-w"]


def test_targets_and_skip_layers(make_model, calib_tokens):
    model = make_model("llama")
    compress(model, None, CompressionConfig(ratio=0.4, method="svdllm-w", targets="*mlp*", skip_layers="0", **SMALL),
             calib_tokens=calib_tokens, progress=False)
    swapped = {n for n, m in model.named_modules() if isinstance(m, LowRankLinear)}
    assert swapped == {f"model.layers.1.mlp.{p}" for p in ("gate_proj", "up_proj", "down_proj")}
    with pytest.raises(ValueError, match="matches no linear"):
        compress(make_model("llama"), None, CompressionConfig(targets="*nothing*", **SMALL),
                 calib_tokens=calib_tokens, progress=False)


def test_short_calibration_text_is_an_error(make_model, calib_tokens):
    with pytest.raises(ValueError, match="shorter than one window"):
        compress(make_model("llama"), None, CompressionConfig(seqlen=512, nsamples=2),
                 calib_tokens=calib_tokens[:100], progress=False)


def test_shared_inputs_share_one_gram(make_model, calib_tokens):
    from svdllm.calibration import GramAccumulator, capture_block_inputs, recorded_inputs, run_block

    model = make_model("llama")
    block = model.model.layers[0]
    linears = block_linears(block, "model.layers.0")
    calls = capture_block_inputs(model, block, calib_tokens[:64].view(2, 32), 2, torch.device("cpu"))
    acc = GramAccumulator(frozenset({"gram"}), torch.device("cpu"))
    with recorded_inputs(linears) as seen:
        run_block(block, calls[0])
        acc.add(dict(seen), None)
    groups = sorted(sorted(n.rsplit(".", 1)[1] for n in g) for g in acc.groups)
    assert groups == [["down_proj"], ["gate_proj", "up_proj"], ["k_proj", "q_proj", "v_proj"], ["o_proj"]]


def test_auto_beta_picks_the_best_held_out_candidate(make_model, calib_tokens):
    model = make_model("llama")
    cfg = CompressionConfig(ratio=0.5, method="svdllm-ec", beta="auto", beta_grid=(0.0, 0.5, 1.0), nsamples=16,
                            seqlen=32, batch_size=4)
    compress(model, None, cfg, calib_tokens=calib_tokens, progress=False)
    records = model.svdllm_report.records
    assert len(records) == 14
    for r in records:
        scores = r["beta_scores"]
        assert set(scores) == {0.0, 0.5, 1.0}
        assert r["beta"] == min(scores, key=scores.get)
    assert torch.isfinite(model(calib_tokens[:32][None]).logits).all()
    with pytest.raises(ValueError, match="two calibration batches"):
        compress(make_model("llama"), None, CompressionConfig(method="svdllm-ec", beta="auto", nsamples=4, seqlen=32,
                                                              batch_size=4), calib_tokens=calib_tokens, progress=False)


def test_stats_cache_gives_identical_factors_without_recalibrating(make_model, calib_tokens):
    cache: dict = {}
    runs = {}
    for method in ("fwsvd", "svdllm-w", "asvd", "svdllm-w"):
        m = make_model("llama")
        compress(m, None, CompressionConfig(ratio=0.4, method=method, **SMALL), calib_tokens=calib_tokens,
                 progress=False, stats_cache=cache)
        runs.setdefault(method, []).append((m, dict(m.svdllm_report.timings)))
    (first, t1), (second, t2) = runs["svdllm-w"]
    assert "calibration forward" in t1 and "calibration forward" not in t2  # the second run reused the Grams
    assert "calibration forward" not in runs["asvd"][0][1]
    fresh = make_model("llama")
    compress(fresh, None, CompressionConfig(ratio=0.4, method="asvd", **SMALL), calib_tokens=calib_tokens,
             progress=False)
    for a, b in ((first, second), (runs["asvd"][0][0], fresh)):
        assert torch.equal(a.model.layers[1].mlp.down_proj.svd_v.weight, b.model.layers[1].mlp.down_proj.svd_v.weight)


def test_low_rank_linear_stores_u_rank_major_through_copies_and_casts():
    import copy

    from svdllm.lowrank import LowRankLinear, from_factors

    gen = torch.Generator().manual_seed(0)
    dense = torch.nn.Linear(24, 40)
    u, v = torch.randn(40, 6, generator=gen), torch.randn(6, 24, generator=gen)
    layer = from_factors(dense, u, v)
    x = torch.randn(3, 24, generator=gen)
    with torch.no_grad():
        assert torch.allclose(layer(x), x @ v.T @ u.T + dense.bias, atol=1e-5)
    for m in (layer, copy.deepcopy(layer), copy.deepcopy(layer).to(torch.bfloat16), LowRankLinear(24, 40, 6)):
        w = m.svd_u.weight
        assert w.shape == (40, 6) and w.t().is_contiguous() and not w.is_contiguous()
    m = LowRankLinear(24, 40, 6)
    m.svd_u.weight.data = m.svd_u.weight.data.contiguous()  # what a plain load hands back
    m.use_rank_major()
    assert m.svd_u.weight.t().is_contiguous()
