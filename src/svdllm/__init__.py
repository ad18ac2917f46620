"""svdllm: compress Hugging Face LLMs with SVD-LLM and beyond."""
from __future__ import annotations

__version__ = "0.1.0"

from .config import CompressionConfig  # noqa: E402
from .evaluate import evaluate_perplexity  # noqa: E402
from .io import load, save  # noqa: E402
from .pipeline import compress  # noqa: E402

__all__ = ["CompressionConfig", "compress", "evaluate_perplexity", "load", "save", "__version__"]
