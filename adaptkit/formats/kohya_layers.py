"""kohya/LyCORIS tensors per adapter kind: the names a module's tensors have, and layers built from them and back.

:data:`TENSORS` maps each tensor name after the flattened module name (``lora_down.weight``, ``hada_w1_a``,
``lokr_w2``, ``dora_scale``, IA3 ``weight``/``on_input``, ``diff``/``w_norm``, diag-OFT/BOFT ``oft_blocks``/``rescale``,
GLoRA ``a1.weight``...``b2.weight``/``bm.weight``) to its kind and canonical part;
:func:`build_layer` turns one module's tensors into a layer and :func:`layer_tensors` a layer into them.
:data:`LIMITS` says which kinds the files store and why one layer of a kind may not fit.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch

from ..core.kinds import IA3, Full, GLoRA, LoHa, LoKr, LoRA, LycorisOFT
from ..core.kinds.base import check_factors
from ..errors import FormatError, ShapeMismatchError

#: tensor name (after the module name) -> (kind, canonical part)
TENSORS: dict[str, tuple[str, str]] = {
    "lora_down.weight": ("lora", "down"),
    "lora_up.weight": ("lora", "up"),
    "lora_mid.weight": ("lora", "mid"),
    "hada_w1_a": ("loha", "w1a"),
    "hada_w1_b": ("loha", "w1b"),
    "hada_w2_a": ("loha", "w2a"),
    "hada_w2_b": ("loha", "w2b"),
    "hada_t1": ("loha", "t1"),
    "hada_t2": ("loha", "t2"),
    "lokr_w1": ("lokr", "w1"),
    "lokr_w1_a": ("lokr", "w1a"),
    "lokr_w1_b": ("lokr", "w1b"),
    "lokr_w2": ("lokr", "w2"),
    "lokr_w2_a": ("lokr", "w2a"),
    "lokr_w2_b": ("lokr", "w2b"),
    "lokr_t2": ("lokr", "t2"),
    "diff": ("full", "diff"),
    "diff_b": ("full", "diff_b"),
    "w_norm": ("norm", "diff"),
    "b_norm": ("norm", "diff_b"),
    "weight": ("ia3", "weight"),
    "on_input": ("ia3", "on_input"),
    "oft_blocks": ("lycoris_oft", "oft_blocks"),
    "rescale": ("lycoris_oft", "rescale"),
    "a1.weight": ("glora", "a1"),
    "a2.weight": ("glora", "a2"),
    "b1.weight": ("glora", "b1"),
    "b2.weight": ("glora", "b2"),
    "bm.weight": ("glora", "bm"),
    "alpha": ("", "alpha"),
    "dora_scale": ("", "dora_scale"),
}

# ----------------------------------------------------------------------------------------------- read


def _kind_of(parts: dict[str, torch.Tensor]) -> str:
    kinds = {TENSORS[n][0] for n in parts} - {""}
    if len(kinds) != 1:
        raise FormatError(f"tensors {sorted(parts)} do not form one layer of a known kind")
    return kinds.pop()


def _magnitude(dora: torch.Tensor | None, shape: tuple[int, ...]) -> tuple[torch.Tensor | None, int]:
    if dora is None:
        return None, 0
    s = tuple(dora.shape)
    if dora.numel() == shape[0] and (len(s) < 2 or s[0] == shape[0]):
        return dora.flatten(), 0
    if len(s) >= 2 and s[0] == 1 and dora.numel() == s[1]:
        return dora.flatten(), 1
    raise ShapeMismatchError(f"dora_scale of shape {s} fits neither the outputs nor the inputs of a {shape} weight")


def _alpha(parts: dict[str, torch.Tensor], rank: int) -> float:
    a = parts.get("alpha")
    if a is None:
        return float(rank)
    value = float(a.float().reshape(-1)[0]) if a.numel() else float(rank)
    return value if value != 0 else float(rank)


def build_layer(parts: dict[str, torch.Tensor]) -> Any:
    """Build one canonical layer from the tensors kohya/LyCORIS stores for a module (through :data:`BUILDERS`)."""
    kind = _kind_of(parts)
    p = {TENSORS[n][1]: t for n, t in parts.items()}
    check_factors(p, {TENSORS[n][1]: n for n in parts})
    return BUILDERS[kind][1](p)


def _build_lora(p: dict[str, torch.Tensor]) -> LoRA:
    if "down" not in p or "up" not in p:
        raise FormatError("lora_down/lora_up is missing; the checkpoint is incomplete")
    down, up, mid = p["down"], p["up"], p.get("mid")
    r = down.shape[0]
    if up.ndim > 2 or down.ndim > 2:
        k = tuple(mid.shape[2:]) if mid is not None else tuple(down.shape[2:])
        shape, mtype = (up.shape[0], down.shape[1], *k), "conv"
    else:
        shape, mtype = (up.shape[0], down.shape[1]), "linear"
    mag, axis = _magnitude(p.get("dora_scale"), shape)
    return LoRA(down=down, up=up, mid=mid, alpha=_alpha(p, r), shape=shape, module_type=mtype,
                magnitude=mag, magnitude_axis=axis)


def _build_loha(p: dict[str, torch.Tensor]) -> LoHa:
    for n in ("w1a", "w1b", "w2a", "w2b"):
        if n not in p:
            raise FormatError(f"hada_{n[:2]}_{n[2]} is missing; the checkpoint is incomplete")
    t1 = p.get("t1")
    if t1 is not None:
        shape = (p["w1a"].shape[1], p["w1b"].shape[1], *t1.shape[2:])
    else:
        shape = (p["w1a"].shape[0], p["w1b"].shape[1])
    mag, axis = _magnitude(p.get("dora_scale"), shape)
    return LoHa(w1a=p["w1a"], w1b=p["w1b"], w2a=p["w2a"], w2b=p["w2b"], t1=t1, t2=p.get("t2"),
                alpha=_alpha(p, p["w1b"].shape[0]), shape=shape,
                module_type="conv" if len(shape) > 2 else "linear", magnitude=mag, magnitude_axis=axis)


def _build_full(p: dict[str, torch.Tensor], mtype: str | None = None) -> Full:
    if "diff" not in p:
        raise FormatError("diff / w_norm is missing; the checkpoint is incomplete")
    d = p["diff"]
    return Full(diff=d, diff_b=p.get("diff_b"), shape=tuple(d.shape), module_type=mtype or ("conv" if d.ndim > 2 else "linear"))


def _build_ia3(p: dict[str, torch.Tensor]) -> IA3:
    if "weight" not in p:
        raise FormatError("the IA3 weight is missing; the checkpoint is incomplete")
    w = p["weight"]
    on_input = bool(int(p["on_input"].reshape(-1)[0])) if "on_input" in p else False
    # float32 keeps l = weight + 1 exact (in fp16 the + 1 would round), so writing back is exact too
    return IA3(vector=(w.float() + 1).flatten(), on_input=on_input, module_type="conv" if w.ndim > 1 else "linear")


def _no_dora(p: dict[str, torch.Tensor], label: str) -> None:
    if "dora_scale" in p:
        raise FormatError(f"a {label} layer has a dora_scale, which LyCORIS never writes for it; the checkpoint mixes "
                          "two layers' tensors: re-save it from the trainer")


def _build_lycoris_oft(p: dict[str, torch.Tensor]) -> LycorisOFT:
    """diag-OFT (``oft_blocks (n, b, b)``) or BOFT (``(m, n, b, b)``); the file fixes ``out = n * b`` but not the
    inputs, so the shape is left open (the base's shape fills it in, :meth:`LycorisOFT.fit`)."""
    if "oft_blocks" not in p:
        raise FormatError("oft_blocks is missing (the file has only rescale/alpha for this module); the checkpoint is "
                          "incomplete: re-save it from the trainer")
    _no_dora(p, "diag-OFT/BOFT")
    rescale = p.get("rescale")
    mtype = "conv" if rescale is not None and rescale.ndim > 2 else "linear"
    constraint = float(p["alpha"].float().reshape(-1)[0]) if "alpha" in p and p["alpha"].numel() else 0.0
    return LycorisOFT(oft_blocks=p["oft_blocks"], shape=None, constraint=constraint, rescale=rescale, module_type=mtype)


def _build_glora(p: dict[str, torch.Tensor]) -> GLoRA:
    """GLoRA: the shape is fixed by ``b1 (out, r)`` and ``b2 (r, in[, *k])`` (or ``bm``'s kernel)."""
    missing = [f"{n}.weight" for n in ("a1", "a2", "b1", "b2") if n not in p]
    if missing:
        have = ", ".join(f"{n}.weight" for n in ("a1", "a2", "b1", "b2", "bm") if n in p)
        raise FormatError(f"GLoRA tensor(s) {', '.join(missing)} missing (the file has {have}); a GLoRA layer needs "
                          "a1.weight, a2.weight, b1.weight and b2.weight: the checkpoint is incomplete, re-save it from "
                          "the trainer")
    _no_dora(p, "GLoRA")
    b1, b2, bm = p["b1"], p["b2"], p.get("bm")
    kernel = tuple(bm.shape[2:]) if bm is not None else tuple(b2.shape[2:])
    shape = (int(b1.shape[0]), int(b2.shape[1]), *kernel)
    return GLoRA(a1=p["a1"], a2=p["a2"], b1=b1, b2=b2, bm=bm, alpha=_alpha(p, int(p["a2"].shape[0])), shape=shape,
                 module_type="conv" if b2.ndim > 2 else "linear")


def _build_lokr(p: dict[str, torch.Tensor]) -> LoKr:
    w1s = tuple(p["w1"].shape) if "w1" in p else (p["w1a"].shape[0], p["w1b"].shape[1]) if "w1a" in p and "w1b" in p else None
    if w1s is None:
        raise FormatError("lokr_w1 (or lokr_w1_a + lokr_w1_b) is missing; the checkpoint is incomplete")
    if "w2" in p:
        w2s = tuple(p["w2"].shape)
    elif "w2a" in p and "w2b" in p:
        w2s = (p["w2a"].shape[1], p["w2b"].shape[1], *p["t2"].shape[2:]) if "t2" in p else (p["w2a"].shape[0], p["w2b"].shape[1])
    else:
        raise FormatError("lokr_w2 (or lokr_w2_a + lokr_w2_b) is missing; the checkpoint is incomplete")
    shape = (w1s[0] * w2s[0], w1s[1] * w2s[1], *w2s[2:])
    if "w1a" in p:
        rank = int(p["w1a"].shape[1])
    elif "w2a" in p:
        rank = int(p["t2"].shape[0] if "t2" in p else p["w2a"].shape[1])
    else:
        rank = 0
    if rank == 0:  # both factors full: LyCORIS uses scale 1
        a = _alpha(p, 1)
        rank = int(a) if a.is_integer() and a >= 1 else 1
        alpha = float(rank)
    else:
        alpha = _alpha(p, rank)
    mag, axis = _magnitude(p.get("dora_scale"), shape)
    return LoKr(alpha=alpha, rank=rank, shape=shape, module_type="conv" if len(shape) > 2 else "linear",
                magnitude=mag, magnitude_axis=axis, **{k: p.get(k) for k in ("w1", "w1a", "w1b", "w2", "w2a", "w2b", "t2")})


#: the layer family of :data:`TENSORS` -> (the kind it reads as, the builder of that layer from its canonical parts)
BUILDERS: dict[str, tuple[str, Callable[[dict[str, torch.Tensor]], Any]]] = {
    "lora": ("lora", _build_lora), "loha": ("loha", _build_loha), "lokr": ("lokr", _build_lokr),
    "full": ("full", _build_full), "norm": ("full", lambda p: _build_full(p, "norm")), "ia3": ("ia3", _build_ia3),
    "lycoris_oft": ("lycoris_oft", _build_lycoris_oft), "glora": ("glora", _build_glora),
}


# ---------------------------------------------------------------------------------------------- write


def _alpha_tensor(value: float, like: torch.Tensor) -> torch.Tensor:
    dtype = like.dtype if like.is_floating_point() else torch.float32
    return torch.tensor(float(value), dtype=dtype)


def _dora_tensor(layer: Any) -> torch.Tensor:
    n = len(layer.shape) - 1
    m = layer.magnitude
    if layer.magnitude_axis == 0:
        return m.reshape(-1, *([1] * n))
    return m.reshape(1, -1, *([1] * (n - 1)))


def _lora_tensors(layer: LoRA) -> dict[str, torch.Tensor]:
    out = {"lora_down.weight": layer.down, "lora_up.weight": layer.up}
    if layer.mid is not None:
        out["lora_mid.weight"] = layer.mid
    out["alpha"] = _alpha_tensor(layer.scale * layer.rank, layer.down)
    return out


def _loha_tensors(layer: LoHa) -> dict[str, torch.Tensor]:
    out = {}
    for name in ("w1a", "w1b", "w2a", "w2b", "t1", "t2"):
        t = getattr(layer, name)
        if t is not None:
            out[f"hada_{name[:2]}_{name[2]}" if len(name) == 3 else f"hada_{name}"] = t
    out["alpha"] = _alpha_tensor(layer.alpha, layer.w1a)
    return out


def _lokr_tensors(layer: LoKr) -> dict[str, torch.Tensor]:
    out = {}
    full = layer.w1 is not None and layer.w2 is not None
    w1 = layer.w1
    if full and layer.scale != 1.0:  # LyCORIS fixes the scale of full-full LoKr at 1: fold it into w1
        w1 = (layer.w1.float() * layer.scale).to(layer.w1.dtype)
    for name, t in (("w1", w1), ("w1a", layer.w1a), ("w1b", layer.w1b), ("w2", layer.w2), ("w2a", layer.w2a),
                    ("w2b", layer.w2b), ("t2", layer.t2)):
        if t is not None:
            out[f"lokr_{name}" if len(name) == 2 else f"lokr_{name[:2]}_{name[2]}"] = t
    like = w1 if w1 is not None else layer.w1a
    if full:
        out["alpha"] = _alpha_tensor(layer.rank, like)
    else:
        r = layer.w1a.shape[1] if layer.w1a is not None else (layer.t2.shape[0] if layer.t2 is not None else layer.w2a.shape[1])
        out["alpha"] = _alpha_tensor(layer.scale * r, like)
    return out


def _full_tensors(layer: Full) -> dict[str, torch.Tensor]:
    w, b = ("w_norm", "b_norm") if layer.module_type == "norm" else ("diff", "diff_b")
    return {w: layer.diff} if layer.diff_b is None else {w: layer.diff, b: layer.diff_b}


def _lycoris_oft_tensors(layer: LycorisOFT) -> dict[str, torch.Tensor]:
    out = {"oft_blocks": layer.oft_blocks, "alpha": _alpha_tensor(layer.constraint, layer.oft_blocks)}
    if layer.rescale is not None:
        r = layer.rescale
        if r.ndim < 2:  # LyCORIS keeps rescale as (out, 1, ...): one trailing axis per weight axis
            r = r.reshape(-1, *([1] * (len(layer.shape) - 1 if layer.shape is not None else 1)))
        out["rescale"] = r
    return out


def _glora_tensors(layer: GLoRA) -> dict[str, torch.Tensor]:
    out = {"a1.weight": layer.a1, "a2.weight": layer.a2, "b1.weight": layer.b1, "b2.weight": layer.b2}
    if layer.bm is not None:
        out["bm.weight"] = layer.bm
    out["alpha"] = _alpha_tensor(layer.scale * layer.rank, layer.a1)
    return out


def _ia3_tensors(layer: IA3) -> dict[str, torch.Tensor]:
    v = (layer.vector.float() - 1).to(layer.vector.dtype)
    if layer.module_type == "conv":
        nd = len(layer.shape) if layer.shape is not None else 4
        v = v.reshape(1, -1, *([1] * (nd - 2)))
    return {"weight": v, "on_input": torch.tensor(int(layer.on_input))}


#: kind name -> the kohya/LyCORIS tensors of one layer of that kind (names relative to the module)
WRITERS: dict[str, Callable[[Any], dict[str, torch.Tensor]]] = {
    "lora": _lora_tensors, "loha": _loha_tensors, "lokr": _lokr_tensors, "full": _full_tensors, "ia3": _ia3_tensors,
    "lycoris_oft": _lycoris_oft_tensors, "glora": _glora_tensors,
}


def layer_tensors(layer: Any) -> dict[str, torch.Tensor]:
    """The kohya/LyCORIS tensors of one canonical layer (names relative to the module).

    The layer is one :func:`can_store` accepts (its kind has a row in :data:`WRITERS`); the writer does not
    decide again.
    """
    out = WRITERS[layer.kind](layer)
    if layer.dora:
        out["dora_scale"] = _dora_tensor(layer)
    return out


# ------------------------------------------------------------------------------------ what kohya stores


def _fan_limit(layer: Any) -> str | None:
    return "kohya stores no fan_in_fan_out (Conv1D) layers" if layer.fan_in_fan_out else None


def _lora_limit(layer: LoRA) -> str | None:
    if layer.bias is not None or layer.module_type == "embedding":
        return _fan_limit(layer) or "kohya has no LoRA bias or embedding LoRA"
    return _fan_limit(layer)


#: the kinds kohya/LyCORIS files store, and why one layer of the kind may not fit (``None``: every layer fits)
LIMITS: dict[str, Any] = {"lora": _lora_limit, "loha": _fan_limit, "lokr": _fan_limit, "ia3": _fan_limit, "full": None,
                          "lycoris_oft": None, "glora": None}


def _lora_diff_b_limit(layer: LoRA) -> str | None:
    if layer.module_type == "embedding":
        return _fan_limit(layer) or "the layout has no embedding LoRA"
    return _fan_limit(layer)


def _lora_with_diff_b(layer: LoRA, diff_b: torch.Tensor) -> LoRA:
    return dataclasses.replace(layer, bias=(diff_b.float() / layer.scale).to(diff_b.dtype))


def _lora_split_diff_b(layer: LoRA) -> tuple[LoRA, torch.Tensor | None]:
    if layer.bias is None:
        return layer, None
    return dataclasses.replace(layer, bias=None), layer.delta_bias().to(layer.bias.dtype)


#: kinds whose bias change a layout stores as a separate ``diff_b`` tensor (ComfyUI's original-names files):
#: kind -> (why a layer may not fit, layer + read ``diff_b`` -> layer, layer -> (layer without bias, ``diff_b``))
DIFF_B: dict[str, tuple[Any, Any, Any]] = {"lora": (_lora_diff_b_limit, _lora_with_diff_b, _lora_split_diff_b)}


__all__ = ["BUILDERS", "DIFF_B", "LIMITS", "TENSORS", "WRITERS", "build_layer", "layer_tensors"]
