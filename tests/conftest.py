"""Tiny randomly initialised models of many families, a tiny tokenizer, and test text."""
from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
import transformers
from tokenizers import ByteLevelBPETokenizer
from transformers import PreTrainedTokenizerFast


WORDS = ("the model of a city river was in new and large old government people first state year "
         "known north music team war world school water system light high land song king house "
         "small time game power part field name life army book form line").split()


def payload_bytes(folder: Path) -> int:
    """Bytes of tensor data in a folder's safetensors files (each file less its 8-byte length and JSON header)."""
    total = 0
    for path in folder.glob("*.safetensors"):
        with open(path, "rb") as fh:
            total += path.stat().st_size - 8 - int.from_bytes(fh.read(8), "little")
    return total


def make_text(n_words: int, seed: int) -> str:
    rng = random.Random(seed)
    sentences = []
    while n_words > 0:
        k = rng.randint(5, 14)
        sentences.append(" ".join(rng.choice(WORDS) for _ in range(k)).capitalize() + ".")
        n_words -= k
    return " ".join(sentences)


@pytest.fixture(scope="session")
def tokenizer() -> PreTrainedTokenizerFast:
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator([make_text(3000, 0)], vocab_size=320, min_frequency=1, special_tokens=["<eos>"])
    return PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="<eos>", pad_token="<eos>")


@pytest.fixture(scope="session")
def text_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("data") / "text.txt"
    path.write_text(make_text(6000, 1))
    return path


def _configs(vocab: int, hidden: int = 64) -> dict[str, transformers.PretrainedConfig]:
    common = dict(vocab_size=vocab, bos_token_id=0, eos_token_id=0, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                  num_attention_heads=4, max_position_embeddings=256)
    return {
        "llama": transformers.LlamaConfig(**common, num_key_value_heads=4),
        "mistral": transformers.MistralConfig(**common, num_key_value_heads=2, sliding_window=None),
        "qwen2": transformers.Qwen2Config(**common, num_key_value_heads=2),
        "opt": transformers.OPTConfig(vocab_size=vocab, bos_token_id=0, eos_token_id=0, pad_token_id=0, hidden_size=64, ffn_dim=128, num_hidden_layers=2,
                                      num_attention_heads=4, word_embed_proj_dim=64, max_position_embeddings=256),
        "gpt2": transformers.GPT2Config(vocab_size=vocab, bos_token_id=0, eos_token_id=0, n_embd=64, n_layer=2, n_head=4, n_positions=256),
        "gpt_neox": transformers.GPTNeoXConfig(**common),
        "phi3": transformers.Phi3Config(**common, num_key_value_heads=2, pad_token_id=0),
        "gemma3": transformers.Gemma3TextConfig(**common, num_key_value_heads=2, head_dim=16),
    }


ARCHS = list(_configs(8))


def with_spectral_decay(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give every 2-D weight a decaying spectrum, as trained LLM weights have (random ones are flat)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 and "emb" not in name and "wte" not in name and "wpe" not in name:
                u, _, vh = torch.linalg.svd(torch.randn(p.shape, generator=gen), full_matrices=False)
                decay = torch.exp(-torch.arange(u.shape[1], dtype=torch.float32) / 6)
                p.copy_((u * decay) @ vh * (p.shape[0] ** 0.5))
    return model


def tiny_model(arch: str, vocab: int, seed: int = 0, hidden: int = 64) -> transformers.PreTrainedModel:
    torch.manual_seed(seed)
    config = _configs(vocab, hidden)[arch]
    cls = transformers.Gemma3ForCausalLM if arch == "gemma3" else transformers.AutoModelForCausalLM
    model = cls.from_config(config) if cls is transformers.AutoModelForCausalLM else cls(config)
    return with_spectral_decay(model.eval(), seed)


def record_of(model: torch.nn.Module):
    """The saved-folder record of a model compressed in memory: its low-rank layers' ranks."""
    from svdllm.record import SvdllmRecord
    from svdllm.runtime import LowRankLinear

    return SvdllmRecord(ranks={n: m.rank for n, m in model.named_modules() if isinstance(m, LowRankLinear)})


@pytest.fixture
def crash_after_first_block(monkeypatch):
    """A context in which a run stops (as if killed) right after committing its first block to the run folder."""
    from contextlib import contextmanager

    from svdllm.checkpoint import RunDir

    real = RunDir.commit

    def crash(self, i, *a, **k):
        real(self, i, *a, **k)
        raise KeyboardInterrupt

    @contextmanager
    def active():
        with monkeypatch.context() as m:
            m.setattr(RunDir, "commit", crash)
            yield

    return active


@pytest.fixture
def make_model(tokenizer):
    return lambda arch="llama", seed=0, hidden=64: tiny_model(arch, len(tokenizer), seed, hidden)


@pytest.fixture
def calib_tokens(tokenizer, text_file) -> torch.Tensor:
    from svdllm.data import tokenize

    return tokenize(tokenizer, text_file.read_text())


@pytest.fixture
def model_dir(tmp_path, tokenizer) -> Path:
    """A tiny LLaMA saved as an ordinary Hugging Face folder with its tokenizer."""
    path = tmp_path / "tiny-llama"
    tiny_model("llama", len(tokenizer)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
