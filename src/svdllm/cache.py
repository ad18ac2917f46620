"""Where activations wait between passes and blocks: one choice, made once per run, that every pass obeys.

``Offload`` is the one owner (as llm-compressor's ``IntermediatesCache``): the options' ``offload`` resolves to the
compute device, CPU memory or a folder, and each pass asks it for a store by name.  A ``MemoryStore`` keeps tensors
on one device; a ``DiskStore`` keeps each in a checksummed safetensors file.  Disk without a run folder uses a
temporary folder that ``close`` removes.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from torch import Tensor

from . import distributed
from .files import load_tensors, save_tensors

OFFLOAD = ("auto", "none", "cpu", "disk")  # none: the compute device


class TensorStore:
    """Named tensors put, read back, moved and exported; subclasses say where they live."""

    def put(self, key: str, value: Tensor) -> None:
        raise NotImplementedError

    def get(self, key: str, device: torch.device) -> Tensor:
        raise NotImplementedError

    def take(self, key: str, device: torch.device) -> Tensor:
        """``get``, the store forgetting the key (its memory or its file freed once the caller lets go)."""
        raise NotImplementedError

    def move(self, src: str, dst: str) -> None:
        raise NotImplementedError

    def export(self, key: str, dest: Path) -> None:
        """Write ``key`` to the file ``dest`` (a checkpoint)."""
        raise NotImplementedError

    def restore(self, key: str, src: Path) -> None:
        raise NotImplementedError

    def close(self) -> None:
        """Forget every tensor."""


class MemoryStore(TensorStore):
    def __init__(self, device: torch.device | str) -> None:
        self.device = torch.device(device)
        self._mem: dict[str, Tensor] = {}

    def put(self, key: str, value: Tensor) -> None:
        self._mem[key] = value.detach().to(self.device)

    def get(self, key: str, device: torch.device) -> Tensor:
        return self._mem[key].to(device)

    def take(self, key: str, device: torch.device) -> Tensor:
        return self._mem.pop(key).to(device)

    def move(self, src: str, dst: str) -> None:
        self._mem[dst] = self._mem.pop(src)

    def export(self, key: str, dest: Path) -> None:
        save_tensors({"t": self._mem[key].detach().cpu().contiguous()}, dest)

    def restore(self, key: str, src: Path) -> None:
        self._mem[key] = load_tensors(src)["t"].to(self.device)

    def close(self) -> None:
        self._mem.clear()


class DiskStore(TensorStore):
    """One safetensors file per key in ``folder``, its tensors' sha256 checked on every read."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)

    def _file(self, key: str) -> Path:
        return self.folder / f"{key}.safetensors"

    def put(self, key: str, value: Tensor) -> None:
        tmp = self.folder / f".{key}.tmp"  # a new file renamed over the old: a checkpoint's hard link keeps the old
        save_tensors({"t": value.detach().cpu().contiguous()}, tmp)
        os.replace(tmp, self._file(key))

    def get(self, key: str, device: torch.device) -> Tensor:
        return load_tensors(self._file(key))["t"].to(device)

    def take(self, key: str, device: torch.device) -> Tensor:
        value = self.get(key, device)
        self._file(key).unlink()
        return value

    def move(self, src: str, dst: str) -> None:
        os.replace(self._file(src), self._file(dst))

    def export(self, key: str, dest: Path) -> None:
        try:
            os.link(self._file(key), dest)
        except OSError:
            shutil.copyfile(self._file(key), dest)

    def restore(self, key: str, src: Path) -> None:
        shutil.copyfile(src, self._file(key))

    def close(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


class Offload:
    """Where every pass keeps its activations: ``where`` is ``device``, ``cpu`` or ``disk``; disk lives in
    ``folder`` (the run folder), or in a temporary folder removed by ``close``."""

    def __init__(self, where: str, device: torch.device, folder: Path | None = None) -> None:
        self.where, self.device = where, device
        self._temporary = where == "disk" and folder is None
        self.folder = Path(tempfile.mkdtemp(prefix="svdllm-offload-")) if self._temporary else folder
        self.stores: list[TensorStore] = []

    @classmethod
    def resolve(cls, option: str, default: str, device: torch.device, folder: Path | None = None) -> "Offload":
        """The options' ``offload`` (auto: the source's ``default``; none: the compute device)."""
        choice = default if option == "auto" else option
        return cls({"none": "device"}.get(choice, choice), device, folder)

    def store(self, name: str) -> TensorStore:
        """A pass's own store (one folder per pass and process on disk)."""
        if self.where == "disk":
            store: TensorStore = DiskStore(self.folder / distributed.process_name(name))  # type: ignore[operator]
        else:
            store = MemoryStore(self.device if self.where == "device" else torch.device("cpu"))
        self.stores.append(store)
        return store

    def close(self) -> None:
        """Every store it gave is emptied (its files removed), and a temporary folder with them."""
        for store in self.stores:
            store.close()
        if self._temporary and self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)


class StoredTensors(Mapping):
    """A read-only mapping name → tensor whose values wait in a store (memory or files) until asked for:
    per-linear statistics of a whole model (output-gradient Grams) without the whole model's worth in memory."""

    def __init__(self, store: TensorStore, names: list[str], prefix: str) -> None:
        self.store, self.names, self.prefix = store, names, prefix

    def __getitem__(self, name: str) -> Tensor:
        if name not in self.names:
            raise KeyError(name)
        return self.store.get(self.prefix + name, torch.device("cpu"))

    def __contains__(self, name: object) -> bool:  # without reading the tensor (Mapping's own would)
        return name in self.names

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)
