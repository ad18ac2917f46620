"""Pipeline v2 end to end: streaming blocks from disk (--low-memory), resume after a crash, bounded memory."""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Callable

import pytest
import torch

import svdllm
from svdllm.checkpoint import RunDir
from svdllm.cli import main


class Crash(Exception):
    pass


def on_commit(monkeypatch: pytest.MonkeyPatch, after: Callable[[int], None]) -> None:
    """Call ``after(i)`` once block i's checkpoint is committed (a kill at that moment, or a spy)."""
    real = RunDir.commit

    def commit(self, i, *args, **kwargs):
        real(self, i, *args, **kwargs)
        after(i)

    monkeypatch.setattr(RunDir, "commit", commit)


def crash_after(monkeypatch: pytest.MonkeyPatch, block: int) -> None:
    def crash(i: int) -> None:
        if i == block:
            raise Crash(f"killed after block {i}")

    on_commit(monkeypatch, crash)


def digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob("*.safetensors"))}


@pytest.fixture
def sharded_dir(tmp_path, tokenizer) -> Path:
    """A 4-block tiny LLaMA saved in several safetensors shards."""
    path = tmp_path / "sharded"
    model = tiny_model_with_layers(len(tokenizer), 4)
    model.save_pretrained(path, max_shard_size="100KB")
    tokenizer.save_pretrained(path)
    assert len(list(path.glob("*.safetensors"))) > 2
    return path


def tiny_model_with_layers(vocab: int, layers: int, hidden: int = 64):
    import transformers

    from conftest import with_spectral_decay

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=vocab, bos_token_id=0, eos_token_id=0, hidden_size=hidden,
                                   intermediate_size=3 * hidden, num_hidden_layers=layers, num_attention_heads=4,
                                   num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False)
    return with_spectral_decay(transformers.AutoModelForCausalLM.from_config(cfg).eval())


def options(model: Path, text: Path, out: Path, **extra) -> svdllm.CompressOptions:
    """The defaults (svdllm-ec, Fisher ranks from the streamed reverse pass, true-sequential) on a small calibration."""
    config = svdllm.CompressionConfig(method=extra.pop("method", "svdllm-ec"), ratio=extra.pop("ratio", 0.4),
                                      batch_size=extra.pop("batch_size", None))
    return svdllm.CompressOptions(model=str(model), compression=config, calib=str(text), eval=(str(text),),
                                  nsamples=8, seqlen=32, eval_seqlen=32, max_tokens=512, out=str(out),
                                  progress=False, **extra)


def args(model: Path, text: Path, out: Path, *extra: str) -> list[str]:
    return ["-q", "compress", str(model), "--calib", str(text), "--eval", str(text), "--nsamples", "8",
            "--seqlen", "32", "--eval-seqlen", "32", "--max-tokens", "512", "--ratio", "0.4", "--ranks", "uniform",
            "--out", str(out), *extra]


def state(folder: Path) -> dict[str, torch.Tensor]:
    return svdllm.load(folder).state_dict()


@pytest.mark.parametrize("method", ["svdllm-ec", "svdllm-w", "fwsvd"])
def test_low_memory_equals_in_memory(sharded_dir, text_file, tmp_path, method):
    """Given the same batch (streamed runs default to 1 window a forward, in-memory ones to 4), the same model."""
    svdllm.run_compression(options(sharded_dir, text_file, tmp_path / "mem", method=method, low_memory=False,
                                   batch_size=1))
    svdllm.run_compression(options(sharded_dir, text_file, tmp_path / "disk", method=method, low_memory=True))
    a, b = state(tmp_path / "mem"), state(tmp_path / "disk")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    ra, rb = (json.loads((tmp_path / d / "svdllm_report.json").read_text()) for d in ("mem", "disk"))
    assert ra["perplexity"] == rb["perplexity"] and ra["records"] == rb["records"]
    assert ra["plan"]["ranks"] == rb["plan"]["ranks"]
    rule = svdllm.read_record(tmp_path / "disk").rank_rule
    assert rule == ("fisher" if method == "svdllm-ec" else "uniform")
    assert len(list((tmp_path / "disk").glob("model-*-of-*.safetensors"))) == 5  # a shard per block + the rest
    assert not list(tmp_path.glob(".*svdllm-run")) and not list(tmp_path.glob(".*svdllm-lock"))  # all cleaned up
    assert [p.name for p in text_file.parent.iterdir()] == [text_file.name]  # nothing written beside the data


def test_streaming_needs_no_run_folder(sharded_dir, text_file, tmp_path):
    """The library streams without a checkpoint: finished blocks go to the source's own files."""
    from transformers import AutoModelForCausalLM

    from svdllm.source import open_streamed

    windows = torch.randint(0, 300, (8, 32), generator=torch.Generator().manual_seed(0))
    cfg = svdllm.CompressionConfig(method="svdllm-w", ratio=0.4, batch_size=1)
    streamed = svdllm.compress(open_streamed(sharded_dir), windows, cfg, progress=False)
    in_memory = svdllm.compress(AutoModelForCausalLM.from_pretrained(sharded_dir), windows, cfg, progress=False)
    svdllm.save(streamed, None, tmp_path / "s")
    svdllm.save(in_memory, None, tmp_path / "m")
    assert digests(tmp_path / "s") == digests(tmp_path / "m")
    spill = streamed.source.spill_dir
    streamed.source.close()
    assert spill is not None and not spill.exists()


def test_the_mmap_threshold_is_fixed_before_the_shards_are_read(sharded_dir, monkeypatch):
    """Fixed after the embeddings were loaded and freed, glibc's raised threshold had already left a fragmented
    heap behind (the SmolLM2 streamed peak 70-80 MiB higher)."""
    from svdllm import source

    events: list[tuple] = []

    class FakeLibc:
        def mallopt(self, *args):
            events.append(("mallopt", *args))

        def malloc_trim(self, *args):
            events.append(("malloc_trim", *args))

    real_load = source.Shards.load

    def load(self, *args, **kwargs):
        events.append(("load",))
        return real_load(self, *args, **kwargs)

    monkeypatch.setattr(source, "_glibc", FakeLibc)
    monkeypatch.setattr(source.Shards, "load", load)
    source.open_streamed(sharded_dir).close()
    assert ("load",) in events
    assert events[0] == ("mallopt", -3, 128 << 10)  # M_MMAP_THRESHOLD, before any tensor is read


def test_a_forward_takes_one_window_streamed_and_four_in_memory(sharded_dir, monkeypatch):
    from transformers import AutoModelForCausalLM

    from svdllm import blockloop
    from svdllm.source import open_streamed

    seen: list[int] = []
    real = blockloop._open_streams

    def spy(run, *rest):
        seen.append(run.batch)
        return real(run, *rest)

    monkeypatch.setattr(blockloop, "_open_streams", spy)
    windows = torch.randint(0, 300, (8, 32), generator=torch.Generator().manual_seed(0))
    for batch in (None, 2):
        cfg = svdllm.CompressionConfig(method="svdllm-w", ratio=0.4, batch_size=batch)
        svdllm.compress(open_streamed(sharded_dir), windows, cfg, progress=False).source.close()
        svdllm.compress(AutoModelForCausalLM.from_pretrained(sharded_dir), windows, cfg, progress=False)
    assert seen == [1, 4, 2, 2]


@pytest.mark.parametrize("low_memory", [False, True])
def test_killed_run_resumes_to_identical_shards(sharded_dir, text_file, tmp_path, monkeypatch, low_memory, caplog):
    svdllm.run_compression(options(sharded_dir, text_file, tmp_path / "whole", low_memory=low_memory))
    with monkeypatch.context() as m:
        crash_after(m, 1)
        with pytest.raises(Crash):
            svdllm.run_compression(options(sharded_dir, text_file, tmp_path / "resumed", low_memory=low_memory))
    run = tmp_path / ".resumed.svdllm-run"
    assert json.loads((run / "state.json").read_text())["value"]["next_block"] == 2 and not (tmp_path / "resumed").exists()
    assert (run / "gradients" / "stats.safetensors").is_file()  # the Fisher statistics are a kept product
    calls: list[int] = []
    on_commit(monkeypatch, calls.append)
    from svdllm import stages

    monkeypatch.setattr(stages, "gradient_statistics", lambda *a, **k: pytest.fail("recomputed"))
    svdllm.run_compression(options(sharded_dir, text_file, tmp_path / "resumed", low_memory=low_memory, resume=True))
    assert calls == [2, 3]  # only the blocks left were computed
    assert "resuming" in caplog.text
    assert digests(tmp_path / "resumed") == digests(tmp_path / "whole")
    whole, resumed = (json.loads((tmp_path / d / "svdllm_report.json").read_text()) for d in ("whole", "resumed"))
    assert whole["records"] == resumed["records"] and whole["perplexity"] == resumed["perplexity"]
    assert not run.exists()


@pytest.mark.slow
def test_a_kill_in_the_reverse_pass_then_a_rerun_gives_the_same_shards(sharded_dir, text_file, tmp_path,
                                                                       monkeypatch):
    """Killed while the gradient pass walks the blocks backwards (before any block is compressed), the same command
    with --resume finishes with the bytes of an unbroken run."""
    from svdllm.source import ModelSource

    svdllm.run_compression(options(sharded_dir, text_file, tmp_path / "whole", low_memory=True))
    real = ModelSource.walk

    def walk(self, *args, reverse=False, **kwargs):
        for n, item in enumerate(real(self, *args, reverse=reverse, **kwargs)):
            if reverse and n == 2:
                raise Crash("killed in the reverse pass")
            yield item

    with monkeypatch.context() as m:
        m.setattr(ModelSource, "walk", walk)
        with pytest.raises(Crash):
            svdllm.run_compression(options(sharded_dir, text_file, tmp_path / "again", low_memory=True))
    assert not (tmp_path / "again").exists() and (tmp_path / ".again.svdllm-run").is_dir()
    svdllm.run_compression(options(sharded_dir, text_file, tmp_path / "again", low_memory=True, resume=True))
    assert digests(tmp_path / "again") == digests(tmp_path / "whole")


@pytest.mark.slow
def test_output_aware_streams_its_grams_through_the_run_folder(sharded_dir, text_file, tmp_path, monkeypatch):
    """Streamed, the output-gradient Grams wait in the run folder (one block's worth in memory) and give the model
    that in-memory Grams give; a resumed run reads them back instead of recomputing."""
    from svdllm import stages
    from svdllm.cache import DiskStore, StoredTensors
    from svdllm.methods import options_for

    method = options_for("svdllm-ec", output_whitening=True)
    svdllm.run_compression(options(sharded_dir, text_file, tmp_path / "mem", method=method, low_memory=False,
                                   batch_size=1))
    seen: list = []
    real = stages.ReversePass._make
    monkeypatch.setattr(stages.ReversePass, "_make", lambda *a, **k: seen.append(real(*a, **k)) or seen[-1])
    with monkeypatch.context() as m:
        crash_after(m, 1)
        with pytest.raises(Crash):
            svdllm.run_compression(options(sharded_dir, text_file, tmp_path / "disk", method=method, low_memory=True))
    grams = seen[0].output_grams
    assert isinstance(grams, StoredTensors) and isinstance(grams.store, DiskStore)
    assert len(list(grams.store.folder.glob("gram.*.safetensors"))) == len(grams) == 4 * 7
    monkeypatch.setattr(stages, "gradient_statistics", lambda *a, **k: pytest.fail("recomputed"))
    svdllm.run_compression(options(sharded_dir, text_file, tmp_path / "disk", method=method, low_memory=True,
                                   resume=True))
    a, b = state(tmp_path / "mem"), state(tmp_path / "disk")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_checkpoint_of_another_run_is_refused_with_resume_and_redone_without(sharded_dir, text_file, tmp_path,
                                                                             monkeypatch, capsys, caplog):
    with monkeypatch.context() as m:
        crash_after(m, 0)
        with pytest.raises(Crash):
            main(args(sharded_dir, text_file, tmp_path / "o"))
    capsys.readouterr()
    assert main(args(sharded_dir, text_file, tmp_path / "o", "--ratio", "0.5", "--resume")) == 2
    err = capsys.readouterr().err.strip()
    assert "belongs to another run" in err and len(err.splitlines()) == 1
    assert (tmp_path / ".o.svdllm-run" / "block-00000.safetensors").is_file()  # nothing lost
    assert main(args(tmp_path / "nothing", text_file, tmp_path / "p", "--resume")) == 2
    assert main(args(sharded_dir, text_file, tmp_path / "o", "--ratio", "0.5")) == 0  # another run: blocks redone
    assert "made with other options or data; compressing afresh" in caplog.text and "resuming" not in caplog.text


def test_low_memory_holds_one_block_at_a_time(sharded_dir, text_file, tmp_path, monkeypatch):
    from svdllm.source import StreamedSource

    seen = []
    real = StreamedSource.onload

    def onload(self, i):
        seen.append(sum(any(p.device.type != "meta" for p in b.parameters()) for b in self.blocks))
        return real(self, i)

    monkeypatch.setattr(StreamedSource, "onload", onload)
    svdllm.run_compression(options(sharded_dir, text_file, tmp_path / "o", low_memory=True))
    # the reverse pass's forward and backward (whose recomputations also give the spectra) and the block loop:
    # 3 × 4 blocks read (0.8.1 read 16: the spectra had a pass of their own), before each every other block on meta
    assert seen == [0] * 12


DRIVER = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    import accelerate.utils, safetensors.torch, torch, transformers, svdllm, svdllm.cli  # everything the run imports
    from transformers.models.llama import modeling_llama  # noqa: F401

    def rss(field):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field):
                return int(line.split()[1]) * 1024

    warm, real = sys.argv[1], sys.argv[2:]  # a 2-block run first: BLAS/LAPACK workspaces, lazy imports
    tiny = list(real)
    tiny[2] = warm
    tiny[tiny.index("--out") + 1] += "-warm"
    assert svdllm.cli.main(tiny) == 0
    Path("/proc/self/clear_refs").write_text("5")  # peak RSS := current RSS
    base = rss("VmRSS:")
    code = svdllm.cli.main(real)
    print(json.dumps({"code": code, "peak_over_base": rss("VmHWM:") - base}))
""")


def peak_rss_over_baseline(warm: Path, run: list[str]) -> int:
    proc = subprocess.run([sys.executable, "-c", DRIVER, str(warm), *run], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])["peak_over_base"]


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc")
def test_low_memory_peak_rss_grows_with_blocks_not_with_the_model(tmp_path, tokenizer, text_file):
    """Peak RSS over a warmed-up baseline, streaming 6 and 24 blocks of one width: the 18 extra blocks cost
    less than 3 blocks' bytes (a fixed ~80 MB of runtime workspace aside); in memory the run holds the model."""
    sizes = {}
    for layers in (2, 6, 24):
        model = tiny_model_with_layers(len(tokenizer), layers, hidden=384)
        sizes[layers] = sum(p.numel() for p in model.parameters()) * 4
        block_bytes = sum(p.numel() for p in model.model.layers[0].parameters()) * 4
        model.save_pretrained(tmp_path / f"m{layers}", max_shard_size="20MB")
        tokenizer.save_pretrained(tmp_path / f"m{layers}")
        del model
    peaks = {}
    for layers, mode in ((6, "--low-memory"), (24, "--low-memory"), (24, "--offload=cpu")):
        out = tmp_path / f"o{layers}{mode}"
        run = args(tmp_path / f"m{layers}", text_file, out, "--method", "svdllm-w", "--eval", "", mode)
        peaks[(layers, mode)] = peak_rss_over_baseline(tmp_path / "m2", run)
    print(f"\npeak RSS over baseline: {peaks}, one block {block_bytes}, models {sizes}")
    low6, low24, mem24 = peaks[(6, "--low-memory")], peaks[(24, "--low-memory")], peaks[(24, "--offload=cpu")]
    assert low24 - low6 < 3 * block_bytes
    assert sizes[24] < mem24 and low24 < mem24 / 3
