"""Writing files safely: a file appears complete or not at all; checksums."""
from __future__ import annotations

import errno
import hashlib
import os
from pathlib import Path

from torch import Tensor


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


def save_tensors(tensors: dict[str, Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """safetensors' ``save_file``, its I/O failures raised as OSError (a full disk as ENOSPC) rather than its own."""
    import safetensors.torch
    from safetensors import SafetensorError

    try:
        safetensors.torch.save_file(tensors, str(path), metadata=metadata)
    except SafetensorError as exc:
        text = str(exc)
        code = errno.ENOSPC if "os error 28" in text or "No space" in text else errno.EIO
        raise OSError(code, f"{os.strerror(code)}: {path}") from exc


def atomic_save_file(tensors: dict[str, Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    tmp = _tmp(path)
    try:
        save_tensors(tensors, tmp, metadata)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
