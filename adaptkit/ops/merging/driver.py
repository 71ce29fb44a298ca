"""``merge``: combine adapters layer by layer with one of the methods of :data:`~.methods.METHODS`.

Works on checkpoints alone (no base model). Per layer, the adapters that have the layer take part (a
layer present in only some adapters merges what is there, as PEFT does). Everything is computed in
float32 and written in the dtype of the first adapter that has the layer. The output is a LoRA (scale 1:
``alpha == rank``, PEFT's convention for merged adapters) or, for IA3 inputs, an IA3 adapter; its
metadata records how it was made under the key ``adaptkit.merge`` (JSON). This module checks the options and
inputs, writes the provenance and the coverage certificate; :mod:`.layerwise` merges each path.
"""

from __future__ import annotations

import json
import os
from collections.abc import Collection, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import torch

from ...core.adapter import Adapter
from ...core.coverage import METADATA_KEY, Certificate, CoverageError, Outcome, certify
from ...core.coverage import combine as combine_certificates
from ...core.deferred import DeferredMetadata
from ...core.kinds.base import NO_SHAPE
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
from ...errors import ConfigError, UnsupportedError
from ...formats import check_write_options, save
from ...formats.inputs import as_adapters
from ...io.outputs import check_output
from .layerwise import RNG, Options, merge_loras, merge_own, units
from .methods import METHODS, Method, Output, get_method

#: metadata key holding the provenance JSON of a merged adapter
PROVENANCE_KEY = "adaptkit.merge"

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
    all_lora = bool(every) and all(unit.lora_ab() is not None for layer in every for unit in units(layer))
    # PEFT's add_weighted_adapter merges a single adapter with "linear", whatever was asked
    used = METHODS["linear"] if requested.peft and len(loaded) == 1 and all_lora else requested
    if used.random and seed is None:
        seed = int(torch.randint(0, 2**62, (1,)).item())
    shapeless = sorted({p for a in loaded for p, layer in a.layers.items() if layer.additive and layer.shape is None})
    if shapeless:  # a PEFT VeRA/WaveFT/... file read without its base: the delta needs the weight shape
        raise UnsupportedError(f"{len(shapeless)} layer(s) have no weight shape yet (e.g. {shapeless[0]}): {NO_SHAPE}")
    if any(not layer.has_delta for layer in every):  # IA3: merged in its own parameters
        layers = merge_own(loaded, w, requested, progress)
        out_rank = None
    else:
        out_rank = _resolve_rank(used, rank, loaded, all_lora)
        opts = Options(used, density, out_rank, majority_sign, seed, gamma, epsilon, keep, common)
        layers = merge_loras(loaded, w, opts, progress)
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
        dense = sorted({u.kind for a in adapters for layer in a.layers.values() for u in units(layer)
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


__all__ = ["PROVENANCE_KEY", "merge", "merge_to"]
