"""Block refinement: held-out error never worse than the closed form's, the same factors in memory and streamed,
a kill during refinement resumes to identical shards, a non-finite step keeps the closed form; presets."""
from __future__ import annotations

import json
from contextlib import nullcontext
from dataclasses import replace

import pytest
import torch

import svdllm
from svdllm import CompressionConfig, compress, sample_windows
from svdllm.calibration import NEXT, ActivationStream
from svdllm.cli import main
from svdllm.errors import OptionError
from svdllm.refine import RefineOptions
from svdllm.runtime import LowRankLinear

from test_streaming import Crash, digests, sharded_dir, state  # noqa: F401  (sharded_dir is a fixture)

REFINE = RefineOptions(steps=12, lr=1e-5, eval_every=4, patience=3)


def factors(model) -> dict[str, torch.Tensor]:
    return {f"{n}.{side}": getattr(m, side).weight.detach().clone() for n, m in model.named_modules()
            if isinstance(m, LowRankLinear) for side in ("svd_u", "svd_v")}


def held_out_error(dense, compressed, windows: torch.Tensor, block: int) -> float:
    """Mean squared error of block ``block``'s output on ``windows`` given the same input (the embedding, for block
    0): written from the models' own forwards, independently of svdllm's streams."""
    with torch.no_grad():
        want = dense(input_ids=windows, output_hidden_states=True).hidden_states[block + 1]
        got = compressed(input_ids=windows, output_hidden_states=True).hidden_states[block + 1]
    return float((got - want).double().pow(2).mean())


@pytest.mark.parametrize("method", ["svdllm-w", "svdllm-ec"])
def test_a_refined_block_has_a_lower_held_out_error_and_a_kept_one_is_the_closed_form(make_model, calib_tokens,
                                                                                          method):
    windows = sample_windows(calib_tokens, 16, 32, 0)
    cfg = CompressionConfig(ratio=0.4, method=method, rank_rule="uniform", batch_size=4)
    dense = make_model("llama")
    closed = compress(make_model("llama"), windows, cfg, progress=False).model
    result = compress(make_model("llama"), windows, replace(cfg, refine=REFINE), progress=False)
    records = result.report.refinement
    assert [r["block"] for r in records] == [0, 1]
    assert all(r["heldout_after"] <= r["heldout_before"] for r in records)  # never worse where it is judged
    first = records[0]
    held = windows[14:]  # 16 windows, 12.5% held out: the last 2
    # the record's held-out errors are the block's own, measured here from the models' outputs (block 0's input
    # is the embedding in both)
    assert first["heldout_before"] == pytest.approx(held_out_error(dense, closed, held, 0), rel=1e-4)
    assert first["heldout_after"] == pytest.approx(held_out_error(dense, result.model, held, 0), rel=1e-4)
    got, want = factors(result.model), factors(closed)
    block0 = [k for k in want if ".0." in k]
    if first["outcome"] == "closed form kept":
        assert all(torch.equal(got[k], want[k]) for k in block0)
    else:
        assert first["heldout_after"] < first["heldout_before"] and first["steps"] > 0
        assert not all(torch.equal(got[k], want[k]) for k in block0)
    assert any(r["outcome"].startswith("refined") for r in records)  # lr 1e-5: the tiny model's blocks gain
    assert "refinement" in result.report.timings


def test_a_non_finite_step_keeps_the_closed_form_and_says_so(make_model, calib_tokens, monkeypatch):
    windows = sample_windows(calib_tokens, 8, 32, 0)
    cfg = CompressionConfig(ratio=0.4, method="svdllm-w", rank_rule="uniform", batch_size=4)
    closed = factors(compress(make_model("llama"), windows, cfg, progress=False).model)
    real = ActivationStream.hidden

    def poisoned(self, lane, j, device):  # the dense block's outputs of the first training batch: infinite
        out = real(self, lane, j, device)
        return out * float("inf") if lane == NEXT and j == 0 else out

    monkeypatch.setattr(ActivationStream, "hidden", poisoned)
    result = compress(make_model("llama"), windows, replace(cfg, refine=REFINE), progress=False)
    assert all(r["outcome"] == "stopped at step 1: the loss is not finite; closed form kept"
               for r in result.report.refinement)
    got = factors(result.model)
    assert all(torch.equal(got[k], closed[k]) for k in closed)


def test_refinement_in_bfloat16_keeps_the_models_dtype(make_model, calib_tokens):
    """fp32 master factors under autocast; the factors go back to the block's dtype."""
    windows = sample_windows(calib_tokens, 8, 32, 0)
    model = make_model("llama").to(torch.bfloat16)
    result = compress(model, windows, CompressionConfig(ratio=0.4, method="svdllm-w", rank_rule="uniform",
                                                        refine=REFINE), progress=False)
    assert {t.dtype for t in factors(result.model).values()} == {torch.bfloat16}
    assert all(r["heldout_after"] <= r["heldout_before"] for r in result.report.refinement)
    assert all(not p.requires_grad for p in factors(result.model).values())


def refine_options(model, text, out, **extra) -> svdllm.CompressOptions:
    config = svdllm.CompressionConfig(method=extra.pop("method", "svdllm-ec"), ratio=0.4, rank_rule="uniform",
                                      batch_size=1, refine=REFINE)
    return svdllm.CompressOptions(model=str(model), compression=config, calib=str(text), eval=(str(text),),
                                  nsamples=8, seqlen=32, eval_seqlen=32, max_tokens=512, out=str(out),
                                  progress=False, **extra)


@pytest.mark.parametrize("method", ["svdllm-w", "svdllm-ec"])
def test_refinement_streamed_equals_in_memory(sharded_dir, text_file, tmp_path, method):  # noqa: F811
    for name, low in (("mem", False), ("disk", True)):
        svdllm.run_compression(refine_options(sharded_dir, text_file, tmp_path / name, method=method,
                                              low_memory=low))
    a, b = state(tmp_path / "mem"), state(tmp_path / "disk")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ra, rb = (json.loads((tmp_path / d / "svdllm_report.json").read_text()) for d in ("mem", "disk"))
    assert ra["refinement"] == rb["refinement"] and len(ra["refinement"]) == 4


@pytest.mark.parametrize("low_memory", [False, True])
def test_a_kill_during_refinement_resumes_to_identical_shards(sharded_dir, text_file, tmp_path, monkeypatch,  # noqa: F811
                                                              low_memory):
    svdllm.run_compression(refine_options(sharded_dir, text_file, tmp_path / "whole", low_memory=low_memory))
    steps = {"n": 0}
    real = torch.optim.Adam.step

    def step(self, *a, **k):  # killed in block 2's refinement (12 steps a block, unless a block stops early)
        steps["n"] += 1
        if steps["n"] == 2 * REFINE.steps + 3:
            raise Crash("killed while refining")
        return real(self, *a, **k)

    with monkeypatch.context() as m:
        m.setattr(torch.optim.Adam, "step", step)
        with pytest.raises(Crash):
            svdllm.run_compression(refine_options(sharded_dir, text_file, tmp_path / "resumed",
                                                  low_memory=low_memory))
    svdllm.run_compression(refine_options(sharded_dir, text_file, tmp_path / "resumed", low_memory=low_memory,
                                          resume=True))
    assert digests(tmp_path / "resumed") == digests(tmp_path / "whole")
    whole, resumed = (json.loads((tmp_path / d / "svdllm_report.json").read_text()) for d in ("whole", "resumed"))
    assert whole["refinement"] == resumed["refinement"] and whole["records"] == resumed["records"]


def test_presets_are_plain_options_and_flags_override_them():
    from svdllm.cli import build_parser, compress_options
    from svdllm.workflow import preset

    parse = build_parser().parse_args
    assert svdllm.preset is preset and svdllm.RefineOptions is RefineOptions  # the package's own names
    assert preset("balanced") == svdllm.CompressOptions()
    best = preset("best")
    assert (best.compression.refine.steps, best.compression.refine.lr) == (64, 1e-3)
    assert replace(best.compression, refine=RefineOptions()) == svdllm.CompressOptions().compression
    assert best.nsamples == 2 * svdllm.CompressOptions().nsamples
    assert compress_options(parse(["compress", "--preset", "best", "--nsamples", "8"])).nsamples == 8
    fast = preset("fast").compression
    assert (fast.method.name, fast.rank_rule) == ("svdllm-w", "uniform")
    assert compress_options(parse(["compress", "--preset", "best"])) == best
    mixed = compress_options(parse(["compress", "--preset", "fast", "--method", "svdllm", "--refine-steps", "4",
                                    "--nsamples", "8"]))
    assert (mixed.compression.method.name, mixed.compression.rank_rule, mixed.compression.refine.steps,
            mixed.nsamples) == ("svdllm", "uniform", 4, 8)
    with pytest.raises(OptionError, match="unknown preset"):
        preset("slow")


@pytest.mark.parametrize("flag, value, error", [("--refine-lr", "0", "--refine-lr: must be in (0, 1]"),
                                                ("--refine-steps", "-1", "--refine-steps: must be a non-negative"),
                                                ("--preset", "slow", "invalid choice: 'slow'")])
def test_bad_refinement_options_are_one_line(model_dir, tmp_path, capsys, flag, value, error):
    with pytest.raises(SystemExit) if flag == "--preset" else nullcontext():
        code = main(["-q", "compress", str(model_dir), "--out", str(tmp_path / "o"), flag, value])
        assert code == 2
    err = capsys.readouterr().err
    assert error in err and not (tmp_path / "o").exists()


def test_refinement_needs_a_window_to_train_on():
    with pytest.raises(OptionError, match="no calibration window to train on"):
        RefineOptions(steps=1, holdout=0.5).split(1)
