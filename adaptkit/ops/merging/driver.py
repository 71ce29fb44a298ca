"""``merge``: combine adapters layer by layer with one of the methods of :data:`~.methods.METHODS`.

Works on checkpoints alone (no base model). Per layer, the adapters that have the layer take part (a
layer present in only some adapters merges what is there, as PEFT does). Everything is computed in
float32 and written in the dtype of the first adapter that has the layer. The output is a LoRA (scale 1:
``alpha == rank``, PEFT's convention for merged adapters) or, for IA3 inputs, an IA3 adapter; its
metadata records how it was made under the key ``adaptkit.merge`` (JSON).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ...core.adapter import Adapter
from ...core.coverage import METADATA_KEY, Certificate, CoverageError, Outcome, certify
from ...core.coverage import combine as combine_certificates
from ...core.deferred import DeferredMetadata
from ...core.kinds import Layer, LoRA, layer_dtype
from ...core.kinds.base import MODULE_TYPES, NO_SHAPE, tensor_fields, tensor_is_finite
from ...core.linalg import dense_svd, lowrank_svd, lowrank_svd_parts
from ...core.params import (
    COMMON,
    DENSITY,
    EPSILON,
    GAMMA,
    KEEP,
    MAJORITY_SIGN,
    RANK,
    SEED,
    WEIGHTS,
    check_weights,
)
from ...errors import ConfigError, NonFiniteError, ShapeMismatchError, UnsupportedError
from ...formats import check_write_options, save
from ...formats.inputs import as_adapters
from ...io.outputs import check_output
from ...progress import bar
from .methods import METHODS, Method, Operand, Output, combine, get_method
from .subspace import SUBSPACE, SubspaceOptions
from .workspace import Workspace

#: metadata key holding the provenance JSON of a merged adapter
PROVENANCE_KEY = "adaptkit.merge"
#: the random streams of DARE / DELLA merges, recorded in the provenance: one NumPy PCG64 generator per layer,
#: seeded by ``sha256(f"{seed}:{path}")`` (until December 2026 a torch generator: a seed then gave other draws)
RNG = "pcg64-sha256(seed:path)"


@dataclass(frozen=True)
class _Options:
    method: Method
    density: float | None
    rank: int | None
    majority_sign: str
    seed: int | None
    gamma: float | None = None
    epsilon: float | None = None
    keep: float | None = None
    common: float | None = None


def merge(adapters: Sequence[Adapter | str | os.PathLike], weights: Sequence[float] | None = None,
          method: str = "task_arithmetic", density: float | None = None, rank: int | None = None,
          majority_sign: str = "total", seed: int | None = None, progress: bool | None = None,
          base: str | os.PathLike | None = None, drop: Sequence[str] | str | None = None,
          gamma: float | None = None, epsilon: float | None = None, keep: float | None = None,
          common: float | None = None) -> Adapter:
    """Merge adapters into one, with PEFT's ``add_weighted_adapter`` numbers for PEFT's method names.

    Args:
        adapters: :class:`~adaptkit.Adapter` objects, or sources (hub ids, directories, files) to load.
        weights: one weight per adapter (default: all 1.0). Negative weights subtract an adapter.
        method: ``task_arithmetic`` (default: the exact sum of weighted deltas), or one of PEFT's
            ``svd``, ``linear``, ``cat``, ``ties``, ``ties_svd``, ``dare_linear``, ``dare_ties``,
            ``dare_linear_svd``, ``dare_ties_svd``, ``magnitude_prune``, ``magnitude_prune_svd``, or mergekit's
            ``breadcrumbs``, ``breadcrumbs_ties``, ``della``, ``della_linear``, or the LoRA-native ``knots``,
            ``knots_dare``, ``tsv``, ``iso_c``, ``iso_cts``, ``core_linear``, ``core_ties`` (see ``docs/merging.md``;
            ``adaptkit merge --help`` lists the table). As in PEFT, a single adapter with a PEFT method is merged
            ``linear``.
        density: fraction of entries to keep, for the TIES / DARE / pruning methods (required there).
        rank: output rank for ``svd``, ``*_svd`` (default: the largest input rank) and ``task_arithmetic``
            (default: exact, rank = sum of input ranks).
        majority_sign: ``"total"`` or ``"frequency"``: how TIES elects the sign.
        seed: seed for the DARE and DELLA methods' random drop; each layer draws from its own generator seeded by
            ``(seed, layer path)``, so results do not depend on layer order. ``None`` draws a seed from
            torch's global RNG (recorded in the provenance).
        progress: show a progress bar (``None``: only on a terminal).
        gamma: ``breadcrumbs*`` only: fraction of the largest entries dropped as outliers (default 0.01).
        keep: ``tsv`` only: the fraction of each task's singular components kept (default ``1 / len(adapters)``).
        common: ``iso_cts`` only: the fraction of the merged rank given to the common subspace (default 0.8).
        epsilon: ``della*`` only: keep probabilities run from ``density - epsilon`` (smallest entry of a row)
            to ``density + epsilon`` (largest) (default 0.1 if ``density`` allows it, see docs/merging.md).
        base: base model (hub id or directory) used to resolve module names when loading sources whose
            names need it (kohya/LyCORIS files of models without a shipped inventory, e.g. LLMs).
        drop: globs naming input layers that may be missing from the output (see docs/coverage.md); every
            method here keeps every layer of every input (the union of the paths), so a glob only names kohya
            names that resolve to nothing in ``base``; a glob naming nothing is an error.

    Returns:
        The merged adapter (LoRA layers, or IA3 for IA3 inputs), not yet written; save it with
        :func:`adaptkit.save`. Its metadata holds the coverage certificate (``adaptkit.coverage``: every input
        layer and extra tensor reaches the output, ``<input label>:<path>`` rows).

    Raises:
        ConfigError: unknown method, missing or misplaced density/rank, wrong number of weights, different
            base models, unequal ranks for a factor-wise method.
        ShapeMismatchError: a layer has different shapes in different adapters.
        UnsupportedError: DoRA inputs, mixed IA3 and LoRA, or a method that is undefined for the inputs.
        NonFiniteError: an input holds NaN or Inf (tensors, alpha or scale), or the result does.
    """
    requested = get_method(method)
    density, rank, majority_sign, seed = _check_options(requested, density, rank, majority_sign, seed)
    gamma, epsilon = _check_gamma_epsilon(requested, density, gamma, epsilon)
    keep, common = _check_keep_common(requested, keep, common)
    if weights is not None:
        weights = WEIGHTS.check(weights)
    loaded = as_adapters(list(adapters), base=base, drop=drop)
    if not loaded:
        raise ConfigError("merge needs at least one adapter")
    for a in loaded:
        a.check_finite("merge")
    w = check_weights(weights, len(loaded))
    base = _check_base_models(loaded)
    every = [layer for a in loaded for layer in a.layers.values()]
    _refuse_dora(loaded)
    all_lora = bool(every) and all(unit.lora_ab() is not None for layer in every for unit in _units(layer))
    # PEFT's add_weighted_adapter merges a single adapter with "linear", whatever was asked
    used = METHODS["linear"] if requested.peft and len(loaded) == 1 and all_lora else requested
    if used.random and seed is None:
        seed = int(torch.randint(0, 2**62, (1,)).item())
    shapeless = sorted({p for a in loaded for p, layer in a.layers.items() if layer.additive and layer.shape is None})
    if shapeless:  # a PEFT VeRA/WaveFT/... file read without its base: the delta needs the weight shape
        raise UnsupportedError(f"{len(shapeless)} layer(s) have no weight shape yet (e.g. {shapeless[0]}): {NO_SHAPE}")
    if any(not layer.has_delta for layer in every):  # IA3: merged in its own parameters
        layers = _merge_own(loaded, w, requested, progress)
        out_rank = None
    else:
        out_rank = _resolve_rank(used, rank, loaded, all_lora)
        opts = _Options(used, density, out_rank, majority_sign, seed, gamma, epsilon, keep, common)
        layers = _merge_loras(loaded, w, opts, progress)
    provenance = {
        "method": requested.name,
        **({"applied_method": used.name} if used is not requested else {}),
        "weights": w,
        "density": density,
        "rank": out_rank,
        "majority_sign": majority_sign if used.consensus else None,
        "seed": seed if used.random else None,
        **({"rng": RNG} if used.random else {}),
        **({"gamma": gamma} if gamma is not None else {}),
        **({"epsilon": epsilon} if epsilon is not None else {}),
        **({"keep": keep} if keep is not None else {}),
        **({"common": common} if common is not None else {}),
        "sources": [{"source": _source_text(a.source), "format": a.format, "name": a.name, "base_model": a.base_model}
                    for a in loaded],
    }
    first = loaded[0]
    extras = _merge_extras(loaded)
    info = {PROVENANCE_KEY: json.dumps(provenance, sort_keys=True)}
    # every input layer and extra in the output, no drop patterns to check: the gate cannot refuse (carried rows
    # are dropped already), so it is not run; else it runs now, and the energies wait for the metadata to be read
    lands = not drop and all(p in layers for a in loaded for p in a.layers) and \
        all(k in extras for a in loaded for k in a.extras)
    if all_lora:
        if not lands:
            try:
                certify_merge(loaded, layers, extras, requested.name, energies=False).require(drop)
            except CoverageError:  # the refusal names the share of the energy that would not land: measure it
                certify_merge(loaded, layers, extras, requested.name).require(drop)
                raise
        metadata: Mapping[str, str] = DeferredMetadata(info, {METADATA_KEY: partial(
            _coverage_json, loaded, frozenset(layers), frozenset(extras), requested.name, drop)})
    else:
        metadata = {**info, **certify_merge(loaded, layers, extras, requested.name).require(drop).metadata()}
    return Adapter(
        layers=layers,
        base_model=base,
        metadata=metadata,
        config=_output_config(first.config),
        extras=extras,
        format=first.format,
        source=None,
        name="merged",
    )


def certify_merge(inputs: Sequence[Adapter], layers: Collection[str], extras: Collection[str],
                  method: str, energies: bool = True) -> Certificate:
    """Which input layers and extra tensors reach the merged output (``<label>:<path>`` rows for several inputs).

    A method that leaves a layer out makes it ``unmatched`` here; the caller's ``require(drop)`` then refuses it
    unless it is named. ``energies=False`` leaves the rows' ``‖ΔW‖²`` unmeasured (``nan``).
    """
    labels = [Path(str(a.source)).name if a.source else f"adapter{i}" for i, a in enumerate(inputs)]
    gone = f"not in the output of merge method {method}"
    certs = [(label, certify(a, {p: Outcome(p) if p in layers else Outcome(None, "unmatched", gone) for p in a.layers},
                             operation="merge", target="the merged adapter",
                             extras={k: Outcome(k) if k in extras else Outcome(None, "unmatched", gone)
                                     for k in a.extras}, energies=energies))
             for label, a in zip(labels, inputs)]
    return combine_certificates(certs, operation="merge", target=f"the merged adapter ({method})")


def _coverage_json(inputs: Sequence[Adapter], layers: frozenset[str], extras: frozenset[str], method: str,
                   drop: Sequence[str] | str | None) -> str:
    """The merge's whole certificate (energies measured) as the metadata value, for :class:`DeferredMetadata`."""
    return certify_merge(inputs, layers, extras, method).require(drop).to_json()


def merge_to(sources: Sequence[Adapter | str | os.PathLike], out: str | os.PathLike, format: str = "peft",
             overwrite: bool = False, component: str | None = None, **options: Any) -> Adapter:
    """Load sources, merge them and write the result atomically (what ``adaptkit merge`` runs).

    Args:
        sources: hub ids, directories, files (or adapters).
        out: output path (directory for PEFT/diffusers, file for kohya).
        format: output format.
        overwrite: replace an existing output.
        component: kohya output only: the pipeline component of bare module paths (see
            :func:`adaptkit.converters.kohya.write`).
        **options: :func:`merge` arguments (``weights``, ``method``, ``density``, ``rank`` ...).

    Returns:
        The merged adapter, with ``source`` set to the written path.

    Raises:
        OutputExistsError: ``out`` exists and ``overwrite`` is false (checked before any work).
        OutputIsInputError: ``out`` is, contains or lies inside a source (or ``base``), checked before any work.
    """
    check_output(out, overwrite, inputs=[*sources, options.get("base")])
    check_write_options(format, component=component)
    merged = merge(sources, **options)
    path = save(merged, out, format=format, overwrite=overwrite, component=component)
    return merged.replace(source=str(Path(path).resolve()))


# ----------------------------------------------------------------------------------------- checks


def _output_config(config: Any) -> dict[str, Any]:
    """The first adapter's config fields, minus initialisations that would rewrite the base on load."""
    out = dict(config)
    if out.get("init_lora_weights") not in (None, True, False, "gaussian"):  # pissa, olora, corda, loftq ...
        out["init_lora_weights"] = True
    return out


def _source_text(source: str | None) -> str | None:
    """Local sources as absolute paths; hub sources (``repo@commit``) and ``None`` unchanged."""
    if source is not None and os.path.exists(source):
        return str(Path(source).resolve())
    return source


def _check_options(m: Method, density: Any, rank: Any, majority_sign: Any, seed: Any
                   ) -> tuple[float | None, int | None, str, int | None]:
    """The merge options checked by their declarations (:mod:`adaptkit.core.params`) and against the method."""
    if m.needs_density:
        if density is None:
            raise ConfigError(f"method '{m.name}' needs density: the fraction of entries to keep (0 < density <= 1)")
        density = DENSITY.check(density)
    elif density is not None:
        raise ConfigError(f"method '{m.name}' does not prune, so density does not apply; drop it or pick ties/dare_*/breadcrumbs/della")
    if rank is not None:
        if not m.takes_rank:
            own = "its rank is the sum of the inputs' ranks" if m.output is Output.CONCAT else "it keeps the inputs' rank"
            raise ConfigError(
                f"method '{m.name}' chooses no rank ({own}), so rank does not apply; use 'svd', a '*_svd' method "
                "or 'task_arithmetic' to choose the rank"
            )
        rank = RANK.check(rank)
    return density, rank, MAJORITY_SIGN.check(majority_sign), SEED.optional(seed)


def _check_gamma_epsilon(m: Method, density: float | None, gamma: Any, epsilon: Any
                         ) -> tuple[float | None, float | None]:
    """``gamma`` / ``epsilon`` checked by their declarations, refused where the method has no use for them."""
    if gamma is not None and not m.needs_gamma:
        raise ConfigError(f"method '{m.name}' drops no outliers, so gamma does not apply; drop it or pick breadcrumbs*")
    if epsilon is not None and not m.needs_epsilon:
        raise ConfigError(f"method '{m.name}' has no rank-based keep probabilities, so epsilon does not apply; "
                          "drop it or pick della*")
    if m.needs_gamma:
        gamma = 0.01 if gamma is None else GAMMA.check(gamma)
    if m.needs_epsilon:
        epsilon = (min(0.1, density / 2, (1 - density) / 2) if epsilon is None else EPSILON.check(epsilon))
        if density is not None and density < 1 and (density - epsilon <= 0 or density + epsilon > 1):
            raise EPSILON.error(epsilon, f"a number with density - epsilon > 0 and density + epsilon <= 1 "
                                         f"(density is {density})")
    return gamma, epsilon


def _check_keep_common(m: Method, keep: Any, common: Any) -> tuple[float | None, float | None]:
    """``keep`` / ``common`` checked by their declarations, refused where the method has no use for them."""
    for name, value, param in (("keep", keep, KEEP), ("common", common, COMMON)):
        if value is not None and name not in m.extra:
            users = ", ".join(x.name for x in METHODS.values() if name in x.extra)
            raise ConfigError(f"method '{m.name}' has no {name} parameter; drop it or pick {users}")
    return (None if keep is None else KEEP.check(keep)), (None if common is None else COMMON.check(common))


def _check_base_models(adapters: list[Adapter]) -> str | None:
    named = [(i, a.base_model.rstrip("/")) for i, a in enumerate(adapters) if a.base_model]
    for i, b in named[1:]:
        if b != named[0][1]:
            raise ConfigError(
                f"adapter {named[0][0] + 1} is for base model '{named[0][1]}' but adapter {i + 1} is for '{b}'; "
                "only adapters of the same base model can be merged (if they do share it, fix base_model_name_or_path)"
            )
    return named[0][1] if named else None


def _refuse_dora(adapters: list[Adapter]) -> None:
    for i, a in enumerate(adapters):
        dora = a.dora_layers()
        if dora:
            raise UnsupportedError(
                f"adapter {i + 1} is DoRA ({dora[0]} has a magnitude vector), and merging DoRA is undefined without "
                "the base weight; fuse it into the base model instead (adaptkit fuse)"
            )


def _resolve_rank(m: Method, rank: int | None, adapters: list[Adapter], all_lora: bool) -> int | None:
    if not m.takes_rank:
        return None
    if rank is not None:
        return rank
    if m.output is Output.EXACT_OR_SVD:
        dense = sorted({u.kind for a in adapters for layer in a.layers.values() for u in _units(layer)
                        if u.factors() is None})
        if dense:
            raise ConfigError(
                f"task_arithmetic keeps the sum exact with low-rank factors, but {'/'.join(dense)} layers have none; "
                "pass rank=R (--rank R) to turn their sum into a LoRA of rank R"
            )
        return None
    if not all_lora:
        raise ConfigError(
            f"method '{m.name}' turns LoHa/LoKr/full layers into LoRA by SVD: pass the rank it should have (--rank R)"
        )
    return max(layer.rank for a in adapters for layer in a.layers.values())


def _merge_extras(adapters: list[Adapter]) -> dict[str, torch.Tensor]:
    extras: dict[str, torch.Tensor] = {}
    owner: dict[str, int] = {}
    for i, a in enumerate(adapters):
        for key, t in a.extras.items():
            seen = extras.get(key)
            if seen is not None and seen.dtype == t.dtype and seen.shape == t.shape and torch.equal(seen, t):
                continue  # the same tensor in both (e.g. peft's saved base embedding weights): keep one copy
            if key in extras:
                raise UnsupportedError(
                    f"adapters {owner[key] + 1} and {i + 1} both carry '{key}' (modules_to_save or saved weights) with "
                    "different values, which cannot be merged; remove it from all but one adapter"
                )
            extras[key], owner[key] = t, i
    return extras


def _layer_entries(adapters: list[Adapter], weights: list[float]) -> dict[str, list[tuple[int, Layer, float]]]:
    """path -> [(adapter index, layer, weight)], checking the shapes agree."""
    entries: dict[str, list[tuple[int, Layer, float]]] = {}
    for i, a in enumerate(adapters):
        for path, layer in a.layers.items():
            entries.setdefault(path, []).append((i, layer, weights[i]))
    for path, items in entries.items():
        i0, l0, _ = items[0]
        for i, layer, _ in items[1:]:
            same = tuple(layer.shape or ()) == tuple(l0.shape or ()) and layer.fan_in_fan_out == l0.fan_in_fan_out
            if not same:
                raise ShapeMismatchError(
                    f"{path} has shape {tuple(l0.shape or ())} in adapter {i0 + 1} but {tuple(layer.shape or ())} in "
                    f"adapter {i + 1}; the adapters are not for the same model architecture"
                )
    return dict(sorted(entries.items()))


def _layer_generator(seed: int, path: str) -> np.random.Generator:
    """The layer's own random stream: NumPy PCG64 seeded by ``sha256(f"{seed}:{path}")`` (see :data:`RNG`)."""
    digest = hashlib.sha256(f"{seed}:{path}".encode()).digest()
    return np.random.Generator(np.random.PCG64(int.from_bytes(digest[:16], "little")))


def _finite(path: str, *tensors: torch.Tensor | None) -> None:
    for t in tensors:
        if t is not None and not tensor_is_finite(t):
            raise NonFiniteError(
                f"the merged {path} holds NaN or Inf (inputs non-finite, or the result overflows the inputs' dtype); "
                "check the inputs and weights"
            )


# ------------------------------------------------------------------------------------------ IA3


def _merge_own(adapters: list[Adapter], weights: list[float], m: Method, progress: bool | None) -> dict[str, Layer]:
    """Kinds without a delta merge in their own parameters: the kind's ``weighted_sum`` (IA3: PEFT's linear); the
    base-dependent kinds' ``weighted_sum`` refuses and says what to do instead."""
    classes = {type(layer) for a in adapters for layer in a.layers.values()}
    if len(classes) > 1:
        names = sorted(c.__name__ for c in classes)
        own = sorted({type(layer).__name__ for a in adapters for layer in a.layers.values() if not layer.has_delta})
        raise UnsupportedError(
            f"{' and '.join(names)} layers cannot be merged into one adapter: {', '.join(own)} has no base-free delta "
            "to add to the others' (IA3 rescales weights, rotations and GLoRA act on the base weight); merge adapters "
            "of such a kind only with each other, or fuse them one after the other"
        )
    (cls,) = classes
    entries = _layer_entries(adapters, weights)
    if entries:  # a kind that cannot merge at all (base-dependent) says so in its own words, whatever the method
        path, items = next(iter(entries.items()))
        try:
            cls.weighted_sum([layer for _, layer, _ in items], [w for _, _, w in items])
        except ShapeMismatchError as e:
            raise ShapeMismatchError(f"{path}: {e}") from None
    if m.name != "linear":
        raise UnsupportedError(
            f"{cls.__name__} adapters merge only with method='linear' (the weighted sum of their vectors, as PEFT "
            f"does); '{m.name}' is undefined for {cls.__name__}"
        )
    out: dict[str, Layer] = {}
    for path, items in bar(entries.items(), total=len(entries), desc=f"merge ({cls.kind})", unit="layer",
                           progress=progress):
        try:
            merged = cls.weighted_sum([layer for _, layer, _ in items], [w for _, _, w in items])
        except ShapeMismatchError as e:
            raise ShapeMismatchError(f"{path}: {e}") from None
        _finite(path, *merged.parts().values())
        out[path] = merged
    return out


# ----------------------------------------------------------------------------------------- LoRA


def _merge_loras(adapters: list[Adapter], weights: list[float], opts: _Options,
                 progress: bool | None) -> dict[str, Layer]:
    entries = _layer_entries(adapters, weights)
    out: dict[str, Layer] = {}
    ws = Workspace()  # the dense methods' deltas and scratch, reused from layer to layer
    for path, items in bar(entries.items(), total=len(entries), desc=f"merge ({opts.method.name})", unit="layer",
                           progress=progress):
        out[path] = _merge_entry(path, items, opts, ws)
    return out


def _units(layer: Layer) -> list[Layer]:
    """What a method combines: each expert's LoRA of a layer on stacked experts, else the layer itself."""
    experts = layer.experts()
    return [layer] if experts is None else [experts[e] for e in sorted(experts)]


def _merge_entry(path: str, items: list[tuple[int, Layer, float]], opts: _Options, ws: Workspace) -> Layer:
    """One path's merge: layers on stacked experts (PEFT ``target_parameters``) merge expert by expert, with the
    method's numbers for each expert's LoRA, and are stacked again; any other layer merges as a whole."""
    per_layer = [layer.experts() for _, layer, _ in items]
    if all(e is None for e in per_layer):
        return _merge_layer(path, items, opts, ws)
    if any(e is None for e in per_layer) or len({len(e) for e in per_layer}) > 1:
        raise ShapeMismatchError(f"{path} is a parameter on stacked experts, but the adapters give it different "
                                 "numbers of experts (or adapt it as a module); they are not for the same model")
    merged = [_merge_layer(f"{path} (expert {e})", [(i, experts[e], w) for (i, _, w), experts in zip(items, per_layer)],
                           opts, ws) for e in sorted(per_layer[0])]
    return items[0][1].with_experts(merged)


def _merge_layer(path: str, items: list[tuple[int, Layer, float]], opts: _Options, ws: Workspace) -> LoRA:
    m = opts.method
    layers = [layer for _, layer, _ in items]
    weights = [w for _, _, w in items]
    template = layers[0]
    if len(template.shape) < 2:
        raise UnsupportedError(f"{path} is a {template.kind} layer of a 1-D parameter; merging into LoRA needs a matrix")
    loras = all(layer.lora_ab() is not None for layer in layers)  # stored as LoRA B/A factors
    gen = _layer_generator(opts.seed, path) if m.random and opts.seed is not None else None
    if m.operand is Operand.FACTORS:
        if not loras:
            raise UnsupportedError(
                f"method '{m.name}' combines LoRA A and B factors, but {path} is {_kinds(layers)}; "
                f"use '{m.name}_svd' if it exists, 'svd' or 'task_arithmetic' with a rank"
            )
        up, down = _factorwise(path, layers, weights, opts, gen)
    elif m.operand is Operand.LOWRANK and opts.rank is None and m.output is Output.EXACT_OR_SVD:
        # exact task arithmetic: sum_i w_i U_i V_i = [w_1 U_1 ...] [V_1; ...], for every kind with exact factors
        ups, downs = [], []
        for layer, w in zip(layers, weights):
            u, v = layer.factors()
            ups.append(u * w)
            downs.append(v)
        up, down = torch.cat(ups, dim=1), torch.cat(downs, dim=0)
    elif m.operand is Operand.LOWRANK and opts.rank is None:  # cat (PEFT's: on the stored B/A)
        if not loras:
            raise UnsupportedError(f"method '{m.name}' concatenates LoRA factors, but {path} is {_kinds(layers)}; "
                                   "pass a rank, or use 'svd'")
        ups, downs = [], []
        for layer, w in zip(layers, weights):
            b, a = layer.lora_ab()  # PEFT's cat puts weight * scale on A, B stays as stored
            ups.append(b)
            downs.append(a * (w * layer.scale))
        up, down = torch.cat(ups, dim=1), torch.cat(downs, dim=0)
    elif m.operand is Operand.LOWRANK:  # svd / task arithmetic with a rank
        if loras:
            ups, downs = [], []
            for layer, w in zip(layers, weights):
                u, v = layer.factors()
                ups.append(u * w)
                downs.append(v)
            up, down = lowrank_svd(ups, downs, opts.rank)
        else:
            total = sum(w * layer.delta_matrix() for layer, w in zip(layers, weights))
            up, down = dense_svd(total, opts.rank)
    elif m.operand is Operand.SUBSPACE:  # aligned in shared bases from the exact factors; no m x n matrix
        # small matrices: float64 throughout; a kind without exact factors (LoHa, LoKr, full) gives its exact LoRA
        # form at its numerical rank
        factors = [layer.factors(torch.float64) or layer.to_lora(None)[0].factors(torch.float64) for layer in layers]
        sub = SubspaceOptions(m, opts.density, opts.majority_sign, gen, opts.keep, opts.common)
        up, down = SUBSPACE[m.subspace](list(factors), weights, sub)
        up, down = up.float(), down.float()
        if opts.rank is not None:
            up, down = lowrank_svd([up], [down], opts.rank)
    else:  # element-wise work on dense deltas, then SVD
        guess = _start_guess(layers, weights, opts.rank)
        deltas = [_own_delta(layer, ws, f"delta{i}") for i, layer in enumerate(layers)]
        combined = combine(deltas, torch.tensor(weights), m, opts.density, opts.majority_sign, gen, owned=True,
                           gamma=opts.gamma, epsilon=opts.epsilon, workspace=ws)
        up, down = dense_svd(combined, opts.rank, guess=guess, first_check=1 if guess is not None else 2)
    return _lora_like(path, template, up, down, _bias(layers, weights))


def _start_guess(layers: list[Layer], weights: list[float], rank: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Where the truncated SVD of a pruned / sign-elected combination starts: the exact singular bases of the
    unpruned weighted sum (from the factors, ``O((m + n) R^2)``); ``None`` when a layer has no exact factors or
    their summed rank ``R`` is over 4x the iteration's block (LoHa/LoKr products), where it would cost more
    than it saves.

    The result is the same certified SVD whatever the start; a start near the answer takes 2-3 subspace steps
    instead of 4-5 on TinyLlama's MLP matrices.
    """
    ups, downs = [], []
    if sum(layer.rank or 0 for layer in layers) > 4 * (2 * rank + 16):
        return None
    for layer, w in zip(layers, weights):
        f = layer.factors()
        if f is None or f[0].shape[1] > 4 * (2 * rank + 16):
            return None
        ups.append(f[0] * w)
        downs.append(f[1])
    u, _, vh = lowrank_svd_parts(ups, downs)
    return u, vh.T


def _own_delta(layer: Layer, ws: Workspace, name: str) -> torch.Tensor:
    """The layer's dense float32 delta as a contiguous tensor that shares no memory with the layer (so that the
    merge can work on it in place); a copy only where ``delta_matrix`` returns stored memory (e.g. full diffs).
    A layer stored as LoRA factors has ``delta_matrix() == (scale B) @ A``: that product is written into the
    workspace slot ``name``."""
    ab = layer.lora_ab()
    if ab is not None and layer.shape is not None:
        b, a = ab
        return torch.matmul(b * layer.scale, a, out=ws.buffer(name, (b.shape[0], a.shape[1])))
    d = layer.delta_matrix()
    stored = {t.untyped_storage().data_ptr() for t in tensor_fields(layer).values()}
    if not d.is_contiguous() or d.untyped_storage().data_ptr() in stored:
        d = d.clone(memory_format=torch.contiguous_format)
    return d


def _kinds(layers: list[Layer]) -> str:
    return "/".join(sorted({layer.kind for layer in layers}))


def _factorwise(path: str, layers: list[LoRA], weights: list[float], opts: _Options,
                gen: np.random.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT's ``_generalized_task_arithmetic_weighted_adapter``: combine A's and B's separately."""
    ranks = sorted({layer.rank for layer in layers})
    if len(ranks) > 1:
        raise ConfigError(
            f"method '{opts.method.name}' combines A and B factor-wise and needs equal ranks, but {path} has ranks "
            f"{ranks}; use 'svd', 'cat', 'task_arithmetic' or a '*_svd' method"
        )
    wa, wb, downs, ups = [], [], [], []
    for layer, w in zip(layers, weights):
        ws = w * layer.scale
        root = math.sqrt(abs(ws))
        wa.append(root if ws >= 0 else -root)  # the sign goes on A only
        wb.append(root)
        b, a = layer.lora_ab()
        downs.append(a)
        ups.append(b)
    down = combine(downs, torch.tensor(wa), opts.method, opts.density, opts.majority_sign, gen)
    up = combine(ups, torch.tensor(wb), opts.method, opts.density, opts.majority_sign, gen)
    return up, down


def _bias(layers: list[Layer], weights: list[float]) -> torch.Tensor | None:
    """Weighted sum of the scaled LoRA biases (``lora_B.bias``), or ``None`` when no input has one."""
    biases = [(layer.delta_bias(), w) for layer, w in zip(layers, weights)]
    if all(b is None for b, _ in biases):
        return None
    return sum(w * b for b, w in biases if b is not None)


def _lora_like(path: str, template: Layer, up: torch.Tensor, down: torch.Tensor, bias: torch.Tensor | None) -> LoRA:
    """A scale-1 LoRA (``alpha == rank``) shaped for ``template``'s module, in its dtype."""
    if template.module_type not in MODULE_TYPES:
        raise UnsupportedError(f"{path} is a {template.module_type} layer, which has no LoRA form; leave it out of the merge")
    dtype = layer_dtype(template)
    new = LoRA.from_factors(up, None, down, like=template, bias=None if bias is None else bias.to(dtype))
    _finite(path, *new.parts().values())
    return new


__all__ = ["PROVENANCE_KEY", "merge", "merge_to"]
