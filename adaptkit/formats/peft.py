"""PEFT format: ``adapter_config.json`` + ``adapter_model.safetensors`` (legacy ``adapter_model.bin``).

Reads and writes LORA (incl. DoRA, rsLoRA, ``rank_pattern``/``alpha_pattern``, embedding LoRA,
``lora_B.bias``, conv), LOHA, LOKR and IA3, the low-rank tuners of :mod:`~adaptkit.formats.peft_lowrank` (ADALORA,
VERA, RANDLORA, VBLORA, DELORA, GRALORA, MISS/BONE, FOURIERFT) and every kind with a row in
:data:`adaptkit.formats.peft_layers.PEFT_NAMES` (the per-kind key names live there). Model-level tensors that
several layers share (``base_model.vera_A``) are given to every layer and written once. Tensor keys are
``base_model.model.<module path>.<suffix>`` with the adapter name removed, exactly as
``PeftModel.save_pretrained`` writes them. Non-default adapters saved by PEFT live in subfolders named after
the adapter: read them as ``dir:name``. A PEFT adapter applies to one model, so writing a pipeline adapter
(``unet.…``, ``text_encoder.…``) can select one component, in that model's own namespace, or write one adapter
per component into subfolders (``component=``).
"""

from __future__ import annotations

import json
import sys
from collections import Counter, defaultdict
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from ..core.adapter import Adapter
from ..core.kinds import KINDS
from ..core.kinds.base import check_factors
from ..errors import ConfigError, FormatError, ShapeMismatchError, UnsupportedError
from ..io.outputs import atomic_output
from ..io.safetensors import read_safetensors_header, read_weights, write_safetensors
from . import names as _names
from . import peft_lokr, peft_other, peft_params
from .base import KindSupport, Selection, check_storable
from .patterns import ConfigPatterns
from .peft_common import same_tensor
from .peft_components import (
    COMPONENTS,
    check_component,
    select_component,
    split_components,
)
from .peft_layers import PEFT_NAMES, peft_types, row_of_type, settings_limits, split_key

NAME = "peft"
LABEL = "PEFT"
CONFIG_NAME = "adapter_config.json"
WEIGHT_NAMES = ("adapter_model.safetensors", "adapter_model.bin")
PREFIX = "base_model.model."
#: files a hub download of a PEFT adapter needs
ALLOW_PATTERNS = [CONFIG_NAME, *WEIGHT_NAMES]
#: what a folder holds when it is a PEFT adapter, for messages
LOOKED_FOR = f"{CONFIG_NAME} + {WEIGHT_NAMES[0]}"
#: the writer options PEFT output has
WRITE_OPTIONS = ("component", "target_names")
#: how ``target_modules`` is written: the full module paths, or their bare last names (``q_proj``; SGLang)
TARGET_NAMES = ("paths", "leaf")


# --------------------------------------------------------------------------------------------- detect


def detect_keys(keys: Collection[str]) -> bool:
    """True when every tensor name starts with ``base_model.model.`` (as ``save_pretrained`` writes them), but for
    model-level tensors some kinds share between layers (``base_model.vera_A``: see :func:`shared_stems`)."""
    keys = [k for k in keys if k != "__metadata__"]
    shared = {SHARED_PREFIX + s for s in shared_stems()}
    return any(k.startswith(PREFIX) for k in keys) and all(k.startswith(PREFIX) or k in shared for k in keys)


#: where ``save_pretrained`` puts a model-level tensor (VeRA's ``base_model.vera_A``)
SHARED_PREFIX = "base_model."


def shared_stems() -> set[str]:
    """The key stems of model-level tensors (no module path) of every row."""
    return {s for r in PEFT_NAMES.values() for s in r.shared}


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
        return detect_keys(header)
    return False


def is_adapter_file(name: str) -> bool:
    """Whether a file name marks a PEFT adapter (its config)."""
    return name == CONFIG_NAME


def select_files(listing: Sequence[str], named: str | None = None) -> Selection | None:
    """The files of the PEFT adapter in a folder listing: its config and first weight file (read as a folder).

    Args:
        listing: file names at the top of the folder.
        named: a file of the folder the user named; a PEFT file needs its config (or weights) beside it.
    """
    weights = next((n for n in WEIGHT_NAMES if n in listing), None)
    config = [CONFIG_NAME] if CONFIG_NAME in listing else []
    if named is not None:
        if named not in (CONFIG_NAME, *WEIGHT_NAMES):
            return None
        chosen = [named] if named in WEIGHT_NAMES else [weights] if weights else []
        return Selection((*config, *chosen), named)
    return Selection((*config, weights)) if weights else None


# ----------------------------------------------------------------------------------------------- read


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


def check_config(cfg: Any, where: str = CONFIG_NAME) -> dict[str, Any]:
    """Check an ``adapter_config.json`` dict: a JSON object with a ``peft_type`` adaptkit reads.

    Raises:
        ConfigError: not an object, or an unknown ``peft_type``.
    """
    if not isinstance(cfg, dict):
        raise ConfigError(f"{where} does not hold a JSON object; fix or re-download the config")
    ptype = cfg.get("peft_type")
    if ptype not in peft_types():
        raise ConfigError(
            f"unknown peft_type {ptype!r} in {Path(where).name}; adaptkit reads {', '.join(peft_types())} "
            "(other PEFT methods are not supported yet)"
        )
    return cfg


def read_config(path: Path) -> dict[str, Any]:
    """Load and check ``adapter_config.json``."""
    try:
        cfg = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path} is not valid JSON ({e}); fix or re-download the config") from e
    return check_config(cfg, str(path))


def read(path: Path, *, source: str | None = None, subfolder: str | None = None, base: Any = None,
         **_: Any) -> Adapter:
    """Read a PEFT adapter directory (or its weight file) into an :class:`Adapter`.

    Args:
        path: the adapter directory, its ``adapter_config.json`` or its weight file.
        source: provenance string to record.
        subfolder: the subfolder the source named (``dir:other``); PEFT saves a non-default adapter in a
            subfolder named after it, so its last part (``other``) becomes the adapter's ``name``.
        base: the base model (hub id, directory, file or ``nn.Module``) whose weight shapes complete layers whose
            file does not fix it (VeRA, RandLoRA, MiSS, FourierFT); without it they have ``shape=None`` until fused.

    Raises:
        ConfigError: missing or unknown config, ranks that contradict the config.
        FormatError: corrupt or truncated weights, tensors of a different PEFT type than the config.
        ShapeMismatchError: factors that disagree with each other.
    """
    config_path, weights_path = _find_files(path)
    cfg = read_config(config_path)
    tensors, metadata = read_weights(weights_path)
    return read_tensors(tensors, metadata, cfg, source=source or str(path), subfolder=subfolder,
                        file_name=weights_path.name, base=base)


def read_tensors(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None,
                 config: Mapping[str, Any] | None = None, *, source: str | None = None, subfolder: str | None = None,
                 file_name: str = "the weights", base: Any = None, **_: Any) -> Adapter:
    """A PEFT adapter from its tensors (``base_model.model.<path>.<stem>``) and ``adapter_config.json`` dict.

    Keys that are no adapter tensor (``modules_to_save`` copies, saved embeddings) are kept as extras.

    Args:
        tensors: tensor name -> tensor, as the weight file holds them.
        metadata: the file's header metadata.
        config: the ``adapter_config.json`` dict (required: it holds alpha and the targets).
        source: provenance string to record.
        subfolder: the subfolder the adapter was read from (its last part becomes the adapter's ``name``).
        file_name: the weight file's name, for messages.
        base: as :func:`read`.

    Raises:
        ConfigError / FormatError / ShapeMismatchError: as :func:`read`.
    """
    if config is None:
        raise ConfigError(f"{CONFIG_NAME} is missing for {file_name}; PEFT adapters need it for alpha and targets: "
                          "pass the config that belongs to these tensors")
    cfg = check_config(dict(config))
    ptype = cfg["peft_type"]
    row = row_of_type(ptype)
    groups: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)
    extras: dict[str, torch.Tensor] = {}
    shared: dict[str, torch.Tensor] = {}
    tokens: dict[str, dict[str, dict[str, torch.Tensor]]] = defaultdict(lambda: defaultdict(dict))
    #: kinds whose layers ride in this file type (LoRA's trainable_token_indices), by their peft_type
    riders = {r.peft_type: r for r in PEFT_NAMES.values() if ptype in r.hosts}
    for key, tensor in tensors.items():
        stem = key.removeprefix(SHARED_PREFIX)
        if stem in row.shared:  # a model-level tensor every layer uses (VeRA's projections, VB-LoRA's bank)
            shared[row.shared[stem]] = tensor
            continue
        rel = key.removeprefix(PREFIX)
        split = split_key(rel)
        if split is None:
            extras[rel] = tensor
            continue
        module, key_type, part = split
        if key_type != ptype and key_type in riders and module.endswith(peft_other.TOKEN_ADAPTER):
            tokens[key_type][module.removesuffix(peft_other.TOKEN_ADAPTER)][part] = tensor  # LoRA's trainable_token_indices
            continue
        if key_type != ptype:
            raise FormatError(
                f"{file_name} holds {key_type} tensor '{key}' but the config says peft_type {ptype}; "
                "the config does not belong to these weights"
            )
        groups[module][part] = tensor
    for module, parts in groups.items():
        add_shared(module, parts, shared, row, file_name)
    patterns = row.patterns(cfg) if row.patterns is not None else ConfigPatterns.of(cfg)
    modules, params = peft_params.split_groups(groups, cfg) if ptype == PEFT_NAMES["expert_lora"].peft_type else (groups, {})
    layers = build_layers(modules, cfg, patterns)
    if params:  # LoRA on parameter tensors (target_parameters), named by the parameter's path
        built = peft_params.orient(build_layers(params, cfg, patterns, PEFT_NAMES["expert_lora"]), cfg, metadata)
        layers = dict(sorted({**layers, **built}.items()))
    for key_type, rides in tokens.items():
        layers = dict(sorted({**layers, **build_layers(rides, cfg, patterns, riders[key_type])}.items()))
    if not layers:
        raise FormatError(f"{file_name} contains no {ptype} adapter tensors; is it an adapter checkpoint?")
    return Adapter(
        layers=fit_to_base(layers, base),
        base_model=cfg.get("base_model_name_or_path"),
        metadata=dict(metadata or {}),
        config=cfg,
        extras=extras,
        format=NAME,
        source=source,
        name=_subfolder_name(subfolder),
    )


def add_shared(module: str, parts: dict[str, torch.Tensor], shared: Mapping[str, torch.Tensor], row: Any,
               file_name: str) -> None:
    """Give a module the model-level tensors (``{part: tensor}``); a per-module copy (RandLoRA writes one) must
    equal them.

    Raises:
        FormatError: a per-module copy that differs.
    """
    for part, t in shared.items():
        own = parts.get(part)
        if own is not None and not same_tensor(own, t):
            stem = row.display.get(part, part)
            raise FormatError(f"{file_name}: {module}.{stem} differs from the model-level base_model.{stem} it copies; "
                              "the checkpoint is damaged or mixes two adapters")
        parts[part] = t


def build_layer(module: str, parts: dict[str, torch.Tensor], cfg: dict[str, Any], patterns: ConfigPatterns,
                row: Any = None) -> Any:
    """Build one layer of ``cfg["peft_type"]`` from a module's tensors (``{part: tensor}``).

    The tensors are checked first (:func:`adaptkit.core.kinds.base.check_factors`: floating point, non-empty,
    factor dimensions); every error names the module and the tensor. The row of
    :data:`~adaptkit.formats.peft_layers.PEFT_NAMES` builds the layer (``from_parts`` for registered kinds); ``row``
    overrides the config's (the parameter layers of a LORA file).

    Raises:
        FormatError / ShapeMismatchError / ConfigError: as :func:`read`.
    """
    row = row or row_of_type(cfg["peft_type"])
    try:
        cls = KINDS.get(row.kind)
        checked = {k: t for k, t in parts.items() if t.numel()} if row.empty_ok else parts
        check_factors(checked, row.display, cls.index_parts if cls is not None else frozenset())
        return row.reader(module, parts, cfg, patterns)
    except (ShapeMismatchError, FormatError) as e:
        raise type(e)(f"{module}: {e}") from e


def build_layers(groups: dict[str, dict[str, torch.Tensor]], cfg: dict[str, Any],
                 patterns: ConfigPatterns, row: Any = None) -> dict[str, Any]:
    """:func:`build_layer` for every module of ``groups`` (``{module: {part: tensor}}``), sorted by path."""
    return {module: build_layer(module, groups[module], cfg, patterns, row) for module in sorted(groups)}


def fit_to_base(layers: dict[str, Any], base: Any) -> dict[str, Any]:
    """Layers without a weight shape (their file does not fix it) fitted to the base's module shapes.

    Raises:
        ShapeMismatchError: the base has no such module, or its weight does not fit the layer.
    """
    if base is None or all(layer.shape is not None for layer in layers.values()):
        return layers
    inv = _names.inventory_from_base(base)
    out = {}
    for path, layer in layers.items():
        if layer.shape is None:
            comp, _, rest = path.partition(".")
            shape = inv.shape(comp, rest) if comp in inv.modules else inv.shape(next(iter(inv.modules), ""), path)
            if not shape:
                raise ShapeMismatchError(f"{path}: the base {inv.name} has no module {path} with a weight; pass the base "
                                         "the adapter was made for")
            try:
                layer = layer.fit(tuple(shape))
            except ShapeMismatchError as e:
                raise ShapeMismatchError(f"{path}: {e} (base {inv.name}, weight {tuple(shape)}); pass the base the "
                                         "adapter was made for") from None
        out[path] = layer
    return out


def _subfolder_name(subfolder: str | None) -> str:
    """PEFT's adapter name for an adapter saved in ``subfolder`` (``"default"`` when there is none)."""
    last = (subfolder or "").replace("\\", "/").rstrip("/").rpartition("/")[2]
    return last if last and "." not in last else "default"


# ------------------------------------------------------------------------------------- what PEFT stores


def can_store(layer: Any, module: str) -> str | None:
    """Why PEFT cannot store this layer (a kind without PEFT names, DoRA PEFT lacks, LyCORIS IA3), or ``None``."""
    row = PEFT_NAMES.get(layer.kind)
    if row is None:
        return f"{NAME} has no {layer.kind} layers"
    return row.limits(layer) if row.limits is not None else None


def kind_support() -> dict[str, KindSupport]:
    """The kinds PEFT files hold: one per :data:`~adaptkit.formats.peft_layers.PEFT_NAMES` row (registered ones too)."""
    return {kind: KindSupport(read=row.reader is not None, write=row.writer is not None, limited=row.limits is not None)
            for kind, row in PEFT_NAMES.items() if kind == row.kind}  # not the aliases (BONE files read as MiSS)


def can_name(module: str) -> str | None:
    """PEFT names every module path as it is (``None``)."""
    return None


def one_config_reasons(adapter: Adapter, name: str = NAME) -> dict[str, str]:
    """What one PEFT ``LoraConfig``-style config cannot hold: several kinds, DoRA on some LoRA layers only,
    ``fan_in_fan_out`` on some linear layers only. diffusers files hold PEFT configs too and share these limits.
    """
    reasons: dict[str, str] = {}
    layers = dict(adapter.layers)
    if not layers:
        return reasons
    kinds = {p: _family(l.kind) for p, l in layers.items()}
    counts = Counter(kinds.values())
    main_kind = "lora" if len(counts) > 1 and "lora" in counts else counts.most_common(1)[0][0]
    for p, kind in kinds.items():
        if kind != main_kind and not (name == NAME and _rides(kind, main_kind)):
            reasons[p] = f"a {name} adapter holds one kind and this one mixes {sorted(counts)}"
    same = {p: l for p, l in layers.items() if p not in reasons and kinds[p] == main_kind}
    if main_kind == "lora":
        dora = [p for p, l in same.items() if l.dora]
        if dora and len(dora) != len(same):
            reasons.update({p: f"{name} applies DoRA to all layers or none" for p in same if p not in dora})
    row = PEFT_NAMES.get(main_kind)
    if row is not None and not row.generic:  # the built-in kinds' layers say whether they are Conv1D
        fans = Counter(l.fan_in_fan_out for l in same.values() if l.module_type == "linear")
        if len(fans) > 1:
            minority = fans.most_common()[-1][0]
            reasons.update({p: f"{name} has one fan_in_fan_out per adapter and this one mixes Conv1D and Linear layers"
                            for p, l in same.items() if l.module_type == "linear" and l.fan_in_fan_out == minority})
    return reasons


def _rides(kind: str, host: str) -> bool:
    """Whether layers of ``kind`` go into a PEFT file of kind ``host`` (trainable tokens in a LoRA file)."""
    row, host_row = PEFT_NAMES.get(kind), PEFT_NAMES.get(host)
    return row is not None and host_row is not None and host_row.peft_type in row.hosts


def _family(kind: str) -> str:
    """The kind whose config a kind's layers are written in (``expert_lora`` goes in a LoRA config)."""
    row = PEFT_NAMES.get(kind)
    return kind if row is None else row_of_type(row.peft_type).kind


def _adapter_reasons(adapter: Adapter) -> dict[str, str]:
    reasons = one_config_reasons(adapter)
    rest = {p: l for p, l in adapter.layers.items() if p not in reasons}
    kinds = {_family(l.kind) for l in rest.values()}
    if kinds == {"lokr"}:
        reasons.update(peft_lokr.lokr_reasons(rest))
    elif len(kinds) == 1 and (row := PEFT_NAMES.get(next(iter(kinds)))) is not None:
        reasons.update(settings_limits(row, rest))
    return reasons


def can_store_adapter(adapter: Adapter, component: str | None = None, **_: Any) -> dict[str, str]:
    """What one PEFT adapter cannot hold together: ``{path: reason}``.

    :func:`one_config_reasons`, LoKr layouts PEFT's factorisation cannot rebuild, and settings of a registered
    kind that differ between layers; with ``component``, for each adapter :func:`split_components` writes.
    """
    if component is None:
        return _adapter_reasons(adapter)
    try:
        parts = split_components(adapter, component)
    except ConfigError:
        return {}  # the writer says what is wrong with the component
    out: dict[str, str] = {}
    for sub, part in parts.items():
        comp = sub or component
        out.update({f"{comp}.{p}": why for p, why in _adapter_reasons(part).items()})
    return out


def namespace(**_: Any) -> str:
    """Diffusion-transformer layers are written in diffusers' module names (original names are mapped first)."""
    return "diffusers"


def check_options(component: str | None = None, target_names: str | None = None, **_: Any) -> None:
    """Refuse a bad ``component=`` (see :func:`check_component`) or ``target_names=`` writer option."""
    check_component(component)
    if target_names is not None and target_names not in TARGET_NAMES:
        raise ConfigError(f"target_names={target_names!r}; use one of {', '.join(TARGET_NAMES)}")


# ---------------------------------------------------------------------------------------------- write


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


def _tensors_and_config(adapter: Adapter, prefix: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The PEFT tensors and config of an adapter PEFT can store (:func:`can_store` / :func:`can_store_adapter`)."""
    if not adapter.layers:
        raise UnsupportedError("the adapter has no layers; there is nothing to write")
    families = {p: _family(l.kind) for p, l in adapter.layers.items()}
    main = next((f for f in families.values() if not any(_rides(f, g) for g in families.values())),
                next(iter(families.values())))
    row = row_of_type(PEFT_NAMES[main].peft_type)
    cfg = _base_config(adapter, row.peft_type)
    tensors: dict[str, torch.Tensor] = {}
    row.writer({p: l for p, l in adapter.layers.items() if families[p] == main}, cfg, tensors, prefix)
    riders: dict[str, dict[str, Any]] = {}
    for p, l in adapter.layers.items():
        if families[p] != main:
            riders.setdefault(families[p], {})[p] = l
    for kind, layers in riders.items():
        PEFT_NAMES[kind].host_writer(layers, cfg, tensors, prefix)
    for key, t in adapter.extras.items():
        tensors[prefix + key.removeprefix(PREFIX)] = t
    return tensors, cfg


def to_state_dict(adapter: Adapter, prefix: str = PREFIX) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The PEFT tensors and ``adapter_config.json`` dict of an adapter, as :func:`write` saves them.

    Args:
        adapter: the adapter (one kind with PEFT names: LoRA, LoHa, LoKr, IA3 or a registered one).
        prefix: prepended to every tensor name; PEFT files use ``"base_model.model."``, transformers'
            ``get_adapter_state_dict`` uses ``""`` (names relative to the model itself).

    Returns:
        ``(tensors, config)``: tensors named ``<prefix><module path>.lora_A.weight`` (no adapter name),
        extras included; the config as a JSON-ready dict.

    Raises:
        UnsupportedError: what :func:`can_store` / :func:`can_store_adapter` refuse.
    """
    check_storable(sys.modules[__name__], adapter)  # type: ignore[arg-type]  # this module is the PEFT Format
    return _tensors_and_config(adapter, prefix)


def write(adapter: Adapter, path: str | Path, *, overwrite: bool = False, component: str | None = None,
          target_names: str | None = None, **_: Any) -> Path:
    """Write an adapter as a PEFT directory that ``PeftModel.from_pretrained`` loads.

    Args:
        adapter: the adapter (one kind: LoRA, LoHa, LoKr or IA3).
        path: output directory (must not exist unless ``overwrite``).
        overwrite: replace an existing directory.
        component: for an adapter of a pipeline (paths ``unet.…``, ``text_encoder.…``): ``"unet"`` (or another
            component) writes only that component's layers, in its own namespace, for
            ``PeftModel.from_pretrained(unet, path)``; ``"each"`` writes one such adapter per component into
            ``path/<component>/``. ``None`` writes every path as it is.
        target_names: ``"leaf"`` writes ``target_modules`` as bare module names (``q_proj``; PEFT then adapts every
            module of that name, and modules without tensors keep their zero-initialised B), for runtimes that match
            bare names only (SGLang); default ``"paths"``: the full module paths.

    Returns:
        The output directory.

    Raises:
        UnsupportedError: the adapter has no layers. The writer trusts :func:`can_store` and
            :func:`can_store_adapter` (:func:`adaptkit.formats.save` asks them first; they refuse mixed kinds, Full
            layers, DoRA on some layers only, LoKr shapes PEFT's factorisation cannot express).
        ConfigError: a ``component`` the adapter does not have.
    """
    parts = {}
    for sub, part in split_components(adapter, component).items():
        tensors, cfg = _tensors_and_config(part, PREFIX)
        if target_names == "leaf" and isinstance(cfg.get("target_modules"), list):
            cfg["target_modules"] = sorted({t.rsplit(".", 1)[-1] for t in cfg["target_modules"]})
        metadata = {k: v for k, v in part.metadata.items() if k != peft_params.ORIENTATION_KEY}
        metadata.update(peft_params.orientation_metadata(part.layers))  # what PEFT's files do not say
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


__all__ = [
    "namespace",
    "ALLOW_PATTERNS",
    "COMPONENTS",
    "LABEL",
    "LOOKED_FOR",
    "NAME",
    "WRITE_OPTIONS",
    "add_shared",
    "can_name",
    "can_store",
    "can_store_adapter",
    "check_component",
    "check_config",
    "check_options",
    "detect",
    "detect_keys",
    "fit_to_base",
    "is_adapter_file",
    "kind_support",
    "one_config_reasons",
    "read",
    "read_config",
    "read_tensors",
    "select_component",
    "select_files",
    "shared_stems",
    "split_components",
    "to_state_dict",
    "write",
]
