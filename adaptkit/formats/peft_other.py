"""PEFT files of the other tuners: WAVEFT, SHIRA, C3A, OFT, BOFT, HRA, MISS (plain and "bat"), LN_TUNING, TRAINABLE_TOKENS.

Readers (``reader(module, {part: tensor}, config, patterns)``), writers (``writer({path: layer}, config, out,
prefix)``) and adapter-level limits for the rows of :data:`adaptkit.formats.peft_layers.PEFT_NAMES` (this module
does not import that one). What the files leave open:

* the module weight shape, wherever the tensors do not fix it (OFT, HRA, MiSS, BOFT conv, SHiRA, WaveFT,
  trainable tokens): layers are read with ``shape=None`` and take the base's shape in ``fit`` (fuse, convert
  with a base); an operation that needs the shape without a base says to pass the base;
* WaveFT's positions: drawn from ``random_loc_seed`` once the shape is known;
* trainable tokens' row numbers: the config's ``token_indices`` (``trainable_token_indices`` in a LoRA file,
  whose tokens sit under ``<embedding>.token_adapter``).

Every config field that disagrees with the tensors is a :class:`~adaptkit.errors.ConfigError` naming the module.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from ..core.kinds import (
    BOFT,
    C3A,
    HRA,
    OFT,
    LNTuning,
    MiSS,
    MiSSBat,
    SHiRA,
    TrainableTokens,
    WaveFT,
)
from ..core.kinds.oft import block_size_of
from ..errors import ConfigError, FormatError
from .patterns import ConfigPatterns, build_pattern, pattern_value
from .peft_common import config_mismatch, need, num, one_per_adapter
from .peft_common import fan as fan_of

#: where a LoRA file with ``trainable_token_indices`` keeps an embedding's tokens: ``<module>.token_adapter.<stem>``
TOKEN_ADAPTER = ".token_adapter"


# ------------------------------------------------------------------------------------------ dense additive


def read_waveft(module: str, p: dict[str, torch.Tensor], cfg: dict, patterns: ConfigPatterns) -> WaveFT:
    """WAVEFT: ``waveft_spectrum`` only; positions from ``random_loc_seed`` once the base fixes the shape."""
    need(p, ("values",), module)
    n = pattern_value(cfg.get("n_frequency_pattern"), module, cfg.get("n_frequency"))
    if n is not None and not cfg.get("proportional_parameters") and int(n) != p["values"].numel():
        raise config_mismatch(module, "n_frequency", n, p["values"].numel(), "coefficients")
    return WaveFT(values=p["values"], indices=None, scaling=float(cfg.get("scaling", 25.0)), shape=None,
                  wavelet_family=cfg.get("wavelet_family", "db1"), use_idwt=bool(cfg.get("use_idwt", True)),
                  fan_in_fan_out=fan_of(cfg),
                  random_loc_seed=int(cfg.get("random_loc_seed", 777)))


def write_waveft(layers: dict[str, WaveFT], cfg: dict, out: dict[str, torch.Tensor], prefix: str) -> None:
    """WAVEFT config (``n_frequency`` + pattern, ``scaling``, family, seed) and spectra."""
    first = next(iter(layers.values()))
    n, pattern = build_pattern({p: int(l.values.numel()) for p, l in layers.items()})
    cfg.update({"n_frequency": n, "n_frequency_pattern": pattern, "proportional_parameters": False,
                "scaling": num(first.scaling), "wavelet_family": first.wavelet_family, "use_idwt": first.use_idwt,
                "random_loc_seed": first.random_loc_seed, "fan_in_fan_out": first.fan_in_fan_out,
                "target_modules": sorted(layers)})
    cfg.setdefault("init_weights", True)
    for path, l in layers.items():
        out[f"{prefix}{path}.waveft_spectrum"] = l.values


def waveft_limits(layers: Mapping[str, WaveFT]) -> dict[str, str]:
    """One ``scaling``/family/``use_idwt``/orientation per adapter; positions peft redraws from the seed."""
    reasons = {p: "peft redraws WaveFT positions from random_loc_seed and these were given explicitly"
               for p, l in layers.items() if l.random_loc_seed is None}
    for what, value in (("scaling", lambda l: l.scaling), ("wavelet_family", lambda l: l.wavelet_family),
                        ("use_idwt", lambda l: l.use_idwt), ("random_loc_seed", lambda l: l.random_loc_seed),
                        ("fan_in_fan_out", lambda l: l.fan_in_fan_out)):
        reasons = one_per_adapter(layers, value, what) | reasons
    return reasons


def read_shira(module: str, p: dict[str, torch.Tensor], cfg: dict, patterns: ConfigPatterns) -> SHiRA:
    """SHIRA: ``shira_weight`` + integer ``shira_indices``; the shape comes from the base."""
    need(p, ("values", "indices"), module)
    return SHiRA(values=p["values"], indices=p["indices"], shape=None,
                 fan_in_fan_out=fan_of(cfg))


def _shira_r(layer: SHiRA) -> float | None:
    if layer.shape is None:
        return None
    return layer.values.numel() / sum(layer.shape)


def write_shira(layers: dict[str, SHiRA], cfg: dict, out: dict[str, torch.Tensor], prefix: str) -> None:
    """SHIRA config (``r``: peft sizes each layer ``r * (in + out)``) and the values and positions."""
    rs = {r for l in layers.values() if (r := _shira_r(l)) is not None}
    if rs:
        cfg["r"] = num(rs.pop())
    cfg.update({"fan_in_fan_out": any(l.fan_in_fan_out for l in layers.values()), "target_modules": sorted(layers)})
    cfg.setdefault("mask_type", "random")
    for path, l in layers.items():
        out[f"{prefix}{path}.shira_weight"] = l.values
        out[f"{prefix}{path}.shira_indices"] = l.indices


def shira_limits(layers: Mapping[str, SHiRA]) -> dict[str, str]:
    """peft's one ``r`` must give every layer's number of values as ``r * (in + out)``."""
    reasons = {p: f"peft stores r * (in + out) SHiRA values per layer and {l.values.numel()} is no integer multiple "
               f"of in + out = {sum(l.shape)}" for p, l in layers.items()
               if l.shape is not None and not float(_shira_r(l)).is_integer()}
    known = {p: l for p, l in layers.items() if l.shape is not None and p not in reasons}
    return one_per_adapter(known, _shira_r, "r (SHiRA values per in + out)") | reasons


def read_c3a(module: str, p: dict[str, torch.Tensor], cfg: dict, patterns: ConfigPatterns) -> C3A:
    """C3A: ``c3a_kernel (out / b, in / b, b)`` fixes the weight shape."""
    need(p, ("kernel",), module)
    k = p["kernel"]
    if k.ndim != 3:
        raise FormatError(f"{module}: c3a_kernel has shape {tuple(k.shape)}; it must be (out / b, in / b, b)")
    b = pattern_value(cfg.get("block_size_pattern"), module, cfg.get("block_size"))
    if b is not None and int(b) != k.shape[2]:
        raise config_mismatch(module, "block_size", b, k.shape[2], "block size")
    return C3A(kernel=k, shape=(k.shape[0] * k.shape[2], k.shape[1] * k.shape[2]))


def write_c3a(layers: dict[str, C3A], cfg: dict, out: dict[str, torch.Tensor], prefix: str) -> None:
    """C3A config (``block_size`` + pattern) and kernels."""
    b, pattern = build_pattern({p: l.block_size for p, l in layers.items()})
    cfg.update({"block_size": b, "block_size_pattern": pattern, "target_modules": sorted(layers)})
    for path, l in layers.items():
        out[f"{prefix}{path}.c3a_kernel"] = l.kernel


def c3a_limit(layer: C3A) -> str | None:
    """peft's C3A adapts ``nn.Linear`` only."""
    return "peft's C3A adapts nn.Linear only, not a Conv1D (fan_in_fan_out)" if layer.fan_in_fan_out else None


# ------------------------------------------------------------------------------------------ multiplicative


def read_oft(module: str, p: dict[str, torch.Tensor], cfg: dict, patterns: ConfigPatterns) -> OFT:
    """OFT (peft >= 0.15 layout ``oft_R.weight`` / ``oft_embedding_R.weight``); the shape comes from the base."""
    if "old_r" in p:
        raise FormatError(f"{module} holds oft_r blocks, the OFT layout of peft < 0.15; load it with that peft and "
                          "re-save it with peft >= 0.15 (oft_R.weight)")
    emb = "emb_weight" in p
    w = p["emb_weight"] if emb else p.get("weight")
    if w is None:
        raise FormatError(f"{module} lacks tensor oft_R.weight; the checkpoint is incomplete")
    if w.ndim != 2:
        raise FormatError(f"{module}: oft_R.weight has shape {tuple(w.shape)}; it must be (n_blocks, b(b-1)/2)")
    b = block_size_of(int(w.shape[1]))
    size = int(cfg.get("oft_block_size") or 0)
    if size and size != b:
        raise config_mismatch(module, "oft_block_size", size, b, "block size")
    share = bool(cfg.get("block_share", False))
    if share and w.shape[0] != 1:
        raise config_mismatch(module, "block_share", True, w.shape[0], "blocks")
    r = int(cfg.get("r") or 0)
    if r and not share and not size and r != w.shape[0]:
        raise config_mismatch(module, "r", r, w.shape[0], "blocks")
    return OFT(weight=w, shape=None, module_type="embedding" if emb else "linear", coft=bool(cfg.get("coft", False)),
               eps=float(cfg.get("eps", 6e-5)), use_cayley_neumann=bool(cfg.get("use_cayley_neumann", True)),
               num_cayley_neumann_terms=int(cfg.get("num_cayley_neumann_terms", 5)))


def _shared(layer: OFT) -> bool:
    return layer.weight.shape[0] == 1 and (layer.shape is None or layer.rank > 1)


def write_oft(layers: dict[str, OFT], cfg: dict, out: dict[str, torch.Tensor], prefix: str) -> None:
    """OFT config (``oft_block_size``, ``r=0``, COFT, sharing, Cayley form) and ``oft_R.weight`` rows."""
    first = next(iter(layers.values()))
    cfg.update({"r": 0, "oft_block_size": first.block_size, "coft": first.coft, "eps": first.eps,
                "block_share": any(_shared(l) for l in layers.values()) or bool(cfg.get("block_share")) and all(
                    l.weight.shape[0] == 1 for l in layers.values()),
                "use_cayley_neumann": first.use_cayley_neumann,
                "num_cayley_neumann_terms": first.num_cayley_neumann_terms, "fan_in_fan_out": False,
                "target_modules": sorted(layers)})
    cfg.setdefault("init_weights", True)
    for path, l in layers.items():
        stem = "oft_embedding_R.weight" if l.module_type == "embedding" else "oft_R.weight"
        out[f"{prefix}{path}.{stem}"] = l.weight


def oft_limits(layers: Mapping[str, OFT]) -> dict[str, str]:
    """One block size, COFT setting, Cayley form and block sharing per adapter."""
    reasons: dict[str, str] = {}
    for what, value in (("oft_block_size", lambda l: l.block_size), ("coft", lambda l: l.coft),
                        ("eps", lambda l: l.eps), ("use_cayley_neumann", lambda l: l.use_cayley_neumann),
                        ("num_cayley_neumann_terms", lambda l: l.num_cayley_neumann_terms)):
        reasons = one_per_adapter(layers, value, what) | reasons
    if any(_shared(l) for l in layers.values()):
        reasons |= {p: "peft has one block_share per adapter and this layer's blocks are not shared"
                    for p, l in layers.items() if l.weight.shape[0] != 1}
    return reasons


def read_boft(module: str, p: dict[str, torch.Tensor], cfg: dict, patterns: ConfigPatterns) -> BOFT:
    """BOFT: ``boft_R (m, n_blocks, b, b)`` and ``boft_s`` (``(out, 1)`` linear, ``(1, out)`` conv)."""
    need(p, ("boft_r", "boft_s"), module)
    r, s = p["boft_r"], p["boft_s"]
    if r.ndim != 4 or s.ndim != 2:
        raise FormatError(f"{module}: boft_R {tuple(r.shape)} / boft_s {tuple(s.shape)} are not (m, blocks, b, b) / "
                          "(out, 1) or (1, out)")
    size, num = int(cfg.get("boft_block_size") or 0), int(cfg.get("boft_block_num") or 0)
    if size and size != r.shape[2]:
        raise config_mismatch(module, "boft_block_size", size, r.shape[2], "block size")
    if num and num != r.shape[1]:
        raise config_mismatch(module, "boft_block_num", num, r.shape[1], "blocks")
    conv = s.shape[0] == 1 and s.shape[1] != 1
    shape = None if conv else (int(s.shape[0]), int(r.shape[1] * r.shape[2]))
    return BOFT(boft_r=r, boft_s=s, shape=shape, module_type="conv" if conv else "linear")


def write_boft(layers: dict[str, BOFT], cfg: dict, out: dict[str, torch.Tensor], prefix: str) -> None:
    """BOFT config (``boft_block_size``, factors from the tensors) and ``boft_R``/``boft_s``."""
    first = next(iter(layers.values()))
    cfg.update({"boft_block_size": int(first.boft_r.shape[2]), "boft_block_num": 0,
                "boft_n_butterfly_factor": first.factors_count, "fan_in_fan_out": False,
                "target_modules": sorted(layers)})
    for path, l in layers.items():
        out[f"{prefix}{path}.boft_R"] = l.boft_r
        out[f"{prefix}{path}.boft_s"] = l.boft_s


def boft_limits(layers: Mapping[str, BOFT]) -> dict[str, str]:
    """One block size and number of butterfly factors per adapter."""
    return one_per_adapter(layers, lambda l: int(l.boft_r.shape[2]), "boft_block_size") | one_per_adapter(
        layers, lambda l: l.factors_count, "boft_n_butterfly_factor")


def read_hra(module: str, p: dict[str, torch.Tensor], cfg: dict, patterns: ConfigPatterns) -> HRA:
    """HRA: ``hra_u (in * k, r)``; the output size comes from the base."""
    need(p, ("u",), module)
    u = p["u"]
    if u.ndim != 2:
        raise FormatError(f"{module}: hra_u has shape {tuple(u.shape)}; it must be (in * k, r)")
    r = cfg.get("r")
    if r is not None and int(r) != u.shape[1]:
        raise config_mismatch(module, "r", r, u.shape[1], "reflections")
    return HRA(u=u, shape=None, apply_gs=bool(cfg.get("apply_GS", False)))


def write_hra(layers: dict[str, HRA], cfg: dict, out: dict[str, torch.Tensor], prefix: str) -> None:
    """HRA config (``r``, ``apply_GS``) and ``hra_u``."""
    first = next(iter(layers.values()))
    cfg.update({"r": first.rank, "apply_GS": first.apply_gs, "target_modules": sorted(layers)})
    for path, l in layers.items():
        out[f"{prefix}{path}.hra_u"] = l.u


def hra_limits(layers: Mapping[str, HRA]) -> dict[str, str]:
    """One ``r`` and ``apply_GS`` per adapter."""
    return one_per_adapter(layers, lambda l: l.rank, "r") | one_per_adapter(layers, lambda l: l.apply_gs, "apply_GS")


def read_miss(module: str, p: dict[str, torch.Tensor], cfg: dict, patterns: ConfigPatterns) -> MiSS | MiSSBat:
    """MISS: ``miss_block``; ``init_weights="bat"`` is the base-dependent layout (:class:`MiSSBat`), else plain MiSS."""
    need(p, ("block",), module)
    block = p["block"]
    bat = cfg.get("init_weights") == "bat"
    r = cfg.get("r")
    if bat:
        if block.ndim != 3 or block.shape[1] != block.shape[2]:
            raise config_mismatch(module, "init_weights", "bat", tuple(block.shape), "a block of shape (bat is (out / r, r, r))")
        if r is not None and int(r) != block.shape[2]:
            raise config_mismatch(module, "r", r, block.shape[2], "tile size")
        return MiSSBat(block=block, shape=None)
    if block.ndim != 2:
        raise config_mismatch(module, "init_weights", cfg.get("init_weights"), tuple(block.shape),
                        "a 3-D block (init_weights='bat'?) of shape")
    if r is not None and int(r) != block.shape[0]:
        raise config_mismatch(module, "r", r, block.shape[0], "tile width")
    if cfg.get("init_weights") == "mini" and block.shape[1] != cfg.get("mini_r", 1):
        raise config_mismatch(module, "mini_r", cfg.get("mini_r", 1), block.shape[1], "a block width")
    return MiSS(block=block, shape=None)


def write_miss(layers: dict[str, MiSS | MiSSBat], cfg: dict, out: dict[str, torch.Tensor], prefix: str) -> None:
    """MISS config (``r``, ``init_weights``: ``"bat"``, ``"mini"`` with ``mini_r``, or the default) and blocks."""
    first = next(iter(layers.values()))
    bat = first.block.ndim == 3
    cfg.update({"r": first.rank, "target_modules": sorted(layers)})
    if bat:
        cfg["init_weights"] = "bat"
    else:
        widths = {int(l.block.shape[1]) for l in layers.values()}
        if all(l.shape is not None for l in layers.values()):
            mini = not all(l.block.shape[1] == l.shape[0] for l in layers.values())
        else:  # the file left the shapes open: the source config says whether the blocks are "mini"
            mini = cfg.get("init_weights") == "mini" and widths == {int(cfg.get("mini_r", 0))}
        if mini:
            cfg["init_weights"], cfg["mini_r"] = "mini", widths.pop()
        elif cfg.get("init_weights") in ("bat", "mini", None):
            cfg["init_weights"] = True
    for path, l in layers.items():
        out[f"{prefix}{path}.miss_block"] = l.block


def miss_limit(layer: MiSS) -> str | None:
    """peft's MiSS adapts ``nn.Linear`` only."""
    return "peft's MiSS adapts nn.Linear only (this layer is a Conv1D)" if layer.fan_in_fan_out else None


def miss_limits(layers: Mapping[str, MiSS | MiSSBat]) -> dict[str, str]:
    """One layout (bat or not), ``r`` and ``mini_r`` per adapter."""
    reasons = one_per_adapter(layers, lambda l: "bat" if l.block.ndim == 3 else "plain", "MiSS layout (init_weights)")
    rest = {p: l for p, l in layers.items() if p not in reasons}
    reasons |= one_per_adapter(rest, lambda l: l.rank, "r")
    mini = {p: l for p, l in rest.items() if l.block.ndim == 2 and l.shape is not None and l.block.shape[1] != l.shape[0]}
    return reasons | one_per_adapter(mini, lambda l: int(l.block.shape[1]), "mini_r")


# ------------------------------------------------------------------------------------------ replacements


def read_ln_tuning(module: str, p: dict[str, torch.Tensor], cfg: dict, patterns: ConfigPatterns) -> LNTuning:
    """LN_TUNING: the tuned norm's ``weight`` (and ``bias``), replacing the base's."""
    if not p:
        raise FormatError(f"{module} lacks ln_tuning_layers.weight/bias; the checkpoint is incomplete")
    w, b = p.get("weight"), p.get("bias")
    return LNTuning(shape=tuple((w if w is not None else b).shape), weight=w, bias=b)


def write_ln_tuning(layers: dict[str, LNTuning], cfg: dict, out: dict[str, torch.Tensor], prefix: str) -> None:
    """LN_TUNING config (targets) and the tuned tensors."""
    cfg["target_modules"] = sorted(layers)
    for path, l in layers.items():
        for name, t in (("weight", l.weight), ("bias", l.bias)):
            if t is not None:
                out[f"{prefix}{path}.ln_tuning_layers.{name}"] = t


def _token_indices(module: str, cfg: dict) -> list[int]:
    """The row numbers of a module's trainable tokens: ``token_indices`` (a TRAINABLE_TOKENS file) or
    ``trainable_token_indices`` (a LoRA file: a list, or a dict keyed by module name or path suffix)."""
    field = "token_indices" if cfg.get("peft_type") == "TRAINABLE_TOKENS" else "trainable_token_indices"
    spec = cfg.get(field)
    if isinstance(spec, dict):
        hits = [v for k, v in spec.items() if module == k or module.endswith("." + k)]
        spec = hits[0] if hits else None
    if not isinstance(spec, list) or not all(isinstance(i, int) for i in spec):
        raise ConfigError(f"{module}: trainable tokens need their row numbers in adapter_config.json's {field} (a list "
                          "of token ids); the config lacks them or holds no integer list")
    return spec


def read_tokens(module: str, p: dict[str, torch.Tensor], cfg: dict, patterns: ConfigPatterns) -> TrainableTokens:
    """TRAINABLE_TOKENS: ``trainable_tokens_delta (k, dim)`` (the rows' new values) and the config's row numbers."""
    need(p, ("values",), module)
    v = p["values"]
    indices = _token_indices(module, cfg)
    if v.ndim != 2 or v.shape[0] != len(indices):
        raise ConfigError(f"{module}: trainable_tokens_delta has shape {tuple(v.shape)} but the config lists "
                          f"{len(indices)} token indices; the config does not belong to these weights")
    return TrainableTokens(values=v, token_indices=torch.tensor(indices, dtype=torch.long), shape=None)


def write_tokens(layers: dict[str, TrainableTokens], cfg: dict, out: dict[str, torch.Tensor], prefix: str) -> None:
    """TRAINABLE_TOKENS config (``token_indices``, the same for every target) and the new rows."""
    first = next(iter(layers.values()))
    cfg.update({"token_indices": [int(i) for i in first.token_indices], "target_modules": sorted(layers)})
    cfg.setdefault("init_weights", True)
    for path, l in layers.items():
        out[f"{prefix}{path}.trainable_tokens_delta"] = l.values


def write_token_adapters(layers: dict[str, TrainableTokens], cfg: dict, out: dict[str, torch.Tensor],
                         prefix: str) -> None:
    """Trainable tokens inside a LoRA file: ``<module>.token_adapter.trainable_tokens_delta`` and the config's
    ``trainable_token_indices`` (``{module: [ids]}``)."""
    cfg["trainable_token_indices"] = {path: [int(i) for i in l.token_indices] for path, l in sorted(layers.items())}
    for path, l in layers.items():
        out[f"{prefix}{path}{TOKEN_ADAPTER}.trainable_tokens_delta"] = l.values


def tokens_limits(layers: Mapping[str, TrainableTokens]) -> dict[str, str]:
    """peft's TRAINABLE_TOKENS config has one ``token_indices`` list for every target."""
    return one_per_adapter(layers, lambda l: tuple(int(i) for i in l.token_indices), "token_indices")


__all__ = [
    "TOKEN_ADAPTER",
    "boft_limits",
    "c3a_limit",
    "hra_limits",
    "miss_limit",
    "miss_limits",
    "oft_limits",
    "read_boft",
    "read_c3a",
    "read_hra",
    "read_ln_tuning",
    "read_miss",
    "read_oft",
    "read_shira",
    "read_tokens",
    "read_waveft",
    "shira_limits",
    "tokens_limits",
    "waveft_limits",
    "write_boft",
    "write_c3a",
    "write_hra",
    "write_ln_tuning",
    "write_miss",
    "write_oft",
    "write_shira",
    "write_token_adapters",
    "write_tokens",
    "write_waveft",
]
