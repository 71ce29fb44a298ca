"""Helpers for the deploy tests: adapters that break one rule each, made with the real peft on tiny seeded models,
and the comparisons the tests make (logits through peft, the effective weights of every adapted module)."""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from tests.conftest import make_tiny_llama, tiny_llama_config


def perturb(peft_model, seed: int = 1, scale: float = 0.2) -> None:
    """Give every adapter parameter (``lora_*``, IA3 vectors, trainable tokens, saved modules) seeded random values,
    so that no part of the adapter is a no-op."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * scale)


def make_adapter(path: Path, config, model=None, seed: int = 1, edit=None) -> Path:
    """Save an adapter made by peft with ``config`` on ``model`` (default: the tiny llama), perturbed; ``edit``
    may change the peft model before saving (zero a factor ...)."""
    from peft import get_peft_model

    base = model if model is not None else make_tiny_llama(0)
    pm = get_peft_model(copy.deepcopy(base), config)
    perturb(pm, seed)
    if edit is not None:
        edit(pm)
    pm.save_pretrained(str(path))
    return Path(path)


def save_base(path: Path, model=None) -> Path:
    """Save a base model (the tiny llama by default) as transformers does (safetensors + config.json)."""
    (model if model is not None else make_tiny_llama(0)).save_pretrained(str(path))
    return Path(path)


def ids() -> torch.Tensor:
    torch.manual_seed(1234)
    return torch.randint(0, 64, (2, 9))


def peft_logits(adapter_dir: Path, model=None) -> torch.Tensor:
    """Logits of ``model`` (default the tiny llama) with the adapter loaded by ``PeftModel.from_pretrained``."""
    from peft import PeftModel

    base = model if model is not None else make_tiny_llama(0)
    pm = PeftModel.from_pretrained(copy.deepcopy(base), str(adapter_dir)).eval()
    with torch.no_grad():
        return pm(ids()).logits


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / a.double().norm())


def effective(adapter, model) -> dict[str, torch.Tensor]:
    """``{path: adapted weight}`` for every layer of an adaptkit Adapter applied to the model's own weights."""
    out = {}
    for path, layer in adapter.layers.items():
        mod = model.get_submodule(path)
        w = mod.weight.detach().float()
        b = mod.bias.detach().float() if getattr(mod, "bias", None) is not None else None
        out[path] = layer.fit(tuple(w.shape)).apply(w, b)[0]
    return out


def weight_error(before, after, model) -> float:
    """The largest ``||W_after - W_before|| / ||W_before - W||`` over the layers of ``before`` (same paths)."""
    a, b = effective(before, model), effective(after, model)
    worst = 0.0
    for path, w1 in a.items():
        w = model.get_submodule(path).weight.detach().float()
        w2 = b.get(path, w)
        change = float((w1 - w).double().norm())
        diff = float((w2 - w1).double().norm())
        worst = max(worst, diff / change if change > 0 else diff)  # a no-op layer: the absolute difference
    return worst


def tiny_phi3_from_llama(llama):
    """A Phi-3 model whose fused ``qkv_proj`` / ``gate_up_proj`` hold the llama's q/k/v and gate/up weights (same
    math: Phi-3 is llama with packed projections), for the fused/split tests."""
    from transformers import Phi3Config, Phi3ForCausalLM

    c = tiny_llama_config()
    cfg = Phi3Config(vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
                     num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
                     num_key_value_heads=c.num_key_value_heads, max_position_embeddings=c.max_position_embeddings,
                     tie_word_embeddings=False, rms_norm_eps=c.rms_norm_eps, rope_theta=getattr(c, "rope_theta", 10000.0),
                     resid_pdrop=0.0, embd_pdrop=0.0, attention_dropout=0.0, pad_token_id=None)
    phi = Phi3ForCausalLM(cfg).eval()
    sd = llama.state_dict()
    new = {}
    for k in phi.state_dict():
        if k.endswith("qkv_proj.weight"):
            p = k.removesuffix("qkv_proj.weight")
            new[k] = torch.cat([sd[p + n + ".weight"] for n in ("q_proj", "k_proj", "v_proj")])
        elif k.endswith("gate_up_proj.weight"):
            p = k.removesuffix("gate_up_proj.weight")
            new[k] = torch.cat([sd[p + n + ".weight"] for n in ("gate_proj", "up_proj")])
        else:
            new[k] = sd[k]
    phi.load_state_dict(new)
    return phi
