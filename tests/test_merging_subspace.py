"""KnOTS, TSV-M, Iso-C / Iso-CTS and core-space merging against float64 dense implementations written here from the
papers (small shapes), plus their properties: one adapter in gives itself, input order does not matter, weights
[1, 0] give the first (core_linear), core space equals full space for the linear case, mixed ranks and kinds."""

from __future__ import annotations

import pytest
import torch

import adaptkit as ak
from adaptkit.core.kinds import LoHa, LoRA

M, N = 10, 12


def lora(seed: int, r: int = 4, alpha: float | None = None) -> ak.Adapter:
    g = torch.Generator().manual_seed(seed)
    layer = LoRA(down=torch.randn(r, N, generator=g), up=torch.randn(M, r, generator=g), alpha=float(alpha or r),
                 shape=(M, N))
    return ak.Adapter(layers={"m.q": layer})


def dw(adapter: ak.Adapter) -> torch.Tensor:
    """The delta in float64 (from float64 factors: a float32 product would add rank-filling noise at 1e-7)."""
    f = adapter.layers["m.q"].factors(torch.float64)
    return f[0] @ f[1] if f is not None else adapter.layers["m.q"].delta_math().double()


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def nrank(s: torch.Tensor, shape: tuple[int, int]) -> int:
    return int((s > s.max() * max(shape) * torch.finfo(torch.float64).eps).sum())


# ------------------------------------------------------------------ dense references (float64)


def ref_ties(tensors: list[torch.Tensor], weights: list[float], density: float) -> torch.Tensor:
    """TIES as PEFT's merge_utils.ties: magnitude prune each (top density of entries), elect the sign by the total,
    weigh, disjoint mean over the entries that agree with the elected sign."""
    pruned = []
    for t in tensors:
        k = int(density * t.numel())
        keep = torch.zeros(t.numel(), dtype=torch.bool)
        keep[t.abs().flatten().topk(k).indices] = True
        pruned.append(t * keep.reshape(t.shape))
    stack = torch.stack(pruned)
    sign = torch.sign(stack.sum(0))
    mask = torch.sign(stack) == sign
    weighted = stack * torch.tensor(weights, dtype=stack.dtype).reshape(-1, 1, 1)
    return (weighted * mask).sum(0) / mask.sum(0).clamp(min=1)


def ref_knots(deltas, weights, density):
    c = torch.cat(deltas, dim=1)
    u, s, vh = torch.linalg.svd(c, full_matrices=False)
    k = nrank(s, tuple(c.shape))
    n = deltas[0].shape[1]
    vs = [vh[:k, i * n:(i + 1) * n] for i in range(len(deltas))]
    return u[:, :k] @ torch.diag(s[:k]) @ ref_ties(vs, weights, density)


def _orth(x):
    p, _, qh = torch.linalg.svd(x, full_matrices=False)
    return p @ qh


def ref_tsv(deltas, weights, keep):
    us, ss, vs = [], [], []
    for d, w in zip(deltas, weights):
        u, s, vh = torch.linalg.svd(d, full_matrices=False)
        k = min(nrank(s, tuple(d.shape)), max(1, int(keep * min(d.shape))))
        us.append(u[:, :k])
        ss.append(w * s[:k])
        vs.append(vh[:k])
    return _orth(torch.cat(us, 1)) @ torch.diag(torch.cat(ss)) @ _orth(torch.cat(vs, 0).T).T


def ref_iso_c(deltas, weights):
    total = sum(w * d for d, w in zip(deltas, weights))
    u, s, vh = torch.linalg.svd(total, full_matrices=False)
    k = nrank(s, tuple(total.shape))
    return s[:k].mean() * u[:, :k] @ vh[:k]


def ref_iso_cts(deltas, weights, common):
    """fusion_bench's / the authors' iso_cts with the sum's rank in place of min(m, n)."""
    total = sum(w * d for d, w in zip(deltas, weights))
    u, s, vh = torch.linalg.svd(total, full_matrices=False)
    r = nrank(s, tuple(total.shape))
    k = int(r * common)
    per = round((r - k) / len(deltas))
    k = r - per * len(deltas)
    uc, sc, vc = u[:, :k], s[:k], vh[:k]
    us, ss, vs = [], [], []
    for d, w in zip(deltas, weights):
        proj = w * d - uc @ uc.T @ (w * d)
        pu, ps, pvh = torch.linalg.svd(proj, full_matrices=False)
        us.append(pu[:, :per])
        ss.append(ps[:per])
        vs.append(pvh[:per])
    big_u, big_v, spec = torch.cat([*us, uc], 1), torch.cat([*vs, vc], 0), torch.cat([*ss, sc])
    return spec.mean() * _orth(big_u) @ _orth(big_v.T).T


def ref_core(adapters, weights, density=None):
    ups = [a.layers["m.q"].factors(torch.float64)[0] for a in adapters]
    downs = [a.layers["m.q"].factors(torch.float64)[1] for a in adapters]
    ub = torch.linalg.svd(torch.cat(ups, 1), full_matrices=False)[0]
    va = torch.linalg.svd(torch.cat(downs, 0), full_matrices=False)[2]
    cores = [ub.T @ dw(a) @ va.T for a in adapters]
    merged = sum(w * c for c, w in zip(cores, weights)) if density is None else ref_ties(cores, weights, density)
    return ub @ merged @ va


# ------------------------------------------------------------------ against the references

ADAPTERS = [lora(1, 4, 8), lora(2, 3, 3), lora(3, 4, 2)]
WEIGHTS = [1.0, 0.7, 0.4]


@pytest.mark.parametrize("method,options,reference", [
    ("knots", {"density": 0.6}, lambda d, w: ref_knots(d, w, 0.6)),
    ("knots", {"density": 1.0}, lambda d, w: ref_knots(d, w, 1.0)),
    ("tsv", {}, lambda d, w: ref_tsv(d, w, 1 / 3)),
    ("tsv", {"keep": 0.2}, lambda d, w: ref_tsv(d, w, 0.2)),
    ("iso_c", {}, ref_iso_c),
    ("iso_cts", {}, lambda d, w: ref_iso_cts(d, w, 0.8)),
    ("iso_cts", {"common": 0.5}, lambda d, w: ref_iso_cts(d, w, 0.5)),
])
def test_merged_delta_equals_the_dense_algorithm(method, options, reference):
    got = ak.merge(ADAPTERS, weights=WEIGHTS, method=method, **options)
    want = reference([dw(a) for a in ADAPTERS], WEIGHTS)
    assert rel(dw(got), want) <= 1e-6


@pytest.mark.parametrize("method,density", [("core_linear", None), ("core_ties", 0.5), ("core_ties", 1.0)])
def test_core_space_equals_the_dense_algorithm(method, density):
    got = ak.merge(ADAPTERS, weights=WEIGHTS, method=method, **({"density": density} if density else {}))
    assert rel(dw(got), ref_core(ADAPTERS, WEIGHTS, density)) <= 1e-6


def test_core_linear_is_exactly_task_arithmetic_in_full_space():
    full = sum(w * dw(a) for a, w in zip(ADAPTERS, WEIGHTS))
    got = ak.merge(ADAPTERS, weights=WEIGHTS, method="core_linear")
    assert rel(dw(got), full) <= 1e-6
    assert rel(dw(got), dw(ak.merge(ADAPTERS, weights=WEIGHTS, method="task_arithmetic"))) <= 1e-6


# ------------------------------------------------------------------ properties


@pytest.mark.parametrize("method,options", [("knots", {"density": 1.0}), ("tsv", {"keep": 1.0}), ("tsv", {}),
                                            ("core_ties", {"density": 1.0}), ("core_linear", {})])
def test_one_adapter_gives_itself(method, options):
    one = ADAPTERS[0]
    assert rel(dw(ak.merge([one], method=method, **options)), dw(one)) <= 1e-6


@pytest.mark.parametrize("method,options", [("knots", {"density": 0.6}), ("tsv", {}), ("iso_c", {}),
                                            ("iso_cts", {}), ("core_ties", {"density": 0.5}), ("core_linear", {})])
def test_input_order_does_not_matter(method, options):
    a = ak.merge(ADAPTERS, weights=WEIGHTS, method=method, **options)
    b = ak.merge(ADAPTERS[::-1], weights=WEIGHTS[::-1], method=method, **options)
    assert rel(dw(b), dw(a)) <= 1e-6


def test_weights_one_zero_give_the_first_for_the_linear_core():
    got = ak.merge(ADAPTERS[:2], weights=[1, 0], method="core_linear")
    assert rel(dw(got), dw(ADAPTERS[0])) <= 1e-6


def test_iso_c_flattens_the_spectrum_of_the_sum():
    got = ak.merge(ADAPTERS, weights=WEIGHTS, method="iso_c")
    s = torch.linalg.svdvals(dw(got))
    k = nrank(s, (M, N))
    assert k == min(M, N) and float(s[:k].max() / s[:k].min()) < 1 + 1e-5  # rank 11 summed in 10 x 12


def test_rank_truncates_and_knots_dare_is_seeded():
    got = ak.merge(ADAPTERS, method="knots", density=0.6, rank=5)
    assert got.layers["m.q"].rank == 5
    a = ak.merge(ADAPTERS, method="knots_dare", density=0.5, seed=3)
    b = ak.merge(ADAPTERS, method="knots_dare", density=0.5, seed=3)
    c = ak.merge(ADAPTERS, method="knots_dare", density=0.5, seed=4)
    assert torch.equal(dw(a), dw(b)) and not torch.equal(dw(a), dw(c))


def test_mixed_kinds_through_their_exact_lora_form():
    g = torch.Generator().manual_seed(9)
    loha = ak.Adapter(layers={"m.q": LoHa(w1a=torch.randn(M, 2, generator=g), w1b=torch.randn(2, N, generator=g),
                                          w2a=torch.randn(M, 2, generator=g), w2b=torch.randn(2, N, generator=g),
                                          alpha=2.0, shape=(M, N))})
    got = ak.merge([ADAPTERS[0], loha], method="core_linear")
    assert rel(dw(got), dw(ADAPTERS[0]) + dw(loha)) <= 1e-6


def test_parameters_the_method_does_not_take_are_refused():
    with pytest.raises(ak.ConfigError, match="keep"):
        ak.merge(ADAPTERS, method="iso_c", keep=0.5)
    with pytest.raises(ak.ConfigError, match="density"):
        ak.merge(ADAPTERS, method="knots")
    with pytest.raises(ak.ConfigError, match="common"):
        ak.merge(ADAPTERS, method="tsv", common=0.5)


def test_cli_help_lists_every_method_with_its_summary_and_parameters():
    from adaptkit.ops.merging.catalog import METHODS

    from .conftest import run_cli

    res = run_cli("merge", "--help")
    assert res.returncode == 0
    text = " ".join(res.stdout.split())
    for m in METHODS.values():
        assert f"{m.name}: {' '.join(m.summary.split())}" in text, m.name
    assert "core_ties: core space: TIES on the small cores in the inputs' shared SVD bases [density, rank, " \
           "majority_sign]" in text


def test_cli_merges_with_a_new_method(tmp_path):
    from .conftest import run_cli

    for i, a in enumerate(ADAPTERS):
        ak.save(a, tmp_path / f"a{i}", format="peft")
    res = run_cli("merge", str(tmp_path / "a0"), str(tmp_path / "a1"), "-o", str(tmp_path / "m"), "--method", "iso_cts",
                  "--common", "0.5", "--json")
    assert res.returncode == 0, res.stderr
    got = ak.load(tmp_path / "m")
    assert rel(dw(got), ref_iso_cts([dw(a) for a in ADAPTERS[:2]], [1.0, 1.0], 0.5)) <= 1e-6


def test_tsv_keeps_every_component_of_loras_that_fit():
    """The authors keep int(min(m, n) / T) components per task: two rank-4 LoRAs in 20 x 24 with orthogonal spans keep
    all 8, and whitening orthogonal sets changes nothing, so TSV-M gives their exact sum."""
    q1, _ = torch.linalg.qr(torch.randn(20, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64))
    q2, _ = torch.linalg.qr(torch.randn(24, 8, generator=torch.Generator().manual_seed(2), dtype=torch.float64))
    ads = [ak.Adapter(layers={"m.q": LoRA(down=(q2[:, 4 * i:4 * i + 4].T * 2).float(), up=q1[:, 4 * i:4 * i + 4].float(),
                                          alpha=4.0, shape=(20, 24))}) for i in range(2)]
    got = ak.merge(ads, method="tsv")
    assert got.layers["m.q"].rank == 8
    assert rel(dw(got), dw(ads[0]) + dw(ads[1])) <= 1e-6
