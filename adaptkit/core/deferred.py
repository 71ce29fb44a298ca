"""Metadata whose costly values are computed when first read: :class:`DeferredMetadata`.

An operation may attach a value to its output's metadata that costs more than the operation's own result
(a merge's coverage certificate measures ``‖ΔW‖²`` of every input layer in float64, about 40% of a LoRA merge's
time). :class:`DeferredMetadata` holds such a value as a function and calls it the first time the key's
value is read: by a writer saving the adapter, ``{**metadata}``, ``.items()``, ``json.dumps(dict(...))``, a CLI
summary. Its keys are known from the start, so ``key in metadata`` and ``len`` never compute anything. Until
then the function keeps what it needs alive (for a merge, the inputs' LoRA factors), and it reads them as they
are then: a caller that modifies an input's tensors in place before reading gets figures of the modified input.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping


class DeferredMetadata(Mapping[str, str]):
    """A read-only ``str -> str`` mapping with some values computed on first read (then kept).

    Args:
        values: the values known now.
        deferred: key -> function returning the value (called at most once, on first read of the key).
    """

    def __init__(self, values: Mapping[str, str], deferred: Mapping[str, Callable[[], str]]) -> None:
        self._values = dict(values)
        self._deferred = {k: fn for k, fn in deferred.items() if k not in self._values}
        self._order = [*self._values, *self._deferred]

    def __getitem__(self, key: str) -> str:
        if key in self._deferred:
            self._values[key] = self._deferred[key]()  # a function that raises leaves the key pending
            del self._deferred[key]
        return self._values[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._order)

    def __len__(self) -> int:
        return len(self._order)

    def __contains__(self, key: object) -> bool:
        return key in self._values or key in self._deferred

    @property
    def pending(self) -> tuple[str, ...]:
        """The keys whose values have not been computed yet."""
        return tuple(self._deferred)

    def __repr__(self) -> str:
        shown = {k: (self._values[k] if k in self._values else "<deferred>") for k in self._order}
        return f"DeferredMetadata({shown!r})"

    def __reduce__(self) -> tuple:
        return dict, (dict(self.items()),)  # pickled and copied as the plain dict it reads as


__all__ = ["DeferredMetadata"]
