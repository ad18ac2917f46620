"""Issue 29, reliability second pass: each test failed on 0.6.0 (a wrong model or wrong numbers with exit 0, a user
file deleted, or a traceback)."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch
import transformers

import svdllm
from conftest import tiny_model, with_spectral_decay
from svdllm.cli import main
from svdllm.data import load_text, tokenize


def cli(model: Path, text: Path, out: Path, *extra: str) -> list[str]:
    return ["-q", "compress", str(model), "--calib", str(text), "--eval", str(text), "--nsamples", "8", "--seqlen",
            "32", "--eval-seqlen", "32", "--max-tokens", "512", "--out", str(out), *extra]


def perplexity(model, tok, text: Path) -> float:
    return svdllm.evaluate_perplexity(model, tok, tokenize(tok, load_text(str(text))), 32, 512).perplexity


# ---------------------------------------------------------------- 1. every block its own mask and rotary table


@pytest.fixture
def gemma_dir(tmp_path, tokenizer) -> Path:
    """A tiny Gemma 3 whose layers alternate sliding (window 8) and full attention, as every Gemma 2/3 does."""
    torch.manual_seed(0)
    cfg = transformers.Gemma3TextConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                                        num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                        max_position_embeddings=256, sliding_window=8, bos_token_id=0, eos_token_id=0,
                                        layer_types=["sliding_attention", "full_attention", "sliding_attention"])
    model = with_spectral_decay(transformers.Gemma3ForCausalLM(cfg).eval())
    path = tmp_path / "gemma"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_alternating_layer_types_report_what_eval_gives(gemma_dir, text_file, tmp_path, tokenizer):
    assert main(cli(gemma_dir, text_file, tmp_path / "g", "--method", "svdllm-w")) == 0
    report = json.loads((tmp_path / "g" / "svdllm_report.json").read_text())["perplexity"]
    dense = transformers.AutoModelForCausalLM.from_pretrained(gemma_dir)
    assert report["dense"][str(text_file)] == pytest.approx(perplexity(dense, tokenizer, text_file), rel=1e-5)
    compressed = svdllm.load(tmp_path / "g")
    assert report["compressed"][str(text_file)] == pytest.approx(perplexity(compressed, tokenizer, text_file), rel=1e-5)


# ---------------------------------------------------------------- 3, 4. resume and concurrency


def test_a_resume_with_other_block_weights_is_refused(model_dir, text_file, tmp_path, capsys, crash_after_first_block,
                                                     tokenizer):
    """Same config, same embeddings, one block weight different (a LoRA merge is enough): not the same run, so
    `--resume` is refused (without it the blocks are made afresh: test_keyed_products)."""
    other = tmp_path / "other"
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir)
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[0, 0] += 1e-3
    model.save_pretrained(other)
    tokenizer.save_pretrained(other)
    with crash_after_first_block():
        assert main(cli(model_dir, text_file, tmp_path / "o")) == 130
    capsys.readouterr()
    assert main([*cli(other, text_file, tmp_path / "o"), "--resume"]) == 2
    err = capsys.readouterr().err
    assert "belongs to another run" in err and "weights" in err
    assert json.loads((tmp_path / ".o.svdllm-run" / "state.json").read_text())["value"]["next_block"] == 1  # nothing lost


def test_a_second_run_into_the_same_output_is_refused(model_dir, text_file, tmp_path, capsys):
    from svdllm.checkpoint import OutputLock

    held = OutputLock(tmp_path / "o")  # another run holds the output
    try:
        assert main(cli(model_dir, text_file, tmp_path / "o")) == 2
        err = capsys.readouterr().err.strip()
        assert f"being written by process {os.getpid()}" in err and len(err.splitlines()) == 1
        assert not (tmp_path / "o").exists() and not (tmp_path / ".o.svdllm-run").exists()
    finally:
        held.release()
    assert main(cli(model_dir, text_file, tmp_path / "o", "--method", "svd")) == 0


def test_a_resume_with_another_process_count_names_it(model_dir, text_file, tmp_path):
    from svdllm.checkpoint import RunDir, write_checked_json
    from svdllm.errors import RunFolderError

    RunDir(tmp_path / "run", "fp", world_size=2)  # a folder made by two processes, one block done
    write_checked_json(tmp_path / "run" / "state.json", {"products": {}, "world_size": 2, "next_block": 1})
    with pytest.raises(RunFolderError, match="written by 2 processes; resume it with that many, not 1"):
        RunDir(tmp_path / "run", "fp", world_size=1, resume=True).finished_blocks(["blocks"])
    assert RunDir(tmp_path / "run", "fp", world_size=1).finished_blocks(["blocks"]) == 0  # without resume: afresh


# ---------------------------------------------------------------- 5, 6, 11, 12. what is read, and how strictly


def test_low_memory_refuses_a_gguf_by_name(model_dir, text_file, tmp_path, capsys):
    gguf = model_dir / "model.gguf"
    gguf.write_bytes(b"GGUF")  # beside the folder's safetensors, which must not be compressed instead
    assert main(cli(gguf, text_file, tmp_path / "o", "--low-memory")) == 2
    err = capsys.readouterr().err.strip()
    assert "GGUF" in err and "--low-memory" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_in_memory_loading_is_strict(model_dir, text_file, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    broken = tmp_path / "broken"
    broken.mkdir()
    for f in model_dir.iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    tensors = load_file(str(broken / "model.safetensors"))
    del tensors["model.layers.1.mlp.down_proj.weight"]
    save_file(tensors, str(broken / "model.safetensors"), {"format": "pt"})
    assert main(cli(broken, text_file, tmp_path / "o")) == 2
    err = capsys.readouterr().err.strip()
    assert "model.layers.1.mlp.down_proj.weight" in err and len(err.splitlines()) == 1
    cfg = json.loads((model_dir / "config.json").read_text())
    del cfg["num_hidden_layers"]  # transformers would build its default 32 layers, 30 of them random
    (broken / "config.json").write_text(json.dumps(cfg))
    (broken / "model.safetensors").write_bytes((model_dir / "model.safetensors").read_bytes())
    assert main(cli(broken, text_file, tmp_path / "o")) == 2
    assert "the weights do not cover the model" in capsys.readouterr().err


def test_windows_longer_than_the_models_positions_are_refused_first(tmp_path, tokenizer, text_file, capsys):
    gpt2 = tmp_path / "gpt2"
    tiny_model("gpt2", len(tokenizer)).save_pretrained(gpt2)  # 256 learned positions
    tokenizer.save_pretrained(gpt2)
    assert main(cli(gpt2, text_file, tmp_path / "o", "--seqlen", "300")) == 2
    assert "300 tokens exceed the model's 256 positions" in capsys.readouterr().err
    assert not (tmp_path / "o").exists() and not (tmp_path / ".o.svdllm-run").exists()
    assert main(["-q", "eval", str(gpt2), "--data", str(text_file), "--seqlen", "300"]) == 2
    assert "256 positions" in capsys.readouterr().err
    assert main(["generate", str(gpt2), "the river", "--max-new-tokens", "300"]) == 2
    assert "exceed the model's 256 positions" in capsys.readouterr().err


# ---------------------------------------------------------------- 7, 8, 9, 10, 15. user files, bad input


def test_quantize_globs_match_like_targets_and_must_match(model_dir, tmp_path, capsys):
    pytest.importorskip("optimum.quanto")
    q = tmp_path / "q"
    assert main(["-q", "quantize", str(model_dir), "--bits", "8", "--dense", "mlp.*", "--eval", "", "--dtype",
                 "float32", "--out", str(q)]) == 0
    modules = svdllm.read_record(q).quantization["modules"]
    assert sorted({n.rsplit(".", 1)[1] for n in modules}) == ["down_proj", "gate_proj", "up_proj"] and len(modules) == 6
    assert main(["-q", "quantize", str(model_dir), "--bits", "8", "--dense", "mlp.*,*nothing*", "--eval", "",
                 "--out", str(tmp_path / "x")]) == 2
    assert "--dense: '*nothing*' matches no dense linear" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_force_never_deletes_a_users_file(model_dir, text_file, tmp_path, capsys):
    args = lambda out, *x: ["-q", "compress", str(model_dir), "--calib", str(text_file), "--eval", "",  # noqa: E731
                            "--nsamples", "4", "--seqlen", "32", "--method", "svd", "--out", str(out), *x]
    out = tmp_path / "o"
    assert main(args(out)) == 0
    (out / "NOTES.txt").write_text("mine")  # a user's file inside an svdllm folder
    assert main(args(out, "--force")) == 2
    assert (out / "NOTES.txt").read_text() == "mine" and "did not write" in capsys.readouterr().err
    user = tmp_path / "thesis"
    user.mkdir()
    (user / "thesis.tex").write_text("precious")
    (user / "svdllm_report.json").write_bytes((out / "svdllm_report.json").read_bytes())  # a copied report
    assert main(args(user, "--force")) == 2
    assert (user / "thesis.tex").read_text() == "precious"
    (out / "NOTES.txt").unlink()
    assert main(args(out, "--force")) == 0  # svdllm's own folder, untouched since: replaced


def test_eval_json_never_overwrites_and_is_checked_first(model_dir, text_file, tmp_path, capsys, monkeypatch):
    import svdllm.source

    js = tmp_path / "r.json"
    js.write_text("keep")
    monkeypatch.setattr(svdllm.source, "load_model", lambda *a, **k: pytest.fail("checked before any model"))
    assert main(["-q", "eval", str(model_dir), "--data", str(text_file), "--json", str(js)]) == 2
    assert js.read_text() == "keep" and "exists" in capsys.readouterr().err
    assert main(["-q", "eval", str(model_dir), "--json", str(tmp_path / "no" / "x.json")]) == 2
    assert "is not a folder" in capsys.readouterr().err


def test_a_full_disk_is_one_line_and_leaves_nothing_half_written(model_dir, text_file, tmp_path, capsys,
                                                                 monkeypatch):
    import safetensors.torch
    from safetensors import SafetensorError

    real = safetensors.torch.save_file

    def full(tensors, path, *a, **k):
        if "model-00002" in str(path):
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        return real(tensors, path, *a, **k)

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    assert main(cli(model_dir, text_file, tmp_path / "o", "--method", "svd")) == 2
    err = capsys.readouterr().err.strip()
    assert "disk is full" in err and len(err.splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "o").exists() and not [p for p in tmp_path.iterdir() if ".o.tmp" in p.name]
    assert (tmp_path / ".o.svdllm-run" / "state.json").is_file()  # the finished run resumes after freeing space
    monkeypatch.setattr(safetensors.torch, "save_file", real)
    assert main(cli(model_dir, text_file, tmp_path / "o", "--method", "svd")) == 0


@pytest.mark.parametrize("argv, message", [
    (["generate", "{model}", ""], "PROMPT: is empty"),
    (["compress", "{model}", "--asvd-alpha", "nan", "--method", "asvd"], "must be a finite number"),
    (["compress", "{model}", "--finetune", "--ft-lr", "nan"], "must be a finite number"),
])
def test_bad_values_fail_before_any_work(model_dir, tmp_path, capsys, argv, message):
    argv = [a.replace("{model}", str(model_dir)) for a in argv] + (["--out", str(tmp_path / "o")]
                                                                   if argv[0] == "compress" else [])
    try:
        code = main(["-q", *argv])
    except SystemExit as exc:  # argparse's own refusal
        code = exc.code
    assert code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_a_symlinked_out_is_refused(model_dir, text_file, tmp_path, capsys):
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "link").symlink_to(real)
    assert main(cli(model_dir, text_file, tmp_path / "link", "--force")) == 2
    assert "symbolic link" in capsys.readouterr().err
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".link")]


def test_bfloat16_folders_say_which_dtype_their_perplexity_is_of(model_dir, text_file, tmp_path):
    assert main(cli(model_dir, text_file, tmp_path / "b", "--method", "svd", "--dtype", "bfloat16")) == 0
    record = svdllm.read_record(tmp_path / "b")
    model = svdllm.load(tmp_path / "b")
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "b")
    assert record.perplexity[str(text_file)] == pytest.approx(perplexity(model, tok, text_file), rel=1e-3)
    assert math.isfinite(record.perplexity[str(text_file)])


@pytest.mark.parametrize("layout", ["gpt_neox", "hub-gpt2"])
def test_low_memory_reads_transformers_key_layouts(layout, tmp_path, tokenizer, text_file):
    """A GPT-NeoX folder as transformers writes it (head as ``embed_out``) and a hub-style GPT-2 (no ``transformer.``
    prefix, tied head left out) stream exactly as they load in memory."""
    from safetensors.torch import save_file

    arch = "gpt_neox" if layout == "gpt_neox" else "gpt2"
    model = tiny_model(arch, len(tokenizer))
    folder = tmp_path / layout
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    if layout == "hub-gpt2":
        state = {k.removeprefix("transformer."): v.contiguous() for k, v in model.state_dict().items()
                 if k != "lm_head.weight"}
        save_file(state, str(folder / "model.safetensors"), {"format": "pt"})
    cfg = svdllm.CompressionConfig(method="svdllm-w", ratio=0.4, batch_size=1)  # the streamed default, both
    opts = dict(model=str(folder), compression=cfg, calib=str(text_file), eval=(str(text_file),), nsamples=4, seqlen=32,
                eval_seqlen=32, max_tokens=256, progress=False)
    streamed = svdllm.run_compression(svdllm.CompressOptions(**opts, low_memory=True, out=str(tmp_path / "s")))
    in_memory = svdllm.run_compression(svdllm.CompressOptions(**opts, low_memory=False, out=str(tmp_path / "m")))
    assert streamed.report.perplexity == in_memory.report.perplexity
    a, b = svdllm.load(tmp_path / "s").state_dict(), svdllm.load(tmp_path / "m").state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------- 2. BOS where the model needs one


def test_windows_start_with_bos_where_the_model_needs_one(gemma_dir, text_file, tmp_path, tokenizer):
    """Gemma's family needs a BOS whatever its tokenizer says (this one adds none): calibration and evaluation windows
    start with it, the record says so, and `svdllm eval` measures the same windows as compress did."""
    from svdllm.calibration import eval_windows, sample_windows
    from svdllm.data import bos_token

    tok = transformers.AutoTokenizer.from_pretrained(gemma_dir)
    tok.bos_token = "<eos>"
    tok.save_pretrained(gemma_dir)
    config = transformers.AutoConfig.from_pretrained(gemma_dir)
    assert bos_token(tok, config) == tok.bos_token_id and tok("a")["input_ids"][0] != tok.bos_token_id
    llama_config = transformers.LlamaConfig()
    assert bos_token(tok, llama_config) is None  # a family that does not need one, a tokenizer that adds none
    tokens = tokenize(tok, load_text(str(text_file)))
    w = sample_windows(tokens, 4, 32, 0, bos=tok.bos_token_id)
    e = eval_windows(tokens, 32, 512, bos=tok.bos_token_id)
    assert w.shape == (4, 32) and (w[:, 0] == tok.bos_token_id).all() and (e[:, 0] == tok.bos_token_id).all()
    assert torch.equal(e[:, 1:].flatten(), tokens[: e.shape[0] * 31])  # the text itself, 31 tokens a window
    assert main(cli(gemma_dir, text_file, tmp_path / "g", "--method", "svdllm-w")) == 0
    record = svdllm.read_record(tmp_path / "g")
    assert record.calibration["bos"] is True
    report = json.loads((tmp_path / "g" / "svdllm_report.json").read_text())["perplexity"]
    saved = svdllm.load(tmp_path / "g")
    loaded_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "g")
    assert report["compressed"][str(text_file)] == pytest.approx(perplexity(saved, loaded_tok, text_file), rel=1e-5)
