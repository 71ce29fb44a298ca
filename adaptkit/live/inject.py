"""Runtime injection of adapters into live torch modules, and switching between them.

``inject(model, adapter, name="default")`` wraps every module the adapter targets in an
:class:`~adaptkit.wrappers.AdaptedModule` (``nn.Linear``, ``nn.Conv1d/2d/3d``, ``nn.Embedding``,
transformers ``Conv1D``). The adapter is an :class:`~adaptkit.graph.Adapter`, a source string
(hub id / directory / file, read with :func:`adaptkit.load`), or a raw state dict (PEFT, kohya or
diffusers naming; see :mod:`adaptkit.state_dict`). ``model`` may also be a diffusers pipeline: module
paths then start with the component name (``unet.``, ``text_encoder.``).

The functions that manage injected adapters mirror the method names of transformers'
``PeftAdapterMixin``: :func:`set_adapter`, :func:`enable_adapters`, :func:`disable_adapters`,
:func:`active_adapters`, :func:`delete_adapter`, :func:`get_adapter_state_dict` (PEFT-named tensors)
and :func:`load_adapter` (:func:`inject` with ``adapter_name``), plus :func:`merge_adapters` /
:func:`unmerge_adapters` (exact: the original weight is kept while merged), :func:`remove_adapter` and
:func:`adapter_state_dict` (an :class:`Adapter` that any writer saves).

Modules a PEFT adapter saves whole (``modules_to_save``) are installed as PEFT installs them, in a
:class:`~adaptkit.saved_modules.ModulesToSaveWrapper` that switches with the adapter; extra tensors that
cannot be applied are refused, and so is an adapter holding NaN or Inf (tensors, alpha or scale).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ..core.adapter import Adapter
from ..core.coverage import Certificate, Outcome, certify, stamp
from ..core.kinds import Layer, tensor_fields
from ..errors import ConfigError, ShapeMismatchError, UnsupportedError
from ..formats.inputs import as_adapter
from ..formats.peft import to_state_dict
from ..formats.state_dict import from_state_dict
from .coverage import injected_coverage, keep_coverage
from .saved_modules import ModulesToSaveWrapper, extra_outcomes
from .saved_modules import plan as plan_saved
from .wrappers import AdaptedModule, base_kind, fit_layer

#: attribute on the root module: adapter name -> the injected Adapter's non-layer fields
_REGISTRY_ATTR = "_adaptkit_adapters"
_KOHYA_PREFIXES = ("lora_unet_", "lora_te1_", "lora_te2_", "lora_te3_", "lora_te_", "lora_transformer_", "lycoris_",
                   "lora_")


# ----------------------------------------------------------------------------------------- traversal


def is_pipeline(obj: Any) -> bool:
    """True for a diffusers-style pipeline: not a module, but has a ``components`` dict of modules."""
    return not isinstance(obj, nn.Module) and isinstance(getattr(obj, "components", None), Mapping)


def roots(obj: Any) -> list[tuple[str, nn.Module]]:
    """``(prefix, module)`` pairs to walk: ``[("", obj)]`` for a module, one per component for a pipeline."""
    if isinstance(obj, nn.Module):
        return [("", obj)]
    if is_pipeline(obj):
        return [(f"{k}.", m) for k, m in obj.components.items() if isinstance(m, nn.Module)]
    raise TypeError(f"expected a torch module or a diffusers pipeline, got {type(obj).__name__}")


def named_modules(obj: Any) -> Iterator[tuple[str, nn.Module]]:
    """Every named submodule of a module or of all components of a pipeline (component-prefixed)."""
    for prefix, root in roots(obj):
        for name, module in root.named_modules():
            full = prefix + name if name else prefix.rstrip(".")
            if full:
                yield full, module


def adapted_modules(obj: Any) -> list[tuple[str, AdaptedModule]]:
    """``(path, wrapper)`` for every module adaptkit adapted, in model order."""
    return [(n, m) for n, m in named_modules(obj) if isinstance(m, AdaptedModule)]


def saved_modules(obj: Any) -> list[tuple[str, ModulesToSaveWrapper]]:
    """``(path, wrapper)`` for every module an injected adapter replaces by its own copy (``modules_to_save``)."""
    return [(n, m) for n, m in named_modules(obj) if isinstance(m, ModulesToSaveWrapper)]


def _registry(obj: Any) -> dict[str, Adapter]:
    reg = obj.__dict__.get(_REGISTRY_ATTR)
    if reg is None:
        reg = {}
        object.__setattr__(obj, _REGISTRY_ATTR, reg)
    return reg


def _set_submodule(obj: Any, path: str, new: nn.Module) -> None:
    for prefix, root in roots(obj):
        if prefix and not path.startswith(prefix):
            continue
        rel = path[len(prefix):]
        parent_path, _, child = rel.rpartition(".")
        parent = root.get_submodule(parent_path) if parent_path else root
        setattr(parent, child, new)
        return
    raise ConfigError(f"cannot replace {path}: it is not inside the model")


# ----------------------------------------------------------------------------------------- resolution


def _flat(name: str) -> str:
    return name.replace(".", "_")


def resolve_paths(paths: list[str], modules: Mapping[str, nn.Module],
                  accept: Callable[[nn.Module], bool] | None = None) -> tuple[dict[str, str], list[str]]:
    """Map adapter module paths to model module paths.

    A path matches a module of the same name; else the one module whose name ends with ``"." + path``
    (or whose name ``path`` ends with); else, for flattened kohya names (``lora_unet_down_blocks_0_...``),
    the one module whose underscore-flattened name the kohya name ends with. Only modules ``accept`` takes
    are candidates (default: modules adaptkit can adapt, and its wrappers).

    Returns:
        ``({adapter path: model path}, [unmatched adapter paths])``.
    """
    if accept is None:
        def accept(m: nn.Module) -> bool:
            return base_kind(m) is not None or isinstance(m, AdaptedModule)
    resolved: dict[str, str] = {}
    unmatched: list[str] = []
    names = list(modules)
    flat: dict[str, list[str]] | None = None
    for p in paths:
        if p in modules:
            resolved[p] = p
            continue
        cands = [n for n in names if n.endswith("." + p) or p.endswith("." + n)]
        if not cands and "." not in p:
            if flat is None:
                flat = {}
                for n in names:
                    flat.setdefault(_flat(n), []).append(n)
            stripped = next((p[len(k):] for k in _KOHYA_PREFIXES if p.startswith(k)), p)
            cands = [n for f, ns in flat.items() for n in ns
                     if f == stripped or p.endswith("_" + f) or f.endswith("_" + stripped)]
        cands = [c for c in dict.fromkeys(cands) if accept(modules[c])]
        if len(cands) == 1:
            resolved[p] = cands[0]
        else:
            unmatched.append(p)
    return resolved, unmatched


def _inventory(obj: Any) -> Any:
    """What format readers get as ``base``: the module itself, or ``{component: {path: shape}}`` for a pipeline."""
    if isinstance(obj, nn.Module):
        return obj
    return {prefix.rstrip("."): {n: tuple(m.weight.shape) for n, m in root.named_modules()
                                 if isinstance(getattr(m, "weight", None), torch.Tensor)}
            for prefix, root in roots(obj)}


def _to_adapter(adapter: Any, config: Mapping[str, Any] | None, module: Any, drop: Any = None) -> Adapter:
    if isinstance(adapter, (Adapter, str, os.PathLike)):
        # kohya's flattened names resolve against the model (names `drop` names may resolve to nothing)
        return as_adapter(adapter, base=_inventory(module), drop=drop)
    if isinstance(adapter, Mapping):
        return from_state_dict(adapter, config, base=_inventory(module), drop=drop)
    raise TypeError(f"adapter must be an Adapter, a source (hub id, directory, file) or a state dict, "
                    f"got {type(adapter).__name__}")


def _is_parameter(path: str, modules: Mapping[str, nn.Module]) -> bool:
    """True when ``path`` names a parameter of a module of the model (``<module>.<parameter>``)."""
    owner, _, name = path.rpartition(".")
    target = modules.get(owner)
    return target is not None and name in dict(target.named_parameters(recurse=False))


def _check_name(name: str) -> None:
    if not isinstance(name, str) or not name or "." in name:
        raise ConfigError(f"adapter name {name!r} is not valid; use a non-empty name without dots")


def _list(items: list[str], n: int = 8) -> str:
    return ", ".join(items[:n]) + (f" ... ({len(items)} in all)" if len(items) > n else "")


# ----------------------------------------------------------------------------------------- coverage


def certify_inject(ad: Adapter, modules: Mapping[str, nn.Module]) -> Certificate:
    """Where each layer and extra tensor of ``ad`` lands among the model's ``modules`` (nothing is changed).

    ``matched``: a module adaptkit can adapt, the layer fits it; ``unmatched``: no module (or several) by the
    rules of :func:`resolve_paths`; ``shape``: the layer does not fit the module; ``refused``: a module type
    adaptkit cannot adapt, or a parameter tensor (PEFT ``target_parameters``). Extra tensors: see
    :func:`~adaptkit.live.saved_modules.extra_outcomes`.
    """
    resolved, unmatched = resolve_paths(list(ad.layers), modules)
    outcomes: dict[str, Outcome] = {}
    for p in unmatched:
        if _is_parameter(p, modules):
            outcomes[p] = Outcome(None, "refused", "adapts a parameter tensor rather than a module (PEFT "
                                  "target_parameters, e.g. MoE experts); inject adapts modules only: fuse the adapter "
                                  "into the base weights (adaptkit fuse) or load it with peft's PeftModel")
        else:
            outcomes[p] = Outcome(None, "unmatched", "matches no module of the model")
    for p, m in resolved.items():
        target = modules[m]
        base = target.base_layer if isinstance(target, AdaptedModule) else target
        if isinstance(target, ModulesToSaveWrapper):
            outcomes[p] = Outcome(m)  # refused below with its own message: another adapter's whole copy
            continue
        if base_kind(base) is None:
            outcomes[p] = Outcome(None, "refused", f"adaptkit cannot adapt {m} ({type(base).__name__}); it adapts "
                                  "Linear, Conv1d/2d/3d, Embedding and transformers Conv1D")
            continue
        try:
            fit_layer(ad.layers[p], base)
        except UnsupportedError as e:
            outcomes[p] = Outcome(None, "refused", str(e) if m == p else f"{m}: {e}")
            continue
        except ShapeMismatchError as e:
            outcomes[p] = Outcome(None, "shape", str(e) if m == p else f"{m}: {e}")
            continue
        outcomes[p] = Outcome(m)
    extras = extra_outcomes(ad, modules, lambda paths: resolve_paths(paths, modules, accept=lambda m: True)[0])
    return certify(ad, outcomes, operation="inject", target="the model", extras=extras)


# ----------------------------------------------------------------------------------------- inject


def inject(module: Any, adapter: Any, name: str = "default", active: bool = True, replace: bool = False,
           *, config: Mapping[str, Any] | None = None, trainable: bool = False,
           drop: Sequence[str] | str | None = None) -> list[str]:
    """Inject an adapter into a live model (in place).

    Everything is checked before the model is changed: if anything is refused, nothing is injected.

    Args:
        module: a torch module (e.g. a transformers model) or a diffusers pipeline.
        adapter: an :class:`Adapter`, a source (hub id, directory, file) or a raw state dict in PEFT,
            kohya or diffusers naming (kind and ranks inferred from names and shapes).
        name: adapter name; several named adapters can live in one model.
        active: make this the (only) active adapter, as :func:`set_adapter` does; otherwise it is added
            inactive and the active adapters stay as they are.
        replace: replace an adapter of the same name (otherwise that is an error).
        config: for a raw PEFT state dict, its ``adapter_config.json`` dict (alpha, patterns, rsLoRA,
            ``modules_to_save`` ...).
        trainable: give the adapter's parameters (and its module copies) ``requires_grad=True``.
        drop: globs naming the adapter layers / extra tensors that may be left out when they do not land
            (``"*lm_head*"``, ``"status:unmatched"``, kohya names that resolve to nothing); a glob naming no such
            layer is an error. The coverage certificate is kept: :func:`injected_coverage`.

    Returns:
        The model paths of the adapted modules and of the modules the adapter saves whole
        (``modules_to_save``, installed as PEFT installs them: see :mod:`adaptkit.saved_modules`).

    Raises:
        CoverageError: layers or extra tensors that would not land and are not named by ``drop``: no module of
            the model (all are counted, the first listed), another shape (``CoverageShapeError``, also a
            ShapeMismatchError), a module type adaptkit cannot adapt or a parameter tensor (``CoverageRefusedError``,
            also an UnsupportedError), extra tensors inject cannot apply (changed base weights,
            textual-inversion embeddings, unknown keys).
        ConfigError: the name exists, or several adapter paths resolve to one module.
        UnsupportedError: a saved module that overlaps adapted layers.
        NonFiniteError: the adapter holds NaN or Inf (factors, alpha or scale, saved modules).

    Example:
        >>> ak.inject(model, "org/my-lora", name="style")
        >>> ak.inject(model, state_dict, name="sd", active=False)
    """
    _check_name(name)
    ad = _to_adapter(adapter, config, module, drop)
    existing = set(_available(adapted_modules(module), saved_modules(module)))
    if name in existing and not replace:
        raise ConfigError(f"an adapter named '{name}' is already injected; pass replace=True or another name")
    if not ad.layers and not ad.extras:
        raise ConfigError("the adapter has no layers; there is nothing to inject")
    ad.check_finite("inject")
    modules = dict(named_modules(module))
    cert = certify_inject(ad, modules).require(drop)
    ad = ad.replace(layers={p: l for p, l in ad.layers.items() if p in cert.landing},
                    extras={k: v for k, v in ad.extras.items() if k in cert.landing})
    resolved = {c.path: c.target for c in cert.layers if c.lands and not c.extra}
    targets: dict[str, list[str]] = {}
    for p, m in resolved.items():
        targets.setdefault(m, []).append(p)
    dup = sorted(m for m, ps in targets.items() if len(ps) > 1)
    if dup:
        raise ConfigError(f"several adapter paths resolve to the same module: {_list(dup)}; pass full module paths")
    for m in resolved.values():
        target = modules[m]
        if isinstance(target, ModulesToSaveWrapper):
            raise UnsupportedError(f"{m} is replaced by the copy an injected adapter saved whole (modules_to_save, "
                                   f"adapters {sorted(target.modules_to_save)}); remove that adapter to adapt {m}")
    saved = plan_saved(ad, modules, lambda paths: resolve_paths(paths, modules, accept=lambda m: True)[0], resolved,
                       lambda m: isinstance(m, AdaptedModule))
    if name in existing:
        remove_adapter(module, name)
        modules = dict(named_modules(module))  # removal may have unwrapped modules
    current = active_adapters(module)
    for p, m in resolved.items():
        target = modules[m]
        if not isinstance(target, AdaptedModule):
            wrapper = AdaptedModule(target)
            wrapper.set_active(current)
            _set_submodule(module, m, wrapper)
            target = wrapper
        target.add(name, ad.layers[p], trainable=trainable)
    for s in saved:
        target = modules[s.path]
        if not isinstance(target, ModulesToSaveWrapper):
            wrapper = ModulesToSaveWrapper(target)
            wrapper.set_active(current)
            _set_submodule(module, s.path, wrapper)
            target = wrapper
        target.add(name, s.state, trainable=trainable)
    _registry(module)[name] = stamp(ad.replace(layers={}, extras={}), cert)
    keep_coverage(module, name, cert)
    if active:
        set_adapter(module, name)
    return sorted(set(targets) | {s.path for s in saved})


# ----------------------------------------------------------------------------------------- managing


def _require(module: Any) -> list[tuple[str, AdaptedModule]]:
    wrappers = adapted_modules(module)
    if not wrappers and not saved_modules(module):
        raise ConfigError("no adaptkit adapter is injected in this model; call ak.inject(model, adapter) first")
    return wrappers


def _available(wrappers: list[tuple[str, AdaptedModule]],
               saved: list[tuple[str, ModulesToSaveWrapper]] | None = None) -> list[str]:
    names = {n for _, w in wrappers for n in w.adapter_params}
    names.update(n for _, w in saved or () for n in w.modules_to_save)
    return sorted(names)


def _names(module: Any, names: str | list[str] | None, wrappers: list[tuple[str, AdaptedModule]]) -> list[str]:
    if names is None:
        return active_adapters(module)
    names = [names] if isinstance(names, str) else list(names)
    available = _available(wrappers, saved_modules(module))
    missing = [n for n in names if n not in available]
    if missing:
        raise ConfigError(f"no adapter named {', '.join(map(repr, missing))}; injected adapters: {available}")
    return names


def set_adapter(module: Any, adapter_name: str | list[str]) -> None:
    """Make ``adapter_name`` (a name or a list of names) the active adapters; all others become inactive.

    Layers with merged adapters are unmerged first (as PEFT does). Mirrors
    ``PeftAdapterMixin.set_adapter``. A module saved whole (``modules_to_save``) runs the copy of the
    active adapter that has one; as in PEFT, two active adapters may not both have a copy of one module.

    Raises:
        ConfigError: an unknown name, or two of the names save the same module whole (nothing is changed).
    """
    wrappers = _require(module)
    names = _names(module, adapter_name, wrappers)
    saved = saved_modules(module)
    for path, w in saved:
        both = [n for n in names if n in w.modules_to_save]
        if len(both) > 1:
            raise ConfigError(f"adapters {both} both save {path} whole (modules_to_save), so only one of them can be "
                              "active at a time (as in PEFT); activate them one at a time")
    for _, w in wrappers:
        if w.merged:
            w.unmerge()
        w.set_active(names)
    for _, w in saved:
        w.set_active(names)


def enable_adapters(module: Any) -> None:
    """Enable the adapters of every adapted layer (undoes :func:`disable_adapters`)."""
    _require(module)
    for _, w in [*adapted_modules(module), *saved_modules(module)]:
        w.set_disabled(False)


def disable_adapters(module: Any) -> None:
    """Disable all adapters: the model computes its base output.

    Merged layers compute with the kept original weight; they stay merged (PEFT unmerges them on the
    next forward instead). Modules saved whole run their original again.
    """
    _require(module)
    for _, w in [*adapted_modules(module), *saved_modules(module)]:
        w.set_disabled(True)


def active_adapters(module: Any) -> list[str]:
    """The active adapter names (those of the first adapted layer; ``[]`` when nothing is injected)."""
    wrappers = adapted_modules(module)
    if wrappers:
        return wrappers[0][1].active_adapters
    saved = saved_modules(module)
    return saved[0][1].requested_adapters if saved else []


def merge_adapters(module: Any, adapter_names: str | list[str] | None = None) -> None:
    """Merge adapters (default: the active ones) into the base weights, in place.

    A copy of each merged layer's original weight (and bias) is kept until it is unmerged, so
    :func:`unmerge_adapters` restores the base weights bit-exactly. Modules saved whole
    (``modules_to_save``) keep running their copy, as with PEFT's ``merge_adapter``.
    """
    wrappers = _require(module)
    names = _names(module, adapter_names, wrappers)
    for _, w in wrappers:
        w.merge(names)


def unmerge_adapters(module: Any, adapter_names: str | list[str] | None = None) -> None:
    """Unmerge adapters (default: all merged ones): restore the kept original weights exactly."""
    wrappers = _require(module)
    names = None if adapter_names is None else _names(module, adapter_names, wrappers)
    for _, w in wrappers:
        w.unmerge(names)


def remove_adapter(module: Any, adapter_name: str) -> None:
    """Delete an adapter from the model (unmerging it first); layers left without adapters are unwrapped,
    and so are modules no adapter saves whole any more."""
    wrappers = _require(module)
    _names(module, adapter_name, wrappers)
    for path, w in wrappers:
        if adapter_name not in w.adapter_params:
            w.set_active([n for n in w.active_adapters if n != adapter_name])
            continue
        w.remove(adapter_name)
        if not w.adapter_params:
            w.unmerge()
            _set_submodule(module, path, w.base_layer)
    for path, s in saved_modules(module):
        s.set_active([n for n in s.requested_adapters if n != adapter_name])
        if adapter_name in s.modules_to_save:
            s.remove(adapter_name)
            if not len(s.modules_to_save):
                _set_submodule(module, path, s.original_module)
    _registry(module).pop(adapter_name, None)
    keep_coverage(module, adapter_name, None)


def adapter_state_dict(module: Any, adapter_name: str | None = None) -> Adapter:
    """The injected adapter ``adapter_name`` (default: the first active one) as an :class:`Adapter`.

    Module paths are the model's own; tensors are detached copies in their stored dtype. Modules the
    adapter saves whole come back as extras (``lm_head.weight``) with their paths in the config's
    ``modules_to_save``, as PEFT saves them. Any writer saves it:
    ``ak.save(ak.adapter_state_dict(model, "style"), "out/", format="peft")``.
    """
    wrappers = _require(module)
    if adapter_name is None:
        act = active_adapters(module)
        if not act:
            raise ConfigError("no adapter is active; pass adapter_name")
        adapter_name = act[0]
    _names(module, adapter_name, wrappers)
    layers = {}
    for path, w in wrappers:
        if adapter_name in w.adapter_params:
            with torch.no_grad():
                layer = w.layer(adapter_name)
                layers[path] = _detach(layer)
    extras: dict[str, torch.Tensor] = {}
    saved_paths = []
    for path, s in saved_modules(module):
        if adapter_name in s.modules_to_save:
            saved_paths.append(path)
            for key, t in s.modules_to_save[adapter_name].state_dict().items():
                extras[f"{path}.{key}"] = t.detach().clone().cpu()
    template = _registry(module).get(adapter_name) or Adapter(layers={})
    config = dict(template.config)
    if saved_paths:
        config["modules_to_save"] = sorted(set(config.get("modules_to_save") or ()) | set(saved_paths))
    return template.replace(layers=layers, extras=extras, config=config, name=adapter_name)


def get_adapter_state_dict(module: Any, adapter_name: str | None = None) -> dict[str, torch.Tensor]:
    """The injected adapter's tensors with PEFT names, as transformers' ``get_adapter_state_dict`` returns them.

    Keys are ``<module path>.lora_A.weight``, ``.lora_B.weight``, ``.lora_magnitude_vector``,
    ``.hada_w1_a``, ``.ia3_l`` ... without the adapter name and without PEFT's ``base_model.model.``
    prefix; tensors are written by the PEFT converter (:func:`adaptkit.converters.peft.to_state_dict`),
    so they are what ``ak.save(..., format="peft")`` stores. As in peft, an adapter on ``embed_tokens`` or
    ``lm_head`` also returns the base weights of the adapted input/output embeddings
    (``model.embed_tokens.base_layer.weight``), and modules the adapter saves whole (``modules_to_save``) come
    under their own names (``lm_head.weight``), as peft returns them. Mirrors
    ``PeftAdapterMixin.get_adapter_state_dict``.

    Args:
        module: the model the adapter was injected into.
        adapter_name: the adapter (default: the first active one).

    Returns:
        ``{name: tensor}``, detached CPU copies in their stored dtype.

    Raises:
        ConfigError: nothing is injected, no adapter is active, or no adapter has that name.
        UnsupportedError: PEFT cannot name the adapter's layers (mixed kinds, Full layers ...).

    Example:
        >>> ak.load_adapter(model, "org/my-lora")
        >>> sorted(ak.get_adapter_state_dict(model))[:2]
        ['model.layers.0.self_attn.q_proj.lora_A.weight', 'model.layers.0.self_attn.q_proj.lora_B.weight']
    """
    ad = adapter_state_dict(module, adapter_name)
    tensors, _ = to_state_dict(ad, prefix="")
    tensors.update(_embedding_copies(module, ad))
    return tensors


#: peft.utils.constants.EMBEDDING_LAYER_NAMES
_EMBEDDING_NAMES = ("embed_tokens", "lm_head")


def _embedding_copies(module: Any, ad: Adapter) -> dict[str, torch.Tensor]:
    """PEFT's ``save_embedding_layers="auto"``: an adapter on ``embed_tokens``/``lm_head`` comes with copies of
    the adapted input/output embeddings' base weights (``<path>.base_layer.weight``), as peft saves them."""
    if not any(p.rpartition(".")[2] in _EMBEDDING_NAMES for p in ad.layers) or not hasattr(module, "get_input_embeddings"):
        return {}
    paths = {id(m): n for n, m in named_modules(module)}
    out = {}
    for emb in (module.get_input_embeddings(), module.get_output_embeddings()):
        if isinstance(emb, AdaptedModule) and isinstance(emb.base_layer, nn.Linear | nn.Embedding) and id(emb) in paths:
            for key, t in emb.base_layer.state_dict().items():
                out[f"{paths[id(emb)]}.base_layer.{key}"] = t.detach().clone().cpu()
    return out


def delete_adapter(module: Any, adapter_names: str | list[str]) -> None:
    """Delete one adapter or several from the model, each as :func:`remove_adapter` does.

    Every name is checked before anything is deleted. Mirrors ``PeftAdapterMixin.delete_adapter``.

    Args:
        module: the model the adapters were injected into.
        adapter_names: an adapter name or a list of names.

    Raises:
        ConfigError: nothing is injected, or a name is not injected (all missing names are listed).
    """
    names = _names(module, adapter_names, _require(module))
    for name in dict.fromkeys(names):
        remove_adapter(module, name)


def load_adapter(module: Any, source: Any, adapter_name: str = "default", active: bool = True,
                 replace: bool = False, *, config: Mapping[str, Any] | None = None,
                 trainable: bool = False) -> list[str]:
    """:func:`inject` under transformers' name: ``load_adapter(model, source, adapter_name="style")``.

    Mirrors ``PeftAdapterMixin.load_adapter``'s ``adapter_name`` argument; the other arguments are
    :func:`inject`'s (``source`` is an :class:`Adapter`, a hub id, directory or file, or a raw state dict).

    Returns:
        The model paths of the adapted modules.
    """
    return inject(module, source, name=adapter_name, active=active, replace=replace, config=config,
                  trainable=trainable)


def _detach(layer: Layer) -> Layer:
    return dataclasses.replace(layer, **{k: v.detach().clone().cpu() for k, v in tensor_fields(layer).items()})


__all__ = [
    "active_adapters",
    "adapted_modules",
    "adapter_state_dict",
    "certify_inject",
    "delete_adapter",
    "disable_adapters",
    "enable_adapters",
    "get_adapter_state_dict",
    "inject",
    "injected_coverage",
    "load_adapter",
    "merge_adapters",
    "named_modules",
    "remove_adapter",
    "resolve_paths",
    "saved_modules",
    "set_adapter",
    "unmerge_adapters",
]
