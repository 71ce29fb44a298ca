"""FourierFT, WaveFT, SHiRA, C3A, MiSS against the real peft: delta and merge parity on tiny models."""

from __future__ import annotations

import pytest
import torch

from adaptkit.core.kinds.c3a import C3A
from adaptkit.core.kinds.fourierft import FourierFT
from adaptkit.core.kinds.miss import MiSS, MiSSBat
from adaptkit.core.kinds.positions import seeded_positions
from adaptkit.core.kinds.shira import SHiRA
from adaptkit.core.kinds.waveft import WaveFT
from adaptkit.errors import UnsupportedError

from .kinds_peft_util import (
    check,
    fuse_check,
    make_peft,
    merged_weights,
    module,
    saved,
    tiny,
)

peft = pytest.importorskip("peft")

PATHS = ("lin1", "lin2")


def _shape(base, path):
    return tuple(base.get_submodule(path).weight.shape)


def test_fourierft_positions_are_regenerated_from_the_seed():
    from peft import FourierFTConfig

    model = tiny()
    pm, base = make_peft(model, FourierFTConfig(n_frequency=30, scaling=50.0, random_loc_seed=123,
                                                target_modules=list(PATHS)))
    sd = saved(pm)
    assert sorted(sd) == ["lin1.fourierft_spectrum", "lin2.fourierft_spectrum"]  # no positions in the file
    layers = {}
    for p in PATHS:
        out, inp = _shape(base, p)
        pos = seeded_positions(out, inp, 30, 123)
        assert torch.equal(pos, module(pm, p).indices["default"])
        layers[p] = FourierFT(values=sd[f"{p}.fourierft_spectrum"], indices=pos, scaling=50.0, shape=(out, inp))
        check("fourierft delta", layers[p].delta(), module(pm, p).get_delta_weight("default"))
    fuse_check("fourierft", layers, base, merged_weights(pm))


def test_fourierft_conv1d_delta_is_module_orientation():
    from peft import FourierFTConfig
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    model = torch.nn.Sequential()
    model.add_module("c", Conv1D(10, 6))  # weight (6, 10): in 6, out 10
    pm, base = make_peft(model, FourierFTConfig(n_frequency=12, target_modules=["c"], fan_in_fan_out=True))
    sd = saved(pm)
    layer = FourierFT(values=sd["c.fourierft_spectrum"], indices=seeded_positions(10, 6, 12, 777), scaling=150.0,
                      shape=(6, 10), fan_in_fan_out=True)
    check("fourierft conv1d delta", layer.delta(), module(pm, "c").get_delta_weight("default").T)
    fuse_check("fourierft conv1d", {"c": layer}, base, merged_weights(pm))


@pytest.mark.parametrize(("use_idwt", "family"), [(False, "db1"), (True, "db1"), (True, "db3"), (True, "sym2")])
def test_waveft_delta_and_merge(use_idwt, family):
    from peft import WaveFTConfig

    model = tiny()
    pm, base = make_peft(model, WaveFTConfig(n_frequency=40, scaling=3.0, wavelet_family=family, use_idwt=use_idwt,
                                             random_loc_seed=5, target_modules=list(PATHS)))
    sd = saved(pm)
    layers = {}
    for p in PATHS:
        out, inp = _shape(base, p)
        layers[p] = WaveFT(values=sd[f"{p}.waveft_spectrum"], indices=seeded_positions(out, inp, 40, 5), scaling=3.0,
                           shape=(out, inp), wavelet_family=family, use_idwt=use_idwt)
        check(f"waveft {family if use_idwt else 'no-idwt'} delta", layers[p].delta(),
              module(pm, p).get_delta_weight("default"))
    fuse_check("waveft", layers, base, merged_weights(pm))


def test_waveft_unknown_family_is_refused():
    layer = WaveFT(values=torch.ones(3), indices=seeded_positions(4, 4, 3, 1), scaling=1.0, shape=(4, 4),
                   wavelet_family="nope")
    with pytest.raises(UnsupportedError, match="wavelet family"):
        layer.delta()


def test_shira_integer_positions_delta_and_merge():
    from peft import ShiraConfig

    model = tiny()
    pm, base = make_peft(model, ShiraConfig(r=2, target_modules=list(PATHS), init_weights=False))
    sd = saved(pm)
    layers = {}
    for p in PATHS:
        idx = sd[f"{p}.shira_indices"]
        assert not idx.is_floating_point()
        layers[p] = SHiRA(values=sd[f"{p}.shira_weight"], indices=idx, shape=_shape(base, p))
        check("shira delta", layers[p].delta(), module(pm, p).get_delta_weight("default").to_dense())
    fuse_check("shira", layers, base, merged_weights(pm))


def test_shira_float_indices_are_refused_by_the_layer():
    from adaptkit.errors import FormatError

    with pytest.raises(FormatError, match="positions"):
        SHiRA(values=torch.ones(2), indices=torch.zeros(2, 2), shape=(3, 3))


def test_c3a_delta_and_merge():
    from peft import C3AConfig

    model = tiny()
    pm, base = make_peft(model, C3AConfig(block_size=4, target_modules=list(PATHS), init_weights="gaussian"))
    sd = saved(pm)
    layers = {p: C3A(kernel=sd[f"{p}.c3a_kernel"], shape=_shape(base, p)) for p in PATHS}
    for p, layer in layers.items():
        check("c3a delta", layer.delta(), module(pm, p).get_delta_weight("default"))
    fuse_check("c3a", layers, base, merged_weights(pm))


@pytest.mark.parametrize("init", [False, "mini", "bat"])
def test_miss_layouts_merge(init):
    """peft's MiSS get_delta_weight needs the base weight, so parity is checked against merge_and_unload."""
    from peft import MissConfig

    model = tiny(d_in=16, d_hidden=24, d_out=8)
    kw = {"mini_r": 4} if init == "mini" else {}
    r = 4 if init == "bat" else 5  # default/mini: 16 and 24 are not multiples of 5 (the partial-tile path)
    pm, base = make_peft(model, MissConfig(r=r, target_modules=list(PATHS), init_weights=init, **kw))
    sd = saved(pm)
    cls = MiSSBat if init == "bat" else MiSS
    layers = {p: cls(block=sd[f"{p}.miss_block"], shape=_shape(base, p)) for p in PATHS}
    if init == "bat":
        with pytest.raises(UnsupportedError, match="apply"):
            layers["lin1"].delta()
    else:
        base_w = base.lin1.weight.detach().clone()
        ref = module(pm, "lin1").get_delta_weight_miss("default", base_w.clone()) - base_w
        check("miss delta", layers["lin1"].delta(), ref)
    fuse_check(f"miss {init or 'default'}", layers, base, merged_weights(pm))
