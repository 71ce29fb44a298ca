"""ak.inject against real peft: every kind gives peft's logits; switching, disabling, merging agree."""

from __future__ import annotations

import pytest
import torch
from peft import IA3Config, LoHaConfig, LoKrConfig, LoraConfig, PeftModel

import adaptkit as ak
from adaptkit.live.inject import adapted_modules
from adaptkit.live.wrappers import AdaptedModule

from .conftest import make_peft_adapter, make_tiny_llama

ATOL = 1e-5

LLAMA_CONFIGS = {
    "lora_embedding": lambda: LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj", "embed_tokens",
                                                                          "lm_head"], init_lora_weights=False),
    "lora_bias": lambda: LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_bias=True,
                                    init_lora_weights=False),
    "lora_patterns": lambda: LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                        rank_pattern={"v_proj": 2}, alpha_pattern={"q_proj": 3},
                                        init_lora_weights=False),
    "dora": lambda: LoraConfig(r=4, lora_alpha=6, target_modules=["q_proj", "down_proj"], use_dora=True,
                               init_lora_weights=False),
    "rslora": lambda: LoraConfig(r=8, lora_alpha=4, target_modules=["k_proj", "o_proj"], use_rslora=True,
                                 init_lora_weights=False),
    "loha": lambda: LoHaConfig(r=4, alpha=6, target_modules=["q_proj", "up_proj"], init_weights=False),
    "lokr": lambda: LoKrConfig(r=4, alpha=6, target_modules=["q_proj", "up_proj"], init_weights=False),
    "ia3": lambda: IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"],
                             init_ia3_weights=False),
}


def _out(model, x):
    with torch.no_grad():
        out = model(x)
    return out.logits if hasattr(out, "logits") else out


def _check_against_peft(peft_model, ours, x, base_out):
    """Same outputs as peft: injected, merged, unmerged, disabled, enabled again."""
    ref = _out(peft_model, x)
    assert (ref - base_out).abs().max() > 1e-3, "the adapter must change the output for the test to mean anything"
    torch.testing.assert_close(_out(ours, x), ref, atol=ATOL, rtol=0)
    peft_model.merge_adapter()
    ak.merge_adapters(ours)
    torch.testing.assert_close(_out(ours, x), _out(peft_model, x), atol=ATOL, rtol=0)
    peft_model.unmerge_adapter()
    ak.unmerge_adapters(ours)
    torch.testing.assert_close(_out(ours, x), _out(peft_model, x), atol=ATOL, rtol=0)
    with peft_model.disable_adapter():
        ref_disabled = _out(peft_model, x)
    ak.disable_adapters(ours)
    torch.testing.assert_close(_out(ours, x), ref_disabled, atol=ATOL, rtol=0)
    torch.testing.assert_close(_out(ours, x), base_out, atol=0, rtol=0)
    ak.enable_adapters(ours)
    torch.testing.assert_close(_out(ours, x), ref, atol=ATOL, rtol=0)


@pytest.mark.parametrize("name", sorted(LLAMA_CONFIGS))
def test_llama_every_kind_matches_peft(tmp_path, input_ids, name):
    kw = {"attention_bias": True} if name == "lora_bias" else {}  # lora_bias merges into a base bias
    src = make_peft_adapter(tmp_path / name, LLAMA_CONFIGS[name](), seed=11, model=make_tiny_llama(0, **kw))
    peft_model = PeftModel.from_pretrained(make_tiny_llama(0, **kw), str(src)).eval()
    ours = make_tiny_llama(0, **kw)
    base_out = _out(ours, input_ids)
    paths = ak.inject(ours, ak.load(src))
    assert paths and all(isinstance(ours.get_submodule(p), AdaptedModule) for p in paths)
    _check_against_peft(peft_model, ours, input_ids, base_out)


def test_lora_forward_is_low_rank(monkeypatch, input_ids, tmp_path):
    """The LoRA forward never builds the dense delta."""
    src = make_peft_adapter(tmp_path / "a", LoraConfig(r=4, target_modules=["q_proj", "embed_tokens"],
                                                       init_lora_weights=False))
    model = make_tiny_llama(0)
    ak.inject(model, src)
    from adaptkit.core.kinds import LoRA

    def boom(self):
        raise AssertionError("dense delta built in forward")

    monkeypatch.setattr(LoRA, "delta_math", boom)
    _out(model, input_ids)


def test_merge_unmerge_is_bit_exact(tmp_path, input_ids):
    src = make_peft_adapter(tmp_path / "a", LLAMA_CONFIGS["dora"](), seed=3)
    model = make_tiny_llama(0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ak.inject(model, src)
    ak.inject(model, make_peft_adapter(tmp_path / "b", LLAMA_CONFIGS["loha"](), seed=4), name="b", active=False)
    ak.merge_adapters(model, ["default", "b"])
    assert ak.model_status(model)["merged_adapters"][0] == ["b", "default"]
    ak.unmerge_adapters(model, "default")  # b stays merged
    assert ak.model_status(model)["merged_adapters"][0] == ["b"]
    ak.unmerge_adapters(model)
    ak.remove_adapter(model, "default")
    ak.remove_adapter(model, "b")
    assert not any(isinstance(m, AdaptedModule) for m in model.modules())
    after = model.state_dict()
    assert sorted(after) == sorted(before)
    for k in before:
        assert torch.equal(before[k], after[k]), k


def test_switching_and_multiple_active_match_peft(tmp_path, input_ids):
    a = make_peft_adapter(tmp_path / "a", LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                     init_lora_weights=False), seed=1)
    b = make_peft_adapter(tmp_path / "b", LoraConfig(r=2, lora_alpha=4, target_modules=["v_proj", "up_proj"],
                                                     init_lora_weights=False), seed=2)
    peft_model = PeftModel.from_pretrained(make_tiny_llama(0), str(a), adapter_name="a").eval()
    peft_model.load_adapter(str(b), adapter_name="b")
    ours = make_tiny_llama(0)
    ak.inject(ours, a, name="a")
    ak.inject(ours, b, name="b", active=False)
    assert ak.active_adapters(ours) == ["a"]
    torch.testing.assert_close(_out(ours, input_ids), _out(peft_model, input_ids), atol=ATOL, rtol=0)
    peft_model.set_adapter("b")
    ak.set_adapter(ours, "b")
    assert ak.active_adapters(ours) == ["b"]
    torch.testing.assert_close(_out(ours, input_ids), _out(peft_model, input_ids), atol=ATOL, rtol=0)
    peft_model.base_model.set_adapter(["a", "b"])
    ak.set_adapter(ours, ["a", "b"])
    ref_both = _out(peft_model, input_ids)
    torch.testing.assert_close(_out(ours, input_ids), ref_both, atol=ATOL, rtol=0)
    # merging both, then unmerging, agrees too
    peft_model.merge_adapter()
    ak.merge_adapters(ours)
    torch.testing.assert_close(_out(ours, input_ids), _out(peft_model, input_ids), atol=ATOL, rtol=0)
    peft_model.unmerge_adapter()
    ak.unmerge_adapters(ours)
    torch.testing.assert_close(_out(ours, input_ids), ref_both, atol=ATOL, rtol=0)
    # removing one leaves the other working
    peft_model.delete_adapter("a")
    ak.remove_adapter(ours, "a")
    peft_model.set_adapter("b")
    ak.set_adapter(ours, "b")
    torch.testing.assert_close(_out(ours, input_ids), _out(peft_model, input_ids), atol=ATOL, rtol=0)
    assert sorted(p for p, _ in adapted_modules(ours)) == sorted(ak.load(b).layers)


def test_set_adapter_unmerges_like_peft(tmp_path, input_ids):
    a = make_peft_adapter(tmp_path / "a", LLAMA_CONFIGS["lora_patterns"](), seed=1)
    peft_model = PeftModel.from_pretrained(make_tiny_llama(0), str(a)).eval()
    ours = make_tiny_llama(0)
    ak.inject(ours, a)
    peft_model.merge_adapter()
    ak.merge_adapters(ours)
    with pytest.warns(UserWarning):
        peft_model.set_adapter("default")
    ak.set_adapter(ours, "default")
    assert ak.model_status(ours)["merged_adapters"][0] == []
    torch.testing.assert_close(_out(ours, input_ids), _out(peft_model, input_ids), atol=ATOL, rtol=0)


def test_adapter_state_dict_saves_back_through_writers(tmp_path, input_ids):
    src = make_peft_adapter(tmp_path / "a", LLAMA_CONFIGS["lora_embedding"](), seed=5)
    ours = make_tiny_llama(0)
    ak.inject(ours, src, name="style")
    got = ak.adapter_state_dict(ours, "style")
    assert isinstance(got, ak.Adapter) and got.name == "style"
    assert sorted(got.layers) == sorted(ak.load(src).layers)
    out = ak.save(got, tmp_path / "out", format="peft")
    reloaded = PeftModel.from_pretrained(make_tiny_llama(0), str(out)).eval()
    torch.testing.assert_close(_out(reloaded, input_ids), _out(ours, input_ids), atol=ATOL, rtol=0)


def test_trainable_adapter_gets_gradients(tmp_path, input_ids):
    src = make_peft_adapter(tmp_path / "a", LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False))
    model = make_tiny_llama(0)
    ak.inject(model, src, trainable=True)
    loss = model(input_ids).logits.sum()
    loss.backward()
    wrapper = model.model.layers[0].self_attn.q_proj
    assert wrapper.adapter_params["default"]["down"].grad is not None
    assert wrapper.base_layer.weight.grad is not None  # base weights keep their own requires_grad


def _transformers_adapter_state_dict(src, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """``model.load_adapter(src)`` then ``model.get_adapter_state_dict()`` on a tiny llama, as transformers does.

    transformers 5 refuses these methods with a peft older than its ``MIN_PEFT_VERSION``; with such a
    peft the calls transformers 4.57's methods are made of are run instead: ``inject_adapter_in_model``,
    ``set_peft_model_state_dict`` with the ``base_model.model.`` prefix removed, and
    ``get_peft_model_state_dict(model, adapter_name=...)``.
    """
    import peft
    from packaging.version import Version
    from transformers.integrations import peft as hf_peft

    model = make_tiny_llama(0)
    if Version(peft.__version__) >= Version(getattr(hf_peft, "MIN_PEFT_VERSION", "0")):
        model.load_adapter(str(src), adapter_name=adapter_name)
        return model.get_adapter_state_dict(adapter_name)
    from peft import PeftConfig, get_peft_model_state_dict, inject_adapter_in_model, set_peft_model_state_dict
    from safetensors.torch import load_file

    config = PeftConfig.from_pretrained(str(src))
    inject_adapter_in_model(config, model, adapter_name)
    saved = load_file(str(src / "adapter_model.safetensors"))
    result = set_peft_model_state_dict(model, {k.removeprefix("base_model.model."): v for k, v in saved.items()},
                                       adapter_name=adapter_name)
    assert not result.unexpected_keys
    model.peft_config = {adapter_name: config}
    return get_peft_model_state_dict(model, adapter_name=adapter_name)


@pytest.mark.parametrize("name", ["lora_patterns", "lora_embedding", "dora", "rslora", "loha", "lokr", "ia3"])
def test_get_adapter_state_dict_matches_transformers(tmp_path, name):
    src = make_peft_adapter(tmp_path / name, LLAMA_CONFIGS[name](), seed=7)
    want = _transformers_adapter_state_dict(src, "style")
    ours = make_tiny_llama(0)
    ak.load_adapter(ours, src, adapter_name="style")
    got = ak.get_adapter_state_dict(ours)
    assert list(got) and not any(k.startswith("base_model.") or ".style." in k for k in got)
    assert sorted(got) == sorted(want)
    for key, tensor in want.items():
        assert got[key].dtype == tensor.dtype and torch.equal(got[key], tensor.detach().cpu()), key


def test_delete_adapter_checks_every_name_then_removes_each(tmp_path, input_ids):
    a = make_peft_adapter(tmp_path / "a", LLAMA_CONFIGS["lora_patterns"](), seed=1)
    b = make_peft_adapter(tmp_path / "b", LLAMA_CONFIGS["ia3"](), seed=2)
    model = make_tiny_llama(0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert ak.load_adapter(model, a, adapter_name="a") == ak.inject(make_tiny_llama(0), a, name="a")
    ak.load_adapter(model, b, adapter_name="b", active=False)
    assert ak.active_adapters(model) == ["a"]
    with pytest.raises(ak.ConfigError, match="'nope'"):
        ak.delete_adapter(model, ["b", "nope"])
    assert {n for _, w in adapted_modules(model) for n in w.adapter_params} == {"a", "b"}  # nothing deleted
    ak.delete_adapter(model, "a")
    assert sorted(p for p, _ in adapted_modules(model)) == sorted(ak.load(b).layers)
    ak.delete_adapter(model, ["b"])
    assert not adapted_modules(model)
    after = model.state_dict()
    assert sorted(after) == sorted(before) and all(torch.equal(before[k], after[k]) for k in before)
