"""A run's checkpoint folder and its lock: finished blocks, the activation streams at the last block boundary, the
report so far.

After each block the folder holds everything a later run needs to continue from the next block and end with
bit-identical factors.  ``state.json`` is written last and atomically: it is the commit point.  A run holds an
exclusive lock on its output for its whole length, so two runs never share a run folder or an output.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
from pathlib import Path
import logging
from typing import TYPE_CHECKING, Any, Callable, TypeVar

from . import distributed
from .errors import FormatError, RunFolderError
from .files import atomic_write_text, load_tensors

if TYPE_CHECKING:
    from .source import ModelSource

STATE = "state.json"
T = TypeVar("T")
log = logging.getLogger("svdllm")


def write_checked_json(path: Path, value: Any) -> None:
    """``value`` as JSON with the sha256 of its canonical text beside it, atomically."""
    text = json.dumps(value, sort_keys=True)
    atomic_write_text(path, json.dumps({"sha256": hashlib.sha256(text.encode()).hexdigest(), "value": value}))


def read_checked_json(path: Path, what: str) -> Any:
    """What ``write_checked_json`` wrote, or RunFolderError naming ``what`` and the file when it does not check."""
    try:
        wrapped = json.loads(path.read_text(encoding="utf-8"))
        value = wrapped["value"]
        intact = hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest() == wrapped["sha256"]
    except (ValueError, KeyError, TypeError):  # not JSON, not UTF-8, not our layout
        intact = False
    if not intact:
        raise RunFolderError(f"{what} is damaged ({path.name} does not match its checksum); remove it to start "
                             "afresh")
    return value


class OutputLock:
    """An exclusive lock beside an output folder (``.NAME.svdllm-lock``), held until ``release``; a second run for
    the same output is refused in one line naming the process that holds it."""

    def __init__(self, out: Path) -> None:
        self.path = out.parent / f".{out.name}.svdllm-lock"
        self.fh: Any = None
        if not distributed.is_writer():
            return
        out.parent.mkdir(parents=True, exist_ok=True)
        fh = open(self.path, "a+")
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "another process"
            fh.close()
            raise RunFolderError(f"{out} is being written by process {holder}; wait for it, or choose another "
                                 "output") from None
        fh.seek(0)
        fh.truncate()
        fh.write(str(os.getpid()))
        fh.flush()
        self.fh = fh

    def __enter__(self) -> "OutputLock":
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def release(self) -> None:
        if self.fh is not None:
            self.path.unlink(missing_ok=True)
            fcntl.flock(self.fh, fcntl.LOCK_UN)
            self.fh.close()
            self.fh = None


class RunDir:
    """A run's folder: every product a rerun may reuse (gradient statistics, ranks, dense zero-shot rows, finished
    blocks), each kept under the digest of what it was made from.  ``model_key`` (the weights and config) and the
    process count are part of every key; a product whose key differs is made again, never reused."""

    def __init__(self, path: str | os.PathLike, model_key: str, world_size: int = 1, resume: bool = False) -> None:
        self.path, self.model_key, self.world_size, self.resume = Path(path), model_key, world_size, resume
        self.state: dict[str, Any] = {}
        if (self.path / STATE).is_file():
            self.state = read_checked_json(self.path / STATE, f"checkpoint {self.path}")
            self.verify()
        distributed.barrier()  # every process has read the state before the writer changes it
        self.path.mkdir(parents=True, exist_ok=True)
        if "products" not in self.state:  # the run exists from its start: a kill in the reverse pass resumes too
            self.state = {"products": {}, "next_block": 0, "world_size": world_size}
            if distributed.is_writer():
                write_checked_json(self.path / STATE, self.state)

    def key(self, made_from: Any) -> str:
        """The digest a product made from ``made_from`` is kept under."""
        text = json.dumps([self.model_key, self.world_size, made_from], sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()

    def kept(self, name: str, made_from: Any, make: Callable[[Path], T], read: Callable[[Path], T]) -> T:
        """The product ``name``: read from its folder when it was made from ``made_from``, else made there
        (``make(folder)``, every process; the folder starts empty) and its key committed."""
        key, folder = self.key(made_from), self.path / name
        if self.state["products"].get(name) == key:
            return read(folder)
        if distributed.is_writer():
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
        distributed.barrier()
        value = make(folder)
        distributed.barrier()
        self._commit_product(name, key)
        return value

    def _commit_product(self, name: str, key: str, **extra: Any) -> None:
        self.state = {**self.state, **extra, "products": {**self.state["products"], name: key}}
        if distributed.is_writer():
            write_checked_json(self.path / STATE, self.state)

    def finished_blocks(self, made_from: Any) -> int:
        """How many blocks a run made from ``made_from`` finished here; blocks of other options are removed (with
        ``resume`` asked, they refuse the run instead: the user expected to continue)."""
        key = self.key(made_from)
        if self.state["products"].get("blocks") == key:
            return self.done
        if self.resume and self.state.get("world_size", 1) != self.world_size:
            raise RunFolderError(f"checkpoint {self.path} was written by {self.state.get('world_size', 1)} "
                                 f"processes; resume it with that many, not {self.world_size}, or remove it")
        if self.resume and self.done:
            raise RunFolderError(f"checkpoint {self.path} belongs to another run (different model weights, data or "
                                 "options); rerun that command, or drop `resume` to start the blocks afresh")
        if self.done:
            log.warning("%s: its finished blocks were made with other options or data; compressing afresh", self.path)
        if distributed.is_writer():
            for old in [*self.path.glob("block-*.safetensors"), *self.path.glob("streams-*")]:
                shutil.rmtree(old) if old.is_dir() else old.unlink()
        self._commit_product("blocks", key, next_block=0, world_size=self.world_size)
        return 0

    def verify(self) -> None:
        """Every tensor file the run kept (finished blocks, streams, gradient statistics, output Grams) against the
        sha256 written with it, before any work depends on one: a damaged one refuses the run in one line."""
        for path in sorted(self.path.rglob("*.safetensors")):
            if path.name.startswith("."):
                continue  # a write a kill interrupted: never renamed into place, never read
            try:
                load_tensors(path, keep=False)
            except FormatError as exc:
                raise RunFolderError(f"checkpoint {self.path} is damaged: {exc}; remove the folder to start "
                                     "afresh") from None

    @property
    def done(self) -> int:
        """Blocks already finished (the next block to process)."""
        return int(self.state.get("next_block", 0))

    def block_file(self, i: int) -> Path:
        return self.path / f"block-{i:05d}.safetensors"

    def streams_folder(self, boundary: int) -> Path:
        """The activation streams at the input of block ``boundary``."""
        return self.path / f"streams-{boundary:05d}"

    def commit(self, i: int, source: "ModelSource", save_streams: Callable[[Path], None], extra: dict[str, Any]) -> None:
        """Block i is finished: its tensors, the streams after it (``save_streams(folder)``), then the state that
        names them; the streams of the boundary before go once the state no longer points there.  With several
        processes rank 0 writes the block and the state, and every rank its own streams in between."""
        folder, writer = self.streams_folder(i + 1), distributed.is_writer()
        if writer:
            source.persist(i, self.block_file(i))
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
        distributed.barrier()
        save_streams(folder)
        distributed.barrier()
        self.state = {"products": self.state["products"], "world_size": self.world_size, "next_block": i + 1, **extra}
        if writer:
            write_checked_json(self.path / STATE, self.state)
            shutil.rmtree(self.streams_folder(i), ignore_errors=True)

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
