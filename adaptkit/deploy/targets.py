"""The ``TARGETS`` table: deploy target name -> :class:`~adaptkit.deploy.rules.Target` (its rule table).

Adding a runtime is one module with a ``TARGET`` (see :mod:`adaptkit.deploy.vllm`) and one row here, or
:func:`register_target` from outside the library.
"""

from __future__ import annotations

from ..errors import ConfigError
from . import diffusers, llamacpp, peft, sglang, vllm
from .rules import Target

#: the one table of deploy targets; :func:`register_target` adds to it
TARGETS: dict[str, Target] = {t.name: t for t in (vllm.TARGET, sglang.TARGET, llamacpp.TARGET, peft.TARGET,
                                                    diffusers.TARGET)}


def register_target(target: Target) -> Target:
    """Add a deploy target (a runtime's rule table) to :data:`TARGETS`.

    Raises:
        ConfigError: another target has the name already.
    """
    if TARGETS.get(target.name, target) is not target:
        raise ConfigError(f"deploy target '{target.name}' is already registered; choose another name")
    TARGETS[target.name] = target
    return target


def get_target(name: str) -> Target:
    """The target called ``name``.

    Raises:
        ConfigError: no such target (the message lists them).
    """
    if name not in TARGETS:
        raise ConfigError(f"unknown deploy target '{name}'; choose one of {', '.join(TARGETS)}")
    return TARGETS[name]


__all__ = ["TARGETS", "get_target", "register_target"]
