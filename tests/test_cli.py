"""The command line on a tiny model: it works, and every bad input is one line and exit code 2."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from svdllm.cli import main





def compress_args(model_dir: Path, text_file: Path, out: Path, *extra: str) -> list[str]:
    return ["-q", "compress", str(model_dir), "--calib", str(text_file), "--eval", str(text_file),
            "--nsamples", "4", "--seqlen", "32", "--eval-seqlen", "32", "--max-tokens", "256", "--out", str(out), *extra]


def test_compress_eval_info_generate(model_dir, text_file, tmp_path, capsys):
    out = tmp_path / "c"
    code = main(compress_args(model_dir, text_file, out, "--ratio", "0.3", "--method", "svdllm"))
    printed = capsys.readouterr().out
    assert code == 0
    assert "| perplexity" in printed and "| phase | seconds |" in printed and "compressed linears" in printed
    report = json.loads((out / "svdllm_report.json").read_text())
    assert report["records"] and all("loss" in r and "loss_before_update" in r for r in report["records"])
    assert report["perplexity"]["compressed"][str(text_file)] > 1

    js = tmp_path / "eval.json"
    assert main(["-q", "eval", str(out), "--data", str(text_file), "--seqlen", "32", "--max-tokens", "256",
                 "--json", str(js)]) == 0
    result = json.loads(js.read_text())
    assert result["perplexity"][str(text_file)] == pytest.approx(report["perplexity"]["compressed"][str(text_file)],
                                                                 rel=1e-4)
    assert result["parameters"] == report["params_after"] < report["params_before"]
    capsys.readouterr()

    assert main(["info", str(out)]) == 0
    info = capsys.readouterr().out
    assert '"method": "svdllm"' in info and "model.layers.1.mlp.down_proj" in info

    assert main(["generate", str(out), "the river", "--max-new-tokens", "5"]) == 0
    assert capsys.readouterr().out.strip().startswith("the river")


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--ratio", "1.5"], "must be in (0, 1)"),
        (["--ratio", "0"], "must be in (0, 1)"),
        (["--method", "magic"], "unknown method 'magic'"),
        (["--beta", "2"], "--beta: must be in [0, 1]"),
    ],
)
def test_bad_options(model_dir, text_file, tmp_path, capsys, extra, message):
    with pytest.raises(SystemExit) as exc_info:  # argparse rejects some options itself
        code = main(compress_args(model_dir, text_file, tmp_path / "o", *extra))
        raise SystemExit(code)
    assert exc_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_missing_paths_and_short_text(model_dir, text_file, tmp_path, capsys):
    short = tmp_path / "short.txt"
    short.write_text("too short")
    cases = [
        (compress_args(tmp_path / "nope", text_file, tmp_path / "o"), "model not found"),
        (compress_args(model_dir, tmp_path / "nope.txt", tmp_path / "o"), "data file not found"),
        (compress_args(model_dir, short, tmp_path / "o"), "shorter than one window"),
        (["-q", "eval", str(tmp_path / "missing.gguf")], "model file not found"),
        (["info", str(model_dir)], "not an svdllm model"),
    ]
    for args, message in cases:
        assert main(args) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err
        assert not (tmp_path / "o").exists()


def test_existing_out_needs_force(model_dir, text_file, tmp_path, capsys):
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    assert main(compress_args(model_dir, text_file, out)) == 2
    assert "--force" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "precious"
    assert main(compress_args(model_dir, text_file, out, "--force", "--method", "svd")) == 2  # not svdllm's files
    assert (out / "keep.txt").read_text() == "precious"
    (out / "keep.txt").unlink()
    assert main(compress_args(model_dir, text_file, out, "--method", "svd")) == 0  # an empty folder is fine
    assert main(compress_args(model_dir, text_file, out, "--force", "--method", "svd")) == 0
    assert (out / "config.json").exists()


@pytest.mark.slow
def test_console_script_exit_code(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "svdllm.cli", "compress", str(tmp_path / "nope"), "--ratio", "0.2"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().endswith(f"model not found: {tmp_path / 'nope'} (not a named model, a folder, a .gguf file or a hub id)")


def test_compress_with_finetune(model_dir, text_file, tmp_path, capsys):
    out = tmp_path / "cf"
    assert main(compress_args(model_dir, text_file, out, "--ratio", "0.4", "--method", "svdllm-w", "--finetune",
                              "--ft-steps", "2", "--ft-seqlen", "32", "--ft-batch-size", "2")) == 0
    report = json.loads((out / "svdllm_report.json").read_text())
    assert set(report["perplexity"]) == {"dense", "compressed", "finetuned"}
    assert (out / "finetune_losses.png").exists()
    section = json.loads((out / "config.json").read_text())["svdllm"]
    assert [s["stage"] for s in section["finetune"]["stages"]] == ["Wu", "Wv"]
