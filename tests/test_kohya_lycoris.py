"""kohya/LyCORIS format against the real lycoris-lora package.

Networks are made with ``lycoris.create_lycoris`` on a small seeded model (Linear with and without bias,
3x3 Conv2d, GroupNorm, LayerNorm) and saved with LyCORIS's own ``save_weights``. The oracle is the
LyCORIS-applied model's output: adaptkit's fused weights and the PEFT model adaptkit writes must give
the same outputs (rtol 1e-4).
"""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from torch import nn

from adaptkit.errors import (
    ConfigError,
    FormatError,
    ShapeMismatchError,
    UnsupportedError,
)
from adaptkit.formats import load, save

from .conftest import lycoris_network

lycoris = pytest.importorskip("lycoris")
logging.getLogger("LyCORIS").setLevel(logging.ERROR)


class Block(nn.Module):
    def __init__(self, bias: bool = True):
        super().__init__()
        self.conv_in = nn.Conv2d(4, 8, 3, padding=1, bias=bias)
        self.norm_out = nn.GroupNorm(2, 8)
        self.down_proj = nn.Linear(8, 12, bias=bias)
        self.up_proj = nn.Linear(12, 8, bias=False)
        self.layer_norm = nn.LayerNorm(8)

    def forward(self, x):
        h = self.norm_out(self.conv_in(x)).mean((2, 3))
        return self.layer_norm(self.up_proj(torch.relu(self.down_proj(h))))


class Small(nn.Module):
    def __init__(self, bias: bool = True):
        super().__init__()
        self.blocks = nn.ModuleList([Block(bias), Block(bias)])

    def forward(self, x):
        return self.blocks[0](x) + self.blocks[1](x)


TARGETS = ["Linear", "Conv2d"]


def make_lycoris(tmp_path, bias=True, targets=TARGETS, seed=0, dtype=torch.float32, **kwargs):
    """A LyCORIS network with random (non-zero) weights; returns (file, base model, applied model, input)."""
    torch.manual_seed(seed)
    model = Small(bias).eval()
    base = copy.deepcopy(model)
    net = lycoris_network(model, targets, **kwargs)
    torch.manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if "dora_scale" in name:
                p.mul_(1 + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0, 0.2)
    path = tmp_path / "lyco.safetensors"
    net.save_weights(str(path), dtype, {"ss_network_dim": "4", "modelspec.title": "test"})
    x = torch.randn(2, 4, 6, 6, generator=torch.Generator().manual_seed(3))
    return path, base, model, x


def fused_output(adapter, base, x):
    """Output of ``base`` with every layer of ``adapter`` fused by adaptkit's own math."""
    m = copy.deepcopy(base)
    mods = dict(m.named_modules())
    with torch.no_grad():
        for path, layer in adapter.layers.items():
            mod = mods[path]
            w, b = layer.apply(mod.weight, getattr(mod, "bias", None))
            mod.weight.copy_(w)
            if b is not None:
                mod.bias.copy_(b)
        return m(x)


CASES = {
    "locon": dict(algo="lora", linear_dim=4, linear_alpha=2),
    "locon-tucker": dict(algo="lora", linear_dim=4, linear_alpha=2, conv_dim=3, conv_alpha=1, use_tucker=True),
    "locon-no-alpha": dict(algo="lora", linear_dim=4, linear_alpha=0),
    "loha": dict(algo="loha", linear_dim=4, linear_alpha=2),
    "loha-tucker": dict(algo="loha", linear_dim=3, linear_alpha=1, use_tucker=True),
    "lokr-full-full": dict(algo="lokr", linear_dim=4, linear_alpha=2),
    "lokr-full-factor4": dict(algo="lokr", linear_dim=4, linear_alpha=2, factor=4),
    "lokr-w2-split": dict(algo="lokr", linear_dim=1, linear_alpha=1, factor=2),
    "lokr-both-split": dict(algo="lokr", linear_dim=1, linear_alpha=2, factor=2, decompose_both=True),
    "lokr-both-split-f4": dict(algo="lokr", linear_dim=1, linear_alpha=2, factor=4, decompose_both=True),
    "lokr-tucker": dict(algo="lokr", linear_dim=1, linear_alpha=1, factor=2, use_tucker=True),
    "full": dict(algo="full"),
    "dora-out": dict(algo="lora", linear_dim=4, linear_alpha=2, dora_wd=True),
    "dora-in": dict(algo="lora", linear_dim=4, linear_alpha=2, dora_wd=True, wd_on_output=False),
    "loha-dora": dict(algo="loha", linear_dim=2, linear_alpha=2, dora_wd=True),
}


@pytest.mark.parametrize("case", list(CASES))
def test_read_matches_lycoris_and_round_trips(tmp_path, case):
    path, base, applied, x = make_lycoris(tmp_path, **CASES[case])
    adapter = load(path, base=base)
    assert adapter.format == "kohya" and len(adapter) == 6
    assert adapter.metadata["modelspec.title"] == "test"
    with torch.no_grad():
        want = applied(x)
    assert not torch.allclose(want, base(x), atol=1e-3)  # the adapter does something
    torch.testing.assert_close(fused_output(adapter, base, x), want, rtol=1e-4, atol=1e-5)
    # kohya -> kohya keeps every tensor and the metadata exactly
    out = save(adapter, tmp_path / "again.safetensors", format="lycoris")
    from safetensors.torch import load_file

    a, b = load_file(str(path)), load_file(str(out))
    assert set(a) == set(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert load(out, base=base).metadata["ss_network_dim"] == "4"


LOSSLESS_TO_PEFT = ["locon", "locon-tucker", "locon-no-alpha", "loha", "loha-tucker", "lokr-full-full",
                    "lokr-w2-split", "lokr-both-split", "lokr-tucker", "dora-out"]


@pytest.mark.parametrize("case", LOSSLESS_TO_PEFT)
def test_lycoris_to_peft_same_outputs(tmp_path, case):
    from peft import PeftModel

    from adaptkit.ops.convert import convert_checkpoint

    path, base, applied, x = make_lycoris(tmp_path, **CASES[case])
    result = convert_checkpoint("lycoris->peft", path, tmp_path / "peft", base=base)
    assert result.lossless and (result.report["method"] == "kept").all()
    peft_model = PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "peft")).eval()
    with torch.no_grad():
        torch.testing.assert_close(peft_model(x), applied(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("case", ["full", "lokr-full-factor4", "lokr-both-split-f4"])
def test_lycoris_to_peft_through_exact_svd(tmp_path, case):
    """Kinds PEFT cannot store become LoRA at their full numerical rank with --kind lora: same outputs."""
    from peft import PeftModel

    from adaptkit.ops.convert import convert_checkpoint

    path, base, applied, x = make_lycoris(tmp_path, **CASES[case])
    with pytest.raises(UnsupportedError, match="--rank"):
        convert_checkpoint("lycoris->peft", path, tmp_path / "refused", base=base)
    assert not (tmp_path / "refused").exists()
    result = convert_checkpoint("lycoris->peft", path, tmp_path / "peft", base=base, kind="lora")
    assert (result.report["retained_energy"] > 1 - 1e-6).all()
    peft_model = PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "peft")).eval()
    with torch.no_grad():
        torch.testing.assert_close(peft_model(x), applied(x), rtol=1e-4, atol=1e-5)


def test_rank_converts_the_rest_when_kinds_would_mix(tmp_path):
    """LoKr PEFT can store on some layers only: --rank turns all of them into LoRA (one PEFT kind), same outputs."""
    from peft import PeftModel

    from adaptkit.ops.convert import convert_checkpoint, plan

    path, base, applied, x = make_lycoris(tmp_path, **CASES["lokr-both-split-f4"])
    assert 0 < len(plan(load(path, base=base), "peft")) < 6  # some layers only
    result = convert_checkpoint("lycoris->peft", path, tmp_path / "peft", base=base, rank=8)
    assert len(result.report) == 6 and set(result.report["kind"]) == {"lora"} and set(result.report["source_kind"]) == {"lokr"}
    peft_model = PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "peft")).eval()
    with torch.no_grad():
        torch.testing.assert_close(peft_model(x), applied(x), rtol=1e-4, atol=1e-5)


def test_ia3_to_peft_and_back(tmp_path):
    """IA3 on bias-free modules: ia3_l = weight + 1, same outputs; with a bias LyCORIS and PEFT differ: refused."""
    from peft import PeftModel

    from adaptkit.ops.convert import convert_checkpoint

    path, base, applied, x = make_lycoris(tmp_path, bias=False, algo="ia3")
    convert_checkpoint(None, path, tmp_path / "peft", dst_format="peft", base=base)
    peft_model = PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "peft")).eval()
    with torch.no_grad():
        torch.testing.assert_close(peft_model(x), applied(x), rtol=1e-4, atol=1e-5)
    back = load(tmp_path / "peft")
    save(back, tmp_path / "back.safetensors", format="kohya")
    from safetensors.torch import load_file

    orig, again = load_file(str(path)), load_file(str(tmp_path / "back.safetensors"))
    for k in orig:
        torch.testing.assert_close(again[k].to(orig[k].dtype), orig[k], rtol=0, atol=1e-6)

    (tmp_path / "b").mkdir()
    path, base, applied, x = make_lycoris(tmp_path / "b", bias=True, algo="ia3")
    adapter = load(path, base=base)
    torch.testing.assert_close(fused_output(adapter, base, x), applied(x).detach(), rtol=1e-4, atol=1e-5)
    with pytest.raises(UnsupportedError, match="bias"):
        convert_checkpoint("lycoris->peft", path, tmp_path / "never", base=base)
    assert not (tmp_path / "never").exists()


def test_norm_layers_read_and_refused_for_peft(tmp_path):
    from adaptkit.ops.convert import convert_checkpoint

    path, base, applied, x = make_lycoris(tmp_path, targets=["Linear", "GroupNorm", "LayerNorm"], algo="lora",
                                          linear_dim=2, linear_alpha=1, train_norm=True)
    adapter = load(path, base=base)
    assert adapter.kind_counts() == {"lora": 4, "full": 4}
    torch.testing.assert_close(fused_output(adapter, base, x), applied(x).detach(), rtol=1e-4, atol=1e-5)
    with pytest.raises(UnsupportedError, match="norm"):
        convert_checkpoint("lycoris->peft", path, tmp_path / "p", base=base, rank=2)
    assert not (tmp_path / "p").exists()


def test_half_precision_file_round_trips(tmp_path):
    path, base, _, _ = make_lycoris(tmp_path, dtype=torch.float16, algo="lora", linear_dim=4, linear_alpha=2)
    out = save(load(path, base=base), tmp_path / "o.safetensors", format="kohya")
    from safetensors.torch import load_file

    a, b = load_file(str(path)), load_file(str(out))
    assert all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)


def test_names_need_a_base_and_ambiguity_is_reported(tmp_path):
    path, base, _, _ = make_lycoris(tmp_path, algo="lora", linear_dim=2, linear_alpha=1)
    with pytest.raises(ConfigError, match="base"):
        load(path)

    class Tricky(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.ModuleDict({"b_c": nn.Linear(2, 2)})
            self.a_b = nn.ModuleDict({"c": nn.Linear(2, 2)})

    from safetensors.torch import save_file

    f = tmp_path / "amb.safetensors"
    save_file({"lycoris_a_b_c.lora_down.weight": torch.ones(1, 2), "lycoris_a_b_c.lora_up.weight": torch.ones(2, 1)}, str(f))
    with pytest.raises(ConfigError, match="several modules"):
        load(f, base=Tricky())
    save_file({"lycoris_blocks_7_up_proj.lora_down.weight": torch.ones(1, 12),
               "lycoris_blocks_7_up_proj.lora_up.weight": torch.ones(8, 1)}, str(f))
    with pytest.raises(ConfigError, match="lycoris_blocks_7_up_proj"):
        load(f, base=base)


def test_bad_files(tmp_path):
    from safetensors.torch import save_file

    _, base, _, _ = make_lycoris(tmp_path, algo="lora", linear_dim=2, linear_alpha=1)
    f = tmp_path / "bad.safetensors"
    save_file({"lycoris_blocks_0_up_proj.lora_down.weight": torch.ones(1, 12),
               "lycoris_blocks_0_up_proj.lora_up.weight": torch.ones(8, 1),
               "unet.down.lora_A.weight": torch.ones(1, 2)}, str(f))
    with pytest.raises(FormatError, match="mixes"):
        load(f, format="kohya", base=base)
    save_file({"lycoris_blocks_0_up_proj.lora_down.weight": torch.ones(2, 12),
               "lycoris_blocks_0_up_proj.lora_up.weight": torch.ones(8, 3)}, str(f))
    with pytest.raises(Exception, match="rank"):
        load(f, base=base)
    save_file({"lycoris_blocks_0_up_proj.lora_down.weight": torch.ones(2, 10),
               "lycoris_blocks_0_up_proj.lora_up.weight": torch.ones(8, 2)}, str(f))
    with pytest.raises(Exception, match="shape"):
        load(f, base=base)
    save_file({"lycoris_blocks_0_up_proj.lambda_layer": torch.ones(1, 2)}, str(f))  # T-LoRA: not read
    with pytest.raises(FormatError, match="unknown tensor 'lambda_layer'"):
        load(f, format="kohya", base=base)
    save_file({"lycoris_blocks_0_up_proj.oft_blocks": torch.ones(2, 2)}, str(f))  # diag-OFT blocks are (n, b, b)
    with pytest.raises(ShapeMismatchError, match=r"lycoris_blocks_0_up_proj: LyCORIS OFT blocks \(2, 2\)"):
        load(f, format="kohya", base=base)
    save_file({"lycoris_blocks_0_up_proj.lora_down.weight": torch.ones(12),  # 1-D: no adapter layer has this
               "lycoris_blocks_0_up_proj.lora_up.weight": torch.ones(8, 2)}, str(f))
    with pytest.raises(ShapeMismatchError, match=r"lycoris_blocks_0_up_proj: tensor 'lora_down.weight' has shape \(12,\)"):
        load(f, format="kohya", base=base)
