"""ostris ai-toolkit's Flux LoRA files: one ``.safetensors`` with diffusers/PEFT keys and no alphas.

ai-toolkit saves Flux.1 (and Chroma, SD3) LoRAs as ``transformer.<diffusers path>.lora_A.weight`` /
``lora_B.weight`` in a single file, with its own ``__metadata__`` (``software``, ``training_info``) and no
``lora_adapter_metadata``, so loaders take alpha = rank (scale 1). Such files are *read* as the diffusers layout (the
keys are the same; :mod:`adaptkit.formats.diffusers` reads a single file and takes alpha = rank without the metadata),
so this format never claims a file in detection; it *writes* that file: diffusers names (original names are mapped,
Flux's ``qkv``/``linear1`` split exactly), each layer's scale baked into ``lora_B``, ``lora_B.bias`` where a LoRA has a
bias. For Wan, Qwen-Image, HiDream and Flux.2, ai-toolkit writes ComfyUI's ``diffusion_model.`` layout: write
``--to comfyui`` for those.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Any

import torch

from ..core.adapter import Adapter
from ..core.kinds.base import layer_dtype
from ..errors import FormatError, UnsupportedError
from ..io.outputs import atomic_output
from ..io.safetensors import write_safetensors
from . import diffusers as _diffusers
from .arch import DIFFUSERS
from .base import KindSupport, Selection

NAME = "ai-toolkit"
LABEL = "ai-toolkit"
ALLOW_PATTERNS = ["*.safetensors"]
LOOKED_FOR = "(read as diffusers)"
WRITE_OPTIONS: tuple[str, ...] = ()


def detect_keys(keys: Collection[str]) -> bool:
    """Never: ai-toolkit files are diffusers-layout files, which :mod:`adaptkit.formats.diffusers` detects."""
    return False


def detect(path: Path) -> bool:
    """Never (see :func:`detect_keys`)."""
    return False


def is_adapter_file(name: str) -> bool:
    """Never: hub selection finds these files as diffusers ones."""
    return False


def select_files(listing: Sequence[str], named: str | None = None) -> Selection | None:
    """Nothing: hub selection finds these files as diffusers ones."""
    return None


def read(path: Path, **options: Any) -> Adapter:
    """Read as the diffusers layout (the keys are the same)."""
    return _diffusers.read(path, **options)


def read_tensors(*args: Any, **kwargs: Any) -> Adapter:
    """Read as the diffusers layout."""
    return _diffusers.read_tensors(*args, **kwargs)


#: the kinds written
KINDS_STORED = frozenset({"lora"})


def can_store(layer: Any, module: str) -> str | None:
    """Plain linear or conv LoRA layers (no DoRA, no Tucker core)."""
    if layer.kind not in KINDS_STORED:
        return f"{LABEL} files have no {layer.kind} layers"
    if not layer.keeps_as_lora(None) or layer.dora or layer.module_type == "embedding":
        return f"{LABEL} files hold plain LoRA layers only (convert --kind lora, or fold DoRA first)"
    return None


def kind_support() -> dict[str, KindSupport]:
    """Written: LoRA (read: as diffusers)."""
    return {"lora": KindSupport(read=True, write=True, limited=True)}


def can_name(module: str) -> str | None:
    """Only a diffusion transformer's layers (``transformer.<path>``) are written."""
    if not module.startswith(DIFFUSERS + "."):
        return f"{LABEL} files hold a diffusion transformer's layers (transformer.<path>); write diffusers or kohya"
    return None


def can_store_adapter(adapter: Adapter, **_: Any) -> dict[str, str]:
    """Extra tensors have no place in this layout."""
    return {k: f"an extra tensor, and {LABEL} LoRA files hold adapter layers only" for k in sorted(adapter.extras)}


def check_options(**_: Any) -> None:
    """This layout has no writer options."""


def namespace(**_: Any) -> str:
    """Written in diffusers' names."""
    return "diffusers"


def write(adapter: Adapter, path: str | Path, *, overwrite: bool = False, **_: Any) -> Path:
    """Write ``transformer.<path>.lora_A.weight`` / ``lora_B.weight`` (scale baked into ``lora_B``) to one file.

    Raises:
        UnsupportedError: the adapter has no layers. FormatError: the output is not a ``.safetensors`` path.
    """
    if not adapter.layers:
        raise UnsupportedError("the adapter has no layers; there is nothing to write")
    out_path = Path(path)
    if out_path.suffix != ".safetensors":
        if out_path.is_dir():
            out_path = out_path / "lora.safetensors"
        else:
            raise FormatError(f"{path}: ai-toolkit writes one .safetensors file; name the output *.safetensors")
    tensors: dict[str, torch.Tensor] = {}
    for p, layer in adapter.layers.items():
        u, v = layer.factors()
        dtype = layer_dtype(layer)
        shape = tuple(layer.shape)
        tensors[f"{p}.lora_A.weight"] = v.reshape(v.shape[0], *shape[1:]).to(dtype).contiguous()
        tensors[f"{p}.lora_B.weight"] = u.reshape(shape[0], u.shape[1], *[1] * (len(shape) - 2)).to(dtype).contiguous()
        bias = layer.delta_bias()
        if bias is not None:
            tensors[f"{p}.lora_B.bias"] = bias.to(dtype).contiguous()
    metadata = {k: v for k, v in adapter.metadata.items() if k != _diffusers.METADATA_KEY}
    metadata.update({"format": "pt", "software": '{"name": "adaptkit"}'})
    with atomic_output(out_path, overwrite=overwrite, directory=False) as tmp:
        write_safetensors(tensors, tmp, metadata)
    return out_path


__all__ = ["ALLOW_PATTERNS", "LABEL", "LOOKED_FOR", "NAME", "WRITE_OPTIONS", "can_name", "can_store",
           "can_store_adapter", "check_options", "detect", "detect_keys", "is_adapter_file", "kind_support",
           "namespace", "read", "read_tensors", "select_files", "write"]
