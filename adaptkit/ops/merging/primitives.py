"""Merge primitives: pruning (magnitude / random with rescale), majority sign election, disjoint mean.

These are the element-wise building blocks of TIES, DARE and magnitude pruning, with the numbers of
``peft.utils.merge_utils`` (same ``k = int(density * numel)``, same ``>= 0`` tie rule for the sign, same
``clamp(min=1)`` in the disjoint mean, the same entries kept at a magnitude threshold, bit for bit).

How they are fast without changing a number:

* Magnitude pruning (:mod:`.select`) finds the ``k``-th largest magnitude ``t`` by selection inside a bracket
  taken from a random sample, through NumPy views (no sort and no ``topk`` of the whole tensor), then keeps
  ``|x| >= t`` as ``x * mask``. Only when several entries of magnitude ``t > 0`` straddle the ``k``-th place
  does it call ``torch.topk`` on the same magnitudes as PEFT does (its choice among ties comes from
  libstdc++'s ``std::nth_element``; no cheaper rule reproduces it).
* Random pruning with a torch generator draws ``torch.rand(...) < density``: the very draws (and mask) of PEFT's
  ``torch.bernoulli(torch.full_like(t, density))``, 1.5-2.4x faster. The merge passes each layer a NumPy PCG64
  generator instead (16 bits per entry for an exact ``round(density * 2^32) / 2^32``, 8x faster than ``torch.rand``): PEFT draws
  from torch's global RNG through the layers in module order, which no per-layer seed reproduces anyway.
* The functions ending in ``_`` (``magnitude_prune_``, ``random_prune_``, ``weighted_sum_``,
  ``disjoint_mean_``) work in place on tensors the caller owns and take reusable scratch buffers: on large
  tensors a fresh allocation costs more than the arithmetic (the pages are faulted in), so a TIES merge of
  ``k`` dense deltas allocates ``k`` deltas and three buffers in all. The sign election and the disjoint
  mean stream over the list instead of stacking it. The functions without ``_`` never modify their inputs.
* The disjoint mean uses ``w x [x e > 0] = e (w relu(x e))`` with the elected sign ``e = +-1``: the same
  products and the same order of additions (exact sign flips); a zero result is ``+0.0``, as PEFT's
  ``sum(dim=0)`` gives it. Stacked factors take :func:`~.methods.combine_rows` (PEFT's own reductions).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from ...core.params import DENSITY, EPSILON, MAJORITY_SIGN, kept_entries
from ...errors import ConfigError
from .select import NUMPY_DTYPES, numpy_ok, prune_top_k_

#: the majority sign rules TIES knows: the sign of the summed values, or the more frequent sign
SIGN_METHODS: tuple[str, ...] = MAJORITY_SIGN.choices

def _buffer(like: torch.Tensor, scratch: torch.Tensor | None, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``scratch`` when it fits ``like`` (shape, and ``dtype`` or ``like``'s), else a new empty tensor."""
    dtype = like.dtype if dtype is None else dtype
    if scratch is not None and scratch.shape == like.shape and scratch.dtype == dtype and scratch.is_contiguous():
        return scratch
    return torch.empty(like.shape, dtype=dtype)


def magnitude_prune(tensor: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the ``int(density * numel)`` entries of largest magnitude (:func:`~adaptkit.core.params.kept_entries`),
    zero the rest, exactly as PEFT's ``magnitude_based_pruning`` (ties included, see :mod:`.select`).

    Args:
        tensor: any tensor.
        density: fraction of entries to keep; ``>= 1`` keeps everything (PEFT's rule).

    Returns:
        A new tensor of the same shape and dtype (``tensor`` itself when ``density >= 1``).
    """
    if density >= 1:
        return tensor
    k = kept_entries(density, tensor.numel())
    if k <= 0:
        return tensor * 0
    return prune_top_k_(tensor.clone(memory_format=torch.contiguous_format), k)


def magnitude_prune_(tensor: torch.Tensor, density: float, scratch: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`magnitude_prune` in place.

    Args:
        tensor: a contiguous tensor the caller owns.
        density: fraction of entries to keep.
        scratch: optional buffer of ``tensor``'s shape and dtype for the magnitudes.

    Returns:
        ``tensor``, pruned.
    """
    if density >= 1:
        return tensor
    k = kept_entries(density, tensor.numel())
    if k <= 0:
        return tensor.mul_(0)
    return prune_top_k_(tensor, k, scratch)


def magnitude_prune_rows_(rows: torch.Tensor, density: float) -> torch.Tensor:
    """:func:`magnitude_prune` of each ``rows[i]`` on its own, in place on a stacked tensor the caller owns.

    Args:
        rows: contiguous tensor ``(k, ...)``, one task tensor per row.
        density: fraction of each row's entries to keep.

    Returns:
        ``rows``, pruned.
    """
    if density >= 1:
        return rows
    keep = kept_entries(density, rows[0].numel())
    if keep <= 0:
        return rows.mul_(0)
    scratch = torch.empty_like(rows[0])
    for row in rows:
        prune_top_k_(row, keep, scratch)
    return rows


#: what DARE and DELLA draw from: torch's generator (PEFT's draws), or a NumPy generator (the merge's per-layer
#: PCG64 streams, 4-6x faster per draw)
Draws = torch.Generator | np.random.Generator | None


def uniform(shape: torch.Size | tuple[int, ...], dtype: torch.dtype, generator: Draws) -> torch.Tensor:
    """Uniform draws in ``[0, 1)`` of ``shape``: ``torch.rand`` for a torch generator (or ``None``: torch's global
    one), ``Generator.random`` for a NumPy one (float32 or float64, row-major)."""
    if isinstance(generator, np.random.Generator):
        wide = dtype == torch.float64
        return torch.from_numpy(generator.random(tuple(shape), dtype=np.float64 if wide else np.float32)).to(dtype)
    return torch.rand(shape, generator=generator, dtype=dtype)


#: 64-bit words drawn at a time for a NumPy generator's mask (the stream does not depend on it)
_CHUNK = 1 << 20


def _keep_threshold(density: float) -> int:
    """``L = round(density * 2^32)``, at most ``2^32 - 1``: an entry is kept with probability ``L / 2^32``."""
    return min(round(density * 2.0**32), 2**32 - 1)


def _words16(bits: np.random.BitGenerator, count: int) -> np.ndarray:
    """The next ``count`` 16-bit words of a stream: each 64-bit output gives four, lowest first."""
    return bits.random_raw((count + 3) // 4).astype("<u8", copy=False).view("<u2")[:count]


def _random_mask(tensor: torch.Tensor, density: float, generator: Draws,
                 scratch: torch.Tensor | None = None) -> torch.Tensor:
    """Bool mask, ``True`` with probability ``density``.

    A torch generator (or ``None``) gives the draws of ``torch.bernoulli(full_like(tensor, density))``, PEFT's
    (``torch.rand(...) < density``, the comparison through NumPy where it can: the same mask, faster).

    A NumPy generator keeps an entry with probability ``L / 2^32``, ``L = round(density * 2^32)`` (``density``
    to within ``2^-33``), from 16 bits per entry: with ``L = T * 2^16 + F``, the entry's word ``u`` keeps it
    when ``u < T`` and drops it when ``u > T``; the one entry in 65,536 with ``u == T`` draws a second word
    ``v`` (after all the first words) and is kept when ``v < F``. That is 0.8 ns per entry here, against
    1.6 ns for a 32-bit word per entry and 6-9 ns for ``torch.rand``.
    """
    if isinstance(generator, np.random.Generator):
        n = tensor.numel()
        keep = np.empty(n, dtype=bool)
        bits, limit = generator.bit_generator, _keep_threshold(density)
        high, low = np.uint16(limit >> 16), np.uint16(limit & 0xFFFF)
        ties = []
        for start in range(0, n, 4 * _CHUNK):  # chunks keep the draws' buffer small (heap, not fresh pages)
            words = _words16(bits, min(n, start + 4 * _CHUNK) - start)
            np.less(words, high, out=keep[start:start + words.size])
            ties.append(np.flatnonzero(words == high) + start)
        tied = np.concatenate(ties)
        if tied.size:
            keep[tied] = _words16(bits, tied.size) < low
        return torch.from_numpy(keep).view(tensor.shape)
    draws = torch.rand(tensor.shape, generator=generator, dtype=tensor.dtype, out=_buffer(tensor, scratch))
    if draws.dtype in NUMPY_DTYPES:
        return torch.from_numpy(np.less(draws.numpy(), draws.numpy().dtype.type(density)))
    return torch.lt(draws, density)


def random_prune(tensor: torch.Tensor, density: float, rescale: bool = True,
                 generator: Draws = None) -> torch.Tensor:
    """Keep each entry with probability ``density`` (DARE), optionally dividing the kept ones by ``density``.

    With a torch generator (or ``None``) the mask is the one PEFT's ``random_pruning`` draws,
    ``torch.bernoulli(torch.full_like(tensor, density))``, for the same generator state (drawn as
    ``torch.rand(...) < density``, the same uniforms, faster); with a NumPy generator, see :func:`_random_mask`.

    Args:
        tensor: any tensor.
        density: keep probability in ``(0, 1]``; ``>= 1`` keeps everything.
        rescale: divide by ``density`` so the expected value is unchanged (DARE's rescale).
        generator: torch or NumPy random generator; torch's global one when ``None``.

    Returns:
        A new tensor of the same shape and dtype.
    """
    if density >= 1:
        return tensor
    pruned = tensor * _random_mask(tensor, density, generator)
    return pruned / density if rescale else pruned


def random_prune_(tensor: torch.Tensor, density: float, rescale: bool = True,
                  generator: Draws = None, scratch: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`random_prune` in place on a tensor the caller owns (``scratch``: optional buffer for torch's draws)."""
    if density >= 1:
        return tensor
    keep = _random_mask(tensor, density, generator, scratch)
    if numpy_ok(tensor):
        values = tensor.numpy()
        np.multiply(values, keep.numpy(), out=values)  # x * 1 or x * 0, as PEFT's tensor * mask
    else:
        tensor.mul_(keep)
    return tensor.div_(density) if rescale else tensor


def outlier_prune(tensor: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """Model Breadcrumbs' mask (mergekit's ``magnitude_outliers``): drop the ``int(gamma * n)`` largest magnitudes
    and the smallest ones, so that ``int(density * n)`` entries remain; no rescale.

    When ``density + gamma > 1`` fewer outliers are dropped (mergekit's rule). Magnitudes are ranked by a
    stable ascending sort (ties: the lower index ranks lower).

    Args:
        tensor: any tensor (not modified).
        density: fraction of entries kept; ``>= 1`` keeps everything.
        gamma: fraction of the largest entries dropped.

    Returns:
        A new tensor of the same shape and dtype (``tensor`` itself when ``density >= 1``).
    """
    if density >= 1:
        return tensor
    n = tensor.numel()
    keep = kept_entries(density, n)
    top = min(int(gamma * n), n - keep)
    bottom = n - keep - top
    order = torch.sort(tensor.abs().reshape(-1), stable=True).indices
    mask = torch.zeros(n, dtype=tensor.dtype)
    mask[order[bottom:n - top]] = 1
    return tensor * mask.view(tensor.shape)


def rank_keep_probabilities(tensor: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    """DELLA's MagPrune keep probabilities: ``p = density - epsilon + 2 epsilon (r - 1) / (m - 1)`` where ``r`` is an
    entry's magnitude rank (1 = smallest, stable sort) within its row of ``m`` entries (1-D tensors: one row).

    Raises:
        ConfigError: ``density +- epsilon`` leaves ``(0, 1]``.
    """
    if density - epsilon <= 0 or density + epsilon > 1:
        raise EPSILON.error(epsilon, f"a number with density - epsilon > 0 and density + epsilon <= 1 "
                                     f"(density is {density})")
    rows = tensor.reshape(1, -1) if tensor.dim() < 2 else tensor.reshape(tensor.shape[0], -1)
    m = rows.shape[1]
    order = torch.sort(rows.abs(), dim=1, stable=True).indices
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(m).expand_as(order))
    norm = ranks.to(tensor.dtype) / max(m - 1, 1)
    return (density - epsilon + 2 * epsilon * norm).view(tensor.shape)


def rank_magnitude_prune(tensor: torch.Tensor, density: float, epsilon: float,
                         generator: Draws = None) -> torch.Tensor:
    """DELLA's MagPrune: keep each entry with its :func:`rank_keep_probabilities` ``p`` and divide it by ``p``.

    The draws are ``uniform(tensor.shape, tensor.dtype, generator) < p`` (one uniform per entry, row-major).

    Args:
        tensor: any tensor (not modified).
        density: mean keep probability; ``>= 1`` keeps everything.
        epsilon: half-width of the keep probabilities (0: DARE with rank-independent ``p``).
        generator: torch or NumPy random generator; torch's global one when ``None``.
    """
    if density >= 1:
        return tensor
    p = rank_keep_probabilities(tensor, density, epsilon)
    keep = uniform(tensor.shape, tensor.dtype, generator) < p
    return torch.where(keep, tensor / p, torch.zeros((), dtype=tensor.dtype))


def check_density(density: float) -> None:
    """Refuse what PEFT's ``prune`` refuses, a negative density (0 keeps nothing, 1 or more keeps everything).

    Raises:
        ConfigError: ``density < 0``.
    """
    if density < 0:
        raise DENSITY.error(density, "a number of at least 0 (PEFT's prune: 1 or more keeps everything)")


def prune(tensor: torch.Tensor, density: float, method: str, rescale: bool = False,
          generator: Draws = None, inplace: bool = False,
          scratch: torch.Tensor | None = None) -> torch.Tensor:
    """Prune by ``"magnitude"`` or ``"random"`` (see :func:`magnitude_prune` / :func:`random_prune`).

    Args:
        inplace: modify ``tensor`` (which the caller owns) instead of returning a new tensor.
        scratch: optional float buffer of ``tensor``'s shape, for ``inplace``.

    Raises:
        ConfigError: unknown method or a negative density.
    """
    check_density(density)
    if method == "magnitude":
        return magnitude_prune_(tensor, density, scratch) if inplace else magnitude_prune(tensor, density)
    if method == "random":
        if inplace:
            return random_prune_(tensor, density, rescale=rescale, generator=generator, scratch=scratch)
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
    return elected_sign(tensors, method) > 0


def elected_sign(tensors: Sequence[torch.Tensor], method: str = "total", out: torch.Tensor | None = None,
                 scratch: torch.Tensor | None = None) -> torch.Tensor:
    """The elected sign per entry as ``+1.0`` / ``-1.0`` (TIES "elect", see :func:`majority_sign`).

    The votes are summed in the order of ``tensors``, as PEFT's ``sum(dim=0)``; zero elects ``+``.

    Args:
        tensors: same-shaped task tensors (not modified).
        method: ``"total"`` or ``"frequency"``.
        out: optional buffer of the tensors' shape and dtype for the result.
        scratch: optional buffer of the same kind (``"frequency"`` only).

    Returns:
        A tensor of ``+1`` and ``-1`` of the tensors' shape and dtype.
    """
    method = MAJORITY_SIGN.check(method)
    first = tensors[0]
    votes = _buffer(first, out)
    if method == "total":
        votes.copy_(first)
        for t in tensors[1:]:
            votes.add_(t)
    else:
        torch.sign(first, out=votes)
        part = _buffer(first, scratch) if len(tensors) > 1 else None
        for t in tensors[1:]:
            votes.add_(torch.sign(t, out=part))
    return votes.ge_(0).mul_(2).sub_(1)  # +1 where the votes are >= 0, else -1


def agrees(tensor: torch.Tensor, positive: torch.Tensor) -> torch.Tensor:
    """Bool mask of the entries whose sign equals the elected one (zeros never agree)."""
    return ((tensor > 0) == positive) & (tensor != 0)


def disjoint_mean(tensors: Sequence[torch.Tensor], weights: Sequence[torch.Tensor | float],
                  positive: torch.Tensor) -> torch.Tensor:
    """Mean of the weighted entries that agree with the elected sign (TIES "disjoint merge"); 0 where none do.

    Args:
        tensors: same-shaped task tensors (not modified).
        weights: one weight per tensor.
        positive: bool tensor, ``True`` where the elected sign is ``+`` (:func:`majority_sign`).
    """
    sign = torch.where(positive, 1.0, -1.0).to(tensors[0].dtype)
    return disjoint_mean_([t.clone() for t in tensors], weights, sign)


def disjoint_mean_(tensors: Sequence[torch.Tensor], weights: Sequence[torch.Tensor | float],
                   sign: torch.Tensor, mask: torch.Tensor | None = None,
                   count: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`disjoint_mean` in place: consumes ``tensors`` (owned by the caller) and returns the first, overwritten.

    ``sum_i w_i x_i [x_i agrees] / max(1, #agree)`` with ``w x [x e > 0] = e (w relu(x e))`` for the elected
    sign ``e = +-1`` (:func:`elected_sign`): the same products and additions as PEFT's, up to exact sign flips.
    The agreeing entries are counted in an int16 tensor (the comparison through NumPy where it can).

    Args:
        tensors: same-shaped task tensors, overwritten.
        weights: one weight per tensor.
        sign: the elected sign, ``+1`` / ``-1`` (not modified).
        mask: optional bool buffer of the tensors' shape.
        count: optional int16 buffer of the tensors' shape (overwritten).
    """
    first = tensors[0]
    agree = _buffer(first, mask, torch.bool)
    count = _buffer(first, count, torch.int16).zero_()
    fast = first.dtype in NUMPY_DTYPES and all(t.is_contiguous() and not t.requires_grad for t in tensors)
    for t, w in zip(tensors, weights):
        t.mul_(sign)  # x e: positive exactly where x agrees with the elected sign
        if fast:
            np.greater(t.numpy(), 0, out=agree.numpy())
            count.add_(agree)
        else:
            count.add_(torch.gt(t, 0, out=agree))
        t.relu_().mul_(w)
        if t is not first:
            first.add_(t)
    count.clamp_(min=1)
    if len(tensors) > 1 and tensors[1].dtype == first.dtype and tensors[1].is_contiguous():
        count = tensors[1].copy_(count)  # consumed already: the count as floats (float / int16 is 4x slower)
    return first.mul_(sign).div_(count).add_(0.0)  # + 0.0: a zero is +0.0, as from PEFT's sum(dim=0)


def weighted_sum(tensors: Sequence[torch.Tensor], weights: Sequence[torch.Tensor | float]) -> torch.Tensor:
    """``sum_i weights[i] * tensors[i]``, accumulated in order; a zero sum is ``+0.0``, as PEFT's ``sum(dim=0)``
    (which starts from ``+0.0``) and its ``+=`` into zeros give it."""
    total = tensors[0] * weights[0]
    for t, w in zip(tensors[1:], weights[1:]):
        total += t * w
    return total.add_(0.0)


def weighted_sum_(tensors: Sequence[torch.Tensor], weights: Sequence[torch.Tensor | float]) -> torch.Tensor:
    """:func:`weighted_sum` in place: consumes ``tensors`` (owned by the caller) and returns the first, overwritten."""
    total = tensors[0].mul_(weights[0])
    for t, w in zip(tensors[1:], weights[1:]):
        total.add_(t.mul_(w))
    return total.add_(0.0)


__all__ = [
    "NUMPY_DTYPES",
    "SIGN_METHODS",
    "Draws",
    "agrees",
    "check_density",
    "disjoint_mean",
    "disjoint_mean_",
    "elected_sign",
    "magnitude_prune",
    "magnitude_prune_",
    "magnitude_prune_rows_",
    "majority_sign",
    "outlier_prune",
    "prune",
    "random_prune",
    "random_prune_",
    "rank_keep_probabilities",
    "rank_magnitude_prune",
    "uniform",
    "weighted_sum",
    "weighted_sum_",
]
