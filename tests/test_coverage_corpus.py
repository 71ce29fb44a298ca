"""The coverage corpus: adapters with deliberate mismatches, and every operation that maps them catches each one.

Each case is a real adapter (made with peft on tiny transformers models, or a hand-made kohya / diffusers state
dict) that does not fully land on its target: wrong prefixes, unknown modules, partial matches, fused vs split
projections, shape mismatches, kohya names that resolve to nothing, unknown keys, ``modules_to_save`` without a
counterpart, diffusers/kohya keys of another architecture, a bias the base lacks, a quantized base tensor, a
name two pipeline components share, module types and parameters ``inject`` cannot adapt, extras a format does not
carry. For every case:

* without ``drop`` the operation raises :class:`~adaptkit.CoverageError` and writes nothing (no silent drop);
* with ``drop`` naming exactly the expected paths it succeeds, and its certificate lists exactly those paths as
  dropped, each with the expected original status;
* the certificate's energy share equals ``Σ‖ΔW‖²`` of the landing layers over all layers, computed here from dense
  float64 deltas (rel 1e-9), and each row's energy equals its dense ``‖ΔW‖²``;
* the certificate written into the output (safetensors ``__metadata__``) is the one returned.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import LoraConfig, TaskType, get_peft_model
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import adaptkit as ak
from adaptkit.core.coverage import METADATA_KEY, read_metadata
from adaptkit.ops.convert import convert_checkpoint

from .conftest import make_peft_adapter, make_tiny_llama, perturb_saved_copies

LORA = dict(r=2, lora_alpha=4, init_lora_weights=False)


# ------------------------------------------------------------------------------------------- models


def tiny_phi3():
    from transformers import Phi3Config, Phi3ForCausalLM

    torch.manual_seed(0)
    cfg = Phi3Config(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, tie_word_embeddings=False)
    return Phi3ForCausalLM(cfg).eval()


def tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=64)).eval()


def tiny_classifier():
    from transformers import LlamaForSequenceClassification

    from .conftest import tiny_llama_config

    torch.manual_seed(0)
    return LlamaForSequenceClassification(tiny_llama_config(num_labels=3, pad_token_id=0)).eval()


def peft_dir(path: Path, model, seed: int = 1, **cfg) -> Path:
    torch.manual_seed(seed)
    pm = get_peft_model(model, LoraConfig(**{**LORA, **cfg}))
    perturb_saved_copies(pm)  # saved module copies that differ from the base, as after training
    pm.save_pretrained(str(path))
    return path


def lora(out: int, inp: int, r: int = 2, seed: int = 0) -> ak.LoRA:
    g = torch.Generator().manual_seed(seed)
    return ak.LoRA(down=torch.randn(r, inp, generator=g), up=torch.randn(out, r, generator=g), alpha=float(r),
                   shape=(out, inp))


def kohya_pair(sd: dict, name: str, out: int, inp: int, seed: int, alpha: float = 2.0) -> None:
    g = torch.Generator().manual_seed(seed)
    sd[f"{name}.lora_down.weight"] = torch.randn(2, inp, generator=g)
    sd[f"{name}.lora_up.weight"] = torch.randn(out, 2, generator=g)
    sd[f"{name}.alpha"] = torch.tensor(alpha)


def kohya_dense(sd: dict, name: str) -> float:
    """``‖ΔW‖²`` of a kohya pair in float64: ``(alpha / r) * up @ down``."""
    up, down = sd[f"{name}.lora_up.weight"].double(), sd[f"{name}.lora_down.weight"].double()
    return float((float(sd[f"{name}.alpha"]) / down.shape[0] * up @ down).square().sum())


def dense_lora(layer: ak.LoRA) -> float:
    """``‖ΔW‖²`` of a plain LoRA layer from its dense float64 delta ``scale * up @ down`` (built here, as PEFT's
    ``get_delta_weight`` does, not through adaptkit's Gram matrices)."""
    assert layer.mid is None and layer.magnitude is None and layer.up.ndim == 2
    r = layer.down.shape[0]
    scale = layer.alpha / (math.sqrt(r) if layer.rslora else r)
    return float((scale * layer.up.double() @ layer.down.double()).square().sum())


def dense(adapter: ak.Adapter) -> dict[str, float]:
    """``‖ΔW‖²`` per layer from dense float64 deltas."""
    return {p: dense_lora(layer) for p, layer in adapter.layers.items()}


# ------------------------------------------------------------------------------------------- the corpus


@dataclass(frozen=True)
class Case:
    """One mismatched adapter: ``make(env)`` gives the source (a path or an Adapter); ``expect`` maps each path that
    must not land to its status; ``op`` the operation; ``base`` the env key of its target."""

    name: str
    op: str
    base: str
    make: Callable[[dict], Any]
    expect: dict[str, str]
    extra_dense: Callable[[dict], dict[str, float]] | None = None


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict:
    t = tmp_path_factory.mktemp("corpus")
    e: dict[str, Any] = {"tmp": t}
    llama = make_tiny_llama(0)
    llama.save_pretrained(t / "llama")
    e["llama"] = t / "llama"
    tiny_phi3().save_pretrained(t / "phi3")
    e["phi3"] = t / "phi3"
    # a pipeline whose two components are the same llama: every name fits both (ambiguous)
    (t / "pipe").mkdir()
    (t / "pipe" / "model_index.json").write_text(json.dumps({"_class_name": "Pipe"}))
    for comp in ("unet", "text_encoder"):
        shutil.copytree(t / "llama", t / "pipe" / comp)
    e["pipe"] = t / "pipe"
    # one file whose q_proj weights are int8 (a quantized base)
    sd = load_file(str(t / "llama" / "model.safetensors"))
    sd = {k: (v.round().to(torch.int8) if "q_proj" in k else v) for k, v in sd.items()}
    save_file(sd, str(t / "int8.safetensors"))
    e["int8"] = t / "int8.safetensors"

    e["full"] = make_peft_adapter(t / "full", LoraConfig(target_modules=["q_proj", "v_proj"], **LORA), seed=1)
    e["deep"] = make_peft_adapter(t / "deep", LoraConfig(target_modules=["q_proj", "v_proj"], **LORA), seed=2,
                                  model=make_tiny_llama(0, num_hidden_layers=3))
    e["narrow"] = make_peft_adapter(t / "narrow", LoraConfig(target_modules=["q_proj", "o_proj"], **LORA), seed=3,
                                    model=make_tiny_llama(0, hidden_size=16, num_attention_heads=2,
                                                          num_key_value_heads=1, intermediate_size=24))
    e["phi3_lora"] = peft_dir(t / "phi3_lora", tiny_phi3(), target_modules=["qkv_proj", "o_proj", "gate_up_proj"])
    e["split"] = make_peft_adapter(t / "split", LoraConfig(target_modules=["q_proj", "k_proj", "o_proj"], **LORA),
                                   seed=4)
    e["gpt2"] = peft_dir(t / "gpt2", tiny_gpt2(), target_modules=["c_attn", "c_proj"], fan_in_fan_out=True)
    e["cls"] = peft_dir(t / "cls", tiny_classifier(), target_modules=["q_proj"], modules_to_save=["score"],
                        task_type=TaskType.SEQ_CLS)
    e["vocab80"] = peft_dir(t / "vocab80", make_tiny_llama(0, vocab_size=80), target_modules=["q_proj"],
                            modules_to_save=["lm_head"])
    e["mts"] = peft_dir(t / "mts", make_tiny_llama(0), target_modules=["q_proj"], modules_to_save=["lm_head"])
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        e["bias"] = make_peft_adapter(t / "bias", LoraConfig(target_modules=["q_proj"], lora_bias=True, **LORA), seed=5)

    # kohya (LyCORIS names of an LLM) written by adaptkit from the full adapter, plus hand-made mismatches
    ak.save(ak.load(e["full"]), t / "kohya.safetensors", format="kohya")
    base_sd = load_file(str(t / "kohya.safetensors"))
    sd = dict(base_sd)
    kohya_pair(sd, "lycoris_model_layers_7_self_attn_q_proj", 32, 32, seed=11)  # a layer the base lacks
    kohya_pair(sd, "lycoris_model_layers_0_mlp_down_proj", 16, 16, seed=12)  # base down_proj is (32, 48)
    save_file(sd, str(t / "kohya_bad.safetensors"))
    e["kohya_bad"], e["kohya_bad_sd"] = t / "kohya_bad.safetensors", sd
    sdxl: dict = {}  # kohya keys of an SD UNet: another architecture than the llama base
    kohya_pair(sdxl, "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q", 32, 32, seed=13)
    kohya_pair(sdxl, "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_k", 32, 32, seed=14)
    save_file(sdxl, str(t / "kohya_unet.safetensors"))
    e["kohya_unet"], e["kohya_unet_sd"] = t / "kohya_unet.safetensors", sdxl
    diff: dict = {}  # diffusers keys of a UNet
    g = torch.Generator().manual_seed(15)
    for blk in ("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q", "mid_block.attentions.0.proj_in"):
        diff[f"unet.{blk}.lora_A.weight"] = torch.randn(2, 32, generator=g)
        diff[f"unet.{blk}.lora_B.weight"] = torch.randn(32, 2, generator=g)
    save_file(diff, str(t / "diffusers_unet.safetensors"))
    e["diffusers_unet"] = t / "diffusers_unet.safetensors"
    return e


def full(e: dict) -> ak.Adapter:
    return ak.load(e["full"])


def renamed(e: dict) -> ak.Adapter:
    a = full(e)
    return a.replace(layers={p.replace("model.layers.", "transformer.h."): l for p, l in a.layers.items()})


def with_unknown_module(e: dict) -> ak.Adapter:
    a = full(e)
    return a.replace(layers={**a.layers, "model.layers.0.self_attn.nope": lora(32, 32, seed=3)})


def with_unknown_key(e: dict) -> ak.Adapter:
    a = full(e)
    return a.replace(extras={"bundle_emb.tok.string_to_param": torch.ones(2, 32)})


def norm_layer(e: dict) -> ak.Adapter:
    a = full(e)
    return a.replace(layers={**a.layers, "model.norm": ak.LoRA(down=torch.randn(1, 1), up=torch.randn(32, 1),
                                                              alpha=1.0, shape=(32, 1))})


def parameter_layer(e: dict) -> ak.Adapter:
    a = full(e)
    return a.replace(layers={**a.layers, "model.layers.0.mlp.down_proj.weight": lora(32, 48, seed=4)})


def kohya_state_dict(e: dict) -> dict:
    return dict(e["kohya_bad_sd"])


KOHYA_BAD = {"lycoris_model_layers_7_self_attn_q_proj": "unmatched", "lycoris_model_layers_0_mlp_down_proj": "shape"}
Q_V = [f"model.layers.{i}.self_attn.{m}" for i in (0, 1) for m in ("q_proj", "v_proj")]


def kohya_bad_dense(e: dict) -> dict[str, float]:
    return {k: kohya_dense(e["kohya_bad_sd"], k) for k in KOHYA_BAD}


def kohya_unet_dense(e: dict) -> dict[str, float]:
    return {k.removesuffix(".alpha"): kohya_dense(e["kohya_unet_sd"], k.removesuffix(".alpha"))
            for k in e["kohya_unet_sd"] if k.endswith(".alpha")}


CASES = [
    Case("partial match: a 3-layer adapter on a 2-layer base", "fuse", "llama", lambda e: e["deep"],
         {f"model.layers.2.self_attn.{m}": "unmatched" for m in ("q_proj", "v_proj")}),
    Case("wrong prefix (transformer.h. for model.layers.)", "fuse", "llama", renamed,
         {p.replace("model.layers.", "transformer.h."): "unmatched" for p in Q_V}),
    Case("unknown module", "fuse", "llama", with_unknown_module, {"model.layers.0.self_attn.nope": "unmatched"}),
    Case("shape mismatch (adapter of a narrower llama)", "fuse", "llama", lambda e: e["narrow"],
         {f"model.layers.{i}.self_attn.{m}": "shape" for i in (0, 1) for m in ("q_proj", "o_proj")}),
    Case("fused projections (phi3 qkv_proj, gate_up_proj) on a split base (llama)", "fuse", "llama",
         lambda e: e["phi3_lora"],
         {f"model.layers.{i}.{m}": "unmatched" for i in (0, 1) for m in ("self_attn.qkv_proj", "mlp.gate_up_proj")}),
    Case("split projections (q_proj, k_proj) on a fused base (phi3)", "fuse", "phi3", lambda e: e["split"],
         {f"model.layers.{i}.self_attn.{m}": "unmatched" for i in (0, 1) for m in ("q_proj", "k_proj")}),
    Case("kohya names that resolve to nothing / to another shape", "fuse", "llama", lambda e: e["kohya_bad"],
         KOHYA_BAD, kohya_bad_dense),
    Case("kohya keys of another architecture (SD UNet) on a llama", "fuse", "llama", lambda e: e["kohya_unet"],
         {"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q": "unmatched",
          "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_k": "unmatched"}, kohya_unet_dense),
    Case("diffusers keys of another architecture (UNet) on a llama", "fuse", "llama", lambda e: e["diffusers_unet"],
         {"unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q": "unmatched",
          "unet.mid_block.attentions.0.proj_in": "unmatched"}),
    Case("GPT-2 adapter (c_attn, c_proj) on a llama", "fuse", "llama", lambda e: e["gpt2"],
         {f"transformer.h.{i}.{m}": "unmatched" for i in (0, 1) for m in ("attn.c_attn", "attn.c_proj", "mlp.c_proj")}),
    Case("unknown key (textual-inversion embedding)", "fuse", "llama", with_unknown_key,
         {"bundle_emb.tok.string_to_param": "unmatched"}),
    Case("modules_to_save with no counterpart (classifier score head on a causal LM)", "fuse", "llama",
         lambda e: e["cls"], {"score.weight": "unmatched"}),
    Case("modules_to_save of another shape (lm_head of a larger vocabulary)", "fuse", "llama",
         lambda e: e["vocab80"], {"lm_head.weight": "shape"}),
    Case("lora_bias on a bias-free base", "fuse", "llama", lambda e: e["bias"],
         {f"model.layers.{i}.self_attn.q_proj": "refused" for i in (0, 1)}),
    Case("quantized (int8) base tensors", "fuse", "int8", full,
         {f"model.layers.{i}.self_attn.q_proj": "refused" for i in (0, 1)}),
    Case("a name two pipeline components share", "fuse", "pipe", full, {p: "ambiguous" for p in Q_V}),
    Case("inject: a module type adaptkit cannot adapt (RMSNorm)", "inject", "live", norm_layer,
         {"model.norm": "refused"}),
    Case("inject: a parameter tensor (target_parameters)", "inject", "live", parameter_layer,
         {"model.layers.0.mlp.down_proj.weight": "refused"}),
    Case("inject: unknown module", "inject", "live", with_unknown_module, {"model.layers.0.self_attn.nope": "unmatched"}),
    Case("inject: unknown key", "inject", "live", with_unknown_key, {"bundle_emb.tok.string_to_param": "unmatched"}),
    Case("inject: modules_to_save of another shape", "inject", "live", lambda e: e["vocab80"],
         {"lm_head.weight": "shape"}),
    Case("inject: kohya state dict with names that resolve to nothing", "inject", "live", kohya_state_dict,
         KOHYA_BAD, kohya_bad_dense),
    Case("convert to kohya: modules_to_save it does not carry", "convert:kohya", "none", lambda e: e["mts"],
         {"lm_head.weight": "refused"}),
    Case("convert with --base: layers the base lacks", "convert:peft", "llama", lambda e: e["deep"],
         {f"model.layers.2.self_attn.{m}": "unmatched" for m in ("q_proj", "v_proj")}),
    Case("convert kohya->peft with --base: names that resolve to nothing", "convert:peft", "llama",
         lambda e: e["kohya_bad"], KOHYA_BAD, kohya_bad_dense),
]


def _run(case: Case, e: dict, out: Path, drop: list[str] | None):
    """Run the case's operation; returns ``(certificate dict, output file or None, certificate or None)``."""
    src = case.make(e)
    if case.op == "fuse":
        r = ak.fuse(e[case.base], src, out, drop=drop, progress=False)
        f = out if out.suffix == ".safetensors" else next(out.rglob("*.safetensors"))
        return r.coverage.to_dict(), f, r.coverage
    if case.op == "inject":
        model = make_tiny_llama(0)
        ak.inject(model, src, drop=drop)
        cert = ak.injected_coverage(model)
        return cert.to_dict(), None, cert
    fmt = case.op.split(":")[1]
    if isinstance(src, ak.Adapter):
        ak.save(src, out.parent / "src")
        src = out.parent / "src"
    r = convert_checkpoint(None, src, out, dst_format=fmt, base=None if case.base == "none" else e[case.base],
                           drop=drop)
    f = out if out.suffix == ".safetensors" else next(out.rglob("*.safetensors"))
    return r.coverage.to_dict(), f, r.coverage


def _out(case: Case, e: dict, tmp_path: Path) -> Path:
    single = case.op == "convert:kohya" or (case.op == "fuse" and str(e.get(case.base, "")).endswith(".safetensors"))
    return tmp_path / ("out.safetensors" if single else "out")


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_every_drop_is_caught_and_certified(case: Case, env: dict, tmp_path: Path):
    out = _out(case, env, tmp_path)
    with pytest.raises(ak.CoverageError) as err:
        _run(case, env, out, drop=None)
    assert not out.exists(), "nothing is written when coverage is partial"
    msg = str(err.value)
    assert "--drop" in msg, msg  # the way out is named
    assert any(p in msg for p in case.expect), msg

    cd, written, cert = _run(case, env, out, drop=sorted(case.expect))
    dropped = {r["path"]: r for r in cd["not_landing"] if r["status"] == "dropped"}
    assert set(dropped) == set(case.expect), (set(dropped), set(case.expect))
    assert [r for r in cd["not_landing"] if r["status"] != "dropped"] == []
    for path, status in case.expect.items():
        assert dropped[path]["was"] == status and f"; was {status}:" in dropped[path]["reason"], dropped[path]
    assert cd["counts"]["dropped"] == len(case.expect) and not cd["complete"]

    # the energy share against dense float64 deltas of the adapter as given
    src = case.make(env)
    if isinstance(src, dict):  # the kohya state dict holds the tensors of this file
        src = env["kohya_bad"]
    if isinstance(src, ak.Adapter):
        adapter = src
    elif "kohya" in Path(src).name:  # the layers that resolve, as the operation loaded them
        adapter = ak.load(src, base=str(env["llama"]), drop=sorted(case.expect))
    else:
        adapter = ak.load(src)
    want = dense(adapter)
    if case.extra_dense is not None:
        want.update(case.extra_dense(env))
    rows = {c.path: c for c in cert.layers if not c.extra}
    assert set(rows) == set(want), (set(rows) ^ set(want))
    for p, c in rows.items():
        assert c.energy == pytest.approx(want[p], rel=1e-9), p
    landing = math.fsum(want[p] for p, c in rows.items() if c.lands)
    assert cd["energy_share"] == pytest.approx(landing / math.fsum(want.values()), rel=1e-9)

    if written is not None:  # the certificate in the output's metadata is the one returned
        with safe_open(str(written), "pt") as f:
            meta = f.metadata()
        assert METADATA_KEY in meta and read_metadata(meta) == json.loads(json.dumps(cd))


def test_the_corpus_is_large_enough():
    assert len(CASES) >= 20
    kinds = {s for c in CASES for s in c.expect.values()}
    assert kinds >= {"unmatched", "shape", "ambiguous", "refused"}
