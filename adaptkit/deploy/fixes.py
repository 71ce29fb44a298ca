"""The rewrites ``adaptkit export`` applies to make an adapter fit a runtime: small transforms on :class:`Adapter`.

Each row of :data:`FIXES` is a :class:`Fix`: ``apply(adapter, ctx, paths) -> (adapter, rows)`` where ``paths`` are
what the rule's detector found and ``rows`` report, per layer, the rank before and after and the relative error of
the dense change ``||ΔW' - ΔW||_F / ||ΔW||_F`` (measured densely for exact fixes on layers up to
:data:`DENSE_LIMIT` entries; the singular values' tail for truncations). Exact fixes run by default; lossy ones only
when their ``option`` is in ``export(lossy=...)``. The math is the layers' own (``factors()``, ``to_lora()``,
``apply()``) and :func:`adaptkit.core.linalg.numerical_rank`; the fixes only arrange it.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..core.adapter import Adapter
from ..core.kinds import Layer, LoRA, layer_dtype
from ..core.linalg import numerical_rank, truncated_svd
from ..errors import ConfigError, UnsupportedError
from ..formats.coverage import TIED_OUTPUT as TIED_OUTPUT_WEIGHT
from ..formats.coverage import extra_module, ties_output, with_tied_output
from ..io.base_model import TensorInfo, TensorReader, match_paths, open_base
from ..ops.convert import with_base
from .features import FUSED, fused_plan, plain_lora
from .rules import Context

#: exact fixes measure their error densely on layers of at most this many entries (else the row says NaN)
DENSE_LIMIT = 1 << 24
#: leaf names of embedding modules, for ``modules_to_save`` copies folded into LoRA (an embedding LoRA is stored apart)
EMBEDDING_NAMES = frozenset({"embed_tokens", "wte", "word_embeddings", "embeddings", "tok_embeddings", "embed_in"})


@dataclass(frozen=True)
class FixRow:
    """What one fix did to one layer.

    Args:
        module: the layer's path (the new path for fused/split layers). fix: the fix's name.
        exact: the fix keeps the effect. rank_before / rank_after: the ranks (``None``: no rank, or dropped).
        rel_error: ``||ΔW' - ΔW||_F / ||ΔW||_F`` (NaN where not measured). note: what happened, one line.
    """

    module: str
    fix: str
    exact: bool
    rank_before: int | None
    rank_after: int | None
    rel_error: float
    note: str = ""


Apply = Callable[[Adapter, Context, list[str]], tuple[Adapter, list[FixRow]]]


@dataclass(frozen=True)
class Fix:
    """A rewrite.

    Args:
        name: the key rules use. exact: keeps the effect. option: the ``--lossy`` name that allows a lossy fix.
        needs_base: the fix reads the base (DoRA, ``modules_to_save``, trainable tokens, fused names).
        apply: the transform. description: one line for the docs.
    """

    name: str
    exact: bool
    apply: Apply
    description: str
    option: str | None = None
    needs_base: bool = False


# ------------------------------------------------------------------------------------------------ helpers


def _dense(layer: Layer) -> torch.Tensor | None:
    """The layer's flattened change (from its factors when it has them), or ``None`` without a base-free one."""
    f = layer.factors()
    if f is not None:
        return f[0] @ f[1]
    return layer.delta_matrix() if layer.has_delta else None


def dense_error(old: Layer, new: Layer) -> float:
    """``||ΔW' - ΔW||_F / ||ΔW||_F`` computed densely (NaN over :data:`DENSE_LIMIT` entries or without deltas)."""
    if math.prod(old.shape or (DENSE_LIMIT + 1,)) > DENSE_LIMIT:
        return float("nan")
    a, b = _dense(old), _dense(new)
    if a is None or b is None or a.shape != b.shape:
        return float("nan")
    norm = float(a.double().norm())
    return float((b.double() - a.double()).norm()) / norm if norm > 0 else float((b.double()).norm())


def scale_one(layer: Layer, rank: int | None = None) -> Layer:
    """A plain LoRA layer with its scale baked into ``B`` (``alpha = r``, no rsLoRA), zero-padded to ``rank``.

    The DoRA magnitude and the bias are kept (the bias at the new scale 1), so the effect is unchanged: ``B' A'`` is
    ``scale * B A`` with zero rows/columns added.
    """
    u, v = layer.factors()
    pad = 0 if rank is None else rank - u.shape[1]
    if pad < 0:
        raise ConfigError(f"cannot pad a rank-{u.shape[1]} layer to rank {rank}; truncate it instead")
    if pad:
        u = torch.cat([u, u.new_zeros(u.shape[0], pad)], dim=1)
        v = torch.cat([v, v.new_zeros(pad, v.shape[1])], dim=0)
    db = layer.delta_bias()
    new = LoRA.from_factors(u, None, v, like=layer, bias=None if db is None else db.to(layer_dtype(layer)))
    if layer.dora:
        new = dataclasses.replace(new, magnitude=layer.magnitude, magnitude_axis=layer.magnitude_axis)
    return new


def diff_to_lora(diff: torch.Tensor, *, embedding: bool, rank: int | None, dtype: torch.dtype,
                 bias: torch.Tensor | None = None) -> tuple[LoRA, float]:
    """A weight change ``diff`` (module orientation) as a LoRA of ``rank`` (``None``: its numerical rank) by an exact
    SVD (:func:`adaptkit.core.linalg.truncated_svd`); returns the layer and the relative error
    ``sqrt(1 - kept energy)``."""
    math_diff = (diff.T if embedding else diff).float().reshape(diff.shape[1] if embedding else diff.shape[0], -1)
    u, s, vh, _ = truncated_svd(math_diff, None, method="exact")
    s = s.double()
    full = numerical_rank(s, tuple(math_diff.shape))
    r = full if rank is None else max(1, min(rank, full))
    total = float((s ** 2).sum())
    error = math.sqrt(max(0.0, 1.0 - float((s[:r] ** 2).sum()) / total)) if total > 0 else 0.0
    layer = LoRA.from_factors(u.float(), s.float(), vh.float(), shape=tuple(diff.shape), rank=r,
                              module_type="embedding" if embedding else None, fan_in_fan_out=embedding, dtype=dtype,
                              bias=bias)
    return layer, error


def _need_base(ctx: Context, what: str) -> None:
    if ctx.base is None:
        raise ConfigError(f"{what} needs the base model's weights; pass --base BASE (base= in Python)")


#: the output layer a tied embedding's trainable tokens also change (transformers' causal LMs)
TIED_OUTPUT = TIED_OUTPUT_WEIGHT.removesuffix(".weight")


def base_weights(base: object) -> dict[str, TensorInfo]:
    """The base's tensors by key, a tied ``lm_head.weight`` read as the input embedding's tensor
    (:func:`adaptkit.formats.coverage.with_tied_output`)."""
    return with_tied_output(open_base(base).tensors, base)


def _lora_rank(adapter: Adapter) -> int | None:
    return max((l.rank for l in adapter.layers.values() if l.rank is not None), default=None)


# -------------------------------------------------------------------------------------------------- fixes


def through_base(adapter: Adapter, ctx: Context, paths: list[str]) -> tuple[Adapter, list[FixRow]]:
    """Base-dependent layers (trainable tokens, OFT, IA3 ...) become their exact change to the base: an embedding
    LoRA of numerical rank (trainable tokens: rank = number of tokens), or a LoRA of the change's numerical rank."""
    _need_base(ctx, "turning base-dependent layers (trainable tokens, OFT, IA3 ...) into LoRA")
    fitted = with_base(adapter, ctx.base, paths=paths)
    layers, rows = dict(fitted.layers), []
    tied = any(adapter.layers[p].module_type == "embedding" for p in paths) and ties_output(ctx.base)
    for p in paths:
        new, _, err, method = fitted.layers[p].to_lora(None)
        layers[p] = new
        rows.append(FixRow(p, "through_base", True, adapter.layers[p].rank, new.rank, err,
                           f"its change to the base as a LoRA ({method})"))
        if tied and new.module_type == "embedding":  # PEFT's trainable tokens change the tied output rows too
            if TIED_OUTPUT in layers:
                raise UnsupportedError(f"{p} holds trainable tokens of a tied embedding and the adapter adapts "
                                       f"{TIED_OUTPUT} too; export cannot combine them")
            out, _ = diff_to_lora(new.delta(), embedding=False, rank=None, dtype=layer_dtype(new))
            layers[TIED_OUTPUT] = out
            rows.append(FixRow(TIED_OUTPUT, "through_base", True, None, out.rank, 0.0,
                               f"the rows {p}'s trainable tokens change, in the tied output layer"))
    return adapter.replace(layers=dict(sorted(layers.items()))), rows


def to_lora(adapter: Adapter, ctx: Context, paths: list[str]) -> tuple[Adapter, list[FixRow]]:
    """Additive layers of other kinds (LoHa, LoKr, full diffs, Tucker cores) as LoRA at their numerical rank."""
    layers, rows = dict(adapter.layers), []
    for p in paths:
        new, _, err, method = adapter.layers[p].to_lora(None)
        layers[p] = new
        rows.append(FixRow(p, "to_lora", True, adapter.layers[p].rank, new.rank, err, method))
    return adapter.replace(layers=layers), rows


def _base_sources(adapter: Adapter, ctx: Context, paths: list[str]) -> dict[str, list[tuple[str, str | None]]]:
    """Where each layer's base weight is: ``[(base module, member or None)]``. A per-projection layer the base packs
    (``q_proj`` on ``qkv_proj``) reads its member's rows of the packed weight; a packed layer on a base that has the
    projections apart reads them stacked in the packed order; any other layer reads its own module."""
    plan = fused_plan(adapter, ctx)
    out: dict[str, list[tuple[str, str | None]]] = {}
    for p in paths:
        parent, _, leaf = p.rpartition(".")
        if plan.get(p) == "fuse":
            name = next(f for f, ms in FUSED.items() if leaf in ms)
            out[p] = [(f"{parent}.{name}", leaf)]
        elif plan.get(p) == "split":
            out[p] = [(f"{parent}.{m}", None) for m in FUSED[leaf]]
        else:
            out[p] = [(p, None)]
    return out


def _read_base(adapter: Adapter, sources: list[tuple[str, str | None]], matches: dict,
               tensors: dict[str, TensorInfo], reader: TensorReader) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The base weight and bias (float32) a layer changes, from :func:`_base_sources`' list: rows of a packed weight,
    or weights stacked (a missing bias among present ones reads as zeros)."""
    weights, bs = [], []
    for module, member in sources:
        m = matches[module]
        w = reader.read(tensors[m.weight]).float()
        b = reader.read(tensors[m.bias]).float() if m.bias is not None else None
        if member is not None:  # the member's rows of the packed weight
            parent, _, name = module.rpartition(".")
            members = {k: adapter.layers[f"{parent}.{k}"] for k in FUSED[name] if f"{parent}.{k}" in adapter.layers}
            sizes = _member_sizes(name, members, int(w.shape[0]), module)
            start = sum(sizes[k] for k in FUSED[name][:FUSED[name].index(member)])
            w = w[start:start + sizes[member]]
            b = None if b is None else b[start:start + sizes[member]]
        weights.append(w)
        bs.append(b)
    bias = None
    if any(b is not None for b in bs):
        bias = torch.cat([b if b is not None else w.new_zeros(w.shape[0]) for w, b in zip(weights, bs)])
    return torch.cat(weights), bias


def _fold(adapter: Adapter, ctx: Context, paths: list[str], name: str) -> tuple[Adapter, list[FixRow]]:
    """Layers replaced by a LoRA of their change to the base, ``apply(W, b) - (W, b)``, truncated to the target's rank
    limit (the layer's rank when the target has none). A layer the ``fused`` fix renames next folds against its rows
    of the packed weight (or the stacked projections), so that check's fold-then-fuse plan is what export does."""
    tensors = base_weights(ctx.base)  # a tied lm_head reads the embedding
    sources = _base_sources(adapter, ctx, paths)
    matches = match_paths(sorted({m for src in sources.values() for m, _ in src}), tensors)
    layers, rows = dict(adapter.layers), []
    with TensorReader() as reader:
        for p in paths:
            layer = adapter.layers[p]
            w, b = _read_base(adapter, sources[p], matches, tensors, reader)
            new_w, new_b = layer.fit(tuple(w.shape)).apply(w, b)
            db = None if new_b is None or b is None else (new_b - b).to(layer_dtype(layer))
            # the change to the base is full rank (DoRA's magnitude rescales every row): use all the rank the
            # runtime serves (its limit, or --max-rank), else the layer's own
            rank = ctx.max_rank if ctx.max_rank is not None else layer.rank
            new, err = diff_to_lora(new_w - w, embedding=layer.module_type == "embedding", rank=rank,
                                    dtype=layer_dtype(layer), bias=db)
            layers[p] = new
            rows.append(FixRow(p, name, False, layer.rank, new.rank, err,
                               f"folded through the base, truncated SVD at rank {new.rank}"))
    return adapter.replace(layers=layers), rows


def fold_dora(adapter: Adapter, ctx: Context, paths: list[str]) -> tuple[Adapter, list[FixRow]]:
    """DoRA layers as plain LoRA of their change to the base, at the target's rank limit (``--max-rank``; the
    layer's own rank for a target without one); lossy: the tail is reported."""
    _need_base(ctx, "folding DoRA into LoRA")
    return _fold(adapter, ctx, paths, "fold_dora")


def fold_saved(adapter: Adapter, ctx: Context, paths: list[str]) -> tuple[Adapter, list[FixRow]]:
    """``modules_to_save`` weights as a LoRA of ``saved - base`` at the adapter's rank (or ``--max-rank``); a changed
    ``save_embedding_layers`` copy (``<module>.base_layer.weight``) is folded with its module's layer
    (``layer(saved) - base``); saved 1-D tensors (biases, norms) are dropped. Lossy: every row reports what is lost.
    A tied ``lm_head`` reads the embedding's tensor (:func:`base_weights`)."""
    _need_base(ctx, "folding modules_to_save into LoRA")
    tensors = base_weights(ctx.base)
    rank = min((r for r in (_lora_rank(adapter), ctx.max_rank) if r is not None), default=None)
    layers, extras, rows = dict(adapter.layers), dict(adapter.extras), []
    weights = [k for k in paths if k.endswith(".weight") and adapter.extras[k].ndim == 2]
    matches = match_paths(sorted({extra_module(k) for k in weights}), tensors)
    with TensorReader() as reader:
        for key in paths:
            saved = extras.pop(key)
            module = extra_module(key)
            if key not in weights:
                rows.append(FixRow(key, "fold_saved", False, None, None, 1.0, "dropped: a saved tensor that is no "
                                   "2-D weight has no LoRA form"))
                continue
            base_w = reader.read(tensors[matches[module].weight]).float()
            if tuple(base_w.shape) != tuple(saved.shape):
                raise UnsupportedError(f"modules_to_save {key} has shape {tuple(saved.shape)} but the base's weight has "
                                       f"{tuple(base_w.shape)} (a resized vocabulary?); export cannot fold it")
            layer = layers.get(module)
            if layer is None:
                diff = saved.float() - base_w
                embedding = module.rsplit(".", 1)[-1] in EMBEDDING_NAMES
                note = "saved - base as a truncated SVD"
            else:  # a changed save_embedding_layers copy beside its LoRA: PEFT applies the layer on the copy
                diff = layer.fit(tuple(base_w.shape)).apply(saved.float(), None)[0] - base_w
                embedding = layer.module_type == "embedding"
                note = "saved copy with its layer's change, minus the base, as a truncated SVD"
            new, err = diff_to_lora(diff, embedding=embedding, rank=rank, dtype=saved.dtype)
            layers[module] = new
            rows.append(FixRow(module, "fold_saved", False, None if layer is None else layer.rank, new.rank, err, note))
    return adapter.replace(layers=dict(sorted(layers.items())), extras=extras), rows


def drop_bias(adapter: Adapter, ctx: Context, paths: list[str]) -> tuple[Adapter, list[FixRow]]:
    """LoRA biases removed; the error is the bias's share of the layer's change, ``||Δb|| / ||(ΔW, Δb)||``."""
    layers, rows = dict(adapter.layers), []
    for p in paths:
        layer = adapter.layers[p]
        if not plain_lora(layer):
            raise UnsupportedError(f"{p}: only a plain LoRA's bias can be dropped; convert the layer first")
        db = float(layer.delta_bias().double().norm())
        dw = layer.fro_norm()
        layers[p] = dataclasses.replace(layer, bias=None)
        total = math.sqrt(db * db + dw * dw)
        rows.append(FixRow(p, "drop_bias", False, layer.rank, layer.rank, db / total if total else 0.0, "bias dropped"))
    return adapter.replace(layers=layers), rows


def truncate_rank(adapter: Adapter, ctx: Context, paths: list[str]) -> tuple[Adapter, list[FixRow]]:
    """Layers above ``--max-rank`` truncated by an exact low-rank SVD (the kept energy's complement reported)."""
    if ctx.max_rank is None:
        raise ConfigError("truncating ranks needs a rank limit; pass --max-rank R")
    layers, rows = dict(adapter.layers), []
    for p in paths:
        new, _, err, method = adapter.layers[p].to_lora(ctx.max_rank)
        layers[p] = new
        rows.append(FixRow(p, "truncate_rank", False, adapter.layers[p].rank, new.rank, err, method))
    return adapter.replace(layers=layers), rows


def drop_zero(adapter: Adapter, ctx: Context, paths: list[str]) -> tuple[Adapter, list[FixRow]]:
    """Layers whose change is exactly zero and saved copies equal to the base removed (exact: they do nothing)."""
    gone = set(paths)
    layers = {p: l for p, l in adapter.layers.items() if p not in gone}
    if not layers:
        raise UnsupportedError("every layer of the adapter is exactly zero; there is nothing to export")
    rows = [FixRow(p, "drop_zero", True, adapter.layers[p].rank, None, 0.0, "no-op layer dropped")
            if p in adapter.layers else FixRow(p, "drop_zero", True, None, None, 0.0, "saved copy equal to the base "
                                               "dropped") for p in paths]
    extras = {k: v for k, v in adapter.extras.items() if k not in gone}
    return adapter.replace(layers=layers, extras=extras), rows


def uniform_scale(adapter: Adapter, ctx: Context, paths: list[str], rank: int | None = None,
                  name: str = "bake_scale") -> tuple[Adapter, list[FixRow]]:
    """Every plain LoRA layer with its scale baked into ``B`` (``alpha = r``) and, with ``rank``, zero-padded to it:
    one global ``r`` and ``lora_alpha`` then describe every layer exactly."""
    layers, rows = dict(adapter.layers), []
    for p, layer in adapter.layers.items():
        if not plain_lora(layer):
            continue
        new = scale_one(layer, rank)
        layers[p] = new
        if p in paths:
            rows.append(FixRow(p, name, True, layer.rank, new.rank, dense_error(layer, new),
                               f"scale {layer.scale:g} baked into B" + (f", padded to rank {rank}" if rank else "")))
    return adapter.replace(layers=layers), rows


def bake_scale(adapter: Adapter, ctx: Context, paths: list[str]) -> tuple[Adapter, list[FixRow]]:
    """rsLoRA / ``alpha_pattern`` scales baked into ``B`` so that ``lora_alpha = r`` is right for every layer."""
    return uniform_scale(adapter, ctx, paths)


def pad_rank(adapter: Adapter, ctx: Context, paths: list[str]) -> tuple[Adapter, list[FixRow]]:
    """Every LoRA layer zero-padded to the adapter's largest rank (scales baked in): one ``r`` for all."""
    top = max(l.rank for l in adapter.layers.values() if plain_lora(l))
    return uniform_scale(adapter, ctx, paths, rank=top, name="pad_rank")


def leaf_targets(adapter: Adapter, ctx: Context, paths: list[str]) -> tuple[Adapter, list[FixRow]]:
    """``target_modules`` written as bare module names (``q_proj``), which every runtime's matcher accepts."""
    leaves = sorted({p.rsplit(".", 1)[-1] for p in adapter.layers})
    config = {**adapter.config, "target_modules": leaves}
    return adapter.replace(config=config), [FixRow("target_modules", "leaf_targets", True, None, None, 0.0,
                                                   f"target_modules = {leaves}")]


# ------------------------------------------------------------------------------------- fused projections


def _base_shapes(ctx: Context) -> dict[str, tuple[int, ...]]:
    """Base module path suffix -> weight shape (every suffix of every path)."""
    out: dict[str, tuple[int, ...]] = {}
    for c, mods in ctx.inventory.modules.items():
        for p, shape in mods.items():
            parts = (f"{c}.{p}" if c else p).split(".")
            for i in range(len(parts)):
                out.setdefault(".".join(parts[i:]), tuple(shape))
    return out


def _shape_of(shapes: dict[str, tuple[int, ...]], path: str) -> tuple[int, ...]:
    parts = path.split(".")
    for i in range(len(parts)):
        if ".".join(parts[i:]) in shapes and shapes[".".join(parts[i:])]:
            return shapes[".".join(parts[i:])]
    raise UnsupportedError(f"the base does not give the weight shape of {path}; pass a base with safetensors or a "
                           "config")


def _check_fusable(path: str, layer: Layer) -> None:
    if not plain_lora(layer) or layer.fan_in_fan_out or layer.module_type != "linear" or layer.dora:
        raise UnsupportedError(f"{path}: only plain linear LoRA layers without DoRA are fused or split exactly; "
                               "convert or fold the layer first")


def _block_error(want_w: torch.Tensor, want_b: torch.Tensor | None, new: Layer) -> float:
    """``||(ΔW', Δb') - (ΔW, Δb)||_F / ||(ΔW, Δb)||_F`` in float64 for a fused or split layer against the rows of the
    originals it replaces (``want_b`` ``None``: no bias change); NaN over :data:`DENSE_LIMIT` entries."""
    if want_w.numel() > DENSE_LIMIT:
        return float("nan")
    got_w, got_b = _dense(new).double(), new.delta_bias()
    if got_w.shape != want_w.shape:
        return float("nan")
    zeros = want_w.new_zeros(want_w.shape[0])
    want_b = zeros if want_b is None else want_b.double()
    got_b = zeros if got_b is None else got_b.double()
    diff = math.hypot(float((got_w - want_w.double()).norm()), float((got_b - want_b).norm()))
    norm = math.hypot(float(want_w.double().norm()), float(want_b.norm()))
    return diff / norm if norm > 0 else diff


def fused(adapter: Adapter, ctx: Context, paths: list[str]) -> tuple[Adapter, list[FixRow]]:
    """Per-projection layers fused exactly where the base packs them (``A`` stacked, ``B`` block-diagonal, rank the
    sum, the LoRA biases stacked in row order with zeros for members without one), packed layers split exactly where
    the base has them apart (``B``'s rows and the bias split, ``A`` shared). Each row reports the measured error of
    the new layer's ``(ΔW, Δb)`` against the original rows."""
    _need_base(ctx, "renaming fused projections")
    plan = fused_plan(adapter, ctx)
    shapes = _base_shapes(ctx)
    layers, rows = dict(adapter.layers), []
    groups: dict[tuple[str, str], dict[str, Layer]] = {}
    for p in sorted(plan):
        layer = layers.pop(p)
        _check_fusable(p, layer)
        parent, _, leaf = p.rpartition(".")
        if plan[p] == "split":
            u, v = layer.factors()
            db = layer.delta_bias()
            want = _dense(layer).double()
            sizes = [_shape_of(shapes, f"{parent}.{m}")[0] for m in FUSED[leaf]]
            if sum(sizes) != u.shape[0]:
                raise UnsupportedError(f"{p} has {u.shape[0]} output rows but the base's {', '.join(FUSED[leaf])} have "
                                       f"{sum(sizes)}; the adapter does not belong to this base")
            start = 0
            for m, n in zip(FUSED[leaf], sizes):
                part = None if db is None else db[start:start + n].to(layer_dtype(layer))
                new = LoRA.from_factors(u[start:start + n], None, v, shape=(n, v.shape[1]), module_type="linear",
                                        fan_in_fan_out=False, dtype=layer_dtype(layer), bias=part)
                layers[f"{parent}.{m}"] = new
                err = _block_error(want[start:start + n], None if db is None else db[start:start + n], new)
                rows.append(FixRow(f"{parent}.{m}", "split", True, layer.rank, new.rank, err, f"rows {start}:{start + n}"
                                   f" of {p}"))
                start += n
        else:
            fused_name = next(f for f, ms in FUSED.items() if leaf in ms)
            groups.setdefault((parent, fused_name), {})[leaf] = layer
    for (parent, name), members in groups.items():
        total = _shape_of(shapes, f"{parent}.{name}")[0]
        sizes = _member_sizes(name, members, total, f"{parent}.{name}")
        present = [m for m in FUSED[name] if m in members]
        factors = {m: members[m].factors() for m in present}
        rank = sum(factors[m][1].shape[0] for m in present)
        cols = factors[present[0]][1].shape[1]
        big_u = torch.zeros(total, rank)
        row = col = 0
        for m in FUSED[name]:
            if m in members:
                u = factors[m][0]
                big_u[row:row + sizes[m], col:col + u.shape[1]] = u
                col += u.shape[1]
            row += sizes[m]
        biases = {m: members[m].delta_bias() for m in present}
        bias = None
        if any(b is not None for b in biases.values()):
            bias = torch.cat([biases[m] if biases.get(m) is not None else torch.zeros(sizes[m]) for m in FUSED[name]])
        want_w = torch.cat([_dense(members[m]).double() if m in members else
                            torch.zeros(sizes[m], cols, dtype=torch.float64) for m in FUSED[name]])
        first = members[present[0]]
        new = LoRA.from_factors(big_u, None, torch.cat([factors[m][1] for m in present]), shape=(total, cols),
                                module_type="linear", fan_in_fan_out=False, dtype=layer_dtype(first),
                                bias=None if bias is None else bias.to(layer_dtype(first)))
        layers[f"{parent}.{name}"] = new
        rows.append(FixRow(f"{parent}.{name}", "fuse", True, None, rank, _block_error(want_w, bias, new),
                           f"{'+'.join(present)} stacked block-diagonally" + (", biases stacked" if bias is not None
                                                                               else "")))
    return adapter.replace(layers=dict(sorted(layers.items()))), rows


def _member_sizes(name: str, members: dict[str, Layer], total: int, where: str) -> dict[str, int]:
    """The output rows of each member of a packed matrix of ``total`` rows (absent members: the rest, shared equally
    by ``k_proj``/``v_proj`` and by ``gate_proj``/``up_proj``, which always have equal sizes)."""
    sizes = {m: int(l.shape[0]) for m, l in members.items()}
    missing = [m for m in FUSED[name] if m not in sizes]
    rest = total - sum(sizes.values())
    if missing and (rest <= 0 or rest % len(missing) or ("q_proj" in missing and len(missing) > 1)):
        raise UnsupportedError(f"{where}: the sizes of the absent {', '.join(missing)} cannot be told from the base; "
                               "give the adapter every projection")
    sizes.update({m: rest // len(missing) for m in missing})
    if sum(sizes.values()) != total:
        raise UnsupportedError(f"{where} has {total} rows but the adapter's projections have {sum(sizes.values())}")
    return sizes


FIXES: dict[str, Fix] = {f.name: f for f in (
    Fix("through_base", True, through_base, "the exact change to the base as LoRA (needs `--base`)", needs_base=True),
    Fix("to_lora", True, to_lora, "exact SVD to LoRA at the numerical rank"),
    Fix("fold_dora", False, fold_dora, "DoRA folded through the base into LoRA at the target's rank limit", option="dora",
        needs_base=True),
    Fix("fold_saved", False, fold_saved, "`saved - base` as LoRA of the adapter's rank", option="modules_to_save",
        needs_base=True),
    Fix("fused", True, fused, "fused `qkv_proj`/`gate_up_proj` built (block-diagonal B, biases stacked) or split exactly",
        needs_base=True),
    Fix("drop_bias", False, drop_bias, "LoRA bias dropped", option="bias"),
    Fix("truncate_rank", False, truncate_rank, "truncated SVD to `--max-rank`", option="rank"),
    Fix("drop_zero", True, drop_zero, "no-op layers and saved copies equal to the base dropped"),
    Fix("bake_scale", True, bake_scale, "scale baked into B, `lora_alpha = r`"),
    Fix("pad_rank", True, pad_rank, "zero-padded to one rank"),
    Fix("leaf_targets", True, leaf_targets, "`target_modules` as bare module names"),
)}
#: the order export applies fixes in (conversions first, naming next, rank and scale last)
FIX_ORDER = tuple(FIXES)
#: the ``--lossy`` names
LOSSY_OPTIONS = tuple(f.option for f in FIXES.values() if f.option)

__all__ = ["DENSE_LIMIT", "FIXES", "FIX_ORDER", "LOSSY_OPTIONS", "Fix", "FixRow", "dense_error", "diff_to_lora",
           "scale_one", "uniform_scale"]
