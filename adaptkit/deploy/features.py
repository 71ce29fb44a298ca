"""The adapter features deploy rules are about, and the detectors that find them in an :class:`Adapter`.

Each detector is ``(adapter, ctx) -> [what uses the feature]`` (sorted module paths or config fields). They ask
layers through the layer protocol only (``dora``, ``additive``, ``experts()``, ``keeps_as_lora()``, ``scale``,
``rank``, ``delta_bias()``, ``fro_norm()``), never the kind's name. :data:`FEATURES` names the columns of the table
in docs/deploy.md, in order.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from ..core.adapter import Adapter
from ..core.kinds import Layer
from ..formats.coverage import extra_module, unchanged_extras
from .rules import Context, Rule

Detector = Callable[[Adapter, Context], list[str]]

#: projections runtimes pack into one matrix, in the packed matrix's row order: fused name -> member names
FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
#: what ``rank`` / ``scale`` comparisons treat as equal (relative)
REL_TOL = 1e-9


@dataclass(frozen=True)
class Feature:
    """A column of the deploy table.

    Args:
        name: the key rules use. label: the column's text. detect: the detector.
        description: one line for the docs.
    """

    name: str
    label: str
    detect: Detector
    description: str


def plain_lora(layer: Layer) -> bool:
    """A LoRA layer runtimes take as it is: low-rank ``B A`` on a module (no Tucker core, not on stacked experts)."""
    return layer.experts() is None and layer.keeps_as_lora(None)


def _paths(adapter: Adapter, test: Callable[[Layer], bool]) -> list[str]:
    return sorted(p for p, layer in adapter.layers.items() if test(layer))


def dora(adapter: Adapter, ctx: Context) -> list[str]:
    """Layers with a DoRA magnitude vector."""
    return _paths(adapter, lambda l: l.dora)


def bias(adapter: Adapter, ctx: Context) -> list[str]:
    """Layers that change their module's bias (PEFT ``lora_B.bias``, ``lora_bias=True``)."""
    return _paths(adapter, lambda l: l.additive and l.has_delta and l.delta_bias() is not None)


def _changed_extras(adapter: Adapter, ctx: Context) -> list[str]:
    """The extra tensors that change something: all of them, less the copies equal to the base
    (:func:`adaptkit.formats.coverage.unchanged_extras`, which needs the base's weights)."""
    same = set(unchanged_extras(adapter, ctx.base)) if ctx.base is not None else set()
    return sorted(k for k in adapter.extras if k not in same)


def modules_to_save(adapter: Adapter, ctx: Context) -> list[str]:
    """Whole tensors saved beside the layers (PEFT ``modules_to_save`` copies, saved embeddings) that differ from
    the base (an unchanged ``save_embedding_layers`` copy is a no-op: :func:`zero_layers`)."""
    return _changed_extras(adapter, ctx)


def saved_outside(allowed: Iterable[str]) -> Detector:
    """A detector of saved tensors (``modules_to_save``) of modules other than ``allowed`` (vLLM loads a classification
    head, ``score`` / ``classifier``, whole)."""
    names = frozenset(allowed)

    def detect(adapter: Adapter, ctx: Context) -> list[str]:
        return [k for k in _changed_extras(adapter, ctx) if extra_module(k).rsplit(".", 1)[-1] not in names]

    detect.__doc__ = f"Saved tensors of modules other than {', '.join(sorted(names))}."
    return detect


def trainable_tokens(adapter: Adapter, ctx: Context) -> list[str]:
    """Embedding layers that replace rows instead of adding to them (PEFT ``trainable_tokens_delta``)."""
    return _paths(adapter, lambda l: not l.additive and not l.dora and l.module_type == "embedding")


def base_dependent(adapter: Adapter, ctx: Context) -> list[str]:
    """Layers whose effect depends on the base weight (OFT, BOFT, HRA, IA3, GLoRA ...), DoRA and embeddings apart."""
    return _paths(adapter, lambda l: not l.additive and not l.dora and l.module_type != "embedding"
                  and l.experts() is None)


def target_parameters(adapter: Adapter, ctx: Context) -> list[str]:
    """LoRA on stacked expert parameters (PEFT ``target_parameters``, MoE ``experts.gate_up_proj``)."""
    return _paths(adapter, lambda l: l.experts() is not None)


def _lora_layers(adapter: Adapter) -> dict[str, Layer]:
    return {p: l for p, l in adapter.layers.items() if plain_lora(l)}


def _differs(a: float, b: float) -> bool:
    return abs(a - b) > REL_TOL * max(abs(a), abs(b), 1e-30)


def rslora(adapter: Adapter, ctx: Context) -> list[str]:
    """LoRA layers whose scale is not ``alpha / r`` (rsLoRA's ``alpha / sqrt(r)``)."""
    return sorted(p for p, l in _lora_layers(adapter).items() if _differs(l.scale, l.alpha / l.rank))


def alpha_pattern(adapter: Adapter, ctx: Context) -> list[str]:
    """LoRA layers whose scale differs from the most common one (a config ``alpha_pattern`` / ``rank_pattern``)."""
    layers = _lora_layers(adapter)
    if not layers:
        return []
    common = Counter(round(l.scale, 12) for l in layers.values()).most_common(1)[0][0]
    return sorted(p for p, l in layers.items() if _differs(l.scale, common))


def rank_pattern(adapter: Adapter, ctx: Context) -> list[str]:
    """LoRA layers whose rank is below the adapter's largest (a config ``rank_pattern``)."""
    layers = _lora_layers(adapter)
    top = max((l.rank for l in layers.values()), default=0)
    return sorted(p for p, l in layers.items() if l.rank < top)


def rank(adapter: Adapter, ctx: Context) -> list[str]:
    """Layers whose rank is above the target's rank limit."""
    if ctx.max_rank is None:
        return []
    return _paths(adapter, lambda l: l.rank is not None and l.rank > ctx.max_rank)


def other_kinds(adapter: Adapter, ctx: Context) -> list[str]:
    """Additive layers that are no plain LoRA (LoHa, LoKr, full diffs, Tucker LoCon, VeRA ...)."""
    return _paths(adapter, lambda l: l.additive and not l.dora and l.experts() is None and not plain_lora(l))


def module_type(adapter: Adapter, ctx: Context) -> list[str]:
    """Layers on modules that are neither linear nor embeddings (convolutions, norms)."""
    return _paths(adapter, lambda l: l.module_type not in ("linear", "embedding"))


def zero_layers(adapter: Adapter, ctx: Context) -> list[str]:
    """Additive layers whose change is exactly zero (no-op parts; a rank-0 pattern, an untrained B), and saved
    tensors equal to the base's (:func:`adaptkit.formats.coverage.unchanged_extras`; known with a base only)."""
    zero = _paths(adapter, lambda l: l.additive and l.has_delta and l.fro_norm() == 0.0
                  and (l.delta_bias() is None or float(l.delta_bias().abs().max()) == 0.0))
    return sorted(zero + (unchanged_extras(adapter, ctx.base) if ctx.base is not None else []))


def leaf_names_outside(allowed: Iterable[str]) -> Detector:
    """A detector of layers whose module's last name is not in ``allowed`` (a runtime's list of LoRA modules)."""
    names = frozenset(allowed)

    def detect(adapter: Adapter, ctx: Context) -> list[str]:
        return _paths_by_name(adapter, names)

    detect.__doc__ = f"Layers on modules other than {', '.join(sorted(names))}."
    return detect


def _paths_by_name(adapter: Adapter, names: frozenset[str]) -> list[str]:
    return sorted(p for p in adapter.layers if p.rsplit(".", 1)[-1] not in names)


def target_names(adapter: Adapter, ctx: Context) -> list[str]:
    """``target_modules`` that are not bare module names (dotted paths, a regex string, or none written yet)."""
    targets = adapter.config.get("target_modules")
    if isinstance(targets, (list, tuple)) and targets and all(isinstance(t, str) and "." not in t for t in targets):
        return []
    return ["target_modules"]


#: ``init_lora_weights`` values whose adapter only works on a base the init changed (PiSSA, OLoRA, CorDA, LoftQ, EVA)
BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq", "eva")
#: PEFT config fields of LoRA variants runtimes do not implement
VARIANT_FIELDS = ("alora_invocation_tokens", "layer_replication", "use_bdlora", "use_qalora")


def init_weights(adapter: Adapter, ctx: Context) -> list[str]:
    """``init_lora_weights`` that changed the base when PEFT loads the adapter (PiSSA, OLoRA, CorDA, LoftQ ...)."""
    init = adapter.config.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(BASE_CHANGING_INITS):
        return [f"init_lora_weights={init}"]
    return []


def variants(adapter: Adapter, ctx: Context) -> list[str]:
    """Config fields of LoRA variants (aLoRA, layer replication, BD-LoRA, QALoRA) that are set."""
    return [f for f in VARIANT_FIELDS if adapter.config.get(f)]


# ------------------------------------------------------------------------------ fused / split projections


def base_paths(ctx: Context) -> set[str]:
    """Every module path of the base (components joined as ``component.path``), empty without a base."""
    inv = ctx.inventory
    if inv is None:
        return set()
    return {(f"{c}.{p}" if c else p) for c, mods in inv.modules.items() for p in mods}


def _suffixes(paths: Iterable[str]) -> set[str]:
    out = set()
    for p in paths:
        parts = p.split(".")
        out.update(".".join(parts[i:]) for i in range(len(parts)))
    return out


def in_base(path: str, paths: set[str], suffixes: set[str]) -> bool:
    """Whether an adapter path names a base module (exactly, or with prefixes on either side removed)."""
    if path in suffixes:
        return True
    parts = path.split(".")
    return any(".".join(parts[i:]) in paths for i in range(1, len(parts) - 1))


def fused_plan(adapter: Adapter, ctx: Context) -> dict[str, str]:
    """``{adapter path: "fuse" | "split"}``: per-projection layers (``q_proj``...) on a base that packs them
    (``qkv_proj``), or packed layers on a base that has the projections apart. Empty without a base."""
    paths = base_paths(ctx)
    if not paths:
        return {}
    suffixes = _suffixes(paths)
    plan = {}
    for path in adapter.layers:
        if in_base(path, paths, suffixes):
            continue
        parent, _, leaf = path.rpartition(".")
        for fused, members in FUSED.items():
            if leaf in members and in_base(f"{parent}.{fused}", paths, suffixes):
                plan[path] = "fuse"
            elif leaf == fused and all(in_base(f"{parent}.{m}", paths, suffixes) for m in members):
                plan[path] = "split"
    return plan


def fused_names(adapter: Adapter, ctx: Context) -> list[str]:
    """Layers named per projection where the base packs them, or packed where the base has them apart."""
    return sorted(fused_plan(adapter, ctx))


FEATURES: dict[str, Feature] = {f.name: f for f in (
    Feature("dora", "DoRA", dora, "a DoRA magnitude vector (`use_dora`)"),
    Feature("bias", "LoRA bias", bias, "`lora_B.bias` (`lora_bias=True`)"),
    Feature("modules_to_save", "modules_to_save", modules_to_save, "whole saved modules (`modules_to_save`)"),
    Feature("trainable_tokens", "trainable tokens", trainable_tokens, "`trainable_tokens_delta` rows"),
    Feature("base_dependent", "OFT/IA3-like", base_dependent, "layers that act through the base weight (OFT, BOFT, "
            "HRA, IA3, GLoRA ...)"),
    Feature("target_parameters", "MoE target_parameters", target_parameters, "LoRA on stacked expert parameters"),
    Feature("rslora", "rsLoRA", rslora, "`use_rslora` (scale `alpha/sqrt(r)`)"),
    Feature("alpha_pattern", "alpha_pattern", alpha_pattern, "per-layer scales (`alpha_pattern`)"),
    Feature("rank_pattern", "rank_pattern", rank_pattern, "per-layer ranks (`rank_pattern`)"),
    Feature("rank", "rank > limit", rank, "a rank above the target's limit (`--max-rank`)"),
    Feature("other_kinds", "LoHa/LoKr/full", other_kinds, "additive kinds other than plain LoRA"),
    Feature("module_type", "conv/norm modules", module_type, "layers on convolutions or norms"),
    Feature("module_names", "module names", lambda a, c: [], "modules outside the runtime's LoRA module list"),
    Feature("tied_embeddings", "tied embeddings", lambda a, c: [], "layers on the embedding or lm_head of a base "
            "that ties them (`tie_word_embeddings`)"),
    Feature("target_names", "prefixed target_modules", target_names, "dotted or regex `target_modules`"),
    Feature("fused_names", "fused/split names", fused_names, "q/k/v or gate/up named apart on a packed base, or the "
            "reverse"),
    Feature("init_weights", "PiSSA/OLoRA init", init_weights, "`init_lora_weights` that changes the base (PiSSA, "
            "OLoRA, CorDA, LoftQ)"),
    Feature("variants", "aLoRA/QALoRA/...", variants, "`alora_invocation_tokens`, `layer_replication`, `use_bdlora`, "
            "`use_qalora`"),
    Feature("zero_layers", "no-op layers", zero_layers, "layers whose change is exactly zero, saved copies "
            "equal to the base"),
)}


def rule_maker(target: str, source: str) -> Callable[..., Rule]:
    """The rule constructor of one runtime's table: ``make(feature, verdict, message, fix=None, source=<default>,
    finds=None)`` builds ``Rule("<target>.<feature>", ...)`` whose detector is the feature's own unless ``finds``
    replaces it (every table writes its rows this way)."""

    def make(feature: str, verdict: str, message: str, fix: str | None = None, source: str = source,
             finds: Detector | None = None) -> Rule:
        return Rule(f"{target}.{feature}", feature, verdict, finds or FEATURES[feature].detect, message, fix, source)

    return make

__all__ = ["FEATURES", "FUSED", "Detector", "Feature", "base_paths", "fused_plan", "in_base", "leaf_names_outside", "rule_maker",
           "plain_lora", "saved_outside"]
