"""PEFT files of the other tuners against the real peft: WAVEFT, SHIRA, C3A, OFT, BOFT, HRA, MISS bat, LN_TUNING,
TRAINABLE_TOKENS (and LoRA's trainable_token_indices).

For each kind, on a tiny seeded model with perturbed adapter weights: ``save_pretrained`` -> ``ak.load`` keeps the
tensors and the config; ``ak.save(format="peft")`` loads back in ``PeftModel.from_pretrained`` with the same
logits; ``ak.fuse`` from the files with the base equals ``merge_and_unload``; ``convert --kind lora --base`` gives
the same logits as peft (exact at full rank). Bad inputs get one clear error.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import adaptkit as ak
from adaptkit.errors import ConfigError, UnsupportedError
from adaptkit.ops.convert import convert_checkpoint

from .kinds_peft_util import check, make_peft, merged_weights, tiny

peft = pytest.importorskip("peft")

IDS = torch.tensor([[1, 5, 7, 3, 0, 19], [2, 4, 6, 8, 10, 12]])


def _configs():
    from peft import (
        BOFTConfig,
        C3AConfig,
        HRAConfig,
        LNTuningConfig,
        MissConfig,
        OFTConfig,
        ShiraConfig,
        TrainableTokensConfig,
        WaveFTConfig,
    )

    return {
        "waveft": WaveFTConfig(n_frequency=40, scaling=3.0, wavelet_family="db3", random_loc_seed=5,
                               target_modules=["lin1", "lin2"]),
        "shira": ShiraConfig(r=2, target_modules=["lin1", "lin2"], init_weights=False),
        "c3a": C3AConfig(block_size=4, target_modules=["lin1", "lin2"], init_weights="gaussian"),
        "oft": OFTConfig(r=0, oft_block_size=4, target_modules=["lin1", "conv", "emb"]),
        "oft exact coft": OFTConfig(r=0, oft_block_size=4, target_modules=["lin1", "lin2"], use_cayley_neumann=False,
                                    coft=True, eps=1e-2),
        "oft share": OFTConfig(r=0, oft_block_size=4, target_modules=["lin1"], block_share=True,
                               use_cayley_neumann=False),
        "boft": BOFTConfig(boft_block_size=4, target_modules=["lin1", "conv"], init_weights=False),
        "hra": HRAConfig(r=4, target_modules=["lin1", "conv"], init_weights=False),
        "hra gs": HRAConfig(r=4, apply_GS=True, target_modules=["lin1", "lin2"], init_weights=False),
        "miss bat": MissConfig(r=4, target_modules=["lin1", "lin2"], init_weights="bat"),
        "miss": MissConfig(r=4, target_modules=["lin1", "lin2"], init_weights=False),
        "miss mini": MissConfig(r=4, mini_r=4, target_modules=["lin1", "lin2"], init_weights="mini"),
        "ln_tuning": LNTuningConfig(target_modules=["norm"]),
        "trainable_tokens": TrainableTokensConfig(target_modules=["emb"], token_indices=[1, 5, 7]),
    }


CASES = sorted(_configs())
#: kinds with no LoRA form even with the base (a 1-D norm weight)
NO_LORA = {"ln_tuning"}
#: figures measured here, printed with -s and copied to docs/peft.md
FIGS: dict[str, dict[str, float]] = {}


def _fig(case: str, what: str, err: float) -> None:
    FIGS.setdefault(case, {})[what] = max(err, FIGS.get(case, {}).get(what, 0.0))
    print(f"FIG {case} {what}: {err:.2e}")


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """Per case: the peft model's directory, the base directory, logits and merged weights (made once)."""
    out = {}
    for case in CASES:
        root = tmp_path_factory.mktemp(case.replace(" ", "_"))
        pm, base = make_peft(tiny(), _configs()[case], noise=0.1)
        pm.save_pretrained(root / "adapter")
        (root / "base").mkdir()
        save_file({k: v.contiguous() for k, v in base.state_dict().items()}, str(root / "base" / "model.safetensors"))
        with torch.no_grad():
            logits = pm(IDS).detach().clone()
        out[case] = {"root": root, "base": base, "logits": logits, "merged": merged_weights(pm)}
    return out


def _logits(base, directory):
    from peft import PeftModel

    with torch.no_grad():
        return PeftModel.from_pretrained(copy.deepcopy(base), str(directory)).eval()(IDS)


@pytest.mark.parametrize("case", CASES)
def test_load_save_round_trip_and_peft_logits(made, case, tmp_path):
    m = made[case]
    src = m["root"] / "adapter"
    a = ak.load(src)
    assert a.format == "peft" and a.layers
    ours = tmp_path / "out"
    ak.save(a, ours, format="peft")
    theirs, mine = load_file(str(src / "adapter_model.safetensors")), load_file(str(ours / "adapter_model.safetensors"))
    assert sorted(theirs) == sorted(mine)
    for k in theirs:
        assert theirs[k].dtype == mine[k].dtype and torch.equal(theirs[k], mine[k]), k
    cfg_src, cfg_out = (json.loads((d / "adapter_config.json").read_text()) for d in (src, ours))
    for key, value in cfg_src.items():
        if key in ("target_modules", "inference_mode"):
            continue
        assert cfg_out.get(key) == value or (value in (None, {}, []) and cfg_out.get(key) in (None, {}, [])), key
    assert set(cfg_out["target_modules"]) == set(a.layers)
    err = check(f"{case} peft logits", _logits(m["base"], ours), m["logits"], 1e-6)
    _fig(case, "read-write", err)


@pytest.mark.parametrize("case", CASES)
def test_fuse_from_files_equals_merge_and_unload(made, case, tmp_path):
    m = made[case]
    ak.fuse(m["root"] / "base", m["root"] / "adapter", tmp_path / "fused", progress=False)
    fused = load_file(str(tmp_path / "fused" / "model.safetensors"))
    base_sd = m["base"].state_dict()
    worst = 0.0
    changed = 0
    for key, ref in m["merged"].items():
        if not torch.equal(ref, base_sd[key]):
            changed += 1
            worst = max(worst, check(f"{case} fuse", fused[key], ref, 1e-6))
        else:
            assert torch.equal(fused[key], ref), key
    assert changed
    _fig(case, "fuse", worst)


@pytest.mark.parametrize("case", [c for c in CASES if c not in NO_LORA])
def test_convert_to_lora_with_base(made, case, tmp_path):
    m = made[case]
    result = convert_checkpoint("peft->peft", m["root"] / "adapter", tmp_path / "lora", kind="lora",
                                base=m["root"] / "base", progress=False)
    assert json.loads((tmp_path / "lora" / "adapter_config.json").read_text())["peft_type"] == "LORA"
    assert (result.report["retained_energy"] > 1 - 1e-6).all()
    err = check(f"{case} to-lora logits", _logits(m["base"], tmp_path / "lora"), m["logits"], 1e-5)
    _fig(case, "to-lora", err)


@pytest.mark.parametrize("case", ["oft", "hra", "miss bat", "trainable_tokens", "shira", "waveft"])
def test_convert_without_base_names_base(made, case, tmp_path):
    with pytest.raises(UnsupportedError, match="--base"):
        convert_checkpoint("peft->peft", made[case]["root"] / "adapter", tmp_path / "lora", kind="lora", progress=False)
    assert not (tmp_path / "lora").exists()


def test_convert_to_kohya_with_base_but_no_kind_says_to_add_kind(made, tmp_path):
    """kohya holds no PEFT OFT: with the base on disk the way out is --kind lora, not --base again."""
    with pytest.raises(UnsupportedError, match="add --kind lora"):
        convert_checkpoint("peft->kohya", made["oft"]["root"] / "adapter", tmp_path / "o.safetensors",
                           base=made["oft"]["root"] / "base", progress=False)
    assert not (tmp_path / "o.safetensors").exists()


def test_ln_tuning_has_no_lora_form(made, tmp_path):
    with pytest.raises(UnsupportedError, match="norm|LoRA|lora"):
        convert_checkpoint("peft->peft", made["ln_tuning"]["root"] / "adapter", tmp_path / "lora", kind="lora",
                           base=made["ln_tuning"]["root"] / "base", progress=False)


@pytest.mark.parametrize(("case", "field", "value", "match"), [
    ("oft", "oft_block_size", 8, "oft_block_size"),
    ("oft exact coft", "block_share", True, "block_share"),
    ("boft", "boft_block_size", 2, "boft_block_size"),
    ("hra", "r", 6, "r=6"),
    ("miss bat", "init_weights", True, "init_weights"),
    ("c3a", "block_size", 8, "block_size"),
    ("waveft", "n_frequency", 41, "n_frequency"),
    ("trainable_tokens", "token_indices", [1, 2], "token indices"),
])
def test_config_tensor_mismatch_is_refused(made, case, field, value, match, tmp_path):
    src = made[case]["root"] / "adapter"
    cfg = json.loads((src / "adapter_config.json").read_text())
    cfg[field] = value
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "adapter_config.json").write_text(json.dumps(cfg))
    (bad / "adapter_model.safetensors").write_bytes((src / "adapter_model.safetensors").read_bytes())
    with pytest.raises(ConfigError, match=match):
        ak.load(bad)


def test_operations_needing_the_shape_say_pass_the_base(made):
    a = ak.load(made["shira"]["root"] / "adapter")
    with pytest.raises(UnsupportedError, match="base"):
        a.layers["lin1"].delta()


def test_lora_with_trainable_token_indices(tmp_path):
    from peft import LoraConfig

    pm, base = make_peft(tiny(), LoraConfig(r=2, target_modules=["lin1"], trainable_token_indices={"emb": [1, 3]}))
    pm.save_pretrained(tmp_path / "adapter")
    with torch.no_grad():
        ref = pm(IDS).detach().clone()
    (tmp_path / "base").mkdir()
    save_file({k: v.contiguous() for k, v in base.state_dict().items()}, str(tmp_path / "base" / "model.safetensors"))
    a = ak.load(tmp_path / "adapter")
    assert sorted(a.layers) == ["emb", "lin1"] and a.layers["emb"].kind == "trainable_tokens"
    merged = merged_weights(pm)
    ak.fuse(tmp_path / "base", tmp_path / "adapter", tmp_path / "fused", progress=False)
    fused = load_file(str(tmp_path / "fused" / "model.safetensors"))
    err = max(check("lora+tokens fuse", fused[k], merged[k], 1e-6) for k in ("emb.weight", "lin1.weight"))
    _fig("lora + trainable_token_indices", "fuse", err)
    ak.save(a, tmp_path / "out", format="peft")
    theirs = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    mine = load_file(str(tmp_path / "out" / "adapter_model.safetensors"))
    assert sorted(theirs) == sorted(mine) and all(torch.equal(theirs[k], mine[k]) for k in theirs)
    cfg = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["trainable_token_indices"] == {"emb": [1, 3]}
    _fig("lora + trainable_token_indices", "read-write",
         check("lora+tokens peft logits", _logits(base, tmp_path / "out"), ref, 1e-6))


def test_print_figures():
    for case, figs in sorted(FIGS.items()):
        print("FIGROW", case, " ".join(f"{k}={v:.1e}" for k, v in sorted(figs.items())))


def _bf16_ulp(x: torch.Tensor) -> torch.Tensor:
    return torch.exp2(torch.floor(torch.log2(x.abs().clamp_min(2.0**-126))) - 7)


@pytest.mark.parametrize("case", ["oft", "boft", "hra", "c3a", "shira", "waveft", "miss bat", "trainable_tokens"])
def test_bf16_fuse_within_one_ulp(case, tmp_path):
    """bf16 base and adapter: the fused weights are the float32 merge (peft's, on an upcast base) rounded once."""
    from peft import PeftModel

    pm, base = make_peft(tiny(dtype=torch.bfloat16), _configs()[case], noise=0.1)
    pm.save_pretrained(tmp_path / "adapter")
    (tmp_path / "base").mkdir()
    save_file({k: v.contiguous() for k, v in base.state_dict().items()}, str(tmp_path / "base" / "model.safetensors"))
    ref32 = PeftModel.from_pretrained(copy.deepcopy(base).float(), str(tmp_path / "adapter")).merge_and_unload()
    ref = {k: v.detach().to(torch.bfloat16).float() for k, v in ref32.state_dict().items()}
    ak.fuse(tmp_path / "base", tmp_path / "adapter", tmp_path / "fused", progress=False)
    fused = load_file(str(tmp_path / "fused" / "model.safetensors"))
    worst = 0.0
    for key, r in ref.items():
        assert fused[key].dtype == torch.bfloat16, key
        worst = max(worst, float(((fused[key].float() - r).abs() / _bf16_ulp(r)).max()))
    assert any(not torch.equal(fused[k], v) for k, v in base.state_dict().items()), "nothing was fused"
    assert worst <= 1.0, f"{case}: {worst} bf16 ulps"
    _fig(case, "bf16 fuse ulps", worst)
