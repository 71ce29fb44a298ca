"""PiSSA / OLoRA / CorDA -> plain LoRA against the ORIGINAL base weights.

PiSSA, OLoRA and CorDA initialise a LoRA ``B0 A0`` from the base weight and subtract it from the base:
``W_res = W - s * B0 A0``. After training to ``B A`` the model computes ``W_res + s * B A``, which equals
``W + s * (B A - B0 A0)``. So the change against the original base is the rank-``2r`` LoRA

    ``ΔW = s * [B | -B0] @ [A ; A0]``

which is exactly what PEFT writes with ``save_pretrained(path_initial_model_for_weight_conversion=...)``:
``r`` and ``lora_alpha`` doubled (``alpha * sqrt(2)`` with rsLoRA, so the scale is unchanged), rank and
alpha patterns doubled and ``init_lora_weights: true``. Here it is a pure function on two checkpoints
(no model, no base weights needed). With ``rank=R`` the rank-``2r`` delta is compressed to rank ``R``
by an exact low-rank SVD (QR of the stacked factors + SVD of the small ``2r x 2r`` core; never builds
``out x in``), and the fraction of the delta's energy (squared Frobenius norm) that is kept is reported.
"""

from __future__ import annotations

import math
import os
from typing import Any

import pandas as pd
import torch

from ..core.adapter import Adapter
from ..core.columns import MODULE, RELATIVE_ERROR, RETAINED_ENERGY
from ..core.kinds import LoRA
from ..core.kinds.base import layer_is_finite
from ..core.linalg import lowrank_svd_parts
from ..core.params import RANK
from ..errors import ConfigError, NonFiniteError, ShapeMismatchError, UnsupportedError
from ..formats.inputs import as_adapter
from ..progress import bar

#: the ``init_lora_weights`` values whose training mutates the base weights
MUTATING_INITS = ("pissa", "olora", "corda", "lora_ga")


def _check_pair(trained: Adapter, initial: Adapter) -> None:
    only_t = sorted(set(trained.layers) - set(initial.layers))
    only_i = sorted(set(initial.layers) - set(trained.layers))
    if only_t or only_i:
        example = f"{only_t[0]} only in the trained adapter" if only_t else f"{only_i[0]} only in the initial adapter"
        raise ConfigError(
            f"the initial and trained adapters target different modules ({len(only_t) + len(only_i)} differ, e.g. "
            f"{example}); pass the initial adapter saved by the same run before training"
        )
    for path, layer in trained.layers.items():
        init = initial.layers[path]
        for which, l in (("trained", layer), ("initial", init)):
            if l.lora_ab() is None:
                raise UnsupportedError(
                    f"{path} of the {which} adapter is a {l.kind} layer; PiSSA/OLoRA/CorDA conversion needs LoRA layers"
                )
            if l.dora:
                raise UnsupportedError(
                    f"{path} of the {which} adapter uses DoRA; its magnitude depends on the mutated base, so it "
                    "cannot be converted to a LoRA of the original base exactly"
                )
            if not l.keeps_as_lora(None):  # a LoRA-form layer with a Tucker core
                raise UnsupportedError(f"{path} of the {which} adapter has a Tucker core; PEFT PiSSA/OLoRA have none")
        if layer.rank != init.rank:
            raise ShapeMismatchError(
                f"{path} has rank {layer.rank} in the trained adapter but {init.rank} in the initial one; "
                "pass the initial adapter saved by the same run before training"
            )
        if tuple(layer.shape) != tuple(init.shape) or layer.down.shape != init.down.shape:
            raise ShapeMismatchError(
                f"{path} adapts a weight of shape {tuple(layer.shape)} in the trained adapter but "
                f"{tuple(init.shape)} in the initial one; the adapters belong to different models"
            )
        if layer.fan_in_fan_out != init.fan_in_fan_out or layer.module_type != init.module_type:
            raise ShapeMismatchError(f"{path} is a different kind of module in the two adapters; they do not belong together")
        for which, l in (("trained", layer), ("initial", init)):
            if not layer_is_finite(l):
                raise NonFiniteError(f"{path} of the {which} adapter holds NaN or Inf; fix or re-save that checkpoint")
    same = all(
        torch.equal(trained.layers[p].down, initial.layers[p].down) and torch.equal(trained.layers[p].up, initial.layers[p].up)
        for p in trained.layers
    )
    if same:
        raise ConfigError(
            "the trained and initial adapters hold identical factors, so the change is zero; pass the adapter "
            "saved BEFORE training as initial and the trained one as trained"
        )


def _check_rslora_patterns(trained: Adapter) -> None:
    cfg = trained.config
    layers = trained.layers.values()
    rslora = bool(cfg.get("use_rslora")) or any(l.rslora for l in layers)
    patterns = bool(cfg.get("rank_pattern")) or bool(cfg.get("alpha_pattern"))
    uneven = len({(l.rank, l.alpha) for l in layers}) > 1
    if rslora and (patterns or uneven):
        raise UnsupportedError(
            "cannot convert an rsLoRA adapter with rank_pattern/alpha_pattern: PEFT refuses this too, because "
            "keeping the scale alpha/sqrt(r) at rank 2r needs alpha*sqrt(2) while PEFT doubles pattern alphas; "
            "retrain without use_rslora or without rank/alpha patterns"
        )


def _doubled(layer: LoRA, init: LoRA) -> LoRA:
    """The exact rank-2r LoRA ``s * [B | -(s0/s) B0] @ [A ; A0]`` (PEFT's conversion, ratio 1 when scales agree)."""
    ratio = init.scale / layer.scale
    dtype = layer.up.dtype
    down = torch.cat([layer.down, init.down.to(layer.down.dtype)], dim=0)
    neg_up0 = -(init.up.to(torch.float32) * ratio) if ratio != 1.0 else -init.up
    up = torch.cat([layer.up, neg_up0.to(dtype)], dim=1)
    alpha = layer.alpha * (math.sqrt(2.0) if layer.rslora else 2.0)
    bias = None
    if layer.bias is not None or init.bias is not None:
        b = torch.zeros(layer.up.shape[0]) if layer.bias is None else layer.bias.to(torch.float32)
        b0 = torch.zeros_like(b) if init.bias is None else init.bias.to(torch.float32)
        bias = (b - ratio * b0).to(dtype)
    return LoRA(down=down, up=up, alpha=_num(alpha), shape=tuple(layer.shape), module_type=layer.module_type,
                fan_in_fan_out=layer.fan_in_fan_out, rslora=layer.rslora, bias=bias)


def _num(x: float) -> float:
    return float(round(x)) if abs(x - round(x)) < 1e-9 else float(x)


def _compressed(layer: LoRA, rank: int) -> tuple[LoRA, dict[str, Any]]:
    """The best rank-``rank`` LoRA of ``layer`` by an exact low-rank SVD, keeping the layer's scale convention."""
    u, v = layer.factors()  # float32, scale folded into u
    keep = min(rank, layer.rank, u.shape[0], v.shape[1])
    left, s, right = lowrank_svd_parts([u], [v])
    # ||U V||_F^2 = trace((U^T U)(V V^T)), computed at rank 2r; the kept energy is that of the top singular values
    total = float(torch.trace((u.double().T @ u.double()) @ (v.double() @ v.double().T)))
    kept = float((s[:keep].double() ** 2).sum())
    energy = min(kept / total, 1.0) if total > 0 else 1.0
    # the same scale at rank keep: alpha * r^-1 (or r^-1/2 with rsLoRA) stays what it was
    alpha = layer.scale * (math.sqrt(keep) if layer.rslora else keep)
    new = LoRA.from_factors(left, s, right, like=layer, rank=keep, alpha=_num(alpha), rslora=layer.rslora,
                            bias=layer.bias)
    row = {"rank_exact": layer.rank, "rank": keep, RETAINED_ENERGY: energy,
           RELATIVE_ERROR: math.sqrt(max(0.0, 1.0 - energy))}
    return new, row


def pissa_to_lora(trained: Adapter | str | os.PathLike, initial: Adapter | str | os.PathLike, rank: int | None = None,
                  return_report: bool = False, progress: bool | None = None) -> Adapter | tuple[Adapter, Any]:
    """Convert a trained PiSSA / OLoRA / CorDA adapter into a plain LoRA for the ORIGINAL base model.

    Args:
        trained: the trained adapter (``Adapter``, directory, file or hub id).
        initial: the same adapter as saved right after initialisation, before training (``Adapter``,
            directory or hub id). PEFT's docs save it with ``init_lora_weights=True``.
        rank: ``None`` for the exact conversion at rank ``2r`` (what PEFT writes); an int ``R`` to
            compress each layer to rank ``R`` by an exact low-rank SVD (the best rank-``R`` approximation).
        return_report: also return a per-layer DataFrame (rank, retained energy = kept fraction of
            ``‖ΔW‖_F²``; 1.0 for the exact conversion).
        progress: a progress bar on stderr (``None``: only on a terminal; see :mod:`adaptkit.progress`).

    Returns:
        The converted adapter (``init_lora_weights: true``, ``r``/``lora_alpha``/patterns as PEFT writes
        them), or ``(adapter, report)`` with ``return_report=True``.

    Raises:
        ConfigError: the adapters target different modules, or are identical (the trained adapter was passed
            as initial), or ``rank`` < 1.
        ShapeMismatchError: a layer has different ranks or shapes in the two adapters.
        UnsupportedError: rsLoRA with rank/alpha patterns (PEFT refuses it too), DoRA, non-LoRA layers.
        NonFiniteError: a factor of either adapter holds NaN or Inf (nothing is written).
    """
    rank = RANK.optional(rank)  # None: the exact conversion
    t, i = as_adapter(trained), as_adapter(initial)
    _check_pair(t, i)
    _check_rslora_patterns(t)
    layers: dict[str, LoRA] = {}
    rows = []
    for path in bar(sorted(t.layers), desc="convert", unit="layer", progress=progress):
        exact = _doubled(t.layers[path], i.layers[path])  # type: ignore[arg-type]
        if rank is None:
            layers[path] = exact
            rows.append({MODULE: path, "rank_exact": exact.rank, "rank": exact.rank, RETAINED_ENERGY: 1.0,
                         RELATIVE_ERROR: 0.0})
        else:
            layers[path], row = _compressed(exact, rank)
            rows.append({MODULE: path, **row})
    config = dict(t.config)
    init_name = str(config.get("init_lora_weights", "")).lower()
    config["init_lora_weights"] = True
    for key in ("corda_config", "eva_config"):
        if config.get(key) is not None:
            config[key] = None
    metadata = dict(t.metadata)
    out = t.replace(layers=layers, config=config, metadata=metadata)
    if not return_report:
        return out
    report = pd.DataFrame(rows)
    report.attrs["converted_from"] = init_name or None
    return out, report


__all__ = ["MUTATING_INITS", "pissa_to_lora"]
