"""XLabs-AI's Flux LoRA layout: attention-processor LoRAs on BFL's packed projections.

Keys (``x-flux`` ``train_flux_lora_deepspeed.py``, read by diffusers' ``_convert_xlabs_flux_lora_to_diffusers`` and by
ComfyUI), with or without a ``diffusion_model.`` prefix:

* ``double_blocks.{i}.processor.qkv_lora1.{down,up}.weight`` -> ``double_blocks.{i}.img_attn.qkv`` (packed q/k/v),
  ``proj_lora1`` -> ``img_attn.proj``, ``qkv_lora2`` / ``proj_lora2`` -> the ``txt_attn`` ones;
* ``single_blocks.{i}.processor.qkv_lora.{down,up}.weight`` -> the q/k/v rows of ``single_blocks.{i}.linear1``
  (the MLP rows are unchanged; Flux.1's MLP is 4x the hidden size).

The processors compute ``up(down(x))`` with no alpha, so the scale is 1: reading gives alpha = rank, writing bakes each
layer's scale into ``up``. Nothing else of the model has an XLabs name: other layers are refused (``--drop`` leaves
them out), and so is a ``linear1`` layer that changes the MLP rows. Single-block ``proj_lora`` tensors (whose input
is the attention output alone, not ``linear2``'s) are refused on reading.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from ..core.adapter import Adapter
from ..core.kinds import LoRA
from ..core.kinds.base import check_factors, layer_dtype
from ..errors import FormatError, ShapeMismatchError, UnsupportedError
from ..io.outputs import atomic_output
from ..io.safetensors import (
    read_safetensors,
    read_safetensors_header,
    write_safetensors,
)
from . import kohya
from .arch import ORIGINAL
from .base import KindSupport, Selection

NAME = "xlabs"
LABEL = "XLabs (Flux)"
ALLOW_PATTERNS = ["*.safetensors"]
LOOKED_FOR = "one .safetensors file with double_blocks.N.processor.*_lora* keys"
WRITE_OPTIONS: tuple[str, ...] = ()
#: Flux.1's MLP hidden size over its model width
MLP_RATIO = 4
_KEY = re.compile(r"^(?:diffusion_model\.)?(?P<block>double_blocks|single_blocks)\.(?P<i>\d+)\.processor\."
                  r"(?P<proc>qkv_lora1|qkv_lora2|proj_lora1|proj_lora2|qkv_lora|proj_lora)\.(?P<part>down|up)\.weight$")
#: (block kind, processor) -> original module (under the block)
_MODULES = {("double_blocks", "qkv_lora1"): "img_attn.qkv", ("double_blocks", "proj_lora1"): "img_attn.proj",
            ("double_blocks", "qkv_lora2"): "txt_attn.qkv", ("double_blocks", "proj_lora2"): "txt_attn.proj",
            ("single_blocks", "qkv_lora"): "linear1"}
_PROCESSORS = {f"{b}.{m}": p for (b, p), m in _MODULES.items()}
_PATH = re.compile(r"^(double_blocks|single_blocks)\.(\d+)\.(.+)$")


def detect_keys(keys: Collection[str]) -> bool:
    """True when every tensor name is an XLabs processor LoRA tensor."""
    keys = [k for k in keys if k != "__metadata__"]
    return bool(keys) and all(_KEY.match(k) for k in keys)


def detect(path: Path) -> bool:
    """True for a ``.safetensors`` file (or a directory holding just one) in this layout."""
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
    """A ``.safetensors`` that is not a model's weights."""
    return kohya.is_adapter_file(name)


def select_files(listing: Sequence[str], named: str | None = None) -> Selection | None:
    """The one candidate file of a folder listing (as kohya's)."""
    return kohya.select_files(listing, named)


def read(path: Path, *, source: str | None = None, **_: Any) -> Adapter:
    """Read an XLabs Flux LoRA file (see the module docstring).

    Raises:
        FormatError: keys of another layout, a single-block ``proj_lora``, or a half layer.
    """
    path = Path(path)
    if path.is_dir():
        files = sorted(path.glob("*.safetensors"))
        if len(files) != 1:
            raise FormatError(f"{path} holds {len(files)} .safetensors files; pass the adapter file itself")
        path = files[0]
    tensors, metadata = read_safetensors(path)
    return read_tensors(tensors, metadata, source=source or str(path), file_name=path.name)


def read_tensors(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None,
                 config: Mapping[str, Any] | None = None, *, source: str | None = None,
                 file_name: str = "the tensors", **_: Any) -> Adapter:
    """An adapter in BFL's original names (``unet.double_blocks.0.img_attn.qkv`` ...) from XLabs tensors.

    Raises:
        FormatError: as :func:`read`.
    """
    groups: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)
    for key, t in tensors.items():
        m = _KEY.match(key)
        if m is None:
            raise FormatError(f"{file_name}: '{key}' is not an XLabs processor LoRA key; pass format=... for another "
                              "layout")
        module = _MODULES.get((m["block"], m["proc"]))
        if module is None:
            raise FormatError(f"{file_name}: '{key}': a single-block proj_lora acts on the attention output alone, "
                              "which no module of the Flux model computes; adaptkit does not read it (drop those keys)")
        groups[f"{m['block']}.{m['i']}.{module}"][m["part"]] = t
    layers = {}
    for path, parts in groups.items():
        if set(parts) != {"down", "up"}:
            raise FormatError(f"{file_name}: {path} has only its {'/'.join(parts)} tensor; an XLabs LoRA needs both")
        down, up = parts["down"], parts["up"]
        check_factors(parts, {"down": f"{path} down.weight", "up": f"{path} up.weight"})
        if down.ndim != 2 or up.ndim != 2 or down.shape[0] != up.shape[1]:
            raise ShapeMismatchError(f"{file_name}: {path} has down {tuple(down.shape)} and up {tuple(up.shape)}; "
                                     "their ranks disagree (a corrupt file?)")
        rows = int(up.shape[0])
        if path.endswith(".linear1"):  # q/k/v rows only: the MLP rows follow, unchanged
            width = int(down.shape[1])
            up = torch.cat([up, up.new_zeros(MLP_RATIO * width, up.shape[1])])
            rows = int(up.shape[0])
        layers[f"{ORIGINAL}.{path}"] = LoRA(down=down, up=up, alpha=float(down.shape[0]),
                                            shape=(rows, int(down.shape[1])))
    if not layers:
        raise FormatError(f"{file_name} holds no XLabs LoRA tensors")
    return Adapter(layers=dict(sorted(layers.items())), metadata=dict(metadata or {}),
                   config={"layout": NAME, "inventory": "flux"}, format=NAME, source=source)


#: the kinds written
KINDS_STORED = frozenset({"lora"})


def can_store(layer: Any, module: str) -> str | None:
    """XLabs holds plain linear LoRA layers (no DoRA, bias, Tucker core) on the attention projections."""
    if layer.kind not in KINDS_STORED:
        return f"{LABEL} files have no {layer.kind} layers"
    if not layer.keeps_as_lora(None) or layer.dora or layer.module_type != "linear" or layer.fan_in_fan_out:
        return f"{LABEL} files hold plain linear LoRA layers only (convert --kind lora, or --lossy dora)"
    if layer.delta_bias() is not None:
        return f"{LABEL} files have no LoRA bias"
    if module.endswith(".linear1"):
        u, _ = layer.factors()
        width = int(layer.shape[1])
        if u.shape[0] != (3 + MLP_RATIO) * width or bool(u[3 * width:].any()):
            return f"{LABEL} holds only the q/k/v rows of a single block's linear1; this layer changes its MLP rows"
    return None


def kind_support() -> dict[str, KindSupport]:
    """LoRA only."""
    return {"lora": KindSupport(read=True, write=True, limited=True)}


def can_name(module: str) -> str | None:
    """Only Flux's attention projections have XLabs names."""
    m = _PATH.match(module.partition(".")[2]) if module.startswith(ORIGINAL + ".") else None
    if m is None or f"{m.group(1)}.{m.group(3)}" not in _PROCESSORS:
        return (f"{LABEL} files name only Flux's attention projections (img/txt_attn.qkv and .proj, single blocks' "
                "q/k/v); write another layout, or pass --drop for the others")
    return None


def can_store_adapter(adapter: Adapter, **_: Any) -> dict[str, str]:
    """Extra tensors have no place in this layout."""
    return {k: f"an extra tensor, and {LABEL} files hold attention LoRAs only" for k in sorted(adapter.extras)}


def check_options(**_: Any) -> None:
    """This layout has no writer options."""


def namespace(**_: Any) -> str:
    """Written from BFL's original names."""
    return "original"


def write(adapter: Adapter, path: str | Path, *, overwrite: bool = False, **_: Any) -> Path:
    """Write ``double_blocks.N.processor.qkv_lora1.down.weight``-style keys to one ``.safetensors`` file.

    Each layer's scale is baked into ``up`` (the processors have none).

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
        block, i, module = _PATH.match(p.partition(".")[2]).groups()  # type: ignore[union-attr]
        key = f"{block}.{i}.processor.{_PROCESSORS[f'{block}.{module}']}"
        u, v = layer.factors()
        if module == "linear1":
            u = u[: 3 * int(layer.shape[1])]
        dtype = layer_dtype(layer)
        tensors[f"{key}.down.weight"] = v.to(dtype).contiguous()
        tensors[f"{key}.up.weight"] = u.to(dtype).contiguous()
    metadata = {k: v for k, v in adapter.metadata.items() if k not in ("lora_adapter_metadata", kohya.NAMING_KEY)}
    with atomic_output(out_path, overwrite=overwrite, directory=False) as tmp:
        write_safetensors(tensors, tmp, metadata)
    return out_path


__all__ = ["ALLOW_PATTERNS", "LABEL", "LOOKED_FOR", "MLP_RATIO", "NAME", "WRITE_OPTIONS", "can_name", "can_store",
           "can_store_adapter", "check_options", "detect", "detect_keys", "is_adapter_file", "kind_support",
           "namespace", "read", "read_tensors", "select_files", "write"]
