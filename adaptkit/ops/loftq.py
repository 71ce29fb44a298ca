"""LoftQ initialisation from a base checkpoint, streamed tensor by tensor (no model, no bitsandbytes, no GPU).

For each targeted linear weight ``W`` (math orientation ``(out, in)``), LoftQ picks LoRA factors so that the
quantised base plus the LoRA is close to ``W``:

1. ``Q = deq(quant(W'))`` with ``W' = W`` (NF4 block-64 or int8, see :mod:`adaptkit.converters.quant`);
2. ``L R`` = the rank-``r`` truncated SVD of the residual ``W - Q`` (PEFT's ``_low_rank_decomposition``);
3. for ``iters > 1``: ``W' = W - L R`` and repeat (the alternating LoftQ algorithm). The base to quantise
   is then no longer ``W``: like PEFT's ``loftq_init``, the dequantised ``Q`` of the last round is written
   as the new base weight (re-quantising it gives the same codes).

Unlike PEFT (whose LoftQ ignores the LoRA scaling), the scale ``s = alpha / r`` is compensated:
``B = L / sqrt(s)``, ``A = R / sqrt(s)``, so ``s * B @ A = L R`` for any ``alpha``.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from ..core.adapter import Adapter
from ..core.columns import MODULE
from ..core.kinds import LoRA
from ..core.kinds.base import tensor_is_finite
from ..core.linalg import split_factors
from ..core.params import ALPHA, BITS, ITERS, RANK
from ..errors import ConfigError, NonFiniteError, UnsupportedError
from ..formats import peft as peft_format
from ..formats.inputs import as_adapter
from ..formats.patterns import matches_targets
from ..io.base_model import TensorInfo, TensorReader, WeightSet, open_base
from ..io.outputs import atomic_output, check_output
from ..io.shard_writer import copy_side_files, write_patched_copy
from ..progress import bar
from .quant import dequantize, quantize

#: module names that hold embeddings or the output layer: never "all-linear" targets (PEFT skips the output layer)
NOT_LINEAR = ("embed_tokens", "wte", "wpe", "word_embeddings", "position_embeddings", "token_type_embeddings",
              "embed_positions", "lm_head", "embed_out", "output_layer")


@dataclass(frozen=True, eq=False)
class LoftQResult:
    """What :func:`loftq` returns.

    Args:
        adapter: the LoRA adapter (float32 factors; ``init_lora_weights: true``).
        report: one row per targeted layer: quantisation error before (QLoRA: ``‖W - deq(Q(W))‖_F``) and after
            (``‖W - deq(Q(W')) - s·B·A‖_F``), both also relative to ``‖W‖_F``, and the reduction.
        out: the directory written (adapter at its root, adjusted base in ``base/`` when ``iters > 1``), or ``None``.
        base_out: the adjusted base directory, or ``None`` (``iters == 1``: quantise the original base).
    """

    adapter: Adapter
    report: Any
    out: Path | None = None
    base_out: Path | None = None

    @property
    def mean_reduction(self) -> float:
        """Mean over layers of ``1 - after / before``."""
        return float(self.report["reduction"].mean()) if len(self.report) else 0.0


def loftq_layer(weight: torch.Tensor, bits: int, rank: int, iters: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Alternating LoftQ on one float32 ``(out, in)`` weight (PEFT's ``loftq_init`` without bitsandbytes).

    Returns:
        ``(L, R, base_deq, plain_deq)``: unscaled factors (``L @ R`` approximates ``W - base_deq``), the
        dequantised base to use (``deq(Q(W'))``) and the plain QLoRA ``deq(Q(W))`` for the report.
    """
    w = weight.to(torch.float32)
    res = w
    plain = None
    for i in range(iters):
        deq = dequantize(quantize(res, bits))
        if plain is None:
            plain = deq
        left, right = split_factors(*torch.linalg.svd(w - deq, full_matrices=False), rank)  # PEFT's _low_rank_decomposition
        if i + 1 == iters:
            break
        res = w - left @ right
    return left, right, deq, plain  # type: ignore[return-value]


# ------------------------------------------------------------------------------------------- the plan


def _is_candidate(info: TensorInfo) -> bool:
    if not info.key.endswith(".weight") or len(info.shape) != 2 or info.dtype not in ("F32", "F16", "BF16"):
        return False
    return info.key[: -len(".weight")].rsplit(".", 1)[-1] not in NOT_LINEAR


def _targets(target: str | Iterable[str] | None) -> str | list[str] | None:
    if target is None:
        return None
    if isinstance(target, str):
        if target == "all-linear":
            return "all-linear"
        return [t.strip() for t in target.split(",") if t.strip()]
    return list(target)


def _plan(ws: WeightSet, targets: str | list[str] | None, layout: Adapter | None) -> list[TensorInfo]:
    """The weights to process, file by file (by name within a file); checks every target matched."""
    plan: list[TensorInfo] = []
    seen: list[str] = []
    for group in ws.groups:
        for f in group.files:
            for info in sorted((t for t in ws.tensors.values() if t.file == f), key=lambda t: t.key):
                if not _is_candidate(info):
                    continue
                module = info.key[: -len(".weight")]
                seen.append(module)
                if layout is not None:
                    hit = module in layout.layers
                elif targets == "all-linear":
                    hit = True
                else:
                    hit = matches_targets(targets, module)
                if hit:
                    plan.append(info)
    found = {t.key[: -len(".weight")] for t in plan}
    if layout is not None:
        missing = sorted(set(layout.layers) - found)
        if missing:
            raise ConfigError(
                f"the adapter's layer {missing[0]} has no linear weight in the base ({len(missing)} missing); "
                "pass the base model the adapter was made for"
            )
    if not found:
        example = ", ".join(sorted({m.rsplit('.', 1)[-1] for m in seen})[:8]) or "none"
        raise ConfigError(f"no linear weight of the base matches target modules {targets!r}; its linear modules "
                          f"end in: {example}")
    return plan


# ------------------------------------------------------------------------------------------------ loftq


def loftq(base: str | os.PathLike, target: str | Iterable[str] | Adapter | None = None, bits: int = 4, iters: int = 1,
          rank: int = 16, alpha: float | None = None, adapter: Adapter | str | os.PathLike | None = None,
          out: str | os.PathLike | None = None, overwrite: bool = False, progress: bool | None = None) -> LoftQResult:
    """LoftQ initialisation of a LoRA for a base checkpoint, streamed over its safetensors shards.

    Args:
        base: base model: hub id, directory (single file or sharded with ``model.safetensors.index.json``) or
            ``.safetensors`` file.
        target: module names (a list, or a comma-separated string; PEFT's suffix rule) or ``"all-linear"``
            (every 2-D linear weight except embeddings and the output layer), or an :class:`Adapter` (same as
            ``adapter``).
        bits: 4 (NF4, block 64) or 8 (int8, row-wise).
        iters: LoftQ alternating iterations; ``> 1`` also changes the base weights to quantise (needs ``out``).
        rank: LoRA rank (ignored for layers an ``adapter`` gives).
        alpha: LoRA alpha; ``None`` means ``alpha = rank`` (scale 1). The scale is compensated either way.
        adapter: an existing LoRA adapter (``Adapter``, dir or hub id) whose targets, per-layer ranks and
            alphas (and config fields) to use; its factors are replaced.
        out: directory to write: the PEFT adapter at its root and, for ``iters > 1``, the adjusted base in
            ``out/base`` (same shards and files as the input, targeted weights replaced).
        overwrite: replace an existing ``out``.
        progress: a progress bar on stderr (``None``: only on a terminal; see :mod:`adaptkit.progress`).

    Returns:
        A :class:`LoftQResult` with the adapter and the per-layer error report.

    Raises:
        ConfigError: bad bits/iters/rank, no target matched, ``iters > 1`` without ``out``.
        NonFiniteError: a targeted base weight holds NaN or Inf, or the given adapter does (tensors, alpha, scale).
        SourceNotFoundError / FormatError: the base cannot be found or read.
    """
    bits, iters, rank, alpha = BITS.check(bits), ITERS.check(iters), RANK.check(rank), ALPHA.optional(alpha)
    if iters > 1 and out is None:
        raise ConfigError("iters > 1 changes the base weights to quantise; pass out=DIR to write them with the adapter")
    if isinstance(target, Adapter):
        if adapter is not None:
            raise ConfigError("pass the existing adapter once, as target or as adapter=, not both")
        adapter, target = target, None
    if out is not None:
        check_output(out, overwrite, inputs=[base, adapter])
    layout = None
    if adapter is not None:
        layout = as_adapter(adapter)
        layout.check_finite("LoftQ (it takes the given adapter's ranks and alphas)")
        bad = sorted(p for p, l in layout.layers.items() if l.lora_ab() is None or l.module_type != "linear")
        if bad:
            raise ConfigError(f"LoftQ initialises LoRA on linear layers; {bad[0]} of the given adapter is not one")
        dora = layout.dora_layers()
        if dora:
            raise UnsupportedError(
                f"the given adapter is DoRA ({dora[0]} has a magnitude vector); LoftQ initialises plain LoRA factors, "
                "so a DoRA layout would silently lose its magnitude: pass a LoRA adapter or --target-modules"
            )
        if target is not None:
            raise ConfigError("pass either target modules or an existing adapter to take them from, not both")
    targets = _targets(target)
    if layout is None and not targets:
        raise ConfigError("no target modules: pass target=['q_proj', 'v_proj'] or 'all-linear' (CLI: --target-modules), "
                          "or an existing adapter (adapter=..., CLI: --adapter)")
    ws = open_base(base)
    plan = _plan(ws, targets, layout)
    if out is not None:
        with atomic_output(out, overwrite=overwrite) as tmp:
            result = _run(ws, plan, bits, iters, rank, alpha, layout, str(base), tmp / "base" if iters > 1 else None,
                          progress)
            peft_format.write(result[0], tmp / "adapter")
            for f in (tmp / "adapter").iterdir():
                os.replace(f, tmp / f.name)
            (tmp / "adapter").rmdir()
        out_path = Path(out)
        return LoftQResult(adapter=result[0], report=pd.DataFrame(result[1]), out=out_path,
                           base_out=out_path / "base" if iters > 1 else None)
    adapter_out, rows = _run(ws, plan, bits, iters, rank, alpha, layout, str(base), None, progress)
    return LoftQResult(adapter=adapter_out, report=pd.DataFrame(rows))


def _run(ws: WeightSet, plan: list[TensorInfo], bits: int, iters: int, rank: int, alpha: float | None,
         layout: Adapter | None, base_spec: str, base_out: Path | None,
         progress: bool | None = None) -> tuple[Adapter, list[dict]]:
    """LoftQ on every planned weight, one tensor in memory at a time; with ``base_out``, the adjusted base too.

    Without ``base_out`` the weights are read one by one; with it, :func:`~adaptkit.io.shard_writer.write_patched_copy`
    streams the base into ``base_out`` and each planned weight is replaced by its dequantised ``Q`` as it passes.
    """
    found: dict[str, LoRA] = {}
    rows: list[dict] = []
    meter = bar(desc="loftq", total=len(plan), unit="layer", progress=progress)

    def one(info: TensorInfo, w: torch.Tensor) -> torch.Tensor:
        """LoftQ of one float32 weight: its LoRA layer and report row are kept, the base to quantise returned."""
        module = info.key[: -len(".weight")]
        if not tensor_is_finite(w):
            raise NonFiniteError(f"base weight {info.key} holds NaN or Inf; LoftQ needs finite weights: fix the checkpoint")
        if layout is not None:
            given: LoRA = layout.layers[module]  # type: ignore[assignment]
            r, a, rs = given.rank, given.alpha, given.rslora
        else:
            r, a, rs = rank, float(rank if alpha is None else alpha), False
        if r > min(info.shape):
            raise ConfigError(f"rank {r} exceeds the smaller dimension of {module} {info.shape}; lower the rank")
        left, right, deq, plain = loftq_layer(w, bits, r, iters)
        scale = a / (r**0.5 if rs else r)
        found[module] = LoRA.from_factors(left, None, right, shape=info.shape, alpha=a, rslora=rs)
        before = float((w - plain).norm())
        after = float((w - deq - left @ right).norm())
        norm = float(w.norm()) or 1.0
        rows.append({MODULE: module, "shape": "x".join(map(str, info.shape)), "rank": r, "scale": scale,
                     "error_qlora": before, "error_loftq": after, "relative_error_qlora": before / norm,
                     "relative_error_loftq": after / norm, "reduction": 1.0 - after / before if before > 0 else 0.0})
        meter.update(1)
        return deq

    try:
        if base_out is None:
            with TensorReader() as reader:
                for info in plan:
                    one(info, reader.read(info).to(torch.float32))
        else:
            write_patched_copy(ws, base_out, {info.key: functools.partial(one, info) for info in plan})
            # config, tokenizer, remote code; not other weight formats, not an adapter that sits in the base folder
            copy_side_files(ws, base_out, exclude=lambda rel: rel.name.startswith("adapter_"), beside_file=True)
    finally:
        meter.close()
    layers = {m: found[m] for m in (info.key[: -len(".weight")] for info in plan)}  # the plan's order
    rows.sort(key=lambda row: row[MODULE])
    config: dict[str, Any] = dict(layout.config) if layout is not None and layout.format == "peft" else {"peft_type": "LORA"}
    config["init_lora_weights"] = True
    config["base_model_name_or_path"] = base_spec if base_out is None else None
    metadata = {"format": "pt", "adaptkit.loftq": json.dumps({"bits": bits, "iters": iters})}
    adapter = Adapter(layers=layers, base_model=config["base_model_name_or_path"], metadata=metadata, config=config,
                      format="peft", source=None)
    return adapter, rows


__all__ = ["NOT_LINEAR", "LoftQResult", "loftq", "loftq_layer"]
