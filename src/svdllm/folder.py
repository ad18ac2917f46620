"""The saved folder: where it may be written, how it is written, and how it is read back.

A saved folder is an ordinary Hugging Face folder: safetensors shards (one per decoder block and one for the rest,
factors kept as factors), config.json with the ``svdllm`` record (``SvdllmRecord``), the tokenizer, the report,
a model card, and the runtime the model uses (``runtime/``) with a generated ``modeling_svdllm.py``, so
``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`` works without svdllm.  ``svdllm_manifest.json``,
written last, lists every file with its sha256: ``force`` replaces only a folder whose files all match it.
"""
from __future__ import annotations

import json
import math
import os
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import transformers
from safetensors import SafetensorError, safe_open
from torch import nn

from .architecture import decoder_blocks
from .errors import FormatError, OptionError
from .record import SvdllmRecord
from .runtime import LATENT_CACHE_FAMILIES, WeightsMismatch, model_class
from .files import atomic_save_file, sha256_file

MODELING_FILE = "modeling_svdllm.py"
REPORT_FILE = "svdllm_report.json"
MANIFEST_FILE = "svdllm_manifest.json"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
RUNTIME = Path(__file__).parent / "runtime"


# ---------------------------------------------------------------- where a folder may be written


def written_by_svdllm(folder: Path) -> bool:
    """Every file of ``folder`` is one its manifest lists, with the sha256 the manifest records."""
    try:
        _check_manifest(folder)
        return True
    except (FormatError, OSError):
        return False


def check_out_dir(path: str | os.PathLike, force: bool, option: str = "out") -> Path:
    """Before any work: the output must be a writable place, and an existing folder is replaced only when asked and
    only if it is empty or every file in it is one svdllm wrote there (its manifest)."""
    out = Path(path).expanduser()
    if out.name in ("", ".", ".."):
        raise OptionError(option, f"{path} must name a folder of its own")
    if out.is_symlink():
        raise OptionError(option, f"{out} is a symbolic link; name the folder itself")
    if out.exists() and not out.is_dir():
        raise OptionError(option, f"{out} exists and is a file")
    if out.is_dir() and any(out.iterdir()):
        if not force:
            raise OptionError(option, f"{out} exists and is not empty; `force` replaces a folder svdllm wrote")
        if not written_by_svdllm(out):
            raise OptionError(option, f"{out} holds files svdllm did not write (or changed since); it is not "
                              "replaced, even with `force`")
    ancestor = out.parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise OptionError(option, f"{out} lies under {ancestor}, which is a file")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise OptionError(option, f"{out} cannot be written: {ancestor} is not writable")
    return out


def check_new_file(path: str | os.PathLike, option: str) -> Path:
    """A file the run will write: it must not exist, and its folder must."""
    file = Path(path).expanduser()
    if file.exists():
        raise OptionError(option, f"{file} exists; give a new file name")
    if not file.parent.is_dir():
        raise OptionError(option, f"{file.parent} is not a folder")
    return file


PARTIAL_MARKER = ".svdllm-partial"  # inside a temp or old folder of svdllm's: the token its name ends with


def _marked_folder(out: Path, kind: str, pid: int | None = None) -> Path:
    """A new private folder ``.OUT.KIND-PID-TOKEN`` beside ``out`` holding a marker with TOKEN: the proof that svdllm
    made it, so that a later run may remove it once process PID is gone."""
    token = secrets.token_hex(8)
    folder = out.parent / f".{out.name}.{kind}-{pid or os.getpid()}-{token}"
    folder.mkdir(mode=0o700)
    (folder / PARTIAL_MARKER).write_text(token)
    return folder


def _remove_stale_siblings(out: Path) -> None:
    """Temp and old folders a killed save of this output left behind: only those svdllm made (the marker inside
    holds the token of the name) whose process is gone; anything else of that name is the user's and stays."""
    for sibling in out.parent.glob(f".{out.name}.*-*"):
        kind, _, rest = sibling.name[len(out.name) + 2:].partition("-")
        pid, _, token = rest.partition("-")
        if kind not in ("tmp", "old") or not pid.isdigit() or not token or sibling.is_symlink() \
                or not sibling.is_dir():
            continue
        try:
            if (sibling / PARTIAL_MARKER).read_text() != token:
                continue
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(sibling, ignore_errors=True)
        except (OSError, UnicodeDecodeError):
            pass  # no marker, or alive and another user's


# ---------------------------------------------------------------- writing


def base_class(model: nn.Module) -> type:
    """The transformers class under svdllm's SVDLLMForCausalLM wrapper (if any)."""
    return next(c for c in type(model).__mro__ if c.__name__ != "SVDLLMForCausalLM")


def runtime_files(base: type, family: str, quantized: bool) -> dict[str, str]:
    """The runtime a model of class ``base`` and ``family`` uses, file name → source: the low-rank layers always, the
    latent cache for the families it supports, the quantized-factor loader for quantized factors; and the modeling
    file that joins them.  The same arguments give the same bytes: ``verify`` compares a folder's code with them."""
    parts = {"svdllm_lowrank": ["svdllm_class"]}
    if family in LATENT_CACHE_FAMILIES:
        parts["svdllm_latent_cache"] = ["LatentCache"]
    if quantized:
        parts["svdllm_quantized"] = ["load_quantized"]
    files = {f"{name}.py": (RUNTIME / f"{name}.py").read_text() for name in parts}
    hooks = [f"{hook}={name}" for hook, name, file in (("load_quantized", "load_quantized", "svdllm_quantized"),
                                                        ("latent_cache", "LatentCache", "svdllm_latent_cache"))
             if file in parts]
    imports = "".join(f"from .{name} import {', '.join(names)}\n" for name, names in parts.items())
    files[MODELING_FILE] = (
        '"""svdllm model class for transformers (trust_remote_code=True); written by svdllm."""\n'
        f"from {base.__module__} import {base.__name__} as _Base\n\n{imports}\n"
        f"SVDLLMForCausalLM = svdllm_class({', '.join(['_Base', *hooks])})\n")
    return files


def model_card(record: SvdllmRecord) -> str:
    lines = [
        "---", "library_name: transformers", "tags: [svdllm, low-rank, compressed]", "---", "",
        f"# {record.method} compressed model", "",
        f"Compressed with [svdllm](https://pypi.org/project/svdllm/) {record.svdllm_version}: method `{record.method}`, "
        f"parameter-reduction ratio {record.ratio}, {len(record.ranks)} low-rank matrices.", "",
        "```python", "from transformers import AutoModelForCausalLM",
        "model = AutoModelForCausalLM.from_pretrained(PATH, trust_remote_code=True)  # or svdllm.load(PATH)", "```", "",
    ]
    if record.calibration:
        c = record.calibration
        lines += [f"Calibration: {c.get('nsamples')}×{c.get('seqlen')} tokens of `{c.get('data', 'given windows')}`, "
                  f"seed {c.get('seed')}.", ""]
    if record.perplexity:
        lines += ["| data | perplexity |", "|---|---|"] + [f"| {k} | {v:.3f} |" for k, v in record.perplexity.items()]
        lines += [""]
    if record.zero_shot:
        lines += ["| lm-eval task metric | value |", "|---|---|"] + \
                 [f"| {k} | {v:.4f} |" for k, v in record.zero_shot.items()] + [""]
    return "\n".join(lines)


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


def _write_shards(tmp: Path, model: nn.Module, blocks: list[Callable[[], dict[str, torch.Tensor]]],
                  dtype: torch.dtype | None) -> dict[str, str]:
    """One shard per decoder block (each read by its callable) and one for the rest, plus the index; the shards'
    sha256.  Keys are the model's own parameter names, never a legacy checkpoint naming (save_pretrained writes
    GPT-NeoX's lm_head as embed_out, which transformers does not rename back for a custom class)."""
    prefix, _ = decoder_blocks(model)
    total, weight_map, size, digests = len(blocks) + 1, {}, 0, {}
    for i, read in enumerate([*blocks, lambda: _untied_rest(model, prefix)], 1):
        name = f"model-{i:05d}-of-{total:05d}.safetensors"
        tensors = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).contiguous()
                   for k, v in read().items()}
        atomic_save_file(tensors, tmp / name, {"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, name))
        size += sum(v.numel() * v.element_size() for v in tensors.values())
        digests[name] = sha256_file(tmp / name)
    index = {"metadata": {"total_size": size}, "weight_map": dict(sorted(weight_map.items()))}
    (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return digests


def save(model: Any, tokenizer: Any, path: str | os.PathLike, record: SvdllmRecord | None = None, *,
         report: Any = None, dtype: str | torch.dtype | None = None, force: bool = False,
         blocks: list[Callable[[], dict[str, torch.Tensor]]] | None = None,
         write_extra: Callable[[Path], None] | None = None) -> Path:
    """Write a compressed model to ``path`` atomically: the folder appears complete or not at all.

    ``model`` is what ``compress`` returned (its record, report and finished blocks are used), or a model with a
    ``record`` (a model loaded by ``load`` carries its own).  ``blocks`` read each decoder block's tensors (default:
    from the model in memory); ``report`` (with a ``write(path)``) and ``write_extra(folder)`` add files before the
    folder appears.
    """
    if hasattr(model, "record") and hasattr(model, "source"):  # a CompressionResult
        result, model = model, model.model
        record, report = record or result.record, report or result.report
        if blocks is None:  # where the source keeps its finished blocks: in the model, or in files
            blocks = [lambda i=i: result.source.block_tensors(i) for i in range(len(result.source))]
    if record is None:
        stored = getattr(model.config, "svdllm", None)
        if not isinstance(stored, dict):
            raise FormatError("the model has no svdllm record: save what compress returned")
        record = SvdllmRecord.from_dict(stored, "the model's config")
    out = check_out_dir(path, force)
    target = DTYPES[dtype] if isinstance(dtype, str) else dtype
    prefix, in_memory = decoder_blocks(model)
    if blocks is None:
        blocks = [lambda i=i: {f"{prefix}.{i}.{k}": v.detach().cpu() for k, v in in_memory[i].state_dict().items()}
                  for i in range(len(in_memory))]
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_siblings(out)
    tmp = _marked_folder(out, "tmp")
    try:
        shards = _write_shards(tmp, model, blocks, target)
        _write_parts(tmp, model, tokenizer, record.for_writing(shards), target, report, write_extra)
        _seal(tmp, shards)
        if out.exists():  # the old folder waits inside a marked one until the new one is in place
            old = _marked_folder(out, "old")
            os.replace(out, old / "previous")
            os.replace(tmp, out)
            shutil.rmtree(old)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def check_not_quantized(model: str) -> None:
    """A folder whose factors or weights are already quantized cannot be compressed (its integer tensors are no
    weights to factorise)."""
    where = Path(model).expanduser()
    if where.is_dir() and is_svdllm_folder(where) and read_record(where).quantization:
        raise OptionError("model", f"{model} is already quantized; compress the folder it was quantized from")


def cast_parameters(model: Any, dtype: str) -> None:
    """The parameters in ``dtype``; buffers (RoPE frequencies) keep float32, as a load of the saved folder gives them."""
    for param in model.parameters():
        param.data = param.data.to(DTYPES[dtype])


def _write_parts(tmp: Path, model: Any, tokenizer: Any, final: SvdllmRecord, target: torch.dtype | None,
                 report: Any, write_extra: Callable[[Path], None] | None) -> None:
    """Everything but the shards: config (with the record and the auto_map), tokenizer, runtime, card, report."""
    model.config.save_pretrained(tmp)
    if getattr(model, "generation_config", None) is not None and model.can_generate():
        model.generation_config.save_pretrained(tmp)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    family = model.config.get_text_config(decoder=True).model_type
    for name, text in runtime_files(base_class(model), family, bool(final.quantization)).items():
        (tmp / name).write_text(text)
    cfg = json.loads((tmp / "config.json").read_text())
    if target is not None:
        cfg["dtype"] = str(target).removeprefix("torch.")
    cfg["architectures"] = [base_class(model).__name__]
    cfg["svdllm"] = final.to_dict()
    cfg["auto_map"] = {"AutoModelForCausalLM": f"{MODELING_FILE[:-3]}.SVDLLMForCausalLM"}
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    (tmp / "README.md").write_text(model_card(final))
    if report is not None:
        report.write(tmp / REPORT_FILE)
    if write_extra is not None:
        write_extra(tmp)


def _seal(tmp: Path, shards: dict[str, str]) -> None:
    """Permissions for sharing (the temporary folder was private), the marker out, the manifest in."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)
    for f in tmp.iterdir():
        os.chmod(f, 0o666 & ~umask)
    (tmp / PARTIAL_MARKER).unlink()
    manifest = {"files": {f.name: shards.get(f.name) or sha256_file(f) for f in sorted(tmp.iterdir())}}
    (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
    os.chmod(tmp / MANIFEST_FILE, 0o666 & ~umask)


# ---------------------------------------------------------------- reading


def _config(folder: Path) -> dict[str, Any]:
    cfg_file = folder / "config.json"
    if not cfg_file.is_file():
        raise FormatError(f"{folder} is not a model folder (no config.json)")
    try:
        cfg = json.loads(cfg_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise FormatError(f"{cfg_file} is not valid JSON ({getattr(exc, 'msg', exc)})") from None
    if not isinstance(cfg, dict):
        raise FormatError(f"{cfg_file} is not a JSON object")
    return cfg


def is_svdllm_folder(folder: Path) -> bool:
    try:
        return "svdllm" in _config(folder)
    except FormatError:
        return False


def read_record(path: str | os.PathLike) -> SvdllmRecord:
    """The validated svdllm record of a saved folder; raises FormatError naming the problem."""
    folder = Path(path)
    return SvdllmRecord.from_dict(_config(folder).get("svdllm"), str(folder / "config.json"))


@dataclass
class FolderInfo:
    record: SvdllmRecord
    dense_shapes: dict[str, list[int]]  # every low-rank linear → [out, in]
    tensor_bytes: int  # bytes of tensor data in the shards
    files: int = 0  # files checked against the manifest
    code: str = ""  # how the folder's Python files compare with this svdllm's runtime


_DTYPE_BYTES = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2, "U16": 2,
                "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


def verify(path: str | os.PathLike) -> FolderInfo:
    """Check every shard (present, intact, sha256), every factor shape against the recorded ranks, every file against
    the manifest, and the folder's code against the runtime this svdllm writes."""
    folder = Path(path)
    record = read_record(folder)
    if not record.shards:
        raise FormatError(f"{folder}: the svdllm section lists no weight shards")
    shapes: dict[str, tuple[int, ...]] = {}
    tensor_bytes = 0
    for name, digest in record.shards.items():
        if Path(name).name != name or not name.endswith(".safetensors"):
            raise FormatError(f"{folder}: shard name {name!r} is not a .safetensors file inside the folder")
        shard = folder / name
        if not shard.is_file():
            raise FormatError(f"{folder}: weight shard {name} is missing")
        if sha256_file(shard) != digest:
            raise FormatError(f"{folder}: weight shard {name} is corrupt or truncated (sha256 mismatch)")
        try:
            with safe_open(str(shard), framework="pt") as fh:
                for key in fh.keys():
                    tensor = fh.get_slice(key)
                    shapes[key] = tuple(tensor.get_shape())
                    tensor_bytes += math.prod(shapes[key]) * _DTYPE_BYTES[tensor.get_dtype()]
        except SafetensorError as exc:
            raise FormatError(f"{folder}: weight shard {name} is unreadable ({exc})") from None
    quantized = _check_quantized(folder, record, shapes)
    shape = lambda linear: tuple(quantized[linear]["shape"]) if linear in quantized else shapes.get(f"{linear}.weight")  # noqa: E731
    for module, rank in record.ranks.items():
        u, v = shape(f"{module}.svd_u"), shape(f"{module}.svd_v")
        if u is None or v is None:
            raise FormatError(f"{folder}: factors of {module} are missing from the shards")
        if u[1] != rank or v[0] != rank:
            raise FormatError(f"{folder}: {module} has factors {list(u)} and {list(v)} but config records rank {rank}")
    dense = {m: [shape(f"{m}.svd_u")[0], shape(f"{m}.svd_v")[1]] for m in record.ranks}
    files = _check_manifest(folder, record.shards)
    return FolderInfo(record, dense, tensor_bytes, files, _check_code(folder, record))


def _check_manifest(folder: Path, hashed: dict[str, str] | None = None) -> int:
    """Every file of the folder is one the manifest lists, with its sha256, and every listed file is there: the
    number of files.  Code appended to a runtime file, or a file added, is refused here.  ``hashed``: files whose
    sha256 the caller has already checked (the shards), not read again when the manifest records the same."""
    try:
        files = json.loads((folder / MANIFEST_FILE).read_text(encoding="utf-8"))["files"]
    except FileNotFoundError:
        raise FormatError(f"{folder}: no {MANIFEST_FILE}; a folder svdllm saved has one (written last)") from None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise FormatError(f"{folder}: {MANIFEST_FILE} is damaged ({type(exc).__name__})") from None
    if not isinstance(files, dict) or not all(isinstance(v, str) for v in files.values()):
        raise FormatError(f"{folder}: {MANIFEST_FILE} is damaged (its files are not name → sha256)")
    extra = sorted({p.name for p in folder.iterdir()} - {MANIFEST_FILE} - set(files))
    if extra:
        raise FormatError(f"{folder}: {extra[0]} is not in {MANIFEST_FILE}: svdllm did not write it")
    for name, digest in sorted(files.items()):
        path = folder / name
        if Path(name).name != name or not path.is_file() or path.is_symlink():
            raise FormatError(f"{folder}: {name}, listed in {MANIFEST_FILE}, is missing or not a plain file")
        if (hashed or {}).get(name) != digest and sha256_file(path) != digest:
            raise FormatError(f"{folder}: {name} was changed after svdllm wrote it (sha256 differs from "
                              f"{MANIFEST_FILE})")
    return len(files)


def _check_code(folder: Path, record: SvdllmRecord) -> str:
    """The folder's Python files against the runtime this svdllm writes for it: identical (said), or, written by
    another svdllm version, not comparable (said); different code from this version is refused."""
    from ._version import __version__

    code = sorted(p.name for p in folder.glob("*.py"))
    if record.svdllm_version != __version__:
        return (f"{len(code)} Python files written by svdllm {record.svdllm_version}, not compared with this "
                f"svdllm's ({__version__}) runtime")
    cfg = _config(folder)
    base = causal_lm_class(cfg.get("architectures"), folder)
    try:
        family = transformers.CONFIG_MAPPING[cfg["model_type"]].from_dict(cfg).get_text_config(decoder=True).model_type
    except (KeyError, TypeError, ValueError):
        raise FormatError(f"{folder}: config.json's model_type {cfg.get('model_type')!r} is not one transformers "
                          "knows") from None
    expected = runtime_files(base, family, bool(record.quantization))
    for name in code:
        if name not in expected or (folder / name).read_text(encoding="utf-8", errors="replace") != expected[name]:
            raise FormatError(f"{folder}: {name} is not the code svdllm {__version__} writes; do not load this folder "
                              "with trust_remote_code")
    missing = sorted(set(expected) - set(code))
    if missing:
        raise FormatError(f"{folder}: {missing[0]} is missing")
    return f"{len(code)} Python files identical to svdllm {__version__}'s runtime"


QUANTIZED_DTYPES = tuple(DTYPES)


def quantized_tensor_shapes(spec: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """The tensors optimum-quanto stores for one quantized weight (suffixes after ``weight.``) and their shapes:
    int8 data and one scale per row; int4 (int2) data packed two (four) per byte along rows of (out, in), or of
    (out·in/group, group), with a scale and a shift per such row."""
    out_f, in_f = spec["shape"]
    if spec["weights"] == "qint8":
        return {"_data": (out_f, in_f), "_scale": (out_f, 1)}
    per_byte = {"qint4": 2, "qint2": 4}[spec["weights"]]
    group = spec.get("group_size")
    if group is not None and (type(group) is not int or group < 1 or (out_f * in_f) % group):
        raise ValueError(f"group size {group!r}")
    rows, cols = (out_f * in_f // group, group) if group else (out_f, in_f)
    return {"_data._data": (-(-rows // per_byte), cols), "_scale": (rows, 1), "_shift": (rows, 1)}


def _check_quantized(folder: Path, record: SvdllmRecord, shapes: dict[str, tuple[int, ...]]) -> dict[str, Any]:
    """The quantized linears of the record, each checked against the tensors in the shards."""
    quantization = record.quantization
    if not quantization:
        return {}
    modules = quantization.get("modules")
    if not isinstance(modules, dict) or not modules:
        raise FormatError(f"{folder}: the svdllm section's quantization lists no modules")
    if quantization.get("dtype") not in QUANTIZED_DTYPES:
        raise FormatError(f"{folder}: the svdllm section's quantization dtype {quantization.get('dtype')!r} is not one "
                          f"of {', '.join(QUANTIZED_DTYPES)}")
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
        raise FormatError(f"{folder}: config.json's architectures {architectures!r} is not a transformers causal-LM class")
    return cls


def load(path: str | os.PathLike, dtype: str | torch.dtype | None = None, device: str | None = None,
         device_map: Any = None, latent_cache: bool = False) -> nn.Module:
    """Rebuild a saved svdllm model from config.json and safetensors alone (ranks from the record; svdllm's own
    runtime, never the folder's code).  With ``latent_cache`` its ``generate`` keeps the latents of low-rank
    k_proj/v_proj in the KV cache by default."""
    folder = Path(path)
    record = verify(folder).record
    base = causal_lm_class(_config(folder).get("architectures"), folder)
    kwargs: dict[str, Any] = {"dtype": "auto"}  # the saved dtype unless asked otherwise
    if dtype is not None:
        kwargs["dtype"] = DTYPES.get(dtype, dtype) if isinstance(dtype, str) else dtype
    saved = (record.quantization or {}).get("dtype")
    if saved and kwargs["dtype"] not in ("auto", DTYPES[saved]):
        raise OptionError("dtype", f"{folder} has quantized factors, which load in their saved dtype {saved}, not "
                          f"{kwargs['dtype']}")
    if device_map is not None:
        kwargs["device_map"] = device_map
    try:  # any other ValueError from here is a bug, not the folder's: verify has checked every file
        model = model_class(base).from_pretrained(folder, **kwargs)
    except WeightsMismatch as exc:
        raise FormatError(f"{folder}: {exc}") from None
    except ImportError as exc:  # a quantized model without its library
        raise FormatError(f"{folder}: {exc}") from None
    if device:
        model.to(device)
    model.latent_cache_default = latent_cache
    return model.eval()
