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

import json
import os
import shutil
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..core.adapter import Adapter
from ..core.columns import MODULE
from ..core.kinds import LoRA
from ..core.linalg import split_factors
from ..core.params import ALPHA, BITS, ITERS, RANK
from ..errors import (
    ConfigError,
    FormatError,
    NonFiniteError,
    SourceNotFoundError,
    UnsupportedError,
)
from ..formats.patterns import matches_targets
from ..io.sources import atomic_output, check_output, read_safetensors_header, resolve
from ..progress import bar
from .quant import dequantize, quantize

#: module names that hold embeddings or the output layer: never "all-linear" targets (PEFT skips the output layer)
NOT_LINEAR = ("embed_tokens", "wte", "wpe", "word_embeddings", "position_embeddings", "token_type_embeddings",
              "embed_positions", "lm_head", "embed_out", "output_layer")
_BASE_PATTERNS = ["*.safetensors", "*.json", "*.model", "*.txt", "*.tiktoken"]
#: files copied next to the adjusted base (``iters > 1``); ``.bin``/``.pt``/``.gguf`` copies would be stale weights
_COPIED_SUFFIXES = (".json", ".model", ".txt", ".tiktoken", ".py", ".jinja")


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


# ------------------------------------------------------------------------------------------- base shards


def base_files(base: str | os.PathLike) -> tuple[Path, list[Path]]:
    """Resolve a base model (hub id, directory or ``.safetensors`` file) to ``(directory, weight files)``.

    Raises:
        SourceNotFoundError: nothing at ``base``. FormatError: it holds no safetensors weights.
    """
    path = resolve(base, allow_patterns=_BASE_PATTERNS).path
    if path.is_file():
        if path.suffix != ".safetensors":
            raise FormatError(f"{path.name} is not a .safetensors file; LoftQ streams safetensors base weights only")
        return path.parent, [path]
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise FormatError(f"{index} is not a valid safetensors index ({e}); re-download the model") from e
        files = [path / name for name in dict.fromkeys(weight_map.values())]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise SourceNotFoundError(f"shard {missing[0]} listed in {index.name} is missing; re-download the model")
        return path, files
    files = sorted(p for p in path.glob("*.safetensors") if not p.name.startswith("adapter_model"))
    if not files:
        raise FormatError(f"{path} holds no .safetensors weights; LoftQ needs the base model's safetensors files")
    return path, files


def _is_candidate(name: str, info: dict) -> bool:
    if not name.endswith(".weight") or len(info["shape"]) != 2 or info["dtype"] not in ("F32", "F16", "BF16"):
        return False
    return name[: -len(".weight")].rsplit(".", 1)[-1] not in NOT_LINEAR


def _targets(target: str | Iterable[str] | None) -> str | list[str] | None:
    if target is None:
        return None
    if isinstance(target, str):
        if target == "all-linear":
            return "all-linear"
        return [t.strip() for t in target.split(",") if t.strip()]
    return list(target)


def _plan(files: list[Path], targets: str | list[str] | None, layout: Adapter | None) -> dict[str, set[str]]:
    """file -> tensor names to process; checks every target matched."""
    plan: dict[str, set[str]] = {}
    seen: list[str] = []
    for f in files:
        header, _ = read_safetensors_header(f)
        for name, info in header.items():
            if name == "__metadata__" or not _is_candidate(name, info):
                continue
            module = name[: -len(".weight")]
            seen.append(module)
            if layout is not None:
                hit = module in layout.layers
            elif targets == "all-linear":
                hit = True
            else:
                hit = matches_targets(targets, module)
            if hit:
                plan.setdefault(str(f), set()).add(name)
    found = {n[: -len(".weight")] for names in plan.values() for n in names}
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


class _AdjustedBase:
    """The adjusted base weights of ``iters > 1``, written while they are computed (one tensor in memory).

    Each shard is first copied byte for byte (header, metadata and untouched tensors as they are); every
    adjusted weight then overwrites its own bytes, which works because its dtype and shape do not change.
    """

    def __init__(self, out: Path) -> None:
        self.out = out
        self.headers: dict[Path, tuple[dict[str, Any], int]] = {}
        out.mkdir(parents=True)

    def _copy(self, src: Path) -> tuple[dict[str, Any], int]:
        if src not in self.headers:
            self.headers[src] = read_safetensors_header(src)  # validated: a truncated shard is refused here
            shutil.copyfile(src, self.out / src.name)
        return self.headers[src]

    def put(self, src: Path, name: str, tensor: torch.Tensor) -> None:
        """Write ``tensor`` (the base's dtype and shape) over weight ``name`` of shard ``src``'s copy."""
        header, start = self._copy(src)
        begin, end = header[name]["data_offsets"]
        data = memoryview(tensor.contiguous().reshape(-1).view(torch.uint8).numpy())
        if len(data) != end - begin:
            raise FormatError(f"{name} in {src.name} holds {end - begin} bytes, not {len(data)}; re-download the base")
        with open(self.out / src.name, "r+b") as fh:
            fh.seek(start + begin)
            fh.write(data)

    def finish(self, files: list[Path]) -> None:
        """Copy the shards no targeted weight lives in."""
        for f in files:
            self._copy(f)


_ST_TO_TORCH = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def _stream(files: list[Path], plan: dict[str, set[str]]) -> Iterator[tuple[Path, str, torch.Tensor]]:
    from safetensors import safe_open

    for f in files:
        names = plan.get(str(f), set())
        if not names:
            continue
        with safe_open(str(f), framework="pt", device="cpu") as handle:
            for name in sorted(names):
                yield f, name, handle.get_tensor(name)


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
    import pandas as pd

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
        from ..formats import load

        layout = adapter if isinstance(adapter, Adapter) else load(adapter)
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
    directory, files = base_files(base)
    plan = _plan(files, targets, layout)
    if out is not None:
        with atomic_output(out, overwrite=overwrite) as tmp:
            result = _run(files, plan, bits, iters, rank, alpha, layout, str(base), tmp / "base" if iters > 1 else None,
                          progress)
            if iters > 1:
                for extra in directory.iterdir():  # config, tokenizer, remote code; not other weight formats
                    if extra.is_file() and extra.suffix in _COPIED_SUFFIXES and not extra.name.startswith("adapter_"):
                        shutil.copy2(extra, tmp / "base" / extra.name)
            from ..formats import peft as peft_format

            peft_format.write(result[0], tmp / "adapter")
            for f in (tmp / "adapter").iterdir():
                os.replace(f, tmp / f.name)
            (tmp / "adapter").rmdir()
        out_path = Path(out)
        return LoftQResult(adapter=result[0], report=pd.DataFrame(result[1]), out=out_path,
                           base_out=out_path / "base" if iters > 1 else None)
    adapter_out, rows = _run(files, plan, bits, iters, rank, alpha, layout, str(base), None, progress)
    return LoftQResult(adapter=adapter_out, report=pd.DataFrame(rows))


def _run(files: list[Path], plan: dict[str, set[str]], bits: int, iters: int, rank: int, alpha: float | None,
         layout: Adapter | None, base_spec: str, base_out: Path | None,
         progress: bool | None = None) -> tuple[Adapter, list[dict]]:
    layers: dict[str, LoRA] = {}
    rows: list[dict] = []
    adjusted = _AdjustedBase(base_out) if base_out is not None else None
    total = sum(len(names) for names in plan.values())
    for f, name, tensor in bar(_stream(files, plan), desc="loftq", total=total, unit="layer", progress=progress):
        module = name[: -len(".weight")]
        if not bool(torch.isfinite(tensor).all()):
            raise NonFiniteError(f"base weight {name} holds NaN or Inf; LoftQ needs finite weights: fix the checkpoint")
        if layout is not None:
            given: LoRA = layout.layers[module]  # type: ignore[assignment]
            r, a, rs = given.rank, given.alpha, given.rslora
        else:
            r, a, rs = rank, float(rank if alpha is None else alpha), False
        if r > min(tensor.shape):
            raise ConfigError(f"rank {r} exceeds the smaller dimension of {module} {tuple(tensor.shape)}; lower the rank")
        w = tensor.to(torch.float32)
        left, right, deq, plain = loftq_layer(w, bits, r, iters)
        scale = a / (r**0.5 if rs else r)
        layers[module] = LoRA.from_factors(left, None, right, shape=tuple(tensor.shape), alpha=a, rslora=rs)
        before = float((w - plain).norm())
        after = float((w - deq - left @ right).norm())
        norm = float(w.norm()) or 1.0
        rows.append({MODULE: module, "shape": "x".join(map(str, tensor.shape)), "rank": r, "scale": scale,
                     "error_qlora": before, "error_loftq": after, "relative_error_qlora": before / norm,
                     "relative_error_loftq": after / norm, "reduction": 1.0 - after / before if before > 0 else 0.0})
        if adjusted is not None:
            adjusted.put(f, name, deq.to(tensor.dtype))
    if adjusted is not None:
        adjusted.finish(files)
    rows.sort(key=lambda row: row[MODULE])
    config: dict[str, Any] = dict(layout.config) if layout is not None and layout.format == "peft" else {"peft_type": "LORA"}
    config["init_lora_weights"] = True
    config["base_model_name_or_path"] = base_spec if base_out is None else None
    metadata = {"format": "pt", "adaptkit.loftq": json.dumps({"bits": bits, "iters": iters})}
    adapter = Adapter(layers=layers, base_model=config["base_model_name_or_path"], metadata=metadata, config=config,
                      format="peft", source=None)
    return adapter, rows


__all__ = ["NOT_LINEAR", "LoftQResult", "base_files", "loftq", "loftq_layer"]
