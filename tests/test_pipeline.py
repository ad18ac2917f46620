"""compress() on tiny models of every supported family, and the block loop against a reference loop."""
from __future__ import annotations

import copy

import pytest
import torch

from conftest import ARCHS
from svdllm import CompressionConfig, compress, sample_windows
from svdllm.architecture import block_linears, decoder_blocks, dense_weight
from svdllm.runtime import LowRankLinear, replace_module
from svdllm.errors import OptionError
from svdllm.methods import METHODS, options_for


def windows_of(tokens: torch.Tensor, nsamples: int = 8, seqlen: int = 32, seed: int = 0) -> torch.Tensor:
    return sample_windows(tokens, nsamples, seqlen, seed)


def linear_names(model) -> list[str]:
    prefix, blocks = decoder_blocks(model)
    return [n for i, b in enumerate(blocks) for n in block_linears(b, f"{prefix}.{i}")]


def rel_logit_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / (b - b.mean(-1, keepdim=True)).norm())


@pytest.mark.parametrize("arch", ARCHS)
def test_every_architecture_compresses_and_generates(arch, make_model, calib_tokens):
    model = make_model(arch)
    names = linear_names(model)
    ids = calib_tokens[:48][None]
    with torch.no_grad():
        dense = model(ids).logits
    compress(model, windows_of(calib_tokens), CompressionConfig(ratio=0.05, method="svdllm-ec"), progress=False)
    swapped = [n for n, m in model.named_modules() if isinstance(m, LowRankLinear)]
    assert sorted(swapped) == sorted(names) and names
    with torch.no_grad():
        logits = model(ids).logits
    assert torch.isfinite(logits).all()
    assert rel_logit_error(logits, dense) < 0.2  # GQA k/v keep 20 of 32 dims at this ratio
    out = model.generate(ids[:, :8], max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 13)


@pytest.mark.parametrize("method", list(METHODS))
def test_every_method_reaches_the_ratio(method, make_model, calib_tokens):
    ratio = 0.3
    model = make_model("mistral", hidden=256)  # ranks ≥ 100, so flooring k moves the count < 1%
    before = sum(p.numel() for p in model.parameters())
    result = compress(model, windows_of(calib_tokens), CompressionConfig(ratio=ratio, method=method), progress=False)
    rep = result.report
    after = sum(p.numel() for p in model.parameters())
    assert rep.linear_params_after / rep.linear_params_before == pytest.approx(1 - ratio, rel=0.01)
    assert (before - after) / rep.linear_params_before == pytest.approx(ratio, abs=0.01)
    for r in rep.records:
        m = model.get_submodule(r["name"])
        assert isinstance(m, LowRankLinear) and m.rank == r["rank"]
    assert result.record.ranks == {r["name"]: r["rank"] for r in rep.records} == rep.plan["ranks"]


def test_seed_fixes_the_factors(make_model, calib_tokens):
    def factors(seed: int) -> torch.Tensor:
        m = make_model("llama")
        compress(m, windows_of(calib_tokens, seed=seed), CompressionConfig(ratio=0.4, method="svdllm-w"),
                 progress=False)
        return m.model.layers[1].mlp.down_proj.svd_v.weight.detach().clone()

    a, b, c = factors(1), factors(1), factors(2)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


def test_dead_input_never_crashes(make_model, calib_tokens):
    model = make_model("llama")
    with torch.no_grad():
        for layer in model.model.layers:
            layer.input_layernorm.weight[5] = 0.0  # q/k/v never see input dimension 5
    for method in ("svdllm-w", "svdllm", "svdllm-ec", "asvd"):
        m = make_model("llama")
        m.load_state_dict(model.state_dict())
        result = compress(m, windows_of(calib_tokens), CompressionConfig(ratio=0.4, method=method), progress=False)
        assert torch.isfinite(m(calib_tokens[:32][None]).logits).all()
        if method.startswith("svdllm-w"):
            assert any("q_proj" in r["name"] for r in result.report.remedies)


def test_error_correction_lowers_output_error(make_model, calib_tokens):
    """On held-out tokens, svdllm-ec's final hidden states are closer to the dense model's than svdllm-w's."""
    held_out = calib_tokens[-256:].view(4, 64)
    dense = make_model("llama")
    with torch.no_grad():
        ref = dense(held_out, output_hidden_states=True).hidden_states[-1]
    errs = {}
    for method in ("svdllm-w", "svdllm-ec"):
        m = make_model("llama")
        compress(m, windows_of(calib_tokens[:-256], 16, 64), CompressionConfig(ratio=0.5, method=method),
                 progress=False)
        with torch.no_grad():
            errs[method] = float((m(held_out, output_hidden_states=True).hidden_states[-1] - ref).norm())
    assert errs["svdllm-ec"] < errs["svdllm-w"]


def test_targets_and_skip_layers(make_model, calib_tokens):
    model = make_model("llama")
    compress(model, windows_of(calib_tokens),
             CompressionConfig(ratio=0.4, method="svdllm-w", targets=["*mlp*"], skip_layers=[0]), progress=False)
    swapped = {n for n, m in model.named_modules() if isinstance(m, LowRankLinear)}
    assert swapped == {f"model.layers.1.mlp.{p}" for p in ("gate_proj", "up_proj", "down_proj")}
    with pytest.raises(ValueError, match="matches no linear"):
        compress(make_model("llama"), windows_of(calib_tokens), CompressionConfig(targets=["*nothing*"]),
                 progress=False)
    with pytest.raises(ValueError, match="block -3 does not exist"):
        compress(make_model("llama"), windows_of(calib_tokens), CompressionConfig(skip_layers=[-3]), progress=False)
    last = compress(make_model("llama"), windows_of(calib_tokens),
                    CompressionConfig(ratio=0.4, method="svdllm-w", skip_layers=[-1]), progress=False)
    assert last.record.ranks and all(n.startswith("model.layers.0.") for n in last.record.ranks)
    with pytest.raises(ValueError, match="block 2 does not exist"):
        compress(make_model("llama"), windows_of(calib_tokens), CompressionConfig(skip_layers=[2]), progress=False)


def test_short_calibration_text_is_an_error(calib_tokens):
    with pytest.raises(ValueError, match="shorter than one window"):
        windows_of(calib_tokens[:100], 2, 512)


def test_method_options_are_validated_and_named():
    with pytest.raises(OptionError, match="beta: must be in") as err:
        options_for("svdllm-ec", beta=2.0)
    assert err.value.option == "beta"
    with pytest.raises(OptionError, match="beta: does not apply to method svdllm-w .it applies to svdllm-ec"):
        options_for("svdllm-w", beta=0.5)
    with pytest.raises(OptionError, match="beta"):
        options_for("svdllm-ec", beta=float("nan"))
    with pytest.raises(ValueError, match="unknown method 'magic'"):
        CompressionConfig(method="magic")
    assert options_for("svdllm-ec", beta=None).beta == 0.25  # None keeps the default


def test_shared_inputs_share_one_gram_under_gqa(make_model, calib_tokens):
    from svdllm.cache import MemoryStore
    from svdllm.calibration import DENSE, ActivationStream, GramAccumulator, LayerStats, Stat

    model = make_model("mistral")  # 4 query heads, 2 key/value heads: k/v are narrower than q
    attn = model.model.layers[0].self_attn
    assert attn.k_proj.out_features < attn.q_proj.out_features
    block = model.model.layers[0]
    linears = block_linears(block, "model.layers.0")
    cpu = torch.device("cpu")
    stream = ActivationStream.capture(model, model.model.layers, windows_of(calib_tokens, 2), 2, (DENSE,),
                                      MemoryStore(cpu), cpu)
    acc = GramAccumulator(frozenset({Stat.GRAM}), cpu)
    stream.record(block, 0, linears, acc)
    groups = sorted(sorted(n.rsplit(".", 1)[1] for n in g) for g in acc.groups)
    assert groups == [["down_proj"], ["gate_proj", "up_proj"], ["k_proj", "q_proj", "v_proj"], ["o_proj"]]
    assert acc.for_linear("model.layers.0.self_attn.k_proj").gram is acc.for_linear("model.layers.0.self_attn.q_proj").gram
    attn_names = [f"model.layers.0.self_attn.{p}_proj" for p in "qkv"]
    taken = [acc.take(n) for n in attn_names[:2]]
    assert len(acc.stats) == 4  # k/v not all taken: the group's tensors stay
    taken.append(acc.take(attn_names[2]))
    assert len(acc.stats) == 3 and all(t.gram is taken[0].gram for t in taken)  # let go, still shared
    assert not any(t.owned for t in taken) and acc.take("model.layers.0.self_attn.o_proj").owned  # o alone
    taken[0].let_go("gram")
    assert taken[0].gram is None and taken[1].gram is not None  # each record is its own
    plain = LayerStats(gram=taken[1].gram)
    plain.let_go("gram")
    assert plain.gram is not None  # a record not handed over keeps what it reads


def test_grams_are_summed_in_slabs_exactly(monkeypatch):
    """Slab by slab (3 rows at a time here; the Grams' slabs up to their diagonal, mirrored) the Grams equal X·Xᵀ,
    X′·X′ᵀ and X·X′ᵀ made from the inputs at once."""
    import svdllm.calibration as calibration
    from svdllm.calibration import GramAccumulator, Stat

    monkeypatch.setattr(calibration, "GRAM_SLAB", 3)
    monkeypatch.setattr(calibration, "SYMMETRIC_SLAB", 3)
    g = torch.Generator().manual_seed(0)
    x, xc = torch.randn(2, 5, 16, generator=g), torch.randn(2, 5, 16, generator=g)
    acc = GramAccumulator(frozenset({Stat.GRAM, Stat.COMP, Stat.CROSS}), torch.device("cpu"))
    for _ in range(2):
        acc.add_batch({"a": x, "b": x}, {"a": xc, "b": xc})
    st = acc.take("a")
    flat, flat_c = x.reshape(-1, 16).double(), xc.reshape(-1, 16).double()
    for got, want in ((st.gram, flat.T @ flat), (st.comp_gram, flat_c.T @ flat_c), (st.cross, flat.T @ flat_c)):
        assert got.dtype == torch.float64
        torch.testing.assert_close(got, 2 * want, rtol=1e-5, atol=1e-5)
    assert st.tokens == 20



@pytest.mark.parametrize("tokens, from_outputs", [(1, True), (10**6, False)])  # tokens: only for the route
def test_the_fit_from_kept_inputs_equals_the_fit_from_the_grams(tokens, from_outputs):
    """With few calibration tokens per input the accumulator keeps X and X′ themselves (every batch, in order) and
    makes no XᵀX′; each linear's fit then makes W·XᵀX′ and W·X′ᵀX′ from its outputs.  With many it makes XᵀX′.
    Either way the error-corrected fit gives the factors and the reported loss of the float64 reference Grams."""
    from svdllm.calibration import GramAccumulator, LayerStats, Stat
    from svdllm.methods import ErrorCorrectedOptions, method_of

    g = torch.Generator().manual_seed(0)
    n, outs = 16, {"a": 6, "b": 10}
    weights = {name: torch.randn(m, n, generator=g) for name, m in outs.items()}
    x = torch.randn(2, 5, n, generator=g)
    xc = x + 0.3 * torch.randn(2, 5, n, generator=g)
    acc = GramAccumulator(frozenset({Stat.COMP, Stat.CROSS}), torch.device("cpu"), weights=weights, tokens=tokens)
    for _ in range(2):
        acc.add_batch({"a": x, "b": x}, {"a": xc, "b": xc})
    route = acc.route(["a", "b"], n)
    assert route.inputs == from_outputs and not route.spectra
    flat, flat_c = x.reshape(-1, n).double(), xc.reshape(-1, n).double()
    opts = ErrorCorrectedOptions(output_whitening=False)
    for name, w in weights.items():
        st = acc.take(name)
        assert (st.cross is None) == from_outputs and (st.inputs is not None) == from_outputs
        if from_outputs:
            assert torch.equal(st.inputs, torch.cat([x.reshape(-1, n)] * 2))
            assert torch.equal(st.comp_inputs, torch.cat([xc.reshape(-1, n)] * 2))
        reference = LayerStats(tokens=20, comp_gram=2 * flat_c.T @ flat_c, cross=2 * flat.T @ flat_c)
        got, got_info = method_of(opts).factorize(w, st, 4, opts)
        want, want_info = method_of(opts).factorize(w, reference, 4, opts)
        gap = (got.u @ got.v - want.u @ want.v) @ flat_c.T  # on the compressed inputs: the fit's own metric
        assert float(gap.norm()) < 1e-5 * float((w.double() @ flat_c.T).norm())
        assert got_info["loss"] == pytest.approx(want_info["loss"], rel=1e-5)
        assert acc.stats.get("a") is None or name == "a"  # let go once both have taken theirs
    assert not acc.kept


def test_the_cross_product_from_the_forwards_outputs_equals_the_grams():
    """A group with fewer outputs than inputs (a down_proj) whose dense outputs y = x·Wᵀ the forward made sums
    W·XᵀX′ as Σ y·x′ᵀ and makes no XᵀX′: the same float64 reference product, and the fit's factors and loss.
    Without the outputs, or with as many outputs as inputs, XᵀX′ is made as before."""
    from svdllm.calibration import GramAccumulator, LayerStats, Stat
    from svdllm.methods import ErrorCorrectedOptions, method_of

    g = torch.Generator().manual_seed(0)
    n = 16
    x = torch.randn(2, 5, n, generator=g)
    xc = x + 0.3 * torch.randn(2, 5, n, generator=g)
    flat, flat_c = x.reshape(-1, n).double(), xc.reshape(-1, n).double()
    opts = ErrorCorrectedOptions(output_whitening=False)
    for outs, given, from_outputs in (((6,), True, True), ((6,), False, False), ((16,), True, False),
                                      ((6, 12), True, False)):
        weights = {f"l{i}": torch.randn(m, n, generator=g) for i, m in enumerate(outs)}
        acc = GramAccumulator(frozenset({Stat.COMP, Stat.CROSS}), torch.device("cpu"), weights=weights, tokens=10**6)
        assert acc.outputs_for(list(weights)) == (list(weights) if sum(outs) < n else [])  # what a forward keeps
        for _ in range(2):
            made = {name: x @ w.T for name, w in weights.items()} if given else {}
            acc.add_batch(dict.fromkeys(weights, x), dict.fromkeys(weights, xc), made)
        assert acc.route(list(weights), n).cross == from_outputs
        for name, w in weights.items():
            st = acc.take(name)
            assert (st.cross is None) == from_outputs and (st.weighted_cross is not None) == from_outputs
            if from_outputs:
                torch.testing.assert_close(st.weighted_cross, 2 * w.double() @ flat.T @ flat_c, rtol=1e-5, atol=1e-5)
            reference = LayerStats(tokens=20, comp_gram=2 * flat_c.T @ flat_c, cross=2 * flat.T @ flat_c)
            got, got_info = method_of(opts).factorize(w, st, 4, opts)
            want, want_info = method_of(opts).factorize(w, reference, 4, opts)
            gap = (got.u @ got.v - want.u @ want.v) @ flat_c.T
            assert float(gap.norm()) < 1e-5 * float((w.double() @ flat_c.T).norm())
            assert got_info["loss"] == pytest.approx(want_info["loss"], rel=1e-5)


def test_the_recorder_keeps_outputs_made_without_a_bias_and_stops_after_them():
    """``InputRecorder.outputs_of``: a bias-free float32 linear's output is kept as the forward made it; one with a
    bias, or in bfloat16, is not (its rounding would be the statistic's); a stopped forward runs on until the named
    outputs are made, and no further."""
    from svdllm.calibration import InputRecorder, _Stop

    class Block(torch.nn.Module):
        def __init__(self, dtype: torch.dtype) -> None:
            super().__init__()
            self.a = torch.nn.Linear(8, 4, bias=False, dtype=dtype)
            self.b = torch.nn.Linear(8, 4, dtype=dtype)
            self.c = torch.nn.Linear(8, 3, bias=False, dtype=dtype)
            self.after = 0

        def forward(self, x):
            out = self.a(x) + self.b(x)
            out = torch.cat([out, self.c(x)], -1)
            self.after += 1  # the rest of the block
            return out

    for dtype in (torch.float32, torch.bfloat16):
        block = Block(dtype)
        x = torch.randn(3, 8, dtype=dtype)
        linears = {"a": block.a, "b": block.b, "c": block.c}
        with InputRecorder(linears, outputs_of=["a", "b", "c"]) as recorder:
            block(x)
            kept = recorder.take_outputs()
            assert sorted(kept) == (["a", "c"] if dtype == torch.float32 else [])
            if kept:
                assert torch.equal(kept["a"], block.a(x)) and torch.equal(kept["c"], block.c(x))
            recorder.take()
            recorder.stop_when_complete = True
            with pytest.raises(_Stop):
                block(x)
            assert block.after == 1 and ("c" in recorder.take_outputs()) == (dtype == torch.float32)
        with InputRecorder(linears) as recorder:  # no outputs asked for: it stops at the last input
            recorder.stop_when_complete = True
            hooks = block.c.register_forward_hook(lambda *_: pytest.fail("c ran"))
            with pytest.raises(_Stop):
                block(x)
            hooks.remove()


def test_the_outputs_route_is_taken_where_it_costs_less():
    """The choice of ``sums_from_outputs`` at the shapes it was made for: 7B shapes with the scale benchmark's 512
    tokens sum from their outputs; SmolLM2 with the default 32×512 tokens and the tests' tiny models keep the Grams."""
    from svdllm.calibration import sums_from_outputs

    assert sums_from_outputs(512, 11008, 4096, statistic_needed=False)  # 7B down_proj, the scale benchmark's calibration
    assert sums_from_outputs(512, 11008, 4096, statistic_needed=True)
    assert sums_from_outputs(512, 4096, 3 * 4096, statistic_needed=True)  # 7B q/k/v
    for width, outs in ((576, 960), (576, 576), (576, 2 * 1536), (1536, 576)):  # SmolLM2's q/k/v, o, gate/up, down
        for needed in (False, True):  # with the default 32×512 tokens: the Grams, so its results are unchanged
            assert not sums_from_outputs(16384, width, outs, statistic_needed=needed)
    assert not sums_from_outputs(512, 128, 64, statistic_needed=False)  # the tests' tiny models keep their Grams
    assert not sums_from_outputs(0, 4096, 4096, statistic_needed=False)

def test_low_rank_linear_stores_u_rank_major_through_copies_and_casts():
    gen = torch.Generator().manual_seed(0)
    dense = torch.nn.Linear(24, 40)
    u, v = torch.randn(40, 6, generator=gen), torch.randn(6, 24, generator=gen)
    layer = LowRankLinear.from_factors(dense, u, v)
    x = torch.randn(3, 24, generator=gen)
    with torch.no_grad():
        assert torch.allclose(layer(x), x @ v.T @ u.T + dense.bias, atol=1e-5)
    for m in (layer, copy.deepcopy(layer), copy.deepcopy(layer).to(torch.bfloat16), LowRankLinear(24, 40, 6)):
        w = m.svd_u.weight
        assert w.shape == (40, 6) and w.t().is_contiguous() and not w.is_contiguous()
    m = LowRankLinear(24, 40, 6)
    m.svd_u.weight.data = m.svd_u.weight.data.contiguous()  # what a plain load hands back
    m.use_rank_major()
    assert m.svd_u.weight.t().is_contiguous()


def all_linears(model: torch.nn.Module) -> dict:
    prefix, blocks = decoder_blocks(model)
    return {n: m for i, b in enumerate(blocks) for n, m in block_linears(b, f"{prefix}.{i}").items()}


def fisher_rows(model: torch.nn.Module, windows: torch.Tensor, linears: dict) -> dict:
    """FWSVD's row Fisher by plain autograd: Σ over windows of the squared weight gradient of that window's loss,
    summed along each output row (Conv1D keeps W as (in, out))."""
    out = {}
    for window in windows:
        ids = window[None]
        grads = torch.autograd.grad(model(input_ids=ids, labels=ids).loss, [m.weight for m in linears.values()])
        for (name, m), g in zip(linears.items(), grads):
            rows = (g.double() ** 2).sum(0 if type(m).__name__ == "Conv1D" else 1)
            out[name] = out.get(name, 0) + rows
    return out


def output_grams(model: torch.nn.Module, windows: torch.Tensor, names: list[str], batch: int = 4) -> dict:
    """Σ g gᵀ of each linear's output gradient by plain autograd of the whole model, one window's loss at a time
    (each batch's product in float32, summed in float64: the precision the input Grams have too)."""
    grads: dict = {n: [] for n in names}
    for window in windows:
        outs: dict = {}
        hooks = [model.get_submodule(n).register_forward_hook(lambda _m, _a, o, n=n: outs.__setitem__(n, o))
                 for n in names]
        loss = model(input_ids=window[None], labels=window[None]).loss
        for h in hooks:
            h.remove()
        for n, g in zip(names, torch.autograd.grad(loss, [outs[n] for n in names])):
            grads[n].append(g.reshape(-1, g.shape[-1]))
    out: dict = {}
    for n, gs in grads.items():
        for r in range(0, len(gs), batch):
            g = torch.cat(gs[r:r + batch])
            out[n] = out.get(n, 0) + (g.T @ g).double()
    return out


def reference_compress(model: torch.nn.Module, windows: torch.Tensor, method: str, ratio: float,
                       true_sequential: bool = False) -> dict:
    """The plainest loop: whole-model forwards with hooks, one block after another; returns name → (u, v).
    True-sequential: one linear after another in forward order, each fitted on the X′ of the
    model with the block's earlier linears already swapped.  W·XᵀX′ of bias-free linears reading an input that has
    more dimensions than all its readers have outputs (a down_proj) is Σ y·x′ᵀ from the dense forward's outputs y."""
    from svdllm.calibration import LayerStats, Stat
    from svdllm.ranks import rank_for_ratio

    opts, meth = options_for(method), METHODS[method]
    dense = copy.deepcopy(model)
    prefix, blocks = decoder_blocks(model)
    fisher = fisher_rows(dense, windows, all_linears(dense)) if Stat.ROW_FISHER in meth.needs else {}
    out_grams = output_grams(dense, windows, list(all_linears(dense))) if getattr(opts, "output_whitening", False) \
        else {}
    factors = {}

    readers: dict = {}  # per linear: the outputs of every linear reading its very input
    made: list = []  # per batch: the dense linears' outputs less the bias

    def inputs(m: torch.nn.Module, names: list[str], outputs: bool = False) -> list[dict]:
        per_batch = []
        if outputs:
            made.clear()
        for batch in windows.split(4):
            seen: dict = {}
            raw: dict = {}
            out: dict = {}

            def keep(n, a):
                raw[n] = a[0]
                seen[n] = a[0].reshape(-1, a[0].shape[-1]).float()

            def keep_output(n, mod, o):
                if dense_weight(mod)[1] is None:
                    out[n] = o.reshape(-1, o.shape[-1]).float()

            hooks = [m.get_submodule(n).register_forward_pre_hook(lambda _m, a, n=n: keep(n, a)) for n in names]
            hooks += [m.get_submodule(n).register_forward_hook(lambda mod, _a, o, n=n: keep_output(n, mod, o))
                      for n in names if outputs]
            with torch.no_grad():
                m(input_ids=batch, use_cache=False)
            for h in hooks:
                h.remove()
            for n in raw if outputs else ():
                readers[n] = sum(dense_weight(m.get_submodule(r))[0].shape[0] for r in raw if raw[r] is raw[n])
            per_batch.append(seen)
            if outputs:
                made.append(out)
        return per_batch

    def gram(a: list, b: list, name: str) -> torch.Tensor:
        return sum((x[name].T @ y[name]).double() for x, y in zip(a, b))

    for i in range(len(blocks)):
        names = list(block_linears(blocks[i], f"{prefix}.{i}"))
        x = inputs(dense, names, outputs=True)
        xc = inputs(model, names) if meth.sequential else None
        for name in list(x[0]) if true_sequential else names:  # forward order (Phi-3 defines o_proj first)
            if true_sequential:
                xc = inputs(model, [name])
            weight, _ = dense_weight(model.get_submodule(name))
            stats = LayerStats(tokens=sum(b[name].shape[0] for b in x), fisher=fisher.get(name),
                               out_gram=out_grams.get(name))
            if Stat.GRAM in meth.needs:
                stats.gram = gram(x, x, name)
            if Stat.ABS in meth.needs:
                stats.abs_sum = sum(b[name].abs().sum(0).double() for b in x)
            if xc is not None:
                stats.comp_gram = gram(xc, xc, name)
                if readers[name] < weight.shape[1] and name in made[0]:
                    stats.weighted_cross = sum((y[name].T @ b[name]).double() for y, b in zip(made, xc))
                else:
                    stats.cross = gram(x, xc, name)
            f, _ = meth.factorize(weight, stats, rank_for_ratio(*weight.shape, ratio), opts)
            u, v = f.u.clone(), f.v.clone()
            for c in range(u.shape[1]):  # each rank component balanced: equal norms on both sides, same product
                scale = (v[c].norm() / u[:, c].norm()).sqrt()
                u[:, c] *= scale
                v[c] /= scale
            factors[name] = (u.float(), v.float())
            if true_sequential:
                replace_module(model, name, LowRankLinear.from_factors(model.get_submodule(name), *factors[name]))
        for name in names if not true_sequential else ():
            replace_module(model, name, LowRankLinear.from_factors(model.get_submodule(name), *factors[name]))
    return factors


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_block_loop_equals_the_reference_loop(method, arch, make_model, calib_tokens):
    windows = windows_of(calib_tokens)
    ref = reference_compress(make_model(arch), windows, method, 0.4)
    result = compress(make_model(arch), windows, CompressionConfig(ratio=0.4, method=method, true_sequential=False, rank_rule="uniform"),
                      progress=False)
    model = result.model
    assert set(ref) == set(result.record.ranks)
    for name, (u, v) in ref.items():
        got = model.get_submodule(name)
        assert u.abs().max() > 0.01 and v.abs().max() > 0.01
        assert (got.svd_u.weight - u).abs().max() <= 1e-6, name
        assert (got.svd_v.weight - v).abs().max() <= 1e-6, name


@pytest.mark.parametrize("method", [m for m, meth in METHODS.items() if meth.sequential])
@pytest.mark.parametrize("arch", ["llama", "gpt2", "phi3"])
def test_true_sequential_equals_its_reference_and_changes_the_late_groups(method, arch, make_model, calib_tokens):
    windows = windows_of(calib_tokens)
    ref = reference_compress(make_model(arch), windows, method, 0.4, true_sequential=True)
    cfg = CompressionConfig(ratio=0.4, method=method, true_sequential=True, rank_rule="uniform")
    model = compress(make_model(arch), windows, cfg, progress=False).model
    plain = compress(make_model(arch), windows, CompressionConfig(ratio=0.4, method=method, true_sequential=False, rank_rule="uniform"),
                     progress=False).model
    moved = set()
    for name, (u, v) in ref.items():
        got = model.get_submodule(name)
        assert (got.svd_u.weight - u).abs().max() <= 1e-6, name
        assert (got.svd_v.weight - v).abs().max() <= 1e-6, name
        if ".0." in name and not torch.allclose(got.svd_u.weight, plain.get_submodule(name).svd_u.weight, atol=1e-4):
            moved.add(name.rsplit(".", 1)[-1])
    first = {"q_proj", "k_proj", "v_proj", "qkv_proj", "c_attn"}  # block 0's first group sees the same X′ either way
    assert moved and not moved & first
