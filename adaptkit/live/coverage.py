"""The coverage certificates of injected adapters, kept on the model they were injected into.

:func:`adaptkit.live.inject.inject` certifies where each layer and extra tensor of an adapter lands among the
model's modules (``certify_inject``) and keeps the certificate here, by adapter name, until the adapter is removed;
:func:`injected_coverage` returns it.
"""

from __future__ import annotations

from typing import Any

from ..core.coverage import Certificate
from ..errors import ConfigError

#: attribute on the root module (or pipeline): adapter name -> the coverage certificate of its injection
COVERAGE_ATTR = "_adaptkit_coverage"


def injected_coverage(module: Any, adapter_name: str = "default") -> Certificate:
    """The coverage certificate :func:`adaptkit.inject` made for ``adapter_name`` in this model.

    Args:
        module: the model (or pipeline) the adapter was injected into.
        adapter_name: the adapter's name.

    Returns:
        The :class:`~adaptkit.core.coverage.Certificate` (``operation="inject"``).

    Raises:
        ConfigError: no adapter of that name is injected.
    """
    certs = module.__dict__.get(COVERAGE_ATTR) or {}
    if adapter_name not in certs:
        raise ConfigError(f"no adapter named {adapter_name!r} is injected; injected: {sorted(certs) or 'none'}")
    return certs[adapter_name]


def keep_coverage(module: Any, name: str, cert: Certificate | None) -> None:
    """Keep ``cert`` for adapter ``name`` on ``module`` (``None``: forget it, as when the adapter is removed)."""
    certs = module.__dict__.get(COVERAGE_ATTR)
    if certs is None:
        certs = {}
        object.__setattr__(module, COVERAGE_ATTR, certs)
    if cert is None:
        certs.pop(name, None)
    else:
        certs[name] = cert


__all__ = ["COVERAGE_ATTR", "injected_coverage", "keep_coverage"]
