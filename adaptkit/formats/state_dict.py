"""Raw adapter state dicts (PEFT, kohya/LyCORIS or diffusers naming) -> :class:`~adaptkit.graph.Adapter`.

This is the "injection from a state dict" path of :func:`adaptkit.inject`: no config file, so the kind
and the ranks come from tensor names and shapes.

* PEFT naming (``...q_proj.lora_A.weight``, ``...lora_A.default.weight`` as ``model.state_dict()``
  writes it, ``hada_*``, ``lokr_*``, ``ia3_l``; the ``base_model.model.`` prefix is optional) is parsed
  with the PEFT reader's own per-kind builders. Alpha comes from a ``<module>.alpha`` key when present,
  from ``config`` (an ``adapter_config.json`` dict) when given, else alpha = rank (scale 1) with a warning.
* Anything else goes through the registered formats of :data:`adaptkit.converters.FORMATS` (kohya,
  diffusers when installed): the dict is written to a temporary ``.safetensors`` file that each format's
  ``detect`` / ``read`` sees exactly as it would see a checkpoint on disk.
"""

from __future__ import annotations

import re
import tempfile
import warnings
from collections import defaultdict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ..core.adapter import Adapter
from ..errors import ConfigError, FormatError
from .patterns import ConfigPatterns, saved_module_of

#: PEFT parameter names that carry the adapter name (``lora_A.<name>.weight``, ``hada_w1_a.<name>``)
_NAMED_WEIGHT = re.compile(r"\.(lora_A|lora_B|lora_magnitude_vector)\.([^.]+)\.(weight|bias)$")
_NAMED_PARAM = re.compile(r"\.(lora_embedding_A|lora_embedding_B|hada_w[12]_[ab]|hada_t[12]|lokr_w[12](?:_[ab])?"
                          r"|lokr_t2|ia3_l)\.([^.]+)$")


def _strip_adapter_name(key: str) -> str:
    m = _NAMED_WEIGHT.search(key)
    if m and m.group(2) not in ("weight", "bias"):
        return key[: m.start()] + f".{m.group(1)}.{m.group(3)}"
    m = _NAMED_PARAM.search(key)
    if m:
        return key[: m.start()] + f".{m.group(1)}"
    return key


def _lokr_rank(parts: Mapping[str, torch.Tensor]) -> int | None:
    if any(t.ndim < 2 for t in parts.values() if t is not None):
        return None  # check_factors names the tensor
    if "w1a" in parts:
        return int(parts["w1a"].shape[1])
    if "t2" in parts:
        return int(parts["t2"].shape[0])
    if "w2a" in parts:
        return int(parts["w2a"].shape[1])
    return None


def _layer_rank(ptype: str, parts: Mapping[str, torch.Tensor]) -> int | None:
    if ptype == "LORA":
        a = parts.get("a", parts.get("emb_a"))
        return None if a is None or a.ndim < 2 else int(a.shape[0])
    if ptype == "LOHA":
        return int(parts["w1b"].shape[0]) if "w1b" in parts and parts["w1b"].ndim >= 2 else None
    if ptype == "LOKR":
        return _lokr_rank(parts)
    return None


def from_peft_state_dict(state_dict: Mapping[str, torch.Tensor], config: Mapping[str, Any] | None = None) -> Adapter | None:
    """Parse a raw PEFT-named state dict; ``None`` when no key has a PEFT adapter suffix.

    Args:
        state_dict: tensor name -> tensor, PEFT naming, with or without ``base_model.model.`` and adapter name.
        config: an ``adapter_config.json`` dict (alpha, rank/alpha patterns, rsLoRA, ``feedforward_modules``).

    Raises:
        FormatError: keys that are not adapter tensors, or tensors of several PEFT types mixed.
        ConfigError: ``config`` contradicts the tensors.
    """
    from . import peft as peft_format

    groups: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)
    types: dict[str, set[str]] = defaultdict(set)
    alphas: dict[str, float] = {}
    unknown: list[str] = []
    extras: dict[str, torch.Tensor] = {}
    saved = (config or {}).get("modules_to_save")
    for raw_key, tensor in state_dict.items():
        key = _strip_adapter_name(raw_key.removeprefix(peft_format.PREFIX))
        if key.endswith(".alpha"):
            if tensor.numel() == 0:
                raise FormatError(f"tensor '{raw_key}' is empty, but an alpha is one number; drop it or store the alpha")
            alphas[key[: -len(".alpha")]] = float(torch.as_tensor(tensor).float().reshape(-1)[0])
            continue
        split = peft_format._split_key(key)
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
    if config is not None:
        cfg = dict(config)
        if cfg.get("peft_type", ptype) != ptype:
            raise ConfigError(f"config says peft_type {cfg.get('peft_type')} but the tensors are {ptype}; "
                              "pass the config that belongs to these tensors")
        cfg["peft_type"] = ptype
    else:
        cfg = {"peft_type": ptype}
    patterns = ConfigPatterns.of(cfg, alpha_overrides=alphas if config is not None else None)
    layers = {}
    defaulted: list[str] = []
    for module in sorted(groups):
        parts = groups[module]
        mcfg = cfg
        if config is None:
            rank = _layer_rank(ptype, parts)
            if module in alphas:
                alpha = alphas[module]
            else:
                alpha = float(rank or 1)
                if ptype != "IA3":
                    defaulted.append(module)
            mcfg = {**cfg, "lora_alpha": alpha, "alpha": alpha, "r": rank or 1, "use_dora": "magnitude" in parts}
            if ptype == "IA3":
                v = parts.get("ia3")
                on_input = v is not None and v.ndim == 2 and v.shape[0] == 1 and v.shape[1] != 1
                mcfg["feedforward_modules"] = [module] if on_input else []
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
                    base: Any = None) -> Adapter:
    """Turn a raw adapter state dict in PEFT, kohya/LyCORIS or diffusers naming into an :class:`Adapter`.

    Args:
        state_dict: tensor name -> tensor.
        config: optional PEFT ``adapter_config.json`` dict for PEFT-named dicts.
        base: the model the dict is for (an ``nn.Module`` or ``{component: {path: shape}}``); formats with
            flattened names (kohya) resolve them against it.

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
    from safetensors.torch import save_file

    from . import FORMATS

    others = {name: mod for name, mod in FORMATS.items() if name != "peft"}
    with tempfile.TemporaryDirectory(prefix="adaptkit-sd-") as tmp:
        path = Path(tmp) / "adapter.safetensors"
        save_file({k: v.detach().contiguous() for k, v in state_dict.items()}, str(path))
        for name, module in others.items():
            if module.detect(path):
                adapter = module.read(path, source="state_dict", **({} if base is None else {"base": base}))
                return adapter.replace(source="state_dict")
    sample = ", ".join(sorted(state_dict)[:5])
    raise FormatError(
        f"no adapter format recognises these keys (e.g. {sample}); known formats: "
        f"{', '.join(['peft', *others])}. Pass PEFT names (<module>.lora_A.weight) or an Adapter"
    )


__all__ = ["from_peft_state_dict", "from_state_dict"]
