"""Rank allocation: the budget is exact, the greedy keeps the best components, uniform is today's rule, and the
statistics it reads equal their references."""
from __future__ import annotations

import random

import pytest
import torch

from conftest import ARCHS, tiny_model
from svdllm import CompressionConfig, compress, make_plan
from svdllm.errors import OptionError
from svdllm.importance import Spectra, gradient_statistics
from svdllm.ranks import allocate, max_useful_rank, uniform
from svdllm.source import ModelSource


def budget(ranks: dict[str, int], shapes: dict) -> int:
    return sum(k * sum(shapes[n]) for n, k in ranks.items())


def check_budget(ranks: dict[str, int], shapes: dict, ratio: float, floor: float, cap: float) -> None:
    uni = uniform(shapes, ratio)
    spent, target = budget(ranks, shapes), budget(uni, shapes)
    assert spent <= target
    assert target - spent < max(sum(s) for s in shapes.values())  # short by less than one rank of one matrix
    for n, k in ranks.items():
        assert k * sum(shapes[n]) < shapes[n][0] * shapes[n][1] or k == max(1, int(floor * uni[n]))
        assert max(1, int(floor * uni[n])) <= k <= max(1, -(-cap * uni[n] // 1))


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("ratio", [0.05, 0.5, 0.95])
def test_budget_is_exact_on_every_family(arch, ratio):
    model = tiny_model(arch, 64)
    plan = make_plan(model, ratio)
    shapes = {n: tuple(plan.shapes[n]) for n in plan.ranks}
    gen = torch.Generator().manual_seed(1)
    scores = {n: torch.rand(min(s), generator=gen).sort(descending=True).values.tolist() for n, s in shapes.items()}
    for floor, cap in [(0.5, 2.0), (0.0, 100.0), (1.0, 1.0)]:
        ranks = allocate(shapes, ratio, scores, floor, cap)
        check_budget(ranks, shapes, ratio, floor, cap)
        if floor == cap == 1.0:
            assert ranks == uniform(shapes, ratio)  # no freedom: today's ranks


def test_greedy_keeps_the_largest_scores_per_parameter():
    rng = random.Random(0)
    shapes = {"a": (40, 40), "b": (40, 40), "c": (40, 40)}  # equal cost per component
    scores = {n: sorted((rng.lognormvariate(0, 2) for _ in range(40)), reverse=True) for n in shapes}
    ranks = allocate(shapes, 0.5, scores, floor=0.0, cap=100.0)
    kept = sorted(((s, n) for n in shapes for s in scores[n][: ranks[n]]), reverse=True)
    best = sorted(((s, n) for n in shapes for s in scores[n][:max_useful_rank(40, 40)]), reverse=True)[: len(kept)]
    assert kept == best and len(kept) == sum(uniform(shapes, 0.5).values())
    # unequal sizes: the order is score per parameter; the big matrix wins every component it can pay for
    shapes2 = {"big": (100, 100), **{f"s{i}": (20, 20) for i in range(5)}}  # a component costs 200 or 40
    scores2 = {"big": [150.0] * 100, **{f"s{i}": [20.0] * 20 for i in range(5)}}  # per parameter 0.75 > 0.5
    r = allocate(shapes2, 0.5, scores2, floor=0.0, cap=100.0)  # uniform: big 25, each small 5; 6000 parameters
    assert r == {"big": 29, **{f"s{i}": 1 for i in range(5)}} and budget(r, shapes2) == 6000


def test_uniform_rule_is_todays_plan_and_bad_rules_are_refused():
    model = tiny_model("llama", 64)
    cfg = CompressionConfig(method="svdllm-w", ratio=0.4)  # auto: uniform for svdllm-w
    result = compress(model, torch.randint(0, 64, (4, 32)), cfg, progress=False)
    plan = make_plan(tiny_model("llama", 64), 0.4)
    assert result.record.ranks == plan.ranks == uniform({n: tuple(plan.shapes[n]) for n in plan.ranks}, 0.4)
    assert result.record.rank_rule == "uniform"
    for bad, field in [(dict(rank_rule="loss"), "rank_rule"), (dict(rank_rule="fisher", rank_floor=1.5), "rank_floor"),
                       (dict(rank_rule="fisher", rank_cap=0.5), "rank_cap")]:
        with pytest.raises(OptionError) as err:
            CompressionConfig(**bad).validate()
        assert err.value.option == field


def test_auto_means_fisher_for_svdllm_ec_in_memory():
    windows = torch.randint(0, 64, (8, 32), generator=torch.Generator().manual_seed(0))
    auto = compress(tiny_model("qwen2", 64), windows, CompressionConfig(ratio=0.4), progress=False)
    fisher = compress(tiny_model("qwen2", 64), windows, CompressionConfig(ratio=0.4, rank_rule="fisher"),
                      progress=False)
    assert auto.record.rank_rule == "fisher" and auto.record.ranks == fisher.record.ranks
    assert auto.record.ranks != make_plan(tiny_model("qwen2", 64), 0.4).ranks


def test_spectra_give_the_whitened_loss_and_allocation_keeps_the_budget():
    model = tiny_model("qwen2", 64)
    windows = torch.randint(0, 64, (16, 32), generator=torch.Generator().manual_seed(3))
    plan = make_plan(model, 0.4)
    # svdllm-w sees the dense stream: the same Grams, float32 products of a batch of four windows summed in
    # float64 in the reverse pass and in the loop
    spectra = gradient_statistics(ModelSource(model), windows, list(plan.ranks), spectra=Spectra(), batch=4).spectra
    result = compress(model, windows, CompressionConfig(method="svdllm-w", ratio=0.4), progress=False)
    for rec in result.report.records:
        s = spectra[rec["name"]]
        assert float(s[rec["rank"]:].sum() / s.sum()) == pytest.approx(rec["loss_whitened"], rel=1e-4, abs=1e-10)
    m = tiny_model("qwen2", 64)
    fisher = compress(m, windows, CompressionConfig(method="svdllm-ec", ratio=0.4, rank_rule="fisher"), progress=False)
    ranks, shapes = fisher.record.ranks, {n: tuple(plan.shapes[n]) for n in plan.ranks}
    assert ranks != plan.ranks and fisher.report.plan["ranks"] == ranks
    check_budget(ranks, shapes, 0.4, 0.5, 2.0)


@pytest.mark.parametrize("arch", ARCHS)
def test_gradient_statistics_equal_a_whole_model_backward(arch):
    """The streamed reverse pass against plain autograd of the whole model, per window: E‖∂L/∂y‖²/m from the output
    gradients, and FWSVD's row sums of (∂L/∂W)² (GPT-2's Conv1D keeps W as (in, out)), for every family."""
    model = tiny_model(arch, 64)
    ids = torch.randint(0, 64, (3, 16), generator=torch.Generator().manual_seed(2))
    plan = make_plan(model, 0.4)
    names = [n for n in plan.ranks if ".0." in n][:2] + [n for n in plan.ranks if ".1." in n][-2:]
    got = gradient_statistics(ModelSource(model), ids, names, sensitivity=True, row_fisher=True, output_grams=True,
                              full_width=100)  # tiny models' outputs are 64-256 wide: full Grams and diagonals
    sens = {n: 0.0 for n in names}
    rows = {n: 0.0 for n in names}
    grams = {n: 0.0 for n in names}
    for window in ids:
        outs: dict[str, torch.Tensor] = {}
        hooks = [model.get_submodule(n).register_forward_hook(lambda _m, _a, o, n=n: outs.__setitem__(n, o))
                 for n in names]
        emb = model.get_input_embeddings().register_forward_hook(lambda _m, _a, o: o.requires_grad_(True))
        loss = model(input_ids=window[None], labels=window[None]).loss
        weights = [model.get_submodule(n).weight for n in names]
        grads = torch.autograd.grad(loss, [outs[n] for n in names] + weights)
        for h in [*hooks, emb]:
            h.remove()
        for j, n in enumerate(names):
            sens[n] += float(grads[j].double().pow(2).sum()) / (16 * grads[j].shape[-1])
            g2 = grads[len(names) + j].double().pow(2)
            rows[n] = rows[n] + (g2.sum(0) if arch == "gpt2" else g2.sum(1))  # Conv1D rows are columns
            g = grads[j].double().reshape(-1, grads[j].shape[-1])
            grams[n] = grams[n] + (g.T @ g if g.shape[1] <= 100 else g.pow(2).sum(0))
    for n in names:  # the streamed pass recomputes each block: float32 rounding differs, within 1e-6
        assert got.sensitivity[n] == pytest.approx(sens[n] / 3, rel=1e-6) and got.sensitivity[n] > 0
        assert torch.allclose(got.row_fisher[n], rows[n], rtol=1e-6, atol=0)
        assert got.output_grams[n].shape == grams[n].shape
        assert torch.allclose(got.output_grams[n], grams[n], rtol=1e-6, atol=1e-6 * float(grams[n].abs().max()))
    assert all(p.requires_grad for p in model.parameters())  # the model is left as it was


@pytest.mark.parametrize("method", ["svdllm-ec", "fwsvd"])
def test_streamed_gradients_give_the_in_memory_model(tmp_path, method):
    """Fisher ranks and FWSVD's rows from a model streamed from its shards equal those of the model in memory."""
    from svdllm.source import open_streamed

    model = tiny_model("llama", 64)
    model.save_pretrained(tmp_path / "m")
    windows = torch.randint(0, 64, (4, 32), generator=torch.Generator().manual_seed(0))
    cfg = CompressionConfig(method=method, ratio=0.4, batch_size=1)  # the streamed default
    streamed = compress(open_streamed(tmp_path / "m"), windows, cfg, progress=False)
    in_memory = compress(model, windows, cfg, progress=False)
    assert streamed.record.rank_rule == in_memory.record.rank_rule == ("fisher" if method == "svdllm-ec" else "uniform")
    assert streamed.record.ranks == in_memory.record.ranks
    if method == "svdllm-ec":
        assert streamed.record.ranks != make_plan(tiny_model("llama", 64), 0.4).ranks
    for i in range(len(streamed.source)):
        a, b = streamed.source.block_tensors(i), in_memory.source.block_tensors(i)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    streamed.source.close()


def test_cli_fisher_ranks_are_saved_and_plotted(model_dir, text_file, tmp_path, capsys):
    import json

    from svdllm.cli import main
    from test_cli import compress_args

    out = tmp_path / "c"
    assert main(compress_args(model_dir, text_file, out, "--ranks", "fisher", "--rank-floor", "0.8",
                              "--no-true-sequential")) == 0
    section = json.loads((out / "config.json").read_text())["svdllm"]
    report = json.loads((out / "svdllm_report.json").read_text())
    assert section["rank_rule"] == "fisher" and section["ranks"] == report["plan"]["ranks"]
    assert report["config"]["true_sequential"] is False
    assert "rank allocation" in " ".join(report["timings"])
    capsys.readouterr()
    plot = tmp_path / "ranks.png"
    assert main(["info", str(out), "--plot", str(plot)]) == 0
    printed = capsys.readouterr().out
    for name, k in section["ranks"].items():
        assert f"| {name} | " in printed and f" | {k} | " in printed
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["info", str(out), "--plot", str(plot)]) == 2  # never overwritten
    assert "exists" in capsys.readouterr().err


def test_a_non_finite_loss_or_gradient_names_the_window_and_the_block():
    from svdllm.errors import DataError

    windows = torch.randint(0, 64, (3, 16), generator=torch.Generator().manual_seed(0))
    model = tiny_model("llama", 64)
    names = list(make_plan(model, 0.4).ranks)
    model.model.layers[1].mlp.register_full_backward_hook(
        lambda _m, grad_in, _out: tuple(None if g is None else torch.full_like(g, float("nan")) for g in grad_in))
    with pytest.raises(DataError, match="non-finite gradient in calibration window 0 at block 1"):
        gradient_statistics(ModelSource(model), windows, names)
    model = tiny_model("llama", 64)
    with torch.no_grad():
        model.lm_head.weight[3] = float("inf")
    with pytest.raises(DataError, match="non-finite loss in calibration window 0"):
        gradient_statistics(ModelSource(model), windows, names)


@pytest.mark.parametrize("two_sided", [False, True])
def test_spectra_from_the_outputs_gram_equal_those_from_the_input_gram(two_sided, monkeypatch):
    """σ² of Rᵀ·W·S (S Sᵀ = XXᵀ) are the eigenvalues of Rᵀ·W·XXᵀ·Wᵀ·R: where the outputs' Gram costs less (few tokens,
    no more outputs than inputs) the reverse pass sums it instead of XᵀX, and the spectra agree with the input Gram's
    to float32 rounding (the Gram route's is its first ridge step, 1e-8 of the mean diagonal)."""
    from svdllm import calibration
    from svdllm.calibration import spectra_from_outputs
    from svdllm.methods import ErrorCorrectedOptions

    monkeypatch.setattr(calibration, "spectra_from_inputs", lambda *a: False)  # its own test below
    model = tiny_model("llama", 64)
    windows = torch.randint(0, 64, (6, 16), generator=torch.Generator().manual_seed(4))
    plan = make_plan(model, 0.4)
    names = list(plan.ranks)
    ask = Spectra(out_side=ErrorCorrectedOptions()) if two_sided else Spectra()
    by_gram = gradient_statistics(ModelSource(model), windows, names, output_grams=two_sided, spectra=ask).spectra
    # one token is all the route rule needs to prefer the outputs wherever it may: m ≤ n
    by_outputs = gradient_statistics(ModelSource(model), windows, names, output_grams=two_sided, spectra=ask,
                                     tokens=1).spectra
    took = [n for n in names if spectra_from_outputs(1, plan.shapes[n][1], [plan.shapes[n][0]])]
    assert any("down_proj" in n for n in took) and not any("gate_proj" in n for n in took)
    for name in names:
        torch.testing.assert_close(by_outputs[name], by_gram[name], rtol=0, atol=1e-5 * float(by_gram[name][0]))
    assert all(torch.equal(by_gram[n], by_outputs[n]) for n in names if n not in took)
    assert not any(torch.equal(by_gram[n], by_outputs[n]) for n in took)  # a route of their own


@pytest.mark.parametrize("two_sided", [False, True])
def test_spectra_from_the_inputs_equal_those_from_the_grams(two_sided, monkeypatch):
    """Fewer tokens than outputs: the reverse pass keeps the inputs X and takes σ² of X·Wᵀ·R from its t × t Gram, for
    every linear of the tiny model; they equal the Gram routes' (W·XXᵀ·Wᵀ's where it is taken, else XᵀX's at its
    first ridge step), zeros past the tokens' rank included."""
    from svdllm import calibration, importance
    from svdllm.methods import ErrorCorrectedOptions

    model = tiny_model("llama", 64)
    windows = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(4))  # 16 tokens, 64+ outputs
    names = list(make_plan(model, 0.4).ranks)
    ask = Spectra(out_side=ErrorCorrectedOptions()) if two_sided else Spectra()
    routes: dict[str, bool] = {}
    real = importance.whitened_spectrum

    def spy(name, weight, stats, *args):
        routes[name] = stats.inputs is not None
        return real(name, weight, stats, *args)

    monkeypatch.setattr(importance, "whitened_spectrum", spy)
    by_inputs = gradient_statistics(ModelSource(model), windows, names, output_grams=two_sided, spectra=ask,
                                    tokens=16).spectra
    assert routes == dict.fromkeys(names, True)
    monkeypatch.setattr(calibration, "spectra_from_inputs", lambda *a: False)
    by_grams = gradient_statistics(ModelSource(model), windows, names, output_grams=two_sided, spectra=ask,
                                   tokens=16).spectra
    assert not any(routes.values())
    for name in names:
        assert by_inputs[name].shape == by_grams[name].shape == (min(model.get_submodule(name).weight.shape),)
        assert not by_inputs[name][16:].any()
        torch.testing.assert_close(by_inputs[name], by_grams[name], rtol=0, atol=1e-5 * float(by_grams[name][0]))


def test_the_spectra_take_the_outputs_where_they_cost_less():
    """``spectra_from_outputs`` at the shapes it was made for: SmolLM2's default 32×512 tokens take the outputs for
    down_proj alone; a 7B block with the scale benchmark's 512 tokens for every group whose linears are not wider
    than tall, and its down_proj up to about 140k tokens; no tokens, no choice."""
    from svdllm.calibration import spectra_from_outputs

    smol = 32 * 512
    assert spectra_from_outputs(smol, 1536, [576]) and not spectra_from_outputs(smol, 576, [576, 192, 192])
    assert not spectra_from_outputs(smol, 576, [576]) and not spectra_from_outputs(smol, 576, [1536, 1536])
    assert spectra_from_outputs(512, 4096, [4096] * 3) and spectra_from_outputs(512, 4096, [4096])
    assert spectra_from_outputs(512, 11008, [4096]) and not spectra_from_outputs(512, 4096, [11008, 11008])
    assert spectra_from_outputs(128 * 1024, 11008, [4096]) and not spectra_from_outputs(128 * 2048, 11008, [4096])
    assert not spectra_from_outputs(0, 11008, [4096])


@pytest.mark.parametrize("two_sided", [False, True], ids=["one-sided", "two-sided"])
def test_a_spectrum_from_a_weighted_gram_leaves_a_gram_it_was_not_handed(two_sided):
    """``whitened_spectrum`` whitens W·XXᵀ·Wᵀ in place only when its record was handed over; a record it was merely
    shown keeps its Gram to the bit, and the spectrum is the eigenvalues of Rᵀ·W·XXᵀ·Wᵀ·R (R = I one-sided)."""
    from svdllm.calibration import LayerStats
    from svdllm.importance import whitened_spectrum
    from svdllm.methods import ErrorCorrectedOptions
    from svdllm.whitening import output_factor

    g = torch.Generator().manual_seed(5)
    w, x = torch.randn(6, 9, generator=g), torch.randn(40, 9, generator=g, dtype=torch.float64)
    y = x @ w.double().T
    weighted, out_gram = y.T @ y, (lambda a: a.T @ a)(torch.randn(30, 6, generator=g, dtype=torch.float64))
    kept = weighted.clone()
    side = ErrorCorrectedOptions() if two_sided else None
    stats = LayerStats(tokens=40, weighted_gram=weighted)
    got = whitened_spectrum("l", w, stats, out_gram if two_sided else None, side)
    assert torch.equal(weighted, kept) and stats.weighted_gram is weighted
    r = output_factor(out_gram, side.output_damp, side.shrinkage(6, 40))[0] if two_sided else torch.eye(6).double()
    want = torch.linalg.eigvalsh(r.T @ kept @ r).flip(0).clamp_min(0)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10 * float(want[0]))
