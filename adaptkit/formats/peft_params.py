"""PEFT's LoRA on parameters (``LoraConfig(target_parameters=[...])``): how its tensors are named, read and written.

PEFT wraps a module once per targeted parameter (``ParamWrapper``), innermost first, in the order the module
registered its parameters; the tensors then carry no parameter name, only the nesting::

    model.layers.0.mlp.experts.base_layer.lora_A.weight   # gate_up_proj (registered first: innermost)
    model.layers.0.mlp.experts.lora_A.weight              # down_proj

adaptkit names such a layer by the parameter's own path (``model.layers.0.mlp.experts.gate_up_proj``, the key of
the base model's tensor) and builds an :class:`~adaptkit.core.kinds.expert_lora.ExpertLoRA`. The parameters of a
module are ordered as transformers' expert modules register them (:data:`PARAMETER_ORDER`: ``gate_up_proj``
before ``down_proj`` in every MoE class of transformers 5); a module with several targeted parameters of other
names is refused (the order is the model class's, which the file does not record).

The expert orientation is the model class's too (transformers' ``is_transposed``, e.g. gpt-oss stores
``(E, in, out)``); PEFT's files do not record it. adaptkit takes it from, in order: its own safetensors metadata
entry :data:`ORIENTATION_KEY` (the parameters it wrote transposed; PEFT ignores it), then
``auto_mapping.base_model_class`` or ``base_model_name_or_path`` in the config (:data:`TRANSPOSED_CLASSES`), else
``(E, out, in)``. Fuse checks it against the base tensor's shape (and flips it when only the other one fits).
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections import defaultdict
from collections.abc import Mapping
from typing import Any

import torch

from ..core.kinds.expert_lora import ExpertLoRA, from_peft, to_peft
from ..errors import ConfigError, FormatError
from .patterns import ConfigPatterns

#: the order transformers' expert modules register their stacked parameters in (PEFT nests wrappers in it)
PARAMETER_ORDER = ("gate_up_proj", "gate_proj", "up_proj", "down_proj")
#: model classes (prefixes of ``auto_mapping.base_model_class``) whose experts are stored ``(E, in, out)``
TRANSPOSED_CLASSES = ("GptOss", "Aria", "OpenAIPrivacyFilter")
#: hub names of such models (``base_model_name_or_path``), matched case-insensitively
TRANSPOSED_NAMES = re.compile(r"gpt-oss|gpt_oss|aria|privacy-filter", re.IGNORECASE)
WRAPPER = ".base_layer"
#: safetensors metadata entry adaptkit writes: a JSON list of the parameter paths whose experts are ``(E, in, out)``
ORIENTATION_KEY = "adaptkit.transposed_parameters"


def targets(cfg: Mapping[str, Any]) -> list[str]:
    """The config's ``target_parameters`` (a list; ``[]`` when unset)."""
    found = cfg.get("target_parameters") or []
    if isinstance(found, str):
        raise ConfigError("target_parameters is a string, but PEFT takes a list of parameter names there; "
                          "fix target_parameters in adapter_config.json")
    return list(found)


def matches(target: str, path: str) -> bool:
    """PEFT's rule for one ``target_parameters`` entry: the parameter path is it or ends with ``.<it>``."""
    return path == target or path.endswith("." + target)


def transposed_hint(cfg: Mapping[str, Any]) -> bool:
    """True when the config names a model class (or hub model) that stores its experts ``(E, in, out)``."""
    cls = ((cfg.get("auto_mapping") or {}).get("base_model_class") or "") if isinstance(cfg.get("auto_mapping"), dict) else ""
    name = cfg.get("base_model_name_or_path") or ""
    return cls.startswith(TRANSPOSED_CLASSES) or bool(isinstance(name, str) and TRANSPOSED_NAMES.search(name))


def ordered(module: str, params: list[str]) -> list[str]:
    """A module's targeted parameters in the order PEFT wrapped them (innermost first).

    Raises:
        ConfigError: several parameters of which some are not in :data:`PARAMETER_ORDER` (their order is unknown).
    """
    if len(params) > 1 and any(p not in PARAMETER_ORDER for p in params):
        raise ConfigError(
            f"{module} has LoRA on parameters {sorted(params)}; PEFT nests them in the order the model class registers "
            f"them, which adaptkit knows only for {', '.join(PARAMETER_ORDER)}: target one parameter per module"
        )
    return sorted(params, key=PARAMETER_ORDER.index) if len(params) > 1 else list(params)


def _param_names(module: str, tlist: list[str]) -> list[str]:
    """The targeted parameter names a module path can hold (``target_parameters`` entries that fit it)."""
    names = []
    for t in tlist:
        owner, _, name = t.rpartition(".")
        if (not owner or module == owner or module.endswith("." + owner)) and name not in names:
            names.append(name)
    return names


def split_groups(groups: Mapping[str, dict[str, torch.Tensor]], cfg: Mapping[str, Any]
                 ) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, dict[str, torch.Tensor]]]:
    """Separate the module groups of a PEFT LoRA file from its parameter groups (keys re-named by parameter path).

    Args:
        groups: ``{module path as keyed: {part: tensor}}`` (``...experts.base_layer`` for nested wrappers).
        cfg: the ``adapter_config.json`` dict.

    Returns:
        ``(modules, parameters)``: the groups of ``target_modules`` layers as given, and ``{parameter path: parts}``.

    Raises:
        ConfigError: the nesting does not fit the config's ``target_parameters`` (the message names the module).
    """
    tlist = targets(cfg)
    if not tlist:
        return dict(groups), {}
    modules: dict[str, dict[str, torch.Tensor]] = {}
    nested: dict[str, dict[int, dict[str, torch.Tensor]]] = defaultdict(dict)
    for key, parts in groups.items():
        base, depth = key, 0
        while base.endswith(WRAPPER):
            base, depth = base[: -len(WRAPPER)], depth + 1
        if _param_names(base, tlist):
            nested[base][depth] = parts
        else:
            modules[key] = parts
    params: dict[str, dict[str, torch.Tensor]] = {}
    for base, by_depth in nested.items():
        names = _param_names(base, tlist)
        n = len(by_depth)
        if sorted(by_depth) != list(range(n)) or n > len(names):
            raise ConfigError(f"{base} holds {n} nested LoRA wrapper(s) but target_parameters names {names} for it; "
                              "the config does not belong to these weights")
        if n < len(names):
            raise ConfigError(f"{base} holds LoRA for {n} of the parameters {names} that target_parameters names; "
                              "which ones depends on the model: target the parameters by their full path")
        order = ordered(base, names)
        for depth, parts in by_depth.items():
            params[f"{base}.{order[n - 1 - depth]}"] = parts
    return modules, params


def read_layer(path: str, parts: dict[str, torch.Tensor], cfg: Mapping[str, Any], patterns: ConfigPatterns) -> ExpertLoRA:
    """The :class:`ExpertLoRA` of one targeted parameter from its ``lora_A`` / ``lora_B``.

    The number of experts is ``lora_A.weight.shape[0] / r`` (``r`` from ``r`` / ``rank_pattern`` for the parameter
    path, as PEFT resolves it).

    Raises:
        FormatError: a factor is missing or not PEFT's (``lora_B.bias`` or a magnitude: PEFT refuses both here).
        ShapeMismatchError: the factors do not divide into ``r``-wide experts.
    """
    extra = sorted(set(parts) - {"a", "b"})
    if extra or not {"a", "b"} <= set(parts):
        raise FormatError(f"{path}: a LoRA on a parameter has exactly lora_A.weight and lora_B.weight, this one "
                          f"has parts {sorted(parts)}; the checkpoint is damaged")
    r = int(patterns.rank_for(path, cfg.get("r", 8)))
    alpha = patterns.alpha_for(path, cfg.get("lora_alpha", 8))
    a, b = parts["a"], parts["b"]
    if a.shape[0] % r:
        raise ConfigError(f"{path}: lora_A has {a.shape[0]} rows, not a multiple of r={r} (one block per expert); "
                          "fix r/rank_pattern in adapter_config.json")
    down, up = from_peft(a, b, a.shape[0] // r)
    shape = None if down.shape[0] > 1 else (up.shape[1], down.shape[2])
    return ExpertLoRA(down=down, up=up, alpha=alpha, shape=shape, rslora=bool(cfg.get("use_rslora", False)))


def orient(layers: Mapping[str, ExpertLoRA], cfg: Mapping[str, Any], metadata: Mapping[str, str] | None
           ) -> dict[str, ExpertLoRA]:
    """The parameter layers in the orientation the metadata (:data:`ORIENTATION_KEY`) or the config names.

    Raises:
        FormatError: the metadata entry is not a JSON list of paths.
    """
    raw = (metadata or {}).get(ORIENTATION_KEY)
    if raw is not None:
        try:
            flipped = set(json.loads(raw))
        except (json.JSONDecodeError, TypeError) as e:
            raise FormatError(f"safetensors metadata {ORIENTATION_KEY} is not a JSON list ({e}); remove the entry") from e
    else:
        flipped = set(layers) if transposed_hint(cfg) else set()
    return {p: dataclasses.replace(l, shape=None, fan_in_fan_out=True) if p in flipped and len(l.shape) == 3 else l
            for p, l in layers.items()}


def orientation_metadata(layers: Mapping[str, Any]) -> dict[str, str]:
    """The :data:`ORIENTATION_KEY` entry for the layers on parameters stored ``(E, in, out)`` (empty when none)."""
    flipped = sorted(p for p, l in layers.items() if l.experts() is not None and len(l.shape) == 3 and l.fan_in_fan_out)
    return {ORIENTATION_KEY: json.dumps(flipped)} if flipped else {}


def write(layers: Mapping[str, Any], cfg: dict[str, Any], out: dict[str, torch.Tensor], prefix: str) -> None:
    """Write parameter layers under PEFT's nested names and set ``target_parameters``.

    ``r`` / ``lora_alpha`` and their patterns are the LoRA writer's (:func:`adaptkit.formats.peft_layers.write_lora`
    counts these layers in). The config's own ``target_parameters`` is kept when it names exactly these parameters;
    otherwise their full paths are written.

    Raises:
        ConfigError: a module with several parameters whose nesting order is unknown (see :func:`ordered`).
    """
    by_module: dict[str, list[str]] = defaultdict(list)
    for path in layers:
        module, _, name = path.rpartition(".")
        by_module[module].append(name)
    for module, names in by_module.items():
        order = ordered(module, names)
        for i, name in enumerate(order):
            a, b = to_peft(layers[f"{module}.{name}"].down, layers[f"{module}.{name}"].up)
            key = prefix + module + WRAPPER * (len(order) - 1 - i)
            out[key + ".lora_A.weight"] = a
            out[key + ".lora_B.weight"] = b
    old = targets(cfg)
    keep = bool(old) and all(any(matches(t, p) for t in old) for p in layers) and \
        all(any(matches(t, p) for p in layers) for t in old) and \
        all(sorted(_param_names(m, old)) == sorted(n) for m, n in by_module.items())
    cfg["target_parameters"] = sorted(old) if keep else sorted(layers)


__all__ = ["ORIENTATION_KEY", "PARAMETER_ORDER", "TRANSPOSED_CLASSES", "matches", "ordered", "orient",
           "orientation_metadata", "read_layer", "split_groups", "targets", "transposed_hint", "write"]
