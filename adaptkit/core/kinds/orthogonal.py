"""Orthogonal blocks from skew-symmetric parameters: the Cayley maps and block-diagonal assembly OFT-style kinds share.

Two conventions exist and they are not the same matrix:

* PEFT (OFT, BOFT): ``R = (I - Q)^{-1} (I + Q)``-style right solve, i.e. ``R = (I - Q) (I + Q)^{-1}``
  (``torch.linalg.solve(I + Q, I - Q, left=False)``), or its truncated Neumann series
  ``I + 2Q + 2Q^2 + ... + Q^{n-1}`` (OFT's ``use_cayley_neumann``, the default).
* LyCORIS (diag-OFT, BOFT): ``R = (I + Q) (I - Q)^{-1}``, with ``Q`` optionally rescaled to a Frobenius norm
  bound (``constraint``) taken over *all* blocks together.

``Q`` is always skew-symmetric; how it is made from the stored tensor differs per kind (PEFT OFT stores the
strict upper triangle as a vector, PEFT BOFT stores full blocks and uses ``(B - B^T) / 2``, LyCORIS
stores full blocks and uses ``B - B^T``).
"""

from __future__ import annotations

import torch


def skew_from_triu(vec: torch.Tensor, block_size: int) -> torch.Tensor:
    """``(n, b(b-1)/2)`` strict-upper-triangle vectors (row-major, ``torch.triu_indices`` order) -> ``(n, b, b)`` skew."""
    rows, cols = torch.triu_indices(block_size, block_size, 1)
    q = vec.new_zeros(vec.shape[0], block_size, block_size)
    q[:, rows, cols] = vec
    return q - q.transpose(-2, -1)


def triu_from_skew(q: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`skew_from_triu`: the strict upper triangles of ``(n, b, b)`` as ``(n, b(b-1)/2)``."""
    rows, cols = torch.triu_indices(q.shape[-1], q.shape[-1], 1)
    return q[:, rows, cols]


def cayley_right(q: torch.Tensor) -> torch.Tensor:
    """PEFT's exact Cayley map for a batch of skew matrices: ``X`` with ``X (I + Q) = I - Q``."""
    eye = torch.eye(q.shape[-1], dtype=q.dtype, device=q.device).expand_as(q)
    return torch.linalg.solve(eye + q, eye - q, left=False)


def cayley_neumann(q: torch.Tensor, terms: int) -> torch.Tensor:
    """PEFT OFT's truncated Neumann form of the Cayley map (``use_cayley_neumann``, ``num_cayley_neumann_terms``).

    peft 0.21's ``_cayley_batch`` builds ``I`` (1 term), ``I + 2Q`` (2 terms), and from 3 terms on
    ``I + 2Q + 2Q^2 + ... + 2Q^{max(2, t-2)} + Q^{max(3, t-1)}``: 3 and 4 terms give the same matrix
    (``I + 2Q + 2Q^2 + Q^3``). Reproduced exactly, quirk included.
    """
    eye = torch.eye(q.shape[-1], dtype=q.dtype, device=q.device).expand_as(q)
    out = eye.clone()
    if terms > 1:
        out = out + 2 * q
        if terms > 2:
            power = q @ q
            out = out + 2 * power
            for _ in range(3, terms - 1):
                power = power @ q
                out = out + 2 * power
            out = out + power @ q
    return out


def cayley_lycoris(q: torch.Tensor) -> torch.Tensor:
    """LyCORIS's Cayley map: ``(I + Q) (I - Q)^{-1}`` (computed in float32, as LyCORIS inverts in float32)."""
    q = q.to(torch.float32)
    eye = torch.eye(q.shape[-1], dtype=q.dtype, device=q.device).expand_as(q)
    return (eye + q) @ torch.linalg.inv(eye - q)


def block_diag(blocks: torch.Tensor, count: int | None = None) -> torch.Tensor:
    """``(n, b, b)`` blocks -> the ``(n*b, n*b)`` block-diagonal matrix; one shared block repeated ``count`` times."""
    if count is not None and blocks.shape[0] == 1:
        blocks = blocks.expand(count, *blocks.shape[1:])
    n, b, _ = blocks.shape
    out = blocks.new_zeros(n * b, n * b)
    for i in range(n):
        out[i * b:(i + 1) * b, i * b:(i + 1) * b] = blocks[i]
    return out
