"""A run's checkpoint folder: finished blocks, the activation streams at the last block boundary, the report so far.

After each block the folder holds everything a later run needs to continue
from the next block and end with bit-identical factors.  ``state.json`` is
written last and atomically: it is the commit point.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable

from safetensors.torch import load_file, save_file
from torch import Tensor

from . import distributed

STATE = "state.json"


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def atomic_save_file(tensors: dict[str, Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    save_file(tensors, str(tmp), metadata=metadata)
    os.replace(tmp, path)


class RunDir:
    def __init__(self, path: str | os.PathLike, fingerprint: str) -> None:
        self.path, self.fingerprint = Path(path), fingerprint
        self.state: dict[str, Any] = {}
        state_file = self.path / STATE
        if state_file.is_file():
            try:
                self.state = json.loads(state_file.read_text())
            except json.JSONDecodeError:
                raise ValueError(f"checkpoint {self.path} is damaged (state.json is not JSON); remove it") from None
            if self.state.get("fingerprint") != fingerprint:
                raise ValueError(f"checkpoint {self.path} belongs to another run (different model, data or options); "
                                 "rerun that command, or remove the folder to start afresh")
        self.path.mkdir(parents=True, exist_ok=True)

    @property
    def done(self) -> int:
        """Blocks already finished (the next block to process)."""
        return int(self.state.get("next_block", 0))

    @property
    def stream_folder(self) -> Path:
        """Where a disk-offloaded stream lives while the run goes on (one folder per process)."""
        rank, size = distributed.world()
        return self.path / ("stream" if size == 1 else f"stream-rank{rank}")

    def block_file(self, i: int) -> Path:
        return self.path / f"block-{i:05d}.safetensors"

    def load_block(self, i: int) -> dict[str, Tensor]:
        return load_file(str(self.block_file(i)))

    def streams_folder(self, boundary: int) -> Path:
        """The activation streams at the input of block ``boundary``."""
        return self.path / f"streams-{boundary:05d}"

    def commit(self, i: int, block_state: dict[str, Tensor], save_streams: Callable[[Path], None],
               extra: dict[str, Any]) -> None:
        """Block i is finished: its tensors, the streams after it (``save_streams(folder)``), then the state that
        names them; the streams of the boundary before go once the state no longer points there.  With several
        processes rank 0 writes the block and the state, and every rank its own streams in between."""
        folder, writer = self.streams_folder(i + 1), distributed.is_writer()
        if writer:
            atomic_save_file(block_state, self.block_file(i), {"format": "pt"})
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
        distributed.barrier()
        save_streams(folder)
        distributed.barrier()
        self.state = {"fingerprint": self.fingerprint, "next_block": i + 1, **extra}
        if writer:
            atomic_write_text(self.path / STATE, json.dumps(self.state))
            shutil.rmtree(self.streams_folder(i), ignore_errors=True)

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
