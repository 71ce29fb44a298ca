"""Small helpers the PEFT readers and writers share (:mod:`~adaptkit.formats.peft_layers`,
:mod:`~adaptkit.formats.peft_lowrank`, :mod:`~adaptkit.formats.peft_other`)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from ..errors import ConfigError, FormatError
from .patterns import build_pattern


def need(parts: Mapping[str, torch.Tensor], names: tuple[str, ...] | Mapping[str, str], module: str) -> None:
    """Refuse a module whose tensors lack one of ``names`` (part names, or ``{part: key stem}`` to name the stems).

    Raises:
        FormatError: naming the missing parts.
    """
    stems = names if isinstance(names, Mapping) else {n: n for n in names}
    missing = [stem for part, stem in stems.items() if part not in parts]
    if missing:
        raise FormatError(f"{module} lacks tensor(s) {missing}; the checkpoint is incomplete")


def fan(cfg: Mapping[str, Any]) -> bool:
    """The config's ``fan_in_fan_out`` (transformers ``Conv1D`` modules store the weight transposed)."""
    return bool(cfg.get("fan_in_fan_out", False))


def same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    """True when ``a`` and ``b`` are the same tensor, or equal in shape, dtype and every value."""
    return a is b or (a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b))


def num(x: float) -> int | float:
    """A number as JSON writes it best: an ``int`` when it is whole."""
    return int(x) if float(x).is_integer() else float(x)


def config_mismatch(module: str, field: str, value: Any, found: Any, what: str, fix: str | None = None) -> ConfigError:
    """The error for a config field that contradicts the tensors: ``field=value`` in ``adapter_config.json`` against
    ``what found`` in the weights (``fix``: the way out, default "fix <field>")."""
    return ConfigError(f"{module}: adapter_config.json gives {field}={value!r} but the tensors have {what} {found}; "
                       f"the config does not belong to these weights ({fix or 'fix ' + field})")


def one_per_adapter(layers: Mapping[str, Any], value: Callable[[Any], Any], what: str) -> dict[str, str]:
    """``{path: reason}`` for the layers whose ``value(layer)`` differs from the most common one: a setting peft has
    once per adapter (``what`` names it: ``r``, ``init_r``, ``fan_in_fan_out`` ...)."""
    values = {p: value(layer) for p, layer in layers.items()}
    common, odd = build_pattern(values)
    return {p: f"peft has one {what} per adapter and this adapter's layers differ ({v!r} vs {common!r})"
            for p, v in odd.items()}


def shared_key(prefix: str, stem: str) -> str:
    """The key of a model-level tensor (VeRA's ``vera_A``): ``base_model.<stem>`` for PEFT files' ``base_model.model.``
    prefix, ``<stem>`` for state dicts named relative to the model."""
    return prefix.removesuffix("model.") + stem


__all__ = ["config_mismatch", "fan", "need", "num", "one_per_adapter", "same_tensor", "shared_key"]
