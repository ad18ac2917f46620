"""Writing files safely: a file appears complete or not at all; checksums."""
from __future__ import annotations

import errno
import hashlib
import os
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

import torch
from torch import Tensor

from .errors import FormatError


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _tmp(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def atomic_write_text(path: Path, text: str) -> None:
    tmp = _tmp(path)
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


DIGEST_KEY = "svdllm_sha256"  # safetensors metadata: the sha256 of the file's tensors (``tensors_digest``)


def tensors_digest(tensors: Mapping[str, Tensor] | Iterable[tuple[str, Tensor]]) -> str:
    """sha256 of named tensors: each name, dtype, shape and raw bytes, in name order (read in place, no copy for a
    contiguous CPU tensor).  Pairs in name order may be given instead of a mapping, one tensor alive at a time."""
    h = hashlib.sha256()
    for name, t in sorted(tensors.items()) if isinstance(tensors, Mapping) else tensors:
        t = t.detach()
        h.update(f"{name}|{t.dtype}|{list(t.shape)}|".encode())
        if t.numel():
            h.update(memoryview(t.cpu().contiguous().reshape(-1).view(torch.uint8).numpy()))
    return h.hexdigest()


def save_tensors(tensors: dict[str, Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """safetensors' ``save_file``; its I/O failures raised as OSError (a full disk as ENOSPC) rather than its own.

    Without ``metadata`` (svdllm's own files: checkpoints, streams, statistics) the metadata is the sha256 of the
    tensors alone, which ``load_tensors`` checks (one key, so that the header's bytes are reproducible: safetensors
    writes several in no fixed order).  A saved folder's shards give ``{"format": "pt"}`` for transformers, and are
    checked by the folder's manifest instead."""
    import safetensors.torch
    from safetensors import SafetensorError

    try:
        safetensors.torch.save_file(tensors, str(path), metadata=metadata or {DIGEST_KEY: tensors_digest(tensors)})
    except SafetensorError as exc:
        text = str(exc)
        code = errno.ENOSPC if "os error 28" in text or "No space" in text else errno.EIO
        raise OSError(code, f"{os.strerror(code)}: {path}") from exc


def load_tensors(path: Path, keep: bool = True) -> dict[str, Tensor]:
    """The tensors of a file ``save_tensors`` wrote, checked against the sha256 it recorded: a truncated, damaged or
    foreign file is a FormatError naming it, never a traceback or numbers used silently.  ``keep=False`` only checks
    (one tensor in memory at a time) and returns nothing."""
    from safetensors import SafetensorError, safe_open

    tensors: dict[str, Tensor] = {}
    try:
        with safe_open(str(path), framework="pt") as fh:
            recorded = (fh.metadata() or {}).get(DIGEST_KEY)

            def each() -> Iterator[tuple[str, Tensor]]:
                for key in sorted(fh.keys()):
                    tensor = fh.get_tensor(key)
                    if keep:
                        tensors[key] = tensor
                    yield key, tensor

            digest = tensors_digest(each())
    except (SafetensorError, OSError, ValueError) as exc:
        if isinstance(exc, FileNotFoundError):
            raise FormatError(f"{path} is missing") from None
        raise FormatError(f"{path} is damaged or truncated ({str(exc).splitlines()[0] if str(exc) else exc!r})") \
            from None
    if recorded is None:
        raise FormatError(f"{path} carries no checksum: it was not written by this svdllm")
    if digest != recorded:
        raise FormatError(f"{path} is damaged (its tensors do not match the sha256 recorded when it was written)")
    return tensors


def atomic_save_file(tensors: dict[str, Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    tmp = _tmp(path)
    try:
        save_tensors(tensors, tmp, metadata)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
