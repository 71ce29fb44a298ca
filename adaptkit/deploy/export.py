"""``adaptkit export``: write an adapter a runtime accepts, with the same effect, and the certificate in its metadata.

:func:`export_adapter` runs the target's rules (:mod:`adaptkit.deploy.check`), applies the fixes of every blocking
finding in :data:`~adaptkit.deploy.fixes.FIX_ORDER` (exact ones by default, lossy ones only when their option is in
``lossy``), repeats until no rule blocks, checks the coverage certificate against the base, and writes the result
in the target's format atomically (an existing output is refused unless ``overwrite``). The fixes' per-layer rows
(rank before/after, relative error of ``ΔW``) come back in the result; the certificate and a summary of the fixes go
into the output's safetensors metadata (``adaptkit.export``, and the certificate's own keys).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from ..analysis.coverage import certify, certify_base
from ..core.adapter import Adapter
from ..core.coverage import Outcome, stamp
from ..errors import ConfigError, UnsupportedError
from ..formats import save
from ..io.outputs import check_output
from .check import CheckReport, build_report, make_context
from .features import plain_lora
from .fixes import (
    FIX_ORDER,
    FIXES,
    LOSSY_OPTIONS,
    FixRow,
    uniform_scale,
)
from .rules import Context, Target
from .targets import get_target

#: rounds of fixing before export gives up (a fix can make another rule apply: a fold adds a rank pattern)
MAX_ROUNDS = 4
#: the ``adapter_config.json`` fields kept from the source (the writer rebuilds r, alpha, patterns and targets)
KEEP_CONFIG = ("peft_type", "task_type", "base_model_name_or_path", "revision", "target_modules")
#: the certificate's note when no base was given (the layers were not matched against a model)
NO_BASE_NOTE = "not checked against a base model: pass --base BASE to certify that every layer lands"
#: the metadata key of the export summary
METADATA_KEY = "adaptkit.export"


@dataclass(frozen=True)
class ExportResult:
    """What :func:`export_adapter` wrote.

    Args:
        path: the output. target: the target's name. adapter: the adapter written.
        fixes: one :class:`~adaptkit.deploy.fixes.FixRow` per layer a fix changed.
        dropped: what ``drop`` removed. check: the check of the written adapter (``ok``).
        certificate: the coverage certificate (against the base when one is given, else of the written layers; the
            layers `drop` removed are in it as `dropped`).
    """

    path: Path
    target: str
    adapter: Adapter
    fixes: tuple[FixRow, ...]
    dropped: tuple[str, ...]
    check: CheckReport
    certificate: Any

    def frame(self) -> pd.DataFrame:
        """The per-layer fix report: module, fix, exact, rank_before, rank_after, rel_error, note."""
        cols = [f.name for f in dataclasses.fields(FixRow)]
        return pd.DataFrame([dataclasses.asdict(r) for r in self.fixes], columns=cols)

    @property
    def max_error(self) -> float:
        """The largest measured relative error of any layer (0 when every fix was exact and measured)."""
        errs = [r.rel_error for r in self.fixes if not math.isnan(r.rel_error)]
        return max(errs, default=0.0)

    def summary(self) -> dict[str, Any]:
        """The export's facts: target, output, fixes per name, dropped, lossy layers, max error, coverage."""
        counts: dict[str, int] = {}
        for r in self.fixes:
            counts[r.fix] = counts.get(r.fix, 0) + 1
        return {"target": self.target, "output": str(self.path), "layers": len(self.adapter.layers),
                "fixes": counts, "dropped": list(self.dropped),
                "lossy layers": sum(not r.exact for r in self.fixes), "max rel error": self.max_error,
                "coverage": self.certificate.summary()}


def parse_lossy(lossy: Iterable[str] | str | None) -> frozenset[str]:
    """The ``lossy`` options as a set (a comma-separated string or a list).

    Raises:
        ConfigError: a name that is not in :data:`~adaptkit.deploy.fixes.LOSSY_OPTIONS`.
    """
    if lossy is None:
        return frozenset()
    names = [n.strip() for n in (lossy.split(",") if isinstance(lossy, str) else lossy) if n.strip()]
    bad = [n for n in names if n not in LOSSY_OPTIONS]
    if bad:
        raise ConfigError(f"--lossy {bad[0]} is not a lossy fix; choose from {', '.join(LOSSY_OPTIONS)}")
    return frozenset(names)


def drop_matching(adapter: Adapter, drop: Iterable[str], target: str = "export") -> tuple[Adapter, tuple[str, ...]]:
    """The adapter without the layers and extra tensors a ``drop`` glob names (``fnmatch`` on the path).

    Export's ``drop`` may name layers that would land on the base but that the target refuses (a DoRA layer no fix
    keeps); they are recorded as ``dropped`` in the adapter's coverage metadata, so the certificate of the written
    adapter lists them and its energy share is the share of the original adapter that still reaches the model.

    Raises:
        ConfigError: a glob that names nothing (a typo would otherwise drop nothing silently).
    """
    globs = tuple(drop)
    if not globs:
        return adapter, ()
    names = list(adapter.layers) + list(adapter.extras)
    for g in globs:
        if not any(fnmatch.fnmatchcase(n, g) for n in names):
            raise ConfigError(f"--drop {g} names no layer or saved tensor of the adapter; check the glob "
                              f"(paths look like {names[0] if names else '-'})")
    which = {n: next(g for g in globs if fnmatch.fnmatchcase(n, g)) for n in names
             if any(fnmatch.fnmatchcase(n, g) for g in globs)}
    gone = tuple(sorted(which))
    layers = {p: l for p, l in adapter.layers.items() if p not in which}
    if not layers:
        raise ConfigError("--drop removes every layer of the adapter; there is nothing to export")
    outcomes = {p: Outcome(None, "dropped", f"dropped on request ({which[p]})") if p in which else Outcome(p)
                for p in adapter.layers}
    extras = {k: Outcome(None, "dropped", f"dropped on request ({which[k]})") if k in which else Outcome(k)
              for k in adapter.extras}
    record = certify(adapter, outcomes, operation="export", target=target, extras=extras)
    kept = adapter.replace(layers=layers, extras={k: v for k, v in adapter.extras.items() if k not in which})
    return stamp(kept, record), gone


def _apply_round(adapter: Adapter, target: Target, ctx: Context, lossy: frozenset[str]) -> tuple[Adapter, list[FixRow]]:
    """One pass over the target's rules in fix order: each blocking rule that still finds something gets its fix."""
    rows: list[FixRow] = []
    order = sorted((r for r in target.rules if r.fix is not None and r.verdict != "accepted"),
                   key=lambda r: FIX_ORDER.index(r.fix))
    for rule in order:
        where = rule.finds(adapter, ctx)
        if not where:
            continue
        fix = FIXES[rule.fix]
        if not fix.exact and fix.option not in lossy:
            raise UnsupportedError(
                f"{target.label}: {rule.message} ({len(where)} place(s), e.g. {where[0]}); export fixes this only with "
                f"a loss: pass --lossy {fix.option} (lossy=['{fix.option}']) to get it and a per-layer error report"
            )
        adapter, new_rows = fix.apply(adapter, ctx, sorted(where))
        rows += new_rows
    return adapter, rows


def _refusals(report: CheckReport) -> None:
    bad = [f for f in report.blocking if f.fix is None]
    if bad:
        f = bad[0]
        raise UnsupportedError(f"{report.label} cannot take {len(f.where)} place(s) of this adapter ({f.rule}: "
                               f"{f.message}; e.g. {f.where[0]}); no rewrite keeps them: pass --drop GLOB naming "
                               "them to leave them out, or fuse the adapter into the base instead")


def _trim_config(adapter: Adapter) -> Adapter:
    """The config fields the writer should keep: :data:`KEEP_CONFIG`, and the ``modules_to_save`` entries whose saved
    tensors are still there (a classification head vLLM takes whole)."""
    if adapter.format != "peft":
        return adapter.replace(config={})
    config = {k: adapter.config[k] for k in KEEP_CONFIG if k in adapter.config}
    modules = {k.removesuffix(".weight").removesuffix(".bias") for k in adapter.extras}
    saved = list(dict.fromkeys(m for m in adapter.config.get("modules_to_save") or ()
                               if isinstance(m, str) and any(p == m or p.endswith("." + m) for p in modules)))
    if saved:
        config["modules_to_save"] = saved
    return adapter.replace(config=config)


def pad_to_bucket(adapter: Adapter, target: Target, ctx: Context) -> tuple[Adapter, list[FixRow]]:
    """Every LoRA layer zero-padded (scale baked in) to the smallest of the target's rank buckets at or above the
    adapter's rank.

    Raises:
        ConfigError: the target has no buckets, or the rank is above all of them.
    """
    if not target.rank_buckets:
        raise ConfigError(f"{target.label} has no rank buckets; drop pad_to_bucket (--pad-to-bucket)")
    top = max((l.rank for l in adapter.layers.values() if plain_lora(l)), default=None)
    if top is None:
        return adapter, []
    bucket = next((b for b in target.rank_buckets if b >= top), None)
    if bucket is None:
        raise ConfigError(f"rank {top} is above {target.label}'s largest rank bucket {target.rank_buckets[-1]}")
    return uniform_scale(adapter, ctx, list(adapter.layers), rank=bucket, name="pad_to_bucket")


def certify_export(adapter: Adapter, base: Any) -> Any:
    """The coverage certificate of the exported adapter against ``base``, refusing partial coverage (a base that
    ties ``lm_head`` to the input embedding counts its output layer: :func:`~adaptkit.formats.coverage.base_tensors`).

    Raises:
        CoverageError: layers that land nowhere.
    """
    return certify_base(adapter, base, operation="export", drop=())


def export_adapter(adapter: Adapter, out: str | Path, *, target: str, base: Any = None, max_rank: int | None = None,
                   lossy: Iterable[str] | str | None = None, drop: Iterable[str] = (), pad_bucket: bool = False,
                   overwrite: bool = False) -> ExportResult:
    """Write ``adapter`` for ``target`` with the same effect (see the module docstring).

    Args:
        adapter: the adapter. out: the output (a directory for PEFT output).
        target: a :data:`~adaptkit.deploy.targets.TARGETS` name. base: the base model (needed by fixes that read it,
            and for the coverage certificate). max_rank: the rank limit (default: the target's).
        lossy: the lossy fixes allowed (``dora``, ``bias``, ``modules_to_save``, ``rank``).
        drop: globs of layers / saved tensors to leave out (named in the metadata).
        pad_bucket: zero-pad the rank to the target's next rank bucket. overwrite: replace an existing output.

    Raises:
        UnsupportedError: a rule no fix keeps (name it in ``drop``), or a lossy fix not allowed in ``lossy``.
        ConfigError: a fix needs ``base``; a bad option. CoverageError: layers that land nowhere in the base.
        OutputExistsError: ``out`` exists and ``overwrite`` is false.
    """
    tgt = get_target(target)
    allowed = parse_lossy(lossy)
    check_output(out, overwrite, inputs=[adapter, base] if base is not None else [adapter])
    adapter.check_finite("export")
    adapter, dropped = drop_matching(adapter, drop, tgt.label)
    ctx = make_context(tgt, base, max_rank)
    rows: list[FixRow] = []
    for _ in range(MAX_ROUNDS):
        report = build_report(adapter, tgt, ctx)
        _refusals(report)
        if report.ok:
            break
        adapter, new_rows = _apply_round(adapter, tgt, ctx, allowed)
        rows += new_rows
    else:  # the last round's fixes may have been the ones that made it ok
        report = build_report(adapter, tgt, ctx)
        _refusals(report)
    if not report.ok:
        raise UnsupportedError(f"export to {tgt.label} did not converge: {report.blocking[0].rule} still applies after "
                               f"{MAX_ROUNDS} rounds of fixes; please report it")
    if pad_bucket:
        adapter, new_rows = pad_to_bucket(adapter, tgt, ctx)
        rows += new_rows
    # against the base when there is one; else every written layer lands in the target's file. Either way the
    # layers drop= removed are in it (carried from the metadata drop_matching wrote)
    certificate = certify_export(adapter, base) if base is not None else certify(
        adapter, {p: Outcome(p) for p in adapter.layers}, operation="export", target=tgt.label,
        extras={k: Outcome(k) for k in adapter.extras}, notes=(NO_BASE_NOTE,))
    final = build_report(adapter, tgt, ctx, certificate)
    summary = {"target": tgt.name, "runtime": tgt.version, "fixes": sorted({r.fix for r in rows}),
               "lossy": sorted(allowed), "dropped": list(dropped),
               "lossy_layers": sum(not r.exact for r in rows),
               "max_rel_error": max((r.rel_error for r in rows if not math.isnan(r.rel_error)), default=0.0)}
    metadata = {**adapter.metadata, METADATA_KEY: json.dumps(summary, sort_keys=True)}
    metadata.update(certificate.metadata())
    adapter = _trim_config(adapter).replace(metadata=metadata)
    if tgt.write is not None:
        path = tgt.write(adapter, out, base=base, overwrite=overwrite)
    else:
        path = save(adapter, out, format=tgt.output_format, overwrite=overwrite, **tgt.write_options)
    return ExportResult(Path(path), tgt.name, adapter, tuple(rows), dropped, final, certificate)


__all__ = ["KEEP_CONFIG", "METADATA_KEY", "ExportResult", "certify_export", "drop_matching", "export_adapter", "pad_to_bucket",
           "parse_lossy"]
