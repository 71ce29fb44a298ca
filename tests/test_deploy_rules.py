"""Every rule of every target table: an adapter made by the real peft uses the rule's feature, ``check`` names the
rule with its verdict, and ``export`` does what the verdict says (accepted: nothing blocks; exact: fixed by default
with the adapted weights within 1e-6; lossy: refused without ``--lossy`` and fixed with it; refused: refused unless
the places are dropped)."""

from __future__ import annotations

import pytest
import torch

import adaptkit as ak
from adaptkit.deploy import TARGETS, check, export
from adaptkit.errors import UnsupportedError
from tests.conftest import make_tiny_llama
from tests.deploy_util import (
    make_adapter,
    save_base,
    tiny_phi3_from_llama,
    weight_error,
)

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")


def lora(**kw):
    return peft.LoraConfig(**{"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"], **kw})


class ConvNet(torch.nn.Module):
    """A conv layer and two linears, one named like an attention projection and one not."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 4, 3)
        self.q_proj = torch.nn.Linear(4, 4)
        self.fc1 = torch.nn.Linear(4, 4)

    def forward(self, x):
        return self.fc1(self.q_proj(self.conv(x).mean((2, 3))))


def moe():
    cfg = transformers.Qwen3MoeConfig(
        vocab_size=48, hidden_size=16, intermediate_size=24, moe_intermediate_size=12, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=8, num_experts=4, num_experts_per_tok=2,
        decoder_sparse_step=1, mlp_only_layers=[], norm_topk_prob=True)
    torch.manual_seed(0)
    return transformers.Qwen3MoeForCausalLM(cfg).eval()


def _zero_first_b(pm):
    with torch.no_grad():
        pm.base_model.model.model.layers[0].self_attn.q_proj.lora_B["default"].weight.zero_()


#: feature -> (peft config, model factory or None (tiny llama), export options: lossy, base ("llama"/"phi3"), drop,
#: max_rank)
ADAPTERS = {
    "dora": (lambda: lora(use_dora=True), None, {"lossy": "dora", "base": "llama"}),
    "bias": (lambda: lora(lora_bias=True), None, {"lossy": "bias"}),
    "modules_to_save": (lambda: lora(modules_to_save=["lm_head"]), None,
                        {"lossy": "modules_to_save", "base": "llama", "max_rank": 16}),
    "trainable_tokens": (lambda: lora(trainable_token_indices={"embed_tokens": [1, 5, 7]}), None, {"base": "llama"}),
    "base_dependent": (lambda: peft.IA3Config(target_modules=["q_proj", "v_proj"], feedforward_modules=[]), None,
                       {"base": "llama", "max_rank": 64}),
    "target_parameters": (lambda: lora(r=3, lora_alpha=6, target_modules=["q_proj"],
                                       target_parameters=["mlp.experts.gate_up_proj"]), moe, {"drop": ["*experts*"]}),
    "rslora": (lambda: lora(use_rslora=True), None, {}),
    "alpha_pattern": (lambda: lora(alpha_pattern={"v_proj": 3}), None, {}),
    "rank_pattern": (lambda: lora(rank_pattern={"v_proj": 4}), None, {}),
    "rank": (lambda: lora(r=24, lora_alpha=24), None, {"lossy": "rank", "max_rank": 16}),
    "other_kinds": (lambda: peft.LoHaConfig(r=3, alpha=6, target_modules=["q_proj", "v_proj"]), None, {}),
    "module_type": (lambda: lora(r=2, lora_alpha=2, target_modules=["conv", "q_proj"]), ConvNet, {"drop": ["conv"]}),
    "module_names": (lambda: lora(r=2, lora_alpha=2, target_modules=["fc1", "q_proj"]), ConvNet, {"drop": ["fc1"]}),
    "init_weights": (lambda: lora(init_lora_weights="pissa"), None, {}),
    "variants": (lambda: lora(alora_invocation_tokens=[5, 6]), None, {}),
    "target_names": (lambda: lora(target_modules=r".*\.(q_proj|v_proj)$"), None, {}),
    "fused_names": (lambda: lora(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj"]), None,
                    {"base": "phi3"}),
    "zero_layers": (lambda: lora(), None, {"edit": _zero_first_b}),
}

RULES = [(t.name, r.feature) for t in TARGETS.values() if t.name in ("vllm", "sglang", "peft", "diffusers")
         for r in t.rules]


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    root = tmp_path_factory.mktemp("rules")
    llama = make_tiny_llama(0)
    bases = {"llama": save_base(root / "llama", llama), "phi3": save_base(root / "phi3", tiny_phi3_from_llama(llama))}
    out = {}
    for feature, (config, model, opts) in ADAPTERS.items():
        out[feature] = make_adapter(root / feature, config(), model=model() if model else None, edit=opts.get("edit"))
    return root, bases, out


def test_every_rule_has_an_adapter():
    assert {f for _, f in RULES} <= set(ADAPTERS)


@pytest.mark.parametrize("target, feature", RULES, ids=[f"{t}.{f}" for t, f in RULES])
def test_rule(target, feature, made, tmp_path):
    _, bases, adapters = made
    src = adapters[feature]
    _, model, opts = ADAPTERS[feature]
    rule = TARGETS[target].rule(feature)
    base = str(bases[opts["base"]]) if "base" in opts else None
    max_rank = opts.get("max_rank") if target in ("vllm",) or feature == "rank" else None
    if target == "vllm" and feature == "fused_names":
        max_rank = 16
    report = check(src, base=base, target=target, max_rank=max_rank)
    finding = next((f for f in report.findings if f.rule == rule.id), None)
    assert finding is not None and finding.verdict == rule.verdict, report.frame()
    if rule.verdict == "accepted":
        assert not finding.blocking
        return
    assert not report.ok
    if target == "diffusers":  # diffusers files hold pipeline components: the export itself is tested on a pipeline
        return
    kw = {"base": base, "max_rank": max_rank}
    if rule.verdict == "refused":
        with pytest.raises(UnsupportedError, match="--drop"):
            export(src, tmp_path / "refused", target=target, **kw)
        assert not (tmp_path / "refused").exists()
        if "drop" not in opts:
            return  # a config-level feature (PiSSA init, aLoRA): nothing to drop
        kw["drop"] = opts["drop"]
    if rule.verdict == "lossy":
        with pytest.raises(UnsupportedError, match=f"--lossy {opts['lossy']}"):
            export(src, tmp_path / "refused", target=target, **kw)
        kw["lossy"] = opts["lossy"]
    result = export(src, tmp_path / "out", target=target, **kw)
    assert result.check.ok and check(tmp_path / "out", base=base, target=target, max_rank=max_rank).ok
    if rule.verdict == "exact" and feature != "fused_names" and model is None:
        assert weight_error(ak.load(src), ak.load(tmp_path / "out"), make_tiny_llama(0)) <= 1e-6
    if rule.verdict == "lossy":
        assert any(not r.exact for r in result.fixes)
