"""Many processes through torch.distributed (``torchrun``): data-parallel statistics, one block's matrices spread
over ranks, one writer.

Each rank streams a disjoint shard of the calibration and evaluation windows.
A block's statistics are summed with ``all_reduce`` (float64) before any
decomposition; each matrix is decomposed on one rank (balanced by m·n·min(m, n))
and its factors are broadcast, so every rank holds the same compressed block and
carries its own shard through it.  Without an initialised process group every
helper here is a no-op and a run is the single-process one.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from datetime import timedelta
from typing import Any, Iterator

import torch
import torch.distributed as dist
from torch import Tensor

from .errors import DataError, OptionError, SvdllmError

DEFAULT_TIMEOUT_S = 1800  # the longest one rank may wait for another (a whole block's decompositions)


class PeerLost(SvdllmError):
    """A collective failed: another process died, or did not answer within the timeout."""


@contextmanager
def _collective(what: str) -> Iterator[None]:
    try:
        yield
    except RuntimeError as exc:  # gloo raises plain RuntimeErrors, NCCL DistBackendError
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise PeerLost(f"rank {world()[0]}: another process of the run failed or did not answer within "
                       f"the timeout (dist_timeout) ({what}: {first[:200]})") from exc


def world() -> tuple[int, int]:
    """(rank, world size): (0, 1) without a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def active() -> bool:
    return world()[1] > 1


def process_name(name: str) -> str:
    """``name``, or ``name-rankN`` under torchrun: a file or folder that is this process's own."""
    rank, size = world()
    return name if size == 1 else f"{name}-rank{rank}"


def is_writer() -> bool:
    """Whether this process writes files (rank 0, or the only process)."""
    return world()[0] == 0


def env_int(name: str, default: int) -> int:
    """A whole-number environment variable (torchrun's WORLD_SIZE, LOCAL_RANK …), or one line naming it."""
    text = os.environ.get(name, "").strip()
    if not text:
        return default
    try:
        return int(text)
    except ValueError:
        raise SvdllmError(f"the environment variable {name}={text!r} is not a whole number") from None


def launched() -> bool:
    """Started by torchrun (or by hand with its environment) with more than one process."""
    return env_int("WORLD_SIZE", 1) > 1


def default_device(name: str | None = None) -> str:
    """``name`` if this machine has it; else CUDA where available, or the CPU."""
    if name:
        if name.startswith("cuda") and not torch.cuda.is_available():
            raise OptionError("device", f"{name}: CUDA is not available here")
        return name
    return "cuda" if torch.cuda.is_available() else "cpu"


def init_from_env(device: str | None, timeout_s: float = DEFAULT_TIMEOUT_S) -> str:
    """Join the process group torchrun describes (NCCL for CUDA, gloo for CPU); the device this rank computes on
    (``device``, or the default one).

    Every collective then fails after ``timeout_s`` instead of waiting forever for a rank that died.
    """
    device = default_device(device)
    if not launched() or (dist.is_available() and dist.is_initialized()):
        return device
    cuda = device.startswith("cuda")
    if cuda:
        device = f"cuda:{env_int('LOCAL_RANK', 0)}"
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(seconds=timeout_s))
    return device


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if active():
        with _collective("barrier"):
            dist.barrier()


def shard(windows: Tensor) -> Tensor:
    """This rank's contiguous share of ``windows`` (every rank gets at least one window)."""
    rank, size = world()
    if size == 1:
        return windows
    if windows.shape[0] < size:
        raise DataError(f"{windows.shape[0]} windows cannot be shared by {size} processes: give at least {size} "
                        "(more calibration samples, or more evaluation text)")
    return windows.tensor_split(size)[rank]


def all_reduce_(tensors: list[Tensor]) -> None:
    """Sum each tensor over ranks, in place (through the GPU where the backend is NCCL)."""
    if not active():
        return
    nccl = dist.get_backend() == "nccl"
    with _collective("all_reduce"):
        for t in tensors:
            if nccl and t.device.type != "cuda":
                on_gpu = t.cuda()
                dist.all_reduce(on_gpu)
                t.copy_(on_gpu)
            else:
                dist.all_reduce(t)


def all_gather_rows(rows: Tensor) -> Tensor:
    """Every rank's ``rows`` (tokens × n, any count per rank) stacked in rank order, on every rank: a zero buffer
    with this rank's rows at its offset, summed over ranks (so NCCL and gloo alike need only ``all_reduce_``)."""
    if not active():
        return rows
    rank, size = world()
    counts = torch.zeros(size, dtype=torch.float64, device=rows.device)
    counts[rank] = rows.shape[0]
    all_reduce_([counts])
    sizes = [int(c) for c in counts.tolist()]
    out = torch.zeros(sum(sizes), *rows.shape[1:], dtype=rows.dtype, device=rows.device)
    start = sum(sizes[:rank])
    out[start:start + rows.shape[0]] = rows
    all_reduce_([out])
    return out


def owners(costs: dict[str, float]) -> dict[str, int]:
    """Each name → the rank that computes it: the costliest first, each to the least loaded rank (deterministic)."""
    size = world()[1]
    load = [0.0] * size
    out: dict[str, int] = {}
    for name in sorted(costs, key=lambda n: (-costs[n], n)):
        r = min(range(size), key=lambda i: (load[i], i))
        out[name], load[r] = r, load[r] + costs[name]
    return out


def broadcast_tensors(tensors: list[Tensor] | None, src: int, device: torch.device) -> list[Tensor]:
    """``tensors`` from rank ``src`` on every rank (others pass None): shapes and dtypes first, then the data."""
    meta: list[Any] = [[(tuple(t.shape), str(t.dtype).removeprefix("torch.")) for t in tensors] if tensors else None]
    with _collective("broadcast"):
        dist.broadcast_object_list(meta, src=src)
        out = [t.contiguous() for t in tensors] if tensors is not None and world()[0] == src else \
            [torch.empty(shape, dtype=getattr(torch, dtype), device=device) for shape, dtype in meta[0]]
        for t in out:
            dist.broadcast(t, src=src)
    return out


def broadcast_object(obj: Any, src: int) -> Any:
    box = [obj]
    with _collective("broadcast"):
        dist.broadcast_object_list(box, src=src)
    return box[0]


def gather_objects(obj: Any) -> list[Any]:
    """``obj`` of every rank, in rank order (on every rank)."""
    if not active():
        return [obj]
    out: list[Any] = [None] * world()[1]
    with _collective("all_gather"):
        dist.all_gather_object(out, obj)
    return out
