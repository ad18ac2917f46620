"""svdllm: compress Hugging Face LLMs with SVD-LLM and beyond."""
from __future__ import annotations

__version__ = "0.6.0"

from .calibration import eval_windows, sample_windows  # noqa: E402
from .evaluate import evaluate_perplexity  # noqa: E402
from .io import load, load_model, save  # noqa: E402
from .pipeline import CompressionConfig, CompressionReport, compress  # noqa: E402
from .plan import CompressionPlan, make_plan  # noqa: E402

__all__ = ["CompressionConfig", "CompressionPlan", "CompressionReport", "compress", "eval_windows",
           "evaluate_perplexity", "load", "load_model", "make_plan", "sample_windows", "save", "__version__"]
