"""Saved models: safetensors only, exact round trip, plain-transformers loading, clear errors."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from conftest import ARCHS, payload_bytes
from svdllm import CompressionConfig, compress, load, sample_windows, save
from svdllm.errors import FormatError, OptionError
from svdllm.record import SvdllmRecord
from svdllm.folder import verify
from svdllm.runtime import LowRankLinear

CFG = dict(ratio=0.4, method="svdllm-w")


@pytest.fixture(params=["llama", "gpt2"])
def saved(request, make_model, tokenizer, calib_tokens, tmp_path):
    model = make_model(request.param)
    result = compress(model, sample_windows(calib_tokens, 8, 32, 0), CompressionConfig(**CFG), progress=False)
    out = save(result, tokenizer, tmp_path / "compressed")
    return result, out


def test_round_trip_gives_identical_logits_and_generation(saved, calib_tokens):
    result, out = saved
    model = result.model
    loaded = load(out)
    ids = calib_tokens[:40][None]
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
    a = model.generate(ids[:, :6], max_new_tokens=8, do_sample=False, pad_token_id=0)
    b = loaded.generate(ids[:, :6], max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert torch.equal(a, b)
    assert loaded.config.svdllm["ranks"] == result.record.ranks
    factors = [m.svd_u.weight for m in loaded.modules() if isinstance(m, LowRankLinear)]
    assert factors and all(w.t().is_contiguous() and not w.is_contiguous() for w in factors)  # rank-major U


def test_folder_holds_no_pickle_and_records_everything(saved):
    result, out = saved
    model = result.model
    names = {p.name for p in out.iterdir()}
    assert not any(n.endswith((".bin", ".pt", ".pth", ".pkl", ".ckpt")) for n in names)
    assert {"config.json", "model.safetensors.index.json", "modeling_svdllm.py", "svdllm_lowrank.py", "README.md",
            "svdllm_report.json", "svdllm_manifest.json"} <= names
    assert "svdllm_quantized.py" not in names and "quanto" not in (out / "modeling_svdllm.py").read_text()
    assert ("svdllm_latent_cache.py" in names) == (model.config.model_type == "llama")  # GPT-2: no latent cache
    assert sorted(n for n in names if n.endswith(".safetensors")) == [f"model-0000{i}-of-00003.safetensors"
                                                                      for i in (1, 2, 3)]  # a shard per block
    section = json.loads((out / "config.json").read_text())["svdllm"]
    for key in ("format_version", "method", "options", "ratio", "calibration", "svdllm_version", "ranks", "shards"):
        assert key in section
    assert section["calibration"]["nsamples"] == 8 and section["options"]["name"] == "svdllm-w"
    report = json.loads((out / "svdllm_report.json").read_text())  # written by the library, inside the atomic save
    assert report["plan"]["ranks"] == section["ranks"] and len(report["records"]) == len(section["ranks"])
    n_params = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    assert payload_bytes(out) == n_params * 4


def test_bfloat16_save_halves_the_size(make_model, tokenizer, calib_tokens, tmp_path):
    model = make_model("llama")
    result = compress(model, sample_windows(calib_tokens, 8, 32, 0), CompressionConfig(**CFG), progress=False)
    a = save(result, tokenizer, tmp_path / "f32")
    b = save(result, tokenizer, tmp_path / "bf16", dtype="bfloat16")
    ratio = payload_bytes(b) / payload_bytes(a)
    assert 0.49 < ratio < 0.52
    loaded = load(b)
    assert loaded.dtype == torch.bfloat16
    assert next(model.parameters()).dtype == torch.float32  # saving did not cast the caller's model


@pytest.mark.slow
def test_plain_transformers_loads_without_svdllm(saved, calib_tokens, tmp_path):
    result, out = saved
    model = result.model
    ids = calib_tokens[:40][None]
    with torch.no_grad():
        ref = model(ids).logits
    gen_ref = model.generate(ids[:, :6], max_new_tokens=8, do_sample=False, pad_token_id=0)
    torch.save({"ids": ids}, tmp_path / "ids.pt")
    script = textwrap.dedent(f"""
        import sys

        class HideSvdllm:  # whatever way svdllm is installed (editable or not), it cannot be imported here
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] == "svdllm":
                    raise ModuleNotFoundError("svdllm is hidden in this test")

        sys.meta_path.insert(0, HideSvdllm())
        try:
            import svdllm
            raise SystemExit("svdllm must not be importable here")
        except ModuleNotFoundError:
            pass
        import torch
        from transformers import AutoModelForCausalLM
        ids = torch.load({str(tmp_path / 'ids.pt')!r})["ids"]
        m = AutoModelForCausalLM.from_pretrained({str(out)!r}, trust_remote_code=True)
        with torch.no_grad():
            torch.save({{"logits": m(ids).logits,
                        "gen": m.generate(ids[:, :6], max_new_tokens=8, do_sample=False, pad_token_id=0),
                        "latent": m.generate(ids[:, :6], max_new_tokens=8, do_sample=False, pad_token_id=0,
                                             latent_cache=True)}},
                       {str(tmp_path / 'res.pt')!r})
    """)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HF_MODULES_CACHE"] = str(tmp_path / "hf_modules")
    proc = subprocess.run([sys.executable, "-c", script], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = torch.load(tmp_path / "res.pt")
    assert torch.equal(res["logits"], ref)
    assert torch.equal(res["gen"], gen_ref)
    assert torch.equal(res["latent"], gen_ref)  # LLaMA uses the latent cache; GPT-2 says why not and falls back


def test_tampered_rank_is_refused(saved):
    _, out = saved
    cfg = json.loads((out / "config.json").read_text())
    name = next(iter(cfg["svdllm"]["ranks"]))
    cfg["svdllm"]["ranks"][name] += 1
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(FormatError, match=f"{name}.*config records rank"):
        load(out)


def test_corrupted_and_missing_shards_are_refused(saved):
    _, out = saved
    shard = out / "model-00001-of-00003.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(FormatError, match="corrupt or truncated"):
        load(out)
    shard.unlink()
    with pytest.raises(FormatError, match="missing"):
        verify(out)


def test_not_svdllm_and_future_versions_are_refused(saved, model_dir):
    _, out = saved
    with pytest.raises(FormatError, match="not an svdllm model"):
        load(model_dir)
    cfg = json.loads((out / "config.json").read_text())
    cfg["svdllm"]["format_version"] = 99
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(FormatError, match="format version 99"):
        load(out)


def test_save_never_overwrites_unless_forced(saved, tokenizer):
    result, out = saved
    before = sorted(p.name for p in out.iterdir())
    with pytest.raises(OptionError, match="not empty"):
        save(result, tokenizer, out)
    assert sorted(p.name for p in out.iterdir()) == before
    save(result, tokenizer, out, force=True)
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temp folder left behind


def test_failed_save_leaves_nothing(make_model, tokenizer, tmp_path, monkeypatch):
    model = make_model("llama")

    def boom(*a, **k):
        raise OSError(28, "No space left on device")

    import svdllm.folder

    monkeypatch.setattr(svdllm.folder, "atomic_save_file", boom)
    with pytest.raises(OSError, match="No space"):
        save(model, tokenizer, tmp_path / "x", SvdllmRecord(ranks={}))
    assert list(tmp_path.iterdir()) == []


def test_saving_an_uncompressed_model_is_refused(make_model, tokenizer, tmp_path):
    with pytest.raises(FormatError, match="save what compress returned"):
        save(make_model("llama"), tokenizer, tmp_path / "x")
    assert not Path(tmp_path / "x").exists()


def test_bfloat16_save_keeps_tied_embeddings_shared(tokenizer, calib_tokens, tmp_path):
    from conftest import tiny_model

    model = tiny_model("llama", len(tokenizer))
    model.config.tie_word_embeddings = True
    model.tie_weights()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    result = compress(model, sample_windows(calib_tokens, 8, 32, 0), CompressionConfig(**CFG), progress=False)
    out = save(result, tokenizer, tmp_path / "tied", dtype="bfloat16")
    n = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    assert payload_bytes(out) == n * 2  # one copy of the tied table
    loaded = load(out)
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()


@pytest.mark.parametrize("arch", ARCHS)
def test_round_trip_is_exact_for_every_family(arch, make_model, tokenizer, calib_tokens, tmp_path):
    """svdllm.load and plain transformers both give back the very logits (GPT-NeoX once reloaded a random head)."""
    from transformers import AutoModelForCausalLM

    model = make_model(arch)
    result = compress(model, sample_windows(calib_tokens, 8, 32, 0), CompressionConfig(**CFG), progress=False)
    out = save(result, tokenizer, tmp_path / arch)
    ids = calib_tokens[:40][None]
    plain = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    with torch.no_grad():
        ref = model(ids).logits
        assert torch.equal(load(out)(ids).logits, ref)
        assert torch.equal(plain(ids).logits, ref)
