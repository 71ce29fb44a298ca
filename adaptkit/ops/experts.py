"""Expert layers on bases that store one module per expert (transformers checkpoints before their load-time fusion).

transformers 5 fuses MoE experts into 3-D parameters when it loads a model (``experts.gate_up_proj`` of shape
``(E, 2 * I, H)``, ``experts.down_proj`` ``(E, H, I)``), but most checkpoints on the hub (Qwen3-MoE, Qwen2-MoE,
OLMoE) still store ``experts.{e}.gate_proj.weight``, ``experts.{e}.up_proj.weight`` and ``experts.{e}.down_proj.weight``;
its conversion concatenates ``gate`` then ``up`` along the output rows. A PEFT ``target_parameters`` adapter names the
fused parameter, so fuse maps each expert's LoRA (:meth:`~adaptkit.core.kinds.base.Layer.experts`) onto those
tensors: ``down_proj`` expert ``e`` is ``experts.{e}.down_proj``, and the ``gate_up_proj`` expert's first ``I``
output rows are ``experts.{e}.gate_proj``, the last ``I`` ``experts.{e}.up_proj`` (exact: the rows of ``up``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Mapping
from typing import Any

#: a fused parameter name -> the per-expert module names its output rows are split into, in order
SPLITS = {"gate_up_proj": ("gate_proj", "up_proj")}


def _plain(lora: Any) -> Any:
    """An expert's LoRA for a per-expert ``nn.Linear`` weight ``(out, in)`` (a transposed expert becomes linear)."""
    if not lora.fan_in_fan_out:
        return lora
    return dataclasses.replace(lora, shape=tuple(reversed(lora.shape)), fan_in_fan_out=False)


def split_experts(layers: Mapping[str, Any], keys: Collection[str]) -> dict[str, Any]:
    """The layers with every expert layer whose parameter the base lacks mapped onto its per-expert weights.

    Args:
        layers: adapter layers by path.
        keys: the base's tensor names.

    Returns:
        The layers; an expert layer at ``<module>.<name>`` without a base tensor of that name, whose base has
        ``<module>.{e}.<name>.weight`` (or the :data:`SPLITS` of ``<name>``) for every expert ``e``, is replaced by
        one plain LoRA per expert module. Anything else is returned as it is (fuse then names what matches nothing).
    """
    keys = set(keys)
    out: dict[str, Any] = {}
    for path, layer in layers.items():
        experts = layer.experts()
        module, _, name = path.rpartition(".")
        if experts is None or path in keys or not module:
            out[path] = layer
            continue
        def present(n: str, module: str = module, experts: dict = experts) -> bool:
            return all(f"{module}.{e}.{n}.weight" in keys for e in experts)

        if present(name):
            out.update({f"{module}.{e}.{name}": _plain(lora) for e, lora in experts.items()})
        elif name in SPLITS and all(present(n) for n in SPLITS[name]):
            parts = SPLITS[name]
            for e, lora in experts.items():
                lora = _plain(lora)
                rows = lora.up.shape[0] // len(parts)
                for i, n in enumerate(parts):
                    out[f"{module}.{e}.{n}"] = dataclasses.replace(lora, up=lora.up[i * rows:(i + 1) * rows],
                                                                   shape=(rows, lora.shape[1]))
        else:
            out[path] = layer
    return out


__all__ = ["SPLITS", "split_experts"]
