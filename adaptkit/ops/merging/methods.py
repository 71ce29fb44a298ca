"""The element-wise combination the method table's rows drive (:mod:`.catalog` holds the table).

:func:`combine` runs sparsify -> elect -> weigh -> combine on a list of same-shaped tensors, exactly as
``peft.utils.merge_utils`` orders those steps (the sign is elected on the unweighted, pruned tensors).
"""

from __future__ import annotations

import numpy as np
import torch

from ...core.params import MAJORITY_SIGN
from ...errors import ConfigError
from .catalog import (
    METHODS,
    PEFT_METHODS,
    Method,
    Operand,
    Output,
    Sparsify,
    get_method,
)
from .primitives import (
    Draws,
    check_density,
    disjoint_mean_,
    elected_sign,
    magnitude_prune_rows_,
    outlier_prune,
    prune,
    rank_magnitude_prune,
    weighted_sum,
    weighted_sum_,
)
from .select import NUMPY_DTYPES
from .workspace import Workspace

#: tensors of at most this many entries are stacked for pruning when they are not the caller's to overwrite
_STACK_MAX = 1 << 22


def combine(tensors: list[torch.Tensor], weights: torch.Tensor, method: Method, density: float | None = None,
            majority_sign_method: str = "total", generator: Draws = None,
            owned: bool = False, gamma: float | None = None, epsilon: float | None = None,
            workspace: Workspace | None = None) -> torch.Tensor:
    """Combine same-shaped tensors with a method's element-wise parts (sparsify, elect, weigh, combine).

    Equal to ``peft.utils.merge_utils`` (``ties``, ``dare_*``, ``magnitude_prune``, ``task_arithmetic``) but
    streams over the inputs instead of stacking them, and works in place on the pruned (or ``owned``)
    tensors with one float and one bool scratch buffer for all of them (see :mod:`.primitives`).

    Args:
        tensors: one tensor per input (float32, contiguous). The list is consumed: its entries are replaced
            by their pruned versions so that the originals can be freed.
        weights: one weight per input (1-D float tensor).
        method: the method whose ``sparsify`` and ``consensus`` parts apply.
        density: keep fraction for sparsification.
        majority_sign_method: ``"total"`` or ``"frequency"`` (TIES).
        generator: random generator for DARE / DELLA (torch or NumPy, see :data:`.primitives.Draws`).
        owned: the tensors belong to the caller's computation (e.g. freshly built deltas) and may be
            overwritten; otherwise they are read only.
        gamma: outlier fraction (``"outliers"`` sparsification, default 0).
        epsilon: spread of keep probabilities (``"rank_magnitude"`` sparsification, default 0). Each tensor
            draws from ``generator`` in list order.
        workspace: where the scratch buffers come from (reused across the layers of one merge); a fresh one when
            ``None``.

    Returns:
        The combined tensor.
    """
    w = [weights[i].to(tensors[i].dtype) for i in range(len(tensors))]
    if method.sparsify is None and not method.consensus:
        return weighted_sum_(tensors, w) if owned else weighted_sum(tensors, w)
    first = tensors[0]
    ws = workspace or Workspace()
    scratch = ws.buffer("scratch", first.shape, first.dtype)
    if method.sparsify is not None:
        if density is None:
            raise ConfigError(f"method '{method.name}' needs density (the fraction of entries to keep, 0 < density <= 1)")
        random = method.sparsify is Sparsify.RANDOM
        if method.sparsify is Sparsify.OUTLIERS:
            check_density(density)
            tensors[:] = [outlier_prune(t if owned else t.clone(), density, gamma or 0.0) for t in tensors]
        elif method.sparsify is Sparsify.RANK_MAGNITUDE:
            check_density(density)
            tensors[:] = [rank_magnitude_prune(t if owned else t.clone(), density, epsilon or 0.0, generator)
                          for t in tensors]
        elif not owned and first.numel() <= _STACK_MAX:  # small tensors (factors): prune them stacked, then own them
            rows = torch.stack(tensors)
            if random:
                prune(rows, density, "random", rescale=True, generator=generator, inplace=True)
            else:
                check_density(density)
                magnitude_prune_rows_(rows, density)
            return combine_rows(rows, w, method.consensus, majority_sign_method)
        else:
            for i, t in enumerate(tensors):
                t = t if owned else t.clone(memory_format=torch.contiguous_format)
                tensors[i] = prune(t, density, method.sparsify, rescale=random, generator=generator, inplace=True,
                                   scratch=scratch)
    elif not owned:
        tensors[:] = [t.clone(memory_format=torch.contiguous_format) for t in tensors]
    if not method.consensus:
        return weighted_sum_(tensors, w)
    sign = elected_sign(tensors, majority_sign_method, out=scratch, scratch=ws.buffer("votes", first.shape, first.dtype)
                        if majority_sign_method == "frequency" and len(tensors) > 1 else None)
    return disjoint_mean_(tensors, w, sign, ws.buffer("mask", first.shape, torch.bool),
                          ws.buffer("count", first.shape, torch.int16))


def combine_rows(rows: torch.Tensor, weights: list[torch.Tensor], consensus: bool, majority_sign_method: str = "total"
                 ) -> torch.Tensor:
    """Elect, weigh and combine stacked task tensors (``rows[i]``, pruned already) with PEFT's own reductions.

    What PEFT's ``ties`` / ``dare_linear`` / ``magnitude_prune`` do after pruning, on the same ``(k, ...)`` layout:
    ``sum(dim=0)`` of the weighted rows, and for TIES the vote ``sum(dim=0)`` and the disjoint mean, where the kept
    rows are ``e * (w * relu(x e))`` with the elected sign ``e = +-1`` (exact sign flips of PEFT's ``w * x * mask``,
    summed by the same reduction). A dozen whole-block operations instead of a dozen per row: the factor-wise
    methods' tensors are small, and their time is per operation.

    Args:
        rows: contiguous ``(k, ...)`` tensor the caller owns (overwritten).
        weights: one 0-d weight per row, in ``rows``' dtype.
        consensus: TIES sign election and disjoint mean (else the weighted sum).
        majority_sign_method: ``"total"`` or ``"frequency"``.

    Returns:
        The combined tensor of ``rows[0]``'s shape (a zero is ``+0.0``, as PEFT's).
    """
    w = torch.stack(weights).view(-1, *([1] * (rows.dim() - 1)))
    if not consensus:
        return rows.mul_(w).sum(0)
    votes = rows.sum(0) if MAJORITY_SIGN.check(majority_sign_method) == "total" else rows.sign().sum(0)
    sign = votes.ge_(0).mul_(2).sub_(1)  # +1 where the votes are >= 0, else -1
    rows.mul_(sign)  # x e: positive exactly where x agrees with the elected sign
    count = _agreeing(rows)
    total = rows.relu_().mul_(w).sum(0)
    return total.mul_(sign).div_(count.clamp_(min=1).to(total.dtype)).add_(0.0)


def _agreeing(rows: torch.Tensor) -> torch.Tensor:
    """How many rows are positive per entry: NumPy's boolean rows added as small integers (a bool ``sum(0)`` is
    20-30x slower in either library)."""
    if rows.dtype not in NUMPY_DTYPES:
        return (rows > 0).sum(0)
    positive = rows.numpy() > 0
    small = np.int8 if rows.shape[0] < 128 else np.int32
    count = positive[0].astype(small)
    for row in positive[1:]:
        count += row.view(np.int8)
    return torch.from_numpy(count)


__all__ = ["METHODS", "PEFT_METHODS", "Method", "Operand", "Output", "Sparsify", "combine", "combine_rows",
           "get_method"]
