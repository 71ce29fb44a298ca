"""Extract a LoRA from the difference of two models (``tuned - base``), streaming tensor by tensor.

Each changed weight's difference ``D`` (float32, conv kernels flattened to ``(out, in*k)``) is factored by
a truncated SVD: exact (``torch.linalg.svd``) for small matrices or large ranks, randomized
(``torch.svd_lowrank`` with oversampling and power iterations) otherwise. The rank is fixed (``rank``) or
the smallest that keeps a fraction ``energy`` of ``||D||_F^2`` (capped by ``rank`` when both are given).
Accuracy check: the retained energy and relative error in the report are *measured* from the factors
(``||D - B A||_F / ||D||_F``), not taken from the SVD's own estimate, so a poor randomized approximation
shows up in the report; with ``energy`` the randomized SVD widens its subspace until the target is met.
Factors are stored as ``B = U sqrt(S)``, ``A = sqrt(S) V^T`` with ``alpha = r`` (scale 1).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import pandas as pd
import torch

from ..core.adapter import Adapter
from ..core.columns import DELTA_NORM, MODULE, RELATIVE_ERROR, RETAINED_ENERGY
from ..core.kinds import LoRA
from ..core.linalg import split_factors, truncated_svd
from ..core.params import (
    EMBEDDINGS,
    ENERGY,
    NITER,
    NORMS,
    OVERSAMPLE,
    RANK,
    SEED,
    SVD_METHOD,
)
from ..errors import ConfigError, ShapeMismatchError
from ..formats import save
from ..io.base_model import TensorReader, open_base
from ..io.outputs import check_output
from ..io.safetensors import FLOAT_ST
from ..progress import bar

_EMBED = ("embed", "wte", "wpe", "word_embeddings", "shared")


def _is_embedding(key: str) -> bool:
    last = key.removesuffix(".weight").rsplit(".", 1)[-1]
    return any(e in last for e in _EMBED)


def _factor(key: str, d: torch.Tensor, kind: str, rank, energy, method, oversample, niter, seed, dtype):
    """A LoRA layer for one difference and its report numbers."""
    shape = tuple(d.shape)
    mat = d.T if kind == "embedding" else d.reshape(shape[0], -1)  # the math orientation (embedding: (dim, num))
    u, s, vh, k = truncated_svd(mat, rank, energy, method, oversample, niter, seed)
    up, down = split_factors(u, s, vh, k)
    resid = float(torch.linalg.vector_norm(mat - up @ down))
    norm = float(torch.linalg.vector_norm(mat))
    rel = resid / norm if norm > 0 else 0.0
    module_type = "embedding" if kind == "embedding" else ("conv" if len(shape) > 2 else "linear")
    layer = LoRA.from_factors(up, None, down, shape=shape, module_type=module_type,
                              fan_in_fan_out=kind == "embedding", dtype=dtype)
    return layer, {"rank": k, RETAINED_ENERGY: 1.0 - rel * rel, RELATIVE_ERROR: rel, DELTA_NORM: norm}


def extract(base: str | os.PathLike, tuned: str | os.PathLike, rank: int | None = None, energy: float | None = None,
            out: str | os.PathLike | None = None, *, embeddings: str = "skip", norms: str = "skip", method: str = "auto",
            dtype: torch.dtype = torch.float32, oversample: int = 16, niter: int = 4, seed: int = 0,
            overwrite: bool = False, progress: bool | None = None, return_report: bool = False) -> Any:
    """Extract a LoRA adapter from the difference of two models with the same tensors.

    Args:
        base: the base model (hub id, directory of safetensors shards, or one file).
        tuned: the fine-tuned (or fused) model, same tensor names and shapes.
        rank: LoRA rank per layer (the maximum rank when ``energy`` is also given).
        energy: keep the smallest rank per layer retaining this fraction of ``||tuned - base||_F^2``
            (e.g. ``0.9``); ranks then differ per layer and are written as ``rank_pattern``/``alpha_pattern``.
        out: write the adapter here in PEFT format (optional).
        embeddings: changed embedding matrices: ``"skip"`` (reported as dropped), ``"lora"`` (embedding
            LoRA) or ``"save"`` (stored whole, as PEFT ``modules_to_save``).
        norms: changed 1-D tensors (norms, biases without a LoRA'd weight): ``"skip"`` or ``"save"`` (whole).
        method: ``"auto"`` (exact SVD up to 1024 or for ranks above a quarter of the size, else
            randomized), ``"exact"`` or ``"randomized"``.
        dtype: dtype of the stored factors.
        oversample: extra columns of the randomized SVD's subspace.
        niter: power iterations of the randomized SVD.
        seed: seed of the randomized SVD.
        overwrite: replace an existing ``out``.
        progress: show a progress bar (``None``: only on a terminal).
        return_report: also return the per-layer report.

    Returns:
        The :class:`~adaptkit.graph.Adapter`, or ``(adapter, report)`` with ``return_report``: a DataFrame with
        one row per changed tensor: ``module``, ``action`` (``lora``/``saved``/``skipped``), ``shape``,
        ``rank``, ``retained_energy`` (retained fraction of ``||D||^2``, measured), ``relative_error``, ``delta_norm``.

    Raises:
        ConfigError: neither ``rank`` nor ``energy``, a bad option, or models whose tensors differ.
        ShapeMismatchError: a tensor has different shapes in the two models.
    """
    if rank is None and energy is None:
        raise ConfigError("give rank=R or energy=E (a fraction in (0, 1]) to choose the LoRA rank")
    rank, energy = RANK.optional(rank), ENERGY.optional(energy)
    method, embeddings, norms = SVD_METHOD.check(method), EMBEDDINGS.check(embeddings), NORMS.check(norms)
    oversample, niter, seed = OVERSAMPLE.check(oversample), NITER.check(niter), SEED.check(seed)
    if out is not None:
        check_output(out, overwrite, inputs=[base, tuned])
    wb, wt = open_base(base), open_base(tuned)
    missing = sorted(set(wb.tensors) ^ set(wt.tensors))
    if missing:
        raise ConfigError(
            f"the models have different tensors ({len(missing)}, e.g. {missing[0]}); extract needs a base and a "
            "fine-tune of the same architecture"
        )
    keys = sorted(wb.tensors, key=lambda k: (str(wb.tensors[k].file), wb.tensors[k].begin))
    layers: dict[str, LoRA] = {}
    extras: dict[str, torch.Tensor] = {}
    saved_modules: list[str] = []
    rows: list[dict[str, Any]] = []
    bias_diffs: dict[str, torch.Tensor] = {}
    with TensorReader() as reader:
        for key in bar(keys, desc="extract", unit="tensor", progress=progress):
            ib, it = wb.tensors[key], wt.tensors[key]
            if ib.shape != it.shape:
                raise ShapeMismatchError(f"tensor '{key}' has shape {ib.shape} in the base but {it.shape} in the tuned model")
            if ib.dtype not in FLOAT_ST or it.dtype not in FLOAT_ST:
                continue
            tuned_t = reader.read(it)
            d = tuned_t.to(torch.float32) - reader.read(ib).to(torch.float32)
            if not bool(d.any()):
                continue
            module = key.removesuffix(".weight").removesuffix(".bias")
            row = {MODULE: module, "tensor": key, "shape": "x".join(map(str, ib.shape)), "rank": None,
                   RETAINED_ENERGY: 0.0, RELATIVE_ERROR: 1.0, DELTA_NORM: float(torch.linalg.vector_norm(d))}
            kind = "embedding" if len(ib.shape) == 2 and _is_embedding(key) else "linear"
            if len(ib.shape) >= 2 and key.endswith(".weight"):
                choice = embeddings if kind == "embedding" else "lora"
            else:
                choice = "bias" if key.endswith(".bias") else norms
            if choice == "lora":
                layer, numbers = _factor(key, d, kind, rank, energy, method, oversample, niter, seed, dtype)
                layers[module] = layer
                row.update(numbers, action="lora")
            elif choice == "bias":
                bias_diffs[key] = (d, tuned_t)
                row["action"] = "bias"
            elif choice == "save":
                extras[key] = tuned_t.clone()
                saved_modules.append(module)
                row.update(retained_energy=1.0, relative_error=0.0, action="saved")
            else:
                row["action"] = "skipped"
            rows.append(row)
    _place_biases(bias_diffs, layers, extras, saved_modules, rows, norms)
    if not layers:
        raise ConfigError("no weight differs between the two models in a way a LoRA can hold; nothing to extract")
    config: dict[str, Any] = {"peft_type": "LORA", "modules_to_save": sorted(set(saved_modules)) or None}
    adapter = Adapter(layers=layers, base_model=str(base), config=config, extras=extras, format="peft",
                      source=f"extract({base}, {tuned})")
    report = pd.DataFrame(rows, columns=[MODULE, "tensor", "action", "shape", "rank", RETAINED_ENERGY, RELATIVE_ERROR,
                                         DELTA_NORM])
    if out is not None:
        save(adapter, out, format="peft", overwrite=overwrite)
    return (adapter, report) if return_report else adapter


def _place_biases(bias_diffs, layers, extras, saved_modules, rows, norms) -> None:
    """Bias changes of LoRA'd layers become ``lora_B.bias``; other bias changes follow the ``norms`` option."""
    by_key = {r["tensor"]: r for r in rows}
    for key, (d, tuned_t) in bias_diffs.items():
        module = key.removesuffix(".bias")
        row = by_key[key]
        if module in layers:
            layer = layers[module]
            layers[module] = dataclasses.replace(layer, bias=(d / layer.scale).to(layer.up.dtype))
            row.update(action="lora bias", retained_energy=1.0, relative_error=0.0)
        elif norms == "save":
            extras[key] = tuned_t.clone()
            saved_modules.append(module)
            row.update(action="saved", retained_energy=1.0, relative_error=0.0)
        else:
            row["action"] = "skipped"


def total_retained(report: Any) -> float:
    """Energy retained over all changed tensors (``1 - sum resid^2 / sum ||D||^2``) from an extract report."""
    norm2 = (report[DELTA_NORM] ** 2).sum()
    if norm2 == 0:
        return 1.0
    return float(1.0 - ((report[RELATIVE_ERROR] * report[DELTA_NORM]) ** 2).sum() / norm2)


__all__ = ["extract", "total_retained"]
