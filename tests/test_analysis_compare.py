"""Tests for adaptkit.comparison on adapters made with real peft: cosine, TIES sign conflicts, target overlap, suggestion."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
from peft import IA3Config, LoHaConfig, LoKrConfig, LoraConfig

import adaptkit as ak
from adaptkit.analysis.compare import compare_adapters, compare_layers, sign_conflict
from adaptkit.core.kinds import LoRA
from adaptkit.errors import ConfigError

from .conftest import make_tiny_llama
from .test_analysis import _no_dense, peft_adapter


def ref_conflict(a: np.ndarray, b: np.ndarray, density: float) -> tuple[float, int]:
    """TIES view from the definition: top-k by magnitude on each side, sign disagreement on the common positions;
    k = int(density * entries), the count a TIES merge keeps (peft's magnitude_based_pruning)."""
    k = int(density * a.size)
    both = set(np.argsort(-np.abs(a))[:k]) & set(np.argsort(-np.abs(b))[:k])
    if not both:
        return math.nan, 0
    idx = np.array(sorted(both))
    return float((np.sign(a[idx]) != np.sign(b[idx])).mean()), len(both)


def ref_cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def _lora(targets, **kw):
    return LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False, **kw)


def test_compare_two_peft_loras_against_dense(tmp_path):
    pa, da = peft_adapter(tmp_path, _lora(["q_proj", "v_proj"]), seed=1, name="math")
    pb, db = peft_adapter(tmp_path, _lora(["q_proj", "k_proj"]), seed=2, name="code")
    result = compare_adapters([pa, pb], density=0.3)
    assert result.names == ("math", "code")
    layers = result.layers.set_index("module")
    assert set(layers.index) == {"model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"}
    for module, row in layers.iterrows():
        a, b = da[module].flatten().numpy(), db[module].flatten().numpy()
        assert row["cosine"] == pytest.approx(ref_cosine(a, b), abs=1e-6)
        conflict, shared = ref_conflict(a, b, 0.3)
        assert row["sign_conflict"] == pytest.approx(conflict) and row["topk_shared"] == shared
        assert row["norm_a"] == pytest.approx(np.linalg.norm(a), rel=1e-5) and not row["sampled"]
    pair = result.pairs.iloc[0]
    assert (pair["shared_layers"], pair["only_a"], pair["only_b"]) == (2, 2, 2)
    assert pair["target_jaccard"] == pytest.approx(2 / 6)
    cat = lambda d: np.concatenate([d[m].flatten().numpy() for m in sorted(layers.index)])  # noqa: E731
    assert pair["cosine"] == pytest.approx(ref_cosine(cat(da), cat(db)), abs=1e-6)
    # independent random adapters: signs of the kept entries agree by chance only
    assert 0.3 < pair["sign_conflict"] < 0.7 and result.method == "ties"


def test_identical_opposite_and_disjoint_adapters(tmp_path):
    pa, _ = peft_adapter(tmp_path, _lora(["q_proj", "v_proj"]), seed=1, name="a")
    a = ak.load(pa)
    same = compare_adapters({"a": a, "a2": a})
    assert same.layers["cosine"].to_numpy() == pytest.approx(1.0)
    assert (same.layers["sign_conflict"] == 0).all() and same.method == "linear"
    assert same.layers["topk_overlap"].to_numpy() == pytest.approx(1.0)
    neg = a.replace(layers={k: dataclasses.replace(v, up=-v.up) for k, v in a.layers.items()})
    opposite = compare_adapters({"a": a, "neg": neg})
    assert opposite.layers["cosine"].to_numpy() == pytest.approx(-1.0)
    assert (opposite.layers["sign_conflict"] == 1).all() and opposite.method == "ties"
    pc, _ = peft_adapter(tmp_path, _lora(["o_proj"]), seed=2, name="c")
    disjoint = compare_adapters([pa, pc])
    assert disjoint.layers.empty and disjoint.method == "cat"
    assert disjoint.pairs.iloc[0]["target_jaccard"] == 0 and disjoint.pairs.iloc[0]["shared_layers"] == 0


def test_mixed_kinds_and_ia3(tmp_path):
    model = lambda: make_tiny_llama(0)  # noqa: E731
    pl, dl = peft_adapter(tmp_path, _lora(["q_proj"]), seed=1, model=model(), name="lora")
    ph, dh = peft_adapter(tmp_path, LoHaConfig(r=2, alpha=4, target_modules=["q_proj"], init_weights=False),
                          seed=2, model=model(), name="loha")
    pk, dk = peft_adapter(tmp_path, LoKrConfig(r=2, alpha=4, target_modules=["q_proj"], init_weights=False),
                          seed=3, model=model(), name="lokr")
    result = compare_adapters([pl, ph, pk], density=0.5)
    assert len(result.pairs) == 3 and len(result.layers) == 6
    deltas = {"lora": dl, "loha": dh, "lokr": dk}
    for row in result.layers.to_dict(orient="records"):
        a, b = deltas[row["a"]][row["module"]].flatten().numpy(), deltas[row["b"]][row["module"]].flatten().numpy()
        assert row["cosine"] == pytest.approx(ref_cosine(a, b), abs=1e-6), (row["a"], row["b"])
        assert row["sign_conflict"] == pytest.approx(ref_conflict(a, b, 0.5)[0])
    ia3 = IA3Config(target_modules=["k_proj", "q_proj"], feedforward_modules=[], init_ia3_weights=False)
    pi, _ = peft_adapter(tmp_path, ia3, seed=4, name="ia3")
    pj, _ = peft_adapter(tmp_path, ia3, seed=5, name="ia3b")
    res = compare_adapters([pi, pj, pl])
    rows = res.layers.set_index(["a", "b", "module"])
    va = ak.load(pi).layers["model.layers.0.self_attn.k_proj"].vector.double().numpy() - 1
    vb = ak.load(pj).layers["model.layers.0.self_attn.k_proj"].vector.double().numpy() - 1
    row = rows.loc[("ia3", "ia3b", "model.layers.0.self_attn.k_proj")]
    assert row["cosine"] == pytest.approx(ref_cosine(va, vb)) and "l - 1" in row["note"]
    mixed = rows.loc[("ia3", "lora", "model.layers.0.self_attn.q_proj")]
    assert math.isnan(mixed["cosine"]) and "not comparable" in mixed["note"]
    only_ia3 = compare_adapters([pi, pj])
    assert only_ia3.method == "linear" and "IA3" in only_ia3.reason


def test_sampled_sign_conflict_estimates_the_exact_rate():
    g = torch.Generator().manual_seed(0)
    up, down = torch.randn(1000, 6, generator=g), torch.randn(6, 1000, generator=g)
    a = LoRA(down=down, up=up, alpha=6, shape=(1000, 1000))
    b = LoRA(down=down + 3.0 * torch.randn(6, 1000, generator=g), up=up, alpha=6, shape=(1000, 1000))
    exact = compare_layers(a, b, density=0.2, max_entries=10**7)
    sampled = compare_layers(a, b, density=0.2, max_entries=150_000, seed=1)
    assert not exact["sampled"] and sampled["sampled"]
    assert 0.05 < exact["sign_conflict"] < 0.45  # correlated adapters: fewer conflicts than chance
    assert sampled["sign_conflict"] == pytest.approx(exact["sign_conflict"], abs=0.01)
    assert sampled["cosine"] == exact["cosine"]  # the cosine is always exact (low-rank inner products)
    ref, _ = ref_conflict(a.delta().flatten().numpy(), b.delta().flatten().numpy(), 0.2)
    assert exact["sign_conflict"] == pytest.approx(ref)


def test_compare_200k_layers_stays_lowrank(monkeypatch):
    m = n = 200_000
    g = torch.Generator().manual_seed(0)
    up, down = torch.randn(m, 8, generator=g), torch.randn(8, n, generator=g)
    other = torch.randn(8, n, generator=g)
    a = ak.Adapter(layers={"big": LoRA(down=down, up=up, alpha=8, shape=(m, n))})
    b = ak.Adapter(layers={"big": LoRA(down=down + other, up=up, alpha=8, shape=(m, n))})
    monkeypatch.setattr(LoRA, "delta_math", _no_dense)
    monkeypatch.setattr(LoRA, "delta", _no_dense)
    row = ak.compare({"a": a, "b": b}).iloc[0]
    ua, va = (t.double() for t in a.layers["big"].factors())
    ub, vb = (t.double() for t in b.layers["big"].factors())
    inner = torch.trace((ua.T @ ub) @ (vb @ va.T))
    norm = lambda u, v: torch.trace((u.T @ u) @ (v @ v.T)).sqrt()  # noqa: E731
    assert row["cosine"] == pytest.approx(float(inner / (norm(ua, va) * norm(ub, vb))), rel=1e-6)
    assert row["sampled"] and 0 < row["sign_conflict"] < 0.5


def test_compare_attrs_and_errors(tmp_path):
    pa, _ = peft_adapter(tmp_path, _lora(["q_proj"]), seed=1, name="x")
    df = ak.compare([pa, pa])
    assert df.attrs["suggestion"] == "linear" and df.attrs["pairs"][0]["a"] == "x#0"
    assert df.attrs["pairs"][0]["b"] == "x#1"  # duplicate names are made unique
    with pytest.raises(ConfigError, match="at least two"):
        ak.compare([pa])
    with pytest.raises(ConfigError, match="density"):
        ak.compare([pa, pa], density=0)
    assert sign_conflict(torch.zeros(10), torch.ones(10))[2] == 0  # an all-zero update keeps nothing
    g = torch.Generator().manual_seed(0)
    wide = ak.Adapter(layers={"m.0.q": LoRA(down=torch.randn(2, 10, generator=g), up=torch.randn(6, 2, generator=g),
                                            alpha=2, shape=(6, 10))})
    narrow = ak.Adapter(layers={"m.0.q": LoRA(down=torch.randn(2, 8, generator=g), up=torch.randn(6, 2, generator=g),
                                              alpha=2, shape=(6, 8))})
    other_base = compare_adapters({"wide": wide, "narrow": narrow})  # same module name, different base models
    assert "not comparable: shapes" in other_base.layers["note"].iloc[0]
    assert other_base.method == "none" and "same base model" in other_base.reason


def test_suggestion_is_a_method_that_merges_these_adapters(tmp_path):
    """Factor-wise ties/linear need one rank per layer: for rank 4 vs rank 8 the dense-delta variants are named."""
    pa, _ = peft_adapter(tmp_path, _lora(["q_proj", "v_proj"]), seed=1, name="r4")
    pb, _ = peft_adapter(tmp_path, LoraConfig(r=8, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                              init_lora_weights=False), seed=2, name="r8")
    a, b = ak.load(pa), ak.load(pb)
    neg = a.replace(layers={k: dataclasses.replace(v, up=-v.up) for k, v in a.layers.items()})
    conflicting = compare_adapters({"a": a, "neg": neg, "b": b})  # a vs neg: every sign conflicts
    suggested = {(r.a, r.b): r.suggested_method for r in conflicting.pairs.itertuples()}
    assert suggested[("a", "neg")] == "ties"  # same ranks: PEFT's factor-wise TIES
    assert suggested[("a", "b")] in {"ties_svd", "svd", "task_arithmetic"}  # ranks 4 and 8: never ties/linear
    assert conflicting.method == "ties_svd"  # strong conflict overall, mixed ranks
    mixed = compare_adapters({"a": a, "b": b})
    assert mixed.method in {"ties_svd", "svd", "task_arithmetic"} and mixed.method != "ties"
    with pytest.raises(ak.AdaptkitError, match="equal ranks"):
        ak.merge([a, b], method="ties", density=0.5)
    merged = ak.merge([a, b], method=mixed.method, density=0.5, rank=4)  # the suggestion works
    assert set(merged.layers) == set(a.layers)
    aligned = compare_adapters({"b": b, "b_again": b.replace(layers=dict(b.layers)), "a": a})
    assert aligned.pairs.iloc[0]["suggested_method"] == "linear"  # identical rank-8 adapters: factor-wise is fine
