"""The original-names layout ComfyUI loads natively: ``diffusion_model.<original module path>.<tensor>``.

One ``.safetensors`` file whose keys are a diffusion model's **original** module paths (BFL's
``double_blocks.0.img_attn.qkv``, Wan's ``blocks.0.self_attn.q``, ...) under ``diffusion_model.``, with LoRA tensors
either PEFT-style (``lora_A.weight`` / ``lora_B.weight``) or kohya-style (``lora_down.weight`` / ``lora_up.weight``)
plus an optional scalar ``alpha`` (without one the scale is 1: ComfyUI's and diffusers' rule), LyCORIS tensors
(``hada_*``, ``lokr_*``, ``diff``), ``dora_scale`` and ``diff_b`` (a bias change; on a LoRA layer it is read as the
LoRA bias). This is what ComfyUI's ``model_lora_keys_unet`` maps for every weight key of the model, what Wan, LTX,
HiDream, Qwen-Image and Flux.2 trainers (ai-toolkit, musubi's converter, DiffSynth) publish, and what diffusers'
``_convert_non_diffusers_*`` converters read.

Paths are kept in the original namespace under adaptkit's ``unet`` component; writing it from diffusers names maps
them first (:mod:`adaptkit.formats.arch.remap`, packed projections stacked as block LoRAs). Written: LoRA tensors as
``lora_A.weight`` / ``lora_B.weight`` with the scale baked into ``lora_B`` and no ``alpha`` key (what ai-toolkit
writes; diffusers' Wan, Lumina2 and Flux.2 readers refuse alphas on some or all modules, and without one every reader
takes scale 1: the same ΔW), LoRA biases as ``diff_b``, other kinds with the LyCORIS names (and their alphas).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from ..core.adapter import Adapter
from ..core.blocks import unit_scale
from ..errors import FormatError, UnsupportedError
from ..io.outputs import atomic_output
from ..io.safetensors import (
    read_safetensors,
    write_safetensors,
)
from . import kohya
from .arch import ARCHS, ORIGINAL
from .base import KindSupport, Selection, detect_file, single_file
from .kohya_layers import BUILDERS, DIFF_B, LIMITS, TENSORS, build_layer, layer_tensors

NAME = "comfyui"
LABEL = "ComfyUI (original names)"
ALLOW_PATTERNS = ["*.safetensors"]
LOOKED_FOR = "one .safetensors file with diffusion_model.* keys"
WRITE_OPTIONS: tuple[str, ...] = ()
PREFIX = "diffusion_model."
#: tensor names after the module path; PEFT-style LoRA names read as kohya's (IA3's bare ``weight`` is not one:
#: a ``diffusion_model.<path>.weight`` key is a model weight, not an adapter tensor)
PARTS: dict[str, str] = {
    **{t: t for t in TENSORS if t not in ("weight", "on_input")},
    "lora_A.weight": "lora_down.weight",
    "lora_B.weight": "lora_up.weight",
    "lora.down.weight": "lora_down.weight",
    "lora.up.weight": "lora_up.weight",
}
_BY_LENGTH = sorted(PARTS, key=len, reverse=True)
#: kohya kinds this layout does not hold (IA3's bare ``weight`` tensor would read as a model weight)
_NOT_HELD = frozenset({"ia3"})
#: kinds written with scale 1 and no ``alpha`` key (the scale baked into the up factor)
_SCALE_ONE = {"lora": unit_scale}
#: kind -> why one layer of it may not fit (``None``: every layer fits); LoRA biases fit, as ``diff_b``
_LIMITS = {k: (DIFF_B[k][0] if k in DIFF_B else v) for k, v in LIMITS.items() if k not in _NOT_HELD}


def _split(key: str) -> tuple[str, str] | None:
    """``(module path, kohya tensor name)`` of a ``diffusion_model.`` key, else ``None``."""
    if not key.startswith(PREFIX):
        return None
    rest = key[len(PREFIX):]
    for part in _BY_LENGTH:
        if rest.endswith("." + part):
            return rest[: -len(part) - 1], PARTS[part]
    return None


def detect_keys(keys: Collection[str]) -> bool:
    """True when every tensor name is ``diffusion_model.<path>.<adapter tensor>``."""
    keys = [k for k in keys if k != "__metadata__"]
    return bool(keys) and all(_split(k) is not None for k in keys)


def detect(path: Path) -> bool:
    """True for a ``.safetensors`` file (or a directory holding just one) in this layout."""
    return detect_file(path, detect_keys)


def is_adapter_file(name: str) -> bool:
    """A ``.safetensors`` that is not a model's weights."""
    return kohya.is_adapter_file(name)


def select_files(listing: Sequence[str], named: str | None = None) -> Selection | None:
    """The one candidate file of a folder listing (as kohya's)."""
    return kohya.select_files(listing, named)


def read(path: Path, *, source: str | None = None, **_: Any) -> Adapter:
    """Read a ``diffusion_model.`` file.

    Raises:
        FormatError: keys of another layout, incomplete or contradictory layers.
    """
    path = single_file(path, strict=True) or Path(path)
    tensors, metadata = read_safetensors(path)
    return read_tensors(tensors, metadata, source=source or str(path), file_name=path.name)


def read_tensors(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None,
                 config: Mapping[str, Any] | None = None, *, source: str | None = None,
                 file_name: str = "the tensors", **_: Any) -> Adapter:
    """An adapter from ``diffusion_model.<path>.<tensor>`` tensors: paths ``unet.<original path>``.

    Raises:
        FormatError: a key of another layout (named), or a layer whose tensors do not make one kind.
    """
    groups: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)
    foreign = []
    for key, t in tensors.items():
        split = _split(key)
        if split is None:
            foreign.append(key)
            continue
        module, part = split
        if part in groups[module]:
            raise FormatError(f"{file_name}: {module} has two tensors for {part} (lora_A and lora_down?); keep one")
        groups[module][part] = t
    if foreign:
        raise FormatError(f"{file_name} mixes diffusion_model.* adapter keys with others, e.g. '{foreign[0]}' "
                          f"({len(foreign)} such keys); is it a full model checkpoint or another layout? pass format=...")
    if not groups:
        raise FormatError(f"{file_name} holds no diffusion_model.* adapter tensors")
    layers = {}
    for module, parts in groups.items():
        bias = parts.pop("diff_b", None) if "lora_down.weight" in parts else None
        try:
            layer = build_layer(parts)
        except FormatError as e:
            raise FormatError(f"{PREFIX}{module}: {e}") from e
        if bias is not None:
            layer = DIFF_B[layer.kind][1](layer, bias)
        layers[f"{ORIGINAL}.{module}"] = layer
    return Adapter(layers=dict(sorted(layers.items())), metadata=dict(metadata or {}), config={"layout": NAME},
                   format=NAME, source=source)


def can_store(layer: Any, module: str) -> str | None:
    """Why this layout cannot store a layer (the kinds of LyCORIS files, LoRA biases as ``diff_b``), or ``None``."""
    if layer.kind not in _LIMITS:
        return f"{LABEL} files have no {layer.kind} layers"
    limit = _LIMITS[layer.kind]
    return limit(layer) if limit is not None else None


def kind_support() -> dict[str, KindSupport]:
    """The kinds this layout holds: those of kohya/LyCORIS files (``diff_b`` carries a LoRA bias too)."""
    read = {kind for kind, _ in BUILDERS.values()} - _NOT_HELD
    return {kind: KindSupport(read=kind in read, write=kind in _LIMITS, limited=_LIMITS.get(kind) is not None)
            for kind in sorted(read | set(_LIMITS))}


def can_name(module: str) -> str | None:
    """Only a diffusion model's original names (``unet.<path>`` after mapping) are written."""
    if not module.startswith(ORIGINAL + "."):
        return (f"{LABEL} files hold the diffusion model only, in its original names; write the text encoder's "
                "layers as kohya (lora_te_...), which ComfyUI loads too")
    rel = module.partition(".")[2]
    if not any(arch.to_diffusers(rel) is not None for arch in ARCHS.values()):
        return (f"{rel} is no diffusion transformer module in original names (an SD 1.x / SDXL UNet's diffusers "
                "name?), which ComfyUI would not map; write kohya for UNet LoRAs")
    return None


def can_store_adapter(adapter: Adapter, **_: Any) -> dict[str, str]:
    """Extra tensors (``modules_to_save``, embeddings) have no place in this layout."""
    return {k: f"an extra tensor, and {LABEL} files hold adapter layers only" for k in sorted(adapter.extras)}


def check_options(**_: Any) -> None:
    """This layout has no writer options."""


def namespace(**_: Any) -> str:
    """Diffusion-transformer layers are written in their original names."""
    return "original"


def write(adapter: Adapter, path: str | Path, *, overwrite: bool = False, **_: Any) -> Path:
    """Write ``diffusion_model.<original path>.<tensor>`` keys to one ``.safetensors`` file.

    Args:
        adapter: layers whose paths are ``unet.<original path>`` (:func:`adaptkit.formats.save` maps diffusers names
            first).
        path: output file (``.safetensors``), or a directory to write ``adapter.safetensors`` into.
        overwrite: replace an existing file.

    Raises:
        UnsupportedError: the adapter has no layers.
    """
    if not adapter.layers:
        raise UnsupportedError("the adapter has no layers; there is nothing to write")
    out_path = Path(path)
    if out_path.suffix != ".safetensors":
        out_path = out_path / "adapter.safetensors" if out_path.is_dir() else out_path.with_suffix(".safetensors")
    tensors: dict[str, torch.Tensor] = {}
    for p, layer in adapter.layers.items():
        module = PREFIX + p.partition(".")[2]
        bake = _SCALE_ONE.get(layer.kind)
        if bake is not None:  # LoRA: the scale in lora_B, no alpha key (diffusers' Wan/Lumina2/Flux.2 readers refuse
            layer = bake(layer, p)  # alphas where ComfyUI takes them; without one every reader takes scale 1)
        split = DIFF_B.get(layer.kind)
        if split is not None:
            layer, diff_b = split[2](layer)
            if diff_b is not None:
                tensors[f"{module}.diff_b"] = diff_b
        for tname, t in layer_tensors(layer).items():
            if bake is not None and tname == "alpha":
                continue
            name = {"lora_down.weight": "lora_A.weight", "lora_up.weight": "lora_B.weight"}.get(tname, tname)
            tensors[f"{module}.{name}"] = t
    metadata = {k: v for k, v in adapter.metadata.items() if k not in ("lora_adapter_metadata", kohya.NAMING_KEY)}
    with atomic_output(out_path, overwrite=overwrite, directory=False) as tmp:
        write_safetensors(tensors, tmp, metadata)
    return out_path


__all__ = ["ALLOW_PATTERNS", "LABEL", "LOOKED_FOR", "NAME", "PREFIX", "WRITE_OPTIONS", "can_name", "can_store",
           "can_store_adapter", "check_options", "detect", "detect_keys", "is_adapter_file", "kind_support",
           "namespace", "read", "read_tensors", "select_files", "write"]
