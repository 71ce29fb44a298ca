"""diffusers LoRA format: ``pytorch_lora_weights.safetensors`` as ``pipe.save_lora_weights`` writes it.

Current layout (read and written): PEFT-style keys with a pipeline-component prefix,
``unet.<path>.lora_A.weight`` / ``lora_B.weight`` (also ``transformer.``, ``text_encoder.``,
``text_encoder_2.``, ``text_encoder_3.``), optional ``lora_magnitude_vector`` (DoRA), and the per-component
``LoraConfig`` (``r``, ``lora_alpha``, ``rank_pattern``, ``alpha_pattern`` ...) packed as
``{"unet.lora_alpha": ...}`` JSON in the ``lora_adapter_metadata`` header entry. Without that entry
alphas come from ``<module>.alpha`` keys, else alpha = rank (diffusers' scale 1).

Older layouts (read only): attention processors (``...attn1.processor.to_q_lora.down.weight``, with or
without the ``unet.`` prefix), ``LoRACompatibleLinear`` (``<module>.lora.down.weight``) and the text
encoder's ``lora_linear_layer`` (``<module>.lora_linear_layer.up.weight``).
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections import defaultdict
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from ..core.adapter import Adapter
from ..core.kinds import LoRA
from ..core.kinds.base import check_factors
from ..errors import FormatError, ShapeMismatchError, UnsupportedError
from ..io.outputs import atomic_output
from ..io.safetensors import read_safetensors_header, read_weights, write_safetensors
from . import peft as _peft
from .base import KindSupport, Selection
from .names import bare_component
from .patterns import ConfigPatterns
from .peft_layers import dora_limit, write_lora

NAME = "diffusers"
LABEL = "diffusers"
WEIGHT_NAME = "pytorch_lora_weights.safetensors"
LEGACY_WEIGHT_NAME = "pytorch_lora_weights.bin"
ALLOW_PATTERNS = [WEIGHT_NAME, LEGACY_WEIGHT_NAME]
#: what a folder holds when it is a diffusers adapter, for messages
LOOKED_FOR = WEIGHT_NAME
#: the writer options diffusers output has (a diffusers file holds every pipeline component)
WRITE_OPTIONS: tuple[str, ...] = ()
METADATA_KEY = "lora_adapter_metadata"
#: first path parts of a diffusers UNet2DConditionModel's modules
UNET_ROOTS = ("conv_in", "time_embedding", "add_embedding", "class_embedding", "encoder_hid_proj", "down_blocks.",
              "mid_block.", "up_blocks.", "conv_norm_out", "conv_out", "time_proj")
COMPONENTS = ("unet", "transformer", "text_encoder", "text_encoder_2", "text_encoder_3", "prior", "decoder")

#: old attention-processor projection name -> module name under the attention block
PROCESSOR_TARGETS = {"to_q_lora": "to_q", "to_k_lora": "to_k", "to_v_lora": "to_v", "to_out_lora": "to_out.0",
                     "add_k_proj_lora": "add_k_proj", "add_v_proj_lora": "add_v_proj"}
#: key patterns -> (module path group, canonical part); first match wins
_PATTERNS: list[tuple[re.Pattern[str], str]] = [
    (re.compile(r"^(?P<m>.+)\.lora_A\.weight$"), "a"),
    (re.compile(r"^(?P<m>.+)\.lora_B\.weight$"), "b"),
    (re.compile(r"^(?P<m>.+)\.lora_B\.bias$"), "bias"),
    (re.compile(r"^(?P<m>.+)\.lora_magnitude_vector(\.weight)?$"), "magnitude"),
    (re.compile(r"^(?P<m>.+)\.processor\.(?P<p>\w+_lora)\.down\.weight$"), "a"),
    (re.compile(r"^(?P<m>.+)\.processor\.(?P<p>\w+_lora)\.up\.weight$"), "b"),
    (re.compile(r"^(?P<m>.+)\.(lora_linear_layer|lora)\.down\.weight$"), "a"),
    (re.compile(r"^(?P<m>.+)\.(lora_linear_layer|lora)\.up\.weight$"), "b"),
    (re.compile(r"^(?P<m>.+)\.alpha$"), "alpha"),
]


def _parse(key: str) -> tuple[str, str] | None:
    for pattern, part in _PATTERNS:
        m = pattern.match(key)
        if m:
            module = m.group("m")
            proj = m.groupdict().get("p")
            if proj is not None:
                if proj not in PROCESSOR_TARGETS:
                    return None
                module = f"{module}.{PROCESSOR_TARGETS[proj]}"
            return module, part
    return None


def _with_component(module: str, default: str = "unet") -> str:
    return module if module.split(".", 1)[0] in COMPONENTS else f"{default}.{module}"


def _bare_default(modules: Collection[str]) -> str:
    """The component of a file without component prefixes (``save_lora_adapter`` of one model): ``transformer`` when
    every path is a diffusion transformer's, else ``unet``."""
    bare = [m for m in modules if m.split(".", 1)[0] not in COMPONENTS]
    return "transformer" if bare and bare_component(bare) == "transformer" else "unet"


# --------------------------------------------------------------------------------------------- detect


def _weights_file(path: Path) -> Path | None:
    if path.is_file():
        return path
    for name in (WEIGHT_NAME, LEGACY_WEIGHT_NAME):
        if (path / name).is_file():
            return path / name
    return None


def detect_keys(keys: Collection[str]) -> bool:
    """True for diffusers LoRA keys: all under a pipeline component (``unet.``...), or an older layout's."""
    keys = [k for k in keys if k != "__metadata__"]
    if not keys:
        return False
    prefixed = all(k.split(".", 1)[0] in COMPONENTS for k in keys)
    old = any(".processor." in k or ".lora_linear_layer." in k for k in keys)
    return (prefixed or old) and all(_parse(k) for k in keys)


def detect(path: Path) -> bool:
    """True for ``pytorch_lora_weights.safetensors`` (or a directory holding it) with diffusers keys."""
    f = _weights_file(path)
    if f is None or f.suffix != ".safetensors":
        return False
    if path.is_dir() and (path / _peft.CONFIG_NAME).is_file():
        return False
    header, _ = read_safetensors_header(f)
    keys = [k for k in header if k != "__metadata__"]
    if METADATA_KEY in (header.get("__metadata__") or {}) and not any(k.startswith("diffusion_model.") for k in keys):
        # one model's save_lora_adapter: its own paths (no component prefix) and its LoraConfig in the metadata
        return bool(keys) and all(_parse(k) for k in keys)
    return detect_keys(header)


def is_adapter_file(name: str) -> bool:
    """Whether a file name is diffusers LoRA weights."""
    return name in (WEIGHT_NAME, LEGACY_WEIGHT_NAME)


def select_files(listing: Sequence[str], named: str | None = None) -> Selection | None:
    """The diffusers LoRA weight file of a folder listing (``pytorch_lora_weights.safetensors`` first)."""
    if named is not None:
        return None
    weights = next((n for n in (WEIGHT_NAME, LEGACY_WEIGHT_NAME) if n in listing), None)
    return Selection((weights,), weights) if weights else None


# ----------------------------------------------------------------------------------------------- read


def read(path: Path, *, source: str | None = None, **_: Any) -> Adapter:
    """Read a diffusers LoRA file (current or older layouts).

    Raises:
        FormatError: keys of another scheme, incomplete layers, a corrupt ``lora_adapter_metadata``.
        ShapeMismatchError: factors that disagree.
    """
    f = _weights_file(Path(path))
    if f is None:
        raise FormatError(f"no {WEIGHT_NAME} in {path}; pass the diffusers LoRA file itself")
    tensors, metadata = read_weights(f)
    return read_tensors(tensors, metadata, source=source or str(path), file_name=f.name)


def read_tensors(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None,
                 config: Mapping[str, Any] | None = None, *, source: str | None = None,
                 file_name: str = "the tensors", **_: Any) -> Adapter:
    """A diffusers LoRA adapter from its tensors and header metadata (the packed ``lora_adapter_metadata``).

    Args:
        tensors: tensor name -> tensor, as the file holds them.
        metadata: the file's header metadata.
        config: per-component ``LoraConfig`` dicts (``{"unet": {...}}``) when the metadata has none.
        source: provenance string to record.
        file_name: the file's name, for messages.

    Raises:
        FormatError / ShapeMismatchError: as :func:`read`.
    """
    metadata = dict(metadata or {})
    configs = _configs(metadata, file_name) or {k: dict(v) for k, v in (config or {}).items()}
    groups: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)
    bad = []
    parsed_keys = {key: _parse(key) for key in tensors}
    default = _bare_default([p[0] for p in parsed_keys.values() if p is not None])
    if "" in configs:  # the unpacked config of a file written by one model's save_lora_adapter
        configs[default] = configs.pop("")
    for key, t in tensors.items():
        parsed = parsed_keys[key]
        if parsed is None:
            bad.append(key)
            continue
        module, part = parsed
        groups[_with_component(module, default)][part] = t
    if bad:
        raise FormatError(
            f"{file_name} holds keys diffusers LoRA files do not have, e.g. '{bad[0]}' ({len(bad)} such keys); "
            "is it a kohya/LyCORIS or PEFT file? pass format=... accordingly"
        )
    layers = {}
    patterns = {comp: ConfigPatterns.of(cfg) for comp, cfg in configs.items()}
    added = set(_json_list(metadata.pop(TEXT_MODEL_KEY, None)))  # components whose text_model. adaptkit's writer added
    for module in sorted(groups):
        parts = groups[module]
        if "a" not in parts or "b" not in parts:
            if set(parts) == {"alpha"}:
                continue
            raise FormatError(f"{module} lacks its lora_A/down or lora_B/up tensor; the checkpoint is incomplete")
        comp, _, rel = module.partition(".")
        if comp in added and rel.startswith("text_model."):
            rel = rel[len("text_model."):]
            module = f"{comp}.{rel}"
        try:
            check_factors(parts, _DISPLAY)
            layers[module] = _layer(rel, parts, configs.get(comp, {}), patterns.get(comp))
        except (ShapeMismatchError, FormatError) as e:
            raise type(e)(f"{module}: {e}") from e
    if not layers:
        raise FormatError(f"{file_name} contains no LoRA tensors; is it an adapter checkpoint?")
    return Adapter(layers=layers, base_model=None, metadata=metadata,
                   config={"components": configs}, format=NAME, source=source)


def _configs(metadata: dict[str, str], fname: str) -> dict[str, dict[str, Any]]:
    raw = metadata.get(METADATA_KEY)
    if not raw:
        return {}
    try:
        flat = json.loads(raw)
    except json.JSONDecodeError as e:
        raise FormatError(f"{fname}: the {METADATA_KEY} header entry is not valid JSON ({e}); re-export the file") from e
    if isinstance(flat, dict) and ("r" in flat or "lora_alpha" in flat):  # one model's own config (save_lora_adapter)
        return {"": dict(flat)}
    out: dict[str, dict[str, Any]] = defaultdict(dict)
    for key, value in flat.items():
        comp, _, field = key.partition(".")
        out[comp][field] = value
    return dict(out)


#: canonical part -> tensor name suffix, for messages
_DISPLAY = {"a": "lora_A.weight", "b": "lora_B.weight", "bias": "lora_B.bias", "magnitude": "lora_magnitude_vector"}


def _layer(rel: str, p: dict[str, torch.Tensor], cfg: dict[str, Any], patterns: ConfigPatterns | None) -> LoRA:
    a, b = p["a"], p["b"]
    r = a.shape[0]
    if "alpha" in p and p["alpha"].numel():
        alpha = float(p["alpha"].float().reshape(-1)[0])
    elif cfg and patterns is not None:
        alpha = patterns.alpha_for(rel, cfg.get("lora_alpha", r))
    else:
        alpha = float(r)
    if a.ndim > 2:
        shape, mtype = (b.shape[0], a.shape[1], *a.shape[2:]), "conv"
    else:
        shape, mtype = (b.shape[0], a.shape[1]), "linear"
    mag = p.get("magnitude")
    return LoRA(down=a, up=b, alpha=alpha, shape=shape, module_type=mtype, rslora=bool(cfg.get("use_rslora", False)),
                magnitude=None if mag is None else mag.flatten(), bias=p.get("bias"))


# -------------------------------------------------------------------------------- what diffusers stores


#: the kinds a diffusers file holds
KINDS_STORED = frozenset({"lora"})


def can_store(layer: Any, module: str) -> str | None:
    """Why a diffusers file cannot hold this layer (not LoRA, DoRA per input feature), or ``None``."""
    if layer.kind not in KINDS_STORED:
        return f"{NAME} has no {layer.kind} layers"
    return dora_limit(layer, NAME)


def kind_support() -> dict[str, KindSupport]:
    """The kinds diffusers files hold (:data:`KINDS_STORED`); DoRA per input feature is refused."""
    return {kind: KindSupport(read=True, write=True, limited=True) for kind in sorted(KINDS_STORED)}


def can_name(module: str) -> str | None:
    """Why a diffusers file has no name for a module path (outside a pipeline component, or not diffusers' UNet
    names), or ``None``."""
    comp, _, rel = module.partition(".")
    if comp not in COMPONENTS or not rel:
        return ("it names no pipeline component (unet., transformer., text_encoder. ...), and diffusers files are "
                "for pipelines (PEFT holds one model's adapter)")
    if comp == "unet" and not rel.startswith(UNET_ROOTS):
        return "it is not a diffusers UNet module (original Flux/SD3 or LDM names?), so diffusers would not load it"
    return None


def can_store_adapter(adapter: Adapter, **_: Any) -> dict[str, str]:
    """What one diffusers file cannot hold: each component's layers share one PEFT ``LoraConfig``
    (:func:`adaptkit.formats.peft.one_config_reasons`), and extra tensors have no place."""
    reasons = _peft.one_config_reasons(adapter, NAME)
    reasons.update({k: "an extra tensor, and diffusers LoRA files hold LoRA layers only" for k in sorted(adapter.extras)})
    return reasons


def namespace(**_: Any) -> str:
    """Diffusion-transformer layers are written in diffusers' module names (original names are mapped first)."""
    return "diffusers"


def check_options(**_: Any) -> None:
    """diffusers output has no writer options of its own (unknown ones are refused by :func:`adaptkit.formats.save`)."""


# ---------------------------------------------------------------------------------------------- write


def _config_fields() -> set[str] | None:
    try:
        from peft import LoraConfig
    except ImportError:  # pragma: no cover - peft is optional for writing
        return None
    return {f.name for f in dataclasses.fields(LoraConfig)}


#: pipeline components that are CLIP text encoders, and the module paths transformers 5 gives them without
#: the ``text_model.`` that transformers 4, the Hub's diffusers LoRA files and ComfyUI use
_CLIP_COMPONENTS = ("text_encoder", "text_encoder_2")
_CLIP_BARE = ("encoder.layers.", "embeddings.", "final_layer_norm")
#: metadata entry listing the components whose tensor names the writer gave a ``text_model.`` (read strips it)
TEXT_MODEL_KEY = "adaptkit.text_model_added"


def _json_list(raw: str | None) -> list[str]:
    try:
        value = json.loads(raw) if raw else []
    except (json.JSONDecodeError, TypeError):
        return []
    return [str(v) for v in value] if isinstance(value, list) else []


def write(adapter: Adapter, path: str | Path, *, overwrite: bool = False, **_: Any) -> Path:
    """Write a LoRA adapter as a diffusers directory that ``pipe.load_lora_weights`` loads.

    Args:
        adapter: LoRA layers (DoRA per output feature allowed) whose paths start with a pipeline component
            (``unet.``, ``transformer.``, ``text_encoder.`` ...).
        path: output directory (``pytorch_lora_weights.safetensors`` is written inside).
        overwrite: replace an existing directory.

    Raises:
        UnsupportedError: the adapter has no layers. The writer trusts :func:`can_store` and
            :func:`can_store_adapter` (:func:`adaptkit.formats.save` asks them first: non-LoRA layers, paths
            without a pipeline component, extra tensors).
    """
    if not adapter.layers:
        raise UnsupportedError("the adapter has no layers; there is nothing to write")
    by_comp: dict[str, dict[str, Any]] = defaultdict(dict)
    for p, layer in adapter.layers.items():
        comp, _, rel = p.partition(".")
        by_comp[comp][rel] = layer
    fields = _config_fields()
    tensors: dict[str, torch.Tensor] = {}
    packed: dict[str, Any] = {}
    added: list[str] = []
    for comp, layers in by_comp.items():
        cfg: dict[str, Any] = {"peft_type": "LORA"}
        out: dict[str, torch.Tensor] = {}
        write_lora(layers, cfg, out, f"{comp}.")
        if comp in _CLIP_COMPONENTS:  # tensor names as transformers 4, Hub files and ComfyUI's key map spell them;
            # the config keeps transformers 5's bare paths, which PEFT's suffix rule matches under both namings
            renamed = {f"{comp}.text_model.{k[len(comp) + 1:]}" if k[len(comp) + 1:].startswith(_CLIP_BARE) else k: t
                       for k, t in out.items()}
            if renamed.keys() != out.keys():
                added.append(comp)
            out = renamed
        tensors.update(out)
        cfg.setdefault("lora_dropout", 0.0)
        for k, v in cfg.items():
            if fields is None or k in fields:
                packed[f"{comp}.{k}"] = sorted(v) if isinstance(v, set) else v
    metadata = {k: v for k, v in adapter.metadata.items() if k not in (METADATA_KEY, TEXT_MODEL_KEY)}
    metadata["format"] = "pt"
    if added:
        metadata[TEXT_MODEL_KEY] = json.dumps(sorted(added))
    if adapter.format == "kohya":
        naming = {**dict(adapter.config.get("kohya_naming") or {}), "inventory": adapter.config.get("inventory")}
        metadata["adaptkit.kohya_naming"] = json.dumps(naming, sort_keys=True)
    metadata[METADATA_KEY] = json.dumps(packed, indent=2, sort_keys=True)
    with atomic_output(path, overwrite=overwrite) as tmp:
        write_safetensors(tensors, tmp / WEIGHT_NAME, metadata)
    return Path(path)


__all__ = [
    "namespace",
    "ALLOW_PATTERNS",
    "COMPONENTS",
    "LABEL",
    "LOOKED_FOR",
    "METADATA_KEY",
    "NAME",
    "WEIGHT_NAME",
    "WRITE_OPTIONS",
    "can_name",
    "can_store",
    "can_store_adapter",
    "check_options",
    "detect",
    "detect_keys",
    "is_adapter_file",
    "kind_support",
    "read",
    "read_tensors",
    "select_files",
    "write",
]
