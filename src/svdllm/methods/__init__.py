"""Compression methods: one options dataclass each, its factoriser registered by options type."""
from __future__ import annotations

from .base import METHODS, Method, MethodOptions, method_of, options_for
from .baselines import ASVDOptions, FWSVDOptions, SVDOptions
from .svdllm import ErrorCorrectedOptions, OutputAwareOptions, SVDLLMOptions, WhiteningOptions

__all__ = ["METHODS", "Method", "MethodOptions", "method_of", "options_for", "SVDOptions",
           "FWSVDOptions", "ASVDOptions", "OutputAwareOptions", "WhiteningOptions", "SVDLLMOptions",
           "ErrorCorrectedOptions"]
