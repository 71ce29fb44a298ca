"""PEFT's names for each adapter kind, as one table: key stems, ``peft_type``, config fields, readers and writers.

:data:`PEFT_NAMES` maps a kind name to a :class:`PeftNames` row: the tensor-name stems PEFT stores after the
module path (``lora_A.weight``, ``hada_w1_a``) and the canonical part each holds, the ``peft_type`` of the
``adapter_config.json``, and how layers are built from the parts and written back. The built-in rows
(LORA, LOHA, LOKR, IA3, and the low-rank tuners of :mod:`~adaptkit.formats.peft_lowrank`) have their own
readers and writers because PEFT's config carries per-kind rules (``rank_pattern``, DoRA,
``feedforward_modules``, LoKr's recomputed factorisation, model-level tensors several layers share). A row added with
:func:`register_peft_names` is generic: the reader builds the layer with ``cls.from_parts(parts, shape=None,
settings=...)`` and the writer stores ``layer.parts()``, whose settings become config fields; nothing else in
the library needs to change for a new kind to load from and save to PEFT files and state dicts.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from ..core.kinds import IA3, KINDS, LoHa, LoKr, LoRA
from ..errors import ConfigError, FormatError
from . import peft_lokr, peft_lowrank, peft_other, peft_params
from .patterns import ConfigPatterns, build_pattern, matches_feedforward
from .peft_common import fan as fan_of
from .peft_common import need, num

#: ``reader(module, {part: tensor}, config, patterns) -> layer``
Reader = Callable[[str, dict[str, torch.Tensor], dict[str, Any], ConfigPatterns], Any]
#: ``writer({path: layer}, config, out tensors, key prefix)``: fills the config fields and the tensors
Writer = Callable[[dict[str, Any], dict[str, Any], dict[str, torch.Tensor], str], None]


@dataclass(frozen=True)
class PeftNames:
    """How PEFT names one kind.

    Args:
        kind: the kind name (:data:`adaptkit.core.kinds.KINDS`).
        peft_type: the config's ``peft_type``.
        parts: key stem after the module path -> canonical part name; when two stems hold the same part
            (``lora_magnitude_vector.weight`` and ``lora_magnitude_vector``), the first is written.
        settings: ``adapter_config.json`` field -> the setting name ``from_parts``/``parts`` use (generic rows).
        reader / writer: build the layers of a module / write an adapter's layers; a registered row's build with
            ``from_parts`` and write ``parts()`` (:func:`register_peft_names`).
        generic: a row added by :func:`register_peft_names`.
        infer: for a state dict without config: the config fields its tensors imply (``r``, ``feedforward_modules``);
            a result with ``r`` gets an alpha (a ``<module>.alpha`` key, else alpha = rank with a warning).
        limits: why PEFT cannot store one layer of the kind (``None`` when it can).
        shared: key stem of a model-level tensor (``base_model.vera_A``, no module path) -> the part every layer
            of the adapter gets (:func:`adaptkit.formats.peft.read_tensors` merges it into each module's parts).
        empty_ok: the kind has layers with empty tensors (AdaLoRA pruned to rank 0).
        patterns: ``cfg -> ConfigPatterns`` where the config's ``rank_pattern`` is not LoRA's (AdaLoRA's masks).
        adapter_limits: ``{path: reason}`` for the layers of one adapter one config cannot hold together
            (settings peft has once per adapter that differ between layers).
        hosts: ``peft_type`` s whose files also hold this kind's layers (LoRA's ``trainable_token_indices``), written
            by ``host_writer`` next to the host's own layers.
    """

    kind: str
    peft_type: str
    parts: Mapping[str, str]
    settings: Mapping[str, str] = field(default_factory=dict)
    reader: Reader | None = None
    writer: Writer | None = None
    generic: bool = False
    infer: Callable[[str, Mapping[str, torch.Tensor]], dict[str, Any]] | None = None
    limits: Callable[[Any], str | None] | None = None
    shared: Mapping[str, str] = field(default_factory=dict)
    empty_ok: bool = False
    patterns: Callable[[Mapping[str, Any]], ConfigPatterns] | None = None
    adapter_limits: Callable[[Mapping[str, Any]], dict[str, str]] | None = None
    hosts: tuple[str, ...] = ()
    host_writer: Writer | None = None

    @property
    def display(self) -> dict[str, str]:
        """Canonical part -> the key stem messages name (the first stem of each part)."""
        out: dict[str, str] = {}
        for stem, part in self.parts.items():
            out.setdefault(part, stem)
        return out


# --------------------------------------------------------------------------------------------- readers


def _check_rank(module: str, found: int, cfg: dict, patterns: ConfigPatterns) -> None:
    expected = patterns.rank_for(module, cfg.get("r"))
    if expected is not None and int(expected) != found:
        raise ConfigError(
            f"{module} has rank {found} in its tensors but adapter_config.json gives r={expected}; "
            "the config does not match the weights (fix r/rank_pattern)"
        )


def _read_lora(module: str, p: dict[str, torch.Tensor], cfg: dict, patterns: ConfigPatterns) -> LoRA:
    fan = fan_of(cfg)
    alpha = patterns.alpha_for(module, cfg.get("lora_alpha", 8))
    rslora = bool(cfg.get("use_rslora", False))
    magnitude = p.get("magnitude")
    if "emb_a" in p or "emb_b" in p:
        need(p, ("emb_a", "emb_b"), module)
        a, b = p["emb_a"], p["emb_b"]
        layer = LoRA(down=a, up=b, alpha=alpha, shape=(a.shape[1], b.shape[0]), module_type="embedding",
                     fan_in_fan_out=True, rslora=rslora,
                     magnitude=None if magnitude is None else magnitude.flatten(), bias=p.get("bias"))
    else:
        need(p, ("a", "b"), module)
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
    need(p, ("w1a", "w1b", "w2a", "w2b"), module)
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


def _lokr_rank(parts: Mapping[str, torch.Tensor]) -> int | None:
    """The rank a LoKr layer's split factors show (``None`` when both factors are full)."""
    if "w1a" in parts:
        return int(parts["w1a"].shape[1])
    if "t2" in parts:
        return int(parts["t2"].shape[0])
    if "w2a" in parts:
        return int(parts["w2a"].shape[1])
    return None


def _read_lokr(module: str, p: dict[str, torch.Tensor], cfg: dict, patterns: ConfigPatterns) -> LoKr:
    alpha = patterns.alpha_for(module, cfg.get("alpha", 8))
    r = int(patterns.rank_for(module, cfg.get("r", 8)))
    found = _lokr_rank(p)
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
    fan = fan_of(cfg)
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


def _read_generic(row: PeftNames) -> Reader:
    """A reader for a registered kind: ``cls.from_parts`` with the row's config fields as settings."""

    def read(module: str, p: dict[str, torch.Tensor], cfg: dict, patterns: ConfigPatterns) -> Any:
        cls = KINDS.get(row.kind)
        if cls is None:
            raise ConfigError(f"PEFT names are registered for kind '{row.kind}' but the kind is not; "
                              "register it with ak.register_kind first")
        settings = {name: cfg[key] for key, name in row.settings.items() if key in cfg}
        return cls.from_parts(dict(p), shape=None, settings=settings)

    return read


# --------------------------------------------------------------------------------- state-dict inference


def _infer_lora(module: str, parts: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    a = parts.get("a", parts.get("emb_a"))
    rank = None if a is None or a.ndim < 2 else int(a.shape[0])
    return {"r": rank or 1, "use_dora": "magnitude" in parts}


def _infer_loha(module: str, parts: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    w1b = parts.get("w1b")
    return {"r": int(w1b.shape[0]) if w1b is not None and w1b.ndim >= 2 else 1}


def _infer_lokr(module: str, parts: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    if any(t.ndim < 2 for t in parts.values() if t is not None):
        return {"r": 1}  # check_factors names the tensor
    return {"r": _lokr_rank(parts) or 1}


def _infer_ia3(module: str, parts: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    v = parts.get("ia3")
    on_input = v is not None and v.ndim == 2 and v.shape[0] == 1 and v.shape[1] != 1
    return {"feedforward_modules": [module] if on_input else []}


# --------------------------------------------------------------------------------------------- limits


def _dora_message(layer: Any, name: str) -> str:
    return f"{name} stores DoRA only per output feature on LoRA (this is {layer.kind}, axis {layer.magnitude_axis})"


def dora_limit(layer: Any, name: str = "peft") -> str | None:
    """Why a file with PEFT's DoRA (``name``: PEFT or diffusers) cannot hold a LoRA layer's magnitude, or ``None``."""
    return _dora_message(layer, name) if layer.dora and layer.magnitude_axis != 0 else None


def _no_dora(layer: Any) -> str | None:
    """PEFT has DoRA on LoRA rows only: why a LoHa/LoKr layer with a magnitude cannot be stored, or ``None``."""
    return _dora_message(layer, "peft") if layer.dora else None


def _ia3_limit(layer: IA3) -> str | None:
    if not (layer.on_input or layer.scale_bias):
        return "LyCORIS IA3 leaves this module's bias unscaled, PEFT's IA3 scales it"
    return None


# --------------------------------------------------------------------------------------------- writers


def write_lora(layers: dict[str, LoRA], cfg: dict, out: dict[str, torch.Tensor], prefix: str) -> None:
    """Fill ``cfg`` (``r``, ``lora_alpha``, patterns, DoRA, rsLoRA, ...) and ``out`` for LoRA layers.

    The layers are ones :func:`adaptkit.formats.peft.can_store` and ``can_store_adapter`` accepted (DoRA on all
    or none, per output feature; one ``fan_in_fan_out``). diffusers' writer uses it per pipeline component.
    Layers on parameter tensors (``experts()`` is not ``None``: PEFT's ``target_parameters``) share ``r``,
    ``lora_alpha`` and the patterns; :func:`adaptkit.formats.peft_params.write` names their tensors.
    """
    params = {p: l for p, l in layers.items() if l.experts() is not None}
    everything, layers = layers, {p: l for p, l in layers.items() if p not in params}
    dora = {p for p, l in layers.items() if l.magnitude is not None}
    all_rs = all(l.rslora for l in everything.values())
    ranks = {p: l.rank for p, l in everything.items()}
    # a mixed rsLoRA adapter is written without rsLoRA: alpha' = alpha * sqrt(r) gives the same scale
    alphas = {p: num(l.alpha if (l.rslora == all_rs) else l.scale * l.rank) for p, l in everything.items()}
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
    if params:
        peft_params.write(params, cfg, out, prefix)
    elif cfg.get("target_parameters"):
        cfg["target_parameters"] = None  # kept from the source config, but no layer targets a parameter now


def _write_loha(layers: dict[str, LoHa], cfg: dict, out: dict[str, torch.Tensor], prefix: str) -> None:
    r, rank_pattern = build_pattern({p: l.rank for p, l in layers.items()})
    alpha, alpha_pattern = build_pattern({p: num(l.alpha) for p, l in layers.items()})
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


def _write_lokr(layers: dict[str, LoKr], cfg: dict, out: dict[str, torch.Tensor], prefix: str) -> None:
    factor, decompose_both, ranks = peft_lokr.choose_layout(layers, cfg.get("decompose_factor", -1))
    r, rank_pattern = build_pattern(ranks)
    alpha, alpha_pattern = build_pattern({p: num(layers[p].scale * ranks[p]) for p in layers})
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


def _write_ia3(layers: dict[str, IA3], cfg: dict, out: dict[str, torch.Tensor], prefix: str) -> None:
    cfg.update({"target_modules": sorted(layers),
                "feedforward_modules": sorted(p for p, l in layers.items() if l.on_input),
                "fan_in_fan_out": any(l.fan_in_fan_out for l in layers.values())})
    cfg.setdefault("init_ia3_weights", True)
    for path, l in layers.items():
        v = l.vector
        if l.module_type == "conv":
            v = v.reshape(1, -1, 1, 1)
        else:
            v = v.reshape(1, -1) if l.on_input else v.reshape(-1, 1)
        out[f"{prefix}{path}.ia3_l"] = v


def layer_parts(layer: Any) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """A layer as ``(tensors by part name, settings)``: the protocol's ``parts()`` and ``settings()``."""
    return dict(layer.parts()), dict(layer.settings())


def _write_generic(row: PeftNames) -> Writer:
    """A writer for a registered kind: the tensors of ``layer.parts()`` under the row's stems, the settings as
    the row's config fields (the same for every layer: :func:`settings_limits` refuses adapters where they differ)."""
    stems = row.display

    def write(layers: dict[str, Any], cfg: dict, out: dict[str, torch.Tensor], prefix: str) -> None:
        fields = {name: key for key, name in row.settings.items()}
        for path, layer in layers.items():
            tensors, settings = layer_parts(layer)
            for part, t in tensors.items():
                out[f"{prefix}{path}.{stems[part]}"] = t
            for name, value in settings.items():
                if name in fields:
                    cfg[fields[name]] = value
        cfg["target_modules"] = sorted(layers)

    return write


def settings_limits(row: PeftNames, layers: Mapping[str, Any]) -> dict[str, str]:
    """Why a kind's layers cannot share one config: the row's ``adapter_limits`` rule, or for a generic kind a part
    with no PEFT name or settings that differ."""
    if row.adapter_limits is not None:
        return row.adapter_limits(layers)
    if not row.generic:
        return {}
    reasons: dict[str, str] = {}
    first: dict[str, Any] = {}
    stems = row.display
    for path, layer in layers.items():
        tensors, settings = layer_parts(layer)
        missing = sorted(set(tensors) - set(stems))
        if missing:
            reasons[path] = f"peft has no name for {row.kind} part(s) {missing} (register_peft_names(parts=...))"
            continue
        for name, value in settings.items():
            if name not in set(row.settings.values()):
                continue
            if first.setdefault(name, value) != value:
                reasons[path] = f"peft has one {name} per adapter and this adapter's {row.kind} layers differ"
    return reasons


# ----------------------------------------------------------------------------------------------- table

#: the one table of PEFT names: kind -> row; :func:`register_peft_names` adds to it
PEFT_NAMES: dict[str, PeftNames] = {
    "lora": PeftNames("lora", "LORA", {
        "lora_magnitude_vector.weight": "magnitude", "lora_magnitude_vector": "magnitude",
        "lora_embedding_A": "emb_a", "lora_embedding_B": "emb_b",
        "lora_A.weight": "a", "lora_B.weight": "b", "lora_B.bias": "bias",
    }, reader=_read_lora, writer=write_lora, infer=_infer_lora, limits=dora_limit),
    "loha": PeftNames("loha", "LOHA", {
        "hada_w1_a": "w1a", "hada_w1_b": "w1b", "hada_w2_a": "w2a", "hada_w2_b": "w2b", "hada_t1": "t1", "hada_t2": "t2",
    }, reader=_read_loha, writer=_write_loha, infer=_infer_loha, limits=_no_dora),
    "lokr": PeftNames("lokr", "LOKR", {
        "lokr_w1": "w1", "lokr_w1_a": "w1a", "lokr_w1_b": "w1b", "lokr_w2": "w2", "lokr_w2_a": "w2a",
        "lokr_w2_b": "w2b", "lokr_t2": "t2",
    }, reader=_read_lokr, writer=_write_lokr, infer=_infer_lokr, limits=_no_dora),
    "ia3": PeftNames("ia3", "IA3", {"ia3_l": "ia3"}, reader=_read_ia3, writer=_write_ia3, infer=_infer_ia3,
                     limits=_ia3_limit),
    # issue 14: low-rank tuners (peft_lowrank)
    "adalora": PeftNames("adalora", "ADALORA", {"lora_A": "a", "lora_B": "b", "lora_E": "e"},
                         reader=peft_lowrank.read_adalora, writer=peft_lowrank.write_adalora,
                         limits=peft_lowrank.adalora_limit, empty_ok=True, patterns=peft_lowrank.adalora_patterns,
                         adapter_limits=peft_lowrank.adalora_limits),
    "vera": PeftNames("vera", "VERA", {"vera_lambda_b": "lambda_b", "vera_lambda_d": "lambda_d"},
                      reader=peft_lowrank.read_vera, writer=peft_lowrank.write_vera,
                      shared={"vera_A": "vera_a", "vera_B": "vera_b"}, adapter_limits=peft_lowrank.vera_limits),
    "randlora": PeftNames("randlora", "RANDLORA", {
        "randlora_lambda": "lam", "randlora_gamma": "gamma", "randlora_A": "randlora_a", "randlora_B": "randlora_b",
    }, reader=peft_lowrank.read_randlora, writer=peft_lowrank.write_randlora,
        shared={"randlora_A": "randlora_a", "randlora_B": "randlora_b"}, adapter_limits=peft_lowrank.randlora_limits),
    "vblora": PeftNames("vblora", "VBLORA", {
        "vblora_logits_A": "logits_a", "vblora_logits_B": "logits_b",
        "vblora_logits_A_topk_indices": "indices_a", "vblora_logits_A_topk_weights": "tw_a",
        "vblora_logits_B_topk_indices": "indices_b", "vblora_logits_B_topk_weights": "tw_b",
    }, reader=peft_lowrank.read_vblora, writer=peft_lowrank.write_vblora, limits=peft_lowrank.vblora_limit,
        shared={"vblora_vector_bank": "bank"},
        adapter_limits=peft_lowrank.vblora_limits),
    "delora": PeftNames("delora", "DELORA", {
        "delora_A": "a", "delora_B": "b", "delora_lambda": "lam", "delora_w_norm": "w_norm",
    }, reader=peft_lowrank.read_delora, writer=peft_lowrank.write_delora, limits=peft_lowrank.delora_limit),
    "gralora": PeftNames("gralora", "GRALORA", {
        "gralora_A": "ga", "gralora_B": "gb", "gralora_A_general.weight": "ga_general",
        "gralora_B_general.weight": "gb_general",
    }, reader=peft_lowrank.read_gralora, writer=peft_lowrank.write_gralora, adapter_limits=peft_lowrank.gralora_limits),
    # Bone (peft < 0.17, removed since): MiSS under its old name, read only (MiSS layers are written as MISS)
    "bone": PeftNames("miss", "BONE", {"bone_block": "block"}, reader=peft_other.read_miss),
    "fourierft": PeftNames("fourierft", "FOURIERFT", {"fourierft_spectrum": "values"},
                           reader=peft_lowrank.read_fourierft, writer=peft_lowrank.write_fourierft,
                           limits=peft_lowrank.fourierft_limit, adapter_limits=peft_lowrank.fourierft_limits),
    # LoRA on parameter tensors (target_parameters): a LORA file; peft.read_tensors sends it the parameter groups
    "expert_lora": PeftNames("expert_lora", "LORA", {"lora_A.weight": "a", "lora_B.weight": "b"},
                             reader=peft_params.read_layer, writer=write_lora),
    # issue 14: other tuners (peft_other)
    "waveft": PeftNames("waveft", "WAVEFT", {"waveft_spectrum": "values"}, reader=peft_other.read_waveft,
                        writer=peft_other.write_waveft, adapter_limits=peft_other.waveft_limits),
    "shira": PeftNames("shira", "SHIRA", {"shira_weight": "values", "shira_indices": "indices"},
                       reader=peft_other.read_shira, writer=peft_other.write_shira, adapter_limits=peft_other.shira_limits),
    "c3a": PeftNames("c3a", "C3A", {"c3a_kernel": "kernel"}, reader=peft_other.read_c3a, writer=peft_other.write_c3a,
                     limits=peft_other.c3a_limit),
    "oft": PeftNames("oft", "OFT", {"oft_R.weight": "weight", "oft_embedding_R.weight": "emb_weight", "oft_r": "old_r"},
                     reader=peft_other.read_oft, writer=peft_other.write_oft, adapter_limits=peft_other.oft_limits),
    "boft": PeftNames("boft", "BOFT", {"boft_R": "boft_r", "boft_s": "boft_s"}, reader=peft_other.read_boft,
                      writer=peft_other.write_boft, adapter_limits=peft_other.boft_limits),
    "hra": PeftNames("hra", "HRA", {"hra_u": "u"}, reader=peft_other.read_hra, writer=peft_other.write_hra,
                     adapter_limits=peft_other.hra_limits),
    # plain MiSS and "bat" share one MISS file; the reader dispatches on init_weights, the writer on the block
    "miss": PeftNames("miss", "MISS", {"miss_block": "block"}, reader=peft_other.read_miss, writer=peft_other.write_miss,
                      limits=peft_other.miss_limit, adapter_limits=peft_other.miss_limits),
    "miss_bat": PeftNames("miss_bat", "MISS", {"miss_block": "block"}, reader=peft_other.read_miss,
                          writer=peft_other.write_miss),
    "ln_tuning": PeftNames("ln_tuning", "LN_TUNING", {"ln_tuning_layers.weight": "weight",
                                                      "ln_tuning_layers.bias": "bias"},
                           reader=peft_other.read_ln_tuning, writer=peft_other.write_ln_tuning),
    "trainable_tokens": PeftNames("trainable_tokens", "TRAINABLE_TOKENS", {"trainable_tokens_delta": "values"},
                                  reader=peft_other.read_tokens, writer=peft_other.write_tokens,
                                  adapter_limits=peft_other.tokens_limits, hosts=("LORA",),
                                  host_writer=peft_other.write_token_adapters),
}


def register_peft_names(kind: str, *, peft_type: str, parts: Mapping[str, str],
                        settings: Mapping[str, str] | None = None) -> PeftNames:
    """Teach the PEFT format (files and state dicts) a kind's names: one row of :data:`PEFT_NAMES`.

    Layers of the kind are then read with ``cls.from_parts(parts, shape=None, settings=...)`` and written from
    ``layer.parts()`` (see :mod:`adaptkit.formats.peft_layers`).

    Args:
        kind: the kind name, as :func:`adaptkit.register_kind` registered it.
        peft_type: the ``peft_type`` its ``adapter_config.json`` has (``"TOY"``).
        parts: key stem after the module path -> the part name ``from_parts`` takes (``{"toy_s": "s"}``).
        settings: ``adapter_config.json`` field -> setting name (``{"toy_gain": "gain"}``).

    Returns:
        The new row.

    Raises:
        ConfigError: the kind has a row already, the ``peft_type`` or a stem belongs to another kind, or a stem
            is not a plain name (letters, digits, ``_`` and ``.``).
    """
    if kind in PEFT_NAMES:
        raise ConfigError(f"kind '{kind}' has PEFT names already ({PEFT_NAMES[kind].peft_type}); "
                          "register a new kind name instead")
    owner = next((r.kind for r in PEFT_NAMES.values() if r.peft_type == peft_type), None)
    if owner is not None:
        raise ConfigError(f"peft_type '{peft_type}' belongs to kind '{owner}'; choose another peft_type")
    if not parts:
        raise ConfigError(f"kind '{kind}' needs at least one PEFT key stem; pass parts={{'stem': 'part'}}")
    taken: dict[str, str] = {}
    for r in PEFT_NAMES.values():  # a stem two rows share (LoRA and expert_lora) belongs to the first
        for stem in r.parts:
            taken.setdefault(stem, r.kind)
    for stem in parts:
        if not re.fullmatch(r"[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*", stem):
            raise ConfigError(f"PEFT key stem {stem!r} is not a plain name; use letters, digits, '_' and '.'")
        if stem in taken:
            raise ConfigError(f"PEFT key stem '{stem}' belongs to kind '{taken[stem]}'; choose another stem")
    row = PeftNames(kind, peft_type, dict(parts), dict(settings or {}), generic=True)
    row = PeftNames(kind, peft_type, dict(parts), dict(settings or {}), reader=_read_generic(row),
                    writer=_write_generic(row), generic=True)
    PEFT_NAMES[kind] = row
    return row


# ------------------------------------------------------------------------------------------- lookups


def peft_types() -> tuple[str, ...]:
    """The ``peft_type`` values adaptkit reads, in table order."""
    return tuple(dict.fromkeys(r.peft_type for r in PEFT_NAMES.values()))


def row_of_type(peft_type: str) -> PeftNames:
    """The row of a ``peft_type`` (the first: ``LORA`` is the LoRA row, whose writer also writes expert_lora)."""
    return next(r for r in PEFT_NAMES.values() if r.peft_type == peft_type)


#: (the rows of PEFT_NAMES, their stems longest first) as last sorted by :func:`_stems_longest_first`
_STEMS: list[tuple[tuple[PeftNames, ...], tuple[tuple[str, PeftNames], ...]]] = [((), ())]


def _stems_longest_first() -> tuple[tuple[str, PeftNames], ...]:
    """Every tensor-name stem of :data:`PEFT_NAMES` with its row, longest first: sorted again only when the table's
    rows changed (registration), not for every key."""
    rows = tuple(PEFT_NAMES.values())
    seen, stems = _STEMS[0]
    if len(rows) != len(seen) or any(a is not b for a, b in zip(rows, seen)):
        stems = tuple(sorted(((stem, r) for r in rows for stem in r.parts), key=lambda s: len(s[0]), reverse=True))
        _STEMS[0] = (rows, stems)
    return stems


def split_key(key: str) -> tuple[str, str, str] | None:
    """``(module_path, peft_type, part)`` for an adapter tensor key, ``None`` for anything else.

    The longest matching stem wins (``lora_magnitude_vector.weight`` before ``lora_magnitude_vector``).
    """
    for stem, row in _stems_longest_first():
        if key.endswith("." + stem):
            return key[: -len(stem) - 1], row.peft_type, row.parts[stem]
    return None


def strip_adapter_name(key: str) -> str:
    """A key as ``model.state_dict()`` writes it (``lora_A.default.weight``, ``hada_w1_a.default``) without the
    adapter name; keys without one come back unchanged."""
    for stem in sorted({s for r in PEFT_NAMES.values() for s in r.parts}, key=len, reverse=True):
        head, dot, tail = stem.rpartition(".")
        if dot and tail in ("weight", "bias"):
            m = re.search(rf"\.({re.escape(head)})\.([^.]+)\.({tail})$", key)
        else:
            m = re.search(rf"\.({re.escape(stem)})\.([^.]+)$", key)
        if m and m.group(2) not in ("weight", "bias"):
            return key[: m.start()] + "." + stem
    return key


__all__ = ["PEFT_NAMES", "PeftNames", "dora_limit", "layer_parts", "peft_types", "register_peft_names", "row_of_type",
           "settings_limits", "split_key", "strip_adapter_name", "write_lora"]
