"""Merge primitives: pruning (magnitude / random with rescale), majority sign election, disjoint mean.

These are the element-wise building blocks of TIES, DARE and magnitude pruning, with the numbers of
``peft.utils.merge_utils`` (same ``k = int(density * numel)``, same ``>= 0`` tie rule for the sign, same
``clamp(min=1)`` in the disjoint mean). Two differences, both deliberate: random pruning draws from an
explicit :class:`torch.Generator` (so a seed makes a merge reproducible without touching torch's global
RNG), and magnitude pruning finds its threshold with ``kthvalue`` (3x faster than ``topk`` on large
tensors), falling back to ``topk`` when ties at the threshold would keep more than ``k`` entries.
The sign election and the disjoint mean stream over a list of tensors instead of stacking them, so k
dense deltas cost about k + 3 matrices of memory. All functions are pure: they never modify their inputs.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ...core.params import DENSITY, MAJORITY_SIGN, kept_entries
from ...errors import ConfigError

#: the majority sign rules TIES knows: the sign of the summed values, or the more frequent sign
SIGN_METHODS: tuple[str, ...] = MAJORITY_SIGN.choices


def magnitude_prune(tensor: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the ``int(density * numel)`` entries of largest magnitude (:func:`~adaptkit.core.params.kept_entries`),
    zero the rest.

    Args:
        tensor: any tensor.
        density: fraction of entries to keep; ``>= 1`` keeps everything (PEFT's rule).

    Returns:
        A new tensor of the same shape and dtype.
    """
    if density >= 1:
        return tensor
    k = kept_entries(density, tensor.numel())
    if k <= 0:
        return torch.zeros_like(tensor)
    flat = tensor.abs().reshape(-1)
    keep = flat >= _kth_largest(flat, k)
    if int(torch.count_nonzero(keep)) != k:  # ties at the threshold: pick exactly k as PEFT's topk does
        keep = torch.zeros_like(flat, dtype=torch.bool)
        keep[torch.topk(flat, k=k, largest=True).indices] = True
    return tensor.masked_fill(~keep.reshape(tensor.shape), 0)


def _kth_largest(flat: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k``-th largest value of a 1-D tensor (exact).

    Large tensors first bracket the answer with quantiles of a strided sample, then select inside the
    bracket only; when the bracket misses (checked by counting) it selects over everything.
    """
    n = flat.numel()
    if n < 1 << 20:
        return torch.kthvalue(flat, n - k + 1).values
    sample = flat[:: n // 16384].sort().values
    m = sample.numel()
    pos = (n - k) / n * (m - 1)  # where the answer sits in the sorted sample
    margin = 8 * (m * (k / n) * (1 - k / n)) ** 0.5 + 16
    lo = sample[max(int(pos - margin), 0)]
    hi = sample[min(int(pos + margin) + 1, m - 1)]
    above = int(torch.count_nonzero(flat > hi))
    inside = flat[(flat >= lo) & (flat <= hi)]
    need = k - above  # rank of the answer among the bracketed values, from the top
    if 1 <= need <= inside.numel():
        return torch.kthvalue(inside, inside.numel() - need + 1).values
    return torch.kthvalue(flat, n - k + 1).values


def random_prune(tensor: torch.Tensor, density: float, rescale: bool = True,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """Keep each entry with probability ``density`` (DARE), optionally dividing the kept ones by ``density``.

    Args:
        tensor: any tensor.
        density: keep probability in ``(0, 1]``; ``>= 1`` keeps everything.
        rescale: divide by ``density`` so the expected value is unchanged (DARE's rescale).
        generator: random generator; torch's global one when ``None``.

    Returns:
        A new tensor of the same shape and dtype.
    """
    if density >= 1:
        return tensor
    mask = torch.bernoulli(torch.full_like(tensor, density), generator=generator)
    pruned = tensor * mask
    return pruned / density if rescale else pruned


def prune(tensor: torch.Tensor, density: float, method: str, rescale: bool = False,
          generator: torch.Generator | None = None) -> torch.Tensor:
    """Prune by ``"magnitude"`` or ``"random"`` (see :func:`magnitude_prune` / :func:`random_prune`).

    Raises:
        ConfigError: unknown method or a negative density.
    """
    if density < 0:  # PEFT's prune refuses only this: 0 keeps nothing, 1 or more keeps everything
        raise DENSITY.error(density, "a number of at least 0 (PEFT's prune: 1 or more keeps everything)")
    if method == "magnitude":
        return magnitude_prune(tensor, density)
    if method == "random":
        return random_prune(tensor, density, rescale=rescale, generator=generator)
    raise ConfigError(f"unknown pruning method '{method}'; use 'magnitude' or 'random'")


def majority_sign(tensors: Sequence[torch.Tensor], method: str = "total") -> torch.Tensor:
    """Elect a sign per entry (TIES "elect"): True where the elected sign is ``+``.

    Args:
        tensors: same-shaped task tensors.
        method: ``"total"``: the sign of the sum; ``"frequency"``: the sign held by more tensors.
            Zero elects ``+``.

    Returns:
        A bool tensor of the tensors' shape.
    """
    method = MAJORITY_SIGN.check(method)
    votes = sum(t if method == "total" else t.sign() for t in tensors)
    return votes >= 0


def agrees(tensor: torch.Tensor, positive: torch.Tensor) -> torch.Tensor:
    """Bool mask of the entries whose sign equals the elected one (zeros never agree)."""
    return ((tensor > 0) == positive) & (tensor != 0)


def disjoint_mean(tensors: Sequence[torch.Tensor], weights: Sequence[torch.Tensor | float],
                  positive: torch.Tensor) -> torch.Tensor:
    """Mean of the weighted entries that agree with the elected sign (TIES "disjoint merge"); 0 where none do."""
    total = torch.zeros_like(tensors[0])
    count = torch.zeros(tensors[0].shape, dtype=torch.int16)
    for t, w in zip(tensors, weights):
        agree = agrees(t, positive)
        total += (t * w).masked_fill_(~agree, 0.0)
        count += agree
    return total / count.clamp_(min=1)


def weighted_sum(tensors: Sequence[torch.Tensor], weights: Sequence[torch.Tensor | float]) -> torch.Tensor:
    """``sum_i weights[i] * tensors[i]``, accumulated in order."""
    total = tensors[0] * weights[0]
    for t, w in zip(tensors[1:], weights[1:]):
        total += t * w
    return total


__all__ = [
    "SIGN_METHODS",
    "agrees",
    "disjoint_mean",
    "magnitude_prune",
    "majority_sign",
    "prune",
    "random_prune",
    "weighted_sum",
]
