"""Truncation-aware whitening: the pure linear algebra of SVD-LLM.

Conventions: W is (m, n) acting on column inputs, X is (n, tokens), so the Gram
is G = X Xᵀ (n, n).  All functions take and return tensors and do no I/O.
Decompositions run in float64: Grams of LLM activations span ~10 orders of
magnitude (outlier dimensions), and float32 Cholesky fails or loses the small
directions that decide which singular values are truncated.  The SVD of a whitened
matrix is the eigendecomposition of its smaller Gram (``truncate``), which costs
less than a float64 SVD and less than a float32 one on this CPU.
"""
from __future__ import annotations

import ctypes
import functools
import glob
import os
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor

DAMP_STEPS = (1e-8, 1e-6, 1e-4, 1e-2)
# a consumed Gram this large or larger is factorised in its own storage; a smaller one is copied (the copy costs
# little there)
IN_PLACE_BYTES = 256 * 2**20


@dataclass
class Factorization:
    """W ≈ u @ v with u (m, k) and v (k, n)."""

    u: Tensor
    v: Tensor
    sigma: Tensor  # all singular values of the whitened matrix, descending
    rank: int
    remedy: str = ""  # how a singular statistic was repaired, empty if not needed
    v_gram: Tensor | None = None  # v·C·vᵀ (k, k) for the input Gram C, where asked of ``fit_product``

    @property
    def discarded_energy(self) -> float:
        return float((self.sigma[self.rank :] ** 2).sum())


def cholesky_factor(gram: Tensor, damp: float = 0.0) -> tuple[Tensor, str]:
    """Lower-triangular S with S Sᵀ = gram + λI; never raises on a PSD-ish input.

    ``damp`` is a relative ridge always added (λ = damp·mean diag).  When the
    Cholesky fails (singular gram from dead inputs, rounding), the ridge is
    raised step by step; if that still fails, eigenvalues are clamped.  The
    returned string says what was done ("" when nothing was).
    """
    s, remedy, _ = repaired_cholesky(gram, damp)
    return s, remedy


def repaired_cholesky(gram: Tensor, damp: float = 0.0, consume: bool = False) -> tuple[Tensor, str, Tensor | float]:
    """``cholesky_factor`` plus what the repair added to the Gram: a ridge λ, or a matrix.

    Reads the lower triangle only (as Cholesky does) and factorises in one n×n buffer of its own, so that the
    Gram and its factor are the only two n×n matrices alive (a 7B down_proj's Gram is 970 MB in float64).  The
    buffer is column-major, LAPACK's layout: a row-major one made torch factorise a third n×n copy.  With
    ``consume`` (the caller's last use of a float64 Gram on the CPU, of at least ``IN_PLACE_BYTES``) the factor is
    made in the Gram's own storage, which is then lost, and no second n×n matrix exists (970 MB saved for a 7B
    down_proj, 6.6 GB for a 70B one), by the LAPACK torch factorises with: the same factor to the bit.
    """
    g = gram.double()  # the caller's tensor when already float64: never written unless consumed
    n = g.shape[0]
    scale = g.diagonal().abs().mean().item() or 1.0
    tried = [damp] + [d for d in DAMP_STEPS if d > damp]
    potrf = _torch_potrf()
    if consume and potrf is not None and g is gram and g.device.type == "cpu" and g.is_contiguous() \
            and not g.requires_grad and g.numel() * g.element_size() >= IN_PLACE_BYTES:
        found = _cholesky_in_place(potrf, g, tried, scale)
        if found is not None:
            return found
    else:
        s = torch.empty_like(g).T  # column-major
        info = torch.empty((), dtype=torch.int32)
        for i, d in enumerate(tried):
            s.copy_(g)
            if d:
                s.diagonal().add_(d * scale)
            torch.linalg.cholesky_ex(s, out=(s, info))  # in place
            if info.item() == 0 and torch.isfinite(s.diagonal()).all():
                return s.tril_(), _damped(i, d), d * scale
        del s
    lower = g.tril()
    sym = lower + lower.tril(-1).T
    evals, evecs = torch.linalg.eigh(sym)
    floor = max(evals.max().item(), scale) * 1e-6
    clamped = int((evals < floor).sum())
    fixed = (evecs * evals.clamp_min(floor)) @ evecs.T
    fixed = (fixed + fixed.T) / 2
    return torch.linalg.cholesky(fixed), f"eigenvalues clamped ({clamped} of {n} below {floor:.3g})", fixed - sym


def _damped(i: int, d: float) -> str:
    return "" if i == 0 else f"damped {d:g}×mean diag"


def _mirror_lower_(g: Tensor, rows: int = 256) -> None:
    """Copy the strict lower triangle of the square ``g`` onto its strict upper one, in place, a slab at a time."""
    n = g.shape[0]
    for r in range(0, n, rows):
        e = min(r + rows, n)
        block = g[r:e, r:e]
        block.copy_(block.tril() + block.tril(-1).T)
        g[r:e, e:].copy_(g[e:, r:e].T)


@functools.cache
def _torch_potrf() -> Callable[..., Any] | None:
    """LAPACK's dpotrf from torch's own library (MKL in its x86 wheels: what ``torch.linalg.cholesky`` calls), or
    None where it does not export one.  torch's Cholesky zeroes the other triangle, which a failed try then
    cannot be repeated from; potrf alone leaves it.  Not scipy's OpenBLAS: its threaded potrf wrote out of bounds
    at n = 28672 with two threads here (a 70B down_proj; OpenMathLib/OpenBLAS#2562 reports the same at 32768)."""
    for path in glob.glob(os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.*")):
        try:
            potrf = ctypes.CDLL(path).dpotrf_
        except (OSError, AttributeError):
            continue
        potrf.restype = None
        return potrf
    return None


def _cholesky_in_place(potrf: Callable[..., Any], g: Tensor, tried: list[float], scale: float
                       ) -> tuple[Tensor, str, float] | None:
    """``repaired_cholesky``'s ridge steps in the storage of the float64 Gram ``g`` (row-major): its transpose is
    the column-major buffer the copying route fills, once g's upper triangle mirrors its lower.  LAPACK's potrf
    reads and writes that buffer's lower triangle only, so g's lower triangle survives a failed try and the next
    ridge starts from it.  None when every ridge failed; g is then the (mirrored) Gram again."""
    _mirror_lower_(g)
    s = g.T  # column-major; s[i, j] = g[j, i], and g is now symmetric to the bit
    diagonal = s.diagonal().clone()
    n, info = ctypes.c_int(g.shape[0]), ctypes.c_int(0)
    for i, d in enumerate(tried):
        if i:
            _mirror_lower_(g)
            s.diagonal().copy_(diagonal)
        if d:
            s.diagonal().add_(d * scale)
        potrf(ctypes.c_char_p(b"L"), ctypes.byref(n), ctypes.c_void_p(s.data_ptr()), ctypes.byref(n),
              ctypes.byref(info))
        if info.value == 0 and torch.isfinite(s.diagonal()).all():
            return s.tril_(), _damped(i, d), d * scale
    _mirror_lower_(g)
    s.diagonal().copy_(diagonal)
    return None


def add_gram_(total: Tensor, a: Tensor, slab: int) -> Tensor:
    """``total`` + aᵀa, a slab of ``slab`` rows at a time up to its diagonal block, the rest mirrored: about
    (1 + slab/n)/2 of a full product's flops.  The products run in a's dtype and are summed into total's."""
    for r in range(0, a.shape[1], slab):
        part = (a[:, r:r + slab].T @ a[:, :r + slab]).to(total.device)  # rows r…r+slab, columns up to their end
        total[r:r + slab, :r + slab].add_(part)
        total[:r, r:r + slab].add_(part[:, :r].T)
    return total


def side_gram(target: Tensor) -> tuple[Tensor, bool]:
    """T·Tᵀ when T (m, n) is at most as tall as wide, else Tᵀ·T, in float64: the smaller of its two Grams, whose
    eigenvalues are T's σ² and whose eigenvectors are its left (or right) singular vectors; and whether it is T·Tᵀ.
    Made up to its diagonal blocks and mirrored (``add_gram_``): 0.56 of the flops of a 4096-wide one."""
    t = target.double()
    wide = t.shape[0] <= t.shape[1]
    side = t.T if wide else t  # columns: the Gram's side
    p = side.shape[1]
    return add_gram_(torch.zeros(p, p, dtype=torch.float64, device=t.device), side, max(64, -(-p // 8))), wide


def sigma_squared(target: Tensor) -> Tensor:
    """All σ² of ``target``, descending: the eigenvalues of its smaller Gram (float64), clamped at 0.

    2.3–7.9× faster than ``svdvals`` on 7B shapes here (benchmarks/results/factorisations); an eigenvalue's error is
    about 1e-16·σ₁², far below any σ² a truncation or a rank allocation weighs."""
    gram, _ = side_gram(target)
    return torch.linalg.eigvalsh(gram).flip(0).clamp_min_(0)


def truncate(target: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """Best rank-k split of ``target`` as (U_k√Σ_k, √Σ_k V_kᵀ, Σ), Σ all singular values, descending.

    From the eigendecomposition of the smaller side's Gram in float64 (U of T·Tᵀ, or V of Tᵀ·T), the other side
    projected: T ≈ U_k·U_kᵀ·T.  1.7–4.3× faster than a float64 SVD of T and faster than a float32 one on 7B shapes
    (benchmarks/results/factorisations), and as exact in what truncation needs: the discarded σ² are eigenvalues,
    and a component whose σ vanishes is a zero component."""
    t = target.double()
    gram, wide = side_gram(t)
    evals, evecs = torch.linalg.eigh(gram)
    del gram
    sigma = evals.flip(0).clamp_min_(0).sqrt_()
    top = evecs[:, evecs.shape[1] - k:].flip(1)  # the k leading eigenvectors, descending
    del evecs
    root = sigma[:k].sqrt()
    inv = torch.where(root > 0, 1.0 / torch.where(root > 0, root, 1.0), 0.0)
    if wide:  # u = U_k√Σ, v = U_kᵀT/√Σ
        return top * root, (top.T @ t).mul_(inv[:, None]), sigma
    return (t @ top).mul_(inv), root[:, None] * top.T, sigma  # u = T·V_k/√Σ, v = √Σ·V_kᵀ


def whiten(weight: Tensor, gram: Tensor, k: int, damp: float = 0.0, out_gram: Tensor | None = None,
           out_damp: float = 0.01, out_shrink: float = 0.0) -> Factorization:
    """SVD-LLM(W): SVD of W·S with S = chol(XXᵀ); Wv = √Σ_k V_kᵀ S⁻¹ by triangular solve.

    ‖(W − u v) X‖_F² equals the sum of the discarded σ² of W·S.  With ``out_gram`` (C_g = Σ g gᵀ of the loss's
    gradient at the output, or its diagonal) both sides are whitened: the SVD of Rᵀ·W·S with R Rᵀ = C_g, and
    tr(ΔW·C_x·ΔWᵀ·C_g) equals the sum of the discarded σ², in units of the loss.
    """
    return whiten_towards(weight, gram, gram, k, damp, out_gram, out_damp, out_shrink)


def output_shrinkage(width: int, tokens: int) -> float:
    """How far a full output-gradient Gram is pulled towards its scaled identity μI (μ = its mean diagonal):
    α = w/(w + t) for w outputs and t calibration tokens.  A Gram of t gradients has rank ≤ t, so with few tokens
    per output most directions are unseen and the Gram alone would call their error free; the sample Gram's
    spread about an isotropic truth grows as w/t (Marchenko–Pastur), and w/(w + t) is the Ledoit–Wolf weight in
    that case.  α → 1 is one-sided whitening in loss units (the isotropic Fisher μ), α → 0 the Gram itself."""
    return width / (width + tokens) if width + tokens > 0 else 1.0


def output_factor(out_gram: Tensor, damp: float, shrink: float = 0.0) -> tuple[Tensor, str]:
    """R with R Rᵀ = (1−α)·C_g + α·μ·I + damp·μ·I (μ = mean diag, α = ``shrink``): lower-triangular for a full Gram,
    a diagonal (as a vector) for a diagonal one (never shrunk: each of its entries is a mean over every token).
    A zero C_g (an output that never reaches the loss) gives R = 0: truncating it costs nothing, so its two-sided
    spectrum is zero and the factorisation falls back to one-sided whitening.  A non-finite C_g gives R = I
    (one-sided, said in the remedy: the spectra refuse it, since its σ² would not be in loss units); a singular one
    is repaired like the input Gram."""
    g = out_gram.double()
    if not torch.isfinite(g).all():
        return torch.ones(g.shape[0], dtype=torch.float64), "output Gram non-finite: one-sided whitening"
    if not g.any():
        return torch.zeros(g.shape[0], dtype=torch.float64), "output Gram zero: one-sided whitening"
    if g.dim() == 2 and shrink > 0:  # a new tensor: the caller's Gram is never written
        mu = g.diagonal().mean().item()
        g = g * (1.0 - shrink)
        g.diagonal().add_(shrink * mu)
    if g.dim() == 1:
        scale = g.abs().mean().item() or 1.0
        d = g.clamp_min(0) + damp * scale
        floor = max(d.max().item(), scale) * 1e-6
        fixed = d.clamp_min(floor)
        return fixed.sqrt(), "" if torch.equal(fixed, d) else "output Gram diagonal clamped"
    r, remedy, _ = repaired_cholesky(g, damp)
    return r, remedy and f"output Gram {remedy}"


def left_whiten_(r: Tensor, target: Tensor, rows: int = 512) -> Tensor:
    """Rᵀ·target in target's own storage, for the output factor R of ``output_factor`` (a vector when C_g is
    diagonal).  R is lower-triangular, so row i of Rᵀ·target reads the rows from i down: a slab of rows at a time
    from the top, no (m, n) copy is made (360 MB for a 7B down_proj) and half the product's flops are skipped."""
    if r.dim() == 1:
        return target.mul_(r[:, None])
    m = target.shape[0]
    for a in range(0, m, rows):
        b = min(a + rows, m)
        target[a:b] = r[a:, a:b].T @ target[a:]
    return target


def balanced(u: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """The same product u·v with ‖u_i‖ = ‖v_i‖ for every rank component i (column i of u, row i of v).

    Two-sided whitening leaves u = R⁻ᵀ·U√Σ and v = √Σ·Vᵀ·S⁻¹ scaled by R and S, whose entries can differ by many
    orders of magnitude; balanced factors lose least when stored in bfloat16 or quantized.  A component with a
    zero side is a zero component: both sides become zero."""
    nu, nv = u.double().norm(dim=0), v.double().norm(dim=1)
    live = (nu > 0) & (nv > 0)
    scale = torch.where(live, (nv / torch.where(live, nu, 1.0)).sqrt(), 0.0)
    inv = torch.where(live, 1.0 / torch.where(live, scale, 1.0), 0.0)
    return u * scale.to(u.dtype), v * inv.to(v.dtype)[:, None]


def whiten_towards(weight: Tensor, cross: Tensor, gram: Tensor, k: int, damp: float = 0.0,
                   out_gram: Tensor | None = None, out_damp: float = 0.01, out_shrink: float = 0.0) -> Factorization:
    """Optimal rank-k W′ for ‖Rᵀ(W·Z − W′·X′)‖_F with cross = Z X′ᵀ and gram = X′X′ᵀ (R = I without ``out_gram``).

    With S′ = chol(gram): W′ = R⁻ᵀ·Trunc_k(Rᵀ·W·cross·S′⁻ᵀ)·S′⁻¹.  When cross = gram this
    is plain whitening.  Used by the error-corrected method with Z = βX + (1−β)X′.
    Whatever repair the Gram needs (ridge λ, or clamped eigenvalues Δ) is added to
    cross too: the fit is then ‖WZ − W′X′‖² + λ‖W − W′‖², which shrinks towards W
    rather than towards 0, and gives W back exactly (at full rank) when X′ = Z.
    """
    return fit_product(weight, None if cross is gram else promoted_product(weight, cross.double()), gram, k, damp,
                       out_gram, out_damp, out_shrink)


def fit_product(weight: Tensor, weighted_cross: Tensor | None, gram: Tensor | None, k: int, damp: float = 0.0,
                out_gram: Tensor | None = None, out_damp: float = 0.01, out_shrink: float = 0.0,
                factor: tuple[Tensor, str, Tensor | float] | None = None, with_v_gram: bool = False,
                out_factor: tuple[Tensor, str] | None = None) -> Factorization:
    """``whiten_towards`` given W·Z X′ᵀ (m, n) rather than Z X′ᵀ (n, n); None: plain whitening (Z = X′).  A blend
    of targets is then a blend of (m, n) products, and no n×n matrix but the Gram and its factor is made.

    ``factor``: ``repaired_cholesky(gram, damp)`` made by the caller (``gram`` may then be None, so that the caller
    can free it); ``out_factor`` likewise ``output_factor(out_gram, out_damp, out_shrink)``, in place of ``out_gram``.
    ``weighted_cross`` is written: the ridge, the solve and the output whitening run in its storage.  ``with_v_gram``: the result carries
    v·C·vᵀ for the Gram C as given (``v_gram``), a k×k matrix from which ``relative_error`` needs no n×n product."""
    s, remedy, added = factor if factor is not None else repaired_cholesky(gram, damp)  # type: ignore[arg-type]
    if weighted_cross is None:
        target = promoted_product(weight, s)
    else:  # (W·cross + W·added)·S⁻ᵀ: solve M Sᵀ = W·(cross + added), in weighted_cross's storage
        target = weighted_cross.double()
        if isinstance(added, Tensor):
            target += weight.double() @ added
        elif added:
            target.add_(weight, alpha=added)  # W promoted element by element: no float64 copy of it
        torch.linalg.solve_triangular(s.T, target, upper=True, left=False, out=target)
        del weighted_cross
    r = None
    if out_gram is not None and out_factor is None:
        out_factor = output_factor(out_gram, out_damp, out_shrink)
    if out_factor is not None:
        r, out_remedy = out_factor
        remedy = "; ".join(x for x in (remedy, out_remedy) if x)
        if r.any():
            target = left_whiten_(r, target)
        else:  # the output never reaches the loss: any factors cost nothing, the one-sided ones keep X's error least
            r = None
    u, vs, sigma = truncate(target, k)
    del target
    if r is not None:  # R⁻ᵀ·u
        u = u / r[:, None] if r.dim() == 1 else torch.linalg.solve_triangular(r.T, u, upper=True)
    v_gram = vs @ vs.T if with_v_gram else None  # v·(C + added)·vᵀ = vs·vsᵀ, since S·Sᵀ = C + added
    v = torch.linalg.solve_triangular(s, vs, upper=False, left=False, out=vs.contiguous())  # vs·S⁻¹, in place
    del vs
    if v_gram is not None and isinstance(added, Tensor):
        v_gram -= v @ added @ v.T
    elif v_gram is not None and added:
        v_gram -= added * (v @ v.T)
    return Factorization(u, v, sigma, k, remedy, v_gram)


def scaled_svd(weight: Tensor, k: int, col_scale: Tensor | None = None, row_scale: Tensor | None = None) -> Factorization:
    """Truncated SVD of diag(row)·W·diag(col), scales folded back out.

    Plain SVD (no scales), ASVD (column scales from activations) and FWSVD
    (row scales from Fisher information) are all this one function.
    """
    w = weight.double()
    if col_scale is not None:
        col_scale = col_scale.double()
        w = w * col_scale[None, :]
    if row_scale is not None:
        row_scale = row_scale.double()
        w = w * row_scale[:, None]
    u, v, sigma = truncate(w, k)
    if col_scale is not None:
        v = v / col_scale[None, :]
    if row_scale is not None:
        u = u / row_scale[:, None]
    return Factorization(u, v, sigma, k)


def update_left(weight: Tensor, v: Tensor, cross: Tensor, gram: Tensor, damp: float = 1e-6) -> Tensor:
    """SVD-LLM's closed-form update of the left factor with v fixed.

    Minimises ‖W·Z − U·v·X′‖_F over U, with cross = Z X′ᵀ and gram = X′X′ᵀ:
    U = W·cross·vᵀ (v·gram·vᵀ)⁻¹, solved by Cholesky with a small relative
    ridge.  Works from Grams alone, so no activation is ever stored.
    """
    v = v.double()
    rhs = weight.double() @ cross.double() @ v.T  # (m, k)
    lhs = v @ gram.double() @ v.T  # (k, k)
    chol, _ = cholesky_factor(lhs, damp)
    return torch.cholesky_solve(rhs.T, chol).T


def promoted_product(weight: Tensor, right: Tensor, rows: int = 2048) -> Tensor:
    """W·M in float64 (M float64, on its device): W is cast a slab of ``rows`` rows at a time into the product's
    own rows, so that W in float64 (344 MB for a 7B gate_proj, 1.9 GB for a 70B down_proj) is never a temporary."""
    out = torch.empty(weight.shape[0], right.shape[1], dtype=torch.float64, device=right.device)
    for r in range(0, weight.shape[0], rows):
        torch.mm(weight[r:r + rows].to(right.device, torch.float64), right, out=out[r:r + rows])
    return out


def outputs_of(inputs: Tensor, weight: Tensor) -> Tensor:
    """x·Wᵀ in float64 for the rows x of ``inputs`` (tokens × n), as (W·xᵀ)ᵀ: no float64 W is made."""
    return promoted_product(weight, inputs.double().T).T


def relative_error_on(u: Tensor, v: Tensor, inputs: Tensor, outputs: Tensor) -> float:
    """``relative_error`` from the calibration's inputs X (tokens × n) and outputs X·Wᵀ themselves, for few tokens:
    tr(W·C·Wᵀ) = ‖X·Wᵀ‖², W·C·vᵀ = (X·Wᵀ)ᵀ·(X·vᵀ) and v·C·vᵀ = (X·vᵀ)ᵀ·(X·vᵀ), with no (m, n) product."""
    u, x_v = u.double(), inputs.double() @ v.double().T
    total = float(torch.dot(outputs.reshape(-1), outputs.reshape(-1)))
    return _relative_residual(total, float((u * (outputs.T @ x_v)).sum()), float(((u.T @ u) * (x_v.T @ x_v)).sum()))


def _relative_residual(total: float, cross: float, square: float) -> float:
    """‖(W − u·v)X‖² / ‖W·X‖² from its expansion tr(W·C·Wᵀ) − 2⟨u, W·C·vᵀ⟩ + ⟨uᵀu, v·C·vᵀ⟩, clamped at 0."""
    return max(total - 2 * cross + square, 0.0) / max(total, 1e-300)


def output_error(weight: Tensor, u: Tensor, v: Tensor, gram: Tensor) -> float:
    """‖(W − u v) X‖_F² computed from the Gram XXᵀ."""
    delta = weight.double() - u.double() @ v.double()
    return float(torch.einsum("ij,jk,ik->", delta, gram.double(), delta))


def relative_error(weight: Tensor, u: Tensor, v: Tensor, gram: Tensor | None, weight_gram: Tensor | None = None,
                   v_gram: Tensor | None = None) -> float:
    """‖(W − u v) X‖² / ‖W X‖²: the calibration loss reported per matrix.

    Expanded as tr(WCWᵀ) − 2⟨u, WC·vᵀ⟩ + ⟨uᵀu, vCvᵀ⟩ (C = XXᵀ), so that no (m, n) difference is formed; given
    ``weight_gram`` = W·C and ``v_gram`` = v·C·vᵀ (``Factorization.v_gram``) no product of size n² is made and
    ``gram`` is not read."""
    w, u, v = weight.double(), u.double(), v.double()
    wc = w @ gram.double() if weight_gram is None else weight_gram.double()  # type: ignore[union-attr]
    vcv = v @ gram.double() @ v.T if v_gram is None else v_gram  # type: ignore[union-attr]
    total = float(torch.dot(w.reshape(-1), wc.reshape(-1)))  # tr(W·C·Wᵀ) with no (m, n) temporary
    return _relative_residual(total, float((u * (wc @ v.T)).sum()), float(((u.T @ u) * vcv).sum()))


def target_error(weight: Tensor, approx: Tensor, target_gram: Tensor, cross: Tensor, gram: Tensor) -> float:
    """‖W·Z − W′·X′‖_F² from Grams: target_gram = ZZᵀ, cross = ZX′ᵀ, gram = X′X′ᵀ."""
    w, a = weight.double(), approx.double()
    return float(
        torch.einsum("ij,jk,ik->", w, target_gram.double(), w)
        - 2 * torch.einsum("ij,jk,ik->", w, cross.double(), a)
        + torch.einsum("ij,jk,ik->", a, gram.double(), a)
    )
