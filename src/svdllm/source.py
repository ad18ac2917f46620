"""Model sources: where a model's decoder blocks live, chosen once.

``ModelSource`` holds a model in memory: each block visits the compute device only while it is processed.
``StreamedSource`` never holds the model: it is a skeleton with meta weights (accelerate's
``init_empty_weights``), block i is read from the safetensors shards when a pass reaches it, and a finished
block is written to a file of its own and freed.  Every pass over the blocks (the compression loop, the
allocation pass, the evaluation at the end) goes through the same methods, so no other module asks which
kind of source it has.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from safetensors import safe_open
from torch import Tensor, nn

from . import distributed
from .architecture import decoder_blocks
from .errors import FormatError, OptionError
from .files import atomic_save_file, load_tensors
from .runtime import apply_ranks, restore_rank_major, tied_parameter_names

log = logging.getLogger("svdllm")


# ---------------------------------------------------------------- memory given back to the OS


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

    glibc raises its mmap threshold each time a large chunk is freed, after which block-sized tensors come from
    the heap and fragment it: streaming 12 blocks grew RSS by about one block per block.  A fixed threshold keeps
    it flat.  It must be fixed before the first large tensor is freed: set after loading the embeddings, it left
    a 430 MiB heap behind in most runs and the SmolLM2 streamed peak 70-80 MiB higher.  A no-op where glibc
    is not the allocator.
    """
    if (libc := _glibc()) is not None:
        libc.mallopt(-3, 128 << 10)  # M_MMAP_THRESHOLD: glibc's initial 128 KiB, held fixed


def trim_heap() -> None:
    """Give the free pages inside glibc's heaps back to the OS (a block's forwards leave many small freed chunks:
    ~4.5 MiB per block on SmolLM2 without this)."""
    if (libc := _glibc()) is not None:
        libc.malloc_trim(0)


# ---------------------------------------------------------------- sources


class ModelSource:
    """A model held in memory (on the CPU, say); ``onload`` moves one block to the compute device at a time."""

    streamed = False
    default_offload = "none"  # where activations wait between blocks unless the options say: on the device
    default_batch = 4  # windows per forward unless the options say

    def __init__(self, model: nn.Module, device: str | torch.device | None = None) -> None:
        self.model = model.eval()
        self.prefix, self.blocks = decoder_blocks(model)
        self.home = next((p.device for p in model.parameters() if p.device.type != "meta"), torch.device("cpu"))
        self.device = torch.device(device) if device else self.home

    def __len__(self) -> int:
        return len(self.blocks)

    # -- the parts outside the blocks
    @contextmanager
    def outside_blocks(self) -> Iterator[None]:
        """The embeddings, rotary tables, final norm and head on the compute device for the length of the block."""
        self._move_outside(self.device)
        try:
            yield
        finally:
            self._move_outside(self.home)

    def _move_outside(self, device: torch.device) -> None:
        head = self.prefix + "."
        for name, t in [*self.model.named_parameters(), *self.model.named_buffers()]:
            if not name.startswith(head) and t.device != device and t.device.type != "meta":
                t.data = t.data.to(device)  # tied tensors stay tied: the Parameter is kept

    def park_outside(self) -> None:
        """Free the parts outside the blocks while the blocks are processed (streamed sources only)."""

    def unpark_outside(self) -> None:
        """The parts outside the blocks back where they live, after a walk (streamed sources only)."""

    def keep_finished_in(self, folder: Path) -> None:
        """Where finished blocks are written when they leave memory (streamed sources: the run folder's block files,
        so that a checkpoint costs no second write)."""

    # -- the blocks
    def onload(self, i: int) -> nn.Module:
        return self.blocks[i].to(self.device)

    def release(self, i: int) -> None:
        """Block i is no longer needed on the device, unchanged."""
        self.blocks[i].to(self.home)

    def finish(self, i: int) -> None:
        """Block i is compressed: it goes back where finished blocks are kept."""
        self.release(i)
        trim_heap()

    def walk(self, start: int = 0, finish: bool = False, then: Callable[[int], None] | None = None,
             reverse: bool = False) -> Iterator[tuple[int, nn.Module]]:
        """The one block loop: each block from ``start`` on the device in turn (last to first with ``reverse``);
        after the caller's step it is released unchanged, or (``finish``) kept as the compressed block, and
        ``then(i)`` runs (a checkpoint).  The parts outside the blocks are parked meanwhile (streamed sources)."""
        self.park_outside()
        order = range(start, len(self.blocks))
        for i in reversed(order) if reverse else order:
            block = self.onload(i)
            yield i, block
            if finish:
                self.finish(i)
            else:
                self.release(i)
            if then is not None:
                then(i)
        self.unpark_outside()

    def block_tensors(self, i: int) -> dict[str, Tensor]:
        """Finished block i's tensors under their model names, on the CPU, contiguous (U's rank-major is a view)."""
        return {f"{self.prefix}.{i}.{k}": v.detach().cpu().contiguous() for k, v in self.blocks[i].state_dict().items()}

    def persist(self, i: int, path: Path) -> None:
        """Write finished block i to ``path`` (a checkpoint)."""
        atomic_save_file(self.block_tensors(i), path)

    def restore(self, i: int, ranks: dict[str, int], path: Path) -> None:
        """Block i as a checkpoint left it: low-rank at ``ranks``, its tensors from ``path``."""
        apply_ranks(self.model, ranks)
        head = f"{self.prefix}.{i}."
        state = {k[len(head):]: v for k, v in load_tensors(path).items()}
        self.blocks[i].load_state_dict(state, strict=True)
        restore_rank_major(self.blocks[i])

    def key(self) -> str:
        """What every kept product of a run is made from first: every weight of the model (the shards' bytes when
        streamed) and its config."""
        h = hashlib.sha256()
        self.digest_update(h)
        h.update(json.dumps(self.model.config.to_diff_dict(), sort_keys=True, default=str).encode())
        return h.hexdigest()

    def digest_update(self, h: Any) -> None:
        """Feed every tensor of the model into the hash ``h`` (what a resume must match)."""
        for name, t in self.model.state_dict().items():
            h.update(name.encode())
            if t.numel():
                h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy())  # the buffer itself, not a copy

    def close(self) -> None:
        pass


class Shards:
    """The tensors of a safetensors model folder, read a few at a time (``safe_open``), under the model's own names
    once ``name_for`` has seen the model (transformers' renamings: GPT-NeoX's ``embed_out``, a hub GPT-2's keys
    without ``transformer.``)."""

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)
        self.stored: dict[str, str] = {}  # model name → the shards' name, where they differ
        index = self.folder / "model.safetensors.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            except (ValueError, KeyError, TypeError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
                raise FormatError(f"{index} is damaged or not a safetensors index ({type(exc).__name__}: "
                                  f"{str(exc).splitlines()[0] if str(exc) else 'no weight_map'})") from None
            if not isinstance(weight_map, dict):
                raise FormatError(f"{index} is damaged or not a safetensors index (its weight_map is not an object)")
            self.files: dict[str, str] = weight_map
        elif (self.folder / "model.safetensors").is_file():
            with safe_open(str(self.folder / "model.safetensors"), framework="pt") as fh:
                self.files = dict.fromkeys(fh.keys(), "model.safetensors")
        else:
            raise FormatError(f"{self.folder} has no safetensors weights (model.safetensors or its index)")

    @property
    def nbytes(self) -> int:
        return sum((self.folder / f).stat().st_size for f in set(self.files.values()))

    def name_for(self, model: nn.Module) -> None:
        """Key the shards by the model's names, through transformers' own renamings of checkpoint keys."""
        import re

        from transformers.conversion_mapping import WeightRenaming, get_model_conversion_mapping

        names = {n for n, _ in [*model.named_parameters(remove_duplicate=False), *model.named_buffers()]}
        renames = [(src, r.target_patterns[0] if len(r.target_patterns) == 1 else r.target_patterns[j])
                   for r in get_model_conversion_mapping(model) if type(r) is WeightRenaming
                   for j, src in enumerate(r.source_patterns)]
        prefix = getattr(model, "base_model_prefix", "")
        files: dict[str, str] = {}
        for key, file in self.files.items():
            name = key
            for src, tgt in renames:
                name = re.sub(src, tgt, name)
            if name not in names and prefix and f"{prefix}.{name}" in names:
                name = f"{prefix}.{name}"
            files[name] = file
            if name != key:
                self.stored[name] = key
        self.files = files
    def load(self, module: nn.Module, keys: dict[str, str], device: torch.device) -> None:
        """Set each tensor ``name`` of ``module`` to the shards' tensor ``keys[name]`` (cast to its dtype)."""
        from accelerate.utils import set_module_tensor_to_device

        dtypes = {n: t.dtype for n, t in [*module.named_parameters(), *module.named_buffers()]}
        by_file: dict[str, list[str]] = {}
        for name, key in keys.items():
            if key not in self.files:
                raise FormatError(f"{self.folder}: the shards have no tensor {key}")
            by_file.setdefault(self.files[key], []).append(name)
        for file, names in by_file.items():
            with safe_open(str(self.folder / file), framework="pt") as fh:
                for name in names:
                    value = fh.get_tensor(self.stored.get(keys[name], keys[name]))
                    set_module_tensor_to_device(module, name, device, value=value.to(dtypes[name]))

    def digest_update(self, h: Any) -> None:
        for file in sorted(set(self.files.values())):
            with open(self.folder / file, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 22), b""):
                    h.update(chunk)


class StreamedSource(ModelSource):
    """A float32 skeleton whose decoder blocks are read from the shards one at a time and written, once finished,
    to a file each in ``spill_dir`` (a temporary folder unless the run names one)."""

    streamed = True
    default_offload = "disk"
    default_batch = 1  # a batch's activations inside a block are the streamed peak's largest part besides the block

    def __init__(self, model: nn.Module, shards: Shards, device: str | torch.device | None = None) -> None:
        super().__init__(model, device)
        self.shards = shards
        self.spill_dir: Path | None = None
        self._own_spill: Path | None = None
        self.finished: dict[int, Path] = {}
        return_freed_memory()  # already done by open_streamed; here for a source built by hand

    @contextmanager
    def outside_blocks(self) -> Iterator[None]:
        self.unpark_outside()
        with super().outside_blocks():
            yield

    def unpark_outside(self) -> None:
        head = self.prefix + "."
        parked = [n for n, p in self.model.named_parameters() if p.is_meta and not n.startswith(head)]
        if parked:  # a tied head is not in the shards: tie_weights restores it
            self.shards.load(self.model, {n: n for n in parked if n in self.shards.files}, self.home)
            self.model.tie_weights()

    def park_outside(self) -> None:
        """The embeddings and head are often the largest tensors of a model: freed while the blocks are processed,
        read again by ``outside_blocks``."""
        head = self.prefix + "."
        for name, p in self.model.named_parameters(remove_duplicate=False):  # a tied head too: no reference stays
            if not name.startswith(head):
                owner, _, attr = name.rpartition(".")
                self.model.get_submodule(owner)._parameters[attr] = nn.Parameter(p.to("meta"), p.requires_grad)

    def onload(self, i: int) -> nn.Module:
        block = self.blocks[i]
        names = [n for n, t in [*block.named_parameters(), *block.named_buffers()] if t.is_meta]
        self.shards.load(block, {n: f"{self.prefix}.{i}.{n}" for n in names}, self.home)
        return block.to(self.device)

    def release(self, i: int) -> None:
        self.blocks[i].to("meta")
        trim_heap()

    def keep_finished_in(self, folder: Path) -> None:
        self.spill_dir = folder

    def _spill(self) -> Path:
        if self.spill_dir is None:
            self.spill_dir = self._own_spill = Path(tempfile.mkdtemp(prefix="svdllm-blocks-"))
        self.spill_dir.mkdir(parents=True, exist_ok=True)
        return self.spill_dir

    def finish(self, i: int) -> None:
        path = self._spill() / f"block-{i:05d}.safetensors"
        atomic_save_file(super().block_tensors(i), path)
        self.finished[i] = path
        self.release(i)

    def block_tensors(self, i: int) -> dict[str, Tensor]:
        if i not in self.finished:
            raise RuntimeError(f"block {i} was never finished")
        return load_tensors(self.finished[i])

    def persist(self, i: int, path: Path) -> None:
        if self.finished[i].resolve() == path.resolve():
            return
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        try:
            os.link(self.finished[i], tmp)
        except OSError:
            shutil.copyfile(self.finished[i], tmp)
        os.replace(tmp, path)

    def restore(self, i: int, ranks: dict[str, int], path: Path) -> None:
        apply_ranks(self.model, ranks)  # the skeleton's block takes the finished block's shapes (on meta)
        self.finished[i] = path

    def digest_update(self, h: Any) -> None:
        self.shards.digest_update(h)

    def close(self) -> None:
        if self._own_spill is not None:
            shutil.rmtree(self._own_spill, ignore_errors=True)
            self._own_spill = self.spill_dir = None


# ---------------------------------------------------------------- opening a model


def _tied_heads(model: nn.Module) -> set[str]:
    """Parameter names that are tied to the input embeddings when the config says so."""
    out = model.get_output_embeddings()
    if out is None or not getattr(model.config.get_text_config(), "tie_word_embeddings", False):
        return set()
    return {n for n, p in model.named_parameters(remove_duplicate=False) if p is out.weight}


def open_streamed(folder: str | os.PathLike, device: str | torch.device | None = None,
                  trust_remote_code: bool = False) -> StreamedSource:
    """A plain Hugging Face folder as a float32 skeleton: everything outside the blocks is read now, each block
    when a pass reaches it.  The folder's own code runs only with ``trust_remote_code``."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    return_freed_memory()  # before anything large is allocated and freed
    shards = Shards(folder)
    _refuse_own_code(Path(folder), trust_remote_code)
    config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    if getattr(config, "svdllm", None):
        raise FormatError(f"{folder} is already compressed by svdllm; streaming reads dense models only")
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, trust_remote_code=trust_remote_code)
    shards.name_for(model)
    prefix, _ = decoder_blocks(model)
    tied = tied_parameter_names(model)
    rest = {n for n, t in [*model.named_parameters(), *model.named_buffers()]
            if t.is_meta and not n.startswith(prefix + ".") and n not in tied}
    missing = sorted(n for n in rest if n not in shards.files)
    if missing and missing != [n for n in missing if n in _tied_heads(model)]:
        raise FormatError(f"{folder}: the shards have no tensor {missing[0]}")
    shards.load(model, {n: n for n in rest - set(missing)}, torch.device("cpu"))
    model.tie_weights()
    return StreamedSource(model.eval(), shards, device)


def needs_own_code(folder: Path) -> bool:
    """The folder's config names a model type transformers does not know, so only its own code (auto_map) builds it."""
    from transformers import CONFIG_MAPPING

    try:
        cfg = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False  # transformers names the problem
    return isinstance(cfg, dict) and bool(cfg.get("auto_map")) and cfg.get("model_type") not in CONFIG_MAPPING


def _refuse_own_code(folder: Path | str, trust_remote_code: bool) -> None:
    if isinstance(folder, Path) and not trust_remote_code and needs_own_code(folder):
        raise OptionError("trust_remote_code", f"{folder} is a model type transformers does not know and would run the "
                          "folder's own Python code (auto_map); allow it with `trust_remote_code` only if you trust it")


def load_model(spec: str, dtype: Any = None, device: str | None = None,
               trust_remote_code: bool = False) -> tuple[Any, Any]:
    """(model, tokenizer) in memory for a named model, a local folder (svdllm or plain), a .gguf file or a hub id.
    A folder's own Python code (``auto_map``) runs only with ``trust_remote_code``: never by a prompt mid-run."""
    from .assets import resolve_model

    return _load_resolved(spec, *resolve_model(spec), dtype, device, trust_remote_code)


def _load_resolved(spec: str, where: Path | str, gguf: str | None, dtype: Any, device: str | None,
                   trust_remote_code: bool) -> tuple[Any, Any]:
    """``load_model`` of what ``assets.resolve_model`` made of ``spec``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .folder import is_svdllm_folder, load

    kwargs: dict[str, Any] = {"gguf_file": gguf} if gguf else {}
    kwargs["trust_remote_code"] = trust_remote_code
    _refuse_own_code(where, trust_remote_code)
    if isinstance(where, Path) and is_svdllm_folder(where):  # svdllm's own runtime, never the folder's code
        return load(where, dtype=dtype, device=device), AutoTokenizer.from_pretrained(where, trust_remote_code=False)
    try:
        tok = AutoTokenizer.from_pretrained(where, **kwargs)
        safe = {} if gguf else {"use_safetensors": True}  # never unpickle
        model, info = AutoModelForCausalLM.from_pretrained(where, dtype=dtype or torch.float32, output_loading_info=True,
                                                           **kwargs, **safe)
    except OSError as exc:
        if isinstance(where, str):
            raise FileNotFoundError(f"model not found: {spec} (no local path, and the hub is unreachable or has no "
                                    "such id)") from None
        raise FormatError(f"cannot load model from {spec}: {str(exc).splitlines()[0]}") from None
    missing = sorted(set(info.get("missing_keys") or []) - tied_parameter_names(model) - _tied_heads(model))
    if missing:  # transformers would have initialised them at random
        raise FormatError(f"{spec}: the weights do not cover the model: no tensor {missing[0]} ({len(missing)} missing)")
    if gguf and _gguf_adds_bos(Path(where) / gguf):
        tok.add_bos_token = True  # the GGUF's tokenizer.ggml.add_bos_token, which the conversion drops
    if device:
        model.to(device)
    return model.eval(), tok


def _gguf_adds_bos(path: Path) -> bool:
    try:
        import gguf

        field = gguf.GGUFReader(str(path)).fields.get("tokenizer.ggml.add_bos_token")
        return bool(field is not None and field.data and field.parts[field.data[0]][0])
    except Exception:  # an unreadable header: transformers already read what it needs
        return False


def memory_available() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def should_stream(spec: str, low_memory: bool | None) -> bool:
    """``low_memory`` if given; else (None: automatic) whether a local safetensors folder's float32 weights exceed
    half the available memory (each process torchrun started on this machine holding a copy)."""
    if low_memory is not None:
        return low_memory
    from .assets import resolve_model

    where, gguf = resolve_model(spec)
    if gguf or not isinstance(where, Path):
        return False
    try:
        need = Shards(where).nbytes * 2 * distributed.env_int("LOCAL_WORLD_SIZE", 1)  # bf16 shards → float32
    except FormatError:
        return False
    if need > memory_available() // 2:
        log.warning("the weights (%.1f GiB as float32) exceed half the available memory: streaming blocks from disk",
                    need / 2**30)
        return True
    return False


def open_source(spec: str, low_memory: bool | None = None, device: str | None = None,
                trust_remote_code: bool = False) -> tuple[ModelSource, Any]:
    """The model ``spec`` as a source, in memory or streamed from its shards (``low_memory``; None: automatic),
    and its tokenizer; the folder's own code runs only with ``trust_remote_code``."""
    from transformers import AutoTokenizer

    from .assets import resolve_model

    where, gguf = resolve_model(spec)
    if not should_stream(spec, low_memory):
        model, tok = _load_resolved(spec, where, gguf, None, None, trust_remote_code)
        return ModelSource(model, device), tok
    if gguf:
        raise OptionError("low_memory", f"{spec} is a GGUF file; streaming reads safetensors folders only "
                          "(convert it, or compress it in memory)")
    if not isinstance(where, Path):
        raise OptionError("low_memory", f"{spec} is not a local folder; streaming reads local safetensors folders")
    return open_streamed(where, device, trust_remote_code), AutoTokenizer.from_pretrained(
        where, trust_remote_code=trust_remote_code)
