"""Sparse ``(2, n)`` position tensors (row, column) of the spectrum and sparse kinds: FourierFT, WaveFT, SHiRA.

FourierFT and WaveFT do not save their positions; peft draws them from the config's ``random_loc_seed``
(:func:`seeded_positions`). SHiRA saves them. Every such kind checks them with :func:`check_positions`.
"""

from __future__ import annotations

import torch

from ...errors import ShapeMismatchError

#: peft's default ``random_loc_seed`` (FourierFT and WaveFT)
DEFAULT_SEED = 777


def seeded_positions(out_features: int, in_features: int, count: int, seed: int) -> torch.Tensor:
    """The ``(2, count)`` (row, column) positions peft draws for FourierFT/WaveFT from ``seed``.

    peft: ``torch.randperm(out * in, generator=torch.Generator().manual_seed(seed))[:count]``, row ``p // in``,
    column ``p % in``.
    """
    flat = torch.randperm(out_features * in_features, generator=torch.Generator().manual_seed(int(seed)))[:count]
    return torch.stack([flat // in_features, flat % in_features], dim=0)


def check_positions(kind: str, values: torch.Tensor, indices: torch.Tensor, rows: int, cols: int) -> None:
    """Refuse values that are not 1-D, positions that are not ``(2, n)`` or that fall outside ``rows x cols``.

    Raises:
        ShapeMismatchError: naming the kind, the shapes and the matrix size.
    """
    if values.ndim != 1 or tuple(indices.shape) != (2, values.numel()):
        raise ShapeMismatchError(f"{kind} values {tuple(values.shape)} need (2, n) positions, got {tuple(indices.shape)}")
    if indices.numel() and (int(indices.min()) < 0 or int(indices[0].max()) >= rows or int(indices[1].max()) >= cols):
        raise ShapeMismatchError(f"{kind} positions fall outside a ({rows}, {cols}) matrix; they were drawn for another "
                                 "layer shape or the checkpoint is damaged")
