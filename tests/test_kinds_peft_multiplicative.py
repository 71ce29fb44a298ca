"""OFT, BOFT, HRA, LN tuning and trainable tokens against the real peft: base-dependent kinds.

peft's ``get_delta_weight`` for OFT/BOFT/HRA returns the rotation itself; the layers' ``rotation()`` /
``reflection()`` are compared with it, and ``apply(W, b)`` with ``merge_and_unload``.
"""

from __future__ import annotations

import pytest
import torch

from adaptkit.core.kinds.boft import BOFT
from adaptkit.core.kinds.hra import HRA
from adaptkit.core.kinds.ln_tuning import LNTuning
from adaptkit.core.kinds.oft import OFT
from adaptkit.core.kinds.trainable_tokens import TrainableTokens
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


def _module_type(path):
    return {"conv": "conv", "emb": "embedding"}.get(path, "linear")


@pytest.mark.parametrize(("neumann", "terms", "coft", "share"), [
    (True, 5, False, False), (True, 3, False, False), (False, 5, False, False), (True, 5, True, False),
    (False, 5, False, True),
])
def test_oft_rotation_and_merge(neumann, terms, coft, share):
    from peft import OFTConfig

    paths = ["lin1"] if share else ["lin1", "conv", "emb"]
    model = tiny(dtype=torch.float64)
    config = OFTConfig(r=0, oft_block_size=4, target_modules=paths, use_cayley_neumann=neumann,
                       num_cayley_neumann_terms=terms, coft=coft, eps=1e-2, block_share=share)
    pm, base = make_peft(model, config, noise=0.1)
    sd = saved(pm)
    label = f"oft{' neumann' if neumann else ' exact'}{terms if neumann else ''}{' coft' if coft else ''}" \
            f"{' share' if share else ''}"
    layers = {}
    for path in paths:
        key = f"{path}.oft_embedding_R.weight" if path == "emb" else f"{path}.oft_R.weight"
        layers[path] = OFT(weight=sd[key], shape=tuple(base.get_submodule(path).weight.shape),
                           module_type=_module_type(path), coft=coft, eps=1e-2, use_cayley_neumann=neumann,
                           num_cayley_neumann_terms=terms)
        ref = module(pm, path).get_delta_weight("default")
        check(f"{label} rotation", layers[path].rotation(), ref)
        with pytest.raises(UnsupportedError, match="apply"):
            layers[path].delta()
    fuse_check(label, layers, base, merged_weights(pm))


def test_boft_linear_and_conv_merge():
    from peft import BOFTConfig

    model = tiny(dtype=torch.float64)
    pm, base = make_peft(model, BOFTConfig(boft_block_size=4, target_modules=["lin1", "conv"], init_weights=False))
    sd = saved(pm)
    layers = {}
    for path in ("lin1", "conv"):
        layers[path] = BOFT(boft_r=sd[f"{path}.boft_R"], boft_s=sd[f"{path}.boft_s"],
                            shape=tuple(base.get_submodule(path).weight.shape), module_type=_module_type(path))
        check("boft rotation", layers[path].rotation(), module(pm, path).get_delta_weight("default")[0])
    fuse_check("boft", layers, base, merged_weights(pm))


def test_boft_several_butterfly_factors(monkeypatch):
    """m > 1 needs peft's CUDA block-diagonal; stand in for it with the same math in torch to run peft's own path."""
    import peft.tuners.boft.layer as boft_layer
    from peft import BOFTConfig

    class _TorchBlockDiag:
        @staticmethod
        def apply(blocks):  # (N, D, H, H) -> (N, D*H, D*H), what the CUDA kernel computes
            return torch.stack([torch.block_diag(*torch.unbind(b)) for b in blocks])

    monkeypatch.setattr(boft_layer, "get_fbd_cuda", lambda: object())
    monkeypatch.setattr(boft_layer, "FastBlockDiag", _TorchBlockDiag)
    model = tiny(d_in=16, d_hidden=32, dtype=torch.float64)
    pm, base = make_peft(model, BOFTConfig(boft_block_size=2, boft_n_butterfly_factor=3, target_modules=["lin1", "lin2"],
                                           init_weights=False))
    sd = saved(pm)
    layers = {}
    for path in ("lin1", "lin2"):
        assert sd[f"{path}.boft_R"].shape[0] == 3
        layers[path] = BOFT(boft_r=sd[f"{path}.boft_R"], boft_s=sd[f"{path}.boft_s"],
                            shape=tuple(base.get_submodule(path).weight.shape))
        check("boft m=3 rotation", layers[path].rotation(), module(pm, path).get_delta_weight("default")[0])
    fuse_check("boft m=3", layers, base, merged_weights(pm))


@pytest.mark.parametrize("gs", [False, True])
def test_hra_reflection_and_merge(gs):
    from peft import HRAConfig

    model = tiny(dtype=torch.float64)
    pm, base = make_peft(model, HRAConfig(r=4, apply_GS=gs, target_modules=["lin1", "conv"], init_weights=False))
    sd = saved(pm)
    layers = {}
    for path in ("lin1", "conv"):
        layers[path] = HRA(u=sd[f"{path}.hra_u"], shape=tuple(base.get_submodule(path).weight.shape), apply_gs=gs,
                           module_type=_module_type(path))
        check(f"hra{' gs' if gs else ''} reflection", layers[path].reflection(),
              module(pm, path).get_delta_weight("default"))
    fuse_check(f"hra{' gs' if gs else ''}", layers, base, merged_weights(pm))


def test_ln_tuning_replaces_weight_and_bias():
    from peft import LNTuningConfig

    model = tiny()
    pm, base = make_peft(model, LNTuningConfig(target_modules=["norm"]))
    sd = saved(pm)
    layer = LNTuning(weight=sd["norm.ln_tuning_layers.weight"], bias=sd["norm.ln_tuning_layers.bias"], shape=(24,))
    assert layer.changes_bias and not layer.additive
    fuse_check("ln_tuning", {"norm": layer}, base, merged_weights(pm))
    torch.testing.assert_close(layer.delta_for(base.norm.weight.detach()),
                               sd["norm.ln_tuning_layers.weight"] - base.norm.weight.detach())


def test_trainable_tokens_replace_rows():
    from peft import TrainableTokensConfig

    model = tiny()
    pm, base = make_peft(model, TrainableTokensConfig(target_modules=["emb"], token_indices=[1, 5, 7]))
    sd = saved(pm)
    layer = TrainableTokens(values=sd["emb.trainable_tokens_delta"], token_indices=torch.tensor([1, 5, 7]),
                            shape=(20, 16))
    fuse_check("trainable_tokens", {"emb": layer}, base, merged_weights(pm))
    with pytest.raises(UnsupportedError):
        layer.unapply(base.emb.weight)
