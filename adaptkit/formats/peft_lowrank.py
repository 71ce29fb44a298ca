"""PEFT's low-rank tuners beyond LoRA: readers, writers and limits of ADALORA, VERA, RANDLORA, VBLORA, DELORA,
GRALORA, MISS (and the old BONE) and FOURIERFT files.

Each reader gets one module's tensors by part name (the key stems are in the rows of
:data:`adaptkit.formats.peft_layers.PEFT_NAMES`), the model-level tensors the row declares ``shared`` (VeRA's
``base_model.vera_A``, the VB-LoRA vector bank) merged in by :func:`adaptkit.formats.peft.read_tensors`, and the
``adapter_config.json`` dict. What a file leaves open is left open: VeRA, RandLoRA, MiSS and FourierFT files do
not fix the module's weight shape, so those layers are read with ``shape=None`` and take the base's shape in
``fit`` (fuse, or ``ak.load(..., base=...)``). Every contradiction between the config and the tensors is a
:class:`~adaptkit.errors.ConfigError` naming the field.

Writers fill the config fields PEFT needs to rebuild the same modules (``init_r`` and a ``rank_pattern`` of masks
for pruned AdaLoRA layers, ``save_only_topk_weights`` for VB-LoRA, ``random_loc_seed`` for FourierFT) and write a
model-level tensor once under :func:`~adaptkit.formats.peft_common.shared_key`. ``*_limits`` functions (a row's ``adapter_limits``) say what one
config cannot hold (layers that disagree on a per-adapter setting or do not share the projections).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ..core.kinds import (
    AdaLoRA,
    DeLoRA,
    FourierFT,
    GraLoRA,
    RandLoRA,
    VBLoRA,
    VeRA,
)
from ..core.kinds.vblora import full_topk_weights
from ..core.kinds.vera import require_projections
from ..errors import ConfigError, FormatError
from .patterns import ConfigPatterns, PatternMatcher, build_pattern
from .peft_common import (
    config_mismatch,
    need,
    num,
    one_per_adapter,
    same_tensor,
    shared_key,
)
from .peft_common import fan as fan_of

Out = dict[str, torch.Tensor]


def _shape(out: int, inp: int, fan: bool) -> tuple[int, int]:
    """The module weight shape of a linear layer of math shape ``(out, inp)`` (``Conv1D`` stores the transpose)."""
    return (inp, out) if fan else (out, inp)


def _shared(p: Mapping[str, torch.Tensor], names: tuple[str, ...], stems: tuple[str, ...], cfg: Mapping[str, Any],
            module: str, kind: str) -> None:
    """Refuse a module whose model-level projections are not in the file (``save_projection=False`` or cut off)."""
    if all(n in p for n in names):
        return
    if cfg.get("save_projection") is False:
        require_projections(None, None, kind)
    keys = ", ".join(f"base_model.{s}" for s in stems)
    raise FormatError(f"{module}: the file lacks the shared {kind} projections {keys} that every layer uses; the "
                      "checkpoint is incomplete: re-save it with save_projection=True")


def _same_tensor(layers: Mapping[str, Any], names: tuple[str, ...], kind: str) -> dict[str, str]:
    """``{path: reason}`` for layers whose shared tensors (``names``) are not the first layer's."""
    reasons: dict[str, str] = {}
    first = next(iter(layers.values()), None)
    for path, layer in layers.items():
        for n in names:
            a, b = getattr(layer, n), getattr(first, n)
            if not same_tensor(a, b):
                reasons[path] = f"peft stores one {n} per {kind} adapter and this layer's differs from the others'"
                break
    return reasons


def _write_shared(layers: Mapping[str, Any], names: Mapping[str, str], out: Out, prefix: str) -> None:
    """The model-level tensors (``{field: stem}``) once, from the first layer (``*_limits`` checked they agree)."""
    first = next(iter(layers.values()))
    for field, stem in names.items():
        out[shared_key(prefix, stem)] = getattr(first, field)


def _config_int(cfg: Mapping[str, Any], key: str, kind: str) -> int:
    value = cfg.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"adapter_config.json of this {kind} adapter has {key}={value!r}; it must be a positive "
                          f"integer: fix {key}")
    return value


# ------------------------------------------------------------------------------------------------ AdaLoRA


def adalora_patterns(cfg: Mapping[str, Any]) -> ConfigPatterns:
    """AdaLoRA's ``rank_pattern`` holds masks, not ranks: the LoRA-style patterns are built without it."""
    return ConfigPatterns.of({k: v for k, v in cfg.items() if k != "rank_pattern"})


def _adalora_mask(cfg: Mapping[str, Any], module: str) -> list | None:
    """The ``rank_pattern`` mask of ``module`` (keys ``<module>.lora_E`` or ``<module>.lora_E.<adapter>``)."""
    for name, mask in (cfg.get("rank_pattern") or {}).items():
        head = name.rpartition(".lora_E")[0] if ".lora_E" in name else name.rpartition(".")[0]
        if head == module:
            if not isinstance(mask, list) or not all(isinstance(m, bool) for m in mask):
                raise ConfigError(f"rank_pattern['{name}'] of this AdaLoRA adapter is not a list of booleans (the mask "
                                  "of the ranks kept); fix rank_pattern")
            return mask
    return None


def read_adalora(module: str, p: dict[str, torch.Tensor], cfg: dict, patterns: ConfigPatterns) -> AdaLoRA:
    """An AdaLoRA layer: ``ranknum`` is ``init_r``; a pruned layer's rank is its ``rank_pattern`` mask's count."""
    need(p, {"a": "lora_A", "b": "lora_B", "e": "lora_E"}, module)
    init_r = _config_int(cfg, "init_r", "AdaLoRA")
    a, b, e = p["a"], p["b"], p["e"]
    rank = int(a.shape[0]) if a.ndim == 2 else -1
    mask = _adalora_mask(cfg, module)
    expected = sum(mask) if mask is not None else init_r
    if mask is not None and len(mask) != init_r:
        raise ConfigError(f"rank_pattern of {module} has {len(mask)} entries but init_r is {init_r}; fix rank_pattern")
    if rank != expected:
        raise config_mismatch(module, "rank_pattern" if mask is not None else "init_r", expected, rank, "rank")
    alpha = cfg.get("lora_alpha", 8)
    alpha = float(rank if alpha == 0 else alpha)  # peft's scaling: lora_alpha, or the rank when it is 0
    fan = fan_of(cfg)
    return AdaLoRA(a=a, b=b, e=e, alpha=alpha, ranknum=float(init_r), shape=_shape(b.shape[0], a.shape[1], fan),
                   fan_in_fan_out=fan)


def adalora_limits(layers: Mapping[str, AdaLoRA]) -> dict[str, str]:
    """One ``init_r`` (the divisor), one ``lora_alpha``, one ``fan_in_fan_out``; linear layers only."""
    reasons = {p: "peft's AdaLoRA files store a conv layer's kernel nowhere" for p, l in layers.items()
               if l.module_type != "linear"}
    reasons |= one_per_adapter(layers, lambda l: l.ranknum, "init_r")
    if not _alpha_is_rank(layers):  # lora_alpha=0: every layer's alpha is its rank
        reasons |= one_per_adapter(layers, lambda l: l.alpha, "lora_alpha")
    reasons |= one_per_adapter(layers, lambda l: l.fan_in_fan_out, "fan_in_fan_out")
    return reasons


def _alpha_is_rank(layers: Mapping[str, AdaLoRA]) -> bool:
    """Every layer's alpha is its own rank and they differ: peft's ``lora_alpha=0`` (scaling = the pruned rank)."""
    return all(l.alpha == l.rank for l in layers.values()) and len({l.rank for l in layers.values()}) > 1


def write_adalora(layers: dict[str, AdaLoRA], cfg: dict, out: Out, prefix: str) -> None:
    """AdaLoRA: ``init_r`` = ranknum; a layer of smaller rank gets a ``rank_pattern`` mask (peft prunes to it)."""
    first = next(iter(layers.values()))
    init_r = round(first.ranknum)
    masks = {f"{p}.lora_E": [True] * l.rank + [False] * (init_r - l.rank) for p, l in layers.items() if l.rank != init_r}
    alpha = 0 if _alpha_is_rank(layers) else num(first.alpha)
    cfg.update({"init_r": init_r, "lora_alpha": alpha, "rank_pattern": masks or None,
                "fan_in_fan_out": first.fan_in_fan_out, "target_modules": sorted(layers)})
    cfg.setdefault("r", init_r)
    cfg.setdefault("target_r", min(init_r, 8))
    cfg.setdefault("total_step", 1)
    cfg.setdefault("init_lora_weights", True)
    for path, l in layers.items():
        out[f"{prefix}{path}.lora_A"], out[f"{prefix}{path}.lora_B"], out[f"{prefix}{path}.lora_E"] = l.a, l.b, l.e


def adalora_limit(layer: AdaLoRA) -> str | None:
    """A ``ranknum`` that is not a whole number cannot be an ``init_r``."""
    if not float(layer.ranknum).is_integer() or layer.ranknum < layer.rank:
        return f"peft's AdaLoRA divides by init_r, a whole number at least the rank; this layer's is {layer.ranknum}"
    return None


# ------------------------------------------------------------------------------------------ VeRA, RandLoRA


def read_vera(module: str, p: dict[str, torch.Tensor], cfg: dict, patterns: ConfigPatterns) -> VeRA:
    """A VeRA layer on the shared ``vera_A``/``vera_B``; its ``in`` is the base's (``shape=None``)."""
    _shared(p, ("vera_a", "vera_b"), ("vera_A", "vera_B"), cfg, module, "VeRA")
    need(p, {"lambda_b": "vera_lambda_b", "lambda_d": "vera_lambda_d"}, module)
    r = cfg.get("r", 256)
    if p["lambda_d"].numel() != r or p["vera_a"].shape[0] != r:
        raise config_mismatch(module, "r", r, (p["lambda_d"].numel(), p["vera_a"].shape[0]),
                              "rank (vera_lambda_d / vera_A)")
    return VeRA(vera_a=p["vera_a"], vera_b=p["vera_b"], lambda_b=p["lambda_b"], lambda_d=p["lambda_d"], shape=None,
                fan_in_fan_out=fan_of(cfg))


def vera_limits(layers: Mapping[str, VeRA]) -> dict[str, str]:
    """One ``r``, one projection pair, one orientation."""
    return (one_per_adapter(layers, lambda l: l.rank, "r") | _same_tensor(layers, ("vera_a", "vera_b"), "VeRA")
            | one_per_adapter(layers, lambda l: l.fan_in_fan_out, "fan_in_fan_out"))


def write_vera(layers: dict[str, VeRA], cfg: dict, out: Out, prefix: str) -> None:
    """VeRA: the per-layer vectors and, once, the projections (``save_projection=True``)."""
    first = next(iter(layers.values()))
    cfg.update({"r": first.rank, "save_projection": True, "fan_in_fan_out": first.fan_in_fan_out,
                "target_modules": sorted(layers)})
    cfg.setdefault("projection_prng_key", 0)
    for path, l in layers.items():
        out[f"{prefix}{path}.vera_lambda_b"], out[f"{prefix}{path}.vera_lambda_d"] = l.lambda_b, l.lambda_d
    _write_shared(layers, {"vera_a": "vera_A", "vera_b": "vera_B"}, out, prefix)


def read_randlora(module: str, p: dict[str, torch.Tensor], cfg: dict, patterns: ConfigPatterns) -> RandLoRA:
    """A RandLoRA layer on the shared bases; which side is the larger is the base's to say (``shape=None``)."""
    _shared(p, ("randlora_a", "randlora_b"), ("randlora_A", "randlora_B"), cfg, module, "RandLoRA")
    need(p, {"lam": "randlora_lambda", "gamma": "randlora_gamma"}, module)
    r = cfg.get("r", 32)
    if p["lam"].shape[0] != r or p["randlora_a"].shape[0] != r:
        raise config_mismatch(module, "r", r, (p["lam"].shape[0], p["randlora_a"].shape[0]),
                              "rank (randlora_lambda / randlora_A)")
    alpha = cfg.get("randlora_alpha", 640)
    return RandLoRA(randlora_a=p["randlora_a"], randlora_b=p["randlora_b"], lam=p["lam"], gamma=p["gamma"],
                    alpha=float(alpha), shape=None, fan_in_fan_out=fan_of(cfg))


def randlora_limits(layers: Mapping[str, RandLoRA]) -> dict[str, str]:
    """One ``r``, one ``randlora_alpha``, one pair of bases, one orientation."""
    return (one_per_adapter(layers, lambda l: l.rank, "r") | one_per_adapter(layers, lambda l: l.alpha, "randlora_alpha")
            | _same_tensor(layers, ("randlora_a", "randlora_b"), "RandLoRA")
            | one_per_adapter(layers, lambda l: l.fan_in_fan_out, "fan_in_fan_out"))


def write_randlora(layers: dict[str, RandLoRA], cfg: dict, out: Out, prefix: str) -> None:
    """RandLoRA: lambda/gamma per layer, the bases once at model level and (as peft writes them) per layer."""
    first = next(iter(layers.values()))
    cfg.update({"r": first.rank, "randlora_alpha": num(first.alpha), "save_projection": True,
                "fan_in_fan_out": first.fan_in_fan_out, "target_modules": sorted(layers)})
    cfg.setdefault("projection_prng_key", 0)
    for path, l in layers.items():
        key = prefix + path
        out[f"{key}.randlora_lambda"], out[f"{key}.randlora_gamma"] = l.lam, l.gamma
        out[f"{key}.randlora_A"], out[f"{key}.randlora_B"] = first.randlora_a, first.randlora_b
    _write_shared(layers, {"randlora_a": "randlora_A", "randlora_b": "randlora_B"}, out, prefix)


# -------------------------------------------------------------------------------------------------- VB-LoRA


def read_vblora(module: str, p: dict[str, torch.Tensor], cfg: dict, patterns: ConfigPatterns) -> VBLoRA:
    """A VB-LoRA layer from full logits (top-k taken as peft takes it) or from ``save_only_topk_weights`` tensors."""
    if "bank" not in p:
        raise FormatError(f"{module}: the file lacks base_model.vblora_vector_bank, the vector bank every VB-LoRA "
                          "layer draws from; the checkpoint is incomplete")
    bank, fan = p["bank"], fan_of(cfg)
    topk = _config_int(cfg, "topk", "VB-LoRA")
    if "logits_a" in p or "logits_b" in p:
        need(p, {"logits_a": "vblora_logits_A", "logits_b": "vblora_logits_B"}, module)
        la, lb = p["logits_a"], p["logits_b"]
        if la.ndim != 3 or lb.ndim != 3 or la.shape[-1] != bank.shape[0] or lb.shape[-1] != bank.shape[0]:
            raise FormatError(f"{module}: vblora_logits_A {tuple(la.shape)} / vblora_logits_B {tuple(lb.shape)} are not "
                              f"(r, in/L, {bank.shape[0]}) / (out/L, r, {bank.shape[0]}) for the vector bank "
                              f"{tuple(bank.shape)}; the checkpoint is damaged")
        if topk > bank.shape[0]:
            raise config_mismatch(module, "topk", topk, bank.shape[0], "num_vectors", "topk is at most num_vectors")
        shape = _shape(lb.shape[0] * bank.shape[1], la.shape[1] * bank.shape[1], fan)
        return VBLoRA.from_logits(bank, la, lb, topk, shape, fan)
    need(p, {f"{x}_{s.lower()}": f"vblora_logits_{s}_topk_{y}" for s in "AB"
              for x, y in (("indices", "indices"), ("tw", "weights"))}, module)
    if p["tw_a"].shape[-1] != topk - 1 or p["tw_b"].shape[-1] != topk - 1:
        raise config_mismatch(module, "topk", topk, p["tw_a"].shape[-1] + 1,
                              "top-k weights per piece (the last dropped)")
    ia, ib = p["indices_a"], p["indices_b"]
    if ia.ndim != 3 or ib.ndim != 3:
        raise FormatError(f"{module}: top-k indices A {tuple(ia.shape)} / B {tuple(ib.shape)} are not 3-D; the "
                          "checkpoint is damaged")
    if int(max(ia.max(), ib.max())) >= bank.shape[0] or int(min(ia.min(), ib.min())) < 0:
        raise FormatError(f"{module}: top-k indices point outside the vector bank of {bank.shape[0]} vectors; the bank "
                          "belongs to another adapter")
    shape = _shape(ib.shape[0] * bank.shape[1], ia.shape[1] * bank.shape[1], fan)
    return VBLoRA(bank=bank, indices_a=ia, weights_a=full_topk_weights(p["tw_a"]), indices_b=ib,
                  weights_b=full_topk_weights(p["tw_b"]), shape=shape, fan_in_fan_out=fan)


def vblora_limits(layers: Mapping[str, VBLoRA]) -> dict[str, str]:
    """One bank, one ``topk``, one ``r``, one orientation."""
    return (_same_tensor(layers, ("bank",), "VB-LoRA") | one_per_adapter(layers, lambda l: l.weights_a.shape[-1], "topk")
            | one_per_adapter(layers, lambda l: l.rank, "r")
            | one_per_adapter(layers, lambda l: l.fan_in_fan_out, "fan_in_fan_out"))


def _index_dtype(count: int) -> torch.dtype:
    """The smallest integer dtype peft would store bank indices below ``count`` in."""
    return torch.uint8 if count <= 2**8 else torch.int16 if count <= 2**15 else torch.int32 if count <= 2**31 else torch.int64


def write_vblora(layers: dict[str, VBLoRA], cfg: dict, out: Out, prefix: str) -> None:
    """VB-LoRA in peft's ``save_only_topk_weights`` form (the layers hold the top-k, not the full logits)."""
    first = next(iter(layers.values()))
    bank = first.bank
    cfg.update({"r": first.rank, "topk": int(first.weights_a.shape[-1]), "num_vectors": int(bank.shape[0]),
                "vector_length": int(bank.shape[1]), "save_only_topk_weights": True,
                "fan_in_fan_out": first.fan_in_fan_out, "target_modules": sorted(layers)})
    idx = _index_dtype(int(bank.shape[0]))
    for path, l in layers.items():
        key = prefix + path
        for side, ind, w in (("A", l.indices_a, l.weights_a), ("B", l.indices_b, l.weights_b)):
            out[f"{key}.vblora_logits_{side}_topk_indices"] = ind.to(idx)
            out[f"{key}.vblora_logits_{side}_topk_weights"] = w[..., :-1].to(bank.dtype).contiguous()
    _write_shared(layers, {"bank": "vblora_vector_bank"}, out, prefix)


def vblora_limit(layer: VBLoRA) -> str | None:
    """peft stores the top-k weights with the last one dropped (it is 1 - the rest): topk must be at least 2."""
    if layer.weights_a.shape[-1] < 2:
        return "peft's VB-LoRA files store top-k weights with the last one dropped; topk must be at least 2"
    return None


# --------------------------------------------------------------------------------------------- DeLoRA, GraLoRA


def read_delora(module: str, p: dict[str, torch.Tensor], cfg: dict, patterns: ConfigPatterns) -> DeLoRA:
    """A DeLoRA layer (its ``delora_w_norm`` is in the file: no base needed)."""
    need(p, {"a": "delora_A", "b": "delora_B", "lam": "delora_lambda", "w_norm": "delora_w_norm"}, module)
    a, b = p["a"], p["b"]
    expected = patterns.rank_for(module, cfg.get("r", 8))
    if int(a.shape[0]) != int(expected):
        raise config_mismatch(module, "r/rank_pattern", expected, int(a.shape[0]), "rank")
    return DeLoRA(a=a, b=b, lam=p["lam"], w_norm=p["w_norm"], shape=(b.shape[0], a.shape[1]))


def delora_limit(layer: DeLoRA) -> str | None:
    """peft's DeLoRA adapts ``nn.Linear`` only."""
    return "peft's DeLoRA adapts nn.Linear only (this layer is a Conv1D)" if layer.fan_in_fan_out else None


def write_delora(layers: dict[str, DeLoRA], cfg: dict, out: Out, prefix: str) -> None:
    """DeLoRA: ``r``/``rank_pattern``; the lambdas and norms are tensors, the config's lambda only initialises."""
    r, rank_pattern = build_pattern({p: l.rank for p, l in layers.items()})
    cfg.update({"r": r, "rank_pattern": rank_pattern, "target_modules": sorted(layers)})
    cfg.setdefault("delora_lambda", num(float(next(iter(layers.values())).lam.reshape(()))))
    for path, l in layers.items():
        key = prefix + path
        out[f"{key}.delora_A"], out[f"{key}.delora_B"] = l.a, l.b
        out[f"{key}.delora_lambda"], out[f"{key}.delora_w_norm"] = l.lam, l.w_norm


def read_gralora(module: str, p: dict[str, torch.Tensor], cfg: dict, patterns: ConfigPatterns) -> GraLoRA:
    """A GraLoRA layer; ``r``, ``gralora_k`` and ``hybrid_r`` must be the config's."""
    need(p, {"ga": "gralora_A", "gb": "gralora_B"}, module)
    a, b = p["ga"], p["gb"]
    if a.ndim != 3 or b.ndim != 3:
        raise FormatError(f"{module}: gralora_A {tuple(a.shape)} / gralora_B {tuple(b.shape)} are not 3-D "
                          "(k, in/k, r) / (k, r, out/k); the checkpoint is damaged")
    for what, found, field, default in (("rank", a.shape[2], "r", 32), ("grid size", a.shape[0], "gralora_k", 2),
                                        ("hybrid rank", p["ga_general"].shape[0] if "ga_general" in p else 0, "hybrid_r", 0)):
        if int(found) != int(cfg.get(field, default)):
            raise config_mismatch(module, field, cfg.get(field, default), int(found), what)
    fan = fan_of(cfg)
    return GraLoRA(a=a, b=b, alpha=float(cfg.get("alpha", 64)), shape=_shape(b.shape[0] * b.shape[2], a.shape[0] * a.shape[1], fan),
                   a_general=p.get("ga_general"), b_general=p.get("gb_general"), fan_in_fan_out=fan)


def gralora_limits(layers: Mapping[str, GraLoRA]) -> dict[str, str]:
    """One ``r``, ``gralora_k``, ``hybrid_r``, ``alpha`` and orientation."""
    out: dict[str, str] = {}
    for value, field in ((lambda l: l.rank, "r"), (lambda l: l.k, "gralora_k"), (lambda l: l.hybrid_rank, "hybrid_r"),
                         (lambda l: l.alpha, "alpha"), (lambda l: l.fan_in_fan_out, "fan_in_fan_out")):
        out |= one_per_adapter(layers, value, field)
    return out


def write_gralora(layers: dict[str, GraLoRA], cfg: dict, out: Out, prefix: str) -> None:
    """GraLoRA: the grid factors and the hybrid LoRA (``gralora_*_general.weight``)."""
    first = next(iter(layers.values()))
    cfg.update({"r": first.rank, "gralora_k": first.k, "hybrid_r": first.hybrid_rank, "alpha": num(first.alpha),
                "fan_in_fan_out": first.fan_in_fan_out, "target_modules": sorted(layers)})
    for path, l in layers.items():
        key = prefix + path
        out[f"{key}.gralora_A"], out[f"{key}.gralora_B"] = l.a, l.b
        if l.a_general is not None:
            out[f"{key}.gralora_A_general.weight"], out[f"{key}.gralora_B_general.weight"] = l.a_general, l.b_general


# ------------------------------------------------------------------------------------------------- FourierFT


def read_fourierft(module: str, p: dict[str, torch.Tensor], cfg: dict, patterns: ConfigPatterns) -> FourierFT:
    """A FourierFT layer: positions drawn from ``random_loc_seed`` once the base's shape is known (``shape=None``)."""
    values = p["values"]
    n = PatternMatcher(cfg.get("n_frequency_pattern"), "n_frequency_pattern", "rank").value(module, cfg.get("n_frequency", 1000))
    if values.ndim != 1 or values.numel() != int(n):
        raise config_mismatch(module, "n_frequency/n_frequency_pattern", n, tuple(values.shape), "spectrum length")
    return FourierFT(values=values, indices=None, scaling=float(cfg.get("scaling", 150.0)), shape=None,
                     fan_in_fan_out=fan_of(cfg), seed=int(cfg.get("random_loc_seed", 777)))


def fourierft_limit(layer: FourierFT) -> str | None:
    """peft draws the positions from ``random_loc_seed``: a layer whose positions came from elsewhere cannot be stored."""
    if layer.seed is None:
        return "peft's FourierFT draws the spectrum positions from random_loc_seed; this layer's positions have no seed"
    return None


def fourierft_limits(layers: Mapping[str, FourierFT]) -> dict[str, str]:
    """One ``random_loc_seed``, one ``scaling``, one orientation."""
    return (one_per_adapter(layers, lambda l: l.seed, "random_loc_seed") | one_per_adapter(layers, lambda l: l.scaling, "scaling")
            | one_per_adapter(layers, lambda l: l.fan_in_fan_out, "fan_in_fan_out"))


def write_fourierft(layers: dict[str, FourierFT], cfg: dict, out: Out, prefix: str) -> None:
    """FourierFT: the spectra; their lengths as ``n_frequency``/``n_frequency_pattern``."""
    first = next(iter(layers.values()))
    n, pattern = build_pattern({p: int(l.values.numel()) for p, l in layers.items()})
    cfg.update({"n_frequency": n, "n_frequency_pattern": pattern, "scaling": num(first.scaling),
                "random_loc_seed": first.seed, "fan_in_fan_out": first.fan_in_fan_out, "target_modules": sorted(layers)})
    for path, l in layers.items():
        out[f"{prefix}{path}.fourierft_spectrum"] = l.values


__all__ = [
    "adalora_limit",
    "adalora_limits",
    "adalora_patterns",
    "delora_limit",
    "fourierft_limit",
    "fourierft_limits",
    "gralora_limits",
    "randlora_limits",
    "read_adalora",
    "read_delora",
    "read_fourierft",
    "read_gralora",
    "read_randlora",
    "read_vblora",
    "read_vera",
    "vblora_limit",
    "vblora_limits",
    "vera_limits",
    "write_adalora",
    "write_delora",
    "write_fourierft",
    "write_gralora",
    "write_randlora",
    "write_vblora",
    "write_vera",
]
