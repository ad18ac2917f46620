"""Text sources: the offline wiki/news samples, local files, and `datasets` when online."""
from __future__ import annotations

import bz2
import hashlib
import json
import re
import xml.etree.ElementTree as ET
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from . import assets
from .errors import DataError, OptionError

NAMED = ("wiki-train", "wiki-test", "news")
HUB_DATASETS = {  # name → (path, config, split, field)
    "wikitext2": ("wikitext", "wikitext-2-raw-v1", "test", "text"),
    "ptb": ("ptb_text_only", "penn_treebank", "test", "sentence"),
    "c4": ("allenai/c4", "en", "validation", "text"),
}
TEST_FRACTION = 10  # one article in ten goes to wiki-test, chosen by a hash of its title


def _strip_nested(text: str, open_: str, close: str) -> str:
    out, depth, i = [], 0, 0
    while i < len(text):
        if text.startswith(open_, i):
            depth, i = depth + 1, i + len(open_)
        elif depth and text.startswith(close, i):
            depth, i = depth - 1, i + len(close)
        else:
            if not depth:
                out.append(text[i])
            i += 1
    return "".join(out)


_LINK = re.compile(r"\[\[(?:[^\]|]*\|)?([^\]]*)\]\]")
_FILE = re.compile(r"\[\[(?:File|Image|Category|[a-z]{2,3}(?:-[a-z]+)?):[^\[\]]*(?:\[\[[^\]]*\]\][^\[\]]*)*\]\]", re.I)
_EXT = re.compile(r"\[(?:https?|ftp)://\S+\s?([^\]]*)\]")
_REF = re.compile(r"<ref[^>/]*/>|<ref[^>]*>.*?</ref>", re.S | re.I)
_TAG = re.compile(r"<[^>]+>")
_COMMENT = re.compile(r"<!--.*?-->", re.S)
_HEADING = re.compile(r"^=+\s*(.*?)\s*=+\s*$", re.M)


def strip_wiki_markup(text: str) -> str:
    """MediaWiki source → plain prose (templates, tables, refs, files and markup removed)."""
    text = _COMMENT.sub("", text)
    text = _REF.sub("", text)
    text = _strip_nested(text, "{{", "}}")
    text = _strip_nested(text, "{|", "|}")
    text = _FILE.sub("", text)
    text = _LINK.sub(r"\1", text)
    text = _EXT.sub(r"\1", text)
    text = _TAG.sub("", text)
    text = _HEADING.sub(r"\1", text)
    text = re.sub(r"'{2,}", "", text)
    text = text.replace("&nbsp;", " ").replace("&amp;", "&").replace("&lt;", "<").replace("&gt;", ">")
    lines = []
    for line in text.splitlines():
        line = re.sub(r"^[*#:;]+\s*", "", line).strip()
        if line and not line.startswith(("|", "!")):
            lines.append(re.sub(r"[ \t]+", " ", line))
    return "\n".join(lines)


@lru_cache(maxsize=1)
def wiki_articles() -> tuple[tuple[str, str], ...]:
    """(title, prose) for every main-namespace, non-redirect article of the offline Wikipedia sample."""
    out = []
    with bz2.open(assets.gensim_file("wiki"), "rb") as fh:
        for _, elem in ET.iterparse(fh):
            if not elem.tag.endswith("}page"):
                continue
            ns = elem.findtext("{*}ns")
            title = elem.findtext("{*}title") or ""
            body = elem.findtext("{*}revision/{*}text") or ""
            if ns == "0" and elem.find("{*}redirect") is None and not body.lstrip().upper().startswith("#REDIRECT"):
                prose = strip_wiki_markup(body)
                if len(prose) > 200:
                    out.append((title, prose))
            elem.clear()
    return tuple(out)


def is_test_article(title: str) -> bool:
    return int(hashlib.sha256(title.encode()).hexdigest(), 16) % TEST_FRACTION == 0


def _read_utf8(path: Path) -> str:
    """The file's text; a UTF-8 byte-order mark (as Windows editors write) is not part of it."""
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path} is not UTF-8 text (bad byte at offset {exc.start})") from None


def _jsonl_text(path: Path) -> str:
    docs = []
    for i, line in enumerate(_read_utf8(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            row: dict[str, Any] = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{i}: not valid JSON ({exc.msg})") from None
        if not isinstance(row, dict):
            raise DataError(f"{path}:{i}: a JSONL row must be an object with a 'text' or 'instruction' field")
        if "text" in row:
            if not isinstance(row["text"], str):
                raise DataError(f"{path}:{i}: 'text' must be a string, got {type(row['text']).__name__}")
            docs.append(row["text"])
        elif "instruction" in row:
            docs.append(format_instruction(row))
        else:
            raise DataError(f"{path}:{i}: a JSONL row needs a 'text' or 'instruction' field")
    return "\n\n".join(docs)


def format_instruction(row: dict[str, Any]) -> str:
    """Alpaca-style prompt + response as one training text."""
    prompt = f"### Instruction:\n{row['instruction']}\n\n"
    if row.get("input"):
        prompt += f"### Input:\n{row['input']}\n\n"
    return prompt + f"### Response:\n{row.get('output', '')}"


def check_spec(spec: str) -> None:
    """Fail fast, before any model is loaded, on a DATA spec that cannot resolve."""
    if spec in NAMED or spec in HUB_DATASETS:
        return
    if not Path(spec).expanduser().is_file():
        if Path(spec).suffix in (".txt", ".jsonl", ".json", ".md") or "/" in spec:
            raise FileNotFoundError(f"data file not found: {spec}")
        raise FileNotFoundError(
            f"unknown data {spec!r}: use {', '.join(NAMED)}, a .txt/.jsonl file, or one of {', '.join(HUB_DATASETS)} (online)"
        )


def load_text(spec: str) -> str:
    """Text for a DATA spec: wiki-train, wiki-test, news, a .txt/.jsonl path, or a datasets name."""
    if spec in ("wiki-train", "wiki-test"):
        want_test = spec == "wiki-test"
        return "\n\n".join(f"{t}\n{p}" for t, p in wiki_articles() if is_test_article(t) == want_test)
    if spec == "news":
        return Path(assets.gensim_file("news")).read_text(encoding="utf-8")
    path = Path(spec).expanduser()
    if spec in HUB_DATASETS and not path.is_file():
        return _hub_text(spec)
    check_spec(spec)  # a missing file or an unknown name is an error here
    return _jsonl_text(path) if path.suffix == ".jsonl" else _read_utf8(path)


def _hub_text(name: str) -> str:
    try:
        import datasets  # type: ignore[import-not-found]
    except ImportError:
        raise DataError(f"data {name!r} needs the `datasets` package: pip install 'svdllm[datasets]'") from None
    path, conf, split, field = HUB_DATASETS[name]
    try:
        ds = datasets.load_dataset(path, conf, split=split)
    except Exception as exc:  # offline, or the hub refused
        raise DataError(f"cannot load dataset {name!r} from the hub ({type(exc).__name__}); use a local file") from None
    rows = ds[field] if name != "c4" else ds.select(range(min(len(ds), 2000)))[field]
    return "\n\n".join(rows)


# Families whose models degrade without a BOS at the start of every window, whatever their tokenizer says
# (lm-eval's HFLM prepends one for Gemma too); measured: a real Gemma-3-270M scores 84.5 without BOS, 30.2 with.
BOS_FAMILIES = ("gemma", "gemma2", "gemma3", "gemma3_text")


def bos_token(tokenizer: Any, config: Any = None) -> int | None:
    """The BOS id every calibration and evaluation window starts with, or None: when the tokenizer adds one itself
    (its ``add_bos_token``, carried from a GGUF's ``tokenizer.ggml.add_bos_token`` too), or the model's family
    needs one."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return None
    if getattr(tokenizer, "add_bos_token", False):
        return bos
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    if ids and ids[0] == bos:
        return bos
    family = config.get_text_config().model_type if config is not None else None
    return bos if family in BOS_FAMILIES else None


CHUNK_CHARS = 1 << 16


def _boundaries(text: str, size: int) -> list[int]:
    """Split points about ``size`` characters apart, each just before the second newline of a blank line."""
    cuts, at = [0], size
    while at < len(text):
        j = text.find("\n\n", at)
        if j < 0:
            break
        cuts.append(j + 1)
        at = j + 1 + size
    return cuts + [len(text)]


def _encode(tokenizer: Any, text: str) -> list[int]:
    old = getattr(tokenizer, "model_max_length", None)
    try:
        tokenizer.model_max_length = int(1e12)
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    finally:
        if old is not None:
            tokenizer.model_max_length = old


def tokenize(tokenizer: Any, text: str) -> Tensor:
    """1-D token ids of a long text, with no special tokens and no length warning.

    Encoding 2.5 M characters at once costs the fast tokenizers ~360 MB (more
    than SmolLM2's weights streamed), so long texts are encoded in 64k-character
    pieces cut inside blank lines, where byte-level BPE splits anyway.  The ids
    are the whole text's: the first cuts are checked against encoding across
    them, and a tokenizer that disagrees (a sentencepiece prefix space, say)
    gets the whole text at once.
    """
    if not text.strip():
        raise DataError("the text is empty")
    cuts = _boundaries(text, CHUNK_CHARS)
    seamless = all(_encode(tokenizer, text[c - 2000 : c + 2000]) ==
                   _encode(tokenizer, text[c - 2000 : c]) + _encode(tokenizer, text[c : c + 2000])
                   for c in cuts[1:4] if c >= 2000)
    if not seamless:
        cuts = [0, len(text)]
    return torch.cat([torch.tensor(_encode(tokenizer, text[a:b]), dtype=torch.long) for a, b in zip(cuts, cuts[1:])])


# ---------------------------------------------------------------- token windows


def _with_bos(windows: Tensor, bos: int | None) -> Tensor:
    if bos is None:
        return windows
    return torch.cat([torch.full((windows.shape[0], 1), bos, dtype=windows.dtype), windows], dim=1)


def sample_windows(tokens: Tensor, nsamples: int, seqlen: int, seed: int, bos: int | None = None) -> Tensor:
    """``nsamples`` random windows of ``seqlen`` tokens, reproducible from ``seed``; with ``bos`` each is that token
    followed by ``seqlen`` − 1 tokens of text."""
    body = seqlen - (bos is not None)
    if tokens.numel() < body + 1:
        raise DataError(f"calibration text has {tokens.numel()} tokens, shorter than one window of {seqlen}; "
                        "give more text or a shorter window (seqlen)")
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, tokens.numel() - body, (nsamples,), generator=gen)
    return _with_bos(torch.stack([tokens[s : s + body] for s in starts.tolist()]), bos)


def eval_windows(tokens: Tensor, seqlen: int, max_tokens: int | None = None, bos: int | None = None) -> Tensor:
    """Non-overlapping windows of ``seqlen`` tokens from the start of ``tokens`` (at most ``max_tokens`` of text);
    with ``bos`` each is that token followed by ``seqlen`` − 1 tokens of text."""
    if seqlen < 2 + (bos is not None):
        raise OptionError("eval_seqlen", f"must be at least {2 + (bos is not None)} tokens, got {seqlen}")
    body = seqlen - (bos is not None)
    if max_tokens is not None:
        tokens = tokens[:max_tokens]
    n = tokens.numel() // body
    if n == 0:
        raise DataError(f"evaluation text has {tokens.numel()} tokens, shorter than one window of {seqlen}")
    return _with_bos(tokens[: n * body].view(n, body), bos)


def windows_digest(windows: Tensor | None) -> str:
    return "" if windows is None else hashlib.sha256(windows.to(torch.int64).numpy().tobytes()).hexdigest()


def token_windows(tok: Any, config: Any, calib: str, nsamples: int, seqlen: int, seed: int, evals: tuple[str, ...],
                  eval_seqlen: int, max_tokens: int | None) -> tuple[Tensor, dict[str, Tensor], int | None]:
    """A run's calibration windows, its evaluation windows (name → windows) and the BOS token each starts with
    (None where the model needs none), cut from the texts ``calib`` and ``evals`` read once each."""
    bos = bos_token(tok, config)
    windows = sample_windows(tokenize(tok, load_text(calib)), nsamples, seqlen, seed, bos)
    return windows, {s: eval_windows(tokenize(tok, load_text(s)), eval_seqlen, max_tokens, bos) for s in evals}, bos
