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
from typing import TYPE_CHECKING, Any, Callable

from . import distributed
from .errors import FormatError, RunFolderError
from .files import atomic_write_text, load_tensors

if TYPE_CHECKING:
    from .source import ModelSource

STATE = "state.json"


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
    def __init__(self, path: str | os.PathLike, fingerprint: str, world_size: int = 1) -> None:
        self.path, self.fingerprint = Path(path), fingerprint
        self.state: dict[str, Any] = {}
        state_file = self.path / STATE
        if state_file.is_file():
            self.state = read_checked_json(state_file, f"checkpoint {self.path}")
            saved_world = self.state.get("world_size", 1)
            if saved_world != world_size:
                raise RunFolderError(f"checkpoint {self.path} was written by {saved_world} processes; resume it with "
                                     f"{saved_world}, not {world_size}, or remove it to start afresh")
            if self.state.get("fingerprint") != fingerprint:
                raise RunFolderError(f"checkpoint {self.path} belongs to another run (different model weights, data "
                                     "or options); rerun that command, or remove the folder to start afresh")
        self.world_size = world_size
        if self.state:
            self.verify()
        self.path.mkdir(parents=True, exist_ok=True)
        if not self.state:  # the run exists from its start: a kill before block 0 (in the gradient pass) resumes too
            self.state = {"fingerprint": fingerprint, "world_size": world_size, "next_block": 0}
            if distributed.is_writer():
                write_checked_json(self.path / STATE, self.state)

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

    def process_folder(self, name: str) -> Path:
        """A folder of the run that is this process's own (``name``, or ``name-rankN`` under torchrun)."""
        rank, size = distributed.world()
        return self.path / (name if size == 1 else f"{name}-rank{rank}")

    @property
    def stream_folder(self) -> Path:
        """Where a disk-offloaded stream lives while the run goes on (one folder per process)."""
        return self.process_folder("stream")

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
        self.state = {"fingerprint": self.fingerprint, "world_size": self.world_size, "next_block": i + 1, **extra}
        if writer:
            write_checked_json(self.path / STATE, self.state)
            shutil.rmtree(self.streams_folder(i), ignore_errors=True)

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
