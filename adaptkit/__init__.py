"""adaptkit: load, merge, convert, fuse, inject and inspect adapter checkpoints (LoRA, DoRA, LoHa, LoKr, IA3).

The public API is re-exported here; see ``docs/`` for guides. The names load lazily (PEP 562): ``import
adaptkit`` costs almost nothing, and the first use of a name imports the module that defines it (torch, and
pandas for the tables, only when a name needs them), so ``adaptkit --help`` starts fast.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ._version import __version__

#: public name -> the module (relative to this package) that defines it
_LAZY: dict[str, str] = {
    **dict.fromkeys(["IA3", "KINDS", "Full", "LoHa", "LoKr", "LoRA"], ".core.kinds"),
    **dict.fromkeys(["register_format", "register_kind", "register_peft_names"], ".registry"),
    "Adapter": ".core.adapter",
    **dict.fromkeys(["AdaptkitError", "ArgumentTypeError", "ConfigError", "FormatError", "NonFiniteError",
                     "OutputExistsError", "OutputIsInputError", "OutputWriteError", "ShapeMismatchError",
                     "SourceNotFoundError", "UnsupportedError"], ".errors"),
    "analyze": ".analysis.layers",
    "compare": ".analysis.compare",
    **dict.fromkeys(["Certificate", "CoverageError", "coverage"], ".analysis.coverage"),
    "convert": ".ops.convert",
    **dict.fromkeys(["check", "export"], ".deploy"),
    **dict.fromkeys(["load", "save"], ".formats"),
    "loftq": ".ops.loftq",
    "pissa_to_lora": ".ops.reparam",
    "extract": ".ops.extract",
    **dict.fromkeys(["fuse", "unfuse"], ".ops.fuse"),
    **dict.fromkeys(["active_adapters", "adapter_state_dict", "delete_adapter", "disable_adapters",
                     "enable_adapters", "get_adapter_state_dict", "inject", "injected_coverage", "load_adapter",
                     "merge_adapters",
                     "remove_adapter", "set_adapter", "unmerge_adapters"], ".live.inject"),
    "merge": ".ops.merging",
    **dict.fromkeys(["layer_status", "model_status"], ".live.status"),
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    """Import the module defining ``name`` on first use (PEP 562) and keep the value."""
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:  # the same names, eagerly, for type checkers and IDEs
    from .analysis.compare import compare
    from .analysis.coverage import Certificate, CoverageError, coverage
    from .analysis.layers import analyze
    from .core.adapter import Adapter
    from .core.kinds import IA3, KINDS, Full, LoHa, LoKr, LoRA
    from .deploy import check, export
    from .errors import (
        AdaptkitError,
        ArgumentTypeError,
        ConfigError,
        FormatError,
        NonFiniteError,
        OutputExistsError,
        OutputIsInputError,
        OutputWriteError,
        ShapeMismatchError,
        SourceNotFoundError,
        UnsupportedError,
    )
    from .formats import load, save
    from .live.inject import (
        active_adapters,
        adapter_state_dict,
        delete_adapter,
        disable_adapters,
        enable_adapters,
        get_adapter_state_dict,
        inject,
        injected_coverage,
        load_adapter,
        merge_adapters,
        remove_adapter,
        set_adapter,
        unmerge_adapters,
    )
    from .live.status import layer_status, model_status
    from .ops.convert import convert
    from .ops.extract import extract
    from .ops.fuse import fuse, unfuse
    from .ops.loftq import loftq
    from .ops.merging import merge
    from .ops.reparam import pissa_to_lora
    from .registry import register_format, register_kind, register_peft_names
