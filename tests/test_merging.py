"""Merging: primitives against peft's merge_utils, exact low-rank SVD, properties, other kinds, errors, CLI."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from conftest import make_peft_adapter, make_tiny_llama

import adaptkit as ak
from adaptkit.cli import MERGE_METHODS, main
from adaptkit.core.linalg import dense_svd, lowrank_svd
from adaptkit.ops.merging import METHODS, PROVENANCE_KEY, merge
from adaptkit.ops.merging.methods import combine
from adaptkit.ops.merging.primitives import agrees, disjoint_mean, magnitude_prune, majority_sign, random_prune

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def deltas(adapter: ak.Adapter) -> dict[str, torch.Tensor]:
    return {p: layer.delta() for p, layer in adapter.layers.items()}


@pytest.fixture(scope="module")
def loras(tmp_path_factory):
    """Three LoRA adapters: ranks 4/8/8, alphas 8/16/4, different targets, the second rsLoRA."""
    from peft import LoraConfig

    root = tmp_path_factory.mktemp("loras")
    cfgs = [LoraConfig(r=4, lora_alpha=8, target_modules=ALL, init_lora_weights=False),
            LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], use_rslora=True, init_lora_weights=False),
            LoraConfig(r=8, lora_alpha=4, target_modules=ALL, init_lora_weights=False)]
    return [make_peft_adapter(root / f"l{i}", c, seed=20 + i) for i, c in enumerate(cfgs)]


@pytest.fixture(scope="module")
def adapters(loras):
    return [ak.load(d) for d in loras]


# ------------------------------------------------------------------------------------------ primitives


def test_primitives_equal_peft_merge_utils():
    from peft.utils import merge_utils as mu

    torch.manual_seed(0)
    ts = [torch.randn(24, 40) for _ in range(3)]
    weights = torch.tensor([1.0, -0.4, 0.6])
    for density in (0.0, 0.1, 0.37, 1.0):
        for t in ts:
            assert torch.equal(magnitude_prune(t, density), mu.prune(t, density, "magnitude"))
    stacked = torch.stack(ts)
    for method in ("total", "frequency"):
        positive = majority_sign(ts, method)
        mask = torch.stack([agrees(t, positive) for t in ts])
        assert torch.equal(mask, mu.calculate_majority_sign_mask(stacked, method))
        weighted = mu.reshape_weight_task_tensors(stacked, weights) * stacked
        assert torch.equal(disjoint_mean(ts, weights, positive), mu.disjoint_merge(weighted, mask))
        got = combine(list(ts), weights, METHODS["ties"], density=0.3, majority_sign_method=method)
        assert torch.equal(got, mu.ties(ts, weights, 0.3, method))
    got = combine(list(ts), weights, METHODS["magnitude_prune"], density=0.3)
    assert torch.equal(got, mu.magnitude_prune(ts, weights, 0.3))
    torch.testing.assert_close(combine(list(ts), weights, METHODS["linear"]), mu.task_arithmetic(ts, weights))


def test_magnitude_prune_ties_keep_exactly_k():
    t = torch.tensor([1.0, -1.0, 1.0, 0.5, -1.0, 2.0, 0.0, 1.0])  # many equal magnitudes at the threshold
    out = magnitude_prune(t, 0.5)
    assert int((out != 0).sum()) == 4 and out[5] == 2.0


@pytest.mark.parametrize("values", ["normal", "few_levels"])
def test_magnitude_prune_large_tensor_selects_exactly(values):
    """Tensors over 1M entries take the radix (float32) or bracketed selection path: the same result as peft's
    topk pruning, bit for bit, ties at the threshold included."""
    from peft.utils import merge_utils as mu

    torch.manual_seed(4)
    t = torch.randn(1200, 1000) if values == "normal" else torch.randint(-3, 4, (1200, 1000)).float()
    for density in (0.003, 0.2, 0.75):
        got = magnitude_prune(t, density)
        kept = got != 0
        assert int(kept.sum()) == min(int(density * t.numel()), int((t != 0).sum()))
        assert torch.equal(got, mu.prune(t, density, "magnitude"))
    big = t.repeat(4, 1)[:, :900]  # 4.3M entries: the sampled-bracket path
    assert torch.equal(magnitude_prune(big, 0.2), mu.prune(big, 0.2, "magnitude"))


@pytest.mark.parametrize("shape", [(40, 25), (64, 512), (1300, 1000), (2200, 2000)])
def test_ties_at_the_threshold_are_broken_exactly_as_peft(shape):
    """PEFT keeps the tied entries torch.topk returns (std::nth_element order on CPU: neither the first nor the
    last in index order); every selection path (kthvalue, radix, bracket) keeps exactly those, in place too."""
    from peft.utils import merge_utils as mu

    from adaptkit.ops.merging.primitives import magnitude_prune_, magnitude_prune_rows_

    g = torch.Generator().manual_seed(sum(shape))
    x = (torch.randint(-4, 5, shape, generator=g) * 0.25).float()  # nine levels: thousands of ties everywhere
    x[: shape[0] // 3] *= 1e-3  # and a second cluster of magnitudes
    for density in (0.1, 0.35):
        ref = mu.prune(x, density, "magnitude")
        k = int(density * x.numel())
        threshold = ref.abs().flatten().kthvalue(x.numel() - k + 1).values
        assert int((x.abs() == threshold).sum()) > 1 and int((x.abs() >= threshold).sum()) > k  # ties straddle
        assert torch.equal(magnitude_prune(x, density), ref)
        owned = x.clone()
        assert torch.equal(magnitude_prune_(owned, density), ref) and torch.equal(owned, ref)
        other = x.flip(0) * -0.5
        rows = magnitude_prune_rows_(torch.stack([x, other]), density)  # the factor-wise methods' stacked path
        assert torch.equal(rows[0], ref) and torch.equal(rows[1], mu.prune(other, density, "magnitude"))
    zeros = torch.zeros(shape)
    zeros.view(-1)[:: 7] = 1.0  # ties at 0 straddle the threshold: any choice keeps the same values
    assert torch.equal(magnitude_prune(zeros, 0.5), mu.prune(zeros, 0.5, "magnitude"))


def test_random_prune_draws_peft_bernoulli_mask():
    """The DARE mask is torch.bernoulli(full_like(t, density)) for the same generator state (PEFT's draw), in place
    too, and combine gives the same result whether it may overwrite its inputs or not."""
    from adaptkit.ops.merging.primitives import random_prune_

    t = torch.randn(700, 300)
    for density in (0.1, 0.5, 0.9):
        mask = torch.bernoulli(torch.full_like(t, density), generator=torch.Generator().manual_seed(3))
        ref = t * mask / density
        assert torch.equal(random_prune(t, density, generator=torch.Generator().manual_seed(3)), ref)
        assert torch.equal(random_prune_(t.clone(), density, generator=torch.Generator().manual_seed(3)), ref)
    ts = [torch.randn(300, 200) for _ in range(3)]
    for name in ("ties", "dare_ties", "dare_linear", "magnitude_prune", "linear"):
        for sign in ("total", "frequency"):
            args = (torch.tensor([1.0, -0.7, 0.3]), METHODS[name], 0.3, sign)
            ref = combine([t.clone() for t in ts], *args, generator=torch.Generator().manual_seed(1))
            got = combine([t.clone() for t in ts], *args, generator=torch.Generator().manual_seed(1), owned=True)
            assert torch.equal(got, ref), (name, sign)


def test_random_prune_density_rescale_and_generator():
    t = torch.randn(400, 300)
    g = torch.Generator().manual_seed(5)
    out = random_prune(t, 0.2, rescale=True, generator=g)
    kept = out != 0
    assert abs(kept.float().mean().item() - 0.2) < 0.01
    torch.testing.assert_close(out[kept], t[kept] / 0.2)
    again = random_prune(t, 0.2, rescale=True, generator=torch.Generator().manual_seed(5))
    assert torch.equal(out, again)


# ------------------------------------------------------------------------------------------ low rank


def test_lowrank_svd_equals_dense_truncated_svd():
    torch.manual_seed(1)
    ups = [torch.randn(60, r) for r in (3, 5, 2)]
    downs = [torch.randn(r, 90) for r in (3, 5, 2)]
    dense = sum(u @ v for u, v in zip(ups, downs))
    u, s, vh = torch.linalg.svd(dense, full_matrices=False)
    for rank in (4, 10, 15):  # 15 > the sum's rank 10: zero-padded, still exact
        b, a = lowrank_svd(ups, downs, rank)
        assert b.shape == (60, rank) and a.shape == (rank, 90)
        k = min(rank, 10)
        assert rel(b @ a, (u[:, :k] * s[:k]) @ vh[:k]) < 1e-5


def test_lowrank_svd_never_builds_the_full_matrix():
    m = n = 300_000  # m x n float32 would need 360 GB
    ups, downs = [torch.randn(m, 4), torch.randn(m, 2)], [torch.randn(4, n), torch.randn(2, n)]
    b, a = lowrank_svd(ups, downs, 6)
    rows, cols = torch.randint(0, m, (50,)), torch.randint(0, n, (50,))
    exact = (ups[0][rows] @ downs[0][:, cols] + ups[1][rows] @ downs[1][:, cols])
    torch.testing.assert_close(b[rows] @ a[:, cols], exact, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("shape", [(300, 120), (120, 300), (40, 30)])
def test_dense_svd_matches_torch_svd(shape):
    torch.manual_seed(2)
    m, n = shape
    spectrum = torch.logspace(1, -3, min(m, n))
    q1, _ = torch.linalg.qr(torch.randn(m, min(m, n)))
    q2, _ = torch.linalg.qr(torch.randn(n, min(m, n)))
    d = (q1 * spectrum) @ q2.T + 1e-3 * torch.randn(m, n)
    u, s, vh = torch.linalg.svd(d, full_matrices=False)
    for rank in (1, 7, 20):
        b, a = dense_svd(d, rank)
        assert rel(b @ a, (u[:, :rank] * s[:rank]) @ vh[:rank]) < 1e-5


def _count_linalg(monkeypatch, shape):
    """Count torch.linalg.qr calls (two per iteration step) and full SVDs of a matrix of ``shape``."""
    calls = {"qr": 0, "full_svd": 0}
    qr, svd = torch.linalg.qr, torch.linalg.svd

    def counting_qr(*args, **kwargs):
        calls["qr"] += 1
        return qr(*args, **kwargs)

    def counting_svd(a, *args, **kwargs):
        calls["full_svd"] += tuple(a.shape) == shape
        return svd(a, *args, **kwargs)

    monkeypatch.setattr(torch.linalg, "qr", counting_qr)
    monkeypatch.setattr(torch.linalg, "svd", counting_svd)
    return calls


def _truncated(d, rank):
    u, s, vh = torch.linalg.svd(d, full_matrices=False)
    return (u[:, :rank] * s[:rank]) @ vh[:rank]


def test_dense_svd_large_rank_takes_the_full_svd_directly(monkeypatch):
    """rank 64 of a 1408x512 TIES delta (k = 144 > 512 / 4): no iteration, the direct SVD's result."""
    gen = torch.Generator().manual_seed(3)
    parts = [(0.02 * torch.randn(1408, 16, generator=gen)) @ torch.randn(16, 512, generator=gen) for _ in range(3)]
    d = combine(parts, torch.ones(3), METHODS["ties_svd"], density=0.2)
    ref = _truncated(d, 64)
    calls = _count_linalg(monkeypatch, (1408, 512))
    b, a = dense_svd(d, 64)
    assert calls == {"qr": 0, "full_svd": 1}
    assert b.shape == (1408, 64) and a.shape == (64, 512)
    assert rel(b @ a, ref) < 1e-6


@pytest.mark.parametrize("spectrum", ["flat", "low rank + noise"])
def test_dense_svd_gives_up_early_only_when_it_cannot_certify(monkeypatch, spectrum):
    """A flat spectrum cannot be certified in 30 steps: the full SVD after a few; a clear gap converges."""
    gen = torch.Generator().manual_seed(4)
    d = torch.randn(600, 400, generator=gen)
    if spectrum != "flat":
        d = 1e-3 * d + torch.randn(600, 8, generator=gen) @ torch.randn(8, 400, generator=gen)
    ref = _truncated(d, 8)
    calls = _count_linalg(monkeypatch, (600, 400))
    b, a = dense_svd(d, 8)
    steps = (calls["qr"] - 1) // 2
    assert steps <= 5
    assert calls["full_svd"] == (spectrum == "flat")
    assert rel(b @ a, ref) < 1e-5


def test_dense_svd_of_an_exactly_rank_deficient_delta():
    """Zero Ritz values (a pruned delta of rank 3) converge at once; the rate estimate must not take log(0)."""
    d = torch.zeros(512, 512)
    d[:3, :3] = torch.eye(3)  # singular values 1, 1, 1, 0, ...: the best rank-2 error is exactly 1
    b, a = dense_svd(d, 2)
    approx = b @ a
    assert abs(float((d - approx).norm()) - 1.0) < 1e-5 and float(approx[3:].abs().max()) < 1e-6


# ------------------------------------------------------------------------------------------ properties


def test_task_arithmetic_is_the_exact_weighted_sum(adapters):
    weights = [0.7, -1.3, 0.4]
    expected: dict[str, torch.Tensor] = {}
    for a, w in zip(adapters, weights):
        for p, d in deltas(a).items():
            expected[p] = expected.get(p, 0) + w * d
    exact = merge(adapters, weights)  # concatenated factors
    big = merge(adapters, weights, rank=20)  # exact low-rank SVD, rank 20 = the sum's rank
    for m in (exact, big):
        assert set(m.layers) == set(expected)
        for p in expected:
            assert rel(m.layers[p].delta(), expected[p]) < 1e-5, p
    assert exact.layers["model.layers.0.self_attn.q_proj"].rank == 20
    assert exact.layers["model.layers.0.self_attn.k_proj"].rank == 12


def test_density_one_ties_on_one_adapter_is_identity(adapters):
    a = adapters[2]
    # one adapter is merged 'linear' (PEFT's rule), so TIES itself runs on the element-wise parts and on [a, a]
    t = torch.randn(30, 20)
    assert torch.equal(combine([t.clone()], torch.tensor([1.0]), METHODS["ties"], density=1.0), t)
    for m in (merge([a], method="ties", density=1.0), merge([a, a], [1.0, 1.0], method="ties", density=1.0),
              merge([a, a], [1.0, 1.0], method="ties_svd", density=1.0, rank=8)):
        for p, d in deltas(a).items():
            assert rel(m.layers[p].delta(), d) < 1e-5


@pytest.mark.parametrize("method,kw", [("task_arithmetic", {}), ("svd", {"rank": 4}), ("linear", {}), ("cat", {})])
def test_weights_one_zero_give_the_first_adapter(adapters, method, kw):
    first, second = adapters[0], adapters[2]
    if method == "linear":  # factor-wise methods need equal ranks
        second = merge([adapters[2]], rank=4)  # task_arithmetic compresses one adapter
    m = merge([first, second], [1.0, 0.0], method=method, **kw)
    for p, d in deltas(first).items():
        assert rel(m.layers[p].delta(), d) < 1e-5, p


def test_cat_then_full_rank_svd_is_lossless(adapters):
    cat = merge(adapters, [1.0, 0.5, -2.0], method="cat")
    full = max(layer.rank for layer in cat.layers.values())
    back = merge([cat], method="task_arithmetic", rank=full)
    for p, d in deltas(cat).items():
        assert rel(back.layers[p].delta(), d) < 1e-5


def test_dtype_kept_and_computed_in_float32(adapters, tmp_path):
    bf = [a.to(torch.bfloat16) for a in adapters]
    m = merge(bf, [1.0, 0.5, 0.5], method="svd", rank=6)
    ref = merge([a.to(torch.float32) for a in bf], [1.0, 0.5, 0.5], method="svd", rank=6)
    assert m.dtype == torch.bfloat16
    for p in ref.layers:
        assert rel(m.layers[p].delta(), ref.layers[p].delta()) < 1e-2


def test_provenance_recorded_and_written(loras, tmp_path):
    m = merge(loras, [1.0, -1.0, 0.5], method="dare_ties_svd", density=0.5, rank=4, seed=7)
    out = ak.save(m, tmp_path / "m")
    prov = json.loads(ak.load(out).metadata[PROVENANCE_KEY])
    assert prov["method"] == "dare_ties_svd" and prov["seed"] == 7 and prov["rank"] == 4 and prov["density"] == 0.5
    assert prov["weights"] == [1.0, -1.0, 0.5] and prov["majority_sign"] == "total"
    assert [s["source"] for s in prov["sources"]] == [str(p.resolve()) for p in loras]


def test_progress_bar(adapters, capsys):
    merge(adapters, method="svd", progress=True)
    assert "merge (svd)" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ other kinds


def test_loha_lokr_merge_into_lora_of_requested_rank(tmp_path, adapters):
    from peft import LoHaConfig, LoKrConfig

    loha = ak.load(make_peft_adapter(tmp_path / "loha", LoHaConfig(r=4, alpha=8, target_modules=ALL, init_weights=False), seed=3))
    lokr = ak.load(make_peft_adapter(tmp_path / "lokr", LoKrConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"],
                                                                    init_weights=False), seed=4))
    inputs, weights = [loha, lokr, adapters[0]], [1.0, -0.5, 0.8]
    m = merge(inputs, weights, method="svd", rank=5)
    assert m.kinds == {"lora"} and {layer.rank for layer in m.layers.values()} == {5}
    for p, layer in m.layers.items():
        total = sum(w * a.layers[p].delta() for a, w in zip(inputs, weights) if p in a.layers)
        u, s, vh = torch.linalg.svd(total, full_matrices=False)
        assert rel(layer.delta(), (u[:, :5] * s[:5]) @ vh[:5]) < 1e-4, p
    full = merge(inputs, weights, method="task_arithmetic", rank=32)  # rank 32 = min dim of q/k/v/o: exact
    p = "model.layers.1.self_attn.q_proj"
    assert rel(full.layers[p].delta(), sum(w * a.layers[p].delta() for a, w in zip(inputs, weights))) < 1e-5
    assert merge([loha, adapters[0]], method="ties_svd", density=0.5, rank=4).kinds == {"lora"}
    with pytest.raises(ak.ConfigError, match="rank"):
        merge([loha, lokr])
    with pytest.raises(ak.UnsupportedError, match="ties_svd"):
        merge([loha, lokr], method="ties", density=0.5)


def test_ia3_linear_merge_matches_peft(tmp_path, input_ids):
    from peft import IA3Config, PeftModel

    dirs = [make_peft_adapter(tmp_path / f"ia{i}", IA3Config(target_modules=t, feedforward_modules=["down_proj"],
                                                             init_ia3_weights=False), seed=i)
            for i, t in enumerate((["k_proj", "v_proj", "down_proj"], ["v_proj", "down_proj"]))]
    pm = PeftModel.from_pretrained(make_tiny_llama(0), str(dirs[0]), adapter_name="a0")
    pm.load_adapter(str(dirs[1]), adapter_name="a1")
    pm.add_weighted_adapter(["a0", "a1"], [0.6, 0.7], "m")
    ref = {n.removeprefix("base_model.model."): mod.ia3_l["m"].detach().flatten()
           for n, mod in pm.named_modules() if hasattr(mod, "ia3_l") and "m" in mod.ia3_l}
    m = merge(dirs, [0.6, 0.7], method="linear")
    assert m.kinds == {"ia3"} and set(m.layers) == set(ref)
    for p in ref:
        torch.testing.assert_close(m.layers[p].vector, ref[p])
    with pytest.raises(ak.UnsupportedError, match="linear"):
        merge(dirs, method="svd")


# ------------------------------------------------------------------------------------------ refusals


def test_refusals(tmp_path, adapters, loras):
    from peft import IA3Config, LoraConfig

    dora = ak.load(make_peft_adapter(tmp_path / "dora", LoraConfig(r=4, target_modules=["q_proj"], use_dora=True,
                                                                   init_lora_weights=False)))
    with pytest.raises(ak.UnsupportedError, match="DoRA"):
        merge([adapters[0], dora])
    ia3 = ak.load(make_peft_adapter(tmp_path / "ia3", IA3Config(target_modules=["k_proj"], feedforward_modules=[])))
    with pytest.raises(ak.UnsupportedError, match="IA3"):
        merge([adapters[0], ia3], method="linear")
    with pytest.raises(ak.ConfigError, match="org/model-a.*org/model-b"):
        merge([adapters[0].replace(base_model="org/model-a"), adapters[2].replace(base_model="org/model-b")])
    wide = make_peft_adapter(tmp_path / "wide", LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False),
                             model=make_tiny_llama(0, hidden_size=48))
    with pytest.raises(ak.ShapeMismatchError, match=r"model\.layers\.0\.self_attn\.q_proj"):
        merge([loras[0], wide])
    with pytest.raises(ak.ConfigError, match=r"equal ranks.*\[4, 8\]"):
        merge(adapters, method="linear")
    with pytest.raises(ak.ConfigError, match="needs density"):
        merge(adapters, method="ties_svd")
    with pytest.raises(ak.ConfigError, match="density does not apply"):
        merge(adapters, method="svd", density=0.5)
    with pytest.raises(ak.ConfigError, match="rank does not apply"):
        merge(adapters, method="cat", rank=4)
    with pytest.raises(ak.ConfigError, match="3 weights for 2"):
        merge(adapters[:2], [1, 2, 3])
    with pytest.raises(ak.ConfigError, match="unknown merge method"):
        merge(adapters, method="average")
    with pytest.raises(ak.ConfigError, match="majority_sign"):
        merge(adapters, method="ties_svd", density=0.5, majority_sign="mean")


# ------------------------------------------------------------------------------------------ CLI


def test_cli_methods_listed_match_the_table():
    assert set(MERGE_METHODS) == set(METHODS)


def test_cli_merge_writes_what_the_library_computes(loras, tmp_path):
    out = tmp_path / "out"
    args = [*map(str, loras), "-o", str(out), "--weights", "1,-0.5,0.25", "--method", "ties_svd",
            "--density", "0.4", "--rank", "6"]
    res = CliRunner().invoke(main, ["merge", *args])
    assert res.exit_code == 0, res.output
    assert "ties_svd" in res.output and "rank 6" in res.output
    expected = merge(loras, [1, -0.5, 0.25], method="ties_svd", density=0.4, rank=6)
    got = ak.load(out)
    for p, layer in expected.layers.items():
        torch.testing.assert_close(got.layers[p].delta(), layer.delta())
    again = CliRunner().invoke(main, ["merge", *args])  # exists: refused
    assert again.exit_code == 1 and "--overwrite" in again.output
    assert CliRunner().invoke(main, ["merge", *args, "--overwrite"]).exit_code == 0


@pytest.mark.parametrize("extra,message", [
    (["--method", "average"], "unknown merge method"),
    (["--method", "ties"], "needs density"),
    (["--weights", "1,2,3"], "3 weights for 2 adapters"),
    (["--weights", "1,x"], "comma-separated numbers"),
    (["--method", "linear"], "equal ranks"),
    (["--format", "onnx"], "unknown format"),
])
def test_cli_bad_inputs_one_line_exit_1_nothing_written(loras, tmp_path, extra, message):
    out = tmp_path / "never"
    res = CliRunner().invoke(main, ["merge", str(loras[0]), str(loras[1]), "-o", str(out), *extra])
    assert res.exit_code == 1
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], res.output
    assert not out.exists() and not list(tmp_path.glob(".never*"))


def test_cli_single_source_says_peft_applies_linear(loras, tmp_path):
    res = CliRunner().invoke(main, ["merge", str(loras[2]), "-o", str(tmp_path / "one"), "--method", "svd",
                                    "--rank", "3"])
    assert res.exit_code == 0, res.output
    assert "merged 1 adapter with svd (applied as linear" in res.output and "rank 8" in res.output


def test_cli_merge_lycoris_file_with_base(tmp_path):
    """A LyCORIS LoHa file of an LLM needs --base to resolve its flattened names; merged with a PEFT LoRA."""
    from adaptkit.demo import build_example_base, example

    srcs = [str(example("lora_math")), str(example("lycoris_loha.safetensors"))]
    res = CliRunner().invoke(main, ["merge", *srcs, "-o", str(tmp_path / "no_base"), "--rank", "4"])
    assert res.exit_code == 1 and "--base" in res.output and not (tmp_path / "no_base").exists()
    base = build_example_base(tmp_path / "base")
    res = CliRunner().invoke(main, ["merge", *srcs, "-o", str(tmp_path / "m"), "--rank", "4", "--base", str(base)])
    assert res.exit_code == 0, res.output
    loha = ak.load(srcs[1], base=str(base))
    expected = merge([ak.load(srcs[0]), loha], rank=4)
    got = ak.load(tmp_path / "m")
    assert set(got.layers) == set(expected.layers) == set(loha.layers)
    for p, layer in expected.layers.items():
        torch.testing.assert_close(got.layers[p].delta(), layer.delta())


def test_cli_missing_source(tmp_path):
    res = CliRunner().invoke(main, ["merge", str(tmp_path / "nope"), "-o", str(tmp_path / "o")])
    assert res.exit_code == 1 and res.output.startswith("error: ") and len(res.output.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()
