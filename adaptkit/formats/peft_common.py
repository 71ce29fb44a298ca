"""Small helpers the PEFT readers and writers share (:mod:`~adaptkit.formats.peft_layers`, :mod:`~adaptkit.formats.peft_lowrank`)."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from ..errors import FormatError


def need(parts: Mapping[str, torch.Tensor], names: tuple[str, ...], module: str) -> None:
    """Refuse a module whose tensors lack one of ``names``.

    Raises:
        FormatError: naming the missing parts.
    """
    missing = [n for n in names if n not in parts]
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
