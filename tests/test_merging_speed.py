"""The fast paths of merging keep their numbers: exact selection (PEFT's topk set), DARE's per-layer PCG64 masks,
the deferred certificate, reused dense buffers, warm-started dense SVDs, Gram energies."""

from __future__ import annotations

import copy
import json
import math
import pickle

import numpy as np
import pytest
import torch
from conftest import make_peft_adapter

import adaptkit as ak
from adaptkit.core.coverage import METADATA_KEY
from adaptkit.core.deferred import DeferredMetadata
from adaptkit.core.linalg import dense_svd, gram_energy, lowrank_svd_parts
from adaptkit.ops.merging import PROVENANCE_KEY, merge
from adaptkit.ops.merging import primitives as P
from adaptkit.ops.merging import select as S
from adaptkit.ops.merging.driver import certify_merge
from adaptkit.ops.merging.layerwise import RNG
from adaptkit.ops.merging.layerwise import layer_generator as _layer_generator

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def loras(tmp_path_factory):
    from peft import LoraConfig

    root = tmp_path_factory.mktemp("speed")
    cfgs = [LoraConfig(r=4, lora_alpha=8, target_modules=ALL, init_lora_weights=False),
            LoraConfig(r=4, lora_alpha=6, target_modules=ALL, init_lora_weights=False),
            LoraConfig(r=4, lora_alpha=4, target_modules=ALL, use_rslora=True, init_lora_weights=False)]
    return [ak.load(make_peft_adapter(root / f"l{i}", c, seed=40 + i)) for i, c in enumerate(cfgs)]


# ------------------------------------------------------------------------------------------ selection


def lora_like(m: int, n: int, r: int, seed: int) -> torch.Tensor:
    """A dense LoRA delta: magnitudes follow its rows and columns (what a strided sample misjudges)."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(m, r, generator=g) * torch.logspace(0, 2, m)[:, None]) @ torch.randn(r, n, generator=g)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_selection_is_peft_prune_for_every_dtype(dtype):
    from peft.utils import merge_utils as mu

    cases = [lora_like(300, 256, 4, 1), lora_like(64, 2048, 8, 2), torch.randn(5000)]
    tied = (torch.randint(-3, 4, (200, 90)) * 0.5).float()  # few levels: ties straddle the threshold
    tied[0, :7] = -0.0
    cases.append(tied)
    for t in cases:
        t = t.to(dtype)
        for density in (0.001, 0.2, 0.5, 0.93):
            ref = mu.prune(t, density, "magnitude")
            got = P.magnitude_prune(t, density)
            assert got.dtype == t.dtype and torch.equal(got, ref), (dtype, density, tuple(t.shape))
            assert torch.equal(torch.signbit(got), torch.signbit(ref))  # dropped negatives are -0.0, as x * 0
            owned = t.clone()
            P.magnitude_prune_(owned, density)
            assert torch.equal(owned, ref)


def test_selection_with_nan_and_inf_ranks_them_as_peft_does():
    from peft.utils import merge_utils as mu

    t = torch.randn(3000)
    t[[5, 77, 2900]] = torch.tensor([float("nan"), float("inf"), -float("inf")])
    for density in (0.001, 0.3):
        ref, got = mu.prune(t, density, "magnitude"), P.magnitude_prune(t, density)
        assert torch.equal(torch.isnan(got), torch.isnan(ref))
        assert torch.equal(torch.nan_to_num(got), torch.nan_to_num(ref))


def test_a_missed_bracket_falls_back_to_the_exact_answer(monkeypatch):
    x = lora_like(400, 300, 4, 3).abs().reshape(-1).numpy()
    k = int(0.2 * x.size)
    exact = np.partition(x, x.size - k)[x.size - k]
    monkeypatch.setattr(S, "_sample_indices", lambda n, m: np.arange(m))  # the first rows only: unrepresentative
    t, count = S.kth_largest(x, k)
    assert t == exact and count == int((x >= exact).sum())


def test_topk_on_int32_keys_returns_torchs_float_indices():
    g = torch.Generator().manual_seed(0)
    x = (torch.randint(0, 50, (200_000,), generator=g) * 0.125).float()  # thousands of ties
    for k in (1, 999, 40_000, 150_001):
        ref = torch.zeros(x.numel(), dtype=torch.bool)
        ref[torch.topk(x, k, sorted=False).indices] = True
        assert torch.equal(S._topk_mask(x, k), ref)


# ------------------------------------------------------------------------------------------ DARE draws


def test_numpy_generator_masks_keep_density_reproducibly(monkeypatch):
    t = torch.randn(300, 700)
    a = P.random_prune(t, 0.2, generator=np.random.Generator(np.random.PCG64(9)))
    b = P.random_prune(t, 0.2, generator=np.random.Generator(np.random.PCG64(9)))
    assert torch.equal(a, b)
    kept = (a != 0).float().mean().item()
    assert abs(kept - 0.2) < 4 * math.sqrt(0.2 * 0.8 / t.numel())
    torch.testing.assert_close(a[a != 0], t[a != 0] / 0.2, rtol=0, atol=0)
    monkeypatch.setattr(P, "_CHUNK", 1000)  # the stream does not depend on the chunking
    c = P.random_prune(t, 0.2, generator=np.random.Generator(np.random.PCG64(9)))
    assert torch.equal(a, c)
    assert P._keep_threshold(0.5) == 2**31 and P._keep_threshold(1 - 1e-12) == 2**32 - 1


def test_numpy_masks_follow_the_documented_stream():
    """16 bits per entry, u < T kept, u == T decided by a second word drawn after all first words, v < F."""
    for density, n in ((0.2, 300_001), (0.37, 65_536 * 3 + 5)):
        limit = P._keep_threshold(density)
        high, low = limit >> 16, limit & 0xFFFF
        bits = np.random.PCG64(7)
        u = bits.random_raw((n + 3) // 4).astype("<u8").view("<u2")[:n].astype(np.int64)
        tied = np.flatnonzero(u == high)
        v = bits.random_raw((tied.size + 3) // 4).astype("<u8").view("<u2")[:tied.size].astype(np.int64)
        expected = u < high
        expected[tied] = v < low
        got = P._random_mask(torch.empty(n), density, np.random.Generator(np.random.PCG64(7))).numpy()
        assert tied.size > 0 and np.array_equal(got, expected)


def test_dare_merges_record_their_streams(loras):
    m1 = merge(loras, [1.0, 0.5, -0.3], method="dare_ties", density=0.3, seed=11)
    m2 = merge(loras, [1.0, 0.5, -0.3], method="dare_ties", density=0.3, seed=11)
    m3 = merge(loras, [1.0, 0.5, -0.3], method="dare_ties", density=0.3, seed=12)
    prov = json.loads(m1.metadata[PROVENANCE_KEY])
    assert prov["rng"] == RNG and prov["seed"] == 11
    assert all(torch.equal(m1.layers[p].delta(), m2.layers[p].delta()) for p in m1.layers)
    assert any(not torch.equal(m1.layers[p].delta(), m3.layers[p].delta()) for p in m1.layers)
    g1, g2 = _layer_generator(11, "a"), _layer_generator(11, "b")
    assert not np.array_equal(g1.bit_generator.random_raw(8), g2.bit_generator.random_raw(8))
    assert "rng" not in json.loads(merge(loras, method="ties", density=0.3).metadata[PROVENANCE_KEY])


# ------------------------------------------------------------------------------------------ certificate


def test_the_deferred_certificate_equals_the_eager_one(loras, tmp_path):
    merged = merge(loras, [1.0, 0.5, -0.3], method="ties", density=0.4)
    assert isinstance(merged.metadata, DeferredMetadata) and merged.metadata.pending == (METADATA_KEY,)
    assert METADATA_KEY in merged.metadata and len(merged.metadata) == 2 and merged.metadata.pending
    eager = certify_merge(loras, merged.layers, merged.extras, "ties").to_json()
    assert merged.metadata[METADATA_KEY] == eager and not merged.metadata.pending
    cert = json.loads(eager)
    dense = math.fsum(float(layer.delta().double().square().sum()) for a in loras for layer in a.layers.values())
    assert abs(cert["total_energy"] - dense) <= 1e-9 * dense and cert["energy_share"] == 1.0
    again = merge(loras, [1.0, 0.5, -0.3], method="ties", density=0.4)
    plain = {**again.metadata}
    assert plain[METADATA_KEY] == eager and json.loads(json.dumps(dict(again.metadata.items())))
    for clone in (copy.deepcopy(again.metadata), pickle.loads(pickle.dumps(again.metadata))):
        assert type(clone) is dict and clone == plain
    out = ak.save(merge(loras, method="linear"), tmp_path / "m")
    assert json.loads(ak.load(out).metadata[METADATA_KEY])["complete"] is True


def test_lora_energy_is_the_float64_dense_norm():
    g = torch.Generator().manual_seed(2)
    for m, n, r in ((64, 48, 4), (5, 3000, 16), (700, 9, 3)):
        u, v = torch.randn(m, r, generator=g), torch.randn(r, n, generator=g) * 1e-3
        dense = float((u.double() @ v.double()).square().sum())
        assert abs(gram_energy(u, v) - dense) <= 1e-12 * dense


# ------------------------------------------------------------------------------------------ dense path


def test_reused_buffers_give_each_layer_its_own_merge(loras):
    """Layers of one shape share the workspace's buffers: each layer merged alone gives the same result."""
    kw = dict(method="ties_svd", density=0.3, rank=4)
    together = merge(loras, [1.0, 0.6, -0.4], **kw)
    for path in ("model.layers.0.mlp.up_proj", "model.layers.1.mlp.gate_proj", "model.layers.1.self_attn.q_proj"):
        alone = merge([a.replace(layers={path: a.layers[path]}) for a in loras], [1.0, 0.6, -0.4], **kw)
        assert torch.equal(alone.layers[path].delta(), together.layers[path].delta()), path


def test_a_warm_start_gives_the_same_certified_svd():
    g = torch.Generator().manual_seed(5)
    ups = [torch.randn(600, 8, generator=g) for _ in range(3)]
    downs = [torch.randn(8, 500, generator=g) for _ in range(3)]
    d = sum(u @ v for u, v in zip(ups, downs))
    d = d * (torch.rand(d.shape, generator=g) < 0.3)  # pruned: no longer low rank
    u, s, vh = torch.linalg.svd(d.double(), full_matrices=False)
    best = (u[:, :8] * s[:8]) @ vh[:8]
    qu, _, qvh = lowrank_svd_parts(ups, downs)
    for kw in ({}, {"guess": (qu, qvh.T)}, {"guess": (qu[:, :3], qvh[:3].T)}):
        b, a = dense_svd(d, 8, **kw)
        assert ((b @ a).double() - best).norm() / best.norm() < 1e-4, kw


# ------------------------------------------------------------------------------------------ review findings


def test_nan_with_ties_keeps_peft_set():
    """A NaN ranks highest in topk; a threshold rule would keep both tied 2s instead (found in review)."""
    from peft.utils import merge_utils as mu

    x = torch.tensor([float("nan"), 3.0, 2.0, 2.0, 1.0])
    ref, got = mu.prune(x.clone(), 0.6, "magnitude"), P.magnitude_prune(x, 0.6)
    assert torch.equal(torch.isnan(got), torch.isnan(ref)) and torch.equal(got.nan_to_num(), ref.nan_to_num())


@pytest.mark.parametrize("owned", [True, False], ids=["in-place", "stacked"])
@pytest.mark.parametrize("method", ["ties", "magnitude_prune", "dare_linear", "linear"])
def test_combined_tensors_equal_peft_to_the_sign_of_zero(method, owned):
    from peft.utils import merge_utils as mu

    g = torch.Generator().manual_seed(1)
    ts = [torch.randn((33, 65), generator=g) for _ in range(3)]
    w = torch.tensor([0.7, -1.3, 0.4])
    if method == "ties":
        ref = mu.ties([t.clone() for t in ts], w, density=0.5, majority_sign_method="total")
    elif method == "magnitude_prune":
        ref = mu.magnitude_prune([t.clone() for t in ts], w, density=0.5)
    elif method == "dare_linear":
        torch.manual_seed(3)
        ref = mu.dare_linear([t.clone() for t in ts], w, density=0.5)
        torch.manual_seed(3)
    else:
        ref = mu.task_arithmetic([t.clone() for t in ts], w)
    got = combine_like_peft(ts, w, method, owned)
    assert torch.equal(got.view(torch.int32), ref.view(torch.int32))  # bit for bit, zeros' signs included


def combine_like_peft(ts, w, method, owned):
    from adaptkit.ops.merging.methods import combine, get_method

    density = None if method == "linear" else 0.5
    return combine([t.clone() for t in ts], w, get_method(method), density, "total", None, owned=owned)


def test_a_guess_the_answer_avoids_does_not_hide_it():
    """Three LoRAs whose unpruned sum cancels the dominant block: a start spanned by the guess alone stays
    inside its invariant subspace and passes the residual test with the wrong subspace (found in review)."""
    from adaptkit.core.adapter import Adapter
    from adaptkit.core.kinds import LoRA
    from adaptkit.ops.merging.methods import combine, get_method

    torch.manual_seed(0)
    m = n = 512
    r = 32
    b0, a0 = torch.zeros(m, r), torch.zeros(r, n)
    b0[:256], a0[:, :256] = torch.randn(256, r), torch.randn(r, 256)
    b1, a1 = torch.zeros(m, r), torch.zeros(r, n)
    b1[256:], a1[:, 256:] = torch.randn(256, r) * 3, torch.randn(r, 256)
    ads = [Adapter(layers={"x": LoRA(down=a, up=b, alpha=float(r), shape=(m, n))})
           for b, a in ((b0, a0), (b1, a1), (b1, -a1))]
    got = merge(ads, method="ties_svd", density=1.0, rank=8).layers["x"].delta_matrix()
    comb = combine([a.layers["x"].delta_matrix().clone() for a in ads], torch.ones(3), get_method("ties_svd"), 1.0,
                   owned=True)
    best = torch.linalg.svdvals(comb.double())[8:].norm().item()
    assert torch.linalg.norm(comb - got).item() <= best * (1 + 1e-4)


def test_a_deferred_value_that_raises_stays_pending():
    calls = []

    def fail():
        calls.append(1)
        raise RuntimeError("boom")

    md = DeferredMetadata({"a": "1"}, {"b": fail})
    for _ in range(2):
        with pytest.raises(RuntimeError):
            md["b"]
    assert "b" in md and md.pending == ("b",) and len(calls) == 2 and list(md) == ["a", "b"]
