"""Model Breadcrumbs and DELLA merges against dense float64 re-implementations of mergekit's sparsifiers."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from conftest import make_peft_adapter

import adaptkit as ak
from adaptkit.cli import main
from adaptkit.ops.merging import PROVENANCE_KEY, merge
from adaptkit.ops.merging.layerwise import layer_generator as _layer_generator
from adaptkit.ops.merging.primitives import outlier_prune, rank_magnitude_prune, uniform

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
FULL = 64  # at least min(shape) of every tiny-llama layer: the SVD output is lossless
TOL = 3e-6  # the merge works in float32 and ends with an SVD: ~1e-6 relative (measured worst 1.02e-6)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    """Three LoRA adapters of ranks 4 / 8 / 6 on every projection."""
    from peft import LoraConfig

    root = tmp_path_factory.mktemp("new_merges")
    cfgs = [LoraConfig(r=r, lora_alpha=a, target_modules=ALL, init_lora_weights=False) for r, a in ((4, 8), (8, 4), (6, 6))]
    return [ak.load(make_peft_adapter(root / f"l{i}", c, seed=40 + i)) for i, c in enumerate(cfgs)]


# --------------------------------------------------------------- references: mergekit's algorithm, dense float64


def ref_breadcrumbs(t: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """mergekit ``magnitude_outliers``: drop the int(gamma n) largest and the smallest, int(density n) remain."""
    n = t.numel()
    target = int(density * n)
    top = int(gamma * n)
    bottom = n - target - top
    if bottom < 0:
        top, bottom = top + bottom, 0
    order = torch.argsort(t.abs().reshape(-1), stable=True)
    mask = torch.zeros(n, dtype=t.dtype)
    mask[order[bottom:n - top]] = 1
    return t * mask.view(t.shape)


def ref_della(t: torch.Tensor, density: float, epsilon: float, uniforms: torch.Tensor) -> torch.Tensor:
    """DELLA MagPrune: keep p = density - eps + 2 eps * (rank - min) / (max - min) per row, rescale by 1/p."""
    ranks = torch.argsort(torch.argsort(t.abs(), dim=1, stable=True), dim=1).double() + 1
    lo, hi = ranks.min(dim=1, keepdim=True).values, ranks.max(dim=1, keepdim=True).values
    p = density - epsilon + (ranks - lo) / (hi - lo) * 2 * epsilon
    return torch.where(uniforms.double() < p, t / p, 0.0)


def ref_ties(ts: list[torch.Tensor], w: list[float]) -> torch.Tensor:
    """The consensus part of adaptkit's TIES (PEFT's): sign of the sum of the pruned tensors, disjoint mean."""
    sign = torch.where(sum(ts) >= 0, 1.0, -1.0).double()
    agree = [(x * sign > 0) for x in ts]
    num = sum(wi * x * a for wi, x, a in zip(w, ts, agree))
    return num / torch.stack(agree).sum(0).clamp(min=1)


def reference(adapters, weights, method, density, seed=None, gamma=0.01, epsilon=0.1):
    out = {}
    for path in adapters[0].layers:
        ds = [a.layers[path].delta().double() for a in adapters]
        if method.startswith("breadcrumbs"):
            pruned = [ref_breadcrumbs(d, density, gamma) for d in ds]
        else:
            gen = _layer_generator(seed, path)  # the merge's per-layer generator: one uniform per entry, input order
            pruned = [ref_della(d, density, epsilon, uniform(d.shape, torch.float32, gen).double()) for d in ds]
        ties = method in ("breadcrumbs_ties", "della")
        out[path] = ref_ties(pruned, weights) if ties else sum(w * x for w, x in zip(weights, pruned))
    return out


@pytest.mark.parametrize("method,kw", [
    ("breadcrumbs", {"density": 0.3, "gamma": 0.05}),
    ("breadcrumbs", {"density": 0.97, "gamma": 0.1}),  # density + gamma > 1: fewer outliers dropped
    ("breadcrumbs_ties", {"density": 0.4, "gamma": 0.02}),
    ("della", {"density": 0.5, "epsilon": 0.2, "seed": 3}),
    ("della_linear", {"density": 0.3, "epsilon": 0.1, "seed": 4}),
])
def test_merged_delta_equals_dense_reference(adapters, method, kw):
    weights = [0.8, -0.5, 1.3]
    got = merge(adapters, weights, method=method, rank=FULL, **kw)
    ref = reference(adapters, weights, method, kw["density"], kw.get("seed"), kw.get("gamma", 0.01),
                    kw.get("epsilon", 0.1))
    assert set(got.layers) == set(ref)
    worst = max(rel(got.layers[p].delta(), d) for p, d in ref.items())
    # the merge computes in float32 (deltas, pruning, SVD); measured worst 1.0e-6 over these cases
    assert worst < TOL, worst


def test_primitives_on_a_small_matrix():
    torch.manual_seed(0)
    t = torch.randn(7, 11, dtype=torch.float64)
    for density, gamma in ((0.5, 0.1), (0.9, 0.2), (0.2, 0.0), (1.0, 0.3)):
        kept = outlier_prune(t, density, gamma)
        assert torch.equal(kept, ref_breadcrumbs(t, density, gamma) if density < 1 else t)
        if density < 1:
            assert int((kept != 0).sum()) == int(density * t.numel())
    u = torch.rand(t.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    got = rank_magnitude_prune(t, 0.4, 0.15, torch.Generator().manual_seed(5))
    assert torch.allclose(got, ref_della(t, 0.4, 0.15, u), rtol=1e-12, atol=0)
    v = torch.randn(13, dtype=torch.float64)  # 1-D: one row
    got = rank_magnitude_prune(v, 0.4, 0.15, torch.Generator().manual_seed(1))
    u = torch.rand(v.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    assert torch.allclose(got, ref_della(v[None], 0.4, 0.15, u[None])[0], rtol=1e-12, atol=0)


@pytest.mark.parametrize("method,kw", [("breadcrumbs", {"gamma": 0.0}), ("breadcrumbs_ties", {"gamma": 0.0}),
                                       ("della", {"seed": 1}), ("della_linear", {"seed": 1})])
def test_one_adapter_density_one_is_itself(adapters, method, kw):
    a = adapters[1]
    m = merge([a], method=method, density=1.0, rank=FULL, **kw)
    for p, layer in a.layers.items():
        assert rel(m.layers[p].delta(), layer.delta()) < TOL, p


@pytest.mark.parametrize("method", ["breadcrumbs", "breadcrumbs_ties"])
def test_permuted_inputs_and_weights_give_the_same_merge(adapters, method):
    w = [0.8, -0.5, 1.3]
    one = merge(adapters, w, method=method, density=0.3, gamma=0.05, rank=FULL)
    other = merge(adapters[::-1], w[::-1], method=method, density=0.3, gamma=0.05, rank=FULL)
    for p, layer in one.layers.items():
        assert rel(other.layers[p].delta(), layer.delta()) < TOL, p


def test_della_permutation_invariant_in_distribution_only(adapters):
    """DELLA draws in input order, so a permutation changes the draws; at density 1 nothing is drawn."""
    w = [0.8, -0.5, 1.3]
    one = merge(adapters, w, method="della", density=1.0, seed=2, rank=FULL)
    other = merge(adapters[::-1], w[::-1], method="della", density=1.0, seed=2, rank=FULL)
    for p, layer in one.layers.items():
        assert rel(other.layers[p].delta(), layer.delta()) < TOL, p


def test_weights_one_zero_give_the_first(adapters):
    first = adapters[0]
    m = merge([first, adapters[2]], [1.0, 0.0], method="breadcrumbs", density=1.0, rank=FULL)
    for p, layer in first.layers.items():
        assert rel(m.layers[p].delta(), layer.delta()) < TOL, p
    # DELLA linear: the first input draws first, so [1, 0] is the first adapter's own DELLA merge
    both = merge([first, adapters[2]], [1.0, 0.0], method="della_linear", density=0.4, epsilon=0.2, seed=9, rank=FULL)
    alone = merge([first], method="della_linear", density=0.4, epsilon=0.2, seed=9, rank=FULL)
    for p, layer in alone.layers.items():
        assert rel(both.layers[p].delta(), layer.delta()) < TOL, p


def test_seed_reproducible_and_recorded(adapters):
    kw = {"method": "della", "density": 0.5, "rank": 8}
    a, b = merge(adapters, seed=11, **kw), merge(adapters, seed=11, **kw)
    c = merge(adapters, seed=12, **kw)
    p = "model.layers.0.self_attn.q_proj"
    assert torch.equal(a.layers[p].delta(), b.layers[p].delta())
    assert rel(c.layers[p].delta(), a.layers[p].delta()) > 1e-3
    prov = json.loads(a.metadata[PROVENANCE_KEY])
    assert prov["seed"] == 11 and prov["epsilon"] == 0.1 and prov["method"] == "della"
    assert merge(adapters, method="breadcrumbs", density=0.5, rank=4).layers[p].rank == 4


@pytest.mark.parametrize("kw,message", [
    ({"method": "della", "density": 0.5, "epsilon": 0.6}, "epsilon"),
    ({"method": "della", "density": 0.5, "gamma": 0.1}, "gamma does not apply"),
    ({"method": "breadcrumbs", "density": 0.5, "epsilon": 0.1}, "epsilon does not apply"),
    ({"method": "breadcrumbs", "density": 0.5, "gamma": 1.5}, "gamma"),
    ({"method": "breadcrumbs"}, "needs density"),
    ({"method": "ties_svd", "density": 0.5, "gamma": 0.1}, "gamma does not apply"),
])
def test_bad_parameters_refused(adapters, kw, message):
    with pytest.raises(ak.AdaptkitError, match=message):
        merge(adapters, **kw)


def test_cli_new_methods(adapters, tmp_path):
    srcs = [str(a.source) for a in adapters]
    out = tmp_path / "out"
    res = CliRunner().invoke(main, ["merge", *srcs, "-o", str(out), "--method", "della", "--density", "0.5",
                                    "--epsilon", "0.2", "--seed", "5", "--rank", "6"])
    assert res.exit_code == 0, res.output
    expected = merge(adapters, method="della", density=0.5, epsilon=0.2, seed=5, rank=6)
    got = ak.load(out)
    for p, layer in expected.layers.items():
        torch.testing.assert_close(got.layers[p].delta(), layer.delta())
    bad = CliRunner().invoke(main, ["merge", *srcs, "-o", str(tmp_path / "never"), "--method", "breadcrumbs",
                                    "--density", "0.5", "--gamma", "2"])
    lines = [line for line in bad.output.splitlines() if line.strip()]
    assert bad.exit_code == 1 and len(lines) == 1 and "gamma" in lines[0] and not (tmp_path / "never").exists()
    help_text = CliRunner().invoke(main, ["merge", "--help"]).output
    for name in ("breadcrumbs", "breadcrumbs_ties", "della", "della_linear", "--gamma", "--epsilon"):
        assert name in help_text
