"""Every kind implements the Layer protocol, and its members agree with float64 dense references.

One sample layer per builtin kind variant (LoRA linear/conv+Tucker/DoRA/Conv1D/bias/rsLoRA, LoHa plain and
Tucker, LoKr full and low-rank factors, Full with a bias difference, IA3 both sides) and per variant of the
kinds of issue 14 (seeded random tensors: AdaLoRA, VeRA, RandLoRA both orientations, VB-LoRA, DeLoRA, GraLoRA
with and without its hybrid LoRA, MiSS default/mini/bat, FourierFT, WaveFT, SHiRA, C3A, OFT linear/conv/embedding,
BOFT one and two butterfly factors, HRA plain and Gram-Schmidt, LyCORIS diag-OFT/BOFT, GLoRA, LN tuning,
trainable tokens) is checked member by member: apply against delta, apply_rows against apply, fit,
fro_norm/inner against the dense product, factors against delta, parts/from_parts, cast, nonfinite_fields,
spectrum, to_lora; base-dependent kinds refuse a delta, unfusing and a LoRA form without the base.
"""

from __future__ import annotations

import math

import pytest
import torch

from adaptkit.core.kinds import (
    BOFT,
    C3A,
    HRA,
    IA3,
    KINDS,
    OFT,
    PROTOCOL_METHODS,
    AdaLoRA,
    DeLoRA,
    FourierFT,
    Full,
    GLoRA,
    GraLoRA,
    Layer,
    LNTuning,
    LoHa,
    LoKr,
    LoRA,
    LycorisOFT,
    MiSS,
    MiSSBat,
    RandLoRA,
    Replace,
    SHiRA,
    TrainableTokens,
    VBLoRA,
    VeRA,
    WaveFT,
)
from adaptkit.core.kinds.dora import dora_apply
from adaptkit.core.kinds.expert_lora import ExpertLoRA, expert_delta64
from adaptkit.core.kinds.positions import seeded_positions
from adaptkit.errors import ShapeMismatchError, UnsupportedError


def _r(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).float()


def _dense64(layer) -> torch.Tensor:
    """An independent float64 reference of each builtin kind's delta (module orientation)."""
    if isinstance(layer, LoRA):
        up = layer.up.double().reshape(layer.up.shape[0], -1)
        down = layer.down.double()
        if layer.mid is not None:
            down = torch.einsum("ab...,bi->ai...", layer.mid.double(), down.reshape(layer.rank, -1))
        scale = layer.alpha / (math.sqrt(layer.rank) if layer.rslora else layer.rank)
        d = (up @ down.reshape(layer.rank, -1)) * scale
        ms = (layer.shape[1], layer.shape[0]) if layer.fan_in_fan_out else layer.shape
        d = d.reshape(ms)
        return d.T if layer.fan_in_fan_out else d
    if isinstance(layer, LoHa):
        def half(a, b, t):
            if t is None:
                return a.double() @ b.double()
            return torch.einsum("ij...,jr,ip->pr...", t.double(), b.double(), a.double())
        d = half(layer.w1a, layer.w1b, layer.t1) * half(layer.w2a, layer.w2b, layer.t2) * layer.alpha / layer.rank
        return d.reshape(layer.shape)
    if isinstance(layer, LoKr):
        w1 = layer.w1.double() if layer.w1 is not None else layer.w1a.double() @ layer.w1b.double()
        w2 = layer.w2.double() if layer.w2 is not None else layer.w2a.double() @ layer.w2b.double()
        return (torch.kron(w1, w2) * layer.alpha / layer.rank).reshape(layer.shape)
    if isinstance(layer, Full):
        return layer.diff.double()
    if type(layer) in PEFT_CHECKED:  # their delta() is checked against peft's get_delta_weight in test_kinds_peft_*
        return layer.delta().double()
    if isinstance(layer, ExpertLoRA):
        return expert_delta64(layer)
    raise AssertionError(type(layer))


def _math64(layer) -> torch.Tensor:
    """The float64 reference in the math orientation, flattened to (out, in * k)."""
    d = _dense64(layer)
    if isinstance(layer, ExpertLoRA):  # the experts' math-oriented deltas stacked: (E * out, in)
        d = d.transpose(-1, -2) if layer.fan_in_fan_out else d
        return d.reshape(-1, d.shape[-1])
    d = d.T if layer.fan_in_fan_out else d
    return d.reshape(d.shape[0], -1)


SAMPLES = {
    "lora": lambda: LoRA(down=_r(3, 7, seed=1), up=_r(5, 3, seed=2), alpha=6.0, shape=(5, 7)),
    "lora_rslora": lambda: LoRA(down=_r(4, 7, seed=3), up=_r(5, 4, seed=4), alpha=3.0, shape=(5, 7), rslora=True),
    "lora_conv_tucker": lambda: LoRA(down=_r(2, 3, 1, 1, seed=5), up=_r(4, 2, 1, 1, seed=6), mid=_r(2, 2, 3, 3, seed=7),
                                     alpha=2.0, shape=(4, 3, 3, 3), module_type="conv"),
    "lora_conv": lambda: LoRA(down=_r(2, 3, 3, 3, seed=8), up=_r(4, 2, 1, 1, seed=9), alpha=1.0, shape=(4, 3, 3, 3),
                              module_type="conv"),
    "lora_conv1d": lambda: LoRA(down=_r(2, 6, seed=10), up=_r(5, 2, seed=11), alpha=2.0, shape=(6, 5),
                                fan_in_fan_out=True),
    "lora_bias": lambda: LoRA(down=_r(2, 6, seed=12), up=_r(5, 2, seed=13), alpha=4.0, shape=(5, 6), bias=_r(5, seed=14)),
    "lora_dora": lambda: LoRA(down=_r(2, 6, seed=15), up=_r(5, 2, seed=16), alpha=2.0, shape=(5, 6),
                              magnitude=_r(5, seed=17).abs() + 0.5),
    "loha": lambda: LoHa(w1a=_r(5, 2, seed=18), w1b=_r(2, 6, seed=19), w2a=_r(5, 2, seed=20), w2b=_r(2, 6, seed=21),
                         alpha=2.0, shape=(5, 6)),
    "loha_tucker": lambda: LoHa(w1a=_r(2, 4, seed=22), w1b=_r(2, 3, seed=23), w2a=_r(2, 4, seed=24),
                                w2b=_r(2, 3, seed=25), t1=_r(2, 2, 3, 3, seed=26), t2=_r(2, 2, 3, 3, seed=27),
                                alpha=2.0, shape=(4, 3, 3, 3), module_type="conv"),
    "lokr": lambda: LoKr(w1=_r(2, 3, seed=28), w2=_r(3, 2, seed=29), alpha=4.0, rank=4, shape=(6, 6)),
    "lokr_lowrank": lambda: LoKr(w1=_r(2, 2, seed=30), w2a=_r(4, 2, seed=31), w2b=_r(2, 3, seed=32), alpha=1.0, rank=2,
                                 shape=(8, 6)),
    "full": lambda: Full(diff=_r(5, 6, seed=33), shape=(5, 6), diff_b=_r(5, seed=34)),
    "ia3_out": lambda: IA3(vector=_r(5, seed=35) + 1, shape=(5, 6)),
    "ia3_in": lambda: IA3(vector=_r(6, seed=36) + 1, on_input=True, shape=(5, 6)),
    "expert_lora": lambda: ExpertLoRA(down=_r(3, 2, 6, seed=37), up=_r(3, 5, 2, seed=38), alpha=4.0),
    "expert_lora_transposed": lambda: ExpertLoRA(down=_r(3, 2, 6, seed=39), up=_r(3, 5, 2, seed=40), alpha=2.0,
                                                 fan_in_fan_out=True),
}


def _ints(*values: int) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.long)


def _small(*shape: int, seed: int) -> torch.Tensor:
    """Small skew/rotation parameters (a rotation near, but not at, the identity)."""
    return _r(*shape, seed=seed) * 0.3


def _topk(*shape: int, seed: int) -> torch.Tensor:
    return torch.softmax(_r(*shape, seed=seed), dim=-1)


def _bank_indices(*shape: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 6, shape, generator=torch.Generator().manual_seed(seed))


SAMPLES |= {
    "adalora": lambda: AdaLoRA(a=_r(3, 7, seed=100), b=_r(5, 3, seed=101), e=_r(3, 1, seed=102), alpha=4.0, ranknum=4.0,
                               shape=(5, 7)),
    "adalora_conv1d": lambda: AdaLoRA(a=_r(2, 6, seed=103), b=_r(5, 2, seed=104), e=_r(2, 1, seed=105), alpha=2.0,
                                      ranknum=3.0, shape=(6, 5), fan_in_fan_out=True),
    "vera": lambda: VeRA(vera_a=_r(4, 9, seed=106), vera_b=_r(8, 4, seed=107), lambda_b=_r(5, seed=108),
                         lambda_d=_r(3, seed=109), shape=(5, 7)),
    "randlora": lambda: RandLoRA(randlora_a=_r(2, 1, 5, seed=110), randlora_b=_r(7, 3, 2, seed=111),
                                 lam=_r(2, 3, seed=112), gamma=_r(3, 5, seed=113), alpha=2.0, shape=(7, 5)),
    "randlora_wide": lambda: RandLoRA(randlora_a=_r(2, 1, 5, seed=114), randlora_b=_r(7, 3, 2, seed=115),
                                      lam=_r(2, 3, seed=116), gamma=_r(3, 5, seed=117), alpha=2.0, shape=(5, 7)),
    "vblora": lambda: VBLoRA(bank=_r(6, 2, seed=118), indices_a=_bank_indices(3, 3, 2, seed=119),
                             weights_a=_topk(3, 3, 2, seed=120), indices_b=_bank_indices(2, 3, 2, seed=121),
                             weights_b=_topk(2, 3, 2, seed=122), shape=(4, 6)),
    "delora": lambda: DeLoRA(a=_r(2, 6, seed=123), b=_r(5, 2, seed=124), lam=torch.tensor([0.7]),
                             w_norm=_r(6, seed=125).abs() + 0.1, shape=(5, 6)),
    "gralora": lambda: GraLoRA(a=_r(2, 2, 4, seed=126), b=_r(2, 4, 3, seed=127), alpha=4.0, shape=(6, 4)),
    "gralora_hybrid": lambda: GraLoRA(a=_r(2, 2, 4, seed=128), b=_r(2, 4, 3, seed=129), alpha=4.0, shape=(6, 4),
                                      a_general=_r(1, 4, seed=130), b_general=_r(6, 1, seed=131)),
    "miss": lambda: MiSS(block=_r(2, 5, seed=132), shape=(5, 7)),
    "miss_mini": lambda: MiSS(block=_r(2, 3, seed=133), shape=(6, 5)),
    "fourierft": lambda: FourierFT(values=_r(5, seed=134), indices=seeded_positions(5, 6, 5, 777), scaling=3.0,
                                   shape=(5, 6)),
    "waveft": lambda: WaveFT(values=_r(6, seed=135), indices=seeded_positions(6, 4, 6, 5), scaling=2.0, shape=(6, 4)),
    "shira": lambda: SHiRA(values=_r(6, seed=136), indices=torch.stack([_ints(0, 1, 2, 4, 4, 3), _ints(5, 0, 2, 1, 3, 3)]),
                           shape=(5, 6)),
    "c3a": lambda: C3A(kernel=_r(3, 2, 2, seed=137), shape=(6, 4)),
    # base-dependent kinds
    "oft": lambda: OFT(weight=_small(2, 3, seed=138), shape=(5, 6)),
    "oft_conv_exact": lambda: OFT(weight=_small(6, 3, seed=139), shape=(4, 2, 3, 3), module_type="conv",
                                  use_cayley_neumann=False),
    "oft_embedding": lambda: OFT(weight=_small(1, 3, seed=140), shape=(7, 6), module_type="embedding"),
    "boft": lambda: BOFT(boft_r=_small(1, 2, 3, 3, seed=141), boft_s=_r(5, 1, seed=142), shape=(5, 6)),
    "boft_two_factors": lambda: BOFT(boft_r=_small(2, 2, 2, 2, seed=143), boft_s=_r(5, 1, seed=144), shape=(5, 4)),
    "hra": lambda: HRA(u=_r(6, 2, seed=145), shape=(5, 6)),
    "hra_gs_conv": lambda: HRA(u=_r(18, 2, seed=146), shape=(4, 2, 3, 3), apply_gs=True, module_type="conv"),
    "miss_bat": lambda: MiSSBat(block=_r(2, 2, 2, seed=147), shape=(4, 6)),
    "lycoris_diag_oft": lambda: LycorisOFT(oft_blocks=_small(2, 3, 3, seed=148), shape=(6, 5), rescale=_r(6, 1, seed=149)),
    "lycoris_boft": lambda: LycorisOFT(oft_blocks=_small(2, 2, 2, 2, seed=150), shape=(4, 5), constraint=0.05),
    "glora": lambda: GLoRA(a1=_r(6, 2, seed=151), a2=_r(2, 6, seed=152), b1=_r(5, 2, seed=153), b2=_r(2, 6, seed=154),
                           alpha=4.0, shape=(5, 6)),
    "ln_tuning": lambda: LNTuning(weight=_r(6, seed=155), bias=_r(6, seed=156), shape=(6,)),
    "trainable_tokens": lambda: TrainableTokens(values=_r(2, 6, seed=157), token_indices=_ints(1, 4), shape=(7, 6)),
}
#: the issue-14 kinds whose delta() the peft/lycoris parity tests check (so it is their reference here)
PEFT_CHECKED = (AdaLoRA, VeRA, RandLoRA, VBLoRA, DeLoRA, GraLoRA, MiSS, FourierFT, WaveFT, SHiRA, C3A)
#: the samples of kinds with exact low-rank factors
LOW_RANK = ("lora", "loha", "adalora", "vera", "randlora", "vblora", "delora", "gralora", "miss", "fourierft")
DELTA = [k for k, make in SAMPLES.items() if make().has_delta]
BASE_DEPENDENT = [k for k, make in SAMPLES.items() if not make().has_delta and not k.startswith("ia3")]


def test_every_registered_kind_implements_the_protocol():
    for name, cls in KINDS.items():
        assert cls.kind == name
        missing = [m for m in PROTOCOL_METHODS if not callable(getattr(cls, m, None))]
        assert not missing, (name, missing)
    for make in SAMPLES.values():
        assert isinstance(make(), Layer)
    assert {type(make()) for make in SAMPLES.values()} == set(KINDS.values())


@pytest.mark.parametrize("name", DELTA)
def test_delta_matches_float64_reference_and_factors(name):
    layer = SAMPLES[name]()
    want = _dense64(layer)
    torch.testing.assert_close(layer.delta().double(), want, rtol=1e-5, atol=1e-5)
    dm = layer.delta_matrix()
    if isinstance(layer, ExpertLoRA):  # every expert's (out, in) stacked
        assert dm.shape == (layer.num_experts * layer.up.shape[1], layer.down.shape[2])
    else:
        assert dm.shape[0] == (layer.shape[1] if layer.fan_in_fan_out else layer.shape[0])
    f = layer.factors()
    if f is not None:
        torch.testing.assert_close(f[0] @ f[1], dm, rtol=1e-5, atol=1e-5)
    if name.startswith(LOW_RANK) and not name.startswith("loha_tucker"):
        assert f is not None  # low-rank kinds expose their factorisation
    assert (layer.lora_ab() is not None) == name.startswith("lora")


@pytest.mark.parametrize("name", list(SAMPLES))
def test_apply_and_apply_rows(name):
    layer = SAMPLES[name]()
    w, b = _r(*layer.shape, seed=40), _r(layer.shape[1] if layer.fan_in_fan_out else layer.shape[0], seed=41)
    new_w, new_b = layer.apply(w, b)
    if isinstance(layer, IA3):
        ms = w.double().T if layer.fan_in_fan_out else w.double()
        v = layer.vector.double()
        ref = ms * (v[None, :] if layer.on_input else v[:, None])
        torch.testing.assert_close(new_w.double(), ref)
        assert layer.changes_bias == (not layer.on_input)
        torch.testing.assert_close(new_b.double(), b.double() * v if layer.changes_bias else b.double())
        assert math.isnan(layer.fro_norm()) and not layer.has_delta and not layer.additive
        with pytest.raises(UnsupportedError):
            layer.delta()
    elif not layer.has_delta:  # base-dependent: apply is checked against peft/lycoris in their parity tests
        assert not layer.additive and math.isnan(layer.fro_norm()) and math.isnan(layer.sparsity())
        for no_delta in (layer.delta, layer.delta_matrix, layer.delta_bias, layer.spectrum):
            with pytest.raises(UnsupportedError):
                no_delta()
        with pytest.raises(UnsupportedError):
            layer.unapply(new_w, new_b)
        assert new_w.dtype == torch.float32 and new_w.shape == w.shape and not torch.allclose(new_w, w)
        if not layer.changes_bias:
            assert torch.equal(new_b, b)
        torch.testing.assert_close(layer.delta_for(w), new_w - w)
        with pytest.raises(ShapeMismatchError):
            layer.apply(_r(9, 9, seed=42))
    elif layer.dora:
        ref = dora_apply(w.double(), _dense64(layer), layer.magnitude.double(), 0)
        torch.testing.assert_close(new_w.double(), ref, rtol=1e-5, atol=1e-5)
        assert not layer.additive and not layer.rowwise
    else:
        torch.testing.assert_close(new_w.double(), w.double() + _dense64(layer), rtol=1e-5, atol=1e-5)
        db = layer.delta_bias()
        torch.testing.assert_close(new_b, b if db is None else b + db)
        back, back_b = layer.unapply(new_w, new_b)
        torch.testing.assert_close(back, w, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(back_b, b, rtol=1e-5, atol=1e-5)
    if layer.rowwise:
        for weight in (1.0, 0.5, -1.0):
            want = w + weight * (layer.apply(w, b)[0] - w)
            cache: dict = {}
            out = torch.cat([layer.apply_rows(w[r0:r0 + 2].clone(), r0, min(r0 + 2, w.shape[0]), weight=weight,
                                              cache=cache) for r0 in range(0, w.shape[0], 2)])
            torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    else:
        with pytest.raises(UnsupportedError):
            layer.apply_rows(w.clone(), 0, w.shape[0])


@pytest.mark.parametrize("name", DELTA)
def test_fro_norm_inner_and_spectrum_match_dense(name):
    layer = SAMPLES[name]()
    d = _math64(layer)
    assert layer.fro_norm() == pytest.approx(float(d.norm()), rel=1e-5)
    for other_name in DELTA:
        other = SAMPLES[other_name]()
        od = _math64(other)
        got = layer.inner(other)
        if od.shape == d.shape:
            assert got == pytest.approx(float((d * od).sum()), rel=1e-5, abs=1e-6)
        else:
            assert math.isnan(got)
    s, _ = layer.spectrum()
    blocks = d
    if isinstance(layer, ExpertLoRA):  # the experts are separate matrices: the spectrum of their block diagonal
        blocks = torch.block_diag(*d.reshape(layer.num_experts, -1, d.shape[-1]))
    ref = torch.linalg.svdvals(blocks)
    k = min(s.numel(), ref.numel())
    torch.testing.assert_close(s[:k], ref[:k], rtol=1e-4, atol=1e-5)
    assert float(ref[k:].abs().max()) < 1e-4 if ref.numel() > k else True
    assert layer.sparsity() == pytest.approx(float((d == 0).double().mean()))


@pytest.mark.parametrize("name", list(SAMPLES))
def test_parts_round_trip_cast_and_nonfinite(name):
    layer = SAMPLES[name]()
    again = type(layer).from_parts(layer.parts(), shape=layer.shape, settings=layer.settings())
    assert again.settings() == layer.settings() and again.shape == layer.shape
    for k, t in layer.parts().items():
        assert torch.equal(again.parts()[k], t)
    half = layer.cast(torch.float16)
    index = type(layer).index_parts
    assert all(t.dtype == (layer.parts()[k].dtype if k in index else torch.float16) for k, t in half.parts().items())
    assert all(not layer.parts()[k].is_floating_point() for k in index)
    assert layer.nonfinite_fields() == []
    key = next(k for k in layer.parts() if k not in index)
    bad = layer.parts() | {key: torch.full_like(layer.parts()[key], math.nan)}
    broken = type(layer).from_parts(bad, shape=layer.shape, settings=layer.settings())
    assert broken.nonfinite_fields() == [key]


@pytest.mark.parametrize("name", list(SAMPLES))
def test_fit(name):
    layer = SAMPLES[name]()
    assert layer.fit(layer.shape, "conv" if len(layer.shape) > 2 else "linear").shape == tuple(layer.shape)
    assert layer.fit(layer.shape).shape == tuple(layer.shape)
    with pytest.raises(ShapeMismatchError):
        layer.fit((99, 98), "linear")
    if layer.has_delta and not layer.fan_in_fan_out and len(layer.shape) == 2 and layer.shape[0] != layer.shape[1]:
        t = layer.fit(tuple(layer.shape[::-1]), "conv1d")  # a Conv1D stores the transpose
        w, b = _r(*t.shape, seed=50), _r(layer.shape[0], seed=51)
        ref = layer.apply(w.T, b)[0].T
        torch.testing.assert_close(t.apply(w, b)[0], ref, rtol=1e-5, atol=1e-5)


def test_fit_takes_the_base_shape_where_the_tensors_leave_it_open():
    flat = LoHa(w1a=_r(4, 2, seed=60), w1b=_r(2, 27, seed=61), w2a=_r(4, 2, seed=62), w2b=_r(2, 27, seed=63),
                alpha=2.0, shape=(4, 27))
    conv = flat.fit((4, 3, 3, 3))
    assert conv.shape == (4, 3, 3, 3) and conv.module_type == "conv"
    torch.testing.assert_close(conv.delta().reshape(4, 27), flat.delta())
    ia3 = IA3(vector=_r(4, seed=64)).fit((4, 3, 3, 3))
    assert ia3.shape == (4, 3, 3, 3) and ia3.module_type == "conv"
    lin = LoRA(down=_r(2, 3, seed=65), up=_r(4, 2, seed=66), alpha=2.0, shape=(4, 3))
    one = lin.fit((4, 3, 1, 1))
    assert one.down.shape == (2, 3, 1, 1) and one.up.shape == (4, 2, 1, 1)
    torch.testing.assert_close(one.delta().reshape(4, 3), lin.delta())


@pytest.mark.parametrize("name", DELTA)
def test_to_lora(name):
    layer = SAMPLES[name]()
    why = layer.lora_obstacle()
    if why is not None:  # none of these samples (a per-input DoRA or a norm difference would be one)
        pytest.fail(f"{name}: {why}")
    new, energy, error, method = layer.to_lora(None)
    assert method in ("kept", "exact-svd")
    f = layer.factors()
    if f is not None:  # exact at the kind's own rank
        assert new.rank <= f[0].shape[1]
    # a LoRA on stacked experts stays one (PEFT loads it with target_parameters)
    assert isinstance(new, ExpertLoRA if isinstance(layer, ExpertLoRA) else LoRA)
    assert energy == pytest.approx(1.0) and error == pytest.approx(0.0, abs=1e-3)
    torch.testing.assert_close(new.delta().double(), _dense64(layer), rtol=1e-4, atol=1e-4)
    db = layer.delta_bias()
    if db is not None:  # the bias change is carried at the new scale
        torch.testing.assert_close(new.delta_bias(), db)
    small, energy1, error1, _ = layer.to_lora(1)
    assert small.rank == 1 and 0 < energy1 <= 1 and error1 == pytest.approx(math.sqrt(max(0.0, 1 - energy1)))
    if db is not None:
        torch.testing.assert_close(small.delta_bias(), db)


def test_ia3_has_no_lora_form_and_weighted_sum():
    a, b = SAMPLES["ia3_out"](), IA3(vector=_r(5, seed=70), shape=(5, 6))
    assert a.lora_obstacle() and a.update_vector() is not None
    with pytest.raises(UnsupportedError):
        a.to_lora(4)
    merged = IA3.weighted_sum([a, b], [0.5, 2.0])
    torch.testing.assert_close(merged.vector, 0.5 * a.vector + 2.0 * b.vector)
    with pytest.raises(ShapeMismatchError):
        IA3.weighted_sum([a, SAMPLES["ia3_in"]()], [1.0, 1.0])
    with pytest.raises(UnsupportedError):
        LoRA.weighted_sum([SAMPLES["lora"]()], [1.0])


def test_from_factors_builds_the_module_shapes():
    u, s, vh = torch.linalg.svd(_r(4, 27, seed=80), full_matrices=False)
    conv = LoRA.from_factors(u, s, vh, rank=4, shape=(4, 3, 3, 3))
    assert conv.up.shape == (4, 4, 1, 1) and conv.down.shape == (4, 3, 3, 3) and conv.module_type == "conv"
    torch.testing.assert_close(conv.delta().reshape(4, 27), u @ torch.diag(s) @ vh, rtol=1e-4, atol=1e-5)
    scaled = LoRA.from_factors(u, s, vh, rank=2, shape=(4, 27), alpha=8.0, rslora=True)
    torch.testing.assert_close(scaled.delta(), (u[:, :2] * s[:2]) @ vh[:2], rtol=1e-4, atol=1e-5)
    emb = LoRA.from_factors(u, s, vh, rank=3, shape=(27, 4), module_type="embedding", fan_in_fan_out=True)
    assert emb.delta().shape == (27, 4)


def test_replace_applies_the_tensor():
    value = _r(3, 4, seed=90)
    r = Replace(value)
    out, bias = r.apply(_r(3, 4, seed=91), _r(3, seed=92))
    assert torch.equal(bias, _r(3, seed=92)) and torch.equal(out, value) and not r.additive and not r.has_delta and not r.rowwise
    with pytest.raises(UnsupportedError):
        r.delta()


@pytest.mark.parametrize("name", BASE_DEPENDENT)
def test_base_dependent_kinds_need_the_base(name):
    layer = SAMPLES[name]()
    why = layer.lora_obstacle()
    assert "needs the base weight: pass --base" in why
    with pytest.raises(UnsupportedError, match="--base"):
        layer.to_lora(4)
    with pytest.raises(UnsupportedError):
        type(layer).weighted_sum([layer, layer], [0.5, 0.5])
    assert layer.factors() is None and layer.lora_ab() is None and layer.io_scales() is None
    assert "no base-free dW" in layer.note()
    if len(layer.shape) == 2 and layer.module_type != "norm":
        with pytest.raises(ShapeMismatchError):
            layer.fit(tuple(layer.shape[::-1]), "conv1d")


def test_integer_index_parts_are_declared_and_checked():
    from adaptkit.errors import FormatError

    for name in ("vblora", "fourierft", "waveft", "shira", "trainable_tokens"):
        layer = SAMPLES[name]()
        index = type(layer).index_parts
        assert index and all(not layer.parts()[k].is_floating_point() for k in index)
        bad = layer.parts() | {k: layer.parts()[k].float() for k in index}
        with pytest.raises(FormatError, match="positions"):
            type(layer).from_parts(bad, shape=layer.shape, settings=layer.settings())
