"""Weight decomposition (DoRA): the magnitude/direction re-normalisation shared by every kind that has it.

PEFT stores one magnitude per output feature (``lora_magnitude_vector``); LyCORIS's ``dora_scale`` is
per output (``wd_on_out=True``, shape ``(out, 1)``) or per input (shape ``(1, in)``). Both are
``W' = m * (W + dW) / ||W + dW||`` with the norm taken over every axis but the magnitude's.
"""

from __future__ import annotations

import torch


def dora_apply(weight_math: torch.Tensor, delta_math: torch.Tensor, magnitude: torch.Tensor, axis: int) -> torch.Tensor:
    """Apply DoRA in the math orientation ``(out, in, *k)``.

    Args:
        weight_math: base weight, float32, math orientation.
        delta_math: the scaled low-rank delta, same shape.
        magnitude: 1-D magnitude, as long as ``weight_math.shape[axis]``.
        axis: 0 for a magnitude per output feature (PEFT), 1 per input feature.

    Returns:
        The re-normalised weight, float32, math orientation.
    """
    combined = weight_math + delta_math
    dims = tuple(d for d in range(combined.ndim) if d != axis)
    norm = torch.linalg.vector_norm(combined, dim=dims, keepdim=True)
    view = [1] * combined.ndim
    view[axis] = -1
    return combined * (magnitude.to(torch.float32).view(view) / norm)

