"""``adaptkit check`` / ``export``: for every rule of the vLLM and SGLang tables an adapter made by the real peft
breaks it, ``check`` names it (exit 1), ``export`` fixes it (exact fixes: effective weights within 1e-6, lossy ones:
the reported per-layer error is the measured one) and the exported adapter loads in peft with the same logits."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch

import adaptkit as ak
from adaptkit.deploy import TARGETS, check, export
from adaptkit.deploy.features import FEATURES
from adaptkit.errors import (
    AdaptkitError,
    ConfigError,
    OutputExistsError,
    UnsupportedError,
)
from tests.conftest import make_tiny_llama, run_cli, tiny_llama_config
from tests.deploy_util import (
    effective,
    make_adapter,
    peft_logits,
    rel,
    save_base,
    tiny_phi3_from_llama,
    weight_error,
)

peft = pytest.importorskip("peft")
LoraConfig = peft.LoraConfig

QV = ["q_proj", "v_proj"]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return save_base(tmp_path_factory.mktemp("base") / "llama")


def lora(**kw):
    kw.setdefault("r", 8)
    kw.setdefault("lora_alpha", 16)
    kw.setdefault("target_modules", QV)
    return LoraConfig(**kw)


def _zero_first_b(pm):
    with torch.no_grad():
        pm.base_model.model.model.layers[0].self_attn.q_proj.lora_B["default"].weight.zero_()


#: exact rules: (case, peft config, target, rule, export options)
EXACT = {
    "rslora": (lambda: lora(use_rslora=True), "vllm", "vllm.rslora", {}),
    "alpha_pattern": (lambda: lora(alpha_pattern={"v_proj": 3}), "vllm", "vllm.alpha_pattern", {}),
    "rank_pattern": (lambda: lora(rank_pattern={"v_proj": 4}), "vllm", "vllm.rank_pattern", {}),
    "all_patterns_sglang": (lambda: lora(use_rslora=True, rank_pattern={"v_proj": 4}, alpha_pattern={"q_proj": 5}),
                            "sglang", "sglang.rank_pattern", {}),
    "trainable_tokens": (lambda: lora(trainable_token_indices={"embed_tokens": [1, 5, 7]}), "vllm",
                         "vllm.trainable_tokens", {"base": True}),
    "ia3": (lambda: peft.IA3Config(target_modules=["q_proj", "down_proj"], feedforward_modules=["down_proj"]), "vllm",
            "vllm.base_dependent", {"base": True, "max_rank": 64}),
    "loha": (lambda: peft.LoHaConfig(r=3, alpha=6, target_modules=QV), "vllm", "vllm.other_kinds", {}),
    "lokr": (lambda: peft.LoKrConfig(r=2, alpha=4, target_modules=QV), "sglang", "sglang.other_kinds", {}),
    "regex_targets": (lambda: lora(target_modules=r".*\.(q_proj|v_proj)$"), "sglang", "sglang.target_names", {}),
    "zero_layer": (lambda: lora(), "vllm", "vllm.zero_layers", {"edit": _zero_first_b}),
}


def _export(src, out, target, base_dir, opts):
    kw = {k: v for k, v in opts.items() if k not in ("base", "edit")}
    return export(src, out, target=target, base=str(base_dir) if opts.get("base") else None, **kw)


@pytest.mark.parametrize("case", sorted(EXACT))
def test_exact_rule_is_found_fixed_and_loads_in_peft(case, base, tmp_path):
    make_config, target, rule, opts = EXACT[case]
    src = make_adapter(tmp_path / "a", make_config(), edit=opts.get("edit"))
    report = check(src, target=target, max_rank=opts.get("max_rank"))
    assert rule in [f.rule for f in report.findings] and not report.ok
    cli = run_cli("check", str(src), "--target", target, *(["--max-rank", str(opts["max_rank"])] if "max_rank" in opts
                                                          else []))
    assert cli.returncode == 1 and rule in cli.stdout
    result = _export(src, tmp_path / "out", target, base, opts)
    assert result.check.ok and all(r.exact for r in result.fixes)
    # the exported adapter passes the target's rules as read back from disk
    again = check(tmp_path / "out", target=target, max_rank=opts.get("max_rank"))
    assert again.ok, again.frame()
    # same effect: every adapted weight within 1e-6, and peft's logits unchanged
    model = make_tiny_llama(0)
    assert weight_error(ak.load(src), ak.load(tmp_path / "out"), model) <= 1e-6
    assert rel(peft_logits(src), peft_logits(tmp_path / "out")) <= 1e-5
    cfg = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    if target in ("vllm", "sglang"):  # one global r and alpha describe every layer
        assert cfg["peft_type"] == "LORA" and not cfg["rank_pattern"] and not cfg["alpha_pattern"]
        layers = ak.load(tmp_path / "out").layers.values()
        assert not cfg["use_rslora"] and {l.rank for l in layers} == {cfg["r"]}
        assert all(abs(l.scale - cfg["lora_alpha"] / cfg["r"]) < 1e-12 for l in layers)
    if target == "sglang":
        assert all("." not in t for t in cfg["target_modules"])


def test_trainable_tokens_become_an_embedding_lora_of_rank_k(base, tmp_path):
    src = make_adapter(tmp_path / "a", lora(trainable_token_indices={"embed_tokens": [1, 5, 7]}))
    result = export(src, tmp_path / "out", target="vllm", base=str(base))
    emb = ak.load(tmp_path / "out")["model.embed_tokens"]
    assert emb.module_type == "embedding" and emb.rank == 8  # 3 tokens, zero-padded to the adapter's rank 8
    row = next(r for r in result.fixes if r.fix == "through_base")
    assert row.rank_after == 3


def test_rank_is_zero_padded_to_a_bucket(tmp_path):
    src = make_adapter(tmp_path / "a", lora(r=5, lora_alpha=7))
    result = export(src, tmp_path / "out", target="vllm", pad_bucket=True)
    assert {l.rank for l in ak.load(tmp_path / "out").layers.values()} == {8}
    assert weight_error(ak.load(src), result.adapter, make_tiny_llama(0)) <= 1e-6


# ------------------------------------------------------------------------------------------ lossy rules

#: lossy rules: (case, peft config, target, rule, --lossy option, export options)
LOSSY = {
    "dora": (lambda: lora(use_dora=True), "vllm", "vllm.dora", "dora", {"base": True}),
    "bias": (lambda: lora(lora_bias=True), "vllm", "vllm.bias", "bias", {}),
    "rank": (lambda: lora(r=24, lora_alpha=24), "vllm", "vllm.rank", "rank", {}),
    "dora_sglang": (lambda: lora(use_dora=True), "sglang", "sglang.dora", "dora", {"base": True}),
}


@pytest.mark.parametrize("case", sorted(LOSSY))
def test_lossy_rule_needs_the_option_and_reports_the_measured_error(case, base, tmp_path):
    make_config, target, rule, option, opts = LOSSY[case]
    src = make_adapter(tmp_path / "a", make_config())
    report = check(src, target=target)
    finding = next(f for f in report.findings if f.rule == rule)
    assert finding.verdict == "lossy" and f"--lossy {option}" in finding.needs
    with pytest.raises(UnsupportedError, match=f"--lossy {option}"):
        _export(src, tmp_path / "refused", target, base, opts)
    assert not (tmp_path / "refused").exists()
    r = run_cli("export", str(src), "-o", str(tmp_path / "cli"), "--target", target)
    assert r.returncode == 1 and "--lossy" in r.stderr and not (tmp_path / "cli").exists()
    result = _export(src, tmp_path / "out", target, base, {**opts, "lossy": option})
    assert result.check.ok
    model = make_tiny_llama(0)
    if option != "bias":  # the tiny llama's linears have no bias to apply one to
        before, after = effective(ak.load(src), model), effective(ak.load(tmp_path / "out"), model)
    rows = {r.module: r for r in result.fixes if not r.exact}
    assert rows, "a lossy fix reports its layers"
    for path, row in rows.items():
        w = model.get_submodule(path).weight.detach().float()
        if option == "bias":  # the bias's share of the layer's change: compare on the outputs' own terms
            layer = ak.load(src)[path]
            db, dw = float(layer.delta_bias().norm()), layer.fro_norm()
            measured = db / math.hypot(db, dw)
        else:
            measured = float((after[path] - before[path]).double().norm() / (before[path] - w).double().norm())
        assert abs(row.rel_error - measured) <= 1e-4 * max(1.0, measured), (path, row.rel_error, measured)
        if option == "dora":  # the fold uses all the rank the runtime serves (vLLM's default limit 16)
            assert row.rank_after == (16 if target == "vllm" else row.rank_before), row
    assert check(tmp_path / "out", target=target).ok
    peft_logits(tmp_path / "out")  # loads in peft


def test_modules_to_save_folded_through_the_base(base, tmp_path):
    src = make_adapter(tmp_path / "a", lora(modules_to_save=["lm_head"]))
    finding = next(f for f in check(src, target="vllm").findings if f.rule == "vllm.modules_to_save")
    assert finding.where == ("lm_head.weight",) and "--base BASE" in finding.needs
    with pytest.raises(ConfigError, match="--base"):
        export(src, tmp_path / "nobase", target="vllm", lossy="modules_to_save")
    result = export(src, tmp_path / "out", target="vllm", base=str(base), lossy="modules_to_save", max_rank=64)
    row = next(r for r in result.fixes if r.fix == "fold_saved")
    saved = ak.load(src).extras["lm_head.weight"].float()
    w = make_tiny_llama(0).lm_head.weight.detach().float()
    new = effective(ak.load(tmp_path / "out"), make_tiny_llama(0))["lm_head"]
    assert abs(row.rel_error - rel(saved - w, new - saved + (saved - w))) <= 1e-4
    assert row.rank_after == 8 and 0 < row.rel_error < 1  # truncated to the adapter's rank 8 of a 32-rank change
    cfg = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert not cfg["modules_to_save"]


# --------------------------------------------------------------------------------------- refused rules


def test_moe_target_parameters_are_refused_unless_dropped(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.Qwen3MoeConfig(
        vocab_size=48, hidden_size=16, intermediate_size=24, moe_intermediate_size=12, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=8, num_experts=4, num_experts_per_tok=2,
        decoder_sparse_step=1, mlp_only_layers=[], norm_topk_prob=True)
    torch.manual_seed(0)
    moe = transformers.Qwen3MoeForCausalLM(cfg).eval()
    src = make_adapter(tmp_path / "a", LoraConfig(r=3, lora_alpha=6, target_modules=["q_proj"],
                                                  target_parameters=["mlp.experts.gate_up_proj"]), model=moe)
    report = check(src, target="vllm")
    finding = next(f for f in report.findings if f.rule == "vllm.target_parameters")
    assert finding.verdict == "refused" and all("experts" in p for p in finding.where)
    assert check(src, target="peft").ok
    with pytest.raises(UnsupportedError, match="--drop"):
        export(src, tmp_path / "out", target="vllm")
    result = export(src, tmp_path / "out", target="vllm", drop=["*experts*"])
    assert set(result.dropped) == set(finding.where) and set(result.adapter.layers) == {
        "model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"}
    meta = json.loads(ak.load(tmp_path / "out").metadata["adaptkit.export"])
    assert meta["dropped"] == sorted(finding.where)
    # the certificate lists what drop= removed, and its energy share is the share of the original that is written
    cert = result.certificate
    original = ak.load(src)
    energy = {p: layer.fro_norm() ** 2 for p, layer in original.layers.items()}
    assert sorted(c.path for c in cert.dropped) == sorted(finding.where) and not cert.missing
    kept = sum(energy[p] for p in result.adapter.layers)
    assert cert.energy_share == pytest.approx(kept / sum(energy.values()), rel=1e-9) and cert.energy_share < 1
    written = json.loads(ak.load(tmp_path / "out").metadata["adaptkit.coverage"])
    assert written["counts"]["dropped"] == len(finding.where)


def test_conv_and_unknown_module_names(tmp_path):
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, 3)
            self.fc1 = torch.nn.Linear(4, 4)

        def forward(self, x):
            return self.fc1(self.conv(x).mean((2, 3)))

    torch.manual_seed(0)
    src = make_adapter(tmp_path / "a", LoraConfig(r=2, lora_alpha=2, target_modules=["conv", "fc1"]), model=Net())
    assert "vllm.module_type" in [f.rule for f in check(src, target="vllm").findings]
    names = next(f for f in check(src, target="sglang").findings if f.rule == "sglang.module_names")
    assert names.where == ("conv", "fc1") and names.verdict == "refused"
    assert check(src, target="diffusers").findings == () or all(not f.blocking for f in check(src, target="diffusers")
                                                                  .findings if f.feature == "module_type")
    r = run_cli("export", str(src), "-o", str(tmp_path / "out"), "--target", "sglang")
    assert r.returncode == 1 and "--drop" in r.stderr and not (tmp_path / "out").exists()


def test_pissa_init_is_refused(tmp_path):
    src = make_adapter(tmp_path / "a", lora(init_lora_weights="pissa"))
    finding = next(f for f in check(src, target="vllm").findings if f.rule == "vllm.init_weights")
    assert finding.verdict == "refused" and "pissa->lora" in finding.message


# ------------------------------------------------------------------------------------ fused projections


def test_split_projections_are_fused_exactly_for_a_packed_base(tmp_path):
    llama = make_tiny_llama(0)
    phi = tiny_phi3_from_llama(llama)
    save_base(tmp_path / "phi3", phi)
    src = make_adapter(tmp_path / "a", lora(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj",
                                                                              "gate_proj", "up_proj", "o_proj"]),
                       model=llama)
    report = check(src, base=str(tmp_path / "phi3"), target="vllm")
    finding = next(f for f in report.findings if f.rule == "vllm.fused_names")
    assert len(finding.where) == 10 and "vllm.coverage" not in [f.rule for f in report.findings]
    result = export(src, tmp_path / "out", target="vllm", base=str(tmp_path / "phi3"), max_rank=16)
    fused = {r.module.rsplit(".", 1)[-1]: r.rank_after for r in result.fixes if r.fix == "fuse"}
    assert fused == {"qkv_proj": 12, "gate_up_proj": 8}  # rank = the sum of the members' ranks
    assert {l.rank for l in ak.load(tmp_path / "out").layers.values()} == {12}  # then one rank for vLLM
    assert result.certificate.complete
    assert rel(peft_logits(src, llama), peft_logits(tmp_path / "out", phi)) <= 1e-5


def test_packed_projections_are_split_exactly_for_a_split_base(base, tmp_path):
    llama = make_tiny_llama(0)
    phi = tiny_phi3_from_llama(llama)
    src = make_adapter(tmp_path / "a", lora(r=4, lora_alpha=8, target_modules=["qkv_proj", "gate_up_proj"]), model=phi)
    assert "vllm.fused_names" in [f.rule for f in check(src, base=str(base), target="vllm").findings]
    export(src, tmp_path / "out", target="vllm", base=str(base))
    out = ak.load(tmp_path / "out")
    assert {p.rsplit(".", 1)[-1] for p in out.layers} == {"q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"}
    assert rel(peft_logits(src, phi), peft_logits(tmp_path / "out", llama)) <= 1e-5


def test_only_q_and_v_fuse_with_a_zero_k_block(tmp_path):
    llama = make_tiny_llama(0)
    phi = tiny_phi3_from_llama(llama)
    save_base(tmp_path / "phi3", phi)
    src = make_adapter(tmp_path / "a", lora(r=4, lora_alpha=8), model=llama)
    export(src, tmp_path / "out", target="peft", base=str(tmp_path / "phi3"))
    assert rel(peft_logits(src, llama), peft_logits(tmp_path / "out", phi)) <= 1e-5


# ----------------------------------------------------------------------------------- coverage and outputs


def test_layers_that_land_nowhere_block_check_and_export(tmp_path):
    transformers = pytest.importorskip("transformers")
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64,
                                                                n_positions=16)).eval()
    save_base(tmp_path / "gpt2", gpt2)
    src = make_adapter(tmp_path / "a", lora())
    report = check(src, base=str(tmp_path / "gpt2"), target="peft")
    cov = next(f for f in report.findings if f.rule == "peft.coverage")
    assert len(cov.where) == 4 and not report.ok
    r = run_cli("check", str(src), "--base", str(tmp_path / "gpt2"), "--target", "peft", "--json")
    assert r.returncode == 1 and json.loads(r.stdout)["ok"] is False
    with pytest.raises(AdaptkitError):
        export(src, tmp_path / "out", target="peft", base=str(tmp_path / "gpt2"))
    assert not (tmp_path / "out").exists()


def test_export_writes_the_certificate_and_refuses_an_existing_output(base, tmp_path):
    src = make_adapter(tmp_path / "a", lora(use_rslora=True))
    r = run_cli("export", str(src), "-o", str(tmp_path / "out"), "--target", "vllm", "--base", str(base), "--json")
    assert r.returncode == 0, r.stderr
    payload = json.loads(r.stdout)
    assert payload["certificate"]["complete"] is True and payload["fixes"] == {"bake_scale": 4}
    meta = ak.load(tmp_path / "out").metadata
    assert json.loads(meta["adaptkit.export"])["fixes"] == ["bake_scale"]
    assert json.loads(meta["adaptkit.coverage"])["complete"] is True  # the certificate rides in the output
    with pytest.raises(OutputExistsError):
        export(src, tmp_path / "out", target="vllm")
    r = run_cli("export", str(src), "-o", str(tmp_path / "out"), "--target", "vllm")
    assert r.returncode == 1 and "exists" in r.stderr


@pytest.mark.parametrize("args, message", [
    (["--target", "tensorrt"], "unknown deploy target"),
    (["--target", "vllm", "--max-rank", "12"], "none of them"),
    (["--target", "vllm", "--lossy", "everything"], "not a lossy fix"),
    (["--target", "vllm", "--drop", "nothing.*"], "names no layer"),
])
def test_bad_options_are_one_line_errors(args, message, tmp_path):
    src = make_adapter(tmp_path / "a", lora())
    r = run_cli("export", str(src), "-o", str(tmp_path / "out"), *args)
    assert r.returncode == 1 and message in r.stderr and not (tmp_path / "out").exists()
    assert "Traceback" not in r.stderr


def test_a_clean_adapter_passes_every_target(tmp_path):
    src = make_adapter(tmp_path / "a", lora())
    for target in ("vllm", "sglang", "peft"):
        assert check(src, target=target).ok, target
    r = run_cli("check", str(src), "--target", "vllm")
    assert r.returncode == 0 and "verdict" in r.stdout


def test_every_rule_names_a_known_feature_and_fix():
    from adaptkit.deploy.fixes import FIXES

    for target in TARGETS.values():
        for rule in target.rules:
            assert rule.feature in FEATURES and rule.id == f"{target.name}.{rule.feature}"
            assert rule.fix is None or rule.fix in FIXES
            assert rule.source, rule.id
            if rule.fix is not None:
                assert FIXES[rule.fix].exact == (rule.verdict == "exact"), rule.id


def test_a_registered_target_is_one_row(tmp_path):
    from adaptkit.deploy import Rule, Target, register_target
    from adaptkit.deploy.targets import TARGETS as table

    toy = Target("toyrt", "ToyRT", "peft", (Rule("toyrt.rslora", "rslora", "exact", FEATURES["rslora"].detect,
                                                  "ToyRT ignores use_rslora", "bake_scale", "toyrt/loader.py"),))
    register_target(toy)
    try:
        src = make_adapter(tmp_path / "a", lora(use_rslora=True))
        assert [f.rule for f in check(src, target="toyrt").findings] == ["toyrt.rslora"]
        export(src, tmp_path / "out", target="toyrt")
        assert check(tmp_path / "out", target="toyrt").ok
        with pytest.raises(ConfigError, match="already registered"):
            register_target(copy.copy(toy))
    finally:
        table.pop("toyrt")


def test_trainable_tokens_of_a_tied_embedding_also_change_the_output_layer(tmp_path):
    tied = make_tiny_llama(0, tie_word_embeddings=True)
    base_dir = save_base(tmp_path / "base", tied)
    src = make_adapter(tmp_path / "a", lora(trainable_token_indices={"embed_tokens": [1, 5, 7]}), model=tied)
    result = export(src, tmp_path / "out", target="vllm", base=str(base_dir))
    assert "lm_head" in result.adapter.layers and result.certificate.complete
    assert rel(peft_logits(src, tied), peft_logits(tmp_path / "out", tied)) <= 1e-5


def test_a_classification_head_saved_whole_is_what_vllm_takes(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    clf = transformers.LlamaForSequenceClassification(tiny_llama_config(num_labels=3, pad_token_id=0)).eval()
    src = make_adapter(tmp_path / "a", lora(modules_to_save=["score"], task_type="SEQ_CLS"), model=clf)
    assert "vllm.modules_to_save" not in [f.rule for f in check(src, target="vllm").findings]
    export(src, tmp_path / "out", target="vllm")
    cfg = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert cfg["modules_to_save"] == ["score"] and "score.weight" in ak.load(tmp_path / "out").extras
