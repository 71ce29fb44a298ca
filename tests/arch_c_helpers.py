"""Shared steps of the HunyuanVideo / LTX-Video / HiDream architecture tests (tests/test_arch_*.py of helper arch-c).

A tiny diffusers model gets a perturbed PEFT LoRA on every weight-bearing Linear/Conv module (per-module alphas
through ``alpha_pattern``), diffusers saves it, adaptkit reads it; the checks compare dense deltas (never factors)
and model outputs. The oracle state dicts are what the original-layout files hold: ``diffusion_model.<original
path>.lora_A.weight`` / ``lora_B.weight`` with the scale baked into ``lora_B`` (diffusers' converters for these
architectures read no ``alpha`` keys).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch

import adaptkit as ak
from adaptkit.formats.arch import Arch
from adaptkit.formats.arch.remap import to_namespace

WEIGHTED = (torch.nn.Linear, torch.nn.Conv2d, torch.nn.Conv3d)


def lora_targets(model: torch.nn.Module) -> list[str]:
    """Every weight-bearing Linear/Conv module of ``model`` (what a LoRA can target)."""
    return [n for n, m in model.named_modules() if n and isinstance(m, WEIGHTED)]


def peft_adapter(model: torch.nn.Module, out: Path, pipeline: str, *, targets: Iterable[str] | None = None, r: int = 4,
                 alpha: float = 8.0, alpha_pattern: Mapping[str, float] | None = None, seed: int = 1,
                 name: str = "default") -> ak.Adapter:
    """A perturbed LoRA added to ``model`` in place (adapter ``name``, made active), saved by the diffusers pipeline
    class's own ``save_lora_weights`` and read back with ``ak.load(format="diffusers")``; checks that every layer's
    scale is PEFT's."""
    import diffusers
    import peft
    from peft.utils import get_peft_model_state_dict

    targets = sorted(targets if targets is not None else lora_targets(model))
    cfg = peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, init_lora_weights=False,
                          alpha_pattern=dict(alpha_pattern or {}))
    torch.manual_seed(seed)
    model.add_adapter(cfg, adapter_name=name)
    model.set_adapter(name)
    getattr(diffusers, pipeline).save_lora_weights(
        str(out), transformer_lora_layers=get_peft_model_state_dict(model, adapter_name=name),
        transformer_lora_adapter_metadata=model.peft_config[name].to_dict())
    a = ak.load(str(out), format="diffusers")
    mods = dict(model.named_modules())
    wrong = [p for p, layer in a.layers.items() if abs(layer.scale - mods[p.partition(".")[2]].scaling[name]) > 1e-12]
    assert not wrong, f"scales differ from PEFT's: {wrong[:3]}"
    return a


def coverage_gaps(arch: Arch, model: torch.nn.Module) -> list[str]:
    """Targets whose diffusers path no rule maps, or whose original path does not map back to it."""
    gaps = []
    for path in lora_targets(model):
        hit = arch.to_original(path)
        if hit is None or path not in (arch.to_diffusers(hit[1]) or (None, ()))[1]:
            gaps.append(path)
    return gaps


def rel(x: torch.Tensor, y: torch.Tensor) -> float:
    """``‖x - y‖ / ‖y‖`` in float64."""
    return float((x.double() - y.double()).norm() / y.double().norm())


def round_trip(a: ak.Adapter, base: torch.nn.Module) -> dict[str, float]:
    """diffusers -> original -> diffusers: the measured figures (max ΔW error, max MapRow errors, counts, how many
    layers kept their tensors bit for bit); asserts every layer is back with the same path."""
    orig, rows_o = to_namespace(a, "original", base=base)
    back, rows_d = to_namespace(orig, "diffusers", base=base)
    assert set(back.layers) == set(a.layers)
    errs = {p: rel(back.layers[p].delta_matrix(), a.layers[p].delta_matrix()) for p in a.layers}
    equal = sum(torch.equal(back.layers[p].up, a.layers[p].up) and torch.equal(back.layers[p].down, a.layers[p].down)
                for p in a.layers)
    return {"layers": len(a.layers), "original_layers": len(orig.layers), "delta": max(errs.values()),
            "row_original": max(r.error for r in rows_o), "row_diffusers": max(r.error for r in rows_d),
            "tensors_equal": equal, "stacked": sum(r.action == "stack" for r in rows_o)}


def original_state_dict(orig: ak.Adapter, prefix: str = "diffusion_model.",
                        skip: Iterable[str] = ()) -> dict[str, torch.Tensor]:
    """The original-layout LoRA file of an original-namespace adapter (``unet.<path>`` layers), scale baked in."""
    skip = tuple(skip)
    sd = {}
    for path, layer in orig.layers.items():
        rel_path = path.partition(".")[2]
        if any(s in rel_path for s in skip):
            continue
        sd[f"{prefix}{rel_path}.lora_A.weight"] = layer.down.clone().contiguous()
        sd[f"{prefix}{rel_path}.lora_B.weight"] = (layer.up * layer.scale).contiguous()
    return sd


def converted_deltas(converted: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor | str]:
    """Dense ΔW per module of a diffusers ``transformer.<path>.lora_A/B`` state dict (``"shape"`` where A and B do
    not multiply)."""
    out: dict[str, torch.Tensor | str] = {}
    for key in converted:
        if not key.endswith(".lora_A.weight"):
            continue
        mod = key[: -len(".lora_A.weight")]
        a, b = converted[key], converted[mod + ".lora_B.weight"]
        a2, b2 = a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1)
        out[mod] = b2.float() @ a2.float() if b2.shape[1] == a2.shape[0] else "shape"
    return out


def oracle_mismatches(converted: Mapping[str, torch.Tensor], a: ak.Adapter, rtol: float = 1e-5) -> dict[str, str]:
    """Modules where diffusers' conversion of the original file and adaptkit's diffusers-namespace adapter disagree
    (``{module: why}``); modules only one side has are listed too. Returns the worst agreeing error under ``""``."""
    deltas = converted_deltas(converted)
    bad: dict[str, str] = {}
    worst = 0.0
    for mod, d in deltas.items():
        ref = a.layers.get(mod)
        if ref is None:
            bad[mod] = "not a module of the adapter"
        elif isinstance(d, str):
            bad[mod] = d
        else:
            e = rel(d, ref.delta_matrix())
            if e > rtol:
                bad[mod] = f"error {e:.3g}"
            else:
                worst = max(worst, e)
    for mod in a.layers:
        if mod not in deltas:
            bad.setdefault(mod, "missing from the converted file")
    bad[""] = f"{worst:.3g}"
    return bad


def load_converted(base: torch.nn.Module, converted: Mapping[str, torch.Tensor]) -> torch.nn.Module:
    """A fresh copy of ``base`` with diffusers' ``load_lora_adapter`` of the converted state dict."""
    fresh = copy.deepcopy(base)
    fresh.load_lora_adapter(dict(converted), prefix="transformer", adapter_name="oracle")
    return fresh.eval()


def written_round_trips(a: ak.Adapter, base: torch.nn.Module, out: Path) -> dict[str, object]:
    """Through the public API: ``ak.save`` to comfyui (original names), kohya (``naming="original"``) and, from the
    original namespace, diffusers; ``ak.load`` of each (layout detected from the keys; kohya's flattened names need
    the tiny base to resolve). Returns ``{layout: max ΔW error against a}`` and the written paths."""
    orig, _ = to_namespace(a, "original", base=base)
    figures: dict[str, object] = {}
    paths = {"comfyui": ak.save(a, out / "comfyui", format="comfyui", base=base),
             "kohya": ak.save(a, out / "kohya", format="kohya", naming="original", base=base),
             "diffusers": ak.save(orig, out / "diffusers", format="diffusers", base=base)}
    for layout, path in paths.items():
        read = ak.load(str(path), base=base) if layout == "kohya" else ak.load(str(path))
        assert read.format == layout, (layout, read.format)
        want = set(a.layers) if layout == "diffusers" else set(orig.layers)
        assert set(read.layers) == want, (layout, sorted(set(read.layers) ^ want)[:3])
        back, _ = to_namespace(read, "diffusers", base=base)
        assert set(back.layers) == set(a.layers)
        figures[layout] = max(rel(back.layers[p].delta_matrix(), a.layers[p].delta_matrix()) for p in a.layers)
    figures["paths"] = paths
    return figures


def diffusers_loaded(base: torch.nn.Module, pipeline: str, path: Path) -> torch.nn.Module:
    """A fresh copy of ``base`` with a written diffusers file loaded as ``load_lora_weights`` does: the pipeline's
    ``lora_state_dict`` (with the file's metadata), then ``load_lora_adapter``."""
    import diffusers

    sd, metadata = getattr(diffusers, pipeline).lora_state_dict(str(path), return_lora_metadata=True)
    fresh = copy.deepcopy(base)
    fresh.load_lora_adapter(sd, prefix="transformer", adapter_name="written", metadata=metadata)
    return fresh.eval()


__all__ = [
    "converted_deltas",
    "coverage_gaps",
    "diffusers_loaded",
    "load_converted",
    "lora_targets",
    "oracle_mismatches",
    "original_state_dict",
    "peft_adapter",
    "rel",
    "round_trip",
    "written_round_trips",
]
