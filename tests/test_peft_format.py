"""PEFT format: adapters made with real peft load exactly, write back loadable, and agree numerically."""

from __future__ import annotations

import pytest
import torch
from peft import IA3Config, LoHaConfig, LoKrConfig, LoraConfig, PeftModel, get_peft_model
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors.torch import load_file

import adaptkit as ak
from adaptkit.formats import peft as peft_format

from .conftest import make_peft_adapter, make_tiny_llama

CONFIGS = {
    "lora_patterns": lambda: LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                                        rank_pattern={"layers.0.self_attn.q_proj": 2, "down_proj": 6},
                                        alpha_pattern={"v_proj": 3}, init_lora_weights=False),
    "dora": lambda: LoraConfig(r=4, lora_alpha=6, target_modules=["q_proj", "down_proj"], use_dora=True,
                               init_lora_weights=False),
    "rslora": lambda: LoraConfig(r=8, lora_alpha=4, target_modules=["k_proj", "o_proj"], use_rslora=True,
                                 init_lora_weights=False),
    "embedding": lambda: LoraConfig(r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"],
                                    init_lora_weights=False),
    "lora_bias": lambda: LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "lm_head"], lora_bias=True,
                                    init_lora_weights=False),
    "modules_to_save": lambda: LoraConfig(r=2, lora_alpha=2, target_modules=["q_proj"], modules_to_save=["lm_head"],
                                          init_lora_weights=False),
    "loha": lambda: LoHaConfig(r=4, alpha=6, target_modules=["q_proj", "up_proj"], init_weights=False),
    "lokr": lambda: LoKrConfig(r=4, alpha=6, target_modules=["q_proj", "up_proj"], init_weights=False),
    "lokr_decomposed": lambda: LoKrConfig(r=2, alpha=3, target_modules=["q_proj", "up_proj"], decompose_both=True,
                                          decompose_factor=4, init_weights=False),
    "ia3": lambda: IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"],
                             init_ia3_weights=False),
}


def _logits(adapter_dir, input_ids):
    model = PeftModel.from_pretrained(make_tiny_llama(0), str(adapter_dir)).eval()
    with torch.no_grad():
        return model(input_ids).logits, model


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_roundtrip_exact_tensors_logits_and_deltas(tmp_path, input_ids, name):
    src = make_peft_adapter(tmp_path / "src", CONFIGS[name](), seed=7)
    adapter = ak.load(src)
    assert adapter.format == "peft"

    # 1. writing back reproduces every tensor of the original file exactly
    out = ak.save(adapter, tmp_path / "out")
    original = load_file(str(src / "adapter_model.safetensors"))
    written = load_file(str(out / "adapter_model.safetensors"))
    assert sorted(original) == sorted(written)
    for key, tensor in original.items():
        assert torch.equal(tensor, written[key]), key

    # 2. the written adapter loads in peft and gives identical logits
    ref_logits, ref_model = _logits(src, input_ids)
    our_logits, _ = _logits(out, input_ids)
    torch.testing.assert_close(our_logits, ref_logits, atol=1e-6, rtol=0)

    # 3. every kind's delta equals peft's get_delta_weight (IA3 through apply)
    checked = 0
    for module_name, module in ref_model.named_modules():
        if not isinstance(module, BaseTunerLayer):
            continue
        path = module_name.removeprefix("base_model.model.")
        if path not in adapter.layers:
            continue
        layer = adapter.layers[path]
        base_weight = module.get_base_layer().weight.detach()
        if layer.kind == "ia3":
            with torch.no_grad():
                module.merge()
                merged = module.get_base_layer().weight.detach().clone()
                module.unmerge()
            fused, _ = layer.apply(base_weight)
            torch.testing.assert_close(fused, merged, atol=1e-6, rtol=1e-6)
        else:
            expected = module.get_delta_weight("default").detach()
            torch.testing.assert_close(layer.delta().reshape(expected.shape), expected, atol=1e-6, rtol=1e-5)
            if not layer.additive:  # DoRA: fused weight equals peft's merge
                with torch.no_grad():
                    module.merge()
                    merged = module.get_base_layer().weight.detach().clone()
                    module.unmerge()
                fused, _ = layer.apply(module.get_base_layer().weight.detach())
                torch.testing.assert_close(fused, merged, atol=1e-5, rtol=1e-5)
        checked += 1
    assert checked == len(adapter.layers)


def test_patterns_resolved_per_layer(tmp_path):
    src = make_peft_adapter(tmp_path / "src", CONFIGS["lora_patterns"](), seed=1)
    a = ak.load(src)
    assert a.layers["model.layers.0.self_attn.q_proj"].rank == 2
    assert a.layers["model.layers.1.self_attn.q_proj"].rank == 4
    assert a.layers["model.layers.0.mlp.down_proj"].rank == 6
    assert a.layers["model.layers.1.self_attn.v_proj"].alpha == 3
    assert a.layers["model.layers.1.self_attn.q_proj"].alpha == 8
    assert a.layers["model.layers.0.self_attn.q_proj"].scale == pytest.approx(4.0)


def test_rslora_scale_and_extras_carried(tmp_path):
    a = ak.load(make_peft_adapter(tmp_path / "rs", CONFIGS["rslora"](), seed=1))
    layer = next(iter(a.layers.values()))
    assert layer.rslora and layer.scale == pytest.approx(4 / 8 ** 0.5)
    m = ak.load(make_peft_adapter(tmp_path / "mts", CONFIGS["modules_to_save"](), seed=1))
    assert any("lm_head" in k for k in m.extras)
    assert m.config["modules_to_save"] == ["lm_head"]


def test_unknown_config_fields_preserved(tmp_path):
    import json

    src = make_peft_adapter(tmp_path / "src", CONFIGS["lora_patterns"](), seed=1)
    cfg = json.loads((src / "adapter_config.json").read_text())
    cfg["my_custom_field"] = {"keep": [1, 2]}
    (src / "adapter_config.json").write_text(json.dumps(cfg))
    out = ak.save(ak.load(src), tmp_path / "out")
    written = json.loads((out / "adapter_config.json").read_text())
    assert written["my_custom_field"] == {"keep": [1, 2]}
    assert written["peft_version"] == cfg["peft_version"]


def test_conv_lora_and_dora_on_conv_model(tmp_path):
    class ConvNet(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.c1 = torch.nn.Conv2d(3, 8, 3, padding=1)
            self.c2 = torch.nn.Conv2d(8, 8, 1)
            self.head = torch.nn.Linear(8, 4)

        def forward(self, x):
            return self.head(self.c2(torch.relu(self.c1(x))).mean((2, 3)))

    x = torch.randn(2, 3, 6, 6)
    for use_dora in (False, True):
        torch.manual_seed(0)
        base = ConvNet().eval()
        state = {k: v.clone() for k, v in base.state_dict().items()}
        torch.manual_seed(3)
        pm = get_peft_model(base, LoraConfig(r=2, lora_alpha=4, target_modules=["c1", "c2"], use_dora=use_dora,
                                             init_lora_weights=False))
        pm.save_pretrained(str(tmp_path / f"conv{use_dora}"))
        with torch.no_grad():
            ref = pm(x)
        a = ak.load(tmp_path / f"conv{use_dora}")
        assert a.layers["c1"].shape == (8, 3, 3, 3) and a.layers["c1"].module_type == "conv"
        out = ak.save(a, tmp_path / f"conv{use_dora}_out")
        fresh = ConvNet()
        fresh.load_state_dict(state)
        loaded = PeftModel.from_pretrained(fresh.eval(), str(out))
        with torch.no_grad():
            torch.testing.assert_close(loaded(x), ref, atol=1e-6, rtol=0)
        for path in ("c1", "c2"):
            w = state[f"{path}.weight"]
            fused, _ = a.layers[path].apply(w)
            mod = pm.base_model.model.get_submodule(path)
            with torch.no_grad():
                mod.merge()
                merged = mod.get_base_layer().weight.detach().clone()
                mod.unmerge()
            torch.testing.assert_close(fused, merged, atol=1e-5, rtol=1e-5)


def test_multiple_adapters_in_subfolders(tmp_path):
    base = make_tiny_llama(0)
    torch.manual_seed(0)
    pm = get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    pm.add_adapter("other", LoraConfig(r=4, target_modules=["v_proj"], init_lora_weights=False))
    pm.save_pretrained(str(tmp_path / "multi"))
    default = ak.load(tmp_path / "multi")
    assert len(default) == 2 and default.name == "default"
    other = ak.load(f"{tmp_path / 'multi'}:other")
    assert {layer.rank for layer in other.layers.values()} == {4}
    assert all(p.endswith("v_proj") for p in other.layers)
    assert other.name == "other"  # PEFT saved adapter "other" in the subfolder named after it
    assert ak.load(tmp_path / "multi" / "other").name == "default"  # a plain path names no adapter, as in PEFT


def test_legacy_bin_loads_with_weights_only(tmp_path):
    src = make_peft_adapter(tmp_path / "src", CONFIGS["lora_patterns"](), seed=2)
    tensors = load_file(str(src / "adapter_model.safetensors"))
    (src / "adapter_model.safetensors").unlink()
    torch.save(tensors, src / "adapter_model.bin")
    a = ak.load(src)
    assert len(a) == 6


def test_hub_ids_resolve_from_local_cache(tmp_path, hub_cache):
    src = make_peft_adapter(tmp_path / "src", CONFIGS["rslora"](), seed=2)
    commit = make_hub_cache_for(hub_cache, src)
    for spec in ("org/adapter", "org/adapter@v1", f"org/adapter@{commit}", "org/adapter:sub", "org/adapter@v1:sub"):
        a = ak.load(spec)
        assert len(a) == 4, spec
        assert a.source.startswith(f"org/adapter@{commit}")
        assert a.name == ("sub" if spec.endswith(":sub") else "default"), spec
    with pytest.raises(ak.SourceNotFoundError, match="could not be found"):
        ak.load("org/missing")
    with pytest.raises(ak.SourceNotFoundError):
        ak.load("org/adapter@no-such-branch")
    with pytest.raises(ak.SourceNotFoundError, match="subfolder"):
        ak.load("org/adapter:nope")


def make_hub_cache_for(cache, src):
    from .conftest import make_hub_cache

    return make_hub_cache(cache, "org/adapter", {"adapter_config.json": src / "adapter_config.json",
                                                  "adapter_model.safetensors": src / "adapter_model.safetensors",
                                                  "sub": src}, refs=("main", "v1"))


def test_cli_info_from_hub_cache_env(tmp_path):
    from .conftest import make_hub_cache, run_cli

    src = make_peft_adapter(tmp_path / "src", CONFIGS["loha"](), seed=2)
    cache = tmp_path / "cache"
    make_hub_cache(cache, "org/loha", {"adapter_config.json": src / "adapter_config.json",
                                       "adapter_model.safetensors": src / "adapter_model.safetensors"})
    res = run_cli("info", "org/loha", "--json", env={"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"})
    assert res.returncode == 0, res.stderr
    import json

    payload = json.loads(res.stdout)
    assert payload["kinds"] == {"loha": 4} and payload["format"] == "peft" and len(payload["layers"]) == 4
    res = run_cli("info", "org/absent", env={"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"})
    assert res.returncode == 1 and res.stderr.count("\n") == 1 and "org/absent" in res.stderr


def test_peft_writer_refuses_what_peft_cannot_express(tmp_path):
    lora = ak.LoRA(down=torch.randn(2, 4), up=torch.randn(3, 2), alpha=2, shape=(3, 4))
    full = ak.Full(diff=torch.randn(3, 4), shape=(3, 4))
    with pytest.raises(ak.UnsupportedError, match="full"):
        ak.save(ak.Adapter(layers={"a": lora, "b": full}), tmp_path / "x")
    dora = ak.LoRA(down=torch.randn(2, 4), up=torch.randn(3, 2), alpha=2, shape=(3, 4), magnitude=torch.ones(3))
    with pytest.raises(ak.UnsupportedError, match="DoRA"):
        ak.save(ak.Adapter(layers={"a": lora, "b": dora}), tmp_path / "y")
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_mixed_rslora_written_exactly(tmp_path, input_ids):
    torch.manual_seed(0)
    a = ak.LoRA(down=torch.randn(4, 32), up=torch.randn(32, 4), alpha=8, shape=(32, 32), rslora=True)
    b = ak.LoRA(down=torch.randn(2, 32), up=torch.randn(16, 2), alpha=2, shape=(16, 32))
    adapter = ak.Adapter(layers={"model.layers.0.self_attn.q_proj": a, "model.layers.0.self_attn.v_proj": b})
    back = ak.load(ak.save(adapter, tmp_path / "mixed"))
    for p in adapter.layers:
        torch.testing.assert_close(back.layers[p].delta(), adapter.layers[p].delta())
    PeftModel.from_pretrained(make_tiny_llama(0), str(tmp_path / "mixed"))  # loads without error


def test_peft_format_detect(tmp_path):
    src = make_peft_adapter(tmp_path / "src", CONFIGS["ia3"](), seed=2)
    assert peft_format.detect(src)
    assert peft_format.detect(src / "adapter_model.safetensors")
    (tmp_path / "empty").mkdir()
    assert not peft_format.detect(tmp_path / "empty")
    with pytest.raises(ak.FormatError, match="load one as"):  # a folder of adapter folders says which to pick
        ak.load(tmp_path)


class _ConvNet(torch.nn.Module):
    """Conv2d (3x3, 32->48), Conv1d and Linear: big enough for PEFT to build LoKr's Tucker ``lokr_t2``."""

    def __init__(self):
        super().__init__()
        self.c1 = torch.nn.Conv2d(3, 32, 3, padding=1)
        self.c2 = torch.nn.Conv2d(32, 48, 3, padding=1)
        self.c1d = torch.nn.Conv1d(48, 16, 3, padding=1)
        self.head = torch.nn.Linear(16, 4)

    def forward(self, x):
        h = torch.relu(self.c2(torch.relu(self.c1(x)))).mean(2)
        return self.head(self.c1d(h).mean(2))


def _gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=32)).eval()


MODEL_CASES = {  # name -> (model factory, peft config, tensor suffix that must be present)
    "loha_tucker_conv": (_ConvNet, lambda: LoHaConfig(r=2, alpha=4, target_modules=["c1", "c2", "c1d"],
                                                      use_effective_conv2d=True, init_weights=False), "hada_t1"),
    "lokr_tucker_conv": (_ConvNet, lambda: LoKrConfig(r=2, alpha=4, target_modules=["c2", "head"], rank_pattern={"head": 3},
                                                      use_effective_conv2d=True, decompose_both=True, decompose_factor=4,
                                                      init_weights=False), "lokr_t2"),
    "ia3_conv": (_ConvNet, lambda: IA3Config(target_modules=["c1", "c2", "head"], feedforward_modules=["c2"],
                                             init_ia3_weights=False), "ia3_l"),
    "gpt2_conv1d_dora": (_gpt2, lambda: LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "wte"], fan_in_fan_out=True,
                                                   use_dora=True, init_lora_weights=False), "lora_magnitude_vector"),
    "gpt2_conv1d_ia3": (_gpt2, lambda: IA3Config(target_modules=["c_attn", "mlp.c_proj"], feedforward_modules=["mlp.c_proj"],
                                                 fan_in_fan_out=True, init_ia3_weights=False), "ia3_l"),
}


@pytest.mark.parametrize("name", sorted(MODEL_CASES))
def test_roundtrip_conv_tucker_and_conv1d_models(tmp_path, name):
    """Tucker LoHa/LoKr, IA3 on convs and GPT-2's Conv1D: exact tensors, identical outputs, deltas as peft's."""
    factory, make_config, suffix = MODEL_CASES[name]
    torch.manual_seed(0)
    base = factory()
    state = {k: v.clone() for k, v in base.state_dict().items()}
    torch.manual_seed(5)
    pm = get_peft_model(base, make_config()).eval()
    pm.save_pretrained(str(tmp_path / "src"))
    x = torch.randn(2, 3, 6, 6) if factory is _ConvNet else torch.randint(0, 64, (2, 7))

    def run(model):
        with torch.no_grad():
            out = model(x)
        return out if isinstance(out, torch.Tensor) else out.logits

    original = load_file(str(tmp_path / "src" / "adapter_model.safetensors"))
    assert any(k.endswith(suffix) for k in original), sorted(original)
    adapter = ak.load(tmp_path / "src")
    out = ak.save(adapter, tmp_path / "out")
    written = load_file(str(out / "adapter_model.safetensors"))
    assert sorted(written) == sorted(original)
    assert all(torch.equal(original[k], written[k]) for k in original)
    fresh = factory()
    fresh.load_state_dict(state)
    torch.testing.assert_close(run(PeftModel.from_pretrained(fresh.eval(), str(out))), run(pm), atol=1e-6, rtol=0)
    checked = 0
    for module_name, module in pm.named_modules():
        path = module_name.removeprefix("base_model.model.")
        if not isinstance(module, BaseTunerLayer) or path not in adapter.layers:
            continue
        layer, weight = adapter.layers[path], module.get_base_layer().weight.detach()
        with torch.no_grad():
            module.merge()
            merged = module.get_base_layer().weight.detach().clone()
            module.unmerge()
        torch.testing.assert_close(layer.apply(weight)[0], merged, atol=1e-5, rtol=1e-5)
        if layer.additive:
            torch.testing.assert_close(layer.delta().reshape(weight.shape), module.get_delta_weight("default"),
                                       atol=1e-6, rtol=1e-5)
        checked += 1
    assert checked == len(adapter.layers)
