"""Tests for adaptkit.analysis: every number against the dense dW that real peft builds, and the low-rank path.

The reference values are computed here independently, in float64 numpy/torch, from peft's own
``get_delta_weight`` of a live peft model; adaptkit reads the saved checkpoint and never sees that model.
"""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
import torch
from peft import IA3Config, LoHaConfig, LoKrConfig, LoraConfig, get_peft_model

import adaptkit as ak
from adaptkit.analysis import COLUMNS, analyze_adapter, energy_rank, layer_sparsity, module_depth, spectrum_stats
from adaptkit.kinds import LoRA

from .conftest import make_tiny_llama

CONFIGS = {
    "lora_pattern": lambda: LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                                       rank_pattern={"down_proj": 6}, init_lora_weights=False),
    "rslora_embedding": lambda: LoraConfig(r=8, lora_alpha=4, target_modules=["embed_tokens", "o_proj"],
                                           use_rslora=True, init_lora_weights=False),
    "dora": lambda: LoraConfig(r=4, lora_alpha=6, target_modules=["q_proj", "down_proj"], use_dora=True,
                               init_lora_weights=False),
    "loha": lambda: LoHaConfig(r=4, alpha=6, target_modules=["q_proj", "up_proj"], init_weights=False),
    "lokr": lambda: LoKrConfig(r=4, alpha=6, target_modules=["q_proj", "up_proj"], init_weights=False),
    "lokr_decomposed": lambda: LoKrConfig(r=2, alpha=3, target_modules=["q_proj", "up_proj"], decompose_both=True,
                                          decompose_factor=4, init_weights=False),
}
EXPECTED_METHOD = {"lora_pattern": "lowrank", "rslora_embedding": "lowrank", "dora": "lowrank", "loha": "lowrank",
                   "lokr": "kron", "lokr_decomposed": "kron"}


def peft_adapter(tmp_path, config, seed=0, model=None, name="a"):
    """Save a peft adapter; return its path and {module path: dense float64 dW from peft's get_delta_weight}."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    base = model if model is not None else make_tiny_llama(0)
    torch.manual_seed(seed)  # after building the base model, which seeds on its own
    pm = get_peft_model(base, config)
    pm.save_pretrained(str(tmp_path / name))
    deltas = {}
    for full, module in pm.named_modules():
        if isinstance(module, BaseTunerLayer) and hasattr(module, "get_delta_weight"):
            with torch.no_grad():
                deltas[full.removeprefix("base_model.model.")] = module.get_delta_weight("default").double()
    return tmp_path / name, deltas


def reference(delta: torch.Tensor) -> dict:
    """Dense statistics of one dW, straight from the definitions."""
    d = delta.reshape(delta.shape[0], -1).numpy()
    s = np.linalg.svd(d, compute_uv=False)
    fro = float(np.sqrt((d**2).sum()))
    p = s[s > 0] / s.sum()
    cum = np.cumsum(s**2) / (s**2).sum()
    return {"fro_norm": fro, "spectral_norm": float(s[0]), "stable_rank": fro**2 / s[0] ** 2,
            "effective_rank": float(np.exp(-(p * np.log(p)).sum())), "rank_90": int(np.argmax(cum >= 0.9) + 1),
            "rank_99": int(np.argmax(cum >= 0.99) + 1), "sparsity": float((d == 0).mean())}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_analyze_matches_dense_peft_delta(tmp_path, name):
    path, deltas = peft_adapter(tmp_path, CONFIGS[name]())
    table = ak.analyze(path)
    assert list(table.columns) == list(COLUMNS)
    assert set(table["module"]) == set(deltas)
    refs = {m: reference(d) for m, d in deltas.items()}
    total = sum(r["fro_norm"] ** 2 for r in refs.values())
    for row in table.to_dict(orient="records"):
        ref = refs[row["module"]]
        for key in ("fro_norm", "spectral_norm", "stable_rank", "effective_rank"):
            assert row[key] == pytest.approx(ref[key], rel=1e-4), (row["module"], key)
        assert (row["rank_90"], row["rank_99"]) == (ref["rank_90"], ref["rank_99"]), row["module"]
        assert row["energy_share"] == pytest.approx(ref["fro_norm"] ** 2 / total, rel=1e-4)
        assert row["sparsity"] == ref["sparsity"]
        assert row["method"] == EXPECTED_METHOD[name] and row["finite"]
        assert 1 <= row["rank_90"] <= row["rank_99"] <= min(deltas[row["module"]].shape)
    assert table["energy_share"].sum() == pytest.approx(1.0)
    if name == "dora":
        assert table["dora"].all() and table["note"].str.contains("DoRA").all()


def test_analyze_conv_lora_and_tucker_loha(tmp_path):
    class ConvNet(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.c1 = torch.nn.Conv2d(3, 8, 3, padding=1)
            self.c2 = torch.nn.Conv2d(8, 6, 1)

        def forward(self, x):
            return self.c2(self.c1(x))

    for i, (config, methods) in enumerate([
        (LoraConfig(r=2, lora_alpha=4, target_modules=["c1", "c2"], init_lora_weights=False), {"lowrank"}),
        (LoHaConfig(r=2, alpha=4, target_modules=["c1", "c2"], use_effective_conv2d=True, init_weights=False),
         {"dense", "lowrank"}),  # c1 (3x3) gets Tucker cores -> dense; c2 (1x1) has none -> low-rank
    ]):
        torch.manual_seed(0)
        path, deltas = peft_adapter(tmp_path, config, seed=3, model=ConvNet(), name=f"conv{i}")
        table = ak.analyze(path).set_index("module")
        assert set(table["method"]) == methods
        for module, delta in deltas.items():
            ref = reference(delta)
            for key in ("fro_norm", "spectral_norm", "effective_rank"):
                assert table.loc[module, key] == pytest.approx(ref[key], rel=1e-4), (i, module, key)
            assert table.loc[module, "rank_99"] == ref["rank_99"]


def test_ia3_rows_carry_vector_statistics(tmp_path):
    config = IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"], init_ia3_weights=False)
    path, _ = peft_adapter(tmp_path, config)
    adapter = ak.load(path)
    table = ak.analyze(adapter)
    assert (table["kind"] == "ia3").all() and table["fro_norm"].isna().all() and table["energy_share"].isna().all()
    row = table.iloc[0]
    v = adapter.layers[row["module"]].vector.double()
    assert "no base-free dW" in row["note"] and f"{float(v.mean()):.4g}" in row["note"]
    assert table["rank"].isna().all()


def test_spectrum_stats_definitions():
    st = spectrum_stats(np.array([3.0, 4.0]))  # order does not matter
    assert st.fro_norm == pytest.approx(5.0) and st.spectral_norm == 4.0
    assert st.stable_rank == pytest.approx(25 / 16)
    p = np.array([3, 4]) / 7
    assert st.effective_rank == pytest.approx(math.exp(-(p * np.log(p)).sum()))
    assert (st.rank_90, st.rank_99) == (2, 2)
    assert energy_rank(np.array([10.0, 1.0, 0.1]), 0.9) == 1
    assert spectrum_stats(np.ones(5)).effective_rank == pytest.approx(5.0)
    zero = spectrum_stats(np.zeros(3))
    assert zero.fro_norm == 0 and zero.rank_90 == 0 and math.isnan(zero.effective_rank)
    assert module_depth("model.layers.12.mlp.up_proj") == 12 and module_depth("lm_head") is None


def test_sparsity_counts_structural_zeros_without_densifying():
    g = torch.Generator().manual_seed(0)
    up, down = torch.randn(20, 3, generator=g), torch.randn(3, 30, generator=g)
    up[[1, 5, 7]] = 0  # three dead output rows
    down[:, :6] = 0  # six dead input columns
    layer = LoRA(down=down, up=up, alpha=3, shape=(20, 30))
    dense = layer.delta()
    assert layer_sparsity(layer) == pytest.approx(float((dense == 0).double().mean()))
    assert layer_sparsity(layer) == pytest.approx(1 - (17 / 20) * (24 / 30))
    untrained = LoRA(down=down, up=torch.zeros(20, 3), alpha=3, shape=(20, 30))  # PEFT's default init: B = 0
    row = ak.analyze(ak.Adapter(layers={"m": untrained})).iloc[0]
    assert row["sparsity"] == 1.0 and row["fro_norm"] == 0 and row["rank_90"] == 0


def test_non_finite_layer_is_flagged_not_crashing():
    up = torch.ones(4, 2)
    up[0, 0] = float("nan")
    a = ak.Adapter(layers={"bad": LoRA(down=torch.ones(2, 5), up=up, alpha=2, shape=(4, 5)),
                           "good": LoRA(down=torch.ones(2, 5), up=torch.ones(4, 2), alpha=2, shape=(4, 5))})
    table = ak.analyze(a).set_index("module")
    assert not table.loc["bad", "finite"] and math.isnan(table.loc["bad", "fro_norm"])
    assert "non-finite" in table.loc["bad", "note"]
    assert table.loc["good", "energy_share"] == pytest.approx(1.0)


def _no_dense(*args, **kwargs):
    raise AssertionError("the dense delta of a LoRA layer was built")


def test_lowrank_path_on_200k_by_200k_rank8(monkeypatch):
    """dW would be 200k x 200k (160 GB in float32); the analysis must stay in the rank-8 space."""
    m = n = 200_000
    g = torch.Generator().manual_seed(0)
    layers = {}
    for i in range(2):
        up = torch.randn(m, 8, generator=g) * torch.logspace(0, -2, 8)  # a decaying spectrum
        layers[f"model.layers.{i}.mlp.big"] = LoRA(down=torch.randn(8, n, generator=g) / n**0.5, up=up, alpha=16,
                                                   shape=(m, n))
    adapter = ak.Adapter(layers=layers)
    monkeypatch.setattr(LoRA, "delta_math", _no_dense)
    monkeypatch.setattr(LoRA, "delta", _no_dense)
    start = time.perf_counter()
    result = analyze_adapter(adapter)
    elapsed = time.perf_counter() - start
    assert elapsed < 30, f"analysis of two 200k x 200k rank-8 layers took {elapsed:.1f} s"
    for path, layer in layers.items():
        row = result.table.set_index("module").loc[path]
        # independent reference: s^2 are the eigenvalues of L^T (V V^T) L with U^T U = L L^T
        u, v = (t.double() for t in layer.factors())
        chol = torch.linalg.cholesky(u.T @ u)
        s = torch.linalg.eigvalsh(chol.T @ (v @ v.T) @ chol).clamp_min(0).sqrt().flip(0).numpy()
        np.testing.assert_allclose(result.spectra[path], s, rtol=1e-6)
        assert row["spectral_norm"] == pytest.approx(s[0], rel=1e-6)
        assert row["fro_norm"] == pytest.approx(float(np.sqrt((s**2).sum())), rel=1e-6)
        assert row["method"] == "lowrank" and row["rank"] == 8 and row["sparsity"] == 0.0
        assert row["rank_90"] < 8  # the decaying spectrum is visible
