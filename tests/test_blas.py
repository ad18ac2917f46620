"""Releasing MKL's cached workspace between factorisations leaves every later factorisation exact."""
import pytest
import torch

from svdllm.blas import _mkl_free_buffers, release_workspace


@pytest.mark.skipif(not torch.backends.mkl.is_available(), reason="torch built without MKL")
def test_mkl_workspace_release_is_found_and_factorisations_stay_exact() -> None:
    assert _mkl_free_buffers() is not None  # the symbol torch links MKL with; a rename would silently disable it
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(300, 200, dtype=torch.float64, generator=gen)
    for _ in range(3):
        u, s, vh = torch.linalg.svd(a, full_matrices=False)
        release_workspace()
        assert torch.allclose((u * s) @ vh, a, atol=1e-10)
        chol = torch.linalg.cholesky(a.T @ a)
        release_workspace()
        assert torch.allclose(chol @ chol.T, a.T @ a, atol=1e-8)
