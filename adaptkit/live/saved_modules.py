"""PEFT's ``modules_to_save`` for injected adapters: whole-module copies that switch with their adapter.

A PEFT adapter may carry whole modules besides its layers (``modules_to_save=["lm_head"]``, the ``score``
head of a classifier, a norm an extraction stored whole). The file holds their state under the module's
own name (``base_model.model.lm_head.weight``); :func:`adaptkit.inject` installs them as PEFT's
``ModulesToSaveWrapper`` does, with :class:`ModulesToSaveWrapper`:

* the model's module stays as ``original_module``; each adapter that saves it gets a copy in
  ``modules_to_save[name]`` holding the saved tensors (tensors the file lacks keep the original's values);
* the forward runs the copy of the active adapter, and the original when adapters are disabled or the
  active adapter has no copy of this module (PEFT's ``_set_adapter`` semantics). At most one active
  adapter may have a copy of one module, as in PEFT;
* merging adapters leaves the copies as they are (PEFT's ``merge_adapter`` does not touch them);
  deleting an adapter deletes its copy, and the last copy's removal puts the original module back;
* attributes the wrapper does not have (``.weight``, ``.in_features``) are those of the module in use, as
  with PEFT's wrapper; status tables list it as PEFT lists its wrapper.

:func:`plan` decides, before anything is changed, which extra tensors of an adapter are module copies
and checks them against the model; what cannot be applied is refused with the reason, never ignored.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..core.adapter import Adapter
from ..core.coverage import Outcome
from ..errors import ConfigError, ShapeMismatchError, UnsupportedError
from ..formats.coverage import same_as_base
from ..formats.patterns import saved_module_of

_OWN = ("original_module", "modules_to_save", "_requested", "_disabled")


class ModulesToSaveWrapper(nn.Module):
    """A module of the model plus per-adapter copies of it (see the module docstring).

    Args:
        original_module: the model's module (kept unchanged).
    """

    #: the attribute holding per-adapter modules (PEFT's tuner-layer convention, read by the status code)
    adapter_layer_names: tuple[str, ...] = ("modules_to_save",)
    other_param_names: tuple[str, ...] = ()

    def __init__(self, original_module: nn.Module) -> None:
        super().__init__()
        self.original_module = original_module
        self.modules_to_save = nn.ModuleDict()
        self._requested: list[str] = []
        self._disabled = False

    def _get_name(self) -> str:  # repr(): "adaptkit.ModulesToSaveWrapper(...)", as PEFT's "ModulesToSaveWrapper(...)"
        return "adaptkit.ModulesToSaveWrapper"

    # ------------------------------------------------------------------------------ PEFT-like state

    @property
    def active_adapters(self) -> list[str]:
        """The adapter whose copy runs (one at most, as in PEFT), or ``[]`` when the original runs."""
        return [n for n in self._requested if n in self.modules_to_save][:1]

    @property
    def requested_adapters(self) -> list[str]:
        """The model's active adapter names as last set (those without a copy here included)."""
        return list(self._requested)

    @property
    def merged_adapters(self) -> list[str]:
        """Always empty: module copies are never merged (PEFT's ``merge_adapter`` leaves them as they are)."""
        return []

    @property
    def disable_adapters(self) -> bool:
        """True while adapters are disabled (the original module then runs)."""
        return self._disabled

    def _get_available_adapters(self) -> set[str]:
        return set(self.modules_to_save.keys())

    def get_base_layer(self) -> nn.Module:
        """The model's own module."""
        return self.original_module

    # ------------------------------------------------------------------------------ adapters

    def add(self, name: str, state: Mapping[str, torch.Tensor], trainable: bool = False) -> None:
        """Add (or replace) adapter ``name``'s copy: the original module with ``state`` loaded into it.

        ``state`` must have been checked with :func:`check_state` (names and shapes of the original's state).
        """
        module = copy.deepcopy(self.original_module)
        with torch.no_grad():
            module.load_state_dict(dict(state), strict=False)
        for p in module.parameters():
            p.requires_grad_(trainable and p.is_floating_point())
        self.modules_to_save[name] = module

    def remove(self, name: str) -> None:
        """Delete adapter ``name``'s copy."""
        del self.modules_to_save[name]

    def set_active(self, names: list[str]) -> None:
        """Set the model's active adapters; the copy of the one that has a copy here runs."""
        self._requested = list(names)

    def set_disabled(self, disabled: bool) -> None:
        """Disable (``True``: the original runs) or enable the copies."""
        self._disabled = bool(disabled)

    def current(self) -> nn.Module:
        """The module the forward runs now."""
        modules = self.__dict__["_modules"]
        if self.__dict__["_disabled"]:
            return modules["original_module"]
        copies = modules["modules_to_save"]
        for n in self.__dict__["_requested"]:
            if n in copies:
                return copies[n]
        return modules["original_module"]

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """The forward of the active adapter's copy, or of the original module."""
        return self.current()(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in _OWN or name.startswith("__") or "_modules" not in self.__dict__ or "_requested" not in self.__dict__:
                raise
        return getattr(self.current(), name)


# ----------------------------------------------------------------------------------------- planning


@dataclass(frozen=True)
class SavedModule:
    """One module an adapter carries whole.

    Args:
        path: the module's path in the model.
        source: its path in the adapter (the name the file saved it under).
        state: its saved tensors by name relative to the module (``weight``, ``bias``).
    """

    path: str
    source: str
    state: Mapping[str, torch.Tensor]


def _targets(adapter: Adapter) -> list[str] | None:
    saved = adapter.config.get("modules_to_save")
    if isinstance(saved, str):
        return [saved]
    return list(saved) if saved else None


def check_state(path: str, module: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Refuse saved tensors that the module does not have, or has with another shape.

    Raises:
        ConfigError: a tensor name the module's state lacks. ShapeMismatchError: a shape that differs.
    """
    own = module.state_dict()
    unknown = sorted(k for k in state if k not in own)
    if unknown:
        raise ConfigError(f"the adapter saves {path}.{unknown[0]} whole (modules_to_save), but the model's {path} "
                          f"({type(module).__name__}) has no tensor {unknown[0]!r}; is this adapter for this model?")
    for k, t in state.items():
        if tuple(t.shape) != tuple(own[k].shape):
            raise ShapeMismatchError(f"the adapter saves {path}.{k} whole (modules_to_save) with shape {tuple(t.shape)}, "
                                     f"but the model's has {tuple(own[k].shape)}; is this adapter for this model?")


def extra_outcomes(adapter: Adapter, modules: Mapping[str, nn.Module],
                   resolve: Callable[[list[str]], dict[str, str]]) -> dict[str, Outcome]:
    """Where each extra tensor of ``adapter`` lands in the model, for the coverage certificate (no error raised).

    ``matched``: a saved module's tensor the model's module has with the same shape, or a saved base-weight copy
    equal to the model's; ``unmatched``: no module of the model owns it (textual-inversion embeddings, unknown
    keys, a module this model lacks) or the module has no such tensor; ``shape``: another shape; ``refused``: a
    base-weight copy that differs from the model's (inject does not change base weights).
    """
    targets = _targets(adapter)
    owners: dict[str, tuple[str | None, str]] = {}
    for key in adapter.extras:
        if ".base_layer." in key:
            path, _, leaf = key.rpartition(".base_layer.")
            owners[key] = (path, "base_layer." + leaf)
        else:
            owner = saved_module_of(key, targets) if targets else key.rpartition(".")[0] or None
            owners[key] = (owner, key[len(owner) + 1:] if owner else key)
    paths = resolve(sorted({o for o, _ in owners.values() if o}))
    out: dict[str, Outcome] = {}
    for key, (owner, leaf) in owners.items():
        path = paths.get(owner or "")
        if path is None:
            out[key] = Outcome(None, "unmatched", "belongs to no module of this model (textual-inversion embedding, "
                               "unknown key, or a module this model lacks)")
            continue
        module = modules[path]
        tensor = adapter.extras[key]
        if leaf.startswith("base_layer."):
            base = getattr(module, "base_layer", module)
            current = getattr(base, leaf.removeprefix("base_layer."), None)
            same = isinstance(current, torch.Tensor) and same_as_base(tensor, current.detach().cpu())
            out[key] = Outcome(f"{path}.{leaf}") if same else Outcome(
                None, "refused", "a copy of base weights that differ from this model's (inject does not change them)")
            continue
        original = module.original_module if isinstance(module, ModulesToSaveWrapper) else module
        own = original.state_dict()
        if leaf not in own:
            out[key] = Outcome(None, "unmatched", f"the model's {path} ({type(original).__name__}) has no tensor {leaf!r}")
        elif tuple(own[leaf].shape) != tuple(tensor.shape):
            out[key] = Outcome(None, "shape", f"saved whole (modules_to_save) with shape {tuple(tensor.shape)}, "
                               f"the model's {path}.{leaf} is {tuple(own[leaf].shape)}")
        else:
            out[key] = Outcome(f"{path}.{leaf}")
    return out


def plan(adapter: Adapter, modules: Mapping[str, nn.Module],
         resolve: Callable[[list[str]], dict[str, str]], layer_paths: Mapping[str, str],
         is_adapted: Callable[[nn.Module], bool]) -> list[SavedModule]:
    """Sort an adapter's extra tensors into module copies to install, checked against the model.

    * ``<module>.base_layer.<name>``: the copy of an adapted embedding's base weights PEFT saves with
      embedding adapters. Equal to the model's: nothing to do. Different: refused (the adapter was trained on
      other base weights, e.g. a resized vocabulary).
    * tensors of a module named by the config's ``modules_to_save`` (PEFT's suffix rule,
      :func:`adaptkit.converters.patterns.saved_module_of`), or, without that field, ``<module>.<tensor>`` of
      a module of the model: a :class:`SavedModule`.
    * anything else (textual-inversion embeddings, unknown keys) is refused: inject cannot apply it.

    Args:
        adapter: the adapter being injected.
        modules: the model's modules by path.
        resolve: adapter module paths -> model paths (:func:`adaptkit.inject.resolve_paths` for any module).
        layer_paths: the adapter's layers' model paths (adapter path -> model path).
        is_adapted: whether a module is an adaptkit layer wrapper.

    Returns:
        The module copies to install, by model path.

    Raises:
        UnsupportedError: extra tensors inject cannot apply, or a saved module that overlaps adapted layers.
        ConfigError / ShapeMismatchError: a saved tensor the model's module lacks or has with another shape.
    """
    targets = _targets(adapter)
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    changed_base: list[str] = []
    foreign: list[str] = []
    base_copies: dict[str, tuple[str, str, torch.Tensor]] = {}
    for key, tensor in adapter.extras.items():
        if ".base_layer." in key:
            path, _, leaf = key.rpartition(".base_layer.")
            base_copies[key] = (path, leaf, tensor)
            continue
        owner = saved_module_of(key, targets) if targets else key.rpartition(".")[0] or None
        if owner is None:
            foreign.append(key)
            continue
        grouped.setdefault(owner, {})[key[len(owner) + 1:]] = tensor
    paths = resolve(sorted({p for p, _, _ in base_copies.values()} | set(grouped)))
    for key, (path, leaf, tensor) in base_copies.items():
        target = modules.get(paths.get(path, ""))
        base = getattr(target, "base_layer", target)
        current = getattr(base, leaf, None) if base is not None else None
        if not (isinstance(current, torch.Tensor) and current.shape == tensor.shape
                and torch.equal(current.detach().cpu(), tensor.to(current.dtype))):
            changed_base.append(key)
    if changed_base:
        raise UnsupportedError(
            f"the adapter carries base weights that differ from this model's ({changed_base[0]}, saved by PEFT with an "
            "adapter on an embedding, e.g. after resizing the vocabulary); inject does not change base weights: load "
            "the model those weights belong to (or copy them into it), or fuse the adapter instead"
        )
    unresolved = sorted(m for m in grouped if m not in paths)
    foreign += [f"{m}.{k}" for m in unresolved for k in grouped[m]]
    if foreign:
        raise UnsupportedError(
            f"inject cannot apply {len(foreign)} extra tensor(s) of the adapter that belong to no module of this model "
            f"(e.g. {sorted(foreign)[0]}: textual-inversion embeddings, or modules this model lacks); to inject the "
            "adapter's layers without them, pass ak.load(source).replace(extras={})"
        )
    out = []
    layer_targets = set(layer_paths.values())
    for source, state in sorted(grouped.items()):
        path = paths[source]
        module = modules[path]
        if is_adapted(module) or any(t == path or t.startswith(path + ".") or path.startswith(t + ".")
                                     for t in layer_targets):
            raise UnsupportedError(
                f"{path} is both adapted by layers and saved whole (modules_to_save); PEFT keeps these apart, and "
                "inject cannot do both to one module"
            )
        inner = [n for n, m in modules.items() if n.startswith(path + ".") and (is_adapted(m) or isinstance(m, ModulesToSaveWrapper))]
        outer = [n for n, m in modules.items() if path.startswith(n + ".") and (is_adapted(m) or isinstance(m, ModulesToSaveWrapper))]
        if inner or outer:
            raise UnsupportedError(
                f"the adapter saves {path} whole (modules_to_save), but {(inner or outer)[0]} "
                f"{'inside' if inner else 'around'} it is already adapted; inject one of the two adapters only"
            )
        original = module.original_module if isinstance(module, ModulesToSaveWrapper) else module
        check_state(path, original, state)
        out.append(SavedModule(path=path, source=source, state=dict(state)))
    return out


__all__ = ["ModulesToSaveWrapper", "SavedModule", "check_state", "extra_outcomes", "plan"]
