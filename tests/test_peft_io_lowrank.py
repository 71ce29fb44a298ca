"""PEFT files of AdaLoRA, VeRA, RandLoRA, VB-LoRA, DeLoRA, GraLoRA, MiSS and FourierFT, against the real peft.

For each kind, on a tiny model with perturbed adapter weights: ``save_pretrained`` -> ``ak.load`` (every tensor and
the config kept), ``ak.save(format="peft")`` -> ``PeftModel.from_pretrained`` (same logits), ``ak.fuse`` from the
files vs ``merge_and_unload`` and ``convert --kind lora`` (full rank) vs peft's logits; then the bad inputs. The
figures (max relative errors) are collected in :data:`FIGURES` and printed with ``-s``; docs/peft.md quotes them.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import adaptkit as ak
from adaptkit.errors import ConfigError, FormatError, UnsupportedError

from .conftest import run_cli
from .kinds_peft_util import make_peft, rel, tiny

peft = pytest.importorskip("peft")

#: kind/check -> max relative error measured here
FIGURES: dict[str, float] = {}
TARGETS = ["lin1", "lin2"]
IDS = torch.tensor([[1, 5, 7, 2, 19, 3]])


def _configs() -> dict[str, object]:
    from peft import (
        AdaLoraConfig,
        DeloraConfig,
        FourierFTConfig,
        GraloraConfig,
        MissConfig,
        RandLoraConfig,
        VBLoRAConfig,
        VeraConfig,
    )

    return {
        "adalora": AdaLoraConfig(init_r=4, target_r=2, lora_alpha=8, target_modules=TARGETS, total_step=10,
                                 init_lora_weights=False),
        "vera": VeraConfig(r=4, target_modules=TARGETS),
        "randlora": RandLoraConfig(r=4, randlora_alpha=8, target_modules=TARGETS),
        "vblora": VBLoRAConfig(r=4, vector_length=4, num_vectors=8, topk=3, target_modules=TARGETS),
        "vblora_topk": VBLoRAConfig(r=4, vector_length=4, num_vectors=8, topk=2, target_modules=TARGETS,
                                    save_only_topk_weights=True),
        "delora": DeloraConfig(r=4, target_modules=TARGETS),
        "gralora": GraloraConfig(r=4, gralora_k=2, hybrid_r=2, alpha=8, target_modules=TARGETS),
        "miss": MissConfig(r=4, target_modules=TARGETS),
        "miss_mini": MissConfig(r=4, init_weights="mini", mini_r=4, target_modules=TARGETS),
        "fourierft": FourierFTConfig(n_frequency=10, scaling=50.0, target_modules=TARGETS, random_loc_seed=11),
    }


KINDS = list(_configs())


@pytest.fixture(scope="module", autouse=True)
def _print_figures():
    """After the module: the measured figures (``-s`` shows them; docs/peft.md quotes them)."""
    yield
    print("\nFIGURES", json.dumps({k: f"{v:.1e}" for k, v in sorted(FIGURES.items())}, indent=1))


def _record(label: str, err: float, tol: float) -> None:
    FIGURES[label] = max(err, FIGURES.get(label, 0.0))
    print(f"PARITY {label}: {err:.2e}")
    assert err <= tol, f"{label}: relative error {err:.3e} > {tol:g}"


def _peft(variant: str, base_model):
    skip = ("ranknum",) if variant == "adalora" else ()
    pm, base = make_peft(base_model, _configs()[variant], skip=skip)
    return pm.eval(), base


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS)


def _bf16_exact(model):
    """``model`` with weights bf16 can hold exactly, so that a bf16 base file is the same base."""
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.bfloat16().float())
    return model


_CASES: dict[str, tuple] = {}


def _case(variant: str, tmp_path_factory) -> tuple:
    """``(variant, peft_model, untouched base, peft's directory, base .safetensors)`` for one kind, made once (a bf16
    copy of the base file is beside it)."""
    if variant not in _CASES:
        tmp = tmp_path_factory.mktemp(variant)
        pm, base = _peft(variant, _bf16_exact(tiny()))
        pm.save_pretrained(str(tmp / "peft"))
        sd = {k: v.contiguous() for k, v in base.state_dict().items()}
        save_file(sd, str(tmp / "base.safetensors"))
        save_file({k: v.bfloat16() for k, v in sd.items()}, str(tmp / "base_bf16.safetensors"))
        _CASES[variant] = (variant, pm, base, tmp / "peft", tmp / "base.safetensors")
    return _CASES[variant]


@pytest.fixture(scope="module", params=KINDS)
def case(request, tmp_path_factory):
    """:func:`_case` of each kind."""
    return _case(request.param, tmp_path_factory)


def _load_dir(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    return load_file(str(path / "adapter_model.safetensors")), json.loads((path / "adapter_config.json").read_text())


def _fresh_from(base, path: Path):
    from peft import PeftModel

    return PeftModel.from_pretrained(copy.deepcopy(base), str(path)).eval()


def test_load_keeps_tensors_and_config_and_save_round_trips(case, tmp_path):
    """(1) save_pretrained -> ak.load -> ak.save: peft's exact tensors (VB-LoRA: peft's own top-k form), the config."""
    variant, pm, _, src, _ = case
    adapter = ak.load(src)
    theirs, cfg = _load_dir(src)
    assert adapter.config == cfg and sorted(adapter.layers) == TARGETS
    if not variant.startswith(("randlora", "vblora")):  # RandLoRA's file repeats the bases, VB-LoRA holds all k weights
        assert adapter.numel == sum(t.numel() for t in theirs.values())  # model-level tensors count once
    ak.save(adapter, tmp_path / "ours", format="peft")
    ours, out_cfg = _load_dir(tmp_path / "ours")
    if variant == "vblora":  # the layers hold the top-k: compare with peft's own save_only_topk_weights file
        pm.peft_config["default"].save_only_topk_weights = True
        pm.save_pretrained(str(tmp_path / "topk"))
        pm.peft_config["default"].save_only_topk_weights = False
        theirs, _ = _load_dir(tmp_path / "topk")
        cfg = {**cfg, "save_only_topk_weights": True}
    assert sorted(ours) == sorted(theirs)
    for key, t in theirs.items():
        assert ours[key].dtype == t.dtype and torch.equal(ours[key], t), key
    assert sorted(out_cfg["target_modules"]) == sorted(cfg.pop("target_modules"))
    changed = {k: (v, out_cfg.get(k)) for k, v in cfg.items() if out_cfg.get(k) != v}
    assert not changed, changed


def test_saved_files_load_in_peft_with_the_same_logits(case, tmp_path):
    """(2) ak.save(format="peft") -> PeftModel.from_pretrained on a fresh base: peft's logits."""
    variant, pm, base, src, _ = case
    ak.save(ak.load(src), tmp_path / "ours", format="peft")
    _record(f"{variant} save->peft logits", rel(_logits(_fresh_from(base, tmp_path / "ours")), _logits(pm)), 1e-6)


def test_inject_into_a_live_model_gives_peft_logits(case):
    """ak.inject(model, peft dir): the layers take the live modules' shapes; logits equal peft's."""
    variant, pm, base, src, _ = case
    model = copy.deepcopy(base)
    ak.inject(model, str(src))
    _record(f"{variant} inject logits", rel(_logits(model), _logits(pm)), 1e-6)


def test_inject_a_raw_state_dict_with_its_config(case):
    """ak.inject(model, get_peft_model_state_dict(...), config=...): model-level tensors included; no config refused."""
    from peft import get_peft_model_state_dict

    variant, pm, base, src, _ = case
    state = {k: v.detach().clone() for k, v in get_peft_model_state_dict(pm).items()}
    _, cfg = _load_dir(src)
    model = copy.deepcopy(base)
    ak.inject(model, state, config=cfg)
    _record(f"{variant} inject state dict logits", rel(_logits(model), _logits(pm)), 1e-6)
    with pytest.raises(ConfigError, match="pass config="):
        ak.inject(copy.deepcopy(base), state)


def test_fuse_from_files_equals_merge_and_unload(case, tmp_path):
    """(3) ak.fuse(base file, peft dir) vs merge_and_unload, float32."""
    variant, pm, _, src, base_file = case
    ak.fuse(str(base_file), str(src), tmp_path / "fused.safetensors", progress=False)
    fused = load_file(str(tmp_path / "fused.safetensors"))
    merged = copy.deepcopy(pm).merge_and_unload().state_dict()
    for path in TARGETS:
        _record(f"{variant} fuse", rel(fused[f"{path}.weight"], merged[f"{path}.weight"]), 1e-6)
        assert torch.equal(fused[f"{path}.bias"], merged[f"{path}.bias"])


def test_fuse_into_bf16_base_is_within_one_ulp(case, tmp_path):
    """(3) the same into a bf16 base: the float32 merge rounded once, so within 1 bf16 ulp of peft's float32 merge."""
    variant, pm, _, src, base_file = case
    ak.fuse(str(base_file.with_name("base_bf16.safetensors")), str(src), tmp_path / "fused.safetensors", progress=False)
    fused = load_file(str(tmp_path / "fused.safetensors"))
    merged = copy.deepcopy(pm).merge_and_unload().state_dict()
    for path in TARGETS:
        ours, ref = fused[f"{path}.weight"], merged[f"{path}.weight"]
        assert ours.dtype == torch.bfloat16
        ulp = torch.finfo(torch.bfloat16).eps * torch.exp2(torch.floor(torch.log2(ref.abs().clamp_min(1e-30))))
        ulps = float(((ours.float() - ref).abs() / ulp).max())
        FIGURES[f"{variant} fuse bf16 (ulp)"] = max(ulps, FIGURES.get(f"{variant} fuse bf16 (ulp)", 0.0))
        assert ulps <= 1.0, f"{variant} {path}: {ulps:.2f} bf16 ulp from peft's float32 merge"


def test_adalora_conv_layer_fuses_from_its_flat_file(tmp_path):
    """peft's AdaLoRA stores a conv's lora_A flattened (r, in * kh * kw): fused onto the conv weight as it is."""
    from peft import AdaLoraConfig

    base_model = tiny()
    config = AdaLoraConfig(init_r=4, target_r=2, lora_alpha=8, target_modules=["conv"], total_step=10,
                           init_lora_weights=False)
    pm, base = make_peft(base_model, config, skip=("ranknum",))
    pm.save_pretrained(str(tmp_path / "peft"))
    save_file({k: v.contiguous() for k, v in base.state_dict().items()}, str(tmp_path / "base.safetensors"))
    ak.fuse(str(tmp_path / "base.safetensors"), str(tmp_path / "peft"), tmp_path / "fused.safetensors", progress=False)
    merged = copy.deepcopy(pm).merge_and_unload().state_dict()
    _record("adalora conv fuse", rel(load_file(str(tmp_path / "fused.safetensors"))["conv.weight"], merged["conv.weight"]),
            1e-6)
    ak.save(ak.load(tmp_path / "peft"), tmp_path / "ours", format="peft")
    ours, theirs = _load_dir(tmp_path / "ours")[0], _load_dir(tmp_path / "peft")[0]
    assert all(torch.equal(ours[k], t) for k, t in theirs.items()) and sorted(ours) == sorted(theirs)


def test_convert_to_lora_at_full_rank_gives_peft_logits(case, tmp_path):
    """(4) adaptkit convert ->peft --kind lora --base (the base completes shapes the file leaves open)."""
    variant, pm, base, src, base_file = case
    res = run_cli("convert", "->peft", str(src), str(tmp_path / "lora"), "--kind", "lora", "--base", str(base_file))
    assert res.returncode == 0, res.stderr
    assert json.loads((tmp_path / "lora" / "adapter_config.json").read_text())["peft_type"] == "LORA"
    _record(f"{variant} to-LoRA logits", rel(_logits(_fresh_from(base, tmp_path / "lora")), _logits(pm)), 1e-5)


def test_info_names_the_kind(case):
    variant, _, _, src, _ = case
    res = run_cli("info", str(src))
    assert res.returncode == 0, res.stderr
    assert variant.split("_")[0].replace("vblora", "vblora") in res.stdout.lower()


# ------------------------------------------------------------------------------------------------ AdaLoRA pruning


@pytest.mark.parametrize("lora_alpha", [8, 0])
def test_adalora_pruned_and_rank_zero_layers_round_trip(tmp_path, lora_alpha):
    """A rank_pattern after pruning: smaller and rank-0 layers read, converted and written back (peft re-prunes);
    with lora_alpha=0 peft scales each layer by its pruned rank."""
    from peft import AdaLoraConfig

    config = AdaLoraConfig(init_r=4, target_r=2, lora_alpha=lora_alpha, target_modules=TARGETS, total_step=10,
                           init_lora_weights=False)
    pm, base = make_peft(tiny(), config, skip=("ranknum",))
    pm.peft_config["default"].rank_pattern = {"lin1.lora_E": [True, False, True, True],
                                              "lin2.lora_E": [False, False, False, False]}
    pm.save_pretrained(str(tmp_path / "peft"))
    adapter = ak.load(tmp_path / "peft")
    assert adapter["lin1"].rank == 3 and adapter["lin2"].rank == 0 and adapter["lin1"].ranknum == 4
    ak.save(adapter, tmp_path / "ours", format="peft")
    assert json.loads((tmp_path / "ours" / "adapter_config.json").read_text())["lora_alpha"] == lora_alpha
    ref = _logits(_fresh_from(base, tmp_path / "peft"))
    _record("adalora pruned save->peft logits", rel(_logits(_fresh_from(base, tmp_path / "ours")), ref), 1e-6)
    lora = ak.convert(adapter, kind="lora")
    ak.save(lora, tmp_path / "lora", format="peft")
    _record("adalora pruned to-LoRA logits", rel(_logits(_fresh_from(base, tmp_path / "lora")), ref), 1e-5)


def test_bone_checkpoint_reads_as_miss(tmp_path, tmp_path_factory):
    """peft < 0.17 wrote MiSS as BONE / bone_block; it reads as MiSS and is written back as MISS."""
    _, pm, base, src, _ = _case("miss", tmp_path_factory)
    tensors, cfg = _load_dir(src)
    (tmp_path / "bone").mkdir()
    save_file({k.replace("miss_block", "bone_block"): v for k, v in tensors.items()},
              str(tmp_path / "bone" / "adapter_model.safetensors"))
    (tmp_path / "bone" / "adapter_config.json").write_text(json.dumps({**cfg, "peft_type": "BONE"}))
    adapter = ak.load(tmp_path / "bone")
    assert {layer.kind for layer in adapter.layers.values()} == {"miss"}
    ak.save(adapter, tmp_path / "ours", format="peft")
    _record("bone->miss save->peft logits", rel(_logits(_fresh_from(base, tmp_path / "ours")), _logits(pm)), 1e-6)


# ---------------------------------------------------------------------------------------------------- bad inputs


def _rewrite(src: Path, dst: Path, drop: tuple[str, ...] = (), cfg: dict | None = None,
             change: dict[str, torch.Tensor] | None = None) -> Path:
    tensors, config = _load_dir(src)
    dst.mkdir()
    tensors = {k: v for k, v in tensors.items() if k not in drop} | (change or {})
    save_file(tensors, str(dst / "adapter_model.safetensors"))
    (dst / "adapter_config.json").write_text(json.dumps({**config, **(cfg or {})}))
    return dst


BAD = {
    "vera": [({"drop": ("base_model.vera_A",)}, FormatError, "save_projection=True"),
             ({"drop": ("base_model.vera_A", "base_model.vera_B"), "cfg": {"save_projection": False}}, UnsupportedError,
              "save_projection=False"),
             ({"cfg": {"r": 5}}, ConfigError, "gives r=5")],
    "randlora": [({"drop": ("base_model.randlora_B", "base_model.model.lin1.randlora_B",
                            "base_model.model.lin2.randlora_B")}, FormatError, "base_model.randlora_B"),
                 ({"change": {"base_model.model.lin1.randlora_A": torch.zeros(4, 1, 24)}}, FormatError,
                  "differs from the model-level")],
    "vblora": [({"drop": ("base_model.vblora_vector_bank",)}, FormatError, "vblora_vector_bank"),
               ({"cfg": {"topk": 9}}, ConfigError, "topk")],
    "vblora_topk": [({"cfg": {"topk": 3}}, ConfigError, "gives topk=3")],
    "adalora": [({"cfg": {"init_r": 6}}, ConfigError, "gives init_r=6"),
                ({"cfg": {"rank_pattern": {"lin1.lora_E": [True, False, True, True]}}}, ConfigError, "rank_pattern")],
    "delora": [({"cfg": {"r": 3}}, ConfigError, "r/rank_pattern=3"),
               ({"drop": ("base_model.model.lin1.delora_w_norm",)}, FormatError, "delora_w_norm")],
    "gralora": [({"cfg": {"hybrid_r": 0}}, ConfigError, "hybrid_r=0"), ({"cfg": {"gralora_k": 4}}, ConfigError, "gralora_k")],
    "miss": [({"cfg": {"r": 2}}, ConfigError, "gives r=2"), ({"cfg": {"init_weights": "bat"}}, ConfigError, "init_weights=.bat. but the tensors")],
    "miss_mini": [({"cfg": {"mini_r": 8}}, ConfigError, "mini_r=8")],
    "fourierft": [({"cfg": {"n_frequency": 12}}, ConfigError, "n_frequency")],
}


def test_bad_files_are_refused_with_the_fix(case, tmp_path):
    """(5) a missing shared projection/bank, configs that contradict the tensors: clear errors."""
    variant, _, _, src, _ = case
    for i, (edit, err, match) in enumerate(BAD[variant]):
        with pytest.raises(err, match=match):
            ak.load(_rewrite(src, tmp_path / f"bad{i}", **edit))


@pytest.mark.parametrize("variant", ["vera", "randlora", "miss", "fourierft"])
def test_shapeless_layers_need_the_base(variant, tmp_path_factory):
    """VeRA, RandLoRA, MiSS, FourierFT files do not fix the weight shape: convert without a base says so."""
    _, _, base, src, _ = _case(variant, tmp_path_factory)
    adapter = ak.load(src)
    assert all(layer.shape is None for layer in adapter.layers.values())
    with pytest.raises(UnsupportedError, match="base="):
        ak.convert(adapter, kind="lora")
    fitted = ak.load(src, base=base)
    assert all(tuple(layer.shape) == tuple(base.get_submodule(p).weight.shape) for p, layer in fitted.layers.items())
    # analysis without the shape: one row per layer with NaN statistics and a note naming the base, not an error
    rows = ak.analyze(adapter)
    assert len(rows) == len(adapter.layers) and rows["fro_norm"].isna().all()
    assert rows["note"].str.contains("--base").all()
    # merging needs the shape too: refused without the base, exact task arithmetic with it
    with pytest.raises(UnsupportedError, match="no weight shape yet.*--base"):
        ak.merge([adapter, adapter])
    merged = ak.merge([fitted, fitted], weights=[0.7, -0.2])
    for p, layer in fitted.layers.items():
        torch.testing.assert_close(merged.layers[p].delta(), 0.5 * layer.delta(), rtol=1e-5, atol=1e-6)
    full = ak.analyze(fitted)
    want = [float(layer.delta().double().norm()) for _, layer in sorted(fitted.layers.items())]
    assert full.sort_values("module")["fro_norm"].tolist() == pytest.approx(want, rel=1e-5)




def test_layers_one_config_cannot_hold_are_refused(tmp_path, tmp_path_factory):
    """One init_r per AdaLoRA adapter, seeded positions for FourierFT; a cast VeRA (equal projections) is fine."""
    import dataclasses

    adalora = ak.load(_case("adalora", tmp_path_factory)[3])
    mixed = adalora.replace(layers={**adalora.layers, "lin2": dataclasses.replace(adalora["lin2"], ranknum=6.0)})
    with pytest.raises(UnsupportedError, match="init_r"):
        ak.save(mixed, tmp_path / "a", format="peft")
    _, _, base, src, _ = _case("fourierft", tmp_path_factory)
    fitted = ak.load(src, base=base)
    unseeded = fitted.replace(layers={p: dataclasses.replace(l, seed=None) for p, l in fitted.layers.items()})
    with pytest.raises(UnsupportedError, match="random_loc_seed"):
        ak.save(unseeded, tmp_path / "f", format="peft")
    ak.save(ak.load(_case("vera", tmp_path_factory)[3]).to(torch.bfloat16), tmp_path / "v", format="peft")
    tensors, _ = _load_dir(tmp_path / "v")
    assert tensors["base_model.vera_A"].dtype == torch.bfloat16 and "base_model.model.lin1.vera_lambda_b" in tensors


# ------------------------------------------------------------------------------------- Conv1D (fan_in_fan_out)


def _gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return _bf16_exact(GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=20, n_positions=8)).eval())


def _conv1d_configs() -> dict[str, object]:
    from peft import (
        AdaLoraConfig,
        FourierFTConfig,
        GraloraConfig,
        RandLoraConfig,
        VBLoRAConfig,
        VeraConfig,
    )

    t = ["c_attn", "c_fc"]
    return {
        "adalora": AdaLoraConfig(init_r=4, target_r=2, lora_alpha=8, target_modules=t, total_step=10,
                                 init_lora_weights=False, fan_in_fan_out=True),
        "vera": VeraConfig(r=4, target_modules=t, fan_in_fan_out=True),
        "randlora": RandLoraConfig(r=4, randlora_alpha=8, target_modules=t, fan_in_fan_out=True),
        "vblora": VBLoRAConfig(r=4, vector_length=4, num_vectors=8, topk=2, target_modules=t, fan_in_fan_out=True),
        "gralora": GraloraConfig(r=4, gralora_k=2, alpha=8, target_modules=t, fan_in_fan_out=True),
        "fourierft": FourierFTConfig(n_frequency=10, scaling=50.0, target_modules=t, fan_in_fan_out=True),
    }


@pytest.mark.parametrize("variant", list(_conv1d_configs()))
def test_conv1d_layers_round_trip_and_fuse(variant, tmp_path):
    """GPT-2's Conv1D (weights stored transposed): peft's logits after ak.save, fuse vs merge_and_unload."""
    pm, base = make_peft(_gpt2(), _conv1d_configs()[variant], skip=("ranknum",))
    pm.eval()
    pm.save_pretrained(str(tmp_path / "peft"))
    ak.save(ak.load(tmp_path / "peft"), tmp_path / "ours", format="peft")
    _record(f"{variant} conv1d save->peft logits",
            rel(_fresh_from(base, tmp_path / "ours")(IDS).logits, pm(IDS).logits), 1e-6)
    save_file({k: v.contiguous() for k, v in base.state_dict().items() if k != "lm_head.weight"},
              str(tmp_path / "base.safetensors"))
    ak.fuse(str(tmp_path / "base.safetensors"), str(tmp_path / "peft"), tmp_path / "fused.safetensors", progress=False)
    fused = load_file(str(tmp_path / "fused.safetensors"))
    merged = copy.deepcopy(pm).merge_and_unload().state_dict()
    for key in ("transformer.h.0.attn.c_attn.weight", "transformer.h.0.mlp.c_fc.weight"):
        _record(f"{variant} conv1d fuse", rel(fused[key], merged[key]), 1e-6)
