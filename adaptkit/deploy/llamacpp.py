"""llama.cpp as a deploy target: where an adapter's layers land in a GGUF base, and the rules, as data.

llama.cpp loads LoRA adapters as GGUF files (:mod:`adaptkit.formats.gguf`) whose tensors are named after the
base model's GGUF tensors. The base is converted from a transformers checkpoint by llama.cpp's
``convert_hf_to_gguf.py``, which renames every tensor through gguf-py's tensor-name map
(``gguf.get_tensor_name_map(MODEL_ARCH, n_blocks)``) and, for some architectures, transforms it; a LoRA on
that tensor must be transformed the same way. This module holds, per transformers ``model_type``:

* the GGUF architecture (``gguf.MODEL_ARCH`` member), and
* the transforms of the converter that touch adapted weights: llama's q/k row permutation
  (``LlamaModel.permute`` in ``conversion/llama.py``, llama.cpp vendored in llama-cpp-python 0.3.36), which
  permutes the rows of ``W``, hence of ``B`` in ``W + B A``.

Everything else comes from the tensor-name map, not from a table here. :func:`export_gguf` plans where each
layer lands, certifies coverage against the base and against the GGUF name map, bakes each layer's scale into
``B`` (so rsLoRA, ``alpha_pattern`` and ``rank_pattern`` are exact under llama.cpp's one ``alpha``) and writes
the file. :data:`RULES` lists what it accepts, fixes or refuses, each with the llama.cpp source it comes from.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .._version import __version__
from ..core.adapter import Adapter
from ..core.coverage import Certificate, Outcome, certify
from ..core.kinds.lora import LoRA
from ..errors import ConfigError, ShapeMismatchError, UnsupportedError
from ..formats.coverage import (
    TIED_OUTPUT,
    base_tensors,
    match_layers,
    tied_output_source,
    unchanged_extras,
    with_tied_output,
)
from ..formats.gguf import (
    MODULES_KEY,
    GGUFAdapter,
    GGUFPair,
    check_fits_base,
    exact_alpha,
    gguf_module,
    modules_of,
    read_gguf_lora,
    write_gguf_lora,
)
from ..io.sources import resolve
from .features import rule_maker
from .rules import Context, Rule, Target

#: where the facts below were read (llama.cpp as vendored in llama-cpp-python 0.3.36, gguf-py 0.19.0)
SOURCE = "llama.cpp (llama-cpp-python 0.3.36 vendor)"


@dataclass(frozen=True)
class Arch:
    """One transformers architecture llama.cpp's converter handles, as far as LoRA layers care.

    Args:
        gguf_arch: the ``gguf.MODEL_ARCH`` member name (``"LLAMA"``).
        permute: ``{gguf.MODEL_TENSOR member name: config key of its head count}``: tensors whose rows the
            converter permutes with ``LlamaModel.permute(W, n_head, n_head_kv)``.
        source: the converter code this row was read from.
    """

    gguf_arch: str
    permute: Mapping[str, str] = field(default_factory=dict)
    source: str = ""


_LLAMA_PERMUTE = {"ATTN_Q": "num_attention_heads", "ATTN_K": "num_key_value_heads"}

#: transformers ``model_type`` -> what llama.cpp's converter does with it
ARCHS: Mapping[str, Arch] = {
    "llama": Arch("LLAMA", _LLAMA_PERMUTE, "conversion/llama.py LlamaModel (undo_permute = True)"),
    "mistral": Arch("LLAMA", _LLAMA_PERMUTE, "conversion/llama.py LlamaModel registers MistralForCausalLM"),
    "qwen2": Arch("QWEN2", {}, "conversion/qwen.py Qwen2Model (names only)"),
    "phi3": Arch("PHI3", {}, "conversion/phi.py Phi3MiniModel (names only; qkv_proj/gate_up_proj stay fused)"),
}


def permute_rows(rows: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's ``LlamaModel.permute`` on the first axis: per head, transformers' rotary halves
    (``rotate_half``) -> llama.cpp's interleaved pairs (row ``2i`` <- ``i``, ``2i+1`` <- ``i + d/2``)."""
    d = rows.shape[0]
    return rows.reshape(n_head, 2, d // n_head // 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


def unpermute_rows(rows: torch.Tensor, n_head: int) -> torch.Tensor:
    """The inverse of :func:`permute_rows`."""
    d = rows.shape[0]
    return rows.reshape(n_head, d // n_head // 2, 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


@dataclass(frozen=True)
class Landing:
    """Where one adapter layer lands in the GGUF base.

    Args:
        path: the adapter's module path.
        weight: the base weight key it matched (``model.layers.0.self_attn.q_proj.weight``), or ``None``.
        tensor: the GGUF tensor (``blk.0.attn_q.weight``), or ``None`` when it has none.
        shape: the base weight's shape (transformers orientation).
        embedding: the tensor is ``token_embd`` (llama.cpp flips A and B there).
        permute_heads: the head count of the converter's row permutation, 0 for none.
        reason: why it does not land (empty when it does).
    """

    path: str
    weight: str | None
    tensor: str | None
    shape: tuple[int, ...] = ()
    embedding: bool = False
    permute_heads: int = 0
    reason: str = ""


@dataclass(frozen=True)
class Plan:
    """An adapter planned onto a base for llama.cpp: the architecture, each layer's landing, the certificate.

    Args:
        arch: ``general.architecture`` of the GGUF base (``llama``).
        model_type: the transformers ``model_type``.
        landings: adapter path -> :class:`Landing` for the layers that land.
        certificate: the coverage certificate (drop patterns applied): base match, GGUF name, llama.cpp's rules.
    """

    arch: str
    model_type: str
    landings: Mapping[str, Landing]
    certificate: Certificate


def base_config(base: str | os.PathLike) -> dict[str, Any]:
    """The base model's ``config.json`` (a transformers checkpoint directory or hub id).

    Raises:
        ConfigError: the base has no readable ``config.json``.
    """
    root = resolve(base, allow_patterns=["config.json"]).path
    cfg = root / "config.json" if root.is_dir() else root.with_name("config.json")
    try:
        data = json.loads(cfg.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"the base {base} has no readable config.json ({e}); give the transformers checkpoint "
                          "the GGUF base was converted from") from e
    return {**data, **data.get("text_config", {})}


def arch_of(config: Mapping[str, Any]) -> Arch:
    """The :class:`Arch` row of a base config.

    Raises:
        UnsupportedError: the ``model_type`` has no row (the message lists those that do).
    """
    model_type = str(config.get("model_type"))
    if model_type not in ARCHS:
        raise UnsupportedError(f"llama.cpp export knows no architecture {model_type!r}; supported: "
                               f"{', '.join(sorted(ARCHS))}")
    return ARCHS[model_type]


def plan(adapter: Adapter, base: str | os.PathLike, *, drop: Sequence[str] = ()) -> Plan:
    """Plan where each layer of ``adapter`` lands in the GGUF conversion of ``base``, and certify it.

    A layer lands when it matches a base weight (:func:`adaptkit.formats.coverage.match_layers`: names and
    shapes), gguf's tensor-name map has a name for that weight among the architecture's tensors, and llama.cpp
    can hold it (:func:`layer_refusal`). Extra tensors (``modules_to_save``) never land: llama.cpp adapters
    hold LoRA pairs only. The certificate must be complete up to the layers named by a ``drop`` glob.

    Raises:
        UnsupportedError: a layer llama.cpp cannot hold and ``drop`` does not name (DoRA, bias, not low-rank),
            or the architecture has no row in :data:`ARCHS`.
        CoverageError: another layer or extra tensor does not land and ``drop`` does not name it.
    """
    gguf = gguf_module()
    config = base_config(base)
    arch = arch_of(config)
    name, shapes = base_tensors(base, tied_output=False)  # a tied model's GGUF has no output tensor
    outcomes, extra_outcomes = match_layers(adapter, shapes, name)
    tied_embed = tied_output_source(shapes, base)  # token_embd is the output projection too: tied_layers
    g_arch = gguf.MODEL_ARCH[arch.gguf_arch]
    tmap = gguf.get_tensor_name_map(g_arch, int(config["num_hidden_layers"]))
    known = set(gguf.MODEL_TENSORS[g_arch])
    landings: dict[str, Landing] = {}
    final: dict[str, Outcome] = {}
    for path, layer in adapter.layers.items():
        o = outcomes[path]
        if o.target is None:
            final[path] = o
            continue
        found = tmap.get_type_and_name(o.target, try_suffixes=(".weight",))
        if found is None or found[0] not in known:
            final[path] = Outcome(None, "unmatched", f"gguf's {arch.gguf_arch} tensor-name map has no tensor for "
                                  f"{o.target}: llama.cpp would not load it")
            continue
        if (why := layer_refusal(layer)) is not None:
            final[path] = Outcome(None, "refused", why)
            continue
        if tied_embed is not None and o.target == tied_embed:
            final[path] = Outcome(None, "refused", TIED_MESSAGE)
            continue
        kind, tensor = found
        heads = int(config.get(arch.permute[kind.name]) or config["num_attention_heads"]) \
            if kind.name in arch.permute else 0
        landings[path] = Landing(path, o.target, tensor, tuple(shapes[o.target]),
                                 embedding=kind == gguf.MODEL_TENSOR.TOKEN_EMBD, permute_heads=heads)
        final[path] = Outcome(tensor)
    extras = extra_outcomes_for_llamacpp(adapter, base, extra_outcomes)
    cert = certify(adapter, final, operation="export", target=f"llama.cpp ({arch.gguf_arch.lower()}, {name})",
                   extras=extras).drop(drop)
    refused = [c for c in cert.missing if c.status == "refused"]
    if refused:
        c = refused[0]
        raise UnsupportedError(f"llama.cpp cannot load {len(refused)} part(s) of this adapter, e.g. {c.path}: "
                               f"{c.reason}; or leave them out with --drop PATTERN")
    cert = cert.require()
    return Plan(arch.gguf_arch.lower(), str(config["model_type"]), landings, cert)


# ---------------------------------------------------------------------------------------------- layers


def extra_outcomes_for_llamacpp(adapter: Adapter, base: str | os.PathLike,
                                outcomes: Mapping[str, Outcome]) -> dict[str, Outcome]:
    """The extra tensors' outcomes: a copy equal to the base weight (PEFT's ``save_embedding_layers``;
    :func:`adaptkit.formats.coverage.unchanged_extras`) changes nothing and lands as a no-op; any other extra is
    refused, since llama.cpp adapters hold LoRA pairs only."""
    refused = Outcome(None, "refused", "llama.cpp adapters hold LoRA pairs only (modules_to_save, changed token "
                      "weights); fuse the adapter into the base instead")
    same = set(unchanged_extras(adapter, base))
    out: dict[str, Outcome] = {}
    for key in adapter.extras:
        o = outcomes.get(key)
        if o is None or o.target is None:  # no counterpart in the base: the base certificate's outcome
            out[key] = o or refused
        else:
            out[key] = Outcome(f"{o.target} (equal to the base: nothing to load)") if key in same else refused
    return out


def layer_refusal(layer: Any) -> str | None:
    """Why llama.cpp cannot hold one layer exactly as a LoRA pair, ``None`` when it can."""
    if layer.dora:
        return ("llama.cpp has no DoRA (its adapters are plain B A pairs); fuse the adapter into the base "
                "(adaptkit fuse) and convert the fused model")
    if layer.changes_bias:
        return "llama.cpp LoRA adapters carry no bias; fuse the adapter into the base instead"
    if not layer.additive or layer.factors() is None:
        return "it is not low-rank; convert it first (adaptkit convert --kind lora --rank R)"
    return None


def gguf_pair(layer: Any, landing: Landing) -> GGUFPair:
    """The GGUF pair of one layer: ``B`` carries the layer's scale and the converter's row permutation.

    Raises:
        ShapeMismatchError: the layer's delta does not fit the base weight.
    """
    up, down = layer.factors(torch.float32)  # (out, r) scaled, (r, in), math orientation
    if up.ndim != 2 or down.ndim != 2 or len(landing.shape) != 2:
        raise ShapeMismatchError(f"{landing.path}: llama.cpp adapts 2-D weights only, the base weight is {landing.shape}")
    math_shape = (landing.shape[1], landing.shape[0]) if landing.embedding else landing.shape
    if (up.shape[0], down.shape[1]) != tuple(math_shape):
        raise ShapeMismatchError(f"{landing.path}: the adapter's delta is {(up.shape[0], down.shape[1])}, the base "
                                 f"weight {landing.weight} is {landing.shape}; the adapter belongs to another base")
    if landing.permute_heads:
        up = permute_rows(up, landing.permute_heads)
    if landing.embedding:  # token_embd: lora_a (vocab, r) gathered by token, lora_b (n_embd, r)
        return GGUFPair(landing.tensor, down.T.contiguous(), up.contiguous())
    return GGUFPair(landing.tensor, down.contiguous(), up.contiguous())


def export_gguf(adapter: Adapter, out: str | os.PathLike, *, base: str | os.PathLike, drop: Sequence[str] = (),
                overwrite: bool = False, dtype: str = "f32", metadata: Mapping[str, str] | None = None,
                gguf_base: str | os.PathLike | None = None) -> Path:
    """Write ``adapter`` as a GGUF LoRA adapter llama.cpp loads onto the GGUF conversion of ``base``.

    Args:
        adapter: the adapter (PEFT LoRA, rsLoRA, rank/alpha patterns, embedding and lm_head layers).
        out: the ``.gguf`` file.
        base: the transformers checkpoint (directory or hub id) the GGUF base was converted from.
        drop: globs of module paths to leave out on purpose (layers that do not land otherwise fail).
        overwrite: replace an existing ``out``.
        dtype: ``"f32"`` or ``"f16"`` factors.
        metadata: more string KVs for the file (``adaptkit.export``); the certificate's own key is this export's.
        gguf_base: the converted ``.gguf`` model, to check every pair against its tensors as llama.cpp's loader
            does (architecture, names, shapes) before writing.

    Raises:
        CoverageError: a layer does not land in the base or has no GGUF name, and no ``drop`` glob names it.
        UnsupportedError: a layer llama.cpp cannot hold (DoRA, bias, not low-rank) or an extra tensor
            (``modules_to_save``); the message names it and the fix.
        ShapeMismatchError: with ``gguf_base``, a pair llama.cpp would refuse on it.
    """
    p = plan(adapter, base, drop=drop)
    landing = p.landings
    pairs = {l.tensor: gguf_pair(adapter.layers[path], l) for path, l in landing.items()}
    rows = [[l.tensor, path, f"permute:{l.permute_heads}" if l.permute_heads else ("embedding" if l.embedding else "")]
            for path, l in landing.items()]
    meta = {**(metadata or {}), **p.certificate.metadata(), MODULES_KEY: json.dumps(rows),
            "adaptkit.version": __version__}
    if adapter.base_model:
        meta["adaptkit.base_model"] = str(adapter.base_model)
    g = GGUFAdapter(p.arch, exact_alpha(pairs), pairs, meta)
    if gguf_base is not None:
        check_fits_base(g, gguf_base)
    return write_gguf_lora(g, out, overwrite=overwrite, dtype=dtype)


def load_gguf(path: str | os.PathLike) -> Adapter:
    """Read a GGUF LoRA adapter back into an :class:`Adapter` in the transformers namespace.

    The module paths and permutations come from adaptkit's ``adaptkit.modules`` entry; a file without it
    (llama.cpp's own converter) keeps the GGUF tensor names as paths. Each layer's scale is llama.cpp's
    (``alpha / r``, or 1 with alpha 0) at adapter scale 1.

    Raises:
        FormatError: the file is not a GGUF LoRA adapter.
    """
    g = read_gguf_lora(path)
    rows = {t: (p, how) for t, p, how in modules_of(g)}
    layers = {}
    for tensor, pair in g.pairs.items():
        module, how = rows.get(tensor, (tensor.removesuffix(".weight"), ""))
        embedding = how == "embedding" or tensor == "token_embd.weight"
        if embedding:
            down, up = pair.a.T.contiguous(), pair.b
        else:
            down, up = pair.a, pair.b
        if how.startswith("permute:"):
            up = unpermute_rows(up, int(how.split(":")[1]))
        r = pair.rank
        alpha = g.scale(tensor) * r
        if embedding:
            layers[module] = LoRA(down=down, up=up, alpha=alpha, shape=(down.shape[1], up.shape[0]),
                                  module_type="embedding", fan_in_fan_out=True)
        else:
            layers[module] = LoRA(down=down, up=up, alpha=alpha, shape=(up.shape[0], down.shape[1]))
    meta = dict(g.metadata)
    return Adapter(layers=layers, base_model=meta.get("adaptkit.base_model"), metadata=meta, format="gguf",
                   source=str(path))


# ---------------------------------------------------------------------------------------------- target


def unnamed_layers(adapter: Adapter, ctx: Context) -> list[str]:
    """Layers that match a base weight for which gguf's tensor-name map has no GGUF tensor (llama.cpp would never
    look them up); empty without a base (the coverage certificate of ``export`` still checks)."""
    if ctx.base is None:
        return []
    gguf = gguf_module()
    config = base_config(ctx.base)
    if str(config.get("model_type")) not in ARCHS:
        return []
    arch = ARCHS[str(config["model_type"])]
    name, shapes = base_tensors(ctx.base)
    outcomes, _ = match_layers(adapter, shapes, name)
    g_arch = gguf.MODEL_ARCH[arch.gguf_arch]
    tmap = gguf.get_tensor_name_map(g_arch, int(config["num_hidden_layers"]))
    known = set(gguf.MODEL_TENSORS[g_arch])
    out = []
    for path, o in outcomes.items():
        if o.target is not None:
            found = tmap.get_type_and_name(o.target, try_suffixes=(".weight",))
            if found is None or found[0] not in known:
                out.append(path)
    return sorted(out)


#: why llama.cpp cannot take a LoRA on a tied embedding or output layer (:func:`tied_layers`)
TIED_MESSAGE = ("a tied base's GGUF has no output tensor: llama.cpp applies a token_embd LoRA to the output matmul "
                "too and aborts (GGML_ASSERT ggml_can_mul_mat), and has no tensor for an output LoRA; fuse the "
                "adapter into the base, or leave the embedding/lm_head layers out with --drop")


def tied_layers(adapter: Adapter, ctx: Context) -> list[str]:
    """Layers on the input embedding or the output layer of a base that ties them (``tie_word_embeddings``).

    llama.cpp's GGUF of a tied model has no ``output`` tensor: the output projection is ``token_embd`` itself, and
    ``build_lora_mm`` looks adapters up by the base tensor's name, so a ``token_embd`` pair is also applied to the
    output matmul, in the embedding's orientation: ``GGML_ASSERT(ggml_can_mul_mat(a, b))`` aborts the process
    (measured with llama-cpp-python 0.3.36). An ``output`` pair has no tensor to land on. Empty without a base.
    """
    if ctx.base is None:
        return []
    name, shapes = base_tensors(ctx.base, tied_output=False)
    embed = tied_output_source(shapes, ctx.base)
    if embed is None:
        return []
    outcomes, _ = match_layers(adapter, with_tied_output(shapes, ctx.base), name)
    return sorted(p for p, o in outcomes.items() if o.target in (embed, TIED_OUTPUT))


def write_for_export(adapter: Adapter, out: str | os.PathLike, *, base: Any = None, overwrite: bool = False) -> Path:
    """The llama.cpp target's writer (``adaptkit export --target llama.cpp``): :func:`export_gguf` with the
    export's metadata.

    Raises:
        ConfigError: no ``base`` (the GGUF names, the q/k permutation and the coverage certificate need it).
    """
    if base is None:
        raise ConfigError("llama.cpp export needs --base: the transformers checkpoint the GGUF base was converted "
                          "from (its config gives the architecture, tensor names and q/k head counts)")
    meta = {k: str(v) for k, v in adapter.metadata.items() if k.startswith("adaptkit.")}
    return export_gguf(adapter, out, base=base, overwrite=overwrite, metadata=meta)


ADAPTER_CPP = f"src/llama-adapter.cpp llama_adapter_lora_init_impl, {SOURCE}"
GRAPH_CPP = f"src/llama-graph.cpp build_lora_mm / build_inp_embd, {SOURCE}"
CONVERT_LORA = f"convert_lora_to_gguf.py, {SOURCE}"


_rule = rule_maker("llama.cpp", ADAPTER_CPP)


#: llama.cpp's rule table: what ``--lora FILE.gguf`` does with each adapter feature (adaptkit's writer bakes every
#: layer's scale into B and picks adapter.lora.alpha so that llama.cpp's ``alpha / r`` per tensor is exact)
RULES = (
    _rule("dora", "lossy", "llama.cpp has no DoRA: a GGUF adapter holds lora_a/lora_b pairs only", "fold_dora"),
    _rule("bias", "lossy", "llama.cpp LoRA has no bias (tensors other than .lora_a/.lora_b/_norm.weight are an "
          "error: 'unexpected suffix')", "drop_bias"),
    _rule("modules_to_save", "lossy", "llama.cpp adapters hold LoRA pairs only, no saved modules", "fold_saved"),
    _rule("trainable_tokens", "exact", "llama.cpp has no trainable-token rows; it applies LoRA on token_embd "
          "(A gathered by token id)", "through_base", GRAPH_CPP),
    _rule("base_dependent", "exact", "llama.cpp applies LoRA only (scale * B (A x))", "through_base", GRAPH_CPP),
    _rule("target_parameters", "refused", "adaptkit writes no GGUF LoRA for stacked expert tensors (llama.cpp's "
          "build_lora_mm_id) yet", source=GRAPH_CPP + " build_lora_mm_id"),
    _rule("rslora", "exact", "llama.cpp scales by alpha / r with one adapter.lora.alpha; convert_lora_to_gguf.py "
          "ignores use_rslora", "bake_scale", f"src/llama-adapter.h get_scale; {CONVERT_LORA}"),
    _rule("alpha_pattern", "exact", "llama.cpp has one adapter.lora.alpha; convert_lora_to_gguf.py ignores "
          "alpha_pattern", "bake_scale", f"src/llama-adapter.h get_scale; {CONVERT_LORA}"),
    _rule("rank_pattern", "accepted", "llama.cpp takes r per tensor (lora_b ne[0]); adaptkit writes each layer's "
          "scale into B (alpha = r, or 0 when ranks differ)", source=f"src/llama-adapter.h get_scale, {SOURCE}"),
    _rule("other_kinds", "exact", "llama.cpp loads LoRA pairs only", "to_lora"),
    _rule("module_type", "refused", "llama.cpp adapts 2-D weights only and skips norm LoRA ('TODO: add support "
          "for norm vector')"),
    Rule("llama.cpp.tied_embeddings", "tied_embeddings", "refused", tied_layers, TIED_MESSAGE, None, f"src/llama-model.cpp (output = token_embd, TENSOR_DUPLICATED), src/llama-adapter.cpp get_weight, "
         f"{SOURCE}"),
    _rule("module_names", "refused", "gguf's tensor-name map has no GGUF tensor for these base weights: llama.cpp "
          "would never apply them", source=f"gguf-py/gguf/tensor_mapping.py TensorNameMap, {SOURCE}",
          finds=unnamed_layers),
    _rule("fused_names", "exact", "the adapter's projections are named apart from the base's packed ones (or the "
          "reverse): those layers match no GGUF tensor", "fused",
          f"conversion/phi.py Phi3MiniModel (qkv_proj -> attn_qkv), {SOURCE}"),
    _rule("init_weights", "refused", "PiSSA/OLoRA/CorDA/LoftQ inits change the base: convert with adaptkit convert "
          "'pissa->lora' --initial INITIAL first"),
    _rule("variants", "refused", "aLoRA invocation tokens, layer_replication, BD-LoRA and QALoRA are not written to "
          "GGUF by adaptkit"),
    _rule("zero_layers", "exact", "no-op layers cost llama.cpp memory and compute for nothing", "drop_zero",
          GRAPH_CPP),
)

TARGET = Target("llama.cpp", "llama.cpp", "gguf", RULES, version="llama.cpp (llama-cpp-python 0.3.36), gguf-py 0.19.0",
                write=write_for_export)


__all__ = ["ARCHS", "RULES", "TARGET", "Arch", "Landing", "Plan", "arch_of", "base_config", "export_gguf",
           "gguf_pair", "layer_refusal", "load_gguf", "permute_rows", "plan", "tied_layers", "unnamed_layers", "unpermute_rows",
           "write_for_export"]
