"""Fused projections as block LoRAs: stack per-projection layers into one layer on the packed weight, split back.

Diffusion transformers in their original layouts pack projections into one weight (Flux's ``img_attn.qkv``
holds diffusers' ``to_q``/``to_k``/``to_v``; its single-block ``linear1`` holds ``to_q``/``to_k``/``to_v``/
``proj_mlp``). Both directions are exact:

* **stack** (:func:`stack_rows`): members ``B_i A_i`` become one LoRA with ``A = [A_1; A_2; ...]`` (concatenated)
  and ``B = diag(B_1, B_2, ...)`` (block-diagonal), rank = the sum of the ranks. Absent members are zero rows. When
  the members' scales differ (per-slice alphas), each scale is baked into its block of ``B`` and the fused layer
  has scale 1, because the packed layer holds one alpha; equal scales are kept, with the tensors unchanged.
* **split** (:func:`split_rows`): a block-structured LoRA (every row slice of ``B`` uses its own set of ``A``'s
  rows, as stacking makes them) splits into those blocks, each at its own rank with the tensors unchanged;
  any other LoRA splits into row slices of ``B`` that share the whole ``A`` (rank unchanged). Both are exact:
  no SVD is needed, because ``ΔW[rows] = B[rows] A``.

A row permutation (:func:`swap_halves`: diffusers' ``AdaLayerNormContinuous`` emits ``(scale, shift)`` where the
original final layer emits ``(shift, scale)``) permutes ``B``'s rows and the bias.

Layers that are not plain LoRA are first turned into their exact LoRA form (``layer.to_lora(None)``: LoHa, LoKr,
full differences at their numerical rank); base-dependent kinds (OFT-like) cannot be sliced and are refused.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..errors import UnsupportedError
from .kinds import LoRA
from .kinds.base import Layer, layer_dtype


@dataclass(frozen=True)
class Split:
    """The outcome of :func:`split_rows`: one layer per row slice (``None`` where the slice is all zero), and how."""

    layers: tuple[Layer | None, ...]
    method: str  # "blocks" (each slice at its own rank) | "shared" (B's rows, A shared) | "rename"


def _as_lora(layer: Layer, where: str) -> LoRA:
    if not layer.additive and not layer.dora:
        raise UnsupportedError(f"{where}: a {layer.kind} layer changes the weight through the base and cannot be split "
                               "into or stacked from projections; fuse it into the base instead")
    if layer.lora_obstacle() is not None:
        raise UnsupportedError(f"{where}: {layer.lora_obstacle()}")
    lora = layer if layer.keeps_as_lora(None) else layer.to_lora(None)[0]
    if lora.mid is not None or lora.module_type != "linear" or lora.fan_in_fan_out:
        raise UnsupportedError(f"{where}: only linear LoRA layers are split into or stacked from projections")
    return lora


def swap_halves(layer: Layer, where: str) -> Layer:
    """The layer with the two halves of its output rows swapped (``(shift, scale)`` <-> ``(scale, shift)``)."""
    lora = _as_lora(layer, where)
    n = lora.up.shape[0]
    if n % 2:
        raise UnsupportedError(f"{where} has {n} output rows; swapping shift and scale needs an even number")
    perm = torch.cat([torch.arange(n // 2, n), torch.arange(0, n // 2)])
    return dataclasses.replace(
        lora, up=lora.up[perm].contiguous(),
        bias=None if lora.bias is None else lora.bias[perm].contiguous(),
        magnitude=None if lora.magnitude is None or lora.magnitude_axis != 0 else lora.magnitude[perm].contiguous())


def unit_scale(layer: Layer, where: str) -> Layer:
    """The layer with scale 1 (``alpha = r``, the scale baked into ``up`` and the bias): the same ΔW."""
    lora = _as_lora(layer, where)
    if lora.scale == 1.0 and not lora.rslora:
        return lora
    s = lora.scale
    return dataclasses.replace(lora, up=(lora.up.float() * s).to(lora.up.dtype), alpha=float(lora.rank), rslora=False,
                               bias=None if lora.bias is None else (lora.bias.float() * s).to(lora.bias.dtype))


def _blocks(up: torch.Tensor, sizes: Sequence[int]) -> list[torch.Tensor] | None:
    """Column index sets of ``up``'s row slices when they are disjoint (a block structure), else ``None``."""
    used: list[torch.Tensor] = []
    seen = torch.zeros(up.shape[1], dtype=torch.bool)
    start = 0
    for n in sizes:
        cols = (up[start:start + n] != 0).any(dim=0)
        if (cols & seen).any():
            return None
        seen |= cols
        used.append(torch.nonzero(cols).flatten())
        start += n
    return used


def split_rows(layer: Layer, sizes: Sequence[int], where: str) -> Split:
    """Split a layer on a packed weight into one layer per row slice of ``sizes``, exactly.

    Args:
        layer: the layer on the packed weight (``(sum(sizes), in)``).
        sizes: the output rows of each member, in the packed order.
        where: the module's name, for messages.

    Returns:
        :class:`Split`; a member whose rows the layer does not change is ``None``.

    Raises:
        UnsupportedError: the layer is not additive or not linear, or its rows are not ``sum(sizes)``.
    """
    lora = _as_lora(layer, where)
    total = int(lora.up.shape[0])
    if sum(sizes) != total:
        raise UnsupportedError(f"{where} has {total} output rows but its projections in the target have {sum(sizes)} "
                               f"({' + '.join(map(str, sizes))}); is the adapter for another model size? (pass --base)")
    blocks = _blocks(lora.up.reshape(total, -1), sizes) if not lora.dora else None
    out: list[Layer | None] = []
    start = 0
    for i, n in enumerate(sizes):
        rows = slice(start, start + n)
        start += n
        bias = None if lora.bias is None else lora.bias[rows].contiguous()
        if blocks is not None:
            cols = blocks[i]
            if cols.numel() == 0 and (bias is None or not bias.any()):
                out.append(None)
                continue
            if cols.numel() == 0:  # only a bias: keep one zero rank so the layer still exists
                cols = torch.tensor([0])
            r = int(cols.numel())
            alpha = lora.scale * (r ** 0.5 if lora.rslora else r)
            out.append(dataclasses.replace(lora, up=lora.up[rows][:, cols].contiguous(), down=lora.down[cols].contiguous(),
                                           alpha=alpha, shape=(n, *lora.shape[1:]), bias=bias))
        else:
            mag = None if lora.magnitude is None else lora.magnitude[rows].contiguous()
            out.append(dataclasses.replace(lora, up=lora.up[rows].contiguous(), shape=(n, *lora.shape[1:]), bias=bias,
                                           magnitude=mag))
    return Split(tuple(out), "blocks" if blocks is not None else "shared")


def stack_rows(members: Sequence[Layer | None], sizes: Sequence[int], in_features: int, where: str) -> Layer:
    """One block LoRA on a packed weight from per-projection layers (``None`` = that member unchanged), exactly.

    Args:
        members: the layers, in the packed order.
        sizes: the output rows of each member.
        in_features: the packed weight's input features.
        where: the packed module's name, for messages.

    Raises:
        UnsupportedError: no member has a layer, a member is not additive/linear, shapes disagree, or DoRA layers
            are stacked with absent members (their rows' norms would need the base).
    """
    present = [(i, _as_lora(m, f"{where} (member {i})")) for i, m in enumerate(members) if m is not None]
    if not present:
        raise UnsupportedError(f"{where}: no member has a layer to stack")
    for i, m in present:
        if tuple(m.shape) != (sizes[i], in_features):
            raise UnsupportedError(f"{where}: member {i} has shape {tuple(m.shape)}, the packed weight needs "
                                   f"({sizes[i]}, {in_features})")
    dora = [m.dora for _, m in present]
    if any(dora) and (not all(dora) or len(present) != len(members)):
        raise UnsupportedError(f"{where}: DoRA layers are stacked only when every projection has one (the others' "
                               "magnitudes would need the base)")
    scales = {m.scale for _, m in present}
    rslora = {m.rslora for _, m in present}
    same = len(scales) == 1 and len(rslora) == 1
    dtype = layer_dtype(present[0][1])
    rank = sum(m.rank for _, m in present)
    up = torch.zeros(sum(sizes), rank, dtype=dtype)
    downs, biases, mags = [], [], []
    row = col = 0
    by_index = dict(present)
    for i, n in enumerate(sizes):
        m = by_index.get(i)
        if m is not None:
            block = m.up.reshape(n, m.rank).to(dtype)
            up[row:row + n, col:col + m.rank] = block if same else block * m.scale
            downs.append(m.down.reshape(m.rank, -1).to(dtype))
            col += m.rank
            if m.magnitude is not None:
                mags.append(m.magnitude)
        bias = None if m is None or m.bias is None else (m.bias.to(dtype) if same else m.bias.to(dtype) * m.scale)
        biases.append(bias)
        row += n
    bias = None
    if any(b is not None for b in biases):
        bias = torch.cat([torch.zeros(n, dtype=dtype) if b is None else b for b, n in zip(biases, sizes)])
    first = present[0][1]
    if same:
        alpha = first.scale * (rank ** 0.5 if first.rslora else rank)
        rs = first.rslora
    else:
        alpha, rs = float(rank), False
    return LoRA(down=torch.cat(downs), up=up, alpha=alpha, shape=(sum(sizes), in_features), module_type="linear",
                rslora=rs, magnitude=torch.cat(mags) if mags else None, bias=bias)


__all__ = ["Split", "split_rows", "stack_rows", "swap_halves", "unit_scale"]
