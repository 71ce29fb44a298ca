"""Status tables: a static per-layer table for checkpoints (first half) and PEFT-style live status (second half).

For a checkpoint (an :class:`~adaptkit.graph.Adapter` or a source) every row describes one layer: kind,
shapes, rank, alpha, scale, dtype, ``||dW||_F`` and whether its tensors are finite. ``||dW||_F`` of a
LoRA layer is computed from the ``r x r`` Gram matrices of its factors, never from the dense ``m x n``.

For a live model, :func:`layer_status` / :func:`model_status` give PEFT's ``TunerLayerStatus`` /
``TunerModelStatus`` fields for layers adapted by adaptkit or by peft (duck-typed, so peft need not be
imported), with PEFT's "irregular" rules.
"""

from __future__ import annotations

import os
import sys
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass
from typing import Any

import pandas as pd
import torch

from ..core.adapter import Adapter
from ..core.kinds import (
    Layer,
    layer_dtype,
    layer_is_finite,
    tensor_fields,
)
from ..errors import ConfigError
from ..formats import adapter_subfolders
from ..formats.inputs import as_adapter
from ..progress import bar
from .inject import adapted_modules, is_pipeline, named_modules, roots


@dataclass(frozen=True)
class CheckpointLayerRow:
    """One row of :func:`checkpoint_status`."""

    module: str
    kind: str
    shape: str
    tensors: str
    rank: int | None
    alpha: float | None
    scale: float
    dtype: str
    delta_norm: float
    dora: bool
    finite: bool


def delta_fro_norm(layer: Layer) -> float:
    """``||dW||_F`` of a layer (the kind's ``fro_norm``: Gram matrices where low rank, NaN for IA3 and for a layer
    read without its weight shape, which the delta depends on: PEFT VeRA, RandLoRA, MiSS, FourierFT files)."""
    return layer.fro_norm()


def _shape_text(shape: Any) -> str:
    return "x".join(str(int(s)) for s in shape) if shape is not None else "?"


def checkpoint_rows(adapter: Adapter, progress: bool | None = None) -> list[CheckpointLayerRow]:
    """Per-layer rows for an adapter, sorted by module path (a bar on a terminal: see :mod:`adaptkit.progress`)."""
    rows = []
    for path in bar(sorted(adapter.layers), desc="status", unit="layer", progress=progress):
        layer = adapter.layers[path]
        tensors = ", ".join(f"{k}:{_shape_text(t.shape)}" for k, t in tensor_fields(layer).items())
        rows.append(CheckpointLayerRow(
            module=path,
            kind=layer.kind,
            shape=_shape_text(layer.shape),
            tensors=tensors,
            rank=layer.rank,
            alpha=None if layer.alpha is None else float(layer.alpha),
            scale=float(layer.scale),
            dtype=str(layer_dtype(layer)).replace("torch.", ""),
            delta_norm=delta_fro_norm(layer),
            dora=layer.dora,
            finite=layer_is_finite(layer),
        ))
    return rows


def checkpoint_status(adapter: Adapter, progress: bool | None = None) -> pd.DataFrame:
    """The static per-layer table of a checkpoint as a DataFrame (one row per layer).

    Columns: module, kind, shape, tensors, rank, alpha, scale, dtype, delta_norm (``||dW||_F``; NaN for
    IA3, which has no base-free delta), dora, finite. ``progress``: a bar on stderr (``None``: only on a
    terminal).
    """
    rows = checkpoint_rows(adapter, progress)
    columns = list(CheckpointLayerRow.__dataclass_fields__)
    return pd.DataFrame([asdict(r) for r in rows], columns=columns)


def _distribution(values: list[Any]) -> dict[str, int]:
    return {str(k): n for k, n in sorted(Counter(values).items(), key=lambda kv: str(kv[0]))}


def checkpoint_summary(adapter: Adapter) -> dict[str, Any]:
    """Headline facts of a checkpoint: format, kinds, base model, layer count, rank/alpha distribution, dtype, size."""
    layers = list(adapter.layers.values())
    return {
        "source": adapter.source,
        "format": adapter.format,
        "kinds": adapter.kind_counts(),
        "base_model": adapter.base_model,
        "num_layers": len(layers),
        "ranks": _distribution([layer.rank for layer in layers if layer.rank is not None]),
        "alphas": _distribution([float(layer.alpha) for layer in layers if layer.alpha is not None]),
        "dtype": str(adapter.dtype).replace("torch.", "") if adapter.dtype else None,
        "parameters": adapter.numel,
        "bytes": adapter.layers_nbytes,
        "extras": len(adapter.extras),
        "finite": adapter.is_finite(),
    }


def describe_checkpoint(source: str | os.PathLike, format: str | None = None, base: str | os.PathLike | None = None,
                        progress: bool | None = None) -> tuple[pd.DataFrame, dict[str, Any]]:
    """What ``adaptkit info`` / ``status`` show: load ``source`` once; its per-layer table and its summary.

    Args:
        source: hub id, directory or file.
        format: source format (detected when ``None``).
        base: base model to resolve module names (kohya/LyCORIS files).
        progress: a bar on stderr (``None``: only on a terminal).

    Returns:
        ``(checkpoint_status(adapter), checkpoint_summary(adapter))``; the summary also says, under
        ``subfolders``, which subfolders of a local directory hold more adapters and how to load one.

    Raises:
        SourceNotFoundError / FormatError / ConfigError: as :func:`adaptkit.load`.
    """
    adapter = as_adapter(source, format=format, base=base)
    table = checkpoint_status(adapter, progress=progress)
    header = checkpoint_summary(adapter)
    if subs := adapter_subfolders(source):  # PEFT keeps every adapter but the default in a subfolder
        header["subfolders"] = f"{subs} hold more adapters: load one as '{source}:{subs[0]}'"
    return table, header


# ====================================================================================================
# Live modules: PEFT's TunerLayerStatus / TunerModelStatus for layers adapted by adaptkit or by peft.
# ====================================================================================================

IRREGULAR = "irregular"


@dataclass(frozen=True)
class LayerStatus:
    """One adapted layer, with the fields of PEFT's ``TunerLayerStatus``."""

    name: str
    module_type: str
    enabled: bool
    active_adapters: list[str]
    merged_adapters: list[str]
    requires_grad: dict[str, Any]
    available_adapters: list[str]
    devices: dict[str, list[str]]
    quantization_backend: str | None


@dataclass(frozen=True)
class ModelStatus:
    """A whole model, with the fields of PEFT's ``TunerModelStatus`` (``"irregular"`` where layers disagree)."""

    base_model_type: str
    adapter_model_type: str
    peft_types: dict[str, str]
    trainable_params: int
    total_params: int
    num_adapter_layers: int
    enabled: Any
    active_adapters: Any
    merged_adapters: Any
    requires_grad: dict[str, Any]
    available_adapters: list[str]
    devices: dict[str, list[str]]
    quantization_backend: Any


def _is_tuner_layer(module: Any) -> bool:
    """A PEFT tuner layer / auxiliary wrapper or an adaptkit wrapper (duck-typed; peft need not be installed)."""
    if type(module).__name__ == "TrainableTokensWrapper":  # PEFT reports the layer it wraps instead
        return False
    return all(hasattr(type(module), a) or hasattr(module, a)
               for a in ("adapter_layer_names", "merged_adapters", "active_adapters", "_get_available_adapters"))


def _three_way(values: list[Any]) -> Any:
    if all(v is True for v in values):
        return True
    if all(v is False for v in values):
        return False
    return IRREGULAR


def _peft_model_parts(obj: Any) -> tuple[Any, Any] | None:
    """``(PeftModel, its tuner)`` when ``obj`` is a PeftModel (checked without importing peft)."""
    peft_mod = sys.modules.get("peft")
    if peft_mod is not None and isinstance(obj, peft_mod.PeftModel):
        return obj, obj.base_model
    return None


def _walk(obj: Any) -> list[tuple[str, Any]]:
    parts = _peft_model_parts(obj)
    if parts is not None:
        return list(parts[1].named_modules())
    return list(named_modules(obj))


def layer_rows(obj: Any) -> list[LayerStatus]:
    """:class:`LayerStatus` of every adapter layer (adaptkit or PEFT) of a model, pipeline or PeftModel.

    Raises:
        ConfigError: the model holds no adapter layer.
    """
    rows = []
    for name, module in _walk(obj):
        if not _is_tuner_layer(module):
            continue
        grads: dict[str, list[bool]] = defaultdict(list)
        devices: dict[str, list[str]] = defaultdict(list)
        for attr in module.adapter_layer_names:
            holder = _get_attr(module, attr)
            if isinstance(holder, torch.nn.ModuleDict):
                for key, sub in holder.items():
                    grads[key].extend(p.requires_grad for p in sub.parameters())
            elif isinstance(holder, torch.nn.ParameterDict):
                for key, p in holder.items():
                    grads[key].append(p.requires_grad)
        for attr in (*module.adapter_layer_names, *getattr(module, "other_param_names", ())):
            holder = _get_attr(module, attr)
            if isinstance(holder, torch.nn.ModuleDict):
                for key, sub in holder.items():
                    devices[key].extend(p.device.type for p in sub.parameters())
            elif isinstance(holder, torch.nn.ParameterDict) or type(holder).__name__ == "BufferDict":
                for key, p in holder.items():
                    devices[key].append(p.device.type)
        backend = getattr(module, "quantization_backend", None)
        rows.append(LayerStatus(
            name=name,
            module_type=repr(module).partition("(")[0],
            enabled=not module.disable_adapters,
            active_adapters=list(module.active_adapters),
            merged_adapters=list(module.merged_adapters),
            requires_grad={k: _three_way(v) for k, v in grads.items()},
            available_adapters=sorted(module._get_available_adapters()),
            devices={k: sorted(set(v)) for k, v in devices.items()},
            quantization_backend=None if backend is None else backend.backend_name,
        ))
    if not rows:
        raise ConfigError("no adapter layers found in the model; inject one with ak.inject(model, adapter) "
                          "or load it with peft")
    return rows


def _get_attr(module: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        module = getattr(module, part)
    return module


def _param_counts(obj: Any) -> tuple[int, int]:
    """``(trainable, total)`` counted as PEFT's ``get_nb_trainable_parameters`` does."""
    trainable = total = 0
    seen: set[int] = set()
    modules = [obj] if isinstance(obj, torch.nn.Module) else [m for _, m in roots(obj)]
    for module in modules:
        for p in module.parameters():
            if id(p) in seen:
                continue
            seen.add(id(p))
            n = p.numel()
            if n == 0 and hasattr(p, "ds_numel"):
                n = p.ds_numel
            if p.__class__.__name__ == "Params4bit":
                size = p.element_size() if hasattr(p, "element_size") else getattr(getattr(p, "quant_storage", None), "itemsize", 1)
                n = n * 2 * size
            total += n
            if p.requires_grad:
                trainable += n
    return trainable, total


def model_row(obj: Any) -> ModelStatus:
    """:class:`ModelStatus` of a model, pipeline or PeftModel, with PEFT's ``"irregular"`` rules.

    For a PeftModel every field equals ``peft.get_model_status``; for other models ``peft_types`` also lists
    the adapters adaptkit injected (``{"style": "LORA"}``) and ``adapter_model_type`` is ``"adaptkit"``
    when adaptkit adapted any layer.
    """
    layers = layer_rows(obj)
    parts = _peft_model_parts(obj)
    if parts is not None:
        peft_model, tuner = parts
        base_type = peft_model.get_base_model().__class__.__name__
        adapter_type = tuner.__class__.__name__
        peft_types = {k: str(c.peft_type).partition(".")[-1] for k, c in tuner.peft_config.items()}
        trainable, total = _param_counts(peft_model)
    else:
        tf = sys.modules.get("transformers")
        if is_pipeline(obj) or (tf is not None and isinstance(obj, tf.PreTrainedModel)):
            base_type = obj.__class__.__name__
        else:
            base_type = "other"
        trainable, total = _param_counts(obj)
        kinds: dict[str, set[str]] = defaultdict(set)
        for _, w in adapted_modules(obj):
            for n in w.adapter_params:
                kinds[n].add(w.layer(n).kind.upper())
        peft_types = {n: "+".join(sorted(k)) for n, k in sorted(kinds.items())}
        adapter_type = "adaptkit" if kinds else "None"
    enabled_set = {r.enabled for r in layers}
    enabled = enabled_set.pop() if len(enabled_set) == 1 else IRREGULAR
    available = sorted(set().union(*(r.available_adapters for r in layers)))
    actives = {tuple(r.active_adapters) for r in layers}
    active = [] if not actives else list(actives.pop()) if len(actives) == 1 else IRREGULAR
    merged_all: set[str] = set().union(*(r.merged_adapters for r in layers))
    merged: Any = sorted(merged_all)
    if any((set(r.available_adapters) - set(r.merged_adapters)) & merged_all for r in layers):
        merged = IRREGULAR
    grads: dict[str, list[Any]] = defaultdict(list)
    devices: dict[str, list[str]] = defaultdict(list)
    for r in layers:
        for k, v in r.requires_grad.items():
            grads[k].append(v)
        for k, v in r.devices.items():
            devices[k].extend(v)
    backends = {r.quantization_backend for r in layers}
    return ModelStatus(
        base_model_type=base_type,
        adapter_model_type=adapter_type,
        peft_types=peft_types,
        trainable_params=trainable,
        total_params=total,
        num_adapter_layers=len(layers),
        enabled=enabled,
        active_adapters=active,
        merged_adapters=merged,
        requires_grad={k: _three_way(v) for k, v in grads.items()},
        available_adapters=available,
        devices={k: sorted(set(v)) for k, v in devices.items()},
        quantization_backend=backends.pop() if len(backends) == 1 else IRREGULAR,
    )


def _checkpoint(obj: Any) -> Adapter | None:
    if isinstance(obj, (Adapter, str, os.PathLike)):
        return as_adapter(obj)
    return None


def layer_status(obj: Any) -> pd.DataFrame:
    """Per-layer status as a DataFrame.

    Args:
        obj: a live model (adapted by adaptkit and/or peft, a PeftModel, a diffusers pipeline): one row per
            adapter layer with PEFT's ``TunerLayerStatus`` fields (name, module_type, enabled,
            active_adapters, merged_adapters, requires_grad, available_adapters, devices,
            quantization_backend). Or a checkpoint (an :class:`Adapter` or a source): the static table of
            :func:`checkpoint_status` (kind, shapes, rank, alpha, scale, dtype, ``||dW||``, finite).

    Example:
        >>> ak.inject(model, adapter)
        >>> ak.layer_status(model)[["name", "active_adapters", "merged_adapters"]]
    """
    adapter = _checkpoint(obj)
    if adapter is not None:
        return checkpoint_status(adapter)
    rows = layer_rows(obj)
    return pd.DataFrame([r.__dict__ for r in rows], columns=list(LayerStatus.__dataclass_fields__))


def model_status(obj: Any) -> pd.DataFrame:
    """Whole-model status as a one-row DataFrame with PEFT's ``TunerModelStatus`` fields.

    ``enabled``, ``active_adapters``, ``merged_adapters``, ``requires_grad`` values and
    ``quantization_backend`` read ``"irregular"`` when layers disagree (e.g. an adapter merged on only some
    layers). For a checkpoint (an :class:`Adapter` or a source) the row is :func:`checkpoint_summary`.

    Example:
        >>> ak.model_status(model).T  # one column, one field per row
    """
    adapter = _checkpoint(obj)
    if adapter is not None:
        return pd.DataFrame([checkpoint_summary(adapter)])
    row = model_row(obj)
    return pd.DataFrame([row.__dict__], columns=list(ModelStatus.__dataclass_fields__))
