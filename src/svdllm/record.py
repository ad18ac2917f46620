"""The saved folder's record: the ``svdllm`` section of config.json, one typed object.

``compress`` makes one; ``finetune`` and ``quantize`` return their parts, which the workflow adds; the writer
(``folder.save``) adds the shards' checksums and writes it; the reader (``SvdllmRecord.from_dict``) validates it.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from ._version import __version__
from .errors import FormatError

FORMAT_VERSION = 2  # 2: quantized factors (written only for quantized models; others stay version 1)


@dataclass(frozen=True)
class SvdllmRecord:
    ranks: dict[str, int]  # every low-rank linear of the model → its rank (a rank left out would reload at random)
    method: str = "none"
    options: dict[str, Any] = field(default_factory=dict)  # the method's options
    ratio: float = 0.0
    rank_rule: str = "uniform"
    calibration: dict[str, Any] | None = None  # nsamples, seqlen, sha256, data, seed, bos
    perplexity: dict[str, float] | None = None  # of the saved model, by evaluation set
    finetune: dict[str, Any] | None = None  # FinetuneConfig and per-stage results
    quantization: dict[str, Any] | None = None  # library, bits, dtype and {linear: type, group, shape}
    zero_shot: dict[str, float] | None = None  # "task metric" → value
    shards: dict[str, str] = field(default_factory=dict)  # file → sha256, set by the writer
    svdllm_version: str = __version__
    format_version: int = 1

    def with_parts(self, **parts: Any) -> "SvdllmRecord":
        return replace(self, **parts)

    def for_writing(self, shards: dict[str, str]) -> "SvdllmRecord":
        """The record as the writer stores it: this svdllm's version, the format it needs, the shards' digests."""
        return replace(self, shards=shards, svdllm_version=__version__, format_version=2 if self.quantization else 1)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Any, where: str = "config.json") -> "SvdllmRecord":
        """Validate a stored section; raises FormatError naming what is wrong."""
        if not isinstance(data, dict) or "ranks" not in data:
            raise FormatError(f"{where} has no svdllm section: not an svdllm model")
        version = data.get("format_version")
        if isinstance(version, bool) or not isinstance(version, int) or version < 1:
            raise FormatError(f"{where}: svdllm format_version must be a whole number ≥ 1, got {version!r}")
        if version > FORMAT_VERSION:
            raise FormatError(f"{where} uses svdllm format version {version}; this svdllm ({__version__}) reads up to "
                              f"{FORMAT_VERSION}: upgrade svdllm")
        ranks, shards = data.get("ranks"), data.get("shards", {})
        if not isinstance(ranks, dict) or not all(isinstance(k, str) and type(v) is int and v > 0
                                                  for k, v in ranks.items()):
            raise FormatError(f"{where}: the svdllm section's ranks must map module names to positive whole numbers")
        if not isinstance(shards, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in shards.items()):
            raise FormatError(f"{where}: the svdllm section's shards must map file names to sha256 digests")
        for name in ("options", "calibration", "perplexity", "finetune", "quantization", "zero_shot"):
            if data.get(name) is not None and not isinstance(data[name], dict):
                raise FormatError(f"{where}: the svdllm section's {name} must be an object")
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})
