"""layer_status / model_status: equal to peft's get_layer_status / get_model_status field by field, irregular
cases included; adaptkit-injected models; diffusers components and pipelines; checkpoints and the CLI."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from click.testing import CliRunner
from peft import LoraConfig, PeftModel, get_layer_status, get_model_status, get_peft_model

import adaptkit as ak
from adaptkit.cli import main
from adaptkit.live.status import checkpoint_status

from .conftest import make_peft_adapter, make_tiny_llama


def _ours(model):
    return ak.layer_status(model).to_dict(orient="records"), ak.model_status(model).iloc[0].to_dict()


def _peft(model):
    return [dataclasses.asdict(s) for s in get_layer_status(model)], dataclasses.asdict(get_model_status(model))


def _assert_same(model):
    layers, summary = _ours(model)
    ref_layers, ref_summary = _peft(model)
    assert len(layers) == len(ref_layers)
    for ours, ref in zip(layers, ref_layers):
        assert ours == ref, (ours, ref)
    assert list(summary) == list(ref_summary)
    for field, value in ref_summary.items():
        assert summary[field] == value, field
    return summary


@pytest.fixture
def peft_model():
    model = get_peft_model(make_tiny_llama(0), LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                          modules_to_save=["lm_head"]))
    model.add_adapter("other", LoraConfig(r=2, target_modules=["q_proj", "up_proj"]))
    return model


def test_peft_model_regular(peft_model):
    summary = _assert_same(peft_model)
    assert summary["active_adapters"] == ["default"] and summary["merged_adapters"] == []
    assert summary["peft_types"] == {"default": "LORA", "other": "LORA"}
    _assert_same(peft_model.base_model.model)  # the bare transformers model: peft_types {}, names without prefix


def test_peft_irregular_merge_on_some_layers(peft_model):
    peft_model.base_model.model.model.layers[0].self_attn.q_proj.merge(["default"])
    summary = _assert_same(peft_model)
    assert summary["merged_adapters"] == "irregular"
    rows = ak.layer_status(peft_model).set_index("name")
    assert rows.loc["model.model.layers.0.self_attn.q_proj", "merged_adapters"] == ["default"]
    assert rows.loc["model.model.layers.1.self_attn.q_proj", "merged_adapters"] == []


def test_peft_irregular_enabled_active_requires_grad(peft_model):
    layers = peft_model.base_model.model.model.layers
    layers[0].self_attn.v_proj.enable_adapters(False)
    layers[1].self_attn.q_proj.set_adapter(["default", "other"])
    layers[1].self_attn.v_proj.lora_A["default"].weight.requires_grad_(False)
    summary = _assert_same(peft_model)
    assert summary["enabled"] == "irregular" and summary["active_adapters"] == "irregular"
    assert summary["requires_grad"]["default"] == "irregular"
    row = ak.layer_status(peft_model).set_index("name").loc["model.model.layers.1.self_attn.v_proj"]
    assert row["requires_grad"] == {"default": "irregular"}


def test_transformers_model_with_peft_layers_injected():
    """peft's inject_adapter_in_model (what transformers' PeftAdapterMixin uses) on a bare PreTrainedModel."""
    from peft import inject_adapter_in_model

    model = make_tiny_llama(0)
    inject_adapter_in_model(LoraConfig(r=2, target_modules=["k_proj"]), model, adapter_name="x")
    inject_adapter_in_model(LoraConfig(r=2, target_modules=["o_proj"]), model, adapter_name="y")
    summary = _assert_same(model)
    assert summary["base_model_type"] == "LlamaForCausalLM" and summary["available_adapters"] == ["x", "y"]


def _tiny_unet():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        block_out_channels=(8, 16), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=8, norm_num_groups=4, attention_head_dim=2)


def test_diffusers_component_and_pipeline():
    from diffusers import DiffusionPipeline

    class TinyPipeline(DiffusionPipeline):
        def __init__(self, unet):
            super().__init__()
            self.register_modules(unet=unet)

    unet = _tiny_unet()
    unet.add_adapter(LoraConfig(r=2, target_modules=["to_q", "conv1"]), adapter_name="a")
    unet.add_adapter(LoraConfig(r=2, target_modules=["to_v"]), adapter_name="b")
    unet.set_adapters(["a", "b"])
    ref_layers, ref_summary = _peft(unet)
    _assert_same(unet)
    pipe = TinyPipeline(unet)
    rows = ak.layer_status(pipe)
    assert rows["name"].tolist() == ["unet." + r["name"] for r in ref_layers]
    summary = ak.model_status(pipe).iloc[0].to_dict()
    assert summary["base_model_type"] == "TinyPipeline"
    for field in ("trainable_params", "total_params", "num_adapter_layers", "enabled", "active_adapters",
                  "merged_adapters", "requires_grad", "available_adapters", "devices"):
        assert summary[field] == ref_summary[field], field


def test_adaptkit_injected_status_agrees_with_peft(tmp_path):
    a = make_peft_adapter(tmp_path / "a", LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    b = make_peft_adapter(tmp_path / "b", LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False), seed=2)
    ref = PeftModel.from_pretrained(make_tiny_llama(0), str(a), adapter_name="a")
    ref.load_adapter(str(b), adapter_name="b")
    ours = make_tiny_llama(0).requires_grad_(False)  # PeftModel freezes the base model; inject leaves it alone
    ak.inject(ours, a, name="a")
    ak.inject(ours, b, name="b", active=False)

    def compare(grads=True):
        mine = ak.layer_status(ours).to_dict(orient="records")
        theirs = [dataclasses.asdict(s) for s in get_layer_status(ref)]
        assert len(mine) == len(theirs)
        for m, t in zip(mine, theirs):
            assert m["name"] == t["name"].removeprefix("model.")
            assert m["module_type"] == "adaptkit.Linear" and t["module_type"] == "lora.Linear"
            for field in ("enabled", "active_adapters", "merged_adapters", "requires_grad", "available_adapters",
                          "devices", "quantization_backend"):
                if grads or field != "requires_grad":
                    assert m[field] == t[field], (m["name"], field)
        ms, ts = ak.model_status(ours).iloc[0].to_dict(), dataclasses.asdict(get_model_status(ref))
        for field in ("num_adapter_layers", "enabled", "active_adapters", "merged_adapters", "requires_grad",
                      "available_adapters", "devices", "quantization_backend", "total_params", "trainable_params"):
            if grads or field not in ("requires_grad", "trainable_params"):
                assert ms[field] == ts[field], field
        return ms

    summary = compare()
    assert summary["adapter_model_type"] == "adaptkit" and summary["peft_types"] == {"a": "LORA", "b": "LORA"}
    assert summary["base_model_type"] == "LlamaForCausalLM"
    # peft's set_adapter also makes the active adapter trainable; adaptkit leaves requires_grad as injected
    ref.set_adapter("b")
    ak.set_adapter(ours, "b")
    assert compare(grads=False)["requires_grad"] == {"a": False, "b": False}
    # irregular: merge on one layer only, in both
    ref.base_model.model.model.layers[0].self_attn.q_proj.merge(["b"])
    ours.model.layers[0].self_attn.q_proj.merge(["b"])
    assert compare(grads=False)["merged_adapters"] == "irregular"
    ref.unmerge_adapter()
    ak.unmerge_adapters(ours)
    with ref.disable_adapter():
        ak.disable_adapters(ours)
        assert compare(grads=False)["enabled"] is False


def test_checkpoint_status_and_errors(tmp_path):
    src = make_peft_adapter(tmp_path / "a", LoraConfig(r=4, target_modules=["q_proj"], use_dora=True,
                                                       init_lora_weights=False))
    adapter = ak.load(src)
    table = ak.layer_status(adapter)
    assert table.equals(checkpoint_status(adapter))
    assert ak.layer_status(str(src)).equals(table)
    assert table["dora"].all() and (table["rank"] == 4).all() and table["finite"].all()
    assert ak.model_status(src).iloc[0]["num_layers"] == 2
    with pytest.raises(ak.ConfigError, match="no adapter layers found"):
        ak.layer_status(make_tiny_llama(0))
    with pytest.raises(ak.ConfigError, match="no adapter layers found"):
        ak.model_status(make_tiny_llama(0))


def test_cli_status(tmp_path):
    src = make_peft_adapter(tmp_path / "a", LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                       init_lora_weights=False))
    runner = CliRunner()
    text = runner.invoke(main, ["status", str(src)])
    assert text.exit_code == 0, text.output
    assert "model.layers.0.self_attn.q_proj" in text.output and "lora" in text.output
    as_json = runner.invoke(main, ["status", str(src), "--json"])
    rows = json.loads(as_json.output)
    assert len(rows) == 4 and {r["rank"] for r in rows} == {4} and {r["scale"] for r in rows} == {2.0}
    as_csv = runner.invoke(main, ["status", str(src), "--csv"])
    assert as_csv.output.splitlines()[0].startswith("module,kind,shape,tensors,rank,alpha,scale")
    missing = runner.invoke(main, ["status", str(tmp_path / "nope")])
    assert missing.exit_code == 1 and missing.output.startswith("error:")


def test_cli_status_kohya_needs_base(tmp_path):
    """A LyCORIS file for a model with no shipped inventory: a one-line error naming --base, then --base works."""
    pytest.importorskip("lycoris")
    from safetensors.torch import save_file

    from .test_kohya_lycoris import make_lycoris

    path, base, _, _ = make_lycoris(tmp_path, algo="full")
    (tmp_path / "base").mkdir()
    save_file({k: v.contiguous() for k, v in base.state_dict().items()}, str(tmp_path / "base" / "model.safetensors"))
    runner = CliRunner()
    r = runner.invoke(main, ["status", str(path)])
    assert r.exit_code == 1 and r.output.startswith("error:") and "--base" in r.output
    r = runner.invoke(main, ["status", str(path), "--base", str(tmp_path / "base"), "--json"])
    assert r.exit_code == 0, r.output
    rows = json.loads(r.output)
    assert {row["module"] for row in rows} == {n for n, m in base.named_modules() if isinstance(m, torch.nn.Linear | torch.nn.Conv2d)}
    assert {row["kind"] for row in rows} == {"full"}


@pytest.mark.parametrize("kind", ["lora", "loha", "lokr"])
def test_checkpoint_delta_norm_matches_peft_delta_weight(tmp_path, kind):
    """``delta_norm`` of the static table equals ``||get_delta_weight()||_F`` of peft's own layers (rtol 1e-5)."""
    from peft import LoHaConfig, LoKrConfig

    cfg = {"lora": LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "embed_tokens"], use_rslora=True,
                              init_lora_weights=False),
           "loha": LoHaConfig(r=3, alpha=5, target_modules=["q_proj"], init_weights=False),
           "lokr": LoKrConfig(r=2, alpha=5, target_modules=["q_proj"], init_weights=False)}[kind]
    src = make_peft_adapter(tmp_path / kind, cfg, seed=4)
    ref = PeftModel.from_pretrained(make_tiny_llama(0), str(src))
    table = ak.layer_status(str(src)).set_index("module")
    checked = 0
    for name, module in ref.base_model.model.named_modules():
        if hasattr(module, "get_delta_weight") and name in table.index:
            want = float(module.get_delta_weight("default").norm())
            assert table.loc[name, "delta_norm"] == pytest.approx(want, rel=1e-5), name
            checked += 1
    assert checked == len(table) > 0


def test_checkpoint_dora_delta_norm_is_the_lora_part_and_ia3_has_no_shape(tmp_path):
    """DoRA: ``delta_norm`` is ``||scale * B @ A||_F`` (peft's ``get_delta_weight``), not ``||W' - W||_F`` of the
    re-normalised merge; IA3 from a PEFT file has no weight shape (``?``) and no delta (NaN)."""
    from peft import IA3Config

    torch.manual_seed(4)
    trained = get_peft_model(make_tiny_llama(0), LoraConfig(r=4, lora_alpha=6, target_modules=["q_proj"],
                                                            use_dora=True, init_lora_weights=False))
    with torch.no_grad():  # as after training: magnitudes no longer equal ||W + dW|| per row
        for name, param in trained.named_parameters():
            if "lora_magnitude_vector" in name:
                param.mul_(1.1)
    trained.save_pretrained(str(tmp_path / "dora"))
    src = tmp_path / "dora"
    ref = PeftModel.from_pretrained(make_tiny_llama(0), str(src))
    table = ak.layer_status(str(src)).set_index("module")
    assert table["dora"].all()
    for name, row in table.iterrows():
        module = ref.base_model.model.get_submodule(name)
        lora_part = float(module.get_delta_weight("default").norm())
        before = module.get_base_layer().weight.detach().clone()
        with torch.no_grad():
            module.merge()
            renormalised = float((module.get_base_layer().weight - before).norm())
            module.unmerge()
        assert row["delta_norm"] == pytest.approx(lora_part, rel=1e-5), name
        assert abs(renormalised - lora_part) > 1e-3 * lora_part, "DoRA's merged change must differ for this to test"
    ia3 = make_peft_adapter(tmp_path / "ia3", IA3Config(target_modules=["k_proj", "down_proj"],
                                                         feedforward_modules=["down_proj"], init_ia3_weights=False))
    rows = ak.layer_status(str(ia3))
    assert len(rows) == 4 and (rows["shape"] == "?").all() and rows["delta_norm"].isna().all()
