"""An architecture's module map between its original names and diffusers' names, as data.

A diffusion transformer ships in two namespaces: diffusers' (``transformer_blocks.0.attn.to_q``, what diffusers and
PEFT adapters name) and the original one its authors released (BFL's ``double_blocks.0.img_attn.qkv``, Wan's
``blocks.0.self_attn.q``; what ComfyUI loads natively and what kohya sd-scripts / musubi-tuner train on). One
:class:`Rule` maps one original module to the diffusers modules it holds, in row order: one module is a rename, several
are a packed (fused) weight. ``{i}``/``{j}`` in the names stand for block indices, ``{path}`` for any rest of a path
(``Rule("{path}", ("{path}",))``: the two namespaces agree, only the file prefix differs).

adaptkit keeps original names under the ``unet`` component (kohya's ``lora_unet_`` prefix names them so) and diffusers
names under ``transformer``; :mod:`adaptkit.formats.arch.remap` moves an adapter between the two.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

#: the component that holds each namespace's paths in adaptkit's graph
ORIGINAL = "unet"
DIFFUSERS = "transformer"
_SLOT = re.compile(r"\{([a-z]+)\}")


def _compile(template: str) -> re.Pattern[str]:
    """A template's regex: one-letter slots (``{i}``) match a block index, ``{path}`` any dotted rest."""
    parts = _SLOT.split(template)
    out = []
    for k, part in enumerate(parts):
        if k % 2:
            out.append(f"(?P<{part}>\\d+)" if len(part) == 1 else f"(?P<{part}>.+)")
        else:
            out.append(re.escape(part))
    return re.compile("".join(out) + "$")


@dataclass(frozen=True)
class Rule:
    """One original module and the diffusers modules it holds.

    Args:
        original: the original module path template (``"double_blocks.{i}.img_attn.qkv"``).
        diffusers: the diffusers module path templates, in the packed weight's row order.
        swap: the two halves of the output rows are swapped between the namespaces (``(shift, scale)`` vs
            ``(scale, shift)`` of the final adaptive norm).
        scale_one: in original names the layer is written with scale 1 (alpha = rank, the scale baked into ``up``),
            because a reader of that layout ignores its alpha (diffusers' kohya Flux converter, for the final layer).
        sizes: how the packed rows divide when no model lists the members, one token per member: ``"in"`` = the
            weight's input features (Flux's ``linear1`` is ``("in", "in", "in", "mlp")``), members with the same
            other token have equal sizes, and one group may be the rest of the rows. ``None``: all equal.
    """

    original: str
    diffusers: tuple[str, ...]
    swap: bool = False
    scale_one: bool = False
    sizes: tuple[str, ...] | None = None

    def member_sizes(self, in_features: int, total: int | None = None,
                     known: Mapping[int, int] | None = None) -> list[int] | None:
        """The rows of each member from the size tokens, the packed ``total`` (splitting) and the rows of the
        members at hand (``known``: index -> rows, stacking); ``None`` when they do not determine them."""
        tokens = self.sizes or ("=",) * len(self.diffusers)
        known = dict(known or {})
        group: dict[str, int] = {"in": in_features}
        for i, rows in known.items():
            if group.setdefault(tokens[i], rows) != rows:
                return None
        open_groups = {t for t in tokens if t not in group}
        if open_groups:
            if total is None or len(open_groups) != 1:
                return None
            (t,) = open_groups
            rest = total - sum(group[x] for x in tokens if x in group)
            count = tokens.count(t)
            if rest <= 0 or rest % count:
                return None
            group[t] = rest // count
        sizes = [group[t] for t in tokens]
        return sizes if total is None or sum(sizes) == total else None

    @cached_property
    def original_re(self) -> re.Pattern[str]:
        return _compile(self.original)

    @cached_property
    def diffusers_re(self) -> tuple[re.Pattern[str], ...]:
        return tuple(_compile(d) for d in self.diffusers)

    @property
    def fused(self) -> bool:
        return len(self.diffusers) > 1


@dataclass(frozen=True)
class Arch:
    """A diffusion architecture: its diffusers model class, its published config and its module map.

    Args:
        name: short name (``"flux"``), also the shipped inventory's name.
        label: for tables (``"Flux.1"``).
        model_class: the diffusers class (``"FluxTransformer2DModel"``).
        config: the published config of the released model (the shipped inventory is built from it).
        rules: the module map (:class:`Rule`); every module an adapter names must be covered by one.
        pipeline: the diffusers pipeline class whose ``lora_state_dict`` reads this architecture's files.
        layouts: the formats this architecture's adapters ship in (``"diffusers"``, ``"kohya"``, ``"comfyui"``,
            ``"xlabs"``), for the docs table and for the checks.
        text_encoders: the text encoder components LoRAs for it touch (``{"text_encoder": <inventory listing>}``
            is built by the inventory script).
        marks: original module prefixes that tell this architecture from others in a file (detection).
        notes: where the map comes from (diffusers' converter, ComfyUI's key map), for the docs.
    """

    name: str
    label: str
    model_class: str
    config: Mapping[str, Any]
    rules: tuple[Rule, ...]
    pipeline: str | None = None
    layouts: tuple[str, ...] = ("diffusers", "kohya", "comfyui")
    text_encoders: tuple[str, ...] = ()
    notes: str = ""
    extra: Mapping[str, Any] = field(default_factory=dict)

    def to_diffusers(self, path: str) -> tuple[Rule, tuple[str, ...]] | None:
        """The rule and diffusers member paths of an original module path, or ``None`` when no rule covers it."""
        for rule in self.rules:
            m = rule.original_re.match(path)
            if m:
                slots = m.groupdict()
                return rule, tuple(_fill(d, slots) for d in rule.diffusers)
        return None

    def to_original(self, path: str) -> tuple[Rule, str, int, tuple[str, ...]] | None:
        """``(rule, original path, index among the members, all member paths)`` of a diffusers module path."""
        for rule in self.rules:
            for k, pat in enumerate(rule.diffusers_re):
                m = pat.match(path)
                if m:
                    slots = m.groupdict()
                    return rule, _fill(rule.original, slots), k, tuple(_fill(d, slots) for d in rule.diffusers)
        return None


def _fill(template: str, slots: Mapping[str, str]) -> str:
    return _SLOT.sub(lambda m: slots[m.group(1)], template)


def original_listing(arch: Arch, diffusers: Mapping[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """The original module names and weight shapes of a model from its diffusers listing and the module map: packed
    weights have the members' rows stacked. Rules whose members the listing lacks are left out."""
    out: dict[str, tuple[int, ...]] = {}
    for path in diffusers:
        hit = arch.to_original(path)
        if hit is None:
            continue
        rule, orig, _, members = hit
        if orig in out or not all(m in diffusers for m in members):
            continue
        shapes = [tuple(diffusers[m]) for m in members]
        out[orig] = (sum(s[0] for s in shapes), *shapes[0][1:])
    return out


__all__ = ["DIFFUSERS", "ORIGINAL", "Arch", "Rule", "original_listing"]
