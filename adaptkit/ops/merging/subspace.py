"""LoRA-native merge methods that align the inputs in shared bases: KnOTS, TSV-M, Iso-C / Iso-CTS, core space.

Every function takes one layer's inputs as exact factors ``ΔW_i = U_i V_i`` (``U_i`` ``(m, r_i)`` with the LoRA scale
applied, ``V_i`` ``(r_i, n)``; any kind's exact factors) and the weights, which each method applies where its paper
does, and returns ``(up, down)``
with ``up @ down`` the merged ``ΔW``. Nothing of size ``m x n`` is built: bases come from QR / SVD of the stacked
factors (``(m, R)`` and ``(R, n)``, ``R = Σ r_i``) and the methods work on ``R x R`` or ``R x n`` coefficient matrices.
For low-rank inputs the "spectrum" of a method is the one of the sum's (or the task's) ``R``-dimensional span, where a
full-rank method's ``min(m, n)`` singular values would add zeros in arbitrary null-space directions; see
docs/merging.md for each method's formula and its reference.

:data:`SUBSPACE` is the table the method rows of :mod:`.catalog` name.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from ...core.linalg import lowrank_svd_parts
from .catalog import Method
from .methods import combine
from .primitives import Draws

Factors = tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class SubspaceOptions:
    """What the subspace methods read: the row (its sparsify / consensus parts), and the method parameters."""

    method: Method
    density: float | None = None
    majority_sign: str = "total"
    generator: Draws = None
    keep: float | None = None
    common: float | None = None


def _qr(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.linalg.qr(x, mode="reduced")


def _orthogonal(x: torch.Tensor) -> torch.Tensor:
    """The orthogonal matrix nearest to ``x`` (``P Q^T`` of its thin SVD ``P D Q^T``): the whitening of TSV-M and
    Iso-CTS."""
    p, _, qh = torch.linalg.svd(x, full_matrices=False)
    return p @ qh


def _elementwise(parts: list[torch.Tensor], weights: Sequence[float], opts: SubspaceOptions) -> torch.Tensor:
    """The row's sparsify / consensus parts on the aligned coefficient matrices (a weighted sum without them)."""
    w = torch.tensor([float(x) for x in weights], dtype=parts[0].dtype)
    return combine(parts, w, opts.method, opts.density, opts.majority_sign, opts.generator, owned=True)


def knots(factors: list[Factors], weights: Sequence[float], opts: SubspaceOptions) -> Factors:
    """KnOTS (Stoica et al., ICLR 2025): ``[ΔW_1 ... ΔW_T] = U Σ [V_1^T ... V_T^T]`` (one SVD of the column-wise
    concatenated updates), the row's TIES / DARE-TIES on the aligned ``V_i^T`` (``k x n`` each), ``ΔW = U Σ V^T``.

    The SVD comes from the factors: ``[U_1 ... U_T] = Q_B R_B`` and ``V_i^T = Q_i R_i`` (QR), so the concatenation is
    ``Q_B (R_B diag(R_i^T)) diag(Q_i^T)`` and only the ``R x R`` core is decomposed.
    """
    qb, rb = _qr(torch.cat([u for u, _ in factors], dim=1))
    qs, rs = zip(*(_qr(v.T) for _, v in factors))
    core = rb @ torch.block_diag(*(r.T for r in rs))
    uk, s, wh = torch.linalg.svd(core, full_matrices=False)
    keep = s > s.max() * max(core.shape) * torch.finfo(s.dtype).eps if s.numel() else s.bool()
    uk, s, wh = uk[:, keep], s[keep], wh[keep]
    coeffs, start = [], 0
    for q, (u, _) in zip(qs, factors):
        r = u.shape[1]
        coeffs.append((wh[:, start:start + r] @ q.T).contiguous())  # V_i^T, (k, n)
        start += r
    merged = _elementwise(coeffs, weights, opts)
    return (qb @ uk) * s, merged


def _task_svd(u: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The exact thin SVD of ``u @ v`` at its numerical rank."""
    left, s, right = lowrank_svd_parts([u], [v])
    nz = s > s.max() * max(u.shape[0], v.shape[1]) * torch.finfo(s.dtype).eps if s.numel() else s.bool()
    return left[:, nz], s[nz], right[nz]


def tsv(factors: list[Factors], weights: Sequence[float], opts: SubspaceOptions) -> Factors:
    """TSV-M (Gargiulo et al., CVPR 2025): each task's SVD ``U_i Σ_i V_i^T`` cut to its top ``int(keep min(m, n))``
    components (``keep`` default ``1/T``, as the authors' code; at most the task's rank, at least one), ``U = [U_1 ... U_T]`` and ``V = [V_1 ... V_T]`` replaced by their
    nearest orthogonal matrices (whitening: ``P Q^T`` of ``P D Q^T``), ``ΔW = U⊥ diag(w_i Σ_i) V⊥^T``."""
    frac = opts.keep if opts.keep is not None else 1.0 / len(factors)
    us, ss, vs = [], [], []
    for (u, v), w in zip(factors, weights):
        left, s, right = _task_svd(u, v)
        # the authors keep int(min(m, n) / T) components of each task: all of a LoRA's when T r <= min(m, n)
        k = min(s.numel(), max(1, int(frac * min(u.shape[0], v.shape[1]))))
        us.append(left[:, :k])
        ss.append(float(w) * s[:k])
        vs.append(right[:k])
    u_orth = _orthogonal(torch.cat(us, dim=1))
    v_orth = _orthogonal(torch.cat(vs, dim=0).T)
    return u_orth * torch.cat(ss), v_orth.T.contiguous()


def _sum_svd(factors: list[Factors], weights: Sequence[float]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    left, s, right = lowrank_svd_parts([u * float(w) for (u, _), w in zip(factors, weights)], [v for _, v in factors])
    nz = s > s.max() * max(left.shape[0], right.shape[1]) * torch.finfo(s.dtype).eps if s.numel() else s.bool()
    return left[:, nz], s[nz], right[nz]


def iso_c(factors: list[Factors], weights: Sequence[float], opts: SubspaceOptions) -> Factors:
    """Iso-C (Marczak et al., ICML 2025): the task-arithmetic sum ``Σ w_i ΔW_i = U Σ V^T`` with its spectrum made
    flat, ``ΔW = σ̄ U V^T``, ``σ̄`` the mean of its (nonzero) singular values."""
    u, s, vh = _sum_svd(factors, weights)
    return u * s.mean(), vh


def iso_cts(factors: list[Factors], weights: Sequence[float], opts: SubspaceOptions) -> Factors:
    """Iso-CTS (Marczak et al., ICML 2025): the sum's top ``k`` singular directions (``common`` fraction of its rank
    ``R``, default 0.8; the rest split evenly over the ``T`` tasks) plus, per task, the top ``(R - k) / T`` directions
    of ``(I - U_k U_k^T) w_i ΔW_i``; left and right sets whitened (nearest orthogonal matrices), every singular value
    the mean of the kept ones."""
    common = 0.8 if opts.common is None else opts.common
    u, s, vh = _sum_svd(factors, weights)
    total = s.numel()
    t = len(factors)
    k = int(total * common)
    per_task = round((total - k) / t)
    k = total - per_task * t
    uc, sc, vc = u[:, :max(k, 0)], s[:max(k, 0)], vh[:max(k, 0)]
    us, ss, vs = [], [], []
    for (fu, fv), w in zip(factors, weights):
        if per_task <= 0:
            break
        proj = fu * float(w) - uc @ (uc.T @ (fu * float(w)))
        left, sv, right = _task_svd(proj, fv)
        us.append(left[:, :per_task])
        ss.append(sv[:per_task])
        vs.append(right[:per_task])
    big_u = torch.cat([*us, uc], dim=1)
    big_v = torch.cat([*vs, vc], dim=0)
    spectrum = torch.cat([*ss, sc])
    return _orthogonal(big_u) * spectrum.mean(), _orthogonal(big_v.T).T.contiguous()


def core(factors: list[Factors], weights: Sequence[float], opts: SubspaceOptions) -> Factors:
    """Core-space merging (Panariello et al., NeurIPS 2025): reference bases from the SVDs of the stacked factors,
    ``[U_1 ... U_T] = U_B Σ_B W_B^T`` and ``[V_1; ...; V_T] = W_A Σ_A V_A^T``; each task is exactly
    ``ΔW_i = U_B M_i V_A^T`` with the ``R x R`` core ``M_i = U_B^T U_i V_i V_A``; the row's parts (TIES, or a
    weighted sum) merge the cores, ``ΔW = U_B M V_A^T``. The weighted sum equals task arithmetic exactly."""
    ub, _, _ = torch.linalg.svd(torch.cat([u for u, _ in factors], dim=1), full_matrices=False)
    _, _, va = torch.linalg.svd(torch.cat([v for _, v in factors], dim=0), full_matrices=False)
    cores = [((ub.T @ u) @ (v @ va.T)).contiguous() for u, v in factors]
    merged = _elementwise(cores, weights, opts)
    return ub @ merged, va.contiguous()


#: subspace method name (the ``subspace`` field of a :mod:`.catalog` row) -> its function
SUBSPACE: dict[str, Callable[[list[Factors], Sequence[float], SubspaceOptions], Factors]] = {
    "knots": knots, "tsv": tsv, "iso_c": iso_c, "iso_cts": iso_cts, "core": core}


__all__ = ["SUBSPACE", "SubspaceOptions", "core", "iso_c", "iso_cts", "knots", "tsv"]
