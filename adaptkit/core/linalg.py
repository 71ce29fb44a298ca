"""adaptkit's linear algebra: exact SVDs of factored products, dense truncated SVDs, spectra and rank selection.

Every SVD the operations take comes from here: merging, convert, reparametrisation, extract and LoftQ
(through :meth:`adaptkit.core.kinds.LoRA.from_factors`), and the spectra of :mod:`adaptkit.analysis`.

:func:`lowrank_svd` factors ``sum_i U_i V_i`` (``U_i``: ``(m, r_i)``, ``V_i``: ``(r_i, n)``) without building
the ``m x n`` matrix: stack ``U = [U_1 ... U_k]`` and ``V = [V_1; ...; V_k]`` (``R = sum r_i``), take thin QRs
``U = Q_u R_u`` and ``V^T = Q_v R_v``, and SVD the ``R x R`` core ``R_u R_v^T = X S Y^T``. Then
``sum_i U_i V_i = (Q_u X) S (Q_v Y)^T`` is an exact SVD; cost ``O((m + n) R^2)``.

:func:`dense_svd` returns the top-``rank`` SVD of a dense matrix by block subspace iteration with a
residual-based stopping rule, which is several times faster than a full SVD for the small ranks adapters
use; it takes the full SVD directly for large ranks, and gives up early for it when the iteration's
convergence rate shows it cannot certify the result within a budget of about one full SVD's cost.
Both return PEFT's layout ``B = U diag(S)``, ``A = V^T``.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch


def _truncate(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B, A)`` with ``B = U[:, :r] diag(S[:r])``, ``A = Vh[:r]``, zero-padded up to ``rank``."""
    r = min(rank, s.numel())
    b = u[:, :r] * s[:r]
    a = vh[:r]
    if r < rank:
        b = torch.cat([b, b.new_zeros(b.shape[0], rank - r)], dim=1)
        a = torch.cat([a, a.new_zeros(rank - r, a.shape[1])], dim=0)
    return b.contiguous(), a.contiguous()


def lowrank_svd_parts(ups: list[torch.Tensor], downs: list[torch.Tensor]
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The exact thin SVD ``(U, S, Vh)`` of ``sum_i ups[i] @ downs[i]`` without forming the product.

    Args:
        ups: ``(m, r_i)`` matrices; downs: ``(r_i, n)`` matrices (same dtype).

    Returns:
        ``U`` ``(m, R)``, ``S`` ``(R,)`` descending, ``Vh`` ``(R, n)``, ``R = min(m, n, sum r_i)``.
    """
    u = torch.cat(ups, dim=1)
    v = torch.cat(downs, dim=0)
    qu, ru = torch.linalg.qr(u, mode="reduced")
    qv, rv = torch.linalg.qr(v.T, mode="reduced")
    x, s, yh = torch.linalg.svd(ru @ rv.T, full_matrices=False)
    return qu @ x, s, yh @ qv.T


def lowrank_singular_values(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Singular values of ``u @ v`` without forming it: thin QRs of ``u`` and ``v^T``, SVD of the small core.

    Args:
        u: ``(m, R)`` matrix.
        v: ``(R, n)`` matrix.

    Returns:
        The ``min(m, n, R)`` singular values, descending, in ``u``'s dtype.
    """
    ru = torch.linalg.qr(u, mode="r").R  # (min(m, R), R)
    rv = torch.linalg.qr(v.T, mode="r").R  # (min(n, R), R)
    return torch.linalg.svdvals(ru @ rv.T)


def gram_inner(fa: tuple[torch.Tensor, torch.Tensor], fb: tuple[torch.Tensor, torch.Tensor]) -> float:
    """``<U_a V_a, U_b V_b>_F = sum((U_a^T U_b) * (V_a V_b^T))`` without forming either product (``r x r`` Grams).

    ``fa is fb`` (a squared norm) takes :func:`gram_energy`.
    """
    if fa is fb:
        return gram_energy(*fa)
    return float(((fa[0].T @ fb[0]) * (fa[1] @ fb[1].T)).sum())


def gram_energy(u: torch.Tensor, v: torch.Tensor) -> float:
    """``||U V||_F^2 = sum((U^T U) * (V V^T))`` in float64, without forming ``U V``.

    The Grams are NumPy's symmetric rank-k updates (``syrk``: half a general product's work, 2-3x faster than
    torch's ``U.T @ U`` in one thread at adapter shapes) of float64 views; other dtypes are converted first.
    """
    a = u.detach().to(device="cpu", dtype=torch.float64).numpy()
    b = v.detach().to(device="cpu", dtype=torch.float64).numpy()
    return float(np.vdot(a.T @ a, b @ b.T))


def split_factors(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(U[:, :r] sqrt(S[:r]), sqrt(S[:r]) Vh[:r])``: an SVD's top ``rank`` triplets as two balanced factors.

    The split PEFT's LoftQ (``_low_rank_decomposition``) and every SVD-built LoRA in adaptkit use.
    """
    root = s[:rank].sqrt()
    return u[:, :rank] * root, root[:, None] * vh[:rank]


def numerical_rank(s: torch.Tensor, shape: tuple[int, int]) -> int:
    """The numerical rank of a matrix of ``shape`` from its singular values (NumPy's ``matrix_rank`` tolerance,
    ``max(s) * max(m, n) * eps(float32)``), at least 1."""
    tol = float(s.max()) * max(shape) * torch.finfo(torch.float32).eps if s.numel() else 0.0
    return max(1, int((s > tol).sum()))


def energy_rank(s: Any, fraction: float, total: float | None = None, rtol: float = 0.0) -> int:
    """The smallest ``k`` with ``sum(s[:k]**2) >= fraction * total``, ``s`` sorted descending.

    Args:
        s: singular values (a tensor or an array; sorted descending).
        fraction: the share of the energy to keep.
        total: the energy to measure against (default ``sum(s**2)``; a randomized SVD passes ``||D||_F^2``).
        rtol: the target is lowered by this relative slack (rounding of a cumulative sum).

    Returns:
        ``k`` (``len(s) + 1`` when even all of ``s`` falls short of the target; 0 when the energy is zero).
    """
    energy = torch.as_tensor(s, dtype=torch.float64) ** 2
    total = float(energy.sum()) if total is None else float(total)
    if total <= 0:
        return 0
    cum = torch.cumsum(energy, 0)
    return int(torch.searchsorted(cum, torch.tensor(fraction * total * (1 - rtol), dtype=torch.float64)).item()) + 1


def truncated_svd(d: torch.Tensor, rank: int | None, energy: float | None = None, method: str = "auto",
                  oversample: int = 16, niter: int = 4, seed: int = 0
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """``(U, S, Vh, k)``: the top singular triplets of a 2-D float32 matrix and the chosen rank ``k``.

    Exact (``torch.linalg.svd``) for ``method="exact"``, or with ``"auto"`` for matrices up to 1024 or ranks
    above a quarter of the size; otherwise randomized (``torch.svd_lowrank`` seeded with ``seed``, ``oversample``
    extra directions, ``niter`` power iterations), widening its subspace until ``energy`` is reached.

    Args:
        d: the matrix.
        rank: the rank (the cap when ``energy`` is given), or ``None``.
        energy: keep the smallest rank retaining this share of ``||d||_F^2``, or ``None``.
        method: ``"auto"``, ``"exact"`` or ``"randomized"``.
        oversample / niter / seed: of the randomized SVD.

    Returns:
        ``U``, ``S``, ``Vh`` (possibly more triplets than ``k``) and ``k``.
    """
    full = min(d.shape)
    cap = min(rank, full) if rank else full
    total = float((d * d).sum())
    exact = method == "exact" or (method == "auto" and (full <= 1024 or cap > full // 4))
    if exact:
        u, s, vh = torch.linalg.svd(d, full_matrices=False)
    else:
        q = min(full, (cap if rank else 64) + oversample)
        while True:
            with torch.random.fork_rng():
                torch.manual_seed(seed)
                u, s, v = torch.svd_lowrank(d, q=q, niter=niter)
            vh = v.T
            if energy is None or q >= full or float((s * s).sum()) >= energy * total:
                break
            q = min(full, 2 * q)
    if energy is None:
        k = cap
    else:
        k = max(1, min(energy_rank(s, energy, total), cap, s.numel()))
    return u, s, vh, min(k, s.numel())


def lowrank_svd(ups: list[torch.Tensor], downs: list[torch.Tensor], rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Truncated SVD of ``sum_i ups[i] @ downs[i]`` without forming the product.

    Args:
        ups: ``(m, r_i)`` float32 matrices (weights and scales already applied).
        downs: ``(r_i, n)`` float32 matrices.
        rank: output rank; components beyond the sum's rank are zero.

    Returns:
        ``(B, A)``: ``B`` ``(m, rank)`` = left singular vectors times singular values, ``A`` ``(rank, n)``.
    """
    return _truncate(*lowrank_svd_parts(ups, downs), rank)


#: the iteration may take about ``_COST * min(m, n) / k`` steps before it costs as much as one full thin SVD
#: (measured on CPU for TinyLlama's 2048x2048, 5632x2048, 256x2048 and 1408x512 layers: 1.1 to 3.4)
_COST = 2.0
#: below this many affordable steps the full SVD is taken directly (i.e. when ``k > min(m, n) / 4``)
_MIN_STEPS = 8


def _full_svd(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    return _truncate(u, s, vh, rank)


def dense_svd(delta: torch.Tensor, rank: int, oversample: int = 16, tol: float = 1e-4,
              max_iter: int = 30, guess: tuple[torch.Tensor, torch.Tensor] | None = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``rank`` SVD of a dense 2-D matrix, as ``(B, A)`` with ``B @ A`` the best rank-``rank`` approximation.

    For a small rank this runs block subspace iteration (``k = 2 rank + oversample`` directions, a fixed
    random start, QR every half step) with Rayleigh-Ritz, and stops once the residual
    ``||D V_r - U_r S_r||_F`` is at most ``tol`` times the gap between the ``rank``-th and next Ritz value
    (by Wedin's theorem the kept subspaces are then within ``tol``, as the sine of the angle, of the exact
    ones), or once it stalls at float32 round-off below ``10 tol`` times the gap. Otherwise it returns the
    full thin SVD, without iterating when ``k > min(m, n) / 4`` (the full SVD is then faster), and as soon
    as the convergence rate (the smaller of the Ritz estimate ``(s_k / s_rank)^2`` and the last observed
    decrease of residual / gap) shows the stopping rule will not be met within the budget: ``max_iter``
    steps, and no more steps than cost about one full SVD (``2 min(m, n) / k``). Deterministic.

    Args:
        delta: ``(m, n)`` float32 matrix.
        rank: output rank (zero-padded when larger than ``min(m, n)``).
        oversample: extra directions carried by the iteration.
        tol: convergence threshold on residual / spectral gap.
        max_iter: most iterations before falling back to the full SVD.
        guess: ``(U0, V0)``, ``(m, j)`` and ``(n, j)`` bases of a nearby matrix's dominant column and row spaces
            (e.g. the unpruned weighted sum of the merged LoRAs): its first ``k - oversample`` columns replace
            part of the random start block (at least ``oversample`` random columns remain); it only changes
            how many steps the stopping rule needs, and the Ritz values are tested from the second step on
            (from the third without a guess).

    Returns:
        ``(B, A)`` as in :func:`lowrank_svd`.
    """
    m, n = delta.shape
    small = min(m, n)
    k = min(small, 2 * rank + oversample)
    budget = min(max_iter, int(_COST * small / k))
    if budget < _MIN_STEPS:  # a large fraction of the spectrum: the plain thin SVD is faster
        return _full_svd(delta, rank)
    wide = n > m
    d = delta.T if wide else delta  # (long, short)
    gen = torch.Generator().manual_seed(0)
    # a guess fills at most k - oversample columns: the random rest lets the iteration leave the guess's span
    # when the answer lies outside it (a guess invariant under D would otherwise pass the residual test)
    start = None if guess is None else (guess[0] if wide else guess[1])[:, :max(k - oversample, 1)].to(d.dtype)
    if start is None or start.shape[1] < k:
        fill = torch.randn(d.shape[1], k - (0 if start is None else start.shape[1]), generator=gen, dtype=d.dtype)
        start = fill if start is None else torch.cat([start, fill * start.norm() / fill.norm()], dim=1)
    q = torch.linalg.qr(d @ start, mode="reduced").Q
    y = d.T @ q
    first_check = 1 if guess is not None else 2
    previous = float("inf")
    previous_ratio = None
    for it in range(budget):
        q = torch.linalg.qr(d @ torch.linalg.qr(y, mode="reduced").Q, mode="reduced").Q
        y = d.T @ q  # the next step's product, and (transposed) the Rayleigh-Ritz matrix Q^T D of this one
        if it < first_check:
            continue
        u_small, s, vh = torch.linalg.svd(y.T, full_matrices=False)  # Rayleigh-Ritz
        u = q @ u_small
        residual = torch.linalg.matrix_norm(d @ vh[:rank].T - u[:, :rank] * s[:rank]).item()
        ratio = residual / max((s[rank - 1] - s[rank]).item(), 1e-30)
        # converged, or stalled at float32 round-off within 10 * tol
        if ratio <= tol or s[0].item() == 0.0 or (ratio <= 10 * tol and residual > 0.5 * previous):
            return _truncate(vh.T, s, u.T, rank) if wide else _truncate(u, s, vh, rank)
        if previous_ratio is not None and _hopeless(ratio, previous_ratio, s, rank, tol, budget - 1 - it):
            break
        previous, previous_ratio = residual, ratio
    return _full_svd(delta, rank)


def _hopeless(ratio: float, previous_ratio: float, s: torch.Tensor, rank: int, tol: float, left: int) -> bool:
    """Whether residual / gap cannot reach the stopping rule in ``left`` more steps at the current rate.

    The rate per step is the smaller (more hopeful) of the Ritz estimate ``(s_k / s_rank)^2`` and the
    decrease just observed; the target is ``10 tol`` where the stall rule can accept, ``tol`` otherwise.
    """
    kept = s[rank - 1].item()
    ritz = (s[-1].item() / kept) ** 2 if kept > 0 else float("inf")
    rate = min(ritz, ratio / previous_ratio) if previous_ratio > 0 else ritz
    if rate >= 1.0:
        return True
    target = tol if rate < 0.5 else 10 * tol
    if rate <= 0.0 or ratio <= target:  # an exactly rank-deficient block converges at once
        return False
    return math.log(target / ratio) / math.log(rate) > left


__all__ = ["dense_svd", "energy_rank", "gram_energy", "gram_inner", "lowrank_singular_values", "lowrank_svd", "lowrank_svd_parts",
           "numerical_rank", "split_factors", "truncated_svd"]
