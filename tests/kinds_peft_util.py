"""Helpers for the kind-vs-peft parity tests: tiny models, real peft adapters with perturbed weights, error figures.

Every adapter here is made by the installed peft (``get_peft_model``) on a tiny torch model; all adapter
parameters are then perturbed with seeded noise so no factor is zero and no rotation is the identity. A test
builds the adaptkit layer from the *saved* state dict (``get_peft_model_state_dict``) plus the config, and
compares with peft's own ``get_delta_weight`` and ``merge_and_unload``.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

#: parity figures measured by the tests in this session (kind/variant -> max relative error), printed with -s
FIGURES: dict[str, float] = {}


class Tiny(nn.Module):
    """Two linears, a conv and an embedding: every module type the kinds adapt."""

    def __init__(self, d_in: int = 16, d_hidden: int = 24, d_out: int = 8, conv_in: int = 4, conv_out: int = 6,
                 vocab: int = 20, bias: bool = True) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d_in)
        self.lin1 = nn.Linear(d_in, d_hidden, bias=bias)
        self.lin2 = nn.Linear(d_hidden, d_out, bias=bias)
        self.conv = nn.Conv2d(conv_in, conv_out, 3, bias=bias)
        self.norm = nn.LayerNorm(d_hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin2(self.norm(self.lin1(self.emb(x))))


def tiny(seed: int = 0, dtype: torch.dtype = torch.float32, **kw) -> Tiny:
    """A seeded :class:`Tiny` in ``dtype``."""
    torch.manual_seed(seed)
    return Tiny(**kw).to(dtype).eval()


def make_peft(model: nn.Module, config, seed: int = 1, noise: float = 0.2, skip: tuple[str, ...] = ()):
    """``get_peft_model`` on a copy of ``model``, every trainable adapter tensor perturbed with seeded noise.

    Returns:
        ``(peft_model, base_copy)``: the peft model and an untouched copy of the base model's weights.
    """
    from peft import get_peft_model

    base = copy.deepcopy(model)
    torch.manual_seed(seed)
    pm = get_peft_model(model, config)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if p.requires_grad and not any(s in name for s in skip):
                p.add_(torch.randn_like(p) * noise)
    return pm, base


def saved(pm, name: str = "default") -> dict[str, torch.Tensor]:
    """The adapter state dict peft would save, keys without the ``base_model.model.`` prefix."""
    from peft import get_peft_model_state_dict

    sd = get_peft_model_state_dict(pm, adapter_name=name)
    return {k.removeprefix("base_model.model."): v.detach().clone() for k, v in sd.items()}


def module(pm, path: str):
    """The peft-wrapped module at ``path`` of the base model."""
    return pm.base_model.model.get_submodule(path)


def merged_weights(pm) -> dict[str, torch.Tensor]:
    """``merge_and_unload()``'s state dict (the peft model is consumed)."""
    with torch.no_grad():
        return {k: v.detach().clone() for k, v in pm.merge_and_unload().state_dict().items()}


def rel(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """Max relative error ``max|ours - ref| / max|ref|`` in float64."""
    ours, ref = ours.detach().double(), ref.detach().double()
    assert ours.shape == ref.shape, (tuple(ours.shape), tuple(ref.shape))
    assert bool(ref.abs().max() > 0), "the reference is all zeros: the comparison would prove nothing"
    return float((ours - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


def check(label: str, ours: torch.Tensor, ref: torch.Tensor, tol: float = 1e-6) -> float:
    """Assert ``rel(ours, ref) <= tol``, record the figure under ``label`` and return it."""
    err = rel(ours, ref)
    FIGURES[label] = max(err, FIGURES.get(label, 0.0))
    print(f"PARITY {label}: {err:.2e}")
    assert err <= tol, f"{label}: relative error {err:.3e} > {tol:g}"
    return err


def fuse_check(label: str, layers: dict, base, merged: dict[str, torch.Tensor], tol: float = 1e-6) -> None:
    """Every layer's ``apply(W, b)`` on the untouched base equals ``merge_and_unload``'s weight and bias.

    A bias the layer does not change must come back exactly (cast to float32); the layer's repr is one line.
    """
    base_sd = base.state_dict()
    for path, layer in layers.items():
        text = repr(layer)  # the one-line repr shared by all kinds: shapes, never values
        assert text.startswith(f"{type(layer).__name__}(shape=") and "tensor(" not in text, text
        w, b = layer.apply(base_sd[f"{path}.weight"], base_sd.get(f"{path}.bias"))
        check(f"{label} merge", w, merged[f"{path}.weight"], tol)
        if b is None:
            continue
        if layer.changes_bias:
            check(f"{label} merge bias", b, merged[f"{path}.bias"], tol)
        else:
            torch.testing.assert_close(b, merged[f"{path}.bias"].to(b.dtype), atol=0, rtol=0)
