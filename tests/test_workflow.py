"""The workflow: the Python API and the CLI build the same model; the library's errors name options, never flags;
the package's imports form no cycle; the data path has one block loop and no fork on the kind of source."""
from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import pytest
import torch

import svdllm
from svdllm.cli import main
from svdllm.errors import OptionError

PACKAGE = Path(svdllm.__file__).parent


def test_python_api_and_cli_build_the_same_model(model_dir, text_file, tmp_path, capsys):
    """The README's Python example (defaults of CompressOptions) and `svdllm compress` (defaults of its flags)."""
    common = dict(calib=str(text_file), eval=(str(text_file),), nsamples=8, seqlen=32, eval_seqlen=32, max_tokens=512)
    api = svdllm.run_compression(svdllm.CompressOptions(model=str(model_dir), out=str(tmp_path / "api"),
                                                         progress=False, **common))
    assert main(["-q", "compress", str(model_dir), "--calib", str(text_file), "--eval", str(text_file), "--nsamples",
                 "8", "--seqlen", "32", "--eval-seqlen", "32", "--max-tokens", "512", "--out", str(tmp_path / "cli")]) == 0
    cli = json.loads((tmp_path / "cli" / "config.json").read_text())["svdllm"]
    assert api.record.rank_rule == cli["rank_rule"] == "fisher"  # auto: the library's default, decided once
    assert api.record.ranks == cli["ranks"]
    assert api.report.perplexity["compressed"] == json.loads((tmp_path / "cli" / "svdllm_report.json").read_text())[
        "perplexity"]["compressed"]
    # the lower-level call takes the same default
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from svdllm.data import load_text, tokenize

    tok = AutoTokenizer.from_pretrained(model_dir)
    windows = svdllm.sample_windows(tokenize(tok, load_text(str(text_file))), 8, 32, 0)
    low = svdllm.compress(AutoModelForCausalLM.from_pretrained(model_dir), windows, progress=False)
    assert low.record.ranks == cli["ranks"]


def _raise_strings(tree: ast.AST) -> list[tuple[int, str]]:
    """The literal text of every raised exception's message (f-string parts included)."""
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Raise) and node.exc is not None:
            for sub in ast.walk(node.exc):
                if isinstance(sub, ast.Constant) and isinstance(sub.value, str):
                    out.append((node.lineno, sub.value))
    return out


def test_no_library_error_names_a_flag():
    found = [f"{path.name}:{line}: {text}" for path in PACKAGE.rglob("*.py") if path.name != "cli.py"
             for line, text in _raise_strings(ast.parse(path.read_text())) if re.search(r"--[a-z]", text)]
    assert not found, found
    # the test sees what it should: cli.py's own messages do name flags
    assert any(re.search(r"--[a-z]", t) for _, t in _raise_strings(ast.parse((PACKAGE / "cli.py").read_text())))


def test_the_cli_maps_options_to_flags(model_dir, text_file, tmp_path, capsys):
    from svdllm.cli import flag_for

    assert flag_for("compress", "rank_rule") == "--ranks" and flag_for("compress", "finetune.lr") == "--ft-lr"
    assert flag_for("finetune", "finetune.lr") == "--lr" and flag_for("quantize", "quantize.bits") == "--bits"
    assert flag_for("compress", "rank_floor") == "--rank-floor"
    args = ["-q", "compress", str(model_dir), "--calib", str(text_file), "--eval", "", "--nsamples", "4", "--seqlen",
            "32", "--out", str(tmp_path / "o")]
    assert main(args + ["--rank-floor", "2"]) == 2
    assert capsys.readouterr().err.strip() == "svdllm compress: error: --rank-floor: must be in [0, 1], got 2.0"
    assert main(args + ["--finetune", "--ft-lr", "-1"]) == 2
    assert "--ft-lr: must be a positive number" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_library_errors_name_the_option():
    from svdllm.workflow import validate

    for options, field in [(svdllm.CompressOptions(nsamples=0), "nsamples"),
                           (svdllm.CompressOptions(eval_seqlen=1), "eval_seqlen"),
                           (svdllm.CompressOptions(dtype="int3"), "dtype")]:
        with pytest.raises(OptionError) as err:
            validate(options)
        assert err.value.option == field and "--" not in str(err.value)


def _imports(path: Path, module: str) -> set[str]:
    """The svdllm modules ``module`` imports, at any depth of the file (function-level imports count)."""
    out = set()
    package = module.rsplit(".", 1)[0] if path.name != "__init__.py" else module
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package.split(".")
            base = base[: len(base) - node.level + 1]
            target = ".".join(base + ([node.module] if node.module else []))
            names = [f"{target}.{a.name}" for a in node.names]
            out |= {n for n in names if n in MODULES} or ({target} if target in MODULES else set())
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("svdllm"):
            out.add(node.module)
    return out - {module}


MODULES = {("svdllm." + ".".join(p.relative_to(PACKAGE).with_suffix("").parts)).removesuffix(".__init__"): p
           for p in PACKAGE.rglob("*.py")}


def test_no_import_cycles():
    graph = {m: {i for i in _imports(p, m) if i in MODULES and i != "svdllm"} for m, p in MODULES.items()}
    assert graph["svdllm.workflow"] >= {"svdllm.pipeline", "svdllm.folder", "svdllm.source"}  # the graph is real
    state: dict[str, int] = {}

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for n in graph[m]:
            assert state.get(n) != 1, " -> ".join(path + [m, n])
            if n not in state:
                visit(n, path + [m])
        state[m] = 2

    for m in graph:
        if m not in state:
            visit(m, [])


def test_one_block_loop_and_no_fork_on_the_source():
    """Blocks are iterated by ModelSource.walk only; outside source.py nothing asks whether a model is streamed."""
    for path in PACKAGE.rglob("*.py"):
        text = path.read_text()
        if path.name != "source.py":
            assert "source is None" not in text and ".streamed" not in text and "low_memory" not in text or \
                path.name in ("workflow.py", "cli.py"), path.name
            assert not re.search(r"for \w+ in range\([^)]*n_blocks", text), path.name
    loops = [p.name for p in PACKAGE.rglob("*.py") if ".backward()" in p.read_text() and p.name != "finetune.py"]
    # the reverse pass and block refinement (fine-tuning's optimiser steps aside)
    assert sorted(loops) == ["importance.py", "refine.py"]


def test_the_default_command_lines_give_the_default_options():
    """Each flag's default is the option dataclass's own (one place states a default): the command line with no
    flags maps to exactly the options Python gets with none."""
    from svdllm.cli import _eval_options, _finetune_config, build_parser, compress_options
    from svdllm.commands import BenchOptions, EvalTexts, GenerateOptions, QuantizeFolderOptions
    from svdllm.finetune import FinetuneConfig
    from svdllm.workflow import CompressOptions

    parse = build_parser().parse_args
    assert compress_options(parse(["compress"])) == CompressOptions()
    with_ft = compress_options(parse(["compress", "--finetune"]))
    assert with_ft.finetune == FinetuneConfig()  # the same data and seed as Python's (0.8.1 trained on --calib)
    assert _finetune_config(parse(["finetune", "m", "--out", "o"])) == FinetuneConfig()
    q = parse(["quantize", "m", "--bits", "8", "--out", "o"])
    assert (q.dtype, q.group_size, _eval_options(q, q.seqlen)) == (QuantizeFolderOptions("", "").dtype,
                                                                   QuantizeFolderOptions("", "").quantize.group_size,
                                                                   EvalTexts())
    e = parse(["eval", "m"])
    assert _eval_options(e, e.seqlen, e.data) == EvalTexts()
    g, b = parse(["generate", "m", "p"]), parse(["bench", "m"])
    assert (g.max_new_tokens, g.seed) == (GenerateOptions("", "").max_new_tokens, GenerateOptions("", "").seed)
    assert (b.new_tokens, b.repeats) == (BenchOptions("").new_tokens, BenchOptions("").repeats)


def test_only_svdllm_errors_become_one_line(monkeypatch, capsys):
    """A ValueError from inside a library is a bug's traceback, not the user's mistake; svdllm's own errors and a
    missing file are one line."""
    from svdllm import cli
    from svdllm.errors import DataError

    def broken(args):
        raise ValueError("shapes (3, 4) and (5, 6) do not match")

    monkeypatch.setitem(cli.COMMANDS, "info", broken)
    with pytest.raises(ValueError, match="shapes"):
        cli.main(["info", "x"])
    monkeypatch.setitem(cli.COMMANDS, "info", lambda args: (_ for _ in ()).throw(DataError("the text is empty")))
    assert cli.main(["info", "x"]) == 2
    assert capsys.readouterr().err.strip() == "svdllm info: error: the text is empty"
    monkeypatch.setitem(cli.COMMANDS, "info", lambda args: (_ for _ in ()).throw(FileNotFoundError("no such file")))
    assert cli.main(["info", "x"]) == 2
