"""C3A: a block-circulant update, ``dW = blockcirc(kernel) / in_features`` (PEFT ``c3a_kernel``).

PEFT (``tuners/c3a``) stores ``c3a_kernel (out / b, in / b, b)``; block ``(m, n)`` of the delta is the
``b x b`` circulant matrix with ``C[i, j] = kernel[m, n, (j - i) mod b]`` (peft builds it with FFTs of an
identity, ``get_circulant_fast``; this kind indexes it directly). Gotchas: the division by
``in_features`` (the base weight's last dimension) is part of peft's ``get_delta_weight``; the kernel is
always float32 in peft; only ``nn.Linear``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ...errors import ShapeMismatchError
from .additive import AdditiveKind
from .base import check_floating, f32, math_shape


@dataclass(frozen=True, eq=False, repr=False)  # repr: base.layer_repr
class C3A(AdditiveKind):
    """One C3A layer.

    Args:
        kernel: ``c3a_kernel`` ``(out / b, in / b, b)``.
        shape: module weight shape (module orientation).
        fan_in_fan_out: the module stores the transpose (a ``Conv1D``; peft adapts ``nn.Linear`` only).
    """

    kernel: torch.Tensor
    shape: tuple[int, ...]
    module_type: str = "linear"
    fan_in_fan_out: bool = False

    kind: ClassVar[str] = "c3a"
    rank: ClassVar[None] = None
    alpha: ClassVar[None] = None

    def __post_init__(self) -> None:
        check_floating(self)
        k = self.kernel
        if len(self.shape) != 2:
            raise ShapeMismatchError(f"C3A adapts 2-D weights, got weight shape {tuple(self.shape)}")
        out, inp = math_shape(tuple(self.shape), self.fan_in_fan_out)
        if k.ndim != 3 or k.shape[0] * k.shape[2] != out or k.shape[1] * k.shape[2] != inp:
            raise ShapeMismatchError(f"C3A kernel has shape {tuple(k.shape)}; for a weight of shape {tuple(self.shape)} "
                                     "it must be (out / b, in / b, b)")

    @property
    def block_size(self) -> int:
        """The circulant block size ``b``."""
        return int(self.kernel.shape[2])

    @property
    def scale(self) -> float:
        """``1 / in_features``."""
        return 1.0 / math_shape(tuple(self.shape), self.fan_in_fan_out)[1]

    def delta_math(self) -> torch.Tensor:
        """Float32 delta ``(out, in)``."""
        b = self.block_size
        m, n = self.kernel.shape[:2]
        pos = (torch.arange(b)[None, :] - torch.arange(b)[:, None]) % b  # (i, j) -> (j - i) mod b
        blocks = f32(self.kernel)[:, :, pos]  # (m, n, b, b)
        return blocks.permute(0, 2, 1, 3).reshape(m * b, n * b) * self.scale
