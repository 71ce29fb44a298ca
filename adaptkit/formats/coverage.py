"""An adapter's coverage of a base model, from the base's tensor names and shapes only.

:func:`certify_base` answers, before anything is fused, loaded or deployed: which of the adapter's layers find
their base weight (by the matching rules of :func:`adaptkit.io.base_model.find_matches`: exact name, a prefix the
base adds such as ``model.``, a wrapper the adapter was made on), whether the shapes agree, and which extra
tensors (``modules_to_save`` weights, full embedding weights) have a counterpart. The base is never loaded:
safetensors headers are read, or a ``config.json`` is built on the meta device, or a shipped inventory is used.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import torch

from ..core.coverage import Certificate, Outcome, certify
from ..errors import (
    ConfigError,
    ShapeMismatchError,
    SourceNotFoundError,
    UnsupportedError,
)
from ..io.base_model import TensorReader, find_matches, open_base
from ..io.sources import resolve
from . import names as _names
from .arch import DIFFUSERS, ORIGINAL

Shapes = dict[str, tuple[int, ...]]


def with_original_weights(shapes: Shapes) -> Shapes:
    """``shapes`` with the original-name weights of a diffusion transformer added (``double_blocks.0.img_attn.qkv.
    weight`` of a Flux transformer's ``transformer_blocks.0.attn.to_q.weight`` ...: packed weights have their members'
    rows), under adaptkit's original-names component ``unet.``, so that adapters in original names are certified
    against a diffusers base; a transformer given alone also lists its keys under ``transformer.``. Unchanged for other models."""
    groups: dict[str, dict[str, tuple[int, ...]]] = {}
    for key, shape in shapes.items():
        if not key.endswith(".weight"):
            continue
        module = key[: -len(".weight")]
        comp, _, rest = module.partition(".")
        if comp == DIFFUSERS and rest:
            groups.setdefault(DIFFUSERS, {})[rest] = tuple(shape)
        else:
            groups.setdefault("", {})[module] = tuple(shape)
    out = dict(shapes)
    for comp, listing in groups.items():
        inv = _names.with_original_names(_names.Inventory(name="base", modules={comp: listing}))
        prefix = f"{ORIGINAL}."  # adaptkit's component of original names
        for path, shape in inv.modules.get(ORIGINAL, {}).items():
            out.setdefault(f"{prefix}{path}.weight", tuple(shape))
        if comp == "" and ORIGINAL in inv.modules:  # a transformer given alone: its diffusers names under transformer.
            for path, shape in listing.items():
                out.setdefault(f"{DIFFUSERS}.{path}.weight", shape)
    return out


def extra_module(key: str) -> str:
    """The module an extra tensor belongs to: PEFT saves ``modules_to_save`` as ``<module>.weight``/``.bias`` and
    full embedding weights as ``<module>.base_layer.weight``."""
    return key.removesuffix(".weight").removesuffix(".bias").removesuffix(".base_layer")


def base_tensors(base: Any, *, tied_output: bool = True) -> tuple[str, Shapes]:
    """``(name, {tensor key: shape})`` of a base model, from its headers or its config (no weights are read).

    Args:
        base: a hub id or directory (safetensors weights, or only ``config.json`` files: the model is built on the
            meta device), a ``.safetensors`` file, the name of a shipped inventory (``"sdxl"``, ``"flux"``), an
            :class:`~adaptkit.formats.names.Inventory`, an ``nn.Module``, or a mapping ``{tensor key: shape}``.
            Pipelines use ``<component>.<name>`` keys (``unet.down_blocks.0...weight``).
        tied_output: list ``lm_head.weight`` for a model whose config ties it to the input embedding (its files
            hold the tensor once, under the embedding's name). False for targets that keep the two apart
            (llama.cpp's GGUF of a tied model has no ``output`` tensor).

    Raises:
        SourceNotFoundError: the base cannot be found. ConfigError: it lists no tensors.
    """
    if isinstance(base, _names.Inventory):
        return base.name, _inventory_shapes(base)
    if isinstance(base, Mapping):
        return "mapping", {str(k): tuple(int(s) for s in v) for k, v in base.items()}
    if hasattr(base, "named_parameters"):
        shapes = {n: tuple(p.shape) for n, p in base.named_parameters(remove_duplicate=not tied_output)}
        shapes.update({n: tuple(b.shape) for n, b in base.named_buffers()})
        return type(base).__name__, shapes
    spec = str(base)
    if spec in _names.shipped_available():
        return spec, _inventory_shapes(_names.shipped(spec))
    try:
        ws = open_base(base)
        shapes = {k: info.shape for k, info in ws.tensors.items()}
        return ws.provenance, with_tied_output(shapes, base) if tied_output else shapes
    except (SourceNotFoundError, UnsupportedError):
        pass
    resolved = resolve(spec, allow_patterns=["*.json", "*/*.json"])
    path = resolved.path
    configs = _configs(path)
    if not configs:
        return spec, _inventory_shapes(_names.inventory_from_base(base))  # raises the inventory's own error
    shapes: Shapes = {}
    for prefix, cfg in configs:
        model = _names.meta_model(cfg)
        params = model.named_parameters(remove_duplicate=not tied_output)  # a tied lm_head is listed (or not)
        shapes.update({prefix + n: tuple(p.shape) for n, p in params})
    return resolved.provenance, shapes


#: where transformers' causal LMs keep their output layer and their input embedding
TIED_OUTPUT = "lm_head.weight"
INPUT_EMBEDDINGS = ("model.embed_tokens.weight", "embed_tokens.weight", "transformer.wte.weight",
                    "model.language_model.embed_tokens.weight", "transformer.word_embeddings.weight")

T = TypeVar("T")


def ties_output(base: Any) -> bool:
    """Whether the base model ties its output layer (``lm_head``) to its input embedding.

    Decided by the model's config class (``transformers.AutoConfig`` on its ``config.json``, no weights), as
    transformers does: a ``config.json`` without ``tie_word_embeddings`` gets its class's default (``False`` for
    ``LlamaConfig`` / ``Qwen2Config`` in transformers 5, ``True`` for ``GemmaConfig``). ``False`` for a base without a
    ``config.json`` (a ``.safetensors`` file, a mapping, a pipeline) or one transformers cannot read.
    """
    if hasattr(base, "get_output_embeddings") and hasattr(base, "config"):
        return bool(getattr(base.config, "tie_word_embeddings", False))
    if isinstance(base, (Mapping, _names.Inventory)) or str(base) in _names.shipped_available():
        return False
    try:
        root = resolve(str(base), allow_patterns=["config.json"]).path
    except (SourceNotFoundError, UnsupportedError):
        return False
    root = root if root.is_dir() else root.parent
    if not (root / "config.json").is_file() or (root / "model_index.json").is_file():
        return False
    return _ties_config(str(root), (root / "config.json").stat().st_mtime_ns)


@functools.lru_cache(maxsize=32)
def _ties_config(root: str, mtime: int) -> bool:
    """The tie of one config directory (cached per file version: ``mtime`` is part of the key)."""
    import transformers

    try:
        config = transformers.AutoConfig.from_pretrained(root)
    except (ValueError, KeyError, TypeError, OSError):
        try:
            return json.loads((Path(root) / "config.json").read_text()).get("tie_word_embeddings") is True
        except (OSError, ValueError):
            return False
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return bool(getattr(text, "tie_word_embeddings", getattr(config, "tie_word_embeddings", False)))


def tied_output_source(keys: Iterable[str], base: Any) -> str | None:
    """The tensor key a tied ``lm_head.weight`` reads, for a base whose files store the shared tensor once (under
    the input embedding's name): the embedding's key when :func:`ties_output` and the files lack
    ``lm_head.weight``; ``None`` otherwise (untied, or an ``lm_head.weight`` of its own)."""
    keys = set(keys)
    if TIED_OUTPUT in keys or not ties_output(base):
        return None
    return next((k for k in INPUT_EMBEDDINGS if k in keys), None)


def with_tied_output(tensors: Mapping[str, T], base: Any) -> dict[str, T]:
    """``tensors`` (shapes, or :class:`~adaptkit.io.base_model.TensorInfo` entries) plus ``lm_head.weight`` as the
    input embedding's entry when the model ties them (:func:`tied_output_source`): an adapter on ``lm_head`` lands
    (transformers' ``lm_head`` module holds that very tensor), a fold reads the embedding as ``lm_head``'s weight.
    The one place adaptkit resolves a tied output layer: the certificate, the export fixes and llama.cpp use it."""
    embed = tied_output_source(tensors, base)
    return dict(tensors) if embed is None else {**tensors, TIED_OUTPUT: tensors[embed]}


def same_as_base(saved: torch.Tensor, current: torch.Tensor) -> bool:
    """Whether an extra tensor equals the base's tensor it would replace (PEFT's ``save_embedding_layers`` saves the
    full embedding and ``lm_head`` beside their LoRA): loading it changes nothing. The one judgement of a no-op copy
    (the deploy detectors, ``fold_saved``, llama.cpp's extras and live injection use it). Compared in the base's
    dtype, the precision the runtime holds the weight in."""
    return tuple(saved.shape) == tuple(current.shape) and torch.equal(current, saved.to(current.dtype))


def unchanged_extras(adapter: Any, base: Any) -> list[str]:
    """The keys of ``adapter``'s extra tensors that equal the base tensor they match (:func:`same_as_base`), read
    from the base's weight files (a tied ``lm_head`` reads the embedding: :func:`with_tied_output`). Empty when the
    base has no weight files (a config, an inventory), since equality cannot be told then."""
    if not adapter.extras or base is None or isinstance(base, (Mapping, _names.Inventory)):
        return []
    if hasattr(base, "named_parameters"):  # a module: its own tensors (a tied lm_head is listed)
        tensors: dict[str, Any] = {n: t.detach() for n, t in base.named_parameters(remove_duplicate=False)}
        return _equal_extras(adapter, tensors, lambda t: t)
    if str(base) in _names.shipped_available():
        return []
    try:
        tensors = with_tied_output(open_base(base).tensors, base)
    except (SourceNotFoundError, UnsupportedError, ConfigError):
        return []
    with TensorReader() as reader:
        return _equal_extras(adapter, tensors, reader.read)


def _equal_extras(adapter: Any, tensors: Mapping[str, Any], read: Any) -> list[str]:
    modules = {k: extra_module(k) for k in adapter.extras}
    found = find_matches(sorted(set(modules.values())), tensors)
    out = []
    for key, mod in modules.items():
        m = found.matched.get(mod)
        tensor = None if m is None else (m.bias if key.endswith(".bias") else m.weight)
        if tensor is not None and tuple(tensors[tensor].shape) == tuple(adapter.extras[key].shape) \
                and same_as_base(adapter.extras[key], read(tensors[tensor]).cpu()):
            out.append(key)
    return sorted(out)


def _configs(path: Path) -> list[tuple[str, Path]]:
    if path.is_file() and path.suffix == ".json":
        return [("", path)]
    if (path / "model_index.json").is_file():
        return [(sub.name + ".", sub / "config.json") for sub in sorted(p for p in path.iterdir() if p.is_dir())
                if (sub / "config.json").is_file()]
    return [("", path / "config.json")] if (path / "config.json").is_file() else []


def _inventory_shapes(inv: Any) -> Shapes:
    out: Shapes = {}
    for comp, mods in inv.modules.items():
        prefix = f"{comp}." if comp else ""
        for path, shape in mods.items():
            out[f"{prefix}{path}.weight"] = tuple(shape)
        for path in (inv.biases or {}).get(comp, ()):
            out[f"{prefix}{path}.bias"] = ()
    return out


def match_layers(adapter: Any, shapes: Shapes, target: str) -> tuple[dict[str, Outcome], dict[str, Outcome]]:
    """Outcomes per layer and per extra tensor of ``adapter`` against the tensors ``shapes`` of a base."""
    found = find_matches(adapter.layers, shapes)
    outcomes: dict[str, Outcome] = {}
    for path in found.unmatched:
        outcomes[path] = Outcome(None, "unmatched", "matches no weight of the base model")
    for path, keys in found.ambiguous.items():
        more = " ..." if len(keys) > 2 else ""
        outcomes[path] = Outcome(None, "ambiguous", f"matches several base weights: {', '.join(keys[:2])}{more}")
    for path, m in found.matched.items():
        outcomes[path] = _fits(adapter.layers[path], m.weight, shapes[m.weight])
    extras: dict[str, Outcome] = {}
    if adapter.extras:
        modules = {k: extra_module(k) for k in adapter.extras}
        emat = find_matches(sorted(set(modules.values())), shapes)
        for key, mod in modules.items():
            m = emat.matched.get(mod)
            tensor = None if m is None else (m.bias if key.endswith(".bias") else m.weight)
            if tensor is None:
                extras[key] = Outcome(None, "unmatched", f"extra tensor with no counterpart {mod} in {target}")
            elif shapes[tensor] and math.prod(shapes[tensor]) != adapter.extras[key].numel():
                extras[key] = Outcome(None, "shape", f"shape {tuple(adapter.extras[key].shape)} vs base "
                                      f"{tensor} {shapes[tensor]}")
            else:
                extras[key] = Outcome(tensor)
    return outcomes, extras


def _fits(layer: Any, key: str, shape: tuple[int, ...]) -> Outcome:
    if not shape:  # an inventory that does not know the shape
        return Outcome(key)
    if layer.shape is not None and tuple(layer.shape) == tuple(shape):
        return Outcome(key)
    try:
        layer.fit(tuple(shape))
    except ShapeMismatchError as e:
        return Outcome(None, "shape", f"base {key} is {tuple(shape)}: {e}")
    return Outcome(key)


def certify_base(adapter: Any, base: Any, *, operation: str = "check", drop: Iterable[str] | None = None) -> Certificate:
    """Which layers of ``adapter`` land on ``base`` (names and shapes), and the share of its ΔW energy that does.

    Args:
        adapter: an :class:`~adaptkit.core.adapter.Adapter`.
        base: anything :func:`base_tensors` takes (hub id, directory, file, shipped inventory name, module).
        operation: the operation the certificate is for (``"check"``, ``"load"``, ``"fuse"`` ...).
        drop: when given, :meth:`~adaptkit.core.coverage.Certificate.require` is applied with these patterns
            (partial coverage raises :class:`~adaptkit.core.coverage.CoverageError`).

    Returns:
        A :class:`~adaptkit.core.coverage.Certificate`; extra tensors are part of it (a copy equal to the base's
        tensor, :func:`unchanged_extras`, is marked "equal to the base: nothing to load").

    Example:
        >>> cert = certify_base(ak.load("adapter/"), "meta-llama/Llama-3.2-1B")   # doctest: +SKIP
        >>> cert.energy_share, [c.path for c in cert.missing]                         # doctest: +SKIP
    """
    name, shapes = base_tensors(base)
    outcomes, extras = match_layers(adapter, shapes, name)
    for key in unchanged_extras(adapter, base):  # a save_embedding_layers copy: lands, and changes nothing
        extras[key] = Outcome(f"{extras[key].target} (equal to the base: nothing to load)")
    cert = certify(adapter, outcomes, operation=operation, target=name, extras=extras)
    return cert if drop is None else cert.require(drop)
