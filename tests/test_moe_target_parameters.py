"""LoRA on mixture-of-experts parameters (PEFT ``target_parameters``): read, write, fuse, convert, analyse.

Tiny Qwen3-MoE (experts stored ``(E, out, in)``) and gpt-oss (``(E, in, out)``, ``is_transposed``) models from
transformers configs, seeded random weights, an adapter made by the real peft with perturbed factors; every
figure is compared with peft's own ``ParamWrapper.get_delta_weight``, ``PeftModel.from_pretrained`` and
``merge_and_unload``.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch

import adaptkit as ak
from adaptkit.core.kinds import KINDS, ExpertLoRA
from adaptkit.core.kinds.expert_lora import expert_delta64, from_peft, to_peft
from adaptkit.errors import ConfigError, ShapeMismatchError
from adaptkit.live.status import checkpoint_status
from adaptkit.ops.convert import convert_checkpoint

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file

TARGETS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


def _qwen3(dtype: torch.dtype = torch.float32):
    cfg = transformers.Qwen3MoeConfig(
        vocab_size=48, hidden_size=16, intermediate_size=24, moe_intermediate_size=12, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=8, num_experts=4, num_experts_per_tok=2,
        decoder_sparse_step=1, mlp_only_layers=[], norm_topk_prob=True)
    torch.manual_seed(0)
    return transformers.Qwen3MoeForCausalLM(cfg).to(dtype).eval()


def _gpt_oss(dtype: torch.dtype = torch.float32, intermediate: int = 12):
    cfg = transformers.GptOssConfig(
        vocab_size=48, hidden_size=16, intermediate_size=intermediate, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=8, num_local_experts=4, num_experts_per_tok=2,
        layer_types=["full_attention", "full_attention"])
    torch.manual_seed(0)
    model = transformers.GptOssForCausalLM(cfg).to(dtype).eval()
    with torch.no_grad():  # the init leaves expert biases and sinks at zero: make them count
        for name, p in model.named_parameters():
            if name.endswith(("_bias", "sinks")):
                p.normal_(0, 0.1)
    return model


MODELS = {"qwen3_moe": _qwen3, "gpt_oss": _gpt_oss}


def _peft_model(base, target_modules=(), seed: int = 1, r: int = 3, **kw):
    cfg = peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(target_modules), target_parameters=TARGETS, **kw)
    model = peft.get_peft_model(copy.deepcopy(base), cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model.eval()


def _ids():
    return torch.randint(0, 48, (2, 7), generator=torch.Generator().manual_seed(3))


def _logits(model) -> torch.Tensor:
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    inner.set_experts_implementation("eager")  # the grouped-mm kernels want 16-byte strides the tiny dims lack
    with torch.no_grad():
        return model(_ids()).logits.float()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def _wrappers(model):
    """``{parameter path: ParamWrapper}`` of a peft model (paths in the base model's namespace)."""
    out = {}
    for name, module in model.named_modules():
        if type(module).__name__ == "ParamWrapper":
            base = name.removeprefix("base_model.model.")
            while base.endswith(".base_layer"):
                base = base.removesuffix(".base_layer")
            out[f"{base}.{module.parameter_name}"] = module
    return out


@pytest.fixture(scope="module", params=sorted(MODELS))
def saved(request, tmp_path_factory):
    """``(name, base model, peft model, adapter dir)`` for each architecture, attention LoRA included."""
    name = request.param
    base = MODELS[name]()
    model = _peft_model(base, target_modules=["q_proj", "v_proj"])
    path = tmp_path_factory.mktemp(name) / "adapter"
    model.save_pretrained(path)
    return name, base, model, path


# ------------------------------------------------------------------------------------------------- the kind


def test_peft_layout_round_trips_and_interleaves_lora_b():
    a = torch.randn(4 * 3, 5)  # (r * E, in), E = 4, r = 3
    b = torch.randn(6, 3 * 4)  # (out, r * E)
    down, up = from_peft(a, b, 4)
    assert torch.equal(down[2], a[6:9])  # lora_A: experts major
    assert torch.equal(up[2][:, 1], b[:, 1 * 4 + 2])  # lora_B: column k * E + e is rank k of expert e
    a2, b2 = to_peft(down, up)
    assert torch.equal(a2, a) and torch.equal(b2, b)
    with pytest.raises(ShapeMismatchError, match="experts"):
        from_peft(a, b, 5)


@pytest.mark.parametrize("transposed", [False, True])
def test_protocol_members_agree_with_dense(transposed):
    g = torch.Generator().manual_seed(0)
    layer = ExpertLoRA(down=torch.randn(3, 2, 5, generator=g), up=torch.randn(3, 4, 2, generator=g), alpha=3.0,
                       fan_in_fan_out=transposed)
    assert KINDS["expert_lora"] is ExpertLoRA
    assert layer.shape == ((3, 5, 4) if transposed else (3, 4, 5)) and layer.num_experts == 3 and layer.rank == 2
    ref = expert_delta64(layer)
    d = layer.delta()
    assert d.shape == layer.shape and _rel(d, ref) < 1e-6
    w = torch.randn(layer.shape, generator=g)
    fused, bias = layer.apply(w)
    assert bias is None and _rel(fused, w.double() + ref) < 1e-6
    rows = w.clone()
    layer.apply_rows(rows[1:3], 1, 3, weight=0.5, cache={})
    assert torch.equal(rows[0], w[0]) and _rel(rows[1:3], w[1:3].double() + 0.5 * ref[1:3]) < 1e-6
    assert torch.allclose(layer.unapply(fused)[0], w, atol=1e-5)
    assert abs(layer.fro_norm() - float(ref.norm())) < 1e-6 * float(ref.norm())
    other = ExpertLoRA(down=torch.randn(3, 1, 5, generator=g), up=torch.randn(3, 4, 1, generator=g), alpha=1.0,
                       fan_in_fan_out=transposed)
    assert abs(layer.inner(other) - float((ref * expert_delta64(other)).sum())) < 1e-6 * float(ref.norm()) ** 2
    s, method = layer.spectrum()
    dense = torch.cat([torch.linalg.svdvals(ref[e] if not transposed else ref[e].T) for e in range(3)])
    assert method == "lowrank" and torch.allclose(s[:6], torch.sort(dense, descending=True).values[:6], rtol=1e-6)
    experts = layer.experts()
    assert sorted(experts) == [0, 1, 2] and all(_rel(experts[e].delta(), ref[e]) < 1e-6 for e in range(3))
    again = ExpertLoRA.from_parts(layer.parts(), shape=layer.shape, settings=layer.settings())
    assert torch.equal(again.delta(), d)
    flipped = layer.fit((3, *reversed(layer.shape[1:])))
    assert flipped.fan_in_fan_out != transposed and _rel(flipped.delta(), ref.transpose(1, 2)) < 1e-6
    with pytest.raises(ShapeMismatchError):
        layer.fit((3, 4, 4))


def test_to_lora_cuts_every_expert_by_its_exact_svd():
    g = torch.Generator().manual_seed(1)
    layer = ExpertLoRA(down=torch.randn(4, 3, 6, generator=g), up=torch.randn(4, 5, 3, generator=g), alpha=6.0)
    kept, energy, error, method = layer.to_lora(3)
    assert kept is layer and (energy, error, method) == (1.0, 0.0, "kept")
    cut, energy, error, method = layer.to_lora(1)
    ref = expert_delta64(layer)
    best, total, lost = [], 0.0, 0.0
    for e in range(4):
        u, s, vh = torch.linalg.svd(ref[e])
        best.append(s[0] * torch.outer(u[:, 0], vh[0]))
        total, lost = total + float((s**2).sum()), lost + float((s[1:] ** 2).sum())
    assert method == "svd" and cut.rank == 1 and cut.alpha == 1.0
    assert _rel(cut.delta(), torch.stack(best)) < 1e-5
    assert abs(energy - (1 - lost / total)) < 1e-9 and abs(error - (lost / total) ** 0.5) < 1e-9


# --------------------------------------------------------------------------------------------- PEFT format


def test_read_gives_peft_tensors_and_deltas_exactly(saved):
    name, _, model, path = saved
    adapter = ak.load(path)
    file = load_file(path / "adapter_model.safetensors")
    wrappers = _wrappers(model)
    params = {p: l for p, l in adapter.layers.items() if l.kind == "expert_lora"}
    assert sorted(params) == sorted(wrappers) and len(params) == 4
    assert {p for p, l in adapter.layers.items() if l.kind == "lora"} == {
        f"model.layers.{i}.self_attn.{m}" for i in (0, 1) for m in ("q_proj", "v_proj")}
    for p, layer in params.items():
        w = wrappers[p]
        a, b = to_peft(layer.down, layer.up)
        assert torch.equal(a, w.lora_A["default"].weight.detach()) and torch.equal(b, w.lora_B["default"].weight.detach())
        module, _, _ = p.rpartition(".")
        nested = ".base_layer" if p.endswith("gate_up_proj") else ""  # gate_up_proj is registered first: innermost
        assert torch.equal(file[f"base_model.model.{module}{nested}.lora_A.weight"], a)
        param = w.get_param()
        assert layer.shape == tuple(param.shape) and layer.fan_in_fan_out == (name == "gpt_oss")
        peft_delta = w.get_delta_weight("default")
        assert torch.allclose(layer.delta(), peft_delta, rtol=1e-6, atol=1e-7), p


def test_write_back_loads_in_peft_with_the_same_logits(saved, tmp_path):
    _, base, model, path = saved
    adapter = ak.load(path)
    out = ak.save(adapter, tmp_path / "out", format="peft")
    src, dst = load_file(path / "adapter_model.safetensors"), load_file(out / "adapter_model.safetensors")
    assert sorted(src) == sorted(dst) and all(torch.equal(src[k], dst[k]) for k in src)
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["target_parameters"] == sorted(TARGETS)  # the source's list, kept
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), out).eval()
    want = _logits(model)
    assert _rel(_logits(loaded), want) < 1e-6
    # a rank_pattern entry for one parameter path survives the round trip too
    layers = dict(adapter.layers)
    p = "model.layers.1.mlp.experts.down_proj"
    layers[p] = layers[p].to_lora(1)[0]
    out2 = ak.save(adapter.replace(layers=layers), tmp_path / "out2", format="peft")
    again = ak.load(out2)
    assert again.layers[p].rank == 1 and torch.allclose(again.layers[p].delta(), layers[p].delta())
    loaded2 = peft.PeftModel.from_pretrained(copy.deepcopy(base), out2).eval()
    assert torch.allclose(_wrappers(loaded2)[p].get_delta_weight("default"), layers[p].delta(), rtol=1e-6, atol=1e-7)


def test_square_experts_take_the_orientation_from_the_config(tmp_path):
    base = _gpt_oss(intermediate=16)  # down_proj (E, 16, 16): the shape cannot tell
    model = _peft_model(base)
    model.save_pretrained(tmp_path / "a")
    adapter = ak.load(tmp_path / "a")
    p = "model.layers.0.mlp.experts.down_proj"
    assert adapter.layers[p].fan_in_fan_out
    assert torch.allclose(adapter.layers[p].delta(), _wrappers(model)[p].get_delta_weight("default"), rtol=1e-6,
                          atol=1e-7)


def test_unknown_parameter_order_is_refused(saved, tmp_path):
    _, _, _, path = saved
    cfg = json.loads((path / "adapter_config.json").read_text())
    cfg["target_parameters"] = ["mlp.experts.w1", "mlp.experts.w2"]
    from adaptkit.formats import peft as peft_format
    with pytest.raises(ConfigError, match="registers"):
        peft_format.read_tensors(load_file(path / "adapter_model.safetensors"), {}, cfg)


# ---------------------------------------------------------------------------------------------------- fuse


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fuse_matches_merge_and_unload(saved, tmp_path, dtype):
    name, base, _, path = saved
    base = copy.deepcopy(base).to(dtype)
    base.save_pretrained(tmp_path / "base")
    result = ak.fuse(tmp_path / "base", path, tmp_path / "fused")
    # 4 attention projections + 4 expert parameters, or (Qwen3-MoE checkpoints) 2 layers x 4 experts x gate/up/down
    assert result.touched == (8 if name == "gpt_oss" else 28)
    model = peft.PeftModel.from_pretrained(copy.deepcopy(base), path).eval()
    merged = model.merge_and_unload().state_dict()
    # Qwen3-MoE checkpoints store one module per expert (experts.{e}.gate_proj ...): transformers fuses them on load
    fused_model = type(base).from_pretrained(tmp_path / "fused", dtype=dtype).eval()
    fused = fused_model.state_dict()
    base_sd = base.state_dict()
    for key, want in merged.items():
        if key == "lm_head.weight" and key not in fused:
            continue
        got = fused[key]
        assert got.dtype == want.dtype, key
        if torch.equal(want, base_sd[key]):
            assert torch.equal(got, want), key
        elif dtype == torch.float32:
            assert _rel(got, want) < 1e-6, key
        else:
            # peft rounds dW to bf16 before adding it, adaptkit adds in float32 and rounds once: at most one bf16
            # ulp of the larger of the base value and the result apart
            big = torch.maximum(want.float().abs(), base_sd[key].float().abs())
            ulp = torch.finfo(torch.bfloat16).eps * big.clamp_min(2**-126)
            assert bool(((got.float() - want.float()).abs() <= ulp).all()), key
    merged_model = peft.PeftModel.from_pretrained(copy.deepcopy(base), path).eval().merge_and_unload()
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    assert _rel(_logits(fused_model), _logits(merged_model)) < tol


# ------------------------------------------------------------------------------------- convert and analysis


def test_convert_rank_reduces_every_expert_and_peft_loads_it(saved, tmp_path):
    _, base, model, path = saved
    result = convert_checkpoint("peft->peft", path, tmp_path / "r1", rank=1, kind="lora")
    report = result.report.set_index("module")
    p = "model.layers.0.mlp.experts.gate_up_proj"
    assert report.loc[p, "kind"] == "expert_lora" and report.loc[p, "rank"] == 1 and report.loc[p, "method"] == "svd"
    cut = ak.load(tmp_path / "r1").layers[p]
    ref = _wrappers(model)[p].get_delta_weight("default").double()
    best = []  # the best rank-1 approximation of each expert (the same in either orientation)
    for e in range(ref.shape[0]):
        u, s, vh = torch.linalg.svd(ref[e])
        best.append(s[0] * torch.outer(u[:, 0], vh[0]))
    best = torch.stack(best)
    assert _rel(cut.delta(), best) < 1e-5
    energy = 1 - float((ref - best).norm() ** 2 / ref.norm() ** 2)
    assert abs(report.loc[p, "retained_energy"] - energy) < 1e-5
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "r1").eval()
    assert torch.allclose(_wrappers(loaded)[p].get_delta_weight("default"), cut.delta(), rtol=1e-5, atol=1e-6)
    # at the adapter's rank nothing changes: the logits are peft's
    convert_checkpoint("peft->peft", path, tmp_path / "r3", rank=3, kind="lora")
    full = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "r3").eval()
    assert _rel(_logits(full), _logits(model)) < 1e-6


def test_analysis_and_status_per_parameter_and_per_expert(saved):
    _, _, model, path = saved
    adapter = ak.load(path)
    p = "model.layers.0.mlp.experts.down_proj"
    ref = _wrappers(model)[p].get_delta_weight("default").double()
    table = ak.analyze(adapter).set_index("module")
    assert table.loc[p, "kind"] == "expert_lora" and abs(table.loc[p, "fro_norm"] - float(ref.norm())) < 1e-5
    per = ak.analyze(adapter, experts=True)
    rows = per[per["module"] == p]
    assert list(rows["expert"]) == [0, 1, 2, 3]
    norms = [float(ref[e].norm()) for e in range(4)]
    assert all(abs(a - b) < 1e-5 for a, b in zip(rows["fro_norm"], norms))
    assert abs(per["energy_share"].sum() - 1.0) < 1e-9
    assert per[per["kind"] == "lora"]["expert"].isna().all()
    status = checkpoint_status(adapter).set_index("module")
    assert status.loc[p, "kind"] == "expert_lora" and status.loc[p, "shape"] == "x".join(map(str, ref.shape))
    assert abs(status.loc[p, "delta_norm"] - float(ref.norm())) < 1e-5


def test_inject_refuses_parameter_layers_and_leaves_the_model_unchanged(saved):
    _, base, _, path = saved
    model = copy.deepcopy(base)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ak.UnsupportedError, match="adapts a parameter tensor rather than a module.*adaptkit fuse"):
        ak.inject(model, str(path))
    assert not any("lora" in n for n, _ in model.named_modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
