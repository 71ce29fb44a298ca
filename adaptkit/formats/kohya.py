"""kohya / LyCORIS single-file format: one ``.safetensors`` with flattened module names.

Keys are ``<prefix><flattened module path>.<tensor>`` with the prefixes of
:data:`adaptkit.formats.names.PREFIXES` (``lora_unet_``, ``lora_te_``, ``lora_te1_``/``2``/``3``,
``lora_transformer_``, ``lycoris_``) and the per-module tensors of
:data:`adaptkit.formats.kohya_layers.TENSORS` (which builds the layers and writes them back): LoRA/LoCon
``lora_down``/``lora_up``/``lora_mid`` (``.weight``) + ``alpha``; LoHa ``hada_*``; LoKr ``lokr_*``; DoRA
``dora_scale`` (per output ``(out, 1, ...)`` or per input ``(1, in, ...)``); IA3 ``weight`` + ``on_input``
(stored as ``l - 1``); full ``diff``/``diff_b``; norms ``w_norm``/``b_norm``. A missing ``alpha`` means
alpha = rank; a LoKr whose factors are both full has scale 1. ``ss_*`` / ``modelspec.*`` metadata is kept;
reading adds an ``adaptkit.kohya_naming`` entry (how the file named its modules) that other formats carry
along, so that writing kohya again after a trip through PEFT or diffusers gives the same names.

Flattened names are resolved to module paths with :mod:`adaptkit.converters.names`; the canonical path is
``<component>.<module path>`` (``unet.down_blocks.0...``) or the bare path for ``lycoris_`` files. LyCORIS diag-OFT/BOFT (``oft_blocks``, ``rescale``) and GLoRA (``a1.weight`` ...) layers are read
and written too; an OFT layer's input features are not in the file, so its shape comes from the base (``base=``, or a
shipped inventory) and stays ``None`` without one (fuse fits it to the base tensor). Writing puts
bare paths (an adapter made on a UNet alone) under a component, given as ``component=`` or recognised from the
paths (:func:`adaptkit.converters.names.bare_component`), so that kohya tools see ``lora_unet_`` names.
"""

from __future__ import annotations

import dataclasses
import json
from collections import defaultdict
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from ..core.adapter import Adapter
from ..core.coverage import LayerCoverage, all_matched, layer_energy, stamp
from ..core.kinds import IA3, tensor_fields
from ..errors import ConfigError, FormatError, ShapeMismatchError, UnsupportedError
from ..io.outputs import atomic_output
from ..io.safetensors import (
    read_safetensors,
    read_safetensors_header,
    write_safetensors,
)
from . import names as _names
from .base import (
    AmbiguousSelection,
    KindSupport,
    Selection,
    check_choice,
    is_model_weights,
)
from .kohya_layers import BUILDERS, LIMITS, TENSORS, build_layer, layer_tensors

NAME = "kohya"
LABEL = "kohya"
ALLOW_PATTERNS = ["*.safetensors"]
#: what a folder holds when it is a kohya adapter, for messages
LOOKED_FOR = "one kohya/LyCORIS .safetensors file"
#: the writer options kohya output has
WRITE_OPTIONS = ("naming", "component")

#: metadata entry other formats write so that a kohya file converted there and back keeps its names
NAMING_KEY = "adaptkit.kohya_naming"
#: ``naming=`` values of the writer
NAMINGS = ("original", "ldm", "diffusers")
#: keys that are not adapter layers but belong in kohya files (pivotal-tuning embeddings), carried through
EXTRA_PREFIXES = ("bundle_emb.", "emb_params")


# --------------------------------------------------------------------------------------------- detect


def _module_name(key: str) -> tuple[str, str]:
    module, _, tensor = key.partition(".")
    return module, tensor


def detect_keys(keys: Collection[str]) -> bool:
    """True when every tensor name but the carried extras (pivotal-tuning embeddings) has a kohya/LyCORIS prefix."""
    keys = [k for k in keys if k != "__metadata__" and not k.startswith(EXTRA_PREFIXES)]
    return bool(keys) and all(_names.split_prefix(k) is not None for k in keys)


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
    return detect_keys(header)


def is_adapter_file(name: str) -> bool:
    """Whether a file name may be a kohya/LyCORIS adapter: a ``.safetensors`` that is not a model's weights."""
    return name.endswith(".safetensors") and not is_model_weights(name)


def select_files(listing: Sequence[str], named: str | None = None) -> Selection | None:
    """The one kohya/LyCORIS candidate file of a folder listing (``.safetensors`` other than model weights).

    Raises:
        AmbiguousSelection: several candidates (the hub selection names them and says how to pick one).
    """
    if named is not None:
        return None
    candidates = [n for n in listing if is_adapter_file(n)]
    if len(candidates) > 1:
        raise AmbiguousSelection(candidates)
    return Selection((candidates[0],), candidates[0]) if candidates else None


# ----------------------------------------------------------------------------------------------- read


def read(path: Path, *, source: str | None = None, base: Any = None, drop: Iterable[str] | str | None = None,
         **_: Any) -> Adapter:
    """Read a kohya/LyCORIS ``.safetensors`` file.

    Args:
        path: the file.
        source: provenance string to record.
        base: base model used to resolve flattened names (hub id, directory, ``nn.Module``); without it
            the shipped inventories (SD 1.x, SDXL, SD3, Flux) are tried.
        drop: with ``base``: names that may resolve to nothing (see :func:`read_tensors`).

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
    return read_tensors(tensors, metadata, source=source or str(path), base=base, file_name=path.name, drop=drop)


def read_tensors(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None,
                 config: Mapping[str, Any] | None = None, *, source: str | None = None, base: Any = None,
                 file_name: str = "the tensors", drop: Iterable[str] | str | None = None, **_: Any) -> Adapter:
    """A kohya/LyCORIS adapter from its tensors (``lora_unet_...lora_down.weight``) and header metadata.

    Args:
        tensors: tensor name -> tensor, as the file holds them.
        metadata: the file's header metadata (``ss_*``, ``modelspec.*``).
        config: unused (kohya files have none).
        source: provenance string to record.
        base: as :func:`read`.
        file_name: the file's name, for messages.
        drop: with ``base``: globs on kohya names (``lora_te1_*``) or statuses (``status:unmatched``) naming the
            names that may fail to resolve; they are left out and the adapter's metadata holds the coverage
            certificate (``adaptkit.coverage``). Globs naming nothing here are allowed (``load`` checks them).

    Raises:
        FormatError / ShapeMismatchError / ConfigError: as :func:`read`. CoverageError: (``drop`` given) names
            that do not resolve and are not named by ``drop``.
    """
    tensors = dict(tensors)
    metadata = dict(metadata or {})
    groups, extras = group_tensors(tensors, file_name)
    layers: dict[tuple[str, str], Any] = {}
    for name, parts in groups.items():
        try:
            layers[name] = build_layer(parts)
        except (ShapeMismatchError, FormatError) as e:
            raise type(e)(f"{_names.WRITE_PREFIXES.get(name[0], '')}{name[1]}: {e}") from e
    if not layers:
        raise FormatError(f"{file_name} contains no kohya/LyCORIS adapter tensors; is it an adapter checkpoint?")
    shapes = {k: tuple(l.shape) for k, l in layers.items() if l.shape is not None}
    partial = drop is not None and base is not None
    resolution = _names.resolve_names(layers, base=base, shapes=shapes, partial=partial)
    unresolved = [LayerCoverage(_names.WRITE_PREFIXES.get(c, "lycoris_") + f, None, status, layer_energy(layers[(c, f)]),
                                len(tensor_fields(layers[(c, f)])), reason)
                  for (c, f), (status, reason) in sorted(resolution.unresolved.items())]
    out: dict[str, Any] = {}
    naming: dict[str, str] = {}
    for (comp, flat), layer in layers.items():
        if (comp, flat) in resolution.unresolved:
            continue
        mod_path, alias = resolution.paths[(comp, flat)]
        naming[comp] = _alias_rule(mod_path, alias) if alias is not None else naming.get(comp, "direct")
        inv = resolution.inventory
        inv_comp = comp if comp in inv.modules else next(iter(inv.modules))
        shape = inv.shape(inv_comp, mod_path)
        try:
            layer = layer.fit(tuple(shape)) if shape else layer  # the base's shape where the tensors leave it open
        except ShapeMismatchError as e:
            raise ShapeMismatchError(f"{_names.WRITE_PREFIXES.get(comp, '')}{flat} ({mod_path}): {e}") from e
        adjust = READ_ADJUST.get(layer.kind)
        if adjust is not None:
            layer = adjust(layer, inv.has_bias(inv_comp, mod_path))
        out[f"{comp}.{mod_path}" if comp else mod_path] = layer
    prefixes = sorted({_prefix_of(k) for k in tensors if _names.split_prefix(k)})
    cfg = {"kohya_prefixes": prefixes, "kohya_naming": naming, "inventory": resolution.inventory.name}
    # recorded in the metadata too, so that a trip through PEFT, diffusers or ak.convert writes the same names back
    metadata = {**metadata, NAMING_KEY: json.dumps({**naming, "inventory": resolution.inventory.name}, sort_keys=True)}
    adapter = Adapter(layers=dict(sorted(out.items())), base_model=_base_model(metadata), metadata=metadata,
                      config=cfg, extras=extras, format=NAME, source=source)
    if not partial:
        return adapter
    cert = all_matched(adapter, operation="load", target=resolution.inventory.name)
    cert = dataclasses.replace(cert, layers=cert.layers + tuple(unresolved)).require(drop, strict=False)
    return stamp(adapter, cert)


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
                "full, norm, diag-OFT, BOFT and GLoRA layers (other LyCORIS algorithms are not supported)"
            )
        _, comp, rest = _names.split_prefix(module)  # type: ignore[misc]
        groups[(comp, rest)][tensor] = t
    if foreign:
        kind = "mixes kohya keys with keys of another scheme" if groups else "uses an unknown key scheme"
        raise FormatError(f"{fname} {kind}, e.g. '{foreign[0]}' ({len(foreign)} such keys); convert it with the tool that made it")
    return dict(groups), extras


# ------------------------------------------------------------------------------------ what kohya stores


def _ia3_read(layer: IA3, has_bias: bool | None) -> IA3:
    """LyCORIS IA3 on outputs scales ``W`` only, never the module bias (PEFT's IA3 scales both)."""
    if not layer.on_input and has_bias is not False:
        return dataclasses.replace(layer, scale_bias=False)
    return layer


#: kind name -> what kohya's reader settles once the base module is known (bias present or not)
READ_ADJUST: dict[str, Callable[[Any, bool | None], Any]] = {"ia3": _ia3_read}


def can_store(layer: Any, module: str) -> str | None:
    """Why kohya cannot store this layer (a kind it has no tensors for, Conv1D, LoRA bias, embedding LoRA), or ``None``."""
    if layer.kind not in LIMITS:
        return f"{NAME} has no {layer.kind} layers"
    limit = LIMITS[layer.kind]
    return limit(layer) if limit is not None else None


def kind_support() -> dict[str, KindSupport]:
    """The kinds kohya/LyCORIS files hold: read as :data:`~adaptkit.formats.kohya_layers.BUILDERS` builds them,
    written as :data:`~adaptkit.formats.kohya_layers.LIMITS` allows (a limit there: some layers refused)."""
    read = {kind for kind, _ in BUILDERS.values()}
    return {kind: KindSupport(read=kind in read, write=kind in LIMITS, limited=LIMITS.get(kind) is not None)
            for kind in sorted(read | set(LIMITS))}


def can_name(module: str) -> str | None:
    """kohya names every module path (``lora_unet_...``, or ``lycoris_...`` outside a pipeline component): ``None``."""
    return None


def can_store_adapter(adapter: Adapter, **_: Any) -> dict[str, str]:
    """The extra tensors kohya cannot carry (anything but pivotal-tuning embeddings): ``{name: reason}``."""
    return {k: "an extra tensor (modules_to_save or a saved embedding), and kohya files hold adapter layers only"
            for k in sorted(adapter.extras) if not k.startswith(EXTRA_PREFIXES)}


def check_options(naming: str | None = None, component: str | None = None, **_: Any) -> None:
    """Refuse bad ``naming=`` / ``component=`` writer options.

    Raises:
        ConfigError: an unknown naming or component.
    """
    _check_naming(naming)
    check_component(component)


def _check_naming(naming: str | None) -> None:
    if naming is not None and naming not in NAMINGS:
        raise ConfigError(f"unknown kohya naming {naming!r}; use 'original' (sd-scripts / musubi-tuner: SDXL "
                          "input_blocks_..., Flux double_blocks_..., Wan blocks_...) or 'diffusers' (down_blocks_..., "
                          "transformer_blocks_...); 'ldm' is 'original'")


def namespace(naming: str | None = None, **_: Any) -> str | None:
    """The namespace diffusion-transformer layers are written in: ``naming="original"`` (or ``"ldm"``) the original
    names sd-scripts and musubi-tuner use, ``"diffusers"`` diffusers' names, by default the adapter's own."""
    return {"original": "original", "ldm": "original", "diffusers": "diffusers"}.get(naming or "")


# ---------------------------------------------------------------------------------------------- write


def _naming(adapter: Adapter, naming: str | None) -> dict[str, str]:
    inventory = str(adapter.config.get("inventory", "sdxl")) if adapter.format == NAME else "sdxl"
    if naming is not None:
        _check_naming(naming)
        return {"unet": "ldm" if naming == "original" else naming, "inventory": inventory}
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
    return check_choice(component, COMPONENTS, "kohya component")


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
        adapter: any adapter of LoRA, LoHa, LoKr, IA3, full, LyCORIS diag-OFT/BOFT and GLoRA layers (kinds may mix).
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
        UnsupportedError: the adapter has no layers (what :func:`can_store` refuses is refused by
            :func:`adaptkit.formats.save` before the writer runs). FormatError: two paths flatten to the same name.
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
        for tname, t in layer_tensors(layer).items():
            tensors[f"{name}.{tname}"] = t
    tensors.update(adapter.extras)
    metadata = {k: v for k, v in adapter.metadata.items()
                if k not in ("lora_adapter_metadata", NAMING_KEY, _names.COMPONENT_KEY)}
    with atomic_output(out_path, overwrite=overwrite, directory=False) as tmp:
        write_safetensors(tensors, tmp, metadata)
    return out_path


__all__ = ["ALLOW_PATTERNS", "COMPONENTS", "LABEL", "LIMITS", "LOOKED_FOR", "NAME", "TENSORS", "WRITE_OPTIONS", "bare_target",
           "build_layer", "can_name", "can_store", "can_store_adapter", "check_component", "check_options", "detect", "detect_keys",
           "group_tensors", "is_adapter_file", "kind_support", "layer_tensors", "module_name", "namespace", "read", "read_tensors", "select_files",
           "write"]
