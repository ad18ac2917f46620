"""The fast generation path (static cache, compiled decode): the same greedy tokens as eager, one graph, no breaks."""
from __future__ import annotations

import pytest
import torch

from conftest import ARCHS, record_of
from svdllm import CompressionConfig, compress, sample_windows
from svdllm.cli import main
from svdllm.generation import fast_options


def counting_backend() -> tuple[list[torch.fx.GraphModule], object]:
    """A torch.compile backend that runs each captured graph as is, and the list of graphs it was given (a
    function, not an object: transformers deep-copies its compile options)."""
    graphs: list[torch.fx.GraphModule] = []

    def backend(gm: torch.fx.GraphModule, example_inputs: list) -> object:
        graphs.append(gm)
        return gm.forward
    return graphs, backend


def compressed(make_model, arch, calib_tokens):
    model = make_model(arch)
    compress(model, sample_windows(calib_tokens, 8, 32, 0), CompressionConfig(ratio=0.4, method="svdllm-w"),
             progress=False)
    return model


@pytest.mark.parametrize("arch", [a for a in ARCHS if a != "gemma3"])
def test_fast_path_generates_the_same_tokens_in_one_graph(arch, make_model, calib_tokens):
    torch._dynamo.reset()
    model = compressed(make_model, arch, calib_tokens)
    ids = calib_tokens[:10][None]
    kw = dict(max_new_tokens=12, do_sample=False, pad_token_id=0)
    ref = model.generate(ids, **kw)
    graphs, backend = counting_backend()
    options = fast_options(model, backend=backend)
    assert torch.equal(model.generate(ids, **kw, **options), ref)
    assert torch.equal(model.generate(ids, **kw, **options), ref)
    # fullgraph: a graph break would raise; one graph for every decode step of both calls: no recompiles
    assert len(graphs) == 1


def test_sliding_window_models_keep_the_ordinary_path(make_model, caplog):
    model = make_model("gemma3")  # its static sliding layers recompile at every token in transformers
    with caplog.at_level("WARNING", logger="svdllm.generation"):
        assert fast_options(model) == {}
    assert "sliding-window layers recompile" in caplog.text
    assert fast_options(make_model("llama"))["cache_implementation"] == "static"


@pytest.mark.slow
def test_fast_path_with_inductor_and_cli(make_model, calib_tokens, tokenizer, tmp_path, capsys):
    from svdllm import save

    torch._dynamo.reset()
    model = compressed(make_model, "llama", calib_tokens)
    ids = calib_tokens[:10][None]
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert torch.equal(model.generate(ids, **kw, **fast_options(model)), model.generate(ids, **kw))

    out = save(model, tokenizer, tmp_path / "c", record_of(model))
    assert main(["generate", str(out), "the river", "--max-new-tokens", "6"]) == 0
    eager = capsys.readouterr().out
    assert main(["generate", str(out), "the river", "--max-new-tokens", "6", "--fast"]) == 0
    assert capsys.readouterr().out == eager
    assert main(["generate", str(out), "the river", "--fast", "--latent-cache"]) == 2
    assert "--fast: does not combine with --latent-cache" in capsys.readouterr().err


def test_bytes_read_per_token(make_model):
    from svdllm.generation import bytes_read_per_token, weight_bytes

    llama = make_model("llama")  # untied: the input table is read one row per token, the head whole
    emb = llama.get_input_embeddings().weight
    assert llama.get_output_embeddings().weight is not emb
    assert weight_bytes(llama) == 4 * sum(p.numel() for p in llama.parameters())
    assert bytes_read_per_token(llama) == weight_bytes(llama) - 4 * (emb.shape[0] - 1) * emb.shape[1]
    gpt2 = make_model("gpt2")  # tied: the head reads the token table whole; positions (wpe) one row per token
    wte, wpe = gpt2.transformer.wte.weight, gpt2.transformer.wpe.weight
    assert gpt2.get_output_embeddings().weight is wte
    assert bytes_read_per_token(gpt2) == weight_bytes(gpt2) - 4 * (wpe.shape[0] - 1) * wpe.shape[1]


@pytest.mark.slow
def test_bench_cli(model_dir, text_file, tmp_path, capsys):
    import json

    out = tmp_path / "c"
    assert main(["-q", "compress", str(model_dir), "--calib", str(text_file), "--eval", "", "--nsamples", "4",
                 "--seqlen", "32", "--ratio", "0.6", "--method", "svd", "--out", str(out)]) == 0
    js = tmp_path / "bench.json"
    assert main(["bench", str(out), "--dense", str(model_dir), "--new-tokens", "3", "--repeats", "1",
                 "--json", str(js)]) == 0
    printed = capsys.readouterr().out
    res = json.loads(js.read_text())
    c, d = res[str(out)], res[str(model_dir)]
    assert res["speed_up"]["limit"] == d["bytes_read_per_token"] / c["bytes_read_per_token"] > 1
    assert c["weight_bytes"] < d["weight_bytes"] and c["eager_tok_s"] > 0
    assert "of the" in printed and "bytes limit" in printed
    assert main(["bench", str(out), "--json", str(js)]) == 2  # never overwrites
    assert "exists" in capsys.readouterr().err
