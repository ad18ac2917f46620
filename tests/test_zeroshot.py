"""Zero-shot tasks through lm-evaluation-harness: the offline task data, the CLI, agreement with lm-eval's own CLI,
and the one-line errors."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import make_text
from svdllm.cli import main
from svdllm.zeroshot import cloze_items, next_sentence_items, _sentences
from test_cli import compress_args


def test_offline_items_come_from_the_text_and_are_deterministic():
    docs = [make_text(400, seed) for seed in range(6)]
    items = cloze_items(docs)
    assert items and items == cloze_items(docs)
    for it in items:
        assert it["target"].isalpha() and len(it["context"].split()) >= 39
        assert any(f"{it['context']} {it['target']}." in " ".join(d.split()) for d in docs)
    articles = [_sentences(d) for d in docs]
    mc = next_sentence_items(articles, seed=1)
    assert mc and mc == next_sentence_items(articles, seed=1)
    for it in mc:
        owner = next(a for a in articles if it["context"] in " ".join(a))
        context_end = next(i for i in range(3, len(owner)) if " ".join(owner[i - 3 : i]) == it["context"])
        assert it["choices"][it["label"]] == owner[context_end]
        assert len(it["choices"]) == 4 and all(c not in owner for j, c in enumerate(it["choices"]) if j != it["label"])
    assert len({it["label"] for it in mc}) > 1  # the answer is not always in one place


def tiny_task(folder: Path) -> Path:
    """A four-way next-sentence task in lm-eval's own YAML + JSONL, as a user's --include-path holds."""
    folder.mkdir()
    rows = next_sentence_items([_sentences(make_text(300, s)) for s in range(4)], limit=12)
    (folder / "tiny.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "tiny.yaml").write_text(
        f"task: tiny_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {json.dumps(str(folder / 'tiny.jsonl'))}\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: context\ndoc_to_choice: choices\n"
        "doc_to_target: label\nmetric_list:\n  - metric: acc\n  - metric: acc_norm\n")
    return folder


@pytest.mark.slow
def test_compress_eval_and_lm_evals_own_cli_agree(model_dir, text_file, tmp_path, capsys):
    tasks, out = tiny_task(tmp_path / "tasks"), tmp_path / "c"
    zs = ["--include-path", str(tasks), "--limit", "6"]
    assert main(compress_args(model_dir, text_file, out, "--eval-tasks", "tiny_mc", *zs)) == 0
    assert "| tiny_mc | acc_norm |" in capsys.readouterr().out
    report = json.loads((out / "svdllm_report.json").read_text())
    rows = {k: {(t, m): v for t, m, v, _ in report["zero_shot"][k]} for k in ("dense", "compressed")}
    assert set(rows["dense"]) == set(rows["compressed"]) == {("tiny_mc", "acc"), ("tiny_mc", "acc_norm")}
    assert json.loads((out / "config.json").read_text())["svdllm"]["zero_shot"]["tiny_mc acc"] == \
        rows["compressed"][("tiny_mc", "acc")]
    assert "| tiny_mc acc |" in (out / "README.md").read_text()

    js = tmp_path / "eval.json"
    assert main(["-q", "eval", str(out), "--data", "", "--tasks", "tiny_mc", *zs, "--json", str(js)]) == 0
    ours = json.loads(js.read_text())["lm_eval"]["results"]["tiny_mc"]
    assert ours["acc,none"] == rows["compressed"][("tiny_mc", "acc")]
    assert ours["acc_norm,none"] == rows["compressed"][("tiny_mc", "acc_norm")]

    lm_out = tmp_path / "lm-eval-out"
    proc = subprocess.run([sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args",
                           f"pretrained={out},trust_remote_code=True", "--tasks", "tiny_mc", "--include_path",
                           str(tasks), "--limit", "6", "--device", "cpu", "--output_path", str(lm_out)],
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    theirs = json.loads(next(lm_out.rglob("results*.json")).read_text())["results"]["tiny_mc"]
    assert theirs["acc,none"] == pytest.approx(ours["acc,none"]) and \
        theirs["acc_norm,none"] == pytest.approx(ours["acc_norm,none"])


@pytest.mark.slow
def test_bootstrapped_metrics_never_fork(model_dir, tmp_path, monkeypatch):
    """lm-eval bootstraps a perplexity's stderr in a forked pool, which can deadlock beside torch's threads."""
    import multiprocessing

    from svdllm.source import load_model
    from svdllm.zeroshot import resolve_tasks, zero_shot

    folder = tiny_task(tmp_path / "tasks")
    (folder / "tiny_ppl.yaml").write_text(
        (folder / "tiny.yaml").read_text().replace("task: tiny_mc", "task: tiny_ppl")
        .replace("output_type: multiple_choice", "output_type: loglikelihood")
        .replace("doc_to_choice: choices\n", "").replace("doc_to_target: label", "doc_to_target: \"{{choices[label]}}\"")
        .split("metric_list:")[0] + "metric_list:\n  - metric: perplexity\n")

    def no_pool(*args, **kwargs):
        raise AssertionError("lm-eval forked a multiprocessing pool")
    monkeypatch.setattr(multiprocessing, "Pool", no_pool)
    monkeypatch.delenv("DISABLE_MULTIPROC", raising=False)
    model, tok = load_model(str(model_dir))
    names, manager = resolve_tasks("tiny_ppl", str(folder))
    res = zero_shot(model, tok, names, manager, limit=6)
    assert res["results"]["tiny_ppl"]["perplexity,none"] > 1
    assert res["results"]["tiny_ppl"]["perplexity_stderr,none"] > 0  # bootstrapped, in this process
    assert "DISABLE_MULTIPROC" not in os.environ


def test_zero_shot_errors_are_one_line(model_dir, tmp_path, capsys, monkeypatch):
    assert main(["eval", str(model_dir), "--data", "", "--tasks", "no_such_task"]) == 2
    err = capsys.readouterr().err.strip()
    assert "unknown lm-eval task 'no_such_task'" in err and "--include-path" in err and "\n" not in err
    assert main(["eval", str(model_dir), "--data", "", "--tasks", "tiny_mc", "--include-path", str(tmp_path / "x")]) == 2
    assert "no such folder" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # as if not installed
    assert main(["eval", str(model_dir), "--data", "", "--tasks", "svdllm_cloze"]) == 2
    assert "pip install 'svdllm[eval]'" in capsys.readouterr().err


@pytest.mark.slow
def test_a_hub_task_offline_is_one_line(model_dir, tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_DATASETS_CACHE=str(tmp_path / "hf"))
    proc = subprocess.run([sys.executable, "-m", "svdllm", "eval", str(model_dir), "--data", "", "--tasks", "arc_easy",
                           "--limit", "2"], capture_output=True, text=True, env=env)
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert "needs the Hugging Face hub" in last and "svdllm_cloze" in last


@pytest.mark.real
@pytest.mark.slow
def test_dense_smollm2_is_above_chance_on_the_offline_tasks(tmp_path):
    js = tmp_path / "zs.json"
    assert main(["-q", "eval", "smollm2-135m", "--data", "", "--tasks", "offline", "--limit", "20", "--json", str(js)]) == 0
    res = json.loads(js.read_text())["lm_eval"]["results"]
    assert res["svdllm_cloze"]["acc,none"] > 0.1  # chance: about 0 (any word of the vocabulary)
    assert res["svdllm_next_sentence"]["acc_norm,none"] > 0.4  # chance: 0.25


@pytest.mark.slow  # three runs through lm-eval: 35 s
def test_a_rerun_does_not_score_the_dense_model_again(model_dir, text_file, tmp_path, monkeypatch):
    import svdllm
    import svdllm.workflow
    import svdllm.zeroshot

    tasks, out = tiny_task(tmp_path / "tasks"), tmp_path / "c"
    argv = lambda limit: compress_args(model_dir, text_file, out, "--eval-tasks", "tiny_mc",  # noqa: E731
                                       "--include-path", str(tasks), "--limit", limit)
    scored = []
    real = svdllm.zeroshot.zero_shot
    monkeypatch.setattr(svdllm.zeroshot, "zero_shot", lambda *a, **k: scored.append(1) or real(*a, **k))
    kept_file = tmp_path / ".c.svdllm-run" / "zero-shot-dense" / "rows.json"
    with monkeypatch.context() as m:
        m.setattr(svdllm.workflow, "compress", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
        assert main(argv("4")) == 130  # interrupted after the dense scores, before any block
        assert len(scored) == 1 and kept_file.is_file()
        assert main(argv("3")) == 130  # another --limit: scored afresh
        assert len(scored) == 2
    kept = json.loads(kept_file.read_text())["value"]
    assert main(argv("3")) == 0
    assert len(scored) == 3  # the compressed model only
    assert json.loads((out / "svdllm_report.json").read_text())["zero_shot"]["dense"] == kept


@pytest.mark.slow
@pytest.mark.parametrize("change, message", [
    (("doc_to_text: context", "doc_to_text: \"{{nowhere}}\""), "cannot be built"),
    (("doc_to_text: context", "doc_to_text: !function nothing.here"), "cannot be built"),  # imported only when asked
    (("  - metric: acc_norm", "  - metric: no_such_metric"), "cannot be built"),
    (("metric_list:", "metric_list: [unclosed"), "--include-path"),
])
def test_a_malformed_task_is_refused_before_any_model_work(model_dir, text_file, tmp_path, capsys, monkeypatch,
                                                            change, message):
    import svdllm.source

    tasks = tiny_task(tmp_path / "tasks")
    yaml = tasks / "tiny.yaml"
    yaml.write_text(yaml.read_text().replace(*change))
    monkeypatch.setattr(svdllm.source, "load_model", lambda *a, **k: pytest.fail("tasks are checked first"))
    monkeypatch.setattr(svdllm.source, "open_source", lambda *a, **k: pytest.fail("tasks are checked first"))
    assert main(compress_args(model_dir, text_file, tmp_path / "o", "--eval-tasks", "tiny_mc", "--include-path",
                              str(tasks))) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and "unknown lm-eval task" not in err, err


@pytest.mark.slow
def test_tasks_of_the_given_folder_alone_skip_lm_evals_own_index(tmp_path):
    """A plain task of the include path is resolved without indexing lm-eval's own tasks; a name only lm-eval has
    brings them in."""
    from svdllm.zeroshot import resolve_tasks

    tasks = tiny_task(tmp_path / "tasks")
    names, manager = resolve_tasks("tiny_mc", str(tasks))
    assert names == ["tiny_mc"] and "arc_easy" not in manager.all_tasks
    names, manager = resolve_tasks("tiny_mc,arc_easy", str(tasks))
    assert names == ["tiny_mc", "arc_easy"] and {"tiny_mc", "arc_easy"} <= set(manager.all_tasks)
