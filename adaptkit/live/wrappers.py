"""The module wrapper :func:`adaptkit.inject` puts around each adapted layer.

:class:`AdaptedModule` wraps one ``nn.Linear``, ``nn.Conv1d/2d/3d``, ``nn.Embedding`` or transformers
``Conv1D`` (kept as ``base_layer``) and holds any number of named adapters. Each adapter's tensors live
on the wrapper as parameters (so ``.to()``, ``requires_grad`` and ``state_dict`` work as usual); its
non-tensor fields (alpha, shape, rsLoRA ...) are kept next to them, and the kind object of
:mod:`adaptkit.kinds` is rebuilt from both whenever it is needed. All adapter math comes from the kinds:

* additive kinds with ``layer.factors()`` (LoRA, plain LoHa): the low-rank path ``(x @ V^T) @ U^T`` (a conv
  runs ``V`` as a conv with the base layer's stride/padding and ``U`` as a 1x1 conv; an embedding looks
  ``V^T`` up), plus ``layer.delta_bias()``. The dense ``m x n`` delta is never built (grouped convs take the
  dense path).
* other additive kinds (LoKr, Full, Tucker LoHa): the base layer's op with ``layer.delta()`` as weight (PEFT
  does the same).
* DoRA: the base layer's op with ``W' - W`` from ``layer.apply(W, b)`` (one dense weight).
* kinds with ``layer.io_scales()`` (IA3): the multiplier scales the input or the output of the base layer.

Merging keeps a copy of the original weight and bias at the first merge; unmerging restores it
bit-exactly and re-merges the adapters that stay merged, so merge/unmerge round trips are exact.

The wrapper exposes the same attributes as a PEFT tuner layer (``adapter_layer_names``,
``active_adapters``, ``merged_adapters``, ``disable_adapters``, ``_get_available_adapters``), so the
status code reads adaptkit and PEFT layers alike.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..core.kinds import Layer
from ..core.kinds.base import MODULE_TYPES, nonfinite_fields
from ..errors import NonFiniteError, UnsupportedError


def base_kind(module: nn.Module) -> str | None:
    """``"linear"``, ``"conv1d"`` (transformers ``Conv1D``), ``"conv"``, ``"embedding"`` or ``None`` (not adaptable)."""
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return "conv"
    if isinstance(module, nn.Embedding):
        return "embedding"
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf") and getattr(module, "weight", None) is not None:
        return "conv1d"
    return None


def fit_layer(layer: Layer, base: nn.Module) -> Layer:
    """Return ``layer`` made to fit ``base`` (the kind's ``fit`` with the module's weight shape and kind), or raise.

    Raises:
        ShapeMismatchError: the layer cannot act on this module; the message gives both shapes.
    """
    return layer.fit(tuple(base.weight.shape), base_kind(base))


def _as_param(t: torch.Tensor, trainable: bool) -> nn.Parameter:
    return nn.Parameter(t.detach().clone(), requires_grad=trainable and t.is_floating_point())


class AdapterParams(nn.Module):
    """One adapter's tensors as parameters named by the kind's fields (a plain module, not an ``nn.ParameterDict``,
    whose ``values``/``keys``/``items`` methods would clash with fields of those names: FourierFT's ``values``)."""

    def __init__(self, tensors: dict[str, nn.Parameter]) -> None:
        super().__init__()
        for name, p in tensors.items():
            self.register_parameter(name, p)

    def tensors(self) -> dict[str, torch.Tensor]:
        """Field name -> parameter."""
        return dict(self.named_parameters(recurse=False))

    def __getitem__(self, name: str) -> nn.Parameter:
        """The parameter of field ``name`` (as ``nn.ParameterDict`` indexing)."""
        return self._parameters[name]

    def __contains__(self, name: object) -> bool:
        return name in self._parameters


class AdaptedModule(nn.Module):
    """A base layer plus named adapters (see the module docstring).

    Args:
        base_layer: the wrapped module (kept unchanged except while adapters are merged into it).
    """

    #: names of the attributes that hold per-adapter parameters (PEFT's tuner-layer convention)
    adapter_layer_names: tuple[str, ...] = ("adapter_params",)
    other_param_names: tuple[str, ...] = ()

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        if base_kind(base_layer) is None:
            raise UnsupportedError(f"adaptkit cannot adapt a {type(base_layer).__name__}; it adapts Linear, Conv1d/2d/3d, "
                                   "Embedding and transformers Conv1D")
        self.base_layer = base_layer
        self.adapter_params = nn.ModuleDict()
        self._fields: dict[str, tuple[type[Layer], tuple[int, ...] | None, dict[str, Any]]] = {}
        self._active: list[str] = []
        self._merged: list[str] = []
        self._disabled = False
        self._original: tuple[torch.Tensor, torch.Tensor | None] | None = None

    # ------------------------------------------------------------------------------ PEFT-like state

    def _get_name(self) -> str:  # shapes repr(): "adaptkit.Linear(...)", as PEFT's "lora.Linear(...)"
        return f"adaptkit.{type(self.base_layer).__name__}"

    @property
    def active_adapters(self) -> list[str]:
        """Names of the active adapters (in the order they were set)."""
        return list(self._active)

    @property
    def merged_adapters(self) -> list[str]:
        """Names of the adapters merged into the base weight, in merge order."""
        return list(self._merged)

    @property
    def merged(self) -> bool:
        """True when at least one adapter is merged."""
        return bool(self._merged)

    @property
    def disable_adapters(self) -> bool:
        """True while adapters are disabled (the layer then computes the base layer's output)."""
        return self._disabled

    def _get_available_adapters(self) -> set[str]:
        return set(self.adapter_params.keys())

    def get_base_layer(self) -> nn.Module:
        """The wrapped module."""
        return self.base_layer

    @property
    def weight(self) -> torch.Tensor:
        """The base layer's weight (so code reading ``module.weight`` keeps working)."""
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        """The base layer's bias."""
        return getattr(self.base_layer, "bias", None)

    # ------------------------------------------------------------------------------ adapters

    def add(self, name: str, layer: Layer, trainable: bool = False) -> None:
        """Add (or replace) adapter ``name`` from a kind object; it is fitted to the base layer first.

        Raises:
            NonFiniteError: the layer holds NaN or Inf (tensors, alpha or scale), which would make every output NaN.
            ShapeMismatchError / UnsupportedError: as :func:`fit_layer`.
        """
        bad = nonfinite_fields(layer)
        if bad:
            raise NonFiniteError(f"adapter '{name}' has NaN or Inf in {', '.join(bad)} of its {layer.kind} layer; it would "
                                 "make this module's outputs NaN: fix or re-save the checkpoint")
        layer = fit_layer(layer, self.base_layer)
        if name in self._merged:
            self.unmerge([name])
        device = self.base_layer.weight.device
        tensors = {k: _as_param(t.to(device), trainable) for k, t in layer.parts().items()}
        self.adapter_params[name] = AdapterParams(tensors)
        self._fields[name] = (type(layer), layer.shape, layer.settings())

    def layer(self, name: str) -> Layer:
        """The kind object of adapter ``name``, built on the current parameters (gradients flow through)."""
        cls, shape, settings = self._fields[name]
        return cls.from_parts(self.adapter_params[name].tensors(), shape=shape, settings=settings)

    def remove(self, name: str) -> None:
        """Delete adapter ``name`` (unmerging it first)."""
        if name in self._merged:
            self.unmerge([name])
        del self.adapter_params[name]
        del self._fields[name]
        self._active = [n for n in self._active if n != name]

    def set_active(self, names: list[str]) -> None:
        """Set the active adapters (names missing on this layer are kept and ignored, as PEFT does)."""
        self._active = list(names)

    def set_disabled(self, disabled: bool) -> None:
        """Disable (``True``) or enable the adapters of this layer."""
        self._disabled = bool(disabled)

    # ------------------------------------------------------------------------------ merging

    def merge(self, names: list[str]) -> None:
        """Merge adapters into the base weight in place (a copy of the original weight is kept)."""
        base = self.base_layer
        for name in names:
            if name in self._merged or name not in self.adapter_params:
                continue
            bias = getattr(base, "bias", None)
            if self._original is None:
                self._original = (base.weight.detach().clone(), None if bias is None else bias.detach().clone())
            with torch.no_grad():
                layer = self.layer(name)
                try:
                    layer.apply_bias(bias)  # raises when the layer changes a bias the module lacks
                except UnsupportedError:
                    raise UnsupportedError(f"adapter '{name}' changes a bias the base layer does not have; "
                                           "it cannot be merged (keep it unmerged)") from None
                new_w, new_b = layer.apply(base.weight, bias)
                base.weight.copy_(new_w.to(base.weight.dtype))
                if bias is not None and new_b is not None:
                    bias.copy_(new_b.to(bias.dtype))
            self._merged.append(name)

    def unmerge(self, names: list[str] | None = None) -> None:
        """Unmerge adapters (all when ``names`` is None): restore the original weight, re-merge the rest."""
        if not self._merged:
            return
        drop = set(self._merged if names is None else names)
        keep = [n for n in self._merged if n not in drop]
        base = self.base_layer
        weight, bias = self._original
        with torch.no_grad():
            base.weight.copy_(weight)
            if bias is not None:
                base.bias.copy_(bias)
        self._merged = []
        self._original = None
        self.merge(keep)

    # ------------------------------------------------------------------------------ forward

    def _op(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """The base layer's operation with another weight/bias (module orientation)."""
        base = self.base_layer
        kind = base_kind(base)
        weight = weight.to(x.dtype) if x.is_floating_point() else weight
        bias = None if bias is None else bias.to(weight.dtype)
        if kind == "linear":
            return F.linear(x, weight, bias)
        if kind == "conv1d":
            out = x.reshape(-1, x.shape[-1]) @ weight
            out = out.reshape(*x.shape[:-1], weight.shape[-1])
            return out if bias is None else out + bias
        if kind == "conv":
            return base._conv_forward(x, weight, bias)
        out = F.embedding(x, weight, base.padding_idx, base.max_norm, base.norm_type, base.scale_grad_by_freq, base.sparse)
        return out if bias is None else out + bias

    def _add_bias(self, out: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        if base_kind(self.base_layer) == "conv":
            return out + bias.to(out.dtype).view(1, -1, *([1] * (out.ndim - 2)))
        return out + bias.to(out.dtype)

    def _low_rank(self, layer: Layer, u: torch.Tensor, v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``U (V x)`` for a factored delta ``U V`` (LoRA: ``scale * B(A(x))``) without building the dense delta."""
        base = self.base_layer
        kind = base_kind(base)
        if kind == "embedding":
            hidden = F.embedding(x, v.T, base.padding_idx, base.max_norm, base.norm_type, base.scale_grad_by_freq,
                                 base.sparse)
            return hidden @ u.T.to(hidden.dtype)
        u, v = u.to(x.dtype), v.to(x.dtype)
        if kind == "conv":
            nd = base.weight.ndim - 2
            hidden = base._conv_forward(x, v.reshape(v.shape[0], *base.weight.shape[1:]), None)
            conv = (F.conv1d, F.conv2d, F.conv3d)[nd - 1]
            return conv(hidden, u.reshape(*u.shape, *([1] * nd)))
        return (x @ v.T) @ u.T

    def _contribution(self, layer: Layer, x: torch.Tensor) -> torch.Tensor:
        base = self.base_layer
        factors = layer.factors() if layer.additive and getattr(base, "groups", 1) == 1 else None
        # low rank where that is cheaper (a LoHa's rank r^2 may not be); a grouped conv cannot run V as its conv
        if factors is not None and factors[0].shape[1] < min(factors[0].shape[0], factors[1].shape[1]):
            out = self._low_rank(layer, *factors, x)
            db = layer.delta_bias()
            return out if db is None else self._add_bias(out, db)
        if layer.additive:
            delta = layer.delta().reshape(base.weight.shape)
            return self._op(x, delta, layer.delta_bias())
        # DoRA: the change the kind makes to this weight
        bias = getattr(base, "bias", None)
        new_w, new_b = layer.apply(base.weight, bias)
        d_b = new_b if new_b is None or bias is None else new_b - bias.to(torch.float32)
        return self._op(x, new_w - base.weight.to(torch.float32), d_b)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Base output plus the effect of every active, unmerged adapter (nothing while disabled)."""
        base = self.base_layer
        if self._disabled:
            if self._merged:  # the original weight, without unmerging
                weight, bias = self._original
                return self._op(x, weight.to(x.device), None if bias is None else bias.to(x.device))
            return base(x, *args, **kwargs)
        pending = [self.layer(n) for n in self._active if n in self.adapter_params and n not in self._merged]
        if not pending:
            return base(x, *args, **kwargs)
        channel_dim = 1 if base_kind(base) == "conv" else -1
        x_in = x
        scales = [(layer, layer.io_scales()) for layer in pending]  # IA3: feature multipliers instead of a dW
        for _, io in scales:
            if io is not None and io[0] is not None:
                x_in = x_in * _view(io[0], x_in, channel_dim)
        result = base(x_in, *args, **kwargs)
        bias = getattr(base, "bias", None)
        for layer, io in scales:
            if io is not None and io[1] is not None:
                scale = _view(io[1], result, channel_dim)
                if bias is None or layer.changes_bias:
                    result = result * scale
                else:  # LyCORIS IA3 scales W only: keep the bias as it is
                    b = _view(bias, result, channel_dim)
                    result = (result - b) * scale + b
        for layer, io in scales:
            if io is None:
                result = result + self._contribution(layer, x).to(result.dtype)
        return result


def _view(vector: torch.Tensor, like: torch.Tensor, dim: int) -> torch.Tensor:
    shape = [1] * like.ndim
    shape[dim] = -1
    return vector.to(like.dtype).view(shape)


__all__ = ["MODULE_TYPES", "AdaptedModule", "base_kind", "fit_layer"]
