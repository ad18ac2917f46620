"""What a compression run is asked (``CompressionConfig``) and what it reports (``CompressionReport``): plain data."""
from __future__ import annotations

import json
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

from .cache import OFFLOAD
from .errors import OptionError
from .files import atomic_write_text
from .methods import ErrorCorrectedOptions, MethodOptions, options_for
from .methods.base import check_range
from .ranks import check_ratio
from .refine import RefineOptions

RANK_RULES = ("auto", "uniform", "fisher")


@dataclass
class CompressionConfig:
    method: MethodOptions | str = field(default_factory=ErrorCorrectedOptions)  # a name takes that method's defaults
    ratio: float = 0.2  # parameter reduction of each compressed matrix
    targets: list[str] = field(default_factory=lambda: ["*"])  # globs over module names (full, or inside the block)
    skip_layers: list[int] = field(default_factory=list)  # blocks left dense; negative indices count from the end
    rank_rule: str = "auto"  # auto, uniform (the paper), or fisher (allocated from the model's statistics)
    rank_floor: float = 0.5  # allocated ranks stay within [floor, cap] × the uniform rank
    rank_cap: float = 2.0
    batch_size: int | None = None  # windows per forward; None: the source's (4 in memory, 1 streamed)
    device: str | None = None  # where blocks run (one at a time); None: where the model is
    offload: str = "auto"  # where every pass's activations wait: none (the device), cpu, disk; auto: the source's
    true_sequential: bool = True  # sequential methods: fit q/k/v, o, gate/up, down in turn on the X′ the earlier produce
    refine: RefineOptions = field(default_factory=RefineOptions)  # each block's factors fitted to the dense block's output

    def __post_init__(self) -> None:
        if isinstance(self.method, str):
            self.method = options_for(self.method)
        if not isinstance(self.method, MethodOptions):
            raise OptionError("method", f"must be a method name or its options, got {type(self.method).__name__}")

    def validate(self) -> None:
        check_ratio(self.ratio)
        if isinstance(self.targets, (str, bytes)) or not isinstance(self.targets, (list, tuple)) or not self.targets \
                or not all(isinstance(p, str) and p.strip() for p in self.targets):
            raise OptionError("targets", f"must be a non-empty list of non-empty glob patterns, got {self.targets!r}")
        if self.batch_size is not None and self.batch_size < 1:
            raise OptionError("batch_size", f"must be positive, got {self.batch_size}")
        if self.rank_rule not in RANK_RULES:
            raise OptionError("rank_rule", f"must be one of {', '.join(RANK_RULES)}, got {self.rank_rule!r}")
        check_range(self, "rank_floor", 0.0, 1.0)
        check_range(self, "rank_cap", 1.0, 1e6)
        if self.offload not in OFFLOAD:
            raise OptionError("offload", f"must be one of {', '.join(OFFLOAD)}, got {self.offload!r}")
        if not isinstance(self.refine, RefineOptions):
            raise OptionError("refine", f"must be RefineOptions, got {type(self.refine).__name__}")
        self.refine.validate()
        self.method.validate()  # type: ignore[union-attr]

    def resolved_rank_rule(self) -> str:
        """What ``auto`` means, decided here only: Fisher-weighted allocation for svdllm-ec (it beat uniform ranks at
        0.2, 0.4 and 0.6 on both evaluation sets; svdllm-w lost at 0.6), the paper's uniform ranks otherwise."""
        if self.rank_rule != "auto":
            return self.rank_rule
        return "fisher" if isinstance(self.method, ErrorCorrectedOptions) else "uniform"

    def to_dict(self) -> dict[str, Any]:
        return dict(asdict(self), method=self.method.to_dict())  # type: ignore[union-attr]


class Timings(dict):
    """Seconds per named phase, summed over repeats, in first-seen order."""

    @contextmanager
    def clock(self, phase: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self[phase] = self.get(phase, 0.0) + time.perf_counter() - t0


@dataclass
class CompressionReport:
    config: dict[str, Any]
    plan: dict[str, Any]
    calibration: dict[str, Any]
    params_before: int = 0
    params_after: int = 0
    linear_params_before: int = 0
    linear_params_after: int = 0
    records: list[dict[str, Any]] = field(default_factory=list)
    perplexity: dict[str, dict[str, float]] = field(default_factory=dict)  # dense, compressed, finetuned, quantized
    timings: Timings = field(default_factory=Timings)
    processes: dict[str, Any] = field(default_factory=dict)  # world size and each rank's timings (torchrun)
    zero_shot: dict[str, Any] = field(default_factory=dict)  # lm-eval rows (task, metric, value, stderr), dense and after
    passes: list[dict[str, Any]] = field(default_factory=list)  # the plan's stages: what each made, from what
    refinement: list[dict[str, Any]] = field(default_factory=list)  # per refined block: held-out error, outcome

    @property
    def remedies(self) -> list[dict[str, Any]]:
        return [r for r in self.records if r.get("remedy")]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def account(self, record: dict[str, Any]) -> None:
        """Add one linear's record and its parameters before and after."""
        (m, n), k = record["shape"], record["rank"]
        self.linear_params_before += m * n
        self.linear_params_after += m * n if k is None else k * (m + n)
        if k is None:
            record["kept_dense"] = self.plan["kept_dense"][record["name"]]
        self.records.append(record)

    def write(self, path: str | Path) -> None:
        atomic_write_text(Path(path), json.dumps(self.to_dict(), indent=2) + "\n")
