"""Conversion between adapter kinds and between checkpoint formats.

* :func:`convert` turns layers of any additive kind into LoRA: exactly where the kind already is LoRA,
  otherwise through the dense delta and a truncated SVD, with the retained energy and relative error
  of every layer in a report.
* :func:`plan` says, per layer, whether a target format can store it as it is, and why not.
* :func:`convert_checkpoint` is ``adaptkit convert``: load, convert what the target cannot express (only
  when a rank or ``kind="lora"`` allows a lossy step), write. :data:`CONVERTERS` is the one table the CLI
  dispatches a ``'a->b'`` spec through: formats on both sides, or a named reparametrisation on the left.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from ..core.adapter import Adapter
from ..core.columns import MODULE, RETAINED_ENERGY
from ..core.coverage import Certificate, CoverageRefusedError, Outcome, certify, stamp
from ..core.kinds import Full, LoRA
from ..core.kinds.common import conv_or_linear
from ..core.linalg import numerical_rank
from ..core.params import RANK
from ..errors import ConfigError, ShapeMismatchError, UnsupportedError
from ..formats import (
    check_storable,
    check_write_options,
    format_module,
    names,
    save,
    to_format_namespace,
)
from ..formats.arch.remap import ARCH_KEY
from ..formats.coverage import base_tensors, match_layers, with_original_weights
from ..formats.inputs import as_adapter
from ..formats.peft import select_component
from ..formats.registry import refusals
from ..io.base_model import TensorReader, match_paths, open_base
from ..io.outputs import check_output
from ..progress import bar
from .reparam import pissa_to_lora


@dataclass(frozen=True)
class LayerConversion:
    """What happened to one layer.

    Args:
        module: module path. source_kind / kind: kind before and after. rank: rank after (``None`` for kinds
        without one). method: ``"kept"``, ``"svd"`` (truncated) or ``"exact-svd"`` (full numerical rank).
        retained_energy: share of the delta's squared Frobenius norm kept (1.0 when kept).
        relative_error: ``||dW - dW_r||_F / ||dW||_F`` (0.0 when kept).
    """

    module: str
    source_kind: str
    kind: str
    rank: int | None
    method: str
    retained_energy: float = 1.0
    relative_error: float = 0.0


def report_frame(rows: list[LayerConversion]) -> Any:
    """The per-layer report as a pandas DataFrame."""
    cols = [f.name for f in dataclasses.fields(LayerConversion)]
    return pd.DataFrame([dataclasses.asdict(r) for r in rows], columns=cols)


# ------------------------------------------------------------------------------------ kind conversion


def convert(adapter: Adapter, kind: str = "lora", rank: int | None = None, *, layers: list[str] | None = None,
            base: str | os.PathLike | None = None, return_report: bool = False,
            progress: bool | None = None) -> Adapter | tuple[Adapter, Any]:
    """Convert an adapter's layers to LoRA.

    LoRA layers are kept as they are unless ``rank`` is smaller than theirs (then truncated by an exact
    low-rank SVD). Every other additive kind (LoHa, LoKr, full diffs, Tucker LoCon) goes through its
    dense delta and a truncated SVD at ``rank``; with ``rank=None`` the full numerical rank is kept
    (lossless up to float rounding, but possibly large).

    Args:
        adapter: the adapter.
        kind: the target kind; only ``"lora"`` is supported.
        rank: the LoRA rank to keep, or ``None``.
        layers: convert only these paths (others are kept as they are); ``None`` converts all.
        base: the base model (hub id, directory of safetensors shards, or one file). Layers whose LoRA form depends
            on the base weight (base-dependent kinds: OFT, BOFT, HRA, LyCORIS OFT, GLoRA ...; IA3; per-input DoRA)
            are then converted through the change they make to it, ``apply(W) - W``: exact at full rank, lossy
            (reported) at ``rank``. Without it they are refused.
        return_report: also return the per-layer report (a DataFrame of :class:`LayerConversion`).
        progress: a progress bar on stderr (``None``: only on a terminal; see :mod:`adaptkit.progress`).

    Returns:
        The converted adapter (``alpha == rank`` for converted layers, i.e. scale 1), and the report when asked.

    Raises:
        UnsupportedError: a layer has no LoRA form without its base weights (IA3, per-input DoRA, norms);
            the message lists them.
        ConfigError: unknown ``kind`` or a non-positive ``rank``.
        NonFiniteError: a layer holds NaN or Inf (tensors, alpha or scale).
    """
    if kind != "lora":
        raise ConfigError(f"convert(kind={kind!r}) is not supported; adaptkit converts to kind='lora'")
    rank = RANK.optional(rank)
    adapter.check_finite("convert")
    todo = list(adapter.layers) if layers is None else list(layers)
    unknown = [p for p in todo if p not in adapter.layers]
    if unknown:
        raise ConfigError(f"convert(layers=...) names {len(unknown)} path(s) the adapter does not have, e.g. {unknown[0]}")
    if base is not None:  # open shapes fitted; layers with no LoRA form of their own become their change to the base
        adapter = with_base(adapter, base, paths=todo)
    blocked = {p: adapter.layers[p].lora_obstacle() for p in todo}
    blocked = {p: why for p, why in blocked.items() if why}
    if blocked:
        first = next(iter(blocked))
        raise UnsupportedError(
            f"{len(blocked)} layer(s) cannot become LoRA: {', '.join(list(blocked)[:4])}"
            f"{' ...' if len(blocked) > 4 else ''} ({first}: {blocked[first]})"
        )
    out: dict[str, Any] = {}
    rows: list[LayerConversion] = []
    for path, layer in bar(adapter.layers.items(), desc="convert", total=len(adapter.layers), unit="layer",
                           progress=progress):
        if path not in todo:
            out[path] = layer
            rows.append(LayerConversion(path, layer.kind, layer.kind, layer.rank, "kept"))
            continue
        new, energy, error, method = layer.to_lora(rank)  # kept, a Tucker core folded, or a truncated SVD
        out[path] = new
        rows.append(LayerConversion(path, layer.kind, new.kind, new.rank, method, energy, error))
    result = adapter.replace(layers=out, format=None, config={})
    return (result, report_frame(rows)) if return_report else result


def with_base(adapter: Adapter, base: str | os.PathLike, *, paths: Collection[str] | None = None,
              changes: bool = True) -> Adapter:
    """The adapter fitted to its base: layers whose file leaves the weight shape open (PEFT VeRA, OFT, WaveFT ...)
    take the base tensor's shape, and (``changes``) every layer of ``paths`` (default: all) that has no LoRA form
    without the base (``lora_obstacle()``: OFT, BOFT, HRA, LyCORIS OFT, GLoRA, MiSS "bat", trainable tokens, IA3,
    per-input DoRA) is replaced by its exact change to that base, ``apply(W, b) - (W, b)`` (:func:`_change_layer`).

    Exact at full rank; ``convert`` reports the energy a truncation keeps.

    Raises:
        ConfigError: a layer has no weight in the base. ShapeMismatchError: a layer does not fit its base weight.
    """
    wanted = set(adapter.layers if paths is None else paths)
    todo = [p for p, l in adapter.layers.items()
            if l.shape is None or (changes and p in wanted and l.lora_obstacle() is not None)]
    if not todo:
        return adapter
    ws = open_base(base)
    matches = match_paths(todo, ws.tensors)
    layers = dict(adapter.layers)
    with TensorReader() as reader:
        for path in todo:
            m = matches[path]
            info = ws.tensors[m.weight]
            try:
                layer = layers[path].fit(tuple(info.shape))
            except ShapeMismatchError as e:
                raise ShapeMismatchError(f"{path}: {e} (base tensor '{m.weight}')") from None
            if changes and path in wanted and layer.lora_obstacle() is not None:
                w = reader.read(info).float()
                b = reader.read(ws.tensors[m.bias]).float() if m.bias is not None else None
                new_w, new_b = layer.apply(w, b)
                diff_b = None if new_b is None or b is None or torch.equal(new_b, b) else new_b - b
                layer = _change_layer(new_w - w, diff_b, layer.module_type == "embedding")
            layers[path] = layer
    return adapter.replace(layers=layers)


def _change_layer(diff: torch.Tensor, diff_b: torch.Tensor | None, embedding: bool) -> Any:
    """A base-dependent layer's change to one base as an additive layer: a :class:`Full` difference, or for an
    embedding (which PEFT holds as an embedding LoRA only) its exact SVD as an embedding LoRA at numerical rank."""
    if not embedding:
        return Full(diff=diff, shape=tuple(diff.shape), diff_b=diff_b, module_type=conv_or_linear(tuple(diff.shape)))
    u, s, vh = torch.linalg.svd(diff.T.double(), full_matrices=False)  # math orientation (dim, num)
    rank = max(1, numerical_rank(s, tuple(diff.T.shape)))
    return LoRA.from_factors(u.float(), s.float(), vh.float(), shape=tuple(diff.shape), module_type="embedding",
                             fan_in_fan_out=True, rank=rank)


# ---------------------------------------------------------------------------------------- format plans


def plan(adapter: Adapter, target: str) -> dict[str, str]:
    """Layers a target format cannot store as they are: ``{path: reason}`` (empty when all fit).

    The format decides (its ``can_store`` and ``can_store_adapter``, :func:`adaptkit.formats.refusals`). Module
    paths it has no name for and extra tensors it refuses are nothing a conversion could fix:
    :func:`adaptkit.formats.save` names them.
    """
    return {p: why for p, why in refusals(target, adapter, paths=False).items() if p in adapter.layers}


# ------------------------------------------------------------------------------------------ checkpoints


@dataclass(frozen=True)
class ConversionResult:
    """Outcome of :func:`convert_checkpoint`: where it was written, from/to formats, the per-layer report, a
    ``note`` on how to load the output where that needs saying (PEFT paths that keep pipeline components), and the
    coverage certificate (also in the output's safetensors metadata under ``adaptkit.coverage``)."""

    out: Path
    source_format: str
    target_format: str
    report: Any
    lossless: bool
    note: str | None = None
    coverage: Certificate | None = None


def parse_spec(spec: str | None, src_format: str | None = None, dst_format: str | None = None, *,
               same: bool = False) -> tuple[str | None, str | None]:
    """``'lycoris->peft'`` (or ``--from/--to``) into ``(source or None, target)``; with ``same`` (a kind or rank
    conversion) no target means the source's own format (``None``)."""
    if spec:
        if "->" not in spec:
            raise ConfigError(f"conversion spec {spec!r} needs the form 'from->to', e.g. 'lycoris->peft' (quote it in a shell)")
        left, right = (s.strip().lower() for s in spec.split("->", 1))
        if (src_format and src_format.lower() != left) or (dst_format and dst_format.lower() != right):
            raise ConfigError(f"spec {spec!r} contradicts --from/--to; give one or the other")
        src_format, dst_format = left or None, right
    if not dst_format and not same:
        raise ConfigError("no target format; pass 'from->to' or --to (peft, kohya/lycoris, diffusers), or --kind lora / "
                          "--rank R to convert within the source's format")
    return (src_format.lower() if src_format else None), (dst_format.lower() if dst_format else None)


def convert_formats(source: str | os.PathLike, out: str | os.PathLike, *, src_format: str | None, dst_format: str | None,
                    rank: int | None = None, kind: str | None = None, base: Any = None,
                    overwrite: bool = False, component: str | None = None,
                    progress: bool | None = None, drop: Any = None, arch: str | None = None,
                    naming: str | None = None) -> ConversionResult:
    """Convert a checkpoint between formats (see :func:`convert_checkpoint`); ``dst_format=None``: the source's."""
    check_output(out, overwrite, inputs=[source, base])
    if dst_format is not None:  # checked before the source is read; a convert within the format, once it is known
        check_write_options(format_module(dst_format).NAME, component=component, naming=naming)
    adapter = as_adapter(source, format=src_format, base=base, drop=drop if base is not None else None)
    adapter.check_finite("convert")
    source_format = adapter.format or (src_format or "?")
    if dst_format is None and not adapter.format:
        raise ConfigError("the source's format is not known, so there is no format to convert within; pass --to")
    dst = format_module(dst_format or adapter.format).NAME
    if dst_format is None:
        check_write_options(dst, component=component, naming=naming)
    # diffusion transformers: original <-> diffusers names (packed projections stacked / split exactly)
    # (without --base the module map is the certificate: every layer is covered by a rule, or the mapping failed; the
    # shipped inventory is one release and would refuse its variants, Wan I2V's k_img / LTX 13B's extra blocks)
    adapter, mapped = to_format_namespace(adapter, dst, arch=arch, base=base, drop=drop, naming=naming)
    if dst == "peft" and component is None and base is not None:
        # one component's adapter (lora_unet_...) for a base that is that model alone: PEFT paths in its namespace
        component = names.bare_base_component(adapter.layers, base)
    if dst == "peft" and component not in (None, "each"):
        adapter = select_component(adapter, component)  # the report lists what is written
    if isinstance(base, (str, os.PathLike)):  # layers without a counterpart in the base: refused or dropped
        adapter = _certify_base(adapter, base, drop, original_names=ARCH_KEY in adapter.metadata)
    kinds_before = {p: l.kind for p, l in adapter.layers.items()}
    lossy_ok = rank is not None or kind == "lora"
    if isinstance(base, (str, os.PathLike)):
        # a base on disk (a live module only resolves names): open shapes are fitted, and with --kind/--rank every
        # layer without a LoRA form of its own becomes its exact change to the base
        adapter = with_base(adapter, base, changes=lossy_ok)
    todo = plan(adapter, dst)
    if kind is not None and kind != "lora":
        raise ConfigError(f"--kind {kind} is not supported; adaptkit converts to --kind lora")
    if kind == "lora":
        todo = {p: "--kind lora converts every layer" for p, l in adapter.layers.items()
                if not l.keeps_as_lora(rank)} | todo
    blocked = {p: why for p in todo if (why := adapter.layers[p].lora_obstacle())}
    if blocked:
        first = next(iter(blocked))
        if isinstance(base, (str, os.PathLike)) and not lossy_ok:
            hint = "add --kind lora (or --rank R) to turn each into its exact change to the base, or "
        elif "--base" in blocked[first] or isinstance(base, (str, os.PathLike)):
            hint = "or "
        else:
            hint = "pass --base BASE with --kind lora (each becomes its exact change to it), or "
        raise UnsupportedError(
            f"{len(blocked)} layer(s) cannot be written as {dst}: {', '.join(list(blocked)[:4])}"
            f"{' ...' if len(blocked) > 4 else ''} ({first}: {todo[first]}, and {blocked[first]}); {hint}write a "
            "format that holds the layer as it is ('adaptkit kinds' lists which)"
        )
    if todo and not lossy_ok:
        first = next(iter(todo))
        raise UnsupportedError(
            f"{len(todo)} layer(s) cannot be written as {dst} without loss: {', '.join(list(todo)[:4])}"
            f"{' ...' if len(todo) > 4 else ''} ({first}: {todo[first]}); pass --rank R to convert them to LoRA "
            "by truncated SVD (the loss is reported), or write --to kohya"
        )
    if todo:
        adapter, report = convert(adapter, "lora", rank, layers=list(todo), return_report=True, progress=progress)
        # the converted layers may now mix LoRA with kinds the target holds only alone (PEFT LoKr + LoRA): convert those too
        more = [p for p in plan(adapter, dst) if adapter.layers[p].lora_obstacle() is None]
        if more:
            adapter, extra = convert(adapter, "lora", rank, layers=more, return_report=True, progress=progress)
            rows = {r[MODULE]: r for r in report.to_dict("records")} | {
                r[MODULE]: r for r in extra.to_dict("records") if r[MODULE] in more}
            report = report_frame([LayerConversion(**rows[p]) for p in adapter.layers])
    else:
        how = {r.target: r.action for r in mapped}
        report = report_frame([LayerConversion(p, l.kind, l.kind, l.rank, how.get(p, "kept"),
                                                relative_error=_map_error(mapped, p))
                               for p, l in adapter.layers.items()])
    leftover = plan(adapter, dst)
    if leftover:
        first = next(iter(leftover))
        raise UnsupportedError(f"{first} still cannot be written as {dst} after conversion: {leftover[first]}")
    report["source_kind"] = [kinds_before.get(m, k) for m, k in zip(report[MODULE], report["source_kind"])]
    write_options = {"component": component if component == "each" else None,
                     **({"naming": naming} if naming is not None else {})}
    adapter, cert = certify_format(adapter, dst, drop, target=dst if base is None else f"{dst} for {base}",
                                   **write_options)
    report = report[report[MODULE].isin(list(adapter.layers))].reset_index(drop=True)
    written = save(stamp(adapter, cert), out, format=dst, overwrite=overwrite, **write_options)
    lossless = bool((report["method"] != "svd").all())
    note = _component_note(adapter, component, str(written)) if dst == "peft" else None
    return ConversionResult(Path(written), source_format, dst, report, lossless, note, cert)


def _map_error(rows: tuple, path: str) -> float:
    """The measured ΔW error of the namespace mapping that produced ``path`` (0.0 when it was not mapped)."""
    return max((r.error for r in rows if r.target == path), default=0.0)


def _certify_base(adapter: Adapter, base: str | os.PathLike, drop: Any, original_names: bool = False) -> Adapter:
    """The adapter without the layers / extra tensors ``drop`` names that have no counterpart in ``base`` (by the
    rules of :func:`adaptkit.formats.coverage.match_layers`: names and shapes); the rows are carried (dropped)
    into the conversion's certificate.

    Raises:
        CoverageError: layers or extras without a counterpart that ``drop`` does not name.
    """
    name, shapes = base_tensors(base)
    if original_names:  # layers in a diffusion transformer's original names, against a diffusers base
        shapes = with_original_weights(shapes)
    outcomes, extras = match_layers(adapter, shapes, name)
    cert = certify(adapter, outcomes, operation="convert", target=name, extras=extras).require(drop, strict=False)
    kept = cert.landing
    return stamp(adapter.replace(layers={p: l for p, l in adapter.layers.items() if p in kept},
                                 extras={k: v for k, v in adapter.extras.items() if k in kept}), cert)


def certify_format(adapter: Adapter, fmt: str, drop: Any = None, *, target: str | None = None,
                   operation: str = "convert", **options: Any) -> tuple[Adapter, Certificate]:
    """What the format ``fmt`` holds of ``adapter``: every layer and extra tensor lands, except what the format
    refuses (:func:`adaptkit.formats.refusals`: module paths it has no name for, layers and extras it cannot
    store); ``drop`` names what may be left out.

    Returns:
        ``(adapter without the dropped parts, certificate)``.

    Raises:
        CoverageRefusedError: parts the format refuses and ``drop`` does not name (the format's own message,
            also an UnsupportedError). CoverageError: a ``drop`` glob that names nothing.
    """
    name = format_module(fmt).NAME
    why = refusals(name, adapter, **options)
    outcomes = {p: Outcome(None, "refused", why[p]) if p in why else Outcome(p) for p in adapter.layers}
    extras = {k: Outcome(None, "refused", why[k]) if k in why else Outcome(k) for k in adapter.extras}
    cert = certify(adapter, outcomes, operation=operation, target=target or name, extras=extras).drop(drop)
    if cert.missing:
        try:
            check_storable(name, adapter, **options)
        except UnsupportedError as e:
            raise CoverageRefusedError(f"{e} (or pass --drop GLOB, drop=[...], naming what to leave out)") from None
        cert.require()
    kept = cert.landing
    return adapter.replace(layers={p: l for p, l in adapter.layers.items() if p in kept},
                           extras={k: v for k, v in adapter.extras.items() if k in kept}), cert


def _component_note(adapter: Adapter, component: str | None, out: str) -> str | None:
    """How to load PEFT output whose paths keep pipeline components (``unet.``), or what ``component`` did."""
    if component == "each":
        comps = sorted({c for p in adapter.layers if (c := names.component_of(p))})
        return f"one PEFT adapter per component: {', '.join(f'{out}/{c}' for c in comps)}"
    if component is not None:
        return f"{component}'s layers in its own namespace: PeftModel.from_pretrained({component}, {out!r})"
    comps = sorted({c for p in adapter.layers if (c := names.component_of(p))})
    if not comps:
        return None
    return (f"PEFT paths keep the pipeline component prefix{'es' if len(comps) > 1 else ''} "
            f"({', '.join(c + '.' for c in comps)}): PeftModel applies this adapter to a module holding "
            f"{'them' if len(comps) > 1 else 'it'} as attributes; --component {comps[0]} writes {comps[0]}'s layers "
            f"for PeftModel.from_pretrained({comps[0]}, {out!r})"
            + (", --component each one PEFT adapter per component, --to diffusers the whole pipeline in one file"
               if len(comps) > 1 else ""))


#: ``'a->b'`` dispatch: a left-hand name found here is a reparametrisation handler taking
#: ``(source, out, *, dst_format, rank, kind, base, overwrite, **options)``; any other left-hand side is a format
CONVERTERS: dict[str, Callable[..., ConversionResult]] = {}

def convert_reparam(source: str | os.PathLike, out: str | os.PathLike, *, method: str, dst_format: str = "lora",
                    rank: int | None = None, kind: str | None = None, base: Any = None, overwrite: bool = False,
                    initial: Adapter | str | os.PathLike | None = None, progress: bool | None = None,
                    **_: Any) -> Any:
    """``adaptkit convert 'pissa->lora' TRAINED OUT --initial INITIAL`` (also ``olora``, ``corda``).

    The handler registered in :data:`CONVERTERS`; writes a PEFT LoRA directory.

    Returns:
        :class:`ConversionResult` with the per-layer report.

    Raises:
        ConfigError: no ``initial``, a target other than ``lora``/``peft``, or ``kind`` other than ``lora``.
    """
    check_output(out, overwrite, inputs=[source, initial, base])
    if dst_format not in ("lora", "peft"):
        raise ConfigError(f"'{method}->{dst_format}' is not a conversion; use '{method}->lora' (written as a PEFT LoRA)")
    if kind not in (None, "lora"):
        raise ConfigError(f"'{method}->lora' produces LoRA layers; drop --kind {kind}")
    if initial is None:
        raise ConfigError(f"'{method}->lora' needs --initial INITIAL: the adapter saved right after initialisation, before training")
    adapter, report = pissa_to_lora(source, initial, rank=rank, return_report=True, progress=progress)
    written = save(adapter, out, format="peft", overwrite=overwrite)
    lossless = bool((report[RETAINED_ENERGY] >= 1.0 - 1e-9).all())
    return ConversionResult(Path(written), method, "peft", report, lossless)


# PiSSA / OLoRA / CorDA -> LoRA (``--initial INITIAL``), see adaptkit.ops.reparam
CONVERTERS.update({m: functools.partial(convert_reparam, method=m) for m in ("pissa", "olora", "corda")})


def convert_checkpoint(spec: str | None, source: str | os.PathLike, out: str | os.PathLike, *,
                       src_format: str | None = None, dst_format: str | None = None, rank: int | None = None,
                       kind: str | None = None, base: Any = None, overwrite: bool = False,
                       component: str | None = None, progress: bool | None = None,
                       drop: Any = None, **options: Any) -> ConversionResult:
    """``adaptkit convert``: read a checkpoint, convert what the target cannot hold, write it.

    Args:
        spec: ``'from->to'`` (``'lycoris->peft'``, ``'->diffusers'``) or ``None`` with ``dst_format``.
        source: hub id, directory or file. out: output path.
        src_format: source format (detected when ``None``). dst_format: target format.
        rank: allow a lossy conversion of what the target cannot express, to LoRA of this rank.
        kind: ``"lora"`` converts every layer to LoRA (full numerical rank unless ``rank``).
        base: base model for name resolution (kohya files). overwrite: replace ``out``.
        component: kohya output of an adapter made on a bare model: the pipeline component its module paths
            belong to (``unet`` -> ``lora_unet_``, see :func:`adaptkit.converters.kohya.write`). PEFT output of a
            pipeline adapter: write only this component's layers, in its own namespace (``"each"``: one PEFT
            adapter per component in ``out/<component>/``). Without it, PEFT output of a one-component adapter
            uses that component's namespace when ``base`` is that model alone (a ``UNet2DConditionModel``
            directory), and keeps the paths as they are otherwise (``ConversionResult.note`` says so).
        progress: a progress bar on stderr (``None``: only on a terminal; see :mod:`adaptkit.progress`).
        drop: globs naming the layers / extra tensors that may be left out when they do not land: the target
            format refuses them (a path it has no name for, an extra it does not carry), or (with ``base``) they
            have no counterpart there, or their kohya name resolves to nothing. A glob naming nothing is an error.
        **options: ``arch=`` (a diffusion architecture of ``adaptkit.formats.arch.ARCHS``, found from the adapter
            when not given) and ``naming=`` (kohya output: ``"original"`` / ``"diffusers"`` module names) for
            diffusion transformers, whose layers move between original and diffusers names as the target needs
            (packed projections stacked or split exactly; the report's ``method`` says how, with the measured error).

    Returns:
        A :class:`ConversionResult` with the per-layer report (retained energy, relative error) and ``coverage``.

    Raises:
        UnsupportedError: layers need a lossy step and neither ``rank`` nor ``kind`` allows it (listed).
        ConfigError / FormatError: bad spec, unknown formats, unreadable source; nothing is written.
    """
    left, right = parse_spec(spec, src_format, dst_format, same=kind is not None or rank is not None)
    if left in CONVERTERS:
        if component is not None:  # these write the PEFT adapter of the model the source was made on
            raise ConfigError(f"--component does not apply to '{left}->{right}': it writes a plain LoRA for the "
                              "model the source adapter was made on; drop it")
        if drop:
            raise ConfigError(f"--drop does not apply to '{left}->{right}': it maps no layer onto anything else; "
                              "remove it")
        return CONVERTERS[left](source, out, dst_format=right or "lora", rank=rank, kind=kind, base=base,
                                overwrite=overwrite, progress=progress, **options)
    return convert_formats(source, out, src_format=left, dst_format=right, rank=rank, kind=kind, base=base,
                           overwrite=overwrite, component=component, progress=progress, drop=drop,
                           **{k: options[k] for k in ("arch", "naming") if k in options})


__all__ = ["CONVERTERS", "ConversionResult", "LayerConversion", "convert", "convert_checkpoint",
           "convert_formats", "parse_spec", "plan", "report_frame"]
