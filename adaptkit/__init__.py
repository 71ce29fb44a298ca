"""adaptkit: load, merge, convert, fuse, inject and inspect adapter checkpoints (LoRA, DoRA, LoHa, LoKr, IA3).

The public API is re-exported here; see ``docs/`` for guides. The names load lazily (PEP 562): ``import
adaptkit`` costs almost nothing, and the first use of a name imports the module that defines it (torch, and
pandas for the tables, only when a name needs them), so ``adaptkit --help`` starts fast.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

from ._version import __version__

#: public name -> the module (relative to this package) that defines it
_LAZY: dict[str, str] = {
    **dict.fromkeys(["IA3", "KINDS", "Full", "LoHa", "LoKr", "LoRA"], ".kinds"),
    "Adapter": ".graph",
    **dict.fromkeys(["AdaptkitError", "ArgumentTypeError", "ConfigError", "FormatError", "NonFiniteError",
                     "OutputExistsError", "OutputIsInputError", "OutputWriteError", "ShapeMismatchError",
                     "SourceNotFoundError", "UnsupportedError"], ".errors"),
    "analyze": ".analysis",
    "compare": ".comparison",
    "convert": ".convert",
    **dict.fromkeys(["load", "save"], ".converters"),
    "loftq": ".converters.loftq",
    "pissa_to_lora": ".converters.reparam",
    "extract": ".extraction",
    **dict.fromkeys(["fuse", "unfuse"], ".fuse"),
    **dict.fromkeys(["active_adapters", "adapter_state_dict", "delete_adapter", "disable_adapters",
                     "enable_adapters", "get_adapter_state_dict", "inject", "load_adapter", "merge_adapters",
                     "remove_adapter", "set_adapter", "unmerge_adapters"], ".inject"),
    "merge": ".merging",
    **dict.fromkeys(["layer_status", "model_status"], ".status"),
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


class _Package(types.ModuleType):
    """This package's module type: a submodule named like its function stays hidden behind the function.

    Importing ``adaptkit.fuse`` (or ``.convert``, ``.inject``) binds the submodule on the package; the
    public name ``adaptkit.fuse`` is the function, as it was when everything was imported eagerly.
    """

    def __setattr__(self, name: str, value: Any) -> None:
        same_name = _LAZY.get(name) == f".{name}" and getattr(value, "__name__", None) == f"{__name__}.{name}"
        if same_name and isinstance(value, types.ModuleType):
            value = getattr(value, name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package

if TYPE_CHECKING:  # the same names, eagerly, for type checkers and IDEs
    from .analysis import analyze
    from .comparison import compare
    from .convert import convert
    from .converters import load, save
    from .converters.loftq import loftq
    from .converters.reparam import pissa_to_lora
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
    from .extraction import extract
    from .fuse import fuse, unfuse
    from .graph import Adapter
    from .inject import (
        active_adapters,
        adapter_state_dict,
        delete_adapter,
        disable_adapters,
        enable_adapters,
        get_adapter_state_dict,
        inject,
        load_adapter,
        merge_adapters,
        remove_adapter,
        set_adapter,
        unmerge_adapters,
    )
    from .kinds import IA3, KINDS, Full, LoHa, LoKr, LoRA
    from .merging import merge
    from .status import layer_status, model_status
