"""Coverage certificates: which of an adapter's layers land on a target, and how much of its update that is.

The worst adapter failures are silent: a runtime or converter loads the file, finds no module for some of its
names, skips them and says nothing. Every adaptkit operation that maps an adapter's layers onto something else
(a base model, an output format, a live module, a serving runtime) records the outcome per layer in a
:class:`Certificate`:

* ``matched``: the layer lands on ``target`` (a base weight key, a module path, a name in the output);
* ``unmatched`` / ``ambiguous`` / ``shape``: it does not (no counterpart, several, or one of another shape);
* ``refused``: the target cannot hold it (a rule of the target, with the reason);
* ``dropped``: it does not land, and the user said so by naming it (``drop=`` / ``--drop``).

Its energy share is ``Σ‖ΔW‖²_F`` over the matched layers divided by the sum over all layers: the part of the
adapter's update that reaches the model. ``‖ΔW‖_F`` comes from the layer's own ``fro_norm()`` (``r x r`` Gram
matrices for low-rank kinds, no ``m x n`` product); kinds whose change depends on the base weight (OFT, IA3,
DoRA's direction) have no base-free ``‖ΔW‖``: their energy is the squared norm of their update vector where the
kind defines one, else unknown (``nan``), and the certificate says how many layers that is.

:meth:`Certificate.require` is the one gate every operation calls: it raises :class:`CoverageError` unless every
layer lands or is named by a drop pattern.
"""

from __future__ import annotations

import fnmatch
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import pandas as pd

from ..errors import (
    ArgumentTypeError,
    ConfigError,
    ShapeMismatchError,
    UnsupportedError,
)
from .kinds.base import tensor_fields

#: statuses of a layer that lands
LANDS = frozenset({"matched"})
#: every status, in report order
STATUSES = ("matched", "dropped", "unmatched", "ambiguous", "shape", "refused")
#: metadata key the certificate is written under (safetensors ``__metadata__``, GGUF KV, adapter_config)
METADATA_KEY = "adaptkit.coverage"


class CoverageError(ConfigError):
    """Part of an adapter would not land on the target (and was not named as dropped)."""


class CoverageShapeError(CoverageError, ShapeMismatchError):
    """Every layer that would not land has a counterpart of another shape (a :class:`ShapeMismatchError` too)."""


class CoverageRefusedError(CoverageError, UnsupportedError):
    """Every layer that would not land is refused by the target's rules (an :class:`UnsupportedError` too)."""


@dataclass(frozen=True)
class LayerCoverage:
    """The outcome of mapping one adapter layer (or extra tensor) onto a target.

    Args:
        path: the adapter's module path (or the extra tensor's name).
        target: where it lands (base weight key, module path, output name); ``None`` when it does not.
        status: one of :data:`STATUSES`.
        energy: ``‖ΔW‖²_F`` of the layer (``nan`` when it cannot be known without the base).
        tensors: number of stored tensors of the layer.
        reason: why it does not land (empty for matched layers).
        extra: True for a tensor that is not an adapter layer (``modules_to_save`` weight, unknown key).
        was: for a ``dropped`` layer, the status it had before it was dropped (``unmatched``, ``shape`` ...).
    """

    path: str
    target: str | None
    status: str
    energy: float
    tensors: int
    reason: str = ""
    extra: bool = False
    was: str = ""

    @property
    def lands(self) -> bool:
        """True when the layer reaches the target."""
        return self.status in LANDS


@dataclass(frozen=True)
class Certificate:
    """Per-layer coverage of one operation onto one target.

    Args:
        operation: what mapped the layers (``"load"``, ``"fuse"``, ``"inject"``, ``"convert"``, ``"export"`` ...).
        target: what they were mapped onto (base model id/path, output format, runtime name).
        layers: one :class:`LayerCoverage` per adapter layer and extra tensor, in adapter order.
        notes: extra lines for the summary (e.g. the rules that were applied).
    """

    operation: str
    target: str
    layers: tuple[LayerCoverage, ...]
    notes: tuple[str, ...] = field(default=())

    # ---------------------------------------------------------------------------------------- figures

    @property
    def total_energy(self) -> float:
        """``Σ‖ΔW‖²`` over the layers whose energy is known."""
        return math.fsum(c.energy for c in self.layers if not math.isnan(c.energy))

    @property
    def matched_energy(self) -> float:
        """``Σ‖ΔW‖²`` over the layers that land (energy known)."""
        return math.fsum(c.energy for c in self.layers if c.lands and not math.isnan(c.energy))

    @property
    def energy_share(self) -> float:
        """Matched energy / total energy (1.0 for an adapter whose total is 0; ``nan`` when no energy is known)."""
        known = [c for c in self.layers if not math.isnan(c.energy)]
        if not known:
            return math.nan
        total = self.total_energy
        return 1.0 if total == 0.0 else self.matched_energy / total

    @property
    def layer_share(self) -> float:
        """Layers (and extra tensors) that land / all of them (1.0 for an empty adapter)."""
        return sum(c.lands for c in self.layers) / len(self.layers) if self.layers else 1.0

    @property
    def tensor_share(self) -> float:
        """Stored tensors that land / all stored tensors (1.0 for an empty adapter)."""
        total = sum(c.tensors for c in self.layers)
        return sum(c.tensors for c in self.layers if c.lands) / total if total else 1.0

    @property
    def unknown_energy(self) -> int:
        """Number of layers (not extra tensors) whose energy is unknown without the base weights."""
        return sum(math.isnan(c.energy) for c in self.layers if not c.extra)

    @property
    def extras(self) -> int:
        """Number of extra tensors (whole-tensor replacements, unknown keys): counted in the layer and tensor
        shares and the statuses, not in the energy share (a replaced tensor has no ``ΔW`` without the base)."""
        return sum(c.extra for c in self.layers)

    @property
    def missing(self) -> list[LayerCoverage]:
        """The layers that do not land and were not dropped."""
        return [c for c in self.layers if not c.lands and c.status != "dropped"]

    @property
    def dropped(self) -> list[LayerCoverage]:
        """The layers the user chose to drop."""
        return [c for c in self.layers if c.status == "dropped"]

    @property
    def complete(self) -> bool:
        """True when every layer and extra tensor lands (nothing dropped, nothing missing)."""
        return all(c.lands for c in self.layers)

    def counts(self) -> dict[str, int]:
        """Number of layers per status (every status present, zeros included)."""
        return {s: sum(c.status == s for c in self.layers) for s in STATUSES}

    # ---------------------------------------------------------------------------------------- the gate

    @property
    def landing(self) -> frozenset[str]:
        """The paths of the layers (and extra tensors) that land."""
        return frozenset(c.path for c in self.layers if c.lands)

    def drop(self, patterns: Iterable[str] | str | None, strict: bool = True) -> Certificate:
        """The certificate with every non-landing layer named by one of ``patterns`` marked ``dropped``.

        Patterns are shell globs (``fnmatch``) on the adapter path (``*lm_head*``, ``model.layers.3.*``) or on its
        status (``status:unmatched``, ``status:shape``, ``status:refused``, ``status:ambiguous``; a dropped layer matches
        the status it had); a pattern that names no non-landing layer is an error (a typo would otherwise hide a
        drop).

        A pattern that names a layer dropped already (by an earlier operation, carried in the adapter's metadata)
        counts as used. ``strict=False`` allows patterns that name nothing here (an operation that certifies the
        adapter again later checks them).

        Raises:
            CoverageError: (``strict``) a pattern matches none of the layers that do not land.
        """
        patterns = check_drop(patterns)
        if not patterns:
            return self
        used: set[str] = set()
        out = []
        for c in self.layers:
            if not c.lands:
                hit = [p for p in patterns if _names(c, p)]
                if hit:
                    used.update(hit)
                    if c.status != "dropped":
                        reason = f"dropped on request ({hit[0]}); was {c.status}: {c.reason or c.status}"
                        c = replace(c, status="dropped", reason=reason, was=c.status)
            out.append(c)
        unused = [p for p in patterns if p not in used]
        if unused and strict:
            raise CoverageError(
                f"--drop {unused[0]!r} names no layer that fails to land on {self.target} ({self.operation}); "
                "remove it, or fix its spelling (`adaptkit check SOURCE --base BASE` lists what does not land)"
            )
        return replace(self, layers=tuple(out))

    def require(self, drop: Iterable[str] | str | None = (), strict: bool = True) -> Certificate:
        """Refuse partial coverage: every layer lands, or is named by a ``drop`` pattern.

        Args:
            drop: shell globs on adapter paths the user accepts to lose (see :meth:`drop`).

        Returns:
            The certificate with the named layers marked ``dropped``.

        Raises:
            CoverageError: naming how many layers (and what share of the energy) would not land, the first
                few with their reasons, and the option that drops them.
        """
        cert = self.drop(drop, strict=strict)
        missing = cert.missing
        if not missing:
            return cert
        first = missing[:4]
        if len({c.reason or c.status for c in first}) == 1:
            shown = f"{', '.join(c.path for c in first)} ({first[0].reason or first[0].status})"
        else:
            shown = "; ".join(f"{c.path} ({c.reason or c.status})" for c in first)
        more = f" (+{len(missing) - 4} more)" if len(missing) > 4 else ""
        share = cert.energy_share
        energy = f", {100 * (1 - share):.3g}% of the adapter's ΔW energy" if not math.isnan(share) and share < 1 else ""
        statuses = {c.status for c in missing}
        error = {frozenset({"shape"}): CoverageShapeError, frozenset({"refused"}): CoverageRefusedError}.get(
            frozenset(statuses), CoverageError)
        raise error(
            f"{len(missing)} of {len(cert.layers)} adapter layers would not land on {cert.target} ({cert.operation}"
            f"{energy}): {shown}{more}; fix the names or the base, or pass --drop PATTERN (drop=[...]) naming "
            "what to leave out"
        )

    # ---------------------------------------------------------------------------------------- output

    def to_dict(self, layers: bool = True) -> dict[str, Any]:
        """A JSON-ready dict: the figures, and (``layers=True``) one entry per layer that does not land."""
        share = self.energy_share
        out: dict[str, Any] = {
            "operation": self.operation, "target": self.target, "complete": self.complete,
            "layers": len(self.layers), "counts": self.counts(),
            "energy_share": None if math.isnan(share) else share,
            "layer_share": self.layer_share, "tensor_share": self.tensor_share,
            "unknown_energy_layers": self.unknown_energy, "extra_tensors": self.extras,
        }
        if self.notes:
            out["notes"] = list(self.notes)
        if layers:
            out["not_landing"] = [{"path": c.path, "status": c.status, "reason": c.reason, "tensors": c.tensors,
                                   "extra": c.extra, "energy": None if math.isnan(c.energy) else c.energy,
                                   **({"was": c.was} if c.was else {})}
                                  for c in self.layers if not c.lands]
        out["matched_energy"] = self.matched_energy
        out["total_energy"] = self.total_energy
        return out

    def to_json(self) -> str:
        """:meth:`to_dict` as compact JSON (what goes into an output's metadata)."""
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    def metadata(self) -> dict[str, str]:
        """``{"adaptkit.coverage": json}`` for an output's metadata."""
        return {METADATA_KEY: self.to_json()}

    def to_frame(self) -> Any:
        """One row per layer: path, target, status, energy, energy share, tensors, reason (a pandas DataFrame)."""
        total = self.total_energy
        rows = [{"path": c.path, "target": c.target, "status": c.status, "energy": c.energy,
                 "energy_share": (c.energy / total) if total and not math.isnan(c.energy) else math.nan,
                 "tensors": c.tensors, "extra": c.extra, "reason": c.reason} for c in self.layers]
        return pd.DataFrame(rows, columns=["path", "target", "status", "energy", "energy_share", "tensors", "extra",
                                           "reason"])

    def summary(self) -> str:
        """Two to six lines for a CLI summary."""
        counts = self.counts()
        share = self.energy_share
        energy = "n/a" if math.isnan(share) else f"{100 * share:.4g}%"
        head = (f"coverage ({self.operation} -> {self.target}): {counts['matched']}/{len(self.layers)} layers land, "
                f"ΔW energy {energy}")
        if self.unknown_energy:
            head += f" ({self.unknown_energy} layers' energy depends on the base)"
        if self.extras:
            head += f"; {self.extras} extra tensor(s) counted as layers, not in the energy"
        lines = [head]
        if counts["dropped"]:
            lines.append(f"  dropped on request: {counts['dropped']} ({', '.join(c.path for c in self.dropped[:3])}"
                         f"{' ...' if counts['dropped'] > 3 else ''})")
        for c in self.missing[:3]:
            lines.append(f"  NOT landing: {c.path} ({c.reason or c.status})")
        if len(self.missing) > 3:
            lines.append(f"  ... {len(self.missing) - 3} more not landing")
        lines.extend(f"  {n}" for n in self.notes)
        return "\n".join(lines)


def check_drop(patterns: Iterable[str] | str | None) -> list[str]:
    """The drop patterns as a list (one string is one pattern); an empty or non-string pattern is an error.

    Raises:
        CoverageError: a pattern that is not a non-empty string.
    """
    if patterns is None:
        return []
    if isinstance(patterns, str):
        patterns = [patterns]
    out = list(patterns)
    for p in out:
        if not isinstance(p, str) or not p.strip():
            raise CoverageError(f"drop pattern {p!r} is not a non-empty glob; name the layers to leave out, e.g. "
                                "--drop '*lm_head*' or --drop status:unmatched")
    return out


def read_metadata(metadata: Mapping[str, str]) -> dict[str, Any] | None:
    """The certificate dict an output's metadata holds under :data:`METADATA_KEY` (``None`` when there is none).

    Raises:
        CoverageError: the entry is not valid JSON.
    """
    raw = metadata.get(METADATA_KEY)
    if raw is None:
        return None
    try:
        return json.loads(raw)
    except (TypeError, ValueError) as e:
        raise CoverageError(f"metadata entry {METADATA_KEY} is not valid JSON ({e}); rewrite the file") from None


def combine(certs: Sequence[tuple[str, Certificate]], *, operation: str, target: str) -> Certificate:
    """One certificate for several adapters mapped onto one target (fuse ``a b``, merge ``a b``).

    With one adapter its certificate is returned as it is (paths unchanged); with several, each path becomes
    ``<label>:<path>`` (labels made unique with ``#i``), so that a drop glob can name one adapter's layer.
    """
    if len(certs) == 1:
        return replace(certs[0][1], operation=operation, target=target)
    seen: dict[str, int] = {}
    rows: list[LayerCoverage] = []
    notes: list[str] = []
    for i, (label, cert) in enumerate(certs):
        if label in seen:
            label = f"{label}#{i}"
        seen[label] = i
        rows.extend(replace(c, path=f"{label}:{c.path}") for c in cert.layers)
        notes.extend(cert.notes)
    return Certificate(operation, target, tuple(rows), tuple(dict.fromkeys(notes)))


def split(cert: Certificate, labels: Sequence[str]) -> list[frozenset[str]]:
    """The landing paths per adapter of a :func:`combine` d certificate (paths without the ``<label>:``)."""
    if len(labels) == 1:
        return [cert.landing]
    out: list[set[str]] = [set() for _ in labels]
    seen: dict[str, int] = {}
    for i, label in enumerate(labels):
        seen[label if label not in seen else f"{label}#{i}"] = i
    for c in cert.layers:
        if c.lands:
            label, _, path = c.path.partition(":")
            out[seen[label]].add(path)
    return [frozenset(s) for s in out]


def _names(c: LayerCoverage, pattern: str) -> bool:
    if pattern.startswith("status:"):  # a dropped layer keeps its status before the drop in `was`
        return pattern.removeprefix("status:") in (c.status, c.was)
    return fnmatch.fnmatchcase(c.path, pattern)


# ------------------------------------------------------------------------------------------- building


def layer_energy(layer: Any) -> float:
    """``‖ΔW‖²_F`` of a layer (its update vector's squared norm for kinds without a base-free delta, else ``nan``)."""
    norm = layer.fro_norm()
    if not math.isnan(norm):
        return norm * norm
    vec = layer.update_vector()
    if vec is not None:
        return float(vec.double().square().sum())
    return math.nan


@dataclass(frozen=True)
class Outcome:
    """Where one layer lands: ``target`` (``None``: it does not), the status and the reason."""

    target: str | None
    status: str = "matched"
    reason: str = ""

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ArgumentTypeError(f"unknown coverage status {self.status!r}; use one of {', '.join(STATUSES)}")


def certify(adapter: Any, outcomes: Mapping[str, Outcome], *, operation: str, target: str,
            extras: Mapping[str, Outcome] | None = None, notes: Sequence[str] = (),
            energies: bool = True) -> Certificate:
    """A certificate from the outcome of each layer (a layer without an outcome did not land: ``unmatched``).

    Args:
        adapter: the :class:`~adaptkit.core.adapter.Adapter` whose layers were mapped.
        outcomes: adapter path -> :class:`Outcome`.
        operation / target: what mapped them, onto what.
        extras: extra tensor name -> :class:`Outcome` for the adapter's extra tensors (``None``: extras are
            not part of the certificate, e.g. when the operation carries them through untouched).
        notes: lines added to the summary.
        energies: measure each layer's ``‖ΔW‖²`` (``False``: ``nan``, for a statuses-only gate whose figures are
            measured later).
    """
    rows = carried(adapter)
    for path, layer in adapter.layers.items():
        o = outcomes.get(path) or Outcome(None, "unmatched", f"no counterpart in {target}")
        energy = layer_energy(layer) if energies else math.nan
        rows.append(LayerCoverage(path, o.target, o.status, energy, len(tensor_fields(layer)), o.reason))
    if extras is not None:
        for key in adapter.extras:
            o = extras.get(key) or Outcome(None, "unmatched", f"no counterpart in {target}")
            rows.append(LayerCoverage(key, o.target, o.status, math.nan, 1, o.reason, extra=True))
    return Certificate(operation, target, tuple(rows), tuple(notes))


def carried(adapter: Any) -> list[LayerCoverage]:
    """The layers an earlier operation dropped on request, from the certificate in the adapter's metadata.

    They are part of every later certificate (status ``dropped``, with their energy), so that the energy share of
    ``load --drop`` then ``fuse`` is the share of the original adapter that reaches the model.
    """
    try:
        prior = read_metadata(getattr(adapter, "metadata", None) or {})
    except CoverageError:
        return []
    if not isinstance(prior, dict):
        return []
    rows = []
    for r in prior.get("not_landing") or ():
        if isinstance(r, dict) and r.get("status") == "dropped" and isinstance(r.get("path"), str):
            value = r.get("energy")  # JSON null: unknown
            rows.append(LayerCoverage(r["path"], None, "dropped",
                                      math.nan if not isinstance(value, (int, float)) else float(value),
                                      int(r.get("tensors") or 0), str(r.get("reason") or "dropped"),
                                      bool(r.get("extra")), str(r.get("was") or "")))
    present = set(adapter.layers) | set(adapter.extras)
    return [c for c in rows if c.path not in present]


def stamp(adapter: Any, cert: Certificate) -> Any:
    """``adapter`` with ``cert`` in its metadata under :data:`METADATA_KEY` (what writers put into the file)."""
    return adapter.replace(metadata={**adapter.metadata, **cert.metadata()})


def all_matched(adapter: Any, *, operation: str, target: str, extras: bool = False) -> Certificate:
    """The certificate of an operation that keeps every layer under its own path (merge, convert to a format
    that holds them all)."""
    return certify(adapter, {p: Outcome(p) for p in adapter.layers}, operation=operation, target=target,
                   extras={k: Outcome(k) for k in adapter.extras} if extras else None)
