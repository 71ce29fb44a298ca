"""adaptkit: load, merge, convert, fuse, inject and inspect adapter checkpoints (LoRA, DoRA, LoHa, LoKr, IA3).

The public API is re-exported here; see ``docs/`` for guides.
"""

from __future__ import annotations

from .analysis import analyze
from .comparison import compare
from .convert import convert
from .converters import load, save
from .converters.loftq import loftq
from .converters.reparam import pissa_to_lora
from .errors import (
    AdaptkitError,
    ConfigError,
    FormatError,
    NonFiniteError,
    OutputExistsError,
    ShapeMismatchError,
    SourceNotFoundError,
    UnsupportedError,
)
from .graph import Adapter
from .fuse import extract, fuse, unfuse
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

__version__ = "0.1.0"

__all__ = [
    "IA3",
    "KINDS",
    "Adapter",
    "AdaptkitError",
    "ConfigError",
    "FormatError",
    "Full",
    "LoHa",
    "LoKr",
    "LoRA",
    "NonFiniteError",
    "OutputExistsError",
    "ShapeMismatchError",
    "SourceNotFoundError",
    "UnsupportedError",
    "__version__",
    "convert",
    "active_adapters",
    "analyze",
    "compare",
    "adapter_state_dict",
    "delete_adapter",
    "disable_adapters",
    "enable_adapters",
    "get_adapter_state_dict",
    "inject",
    "load_adapter",
    "layer_status",
    "merge_adapters",
    "model_status",
    "remove_adapter",
    "set_adapter",
    "unmerge_adapters",
    "extract",
    "fuse",
    "unfuse",
    "load",
    "loftq",
    "merge",
    "pissa_to_lora",
    "save",
]
