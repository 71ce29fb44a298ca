"""LyCORIS diag-OFT, BOFT and GLoRA against lycoris' own modules: ``apply(W)`` equals ``get_merged_weight()``.

The modules are built by lycoris on tiny ``nn.Linear``/``nn.Conv2d`` layers, their parameters perturbed with
seeded noise, and the adaptkit layers built from lycoris' own ``state_dict`` (the tensors a file holds).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from adaptkit.core.kinds.glora import GLoRA
from adaptkit.core.kinds.lycoris_oft import LycorisOFT
from adaptkit.errors import UnsupportedError

from .kinds_peft_util import check

lycoris = pytest.importorskip("lycoris")


def _perturbed(module_cls, org, seed=3, noise=0.1, **kw):
    torch.manual_seed(seed)
    mod = module_cls("lora_test", org, 1.0, **kw)
    with torch.no_grad():
        for p in mod.parameters():
            p.add_(torch.randn_like(p) * noise)
    return mod


def _orgs():
    torch.manual_seed(0)
    return {"linear": nn.Linear(12, 16), "conv": nn.Conv2d(4, 8, 3)}


@pytest.mark.parametrize("rescaled", [False, True])
@pytest.mark.parametrize("constraint", [0.0, 1e-3])
@pytest.mark.parametrize("which", ["diag-oft", "boft"])
def test_lycoris_oft_matches_get_merged_weight(which, constraint, rescaled):
    from lycoris.modules.boft import ButterflyOFTModule
    from lycoris.modules.diag_oft import DiagOFTModule

    cls = DiagOFTModule if which == "diag-oft" else ButterflyOFTModule
    for name, org in _orgs().items():
        mod = _perturbed(cls, org, lora_dim=4, constraint=constraint, rescaled=rescaled)
        sd = mod.state_dict()
        layer = LycorisOFT(oft_blocks=sd["oft_blocks"], shape=tuple(org.weight.shape), constraint=float(sd["alpha"]),
                           rescale=sd.get("rescale"), module_type=name)
        assert layer.butterfly == (which == "boft")
        assert repr(layer).startswith("LycorisOFT(shape=")
        with torch.no_grad():
            ref = mod.get_merged_weight()[0]
        label = f"lycoris {which}{' constrained' if constraint else ''}{' rescaled' if rescaled else ''}"
        check(label, layer.apply(org.weight)[0], ref)
        with pytest.raises(UnsupportedError):
            layer.delta()


def test_glora_matches_get_merged_weight():
    from lycoris.modules.glora import GLoRAModule

    for name, org in _orgs().items():
        mod = _perturbed(GLoRAModule, org, lora_dim=3, alpha=5)
        sd = mod.state_dict()
        layer = GLoRA(a1=sd["a1.weight"], a2=sd["a2.weight"], b1=sd["b1.weight"], b2=sd["b2.weight"],
                      alpha=float(sd["alpha"]), shape=tuple(org.weight.shape), module_type=name)
        with torch.no_grad():
            ref, diff = mod.get_merged_weight()[0], mod.get_diff_weight()[0]
        check(f"lycoris glora {name}", layer.apply(org.weight)[0], ref)
        check(f"lycoris glora {name} delta_for", layer.delta_for(org.weight), diff)
        with pytest.raises(UnsupportedError):
            layer.delta()


def test_glora_tucker_core_matches_lycoris_math():
    """LyCORIS 4.1 never builds GLoRA's ``bm`` (its use_tucker test contradicts itself), so the Tucker half is
    checked against lycoris' own functional form ``_glora_weight`` with a ``bm`` from an older file layout."""
    from lycoris.modules.glora import _glora_weight

    torch.manual_seed(5)
    w = torch.randn(8, 4, 3, 3)
    a1, a2 = torch.randn(4, 3, 1, 1), torch.randn(3, 4, 1, 1)
    b1, b2, bm = torch.randn(8, 3, 1, 1), torch.randn(3, 4, 1, 1), torch.randn(3, 3, 3, 3)
    layer = GLoRA(a1=a1, a2=a2, b1=b1, b2=b2, bm=bm, alpha=6.0, shape=(8, 4, 3, 3), module_type="conv")
    check("lycoris glora tucker", layer.delta_for(w), _glora_weight(w, a1, a2, b1, b2, bm, 6.0 / 3))
