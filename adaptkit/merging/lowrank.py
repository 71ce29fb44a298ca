"""Exact truncated SVDs for merging: of a sum of low-rank products, and of a dense delta.

:func:`lowrank_svd` factors ``sum_i U_i V_i`` (``U_i``: ``(m, r_i)``, ``V_i``: ``(r_i, n)``) without building
the ``m x n`` matrix: stack ``U = [U_1 ... U_k]`` and ``V = [V_1; ...; V_k]`` (``R = sum r_i``), take thin QRs
``U = Q_u R_u`` and ``V^T = Q_v R_v``, and SVD the ``R x R`` core ``R_u R_v^T = X S Y^T``. Then
``sum_i U_i V_i = (Q_u X) S (Q_v Y)^T`` is an exact SVD; cost ``O((m + n) R^2)``.

:func:`dense_svd` returns the top-``rank`` SVD of a dense matrix by block subspace iteration with a
residual-based stopping rule (falling back to the full SVD when it cannot certify the result), which
is several times faster than a full SVD for the small ranks adapters use. Both return PEFT's layout ``B = U diag(S)``, ``A = V^T``.
"""

from __future__ import annotations

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


def lowrank_svd(ups: list[torch.Tensor], downs: list[torch.Tensor], rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Truncated SVD of ``sum_i ups[i] @ downs[i]`` without forming the product.

    Args:
        ups: ``(m, r_i)`` float32 matrices (weights and scales already applied).
        downs: ``(r_i, n)`` float32 matrices.
        rank: output rank; components beyond the sum's rank are zero.

    Returns:
        ``(B, A)``: ``B`` ``(m, rank)`` = left singular vectors times singular values, ``A`` ``(rank, n)``.
    """
    u = torch.cat(ups, dim=1)
    v = torch.cat(downs, dim=0)
    qu, ru = torch.linalg.qr(u, mode="reduced")
    qv, rv = torch.linalg.qr(v.T, mode="reduced")
    x, s, yh = torch.linalg.svd(ru @ rv.T, full_matrices=False)
    return _truncate(qu @ x, s, yh @ qv.T, rank)


def dense_svd(delta: torch.Tensor, rank: int, oversample: int = 16, tol: float = 1e-4,
              max_iter: int = 30) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``rank`` SVD of a dense 2-D matrix, as ``(B, A)`` with ``B @ A`` the best rank-``rank`` approximation.

    For a small rank this runs block subspace iteration (``k = 2 rank + oversample`` directions, a fixed
    random start, QR every half step) with Rayleigh-Ritz, and stops once the residual
    ``||D V_r - U_r S_r||_F`` is at most ``tol`` times the gap between the ``rank``-th and next Ritz value
    (by Wedin's theorem the kept subspaces are then within ``tol``, as the sine of the angle, of the exact
    ones), or once it stalls at float32 round-off below ``10 tol`` times the gap. Otherwise (singular values
    clustered at the cut) it falls back to the full thin SVD. Deterministic.

    Args:
        delta: ``(m, n)`` float32 matrix.
        rank: output rank (zero-padded when larger than ``min(m, n)``).
        oversample: extra directions carried by the iteration.
        tol: convergence threshold on residual / spectral gap.
        max_iter: iterations before falling back to the full SVD.

    Returns:
        ``(B, A)`` as in :func:`lowrank_svd`.
    """
    m, n = delta.shape
    small = min(m, n)
    k = min(small, 2 * rank + oversample)
    if k * 3 >= small:  # a large fraction of the spectrum: the plain thin SVD is as fast
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
        return _truncate(u, s, vh, rank)
    wide = n > m
    d = delta.T if wide else delta  # (long, short)
    gen = torch.Generator().manual_seed(0)
    q = torch.linalg.qr(d @ torch.randn(d.shape[1], k, generator=gen, dtype=d.dtype), mode="reduced").Q
    previous = float("inf")
    for it in range(max_iter):
        q = torch.linalg.qr(d @ torch.linalg.qr(d.T @ q, mode="reduced").Q, mode="reduced").Q
        if it < 2:
            continue
        u_small, s, vh = torch.linalg.svd(q.T @ d, full_matrices=False)  # Rayleigh-Ritz
        u = q @ u_small
        residual = torch.linalg.matrix_norm(d @ vh[:rank].T - u[:, :rank] * s[:rank]).item()
        ratio = residual / max((s[rank - 1] - s[rank]).item(), 1e-30)
        # converged, or stalled at float32 round-off within 10 * tol
        if ratio <= tol or s[0].item() == 0.0 or (ratio <= 10 * tol and residual > 0.5 * previous):
            return _truncate(vh.T, s, u.T, rank) if wide else _truncate(u, s, vh, rank)
        previous = residual
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    return _truncate(u, s, vh, rank)


__all__ = ["dense_svd", "lowrank_svd"]
