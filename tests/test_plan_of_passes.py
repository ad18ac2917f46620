"""The plan of passes (issue 36): which stages the options give, where every pass's activations wait, and which
kept products a rerun reuses."""
from __future__ import annotations

import tempfile
import weakref
from pathlib import Path

import pytest
import torch

from conftest import tiny_model
from svdllm import CompressionConfig, compress
from svdllm import blockloop, stages
from svdllm.cache import DiskStore, MemoryStore
from svdllm.calibration import ActivationStream
from svdllm.checkpoint import RunDir
from svdllm.methods import options_for
from svdllm.pipeline import plan_passes
from svdllm.stages import Stage


def names(cfg: CompressionConfig, evaluate: bool = True) -> list[str]:
    return [type(s).__name__ for s in plan_passes(cfg, evaluate)]


def test_the_options_give_the_stages():
    assert names(CompressionConfig()) == ["ReversePass", "AllocateRanks", "BlockLoop", "Evaluate"]
    assert names(CompressionConfig(method="svd"), evaluate=False) == ["BlockLoop"]
    assert names(CompressionConfig(method="svdllm-w")) == ["BlockLoop", "Evaluate"]
    assert names(CompressionConfig(method="fwsvd")) == ["ReversePass", "BlockLoop", "Evaluate"]
    assert names(CompressionConfig(method=options_for("svdllm-w", output_whitening=True))) == \
        ["ReversePass", "BlockLoop", "Evaluate"]
    assert names(CompressionConfig(method="svdllm", rank_rule="fisher")) == \
        ["ReversePass", "AllocateRanks", "BlockLoop", "Evaluate"]
    reverse = plan_passes(CompressionConfig(method=options_for("svdllm-ec", output_whitening=False)), True)[0]
    assert reverse.sensitivity and not reverse.output_grams and reverse.spectra.out_side is None  # one-sided


def test_a_stage_whose_need_no_earlier_stage_makes_is_refused(monkeypatch):
    class Orphan(Stage):
        @property
        def needs(self):
            return (float,)

    real = blockloop.BlockLoop.needs
    monkeypatch.setattr(blockloop.BlockLoop, "needs", property(lambda self: (*real.fget(self), float)))
    with pytest.raises(AssertionError, match="BlockLoop needs"):
        plan_passes(CompressionConfig(), True)
    assert Orphan().describe()["needs"] == ["float"]


@pytest.mark.parametrize("offload", ["none", "cpu", "disk"])
@pytest.mark.parametrize("with_run_dir", [False, True])
def test_every_pass_puts_its_activations_where_offload_says(offload, with_run_dir, tmp_path, monkeypatch):
    """The reverse pass's stream and kept block inputs, the calibration stream and the evaluation stream all wait
    in the one place the options chose; disk without a run folder is a temporary folder, removed afterwards."""
    seen: list[tuple[str, object]] = []
    puts: list[object] = []
    real_capture = ActivationStream.capture.__func__

    def capture(cls, model, blocks, windows, batch, lanes, store, device, name="calib"):
        seen.append((name, store))
        return real_capture(cls, model, blocks, windows, batch, lanes, store, device, name)

    for kind in (MemoryStore, DiskStore):
        real_put = kind.put
        monkeypatch.setattr(kind, "put", lambda self, key, value, real_put=real_put: (puts.append(self),
                                                                                        real_put(self, key, value))[1])
    monkeypatch.setattr(ActivationStream, "capture", classmethod(capture))
    temp_before = set(Path(tempfile.gettempdir()).glob("svdllm-offload-*"))
    windows = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(0))
    run_dir = RunDir(tmp_path / "run", "model") if with_run_dir else None
    compress(tiny_model("llama", 64), windows, CompressionConfig(ratio=0.4, offload=offload),
             eval_windows={"e": windows[:2]}, run_dir=run_dir, progress=False)
    assert sorted(name for name, _ in seen) == ["calib", "eval0", "grad"]
    stores = {id(store) for _, store in seen}
    assert {id(s) for s in puts if not _gram_store(s)} <= stores  # nothing else held activations
    for _, store in seen:
        if offload == "disk":
            assert isinstance(store, DiskStore)
            assert store.folder.parent == (tmp_path / "run" if with_run_dir else store.folder.parent)
            assert not store.folder.exists()  # emptied with the run
        else:
            assert isinstance(store, MemoryStore) and store.device == torch.device("cpu")
    assert set(Path(tempfile.gettempdir()).glob("svdllm-offload-*")) == temp_before  # the temporary folder is gone


def _gram_store(store: object) -> bool:
    """The output-gradient Grams' store: a statistic, not activations."""
    return isinstance(store, DiskStore) and store.folder.name.startswith("grams") or \
        isinstance(store, MemoryStore) and any(k.startswith("gram.") for k in store._mem)


def test_offload_disk_without_a_run_folder_uses_a_temporary_folder(monkeypatch):
    folders: list[Path] = []
    real = DiskStore.__init__
    monkeypatch.setattr(DiskStore, "__init__", lambda self, folder: (folders.append(Path(folder)), real(self, folder))[1])
    windows = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(0))
    compress(tiny_model("llama", 64), windows, CompressionConfig(ratio=0.4, offload="disk"), progress=False)
    assert folders and all(f.parent.name.startswith("svdllm-offload-") for f in folders)
    assert not any(f.parent.exists() for f in folders)


# ---------------------------------------------------------------- keyed products


class Counts:
    def __init__(self, monkeypatch):
        self.calls = {"gradients": 0, "ranks": 0, "blocks": 0}
        for name, owner, attr in (("gradients", stages, "gradient_statistics"), ("ranks", stages, "allocate"),
                                  ("blocks", blockloop, "_fit_group")):
            real = getattr(owner, attr)
            monkeypatch.setattr(owner, attr, self._counted(name, real))

    def _counted(self, name, real):
        def call(*args, **kwargs):
            self.calls[name] += 1
            return real(*args, **kwargs)
        return call

    def take(self) -> dict[str, bool]:
        made = {k: v > 0 for k, v in self.calls.items()}
        self.calls = dict.fromkeys(self.calls, 0)
        return made


def run_once(tmp_path, windows, **cfg):
    model = tiny_model("llama", 64)
    return compress(model, windows, CompressionConfig(ratio=0.4, **cfg), run_dir=RunDir(tmp_path / "run", "model"),
                    progress=False)


def test_a_rerun_remakes_exactly_the_products_whose_keys_changed(tmp_path, monkeypatch):
    counts = Counts(monkeypatch)
    windows = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(0))
    first = run_once(tmp_path, windows)
    assert counts.take() == {"gradients": True, "ranks": True, "blocks": True}
    again = run_once(tmp_path, windows)  # the same run: every product kept, every block restored
    assert counts.take() == {"gradients": False, "ranks": False, "blocks": False}
    assert again.record.ranks == first.record.ranks
    run_once(tmp_path, windows, method=options_for("svdllm-ec", beta=0.5))  # the block loop's option only
    assert counts.take() == {"gradients": False, "ranks": False, "blocks": True}
    run_once(tmp_path, windows, rank_cap=1.5)  # the allocation's bound: ranks and blocks
    assert counts.take() == {"gradients": False, "ranks": True, "blocks": True}
    run_once(tmp_path, windows, method=options_for("svdllm-ec", output_damp=0.1))  # the spectra read it
    assert counts.take() == {"gradients": True, "ranks": True, "blocks": True}
    other = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(1))
    run_once(tmp_path, other, method=options_for("svdllm-ec", output_damp=0.1))  # other calibration windows
    assert counts.take() == {"gradients": True, "ranks": True, "blocks": True}


def test_another_model_remakes_every_product(tmp_path, monkeypatch):
    counts = Counts(monkeypatch)
    windows = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(0))
    run_once(tmp_path, windows)
    counts.take()
    compress(tiny_model("llama", 64), windows, CompressionConfig(ratio=0.4),
             run_dir=RunDir(tmp_path / "run", "another model"), progress=False)
    assert counts.take() == {"gradients": True, "ranks": True, "blocks": True}


def test_a_kept_product_is_read_back_bit_for_bit(tmp_path):
    windows = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(0))
    first, again = run_once(tmp_path, windows), run_once(tmp_path, windows)
    a, b = first.model.state_dict(), again.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert first.report.records == again.report.records


def test_the_dense_modules_swapped_out_are_let_go_before_the_last_group_is_fitted(monkeypatch):
    """Once the dense lane has run the whole block (the last true-sequential group's record), nothing holds the dense
    modules that the block's earlier groups were swapped out of: a 7B down_proj is fitted without 600 MB of them."""
    model = tiny_model("llama", 64)
    prefix = "model.layers.0."
    dense = {name: weakref.ref(m) for name, m in model.named_modules()
             if isinstance(m, torch.nn.Linear) and name.startswith(prefix)}
    alive: list[list[str]] = []
    real = blockloop._decompose_block

    def decompose(linears, acc, plan, opts, device):
        if all(n.startswith(prefix) for n in linears):
            alive.append(sorted(n.removeprefix(prefix) for n, ref in dense.items() if ref() is not None))
        return real(linears, acc, plan, opts, device)

    monkeypatch.setattr(blockloop, "_decompose_block", decompose)
    windows = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(0))
    compress(model, windows, CompressionConfig(ratio=0.4), progress=False)
    every = sorted(n.removeprefix(prefix) for n in dense)
    assert alive[:-1] == [every] * 3  # q/k/v, o and gate/up: the dense lane still runs the whole dense block
    assert alive[-1] == ["mlp.down_proj"]  # the last group's own dense weight is what it fits
