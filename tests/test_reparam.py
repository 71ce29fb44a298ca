"""PiSSA / OLoRA / CorDA -> LoRA: adaptkit's conversion against peft's own ``path_initial_model_for_weight_conversion``.

Each case builds a tiny llama, initialises a real peft adapter with ``init_lora_weights="pissa"|"olora"|"corda"``
(which mutates the base), saves the initial adapter as peft's docs say (``init_lora_weights=True``), perturbs
the factors as training would, and saves (a) the trained adapter and (b) peft's converted adapter.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
from peft import LoHaConfig, LoraConfig, PeftModel, get_peft_model

import adaptkit as ak
from adaptkit.ops.reparam import pissa_to_lora

from .conftest import make_hub_cache, make_peft_adapter, make_tiny_llama, run_cli

TARGETS = ["q_proj", "v_proj", "down_proj"]


def _config(init: str, **kw) -> LoraConfig:
    if init == "corda":
        from peft.tuners.lora.config import CordaConfig

        kw["corda_config"] = CordaConfig(corda_method="ipm")
    return LoraConfig(r=kw.pop("r", 4), lora_alpha=kw.pop("lora_alpha", 8), target_modules=kw.pop("target_modules", TARGETS),
                      init_lora_weights=init, **kw)


def build_case(root: Path, init: str, seed: int = 3, **kw) -> dict:
    """Initial, trained and peft-converted adapters plus reference logits of the trained model on the mutated base."""
    model = make_tiny_llama(0)
    cfg = _config(init, **kw)
    if init == "corda":
        from peft.tuners.lora.corda import preprocess_corda

        torch.manual_seed(11)
        calib = torch.randint(0, 64, (6, 16))
        preprocess_corda(model, cfg, run_model=lambda: [model(calib[i : i + 1]) for i in range(len(calib))])
    pm = get_peft_model(model, cfg)
    pm.peft_config["default"].init_lora_weights = True  # as peft's PiSSA/OLoRA/CorDA docs save the initial adapter
    pm.save_pretrained(str(root / "init"))
    pm.peft_config["default"].init_lora_weights = init
    torch.manual_seed(seed)
    with torch.no_grad():  # "training": move every factor
        for name, p in pm.named_parameters():
            if "lora_" in name:
                p.add_(0.05 * torch.randn_like(p))
    pm.save_pretrained(str(root / "trained"))
    pm.save_pretrained(str(root / "peft_converted"), path_initial_model_for_weight_conversion=str(root / "init"))
    torch.manual_seed(1234)
    ids = torch.randint(0, 64, (2, 9))
    with torch.no_grad():
        ref = pm(ids).logits
    return {"root": root, "ids": ids, "ref": ref}


@pytest.fixture(scope="module", params=["pissa", "olora", "corda"])
def case(request, tmp_path_factory):
    return build_case(tmp_path_factory.mktemp(request.param), request.param)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _logits_on_original_base(adapter_dir: Path, ids: torch.Tensor) -> torch.Tensor:
    model = PeftModel.from_pretrained(make_tiny_llama(0), str(adapter_dir)).eval()
    with torch.no_grad():
        return model(ids).logits


def test_exact_conversion_matches_peft(case, tmp_path):
    root = case["root"]
    ours = pissa_to_lora(root / "trained", root / "init")
    theirs = ak.load(root / "peft_converted")
    assert sorted(ours.layers) == sorted(theirs.layers)
    worst = 0.0
    for path, layer in theirs.layers.items():
        worst = max(worst, _rel(ours.layers[path].delta(), layer.delta()))
        assert ours.layers[path].rank == layer.rank == 8
    assert worst < 1e-5, worst

    out = ak.save(ours, tmp_path / "converted")
    cfg = json.loads((out / "adapter_config.json").read_text())
    peft_cfg = json.loads((root / "peft_converted" / "adapter_config.json").read_text())
    for key in ("r", "lora_alpha", "init_lora_weights", "use_rslora"):
        assert cfg[key] == peft_cfg[key], key
    assert (cfg["r"], cfg["lora_alpha"], cfg["init_lora_weights"]) == (8, 16, True)

    # the converted adapter on the ORIGINAL base behaves like the trained adapter on the mutated base
    logits = _logits_on_original_base(out, case["ids"])
    torch.testing.assert_close(logits, case["ref"], atol=1e-5, rtol=1e-5)


def test_compressed_conversion_is_the_best_rank_r(case):
    root = case["root"]
    exact = pissa_to_lora(root / "trained", root / "init")
    small, report = pissa_to_lora(root / "trained", root / "init", rank=3, return_report=True)
    assert list(report["rank"]) == [3] * len(exact.layers)
    for path, layer in exact.layers.items():
        d = layer.delta()
        s = torch.linalg.svdvals(d.double())
        best_err = float(s[3:].pow(2).sum().sqrt())
        err = float((small.layers[path].delta().double() - d.double()).norm())
        assert err == pytest.approx(best_err, rel=1e-4, abs=1e-6)
        energy = float(report.set_index("module").loc[path, "retained_energy"])
        assert energy == pytest.approx(float(s[:3].pow(2).sum() / s.pow(2).sum()), rel=1e-5)
        assert small.layers[path].scale == pytest.approx(layer.scale)
    # asking for the full rank 2r is exact
    full = pissa_to_lora(root / "trained", root / "init", rank=8)
    for path, layer in exact.layers.items():
        assert _rel(full.layers[path].delta(), layer.delta()) < 1e-5


def test_patterns_are_doubled_like_peft(tmp_path):
    case = build_case(tmp_path, "pissa", r=4, lora_alpha=8, rank_pattern={"v_proj": 2}, alpha_pattern={"q_proj": 3})
    ours = pissa_to_lora(tmp_path / "trained", tmp_path / "init")
    theirs = ak.load(tmp_path / "peft_converted")
    for path, layer in theirs.layers.items():
        assert (ours.layers[path].rank, ours.layers[path].alpha) == (layer.rank, layer.alpha), path
        assert _rel(ours.layers[path].delta(), layer.delta()) < 1e-5
    out = ak.save(ours, tmp_path / "ours")
    torch.testing.assert_close(_logits_on_original_base(out, case["ids"]), case["ref"], atol=1e-5, rtol=1e-5)


def test_rslora_scale_is_kept_and_patterns_refused(tmp_path):
    case = build_case(tmp_path / "rs", "olora", use_rslora=True)
    ours = pissa_to_lora(tmp_path / "rs" / "trained", tmp_path / "rs" / "init")
    peft_cfg = json.loads((tmp_path / "rs" / "peft_converted" / "adapter_config.json").read_text())
    assert next(iter(ours.layers.values())).alpha == pytest.approx(peft_cfg["lora_alpha"]) == pytest.approx(8 * math.sqrt(2))
    out = ak.save(ours, tmp_path / "rs_out")
    torch.testing.assert_close(_logits_on_original_base(out, case["ids"]), case["ref"], atol=1e-5, rtol=1e-5)

    # rsLoRA + rank_pattern: peft itself refuses the conversion, and so does adaptkit (with the reason)
    with pytest.raises(ValueError, match="use_rslora"):
        build_case(tmp_path / "rsp", "pissa", use_rslora=True, rank_pattern={"v_proj": 2})
    trained = ak.load(tmp_path / "rsp" / "trained")
    with pytest.raises(ak.UnsupportedError, match="rsLoRA adapter with rank_pattern/alpha_pattern: PEFT refuses"):
        pissa_to_lora(trained, tmp_path / "rsp" / "init")


def test_initial_from_hub_id(tmp_path, hub_cache):
    build_case(tmp_path / "c", "pissa")
    make_hub_cache(hub_cache, "someone/pissa-init", {"init": tmp_path / "c" / "init"})
    from_hub = pissa_to_lora(tmp_path / "c" / "trained", "someone/pissa-init:init")
    local = pissa_to_lora(tmp_path / "c" / "trained", tmp_path / "c" / "init")
    for path, layer in local.layers.items():
        assert torch.equal(from_hub.layers[path].down, layer.down)


def test_cli_convert_pissa(tmp_path):
    build_case(tmp_path, "pissa")
    res = run_cli("convert", "pissa->lora", str(tmp_path / "trained"), str(tmp_path / "cli_out"),
                  "--initial", str(tmp_path / "init"))
    assert res.returncode == 0, res.stderr
    theirs = ak.load(tmp_path / "peft_converted")
    cli = ak.load(tmp_path / "cli_out")
    for path, layer in theirs.layers.items():
        assert _rel(cli.layers[path].delta(), layer.delta()) < 1e-5
    res = run_cli("convert", "olora->lora", str(tmp_path / "trained"), str(tmp_path / "cli_bad"),
                  "--initial", str(tmp_path / "trained"))
    assert res.returncode == 1 and "identical factors" in res.stderr and "Traceback" not in res.stderr
    assert res.stderr.count("\n") == 1


# ------------------------------------------------------------------------------------------- bad inputs


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("pair")
    build_case(root, "pissa")
    return root


def test_trained_passed_as_initial(pair):
    with pytest.raises(ak.ConfigError, match="identical factors.*saved BEFORE training"):
        pissa_to_lora(pair / "trained", pair / "trained")


def test_different_modules(pair, tmp_path):
    other = make_peft_adapter(tmp_path / "other", LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj"],
                                                               init_lora_weights=False))
    with pytest.raises(ak.ConfigError, match="target different modules"):
        pissa_to_lora(pair / "trained", other)


def test_different_ranks(pair, tmp_path):
    other = make_peft_adapter(tmp_path / "other", LoraConfig(r=2, lora_alpha=8, target_modules=TARGETS,
                                                               init_lora_weights=False))
    with pytest.raises(ak.ShapeMismatchError, match="rank 4 in the trained adapter but 2 in the initial"):
        pissa_to_lora(pair / "trained", other)


def test_non_finite_factors(pair, tmp_path):
    trained = ak.load(pair / "trained")
    path = sorted(trained.layers)[0]
    layer = trained.layers[path]
    down = layer.down.clone()
    down[0, 0] = float("nan")
    bad = trained.replace(layers={**trained.layers, path: dataclasses.replace(layer, down=down)})
    with pytest.raises(ak.NonFiniteError, match=f"{path} of the trained adapter holds NaN"):
        pissa_to_lora(bad, pair / "init")
    ak.save(bad, tmp_path / "bad")
    res = run_cli("convert", "pissa->lora", str(tmp_path / "bad"), str(tmp_path / "out"), "--initial", str(pair / "init"))
    assert res.returncode == 1 and "holds NaN" in res.stderr and not (tmp_path / "out").exists()


def test_not_lora_and_bad_rank(pair, tmp_path):
    loha = make_peft_adapter(tmp_path / "loha", LoHaConfig(r=4, alpha=8, target_modules=TARGETS, init_weights=False))
    with pytest.raises(ak.UnsupportedError, match="needs LoRA layers"):
        pissa_to_lora(loha, pair / "init")
    with pytest.raises(ak.ConfigError, match=r"rank \(--rank\) must be an integer of at least 1, got 0"):
        pissa_to_lora(pair / "trained", pair / "init", rank=0)
    with pytest.raises(ak.SourceNotFoundError):
        pissa_to_lora(pair / "trained", tmp_path / "nowhere")
