"""kohya / LyCORIS single-file format: one ``.safetensors`` with flattened module names.

Keys are ``<prefix><flattened module path>.<tensor>`` with the prefixes of
:data:`adaptkit.converters.names.PREFIXES` (``lora_unet_``, ``lora_te_``, ``lora_te1_``/``2``/``3``,
``lora_transformer_``, ``lycoris_``) and the per-module tensors of :data:`TENSORS`: LoRA/LoCon
``lora_down``/``lora_up``/``lora_mid`` (``.weight``) + ``alpha``; LoHa ``hada_*``; LoKr ``lokr_*``; DoRA
``dora_scale`` (per output ``(out, 1, ...)`` or per input ``(1, in, ...)``); IA3 ``weight`` + ``on_input``
(stored as ``l - 1``); full ``diff``/``diff_b``; norms ``w_norm``/``b_norm``. A missing ``alpha`` means
alpha = rank; a LoKr whose factors are both full has scale 1. ``ss_*`` / ``modelspec.*`` metadata is kept;
reading adds an ``adaptkit.kohya_naming`` entry (how the file named its modules) that other formats carry
along, so that writing kohya again after a trip through PEFT or diffusers gives the same names.

Flattened names are resolved to module paths with :mod:`adaptkit.converters.names`; the canonical path is
``<component>.<module path>`` (``unet.down_blocks.0...``) or the bare path for ``lycoris_`` files. Writing puts
bare paths (an adapter made on a UNet alone) under a component, given as ``component=`` or recognised from the
paths (:func:`adaptkit.converters.names.bare_component`), so that kohya tools see ``lora_unet_`` names.
"""

from __future__ import annotations

import dataclasses
import json
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

from ..core.adapter import Adapter
from ..core.kinds import IA3, Full, LoHa, LoKr, LoRA
from ..core.kinds.base import check_factors
from ..errors import ConfigError, FormatError, ShapeMismatchError, UnsupportedError
from ..io.outputs import atomic_output
from ..io.safetensors import (
    read_safetensors,
    read_safetensors_header,
    write_safetensors,
)
from . import names as _names

NAME = "kohya"
ALLOW_PATTERNS = ["*.safetensors"]

#: tensor name (after the module name) -> (kind, canonical part)
TENSORS: dict[str, tuple[str, str]] = {
    "lora_down.weight": ("lora", "down"),
    "lora_up.weight": ("lora", "up"),
    "lora_mid.weight": ("lora", "mid"),
    "hada_w1_a": ("loha", "w1a"),
    "hada_w1_b": ("loha", "w1b"),
    "hada_w2_a": ("loha", "w2a"),
    "hada_w2_b": ("loha", "w2b"),
    "hada_t1": ("loha", "t1"),
    "hada_t2": ("loha", "t2"),
    "lokr_w1": ("lokr", "w1"),
    "lokr_w1_a": ("lokr", "w1a"),
    "lokr_w1_b": ("lokr", "w1b"),
    "lokr_w2": ("lokr", "w2"),
    "lokr_w2_a": ("lokr", "w2a"),
    "lokr_w2_b": ("lokr", "w2b"),
    "lokr_t2": ("lokr", "t2"),
    "diff": ("full", "diff"),
    "diff_b": ("full", "diff_b"),
    "w_norm": ("norm", "diff"),
    "b_norm": ("norm", "diff_b"),
    "weight": ("ia3", "weight"),
    "on_input": ("ia3", "on_input"),
    "alpha": ("", "alpha"),
    "dora_scale": ("", "dora_scale"),
}
#: metadata entry other formats write so that a kohya file converted there and back keeps its names
NAMING_KEY = "adaptkit.kohya_naming"
#: keys that are not adapter layers but belong in kohya files (pivotal-tuning embeddings), carried through
EXTRA_PREFIXES = ("bundle_emb.", "emb_params")


# --------------------------------------------------------------------------------------------- detect


def _module_name(key: str) -> tuple[str, str]:
    module, _, tensor = key.partition(".")
    return module, tensor


def detect(path: Path) -> bool:
    """True for a ``.safetensors`` file (or a directory holding just one) whose keys use kohya/LyCORIS prefixes."""
    if path.is_dir():
        files = sorted(path.glob("*.safetensors"))
        if len(files) != 1 or any(path.glob("*.json")):
            return False
        path = files[0]
    if not (path.is_file() and path.suffix == ".safetensors"):
        return False
    header, _ = read_safetensors_header(path)
    keys = [k for k in header if k != "__metadata__" and not k.startswith(EXTRA_PREFIXES)]
    return bool(keys) and all(_names.split_prefix(k) is not None for k in keys)


# ----------------------------------------------------------------------------------------------- read


def read(path: Path, *, source: str | None = None, base: Any = None, **_: Any) -> Adapter:
    """Read a kohya/LyCORIS ``.safetensors`` file.

    Args:
        path: the file.
        source: provenance string to record.
        base: base model used to resolve flattened names (hub id, directory, ``nn.Module``); without it
            the shipped inventories (SD 1.x, SDXL, SD3, Flux) are tried.

    Raises:
        FormatError: unknown or mixed key schemes, tensors of several kinds for one module, incomplete layers.
        ShapeMismatchError: factors that disagree, or layers that contradict the base model.
        ConfigError: names that resolve to no module, or need ``base`` to be resolved.
    """
    path = Path(path)
    if path.is_dir():
        files = sorted(path.glob("*.safetensors"))
        if len(files) != 1:
            raise FormatError(f"{path} holds {len(files)} .safetensors files; pass the kohya/LyCORIS file itself")
        path = files[0]
    tensors, metadata = read_safetensors(path)
    groups, extras = group_tensors(tensors, path.name)
    layers: dict[tuple[str, str], Any] = {}
    for name, parts in groups.items():
        try:
            layers[name] = build_layer(parts)
        except (ShapeMismatchError, FormatError) as e:
            raise type(e)(f"{_names.WRITE_PREFIXES.get(name[0], '')}{name[1]}: {e}") from e
    if not layers:
        raise FormatError(f"{path.name} contains no kohya/LyCORIS adapter tensors; is it an adapter checkpoint?")
    shapes = {k: tuple(l.shape) for k, l in layers.items() if l.shape is not None}
    resolution = _names.resolve_names(layers, base=base, shapes=shapes)
    out: dict[str, Any] = {}
    naming: dict[str, str] = {}
    for (comp, flat), layer in layers.items():
        mod_path, alias = resolution.paths[(comp, flat)]
        naming[comp] = _alias_rule(mod_path, alias) if alias is not None else naming.get(comp, "direct")
        inv = resolution.inventory
        inv_comp = comp if comp in inv.modules else next(iter(inv.modules))
        shape = inv.shape(inv_comp, mod_path)
        layer = layer.fit(tuple(shape)) if shape else layer  # the base's shape where the tensors leave it open
        if isinstance(layer, IA3) and not layer.on_input and inv.has_bias(inv_comp, mod_path) is not False:
            layer = dataclasses.replace(layer, scale_bias=False)  # LyCORIS scales W only, never the bias
        out[f"{comp}.{mod_path}" if comp else mod_path] = layer
    prefixes = sorted({_prefix_of(k) for k in tensors if _names.split_prefix(k)})
    config = {"kohya_prefixes": prefixes, "kohya_naming": naming, "inventory": resolution.inventory.name}
    # recorded in the metadata too, so that a trip through PEFT, diffusers or ak.convert writes the same names back
    metadata = {**metadata, NAMING_KEY: json.dumps({**naming, "inventory": resolution.inventory.name}, sort_keys=True)}
    return Adapter(layers=dict(sorted(out.items())), base_model=_base_model(metadata), metadata=metadata,
                   config=config, extras=extras, format=NAME, source=source or str(path))


def _alias_rule(path: str, alias: str) -> str:
    """How a source named a module when it used an alias: ``text_model`` / ``bare`` (CLIP) or ``ldm``."""
    if alias == "text_model." + path:
        return "text_model"
    if path == "text_model." + alias:
        return "bare"
    return "ldm"


def _prefix_of(key: str) -> str:
    split = _names.split_prefix(key)
    return split[0] if split else ""


def _base_model(metadata: dict[str, str]) -> str | None:
    for key in ("ss_sd_model_name", "modelspec.architecture", "ss_base_model_version"):
        if metadata.get(key):
            return metadata[key]
    return None


def group_tensors(tensors: dict[str, torch.Tensor], fname: str = "file") -> tuple[dict, dict]:
    """Group kohya keys by module: ``{(component, flat name): {tensor name: tensor}}`` plus extras.

    Raises:
        FormatError: keys of another scheme (PEFT/diffusers ``lora_A``, unknown prefixes) or unknown tensor names.
    """
    groups: dict[tuple[str, str], dict[str, torch.Tensor]] = defaultdict(dict)
    extras: dict[str, torch.Tensor] = {}
    foreign: list[str] = []
    for key, t in tensors.items():
        if key.startswith(EXTRA_PREFIXES):
            extras[key] = t
            continue
        split = _names.split_prefix(key)
        module, tensor = _module_name(key)
        if split is None or not tensor:
            foreign.append(key)
            continue
        if tensor not in TENSORS:
            raise FormatError(
                f"{fname}: unknown tensor '{tensor}' in key '{key}'; adaptkit reads LoRA/LoCon, LoHa, LoKr, IA3, "
                "full and norm layers (other LyCORIS algorithms are not supported)"
            )
        _, comp, rest = _names.split_prefix(module)  # type: ignore[misc]
        groups[(comp, rest)][tensor] = t
    if foreign:
        kind = "mixes kohya keys with keys of another scheme" if groups else "uses an unknown key scheme"
        raise FormatError(f"{fname} {kind}, e.g. '{foreign[0]}' ({len(foreign)} such keys); convert it with the tool that made it")
    return dict(groups), extras


def _kind_of(parts: dict[str, torch.Tensor]) -> str:
    kinds = {TENSORS[n][0] for n in parts} - {""}
    if len(kinds) != 1:
        raise FormatError(f"tensors {sorted(parts)} do not form one layer of a known kind")
    return kinds.pop()


def _magnitude(dora: torch.Tensor | None, shape: tuple[int, ...]) -> tuple[torch.Tensor | None, int]:
    if dora is None:
        return None, 0
    s = tuple(dora.shape)
    if dora.numel() == shape[0] and (len(s) < 2 or s[0] == shape[0]):
        return dora.flatten(), 0
    if len(s) >= 2 and s[0] == 1 and dora.numel() == s[1]:
        return dora.flatten(), 1
    raise ShapeMismatchError(f"dora_scale of shape {s} fits neither the outputs nor the inputs of a {shape} weight")


def _alpha(parts: dict[str, torch.Tensor], rank: int) -> float:
    a = parts.get("alpha")
    if a is None:
        return float(rank)
    value = float(a.float().reshape(-1)[0]) if a.numel() else float(rank)
    return value if value != 0 else float(rank)


def build_layer(parts: dict[str, torch.Tensor]) -> Any:
    """Build one canonical layer from the tensors kohya/LyCORIS stores for a module."""
    kind = _kind_of(parts)
    p = {TENSORS[n][1]: t for n, t in parts.items()}
    check_factors(p, {TENSORS[n][1]: n for n in parts})
    if kind == "lora":
        if "down" not in p or "up" not in p:
            raise FormatError("lora_down/lora_up is missing; the checkpoint is incomplete")
        down, up, mid = p["down"], p["up"], p.get("mid")
        r = down.shape[0]
        if up.ndim > 2 or down.ndim > 2:
            k = tuple(mid.shape[2:]) if mid is not None else tuple(down.shape[2:])
            shape, mtype = (up.shape[0], down.shape[1], *k), "conv"
        else:
            shape, mtype = (up.shape[0], down.shape[1]), "linear"
        mag, axis = _magnitude(p.get("dora_scale"), shape)
        return LoRA(down=down, up=up, mid=mid, alpha=_alpha(p, r), shape=shape, module_type=mtype,
                    magnitude=mag, magnitude_axis=axis)
    if kind == "loha":
        for n in ("w1a", "w1b", "w2a", "w2b"):
            if n not in p:
                raise FormatError(f"hada_{n[:2]}_{n[2]} is missing; the checkpoint is incomplete")
        t1 = p.get("t1")
        if t1 is not None:
            shape = (p["w1a"].shape[1], p["w1b"].shape[1], *t1.shape[2:])
        else:
            shape = (p["w1a"].shape[0], p["w1b"].shape[1])
        mag, axis = _magnitude(p.get("dora_scale"), shape)
        return LoHa(w1a=p["w1a"], w1b=p["w1b"], w2a=p["w2a"], w2b=p["w2b"], t1=t1, t2=p.get("t2"),
                    alpha=_alpha(p, p["w1b"].shape[0]), shape=shape,
                    module_type="conv" if len(shape) > 2 else "linear", magnitude=mag, magnitude_axis=axis)
    if kind == "lokr":
        return _build_lokr(p)
    if kind in ("full", "norm"):
        if "diff" not in p:
            raise FormatError("diff / w_norm is missing; the checkpoint is incomplete")
        d = p["diff"]
        mtype = "norm" if kind == "norm" else ("conv" if d.ndim > 2 else "linear")
        return Full(diff=d, diff_b=p.get("diff_b"), shape=tuple(d.shape), module_type=mtype)
    if kind == "ia3":
        if "weight" not in p:
            raise FormatError("the IA3 weight is missing; the checkpoint is incomplete")
        w = p["weight"]
        on_input = bool(int(p["on_input"].reshape(-1)[0])) if "on_input" in p else False
        # float32 keeps l = weight + 1 exact (in fp16 the + 1 would round), so writing back is exact too
        return IA3(vector=(w.float() + 1).flatten(), on_input=on_input,
                   module_type="conv" if w.ndim > 1 else "linear")
    raise FormatError(f"unknown layer kind {kind}")  # pragma: no cover


def _build_lokr(p: dict[str, torch.Tensor]) -> LoKr:
    w1s = tuple(p["w1"].shape) if "w1" in p else (p["w1a"].shape[0], p["w1b"].shape[1]) if "w1a" in p and "w1b" in p else None
    if w1s is None:
        raise FormatError("lokr_w1 (or lokr_w1_a + lokr_w1_b) is missing; the checkpoint is incomplete")
    if "w2" in p:
        w2s = tuple(p["w2"].shape)
    elif "w2a" in p and "w2b" in p:
        w2s = (p["w2a"].shape[1], p["w2b"].shape[1], *p["t2"].shape[2:]) if "t2" in p else (p["w2a"].shape[0], p["w2b"].shape[1])
    else:
        raise FormatError("lokr_w2 (or lokr_w2_a + lokr_w2_b) is missing; the checkpoint is incomplete")
    shape = (w1s[0] * w2s[0], w1s[1] * w2s[1], *w2s[2:])
    if "w1a" in p:
        rank = int(p["w1a"].shape[1])
    elif "w2a" in p:
        rank = int(p["t2"].shape[0] if "t2" in p else p["w2a"].shape[1])
    else:
        rank = 0
    if rank == 0:  # both factors full: LyCORIS uses scale 1
        a = _alpha(p, 1)
        rank = int(a) if a.is_integer() and a >= 1 else 1
        alpha = float(rank)
    else:
        alpha = _alpha(p, rank)
    mag, axis = _magnitude(p.get("dora_scale"), shape)
    return LoKr(alpha=alpha, rank=rank, shape=shape, module_type="conv" if len(shape) > 2 else "linear",
                magnitude=mag, magnitude_axis=axis, **{k: p.get(k) for k in ("w1", "w1a", "w1b", "w2", "w2a", "w2b", "t2")})


# ---------------------------------------------------------------------------------------------- write


def _alpha_tensor(value: float, like: torch.Tensor) -> torch.Tensor:
    dtype = like.dtype if like.is_floating_point() else torch.float32
    return torch.tensor(float(value), dtype=dtype)


def _dora_tensor(layer: Any) -> torch.Tensor:
    n = len(layer.shape) - 1
    m = layer.magnitude
    if layer.magnitude_axis == 0:
        return m.reshape(-1, *([1] * n))
    return m.reshape(1, -1, *([1] * (n - 1)))


def layer_tensors(layer: Any) -> dict[str, torch.Tensor]:
    """The kohya/LyCORIS tensors of one canonical layer (names relative to the module).

    Raises:
        UnsupportedError: a layer kohya cannot store (embedding LoRA, LoRA bias, fan-in-fan-out IA3 ...).
    """
    out: dict[str, torch.Tensor] = {}
    if isinstance(layer, LoRA):
        if layer.module_type == "embedding":
            raise UnsupportedError("kohya/LyCORIS has no embedding LoRA; write format='peft'")
        if layer.bias is not None:
            raise UnsupportedError("kohya/LyCORIS LoRA has no bias (PEFT lora_bias); write format='peft' or fuse it")
        out["lora_down.weight"] = layer.down
        out["lora_up.weight"] = layer.up
        if layer.mid is not None:
            out["lora_mid.weight"] = layer.mid
        out["alpha"] = _alpha_tensor(layer.scale * layer.rank, layer.down)
    elif isinstance(layer, LoHa):
        for name in ("w1a", "w1b", "w2a", "w2b", "t1", "t2"):
            t = getattr(layer, name)
            if t is not None:
                out[f"hada_{name[:2]}_{name[2]}" if len(name) == 3 else f"hada_{name}"] = t
        out["alpha"] = _alpha_tensor(layer.alpha, layer.w1a)
    elif isinstance(layer, LoKr):
        full = layer.w1 is not None and layer.w2 is not None
        w1 = layer.w1
        if full and layer.scale != 1.0:  # LyCORIS fixes the scale of full-full LoKr at 1: fold it into w1
            w1 = (layer.w1.float() * layer.scale).to(layer.w1.dtype)
        for name, t in (("w1", w1), ("w1a", layer.w1a), ("w1b", layer.w1b), ("w2", layer.w2), ("w2a", layer.w2a),
                        ("w2b", layer.w2b), ("t2", layer.t2)):
            if t is not None:
                out[f"lokr_{name}" if len(name) == 2 else f"lokr_{name[:2]}_{name[2]}"] = t
        like = w1 if w1 is not None else layer.w1a
        if full:
            out["alpha"] = _alpha_tensor(layer.rank, like)
        else:
            r = layer.w1a.shape[1] if layer.w1a is not None else (layer.t2.shape[0] if layer.t2 is not None else layer.w2a.shape[1])
            out["alpha"] = _alpha_tensor(layer.scale * r, like)
    elif isinstance(layer, Full):
        if layer.module_type == "norm":
            out["w_norm"] = layer.diff
            if layer.diff_b is not None:
                out["b_norm"] = layer.diff_b
        else:
            out["diff"] = layer.diff
            if layer.diff_b is not None:
                out["diff_b"] = layer.diff_b
    elif isinstance(layer, IA3):
        if layer.fan_in_fan_out:
            raise UnsupportedError("LyCORIS IA3 has no fan_in_fan_out (Conv1D) layers; write format='peft'")
        v = (layer.vector.float() - 1).to(layer.vector.dtype)
        if layer.module_type == "conv":
            nd = len(layer.shape) if layer.shape is not None else 4
            v = v.reshape(1, -1, *([1] * (nd - 2)))
        out["weight"] = v
        out["on_input"] = torch.tensor(int(layer.on_input))
    else:
        raise UnsupportedError(f"kohya/LyCORIS cannot store {type(layer).__name__} layers")
    if getattr(layer, "magnitude", None) is not None:
        out["dora_scale"] = _dora_tensor(layer)
    if getattr(layer, "fan_in_fan_out", False) and not isinstance(layer, IA3) and getattr(layer, "module_type", "") != "embedding":
        raise UnsupportedError("kohya/LyCORIS stores no fan_in_fan_out (Conv1D) layers; write format='peft'")
    return out


def _naming(adapter: Adapter, naming: str | None) -> dict[str, str]:
    inventory = str(adapter.config.get("inventory", "sdxl")) if adapter.format == NAME else "sdxl"
    if naming is not None:
        if naming not in ("ldm", "diffusers"):
            raise ConfigError(f"unknown kohya naming {naming!r}; use 'ldm' (input_blocks_...) or 'diffusers' (down_blocks_...)")
        return {"unet": naming, "inventory": inventory}
    if adapter.format == NAME:
        cfg = dict(adapter.config.get("kohya_naming") or {})
    else:  # a kohya file converted to another format and back records its naming in the metadata
        try:
            cfg = dict(json.loads(adapter.metadata.get(NAMING_KEY, "{}")))
        except (json.JSONDecodeError, TypeError, ValueError):
            cfg = {}
        inventory = str(cfg.get("inventory", inventory))
    cfg["inventory"] = inventory
    for comp in ("text_encoder", "text_encoder_2"):
        cfg.setdefault(comp, "text_model")  # kohya trainers name CLIP modules text_model_encoder_...
    if "unet" not in cfg:
        version = str(adapter.metadata.get("ss_base_model_version", "")) + str(adapter.metadata.get("modelspec.architecture", ""))
        if "sdxl" in version.lower() or "stable-diffusion-xl" in version.lower():
            cfg["unet"] = "ldm"
    return cfg


def module_name(path: str, components: set[str], naming: dict[str, str]) -> str:
    """The flattened kohya module name (with prefix) of a canonical path."""
    comp, _, rest = path.partition(".")
    if _has_component(path):
        prefix = _names.WRITE_PREFIXES[comp]
        if comp == "text_encoder" and "text_encoder_2" in components:
            prefix = "lora_te1_"
        rule = naming.get(comp)
        if rule == "ldm":
            alias = _ldm_alias(comp, rest, naming.get("inventory", "sdxl"))
            if alias is not None:
                rest = alias
        elif rule == "text_model" and rest.startswith(("encoder.layers.", "embeddings.", "final_layer_norm")):
            rest = "text_model." + rest
        elif rule == "bare" and rest.startswith("text_model."):
            rest = rest[len("text_model."):]
        return prefix + _names.flatten(rest)
    return "lycoris_" + _names.flatten(path)


def _ldm_alias(component: str, path: str, inventory: str) -> str | None:
    for name in [inventory] if inventory in _names.shipped_available() else []:
        inv = _names.shipped(name)
        alias = inv.alias_of(component, path)
        if alias is not None:
            return alias
    return None


#: ``component=`` values: pipeline components, or ``"lycoris"`` to keep bare paths as ``lycoris_`` names
COMPONENTS = (*(c for c in _names.WRITE_PREFIXES if c), "lycoris")


def check_component(component: str | None) -> str | None:
    """Validate a ``component=`` writer option (``None``: detect it from the module paths).

    Raises:
        ConfigError: not one of :data:`COMPONENTS`.
    """
    if component is not None and component not in COMPONENTS:
        raise ConfigError(f"unknown kohya component {component!r}; use one of {', '.join(COMPONENTS)}")
    return component


def _has_component(path: str) -> bool:
    return _names.component_of(path) is not None


def bare_target(adapter: Adapter, component: str | None, naming: dict[str, str]) -> str | None:
    """The component that the adapter's paths without one are written under (``None``: ``lycoris_`` names).

    An explicit ``component`` wins; else a kohya source that named them ``lycoris_`` keeps that, then the
    component a PEFT adapter written for one component recorded (:data:`~adaptkit.converters.names.COMPONENT_KEY`),
    and otherwise the component is detected from the paths (:func:`adaptkit.converters.names.bare_component`).
    """
    if check_component(component) is not None:
        return None if component == "lycoris" else component
    if "" in naming:  # read from (or through) a file with lycoris_ names: keep them
        return None
    recorded = adapter.metadata.get(_names.COMPONENT_KEY)
    if recorded and recorded in _names.WRITE_PREFIXES:
        return recorded
    return _names.bare_component(p for p in adapter.layers if not _has_component(p))


def write(adapter: Adapter, path: str | Path, *, overwrite: bool = False, naming: str | None = None,
          component: str | None = None, **_: Any) -> Path:
    """Write an adapter as one kohya/LyCORIS ``.safetensors`` file.

    Args:
        adapter: any adapter of LoRA, LoHa, LoKr, IA3 and full layers (kinds may mix).
        path: output file (``.safetensors``), or a directory to write ``adapter.safetensors`` into.
        overwrite: replace an existing file.
        naming: ``"ldm"`` writes SDXL UNet names as ``input_blocks_...`` (sd-scripts), ``"diffusers"``
            as ``down_blocks_...``; by default the source's naming is kept.
        component: the pipeline component (``"unet"``, ``"transformer"``, ``"text_encoder"``, ``"text_encoder_2"``,
            ``"text_encoder_3"``) of an adapter made on a bare model, whose paths have none
            (``down_blocks.0...``): they are written as ``lora_unet_...``, ``lora_transformer_...``,
            ``lora_te_...``. By default a bare UNet, SD3/Flux transformer or CLIP text encoder is recognised from
            its module paths and anything else is written as ``lycoris_...``, which ``"lycoris"`` forces.

    Raises:
        UnsupportedError: a layer kohya cannot store. FormatError: two paths flatten to the same name.
        ConfigError: an unknown ``component``.
    """
    if not adapter.layers:
        raise UnsupportedError("the adapter has no layers; there is nothing to write")
    out_path = Path(path)
    if out_path.suffix != ".safetensors":
        out_path = out_path / "adapter.safetensors" if out_path.is_dir() else out_path.with_suffix(".safetensors")
    names = _naming(adapter, naming)
    target = bare_target(adapter, component, names)
    paths = {p: p if target is None or _has_component(p) else f"{target}.{p}" for p in adapter.layers}
    components = {p.partition(".")[0] for p in paths.values()}
    tensors: dict[str, torch.Tensor] = {}
    seen: dict[str, str] = {}
    for p, layer in adapter.layers.items():
        name = module_name(paths[p], components, names)
        if name in seen:
            raise FormatError(f"{p} and {seen[name]} flatten to the same kohya name {name}; write format='peft'")
        seen[name] = p
        try:
            for tname, t in layer_tensors(layer).items():
                tensors[f"{name}.{tname}"] = t
        except UnsupportedError as e:
            raise UnsupportedError(f"{p}: {e}") from e
    foreign = sorted(k for k in adapter.extras if not k.startswith(EXTRA_PREFIXES))
    if foreign:
        raise UnsupportedError(
            f"kohya/LyCORIS files hold adapter layers only; this adapter also carries {len(foreign)} other tensor(s) "
            f"(e.g. {foreign[0]}, modules_to_save or saved embeddings): write format='peft' to keep them"
        )
    tensors.update(adapter.extras)
    metadata = {k: v for k, v in adapter.metadata.items()
                if k not in ("lora_adapter_metadata", NAMING_KEY, _names.COMPONENT_KEY)}
    with atomic_output(out_path, overwrite=overwrite, directory=False) as tmp:
        write_safetensors(tensors, tmp, metadata)
    return out_path


__all__ = ["ALLOW_PATTERNS", "COMPONENTS", "NAME", "TENSORS", "bare_target", "build_layer", "check_component", "detect",
           "group_tensors", "layer_tensors", "module_name", "read", "write"]
