"""Reusable buffers for the dense merge methods: one :class:`Workspace` per merge call.

The ``*_svd`` methods build an ``m x n`` delta per input and work on them in place with a few scratch
tensors. A fresh tensor of that size is served by ``mmap`` (glibc maps every allocation above 32 MiB anew)
and pays a page fault per 4 KiB on first touch: 25-35 ms for one 5632 x 2048 float32 matrix on the
benchmark machine, as much as three passes of arithmetic over it. A :class:`Workspace` hands out the same
memory to every layer of one merge (a view of the first ``numel`` entries of a slot that only grows), and
is dropped with the merge, so nothing outlives the call.
"""

from __future__ import annotations

import math

import torch


class Workspace:
    """Named, growing buffers: :meth:`buffer` returns uninitialised memory, reused across calls with the same name.

    A caller must be done with a name's previous buffer before asking for it again (the merge asks once per
    layer, after the previous layer's result has been factored).
    """

    def __init__(self) -> None:
        self._slots: dict[tuple[str, torch.dtype], torch.Tensor] = {}

    def buffer(self, name: str, shape: tuple[int, ...] | torch.Size, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """A contiguous, uninitialised tensor of ``shape`` and ``dtype`` in the slot ``name``.

        Args:
            name: the slot (one live tensor per name and dtype).
            shape: the shape wanted.
            dtype: its dtype.
        """
        numel = math.prod(shape)
        slot = self._slots.get((name, dtype))
        if slot is None or slot.numel() < numel:
            slot = self._slots[(name, dtype)] = torch.empty(numel, dtype=dtype)
        return slot[:numel].view(tuple(shape))

    @property
    def nbytes(self) -> int:
        """Bytes held by all slots."""
        return sum(t.numel() * t.element_size() for t in self._slots.values())


__all__ = ["Workspace"]
