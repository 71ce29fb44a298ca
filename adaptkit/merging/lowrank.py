"""Exact truncated SVDs for merging: of a sum of low-rank products, and of a dense delta.

:func:`lowrank_svd` factors ``sum_i U_i V_i`` (``U_i``: ``(m, r_i)``, ``V_i``: ``(r_i, n)``) without building
the ``m x n`` matrix: stack ``U = [U_1 ... U_k]`` and ``V = [V_1; ...; V_k]`` (``R = sum r_i``), take thin QRs
``U = Q_u R_u`` and ``V^T = Q_v R_v``, and SVD the ``R x R`` core ``R_u R_v^T = X S Y^T``. Then
``sum_i U_i V_i = (Q_u X) S (Q_v Y)^T`` is an exact SVD; cost ``O((m + n) R^2)``.

:func:`dense_svd` returns the top-``rank`` SVD of a dense matrix. For a small rank it takes the top
eigenvectors of the Gram matrix of the shorter side and refines them with one Rayleigh-Ritz step (QR of
``D V``, SVD of the small projection), which is accurate to float32 round-off for the kept components
and several times faster than a full SVD. Both return PEFT's layout ``B = U diag(S)``, ``A = V^T``.
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


def dense_svd(delta: torch.Tensor, rank: int, oversample: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``rank`` SVD of a dense 2-D matrix, as ``(B, A)`` with ``B @ A`` the best rank-``rank`` approximation.

    Args:
        delta: ``(m, n)`` float32 matrix.
        rank: output rank (zero-padded when larger than ``min(m, n)``).
        oversample: extra directions kept through the refinement step.

    Returns:
        ``(B, A)`` as in :func:`lowrank_svd`.
    """
    m, n = delta.shape
    small = min(m, n)
    k = min(small, 2 * rank + oversample)
    if k * 3 >= small:  # a large fraction of the spectrum: the plain thin SVD is as fast
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
        return _truncate(u, s, vh, rank)
    wide = n > m  # work with the Gram matrix of the shorter side
    d = delta.T if wide else delta  # (long, short)
    gram = d.T @ d
    _, vecs = torch.linalg.eigh(gram)  # ascending eigenvalues
    basis = vecs[:, -k:]  # (short, k) approximate top right singular vectors
    q, _ = torch.linalg.qr(d @ basis, mode="reduced")  # (long, k) orthonormal basis of the top range
    u_small, s, vh = torch.linalg.svd(q.T @ d, full_matrices=False)  # Rayleigh-Ritz on the k-dim subspace
    u = q @ u_small
    if wide:  # delta = d^T = vh^T s u^T
        return _truncate(vh.T, s, u.T, rank)
    return _truncate(u, s, vh, rank)


__all__ = ["dense_svd", "lowrank_svd"]
