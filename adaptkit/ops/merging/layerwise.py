"""One layer's merge: the per-path loop of :func:`~.driver.merge` for LoRA-like layers and for kinds that merge
in their own parameters (IA3).

Each path's layers (one per input that has it) go through the method's operand: the stored factors (PEFT's
factor-wise methods), exact low-rank factors (task arithmetic, ``cat``, ``svd``), shared bases
(:mod:`.subspace`) or dense deltas (the ``*_svd`` methods, in a :class:`~.workspace.Workspace` reused from
layer to layer); the result is a scale-1 LoRA in the first layer's dtype.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import numpy as np
import torch

from ...core.adapter import Adapter
from ...core.kinds import Layer, LoRA, layer_dtype
from ...core.kinds.base import MODULE_TYPES, tensor_fields, tensor_is_finite
from ...core.linalg import dense_svd, lowrank_svd, lowrank_svd_parts
from ...errors import ConfigError, NonFiniteError, ShapeMismatchError, UnsupportedError
from ...progress import bar
from .methods import Method, Operand, Output, combine
from .subspace import SUBSPACE, SubspaceOptions
from .workspace import Workspace

#: the random streams of DARE / DELLA merges, recorded in the provenance: one NumPy PCG64 generator per layer,
#: seeded by ``sha256(f"{seed}:{path}")`` (until December 2026 a torch generator: a seed then gave other draws)
RNG = "pcg64-sha256(seed:path)"


@dataclass(frozen=True)
class Options:
    """The checked merge options one layer's merge needs."""

    method: Method
    density: float | None
    rank: int | None
    majority_sign: str
    seed: int | None
    gamma: float | None = None
    epsilon: float | None = None
    keep: float | None = None
    common: float | None = None



def layer_entries(adapters: list[Adapter], weights: list[float]) -> dict[str, list[tuple[int, Layer, float]]]:
    """path -> [(adapter index, layer, weight)], checking the shapes agree."""
    entries: dict[str, list[tuple[int, Layer, float]]] = {}
    for i, a in enumerate(adapters):
        for path, layer in a.layers.items():
            entries.setdefault(path, []).append((i, layer, weights[i]))
    for path, items in entries.items():
        i0, l0, _ = items[0]
        for i, layer, _ in items[1:]:
            same = tuple(layer.shape or ()) == tuple(l0.shape or ()) and layer.fan_in_fan_out == l0.fan_in_fan_out
            if not same:
                raise ShapeMismatchError(
                    f"{path} has shape {tuple(l0.shape or ())} in adapter {i0 + 1} but {tuple(layer.shape or ())} in "
                    f"adapter {i + 1}; the adapters are not for the same model architecture"
                )
    return dict(sorted(entries.items()))


def layer_generator(seed: int, path: str) -> np.random.Generator:
    """The layer's own random stream: NumPy PCG64 seeded by ``sha256(f"{seed}:{path}")`` (see :data:`RNG`)."""
    digest = hashlib.sha256(f"{seed}:{path}".encode()).digest()
    return np.random.Generator(np.random.PCG64(int.from_bytes(digest[:16], "little")))


def _finite(path: str, *tensors: torch.Tensor | None) -> None:
    for t in tensors:
        if t is not None and not tensor_is_finite(t):
            raise NonFiniteError(
                f"the merged {path} holds NaN or Inf (inputs non-finite, or the result overflows the inputs' dtype); "
                "check the inputs and weights"
            )



# ------------------------------------------------------------------------------------------ IA3


def merge_own(adapters: list[Adapter], weights: list[float], m: Method, progress: bool | None) -> dict[str, Layer]:
    """Kinds without a delta merge in their own parameters: the kind's ``weighted_sum`` (IA3: PEFT's linear); the
    base-dependent kinds' ``weighted_sum`` refuses and says what to do instead."""
    classes = {type(layer) for a in adapters for layer in a.layers.values()}
    if len(classes) > 1:
        names = sorted(c.__name__ for c in classes)
        own = sorted({type(layer).__name__ for a in adapters for layer in a.layers.values() if not layer.has_delta})
        raise UnsupportedError(
            f"{' and '.join(names)} layers cannot be merged into one adapter: {', '.join(own)} has no base-free delta "
            "to add to the others' (IA3 rescales weights, rotations and GLoRA act on the base weight); merge adapters "
            "of such a kind only with each other, or fuse them one after the other"
        )
    (cls,) = classes
    entries = layer_entries(adapters, weights)
    if entries:  # a kind that cannot merge at all (base-dependent) says so in its own words, whatever the method
        path, items = next(iter(entries.items()))
        try:
            cls.weighted_sum([layer for _, layer, _ in items], [w for _, _, w in items])
        except ShapeMismatchError as e:
            raise ShapeMismatchError(f"{path}: {e}") from None
    if m.name != "linear":
        raise UnsupportedError(
            f"{cls.__name__} adapters merge only with method='linear' (the weighted sum of their vectors, as PEFT "
            f"does); '{m.name}' is undefined for {cls.__name__}"
        )
    out: dict[str, Layer] = {}
    for path, items in bar(entries.items(), total=len(entries), desc=f"merge ({cls.kind})", unit="layer",
                           progress=progress):
        try:
            merged = cls.weighted_sum([layer for _, layer, _ in items], [w for _, _, w in items])
        except ShapeMismatchError as e:
            raise ShapeMismatchError(f"{path}: {e}") from None
        _finite(path, *merged.parts().values())
        out[path] = merged
    return out


# ----------------------------------------------------------------------------------------- LoRA


def merge_loras(adapters: list[Adapter], weights: list[float], opts: Options,
                 progress: bool | None) -> dict[str, Layer]:
    entries = layer_entries(adapters, weights)
    out: dict[str, Layer] = {}
    ws = Workspace()  # the dense methods' deltas and scratch, reused from layer to layer
    for path, items in bar(entries.items(), total=len(entries), desc=f"merge ({opts.method.name})", unit="layer",
                           progress=progress):
        out[path] = _merge_entry(path, items, opts, ws)
    return out


def units(layer: Layer) -> list[Layer]:
    """What a method combines: each expert's LoRA of a layer on stacked experts, else the layer itself."""
    experts = layer.experts()
    return [layer] if experts is None else [experts[e] for e in sorted(experts)]


def _merge_entry(path: str, items: list[tuple[int, Layer, float]], opts: Options, ws: Workspace) -> Layer:
    """One path's merge: layers on stacked experts (PEFT ``target_parameters``) merge expert by expert, with the
    method's numbers for each expert's LoRA, and are stacked again; any other layer merges as a whole."""
    per_layer = [layer.experts() for _, layer, _ in items]
    if all(e is None for e in per_layer):
        return _merge_layer(path, items, opts, ws)
    if any(e is None for e in per_layer) or len({len(e) for e in per_layer}) > 1:
        raise ShapeMismatchError(f"{path} is a parameter on stacked experts, but the adapters give it different "
                                 "numbers of experts (or adapt it as a module); they are not for the same model")
    merged = [_merge_layer(f"{path} (expert {e})", [(i, experts[e], w) for (i, _, w), experts in zip(items, per_layer)],
                           opts, ws) for e in sorted(per_layer[0])]
    return items[0][1].with_experts(merged)


def _merge_layer(path: str, items: list[tuple[int, Layer, float]], opts: Options, ws: Workspace) -> LoRA:
    m = opts.method
    layers = [layer for _, layer, _ in items]
    weights = [w for _, _, w in items]
    template = layers[0]
    if len(template.shape) < 2:
        raise UnsupportedError(f"{path} is a {template.kind} layer of a 1-D parameter; merging into LoRA needs a matrix")
    loras = all(layer.lora_ab() is not None for layer in layers)  # stored as LoRA B/A factors
    gen = layer_generator(opts.seed, path) if m.random and opts.seed is not None else None
    if m.operand is Operand.FACTORS:
        if not loras:
            raise UnsupportedError(
                f"method '{m.name}' combines LoRA A and B factors, but {path} is {_kinds(layers)}; "
                f"use '{m.name}_svd' if it exists, 'svd' or 'task_arithmetic' with a rank"
            )
        up, down = _factorwise(path, layers, weights, opts, gen)
    elif m.operand is Operand.LOWRANK and opts.rank is None and m.output is Output.EXACT_OR_SVD:
        # exact task arithmetic: sum_i w_i U_i V_i = [w_1 U_1 ...] [V_1; ...], for every kind with exact factors
        ups, downs = [], []
        for layer, w in zip(layers, weights):
            u, v = layer.factors()
            ups.append(u * w)
            downs.append(v)
        up, down = torch.cat(ups, dim=1), torch.cat(downs, dim=0)
    elif m.operand is Operand.LOWRANK and opts.rank is None:  # cat (PEFT's: on the stored B/A)
        if not loras:
            raise UnsupportedError(f"method '{m.name}' concatenates LoRA factors, but {path} is {_kinds(layers)}; "
                                   "pass a rank, or use 'svd'")
        ups, downs = [], []
        for layer, w in zip(layers, weights):
            b, a = layer.lora_ab()  # PEFT's cat puts weight * scale on A, B stays as stored
            ups.append(b)
            downs.append(a * (w * layer.scale))
        up, down = torch.cat(ups, dim=1), torch.cat(downs, dim=0)
    elif m.operand is Operand.LOWRANK:  # svd / task arithmetic with a rank
        if loras:
            ups, downs = [], []
            for layer, w in zip(layers, weights):
                u, v = layer.factors()
                ups.append(u * w)
                downs.append(v)
            up, down = lowrank_svd(ups, downs, opts.rank)
        else:
            total = sum(w * layer.delta_matrix() for layer, w in zip(layers, weights))
            up, down = dense_svd(total, opts.rank)
    elif m.operand is Operand.SUBSPACE:  # aligned in shared bases from the exact factors; no m x n matrix
        # small matrices: float64 throughout; a kind without exact factors (LoHa, LoKr, full) gives its exact LoRA
        # form at its numerical rank
        factors = [layer.factors(torch.float64) or layer.to_lora(None)[0].factors(torch.float64) for layer in layers]
        sub = SubspaceOptions(m, opts.density, opts.majority_sign, gen, opts.keep, opts.common)
        up, down = SUBSPACE[m.subspace](list(factors), weights, sub)
        up, down = up.float(), down.float()
        if opts.rank is not None:
            up, down = lowrank_svd([up], [down], opts.rank)
    else:  # element-wise work on dense deltas, then SVD
        guess = _start_guess(layers, weights, opts.rank)
        deltas = [_own_delta(layer, ws, f"delta{i}") for i, layer in enumerate(layers)]
        combined = combine(deltas, torch.tensor(weights), m, opts.density, opts.majority_sign, gen, owned=True,
                           gamma=opts.gamma, epsilon=opts.epsilon, workspace=ws)
        up, down = dense_svd(combined, opts.rank, guess=guess)
    return _lora_like(path, template, up, down, _bias(layers, weights))


def _start_guess(layers: list[Layer], weights: list[float], rank: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Where the truncated SVD of a pruned / sign-elected combination starts: the exact singular bases of the
    unpruned weighted sum (from the factors, ``O((m + n) R^2)``); ``None`` when a layer has no exact factors or
    their summed rank ``R`` is over 4x the iteration's block (LoHa/LoKr products), where it would cost more
    than it saves.

    The result is the same certified SVD whatever the start; a start near the answer takes 2-3 subspace steps
    instead of 4-5 on TinyLlama's MLP matrices.
    """
    ups, downs = [], []
    if sum(layer.rank or 0 for layer in layers) > 4 * (2 * rank + 16):
        return None
    for layer, w in zip(layers, weights):
        f = layer.factors()
        if f is None or f[0].shape[1] > 4 * (2 * rank + 16):
            return None
        ups.append(f[0] * w)
        downs.append(f[1])
    u, _, vh = lowrank_svd_parts(ups, downs)
    return u, vh.T


def _own_delta(layer: Layer, ws: Workspace, name: str) -> torch.Tensor:
    """The layer's dense float32 delta as a contiguous tensor that shares no memory with the layer (so that the
    merge can work on it in place); a copy only where ``delta_matrix`` returns stored memory (e.g. full diffs).
    A layer stored as LoRA factors has ``delta_matrix() == (scale B) @ A``: that product is written into the
    workspace slot ``name``."""
    ab = layer.lora_ab()
    if ab is not None and layer.shape is not None:
        b, a = ab
        return torch.matmul(b * layer.scale, a, out=ws.buffer(name, (b.shape[0], a.shape[1])))
    d = layer.delta_matrix()
    stored = {t.untyped_storage().data_ptr() for t in tensor_fields(layer).values()}
    if not d.is_contiguous() or d.untyped_storage().data_ptr() in stored:
        d = d.clone(memory_format=torch.contiguous_format)
    return d


def _kinds(layers: list[Layer]) -> str:
    return "/".join(sorted({layer.kind for layer in layers}))


def _factorwise(path: str, layers: list[LoRA], weights: list[float], opts: Options,
                gen: np.random.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT's ``_generalized_task_arithmetic_weighted_adapter``: combine A's and B's separately."""
    ranks = sorted({layer.rank for layer in layers})
    if len(ranks) > 1:
        raise ConfigError(
            f"method '{opts.method.name}' combines A and B factor-wise and needs equal ranks, but {path} has ranks "
            f"{ranks}; use 'svd', 'cat', 'task_arithmetic' or a '*_svd' method"
        )
    wa, wb, downs, ups = [], [], [], []
    for layer, w in zip(layers, weights):
        ws = w * layer.scale
        root = math.sqrt(abs(ws))
        wa.append(root if ws >= 0 else -root)  # the sign goes on A only
        wb.append(root)
        b, a = layer.lora_ab()
        downs.append(a)
        ups.append(b)
    down = combine(downs, torch.tensor(wa), opts.method, opts.density, opts.majority_sign, gen)
    up = combine(ups, torch.tensor(wb), opts.method, opts.density, opts.majority_sign, gen)
    return up, down


def _bias(layers: list[Layer], weights: list[float]) -> torch.Tensor | None:
    """Weighted sum of the scaled LoRA biases (``lora_B.bias``), or ``None`` when no input has one."""
    biases = [(layer.delta_bias(), w) for layer, w in zip(layers, weights)]
    if all(b is None for b, _ in biases):
        return None
    return sum(w * b for b, w in biases if b is not None)


def _lora_like(path: str, template: Layer, up: torch.Tensor, down: torch.Tensor, bias: torch.Tensor | None) -> LoRA:
    """A scale-1 LoRA (``alpha == rank``) shaped for ``template``'s module, in its dtype."""
    if template.module_type not in MODULE_TYPES:
        raise UnsupportedError(f"{path} is a {template.module_type} layer, which has no LoRA form; leave it out of the merge")
    dtype = layer_dtype(template)
    new = LoRA.from_factors(up, None, down, like=template, bias=None if bias is None else bias.to(dtype))
    _finite(path, *new.parts().values())
    return new


__all__ = ["RNG", "Options", "layer_entries", "layer_generator", "merge_loras", "merge_own", "units"]
