"""Where a module sits in its model: the pipeline component and a depth in block (execution) order.

The analysis table and the HTML report plot statistics against depth. The depth of a module path is
computed per **component** (the first path part when it names a pipeline component adaptkit knows:
``unet``, ``transformer``, ``text_encoder``, ``text_encoder_2``, ...; ``""`` otherwise), from all the paths
of that component together:

* **UNet** components (diffusers ``down_blocks`` / ``mid_block`` / ``up_blocks`` or original LDM
  ``input_blocks`` / ``middle_block`` / ``output_blocks`` names) follow the U: with ``n`` down blocks,
  ``down_blocks.i -> i``, ``mid_block -> n``, ``up_blocks.j -> n + 1 + j``; the input layers
  (``conv_in``, ``time_embedding``, ``add_embedding``, ...) sit at ``-1`` and ``conv_norm_out`` /
  ``conv_out`` at ``2n + 1``. Inside a block the layer index ``k`` of ``resnets.k`` / ``attentions.k``
  adds ``k / (L + 1)`` (``L`` the largest layer count of a block) and a down/up sampler
  ``L / (L + 1)``, so ``down_blocks.1.attentions.1`` is ``1.25`` in an SD UNet (``L = 3``). ``n`` is
  the number of down (= up) blocks the adapter's paths name. LDM names are placed on the same axis as
  their diffusers names, with the layout of every LDM-named UNet (SD 1.x/2.x, SDXL: two layers and a
  down sampler per ``input_blocks`` level, three layers and an up sampler per ``output_blocks`` level),
  so a kohya file with LDM names and its diffusers-named twin get the same depths.
* every other component (text encoders, diffusion transformers, LLMs) keeps the block index of the path,
  its first all-digit part (``text_model.encoder.layers.3`` -> 3, ``model.layers.12`` -> 12);
  ``single_transformer_blocks.N`` (Flux) follows the ``transformer_blocks``: ``n_double + N``. In a
  ``transformer`` component the embedders (``x_embedder``, ``context_embedder``, ...) sit at ``-1`` and
  ``norm_out`` / ``proj_out`` after the last block. Paths without a block index get ``None``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from ..formats import names as _names
from ..formats.diffusers import COMPONENTS as _DIFFUSERS_COMPONENTS
from ..formats.names import PREFIXES

#: first path parts that name a pipeline component (the diffusers format's and kohya's components)
COMPONENTS: tuple[str, ...] = tuple(dict.fromkeys([*_DIFFUSERS_COMPONENTS, *(c for c in PREFIXES.values() if c)]))
#: display order of components: the denoiser first, then the text encoders
COMPONENT_ORDER: tuple[str, ...] = ("", "unet", "transformer", "prior", "decoder", "text_encoder", "text_encoder_2",
                                    "text_encoder_3")

#: UNet modules before the first down block and after the last up block: diffusers names, plus LDM's
UNET_INPUTS = (*_names.UNET_INPUTS, "time_embed", "label_emb")
UNET_OUTPUTS = (*_names.UNET_OUTPUTS, "out")
#: diffusion-transformer modules before the first block and after the last one
TRANSFORMER_INPUTS = _names.TRANSFORMER_INPUTS
TRANSFORMER_OUTPUTS = _names.TRANSFORMER_OUTPUTS
#: ``input_blocks`` / ``output_blocks`` entries per UNet level in LDM checkpoints (layers + sampler)
LDM_DOWN_ENTRIES = 3
LDM_UP_ENTRIES = 3

_SAMPLER = -1  # sub-block slot of a down/up sampler (after the block's layers)
_DIFFUSERS_BLOCK = re.compile(r"^(down_blocks|up_blocks)\.(\d+)(?:\.(resnets|attentions|downsamplers|upsamplers)\.(\d+))?")
_DIFFUSERS_MID = re.compile(r"^mid_block(?:\.(resnets|attentions)\.(\d+))?(?:\.|$)")
_LDM_IN = re.compile(r"^input_blocks\.(\d+)(?:\.|$)")
_LDM_MID = re.compile(r"^middle_block\.(\d+)(?:\.|$)")
_LDM_OUT = re.compile(r"^output_blocks\.(\d+)(?:\.(\d+)(?:\.([A-Za-z_]+))?)?")
_FIRST_INDEX = re.compile(r"(?:^|\.)(\d+)(?:\.|$)")
_INDEX_OF = re.compile(r"(?:^|\.)(transformer_blocks|single_transformer_blocks)\.(\d+)(?:\.|$)")


@dataclass(frozen=True)
class Position:
    """Where a module sits: its pipeline component, its depth and (in a UNet) its block's name.

    Args:
        component: the pipeline component (``"unet"``, ``"text_encoder"``, ...), ``""`` for a bare model.
        depth: the position along the component in execution order (see the module docstring); an ``int``
            outside UNets, a ``float`` in a UNet; ``None`` when the path names no block.
        block: a UNet block's label (``"in"``, ``"down 0"``, ``"mid"``, ``"up 2"``, ``"out"``), else ``None``.
    """

    component: str
    depth: int | float | None
    block: str | None = None


@dataclass(frozen=True)
class _Slot:
    stage: str  # in, down, mid, up, out
    level: int = 0
    sub: int | None = None  # layer index inside the block, _SAMPLER, or None


def split_component(path: str) -> tuple[str, str]:
    """``(component, rest)`` of a module path: ``unet.down_blocks.0...`` -> ``("unet", "down_blocks.0...")``.

    A path whose first part is no pipeline component (:data:`COMPONENTS`) has component ``""``.
    """
    head, _, rest = path.partition(".")
    return (head, rest) if head in COMPONENTS and rest else ("", path)


def first_index(path: str) -> int | None:
    """The first all-digit part of a module path (``model.layers.3.mlp`` -> 3), ``None`` without one."""
    m = _FIRST_INDEX.search(path)
    return int(m.group(1)) if m else None


def _unet_slot(rest: str) -> _Slot | None:
    """The UNet stage, level and sub-block slot of a path inside a UNet, diffusers or LDM names."""
    head = rest.split(".", 1)[0]
    if m := _DIFFUSERS_BLOCK.match(rest):
        stage = "down" if m.group(1) == "down_blocks" else "up"
        if m.group(3) is None:
            return _Slot(stage, int(m.group(2)))
        sub = _SAMPLER if m.group(3).endswith("samplers") else int(m.group(4))
        return _Slot(stage, int(m.group(2)), sub)
    if m := _DIFFUSERS_MID.match(rest):
        return _Slot("mid", 0, None if m.group(2) is None else int(m.group(2)))
    if m := _LDM_IN.match(rest):
        i = int(m.group(1))
        if i == 0:
            return _Slot("in")  # conv_in
        pos = (i - 1) % LDM_DOWN_ENTRIES
        return _Slot("down", (i - 1) // LDM_DOWN_ENTRIES, _SAMPLER if pos == LDM_DOWN_ENTRIES - 1 else pos)
    if m := _LDM_MID.match(rest):
        return _Slot("mid", 0, 1 if int(m.group(1)) >= 2 else 0)  # resnets.0, attentions.0, resnets.1
    if m := _LDM_OUT.match(rest):
        j = int(m.group(1))
        sampler = m.group(2) is not None and int(m.group(2)) >= 1 and m.group(3) == "conv"  # Upsample's conv
        return _Slot("up", j // LDM_UP_ENTRIES, _SAMPLER if sampler else j % LDM_UP_ENTRIES)
    if head in UNET_INPUTS:
        return _Slot("in")
    if head in UNET_OUTPUTS:
        return _Slot("out")
    return None


def _is_unet(rests: list[str]) -> bool:
    return any(s is not None and s.stage in ("down", "mid", "up") for s in map(_unet_slot, rests))


def _unet_positions(component: str, rests: dict[str, str]) -> dict[str, Position]:
    slots = {path: _unet_slot(rest) for path, rest in rests.items()}
    known = [s for s in slots.values() if s is not None]
    n = max((s.level + 1 for s in known if s.stage in ("down", "up")), default=0)
    layers = max((s.sub + 1 for s in known if s.sub is not None and s.sub >= 0), default=1)
    out: dict[str, Position] = {}
    for path, s in slots.items():
        if s is None:
            out[path] = Position(component, None)
            continue
        frac = 0.0 if s.sub is None else (layers if s.sub == _SAMPLER else s.sub) / (layers + 1)
        base, label = {"in": (-1, "in"), "down": (s.level, f"down {s.level}"), "mid": (n, "mid"),
                       "up": (n + 1 + s.level, f"up {s.level}"), "out": (2 * n + 1, "out")}[s.stage]
        out[path] = Position(component, round(base + frac, 4), label)
    return out


def _block_positions(component: str, rests: dict[str, str]) -> dict[str, Position]:
    """Block index of each path (LLM rule), Flux single blocks after the double ones, transformer in/out."""
    double = [int(m.group(2)) for r in rests.values() if (m := _INDEX_OF.search(r)) and m.group(1) == "transformer_blocks"]
    n_double = max(double, default=-1) + 1
    depths: dict[str, int | None] = {}
    for path, rest in rests.items():
        m = _INDEX_OF.search(rest)
        if m is not None and m.group(1) == "single_transformer_blocks":
            depths[path] = n_double + int(m.group(2))
        else:
            depths[path] = first_index(rest)
    if component == "transformer":
        last = max((d for d in depths.values() if d is not None), default=-1)
        for path, rest in rests.items():
            head = rest.split(".", 1)[0]
            if depths[path] is None and head in TRANSFORMER_INPUTS:
                depths[path] = -1
            elif depths[path] is None and head in TRANSFORMER_OUTPUTS:
                depths[path] = last + 1
    return {path: Position(component, d) for path, d in depths.items()}


def module_positions(paths: Iterable[str]) -> dict[str, Position]:
    """The :class:`Position` of every module path of one adapter (see the module docstring for the rules).

    Depths depend on the other paths of the same component (the number of UNet blocks, Flux double blocks),
    so pass all the adapter's paths at once.

    Args:
        paths: module paths in the canonical graph's namespace (``unet.down_blocks.0...``, ``model.layers.3...``).

    Returns:
        ``{path: Position}`` for every path.

    Example:
        >>> pos = module_positions(["unet.down_blocks.1.attentions.0.proj_in", "unet.up_blocks.1.attentions.0.proj_in"])
        >>> [(p.component, p.depth, p.block) for p in pos.values()]  # two down blocks: mid is 2, up_blocks.0 is 3
        [('unet', 1.0, 'down 1'), ('unet', 4.0, 'up 1')]
    """
    by_component: dict[str, dict[str, str]] = {}
    for path in paths:
        component, rest = split_component(path)
        by_component.setdefault(component, {})[path] = rest
    out: dict[str, Position] = {}
    for component, rests in by_component.items():
        if _is_unet(list(rests.values())):
            out.update(_unet_positions(component, rests))
        else:
            out.update(_block_positions(component, rests))
    return out


def component_rank(component: str) -> tuple[int, str]:
    """Sort key for components in :data:`COMPONENT_ORDER` (unknown ones after, alphabetically)."""
    order = COMPONENT_ORDER.index(component) if component in COMPONENT_ORDER else len(COMPONENT_ORDER)
    return order, component


def block_ticks(positions: Iterable[Position]) -> dict[int, str]:
    """``{integer depth: block label}`` of UNet positions (``{-1: "in", 0: "down 0", ..., 3: "mid"}``), else ``{}``."""
    ticks: dict[int, str] = {}
    for p in positions:
        if p.block is not None and p.depth is not None:
            ticks[int(p.depth // 1)] = p.block
    return dict(sorted(ticks.items()))


__all__ = [
    "COMPONENTS",
    "COMPONENT_ORDER",
    "Position",
    "block_ticks",
    "component_rank",
    "first_index",
    "module_positions",
    "split_component",
]
