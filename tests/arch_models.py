"""Tiny diffusion transformers for the architecture-map tests (``tests/test_arch_*.py``), and the helpers they share.

Each ``*_TINY`` config builds its diffusers class in milliseconds (1-2 blocks of each type, width 32); the helpers put
a perturbed, seeded PEFT LoRA on every weight-bearing Linear/Conv module (per-module alphas through
``alpha_pattern``), write it as diffusers writes pipeline LoRAs and compare dense deltas.
"""

from __future__ import annotations

from pathlib import Path

import torch

FLUX2_TINY = dict(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
                  num_attention_heads=2, joint_attention_dim=32, timestep_guidance_channels=16, mlp_ratio=3.0,
                  axes_dims_rope=(4, 4, 4, 4), guidance_embeds=True)
CHROMA_TINY = dict(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
                   num_attention_heads=2, joint_attention_dim=32, axes_dims_rope=(4, 6, 6),
                   approximator_num_channels=16, approximator_hidden_dim=32, approximator_layers=2)
#: two joint blocks: block 0 has SD3.5's dual attention (attn2), block 1 is the last one (pre-only text stream)
SD3_TINY = dict(sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=4,
                joint_attention_dim=32, caption_projection_dim=32, pooled_projection_dim=16, out_channels=4,
                pos_embed_max_size=8, dual_attention_layers=(0,), qk_norm="rms_norm")


def tiny(class_name: str, config: dict, seed: int = 0) -> torch.nn.Module:
    """The diffusers model ``class_name`` built from ``config`` with seeded random weights, in eval mode."""
    import diffusers

    torch.manual_seed(seed)
    model = getattr(diffusers, class_name)(**config).eval()
    with torch.no_grad():  # zero-initialised modules (Chroma's, SD3's norms) get weights too, so every LoRA matters
        for p in model.parameters():
            if not p.any():
                p.normal_(0, 0.05)
    return model


def weight_modules(model: torch.nn.Module) -> list[str]:
    """Names of the weight-bearing Linear/Conv modules (every module a LoRA can target)."""
    return [n for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]


def add_lora(model: torch.nn.Module, seed: int = 1, r: int = 4, alpha: float = 8.0,
             alpha_pattern: dict | None = None, exclude: tuple[str, ...] = ()) -> torch.nn.Module:
    """``model`` with a perturbed (``init_lora_weights=False``) seeded LoRA on every weight module but ``exclude``."""
    import peft

    torch.manual_seed(seed)
    targets = [n for n in weight_modules(model) if n not in exclude]
    model.add_adapter(peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, init_lora_weights=False,
                                      alpha_pattern=alpha_pattern or {}))
    return model


def save_pipeline_lora(model: torch.nn.Module, pipeline: str, out: Path) -> Path:
    """The model's adapter written as ``<pipeline>.save_lora_weights`` writes it (``transformer.`` keys, the LoRA
    config packed in ``lora_adapter_metadata``)."""
    import diffusers
    from peft.utils import get_peft_model_state_dict

    cfg = model.peft_config["default"].to_dict()
    cfg = {k: (sorted(v) if isinstance(v, set) else v) for k, v in cfg.items()}
    getattr(diffusers, pipeline).save_lora_weights(out, transformer_lora_layers=get_peft_model_state_dict(model),
                                                   transformer_lora_adapter_metadata=cfg)
    return out


def make_case(class_name: str, config: dict, pipeline: str, out: Path, alphas: dict, arch: str | None = None) -> dict:
    """The shared fixture: a tiny model, a PEFT LoRA on every weight module (per-module ``alphas``) saved as the
    pipeline saves it, read by adaptkit, mapped to original names and back."""
    import copy

    import adaptkit as ak
    from adaptkit.formats.arch.remap import to_namespace

    base = tiny(class_name, config)
    model = add_lora(copy.deepcopy(base), alpha_pattern=alphas)
    a = ak.load(save_pipeline_lora(model, pipeline, out), format="diffusers")
    orig, rows_o = to_namespace(a, "original", arch=arch, base=base)
    back, rows_d = to_namespace(orig, "diffusers", arch=arch, base=base)
    return dict(base=base, model=model, a=a, orig=orig, back=back, rows=rows_o + rows_d)


def check_round_trip(case: dict, label: str) -> None:
    """The shared checks of a :func:`make_case`: the mapping's measured errors, every layer's ΔW after original and
    back (each within 1e-6, the worst reported), and adaptkit's reading against PEFT's deltas."""
    a, back = case["a"], case["back"]
    assert report(f"{label} MapRow max error", max(r.error for r in case["rows"])) < 1e-6
    errs = []
    for p, layer in a.layers.items():
        u, v = layer.factors()
        u2, v2 = back.layers[p].factors()
        errs.append(rel(u2 @ v2, u @ v))
        assert errs[-1] < 1e-6, p
    report(f"{label} round trip max rel dW", max(errs))
    assert report(f"{label} adaptkit vs PEFT dW", max_rel(deltas(a, "transformer"), peft_deltas(case["model"]))) < 1e-6


def run_model(model: torch.nn.Module, inputs: dict) -> torch.Tensor:
    """One forward without gradients; the first output."""
    with torch.no_grad():
        return model(**inputs, return_dict=False)[0]


def peft_deltas(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """ΔW of every LoRA module of a PEFT-injected model, by module path (flattened to 2-D)."""
    out = {}
    for name, mod in model.named_modules():
        if hasattr(mod, "get_delta_weight") and "default" in getattr(mod, "lora_A", {}):
            d = mod.get_delta_weight("default").detach().float()
            out[name] = d.reshape(d.shape[0], -1)
    return out


def deltas(adapter, component: str) -> dict[str, torch.Tensor]:
    """ΔW of an adaptkit adapter's layers under ``component.``, by path without the component."""
    out = {}
    for path, layer in adapter.layers.items():
        comp, _, rel = path.partition(".")
        if comp == component:
            u, v = layer.factors()
            out[rel] = u @ v
    return out


def state_deltas(state: dict[str, torch.Tensor], prefix: str = "transformer.") -> dict[str, torch.Tensor]:
    """ΔW = lora_B @ lora_A of a diffusers-layout state dict (scales baked, as diffusers' converters leave them)."""
    out = {}
    for k, a in state.items():
        if k.startswith(prefix) and k.endswith(".lora_A.weight"):
            mod = k[len(prefix):-len(".lora_A.weight")]
            b = state[k.replace(".lora_A.", ".lora_B.")]
            out[mod] = b.float().reshape(b.shape[0], -1) @ a.float().reshape(a.shape[0], -1)
    return out


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """``‖a - b‖ / ‖b‖``."""
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def max_rel(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> float:
    """The largest relative difference over ``want``'s modules (``got`` must hold exactly those)."""
    if set(got) != set(want):
        raise AssertionError(f"modules differ: only got {sorted(set(got) - set(want))}, "
                             f"only wanted {sorted(set(want) - set(got))}")
    return max(rel(got[k], want[k]) for k in want)


def swap_rows(t: torch.Tensor) -> torch.Tensor:
    """The two halves of ``t``'s rows swapped (``(shift, scale)`` <-> ``(scale, shift)``)."""
    n = t.shape[0] // 2
    return torch.cat([t[n:], t[:n]])


def original_state(adapter, style: str) -> dict[str, torch.Tensor]:
    """An original-namespace adapter (``unet.<original path>`` layers) as a file in the original layout:
    ``"bfl"``: ``diffusion_model.<path>.lora_A/B.weight`` with the scale baked into B (ai-toolkit / ComfyUI);
    ``"kohya"``: ``lora_unet_<path flattened>.lora_down/up.weight`` + ``.alpha`` (sd-scripts / musubi-tuner)."""
    out = {}
    for path, layer in adapter.layers.items():
        comp, _, name = path.partition(".")
        assert comp == "unet", path
        if style == "bfl":
            out[f"diffusion_model.{name}.lora_A.weight"] = layer.down.float().contiguous()
            out[f"diffusion_model.{name}.lora_B.weight"] = (layer.up.float() * layer.scale).contiguous()
        else:
            key = "lora_unet_" + name.replace(".", "_")
            out[f"{key}.lora_down.weight"] = layer.down.float().contiguous()
            out[f"{key}.lora_up.weight"] = layer.up.float().contiguous()
            out[f"{key}.alpha"] = torch.tensor(float(layer.alpha))
    return out


def report(what: str, value: float) -> float:
    """Print a measured figure (``pytest -s tests/test_arch_*.py | grep '\\[arch\\]'`` collects them for the docs)."""
    print(f"[arch] {what}: {value:.2e}")
    return value


def bake_alphas(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A ``lora_A/lora_B + alpha`` state dict with each ``alpha / r`` multiplied into ``lora_B`` and the alphas
    dropped (what diffusers' ``diffusion_model.`` converters read: they refuse ``.alpha`` keys)."""
    out = {k: v for k, v in state.items() if not k.endswith(".alpha")}
    for k, alpha in state.items():
        if k.endswith(".alpha"):
            mod = k[:-len(".alpha")]
            r = out[f"{mod}.lora_A.weight"].shape[0]
            out[f"{mod}.lora_B.weight"] = out[f"{mod}.lora_B.weight"] * (float(alpha) / r)
    return out


def load_written_diffusers(model: torch.nn.Module, directory, pipeline: str) -> torch.nn.Module:
    """A diffusers-layout directory read by ``<pipeline>.lora_state_dict`` (with its metadata) and loaded into
    ``model`` with ``load_lora_adapter``, as ``load_lora_weights`` does for the transformer."""
    import diffusers

    state, meta = getattr(diffusers, pipeline).lora_state_dict(str(directory), return_lora_metadata=True)
    kw = {"metadata": meta.get("transformer", meta)} if meta else {}
    model.load_lora_adapter(state, prefix="transformer", adapter_name="x", **kw)
    return model
