"""Rank allocation: the budget is exact, the greedy keeps the best components, uniform is today's rule, and the
statistics it reads equal their references."""
from __future__ import annotations

import random

import pytest
import torch

from conftest import ARCHS, tiny_model
from svdllm import CompressionConfig, compress, make_plan
from svdllm.importance import held_out_losses, interpolate, output_sensitivity, whitened_spectra
from svdllm.ranks import allocate, max_useful_rank, per_type, uniform


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
    cfg = CompressionConfig(method="svdllm-w", ratio=0.4)
    compress(model, torch.randint(0, 64, (4, 32)), cfg, progress=False)
    plan = make_plan(tiny_model("llama", 64), 0.4)
    assert model.config.svdllm["ranks"] == plan.ranks == uniform({n: tuple(plan.shapes[n]) for n in plan.ranks}, 0.4)
    for bad in [dict(rank_rule="best"), dict(rank_rule="loss", rank_floor=1.5), dict(rank_rule="loss", rank_cap=0.5)]:
        with pytest.raises(ValueError, match="--rank"):
            CompressionConfig(**bad).validate()


def test_spectra_give_the_whitened_loss_and_allocation_keeps_the_budget():
    model = tiny_model("qwen2", 64)
    windows = torch.randint(0, 64, (16, 32))
    plan = make_plan(model, 0.4)
    spectra = whitened_spectra(model, windows, plan, torch.device("cpu"))
    compress(model, windows, CompressionConfig(method="svdllm-w", ratio=0.4), progress=False)
    for rec in model.svdllm_report.records:  # svdllm-w sees the dense stream: the same Grams
        s = spectra[rec["name"]]
        assert float(s[rec["rank"]:].sum() / s.sum()) == pytest.approx(rec["loss_whitened"], rel=1e-6, abs=1e-12)
    for rule in ("loss", "fisher"):
        m = tiny_model("qwen2", 64)
        compress(m, windows, CompressionConfig(method="svdllm-ec", ratio=0.4, rank_rule=rule), progress=False)
        ranks, shapes = m.config.svdllm["ranks"], {n: tuple(plan.shapes[n]) for n in plan.ranks}
        assert ranks != plan.ranks and m.svdllm_report.plan["ranks"] == ranks
        check_budget(ranks, shapes, 0.4, 0.5, 2.0)


def test_output_sensitivity_equals_autograd():
    model = tiny_model("llama", 64)
    ids = torch.randint(0, 64, (2, 16))
    names = ["model.layers.0.self_attn.o_proj", "model.layers.1.mlp.down_proj"]
    got = output_sensitivity(model, ids, names, batch_size=2)
    outs: dict[str, torch.Tensor] = {}
    hooks = [model.get_submodule(n).register_forward_hook(lambda _m, _a, o, n=n: outs.__setitem__(n, o)) for n in names]
    emb = model.get_input_embeddings().register_forward_hook(lambda _m, _a, o: o.requires_grad_(True))
    loss = model(input_ids=ids, labels=ids).loss
    grads = torch.autograd.grad(loss, [outs[n] for n in names])
    for h in [*hooks, emb]:
        h.remove()
    for n, g in zip(names, grads):
        assert got[n] == pytest.approx(float(g.double().pow(2).sum()) / (ids.numel() * g.shape[-1]), rel=1e-9)
        assert got[n] > 0


def test_v2_per_type_rule_keeps_each_types_budget_and_favours_lossy_matrices():
    shapes = {f"model.layers.{i}.{t}": s for i in range(6) for t, s in
              [("self_attn.q_proj", (64, 64)), ("self_attn.k_proj", (16, 64)), ("mlp.down_proj", (64, 160))]}
    rng = random.Random(3)
    losses = {n: rng.lognormvariate(0, 2) for n in shapes}
    for ratio in (0.2, 0.6):
        uni = uniform(shapes, ratio)
        for floor, cap in [(0.5, 2.0), (0.9, 1.1)]:
            ranks = per_type(shapes, ratio, losses, floor, cap)
            for t in ("q_proj", "k_proj", "down_proj"):
                group = [n for n in shapes if n.endswith(t)]
                assert 0 <= sum(uni[n] - ranks[n] for n in group) < len(group)  # the type's budget, floored
                assert all(floor * uni[n] - 1 < ranks[n] <= cap * uni[n] for n in group)
                assert all(ranks[n] <= max_useful_rank(*shapes[n]) for n in group)
                by_loss = sorted(group, key=losses.get)
                assert all(ranks[a] <= ranks[b] + 1 for a, b in zip(by_loss, by_loss[1:]))  # more loss, more rank
            if (floor, cap) == (0.5, 2.0):
                assert ranks != uni


def test_held_out_loss_of_a_candidate_equals_the_compressed_models_loss():
    model = tiny_model("llama", 64)
    fit, held = torch.randint(0, 64, (8, 32), generator=torch.Generator().manual_seed(0)).split([6, 2])
    plan = make_plan(model, 0.4)
    more = {n: max_useful_rank(*plan.shapes[n]) for n in plan.ranks}  # uniform's factors are then a slice
    losses = held_out_losses(model, fit, held, plan, {"uniform": plan.ranks, "more": more}, torch.device("cpu"))
    ref = compress(tiny_model("llama", 64), fit, CompressionConfig(method="svdllm-w", ratio=0.4), progress=False)
    with torch.no_grad():  # equal windows: the mean NLL over windows is the mean over tokens
        assert losses["uniform"] == pytest.approx(float(ref(input_ids=held, labels=held).loss), rel=1e-5)
    assert losses["more"] != losses["uniform"]
    assert interpolate({"a": 10}, {"a": 21}, 0.5) == {"a": 15} and interpolate({"a": 3}, {"a": 1}, 1.0) == {"a": 1}


def test_search_picks_the_best_held_out_candidate_within_the_budget():
    model = tiny_model("llama", 64)
    windows = torch.randint(0, 64, (8, 32), generator=torch.Generator().manual_seed(0))
    compress(model, windows, CompressionConfig(method="svdllm-ec", ratio=0.4, rank_rule="search"), progress=False)
    search = model.svdllm_report.rank_search
    assert search["held_out_windows"] == 2 and set(search["loss_by_step"]) == {"0", "0.25", "0.5", "0.75", "1"}
    assert search["chosen"] == min(search["loss_by_step"], key=search["loss_by_step"].get)
    plan = make_plan(tiny_model("llama", 64), 0.4)
    shapes = {n: tuple(plan.shapes[n]) for n in plan.ranks}
    ranks = model.config.svdllm["ranks"]
    assert budget(ranks, shapes) <= budget(plan.ranks, shapes)
    assert budget(plan.ranks, shapes) - budget(ranks, shapes) < sum(sum(s) for s in shapes.values())
    if search["chosen"] == "0":
        assert ranks == plan.ranks


@pytest.mark.parametrize("rule", ["fisher", "search"])
def test_gradient_allocations_refuse_streaming(tmp_path, rule):
    from svdllm.checkpoint import RunDir
    from svdllm.io import ShardSource

    model = tiny_model("llama", 64)
    model.save_pretrained(tmp_path / "m")
    with pytest.raises(ValueError, match="whole model in memory"):
        compress(model, torch.randint(0, 64, (4, 32)), CompressionConfig(rank_rule=rule, offload="disk"),
                 run_dir=RunDir(tmp_path / "run", "x"), source=ShardSource(tmp_path / "m"), progress=False)


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
