"""ak.inject with PEFT ``modules_to_save``: the saved module copies are installed and switch with their adapter.

Compared with real peft (``PeftModel.from_pretrained`` / ``load_adapter``): logits with the adapter active,
disabled, merged, after switching to an adapter without a copy and back, and after deleting; the copies come
back from ``get_adapter_state_dict`` as transformers returns them. What cannot be applied is refused.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from peft import LoraConfig, PeftModel, TaskType, get_peft_model
from safetensors.torch import load_file

import adaptkit as ak
from adaptkit.live.inject import adapted_modules, saved_modules
from adaptkit.live.saved_modules import ModulesToSaveWrapper

from .conftest import make_tiny_llama, perturb_saved_copies
from .test_inject import _transformers_adapter_state_dict

ATOL = 1e-6


def _make(path, seed, modules_to_save=("lm_head",), targets=("q_proj", "v_proj"), model=None, task_type=None):
    """A LoRA adapter made with peft whose saved module copies differ from the base (as after training)."""
    base = model if model is not None else make_tiny_llama(0)
    torch.manual_seed(seed)
    pm = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=list(targets), task_type=task_type,
                                         modules_to_save=list(modules_to_save) if modules_to_save else None,
                                         init_lora_weights=False))
    perturb_saved_copies(pm)
    pm.save_pretrained(str(path))
    return path


def _logits(model, x):
    with torch.no_grad():
        out = model(x)
    return out.logits if hasattr(out, "logits") else out


@pytest.fixture
def mts(tmp_path):
    return _make(tmp_path / "mts", seed=1)


def test_modules_to_save_logits_match_peft(mts, input_ids):
    peft_model = PeftModel.from_pretrained(make_tiny_llama(0), str(mts)).eval()
    ours = make_tiny_llama(0)
    base = _logits(ours, input_ids)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # applied, not warned about
        assert ak.inject(ours, mts) == ["lm_head", "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj",
                                        "model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]
    assert isinstance(ours.lm_head, ModulesToSaveWrapper)
    ref = _logits(peft_model, input_ids)
    lora_only = make_tiny_llama(0)
    ak.inject(lora_only, ak.load(mts).replace(extras={}))
    assert (ref - _logits(lora_only, input_ids)).abs().max() > 1e-2, "the saved lm_head must matter for the test"
    torch.testing.assert_close(_logits(ours, input_ids), ref, atol=ATOL, rtol=0)
    # disabled: the original lm_head, as in peft
    ak.disable_adapters(ours)
    with peft_model.disable_adapter():
        torch.testing.assert_close(_logits(ours, input_ids), _logits(peft_model, input_ids), atol=ATOL, rtol=0)
    torch.testing.assert_close(_logits(ours, input_ids), base, atol=0, rtol=0)
    ak.enable_adapters(ours)
    torch.testing.assert_close(_logits(ours, input_ids), ref, atol=ATOL, rtol=0)
    # merged: the copy keeps running, as with peft's merge_adapter
    ak.merge_adapters(ours)
    peft_model.merge_adapter()
    torch.testing.assert_close(_logits(ours, input_ids), _logits(peft_model, input_ids), atol=ATOL, rtol=0)
    ak.unmerge_adapters(ours)
    peft_model.unmerge_adapter()
    torch.testing.assert_close(_logits(ours, input_ids), ref, atol=ATOL, rtol=0)
    # attributes reach the module in use
    assert torch.equal(ours.lm_head.weight, peft_model.base_model.model.lm_head.weight)
    assert ours.lm_head.out_features == 64
    # status lists the wrapper as peft lists its own
    ours_rows = ak.layer_status(ours).set_index("name")
    peft_rows = ak.layer_status(peft_model).set_index("name")
    assert ours_rows.loc["lm_head", "active_adapters"] == peft_rows.loc["model.lm_head", "active_adapters"] == ["default"]
    assert ours_rows.loc["lm_head", "module_type"] == "adaptkit.ModulesToSaveWrapper"
    assert ours_rows.loc["lm_head", "available_adapters"] == ["default"]


def test_switching_and_deleting_match_peft(mts, tmp_path, input_ids):
    other = _make(tmp_path / "other", seed=2, modules_to_save=None, targets=("k_proj",))
    peft_model = PeftModel.from_pretrained(make_tiny_llama(0), str(mts), adapter_name="a").eval()
    peft_model.load_adapter(str(other), adapter_name="b")
    ours = make_tiny_llama(0)
    ak.inject(ours, mts, name="a")
    ak.inject(ours, other, name="b", active=False)

    def same():
        torch.testing.assert_close(_logits(ours, input_ids), _logits(peft_model, input_ids), atol=ATOL, rtol=0)

    same()
    peft_model.set_adapter("b")
    ak.set_adapter(ours, "b")
    assert ours.lm_head.active_adapters == [] and ak.active_adapters(ours) == ["b"]
    same()
    peft_model.set_adapter("a")
    ak.set_adapter(ours, "a")
    same()
    # a second adapter with its own copy of lm_head: switching picks the active one's copy
    third = _make(tmp_path / "third", seed=3)
    peft_model.load_adapter(str(third), adapter_name="c")
    ak.inject(ours, third, name="c", active=False)
    assert sorted(ours.lm_head.modules_to_save) == ["a", "c"]
    same()
    peft_model.set_adapter("c")
    ak.set_adapter(ours, "c")
    same()
    with pytest.raises(ak.ConfigError, match=r"adapters \['a', 'c'\] both save lm_head whole"):
        ak.set_adapter(ours, ["a", "c"])
    assert ak.active_adapters(ours) == ["c"]
    same()
    # deleting an adapter deletes its copy; the last copy's removal puts the original lm_head back
    peft_model.delete_adapter("c")
    ak.delete_adapter(ours, "c")
    peft_model.set_adapter("a")
    ak.set_adapter(ours, "a")
    same()
    peft_model.delete_adapter("a")
    ak.delete_adapter(ours, "a")
    peft_model.set_adapter("b")
    ak.set_adapter(ours, "b")
    same()
    assert isinstance(ours.lm_head, torch.nn.Linear) and not saved_modules(ours)


def test_score_head_of_a_sequence_classifier(tmp_path, input_ids):
    """peft adds ``score``/``classifier`` to modules_to_save for SEQ_CLS; the head comes with the adapter."""
    from transformers import LlamaForSequenceClassification

    from .conftest import tiny_llama_config

    def classifier():
        torch.manual_seed(0)
        return LlamaForSequenceClassification(tiny_llama_config(num_labels=3, pad_token_id=0)).eval()

    src = _make(tmp_path / "cls", seed=4, modules_to_save=None, model=classifier(), task_type=TaskType.SEQ_CLS)
    assert "base_model.model.score.weight" in load_file(str(src / "adapter_model.safetensors"))
    peft_model = PeftModel.from_pretrained(classifier(), str(src)).eval()
    ours = classifier()
    assert "score" in ak.inject(ours, src)
    torch.testing.assert_close(_logits(ours, input_ids), _logits(peft_model, input_ids), atol=ATOL, rtol=0)


def test_copies_come_back_in_state_dicts_and_save_back(mts, tmp_path, input_ids):
    want = _transformers_adapter_state_dict(mts, "style")
    ours = make_tiny_llama(0)
    ak.load_adapter(ours, mts, adapter_name="style")
    got = ak.get_adapter_state_dict(ours)
    assert "lm_head.weight" in got and sorted(got) == sorted(want)
    for key, tensor in want.items():
        assert torch.equal(got[key], tensor.detach().cpu()), key
    a = ak.adapter_state_dict(ours, "style")
    assert sorted(a.extras) == ["lm_head.weight"] and a.config["modules_to_save"] == ["lm_head"]
    out = ak.save(a, tmp_path / "back", format="peft")
    reloaded = PeftModel.from_pretrained(make_tiny_llama(0), str(out)).eval()
    torch.testing.assert_close(_logits(reloaded, input_ids), _logits(ours, input_ids), atol=ATOL, rtol=0)


def test_raw_state_dict_with_modules_to_save_in_its_config(mts, input_ids):
    import json

    sd = load_file(str(mts / "adapter_model.safetensors"))
    cfg = json.loads((mts / "adapter_config.json").read_text())
    ours = make_tiny_llama(0)
    ak.inject(ours, sd, config=cfg)
    peft_model = PeftModel.from_pretrained(make_tiny_llama(0), str(mts)).eval()
    torch.testing.assert_close(_logits(ours, input_ids), _logits(peft_model, input_ids), atol=ATOL, rtol=0)


def test_what_cannot_be_applied_is_refused_and_nothing_changes(mts):
    a = ak.load(mts)
    model = make_tiny_llama(0)

    def untouched():
        assert not adapted_modules(model) and not saved_modules(model)

    with pytest.raises(ak.CoverageError, match=r"bundle_emb.tok.string_to_param \(belongs to no module of this model"):
        ak.inject(model, a.replace(extras={**a.extras, "bundle_emb.tok.string_to_param": torch.ones(2, 32)}))
    untouched()
    with pytest.raises(ak.ShapeMismatchError, match=r"lm_head.weight \(saved whole \(modules_to_save\) with shape \(64, 16\)"):
        ak.inject(model, a.replace(extras={"lm_head.weight": torch.ones(64, 16)}))
    untouched()
    with pytest.raises(ak.CoverageError, match="has no tensor 'bias'"):
        ak.inject(model, a.replace(extras={"lm_head.weight": a.extras["lm_head.weight"], "lm_head.bias": torch.ones(64)}))
    untouched()
    changed = model.model.embed_tokens.weight.detach() + 1
    with pytest.raises(ak.UnsupportedError, match="base weights that differ from this model's"):  # refused
        ak.inject(model, a.replace(extras={**a.extras, "model.embed_tokens.base_layer.weight": changed}))
    untouched()
    with pytest.raises(ak.NonFiniteError, match="extra tensor lm_head.weight"):
        ak.inject(model, a.replace(extras={"lm_head.weight": torch.full((64, 32), float("nan"))}))
    untouched()
    ak.inject(model, a, name="a")
    lora_on_head = ak.LoRA(down=torch.randn(2, 32), up=torch.randn(64, 2), alpha=2.0, shape=(64, 32))
    with pytest.raises(ak.UnsupportedError, match="lm_head is replaced by the copy"):
        ak.inject(model, ak.Adapter(layers={"lm_head": lora_on_head}), name="b")
