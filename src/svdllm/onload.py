"""Where decoder blocks live between uses: one block on the compute device at a time.

In memory, the model stays where it is (CPU, say) and each block is moved to
the compute device only while it is processed.  Streaming from disk, the model
is a skeleton with meta weights (accelerate's ``init_empty_weights``): block i
is materialised from the safetensors shards when the loop reaches it and freed
once its factors are written.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Iterator

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from .io import ShardSource


def _glibc() -> Any:
    """The C library when it is glibc (mallopt, malloc_trim), else None."""
    import ctypes

    try:
        lib = ctypes.CDLL("libc.so.6")
        return lib if hasattr(lib, "malloc_trim") else None
    except OSError:
        return None


def return_freed_memory() -> None:
    """Have glibc serve large allocations by mmap, so that a freed block goes back to the OS.

    glibc raises its mmap threshold each time a large chunk is freed, after which
    block-sized tensors come from the heap and fragment it: streaming 12 blocks
    grew RSS by about one block per block (tests/test_streaming.py probe).  A
    fixed threshold keeps it flat.  A no-op where glibc is not the allocator.
    """
    if (libc := _glibc()) is not None:
        libc.mallopt(-3, 128 << 10)  # M_MMAP_THRESHOLD: glibc's initial 128 KiB, held fixed


def trim_heap() -> None:
    """Give the free pages inside glibc's heaps back to the OS.

    A block's forward passes and statistics leave many small freed chunks that
    glibc keeps: streaming SmolLM2 with two evaluation sets grew RSS by ~4.5 MiB
    per block (136 MiB over 30 blocks) without this, and stayed flat with it.
    """
    if (libc := _glibc()) is not None:
        libc.malloc_trim(0)


def _move_tensors(model: nn.Module, skip_prefix: str, device: torch.device) -> None:
    """Move every parameter and buffer outside ``skip_prefix`` (tied ones stay tied: the Parameter is kept)."""
    head = skip_prefix + "."
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if not name.startswith(head) and t.device != device and t.device.type != "meta":
            t.data = t.data.to(device)


class BlockHost:
    def __init__(self, model: nn.Module, prefix: str, blocks: nn.ModuleList, device: torch.device,
                 source: "ShardSource | None" = None) -> None:
        self.model, self.prefix, self.blocks, self.device, self.source = model, prefix, blocks, device, source
        self.home = next((p.device for p in model.parameters() if p.device.type != "meta"), torch.device("cpu"))

    @contextmanager
    def outside_blocks(self) -> Iterator[None]:
        """The embeddings, rotary tables, final norm and head on the compute device, for the length of the block
        (read again from the shards if ``park_outside`` freed them)."""
        head = self.prefix + "."
        parked = [n for n, p in self.model.named_parameters() if p.is_meta and not n.startswith(head)]
        if parked and self.source is not None:  # a tied head is not in the shards: tie_weights restores it
            self.source.load(self.model, {n: n for n in parked if n in self.source.files}, self.home)
            self.model.tie_weights()
        _move_tensors(self.model, self.prefix, self.device)
        try:
            yield
        finally:
            _move_tensors(self.model, self.prefix, self.home)

    def park_outside(self) -> None:
        """Streaming from shards: free the parameters outside the blocks (the embeddings and head are often the
        largest tensors of a model) while the blocks are processed; ``outside_blocks`` reads them again."""
        if self.source is None:
            return
        head = self.prefix + "."
        for name, p in self.model.named_parameters(remove_duplicate=False):  # a tied head too: no reference stays
            if not name.startswith(head):
                owner, _, attr = name.rpartition(".")
                self.model.get_submodule(owner)._parameters[attr] = nn.Parameter(p.to("meta"), p.requires_grad)

    def onload(self, i: int) -> nn.Module:
        block = self.blocks[i]
        if self.source is not None:
            self.source.materialise(block, f"{self.prefix}.{i}.", self.home)
        return block.to(self.device)

    def state(self, i: int) -> dict[str, Tensor]:
        """Block i's tensors under their model names, on CPU, contiguous (U's rank-major layout is a view)."""
        return {f"{self.prefix}.{i}.{k}": v.detach().cpu().contiguous() for k, v in self.blocks[i].state_dict().items()}

    def offload(self, i: int) -> None:
        self.blocks[i].to("meta" if self.source is not None else self.home)
        trim_heap()
