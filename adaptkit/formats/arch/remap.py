"""Move an adapter between an architecture's original and diffusers namespaces, exactly, with a certificate.

``to_namespace(adapter, "diffusers")`` maps every ``unet.<original path>`` layer of a known architecture to its
diffusers modules under ``transformer.`` (a packed weight's layer is split by :func:`adaptkit.core.blocks.split_rows`),
``to_namespace(adapter, "original")`` the other way (members stacked into a block LoRA by
:func:`~adaptkit.core.blocks.stack_rows`). Layers of other components (text encoders) are kept. Every layer must map:
one that no rule covers is an error naming it (unless ``drop`` names it), and the result carries the coverage
certificate of the mapping in its metadata (``adaptkit.coverage``).

The architecture comes from ``arch=``, from the adapter (the shipped inventory a kohya file resolved against, or the
``adaptkit.arch`` metadata entry), or from the module paths and shapes; paths that fit several architectures which
map them differently are an error listing the candidates. Member sizes of packed weights come from ``base`` (a
diffusers model, directory or inventory) or from the architecture's shipped inventory.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from ...core.adapter import Adapter
from ...core.blocks import split_rows, stack_rows, swap_halves, unit_scale
from ...core.coverage import Outcome, certify, stamp
from ...errors import ConfigError, FormatError, UnsupportedError
from .. import names as _names
from . import ARCHS, DIFFUSERS, ORIGINAL, Arch, arch_of_model, get_arch

#: metadata entry naming the architecture an adapter was mapped for
ARCH_KEY = "adaptkit.arch"
NAMESPACES = ("diffusers", "original")


@dataclass(frozen=True)
class MapRow:
    """One step of a namespace change: which source layers became which target layer, how, and the measured error.

    ``error`` is ``‖ΔW' - ΔW‖_F / ‖ΔW‖_F`` (biases included) in float64, computed from the factors.
    """

    source: str
    target: str
    action: str  # rename | swap | split:blocks | split:shared | stack
    rank_in: int | None
    rank_out: int | None
    error: float


def _component_paths(adapter: Adapter, component: str) -> list[str]:
    return [p for p in adapter.layers if p.startswith(component + ".")]


def _fits(arch: Arch, paths: list[str], direction: str) -> dict[str, Any] | None:
    """How the architecture maps each path (``None``: some path has no rule). A catch-all ``{path}`` rule (the
    namespaces agree) fits only paths the architecture's shipped inventory has, so that it claims no other model's."""
    out = {}
    known: set[str] | None = None
    for p in paths:
        rel = p.partition(".")[2]
        hit = arch.to_diffusers(rel) if direction == "diffusers" else arch.to_original(rel)
        if hit is None:
            return None
        if "{path}" in hit[0].original:
            if known is None:
                known = _known_paths(arch)
            if rel not in known:
                return None
        out[p] = (hit[0].original, hit[0].diffusers, hit[0].swap, hit[1] if direction == "diffusers" else hit[1:3])
    return out


def _known_paths(arch: Arch) -> set[str]:
    try:
        inv = _names.shipped(arch.name)
    except ConfigError:
        return set()
    return {p for comp in (DIFFUSERS, ORIGINAL) for p in inv.modules.get(comp, {})}


@dataclass(frozen=True)
class _Listing:
    """The diffusers module shapes that size packed projections, and whether they are the user's base (then a
    disagreeing layer is refused) or the architecture's shipped inventory (then the rule's size tokens decide)."""

    shapes: Mapping[str, tuple[int, ...]]
    given: bool

    def get(self, path: str) -> tuple[int, ...] | None:
        return self.shapes.get(path)


def _listing(arch: Arch, base: Any) -> _Listing:
    """The diffusers module shapes of the architecture: from ``base`` when given, else its shipped inventory."""
    inv = _names.inventory_from_base(base) if base is not None else _names.shipped(arch.name)
    for comp in (DIFFUSERS, ""):
        if inv.modules.get(comp):
            return _Listing({p: tuple(s) for p, s in inv.modules[comp].items()}, base is not None)
    raise ConfigError(f"the base {inv.name} has no diffusers transformer modules to size the {arch.label} projections "
                      "by; pass the transformer (a diffusers directory or model) as --base")


def _shape_ok(arch: Arch, adapter: Adapter, paths: list[str], direction: str) -> bool:
    """The adapter's layers are modules of the architecture's shipped inventory with the same shapes (decides between
    model sizes and block counts: HunyuanVideo's ``transformer_blocks.19`` is not Flux.1's, which has 19)."""
    try:
        inv = _names.shipped(arch.name)
    except ConfigError:
        return True
    comp = ORIGINAL if direction == "diffusers" else DIFFUSERS
    mods = inv.modules.get(comp, {})
    for p in paths:
        shape = mods.get(p.partition(".")[2])
        layer = adapter.layers[p]
        if shape is None or (shape and layer.shape is not None and tuple(layer.shape)[:2] != tuple(shape)[:2]):
            return False
    return True


def pick_arch(adapter: Adapter, direction: str, arch: str | Arch | None = None, base: Any = None,
              layout: str | None = None) -> Arch | None:
    """The architecture to map ``adapter`` with (``None``: nothing to map, no layer is in the source namespace).

    ``layout``: the target format; architectures whose adapters never ship in it (XLabs: Flux.1 only) are not
    candidates when others are.

    Raises:
        ConfigError: the paths fit several architectures that map them differently (the message lists them).
    """
    if isinstance(arch, Arch):
        return arch
    if arch is not None:
        return get_arch(arch)
    src = ORIGINAL if direction == "diffusers" else DIFFUSERS
    paths = _component_paths(adapter, src)
    if not paths:
        return None
    known = adapter.metadata.get(ARCH_KEY) or adapter.config.get("inventory")
    if known in ARCHS:
        return ARCHS[known]
    if base is not None and hasattr(base, "named_modules") and (hit := arch_of_model(base)) is not None:
        return hit
    fits = {name: m for name, a in ARCHS.items() if (m := _fits(a, paths, direction)) is not None}
    if layout is not None and len(fits) > 1:
        fits = {n: m for n, m in fits.items() if layout in ARCHS[n].layouts} or fits
    if base is None and len(fits) > 1:
        fits = {n: m for n, m in fits.items() if _shape_ok(ARCHS[n], adapter, paths, direction)} or fits
    if not fits:
        return None
    distinct = {tuple(sorted((k, str(v)) for k, v in m.items())) for m in fits.values()}
    if len(distinct) > 1:
        raise ConfigError(f"the adapter's {src} modules fit several architectures that name them differently: "
                          f"{', '.join(fits)}; pass arch=NAME (--arch NAME) to say which")
    return ARCHS[next(iter(fits))]


def _relerr(old: list[tuple[torch.Tensor, torch.Tensor]], new: list[tuple[torch.Tensor, torch.Tensor]],
            bias_old: torch.Tensor | None, bias_new: torch.Tensor | None) -> float:
    """``‖Σ U_new V_new - Σ U_old V_old‖ / ‖Σ U_old V_old‖`` from the factors (Gram matrices, float64, no m x n)."""
    def sq(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
        u = torch.cat([p[0] for p in pairs], dim=1).double()
        v = torch.cat([p[1] for p in pairs], dim=0).double()
        return float(((u.T @ u) * (v @ v.T)).sum())
    diff = sq(new + [(-u, v) for u, v in old])
    base = sq(old)
    if bias_old is not None or bias_new is not None:
        n = (bias_old if bias_old is not None else bias_new).shape[0]
        bo = torch.zeros(n, dtype=torch.float64) if bias_old is None else bias_old.double()
        bn = torch.zeros(n, dtype=torch.float64) if bias_new is None else bias_new.double()
        diff += float((bn - bo).square().sum())
        base += float(bo.square().sum())
    diff = max(diff, 0.0)
    return math.sqrt(diff / base) if base > 0 else math.sqrt(diff)


def _placed(members: list[Any], sizes: list[int]) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], torch.Tensor | None]:
    """The members' factors with their ``U`` placed at their rows of the packed weight, and their scaled biases stacked
    (zeros for a member without one; ``None`` when none has one). ``None`` members are all-zero rows."""
    total, start = sum(sizes), 0
    pairs: list[tuple[torch.Tensor, torch.Tensor]] = []
    for m, n in zip(members, sizes):
        if m is not None:
            u, v = m.factors()
            pad = torch.zeros(total, u.shape[1])
            pad[start:start + n] = u
            pairs.append((pad, v))
        start += n
    biases = [None if m is None else m.delta_bias() for m in members]
    bias = None
    if any(b is not None for b in biases):
        bias = torch.cat([torch.zeros(n) if b is None else b for b, n in zip(biases, sizes)])
    return pairs, bias


def _split_error(layer: Any, parts: list[Any], sizes: list[int]) -> float:
    """Error of split parts against the packed layer they came from."""
    new, bias = _placed(parts, sizes)
    u, v = layer.factors()
    if not new:
        new = [(torch.zeros(u.shape[0], 1), torch.zeros(1, v.shape[1]))]
    return _relerr([(u, v)], new, layer.delta_bias(), bias)


def to_namespace(adapter: Adapter, namespace: str, *, arch: str | Arch | None = None, base: Any = None,
                 drop: Iterable[str] | str | None = None, layout: str | None = None) -> tuple[Adapter, tuple[MapRow, ...]]:
    """The adapter with its layers in one namespace of their architecture.

    Args:
        adapter: the adapter.
        namespace: ``"diffusers"`` (``transformer.<diffusers path>``) or ``"original"`` (``unet.<original path>``).
        arch: the architecture (name or :class:`Arch`); found from the adapter when ``None``.
        base: the diffusers model (module, directory, inventory) that sizes packed projections; the shipped
            inventory of the architecture when ``None``.
        drop: globs naming layers that may be left out because no rule maps them (see docs/coverage.md).
        layout: the format the result is for (narrows the architectures the paths are matched against).

    Returns:
        ``(adapter, rows)``: the mapped adapter (unchanged when nothing is in the other namespace) with the
        certificate in its metadata, and one :class:`MapRow` per target layer.

    Raises:
        CoverageError: a layer no rule maps (not named by ``drop``). UnsupportedError: a layer on a packed
            weight that cannot be split or stacked (base-dependent kinds), or sizes that disagree.
        ConfigError: an unknown namespace or architecture, or paths that fit several architectures.
    """
    if namespace not in NAMESPACES:
        raise ConfigError(f"unknown namespace {namespace!r}; use one of {', '.join(NAMESPACES)}")
    found = pick_arch(adapter, namespace, arch, base, layout)
    if found is None:
        return adapter, ()
    src, dst = (ORIGINAL, DIFFUSERS) if namespace == "diffusers" else (DIFFUSERS, ORIGINAL)
    listing = _listing(found, base)
    layers: dict[str, Any] = {}
    rows: list[MapRow] = []
    outcomes: dict[str, Outcome] = {}
    groups: dict[str, dict[int, str]] = {}
    group_rule: dict[str, tuple[Any, tuple[str, ...]]] = {}
    for path, layer in adapter.layers.items():
        comp, _, rel = path.partition(".")
        if comp != src:
            layers[path] = layer
            outcomes[path] = Outcome(path)
            continue
        if namespace == "diffusers":
            hit = found.to_diffusers(rel)
            if hit is None:
                outcomes[path] = Outcome(None, "unmatched", f"no {found.label} rule maps {rel} to diffusers")
                continue
            rule, members = hit
            targets = [f"{dst}.{m}" for m in members]
            if not rule.fused:
                new = swap_halves(layer, path) if rule.swap else layer
                layers[targets[0]] = new
                rows.append(MapRow(path, targets[0], "swap" if rule.swap else "rename", layer.rank, new.rank,
                                   _relerr_swap(layer, new) if rule.swap else 0.0))
                outcomes[path] = Outcome(targets[0])
                continue
            sizes = _split_sizes(rule, members, listing, layer, path)
            split = split_rows(layer, sizes, path)
            err = _split_error(layer, list(split.layers), sizes)
            for t, part in zip(targets, split.layers):
                if part is not None:
                    layers[t] = part
                    rows.append(MapRow(path, t, f"split:{split.method}", layer.rank, part.rank, err))
            outcomes[path] = Outcome("+".join(targets))
        else:
            hit = found.to_original(rel)
            if hit is None:
                outcomes[path] = Outcome(None, "unmatched", f"no {found.label} rule maps {rel} to original names")
                continue
            rule, orig, k, members = hit
            target = f"{dst}.{orig}"
            if not rule.fused:
                new = swap_halves(layer, path) if rule.swap else layer
                new = unit_scale(new, path) if rule.scale_one else new
                layers[target] = new
                rows.append(MapRow(path, target, "swap" if rule.swap else "rename", layer.rank, new.rank,
                                   _relerr_swap(layer, new) if rule.swap else 0.0))
                outcomes[path] = Outcome(target)
                continue
            groups.setdefault(target, {})[k] = path
            group_rule[target] = (rule, members)
            outcomes[path] = Outcome(target)
    for target, present in groups.items():
        rule, members = group_rule[target]
        given = [adapter.layers[present[k]] if k in present else None for k in range(len(members))]
        in_features = int(next(g for g in given if g is not None).shape[1])
        packed = listing.get(target.partition(".")[2])  # a base in original names lists the packed weight itself
        sizes = _stack_sizes(rule, members, listing, given, in_features, target,
                             total=int(packed[0]) if packed else None)
        new = stack_rows(given, sizes, in_features, target)
        layers[target] = new
        err = _stack_error(given, sizes, new)
        rows.append(MapRow("+".join(present[k] for k in sorted(present)), target, "stack",
                           sum(g.rank for g in given if g is not None), new.rank, err))
    clashes = sorted({r.target for r in rows if r.target in adapter.layers and r.target.startswith(dst + ".")})
    if clashes:
        raise FormatError(f"the adapter has {clashes[0]} in both namespaces (as it is and mapped from {src} names); "
                          "it holds the same module twice: keep one of them (drop the other with --drop)")
    cert = certify(adapter, outcomes, operation=f"to {namespace} names", target=found.label).require(drop)
    out = adapter.replace(layers=dict(sorted(layers.items())), metadata={**adapter.metadata, ARCH_KEY: found.name})
    return stamp(out, cert), tuple(rows)


def _relerr_swap(old: Any, new: Any) -> float:
    u, v = old.factors()
    n = u.shape[0]
    perm = torch.cat([torch.arange(n // 2, n), torch.arange(0, n // 2)])
    nu, nv = new.factors()
    bo, bn = old.delta_bias(), new.delta_bias()
    return _relerr([(u[perm], v)], [(nu, nv)], None if bo is None else bo[perm], bn)


def _stack_error(given: list[Any], sizes: list[int], new: Any) -> float:
    """Error of a stacked block LoRA against the members it was built from."""
    old, bias = _placed(given, sizes)
    return _relerr(old, [new.factors()], bias, new.delta_bias())


def _split_sizes(rule: Any, members: tuple[str, ...], listing: _Listing, layer: Any, where: str) -> list[int]:
    """The rows of each member of a packed layer: the model's listing when it agrees with the layer (a user's base
    that disagrees is an error), else the rule's size tokens."""
    total, in_features = int(layer.shape[0]), int(layer.shape[1])
    listed = [listing.get(m) for m in members]
    if all(listed):
        if sum(int(s[0]) for s in listed) == total and all(int(s[1]) == in_features for s in listed):
            return [int(s[0]) for s in listed]
        if listing.given:
            want = " + ".join(str(int(s[0])) for s in listed)
            raise UnsupportedError(f"{where} has {total} x {in_features} but the base's "
                                   f"{', '.join(m.rsplit('.', 1)[-1] for m in members)} are {want} rows x "
                                   f"{int(listed[0][1])}; is the adapter for another model (or size)?")
    sizes = rule.member_sizes(in_features, total=total)
    if sizes is None:
        fix = "its base lists no such modules" if listing.given else "pass the transformer as --base"
        raise UnsupportedError(f"{where}: the sizes of {', '.join(m.rsplit('.', 1)[-1] for m in members)} in its "
                               f"{total} rows cannot be told without the model; {fix}")
    return sizes


def _stack_sizes(rule: Any, members: tuple[str, ...], listing: _Listing, given: list[Any],
                 in_features: int, where: str, total: int | None = None) -> list[int]:
    """The rows of each member of a packed weight being built: the listing when it agrees with the members at hand,
    else the rule's size tokens from them (and the packed weight's ``total`` rows when the base lists it)."""
    known = {i: int(g.shape[0]) for i, g in enumerate(given) if g is not None}
    listed = [listing.get(m) for m in members]
    if all(listed) and all(int(listed[i][0]) == r and int(listed[i][1]) == in_features for i, r in known.items()):
        return [int(s[0]) for s in listed]
    sizes = rule.member_sizes(in_features, total=total, known=known)
    if sizes is None:
        absent = [m.rsplit(".", 1)[-1] for i, m in enumerate(members) if i not in known]
        raise UnsupportedError(f"{where}: the sizes of the absent {', '.join(absent)} cannot be told without the "
                               "model; pass the transformer as --base, or give the adapter every projection")
    return sizes


def to_base_names(adapter: Adapter, shapes: Mapping[str, tuple[int, ...]],
                  drop: Iterable[str] | str | None = None) -> Adapter:
    """The adapter in the namespace of a base's weights: original-name layers mapped to diffusers names for a diffusers
    base (``transformer_blocks.0.attn.to_q.weight``), diffusers-name layers to original names for an original
    checkpoint (BFL's ``flux1-dev.safetensors``); unchanged when its names are the base's already or no architecture
    maps them. Packed projections are sized by the base's own shapes. For a transformer saved alone (keys without a
    ``transformer.`` prefix) the mapped paths lose the component too, so that one-part names (``x_embedder``) match.

    Args:
        adapter: the adapter.
        shapes: the base's tensor keys and shapes (``{key: shape}``).
        drop: as :func:`to_namespace`.
    """
    prefixed = any(k.startswith(DIFFUSERS + ".") for k in shapes)
    modules: dict[str, tuple[int, ...]] = {}
    for key, shape in shapes.items():
        if key.endswith(".weight"):
            module = key[: -len(".weight")]
            modules[module.partition(".")[2] if module.startswith(DIFFUSERS + ".") else module] = tuple(shape)
    out = adapter
    for namespace, src in (("diffusers", ORIGINAL), ("original", DIFFUSERS)):
        paths = _component_paths(adapter, src)
        if not paths or all(p.partition(".")[2] in modules for p in paths):
            continue
        # the architecture whose map sends every path to a module the base has: the base's own names decide
        # (Flux's img_attn.qkv against HunyuanVideo's img_attn_qkv), not the paths alone
        for arch in ARCHS.values():
            rels = [p.partition(".")[2] for p in paths]
            hits = [arch.to_diffusers(r) if namespace == "diffusers" else arch.to_original(r) for r in rels]
            if any(h is None for h in hits):
                continue
            targets = [m for h in hits for m in (h[1] if namespace == "diffusers" else (h[1],))]
            if all(t in modules for t in targets):
                out, _ = to_namespace(adapter, namespace, arch=arch, base={"": modules}, drop=drop)
                break
        break
    if not prefixed:  # a model saved alone: its own paths
        bare = {p.partition(".")[2]: layer for p, layer in out.layers.items() if p.startswith(DIFFUSERS + ".")}
        if bare and len(bare) == len(out.layers) and all(p in modules for p in bare):
            out = out.replace(layers=bare)
    return out


__all__ = ["ARCH_KEY", "NAMESPACES", "MapRow", "pick_arch", "to_base_names", "to_namespace"]
