"""Shared steps of the Wan / Qwen-Image / Lumina2 architecture tests: a perturbed PEFT LoRA on a tiny diffusers
model, adaptkit's reading of it, the original-layout state dicts diffusers' converters read (built from adaptkit's
original-namespace adapter), dense deltas of diffusers-converted state dicts, and output comparisons."""

from __future__ import annotations

import copy
from pathlib import Path

import peft
import torch
from peft import get_peft_model_state_dict

import adaptkit as ak
from adaptkit.formats.arch.remap import to_namespace

TYPES = (torch.nn.Linear, torch.nn.Conv2d, torch.nn.Conv3d)


def weight_modules(model: torch.nn.Module) -> list[str]:
    """Every Linear/Conv module of the model (what a LoRA can target)."""
    return [n for n, m in model.named_modules() if isinstance(m, TYPES)]


def with_lora(model: torch.nn.Module, targets: list[str], alpha_pattern: dict[str, float], seed: int = 0,
              r: int = 4, alpha: float = 8.0) -> torch.nn.Module:
    """A deep copy of ``model`` with a seeded, perturbed (``init_lora_weights=False``) LoRA on ``targets``."""
    out = copy.deepcopy(model)
    torch.manual_seed(seed)
    out.add_adapter(peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, alpha_pattern=alpha_pattern,
                                    init_lora_weights=False))
    return out.eval()


def read_peft(model: torch.nn.Module, tmp: Path, pipeline: type) -> ak.Adapter:
    """The PEFT LoRA as diffusers writes it, read by ``ak.load(format="diffusers")`` (layers at
    ``transformer.<path>``): the bare model's ``save_lora_adapter`` file (unprefixed keys and config), and the
    pipeline's ``save_lora_weights`` file (``transformer.`` keys, packed config) read the same."""
    model.save_lora_adapter(str(tmp / "model"))
    pipeline.save_lora_weights(str(tmp / "pipeline"), transformer_lora_layers=get_peft_model_state_dict(model),
                               transformer_lora_adapter_metadata=model.peft_config["default"].to_dict())
    a = ak.load(str(tmp / "model"), format="diffusers")
    b = ak.load(str(tmp / "pipeline"), format="diffusers")
    assert set(a.layers) == set(b.layers)
    for path, layer in a.layers.items():
        assert layer.alpha == b.layers[path].alpha and torch.equal(layer.delta_matrix(), b.layers[path].delta_matrix())
    return a


def roundtrip_check(adapter: ak.Adapter, base: torch.nn.Module) -> tuple[ak.Adapter, float]:
    """diffusers -> original -> diffusers: the same layer set, tensors equal or ΔW equal to 1e-6; returns the
    original-namespace adapter and the largest MapRow error of both directions."""
    orig, rows = to_namespace(adapter, "original", base=base)
    assert all(p.startswith("unet.") for p in orig.layers)
    back, rows2 = to_namespace(orig, "diffusers", base=base)
    assert set(back.layers) == set(adapter.layers)
    worst = max(r.error for r in rows + rows2)
    assert worst < 1e-6
    for path, layer in adapter.layers.items():
        new = back.layers[path]
        a, b = layer.lora_ab(), new.lora_ab()
        if a[0].shape == b[0].shape and torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]):
            assert layer.scale == new.scale
            continue
        d0, d1 = layer.delta_matrix(), new.delta_matrix()
        assert float((d1 - d0).norm() / d0.norm()) < 1e-6, path
    return orig, worst


def original_state_dict(orig: ak.Adapter, style: str, *, alphas: bool = True,
                        bake: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """The file diffusers' converters read, from adaptkit's original-namespace adapter (``unet.<original path>``).

    ``style`` ``"comfyui"``: ``diffusion_model.<path>.lora_A/lora_B.weight``; ``"kohya"``: ``lora_unet_<flattened
    path>.lora_down/lora_up.weight``. With ``alphas`` each layer gets its ``.alpha``; layers whose path starts with a
    ``bake`` prefix (or all, without ``alphas``) get their scale baked into B instead.
    """
    sd: dict[str, torch.Tensor] = {}
    for path, layer in orig.layers.items():
        rel = path.removeprefix("unet.")
        up, down = layer.lora_ab()
        keep = alphas and not (bake and rel.startswith(bake))
        if not keep:
            up = up * layer.scale
        if style == "comfyui":
            stem, a, b = f"diffusion_model.{rel}", "lora_A", "lora_B"
        else:
            stem, a, b = f"lora_unet_{rel.replace('.', '_')}", "lora_down", "lora_up"
        # copies: diffusers' converters scale some factors in place
        sd[f"{stem}.{a}.weight"] = down.clone()
        sd[f"{stem}.{b}.weight"] = up.clone()
        if keep:
            sd[f"{stem}.alpha"] = torch.tensor(float(layer.alpha))
    return sd


def converted_deltas(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``transformer.<path>.lora_A/lora_B.weight`` of a diffusers-converted state dict -> ``{path: B @ A}``."""
    out = {}
    for key, down in sd.items():
        if key.endswith(".lora_A.weight"):
            stem = key.removesuffix(".lora_A.weight")
            up = sd[stem + ".lora_B.weight"]
            out[stem.removeprefix("transformer.")] = up.float().reshape(up.shape[0], -1) @ down.float().reshape(
                down.shape[0], -1)
    return out


def assert_deltas_match(adapter: ak.Adapter, deltas: dict[str, torch.Tensor]) -> float:
    """The converter's ΔW per module equals adaptkit's diffusers-namespace ΔW (rtol 1e-5); returns the worst error."""
    assert set(deltas) == {p.removeprefix("transformer.") for p in adapter.layers}
    worst = 0.0
    for path, d in deltas.items():
        ref = adapter.layers["transformer." + path].delta_matrix().reshape(d.shape)
        err = float((d - ref).norm() / ref.norm())
        assert err < 1e-5, (path, err)
        worst = max(worst, err)
    return worst


def loaded_outputs_match(reference: torch.nn.Module, base: torch.nn.Module, converted: dict[str, torch.Tensor] | str,
                         inputs: dict, adapter_name: str = "oracle") -> float:
    """``load_lora_adapter(converted)`` on a fresh copy of ``base`` gives the reference PEFT model's outputs (rtol
    1e-4); returns the relative output error (and checks the LoRA changes the output at all)."""
    fresh = copy.deepcopy(base)
    if isinstance(converted, dict):
        fresh.load_lora_adapter(converted, adapter_name=adapter_name)
    else:  # a written diffusers directory: diffusers reads its file and lora_adapter_metadata
        fresh.load_lora_adapter(converted, weight_name="pytorch_lora_weights.safetensors", adapter_name=adapter_name)
    fresh.eval()
    with torch.no_grad():
        want = reference(**inputs, return_dict=False)[0]
        got = fresh(**inputs, return_dict=False)[0]
        plain = base(**inputs, return_dict=False)[0]
    assert float((want - plain).norm() / plain.norm()) > 1e-3  # the LoRA matters
    err = float((got - want).norm() / want.norm())
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-5), err
    return err


def same_deltas(got: ak.Adapter, want: ak.Adapter) -> float:
    """The same layer paths and ΔW (biases included) per layer to 1e-6 relative; returns the worst error."""
    assert set(got.layers) == set(want.layers)
    worst = 0.0
    for path, layer in want.layers.items():
        d0, d1 = layer.delta_matrix(), got.layers[path].delta_matrix().reshape(layer.delta_matrix().shape)
        err = float((d1 - d0).norm() / d0.norm())
        assert err < 1e-6, (path, err)
        worst = max(worst, err)
    return worst


def written_layouts(a: ak.Adapter, base: torch.nn.Module, tmp: Path) -> tuple[dict[str, Path], float]:
    """Through the public API: ``ak.save`` of the diffusers-named adapter as ``comfyui`` and as ``kohya`` with
    original names, and of its original-named form as ``diffusers``; each read back with ``ak.load`` (layout detected
    from the keys; the kohya names resolve against the tiny model saved as a directory) and compared layer by layer
    with the adapter in the namespace the file holds. Returns the files and the worst ΔW error."""
    base_dir = tmp / "base"
    base.save_pretrained(str(base_dir))
    orig, _ = to_namespace(a, "original", base=base)
    files = {"comfyui": ak.save(a, tmp / "comfyui.safetensors", format="comfyui", base=base),
             "kohya": ak.save(a, tmp / "kohya.safetensors", format="kohya", naming="original", base=base),
             "diffusers": ak.save(orig, tmp / "diffusers", format="diffusers", base=base)}
    worst = max(same_deltas(ak.load(str(files["comfyui"])), orig),
                same_deltas(ak.load(str(files["kohya"]), base=str(base_dir)), orig),
                same_deltas(ak.load(str(files["diffusers"])), a))
    return files, worst


def file_tensors(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a written ``.safetensors`` file (or of the one in a written directory)."""
    from safetensors.torch import load_file

    path = Path(path)
    return load_file(str(path if path.is_file() else next(path.glob("*.safetensors"))))
