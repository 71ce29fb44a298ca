"""PEFT format: ``adapter_config.json`` + ``adapter_model.safetensors`` (legacy ``adapter_model.bin``).

Reads and writes LORA (incl. DoRA, rsLoRA, ``rank_pattern``/``alpha_pattern``, embedding LoRA,
``lora_B.bias``, conv), LOHA, LOKR and IA3. Tensor keys are ``base_model.model.<module path>.<suffix>``
with the adapter name removed, exactly as ``PeftModel.save_pretrained`` writes them. Non-default
adapters saved by PEFT live in subfolders named after the adapter: read them as ``dir:name``. A PEFT
adapter applies to one model, so writing a pipeline adapter (``unet.…``, ``text_encoder.…``) can select one
component, in that model's own namespace, or write one adapter per component into subfolders (``component=``).
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

from ..core.adapter import Adapter
from ..core.kinds import IA3, LoHa, LoKr, LoRA
from ..core.kinds.base import check_factors
from ..errors import ConfigError, FormatError, ShapeMismatchError, UnsupportedError
from ..io.outputs import atomic_output
from ..io.safetensors import read_safetensors_header, read_weights, write_safetensors
from . import names as _names
from . import peft_lokr
from .patterns import ConfigPatterns, build_pattern, matches_feedforward

NAME = "peft"
CONFIG_NAME = "adapter_config.json"
WEIGHT_NAMES = ("adapter_model.safetensors", "adapter_model.bin")
PREFIX = "base_model.model."
#: files a hub download of a PEFT adapter needs
ALLOW_PATTERNS = [CONFIG_NAME, *WEIGHT_NAMES]

#: tensor-name suffix -> (peft_type, canonical part), longest suffixes first when matching
SUFFIXES: dict[str, tuple[str, str]] = {
    "lora_magnitude_vector.weight": ("LORA", "magnitude"),
    "lora_magnitude_vector": ("LORA", "magnitude"),
    "lora_embedding_A": ("LORA", "emb_a"),
    "lora_embedding_B": ("LORA", "emb_b"),
    "lora_A.weight": ("LORA", "a"),
    "lora_B.weight": ("LORA", "b"),
    "lora_B.bias": ("LORA", "bias"),
    "hada_w1_a": ("LOHA", "w1a"),
    "hada_w1_b": ("LOHA", "w1b"),
    "hada_w2_a": ("LOHA", "w2a"),
    "hada_w2_b": ("LOHA", "w2b"),
    "hada_t1": ("LOHA", "t1"),
    "hada_t2": ("LOHA", "t2"),
    "lokr_w1": ("LOKR", "w1"),
    "lokr_w1_a": ("LOKR", "w1a"),
    "lokr_w1_b": ("LOKR", "w1b"),
    "lokr_w2": ("LOKR", "w2"),
    "lokr_w2_a": ("LOKR", "w2a"),
    "lokr_w2_b": ("LOKR", "w2b"),
    "lokr_t2": ("LOKR", "t2"),
    "ia3_l": ("IA3", "ia3"),
}
_ORDERED = sorted(SUFFIXES, key=len, reverse=True)
PEFT_TYPES = ("LORA", "LOHA", "LOKR", "IA3")
KIND_TO_TYPE = {"lora": "LORA", "loha": "LOHA", "lokr": "LOKR", "ia3": "IA3"}


# --------------------------------------------------------------------------------------------- detect


def detect(path: Path) -> bool:
    """True for a directory holding ``adapter_config.json`` or a file whose keys start with ``base_model.model.``.

    A directory with PEFT weights but no config, or with adapters only in subfolders, is PEFT too, so that
    :func:`read` can say what is missing (the config, or which ``dir:subfolder`` to load).
    """
    if path.is_dir():
        if (path / CONFIG_NAME).is_file() or (path / WEIGHT_NAMES[1]).is_file():
            return True
        if (path / WEIGHT_NAMES[0]).is_file():
            return detect(path / WEIGHT_NAMES[0])
        return not any(path.glob("*.safetensors")) and any(path.glob(f"*/{CONFIG_NAME}"))
    if path.name == CONFIG_NAME:
        return True
    if path.suffix == ".safetensors":
        header, _ = read_safetensors_header(path)
        keys = [k for k in header if k != "__metadata__"]
        return bool(keys) and all(k.startswith(PREFIX) for k in keys)
    return False


# ----------------------------------------------------------------------------------------------- read


def _split_key(key: str) -> tuple[str, str, str] | None:
    """``(module_path, peft_type, part)`` for an adapter tensor key, ``None`` for anything else."""
    for suffix in _ORDERED:
        if key.endswith("." + suffix):
            peft_type, part = SUFFIXES[suffix]
            return key[: -len(suffix) - 1], peft_type, part
    return None


def _find_files(path: Path) -> tuple[Path, Path]:
    """Locate ``(config, weights)`` for a directory or a weight/config file."""
    directory = path if path.is_dir() else path.parent
    config = directory / CONFIG_NAME
    if path.is_file() and path.name != CONFIG_NAME:
        weights = path
    else:
        found = [directory / n for n in WEIGHT_NAMES if (directory / n).is_file()]
        if not found:
            subs = sorted(p.parent.name for p in directory.glob(f"*/{CONFIG_NAME}"))
            hint = f"; it holds adapters in subfolders {subs}: load one as '{directory}:{subs[0]}'" if subs else ""
            raise FormatError(f"no adapter_model.safetensors in {directory}{hint}")
        weights = found[0]
    if not config.is_file():
        raise ConfigError(
            f"{CONFIG_NAME} is missing next to {weights.name}; PEFT adapters need it for alpha and targets: "
            "copy it from where the adapter came from"
        )
    return config, weights


def read_config(path: Path) -> dict[str, Any]:
    """Load and check ``adapter_config.json``."""
    try:
        cfg = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path} is not valid JSON ({e}); fix or re-download the config") from e
    if not isinstance(cfg, dict):
        raise ConfigError(f"{path} does not hold a JSON object; fix or re-download the config")
    ptype = cfg.get("peft_type")
    if ptype not in PEFT_TYPES:
        raise ConfigError(
            f"unknown peft_type {ptype!r} in {path.name}; adaptkit reads {', '.join(PEFT_TYPES)} "
            "(other PEFT methods are not supported yet)"
        )
    return cfg


def read(path: Path, *, source: str | None = None, subfolder: str | None = None, **_: Any) -> Adapter:
    """Read a PEFT adapter directory (or its weight file) into an :class:`Adapter`.

    Args:
        path: the adapter directory, its ``adapter_config.json`` or its weight file.
        source: provenance string to record.
        subfolder: the subfolder the source named (``dir:other``); PEFT saves a non-default adapter in a
            subfolder named after it, so its last part (``other``) becomes the adapter's ``name``.

    Raises:
        ConfigError: missing or unknown config, ranks that contradict the config.
        FormatError: corrupt or truncated weights, tensors of a different PEFT type than the config.
        ShapeMismatchError: factors that disagree with each other.
    """
    config_path, weights_path = _find_files(path)
    cfg = read_config(config_path)
    tensors, metadata = read_weights(weights_path)
    ptype = cfg["peft_type"]
    groups: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)
    extras: dict[str, torch.Tensor] = {}
    for key, tensor in tensors.items():
        rel = key[len(PREFIX):] if key.startswith(PREFIX) else key
        split = _split_key(rel)
        if split is None:
            extras[rel] = tensor
            continue
        module, key_type, part = split
        if key_type != ptype:
            raise FormatError(
                f"{weights_path.name} holds {key_type} tensor '{key}' but the config says peft_type {ptype}; "
                "the config does not belong to these weights"
            )
        groups[module][part] = tensor
    layers = build_layers(groups, cfg, ConfigPatterns.of(cfg))
    if not layers:
        raise FormatError(f"{weights_path.name} contains no {ptype} adapter tensors; is it an adapter checkpoint?")
    return Adapter(
        layers=layers,
        base_model=cfg.get("base_model_name_or_path"),
        metadata=metadata,
        config=cfg,
        extras=extras,
        format=NAME,
        source=source or str(path),
        name=_subfolder_name(subfolder),
    )


def build_layer(module: str, parts: dict[str, torch.Tensor], cfg: dict[str, Any], patterns: ConfigPatterns) -> Any:
    """Build one layer of ``cfg["peft_type"]`` from a module's tensors (``{part: tensor}``).

    The tensors are checked first (:func:`adaptkit.kinds.base.check_factors`: floating point, non-empty,
    factor dimensions); every error names the module and the tensor.

    Raises:
        FormatError / ShapeMismatchError / ConfigError: as :func:`read`.
    """
    ptype = cfg["peft_type"]
    display = {part: suffix for suffix, (t, part) in reversed(SUFFIXES.items()) if t == ptype}
    try:
        check_factors(parts, display)
        return _READERS[ptype](module, parts, cfg, patterns)
    except (ShapeMismatchError, FormatError) as e:
        raise type(e)(f"{module}: {e}") from e


def build_layers(groups: dict[str, dict[str, torch.Tensor]], cfg: dict[str, Any],
                 patterns: ConfigPatterns) -> dict[str, Any]:
    """:func:`build_layer` for every module of ``groups`` (``{module: {part: tensor}}``), sorted by path."""
    return {module: build_layer(module, groups[module], cfg, patterns) for module in sorted(groups)}


def _subfolder_name(subfolder: str | None) -> str:
    """PEFT's adapter name for an adapter saved in ``subfolder`` (``"default"`` when there is none)."""
    last = (subfolder or "").replace("\\", "/").rstrip("/").rpartition("/")[2]
    return last if last and "." not in last else "default"


def _need(parts: dict, names: tuple[str, ...], module: str) -> None:
    missing = [n for n in names if n not in parts]
    if missing:
        raise FormatError(f"{module} lacks tensor(s) {missing}; the checkpoint is incomplete")


def _check_rank(module: str, found: int, cfg: dict, patterns: ConfigPatterns) -> None:
    expected = patterns.rank_for(module, cfg.get("r"))
    if expected is not None and int(expected) != found:
        raise ConfigError(
            f"{module} has rank {found} in its tensors but adapter_config.json gives r={expected}; "
            "the config does not match the weights (fix r/rank_pattern)"
        )


def _read_lora(module: str, p: dict[str, torch.Tensor], cfg: dict, patterns: ConfigPatterns) -> LoRA:
    fan = bool(cfg.get("fan_in_fan_out", False))
    alpha = patterns.alpha_for(module, cfg.get("lora_alpha", 8))
    rslora = bool(cfg.get("use_rslora", False))
    magnitude = p.get("magnitude")
    if "emb_a" in p or "emb_b" in p:
        _need(p, ("emb_a", "emb_b"), module)
        a, b = p["emb_a"], p["emb_b"]
        layer = LoRA(down=a, up=b, alpha=alpha, shape=(a.shape[1], b.shape[0]), module_type="embedding",
                     fan_in_fan_out=True, rslora=rslora,
                     magnitude=None if magnitude is None else magnitude.flatten(), bias=p.get("bias"))
    else:
        _need(p, ("a", "b"), module)
        a, b = p["a"], p["b"]
        if a.ndim >= 3:
            shape = (b.shape[0], a.shape[1], *a.shape[2:])
            mtype = "conv"
        else:
            shape = (a.shape[1], b.shape[0]) if fan else (b.shape[0], a.shape[1])
            mtype = "linear"
        layer = LoRA(down=a, up=b, alpha=alpha, shape=shape, module_type=mtype, fan_in_fan_out=fan and mtype == "linear",
                     rslora=rslora, magnitude=None if magnitude is None else magnitude.flatten(), bias=p.get("bias"))
    _check_rank(module, layer.rank, cfg, patterns)
    if bool(cfg.get("use_dora")) != (magnitude is not None):
        raise ConfigError(
            f"{module}: use_dora is {bool(cfg.get('use_dora'))} in the config but the weights "
            f"{'have' if magnitude is not None else 'lack'} a lora_magnitude_vector; fix use_dora"
        )
    return layer


def _read_loha(module: str, p: dict[str, torch.Tensor], cfg: dict, patterns: ConfigPatterns) -> LoHa:
    _need(p, ("w1a", "w1b", "w2a", "w2b"), module)
    alpha = patterns.alpha_for(module, cfg.get("alpha", 8))
    t1, t2 = p.get("t1"), p.get("t2")
    if t1 is not None:
        shape = (p["w1a"].shape[1], p["w1b"].shape[1], *t1.shape[2:])
    else:
        shape = (p["w1a"].shape[0], p["w1b"].shape[1])
    layer = LoHa(w1a=p["w1a"], w1b=p["w1b"], w2a=p["w2a"], w2b=p["w2b"], alpha=alpha, shape=shape,
                 module_type="conv" if t1 is not None else "linear", t1=t1, t2=t2)
    _check_rank(module, layer.rank, cfg, patterns)
    return layer


def _read_lokr(module: str, p: dict[str, torch.Tensor], cfg: dict, patterns: ConfigPatterns) -> LoKr:
    alpha = patterns.alpha_for(module, cfg.get("alpha", 8))
    r = int(patterns.rank_for(module, cfg.get("r", 8)))
    found = None
    if "w1a" in p:
        found = p["w1a"].shape[1]
    elif "t2" in p:
        found = p["t2"].shape[0]
    elif "w2a" in p:
        found = p["w2a"].shape[1]
    if found is not None and found != r:
        _check_rank(module, found, cfg, patterns)
    w1s = tuple(p["w1"].shape) if "w1" in p else (p["w1a"].shape[0], p["w1b"].shape[1]) if "w1a" in p and "w1b" in p else None
    if w1s is None:
        raise FormatError(f"{module} lacks lokr_w1 (or lokr_w1_a/lokr_w1_b); the checkpoint is incomplete")
    if "w2" in p:
        w2s = tuple(p["w2"].shape)
    elif "t2" in p and "w2a" in p and "w2b" in p:
        w2s = (p["w2a"].shape[1], p["w2b"].shape[1], *p["t2"].shape[2:])
    elif "w2a" in p and "w2b" in p:
        w2s = (p["w2a"].shape[0], p["w2b"].shape[1])
    else:
        raise FormatError(f"{module} lacks lokr_w2 (or lokr_w2_a/lokr_w2_b); the checkpoint is incomplete")
    shape = (w1s[0] * w2s[0], w1s[1] * w2s[1], *w2s[2:])
    return LoKr(alpha=alpha, rank=r, shape=shape, module_type="conv" if len(shape) > 2 else "linear",
                **{k: p.get(k) for k in ("w1", "w1a", "w1b", "w2", "w2a", "w2b", "t2")})


def _read_ia3(module: str, p: dict[str, torch.Tensor], cfg: dict, patterns: ConfigPatterns) -> IA3:
    vec = p["ia3"]
    on_input = matches_feedforward(cfg.get("feedforward_modules"), module)
    fan = bool(cfg.get("fan_in_fan_out", False))
    if vec.ndim == 2:
        # linear: (out, 1) scales outputs, (1, in) scales inputs; fan_in_fan_out stores the same shapes
        expected_input = vec.shape[0] == 1 and vec.shape[1] != 1
        if vec.shape != (1, 1) and expected_input != on_input:
            raise ConfigError(
                f"{module}: ia3_l has shape {tuple(vec.shape)} but feedforward_modules says "
                f"{'input' if on_input else 'output'} scaling; fix feedforward_modules"
            )
    return IA3(vector=vec.flatten(), on_input=on_input, module_type="conv" if vec.ndim > 2 else "linear",
               fan_in_fan_out=fan and vec.ndim == 2)


_READERS = {"LORA": _read_lora, "LOHA": _read_loha, "LOKR": _read_lokr, "IA3": _read_ia3}


# ---------------------------------------------------------------------------------------------- write


def _num(x: float) -> int | float:
    return int(x) if float(x).is_integer() else float(x)


def _peft_type(adapter: Adapter) -> str:
    kinds = adapter.kinds
    unsupported = sorted(p for p, layer in adapter.layers.items() if layer.kind not in KIND_TO_TYPE)
    if unsupported:
        raise UnsupportedError(
            f"PEFT has no format for {adapter.layers[unsupported[0]].kind} layers ({len(unsupported)} layers, e.g. "
            f"{unsupported[0]}); write format='kohya', or convert(kind='lora', rank=R) first"
        )
    if len(kinds) != 1:
        raise UnsupportedError(
            f"a PEFT adapter holds one kind, this one mixes {sorted(kinds)}; write format='kohya', "
            "or convert(kind='lora', rank=R) first"
        )
    return KIND_TO_TYPE[next(iter(kinds))]


def _base_config(adapter: Adapter, ptype: str) -> dict[str, Any]:
    cfg: dict[str, Any] = {}
    if adapter.format == NAME and adapter.config.get("peft_type") == ptype:
        cfg.update(adapter.config)  # keep every field we do not interpret
    cfg.update({"peft_type": ptype, "base_model_name_or_path": adapter.base_model, "inference_mode": True})
    for key in ("layers_to_transform", "layers_pattern", "exclude_modules"):
        if key in cfg:
            cfg[key] = None  # targets are written as exact paths; these would filter them again
    cfg.setdefault("task_type", None)
    cfg.setdefault("revision", None)
    cfg.setdefault("modules_to_save", None)
    return cfg


def _write_lora(adapter: Adapter, cfg: dict, out: dict[str, torch.Tensor], prefix: str) -> None:
    layers: dict[str, LoRA] = dict(adapter.layers)  # type: ignore[arg-type]
    dora = {p for p, l in layers.items() if l.magnitude is not None}
    if dora and len(dora) != len(layers):
        raise UnsupportedError(
            f"PEFT applies DoRA to all layers or none; {len(dora)} of {len(layers)} layers have a magnitude "
            "(fuse them, or write format='kohya')"
        )
    bad_axis = sorted(p for p in dora if layers[p].magnitude_axis != 0)
    if bad_axis:
        raise UnsupportedError(
            f"PEFT DoRA stores one magnitude per output feature; {bad_axis[0]} has one per input feature "
            "(LyCORIS wd_on_out=False): write format='kohya' or fuse it"
        )
    all_rs = all(l.rslora for l in layers.values())
    ranks = {p: l.rank for p, l in layers.items()}
    # a mixed rsLoRA adapter is written without rsLoRA: alpha' = alpha * sqrt(r) gives the same scale
    alphas = {p: _num(l.alpha if (l.rslora == all_rs) else l.scale * l.rank) for p, l in layers.items()}
    r, rank_pattern = build_pattern(ranks)
    alpha, alpha_pattern = build_pattern(alphas)
    use_bias = any(l.bias is not None for l in layers.values())
    cfg.update({
        "r": r, "lora_alpha": alpha, "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern,
        "use_rslora": all_rs, "use_dora": bool(dora), "lora_bias": use_bias,
        "fan_in_fan_out": any(l.fan_in_fan_out and l.module_type == "linear" for l in layers.values()),
        "target_modules": sorted(layers),
    })
    cfg.setdefault("init_lora_weights", True)
    cfg.setdefault("lora_dropout", 0.0)
    cfg.setdefault("bias", "none")
    fans = {l.fan_in_fan_out for l in layers.values() if l.module_type == "linear"}
    if len(fans) > 1:
        raise UnsupportedError("PEFT has one fan_in_fan_out per adapter; this adapter mixes Conv1D and Linear layers")
    for path, layer in layers.items():
        key = prefix + path
        if layer.mid is not None:
            # fold the Tucker core into A: exact, same rank
            _, v = layer.factors()
            down = v.reshape(layer.rank, *layer.shape[1:]).to(layer.down.dtype)
        else:
            down = layer.down
        if layer.module_type == "embedding":
            out[key + ".lora_embedding_A"] = down
            out[key + ".lora_embedding_B"] = layer.up
        else:
            out[key + ".lora_A.weight"] = down
            out[key + ".lora_B.weight"] = layer.up
        if use_bias:
            out[key + ".lora_B.bias"] = layer.bias if layer.bias is not None else torch.zeros(layer.up.shape[0], dtype=layer.up.dtype)
        if layer.magnitude is not None:
            m = layer.magnitude
            if layer.module_type == "conv":
                m = m.reshape(1, -1, *([1] * (len(layer.shape) - 2)))
            out[key + ".lora_magnitude_vector"] = m


def _write_loha(adapter: Adapter, cfg: dict, out: dict[str, torch.Tensor], prefix: str) -> None:
    layers: dict[str, LoHa] = dict(adapter.layers)  # type: ignore[arg-type]
    _refuse_magnitude(layers)
    r, rank_pattern = build_pattern({p: l.rank for p, l in layers.items()})
    alpha, alpha_pattern = build_pattern({p: _num(l.alpha) for p, l in layers.items()})
    cfg.update({"r": r, "alpha": alpha, "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern,
                "use_effective_conv2d": any(l.t1 is not None for l in layers.values()),
                "target_modules": sorted(layers)})
    cfg.setdefault("init_weights", True)
    for path, l in layers.items():
        key = prefix + path
        for name, t in (("hada_w1_a", l.w1a), ("hada_w1_b", l.w1b), ("hada_w2_a", l.w2a), ("hada_w2_b", l.w2b),
                        ("hada_t1", l.t1), ("hada_t2", l.t2)):
            if t is not None:
                out[f"{key}.{name}"] = t


def _write_lokr(adapter: Adapter, cfg: dict, out: dict[str, torch.Tensor], prefix: str) -> None:
    layers: dict[str, LoKr] = dict(adapter.layers)  # type: ignore[arg-type]
    _refuse_magnitude(layers)
    factor, decompose_both, ranks = peft_lokr.choose_layout(layers, cfg.get("decompose_factor", -1))
    r, rank_pattern = build_pattern(ranks)
    alpha, alpha_pattern = build_pattern({p: _num(layers[p].scale * ranks[p]) for p in layers})
    cfg.update({"r": r, "alpha": alpha, "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern,
                "decompose_factor": factor, "decompose_both": decompose_both,
                "use_effective_conv2d": any(l.t2 is not None for l in layers.values()),
                "target_modules": sorted(layers)})
    cfg.setdefault("init_weights", True)
    for path, l in layers.items():
        key = prefix + path
        for name in ("w1", "w1a", "w1b", "w2", "w2a", "w2b", "t2"):
            t = getattr(l, name)
            if t is not None:
                suffix = name if len(name) == 2 else f"{name[:2]}_{name[2]}"
                out[f"{key}.lokr_{suffix}"] = t


def _write_ia3(adapter: Adapter, cfg: dict, out: dict[str, torch.Tensor], prefix: str) -> None:
    layers: dict[str, IA3] = dict(adapter.layers)  # type: ignore[arg-type]
    cfg.update({"target_modules": sorted(layers),
                "feedforward_modules": sorted(p for p, l in layers.items() if l.on_input),
                "fan_in_fan_out": any(l.fan_in_fan_out for l in layers.values())})
    cfg.setdefault("init_ia3_weights", True)
    for path, l in layers.items():
        if not (l.on_input or l.scale_bias):
            raise UnsupportedError(
                f"{path}: this IA3 layer leaves the module bias unscaled (LyCORIS) but PEFT's IA3 scales it; "
                "write format='kohya' or fuse it"
            )
        v = l.vector
        if l.module_type == "conv":
            v = v.reshape(1, -1, 1, 1)
        else:
            v = v.reshape(1, -1) if l.on_input else v.reshape(-1, 1)
        out[f"{prefix}{path}.ia3_l"] = v


def _refuse_magnitude(layers: dict) -> None:
    dora = sorted(p for p, l in layers.items() if l.magnitude is not None)
    if dora:
        raise UnsupportedError(
            f"PEFT has no DoRA for {layers[dora[0]].kind} ({dora[0]}); write format='kohya' or fuse the adapter"
        )


_WRITERS = {"LORA": _write_lora, "LOHA": _write_loha, "LOKR": _write_lokr, "IA3": _write_ia3}


def to_state_dict(adapter: Adapter, prefix: str = PREFIX) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The PEFT tensors and ``adapter_config.json`` dict of an adapter, as :func:`write` saves them.

    Args:
        adapter: the adapter (one kind: LoRA, LoHa, LoKr or IA3).
        prefix: prepended to every tensor name; PEFT files use ``"base_model.model."``, transformers'
            ``get_adapter_state_dict`` uses ``""`` (names relative to the model itself).

    Returns:
        ``(tensors, config)``: tensors named ``<prefix><module path>.lora_A.weight`` (no adapter name),
        extras included; the config as a JSON-ready dict.

    Raises:
        UnsupportedError: as :func:`write`.
    """
    if not adapter.layers:
        raise UnsupportedError("the adapter has no layers; there is nothing to write")
    ptype = _peft_type(adapter)
    cfg = _base_config(adapter, ptype)
    tensors: dict[str, torch.Tensor] = {}
    _WRITERS[ptype](adapter, cfg, tensors, prefix)
    for key, t in adapter.extras.items():
        tensors[prefix + key.removeprefix(PREFIX)] = t
    return tensors, cfg


#: ``component=`` values of PEFT output: a pipeline component, or ``each`` for one adapter per component
COMPONENTS = (*(c for c in _names.WRITE_PREFIXES if c), "each")


def check_component(component: str | None) -> str | None:
    """Validate a ``component=`` option of PEFT output (``None``: write every path as it is).

    Raises:
        ConfigError: not one of :data:`COMPONENTS`.
    """
    if component is not None and component not in COMPONENTS:
        raise ConfigError(f"unknown PEFT component {component!r}; use one of {', '.join(COMPONENTS)}")
    return component


def select_component(adapter: Adapter, component: str) -> Adapter:
    """The layers (and extra tensors) of one pipeline component, in that model's own namespace.

    ``unet.down_blocks.0...`` becomes ``down_blocks.0...``, what ``PeftModel.from_pretrained(unet, ...)``
    expects; the component is recorded in the metadata (:data:`~adaptkit.converters.names.COMPONENT_KEY`).

    Raises:
        ConfigError: the adapter has no layers of that component (the message lists the ones it has).
    """
    prefix = component + "."
    layers = {p[len(prefix):]: l for p, l in adapter.layers.items() if p.startswith(prefix)}
    if not layers:
        have = sorted({c for p in adapter.layers if (c := _names.component_of(p))})
        what = f"its components are {', '.join(have)}" if have else "its module paths name no pipeline component"
        raise ConfigError(f"the adapter has no {component} layers ({what}); pass one of its components, or no "
                          "--component to write the paths as they are")
    extras = {k[len(prefix):]: t for k, t in adapter.extras.items() if k.startswith(prefix)}
    return adapter.replace(layers=layers, extras=extras, metadata={**adapter.metadata, _names.COMPONENT_KEY: component})


def split_components(adapter: Adapter, component: str | None) -> dict[str, Adapter]:
    """The PEFT adapters to write for ``component=``, by subfolder (``""``: the output directory itself).

    ``None`` writes the adapter as it is; a component writes that component's layers in its own namespace
    (:func:`select_component`); ``"each"`` writes one such adapter per component into ``<out>/<component>/``.

    Raises:
        ConfigError: an unknown component, one the adapter does not have, or ``each`` for paths outside any
            component.
    """
    if check_component(component) is None:
        return {"": adapter}
    if component != "each":
        return {"": select_component(adapter, component)}
    loose = sorted(p for p in adapter.layers if _names.component_of(p) is None)
    if loose:
        raise ConfigError(f"component='each' writes one PEFT adapter per pipeline component, but {len(loose)} layer(s) "
                          f"belong to none, e.g. {loose[0]}; write without --component")
    comps = sorted({_names.component_of(p) or "" for p in adapter.layers})
    return {c: select_component(adapter, c) for c in comps}


def write(adapter: Adapter, path: str | Path, *, overwrite: bool = False, component: str | None = None,
          **_: Any) -> Path:
    """Write an adapter as a PEFT directory that ``PeftModel.from_pretrained`` loads.

    Args:
        adapter: the adapter (one kind: LoRA, LoHa, LoKr or IA3).
        path: output directory (must not exist unless ``overwrite``).
        overwrite: replace an existing directory.
        component: for an adapter of a pipeline (paths ``unet.…``, ``text_encoder.…``): ``"unet"`` (or another
            component) writes only that component's layers, in its own namespace, for
            ``PeftModel.from_pretrained(unet, path)``; ``"each"`` writes one such adapter per component into
            ``path/<component>/``. ``None`` writes every path as it is.

    Returns:
        The output directory.

    Raises:
        UnsupportedError: the adapter mixes kinds, holds Full layers, DoRA on some layers only, or LoKr
            shapes PEFT's factorisation cannot express. The message says what to do instead.
        ConfigError: a ``component`` the adapter does not have.
    """
    parts = {}
    for sub, part in split_components(adapter, component).items():
        tensors, cfg = to_state_dict(part)
        metadata = dict(part.metadata)
        metadata.setdefault("format", "pt")
        parts[sub] = (tensors, cfg, metadata)
    with atomic_output(path, overwrite=overwrite) as tmp:
        for sub, (tensors, cfg, metadata) in parts.items():
            folder = tmp / sub if sub else tmp
            folder.mkdir(exist_ok=True)
            write_safetensors(tensors, folder / WEIGHT_NAMES[0], metadata)
            (folder / CONFIG_NAME).write_text(json.dumps(cfg, indent=2, sort_keys=True, default=_json_default) + "\n")
    return Path(path)


def _json_default(o: Any) -> Any:
    if isinstance(o, (set, frozenset, tuple)):
        return sorted(o) if isinstance(o, (set, frozenset)) else list(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


__all__ = ["ALLOW_PATTERNS", "COMPONENTS", "NAME", "check_component", "detect", "read", "read_config",
           "select_component", "split_components", "to_state_dict", "write"]
