"""svdllm: compress Hugging Face LLMs with SVD-LLM and beyond.

>>> import svdllm
>>> options = svdllm.CompressOptions(model="smollm2-135m", out="out/smol-40",
...                                  compression=svdllm.CompressionConfig(ratio=0.4))
>>> options.compression.ratio, options.compression.method.name
(0.4, 'svdllm-ec')
>>> options.out_dir()
PosixPath('out/smol-40')

``svdllm.run_compression(options)`` then compresses, evaluates and saves; ``svdllm.load("out/smol-40")`` loads it.
"""
from __future__ import annotations

from ._version import __version__
from .commands import (BenchOptions, EvalOptions, EvalTexts, FinetuneOptions, GenerateOptions, QuantizeFolderOptions,
                       run_bench, run_eval, run_finetune, run_generate, run_quantize)
from .data import eval_windows, sample_windows
from .errors import DataError, FormatError, OptionError, SvdllmError
from .evaluate import evaluate_perplexity
from .folder import load, read_record, save, verify
from .pipeline import CompressionConfig, CompressionReport, CompressionResult, compress
from .plan import CompressionPlan, make_plan
from .quantize import QuantizeOptions
from .record import SvdllmRecord
from .refine import RefineOptions
from .source import ModelSource, StreamedSource, load_model, open_source
from .workflow import PRESETS, CompressOptions, CompressOutcome, preset, run_compression

__all__ = ["BenchOptions", "EvalOptions", "EvalTexts", "FinetuneOptions", "GenerateOptions", "QuantizeFolderOptions",
           "QuantizeOptions", "run_bench", "run_eval", "run_finetune", "run_generate", "run_quantize",
           "CompressOptions", "CompressOutcome", "CompressionConfig", "CompressionPlan", "CompressionReport",
           "CompressionResult", "DataError", "FormatError", "ModelSource", "OptionError", "StreamedSource",
           "SvdllmError", "SvdllmRecord", "compress", "eval_windows", "evaluate_perplexity", "load", "load_model",
           "make_plan", "open_source", "read_record", "run_compression", "sample_windows", "save", "verify",
           "PRESETS", "RefineOptions", "preset", "__version__"]
