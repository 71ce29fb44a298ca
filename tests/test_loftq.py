"""LoftQ: pure-torch NF4/int8 against bitsandbytes' definitions, factors against peft's LoftQ SVD step, streaming."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel
from peft.utils.loftq_utils import _low_rank_decomposition
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import adaptkit as ak
from adaptkit.ops.loftq import loftq, loftq_layer
from adaptkit.ops.quant import NF4_CODE, dequantize, fake_quantize, quantize, quantize_int8, quantize_nf4

from .conftest import make_peft_adapter, make_tiny_llama, run_cli

#: bitsandbytes' NF4 table, as printed in bitsandbytes/functional.py ``get_4bit_type("nf4")``
BNB_NF4 = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
           -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
           0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
           0.7229568362236023, 1.0]


def test_nf4_codebook_is_bitsandbytes():
    assert torch.equal(NF4_CODE, torch.tensor(BNB_NF4, dtype=torch.float32))
    # and it is bitsandbytes' create_normal_map(offset=0.9677083): equal-area bins of N(0, 1), normalised
    from scipy.stats import norm  # a declared test dependency: a missing scipy fails here, it does not skip

    offset = 0.9677083
    pos = norm.ppf(torch.linspace(offset, 0.5, 9)[:-1]).tolist()
    neg = (-norm.ppf(torch.linspace(offset, 0.5, 8)[:-1])).tolist()
    values = torch.tensor(sorted(pos + [0.0] + neg))
    torch.testing.assert_close(values / values.abs().max(), NF4_CODE, atol=1e-7, rtol=0)


def test_nf4_blockwise_absmax():
    torch.manual_seed(0)
    w = torch.randn(96, 96)
    q = quantize_nf4(w)
    assert q.absmax.shape == (96 * 96 // 64,) and q.codes.dtype == torch.uint8 and int(q.codes.max()) <= 15
    blocks = w.reshape(-1, 64)
    torch.testing.assert_close(q.absmax, blocks.abs().amax(1), atol=0, rtol=0)
    deq = dequantize(q)
    # every value is the NEAREST level times its block's absmax
    scaled = blocks / blocks.abs().amax(1, keepdim=True)
    nearest = (scaled[..., None] - NF4_CODE).abs().argmin(-1)
    assert torch.equal(q.codes.reshape(-1, 64).long(), nearest)
    torch.testing.assert_close(deq.reshape(-1, 64), NF4_CODE[nearest] * blocks.abs().amax(1, keepdim=True))
    rel = float((w - deq).norm() / w.norm())
    assert rel == pytest.approx(0.093, abs=0.001)  # the exact block-64 NF4 figure (bnb CPU path: 0.275)
    # a dequantised weight quantises to itself (what a QLoRA load of the adjusted base does)
    torch.testing.assert_close(fake_quantize(deq, 4), deq, atol=0, rtol=0)
    # padding: a size that is not a multiple of 64
    odd = torch.randn(5, 7)
    assert fake_quantize(odd, 4).shape == (5, 7)
    assert float((odd - fake_quantize(odd, 4)).abs().max()) <= float(odd.abs().max()) * 0.16


def test_int8_rowwise():
    torch.manual_seed(1)
    w = torch.randn(40, 24) * torch.linspace(0.1, 3, 40)[:, None]
    q = quantize_int8(w)
    assert q.codes.dtype == torch.int8 and q.absmax.shape == (40,)
    # bitsandbytes' Int8Params: cast to float16, then its int8_vectorwise_quant / _dequant (default torch backend)
    h = w.to(torch.float16)
    row_stats = h.abs().max(dim=1).values.float()
    codes = torch.round(h * (127.0 / row_stats.unsqueeze(-1))).to(torch.int8)
    assert torch.equal(q.codes, codes) and torch.equal(q.absmax, row_stats)
    torch.testing.assert_close(dequantize(q), codes * row_stats.view(-1, 1) * 7.874015718698502e-3, atol=0, rtol=0)
    err = (h.float() - dequantize(q)).abs()
    assert bool((err <= row_stats[:, None] / 127 / 2 + 1e-6).all())
    with pytest.raises(ak.NonFiniteError, match="float16"):
        quantize_int8(torch.full((2, 2), 1e5))
    with pytest.raises(ak.ConfigError, match=r"bits \(--bits\) must be one of 4, 8, got 3"):
        quantize(w, 3)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    """A tiny llama saved in several safetensors shards (streaming crosses shard boundaries)."""
    root = tmp_path_factory.mktemp("base")
    make_tiny_llama(0, hidden_size=64, intermediate_size=96).save_pretrained(root / "base", max_shard_size="60KB")
    assert (root / "base" / "model.safetensors.index.json").is_file()
    return root / "base"


def _weights(base: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(base.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def test_every_layer_improves_and_matches_peft_svd_step(base_dir):
    result = loftq(base_dir, "all-linear", bits=4, iters=1, rank=8)
    weights = _weights(base_dir)
    report = result.report.set_index("module")
    assert len(report) == 14  # 7 linear layers x 2 blocks; embeddings and lm_head are not targets
    for path, layer in result.adapter.layers.items():
        w = weights[path + ".weight"]
        deq = fake_quantize(w, 4)
        before = float((w - deq).norm())
        after = float((w - (deq + layer.scale * layer.up @ layer.down)).norm())
        assert after < before, path
        assert report.loc[path, "error_qlora"] == pytest.approx(before, rel=1e-5)
        assert report.loc[path, "error_loftq"] == pytest.approx(after, rel=1e-5)
        # peft's LoftQ SVD step on the same residual (alpha = r, so peft's unscaled factors are comparable)
        out = _low_rank_decomposition(w - deq, reduced_rank=8)
        torch.testing.assert_close(layer.delta(), out["L"] @ out["R"], atol=1e-6, rtol=1e-5)
    print(f"\nLoftQ NF4 rank 8 on {len(report)} layers: mean error reduction {result.mean_reduction:.1%} "
          f"(relative error {report['relative_error_qlora'].mean():.4f} -> {report['relative_error_loftq'].mean():.4f})")
    assert result.mean_reduction > 0.1


@pytest.mark.parametrize("bits", [4, 8])
def test_alternating_matches_peft_loftq_init_loop(bits):
    """peft's ``loftq_init`` loop (needs bitsandbytes + CUDA), run with adaptkit's quantiser in place of bnb's."""
    torch.manual_seed(2)
    w = 0.02 * torch.randn(80, 64) + 0.01 * torch.randn(80, 4) @ torch.randn(4, 64)
    errors = []
    for iters in (1, 2, 5):
        res = w.clone()  # peft/utils/loftq_utils.py loftq_init, verbatim but for the quantiser
        for i in range(iters):
            dequantized_weight = fake_quantize(res, bits)
            res = w - dequantized_weight
            out = _low_rank_decomposition(res, reduced_rank=8)
            L, R = out["L"], out["R"]
            if i + 1 == iters:
                break
            res = w - torch.mm(L, R)
        left, right, deq, plain = loftq_layer(w, bits, 8, iters)
        torch.testing.assert_close(deq, dequantized_weight, atol=0, rtol=0)
        torch.testing.assert_close(left, L, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(right, R, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(plain, fake_quantize(w, bits), atol=0, rtol=0)
        errors.append(float((w - deq - left @ right).norm()))
    assert errors[0] > errors[1] > errors[2]


def test_scale_is_compensated_and_int8(base_dir):
    r16 = loftq(base_dir, ["q_proj", "v_proj"], bits=8, rank=4, alpha=16)
    r4 = loftq(base_dir, "q_proj,v_proj", bits=8, rank=4)
    assert sorted(r16.adapter.layers) == sorted(r4.adapter.layers) and len(r4.adapter.layers) == 4
    for path, layer in r16.adapter.layers.items():
        assert layer.scale == 4.0 and r4.adapter.layers[path].scale == 1.0
        torch.testing.assert_close(layer.delta(), r4.adapter.layers[path].delta(), atol=1e-6, rtol=1e-5)
    assert r16.mean_reduction > 0
    print(f"\nLoftQ int8 rank 4: mean error reduction {r16.mean_reduction:.1%}")


def test_iterations_write_adjusted_base_loadable_by_peft(base_dir, tmp_path):
    result = loftq(base_dir, ["q_proj", "k_proj", "v_proj", "o_proj"], bits=4, iters=3, rank=8, out=tmp_path / "out")
    assert result.base_out == tmp_path / "out" / "base"
    one = loftq(base_dir, ["q_proj", "k_proj", "v_proj", "o_proj"], bits=4, iters=1, rank=8)
    print(f"\nLoftQ iters=3: mean error reduction {result.mean_reduction:.1%} (iters=1: {one.mean_reduction:.1%})")
    assert result.mean_reduction > one.mean_reduction
    src, new = _weights(base_dir), _weights(result.base_out)
    assert sorted(src) == sorted(new)
    for name, t in src.items():
        path = name.removesuffix(".weight")
        if path in result.adapter.layers:
            # the adjusted base is already on the NF4 grid: a QLoRA load quantises it to itself
            torch.testing.assert_close(fake_quantize(new[name], 4), new[name], atol=0, rtol=0)
            layer = result.adapter.layers[path]
            after = float((t - new[name] - layer.delta()).norm())
            assert after == pytest.approx(float(result.report.set_index("module").loc[path, "error_loftq"]), rel=1e-5)
            assert after < float((t - fake_quantize(t, 4)).norm())
        else:
            assert torch.equal(t, new[name]), name  # untouched tensors are copied byte for byte
    for extra in ("config.json", "model.safetensors.index.json"):
        assert (result.base_out / extra).read_text() == (base_dir / extra).read_text()
    # the written adapter + adjusted base load in transformers/peft and approximate the original model
    from transformers import LlamaForCausalLM

    original = LlamaForCausalLM.from_pretrained(base_dir).eval()
    model = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(result.base_out), str(tmp_path / "out")).eval()
    ids = torch.randint(0, 64, (2, 9))
    with torch.no_grad():
        gap = float((model(ids).logits - original(ids).logits).abs().max())
    assert gap < 0.1
    cfg = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert cfg["init_lora_weights"] is True and cfg["r"] == 8


def test_adjusted_base_copies_config_not_other_weights(base_dir, tmp_path):
    base = tmp_path / "base"
    shutil.copytree(base_dir, base)
    (base / "pytorch_model.bin").write_bytes(b"stale weights")
    (base / "tokenizer.json").write_text("{}")
    result = loftq(base, "q_proj", rank=2, iters=2, out=tmp_path / "out")
    names = {f.name for f in result.base_out.iterdir()}
    assert {"config.json", "tokenizer.json", "model.safetensors.index.json"} <= names
    assert "pytorch_model.bin" not in names


def test_existing_adapter_layout(base_dir, tmp_path):
    src = make_peft_adapter(tmp_path / "a", LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "up_proj"],
                                                          rank_pattern={"up_proj": 6}),
                            model=make_tiny_llama(0, hidden_size=64, intermediate_size=96))
    result = loftq(base_dir, adapter=src)
    ranks = {p: l.rank for p, l in result.adapter.layers.items()}
    assert ranks == {p: (6 if p.endswith("up_proj") else 4) for p in ak.load(src).layers}
    assert all(l.alpha == 8 for l in result.adapter.layers.values())
    assert (result.report["reduction"] > 0).all()
    dora = make_peft_adapter(tmp_path / "d", LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], use_dora=True),
                             model=make_tiny_llama(0, hidden_size=64, intermediate_size=96))
    with pytest.raises(ak.UnsupportedError, match="is DoRA .* magnitude"):  # would silently drop the magnitude
        loftq(base_dir, adapter=dora)


def test_bad_inputs(base_dir, tmp_path):
    with pytest.raises(ak.ConfigError, match=r"bits \(--bits\) must be one of 4, 8, got 2"):
        loftq(base_dir, "q_proj", bits=2)
    with pytest.raises(ak.ConfigError, match=r"iters \(--iters\) must be an integer of at least 1, got 0"):
        loftq(base_dir, "q_proj", iters=0)
    with pytest.raises(ak.ConfigError, match="pass out=DIR"):
        loftq(base_dir, "q_proj", iters=2)
    with pytest.raises(ak.ConfigError, match="no linear weight of the base matches"):
        loftq(base_dir, "nonexistent_proj")
    with pytest.raises(ak.ConfigError, match="rank 40 exceeds"):
        loftq(base_dir, "k_proj", rank=40)
    with pytest.raises(ak.SourceNotFoundError):
        loftq(tmp_path / "missing", "q_proj")
    # non-finite base weights
    bad = tmp_path / "bad"
    shutil.copytree(base_dir, bad)
    index = json.loads((bad / "model.safetensors.index.json").read_text())["weight_map"]
    name = "model.layers.1.self_attn.q_proj.weight"
    shard = bad / index[name]
    with safe_open(str(shard), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    tensors[name][3, 5] = float("nan")
    save_file(tensors, str(shard), metadata={"format": "pt"})
    with pytest.raises(ak.NonFiniteError, match=r"model.layers.1.self_attn.q_proj.weight holds NaN"):
        loftq(bad, "q_proj", out=tmp_path / "never")
    assert not (tmp_path / "never").exists()  # nothing half-written


def test_cli_loftq(base_dir, tmp_path):
    res = run_cli("loftq", str(base_dir), "-o", str(tmp_path / "o"), "--target-modules", "q_proj,v_proj", "--rank", "4",
                  "--json")
    assert res.returncode == 0, res.stderr
    payload = json.loads(res.stdout)
    assert len(payload["layers"]) == 4 and all(r["reduction"] > 0 for r in payload["layers"])
    assert ak.load(tmp_path / "o").layers
    res = run_cli("loftq", str(base_dir), "-o", str(tmp_path / "o2"), "--target-modules", "q_proj", "--iters", "0")
    assert res.returncode == 1 and res.stderr.startswith("error: iters (--iters) must be an integer of at least 1, got 0")
