"""CompressionConfig: every knob of a compression run, validated up front."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from .methods import METHODS


@dataclass
class CompressionConfig:
    ratio: float = 0.2  # parameter reduction of each compressed matrix
    method: str = "svdllm-ec"
    calib: str = "wiki-train"  # any DATA accepted by svdllm.data.load_text
    nsamples: int = 32
    seqlen: int = 512
    seed: int = 0
    targets: str = "*"  # comma-separated globs over module names
    skip_layers: str = ""  # e.g. "0,29" or "0-2"
    beta: float | str = 0.25  # svdllm-ec: blend of dense (1) and compressed (0) inputs; "auto" picks per matrix
    beta_grid: tuple[float, ...] = (0.0, 0.25, 0.5)  # candidates for beta="auto"
    holdout: float = 0.25  # beta="auto": fraction of calibration windows held out to choose β
    ec_norm_cap: float | None = 1.5  # svdllm-ec: halve β for a matrix while ‖W′‖ > cap·‖W‖ (None: off)
    ec_damp: float = 1e-4  # svdllm-ec: ridge on X′X′ᵀ, relative to its mean diagonal
    damp: float = 0.0  # whitening ridge added before Cholesky (0 = only when needed)
    update_damp: float = 1e-6  # ridge of the closed-form update's normal equations
    asvd_alpha: float = 0.5
    batch_size: int = 4  # calibration windows per forward
    device: str | None = None  # None: the model's device
    offload: bool = False  # keep calibration activations on CPU when the model is on GPU
    extra: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> None:
        if not 0.0 < self.ratio < 1.0:
            raise ValueError(f"--ratio must be in (0, 1), got {self.ratio}")
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; choose from {', '.join(METHODS)}")
        if self.nsamples < 1 or self.seqlen < 2 or self.batch_size < 1:
            raise ValueError("--nsamples, --seqlen and --batch-size must be positive")
        if self.beta != "auto" and not (isinstance(self.beta, (int, float)) and 0.0 <= self.beta <= 1.0):
            raise ValueError(f"--beta must be in [0, 1] or 'auto', got {self.beta}")
        if self.beta == "auto" and not 0.0 < self.holdout < 1.0:
            raise ValueError(f"--holdout must be in (0, 1), got {self.holdout}")
        if self.ec_norm_cap is not None and self.ec_norm_cap <= 0:
            raise ValueError(f"--norm-cap must be positive (or 0 for off), got {self.ec_norm_cap}")
        if self.asvd_alpha < 0:
            raise ValueError("--asvd-alpha must be non-negative")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
