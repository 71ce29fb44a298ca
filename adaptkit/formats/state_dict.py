"""Raw adapter state dicts (PEFT, kohya/LyCORIS or diffusers naming) -> :class:`~adaptkit.graph.Adapter`.

This is the "injection from a state dict" path of :func:`adaptkit.inject`: no config file, so the kind
and the ranks come from tensor names and shapes.

* PEFT naming (``...q_proj.lora_A.weight``, ``...lora_A.default.weight`` as ``model.state_dict()``
  writes it, ``hada_*``, ``lokr_*``, ``ia3_l``, and the stems of every kind registered with
  :func:`adaptkit.formats.peft_layers.register_peft_names`; the ``base_model.model.`` prefix is optional) is
  parsed with the PEFT reader's own per-kind rows. Alpha comes from a ``<module>.alpha`` key when present,
  from ``config`` (an ``adapter_config.json`` dict) when given, else alpha = rank (scale 1) with a warning.
  Model-level tensors of VeRA, RandLoRA and VB-LoRA (``base_model.vera_A``, ``vera_A.default``, ``vera_A``) go
  to every layer; those kinds (and the other low-rank tuners of :mod:`~adaptkit.formats.peft_lowrank`) need the
  config.
* Anything else goes through the registered formats of :data:`adaptkit.formats.FORMATS` (kohya, diffusers,
  any registered one), in memory: the first whose ``detect_keys`` accepts the names reads the tensors with
  its ``read_tensors``, exactly as it reads a checkpoint file.
"""

from __future__ import annotations

import warnings
from collections import defaultdict
from collections.abc import Mapping
from typing import Any

import torch

from ..core.adapter import Adapter
from ..errors import ConfigError, FormatError
from . import peft as peft_format
from .patterns import ConfigPatterns, saved_module_of
from .peft_layers import row_of_type, split_key, strip_adapter_name
from .registry import FORMATS


def from_peft_state_dict(state_dict: Mapping[str, torch.Tensor], config: Mapping[str, Any] | None = None) -> Adapter | None:
    """Parse a raw PEFT-named state dict; ``None`` when no key has a PEFT adapter suffix.

    Args:
        state_dict: tensor name -> tensor, PEFT naming, with or without ``base_model.model.`` and adapter name.
        config: an ``adapter_config.json`` dict (alpha, rank/alpha patterns, rsLoRA, ``feedforward_modules``).

    Raises:
        FormatError: keys that are not adapter tensors, or tensors of several PEFT types mixed.
        ConfigError: ``config`` contradicts the tensors.
    """
    groups: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)
    types: dict[str, set[str]] = defaultdict(set)
    alphas: dict[str, float] = {}
    unknown: list[str] = []
    extras: dict[str, torch.Tensor] = {}
    saved = (config or {}).get("modules_to_save")
    shared_stems = peft_format.shared_stems()
    shared: dict[str, torch.Tensor] = {}
    for raw_key, tensor in state_dict.items():
        key = strip_adapter_name(raw_key.removeprefix(peft_format.PREFIX))
        head = key.removeprefix(peft_format.SHARED_PREFIX).split(".")
        if head[0] in shared_stems and len(head) <= 2:  # a model-level tensor, with or without the adapter name
            shared[head[0]] = tensor
            continue
        if key.endswith(".alpha"):
            if tensor.numel() == 0:
                raise FormatError(f"tensor '{raw_key}' is empty, but an alpha is one number; drop it or store the alpha")
            alphas[key[: -len(".alpha")]] = float(torch.as_tensor(tensor).float().reshape(-1)[0])
            continue
        split = split_key(key)
        if split is None:
            if saved_module_of(key, saved) is not None:  # a modules_to_save copy, as PEFT saves it
                extras[key] = tensor
            else:
                unknown.append(raw_key)
            continue
        module, ptype, part = split
        groups[module][part] = tensor
        types[ptype].add(module)
    if not groups:
        return None
    if unknown:
        raise FormatError(
            f"{len(unknown)} key(s) are not PEFT adapter tensors: {', '.join(sorted(unknown)[:8])}"
            f"{' ...' if len(unknown) > 8 else ''}; pass only the adapter's tensors (and the config whose "
            "modules_to_save names the modules saved whole)"
        )
    if len(types) > 1:
        raise FormatError(f"the state dict mixes PEFT types {sorted(types)}; inject each kind under its own name")
    ptype = next(iter(types))
    row = row_of_type(ptype)
    stray = sorted(set(shared) - set(row.shared))
    if stray:
        raise FormatError(f"the state dict holds model-level tensor(s) {stray} of another PEFT type than its {ptype} "
                          "layers; pass one adapter's tensors")
    if config is None and row.infer is None and not row.generic:
        raise ConfigError(f"a {ptype} state dict does not say its ranks, scales and layout; pass config= (its "
                          "adapter_config.json dict)")
    if config is not None:
        cfg = dict(config)
        if cfg.get("peft_type", ptype) != ptype:
            raise ConfigError(f"config says peft_type {cfg.get('peft_type')} but the tensors are {ptype}; "
                              "pass the config that belongs to these tensors")
        cfg["peft_type"] = ptype
    else:
        cfg = {"peft_type": ptype}
    patterns = (row.patterns(cfg) if row.patterns is not None
                else ConfigPatterns.of(cfg, alpha_overrides=alphas if config is not None else None))
    layers = {}
    defaulted: list[str] = []
    for module in sorted(groups):
        parts = groups[module]
        peft_format.add_shared(module, parts, {row.shared[s]: t for s, t in shared.items()}, row, "the state dict")
        mcfg = cfg
        if config is None and row.infer is not None:  # what the tensors imply: rank, IA3 input scaling, ...
            mcfg = {**cfg, **row.infer(module, parts)}
            if "r" in mcfg:
                if module in alphas:
                    alpha = alphas[module]
                else:
                    alpha = float(mcfg["r"])
                    defaulted.append(module)
                mcfg.update({"lora_alpha": alpha, "alpha": alpha})
        layers[module] = peft_format.build_layer(module, parts, mcfg, patterns)
    if defaulted:
        warnings.warn(
            f"the state dict has no alpha for {len(defaulted)} layer(s) (e.g. {defaulted[0]}); using alpha = rank "
            "(scale 1). Pass config={'lora_alpha': ...} or an Adapter to set it",
            UserWarning, stacklevel=3,
        )
    return Adapter(layers=layers, config=cfg if config is not None else {}, extras=extras, format="peft",
                   source="state_dict")


def from_state_dict(state_dict: Mapping[str, torch.Tensor], config: Mapping[str, Any] | None = None,
                    base: Any = None, drop: Any = None) -> Adapter:
    """Turn a raw adapter state dict in PEFT, kohya/LyCORIS or diffusers naming into an :class:`Adapter`.

    Args:
        state_dict: tensor name -> tensor.
        config: optional PEFT ``adapter_config.json`` dict for PEFT-named dicts.
        base: the model the dict is for (an ``nn.Module`` or ``{component: {path: shape}}``); formats with
            flattened names (kohya) resolve them against it.
        drop: with ``base``: globs naming flattened names that may resolve to nothing (see :func:`adaptkit.load`).

    Returns:
        The adapter (module paths as named in the dict; :func:`adaptkit.inject` resolves them).

    Raises:
        FormatError: no registered format recognises the keys (the message names some of them).
    """
    if not state_dict:
        raise FormatError("the state dict is empty; pass an adapter's tensors")
    bad = [k for k, v in state_dict.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise FormatError(f"state dict values must be tensors; {bad[0]!r} is a {type(state_dict[bad[0]]).__name__}")
    adapter = from_peft_state_dict(state_dict, config)
    if adapter is not None:
        return adapter
    others = {name: fmt for name, fmt in FORMATS.items() if name != peft_format.NAME}
    tensors = {k: v.detach() for k, v in state_dict.items()}
    for fmt in others.values():
        if fmt.detect_keys(tensors):
            adapter = fmt.read_tensors(tensors, {}, None, source="state_dict", file_name="the state dict",
                                       **({} if base is None else {"base": base}),
                                       **({} if drop is None or base is None else {"drop": drop}))
            return adapter.replace(source="state_dict")
    sample = ", ".join(sorted(state_dict)[:5])
    raise FormatError(
        f"no adapter format recognises these keys (e.g. {sample}); known formats: "
        f"{', '.join(['peft', *others])}. Pass PEFT names (<module>.lora_A.weight) or an Adapter"
    )


__all__ = ["from_peft_state_dict", "from_state_dict"]
