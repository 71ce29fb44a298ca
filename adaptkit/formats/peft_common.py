"""Small helpers the PEFT readers and writers share (:mod:`~adaptkit.formats.peft_layers`,
:mod:`~adaptkit.formats.peft_lowrank`)."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from ..errors import FormatError


def need(parts: Mapping[str, torch.Tensor], names: tuple[str, ...] | Mapping[str, str], module: str) -> None:
    """Refuse a module whose tensors lack one of ``names`` (part names, or ``{part: key stem}`` to name the stems).

    Raises:
        FormatError: naming the missing parts.
    """
    stems = names if isinstance(names, Mapping) else {n: n for n in names}
    missing = [stem for part, stem in stems.items() if part not in parts]
    if missing:
        raise FormatError(f"{module} lacks tensor(s) {missing}; the checkpoint is incomplete")


def num(x: float) -> int | float:
    """A number as JSON writes it best: an ``int`` when it is whole."""
    return int(x) if float(x).is_integer() else float(x)


def shared_key(prefix: str, stem: str) -> str:
    """The key of a model-level tensor (VeRA's ``vera_A``): ``base_model.<stem>`` for PEFT files' ``base_model.model.``
    prefix, ``<stem>`` for state dicts named relative to the model."""
    return prefix.removesuffix("model.") + stem


__all__ = ["need", "num", "shared_key"]
