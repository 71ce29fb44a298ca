"""``adaptkit export`` across packed / split projections: a LoRA bias survives fusing into ``qkv_proj`` and splitting
back (and vLLM still asks for ``--lossy bias``), exact fix rows report the error they measure, DoRA folds against the
member's rows of a packed base weight, and an export whose last round of fixes succeeds is not "not converged"."""

from __future__ import annotations

import importlib

import pytest
import torch

import adaptkit as ak
from adaptkit.deploy import check, export
from adaptkit.deploy import fixes as fixes_module
from adaptkit.errors import UnsupportedError
from tests.conftest import make_tiny_llama
from tests.deploy_util import (
    make_adapter,
    peft_logits,
    rel,
    save_base,
    tiny_phi3_from_llama,
)

peft = pytest.importorskip("peft")
export_module = importlib.import_module("adaptkit.deploy.export")
QKV = ["q_proj", "k_proj", "v_proj"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("fused")
    llama = make_tiny_llama(0)
    phi = tiny_phi3_from_llama(llama)
    return llama, phi, save_base(root / "llama", llama), save_base(root / "phi3", phi)


def lora(**kw):
    kw.setdefault("r", 4)
    kw.setdefault("lora_alpha", 8)
    return peft.LoraConfig(**kw)


def _bias_layers(adapter) -> int:
    return sum(l.delta_bias() is not None and float(l.delta_bias().abs().max()) > 0 for l in adapter.layers.values())


def test_a_lora_bias_is_fused_into_qkv_proj(models, tmp_path):
    llama, phi, _, phi_dir = models
    src = make_adapter(tmp_path / "a", lora(target_modules=QKV, lora_bias=True), model=llama)
    assert _bias_layers(ak.load(src)) == 6
    result = export(src, tmp_path / "out", target="peft", base=str(phi_dir))
    out = ak.load(tmp_path / "out")
    assert {p.rsplit(".", 1)[-1] for p in out.layers} == {"qkv_proj"} and _bias_layers(out) == 2
    rows = [r for r in result.fixes if r.fix == "fuse"]
    assert len(rows) == 2 and all(0.0 <= r.rel_error <= 1e-6 for r in rows)
    assert rel(peft_logits(src, llama), peft_logits(tmp_path / "out", phi)) <= 1e-5


def test_a_partial_bias_group_fuses_with_zero_rows(models, tmp_path):
    llama, phi, _, phi_dir = models

    def zero_k_bias(pm):  # k_proj without a bias change: its rows of the fused bias are zeros
        with torch.no_grad():
            for layer in pm.base_model.model.model.layers:
                layer.self_attn.k_proj.lora_B["default"].bias.zero_()

    src = make_adapter(tmp_path / "a", lora(target_modules=["q_proj", "v_proj", "k_proj"], lora_bias=True),
                       model=llama, edit=zero_k_bias)
    export(src, tmp_path / "out", target="peft", base=str(phi_dir))
    assert rel(peft_logits(src, llama), peft_logits(tmp_path / "out", phi)) <= 1e-5


def test_a_packed_lora_bias_is_split_into_the_members(models, tmp_path):
    llama, phi, llama_dir, _ = models
    src = make_adapter(tmp_path / "a", lora(target_modules=["qkv_proj"], lora_bias=True), model=phi)
    result = export(src, tmp_path / "out", target="peft", base=str(llama_dir))
    out = ak.load(tmp_path / "out")
    assert _bias_layers(out) == 6
    rows = [r for r in result.fixes if r.fix == "split"]
    assert len(rows) == 6 and all(0.0 <= r.rel_error <= 1e-6 for r in rows)
    assert rel(peft_logits(src, phi), peft_logits(tmp_path / "out", llama)) <= 1e-5


def test_vllm_still_asks_for_lossy_bias_after_fusing(models, tmp_path):
    llama, _, _, phi_dir = models
    src = make_adapter(tmp_path / "a", lora(target_modules=QKV, lora_bias=True), model=llama)
    with pytest.raises(UnsupportedError, match="--lossy bias"):
        export(src, tmp_path / "refused", target="vllm", base=str(phi_dir))
    assert not (tmp_path / "refused").exists()
    result = export(src, tmp_path / "out", target="vllm", base=str(phi_dir), lossy=["bias"])
    dropped = [r for r in result.fixes if r.fix == "drop_bias"]
    assert [r.module.rsplit(".", 1)[-1] for r in dropped] == ["qkv_proj", "qkv_proj"]
    assert all(0 < r.rel_error < 1 for r in dropped) and _bias_layers(ak.load(tmp_path / "out")) == 0


@pytest.mark.parametrize("direction", ["fuse", "split"])
def test_exact_fused_rows_measure_their_error(models, tmp_path, monkeypatch, direction):
    """A broken fuse/split (here: every new ``B`` 1% too large) must report about 0.01, not a hard-coded 0."""
    llama, phi, llama_dir, phi_dir = models
    if direction == "fuse":
        src = make_adapter(tmp_path / "a", lora(target_modules=QKV), model=llama)
        base = phi_dir
    else:
        src = make_adapter(tmp_path / "a", lora(target_modules=["qkv_proj"]), model=phi)
        base = llama_dir
    real = fixes_module.LoRA.from_factors

    def broken(u, s, v, **kw):
        return real(u * 1.01, s, v, **kw)

    monkeypatch.setattr(fixes_module.LoRA, "from_factors", staticmethod(broken))
    result = export(src, tmp_path / "out", target="peft", base=str(base))
    rows = [r for r in result.fixes if r.fix == direction]
    assert rows and all(abs(r.rel_error - 0.01) < 1e-4 for r in rows)


def test_dora_folds_against_the_members_rows_of_a_packed_base(models, tmp_path):
    llama, phi, llama_dir, phi_dir = models
    src = make_adapter(tmp_path / "a", lora(target_modules=["q_proj", "v_proj"], use_dora=True), model=llama)
    report = check(src, base=str(phi_dir), target="vllm")
    assert {"vllm.dora", "vllm.fused_names"} <= {f.rule for f in report.findings}
    packed = export(src, tmp_path / "packed", target="vllm", base=str(phi_dir), lossy=["dora"], max_rank=64)
    apart = export(src, tmp_path / "apart", target="vllm", base=str(llama_dir), lossy=["dora"], max_rank=64)
    assert {r.fix for r in packed.fixes} >= {"fold_dora", "fuse"}
    for parent in sorted({p.rpartition(".")[0] for p in apart.adapter.layers}):
        want = torch.cat([apart.adapter.layers[f"{parent}.{m}"].delta().double() if f"{parent}.{m}" in
                          apart.adapter.layers else torch.zeros(16, 32, dtype=torch.float64) for m in QKV])
        got = packed.adapter.layers[f"{parent}.qkv_proj"].delta().double()
        assert float((got - want).norm() / want.norm()) <= 1e-6
    assert rel(peft_logits(tmp_path / "apart", llama), peft_logits(tmp_path / "packed", phi)) <= 1e-5


def test_an_export_fixed_in_its_last_round_converges(tmp_path, monkeypatch):
    src = make_adapter(tmp_path / "a", lora(target_modules=["q_proj", "v_proj"], use_rslora=True))
    monkeypatch.setattr(export_module, "MAX_ROUNDS", 1)  # one round fixes rsLoRA: the check after it is ok
    result = export(src, tmp_path / "out", target="vllm")
    assert result.check.ok and [r.fix for r in result.fixes] == ["bake_scale"] * len(result.fixes)


def test_a_packed_dora_layer_folds_against_the_stacked_projections(models, tmp_path):
    llama, phi, llama_dir, phi_dir = models
    src = make_adapter(tmp_path / "a", lora(target_modules=["qkv_proj"], use_dora=True), model=phi)
    apart = export(src, tmp_path / "apart", target="vllm", base=str(llama_dir), lossy=["dora"], max_rank=64)
    packed = export(src, tmp_path / "packed", target="vllm", base=str(phi_dir), lossy=["dora"], max_rank=64)
    assert {r.fix for r in apart.fixes} >= {"fold_dora", "split"}
    for path, layer in packed.adapter.layers.items():
        parent = path.rpartition(".")[0]
        got = torch.cat([apart.adapter.layers[f"{parent}.{m}"].delta().double() for m in QKV])
        want = layer.delta().double()
        assert float((got - want).norm() / want.norm()) <= 1e-6
    assert rel(peft_logits(src, phi), peft_logits(tmp_path / "apart", llama)) <= 1e-5
