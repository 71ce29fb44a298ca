"""ak.inject on conv layers, transformers Conv1D (gpt2), raw state dicts, and its errors."""

from __future__ import annotations

import json

import pytest
import torch
from peft import IA3Config, LoHaConfig, LoKrConfig, LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from torch import nn

import adaptkit as ak

from .conftest import make_peft_adapter, make_tiny_llama
from .test_inject import _check_against_peft, _out

ATOL = 1e-5


class ConvNet(nn.Module):
    """Conv1d, Conv2d (3x3 and 1x1), Conv3d and a Linear head, small and seeded."""

    def __init__(self, seed: int = 0, padding_mode: str = "zeros"):
        super().__init__()
        torch.manual_seed(seed)
        self.c1 = nn.Conv1d(4, 6, 3, padding=1)
        self.c2a = nn.Conv2d(3, 8, 3, padding=1)
        self.c2b = nn.Conv2d(8, 8, 1)
        self.c3 = nn.Conv3d(2, 4, 3, padding=1, padding_mode=padding_mode)
        self.fc = nn.Linear(8, 6)

    def forward(self, x):
        x1, x2, x3 = x[:, :40].reshape(-1, 4, 10), x[:, 40:232].reshape(-1, 3, 8, 8), x[:, 232:].reshape(-1, 2, 4, 4, 4)
        h = self.c2b(torch.relu(self.c2a(x2))).mean(dim=(2, 3))
        return torch.cat([self.c1(x1).flatten(1), self.fc(h), self.c3(x3).flatten(1)], dim=1)


CONV_CONFIGS = {
    "lora": lambda: LoraConfig(r=2, lora_alpha=4, target_modules=["c1", "c2a", "c2b", "c3", "fc"],
                               init_lora_weights=False),
    "dora": lambda: LoraConfig(r=2, lora_alpha=3, target_modules=["c1", "c2a", "fc"], use_dora=True,
                               init_lora_weights=False),
    "loha": lambda: LoHaConfig(r=2, alpha=3, target_modules=["c1", "c2a", "c2b"], init_weights=False),
    "loha_tucker": lambda: LoHaConfig(r=2, alpha=40, target_modules=["c2a"], use_effective_conv2d=True,
                                      init_weights=False),
    "lokr": lambda: LoKrConfig(r=2, alpha=3, target_modules=["c2a", "c2b", "fc"], init_weights=False),
    "ia3": lambda: IA3Config(target_modules=["c2a", "c2b"], feedforward_modules=["c2b"],
                             init_ia3_weights=False),
}


@pytest.fixture
def conv_input():
    torch.manual_seed(5)
    return torch.randn(3, 40 + 192 + 128)


@pytest.mark.parametrize("name", sorted(CONV_CONFIGS))
def test_conv_kinds_match_peft(tmp_path, conv_input, name):
    src = make_peft_adapter(tmp_path / name, CONV_CONFIGS[name](), seed=2, model=ConvNet())
    peft_model = PeftModel.from_pretrained(ConvNet(), str(src)).eval()
    ours = ConvNet()
    base_out = _out(ours, conv_input)
    ak.inject(ours, src)
    _check_against_peft(peft_model, ours, conv_input, base_out)


def test_conv_low_rank_path_keeps_padding_mode(tmp_path, conv_input):
    """With padding_mode="reflect" the unmerged low-rank forward equals the merged one.

    (PEFT's LoRA conv path always pads with zeros, so its unmerged output differs from its merged output here;
    adaptkit runs the down-projection with the base layer's own padding.)
    """
    src = make_peft_adapter(tmp_path / "a", CONV_CONFIGS["lora"](), seed=2, model=ConvNet())
    ours = ConvNet(padding_mode="reflect")
    base_out = _out(ours, conv_input)
    ak.inject(ours, src)
    unmerged = _out(ours, conv_input)
    ak.merge_adapters(ours)
    merged = _out(ours, conv_input)
    assert (unmerged - base_out).abs().max() > 1e-2
    torch.testing.assert_close(unmerged, merged, atol=ATOL, rtol=0)


def _tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=4)).eval()


@pytest.mark.parametrize("kind", ["lora", "ia3"])
def test_gpt2_conv1d_fan_in_fan_out(tmp_path, input_ids, kind):
    cfg = (LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True,
                      init_lora_weights=False) if kind == "lora" else
           IA3Config(target_modules=["c_attn", "mlp.c_proj"], feedforward_modules=["mlp.c_proj"],
                     fan_in_fan_out=True, init_ia3_weights=False))
    src = make_peft_adapter(tmp_path / kind, cfg, seed=3, model=_tiny_gpt2())
    peft_model = PeftModel.from_pretrained(_tiny_gpt2(), str(src)).eval()
    ours = _tiny_gpt2()
    base_out = _out(ours, input_ids)
    ak.inject(ours, src)
    _check_against_peft(peft_model, ours, input_ids, base_out)


def test_raw_peft_state_dict_into_conv1d_without_config(tmp_path, input_ids):
    """PEFT tensors alone: no config, so alpha = rank (scale 1) with a warning; Conv1D orientation from the model."""
    cfg = LoraConfig(r=4, lora_alpha=4, target_modules=["c_attn"], fan_in_fan_out=True, init_lora_weights=False)
    src = make_peft_adapter(tmp_path / "a", cfg, seed=3, model=_tiny_gpt2())
    peft_model = PeftModel.from_pretrained(_tiny_gpt2(), str(src)).eval()
    ours = _tiny_gpt2()
    with pytest.warns(UserWarning, match="alpha = rank"):
        ak.inject(ours, load_file(str(src / "adapter_model.safetensors")))
    torch.testing.assert_close(_out(ours, input_ids), _out(peft_model, input_ids), atol=ATOL, rtol=0)


def test_raw_state_dict_with_config_and_adapter_names(tmp_path, input_ids):
    cfg = LoraConfig(r=4, lora_alpha=6, target_modules=["q_proj", "v_proj"], use_rslora=True, init_lora_weights=False)
    src = make_peft_adapter(tmp_path / "a", cfg, seed=3)
    peft_model = PeftModel.from_pretrained(make_tiny_llama(0), str(src)).eval()
    ref = _out(peft_model, input_ids)
    # 1. file tensors + adapter_config.json dict
    ours = make_tiny_llama(0)
    config = json.loads((src / "adapter_config.json").read_text())
    ak.inject(ours, load_file(str(src / "adapter_model.safetensors")), config=config)
    torch.testing.assert_close(_out(ours, input_ids), ref, atol=ATOL, rtol=0)
    # 2. model.state_dict() naming (".default." in the keys) with kohya-style alpha keys
    sd = {k: v for k, v in peft_model.state_dict().items() if "lora_" in k}
    assert any(".default." in k for k in sd)
    ranks = {k.rsplit(".lora_A", 1)[0]: v.shape[0] for k, v in sd.items() if ".lora_A." in k}
    for module, r in ranks.items():  # rsLoRA scale 6/sqrt(4) = 3 = alpha/r with alpha = 12
        sd[module + ".alpha"] = torch.tensor(6 / r**0.5 * r)
    ours2 = make_tiny_llama(0)
    ak.inject(ours2, sd)
    torch.testing.assert_close(_out(ours2, input_ids), ref, atol=ATOL, rtol=0)


def test_raw_kohya_state_dict(tmp_path, input_ids):
    """A kohya/LyCORIS-named dict goes through the registered kohya reader, names resolved on the live model."""
    from adaptkit.formats import FORMATS

    if "kohya" not in FORMATS:
        pytest.skip("kohya format not registered")
    src = make_peft_adapter(tmp_path / "a", LoHaConfig(r=4, alpha=6, target_modules=["q_proj", "up_proj"],
                                                       init_weights=False), seed=3)
    peft_model = PeftModel.from_pretrained(make_tiny_llama(0), str(src)).eval()
    kohya_file = ak.save(ak.load(src), tmp_path / "k.safetensors", format="kohya")
    sd = load_file(str(kohya_file))
    assert all(not k.endswith((".hada_w1_a.weight",)) and "lora_A" not in k for k in sd)
    ours = make_tiny_llama(0)
    ak.inject(ours, sd)
    torch.testing.assert_close(_out(ours, input_ids), _out(peft_model, input_ids), atol=ATOL, rtol=0)


# ------------------------------------------------------------------------------------------------ errors


@pytest.fixture
def lora_src(tmp_path):
    return make_peft_adapter(tmp_path / "src", LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                          init_lora_weights=False), seed=1)


def test_unmatched_modules_are_listed(lora_src):
    sd = load_file(str(lora_src / "adapter_model.safetensors"))
    a = sd.pop("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight")
    b = sd.pop("base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight")
    sd["model.layers.7.self_attn.q_proj.lora_A.weight"] = a
    sd["model.layers.7.self_attn.q_proj.lora_B.weight"] = b
    sd["model.layers.0.self_attn.nope.lora_A.weight"] = a
    sd["model.layers.0.self_attn.nope.lora_B.weight"] = b
    model = make_tiny_llama(0)
    with pytest.raises(ak.CoverageError, match="2 of 5 adapter layers would not land.*matches no module") as e:
        ak.inject(model, sd, config={"lora_alpha": 8, "peft_type": "LORA"})
    assert "model.layers.7.self_attn.q_proj" in str(e.value) and "model.layers.0.self_attn.nope" in str(e.value)
    assert not any(type(m).__name__ == "AdaptedModule" for m in model.modules()), "nothing is injected on error"


def test_shapes_that_do_not_fit_are_listed(lora_src):
    small = make_tiny_llama(0, hidden_size=16, num_attention_heads=2, num_key_value_heads=1, intermediate_size=24)
    with pytest.raises(ak.ShapeMismatchError, match="4 of 4 adapter layers would not land") as e:
        ak.inject(small, lora_src)
    assert "model.layers.0.self_attn.q_proj" in str(e.value) and "32" in str(e.value)


def test_bad_state_dicts(lora_src):
    model = make_tiny_llama(0)
    with pytest.raises(ak.FormatError, match="not PEFT adapter tensors: model.norm.weight"):
        ak.inject(model, {**load_file(str(lora_src / "adapter_model.safetensors")),
                          "model.norm.weight": torch.ones(32)})
    with pytest.raises(ak.FormatError, match="no adapter format recognises"):
        ak.inject(model, {"foo.bar": torch.ones(3)})
    with pytest.raises(ak.FormatError, match="empty"):
        ak.inject(model, {})
    with pytest.raises(TypeError, match="Adapter, a source"):
        ak.inject(model, 42)


def test_same_name_twice_needs_replace(lora_src, tmp_path, input_ids):
    other = make_peft_adapter(tmp_path / "other", LoraConfig(r=2, target_modules=["k_proj"], init_lora_weights=False),
                              seed=9)
    model = make_tiny_llama(0)
    ak.inject(model, lora_src)
    with pytest.raises(ak.ConfigError, match="already injected; pass replace=True"):
        ak.inject(model, other)
    ak.inject(model, other, replace=True)
    ref = PeftModel.from_pretrained(make_tiny_llama(0), str(other)).eval()
    torch.testing.assert_close(_out(model, input_ids), _out(ref, input_ids), atol=ATOL, rtol=0)
    with pytest.raises(ak.ConfigError, match="no adapter named 'x'"):
        ak.set_adapter(model, "x")
    with pytest.raises(ak.ConfigError, match="not valid"):
        ak.inject(model, lora_src, name="a.b")


def test_injecting_next_to_peft_layers_is_refused(lora_src):
    peft_model = get_peft_model(make_tiny_llama(0), LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(ak.UnsupportedError, match="cannot adapt"):
        ak.inject(peft_model.base_model.model, lora_src)


def test_pipeline_with_diffusers_named_state_dict(tmp_path):
    """A diffusers-style dict (``unet.<path>.lora_A.weight``) injected into a pipeline's component."""
    from diffusers import DiffusionPipeline

    from .test_status_live import _tiny_unet

    class TinyPipeline(DiffusionPipeline):
        def __init__(self, unet):
            super().__init__()
            self.register_modules(unet=unet)

    src = make_peft_adapter(tmp_path / "u", LoraConfig(r=2, lora_alpha=2, target_modules=["to_q", "to_v", "conv1"],
                                                       init_lora_weights=False), seed=4, model=_tiny_unet())
    ref = PeftModel.from_pretrained(_tiny_unet(), str(src)).eval()
    sd = {"unet." + k.removeprefix("base_model.model."): v
          for k, v in load_file(str(src / "adapter_model.safetensors")).items()}
    pipe = TinyPipeline(_tiny_unet().eval())
    with pytest.warns(UserWarning, match="alpha = rank"):
        paths = ak.inject(pipe, sd, name="style")
    assert paths and all(p.startswith("unet.") for p in paths)
    torch.manual_seed(0)
    args = (torch.randn(1, 4, 8, 8), torch.tensor([3]), torch.randn(1, 2, 8))
    with torch.no_grad():
        ours, theirs = pipe.unet(*args).sample, ref(*args).sample
        base = _tiny_unet()(*args).sample
    assert (theirs - base).abs().max() > 1e-4
    torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=0)
    assert ak.model_status(pipe).iloc[0]["peft_types"] == {"style": "LORA"}
    ak.remove_adapter(pipe, "style")
    with torch.no_grad():
        torch.testing.assert_close(pipe.unet(*args).sample, base, atol=0, rtol=0)
    # the same adapter as a kohya dict (lora_unet_* names, alpha keys), into the pipeline and into the bare unet
    adapter = ak.load(src)
    adapter = adapter.replace(layers={"unet." + k: v for k, v in adapter.layers.items()})
    kohya = load_file(str(ak.save(adapter, tmp_path / "k.safetensors", format="kohya")))
    assert all(k.startswith("lora_unet_") for k in kohya)
    for target in (pipe, pipe.unet):
        ak.inject(target, kohya, name="k", replace=True)
        with torch.no_grad():
            torch.testing.assert_close(pipe.unet(*args).sample, theirs, atol=ATOL, rtol=0)


def test_kinds_peft_cannot_hold_match_their_fused_weights():
    """Full diffs, LoRA with a Tucker core (LyCORIS LoCon), IA3 that leaves the bias alone (LyCORIS): the
    unmerged forward equals the base op with the kind's own ``apply(W, b)``."""
    import torch.nn.functional as F

    from adaptkit.core.kinds import IA3, Full, LoRA

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Conv2d(5, 4, 3, padding=1), nn.Linear(4, 3))
    layers = {
        "0": Full(diff=torch.randn(5, 6), diff_b=torch.randn(5), shape=(5, 6)),
        "1": LoRA(down=torch.randn(2, 5, 1, 1), up=torch.randn(4, 2, 1, 1), mid=torch.randn(2, 2, 3, 3), alpha=3.0,
                  shape=(4, 5, 3, 3), module_type="conv"),
        "2": IA3(vector=torch.rand(3) + 0.5, scale_bias=False),
    }
    x = torch.randn(2, 7, 6)
    with torch.no_grad():
        expected = []
        h = x
        fused = [layers["0"].apply(model[0].weight, model[0].bias), layers["1"].apply(model[1].weight, model[1].bias),
                 layers["2"].apply(model[2].weight, model[2].bias)]
        h = F.linear(h, *fused[0])
        h = F.conv2d(h.reshape(2, 7, 5, 1).permute(0, 2, 1, 3).expand(2, 5, 7, 3).contiguous(), *fused[1], padding=1)
        expected = F.linear(h.mean(dim=(2, 3)), *fused[2])
        assert torch.equal(fused[2][1], model[2].bias)  # the bias is not scaled

        def run(m):
            h = m[0](x)
            h = m[1](h.reshape(2, 7, 5, 1).permute(0, 2, 1, 3).expand(2, 5, 7, 3).contiguous())
            return m[2](h.mean(dim=(2, 3)))

        base = run(model)
        ak.inject(model, ak.Adapter(layers=layers))
        unmerged = run(model)
        ak.merge_adapters(model)
        merged = run(model)
    assert (unmerged - base).abs().max() > 1e-2
    torch.testing.assert_close(unmerged, expected, atol=ATOL, rtol=1e-5)
    torch.testing.assert_close(merged, expected, atol=ATOL, rtol=1e-5)


@pytest.mark.parametrize("case", ["full", "locon-tucker", "loha-dora", "lokr-tucker", "dora-in"])
def test_lycoris_file_injected_by_path_matches_lycoris(tmp_path, case):
    """A LyCORIS file given as a path (flattened names resolved on the live model): the real lycoris-applied
    output, unmerged and merged. Covers Full, which peft cannot hold."""
    import copy
    import logging

    pytest.importorskip("lycoris")
    from .test_kohya_lycoris import CASES, make_lycoris

    logging.getLogger("LyCORIS").setLevel(logging.ERROR)
    path, base, applied, x = make_lycoris(tmp_path, **CASES[case])
    ours = copy.deepcopy(base)
    ak.inject(ours, str(path))
    with torch.no_grad():
        want = applied(x)
        assert (want - base(x)).abs().max() > 1e-3
        torch.testing.assert_close(ours(x), want, atol=ATOL, rtol=1e-5)
        ak.merge_adapters(ours)
        torch.testing.assert_close(ours(x), want, atol=ATOL, rtol=1e-5)
