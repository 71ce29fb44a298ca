"""Bad adapter tensors: NaN/Inf values and scales, rank-0 factors, wrong dimensions, integer dtypes.

Each case goes through every reader it applies to (PEFT, kohya/LyCORIS, raw state dicts for injection) and
every consumer (status, inject, fuse, merge, convert); each gives one clear error naming the tensor or the
layer (CLI: exit code 1, one ``error:`` line), or, for status tables, ``finite False``.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from peft import LoraConfig
from safetensors.torch import load_file, save_file

import adaptkit as ak
from adaptkit.live.inject import adapted_modules

from .conftest import make_peft_adapter, make_tiny_llama, run_cli

Q0 = "model.layers.0.self_attn.q_proj"


@pytest.fixture(scope="module")
def clean_dir(tmp_path_factory):
    return make_peft_adapter(tmp_path_factory.mktemp("clean") / "adapter",
                             LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
                             seed=3)


@pytest.fixture
def adapter_dir(clean_dir, tmp_path):
    return shutil.copytree(clean_dir, tmp_path / "adapter")


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("base") / "llama"
    make_tiny_llama(0).save_pretrained(str(path))
    return path


def _edit(directory, fn):
    f = directory / "adapter_model.safetensors"
    t = load_file(str(f))
    fn(t)
    save_file({k: v.contiguous() for k, v in t.items()}, str(f))
    return directory


def _key(t, suffix, module=Q0):
    return f"base_model.model.{module}.{suffix}"


def _kohya_file(clean_dir, tmp_path, fn=None):
    f = ak.save(ak.load(clean_dir), tmp_path / "k.safetensors", format="kohya")
    if fn is not None:
        t = load_file(str(f))
        fn(t)
        save_file({k: v.contiguous() for k, v in t.items()}, str(f))
    return f


def _kohya_key(tensor, module=Q0):
    return f"lycoris_{module.replace('.', '_')}.{tensor}"


def _cli_fails(*args, match):
    res = run_cli(*args)
    assert res.returncode == 1, res.stdout + res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    assert "Traceback" not in res.stderr
    assert match in lines[0], lines[0]
    return lines[0]


def _nothing_injected(model):
    assert not adapted_modules(model)


# ------------------------------------------------------------------------------------------ NaN / Inf


def test_nan_factor_is_refused_by_inject_fuse_merge_and_convert(adapter_dir, base_dir, tmp_path):
    _edit(adapter_dir, lambda t: t[_key(t, "lora_A.weight")].__setitem__((0, 0), float("nan")))
    a = ak.load(adapter_dir)
    assert a.nonfinite() == {Q0: ["down"]}
    model = make_tiny_llama(0)
    with pytest.raises(ak.NonFiniteError, match=rf"NaN or Inf in {Q0} \(down\).*inject needs finite"):
        ak.inject(model, adapter_dir)
    _nothing_injected(model)
    with pytest.raises(ak.NonFiniteError, match=rf"{Q0} \(down\).*fuse needs finite"):
        ak.fuse(base_dir, a, tmp_path / "fused", progress=False)
    assert not (tmp_path / "fused").exists()
    _cli_fails("fuse", str(base_dir), str(adapter_dir), "-o", str(tmp_path / "fused"), match=f"{Q0} (down)")
    assert not (tmp_path / "fused").exists()
    with pytest.raises(ak.NonFiniteError, match=rf"{Q0} \(down\).*merge needs finite"):
        ak.merge([a, a], method="linear")
    with pytest.raises(ak.NonFiniteError, match=rf"{Q0} \(down\).*convert needs finite"):
        ak.convert(a, rank=2)
    _cli_fails("convert", "peft->kohya", str(adapter_dir), str(tmp_path / "k.safetensors"), match=f"{Q0} (down)")
    assert not (tmp_path / "k.safetensors").exists()


def test_inf_in_a_raw_state_dict_or_a_layer_is_refused_by_inject(clean_dir):
    sd = load_file(str(clean_dir / "adapter_model.safetensors"))
    sd[_key(sd, "lora_B.weight")][1, 1] = float("inf")
    model = make_tiny_llama(0)
    with pytest.raises(ak.NonFiniteError, match=rf"{Q0} \(up\)"):
        ak.inject(model, sd, config={"peft_type": "LORA", "lora_alpha": 8, "r": 4})
    _nothing_injected(model)
    # the wrapper refuses it too, by the same rule, when used directly
    from adaptkit.live.wrappers import AdaptedModule

    layer = ak.load(clean_dir).layers[Q0]
    bad = ak.LoRA(down=layer.down, up=layer.up, alpha=float("inf"), shape=layer.shape)
    with pytest.raises(ak.NonFiniteError, match="alpha, scale"):
        AdaptedModule(torch.nn.Linear(32, 32)).add("x", bad)


def test_kohya_alpha_tensor_nan_or_inf_is_not_finite(clean_dir, tmp_path, base_dir):
    v0 = "model.layers.0.self_attn.v_proj"

    def poison(t):
        t[_kohya_key("alpha")] = torch.tensor(float("nan"))
        t[_kohya_key("alpha", v0)] = torch.tensor(float("inf"))

    f = _kohya_file(clean_dir, tmp_path, poison)
    a = ak.load(f, base=make_tiny_llama(0))
    assert not a.is_finite()
    assert set(a.nonfinite()) == {Q0, v0} and "alpha" in a.nonfinite()[Q0]
    rows = ak.layer_status(a).set_index("module")
    assert not rows.loc[Q0, "finite"] and not rows.loc[v0, "finite"] and rows["finite"].sum() == 2
    res = run_cli("info", str(f), "--base", str(base_dir), "--json")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["finite"] is False
    res = run_cli("status", str(f), "--base", str(base_dir), "--json")
    assert res.returncode == 0, res.stderr
    assert sorted(r["module"] for r in json.loads(res.stdout) if not r["finite"]) == [Q0, v0]
    model = make_tiny_llama(0)
    with pytest.raises(ak.NonFiniteError, match="alpha"):
        ak.inject(model, f)
    _nothing_injected(model)
    with pytest.raises(ak.NonFiniteError, match="alpha"):
        ak.fuse(base_dir, a, tmp_path / "fused", progress=False)


# ------------------------------------------------------------------------------------------ rank 0


def _zero_rank(t, module=Q0):
    t[_key(t, "lora_A.weight", module)] = t[_key(t, "lora_A.weight", module)][:0]
    t[_key(t, "lora_B.weight", module)] = t[_key(t, "lora_B.weight", module)][:, :0]


def test_zero_rank_factors_name_the_tensor(adapter_dir, clean_dir, tmp_path):
    _edit(adapter_dir, _zero_rank)
    with pytest.raises(ak.FormatError, match=rf"{Q0}: tensor 'lora_A.weight' has shape \(0, 32\) and no entries"):
        ak.load(adapter_dir)
    _cli_fails("info", str(adapter_dir), match="no entries (a rank-0 layer?)")
    _cli_fails("status", str(adapter_dir), match="no entries")
    # kohya: no config to contradict, so the rank-0 layer used to reach alpha / r
    def zero(t):
        t[_kohya_key("lora_down.weight")] = t[_kohya_key("lora_down.weight")][:0]
        t[_kohya_key("lora_up.weight")] = t[_kohya_key("lora_up.weight")][:, :0]

    f = _kohya_file(clean_dir, tmp_path, zero)
    with pytest.raises(ak.FormatError, match=r"lycoris_model_layers_0_self_attn_q_proj: tensor 'lora_(down|up).weight' has shape \((0, 32|32, 0)\)"):
        ak.load(f, base=make_tiny_llama(0))
    # raw state dict injection
    sd = load_file(str(clean_dir / "adapter_model.safetensors"))
    _zero_rank(sd)
    model = make_tiny_llama(0)
    with pytest.raises(ak.FormatError, match=rf"{Q0}: tensor 'lora_A.weight'.*no entries"):
        ak.inject(model, sd)
    _nothing_injected(model)
    # and a layer built in code
    with pytest.raises(ak.ShapeMismatchError, match="rank 0"):
        ak.LoRA(down=torch.zeros(0, 4), up=torch.zeros(4, 0), alpha=1.0, shape=(4, 4))
    with pytest.raises(ak.ShapeMismatchError, match="rank 0"):
        ak.LoHa(w1a=torch.zeros(4, 0), w1b=torch.zeros(0, 4), w2a=torch.zeros(4, 0), w2b=torch.zeros(0, 4), alpha=1.0,
                shape=(4, 4))


# ------------------------------------------------------------------------------------------ dimensions


def test_lora_up_with_a_kernel_names_the_tensor(adapter_dir, clean_dir, tmp_path):
    def kernel(t):
        a, b = t[_key(t, "lora_A.weight")], t[_key(t, "lora_B.weight")]
        t[_key(t, "lora_A.weight")] = a.unsqueeze(-1)
        t[_key(t, "lora_B.weight")] = b.unsqueeze(-1).expand(*b.shape, 2)  # (out, r, 2): not a 1x1 up factor

    _edit(adapter_dir, kernel)
    with pytest.raises(ak.ShapeMismatchError, match=rf"{Q0}: tensor 'lora_B.weight' has shape \(32, 4, 2\)"):
        ak.load(adapter_dir)
    _cli_fails("status", str(adapter_dir), match="'lora_B.weight' has shape (32, 4, 2)")

    def kohya_kernel(t):
        t[_kohya_key("lora_down.weight")] = t[_kohya_key("lora_down.weight")].unsqueeze(-1)
        up = t[_kohya_key("lora_up.weight")]
        t[_kohya_key("lora_up.weight")] = up.unsqueeze(-1).expand(*up.shape, 2)

    f = _kohya_file(clean_dir, tmp_path, kohya_kernel)
    with pytest.raises(ak.ShapeMismatchError, match=r"'lora_up.weight' has shape \(32, 4, 2\)"):
        ak.load(f, base=make_tiny_llama(0))
    with pytest.raises(ak.ShapeMismatchError, match=r"up/B has shape \(32, 4, 2\)"):
        ak.LoRA(down=torch.zeros(4, 32, 1), up=torch.zeros(32, 4, 2), alpha=1.0, shape=(32, 32, 1), module_type="conv")


def test_three_d_factor_for_a_linear_layer_names_both_tensors(adapter_dir, clean_dir, base_dir, tmp_path):
    _edit(adapter_dir, lambda t: t.__setitem__(_key(t, "lora_A.weight"), t[_key(t, "lora_A.weight")].unsqueeze(-1)))
    with pytest.raises(ak.ShapeMismatchError, match=r"'lora_A.weight' \(4, 32, 1\) and 'lora_B.weight' \(32, 4\) have 3 and 2"):
        ak.load(adapter_dir)
    _cli_fails("fuse", str(base_dir), str(adapter_dir), "-o", str(tmp_path / "fused"), match="have 3 and 2 dimensions")
    assert not (tmp_path / "fused").exists()
    sd = load_file(str(clean_dir / "adapter_model.safetensors"))
    sd[_key(sd, "lora_B.weight")] = sd[_key(sd, "lora_B.weight")].unsqueeze(-1).contiguous()
    model = make_tiny_llama(0)
    with pytest.raises(ak.ShapeMismatchError, match=r"'lora_A.weight' \(4, 32\) and 'lora_B.weight' \(32, 4, 1\)"):
        ak.inject(model, sd, config={"peft_type": "LORA", "lora_alpha": 8})
    _nothing_injected(model)
    f = _kohya_file(clean_dir, tmp_path, lambda t: t.__setitem__(
        _kohya_key("lora_down.weight"), t[_kohya_key("lora_down.weight")][..., None, None]))
    with pytest.raises(ak.ShapeMismatchError, match="'lora_down.weight'.*have 4 and 2 dimensions"):
        ak.load(f, base=make_tiny_llama(0))


# ------------------------------------------------------------------------------------------ dtypes


def test_integer_factors_are_refused_naming_the_tensor(adapter_dir, clean_dir, base_dir, tmp_path):
    _edit(adapter_dir, lambda t: t.__setitem__(_key(t, "lora_B.weight"), (t[_key(t, "lora_B.weight")] * 100).to(torch.int32)))
    with pytest.raises(ak.FormatError, match=rf"{Q0}: tensor 'lora_B.weight' has dtype int32.*floating point"):
        ak.load(adapter_dir)
    _cli_fails("fuse", str(base_dir), str(adapter_dir), "-o", str(tmp_path / "fused"), match="'lora_B.weight' has dtype int32")
    assert not (tmp_path / "fused").exists()
    f = _kohya_file(clean_dir, tmp_path, lambda t: t.__setitem__(
        _kohya_key("lora_up.weight"), t[_kohya_key("lora_up.weight")].to(torch.int8)))
    with pytest.raises(ak.FormatError, match="'lora_up.weight' has dtype int8"):
        ak.load(f, base=make_tiny_llama(0))
    sd = load_file(str(clean_dir / "adapter_model.safetensors"))
    sd[_key(sd, "lora_A.weight")] = sd[_key(sd, "lora_A.weight")] > 0
    model = make_tiny_llama(0)
    with pytest.raises(ak.FormatError, match="'lora_A.weight' has dtype bool"):
        ak.inject(model, sd)
    _nothing_injected(model)
    with pytest.raises(ak.FormatError, match="'down' has dtype int64"):
        ak.LoRA(down=torch.ones(2, 4, dtype=torch.int64), up=torch.ones(4, 2), alpha=1.0, shape=(4, 4))
    # an integer kohya alpha is a number, not a factor: still read
    g = _kohya_file(clean_dir, tmp_path / "int_alpha", lambda t: t.__setitem__(_kohya_key("alpha"), torch.tensor(8)))
    assert ak.load(g, base=make_tiny_llama(0)).layers[Q0].alpha == 8.0
