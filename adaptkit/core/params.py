"""Every user-facing parameter, declared once: its type, valid range, command-line flag and meaning.

The library functions and the command line check a parameter with the same declaration, so each has one rule
and one message. A declaration is a frozen :class:`Param` (in the spirit of mergekit's
``merge_methods/base.py``, where each method declares its parameters): the check is generated from the
type and the range, and so is the error, which names the argument and its flag, the valid range and the value
given, e.g. ``rank (--rank) must be an integer of at least 1, got 2.7``.

Rules shared by every declaration:

* integers accept ``int`` and NumPy / torch integers (anything with ``__index__``), never ``bool`` and never a
  float (``2.0`` included: a rank is counted, not measured);
* numbers accept any real number (NumPy floats included) but not ``bool``, must be finite, and come back as
  ``float``;
* choices compare by value (``bits=np.int64(4)`` is ``4``);
* ``None`` is refused by :meth:`Param.check`; :meth:`Param.optional` lets it through for parameters whose
  default is "none given".

The command line parses text with :func:`parse_numbers` (``--weights 1,0.5``); numbers and choices are
parsed by click's own types, then checked by the library function the command calls.
:data:`PARAMS` lists every declaration (``docs/architecture.md`` and the tests read it).
"""

from __future__ import annotations

import math
import numbers
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Any

from ..errors import ConfigError


class ParamType(str, Enum):
    """What kind of value a parameter holds (a ``str`` enum: ``ParamType.INTEGER == "integer"``)."""

    INTEGER = "integer"
    NUMBER = "number"
    CHOICE = "choice"
    NUMBERS = "numbers"
    SIZE = "size"


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B?|B)?\s*$", re.IGNORECASE)


@dataclass(frozen=True)
class Param:
    """The declaration of one parameter: the check and its error message are generated from it.

    Attributes:
        name: the Python argument name (``"rank"``).
        type: the :class:`ParamType`.
        description: one line for help texts and docs.
        flag: the command-line option (``"--rank"``); ``None`` for library-only parameters.
        low / high: bounds of integers, numbers and sizes (``None``: unbounded).
        low_open: ``low`` itself is excluded (``density`` in ``(0, 1]``).
        choices: the values of a :attr:`ParamType.CHOICE`.
        hint: how to fix a bad value, appended to the message (``"leave it out for one per core"``).
    """

    name: str
    type: ParamType
    description: str
    flag: str | None = None
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    choices: tuple[Any, ...] = ()
    hint: str = ""

    @property
    def label(self) -> str:
        """How messages name the parameter: ``rank (--rank)``, or ``max_entries`` without a flag."""
        return f"{self.name} ({self.flag})" if self.flag else self.name

    @property
    def rule(self) -> str:
        """The valid values in words: ``an integer of at least 1``, ``a number in (0, 1]``, ``one of 4, 8``."""
        if self.type is ParamType.CHOICE:
            return "one of " + ", ".join(str(c) for c in self.choices)
        if self.type is ParamType.SIZE:
            return "a positive number of bytes, or a size like 500MB, 5GB, 4GiB"
        if self.low is not None and self.high is not None:
            what = {ParamType.INTEGER: "an integer", ParamType.NUMBER: "a number", ParamType.NUMBERS: "numbers"}
            return f"{what[self.type]} in {'(' if self.low_open else '['}{_num(self.low)}, {_num(self.high)}]"
        what = {ParamType.INTEGER: "an integer", ParamType.NUMBER: "a finite number",
                ParamType.NUMBERS: "finite numbers"}[self.type]
        if self.low is not None:
            return f"{what} {'greater than' if self.low_open else 'of at least'} {_num(self.low)}"
        if self.high is not None:
            return f"{what} of at most {_num(self.high)}"
        return what

    def error(self, value: Any, rule: str | None = None) -> ConfigError:
        """The one :class:`~adaptkit.errors.ConfigError` of a bad value: argument, valid range, value, hint."""
        msg = f"{self.label} must be {rule or self.rule}, got {value!r}"
        return ConfigError(msg + (f"; {self.hint}" if self.hint else ""), argument=self.name)

    def check(self, value: Any) -> Any:
        """Check ``value`` against the declaration and return it normalised (``int``, ``float``, list, choice).

        Raises:
            ConfigError: the value is of the wrong type or out of range (see :meth:`error`).
        """
        if self.type is ParamType.INTEGER:
            return self._in_range(_integer(value, self), value)
        if self.type is ParamType.NUMBER:
            return self._in_range(_number(value, self), value)
        if self.type is ParamType.CHOICE:
            for choice in self.choices:
                if _is_choice(value, choice):
                    return choice
            raise self.error(value)
        if self.type is ParamType.NUMBERS:
            items = value.tolist() if hasattr(value, "tolist") else value  # a NumPy array or a torch tensor
            if isinstance(items, (str, bytes, Mapping)) or not isinstance(items, Iterable):
                raise self.error(value, f"a list of {self.rule}")
            out = [_number(v, self, whole=value) for v in items]
            for v in out:
                self._in_range(v, value)
            return out
        return self._size(value)

    def optional(self, value: Any) -> Any:
        """:meth:`check`, except that ``None`` (the parameter left out) is returned as is."""
        return None if value is None else self.check(value)

    def _in_range(self, v: float, original: Any) -> Any:
        if self.low is not None and (v < self.low or (self.low_open and v == self.low)):
            raise self.error(original)
        if self.high is not None and v > self.high:
            raise self.error(original)
        return v

    def _size(self, value: Any) -> int:
        if isinstance(value, str):
            m = _SIZE.match(value)
            if not m:
                raise self.error(value)
            unit = (m.group(2) or "B").upper()
            base = 1024 if "I" in unit else 1000
            power = "BKMGT".index(unit[0]) if unit[0] in "KMGT" else 0
            size = int(float(m.group(1)) * base**power)
        else:
            size = _integer(value, self)
        if size < 1:
            raise self.error(value)
        return size


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


def _is_choice(value: Any, choice: Any) -> bool:
    """Whether ``value`` is ``choice``: an integer (NumPy's and torch's too, never a bool or a float) for an
    ``int`` choice, a string (a ``str`` enum too) for a ``str`` one."""
    if isinstance(choice, int):
        if isinstance(value, (bool, float)) or not hasattr(value, "__index__"):
            return False
        try:
            return value.__index__() == choice
        except TypeError:  # a tensor of several elements
            return False
    return isinstance(value, str) and value == choice


def _integer(value: Any, param: Param) -> int:
    if isinstance(value, (bool, float)) or not hasattr(value, "__index__"):
        raise param.error(value)
    try:
        return value.__index__()
    except TypeError:  # a torch tensor with more than one element
        raise param.error(value) from None


def _number(value: Any, param: Param, whole: Any = None) -> float:
    if hasattr(value, "item") and not isinstance(value, numbers.Real):  # a one-element tensor or array
        try:
            value = value.item()
        except (RuntimeError, ValueError):  # several elements
            raise param.error(value if whole is None else whole) from None
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(float(value)):
        raise param.error(value if whole is None else whole)
    return float(value)


# --------------------------------------------------------------------------------------------- the declarations

RANK = Param("rank", ParamType.INTEGER, "LoRA rank: the number of rank-one components per layer", "--rank", low=1)
DENSITY = Param("density", ParamType.NUMBER, "fraction of entries kept (TIES, DARE, magnitude pruning, breadcrumbs, DELLA)", "--density",
                low=0, high=1, low_open=True)
WEIGHTS = Param("weights", ParamType.NUMBERS, "one multiplier per adapter (default 1 each); negative subtracts",
                "--weights")
GAMMA = Param("gamma", ParamType.NUMBER, "fraction of largest-magnitude entries dropped as outliers (breadcrumbs)",
              "--gamma", low=0, high=1)
EPSILON = Param("epsilon", ParamType.NUMBER, "spread of DELLA's keep probabilities around density (density +- epsilon)",
                "--epsilon", low=0, high=1)
KEEP = Param("keep", ParamType.NUMBER, "fraction of each task's singular components kept (TSV-M)", "--keep",
             low=0, high=1, low_open=True)
COMMON = Param("common", ParamType.NUMBER, "fraction of the merged rank given to the common subspace (Iso-CTS)",
               "--common", low=0, high=1)
SEED = Param("seed", ParamType.INTEGER, "seed of the random draws (DARE's drop, sampling, randomized SVD)", "--seed")
WORKERS = Param("workers", ParamType.INTEGER, "output files written in parallel", "--workers", low=1,
                hint="leave it out for one per core (at most 8)")
ALPHA = Param("alpha", ParamType.NUMBER, "LoRA alpha (scale = alpha / rank)", "--alpha", low=0, low_open=True)
ENERGY = Param("energy", ParamType.NUMBER, "fraction of ||dW||_F^2 each layer keeps (chooses per-layer ranks)",
               "--energy", low=0, high=1, low_open=True)
BITS = Param("bits", ParamType.CHOICE, "quantisation: 4 (NF4, block 64) or 8 (int8, row-wise)", "--bits",
             choices=(4, 8))
ITERS = Param("iters", ParamType.INTEGER, "LoftQ alternating iterations", "--iters", low=1)
SHARD_SIZE = Param("shard_size", ParamType.SIZE, "re-shard the output at this size (bytes, or 500MB, 5GB, 4GiB)",
                   "--shard-size")
DTYPE = Param("dtype", ParamType.CHOICE, "output dtype", "--dtype", choices=("bf16", "fp16", "fp32"))
MAJORITY_SIGN = Param("majority_sign", ParamType.CHOICE, "TIES sign election: the sign of the sum (total) or the "
                      "more frequent sign (frequency)", "--majority-sign", choices=("total", "frequency"))
SVD_METHOD = Param("method", ParamType.CHOICE, "SVD of extract: exact, randomized, or auto (exact for small "
                   "matrices)", "--method", choices=("auto", "exact", "randomized"))
EMBEDDINGS = Param("embeddings", ParamType.CHOICE, "changed embeddings: drop (skip), embedding LoRA (lora) or stored "
                   "whole (save)", "--embeddings", choices=("skip", "lora", "save"))
NORMS = Param("norms", ParamType.CHOICE, "changed norms and lone biases: drop (skip) or stored whole (save)",
              "--norms", choices=("skip", "save"))
OVERSAMPLE = Param("oversample", ParamType.INTEGER, "extra columns of the randomized SVD's subspace", low=0)
NITER = Param("niter", ParamType.INTEGER, "power iterations of the randomized SVD", low=0)
MAX_ENTRIES = Param("max_entries", ParamType.INTEGER, "entries per layer used for sign statistics before sampling",
                    low=1)

#: every declaration, by argument name (``method`` is extract's SVD method; merge methods are a table of their own)
PARAMS: dict[str, Param] = {p.name: p for p in (RANK, DENSITY, WEIGHTS, SEED, WORKERS, ALPHA, ENERGY, BITS, ITERS,
                                                SHARD_SIZE, DTYPE, MAJORITY_SIGN, SVD_METHOD, EMBEDDINGS, NORMS,
                                                OVERSAMPLE, NITER, MAX_ENTRIES)}


# --------------------------------------------------------------------------------------------- helpers


def check_weights(weights: Any, count: int, what: str = "adapters") -> list[float]:
    """``weights`` checked by :data:`WEIGHTS`, one per input: all ``1.0`` when ``None``.

    Args:
        weights: a sequence of numbers, or ``None``.
        count: how many inputs there are.
        what: what the inputs are called in the message.

    Returns:
        A list of ``count`` floats.

    Raises:
        ConfigError: a weight is not a finite number, or there are not ``count`` of them.
    """
    if weights is None:
        return [1.0] * count
    w = WEIGHTS.check(weights)
    if len(w) != count:
        raise ConfigError(f"{WEIGHTS.label}: {len(w)} weights for {count} {what}; give one weight per "
                          f"{what.removesuffix('s')}", argument=WEIGHTS.name)
    return w


def parse_numbers(text: str, param: Param = WEIGHTS) -> list[float]:
    """Comma-separated numbers from the command line (``"1,0.5"``, ``"1, -1"``), checked by ``param``.

    Raises:
        ConfigError: a part is not a number, or a number is out of ``param``'s range.
    """
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise param.error(text, "comma-separated numbers like 1,0.5") from None
    if not values:
        raise param.error(text, "comma-separated numbers like 1,0.5")
    return param.check(values)


def kept_entries(density: float, numel: int) -> int:
    """How many of ``numel`` entries a ``density`` keeps: ``int(density * numel)``, PEFT's rule.

    ``peft.utils.merge_utils.magnitude_based_pruning`` keeps ``int(density * numel)`` entries; the merge methods
    that match PEFT prune with this count, and :func:`adaptkit.compare` counts a sign conflict among the same
    entries, so it reports on what a merge would keep. ``density >= 1`` keeps everything.
    """
    return numel if density >= 1 else max(0, int(density * numel))


__all__ = ["ALPHA", "BITS", "DENSITY", "DTYPE", "EMBEDDINGS", "ENERGY", "ITERS", "MAJORITY_SIGN", "MAX_ENTRIES", "NITER",
           "NORMS", "OVERSAMPLE", "PARAMS", "RANK", "SEED", "SHARD_SIZE", "SVD_METHOD", "WEIGHTS", "WORKERS", "Param",
           "ParamType", "check_weights", "kept_entries", "parse_numbers"]
