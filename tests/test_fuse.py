"""Streaming fuse/unfuse against real peft: merge_and_unload tensors (within one bf16 ulp), logits, unfuse, dtypes."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
import torch
from peft import IA3Config, LoHaConfig, LoKrConfig, LoraConfig, PeftModel
from safetensors.torch import load_file

import adaptkit as ak

from .conftest import lycoris_network, make_peft_adapter, make_tiny_llama

CONFIGS = {
    "lora": lambda: LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj", "embed_tokens"],
                               init_lora_weights=False),
    "dora": lambda: LoraConfig(r=4, lora_alpha=6, target_modules=["q_proj", "down_proj"], use_dora=True,
                               init_lora_weights=False),
    "rslora": lambda: LoraConfig(r=8, lora_alpha=4, target_modules=["k_proj", "o_proj", "lm_head"], use_rslora=True,
                                 init_lora_weights=False),
    "ia3": lambda: IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"],
                             init_ia3_weights=False),
    "loha": lambda: LoHaConfig(r=4, alpha=6, target_modules=["q_proj", "up_proj"], init_weights=False),
    "lokr": lambda: LoKrConfig(r=4, alpha=6, target_modules=["q_proj", "up_proj"], init_weights=False),
}


def save_base(path: Path, dtype=torch.bfloat16, shard="10KB", seed: int = 0) -> Path:
    """A tiny llama saved in several safetensors shards."""
    make_tiny_llama(seed).to(dtype).save_pretrained(str(path), max_shard_size=shard)
    return path


def load_dir(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of every safetensors file in a directory."""
    out: dict[str, torch.Tensor] = {}
    for f in sorted(Path(path).glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def bf16_ulp(x: torch.Tensor) -> torch.Tensor:
    """One bf16 unit in the last place at each value of ``x`` (float32)."""
    return torch.exp2(torch.floor(torch.log2(x.abs().clamp_min(2.0**-126))) - 7)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    path = save_base(tmp_path_factory.mktemp("base") / "llama")
    assert len(list(path.glob("*.safetensors"))) >= 3
    return path


@pytest.fixture(scope="module")
def input_ids():
    torch.manual_seed(1234)
    return torch.randint(0, 64, (2, 9))


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_fuse_equals_peft_merge_and_logits(tmp_path, base_dir, input_ids, name):
    from transformers import AutoModelForCausalLM

    adapter_dir = make_peft_adapter(tmp_path / "adapter", CONFIGS[name](), seed=7)
    result = ak.fuse(base_dir, adapter_dir, tmp_path / "fused", progress=False)
    assert result.touched == len(result.plan) > 0

    # reference: peft on the same bf16 weights upcast to float32 (exact), merged and unloaded
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32),
                                           str(adapter_dir)).eval()
    with torch.no_grad():
        ref_logits = peft_model(input_ids).logits
    reference = {k: v.detach().clone() for k, v in peft_model.merge_and_unload().state_dict().items()}

    base, fused = load_dir(base_dir), load_dir(tmp_path / "fused")
    assert sorted(fused) == sorted(base)
    touched = set(result.plan["tensor"])
    for key, tensor in fused.items():
        assert tensor.dtype == torch.bfloat16, key
        if key not in touched:
            assert torch.equal(tensor, base[key]), f"{key} must be copied unchanged"
            continue
        ref = reference[key]
        assert not torch.equal(tensor, base[key]), f"{key}: the adapter must change it"
        err = (tensor.float() - ref).abs()
        assert bool((err <= bf16_ulp(ref)).all()), f"{key}: {(err / bf16_ulp(ref)).max():.2f} ulp from peft"

    # side files and the index are kept; the fused model loads and reproduces the unfused peft model's logits
    assert json.loads((tmp_path / "fused" / "config.json").read_text()) == json.loads((base_dir / "config.json").read_text())
    assert (tmp_path / "fused" / "generation_config.json").is_file()
    index = json.loads((tmp_path / "fused" / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == json.loads((base_dir / "model.safetensors.index.json").read_text())["weight_map"]
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "fused", dtype=torch.float32).eval()
    plain = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        logits, base_logits = model(input_ids).logits, plain(input_ids).logits
    effect = (ref_logits - base_logits).abs().max()
    assert effect > 5e-3
    assert (logits - ref_logits).abs().max() < 0.02 * effect  # only the bf16 rounding of the fused weights


def test_fuse_then_unfuse_returns_base(tmp_path, base_dir):
    adapter_dir = make_peft_adapter(tmp_path / "a", CONFIGS["lora"](), seed=3)
    adapter = ak.load(adapter_dir).replace(extras={})
    ak.fuse(base_dir, adapter, tmp_path / "fused", progress=False)
    # the adapter as saved (with peft's copy of the embedding base weights) unfuses too
    assert any(".base_layer." in k for k in ak.load(adapter_dir).extras)
    ak.unfuse(tmp_path / "fused", adapter_dir, tmp_path / "back", progress=False)
    base, fused, back = load_dir(base_dir), load_dir(tmp_path / "fused"), load_dir(tmp_path / "back")
    changed = 0
    for key, b in base.items():
        bound = 2 * bf16_ulp(torch.maximum(b.float().abs(), fused[key].float().abs()))
        assert bool(((back[key].float() - b.float()).abs() <= bound).all()), key
        changed += not torch.equal(fused[key], b)
    assert changed == 7


def test_fuse_unfuse_float32_is_exact_to_rounding(tmp_path):
    base_dir = save_base(tmp_path / "base", dtype=torch.float32, shard="20KB")
    adapter = ak.load(make_peft_adapter(tmp_path / "a", CONFIGS["loha"](), seed=3))
    ak.fuse(base_dir, [adapter, adapter], tmp_path / "fused", weights=[0.5, 0.25], progress=False)
    fused = load_dir(tmp_path / "fused")
    base = load_dir(base_dir)
    key = "model.layers.1.mlp.up_proj.weight"
    expected = base[key] + 0.75 * adapter.layers["model.layers.1.mlp.up_proj"].delta()
    torch.testing.assert_close(fused[key], expected, atol=1e-6, rtol=1e-6)
    ak.unfuse(tmp_path / "fused", [adapter, adapter], tmp_path / "back", weights=[0.5, 0.25], progress=False)
    for k, v in load_dir(tmp_path / "back").items():
        torch.testing.assert_close(v, base[k], atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", ["dora", "ia3"])
def test_unfuse_refuses_non_additive(tmp_path, base_dir, name):
    adapter_dir = make_peft_adapter(tmp_path / "a", CONFIGS[name](), seed=3)
    with pytest.raises(ak.UnsupportedError, match="cannot be subtracted"):
        ak.unfuse(base_dir, adapter_dir, tmp_path / "back", progress=False)
    assert not (tmp_path / "back").exists()


def test_dtype_reshard_and_single_file(tmp_path, base_dir, input_ids):
    from transformers import AutoModelForCausalLM

    adapter_dir = make_peft_adapter(tmp_path / "a", CONFIGS["rslora"](), seed=5)
    ak.fuse(base_dir, adapter_dir, tmp_path / "bf16", progress=False)
    result = ak.fuse(base_dir, adapter_dir, tmp_path / "fp32", dtype="fp32", shard_size="16KB", progress=False)
    files = sorted((tmp_path / "fp32").glob("*.safetensors"))
    assert len(files) >= 4 and all(f.stat().st_size < 17_000 for f in files)
    fp32 = load_dir(tmp_path / "fp32")
    assert all(t.dtype == torch.float32 for t in fp32.values())
    bf16 = load_dir(tmp_path / "bf16")
    for key, t in bf16.items():  # untouched tensors are exact casts; touched ones round to the bf16 result
        assert torch.equal(fp32[key].to(torch.bfloat16), t), key
    index = json.loads((tmp_path / "fp32" / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == result.bytes == sum(t.numel() * 4 for t in fp32.values())
    assert set(index["weight_map"].values()) == {f.name for f in files}
    AutoModelForCausalLM.from_pretrained(tmp_path / "fp32")

    # one file in, one file out
    single = tmp_path / "single.safetensors"
    from safetensors.torch import save_file

    save_file(load_dir(base_dir), str(single), metadata={"format": "pt"})
    ak.fuse(single, adapter_dir, tmp_path / "out.safetensors", progress=False)
    out = load_file(str(tmp_path / "out.safetensors"))
    assert all(torch.equal(out[k], bf16[k]) for k in bf16)


def test_dry_run_and_prefix_matching(tmp_path, base_dir):
    adapter = ak.load(make_peft_adapter(tmp_path / "a", CONFIGS["loha"](), seed=5))
    # the adapter was made on the bare LlamaModel (paths without transformers' `model.` prefix)
    bare = adapter.replace(layers={k.removeprefix("model."): v for k, v in adapter.layers.items()})
    result = ak.fuse(base_dir, bare, tmp_path / "out", dry_run=True)
    assert result.out is None and not (tmp_path / "out").exists()
    assert sorted(result.plan["tensor"]) == sorted(k + ".weight" for k in adapter.layers)
    assert set(result.plan["kinds"]) == {"loha"}
    threads = torch.get_num_threads()
    ak.fuse(base_dir, bare, tmp_path / "bare", progress=False, workers=1)  # the workers run one torch thread each...
    ak.fuse(base_dir, adapter, tmp_path / "full", progress=False, workers=4)
    assert torch.get_num_threads() == threads  # ...and the caller's setting is restored, also for new threads
    seen = []
    probe = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
    probe.start()
    probe.join()
    assert seen == [threads]
    a, b = load_dir(tmp_path / "bare"), load_dir(tmp_path / "full")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_non_finite_result_is_refused(tmp_path, base_dir):
    adapter = ak.load(make_peft_adapter(tmp_path / "a", CONFIGS["lora"](), seed=5)).replace(extras={})
    with pytest.raises(ak.NonFiniteError, match="NaN/Inf"):
        ak.fuse(base_dir, adapter, tmp_path / "out", weights=[1e38], progress=False)
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".out*"))
    # finite in float32 but beyond float16's range: refused as well
    with pytest.raises(ak.NonFiniteError, match="F16"):
        ak.fuse(base_dir, adapter, tmp_path / "out", weights=[1e7], dtype="fp16", progress=False)
    ak.fuse(base_dir, adapter, tmp_path / "ok", weights=[1e7], dtype="fp32", progress=False)


@pytest.mark.parametrize("name", ["lora", "ia3", "rslora"])
def test_row_streaming_equals_whole_tensor(tmp_path, base_dir, monkeypatch, name):
    from adaptkit.io import shard_writer

    adapter = ak.load(make_peft_adapter(tmp_path / "a", CONFIGS[name](), seed=9)).replace(extras={})
    ak.fuse(base_dir, adapter, tmp_path / "whole", progress=False)
    monkeypatch.setattr(shard_writer, "_ROW_CHUNK", 200)  # a few rows per block: every touched tensor is streamed in pieces
    calls = []
    original = shard_writer._transform_rows
    monkeypatch.setattr(shard_writer, "_transform_rows", lambda *a: calls.append(a[2].src.key) or original(*a))
    ak.fuse(base_dir, adapter, tmp_path / "rows", progress=False, workers=1)
    assert len(calls) == len([k for k in adapter.layers])  # every weight went through the row path
    whole, rows = load_dir(tmp_path / "whole"), load_dir(tmp_path / "rows")
    for k in whole:  # same math; blocked matmuls may round differently by at most one bf16 ulp
        assert bool(((whole[k].float() - rows[k].float()).abs() <= bf16_ulp(whole[k].float())).all()), k


def test_modules_to_save_replace_the_base_tensor(tmp_path, base_dir):
    from transformers import AutoModelForCausalLM

    cfg = LoraConfig(r=2, lora_alpha=2, target_modules=["q_proj"], modules_to_save=["lm_head"], init_lora_weights=False)
    adapter = ak.load(make_peft_adapter(tmp_path / "a", cfg, seed=4))
    assert sorted(adapter.extras) == ["lm_head.weight"]
    trained = adapter.replace(extras={"lm_head.weight": adapter.extras["lm_head.weight"] + 0.25})  # "trained" copy
    ak.save(trained, tmp_path / "trained")
    result = ak.fuse(base_dir, tmp_path / "trained", tmp_path / "fused", progress=False)
    assert "replace" in set(result.plan["kinds"])
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32),
                                           str(tmp_path / "trained"))
    reference = peft_model.merge_and_unload().state_dict()
    fused = load_dir(tmp_path / "fused")
    for key in ("lm_head.weight", "model.layers.0.self_attn.q_proj.weight"):
        ref = reference[key]
        assert bool(((fused[key].float() - ref).abs() <= bf16_ulp(ref)).all()), key
    with pytest.raises(ak.UnsupportedError, match="replaces whole tensors"):
        ak.unfuse(tmp_path / "fused", tmp_path / "trained", tmp_path / "back", progress=False)


# ------------------------------------------------------------------------------- kohya / LyCORIS files


def lycoris_merged(tmp_path: Path, bias: bool = True, seed: int = 0, **kwargs):
    """A LyCORIS network (lycoris-lora) on a small model, saved with its own ``save_weights``.

    Returns ``(adapter file, base .safetensors, base module, LyCORIS-merged state dict, LyCORIS output, input)``:
    the oracle is LyCORIS's ``merge_to`` and its forward with the network applied.
    """
    import copy
    import logging

    from safetensors.torch import save_file

    pytest.importorskip("lycoris")
    from .test_kohya_lycoris import Small

    logging.getLogger("LyCORIS").setLevel(logging.ERROR)
    torch.manual_seed(seed)
    model = Small(bias).eval()
    base = copy.deepcopy(model)
    net = lycoris_network(model, ["Linear", "Conv2d"], **kwargs)
    torch.manual_seed(seed + 1)
    with torch.no_grad():
        for _, p in net.named_parameters():
            p.normal_(0, 0.2)
    adapter_file = tmp_path / "lyco.safetensors"
    net.save_weights(str(adapter_file), torch.float32, {})
    x = torch.randn(2, 4, 6, 6, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = model(x)
    net.merge_to(1.0)
    merged = {k: v.detach().clone() for k, v in model.state_dict().items()}
    base_file = tmp_path / "base.safetensors"
    save_file({k: v.contiguous() for k, v in base.state_dict().items()}, str(base_file))
    return adapter_file, base_file, base, merged, want, x


def output_of(base, tensors: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    import copy

    m = copy.deepcopy(base)
    m.load_state_dict(tensors)
    with torch.no_grad():
        return m(x)


def test_lycoris_ia3_leaves_biases_alone_like_lycoris(tmp_path):
    """LyCORIS's output-side IA3 scales W only (its merge and forward keep the bias): fuse keeps it too."""
    from adaptkit.formats import load

    adapter_file, base_file, base, merged, want, x = lycoris_merged(tmp_path, bias=True, algo="ia3")
    adapter = load(adapter_file, base=base)
    assert any(not l.on_input and not l.scale_bias for l in adapter.layers.values())
    ak.fuse(base_file, adapter, tmp_path / "fused.safetensors", progress=False)
    fused = load_file(str(tmp_path / "fused.safetensors"))
    assert sorted(fused) == sorted(merged)
    assert any(k.endswith(".bias") for k in fused)
    for k, ref in merged.items():  # float32 base: the same products, exactly
        torch.testing.assert_close(fused[k], ref, rtol=0, atol=0, msg=k)
    torch.testing.assert_close(output_of(base, fused, x), want, rtol=1e-5, atol=1e-6)
    # the file itself, its names resolved against the base file's headers (which say which modules have a bias)
    ak.fuse(base_file, adapter_file, tmp_path / "direct.safetensors", progress=False)
    direct = load_file(str(tmp_path / "direct.safetensors"))
    assert all(torch.equal(direct[k], fused[k]) for k in fused)


def test_lora_bias_fuses_into_base_biases_like_peft(tmp_path):
    """PEFT lora_bias on a base with biases: b + scale * lora_B.bias, as merge_and_unload (within one bf16 ulp)."""
    from transformers import AutoModelForCausalLM

    base_dir = tmp_path / "base"
    make_tiny_llama(0, attention_bias=True).to(torch.bfloat16).save_pretrained(str(base_dir))
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_bias=True, init_lora_weights=False)
    adapter_dir = make_peft_adapter(tmp_path / "a", cfg, seed=6, model=make_tiny_llama(0, attention_bias=True))
    result = ak.fuse(base_dir, [adapter_dir, adapter_dir], tmp_path / "fused", weights=[0.75, 0.25], progress=False)
    assert "lora bias" in set(result.plan["kinds"])
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32),
                                           str(adapter_dir))
    reference = peft_model.merge_and_unload().state_dict()
    base, fused = load_dir(base_dir), load_dir(tmp_path / "fused")
    changed = [k for k in fused if not torch.equal(fused[k], base[k])]
    assert sum(k.endswith("_proj.bias") for k in changed) == 4
    for key in fused:
        ref = reference[key]
        assert bool(((fused[key].float() - ref).abs() <= bf16_ulp(ref)).all()), key


def lycoris_llama(tmp_path: Path, dtype=torch.bfloat16, seed: int = 0, **kwargs):
    """A LyCORIS network made with lycoris-lora on a tiny llama whose base is saved as safetensors in ``dtype``.

    The llama is outside the shipped inventories, so its ``lycoris_model_layers_0_...`` names resolve only
    against the base. Returns ``(adapter file, base dir, LyCORIS-merged float32 state dict, LyCORIS logits,
    base logits, input ids)``: the oracle is LyCORIS's forward and ``merge_to`` on the base weights in float32.
    """
    import logging

    pytest.importorskip("lycoris")
    logging.getLogger("LyCORIS").setLevel(logging.ERROR)
    base_dir = tmp_path / "llama"
    make_tiny_llama(seed).to(dtype).save_pretrained(str(base_dir))
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        base_logits = model(ids).logits
    net = lycoris_network(model, ["Linear"], **kwargs)
    torch.manual_seed(seed + 1)
    with torch.no_grad():
        for _, p in net.named_parameters():
            p.normal_(0, 0.1)
    adapter_file = tmp_path / "llama_locon.safetensors"
    net.save_weights(str(adapter_file), torch.float32, {})
    with torch.no_grad():
        want = model(ids).logits
    net.merge_to(1.0)
    merged = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return adapter_file, base_dir, merged, want, base_logits, ids


def test_lycoris_file_of_a_model_outside_the_inventories_fuses_against_its_base(tmp_path):
    """`adaptkit fuse base_llama llama_locon.safetensors -o out`: names resolved against the base being fused."""
    from transformers import AutoModelForCausalLM

    adapter_file, base_dir, merged, want, base_logits, ids = lycoris_llama(tmp_path, algo="lora", linear_dim=4,
                                                                          linear_alpha=2)
    from safetensors.torch import load_file as _load

    assert next(iter(_load(str(adapter_file)))).startswith("lycoris_")
    result = ak.fuse(base_dir, adapter_file, tmp_path / "fused", progress=False)
    linear = [k for k in merged if k.endswith("_proj.weight") or k == "lm_head.weight"]
    assert result.touched == len(linear) == 15  # every linear weight; the embedding and the norms stay
    base, fused = load_dir(base_dir), load_dir(tmp_path / "fused")
    assert sorted(fused) == sorted(merged)
    for key, ref in merged.items():  # LyCORIS's merge on the same bf16 weights in float32, rounded once
        assert bool(((fused[key].float() - ref).abs() <= bf16_ulp(ref)).all()), key
        if key.endswith("norm.weight") or "embed" in key:
            assert torch.equal(fused[key], base[key]), key
    with torch.no_grad():
        logits = AutoModelForCausalLM.from_pretrained(tmp_path / "fused", dtype=torch.float32)(ids).logits
    effect = (want - base_logits).abs().max()
    assert effect > 5e-3 and (logits - want).abs().max() < 0.02 * effect  # only the bf16 rounding of the fused weights

    # the command line, and unfuse (the same resolution)
    from .conftest import run_cli

    r = run_cli("fuse", str(base_dir), str(adapter_file), "-o", str(tmp_path / "cli"), "--no-progress")
    assert r.returncode == 0, r.stderr
    cli = load_dir(tmp_path / "cli")
    assert all(torch.equal(cli[k], fused[k]) for k in fused)
    ak.unfuse(tmp_path / "fused", adapter_file, tmp_path / "back", progress=False)
    for key, b in load_dir(tmp_path / "back").items():
        bound = 2 * bf16_ulp(torch.maximum(base[key].float().abs(), fused[key].float().abs()))
        assert bool(((b.float() - base[key].float()).abs() <= bound).all()), key


def test_lycoris_fuse_is_exact_in_float32_and_another_base_is_named(tmp_path):
    adapter_file, base_dir, merged, _, _, _ = lycoris_llama(tmp_path, dtype=torch.float32, algo="lora", linear_dim=4,
                                                            linear_alpha=2)
    ak.fuse(base_dir, adapter_file, tmp_path / "fused", progress=False)
    fused = load_dir(tmp_path / "fused")
    for key, ref in merged.items():  # the same float32 products and sums as LyCORIS: bit for bit
        assert torch.equal(fused[key], ref), key
    # a base of another architecture: the error is about that base, and asks for no --base fuse does not have
    other = tmp_path / "other"
    make_tiny_llama(0, num_hidden_layers=1).save_pretrained(str(other))
    with pytest.raises(ak.ConfigError) as e:
        ak.fuse(other, adapter_file, tmp_path / "o", progress=False)
    assert "--base" not in str(e.value) and "base=" not in str(e.value)
    assert "lycoris_model_layers_1_" in str(e.value) and str(other) in str(e.value)
    assert not (tmp_path / "o").exists()


def test_sd_scripts_ldm_names_still_fuse_into_a_diffusers_pipeline(tmp_path):
    """sd-scripts' SDXL UNet names (input_blocks_...) are no module of a diffusers base: the shipped alias table maps them."""
    from safetensors.torch import save_file

    from .test_convert_names import lora_file

    pipe = tmp_path / "pipe"
    (pipe / "unet").mkdir(parents=True)
    index = {"_class_name": "StableDiffusionXLPipeline", "unet": ["diffusers", "UNet2DConditionModel"]}
    (pipe / "model_index.json").write_text(json.dumps(index))
    key = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.weight"
    w = torch.randn(640, 640, generator=torch.Generator().manual_seed(0))
    save_file({key: w, "conv_in.weight": torch.zeros(4, 4, 1, 1)}, str(pipe / "unet" / "diffusion_pytorch_model.safetensors"))
    f = lora_file(tmp_path / "ldm.safetensors", {"lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q": (640, 640)},
                  metadata={"ss_base_model_version": "sdxl_base_v1-0"})
    result = ak.fuse(pipe, f, tmp_path / "fused", progress=False)
    assert list(result.plan["tensor"]) == ["unet." + key]
    lora = load_file(str(f))
    name = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"
    want = w + 0.5 * lora[f"{name}.lora_up.weight"] @ lora[f"{name}.lora_down.weight"]  # alpha 1, rank 2
    fused = load_file(str(tmp_path / "fused" / "unet" / "diffusion_pytorch_model.safetensors"))
    torch.testing.assert_close(fused[key], want, rtol=1e-6, atol=1e-6)
