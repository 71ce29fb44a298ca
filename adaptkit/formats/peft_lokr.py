"""Whether PEFT's LoKr can express a LoKr layer, and with which ``decompose_factor``/``decompose_both``/``r``.

PEFT does not store LoKr factor shapes: it recomputes them from the module shape with its
``factorization(dim, decompose_factor)`` and decides from ``r`` whether each factor is full or split
(``use_w1 = not (decompose_both and r < max(a, c) / 2)``, ``use_w2 = r >= max(b, d) / 2``). A layer from
LyCORIS (or one PEFT wrote with other settings) loads only if those rules rebuild its exact layout.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from ..core.kinds import LoKr
from ..errors import UnsupportedError


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """PEFT's split of ``dimension`` into ``(m, n)``, ``m`` close to ``factor``.

    Unlike LyCORIS's, PEFT's does not swap ``(factor, dimension // factor)`` when ``factor`` is the larger.
    """
    if factor > 0 and dimension % factor == 0:
        return factor, dimension // factor
    if factor == -1:
        factor = dimension
    m, n = 1, dimension
    length = m + n
    while m < n:
        new_m = m + 1
        while dimension % new_m != 0:
            new_m += 1
        new_n = dimension // new_m
        if new_m + new_n > length or new_m > factor:
            break
        m, n = new_m, new_n
    if m > n:
        n, m = m, n
    return m, n


def _fits(layer: LoKr, factor: int, decompose_both: bool) -> int | None:
    """The nominal r PEFT needs to rebuild ``layer`` with these settings, or ``None`` if it cannot."""
    out_dim, in_dim, kernel = layer.shape[0], layer.shape[1], tuple(layer.shape[2:])
    out_l, out_k = factorization(out_dim, factor)
    in_m, in_n = factorization(in_dim, factor)
    if layer.w1_shape != (out_l, in_m):
        return None
    if layer.w2_shape not in {(out_k, in_n, *kernel), (out_k, in_n * math.prod(kernel))}:
        return None
    full_w1, full_w2 = layer.w1 is not None, layer.w2 is not None
    split_rank = None
    if not full_w1:
        split_rank = layer.w1a.shape[1]
    if not full_w2:
        r2 = layer.t2.shape[0] if layer.t2 is not None else layer.w2a.shape[1]
        if split_rank is not None and r2 != split_rank:
            return None
        split_rank = r2
    candidates = [split_rank] if split_rank is not None else [layer.rank, *range(1, max(out_dim, in_dim) + 1)]
    for r in candidates:
        use_w1 = not (decompose_both and r < max(out_l, in_m) / 2)
        use_w2 = r >= max(out_k, in_n) / 2
        if use_w1 == full_w1 and use_w2 == full_w2:
            return r
    return None


def choose_layout(layers: Mapping[str, LoKr], preferred_factor: int = -1) -> tuple[int, bool, dict[str, int]]:
    """Find PEFT settings that rebuild every layer's exact tensor layout.

    Returns:
        ``(decompose_factor, decompose_both, {path: r})``.

    Raises:
        UnsupportedError: no single setting fits all layers; the message names a layer that does not fit.
    """
    factors = [preferred_factor, -1]
    for layer in layers.values():
        factors += [layer.w1_shape[0], layer.w1_shape[1], layer.w2_shape[0], layer.w2_shape[1]]
    tried = []
    for factor in dict.fromkeys(f for f in factors if f == -1 or f > 0):
        for both in (False, True):
            ranks = {}
            for path, layer in layers.items():
                r = _fits(layer, factor, both)
                if r is None:
                    tried.append(path)
                    break
                ranks[path] = r
            else:
                return factor, both, ranks
    bad = tried[0] if tried else next(iter(layers))
    raise UnsupportedError(
        f"PEFT's LoKr factorisation cannot rebuild the factor shapes of {bad} (w1 {layers[bad].w1_shape}, "
        f"w2 {layers[bad].w2_shape}); write format='kohya', or convert(kind='lora', rank=R)"
    )


def lokr_reasons(layers: Mapping[str, LoKr]) -> dict[str, str]:
    """Why PEFT cannot store LoKr layers of one adapter: ``{path: reason}``, empty when one setting fits all.

    A layer no setting fits is named with its factor shapes; when each fits alone but no one setting fits all,
    every layer is named.
    """
    try:
        choose_layout(layers)
        return {}
    except UnsupportedError:
        pass
    out = {}
    for p, l in layers.items():
        try:
            choose_layout({p: l})
        except UnsupportedError:
            out[p] = f"PEFT's LoKr factorisation cannot rebuild factors w1 {l.w1_shape} x w2 {l.w2_shape}"
    if not out:
        out = {p: "no single PEFT decompose_factor rebuilds every LoKr layer" for p in layers}
    return out

