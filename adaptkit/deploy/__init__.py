"""Deploy targets: will an adapter fully work on vLLM, SGLang, PEFT, diffusers (and llama.cpp), and an export that
makes it so.

* :mod:`.rules`: the :class:`~.rules.Rule` / :class:`~.rules.Target` / :class:`~.rules.Finding` dataclasses;
* :mod:`.features`: the adapter features rules are about and their detectors;
* one module per runtime with its rule table as data: :mod:`.vllm`, :mod:`.sglang`, :mod:`.peft`, :mod:`.diffusers`;
  :mod:`.targets` holds the :data:`~.targets.TARGETS` table;
* :mod:`.fixes`: the exact and lossy rewrites; :mod:`.check` (:func:`check`) and :mod:`.export` (:func:`export`).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

from ..formats.inputs import as_adapter
from .check import CheckReport, check_adapter
from .export import ExportResult, export_adapter
from .rules import VERDICTS, Context, Finding, Rule, Target
from .targets import TARGETS, get_target, register_target


def check(adapter: Any, base: Any = None, target: str = "vllm", max_rank: int | None = None) -> CheckReport:
    """Check an adapter (path, hub id or :class:`~adaptkit.core.adapter.Adapter`) against a runtime's rules and,
    with ``base``, the coverage certificate; see :func:`adaptkit.deploy.check.check_adapter`."""
    return check_adapter(as_adapter(adapter, against=base), base, target, max_rank)


def export(adapter: Any, out: str | os.PathLike, *, target: str, base: Any = None, max_rank: int | None = None,
           lossy: Iterable[str] | str | None = None, drop: Iterable[str] = (), pad_bucket: bool = False,
           overwrite: bool = False) -> ExportResult:
    """Write an adapter (path, hub id or Adapter) that ``target`` accepts with the same effect; see
    :func:`adaptkit.deploy.export.export_adapter`."""
    drop = tuple(drop)
    return export_adapter(as_adapter(adapter, against=base, drop=list(drop) or None), out, target=target, base=base,
                          max_rank=max_rank, lossy=lossy, drop=drop, pad_bucket=pad_bucket, overwrite=overwrite)


__all__ = ["TARGETS", "VERDICTS", "CheckReport", "Context", "ExportResult", "Finding", "Rule", "Target", "check",
           "export", "get_target", "register_target"]
