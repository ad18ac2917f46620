"""Issue 13: never a silently wrong model. Each test here failed on 0.1.0/0.2.0-dev."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from svdllm import CompressionConfig, compress, load, sample_windows, save
from svdllm.errors import FormatError
from svdllm.runtime import LowRankLinear


def windows(tokens: torch.Tensor) -> torch.Tensor:
    return sample_windows(tokens, 8, 32, 0)


@pytest.fixture
def saved(make_model, tokenizer, calib_tokens, tmp_path):
    model = make_model("llama")
    result = compress(model, windows(calib_tokens), CompressionConfig(ratio=0.4, method="svdllm-w"), progress=False)
    return model, save(result, tokenizer, tmp_path / "c")


def edit_config(folder, change) -> None:
    """Change config.json and rewrite the manifest to match, as a forger would: the deeper check must refuse it."""
    cfg = json.loads((folder / "config.json").read_text())
    change(cfg)
    (folder / "config.json").write_text(json.dumps(cfg))
    refresh_manifest(folder)


def refresh_manifest(folder) -> None:
    from svdllm.files import sha256_file
    from svdllm.folder import MANIFEST_FILE

    files = {p.name: sha256_file(p) for p in sorted(folder.iterdir()) if p.name != MANIFEST_FILE}
    (folder / MANIFEST_FILE).write_text(json.dumps({"files": files}))


def test_an_edited_config_is_refused_by_the_manifest(saved):
    _, out = saved
    cfg = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps(dict(cfg, architectures=["LlamaForCausalLM"], extra=1)))
    with pytest.raises(FormatError, match="config.json was changed after svdllm wrote it"):
        load(out)


def test_two_passes_keep_both_passes_ranks(make_model, tokenizer, calib_tokens, tmp_path):
    model = make_model("llama")
    compress(model, windows(calib_tokens), CompressionConfig(ratio=0.4, method="svdllm-w", skip_layers=[1]),
             progress=False)
    second = compress(model, windows(calib_tokens), CompressionConfig(ratio=0.3, method="svdllm-w", skip_layers=[0]),
                      progress=False)
    ranks = second.record.ranks
    assert {n.split(".")[2] for n in ranks} == {"0", "1"} and len(ranks) == 14
    out = save(second, tokenizer, tmp_path / "two")
    ids = calib_tokens[:40][None]
    with torch.no_grad():
        assert torch.equal(load(out)(ids).logits, model(ids).logits)


def test_a_tensor_the_model_does_not_use_is_refused(saved):
    from safetensors.torch import load_file, save_file

    from svdllm.files import sha256_file

    _, out = saved
    shard = out / "model-00003-of-00003.safetensors"
    tensors = load_file(str(shard))
    save_file(dict(tensors, **{"model.extra.weight": torch.zeros(3)}), str(shard), {"format": "pt"})
    index = json.loads((out / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.extra.weight"] = shard.name
    (out / "model.safetensors.index.json").write_text(json.dumps(index))
    edit_config(out, lambda c: c["svdllm"]["shards"].update({shard.name: sha256_file(shard)}))
    with pytest.raises(FormatError, match="unexpected key model.extra.weight"):
        load(out)


@pytest.mark.parametrize("arch", [["AutoModelForCausalLM"], ["LlamaModel"], ["logging"], ["is_torch_available"],
                                  [], [5], None])
def test_architectures_must_name_a_causal_lm_class(saved, arch):
    _, out = saved
    edit_config(out, lambda c: c.update(architectures=arch))
    with pytest.raises(FormatError, match="is not a transformers causal-LM class"):
        load(out)


@pytest.mark.parametrize("beta", [0.0, 0.25, 0.5, 1.0])
def test_error_corrected_gives_the_whitening_factors_when_the_streams_agree(beta):
    from svdllm.calibration import LayerStats
    from svdllm.methods import METHODS, ErrorCorrectedOptions, WhiteningOptions

    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 12, generator=g, dtype=torch.float64) @ torch.randn(12, 12, generator=g, dtype=torch.float64)
    w = torch.randn(9, 12, generator=g, dtype=torch.float64)
    gram = x.T @ x
    stats = LayerStats(tokens=300, gram=gram, comp_gram=gram, cross=gram)
    white, _ = METHODS["svdllm-w"].factorize(w, stats, 5, WhiteningOptions(damp=1e-4))
    ec, _ = METHODS["svdllm-ec"].factorize(w, stats, 5, ErrorCorrectedOptions(beta=beta, ec_damp=1e-4, output_whitening=False))
    torch.testing.assert_close(ec.u @ ec.v, white.u @ white.v, rtol=1e-9, atol=1e-9)
    full, _ = METHODS["svdllm-ec"].factorize(w, stats, 9, ErrorCorrectedOptions(beta=beta, ec_damp=1e-4, output_whitening=False))
    torch.testing.assert_close(full.u @ full.v, w, rtol=1e-9, atol=1e-9)  # full rank: W itself, ridge or not


@pytest.mark.parametrize("method", ["svdllm-w", "svdllm-ec"])
def test_weights_of_the_kept_rank_come_back_exactly(method, make_model, calib_tokens):
    """Every weight is exactly rank k: compression loses nothing, X′ = X, and the logits are the dense ones."""
    from svdllm.architecture import block_linears, dense_weight
    from svdllm.ranks import rank_for_ratio

    model = make_model("llama")
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for i, block in enumerate(model.model.layers):
            for _, m in block_linears(block, f"model.layers.{i}").items():
                w, _ = dense_weight(m)
                k = rank_for_ratio(*w.shape, 0.4)
                w.copy_(torch.randn(w.shape[0], k, generator=g) @ torch.randn(k, w.shape[1], generator=g) / k**0.5)
    ids = calib_tokens[:64][None]
    with torch.no_grad():
        dense = model(ids).logits
    compress(model, windows(calib_tokens), CompressionConfig(ratio=0.4, method=method), progress=False)
    assert all(isinstance(m, LowRankLinear) for n, m in model.named_modules() if n.endswith("proj"))
    with torch.no_grad():
        assert (model(ids).logits - dense).abs().max() < 1e-3


# ---------------------------------------------------------------- user files and atomic output


def cli_args(model_dir, text_file, out, *extra):
    return ["-q", "compress", str(model_dir), "--calib", str(text_file), "--eval", "", "--nsamples", "4",
            "--seqlen", "32", "--method", "svd", "--out", str(out), *extra]


def test_force_replaces_only_what_svdllm_wrote(model_dir, text_file, tmp_path, capsys):
    from svdllm.cli import main

    user = tmp_path / "photos"
    user.mkdir()
    (user / "cat.jpg").write_text("precious")
    assert main(cli_args(model_dir, text_file, user, "--force")) == 2
    assert "svdllm did not write" in capsys.readouterr().err and (user / "cat.jpg").read_text() == "precious"
    out = tmp_path / "mine"
    assert main(cli_args(model_dir, text_file, out)) == 0
    assert main(cli_args(model_dir, text_file, out, "--force")) == 0  # its own earlier output: replaced


@pytest.mark.parametrize("where", ["file", "dot", "readonly"])
def test_unwritable_out_is_refused_before_any_work(model_dir, text_file, tmp_path, capsys, monkeypatch, where):
    import os

    import svdllm
    from svdllm.cli import main

    (tmp_path / "afile").write_text("x")
    ro = tmp_path / "ro"
    ro.mkdir()
    out = {"file": tmp_path / "afile" / "sub" / "o", "dot": ".", "readonly": ro / "o"}[where]
    if where == "readonly":
        if os.geteuid() == 0:
            monkeypatch.setattr(os, "access", lambda p, mode: Path(p) != ro)  # root may write anywhere
        else:
            ro.chmod(0o500)
    monkeypatch.setattr(svdllm, "compress", lambda *a, **k: pytest.fail("compressed before checking --out"))
    assert main(cli_args(model_dir, text_file, out)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--out" in err


def test_report_and_loss_files_are_inside_the_atomic_save(make_model, tokenizer, calib_tokens, tmp_path, monkeypatch):
    """The folder appears with everything in it: a kill after the rename loses nothing."""
    import os

    import svdllm.folder

    model = make_model("llama")
    result = compress(model, windows(calib_tokens), CompressionConfig(ratio=0.4, method="svd"), progress=False)
    seen = {}
    real = os.replace

    def spy(src, dst):
        if Path(dst).name == "c":
            seen["files"] = sorted(p.name for p in Path(src).iterdir())
        return real(src, dst)

    monkeypatch.setattr(svdllm.folder.os, "replace", spy)
    save(result, tokenizer, tmp_path / "c", write_extra=lambda d: (d / "finetune_losses.json").write_text("[]"))
    assert {"svdllm_report.json", "finetune_losses.json"} <= set(seen["files"])


def test_a_killed_save_leaves_nothing_for_long(make_model, tokenizer, calib_tokens, tmp_path):
    import subprocess
    import sys

    model = make_model("llama")
    result = compress(model, windows(calib_tokens), CompressionConfig(ratio=0.4, method="svd"), progress=False)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)  # a process that has exited
    from svdllm.folder import _marked_folder

    for kind in ("tmp", "old"):  # svdllm's own (marked), their process gone: removed
        stale = _marked_folder(tmp_path / "c", kind, pid=pid)
        (stale / "model.safetensors").write_bytes(b"0" * 1000)
    live = _marked_folder(tmp_path / "c", "tmp")  # a live process's: kept
    save(result, tokenizer, tmp_path / "c")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["c", live.name])


def os_getpid() -> int:
    import os

    return os.getpid()


@pytest.mark.slow
def test_sigterm_during_compress_cleans_up(model_dir, text_file, tmp_path):
    import subprocess
    import sys

    driver = ("import os, signal, sys, svdllm, svdllm.cli, svdllm.folder\n"
              "real = svdllm.folder._write_shards\n"
              "def hook(tmp, *a):\n"
              "    real(tmp, *a)\n"
              "    os.kill(os.getpid(), signal.SIGTERM)\n"
              "svdllm.folder._write_shards = hook\n"
              "sys.exit(svdllm.cli.main(sys.argv[1:]))\n")
    proc = subprocess.run([sys.executable, "-c", driver, *cli_args(model_dir, text_file, tmp_path / "o")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 130 and "interrupted" in proc.stderr
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".o.tmp")] and not (tmp_path / "o").exists()


# ---------------------------------------------------------------- one line, exit code 2


@pytest.mark.parametrize("rows, message", [
    ('5\n', "must be an object"), ('null\n', "must be an object"), ('{"text": null}\n', "'text' must be a string"),
])
def test_bad_jsonl_rows(model_dir, tmp_path, capsys, rows, message):
    from svdllm.cli import main

    data = tmp_path / "d.jsonl"
    data.write_text(rows)
    assert main(cli_args(model_dir, data, tmp_path / "o")) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and str(data) in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("extra, message", [
    (["--skip-layers", "1-0"], "is empty"), (["--skip-layers", "0-1"], "leaves none of the 2 blocks"),
    (["--max-tokens", "-5"], "must be at least 1"), (["--beta", "0.5"], "--beta: does not apply to method svd"),
])
def test_bad_options_are_one_line(model_dir, text_file, tmp_path, capsys, extra, message):
    from svdllm.cli import main

    try:
        code = main(cli_args(model_dir, text_file, tmp_path / "o", *extra))
    except SystemExit as exc:  # argparse's own refusals
        code = exc.code
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and "Traceback" not in err


def test_eval_seqlen_zero_and_non_utf8_text(model_dir, tmp_path, capsys):
    from svdllm.cli import main

    bad = tmp_path / "latin1.txt"
    bad.write_bytes("café ".encode("latin-1") * 100)
    assert main(["-q", "eval", str(model_dir), "--data", str(bad)]) == 2
    assert f"{bad} is not UTF-8" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["-q", "eval", str(model_dir), "--seqlen", "0"])
    assert "must be at least 1" in capsys.readouterr().err


@pytest.mark.parametrize("edit, message", [
    (lambda c: c["svdllm"]["ranks"].pop("model.layers.0.mlp.up_proj"), "missing key model.layers.0.mlp.up_proj.weight"),
    (lambda c: c["svdllm"]["ranks"].update({"model.layers.1.mlp.up_proj": 3}), "config records rank 3"),
    (lambda c: c["svdllm"].update(ranks=[1, 2]), "ranks must map"),
    (lambda c: c["svdllm"].update(shards=["model.safetensors"]), "shards must map"),
    (lambda c: c["svdllm"].update(format_version=0), "format_version must be a whole number"),
    (lambda c: c["svdllm"].update(format_version="1"), "format_version must be a whole number"),
    (lambda c: c["svdllm"].update(shards={"/etc/hostname": "0" * 64}), "not a .safetensors file inside"),
    (lambda c: c["svdllm"].update(shards={"../x.safetensors": "0" * 64}), "not a .safetensors file inside"),
])
def test_dropped_edited_or_malformed_sections_are_format_errors(saved, edit, message):
    _, out = saved
    edit_config(out, edit)
    with pytest.raises(FormatError, match=message):
        load(out)


def test_config_json_that_is_a_list(saved):
    _, out = saved
    (out / "config.json").write_text("[1, 2]")
    with pytest.raises(FormatError, match="not a JSON object"):
        load(out)


def test_pickled_weights_and_local_looking_paths_are_refused_at_once(tmp_path, monkeypatch, capsys):
    import time

    from svdllm.cli import main

    folder = tmp_path / "plain"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x04")
    assert main(["-q", "eval", str(folder)]) == 2
    assert "never unpickles" in capsys.readouterr().err
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    t0 = time.perf_counter()
    assert main(["-q", "eval", "models/nothing"]) == 2
    assert time.perf_counter() - t0 < 5 and "model not found" in capsys.readouterr().err


def fuzz_cases(section: dict) -> list[tuple[str, object]]:
    """(description, edit) for dropping, retyping and renaming each key of the svdllm section and architectures."""
    cases = []
    for key in list(section) + ["architectures"]:
        where = (lambda c: c) if key == "architectures" else (lambda c: c["svdllm"])
        cases.append((f"drop {key}", lambda c, k=key, w=where: w(c).pop(k)))
        cases.append((f"rename {key}", lambda c, k=key, w=where: w(c).__setitem__(k + "_x", w(c).pop(k))))
        for value in (None, 7, "x", [1], {"a": 1}):
            cases.append((f"{key}={value!r}", lambda c, k=key, w=where, v=value: w(c).__setitem__(k, v)))
    return cases


@pytest.mark.slow
def test_fuzzed_configs_give_a_format_error_or_the_same_model(saved, tmp_path):
    """Every mutation of a saved config either loads the very same model or fails with a one-line FormatError."""
    import shutil

    model, out = saved
    ids = torch.arange(40)[None] % 300
    with torch.no_grad():
        ref = model(ids).logits
    section = json.loads((out / "config.json").read_text())["svdllm"]
    outcomes = {"refused": 0, "same": 0}
    for i, (what, edit) in enumerate(fuzz_cases(section)):
        folder = tmp_path / f"f{i}"
        shutil.copytree(out, folder)
        edit_config(folder, edit)
        try:
            loaded = load(folder)
        except FormatError as exc:
            assert len(str(exc).splitlines()) == 1, what
            outcomes["refused"] += 1
            continue
        with torch.no_grad():
            assert torch.equal(loaded(ids).logits, ref), what
        outcomes["same"] += 1
    assert outcomes["refused"] > 20 and outcomes["same"] > 5, outcomes
