"""Save and load compressed models: sharded safetensors, factors kept as factors, no pickle.

A saved folder is an ordinary Hugging Face folder plus a ``svdllm`` section in
config.json (ranks, method, shard checksums) and ``modeling_svdllm.py``, so
``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`` works
without svdllm installed.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch
import transformers
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from torch import nn

from . import __version__
from .assets import resolve_model
from .assets import sha256_file as _sha256
from .checkpoint import atomic_save_file
from .modeling_svdllm import svdllm_class, tied_parameter_names

FORMAT_VERSION = 2  # 2: quantized factors (written only for quantized models; others stay version 1)
MODELING_FILE = "modeling_svdllm.py"
REPORT_FILE = "svdllm_report.json"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class FormatError(ValueError):
    """The folder is not a loadable svdllm model."""


def written_by_svdllm(folder: Path) -> bool:
    """A folder svdllm saved: its config.json has an svdllm section, or it holds an svdllm report."""
    try:
        cfg = json.loads((folder / "config.json").read_text())
        return isinstance(cfg, dict) and isinstance(cfg.get("svdllm"), dict) or (folder / REPORT_FILE).is_file()
    except (OSError, ValueError):
        return (folder / REPORT_FILE).is_file()


def check_out_dir(path: str | os.PathLike, force: bool) -> Path:
    """Before any work: --out must be a writable place, and an existing folder is replaced only when asked and
    only if it is empty or svdllm wrote it (never a user's other files)."""
    out = Path(path).expanduser()
    if out.name in ("", ".", ".."):
        raise FileExistsError(f"--out {path} must name a folder of its own, not {path!r}")
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--out {out} exists and is a file")
    if out.is_dir() and any(out.iterdir()):
        if not force:
            raise FileExistsError(f"--out {out} exists and is not empty; pass --force to replace it")
        if not written_by_svdllm(out):
            raise FileExistsError(f"--out {out} holds files svdllm did not write; it is not replaced, even with --force")
    ancestor = out.parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise FileExistsError(f"--out {out} lies under {ancestor}, which is a file")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise PermissionError(f"--out {out} cannot be written: {ancestor} is not writable")
    return out


def _remove_stale_siblings(out: Path) -> None:
    """Temp and old folders a killed save of this --out left behind (their process is gone)."""
    for sibling in out.parent.glob(f".{out.name}.*-*"):
        kind, _, rest = sibling.name[len(out.name) + 2:].partition("-")
        pid = rest.split("-")[0]
        if kind not in ("tmp", "old") or not pid.isdigit() or not sibling.is_dir():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(sibling, ignore_errors=True)
        except PermissionError:
            pass  # alive, another user's


def base_class(model: nn.Module) -> type:
    """The transformers class under svdllm's SVDLLMForCausalLM wrapper (if any)."""
    return next(c for c in type(model).__mro__ if c.__name__ != "SVDLLMForCausalLM")


def _modeling_source(model: nn.Module) -> str:
    base = base_class(model)
    own = (Path(__file__).parent / MODELING_FILE).read_text()
    return own + (
        f"\n\nfrom {base.__module__} import {base.__name__} as _Base  # noqa: E402\n\n"
        "SVDLLMForCausalLM = svdllm_class(_Base)\n"
    )


def model_card(section: dict[str, Any], perplexity: dict[str, float] | None) -> str:
    lines = [
        "---", "library_name: transformers", "tags: [svdllm, low-rank, compressed]", "---", "",
        f"# {section.get('method')} compressed model", "",
        f"Compressed with [svdllm](https://pypi.org/project/svdllm/) {section.get('svdllm_version')}: "
        f"method `{section.get('method')}`, parameter-reduction ratio {section.get('ratio')}, "
        f"{len(section.get('ranks', {}))} low-rank matrices.", "",
        "```python",
        "from transformers import AutoModelForCausalLM",
        "model = AutoModelForCausalLM.from_pretrained(PATH, trust_remote_code=True)  # or svdllm.load(PATH)",
        "```", "",
    ]
    if section.get("calibration"):
        c = section["calibration"]
        lines += [f"Calibration: {c.get('nsamples')}×{c.get('seqlen')} tokens of `{c.get('data', 'given windows')}`, "
                  f"seed {c.get('seed')}.", ""]
    if perplexity:
        lines += ["| data | perplexity |", "|---|---|"] + [f"| {k} | {v:.3f} |" for k, v in perplexity.items()] + [""]
    if section.get("zero_shot"):
        lines += ["| lm-eval task metric | value |", "|---|---|"] + \
                 [f"| {k} | {v:.4f} |" for k, v in section["zero_shot"].items()] + [""]
    return "\n".join(lines)


def _write_folder(model: nn.Module, tokenizer: Any, path: str | os.PathLike, dtype: torch.dtype | None, force: bool,
                  perplexity: dict[str, float] | None, write_weights: Callable[[Path], None],
                  write_extra: Callable[[Path], None] | None = None) -> Path:
    """Everything but the weights, around ``write_weights(tmp)``; the folder appears complete or not at all."""
    out = check_out_dir(path, force)
    section = getattr(model.config, "svdllm", None)
    if not section:
        raise FormatError("model has no svdllm section: compress it first")
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_siblings(out)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-{os.getpid()}-"))
    try:
        write_weights(tmp)
        model.config.save_pretrained(tmp)
        if getattr(model, "generation_config", None) is not None and model.can_generate():
            model.generation_config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        (tmp / MODELING_FILE).write_text(_modeling_source(model))
        cfg_path = tmp / "config.json"
        cfg = json.loads(cfg_path.read_text())
        if dtype is not None:
            cfg["dtype"] = str(dtype).removeprefix("torch.")
        cfg["architectures"] = [base_class(model).__name__]
        shards = sorted(p.name for p in tmp.glob("*.safetensors"))
        version = 2 if section.get("quantization") else 1  # older svdllm still reads unquantized folders
        cfg["svdllm"] = dict(section, format_version=version, svdllm_version=__version__,
                             perplexity=perplexity or section.get("perplexity"),
                             shards={s: _sha256(tmp / s) for s in shards})
        cfg["auto_map"] = {"AutoModelForCausalLM": f"{MODELING_FILE[:-3]}.SVDLLMForCausalLM"}
        cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        (tmp / "README.md").write_text(model_card(cfg["svdllm"], perplexity))
        report = getattr(model, "svdllm_report", None)
        if report is not None:
            report.write(tmp / REPORT_FILE)
        if write_extra is not None:
            write_extra(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; a saved model is for sharing
        for f in tmp.iterdir():
            os.chmod(f, 0o666 & ~umask)
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    return DTYPES[dtype] if isinstance(dtype, str) else dtype


def _write_shards(tmp: Path, model: nn.Module, blocks: list[Callable[[], dict[str, torch.Tensor]]],
                  dtype: torch.dtype | None) -> None:
    """One shard per decoder block (each read by its callable) and one for the rest, plus the index.

    Keys are the model's own parameter names, never a legacy checkpoint naming
    (save_pretrained writes GPT-NeoX's lm_head as embed_out, and transformers
    does not rename it back for a custom class: the head would load at random).
    """
    from .architecture import decoder_blocks

    prefix, _ = decoder_blocks(model)
    total = len(blocks) + 1
    weight_map: dict[str, str] = {}
    size = 0
    for i, read in enumerate([*blocks, lambda: _untied_rest(model, prefix)], 1):
        name = f"model-{i:05d}-of-{total:05d}.safetensors"
        tensors = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).contiguous()
                   for k, v in read().items()}
        atomic_save_file(tensors, tmp / name, {"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, name))
        size += sum(v.numel() * v.element_size() for v in tensors.values())
    index = {"metadata": {"total_size": size}, "weight_map": dict(sorted(weight_map.items()))}
    (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def _untied_rest(model: nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    """The tensors outside the decoder blocks, a tied tensor once (under its first name)."""
    head, seen, out = prefix + ".", set(), {}
    for name, t in model.state_dict().items():
        key = (t.data_ptr(), tuple(t.shape), t.dtype)
        if name.startswith(head) or key in seen or t.device.type == "meta":
            continue
        seen.add(key)
        out[name] = t.detach().cpu()
    return out


def save(model: nn.Module, tokenizer: Any, path: str | os.PathLike, dtype: str | torch.dtype | None = None,
         force: bool = False, perplexity: dict[str, float] | None = None,
         write_extra: Callable[[Path], None] | None = None) -> Path:
    """Write ``model`` (compressed by svdllm, in memory) to ``path`` atomically, with its report if it has one;
    ``write_extra(folder)`` adds files before the folder appears."""
    from .architecture import decoder_blocks

    prefix, blocks = decoder_blocks(model)
    readers = [lambda i=i: {f"{prefix}.{i}.{k}": v.detach().cpu() for k, v in blocks[i].state_dict().items()}
               for i in range(len(blocks))]
    target = _dtype(dtype)
    return _write_folder(model, tokenizer, path, target, force, perplexity,
                         lambda tmp: _write_shards(tmp, model, readers, target), write_extra)


def save_streamed(model: nn.Module, tokenizer: Any, path: str | os.PathLike, block_files: list[Path],
                  dtype: str | torch.dtype | None = None, force: bool = False,
                  perplexity: dict[str, float] | None = None) -> Path:
    """Write a model compressed from disk: its blocks come from ``block_files``, written by the run."""
    readers = [lambda f=f: load_file(str(f)) for f in block_files]
    target = _dtype(dtype)
    return _write_folder(model, tokenizer, path, target, force, perplexity,
                         lambda tmp: _write_shards(tmp, model, readers, target))


def read_section(path: str | os.PathLike) -> dict[str, Any]:
    """The validated svdllm section of a saved folder; raises FormatError naming the problem."""
    folder = Path(path)
    cfg_file = folder / "config.json"
    if not cfg_file.is_file():
        raise FormatError(f"{folder} is not a model folder (no config.json)")
    try:
        cfg = json.loads(cfg_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise FormatError(f"{cfg_file} is not valid JSON ({getattr(exc, 'msg', exc)})") from None
    if not isinstance(cfg, dict):
        raise FormatError(f"{cfg_file} is not a JSON object")
    section = cfg.get("svdllm")
    if not isinstance(section, dict) or "ranks" not in section:
        raise FormatError(f"{folder} is not an svdllm model (config.json has no svdllm section)")
    version = section.get("format_version")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise FormatError(f"{folder}: svdllm format_version must be a whole number ≥ 1, got {version!r}")
    if version > FORMAT_VERSION:
        raise FormatError(
            f"{folder} uses svdllm format version {version}; this svdllm ({__version__}) reads up to {FORMAT_VERSION}: upgrade svdllm"
        )
    ranks, shards = section.get("ranks"), section.get("shards")
    if not isinstance(ranks, dict) or not all(isinstance(k, str) and type(v) is int and v > 0 for k, v in ranks.items()):
        raise FormatError(f"{folder}: the svdllm section's ranks must map module names to positive whole numbers")
    if not isinstance(shards, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in shards.items()):
        raise FormatError(f"{folder}: the svdllm section's shards must map file names to sha256 digests")
    return section


def verify(path: str | os.PathLike) -> dict[str, Any]:
    """Check every shard (present, intact, sha256) and every factor shape against the recorded ranks."""
    folder = Path(path)
    section = read_section(folder)
    shards = section.get("shards") or {}
    if not shards:
        raise FormatError(f"{folder}: the svdllm section lists no weight shards")
    shapes: dict[str, tuple[int, ...]] = {}
    tensor_bytes = 0
    for name, digest in shards.items():
        if not isinstance(name, str) or Path(name).name != name or not name.endswith(".safetensors"):
            raise FormatError(f"{folder}: shard name {name!r} is not a .safetensors file inside the folder")
        shard = folder / name
        if not shard.is_file():
            raise FormatError(f"{folder}: weight shard {name} is missing")
        if _sha256(shard) != digest:
            raise FormatError(f"{folder}: weight shard {name} is corrupt or truncated (sha256 mismatch)")
        try:
            with safe_open(str(shard), framework="pt") as fh:
                for key in fh.keys():
                    tensor = fh.get_slice(key)
                    shapes[key] = tuple(tensor.get_shape())
                    tensor_bytes += math.prod(shapes[key]) * _DTYPE_BYTES[tensor.get_dtype()]
        except SafetensorError as exc:
            raise FormatError(f"{folder}: weight shard {name} is unreadable ({exc})") from None
    quantized = _check_quantized(folder, section, shapes)
    shape = lambda linear: tuple(quantized[linear]["shape"]) if linear in quantized else shapes.get(f"{linear}.weight")  # noqa: E731
    for module, rank in section["ranks"].items():
        u, v = shape(f"{module}.svd_u"), shape(f"{module}.svd_v")
        if u is None or v is None:
            raise FormatError(f"{folder}: factors of {module} are missing from the shards")
        if u[1] != rank or v[0] != rank:
            raise FormatError(
                f"{folder}: {module} has factors {list(u)} and {list(v)} but config records rank {rank}"
            )
    section["dense_shapes"] = {m: [shape(f"{m}.svd_u")[0], shape(f"{m}.svd_v")[1]] for m in section["ranks"]}
    section["tensor_bytes"] = tensor_bytes
    return section


_DTYPE_BYTES = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2, "U16": 2,
                "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


def quantized_tensor_shapes(spec: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """The tensors optimum-quanto stores for one quantized weight (suffixes after ``weight.``) and their shapes:
    int8 data and one scale per row; int4 (int2) data packed two (four) per byte along rows of (out, in), or of
    (out·in/group, group), with a scale and a shift per such row."""
    out_f, in_f = spec["shape"]
    if spec["weights"] == "qint8":
        return {"_data": (out_f, in_f), "_scale": (out_f, 1)}
    per_byte = {"qint4": 2, "qint2": 4}[spec["weights"]]
    group = spec.get("group_size")
    rows, cols = (out_f * in_f // group, group) if group else (out_f, in_f)
    return {"_data._data": (-(-rows // per_byte), cols), "_scale": (rows, 1), "_shift": (rows, 1)}


def _check_quantized(folder: Path, section: dict[str, Any], shapes: dict[str, tuple[int, ...]]) -> dict[str, Any]:
    """The quantized linears of the section, each checked against the tensors in the shards."""
    quantization = section.get("quantization")
    if not quantization:
        return {}
    modules = quantization.get("modules") if isinstance(quantization, dict) else None
    if not isinstance(modules, dict) or not modules:
        raise FormatError(f"{folder}: the svdllm section's quantization lists no modules")
    for name, spec in modules.items():
        try:
            expected = quantized_tensor_shapes(spec)
        except (KeyError, TypeError, ValueError, ZeroDivisionError):
            raise FormatError(f"{folder}: the quantization record of {name} is malformed") from None
        for suffix, want in expected.items():
            got = shapes.get(f"{name}.weight.{suffix}")
            if got != want:
                raise FormatError(f"{folder}: {name}.weight.{suffix} is {list(got) if got else 'missing'}, but the "
                                  f"quantization record implies {list(want)}")
    return modules


def causal_lm_class(architectures: Any, folder: Path) -> type:
    """The transformers causal-LM class named by config.json's ``architectures``; anything else is refused
    (an Auto class, a function or a module would build a random model or offer to run the folder's code)."""
    from transformers import PreTrainedModel
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    names = {n for v in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values() for n in ((v,) if isinstance(v, str) else v)}
    arch = architectures[0] if isinstance(architectures, list) and architectures else architectures
    cls = getattr(transformers, arch, None) if isinstance(arch, str) and arch in names else None
    if not (isinstance(cls, type) and issubclass(cls, PreTrainedModel)):
        raise FormatError(f"{folder}: config.json's architectures {architectures!r} is not a transformers "
                          "causal-LM class")
    return cls


def load(
    path: str | os.PathLike,
    dtype: str | torch.dtype | None = None,
    device: str | None = None,
    device_map: Any = None,
    latent_cache: bool = False,
) -> nn.Module:
    """Rebuild a saved svdllm model from config.json and safetensors alone (ranks from config).  With
    ``latent_cache`` its ``generate`` keeps the latents of low-rank k_proj/v_proj in the KV cache by default."""
    folder = Path(path)
    verify(folder)
    cfg = json.loads((folder / "config.json").read_text())
    base = causal_lm_class(cfg.get("architectures"), folder)
    kwargs: dict[str, Any] = {"dtype": "auto"}  # the saved dtype unless asked otherwise
    if dtype is not None:
        kwargs["dtype"] = DTYPES.get(dtype, dtype) if isinstance(dtype, str) else dtype
    if device_map is not None:
        kwargs["device_map"] = device_map
    try:
        model = svdllm_class(base).from_pretrained(folder, **kwargs)
    except ValueError as exc:
        raise FormatError(f"{folder}: {str(exc).splitlines()[0]}") from None
    except ImportError as exc:  # a quantized model without its library
        raise RuntimeError(f"{folder}: {exc}") from None
    if device:
        model.to(device)
    model.latent_cache_default = latent_cache
    return model.eval()


class ShardSource:
    """The tensors of a safetensors model folder, read a few at a time (``safe_open``) into a meta skeleton."""

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)
        index = self.folder / "model.safetensors.index.json"
        if index.is_file():
            self.files: dict[str, str] = json.loads(index.read_text())["weight_map"]
        elif (self.folder / "model.safetensors").is_file():
            with safe_open(str(self.folder / "model.safetensors"), framework="pt") as fh:
                self.files = dict.fromkeys(fh.keys(), "model.safetensors")
        else:
            raise FormatError(f"{self.folder} has no safetensors weights (model.safetensors or its index)")

    @property
    def nbytes(self) -> int:
        return sum((self.folder / f).stat().st_size for f in set(self.files.values()))

    def materialise(self, module: nn.Module, key_prefix: str, device: torch.device) -> None:
        """Every meta parameter and buffer of ``module`` read from the shards (key ``key_prefix + name``)."""
        names = [n for n, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta]
        self.load(module, {n: key_prefix + n for n in names}, device)

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
                    value = fh.get_tensor(keys[name]).to(dtypes[name])
                    set_module_tensor_to_device(module, name, device, value=value)


def load_skeleton(folder: str | os.PathLike) -> tuple[nn.Module, ShardSource]:
    """A plain Hugging Face folder as a float32 model whose decoder blocks stay on the meta device.

    Everything outside the blocks (embeddings, final norm, head) is read now;
    the blocks are read one at a time by ``ShardSource.materialise``.
    """
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    from .architecture import decoder_blocks

    source = ShardSource(folder)
    config = AutoConfig.from_pretrained(folder)
    if getattr(config, "svdllm", None):
        raise FormatError(f"{folder} is already compressed by svdllm; --low-memory reads dense models only")
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    prefix, _ = decoder_blocks(model)
    tied = tied_parameter_names(model)
    rest = {n for n, t in [*model.named_parameters(), *model.named_buffers()]
            if t.is_meta and not n.startswith(prefix + ".") and n not in tied}
    missing = sorted(n for n in rest if n not in source.files)
    if missing and missing != [n for n in missing if n in _tied_heads(model)]:
        raise FormatError(f"{folder}: the shards have no tensor {missing[0]}")
    source.load(model, {n: n for n in rest - set(missing)}, torch.device("cpu"))
    model.tie_weights()
    return model.eval(), source


def _tied_heads(model: nn.Module) -> set[str]:
    """Parameter names that are tied to the input embeddings when the config says so."""
    out = model.get_output_embeddings()
    if out is None or not getattr(model.config.get_text_config(), "tie_word_embeddings", False):
        return set()
    return {n for n, p in model.named_parameters(remove_duplicate=False) if p is out.weight}


def load_model(spec: str, dtype: Any = None, device: str | None = None) -> tuple[Any, Any]:
    """(model, tokenizer) for a named model, a local folder (svdllm or plain), a .gguf file or a hub id."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    where, gguf = resolve_model(spec)
    kwargs: dict[str, Any] = {"gguf_file": gguf} if gguf else {}
    if isinstance(where, Path) and (where / "config.json").exists():
        if "svdllm" in json.loads((where / "config.json").read_text()):
            return load(where, dtype=dtype, device=device), AutoTokenizer.from_pretrained(where)
    try:
        tok = AutoTokenizer.from_pretrained(where, **kwargs)
        safe = {} if gguf else {"use_safetensors": True}  # never unpickle
        model = AutoModelForCausalLM.from_pretrained(where, dtype=dtype or torch.float32, **kwargs, **safe)
    except OSError as exc:
        if isinstance(where, str):
            raise FileNotFoundError(f"model not found: {spec} (no local path, and the hub is unreachable or has no such id)") from None
        raise RuntimeError(f"cannot load model from {spec}: {str(exc).splitlines()[0]}") from None
    if device:
        model.to(device)
    model.eval()
    return model, tok
