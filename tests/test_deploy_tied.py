"""Deploy on a base that ties lm_head to its input embedding, PEFT's unchanged embedding copies
(``save_embedding_layers``), and LyCORIS-named LLM LoRA files checked against the user's base.

* one tie rule (:func:`adaptkit.formats.coverage.with_tied_output`) for the certificate, the folds and llama.cpp;
* the tie decided by the model's config class (transformers 5: ``LlamaConfig`` unties by default, ``GemmaConfig``
  ties), not by a raw JSON default;
* a saved copy equal to the base is a no-op export drops exactly; a changed one is folded only with
  ``--lossy modules_to_save``;
* ``check``/``export`` resolve kohya/LyCORIS flattened names against ``--base``.
"""

from __future__ import annotations

import copy
import json
import shutil

import peft
import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file

import adaptkit as ak
from adaptkit.deploy import check, export
from adaptkit.errors import UnsupportedError
from adaptkit.formats.coverage import base_tensors, ties_output, unchanged_extras
from tests.conftest import make_tiny_llama, run_cli
from tests.deploy_util import make_adapter, peft_logits, rel, save_base


@pytest.fixture(scope="module")
def tied(tmp_path_factory):
    root = tmp_path_factory.mktemp("tied")
    model = make_tiny_llama(0, tie_word_embeddings=True)
    save_base(root / "base", model)
    return root, model


def _dense(layer) -> torch.Tensor:
    """A layer's change in module orientation ((vocab, dim) for an embedding)."""
    up, down = layer.factors(torch.float64)
    d = up @ down
    return d.T if layer.module_type == "embedding" else d


def test_tied_lm_head_modules_to_save_folds_through_the_embedding(tied, tmp_path):
    """vLLM: a saved lm_head on a tied base folds as ``saved - embed_tokens`` (the tensor lm_head holds); before,
    check said the fold works and export failed ('match no weight of the base model: lm_head')."""
    root, model = tied
    src = make_adapter(tmp_path / "ad", peft.LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"]),
                       model=model)
    report = check(str(src), base=str(root / "base"), target="vllm")
    assert {f.rule for f in report.blocking} == {"vllm.modules_to_save"}
    assert report.certificate.complete
    result = export(str(src), tmp_path / "out", target="vllm", base=str(root / "base"), lossy="modules_to_save")
    assert result.check.ok and result.certificate.complete
    row = next(r for r in result.fixes if r.fix == "fold_saved")
    assert row.module == "lm_head"
    saved = load_file(src / "adapter_model.safetensors")
    want = next(v for k, v in saved.items() if "lm_head" in k).double() - model.model.embed_tokens.weight.double()
    got = _dense(result.adapter.layers["lm_head"])
    # the SVD's reported loss is the fold's whole error: the base weight read was the embedding's
    assert abs(rel(want, got) - row.rel_error) < 1e-5
    assert row.rel_error < 0.9


def test_tie_default_comes_from_the_config_class(tied, tmp_path):
    """A config.json without tie_word_embeddings: llama (LlamaConfig: False) lists no lm_head, gemma (GemmaConfig:
    True) does, as transformers builds them."""
    root, _ = tied
    llama = tmp_path / "llama"
    shutil.copytree(root / "base", llama)
    cfg = json.loads((llama / "config.json").read_text())
    cfg.pop("tie_word_embeddings")
    (llama / "config.json").write_text(json.dumps(cfg))
    assert not ties_output(str(llama))
    assert "lm_head.weight" not in base_tensors(str(llama))[1]
    gemma = tmp_path / "gemma"
    gemma.mkdir()
    save_file({k: v.contiguous() for k, v in load_file(llama / "model.safetensors").items()}, gemma / "model.safetensors")
    (gemma / "config.json").write_text(json.dumps({
        "model_type": "gemma", "architectures": ["GemmaForCausalLM"], "vocab_size": 64, "hidden_size": 32,
        "intermediate_size": 48, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "head_dim": 8}))
    assert ties_output(str(gemma))
    assert base_tensors(str(gemma))[1]["lm_head.weight"] == (64, 32)


def test_tied_trainable_tokens_are_refused_for_llamacpp(tied, tmp_path):
    """llama.cpp reuses token_embd as the output of a tied model and applies a token_embd LoRA to that matmul too
    (aborting: see test_gguf_llamacpp): check reports it, export refuses before writing, --drop leaves it out."""
    pytest.importorskip("gguf")
    root, model = tied
    src = make_adapter(tmp_path / "ad", peft.LoraConfig(r=2, target_modules=["q_proj"],
                                                        trainable_token_indices={"embed_tokens": [3, 9]}), model=model)
    report = check(str(src), base=str(root / "base"), target="llama.cpp")
    found = {f.rule: f for f in report.blocking}
    assert found["llama.cpp.tied_embeddings"].where == ("model.embed_tokens",)
    assert found["llama.cpp.tied_embeddings"].verdict == "refused"
    with pytest.raises(UnsupportedError, match="tied"):
        export(str(src), tmp_path / "x.gguf", target="llama.cpp", base=str(root / "base"))
    assert not (tmp_path / "x.gguf").exists()
    out = export(str(src), tmp_path / "x.gguf", target="llama.cpp", base=str(root / "base"), drop=["*embed_tokens"])
    assert out.check.ok and sorted(out.adapter.layers) == ["model.layers.0.self_attn.q_proj",
                                                           "model.layers.1.self_attn.q_proj"]


def test_tied_trainable_tokens_on_vllm_add_the_tied_output(tied, tmp_path):
    """vLLM (PEFT layout): trainable tokens of a tied embedding change lm_head's rows too; export writes both LoRAs
    and peft's logits are kept."""
    root, model = tied
    src = make_adapter(tmp_path / "ad", peft.LoraConfig(r=2, target_modules=["q_proj"],
                                                        trainable_token_indices={"embed_tokens": [3, 9]}), model=model)
    result = export(str(src), tmp_path / "out", target="vllm", base=str(root / "base"))
    assert {"model.embed_tokens", "lm_head"} <= set(result.adapter.layers)
    assert rel(peft_logits(src, model), peft_logits(result.path, model)) < 1e-5


@pytest.fixture(scope="module")
def embed_copy(tmp_path_factory):
    """A LoRA on embed_tokens: peft saves the full embedding beside it (``save_embedding_layers``)."""
    root = tmp_path_factory.mktemp("embcopy")
    model = make_tiny_llama(0)
    save_base(root / "base", model)
    src = make_adapter(root / "ad", peft.LoraConfig(r=2, target_modules=["q_proj", "embed_tokens"]), model=model)
    assert any(".base_layer." in k for k in load_file(src / "adapter_model.safetensors"))
    return root, model, src


def test_unchanged_embedding_copy_is_dropped_exactly(embed_copy, tmp_path):
    root, model, src = embed_copy
    base = str(root / "base")
    assert unchanged_extras(ak.load(src), base) == ["model.embed_tokens.base_layer.weight"]
    report = check(str(src), base=base, target="vllm")
    assert "vllm.modules_to_save" not in {f.rule for f in report.findings}
    for target in ("vllm", "sglang"):
        result = export(str(src), tmp_path / target, target=target, base=base)
        assert not result.adapter.extras and all(r.exact for r in result.fixes)
        assert "model.embed_tokens.base_layer.weight" in {r.module for r in result.fixes if r.fix == "drop_zero"}
        assert rel(peft_logits(src, model), peft_logits(result.path, model)) < 1e-5


def test_changed_embedding_copy_needs_lossy_and_folds_with_its_layer(embed_copy, tmp_path):
    root, model, src = embed_copy
    changed = tmp_path / "changed"
    shutil.copytree(src, changed)
    tensors = load_file(changed / "adapter_model.safetensors")
    key = next(k for k in tensors if ".base_layer." in k)
    g = torch.Generator().manual_seed(3)
    tensors[key] = tensors[key].clone()
    tensors[key][[4, 7]] += torch.randn(2, tensors[key].shape[1], generator=g)  # two trained rows
    save_file(tensors, changed / "adapter_model.safetensors")
    base = str(root / "base")
    assert unchanged_extras(ak.load(changed), base) == []
    with pytest.raises(UnsupportedError, match="--lossy modules_to_save"):
        export(str(changed), tmp_path / "x", target="vllm", base=base)
    result = export(str(changed), tmp_path / "x", target="vllm", base=base, lossy="modules_to_save")
    row = next(r for r in result.fixes if r.fix == "fold_saved")
    assert row.module == "model.embed_tokens" and not result.adapter.extras
    # the whole change PEFT makes to the embedding: the LoRA applied on the changed copy, minus the base
    merged = PeftModel.from_pretrained(copy.deepcopy(model), str(changed)).merge_and_unload()
    want = merged.model.embed_tokens.weight.double() - model.model.embed_tokens.weight.double()
    got = _dense(result.adapter.layers["model.embed_tokens"])
    assert row.rel_error > 0.01 and abs(rel(want, got) - row.rel_error) < 1e-5  # the SVD tail is the whole error


def test_lycoris_named_llm_lora_is_checked_against_the_base(tmp_path):
    """LyCORIS/kohya flattened names (``lycoris_model_layers_0_self_attn_q_proj``) resolve against ``--base``."""
    model = make_tiny_llama(0)
    base = save_base(tmp_path / "base", model)
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for i in range(2):
        for proj, out in (("q_proj", 32), ("v_proj", 16)):
            name = f"lycoris_model_layers_{i}_self_attn_{proj}"
            tensors[f"{name}.lora_down.weight"] = torch.randn(2, 32, generator=g)
            tensors[f"{name}.lora_up.weight"] = torch.randn(out, 2, generator=g)
            tensors[f"{name}.alpha"] = torch.tensor(2.0)
    save_file(tensors, tmp_path / "lycoris.safetensors")
    report = check(str(tmp_path / "lycoris.safetensors"), base=str(base), target="vllm")
    assert report.certificate.complete, report.certificate.summary()
    assert {c.path for c in report.certificate.layers} == {f"model.layers.{i}.self_attn.{p}" for i in range(2)
                                                            for p in ("q_proj", "v_proj")}
    result = export(str(tmp_path / "lycoris.safetensors"), tmp_path / "out", target="vllm", base=str(base))
    assert result.certificate.complete and len(result.adapter.layers) == 4
    name = "lycoris_model_layers_1_self_attn_v_proj"
    want = tensors[f"{name}.lora_up.weight"].double() @ tensors[f"{name}.lora_down.weight"].double()  # alpha = r
    assert rel(want, _dense(result.adapter.layers["model.layers.1.self_attn.v_proj"])) < 1e-6


def test_tied_lm_head_lora_is_reported_by_check_for_llamacpp(tied, tmp_path):
    """check and export agree: an lm_head LoRA on a tied base has no GGUF tensor; before, check passed (the tied
    listing mapped it to ``output.weight``) and export failed."""
    pytest.importorskip("gguf")
    root, model = tied
    src = make_adapter(tmp_path / "ad", peft.LoraConfig(r=2, target_modules=["q_proj", "lm_head"]), model=model)
    report = check(str(src), base=str(root / "base"), target="llama.cpp")
    assert {f.rule: f.where for f in report.blocking}["llama.cpp.tied_embeddings"] == ("lm_head",)
    out = export(str(src), tmp_path / "x.gguf", target="llama.cpp", base=str(root / "base"), drop=["lm_head*"])
    assert out.check.ok and "lm_head" not in out.adapter.layers


def test_cli_refusals_exit_1_without_output(tied, embed_copy, tmp_path):
    root, model = tied
    src = make_adapter(tmp_path / "ad", peft.LoraConfig(r=2, target_modules=["q_proj"],
                                                        trainable_token_indices={"embed_tokens": [3, 9]}), model=model)
    r = run_cli("export", str(src), "-o", str(tmp_path / "x.gguf"), "--target", "llama.cpp", "--base",
                str(root / "base"))
    assert r.returncode == 1 and "tied" in r.stderr and not (tmp_path / "x.gguf").exists()
    r = run_cli("check", str(src), "--target", "llama.cpp", "--base", str(root / "base"))
    assert r.returncode == 1 and "tied_embeddings" in r.stdout + r.stderr
    eroot, _, esrc = embed_copy
    r = run_cli("export", str(esrc), "-o", str(tmp_path / "v"), "--target", "vllm", "--base", str(eroot / "base"))
    assert r.returncode == 0, r.stderr
