"""Save and load compressed models: sharded safetensors, factors kept as factors, no pickle.

A saved folder is an ordinary Hugging Face folder plus a ``svdllm`` section in
config.json (ranks, method, shard checksums) and ``modeling_svdllm.py``, so
``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`` works
without svdllm installed.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
import transformers
from safetensors import SafetensorError, safe_open
from torch import nn

from . import __version__
from .assets import sha256_file as _sha256
from .modeling_svdllm import svdllm_class

FORMAT_VERSION = 1
MODELING_FILE = "modeling_svdllm.py"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class FormatError(ValueError):
    """The folder is not a loadable svdllm model."""


def check_out_dir(path: str | os.PathLike, force: bool) -> Path:
    """Refuse to overwrite a non-empty folder unless asked; refuse a file in the way."""
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--out {out} exists and is a file")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise FileExistsError(f"--out {out} exists and is not empty; pass --force to replace it")
    return out


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
        lines += [f"Calibration: {c['nsamples']}×{c['seqlen']} tokens of `{c['data']}`, seed {section.get('seed')}.", ""]
    if perplexity:
        lines += ["| data | perplexity |", "|---|---|"] + [f"| {k} | {v:.3f} |" for k, v in perplexity.items()] + [""]
    return "\n".join(lines)


def _cast_state(state: dict[str, torch.Tensor], dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """Cast floating tensors, keeping tied tensors (embeddings / lm_head) one shared tensor."""
    if dtype is None:
        return state
    done: dict[tuple, torch.Tensor] = {}
    out = {}
    for k, v in state.items():
        key = (v.data_ptr(), tuple(v.shape), v.dtype)
        if key not in done:
            done[key] = v.to(dtype) if v.is_floating_point() else v
        out[k] = done[key]
    return out


def save(
    model: nn.Module,
    tokenizer: Any,
    path: str | os.PathLike,
    dtype: str | torch.dtype | None = None,
    force: bool = False,
    perplexity: dict[str, float] | None = None,
    max_shard_size: str = "2GB",
) -> Path:
    """Write ``model`` (compressed by svdllm) to ``path`` atomically: a temp folder renamed when complete."""
    out = check_out_dir(path, force)
    section = getattr(model.config, "svdllm", None)
    if not section:
        raise FormatError("model has no svdllm section: compress it first")
    target = DTYPES[dtype] if isinstance(dtype, str) else dtype
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    try:
        state = _cast_state(model.state_dict(), target)
        model.save_pretrained(tmp, state_dict=state, max_shard_size=max_shard_size)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        (tmp / MODELING_FILE).write_text(_modeling_source(model))
        cfg_path = tmp / "config.json"
        cfg = json.loads(cfg_path.read_text())
        if target is not None:
            cfg["dtype"] = str(target).removeprefix("torch.")
        cfg["architectures"] = [base_class(model).__name__]
        shards = sorted(p.name for p in tmp.glob("*.safetensors"))
        cfg["svdllm"] = dict(section, format_version=FORMAT_VERSION, svdllm_version=__version__,
                             perplexity=perplexity or section.get("perplexity"),
                             shards={s: _sha256(tmp / s) for s in shards})
        cfg["auto_map"] = {"AutoModelForCausalLM": f"{MODELING_FILE[:-3]}.SVDLLMForCausalLM"}
        cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        (tmp / "README.md").write_text(model_card(cfg["svdllm"], perplexity))
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


def read_section(path: str | os.PathLike) -> dict[str, Any]:
    """The validated svdllm section of a saved folder; raises FormatError naming the problem."""
    folder = Path(path)
    cfg_file = folder / "config.json"
    if not cfg_file.is_file():
        raise FormatError(f"{folder} is not a model folder (no config.json)")
    try:
        cfg = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as exc:
        raise FormatError(f"{cfg_file} is not valid JSON ({exc.msg})") from None
    section = cfg.get("svdllm")
    if not isinstance(section, dict) or "ranks" not in section:
        raise FormatError(f"{folder} is not an svdllm model (config.json has no svdllm section)")
    version = section.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise FormatError(
            f"{folder} uses svdllm format version {version}; this svdllm ({__version__}) reads up to {FORMAT_VERSION}: upgrade svdllm"
        )
    return section


def verify(path: str | os.PathLike) -> dict[str, Any]:
    """Check every shard (present, intact, sha256) and every factor shape against the recorded ranks."""
    folder = Path(path)
    section = read_section(folder)
    shards = section.get("shards") or {}
    if not shards:
        raise FormatError(f"{folder}: the svdllm section lists no weight shards")
    shapes: dict[str, tuple[int, ...]] = {}
    for name, digest in shards.items():
        shard = folder / name
        if not shard.is_file():
            raise FormatError(f"{folder}: weight shard {name} is missing")
        if _sha256(shard) != digest:
            raise FormatError(f"{folder}: weight shard {name} is corrupt or truncated (sha256 mismatch)")
        try:
            with safe_open(str(shard), framework="pt") as fh:
                for key in fh.keys():
                    shapes[key] = tuple(fh.get_slice(key).get_shape())
        except SafetensorError as exc:
            raise FormatError(f"{folder}: weight shard {name} is unreadable ({exc})") from None
    for module, rank in section["ranks"].items():
        u, v = shapes.get(f"{module}.svd_u.weight"), shapes.get(f"{module}.svd_v.weight")
        if u is None or v is None:
            raise FormatError(f"{folder}: factors of {module} are missing from the shards")
        if u[1] != rank or v[0] != rank:
            raise FormatError(
                f"{folder}: {module} has factors {list(u)} and {list(v)} but config records rank {rank}"
            )
    return section


def load(
    path: str | os.PathLike,
    dtype: str | torch.dtype | None = None,
    device: str | None = None,
    device_map: Any = None,
) -> nn.Module:
    """Rebuild a saved svdllm model from config.json and safetensors alone (ranks from config)."""
    folder = Path(path)
    verify(folder)
    cfg = json.loads((folder / "config.json").read_text())
    arch = (cfg.get("architectures") or [None])[0]
    base = getattr(transformers, arch, None) if arch else None
    if base is None:
        raise FormatError(f"{folder}: unknown architecture {arch!r} in config.json")
    kwargs: dict[str, Any] = {"dtype": "auto"}  # the saved dtype unless asked otherwise
    if dtype is not None:
        kwargs["dtype"] = DTYPES.get(dtype, dtype) if isinstance(dtype, str) else dtype
    if device_map is not None:
        kwargs["device_map"] = device_map
    model = svdllm_class(base).from_pretrained(folder, **kwargs)
    if device:
        model.to(device)
    return model.eval()
