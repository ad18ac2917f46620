"""Issue 35, reliability third pass: each test failed on 0.8.0 (silently worse or wrong with exit 0, a user folder
deleted, a traceback, or code that ran without consent)."""
from __future__ import annotations

import doctest
import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers

import svdllm
from conftest import tiny_model
from svdllm.cli import main
from svdllm.errors import DataError, FormatError, OptionError, RunFolderError, SvdllmError


def cli(model: Path, text: Path, out: Path, *extra: str) -> list[str]:
    return ["-q", "compress", str(model), "--calib", str(text), "--eval", str(text), "--nsamples", "8", "--seqlen",
            "32", "--eval-seqlen", "32", "--max-tokens", "512", "--out", str(out), *extra]


def one_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def windows_of(tokens: torch.Tensor, n: int = 8, seqlen: int = 32) -> torch.Tensor:
    return svdllm.sample_windows(tokens, n, seqlen, 0)


# ---------------------------------------------------------------- 1. an output that never reaches the loss


@pytest.mark.parametrize("dead", ["model.layers.0.self_attn.o_proj", "model.layers.1.mlp.down_proj"])
def test_an_output_that_never_reaches_the_loss_gets_the_floor(dead, make_model, calib_tokens):
    """Zeroing o_proj cuts q/k/v off from the loss (zeroing down_proj, gate/up): their truncation costs nothing, so
    the allocation gives them the floor, whatever their one-sided spectra say."""
    from svdllm.ranks import rank_for_ratio

    model = make_model("llama")
    with torch.no_grad():
        model.get_submodule(dead).weight.zero_()
    cut = ["q_proj", "k_proj", "v_proj"] if "o_proj" in dead else ["gate_proj", "up_proj"]
    parent = dead.rsplit(".", 1)[0]  # self_attn holds q/k/v, mlp gate/up
    result = svdllm.compress(model, windows_of(calib_tokens), svdllm.CompressionConfig(ratio=0.4), progress=False)
    ranks = result.report.plan["ranks"]
    for name in cut:
        full = f"{parent}.{name}"
        floor = max(1, math.floor(0.5 * rank_for_ratio(*result.report.plan["shapes"][full], 0.4)))
        assert ranks[full] == floor, (full, ranks[full], floor)


def test_a_zero_output_gram_has_a_zero_two_sided_spectrum_and_a_one_sided_fit():
    from svdllm.whitening import fit_product, output_factor

    torch.manual_seed(0)
    w, x = torch.randn(12, 8, dtype=torch.float64), torch.randn(8, 200, dtype=torch.float64)
    r, remedy = output_factor(torch.zeros(12, 12, dtype=torch.float64), 0.01)
    assert not r.any() and "zero" in remedy
    two_sided = fit_product(w, None, x @ x.T, 3, out_gram=torch.zeros(12, 12, dtype=torch.float64))
    one_sided = fit_product(w, None, x @ x.T, 3)
    torch.testing.assert_close(two_sided.u @ two_sided.v, one_sided.u @ one_sided.v)


# ---------------------------------------------------------------- 2. few calibration tokens per output


def test_the_output_gram_is_shrunk_by_width_over_width_plus_tokens():
    from svdllm.methods import ErrorCorrectedOptions

    assert ErrorCorrectedOptions().shrinkage(576, 512) == pytest.approx(576 / 1088)
    assert ErrorCorrectedOptions().shrinkage(1536, 16384) == pytest.approx(1536 / 17920)
    assert ErrorCorrectedOptions(output_shrinkage=0.0).shrinkage(576, 512) == 0.0  # 0.8.0's Gram alone
    with pytest.raises(OptionError, match="output_shrinkage"):
        ErrorCorrectedOptions(output_shrinkage=1.5).validate()


def test_the_loss_identity_holds_for_the_shrunk_gram():
    """Σ discarded σ² = tr(ΔW C_x ΔWᵀ C_g′) with C_g′ = (1−α)C_g + αμI + damp·μI, built here from its definition."""
    from svdllm.whitening import whiten

    torch.manual_seed(1)
    w = torch.randn(10, 7, dtype=torch.float64)
    x, g = torch.randn(7, 300, dtype=torch.float64), torch.randn(10, 6, dtype=torch.float64)  # rank-deficient C_g
    cx, cg = x @ x.T, g @ g.T
    alpha, damp = 0.4, 0.01
    mu = cg.diagonal().mean()
    used = (1 - alpha) * cg + (alpha + damp) * mu * torch.eye(10, dtype=torch.float64)
    f = whiten(w, cx, 4, out_gram=cg, out_damp=damp, out_shrink=alpha)
    delta = w - f.u @ f.v
    assert float(torch.trace(delta @ cx @ delta.T @ used)) == pytest.approx(f.discarded_energy, rel=1e-9)


def test_full_shrinkage_is_one_sided_whitening():
    from svdllm.whitening import whiten

    torch.manual_seed(2)
    w, x, g = torch.randn(9, 6, dtype=torch.float64), torch.randn(6, 100, dtype=torch.float64), torch.randn(9, 3)
    f = whiten(w, x @ x.T, 3, out_gram=(g @ g.T).double(), out_shrink=1.0)
    one = whiten(w, x @ x.T, 3)
    torch.testing.assert_close(f.u @ f.v, one.u @ one.v)


# ---------------------------------------------------------------- 3. factor scale


@pytest.mark.slow
def test_saved_factors_are_balanced_and_keep_their_product(model_dir, text_file, tmp_path):
    from svdllm.runtime import LowRankLinear

    assert main(cli(model_dir, text_file, tmp_path / "o")) == 0
    model = svdllm.load(tmp_path / "o")
    layers = [m for m in model.modules() if isinstance(m, LowRankLinear)]
    assert layers
    for m in layers:
        nu, nv = m.svd_u.weight.double().norm(dim=0), m.svd_v.weight.double().norm(dim=1)
        torch.testing.assert_close(nu, nv, rtol=1e-5, atol=1e-7)


def test_balancing_keeps_the_product_and_zeroes_a_dead_component():
    from svdllm.whitening import balanced

    torch.manual_seed(3)
    u, v = torch.randn(7, 3, dtype=torch.float64) * 1e3, torch.randn(3, 5, dtype=torch.float64) * 1e-4
    u[:, 2] = 0
    bu, bv = balanced(u, v)
    torch.testing.assert_close(bu @ bv, u @ v)
    torch.testing.assert_close(bu.norm(dim=0)[:2], bv.norm(dim=1)[:2])
    assert not bu[:, 2].any() and not bv[2].any()


def test_a_non_finite_factor_is_caught_where_it_is_made(make_model, calib_tokens, monkeypatch):
    from svdllm.methods import base
    from svdllm.whitening import Factorization

    method = base.METHODS["svdllm-w"]

    def broken(weight, stats, k, opts):
        m, n = weight.shape
        return Factorization(torch.full((m, k), float("inf")), torch.ones(k, n), torch.ones(k), k), {}

    monkeypatch.setitem(base._BY_OPTIONS, method.options, base.Method(method.options, broken, method.needs, ""))
    with pytest.raises(DataError, match="not finite.*`output_damp`"):
        svdllm.compress(make_model("llama"), windows_of(calib_tokens),
                        svdllm.CompressionConfig(method="svdllm-w", rank_rule="uniform"), progress=False)


# ---------------------------------------------------------------- 4. targets


@pytest.mark.parametrize("targets", ["*mlp*", [], ["*mlp*", ""], [" "]])
def test_targets_must_be_a_list_of_patterns(targets):
    with pytest.raises(OptionError, match="targets"):
        svdllm.CompressionConfig(targets=targets).validate()


def test_cli_targets_with_only_commas_is_refused(model_dir, text_file, tmp_path, capsys):
    assert main(cli(model_dir, text_file, tmp_path / "o", "--targets", ",,,")) == 2
    assert "--targets" in one_line(capsys)
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------- 5. folders svdllm did not make


def test_a_save_never_removes_folders_it_did_not_make(model_dir, text_file, tmp_path):
    from svdllm.folder import PARTIAL_MARKER, _marked_folder

    root = tmp_path / "o"
    mine = [root / ".mine.old-4000000", root / ".mine.tmp-3999999-notes", root / ".mine.tmp-3999998-abc"]
    for folder in mine:
        folder.mkdir(parents=True)
        (folder / "notes.txt").write_text("mine")
    (mine[2] / PARTIAL_MARKER).write_text("not abc")  # a marker whose token is not the name's
    done = subprocess.Popen(["true"])
    done.wait()
    stale = _marked_folder(root / "mine", "tmp", pid=done.pid)  # svdllm's own, its process gone
    assert main(cli(model_dir, text_file, root / "mine", "--method", "svd")) == 0
    for folder in mine:
        assert (folder / "notes.txt").read_text() == "mine"
    assert not stale.exists()
    assert sorted(p.name for p in root.iterdir()) == sorted([".mine.old-4000000", ".mine.tmp-3999999-notes",
                                                             ".mine.tmp-3999998-abc", "mine"])


# ---------------------------------------------------------------- 6. the run folder's own files


def test_tensor_files_are_checked_when_read(tmp_path):
    from svdllm.files import atomic_save_file, load_tensors

    path = tmp_path / "t.safetensors"
    atomic_save_file({"a": torch.arange(1000, dtype=torch.float32)}, path)
    assert torch.equal(load_tensors(path)["a"], torch.arange(1000, dtype=torch.float32))
    data = bytearray(path.read_bytes())
    data[-40] ^= 0x10  # one bit of one float
    path.write_bytes(bytes(data))
    with pytest.raises(FormatError, match="damaged"):
        load_tensors(path)
    path.write_bytes(bytes(data[: len(data) // 2]))
    with pytest.raises(FormatError, match="damaged or truncated"):
        load_tensors(path)


@pytest.mark.slow
@pytest.mark.parametrize("damage, target", [("truncate", "block-00000.safetensors"), ("flip", "gradients/grams")])
def test_a_damaged_run_folder_file_is_refused_before_any_work(damage, target, model_dir, text_file, tmp_path,
                                                            monkeypatch, capsys, crash_after_first_block):
    with crash_after_first_block():
        assert main(cli(model_dir, text_file, tmp_path / "o")) == 130
    capsys.readouterr()
    run = tmp_path / ".o.svdllm-run"
    path = run / target if target.endswith(".safetensors") else sorted((run / target).glob("*.safetensors"))[0]
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 2 // 3] if damage == "truncate" else data[:-8] + bytes(b ^ 1 for b in data[-8:]))
    from svdllm import blockloop

    calls = []
    monkeypatch.setattr(blockloop, "_fit_group", lambda *a, **k: calls.append(1))
    assert main(cli(model_dir, text_file, tmp_path / "o")) == 2
    err = one_line(capsys)
    assert path.name in err and "damaged" in err and not calls


def test_a_damaged_state_file_is_refused(tmp_path):
    from svdllm.checkpoint import RunDir

    RunDir(tmp_path / "run", "fp")
    state = tmp_path / "run" / "state.json"
    state.write_text(state.read_text().replace('"next_block": 0', '"next_block": 7'))
    with pytest.raises(RunFolderError, match="damaged"):
        RunDir(tmp_path / "run", "fp")


# ---------------------------------------------------------------- 7. numbers out of range


@pytest.mark.parametrize("extra, flag", [
    (["--rank-cap", "inf"], "--rank-cap"), (["--rank-cap", "1e300"], "--rank-cap"),
    (["--method", "asvd", "--asvd-alpha", "1e10"], "--asvd-alpha"), (["--method", "svdllm-w", "--damp", "inf"], "--damp"),
    (["--method", "svdllm-w", "--damp", "1e300"], "--damp"), (["--output-damp", "1e200"], "--output-damp"),
    (["--beta", "nan"], "--beta"), (["--norm-cap", "inf"], "--norm-cap"), (["--rank-floor", "nan"], "--rank-floor"),
    (["--output-shrinkage", "2"], "--output-shrinkage")])
def test_float_options_are_finite_and_in_range(extra, flag, model_dir, text_file, tmp_path, capsys):
    assert main(cli(model_dir, text_file, tmp_path / "o", *extra)) == 2
    assert one_line(capsys).startswith(f"svdllm compress: error: {flag}")


# ---------------------------------------------------------------- 8. an already quantized folder


@pytest.mark.slow
def test_compressing_a_quantized_folder_is_one_line(model_dir, text_file, tmp_path, capsys):
    pytest.importorskip("optimum.quanto")
    assert main(["-q", "quantize", str(model_dir), "--bits", "8", "--dense", "*", "--eval", "", "--out",
                 str(tmp_path / "q")]) == 0
    capsys.readouterr()
    assert main(cli(tmp_path / "q", text_file, tmp_path / "o")) == 2
    assert "already quantized" in one_line(capsys)


# ---------------------------------------------------------------- 9, 10. one line, or a traceback for a bug


def test_torchruns_sigterm_during_shutdown_leaves_the_one_line(tmp_path, capsys, monkeypatch):
    from svdllm import distributed

    monkeypatch.setattr(distributed, "shutdown", lambda: os.kill(os.getpid(), signal.SIGTERM))
    try:
        assert main(["info", str(tmp_path / "missing")]) == 2
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    one_line(capsys)


def test_a_truncated_index_is_named_and_does_not_stop_an_in_memory_run(model_dir, tmp_path):
    from svdllm.source import Shards, should_stream

    (model_dir / "model.safetensors.index.json").write_text('{"metadata": {"total_size": 1}, "weight_map": {"a')
    with pytest.raises(FormatError, match="model.safetensors.index.json is damaged"):
        Shards(model_dir)
    assert should_stream(str(model_dir), None) is False


def test_a_bad_launcher_variable_is_named(model_dir, monkeypatch):
    from svdllm.source import should_stream

    monkeypatch.setenv("LOCAL_WORLD_SIZE", "abc")
    with pytest.raises(SvdllmError, match="LOCAL_WORLD_SIZE='abc' is not a whole number"):
        should_stream(str(model_dir), None)


def test_a_bug_while_loading_a_folder_stays_a_traceback(model_dir, text_file, tmp_path, monkeypatch):
    from svdllm import folder

    assert main(cli(model_dir, text_file, tmp_path / "o", "--method", "svd")) == 0

    class Broken:
        @staticmethod
        def from_pretrained(*a, **k):
            raise ValueError("a bug of svdllm's")

    monkeypatch.setattr(folder, "model_class", lambda base: Broken)
    with pytest.raises(ValueError, match="a bug of svdllm's") as err:
        svdllm.load(tmp_path / "o")
    assert not isinstance(err.value, FormatError)


# ---------------------------------------------------------------- 11, 12. code that runs only with consent


@pytest.mark.slow
def test_code_appended_to_a_runtime_file_is_refused(model_dir, text_file, tmp_path, capsys):
    from svdllm.files import sha256_file
    from svdllm.folder import MANIFEST_FILE

    assert main(cli(model_dir, text_file, tmp_path / "o", "--method", "svd")) == 0
    capsys.readouterr()
    out = tmp_path / "o"
    for name in ("svdllm_lowrank.py", "modeling_svdllm.py"):
        code = out / name
        original = code.read_text()
        code.write_text(original + "\nimport os; os.system('echo owned')\n")
        assert main(["info", str(out)]) == 2
        assert name in one_line(capsys)
        with pytest.raises(FormatError, match=name):
            svdllm.load(out)
        manifest = json.loads((out / MANIFEST_FILE).read_text())  # a forged manifest does not help
        manifest["files"][name] = sha256_file(code)
        (out / MANIFEST_FILE).write_text(json.dumps(manifest))
        with pytest.raises(FormatError, match=f"{name} is not the code svdllm"):
            svdllm.verify(out)
        code.write_text(original)
        manifest["files"][name] = sha256_file(code)
        (out / MANIFEST_FILE).write_text(json.dumps(manifest))
    (out / "extra.py").write_text("print('hi')\n")
    with pytest.raises(FormatError, match="extra.py is not in"):
        svdllm.verify(out)
    (out / "extra.py").unlink()
    assert "identical to svdllm" in svdllm.verify(out).code


@pytest.mark.slow
def test_a_folder_that_needs_its_own_code_is_refused_without_consent(model_dir, text_file, tmp_path, capsys):
    folder = tmp_path / "custom"
    folder.mkdir()
    marker = tmp_path / "ran"
    (folder / "config.json").write_text(json.dumps({"model_type": "svdllm_test_custom", "auto_map": {
        "AutoConfig": "conf.CustomConfig", "AutoModelForCausalLM": "conf.CustomModel"}}))
    (folder / "conf.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    (folder / "model.safetensors").write_bytes((model_dir / "model.safetensors").read_bytes())
    proc = subprocess.run([sys.executable, "-m", "svdllm", "-q", "compress", str(folder), "--calib", str(text_file),
                           "--eval", "", "--nsamples", "2", "--seqlen", "32", "--out", str(tmp_path / "o")],
                          input="y\ny\n", capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "--trust-remote-code" in proc.stderr, proc.stderr
    assert not marker.exists()


@pytest.mark.slow
def test_include_path_imports_only_the_tasks_asked_for(tmp_path, caplog):
    pytest.importorskip("lm_eval")
    from svdllm.zeroshot import resolve_tasks

    tasks = tmp_path / "tasks"
    tasks.mkdir()
    data = tasks / "docs.jsonl"
    data.write_text("".join(json.dumps({"q": f"question {i}", "a": 0}) + "\n" for i in range(3)))
    for name in ("task_a", "task_b"):
        (tasks / f"{name}_fn.py").write_text(
            f"open({str(tmp_path / name)!r}, 'w').write('imported')\n\ndef text(doc):\n    return doc['q']\n")
        (tasks / f"{name}.yaml").write_text(
            f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\ntest_split: test\n"
            f"output_type: multiple_choice\ndoc_to_text: !function {name}_fn.text\ndoc_to_target: a\n"
            "doc_to_choice: ['yes', 'no']\nmetric_list:\n  - metric: acc\n")
    with pytest.raises(OptionError, match="unknown lm-eval task"):
        resolve_tasks("no_such_task", str(tasks))
    assert not (tmp_path / "task_a").exists() and not (tmp_path / "task_b").exists()
    with caplog.at_level("WARNING", logger="svdllm"):
        names, _ = resolve_tasks("task_a", str(tasks))
    assert names == ["task_a"] and (tmp_path / "task_a").exists() and not (tmp_path / "task_b").exists()
    assert "runs any Python code" in caplog.text


# ---------------------------------------------------------------- 13. every command that writes a folder locks it


@pytest.mark.slow
@pytest.mark.parametrize("command", ["quantize", "finetune"])
def test_every_command_that_writes_a_folder_takes_the_lock(command, model_dir, text_file, tmp_path, capsys):
    from svdllm.checkpoint import OutputLock

    assert main(cli(model_dir, text_file, tmp_path / "c", "--method", "svd")) == 0
    capsys.readouterr()
    argv = {"quantize": ["quantize", str(tmp_path / "c"), "--bits", "8", "--eval", ""],
            "finetune": ["finetune", str(tmp_path / "c"), "--data", str(text_file), "--eval", "", "--steps", "1",
                         "--seqlen", "32"]}[command]
    with OutputLock(tmp_path / "x"):
        assert main(["-q", *argv, "--out", str(tmp_path / "x")]) == 2
        assert "being written by process" in one_line(capsys)
    assert not (tmp_path / "x").exists()


# ---------------------------------------------------------------- small ones


@pytest.mark.slow
def test_a_skipped_evaluation_does_not_check_its_window(tmp_path, tokenizer, text_file):
    path = tmp_path / "gpt2"
    tiny_model("gpt2", len(tokenizer)).save_pretrained(path)  # 256 learned positions
    tokenizer.save_pretrained(path)
    argv = ["-q", "compress", str(path), "--calib", str(text_file), "--eval", "", "--eval-seqlen", "1000",
            "--nsamples", "2", "--seqlen", "32", "--method", "svd", "--out", str(tmp_path / "o")]
    assert main(argv) == 0


def test_an_empty_out_is_refused(model_dir, text_file, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(cli(model_dir, text_file, Path(""))[:-1] + [""]) == 2
    assert "--out" in one_line(capsys) and not (tmp_path / "out").exists()


def test_the_package_docstring_runs():
    result = doctest.testmod(svdllm)
    assert result.attempted >= 2 and result.failed == 0


def test_a_jsonl_with_a_byte_order_mark_is_read(tmp_path):
    from svdllm.data import load_text

    path = tmp_path / "d.jsonl"
    path.write_bytes("\ufeff".encode() + b'{"text": "hello"}\n{"text": "world"}\n')
    assert load_text(str(path)) == "hello\n\nworld"


def test_an_impossible_finetune_batch_is_refused_by_an_estimate(make_model):
    from svdllm.finetune import FinetuneConfig, _check_fits

    model = make_model("llama")
    with pytest.raises(OptionError, match="finetune.batch_size.*GiB"):
        _check_fits(model, FinetuneConfig(batch_size=10**9, seqlen=32), torch.device("cpu"), torch.float32)
    with pytest.raises(OptionError, match="finetune.seqlen.*256 positions"):
        _check_fits(model, FinetuneConfig(seqlen=100000), torch.device("cpu"), torch.float32)
    _check_fits(model, FinetuneConfig(), torch.device("cpu"), torch.float32)


@pytest.mark.slow
def test_recompressing_a_compressed_folder_does_not_call_it_dense(model_dir, text_file, tmp_path, capsys):
    assert main(cli(model_dir, text_file, tmp_path / "m", "--method", "svd", "--targets", "*mlp*")) == 0
    capsys.readouterr()
    assert main([*cli(tmp_path / "m", text_file, tmp_path / "a", "--method", "svd", "--targets", "*attn*")][1:]) == 0
    out = capsys.readouterr().out
    assert "| before |" in out and "| dense |" not in out


def test_the_report_says_which_shrinkage_each_matrix_used(make_model, calib_tokens):
    windows = windows_of(calib_tokens)
    result = svdllm.compress(make_model("llama"), windows, svdllm.CompressionConfig(ratio=0.4), progress=False)
    tokens = windows.numel()
    for record in result.report.records:
        if record["rank"] is not None:
            width = record["shape"][0]
            assert record["output_shrinkage"] == pytest.approx(width / (width + tokens)), record["name"]
