"""Extract (LoRA from base + fused) against the adapter it came from; fuse failure modes; the CLI commands."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from click.testing import CliRunner
from peft import LoraConfig, PeftModel

import adaptkit as ak
from adaptkit.cli import main
from adaptkit.io.outputs import _host

from .conftest import make_peft_adapter, make_tiny_llama
from .test_fuse import load_dir, save_base

LORA = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj", "up_proj"], init_lora_weights=False)


@pytest.fixture(scope="module")
def f32_setup(tmp_path_factory):
    """A float32 sharded base, a LoRA with two ranks (rank_pattern), and the fused model."""
    root = tmp_path_factory.mktemp("extract")
    base = save_base(root / "base", dtype=torch.float32, shard="20KB")
    cfg = LoraConfig(**{**LORA, "rank_pattern": {"v_proj": 2}})
    adapter_dir = make_peft_adapter(root / "adapter", cfg, seed=11)
    ak.fuse(base, adapter_dir, root / "fused", progress=False)
    return base, adapter_dir, root / "fused"


def test_extract_recovers_delta_at_its_rank(tmp_path, f32_setup):
    base, adapter_dir, fused = f32_setup
    original = ak.load(adapter_dir)
    extracted, report = ak.extract(base, fused, rank=4, out=tmp_path / "x", progress=False, return_report=True)
    assert sorted(extracted.layers) == sorted(original.layers)
    for path, layer in original.layers.items():
        d, e = layer.delta(), extracted.layers[path].delta()
        assert float((e - d).norm() / d.norm()) < 1e-3, path
    assert set(report["action"]) == {"lora"}
    assert float(report["retained_energy"].min()) > 1 - 1e-6
    # written as PEFT: loads in peft and reproduces the fused model's logits
    from transformers import AutoModelForCausalLM

    ids = torch.randint(0, 64, (1, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = AutoModelForCausalLM.from_pretrained(fused).eval()(ids).logits
        got = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), str(tmp_path / "x")).eval()(ids).logits
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_extract_energy_picks_per_layer_ranks(tmp_path, f32_setup):
    base, _, fused = f32_setup
    adapter, report = ak.extract(base, fused, energy=0.999999, out=tmp_path / "x", method="randomized",
                                 progress=False, return_report=True)
    ranks = {p: layer.rank for p, layer in adapter.layers.items()}
    assert {r for p, r in ranks.items() if "v_proj" in p} == {2}
    assert {r for p, r in ranks.items() if "v_proj" not in p} == {4}
    cfg = json.loads((tmp_path / "x" / "adapter_config.json").read_text())
    assert cfg["rank_pattern"] and cfg["alpha_pattern"]
    assert (report["retained_energy"] >= 0.999999 - 1e-6).all()
    # a rank below the adapter's loses energy, and the report says how much (measured, not estimated)
    low, low_report = ak.extract(base, fused, rank=1, progress=False, return_report=True)
    assert all(layer.rank == 1 for layer in low.layers.values())
    assert (low_report["retained_energy"] < 0.999).all() and (low_report["relative_error"] > 1e-2).all()


def test_extract_embeddings_and_norms_by_option(tmp_path):
    base = save_base(tmp_path / "base", dtype=torch.float32, shard="1MB", seed=0)
    model = make_tiny_llama(0)
    with torch.no_grad():
        model.model.embed_tokens.weight += 0.01 * torch.randn_like(model.model.embed_tokens.weight)
        model.model.norm.weight += 0.5
        model.model.layers[0].self_attn.q_proj.weight += 0.01 * torch.randn_like(model.model.layers[0].self_attn.q_proj.weight)
    model.save_pretrained(str(tmp_path / "tuned"))
    skipped, report = ak.extract(base, tmp_path / "tuned", rank=2, progress=False, return_report=True)
    assert sorted(skipped.layers) == ["model.layers.0.self_attn.q_proj"]
    assert dict(zip(report["module"], report["action"])) == {
        "model.embed_tokens": "skipped", "model.norm": "skipped", "model.layers.0.self_attn.q_proj": "lora"}
    full, report = ak.extract(base, tmp_path / "tuned", rank=64, embeddings="lora", norms="save", progress=False,
                              return_report=True)
    emb = full.layers["model.embed_tokens"]
    assert emb.module_type == "embedding"
    torch.testing.assert_close(emb.delta(), model.model.embed_tokens.weight.detach() - make_tiny_llama(0).model.embed_tokens.weight,
                               atol=1e-5, rtol=0)
    assert torch.equal(full.extras["model.norm.weight"], model.model.norm.weight.detach())
    assert full.config["modules_to_save"] == ["model.norm"]


def test_extract_bad_arguments(tmp_path, f32_setup):
    base, _, fused = f32_setup
    with pytest.raises(ak.ConfigError, match="rank=R or energy"):
        ak.extract(base, fused)
    with pytest.raises(ak.ConfigError, match=r"energy \(--energy\) must be a number in \(0, 1\], got 1.5"):
        ak.extract(base, fused, energy=1.5)
    other = save_base(tmp_path / "other", dtype=torch.float32)
    with pytest.raises(ak.ConfigError, match="nothing to extract"):
        ak.extract(base, other, rank=2, progress=False)


# ---------------------------------------------------------------------------------------------- failure modes


def test_kill_9_during_fuse_leaves_no_output(tmp_path, f32_setup):
    base, adapter_dir, _ = f32_setup
    out, marker = tmp_path / "out", tmp_path / "started"
    script = textwrap.dedent(f"""
        import sys, time, adaptkit.ops.fuse
        F = sys.modules["adaptkit.ops.fuse"]
        original = F.write_out_file
        def slow(plan, path, **kwargs):
            original(plan, path, **kwargs)
            open({str(marker)!r}, "w").close()
            time.sleep(120)
        F.write_out_file = slow
        F.fuse({str(base)!r}, {str(adapter_dir)!r}, {str(out)!r}, progress=False, workers=1)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=tmp_path)
    try:
        deadline = time.time() + 120
        while not marker.exists():
            assert proc.poll() is None, "the fuse subprocess ended before it was killed"
            assert time.time() < deadline
            time.sleep(0.1)
        partial = list(tmp_path.glob(".out.adaptkit-tmp-*"))
        assert partial and any(partial[0].glob("*.safetensors"))  # killed in the middle of writing
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    assert not out.exists()
    # the next fuse to the same path removes the dead writer's hidden leftover and writes the output
    alive = tmp_path / f".out.adaptkit-tmp-{os.getpid()}@{_host()}-live"  # a running writer's: kept
    alive.mkdir()
    ak.fuse(base, adapter_dir, out, progress=False)
    assert out.is_dir() and not partial[0].exists() and alive.exists()


@pytest.mark.parametrize("damage", ["truncate", "header"])
def test_corrupt_shard_is_a_clear_error(tmp_path, f32_setup, damage):
    import shutil

    base, adapter_dir, _ = f32_setup
    broken = tmp_path / "broken"
    shutil.copytree(base, broken)
    shard = sorted(broken.glob("*.safetensors"))[1]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 100] if damage == "truncate" else data[:8] + b"{garbage" + data[16:])
    with pytest.raises(ak.FormatError, match=shard.name):
        ak.fuse(broken, adapter_dir, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_unmatched_layers_and_existing_output(tmp_path, f32_setup):
    base, adapter_dir, fused = f32_setup
    bigger = make_peft_adapter(tmp_path / "a3", LoraConfig(**LORA), model=make_tiny_llama(0, num_hidden_layers=3))
    with pytest.raises(ak.ConfigError, match=r"4 of 12 adapter layers would not land.*model\.layers\.2\..*matches no weight.*--drop"):
        ak.fuse(base, bigger, tmp_path / "out", progress=False)
    with pytest.raises(ak.OutputExistsError, match="already exists"):
        ak.fuse(base, adapter_dir, fused, progress=False)
    wrong = make_peft_adapter(tmp_path / "wide", LoraConfig(**LORA), model=make_tiny_llama(0, intermediate_size=40))
    with pytest.raises(ak.ShapeMismatchError, match="another model"):
        ak.fuse(base, wrong, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------------------------------------- CLI


def test_cli_fuse_dry_run_unfuse_extract(tmp_path, f32_setup):
    base, adapter_dir, fused = f32_setup
    runner = CliRunner()
    dry = runner.invoke(main, ["fuse", str(base), str(adapter_dir), "--dry-run", "--json"])
    assert dry.exit_code == 0, dry.output
    payload = json.loads(dry.stdout)
    assert payload["touched"] == 8 and len(payload["layers"]) == 8 and payload["output"].startswith("(dry run")
    res = runner.invoke(main, ["fuse", str(base), str(adapter_dir), "-o", str(tmp_path / "f"), "--no-progress"])
    assert res.exit_code == 0, res.output
    assert "touched" in res.stdout and (tmp_path / "f" / "config.json").is_file()
    res = runner.invoke(main, ["unfuse", str(tmp_path / "f"), str(adapter_dir), "-o", str(tmp_path / "b"), "--no-progress"])
    assert res.exit_code == 0, res.output
    original = load_dir(base)
    for k, v in load_dir(tmp_path / "b").items():
        torch.testing.assert_close(v, original[k], atol=1e-6, rtol=0)
    res = runner.invoke(main, ["extract", str(base), str(fused), "-o", str(tmp_path / "x"), "--rank", "4", "--csv"])
    assert res.exit_code == 0, res.output
    assert res.stdout.splitlines()[0].startswith("module,tensor,action") and (tmp_path / "x" / "adapter_config.json").is_file()


@pytest.mark.parametrize("case", ["unmatched", "exists", "no_out", "weights"])
def test_cli_errors_are_one_line_exit_1(tmp_path, f32_setup, case):
    base, adapter_dir, fused = f32_setup
    args = {
        "unmatched": ["fuse", str(base), str(make_peft_adapter(tmp_path / "a3", LoraConfig(**LORA),
                                                                model=make_tiny_llama(0, num_hidden_layers=3))),
                      "-o", str(tmp_path / "o")],
        "exists": ["fuse", str(base), str(adapter_dir), "-o", str(fused)],
        "no_out": ["unfuse", str(fused), str(adapter_dir)],
        "weights": ["fuse", str(base), str(adapter_dir), "-o", str(tmp_path / "o"), "--weights", "1,x"],
    }[case]
    res = CliRunner().invoke(main, args, env={"ADAPTKIT_DEBUG": ""})
    assert res.exit_code == 1
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in res.output
    assert {"unmatched": "matches no weight", "exists": "already exists", "no_out": "--out", "weights": "--weights"}[case] in lines[0]


def test_cli_subprocess_error(tmp_path):
    from .conftest import run_cli_process

    res = run_cli_process("fuse", str(tmp_path / "missing"), str(tmp_path / "also-missing"), "-o", str(tmp_path / "o"))
    assert res.returncode == 1
    assert res.stderr.count("\n") == 1 and res.stderr.startswith("error: ") and "Traceback" not in res.stderr
    assert not (tmp_path / "o").exists()
    _ = os


def test_fuse_from_hub_id(tmp_path, hub_cache, f32_setup):
    from .conftest import make_hub_cache

    base, adapter_dir, fused = f32_setup
    make_hub_cache(hub_cache, "org/tiny-llama", {p.name: p for p in base.iterdir()})
    result = ak.fuse("org/tiny-llama", adapter_dir, tmp_path / "o", progress=False)
    assert result.touched == 8
    want = load_dir(fused)
    assert all(torch.equal(v, want[k]) for k, v in load_dir(tmp_path / "o").items())


def test_pipeline_components(tmp_path):
    """A diffusers-style pipeline: one weight folder per component, adapter paths carry the component."""
    pipe = tmp_path / "pipe"
    pipe.mkdir()
    (pipe / "model_index.json").write_text(json.dumps({"_class_name": "Test", "unet": ["x", "y"]}))
    (pipe / "scheduler").mkdir()
    (pipe / "scheduler" / "scheduler_config.json").write_text("{}")
    make_tiny_llama(0).save_pretrained(str(pipe / "text_encoder"))
    make_tiny_llama(1).save_pretrained(str(pipe / "unet"), max_shard_size="20KB")
    adapter = ak.load(make_peft_adapter(tmp_path / "a", LoraConfig(**LORA), seed=2))
    with pytest.raises(ak.ConfigError, match="several base weights"):  # which component? refused, not guessed
        ak.fuse(pipe, adapter, tmp_path / "o", progress=False)
    unet_only = adapter.replace(layers={"unet." + k: v for k, v in adapter.layers.items()})
    result = ak.fuse(pipe, unet_only, tmp_path / "o", progress=False)
    assert result.touched == 8 and all(t.startswith("unet.") for t in result.plan["tensor"])
    assert (tmp_path / "o" / "scheduler" / "scheduler_config.json").is_file()
    assert (tmp_path / "o" / "model_index.json").is_file()
    assert (tmp_path / "o" / "unet" / "model.safetensors.index.json").is_file()
    text = load_dir(tmp_path / "o" / "text_encoder")
    assert all(torch.equal(v, load_dir(pipe / "text_encoder")[k]) for k, v in text.items())
    unet, unet_base = load_dir(tmp_path / "o" / "unet"), load_dir(pipe / "unet")
    key = "model.layers.1.mlp.up_proj.weight"
    expected = unet_base[key] + adapter.layers["model.layers.1.mlp.up_proj"].delta()
    torch.testing.assert_close(unet[key], expected, atol=1e-6, rtol=1e-6)
