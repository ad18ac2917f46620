"""The sequential LoRA recovery step on a tiny compressed model."""
from __future__ import annotations

import json

import pytest
import torch

from svdllm import CompressionConfig, compress, load, sample_windows, save
from svdllm.cli import main
from svdllm.data import tokenize
from svdllm.finetune import FinetuneConfig, factor_state, finetune
from svdllm.runtime import LowRankLinear


@pytest.fixture
def result(make_model, calib_tokens):
    return compress(make_model("llama"), sample_windows(calib_tokens, 8, 32, 0),
                    CompressionConfig(ratio=0.5, method="svdllm-w"), progress=False)


@pytest.fixture
def compressed(result):
    return result.model


def test_stages_touch_only_their_factor_and_merge_cleanly(result, compressed, calib_tokens, monkeypatch):
    import svdllm.finetune as ft

    ranks = dict(result.record.ranks)
    n_params = sum(p.numel() for p in compressed.parameters())
    snapshots = []
    real_stage = ft._stage

    def spy(model, which, *a, **k):
        before = {w: factor_state(model, w) for w in ("u", "v")}
        model, losses = real_stage(model, which, *a, **k)
        after = {w: factor_state(model, w) for w in ("u", "v")}
        snapshots.append((which, before, after))
        return model, losses

    monkeypatch.setattr(ft, "_stage", spy)
    model, results = finetune(compressed, None, FinetuneConfig(steps=4, seqlen=32, batch_size=2, lr=1e-2),
                              tokens=calib_tokens, progress=False)
    assert [w for w, *_ in snapshots] == ["u", "v"]
    for which, before, after in snapshots:
        other = "v" if which == "u" else "u"
        assert all(torch.equal(before[other][n], after[other][n]) for n in before[other])
        assert any(not torch.equal(before[which][n], after[which][n]) for n in before[which])
    assert sum(p.numel() for p in model.parameters()) == n_params
    assert not [n for n, _ in model.named_modules() if "lora" in n.lower()]
    assert {n: m.rank for n, m in model.named_modules() if isinstance(m, LowRankLinear)} == ranks
    assert all(type(m.svd_u) is torch.nn.Linear and m.svd_u.weight.t().is_contiguous()
               for m in model.modules() if isinstance(m, LowRankLinear))
    assert [r.stage for r in results] == ["Wu", "Wv"]


def test_a_few_steps_lower_the_training_loss(compressed, calib_tokens):
    torch.manual_seed(0)
    _, results = finetune(compressed, None, FinetuneConfig(steps=25, seqlen=32, batch_size=4, lr=5e-3,
                                                           order="v-first"), tokens=calib_tokens, progress=False)
    losses = results[0].losses
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5
    assert results[0].stage == "Wv"


@pytest.mark.parametrize("keep_best", [True, False])
def test_keep_best_reverts_a_harmful_stage(compressed, calib_tokens, monkeypatch, keep_best):
    """A stage made harmful on purpose (its factors scrambled): --keep-best puts them back, without it they stay."""
    import svdllm.finetune as ft

    real = ft._stage

    def harmful(model, which, *a, **k):
        model, losses = real(model, which, *a, **k)
        gen = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if f".{ft.STAGE_TARGET[which]}." in n:
                    p.add_(torch.randn(p.shape, generator=gen) * 5 * p.std())
        return model, losses

    monkeypatch.setattr(ft, "_stage", harmful)
    before = factor_state(compressed, "u")
    model, results = finetune(compressed, None, FinetuneConfig(steps=1, seqlen=32, batch_size=2, keep_best=keep_best),
                              tokens=calib_tokens, progress=False)
    r = results[0]
    after = factor_state(model, "u")
    if keep_best:
        assert not r.kept and r.val_after == r.val_before
        assert all(torch.equal(before[n], after[n]) for n in before)
    else:
        assert r.kept and r.val_after > r.val_before
        assert not all(torch.equal(before[n], after[n]) for n in before)


def test_fp16_and_bad_order_refused(compressed, calib_tokens):
    with pytest.raises(ValueError, match="float16"):
        finetune(compressed, None, FinetuneConfig(dtype="float16"), tokens=calib_tokens)
    with pytest.raises(ValueError, match="u-first or v-first"):
        finetune(compressed, None, FinetuneConfig(order="w-first"), tokens=calib_tokens)


def test_cli_finetune_on_alpaca_jsonl(result, tokenizer, tmp_path, capsys):
    src = save(result, tokenizer, tmp_path / "c")
    rows = [{"instruction": f"Name a {w}.", "input": "" if i % 2 else "a city", "output": f"The {w} river."}
            for i, w in enumerate(["king", "house", "song", "field", "river", "team"] * 30)]
    data = tmp_path / "alpaca.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows))
    out = tmp_path / "ft"
    code = main(["-q", "finetune", str(src), "--data", str(data), "--out", str(out), "--steps", "3",
                 "--seqlen", "32", "--batch-size", "2", "--eval", str(data), "--eval-seqlen", "32"])
    assert code == 0, capsys.readouterr().err
    assert "LoRA on Wu" in capsys.readouterr().out
    losses = json.loads((out / "finetune_losses.json").read_text())
    assert [s["stage"] for s in losses] == ["Wu", "Wv"] and len(losses[0]["losses"]) == 3
    assert (out / "finetune_losses.png").stat().st_size > 1000
    reloaded = load(out)
    assert reloaded.config.svdllm["finetune"]["steps"] == 3
    assert reloaded.config.svdllm["ranks"] == result.record.ranks
    assert tokenize(tokenizer, data.read_text()).numel() > 0
