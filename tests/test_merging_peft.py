"""Merging against the real peft: every ``combination_type`` of ``LoraModel.add_weighted_adapter``.

Adapters are made with peft on a tiny llama (different seeds, alphas, target sets, rsLoRA, rank patterns),
merged by peft on a live model and by adaptkit from the checkpoint files alone; the dense delta of every
merged layer must agree within 1e-4 relative Frobenius error. The DARE methods draw random masks, so they
are checked for reproducibility and for a statistical match with peft.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_peft_adapter, make_tiny_llama

import adaptkit as ak
from adaptkit.ops.merging import PEFT_METHODS, PROVENANCE_KEY

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
W = [1.0, -0.5, 0.7]  # a negative weight subtracts


def _lora(**kw):
    from peft import LoraConfig

    return LoraConfig(init_lora_weights=False, **kw)


@pytest.fixture(scope="module")
def equal_rank(tmp_path_factory):
    """Three r=8 adapters: different alphas, target sets (a layer only some have), the last rsLoRA."""
    root = tmp_path_factory.mktemp("equal")
    cfgs = [_lora(r=8, lora_alpha=16, target_modules=ALL),
            _lora(r=8, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]),
            _lora(r=8, lora_alpha=32, target_modules=ALL, use_rslora=True)]
    return [make_peft_adapter(root / f"a{i}", c, seed=i + 1) for i, c in enumerate(cfgs)]


@pytest.fixture(scope="module")
def mixed_rank(tmp_path_factory):
    """Ranks 4 / 8 / 6 (with a rank and alpha pattern), different targets, rsLoRA in a later adapter."""
    root = tmp_path_factory.mktemp("mixed")
    cfgs = [_lora(r=4, lora_alpha=8, target_modules=ALL),
            _lora(r=8, lora_alpha=4, target_modules=["q_proj", "v_proj", "gate_proj"]),
            _lora(r=6, lora_alpha=12, target_modules=ALL, use_rslora=True, rank_pattern={"o_proj": 2},
                  alpha_pattern={"down_proj": 3})]
    return [make_peft_adapter(root / f"a{i}", c, seed=10 + i) for i, c in enumerate(cfgs)]


def peft_model(dirs):
    from peft import PeftModel

    pm = PeftModel.from_pretrained(make_tiny_llama(0), str(dirs[0]), adapter_name="a0")
    for i, d in enumerate(dirs[1:], start=1):
        pm.load_adapter(str(d), adapter_name=f"a{i}")
    return pm


def peft_merge(dirs, weights, method, seed=None, **kw):
    """peft's merged adapter: (model with adapter 'm' active, {path: dense delta})."""
    pm = peft_model(dirs)
    if seed is not None:  # peft's DARE draws from the global RNG
        torch.manual_seed(seed)
    pm.add_weighted_adapter([f"a{i}" for i in range(len(dirs))], weights, "m", combination_type=method, **kw)
    pm.set_adapter("m")
    deltas = {}
    for name, mod in pm.named_modules():
        if hasattr(mod, "lora_A") and ("m" in mod.lora_A or "m" in mod.lora_embedding_A):
            deltas[name.removeprefix("base_model.model.")] = mod.get_delta_weight("m").detach()
    return pm, deltas


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def assert_same(merged: ak.Adapter, ref: dict[str, torch.Tensor], tol: float = 1e-4) -> None:
    assert set(merged.layers) == set(ref)
    errs = {p: rel(merged.layers[p].delta(), ref[p]) for p in ref}
    worst = max(errs, key=errs.get)
    assert errs[worst] < tol, f"{worst}: relative error {errs[worst]:.2e}"


def _kw(method, density=0.3, rank=None):
    peft_kw, ak_kw = {}, {}
    if any(s in method for s in ("ties", "dare", "prune")):
        peft_kw["density"] = ak_kw["density"] = density
    if method.endswith("svd") and rank is not None:
        peft_kw["svd_rank"] = ak_kw["rank"] = rank
    return peft_kw, ak_kw


DETERMINISTIC = [m for m in PEFT_METHODS if not m.startswith("dare")]


@pytest.mark.parametrize("method", DETERMINISTIC)
def test_equal_rank_matches_peft(equal_rank, method):
    peft_kw, ak_kw = _kw(method, rank=6)
    _, ref = peft_merge(equal_rank, W, method, **peft_kw)
    merged = ak.merge([ak.load(d) for d in equal_rank], W, method=method, **ak_kw)
    assert_same(merged, ref)


@pytest.mark.parametrize("method", ["svd", "cat", "ties_svd", "magnitude_prune_svd"])
def test_mixed_ranks_match_peft(mixed_rank, method):
    """Methods that allow different ranks; svd uses peft's default rank (the largest input rank)."""
    peft_kw, ak_kw = _kw(method, density=0.5)
    _, ref = peft_merge(mixed_rank, W, method, **peft_kw)
    merged = ak.merge(mixed_rank, W, method=method, **ak_kw)  # sources, loaded by merge
    assert_same(merged, ref)
    if method.endswith("svd"):
        assert {layer.rank for layer in merged.layers.values()} == {8}


def test_ties_frequency_sign_matches_peft(equal_rank):
    _, ref = peft_merge(equal_rank, W, "ties_svd", density=0.4, majority_sign_method="frequency", svd_rank=5)
    merged = ak.merge(equal_rank, W, method="ties_svd", density=0.4, rank=5, majority_sign="frequency")
    assert_same(merged, ref)
    other = ak.merge(equal_rank, W, method="ties_svd", density=0.4, rank=5, majority_sign="total")
    assert any(rel(other.layers[p].delta(), ref[p]) > 1e-3 for p in ref)  # the sign rule matters here


def test_single_adapter_is_linear_as_in_peft(equal_rank):
    _, ref = peft_merge(equal_rank[:1], [0.8], "ties", density=0.2)
    merged = ak.merge(equal_rank[:1], [0.8], method="ties", density=0.2)
    assert_same(merged, ref, tol=1e-6)
    assert json.loads(merged.metadata[PROVENANCE_KEY])["applied_method"] == "linear"


@pytest.mark.parametrize("method", ["ties", "svd"])
def test_merged_output_loads_in_peft_with_same_logits(equal_rank, tmp_path, input_ids, method):
    from peft import PeftModel

    peft_kw, ak_kw = _kw(method, rank=None)
    pm, _ = peft_merge(equal_rank, W, method, **peft_kw)
    with torch.no_grad():
        expected = pm(input_ids).logits
    out = ak.save(ak.merge(equal_rank, W, method=method, **ak_kw), tmp_path / "merged")
    loaded = PeftModel.from_pretrained(make_tiny_llama(0), str(out)).eval()
    with torch.no_grad():
        got = loaded(input_ids).logits
    with torch.no_grad():
        plain = make_tiny_llama(0)(input_ids).logits
    assert (expected - plain).abs().max() > 1e-3  # the merged adapter does change the outputs
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------------- DARE

DARE = [m for m in PEFT_METHODS if m.startswith("dare")]


def _stack(deltas: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([deltas[p].flatten() for p in sorted(deltas)])


@pytest.mark.parametrize("method", DARE)
def test_dare_reproducible_and_statistically_like_peft(equal_rank, method):
    adapters = [ak.load(d) for d in equal_rank]
    peft_kw, ak_kw = _kw(method, density=0.5, rank=8)

    def ours(seed):
        m = ak.merge(adapters, W, method=method, seed=seed, **ak_kw)
        return _stack({p: layer.delta() for p, layer in m.layers.items()})

    def theirs(seed):
        return _stack(peft_merge(equal_rank, W, method, seed=seed, **peft_kw)[1])

    a0, a0_again, a1 = ours(0), ours(0), ours(1)
    assert torch.equal(a0, a0_again)  # same seed, same result
    assert not torch.equal(a0, a1)
    p0, p1 = theirs(0), theirs(1)
    # same distribution: our draws are as far from peft's as peft's draws are from each other, norms agree
    spread = (p0 - p1).norm()
    for ours_draw in (a0, a1):
        assert 0.75 < ((ours_draw - p0).norm() / spread).item() < 1.33
        assert 0.9 < (ours_draw.norm() / p0.norm()).item() < 1.1


def test_dare_keeps_density_and_rescales_like_peft(equal_rank):
    """With weights [1, 0] dare_linear's merged A is drop(A_1) * sqrt(s) / density: check both tools."""
    dirs = equal_rank[:2]
    density = 0.3
    a = ak.load(dirs[0])
    merged = ak.merge(dirs, [1.0, 0.0], method="dare_linear", density=density, seed=3)
    pm, _ = peft_merge(dirs, [1.0, 0.0], "dare_linear", seed=3, density=density)
    peft_a = {n.removeprefix("base_model.model."): mod.lora_A["m"].weight.detach()
              for n, mod in pm.named_modules() if hasattr(mod, "lora_A") and "m" in mod.lora_A}
    for name, got in (("adaptkit", {p: l.down for p, l in merged.layers.items()}), ("peft", peft_a)):
        kept = total = 0
        for path, layer in a.layers.items():
            full = layer.down * layer.scale**0.5 / density
            nz = got[path] != 0
            torch.testing.assert_close(got[path][nz], full[nz], msg=f"{name} {path}")
            kept += int(nz.sum())
            total += nz.numel()
        assert abs(kept / total - density) < 0.03, f"{name} kept {kept / total:.3f}"


@pytest.mark.parametrize("method", ["svd", "ties", "ties_svd", "cat"])
def test_conv1d_fan_in_fan_out_matches_peft(tmp_path, method):
    """GPT-2's Conv1D stores the weight transposed (fan_in_fan_out): orientation must match peft's."""
    from peft import LoraConfig, PeftModel
    from transformers import GPT2Config, GPT2LMHeadModel

    def gpt2():
        torch.manual_seed(0)
        return GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=32)).eval()

    cfg = dict(r=4, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True, init_lora_weights=False)
    dirs = [make_peft_adapter(tmp_path / f"g{i}", LoraConfig(lora_alpha=4 * (i + 1), **cfg), seed=i, model=gpt2())
            for i in range(2)]
    pm = PeftModel.from_pretrained(gpt2(), str(dirs[0]), adapter_name="a0")
    pm.load_adapter(str(dirs[1]), adapter_name="a1")
    peft_kw, ak_kw = _kw(method, density=0.5, rank=3)
    pm.add_weighted_adapter(["a0", "a1"], [1.0, -0.7], "m", combination_type=method, **peft_kw)
    ref = {n.removeprefix("base_model.model."): mod.get_delta_weight("m").detach()
           for n, mod in pm.named_modules() if hasattr(mod, "lora_A") and "m" in mod.lora_A}
    assert_same(ak.merge(dirs, [1.0, -0.7], method=method, **ak_kw), ref)


@pytest.mark.parametrize("method", ["svd", "ties"])
def test_embedding_targets_with_saved_base_embeddings_match_peft(tmp_path, method):
    """peft saves the base embedding weights of adapters on embed_tokens: identical copies merge (kept once)."""
    cfgs = [_lora(r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"]),
            _lora(r=4, lora_alpha=16, target_modules=["embed_tokens", "lm_head"])]
    dirs = [make_peft_adapter(tmp_path / f"e{i}", c, seed=30 + i) for i, c in enumerate(cfgs)]
    assert "model.embed_tokens.base_layer.weight" in ak.load(dirs[1]).extras
    peft_kw, ak_kw = _kw(method, density=0.5)
    _, ref = peft_merge(dirs, [0.7, -0.5], method, **peft_kw)
    merged = ak.merge(dirs, [0.7, -0.5], method=method, **ak_kw)
    assert_same(merged, ref)
    assert set(merged.extras) == {"model.embed_tokens.base_layer.weight", "lm_head.base_layer.weight"}
    changed = ak.load(dirs[1])
    changed = changed.replace(extras={k: v + 1 for k, v in changed.extras.items()})
    with pytest.raises(ak.UnsupportedError, match="different values"):
        ak.merge([ak.load(dirs[0]), changed], method=method, **ak_kw)
