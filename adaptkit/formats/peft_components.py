"""PEFT output per pipeline component: ``component=`` of the PEFT writer.

A PEFT adapter applies to one model, so a pipeline adapter (``unet.…``, ``text_encoder.…``) is written either as
it is, as one component's layers in that model's own namespace (``PeftModel.from_pretrained(unet, OUT)``), or as
one adapter per component in subfolders (``component="each"``). :mod:`adaptkit.formats.peft` re-exports these.
"""

from __future__ import annotations

from ..core.adapter import Adapter
from ..errors import ConfigError
from . import names as _names
from .base import check_choice

#: ``component=`` values of PEFT output: a pipeline component, or ``each`` for one adapter per component
COMPONENTS = (*(c for c in _names.WRITE_PREFIXES if c), "each")


def check_component(component: str | None) -> str | None:
    """Validate a ``component=`` option of PEFT output (``None``: write every path as it is).

    Raises:
        ConfigError: not one of :data:`COMPONENTS`.
    """
    return check_choice(component, COMPONENTS, "PEFT component")


def select_component(adapter: Adapter, component: str) -> Adapter:
    """The layers (and extra tensors) of one pipeline component, in that model's own namespace.

    ``unet.down_blocks.0...`` becomes ``down_blocks.0...``, what ``PeftModel.from_pretrained(unet, ...)``
    expects; the component is recorded in the metadata (:data:`~adaptkit.converters.names.COMPONENT_KEY`).

    Raises:
        ConfigError: the adapter has no layers of that component (the message lists the ones it has).
    """
    prefix = component + "."
    layers = {p[len(prefix):]: l for p, l in adapter.layers.items() if p.startswith(prefix)}
    if not layers:
        have = sorted({c for p in adapter.layers if (c := _names.component_of(p))})
        what = f"its components are {', '.join(have)}" if have else "its module paths name no pipeline component"
        raise ConfigError(f"the adapter has no {component} layers ({what}); pass one of its components, or no "
                          "--component to write the paths as they are")
    extras = {k[len(prefix):]: t for k, t in adapter.extras.items() if k.startswith(prefix)}
    return adapter.replace(layers=layers, extras=extras, metadata={**adapter.metadata, _names.COMPONENT_KEY: component})


def split_components(adapter: Adapter, component: str | None) -> dict[str, Adapter]:
    """The PEFT adapters to write for ``component=``, by subfolder (``""``: the output directory itself).

    ``None`` writes the adapter as it is; a component writes that component's layers in its own namespace
    (:func:`select_component`); ``"each"`` writes one such adapter per component into ``<out>/<component>/``.

    Raises:
        ConfigError: an unknown component, one the adapter does not have, or ``each`` for paths outside any
            component.
    """
    if check_component(component) is None:
        return {"": adapter}
    if component != "each":
        return {"": select_component(adapter, component)}
    loose = sorted(p for p in adapter.layers if _names.component_of(p) is None)
    if loose:
        raise ConfigError(f"component='each' writes one PEFT adapter per pipeline component, but {len(loose)} layer(s) "
                          f"belong to none, e.g. {loose[0]}; write without --component")
    comps = sorted({_names.component_of(p) or "" for p in adapter.layers})
    return {c: select_component(adapter, c) for c in comps}


__all__ = ["COMPONENTS", "check_component", "select_component", "split_components"]
