"""Math identities of the factorisations, on random matrices (float64)."""
from __future__ import annotations

import pytest
import torch

from svdllm.ranks import rank_for_ratio, worth_factorising
from svdllm.whitening import (
    cholesky_factor,
    output_error,
    scaled_svd,
    sigma_squared,
    target_error,
    truncate,
    update_left,
    whiten,
    whiten_towards,
)


def correlated(n: int, tokens: int, seed: int = 0) -> torch.Tensor:
    """Row-major activations (tokens × n) with strongly unequal, correlated directions."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(n, n, generator=g, dtype=torch.float64) * torch.logspace(0, -3, n, dtype=torch.float64)
    return torch.randn(tokens, n, generator=g, dtype=torch.float64) @ mix.T


@pytest.fixture
def problem() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(24, 16, generator=g, dtype=torch.float64), correlated(16, 200)


def test_loss_equals_discarded_singular_values(problem):
    w, x = problem
    gram = x.T @ x
    for k in (1, 5, 11):
        f = whiten(w, gram, k)
        direct = float(((w - f.u @ f.v) @ x.T).square().sum())
        assert direct == pytest.approx(f.discarded_energy, rel=1e-6)
        assert output_error(w, f.u, f.v, gram) == pytest.approx(direct, rel=1e-6)
        assert f.u.shape == (24, k) and f.v.shape == (k, 16)


def test_full_rank_gives_w_back(problem):
    w, x = problem
    f = whiten(w, x.T @ x, 16)
    torch.testing.assert_close(f.u @ f.v, w, rtol=1e-8, atol=1e-8)


def test_whitening_beats_plain_svd_on_correlated_inputs(problem):
    w, x = problem
    gram = x.T @ x
    for k in (2, 6, 10):
        white = output_error(w, *(lambda f: (f.u, f.v))(whiten(w, gram, k)), gram)
        plain_f = scaled_svd(w, k)
        plain = output_error(w, plain_f.u, plain_f.v, gram)
        assert white < plain * 0.9


def test_singular_gram_is_repaired_and_reported():
    x = correlated(8, 50)
    x[:, 3] = 0  # a dead input
    gram = x.T @ x
    s, remedy = cholesky_factor(gram)
    assert remedy and "damped" in remedy
    assert torch.isfinite(s).all()
    f = whiten(torch.randn(6, 8, dtype=torch.float64), gram, 3)
    assert torch.isfinite(f.u).all() and torch.isfinite(f.v).all() and f.remedy


def test_indefinite_gram_falls_back_to_eigen():
    g = torch.diag(torch.tensor([1.0, 1.0, -0.5], dtype=torch.float64))
    s, remedy = cholesky_factor(g)
    assert "eigenvalues clamped (1 of 3" in remedy
    assert torch.equal(s, s.tril())
    used = s @ s.T  # the clamped Gram: the positive part kept, the negative eigenvalue raised to the floor
    torch.testing.assert_close(used[:2, :2], g[:2, :2])
    assert 0 < float(used[2, 2]) < 1e-5


@pytest.mark.parametrize("kind", ["damped", "clamped"])
def test_loss_identity_holds_for_the_gram_actually_used(kind):
    """‖(W−W′)S‖² = Σ discarded σ² with S = chol of the repaired Gram; the record keeps both losses."""
    from svdllm.calibration import LayerStats
    from svdllm.methods import METHODS, WhiteningOptions

    x = correlated(10, 60, seed=3)
    x[:, 4] = 0  # dead input: the Cholesky fails, damping repairs it
    gram = x.T @ x
    if kind == "clamped":
        gram = gram - 1e3 * torch.eye(10, dtype=torch.float64)  # indefinite beyond any damping step
    w = torch.randn(7, 10, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    s, remedy = cholesky_factor(gram)
    assert remedy.startswith("damped" if kind == "damped" else "eigenvalues clamped")
    f, info = METHODS["svdllm-w"].factorize(w, LayerStats(tokens=60, gram=gram), 4, WhiteningOptions())
    assert f.remedy == remedy
    used = s @ s.T
    torch.testing.assert_close(output_error(w, f.u, f.v, used), f.discarded_energy, rtol=1e-8, atol=1e-10)
    assert info["loss_whitened"] == pytest.approx(f.discarded_energy / float((f.sigma**2).sum()), rel=1e-12)
    if kind == "damped":  # an indefinite Gram has no meaningful ‖WX‖² to divide by
        raw = output_error(w, f.u, f.v, gram) / float(torch.einsum("ij,jk,ik->", w, gram, w))
        assert info["loss"] == pytest.approx(raw, rel=1e-9) and info["loss"] != info["loss_whitened"]


def test_rank_formula():
    assert rank_for_ratio(4096, 4096, 0.2) == int(0.8 * 4096 * 4096 / 8192)
    assert rank_for_ratio(576, 1536, 0.4) == int(0.6 * 576 * 1536 / (576 + 1536))
    for r in (0.05, 0.5, 0.95):
        k = rank_for_ratio(300, 700, r)
        assert worth_factorising(300, 700, k)
        assert k * 1000 <= (1 - r) * 300 * 700 < (k + 1) * 1000
    assert not worth_factorising(10, 10, 5)
    with pytest.raises(ValueError):
        rank_for_ratio(10, 10, 1.0)


def test_closed_form_update_matches_lstsq_on_activations(problem):
    w, x = problem
    xc = x + 0.3 * correlated(16, 200, seed=7)  # inputs as produced by compressed earlier blocks
    f = whiten(w, x.T @ x, 6)
    u = update_left(w, f.v, xc.T @ xc, xc.T @ xc, damp=0.0)
    # direct least squares: minimise ||W X' - U (V X')|| over U
    a = (f.v @ xc.T).T  # tokens × k
    b = (w @ xc.T).T  # tokens × m
    direct = torch.linalg.lstsq(a, b).solution.T
    torch.testing.assert_close(u, direct, rtol=1e-6, atol=1e-8)
    # and it lowers the loss on the compressed stream
    gc = xc.T @ xc
    assert output_error(w, u, f.v, gc) < output_error(w, f.u, f.v, gc)


def test_error_corrected_reduces_to_whitening_when_streams_agree(problem):
    w, x = problem
    gram = x.T @ x
    a, b = whiten(w, gram, 5), whiten_towards(w, gram.clone(), gram, 5)
    torch.testing.assert_close(a.u @ a.v, b.u @ b.v, rtol=1e-6, atol=1e-7)  # cond(XXᵀ) ~ 1e12


@pytest.mark.parametrize("beta", [0.0, 0.25, 0.5, 1.0])
def test_error_corrected_is_optimal_for_its_target(problem, beta):
    """Never worse than SVD-LLM's update for the same target, and equal to brute-force rank-k regression."""
    w, x = problem
    xc = x + 0.3 * correlated(16, 200, seed=3)
    z = beta * x + (1 - beta) * xc
    gram, gc, cross, gz = x.T @ x, xc.T @ xc, z.T @ xc, z.T @ z
    k = 5
    ec = whiten_towards(w, cross, gc, k)
    ec_loss = target_error(w, ec.u @ ec.v, gz, cross, gc)
    paper = whiten(w, gram, k)
    paper_u = update_left(w, paper.v, cross, gc, damp=0.0)
    paper_loss = target_error(w, paper_u @ paper.v, gz, cross, gc)
    assert ec_loss <= paper_loss * (1 + 1e-9)
    direct = float((w @ z.T - ec.u @ ec.v @ xc.T).square().sum())
    assert ec_loss == pytest.approx(direct, rel=1e-6)
    # reduced-rank regression optimum: project the full least-squares fit onto its top-k output space
    full = torch.linalg.lstsq(xc, z @ w.T).solution.T
    fitted = full @ xc.T
    uu, _, _ = torch.linalg.svd(fitted, full_matrices=False)
    best = uu[:, :k] @ uu[:, :k].T @ full
    best_loss = float((w @ z.T - best @ xc.T).square().sum())
    assert ec_loss == pytest.approx(best_loss, rel=1e-6)


def test_scaled_svd_scales_fold_back(problem):
    w, _ = problem
    col = torch.rand(16, dtype=torch.float64) + 0.5
    row = torch.rand(24, dtype=torch.float64) + 0.5
    f = scaled_svd(w, 16, col_scale=col, row_scale=row)
    torch.testing.assert_close(f.u @ f.v, w, rtol=1e-8, atol=1e-8)
    # a uniform row scale (uniform Fisher) gives plain SVD
    a, b = scaled_svd(w, 4, row_scale=torch.full((24,), 3.0, dtype=torch.float64)), scaled_svd(w, 4)
    torch.testing.assert_close(a.u @ a.v, b.u @ b.v)


def test_ordering_svdllm_asvd_svd_on_correlated_inputs(problem):
    w, _ = problem
    x = correlated(16, 400, seed=5).abs() * torch.linspace(0.1, 3, 16, dtype=torch.float64)
    gram = x.T @ x
    k = 5

    def err(f):
        return output_error(w, f.u, f.v, gram)

    white = err(whiten(w, gram, k))
    asvd = err(scaled_svd(w, k, col_scale=x.abs().mean(0).sqrt()))
    plain = err(scaled_svd(w, k))
    assert white <= asvd <= plain


def test_norm_guard_stops_a_regression_from_blowing_up():
    """X′ nearly loses an input direction that X still has: the β=1 regression amplifies it; the guard halves β."""
    from svdllm.methods import ErrorCorrectedOptions
    from svdllm.calibration import LayerStats
    from svdllm.methods import METHODS

    g = torch.Generator().manual_seed(0)
    x = torch.randn(400, 8, generator=g, dtype=torch.float64)
    xc = x.clone()
    xc[:, 7] = 1e-3 * x[:, 7] + 1e-3 * torch.randn(400, generator=g, dtype=torch.float64)
    w = torch.randn(6, 8, generator=g, dtype=torch.float64)
    stats = LayerStats(tokens=400, comp_gram=xc.T @ xc, cross=x.T @ xc)
    ec = METHODS["svdllm-ec"].factorize
    free, info_free = ec(w, stats, 4, ErrorCorrectedOptions(beta=1.0, norm_cap=0, ec_damp=0.0, output_whitening=False))
    assert info_free["norm_ratio"] > 10 and info_free["beta"] == 1.0
    safe, info = ec(w, stats, 4, ErrorCorrectedOptions(beta=1.0, norm_cap=1.5, ec_damp=0.0, output_whitening=False))
    assert info["norm_ratio"] <= 1.5 and info["beta"] < 1.0 and info["beta_requested"] == 1.0
    assert float((safe.u @ safe.v).norm()) <= 1.5 * float(w.norm())


def test_the_guard_makes_the_output_factor_once_for_every_beta_it_tries(monkeypatch):
    """Two-sided, with the guard halving β: R is made once (C_g is let go before the first fit), and the factors
    are those of the fit at the β the guard settles on, made from C_g itself."""
    from svdllm import whitening
    from svdllm.calibration import LayerStats
    from svdllm.methods import METHODS, ErrorCorrectedOptions
    from svdllm.methods import svdllm as svdllm_methods

    g = torch.Generator().manual_seed(0)
    x = torch.randn(400, 8, generator=g, dtype=torch.float64)
    xc = x.clone()
    xc[:, 7] = 1e-3 * x[:, 7] + 1e-3 * torch.randn(400, generator=g, dtype=torch.float64)
    w = torch.randn(6, 8, generator=g, dtype=torch.float64)
    out_gram = _psd(6, g)
    made: list[int] = []
    real = whitening.output_factor
    counting = lambda *a: made.append(1) or real(*a)  # noqa: E731
    monkeypatch.setattr(whitening, "output_factor", counting)
    monkeypatch.setattr(svdllm_methods, "output_factor", counting, raising=False)
    opts = ErrorCorrectedOptions(beta=1.0, norm_cap=1.5, ec_damp=0.0, output_whitening=True)
    stats = LayerStats(tokens=400, comp_gram=xc.T @ xc, cross=x.T @ xc, out_gram=out_gram)
    f, info = METHODS["svdllm-ec"].factorize(w, stats, 4, opts)
    assert info["beta"] < 1.0 and made == [1]
    beta = info["beta"]
    want = whitening.whiten_towards(w, (beta * x + (1 - beta) * xc).T @ xc, xc.T @ xc, 4, 0.0, out_gram,
                                    opts.output_damp, opts.shrinkage(6, 400))
    torch.testing.assert_close(f.u @ f.v, want.u @ want.v, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("shape", [(70, 200), (200, 70), (64, 64)], ids=["wide", "tall", "square"])
def test_a_side_gram_made_to_its_diagonal_is_the_smaller_gram(shape):
    """The smaller of T·Tᵀ and Tᵀ·T, made a slab at a time up to the diagonal (slabs that do not divide it) and
    mirrored: the float64 product to rounding."""
    from svdllm.whitening import add_gram_, side_gram

    t = torch.randn(*shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    gram, wide = side_gram(t)
    want = t @ t.T if shape[0] <= shape[1] else t.T @ t
    assert wide == (shape[0] <= shape[1]) and gram.shape == want.shape
    torch.testing.assert_close(gram, want, rtol=1e-13, atol=1e-12)
    x = t.float()
    torch.testing.assert_close(add_gram_(torch.ones(shape[1], shape[1], dtype=torch.float64), x, 9),
                               1 + x.double().T @ x.double(), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_a_promoted_product_is_the_float64_product(dtype):
    """W·M with W cast a slab of rows at a time equals the product of W in float64, slab edges included."""
    from svdllm.whitening import outputs_of, promoted_product

    g = torch.Generator().manual_seed(0)
    w = torch.randn(11, 7, generator=g).to(dtype)
    m = torch.randn(7, 5, generator=g, dtype=torch.float64)
    torch.testing.assert_close(promoted_product(w, m, rows=4), w.double() @ m, rtol=1e-15, atol=1e-15)
    x = torch.randn(3, 7, generator=g)
    torch.testing.assert_close(outputs_of(x, w), x.double() @ w.double().T, rtol=1e-15, atol=1e-15)


# ---------------------------------------------------------------- output-aware (two-sided) whitening


def _psd(n: int, gen: torch.Generator, rank: int | None = None) -> torch.Tensor:
    a = torch.randn(n, rank or 2 * n, generator=gen, dtype=torch.float64)
    return a @ a.T


@pytest.mark.parametrize("diagonal", [False, True])
def test_two_sided_loss_identity(diagonal):
    """tr(ΔW·C_x·ΔWᵀ·C_g) of the factorised matrix equals the sum of the discarded two-sided σ², to 1e-6."""
    from svdllm.whitening import whiten

    gen = torch.Generator().manual_seed(3)
    m, n, k = 24, 16, 5
    w = torch.randn(m, n, generator=gen, dtype=torch.float64)
    cx = _psd(n, gen)
    cg = _psd(m, gen)
    cg = cg.diagonal().clone() if diagonal else cg
    f = whiten(w, cx, k, out_gram=cg, out_damp=0.0)
    delta = w - f.u @ f.v
    cg_full = torch.diag(cg) if diagonal else cg
    loss = float(torch.trace(delta @ cx @ delta.T @ cg_full))
    assert loss == pytest.approx(f.discarded_energy, rel=1e-6)
    assert not f.remedy
    # the one-sided factorisation is worse by this measure, the two-sided one better by the one-sided measure's loss
    one = whiten(w, cx, k)
    d1 = w - one.u @ one.v
    assert float(torch.trace(d1 @ cx @ d1.T @ cg_full)) >= loss


def test_identity_output_gram_is_one_sided_whitening():
    from svdllm.whitening import whiten

    gen = torch.Generator().manual_seed(4)
    w, cx = torch.randn(12, 10, generator=gen, dtype=torch.float64), _psd(10, gen)
    a, b = whiten(w, cx, 4), whiten(w, cx, 4, out_gram=torch.eye(12, dtype=torch.float64), out_damp=0.0)
    assert torch.allclose(a.u @ a.v, b.u @ b.v, atol=1e-10)


@pytest.mark.parametrize("case", ["zero", "singular", "nan", "zero-diagonal"])
def test_a_degenerate_output_gram_never_crashes(case):
    from svdllm.whitening import whiten

    gen = torch.Generator().manual_seed(5)
    w, cx = torch.randn(12, 10, generator=gen, dtype=torch.float64), _psd(10, gen)
    cg = {"zero": torch.zeros(12, 12, dtype=torch.float64), "singular": _psd(12, gen, rank=3),
          "nan": torch.full((12, 12), float("nan"), dtype=torch.float64),
          "zero-diagonal": torch.zeros(12, dtype=torch.float64)}[case]
    f = whiten(w, cx, 4, out_gram=cg, out_damp=0.0)
    assert torch.isfinite(f.u).all() and torch.isfinite(f.v).all()
    if case == "nan":
        assert "one-sided" in f.remedy
    else:
        assert f.remedy  # repaired, and said


@pytest.mark.parametrize("method", ["svdllm-w", "svdllm", "svdllm-ec"])
def test_output_whitening_end_to_end(method, make_model, calib_tokens):
    from svdllm import CompressionConfig, compress, sample_windows
    from svdllm.methods import options_for

    model = make_model("llama")
    opts = options_for(method, output_whitening=True)
    result = compress(model, sample_windows(calib_tokens, 8, 32, 0), CompressionConfig(method=opts, ratio=0.4,
                      rank_rule="fisher"), progress=False)
    assert result.record.options["output_whitening"] is True and result.record.rank_rule == "fisher"
    with torch.no_grad():
        assert torch.isfinite(model(calib_tokens[:32][None]).logits).all()


@pytest.mark.parametrize("shape", [(30, 12), (12, 30), (20, 20)])
@pytest.mark.parametrize("deficient", [False, True])
def test_truncation_is_the_svds_best_rank_k(shape, deficient):
    """The eigen route gives the Eckart–Young optimum: the same product and σ as LAPACK's SVD, for tall, wide and
    square targets, and for a target of rank 4 truncated at 7 (its vanished components come back as zeros)."""
    g = torch.Generator().manual_seed(3)
    m, n = shape
    t = torch.randn(m, n, generator=g, dtype=torch.float64) * torch.logspace(0, -4, n, dtype=torch.float64)
    if deficient:
        t = t[:, :4] @ torch.randn(4, n, generator=g, dtype=torch.float64)
    k = 7
    u, v, sigma = truncate(t, k)
    uu, ss, vh = torch.linalg.svd(t, full_matrices=False)
    torch.testing.assert_close(u @ v, uu[:, :k] * ss[:k] @ vh[:k], rtol=0, atol=1e-10 * float(ss[0]))
    torch.testing.assert_close(sigma, ss, rtol=0, atol=1e-7 * float(ss[0]))
    torch.testing.assert_close(sigma_squared(t), ss**2, rtol=0, atol=1e-12 * float(ss[0]) ** 2)
    assert u.shape == (m, k) and v.shape == (k, n) and torch.isfinite(u).all() and torch.isfinite(v).all()


def test_relative_error_expanded_equals_the_direct_form(problem):
    """The expanded loss (with and without W·C given) equals ‖(W − uv)X‖²/‖WX‖² computed on the activations."""
    from svdllm.whitening import relative_error

    w, x = problem
    gram = x.T @ x
    f = whiten(w, gram, 5)
    direct = float(((w - f.u @ f.v) @ x.T).pow(2).sum() / (w @ x.T).pow(2).sum())
    assert relative_error(w, f.u, f.v, gram) == pytest.approx(direct, rel=1e-9)
    assert relative_error(w, f.u, f.v, gram, w @ gram) == pytest.approx(direct, rel=1e-9)


@pytest.mark.parametrize("damp", [0.0, 1e-2])
def test_v_gram_is_v_c_vt_for_the_gram_given(problem, damp):
    """fit_product's k×k v·C·vᵀ equals the product made from C itself, ridge or not; the loss from it equals the direct one."""
    from svdllm.whitening import fit_product, relative_error

    w, x = problem
    gram = x.T @ x
    assert fit_product(w, (w @ gram) * 1.1, gram, 5, damp).v_gram is None  # made only when asked
    f = fit_product(w, (w @ gram) * 1.1, gram, 5, damp, with_v_gram=True)
    torch.testing.assert_close(f.v_gram, f.v @ gram @ f.v.T, rtol=1e-8, atol=1e-8 * float(gram.diagonal().mean()))
    direct = float(((w - f.u @ f.v) @ x.T).pow(2).sum() / (w @ x.T).pow(2).sum())
    assert relative_error(w, f.u, f.v, None, w @ gram, f.v_gram) == pytest.approx(direct, rel=1e-7)


@pytest.mark.parametrize("kind", ["plain", "damped", "clamped"])
def test_a_consumed_gram_is_factorised_in_its_own_storage(kind, monkeypatch):
    """``consume``: the factor is made in the Gram's storage (no second n×n matrix) and equals the copying route's to
    the bit, after the same ridge steps, from the Gram's lower triangle in both (its upper one is made to differ here); when
    every ridge fails the Gram is restored for the eigen repair."""
    import svdllm.whitening as whitening
    from svdllm.whitening import repaired_cholesky

    if whitening._torch_potrf() is None:
        pytest.skip("this torch exports no LAPACK potrf: Grams are copied")
    monkeypatch.setattr(whitening, "IN_PLACE_BYTES", 0)
    x = correlated(40, 200 if kind == "plain" else 30, seed=5)  # 30 tokens for 40 inputs: singular, damped
    gram = x.T @ x
    gram = gram.tril() + gram.tril(-1).T * (1 + 1e-7)  # the upper triangle off (the lower is the Gram read)
    if kind == "clamped":
        gram = gram - 1e3 * torch.eye(40, dtype=torch.float64)
    want, want_remedy, want_added = repaired_cholesky(gram, 0.0)
    owned = gram.clone()
    got, remedy, added = repaired_cholesky(owned, 0.0, consume=True)
    assert remedy == want_remedy and remedy.startswith({"plain": "", "damped": "damped",
                                                        "clamped": "eigenvalues clamped"}[kind])
    assert torch.equal(got, want) and torch.equal(torch.as_tensor(added), torch.as_tensor(want_added))  # one LAPACK
    if kind != "clamped":
        assert got.data_ptr() == owned.data_ptr() and torch.equal(got, got.tril())
    else:  # the Gram came back whole (its lower triangle mirrored) before the eigen repair
        torch.testing.assert_close(owned, gram.tril() + gram.tril(-1).T, rtol=0, atol=0)
    small = gram.clone()
    monkeypatch.setattr(whitening, "IN_PLACE_BYTES", 2**40)
    repaired_cholesky(small, 0.0, consume=True)  # under the size: copied, the Gram untouched
    assert torch.equal(small, gram)
