"""Give MKL's cached workspace back between factorisations.

MKL keeps the buffers of each thread's last LAPACK calls for reuse. With two threads and 8 calibration windows that
cache made the streamed run's peak on SmolLM2 about 110 MiB higher than with one (329 against 217 MiB over the import
baseline; 223 MiB with two threads once released after each matrix: `benchmarks/results/memory/threads.md`).  The
excess left with 32 windows was glibc's heap, not MKL's cache (same file; ``source.return_freed_memory``).
"""
from __future__ import annotations

import ctypes
import functools
from pathlib import Path
from typing import Callable

import torch


@functools.cache
def _mkl_free_buffers() -> Callable[[], None] | None:
    """MKL's ``mkl_free_buffers`` as linked into torch, or None (a build without MKL, or one that hides it)."""
    if not torch.backends.mkl.is_available():
        return None
    for lib in sorted((Path(torch.__file__).parent / "lib").glob("libtorch_cpu.*")):
        try:
            fn = ctypes.CDLL(str(lib)).mkl_serv_free_buffers
        except (OSError, AttributeError):
            continue
        fn.argtypes, fn.restype = [], None
        return fn
    return None


def release_workspace() -> None:
    """Free the BLAS/LAPACK buffers cached by every thread (a no-op where that is not possible)."""
    fn = _mkl_free_buffers()
    if fn is not None:
        fn()
