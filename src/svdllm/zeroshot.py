"""Zero-shot accuracy through lm-evaluation-harness, and two offline tasks built from the offline texts.

Scoring is lm-eval's own: ``HFLM`` wraps the model object svdllm loaded and
``simple_evaluate`` runs the tasks.  The offline tasks are ordinary lm-eval
task YAML + JSONL written once to the cache, from text that never calibrates:

- ``svdllm_cloze``: LAMBADA-style, predict the last word of a news passage
  (acc: the word is the greedy continuation);
- ``svdllm_next_sentence``: HellaSwag-style, the true next sentence of a
  Wikipedia test article against three sentences of other test articles
  (acc, acc_norm).
"""
from __future__ import annotations

import logging
import json
import math
import os
import random
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import assets
from .errors import OptionError, SvdllmError
from .files import atomic_write_text

if TYPE_CHECKING:
    from .checkpoint import RunDir
    from torch import nn

TASKS_VERSION = 2  # v2: the cloze task reports acc only (v1 also reported perplexity)
OFFLINE_TASKS = ("svdllm_cloze", "svdllm_next_sentence")
# the paper's zero-shot set with the metric its tables report: acc_norm where lm-eval normalises by length
PAPER_TASKS = {"openbookqa": "acc_norm", "winogrande": "acc", "hellaswag": "acc_norm", "piqa": "acc",
               "mathqa": "acc_norm", "arc_easy": "acc", "arc_challenge": "acc_norm"}
_SENTENCE = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'])")

log = logging.getLogger("svdllm")


def _sentences(text: str) -> list[str]:
    return [s.strip() for s in _SENTENCE.split(" ".join(text.split())) if len(s.split()) >= 4]


def cloze_items(docs: list[str], limit: int = 500) -> list[dict[str, str]]:
    """Passages of whole sentences (≥ 40 words) whose last word (alphabetic, ≥ 3 letters) is to be predicted."""
    items = []
    for doc in docs:
        sents = _sentences(doc)
        start = 0
        for end in range(len(sents)):
            words = " ".join(sents[start : end + 1]).split()
            if len(words) < 40:
                continue
            last = words[-1].rstrip(".!?\"')")
            if last.isalpha() and len(last) >= 3 and words[-1][len(last):] in (".", "!", "?"):
                items.append({"context": " ".join(words[:-1]), "target": last})
            start = end + 1
        if len(items) >= limit:
            break
    return items[:limit]


def next_sentence_items(articles: list[list[str]], limit: int = 500, seed: int = 0) -> list[dict[str, Any]]:
    """Three sentences of context, the true fourth and three sentences drawn from other articles, shuffled."""
    rng = random.Random(seed)
    pool = [(a, s) for a, sents in enumerate(articles) for s in sents]
    items = []
    for a, sents in enumerate(articles):
        for i in range(3, len(sents), 8):
            others = []
            while len(others) < 3:
                b, s = pool[rng.randrange(len(pool))]
                if b != a and s not in others:
                    others.append(s)
            choices = [sents[i], *others]
            rng.shuffle(choices)
            items.append({"context": " ".join(sents[i - 3 : i]), "choices": choices,
                          "label": choices.index(sents[i])})
            if len(items) >= limit:
                return items
    return items


_YAML = {
    "svdllm_cloze": """task: svdllm_cloze
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood
doc_to_text: context
doc_to_target: "{{{{' ' + target}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: {version}
""",
    "svdllm_next_sentence": """task: svdllm_next_sentence
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: context
doc_to_choice: choices
doc_to_target: label
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: {version}
""",
}


def offline_tasks_dir() -> Path:
    """The offline tasks' folder in the cache, written on first use (YAML + JSONL, deterministic)."""
    from .data import is_test_article, load_text, wiki_articles

    folder = assets.cache_dir() / f"lm-eval-tasks-v{TASKS_VERSION}"
    if all((folder / f"{t}.yaml").is_file() for t in OFFLINE_TASKS):
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    news = [line for line in load_text("news").splitlines() if line.strip()]
    articles = [_sentences(p) for t, p in wiki_articles() if is_test_article(t)]
    data = {"svdllm_cloze": cloze_items(news), "svdllm_next_sentence": next_sentence_items([a for a in articles if len(a) >= 4])}
    for task, rows in data.items():
        jsonl = folder / f"{task}.jsonl"
        atomic_write_text(jsonl, "".join(json.dumps(r) + "\n" for r in rows))
        atomic_write_text(folder / f"{task}.yaml", _YAML[task].format(data=json.dumps(str(jsonl)), version=TASKS_VERSION))
    return folder


def _lm_eval() -> Any:
    try:
        import lm_eval  # type: ignore[import-not-found]
    except ImportError:
        raise SvdllmError("zero-shot tasks need lm-evaluation-harness: pip install 'svdllm[eval]'") from None
    return lm_eval


def resolve_tasks(spec: str, include_path: str | None = None, option: str = "eval_tasks"
                  ) -> tuple[list[str], Any] | None:
    """Task names from ``spec`` (``paper`` is the paper's seven, ``offline`` ours) and lm-eval's TaskManager
    with our folder (and ``include_path``) included, checked before any model is loaded; None when ``spec`` names
    none.  An unknown name is an error naming the fix; ``option`` names the field that holds the tasks."""
    if not spec.strip():
        if include_path:
            raise OptionError("include_path", f"needs `{option}` naming the tasks to run")
        return None
    _lm_eval()
    names: list[str] = []
    for part in (p.strip() for p in spec.split(",") if p.strip()):
        names += list(PAPER_TASKS) if part == "paper" else list(OFFLINE_TASKS) if part == "offline" else [part]
    if not names:
        raise OptionError(option, "names no task")
    if include_path and not Path(include_path).expanduser().is_dir():
        raise OptionError("include_path", f"{include_path}: no such folder")
    paths = [str(offline_tasks_dir())] if set(names) & set(OFFLINE_TASKS) else []
    if include_path:
        paths.append(str(Path(include_path).expanduser()))
    manager = _task_manager(names, paths)
    unknown = [n for n in names if n not in manager.all_tasks]
    if unknown:
        if include_path:  # lm-eval skips a YAML it cannot parse: name it rather than call the task unknown
            _check_yaml_files(Path(paths[-1]))
        raise OptionError(option, f"unknown lm-eval task {unknown[0]!r}: see `lm-eval ls tasks`, or give its "
                          f"YAML folder as `include_path` (offline: {', '.join(OFFLINE_TASKS)})")
    local = [n for n in names if include_path and n not in OFFLINE_TASKS and _is_under(manager, n, Path(paths[-1]))]
    if local:  # only the tasks asked for, after saying so: their YAML's !function imports code from the folder
        log.warning("tasks %s come from %s: building them runs any Python code their YAML names", ", ".join(local),
                    paths[-1])
        _check_local_tasks(local, manager)
    return names, manager


def _task_manager(names: list[str], paths: list[str]) -> Any:
    """lm-eval's TaskManager over ``paths`` alone when every name is a plain task there (indexing lm-eval's own
    thousands of YAMLs takes seconds), else over its own tasks too.  A group or tag may name lm-eval's tasks, so only
    plain tasks take the short way.  Either way the YAMLs are indexed without running their code."""
    from lm_eval.tasks import TaskManager  # type: ignore[import-not-found]

    if paths:
        own = TaskManager(include_path=paths, include_defaults=False)
        if all(n in own.all_subtasks for n in names):
            return own
    return TaskManager(include_path=paths or None)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _check_yaml_files(folder: Path) -> None:
    """Every task YAML of a user's folder parses (lm-eval would skip a broken one silently and then call the task
    unknown); ``!function`` references are read as names, never imported."""
    from lm_eval.tasks._yaml_loader import load_yaml  # type: ignore[import-not-found]

    for path in sorted(folder.rglob("*.yaml")):
        try:
            load_yaml(path, resolve_func=False)
        except Exception as exc:  # yaml's, an import's, a missing file's: all the user's to fix
            raise OptionError("include_path", f"{path}: {_first_line(exc)}") from None


def _is_under(manager: Any, name: str, folder: Path) -> bool:
    path = getattr(manager.task_index.get(name), "yaml_path", None)
    return path is not None and folder.resolve() in Path(path).resolve().parents


def _check_local_tasks(names: list[str], manager: Any) -> None:
    """Build each of the user's tasks and render its first document, before any model work: a bad metric, template
    field or data file is one line now rather than a traceback after the perplexity pass."""
    from lm_eval.tasks import get_task_dict  # type: ignore[import-not-found]

    for name in names:
        try:
            tasks = get_task_dict([name], manager)
            for task in _leaves(tasks):
                doc = next(iter(task.eval_docs))
                task.doc_to_text(doc)
                task.doc_to_target(doc)
        except Exception as exc:
            raise OptionError("eval_tasks", f"task {name!r} cannot be built: {_first_line(exc)}") from None


def _leaves(tasks: Any) -> list[Any]:
    """The Task objects of get_task_dict's (possibly nested, group-keyed) answer."""
    out = []
    for value in (tasks.values() if isinstance(tasks, dict) else [tasks]):
        out += _leaves(value) if isinstance(value, dict) else [value]
    return out


def zero_shot(model: "nn.Module", tokenizer: Any, tasks: list[str], manager: Any, limit: int | None = None,
              batch_size: int = 8) -> dict[str, Any]:
    """lm-eval's results for ``tasks`` on ``model`` (dense or compressed) as loaded: its whole output dict."""
    lm_eval = _lm_eval()
    from lm_eval.models.huggingface import HFLM  # type: ignore[import-not-found]

    device = str(next(p.device for p in model.parameters()))
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=device)
    # lm-eval bootstraps some metrics' stderr (perplexity, f1, …) in a forked multiprocessing pool, and a fork beside
    # torch's threads can deadlock (it hung CI once); its DISABLE_MULTIPROC runs the bootstrap in this process.
    multiproc = os.environ.get("DISABLE_MULTIPROC")
    os.environ["DISABLE_MULTIPROC"] = "1"
    try:
        return lm_eval.simple_evaluate(model=lm, tasks=tasks, task_manager=manager, limit=limit,
                                       log_samples=False, bootstrap_iters=1000)
    except Exception as exc:  # a task whose data lives on the hub, with no network
        if any(w in f"{type(exc).__name__} {exc}" for w in ("Offline", "Connection", "hub", "resolve", "Couldn't reach")):
            raise SvdllmError(f"a task's data needs the Hugging Face hub, which is not reachable "
                              f"({type(exc).__name__}); use the offline tasks ({', '.join(OFFLINE_TASKS)}) or local "
                              "task YAMLs (include_path)") from None
        raise
    finally:
        if multiproc is None:
            del os.environ["DISABLE_MULTIPROC"]
        else:
            os.environ["DISABLE_MULTIPROC"] = multiproc


def score_rows(results: dict[str, Any]) -> list[tuple[str, str, float, float]]:
    """(task, metric, value, stderr) for every metric lm-eval reported, tasks in its order."""
    rows = []
    for task, metrics in results["results"].items():
        for key, value in metrics.items():
            metric, comma, filt = key.partition(",")  # "acc,none": lm-eval's metric,filter keys
            if not comma or metric.endswith("_stderr") or not isinstance(value, (int, float)):
                continue
            err = metrics.get(f"{metric}_stderr,{filt}")
            rows.append((task, metric, float(value), float(err) if isinstance(err, (int, float)) else math.nan))
    return rows


def markdown(rows_by_model: dict[str, list[tuple[str, str, float, float]]]) -> str:
    """One table, a column per model (value ± stderr)."""
    heads = list(rows_by_model)
    keys = list(dict.fromkeys((t, m) for rows in rows_by_model.values() for t, m, _, _ in rows))
    cell = {(h, t, m): f"{v:.4f} ± {e:.4f}" if not math.isnan(e) else f"{v:.4f}"
            for h, rows in rows_by_model.items() for t, m, v, e in rows}
    lines = ["| task | metric | " + " | ".join(heads) + " |", "|---|---|" + "---:|" * len(heads)]
    lines += [f"| {t} | {m} | " + " | ".join(cell.get((h, t, m), "") for h in heads) + " |" for t, m in keys]
    return "\n".join(lines)


def kept_rows(run: "RunDir", made_from: list, model: "nn.Module", tokenizer: Any, tasks: list[str], manager: Any,
              limit: int | None) -> list[tuple[str, str, float, float]]:
    """``score_rows`` of the model, a product of the run folder made from ``made_from`` (a resumed run does not
    score the dense model again)."""
    from . import distributed
    from .checkpoint import read_checked_json, write_checked_json

    def make(folder: Path) -> list:
        rows = score_rows(zero_shot(model, tokenizer, tasks, manager, limit=limit))
        if distributed.is_writer():
            write_checked_json(folder / "rows.json", rows)
        return rows

    return run.kept("zero-shot-dense", made_from, make,
                    lambda folder: [tuple(r) for r in read_checked_json(folder / "rows.json", "the kept rows")])
