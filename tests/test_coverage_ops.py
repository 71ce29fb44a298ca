"""The coverage gate in each operation: drop globs, what is fused/injected/written, metadata round trips, the CLI.

The corpus of mismatched adapters is tests/test_coverage_corpus.py; here: the option itself (``drop=`` /
``--drop``), that only landing layers reach the output (fused weights compared with base + dense deltas), that the
certificate written into outputs reads back equal, that drops carry from one operation to the next, and the CLI's
exit codes, summaries and ``--json``.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from peft import LoraConfig
from safetensors import safe_open
from safetensors.torch import load_file

import adaptkit as ak
from adaptkit.core.coverage import METADATA_KEY, Certificate, LayerCoverage, read_metadata

from .conftest import make_peft_adapter, make_tiny_llama, run_cli

LORA = dict(r=2, lora_alpha=4, init_lora_weights=False)
DEEP = [f"model.layers.2.self_attn.{m}" for m in ("q_proj", "v_proj")]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    t = tmp_path_factory.mktemp("cov")
    make_tiny_llama(0).save_pretrained(t / "base")
    deep = make_peft_adapter(t / "deep", LoraConfig(target_modules=["q_proj", "v_proj"], **LORA), seed=2,
                             model=make_tiny_llama(0, num_hidden_layers=3))
    other = make_peft_adapter(t / "other", LoraConfig(target_modules=["o_proj"], **LORA), seed=3)
    return t, t / "base", deep, other


def _dense(layer) -> torch.Tensor:
    r = layer.down.shape[0]
    return (layer.alpha / r) * layer.up.double() @ layer.down.double()


# ------------------------------------------------------------------------------------------- the option


def _cert(*rows: tuple[str, str]) -> Certificate:
    return Certificate("fuse", "base", tuple(LayerCoverage(p, p if s == "matched" else None, s, 1.0, 2, "why")
                                             for p, s in rows))


def test_drop_globs_and_statuses():
    c = _cert(("a.q", "matched"), ("a.k", "unmatched"), ("b.k", "shape"), ("lm_head.weight", "unmatched"))
    with pytest.raises(ak.CoverageError, match=r"3 of 4 adapter layers would not land on base \(fuse, 75%"):
        c.require()
    d = c.require(["*.k", "lm_head*"])
    assert [r.status for r in d.layers] == ["matched", "dropped", "dropped", "dropped"]
    assert "was shape: why" in d.layers[2].reason and d.energy_share == pytest.approx(0.25)
    assert c.require(["status:unmatched", "status:shape"]).missing == []
    with pytest.raises(ak.CoverageError, match="would not land"):  # a glob that names only some of them
        c.require(["a.k"])
    with pytest.raises(ak.CoverageError, match=r"--drop 'a\.kk' names no layer that fails to land"):  # a typo
        c.require(["a.k", "b.k", "lm_head.weight", "a.kk"])
    with pytest.raises(ak.CoverageError, match="names no layer"):  # a landing layer cannot be "dropped"
        c.require(["a.q", "*.k", "lm_head*"])
    with pytest.raises(ak.CoverageError, match="not a non-empty glob"):
        c.require(["", "*"])
    assert c.require("*").counts()["dropped"] == 3  # one string is one glob
    # a glob naming a layer an earlier operation dropped counts as used
    assert d.require(["*.k", "lm_head*"]).counts() == d.counts()
    # non-strict: globs naming nothing are left for a later certificate
    assert c.drop(["zzz", "*.k"], strict=False).counts()["dropped"] == 2


def test_shape_and_refused_errors_keep_their_builtin_types():
    with pytest.raises(ak.ShapeMismatchError):
        _cert(("a", "shape")).require()
    with pytest.raises(ak.UnsupportedError):
        _cert(("a", "refused")).require()
    with pytest.raises(ak.CoverageError) as e:
        _cert(("a", "refused"), ("b", "unmatched")).require()
    assert not isinstance(e.value, (ak.ShapeMismatchError, ak.UnsupportedError))


# ------------------------------------------------------------------------------------------- fuse


def test_fuse_fuses_only_landing_layers_exactly(setup, tmp_path):
    t, base, deep, _ = setup
    r = ak.fuse(base, deep, tmp_path / "out", drop=["model.layers.2.*"], progress=False)
    assert r.touched == 4 and [c.path for c in r.coverage.dropped] == DEEP
    a = ak.load(deep)
    before = load_file(str(base / "model.safetensors"))
    after = load_file(str(tmp_path / "out" / "model.safetensors"))
    for key, w in before.items():
        path = key.removesuffix(".weight")
        want = w.double() + _dense(a.layers[path]) if path in a.layers else w.double()
        torch.testing.assert_close(after[key].double(), want, rtol=0, atol=1e-5)
    # the dropped layers' share, against dense float64 deltas
    energy = {p: float(_dense(layer).square().sum()) for p, layer in a.layers.items()}
    kept = math.fsum(v for p, v in energy.items() if p not in DEEP)
    assert r.coverage.energy_share == pytest.approx(kept / math.fsum(energy.values()), rel=1e-9)
    with safe_open(str(tmp_path / "out" / "model.safetensors"), "pt") as f:
        assert read_metadata(f.metadata()) == json.loads(r.coverage.to_json())
    assert ak.fuse(base, deep, None, dry_run=True, drop="model.layers.2.*").coverage.counts()["dropped"] == 2


def test_fuse_of_several_adapters_labels_the_rows(setup, tmp_path):
    t, base, deep, other = setup
    with pytest.raises(ak.CoverageError, match=r"deep:model\.layers\.2\.self_attn\.q_proj"):
        ak.fuse(base, [deep, other], tmp_path / "o")
    r = ak.fuse(base, [deep, other], tmp_path / "o", drop=["deep:model.layers.2.*"], progress=False)
    assert r.touched == 6 and r.coverage.counts() == {"matched": 6, "dropped": 2, "unmatched": 0, "ambiguous": 0,
                                                      "shape": 0, "refused": 0}
    assert {c.path.split(":")[0] for c in r.coverage.layers} == {"deep", "other"}


def test_a_complete_fuse_says_so(setup, tmp_path):
    t, base, _, other = setup
    r = ak.fuse(base, other, tmp_path / "o", progress=False)
    assert r.coverage.complete and r.coverage.energy_share == 1.0 and r.coverage.counts()["matched"] == 2
    with pytest.raises(ak.CoverageError, match="names no layer"):  # nothing to drop: a drop glob is a mistake
        ak.fuse(base, other, tmp_path / "o2", drop=["*"])
    assert not (tmp_path / "o2").exists()


# ------------------------------------------------------------------------------------------- chains


def test_drops_carry_from_convert_to_fuse(setup, tmp_path):
    """convert --base --drop writes the certificate; fusing the converted adapter keeps the dropped rows, so its
    energy share is the share of the original adapter that reaches the model."""
    from adaptkit.ops.convert import convert_checkpoint

    t, base, deep, _ = setup
    with pytest.raises(ak.CoverageError, match="would not land"):
        convert_checkpoint(None, deep, tmp_path / "c", dst_format="peft", base=base)
    assert not (tmp_path / "c").exists()
    r = convert_checkpoint(None, deep, tmp_path / "c", dst_format="peft", base=base, drop=["model.layers.2.*"])
    assert len(r.report) == 4 and r.coverage.counts()["dropped"] == 2
    with safe_open(str(tmp_path / "c" / "adapter_model.safetensors"), "pt") as f:
        assert read_metadata(f.metadata()) == json.loads(r.coverage.to_json())
    converted = ak.load(tmp_path / "c")
    assert sorted(converted.layers) == sorted(set(ak.load(deep).layers) - set(DEEP))
    fused = ak.fuse(base, converted, tmp_path / "f", progress=False)  # nothing left to drop: no drop needed
    assert fused.coverage.counts()["dropped"] == 2 and not fused.coverage.complete
    assert fused.coverage.energy_share == pytest.approx(r.coverage.energy_share, rel=1e-12)


def test_load_with_base_and_drop(setup, tmp_path):
    t, base, _, _ = setup
    ak.save(ak.load(setup[3]), tmp_path / "k.safetensors", format="kohya")
    sd = load_file(str(tmp_path / "k.safetensors"))
    sd["lycoris_model_layers_9_self_attn_o_proj.lora_down.weight"] = torch.randn(2, 32)
    sd["lycoris_model_layers_9_self_attn_o_proj.lora_up.weight"] = torch.randn(32, 2)
    from safetensors.torch import save_file

    save_file(sd, str(tmp_path / "bad.safetensors"))
    with pytest.raises(ak.CoverageError, match=r"1 module name\(s\) match no module.*--drop"):
        ak.load(tmp_path / "bad.safetensors", base=str(base))
    a = ak.load(tmp_path / "bad.safetensors", base=str(base), drop=["lycoris_model_layers_9_*"])
    assert len(a) == 2
    cert = read_metadata(a.metadata)
    assert cert["operation"] == "load" and [r["path"] for r in cert["not_landing"]] == [
        "lycoris_model_layers_9_self_attn_o_proj"]
    with pytest.raises(ak.CoverageError, match="names no layer"):
        ak.load(tmp_path / "bad.safetensors", base=str(base), drop=["lycoris_model_layers_9_*", "lycoris_typo*"])
    with pytest.raises(ak.CoverageError, match="pass base="):
        ak.load(tmp_path / "bad.safetensors", drop=["x"])


def test_merge_certifies_every_input_layer(setup):
    t, _, deep, other = setup
    m = ak.merge([deep, other])
    cert = read_metadata(m.metadata)
    assert cert["complete"] and cert["layers"] == 8 and cert["energy_share"] == 1.0
    with pytest.raises(ak.CoverageError, match="names no layer"):
        ak.merge([deep, other], drop=["*"])


def test_inject_keeps_its_certificate(setup):
    t, _, deep, other = setup
    model = make_tiny_llama(0)
    ak.inject(model, other, name="o")
    assert ak.injected_coverage(model, "o").complete
    ak.inject(model, deep, name="d", drop=["model.layers.2.*"])
    cert = ak.injected_coverage(model, "d")
    assert cert.counts()["dropped"] == 2 and cert.operation == "inject"
    assert sorted(n for n, m in model.named_modules() if type(m).__name__ == "AdaptedModule") == sorted(
        {f"model.layers.{i}.self_attn.{m}" for i in (0, 1) for m in ("q_proj", "v_proj", "o_proj")})
    ak.remove_adapter(model, "d")
    with pytest.raises(ak.ConfigError, match="no adapter named 'd'"):
        ak.injected_coverage(model, "d")


# ------------------------------------------------------------------------------------------- CLI


def test_cli_fuse_exit_codes_summary_and_json(setup, tmp_path):
    t, base, deep, _ = setup
    out = tmp_path / "out"
    r = run_cli("fuse", str(base), str(deep), "-o", str(out), "-q")
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and r.stderr.startswith("error: 2 of 6 adapter layers")
    assert "--drop" in r.stderr and not out.exists()
    r = run_cli("fuse", str(base), str(deep), "-o", str(out), "-q", "--drop", "*layers.2.*q_proj", "--drop",
                "*layers.2.*v_proj")
    assert r.returncode == 0, r.stderr
    assert "coverage (fuse -> " in r.stdout and "4/6 layers land" in r.stdout and "dropped on request: 2" in r.stdout
    r = run_cli("fuse", str(base), str(deep), "-o", str(tmp_path / "j"), "-q", "--drop", "model.layers.2.*", "--json")
    payload = json.loads(r.stdout)
    cov = payload["coverage"]
    assert cov["counts"]["dropped"] == 2 and 0 < cov["energy_share"] < 1 and len(payload["layers"]) == 4
    with safe_open(str(tmp_path / "j" / "model.safetensors"), "pt") as f:
        assert json.loads(f.metadata()[METADATA_KEY]) == cov
    r = run_cli("fuse", str(base), str(deep), "-o", str(tmp_path / "typo"), "-q", "--drop", "model.layer.2.*")
    assert r.returncode == 1 and "names no layer" in r.stderr and not (tmp_path / "typo").exists()


def test_cli_convert_and_merge(setup, tmp_path):
    t, base, deep, other = setup
    r = run_cli("convert", str(deep), str(tmp_path / "c"), "--to", "peft", "--base", str(base), "-q")
    assert r.returncode == 1 and "would not land" in r.stderr and not (tmp_path / "c").exists()
    r = run_cli("convert", str(deep), str(tmp_path / "c"), "--to", "peft", "--base", str(base), "-q", "--json",
                "--drop", "status:unmatched")
    assert r.returncode == 0, r.stderr
    payload = json.loads(r.stdout)
    assert payload["coverage"]["counts"]["dropped"] == 2 and len(payload["layers"]) == 4
    r = run_cli("merge", str(deep), str(other), "-o", str(tmp_path / "m"), "-q")
    assert r.returncode == 0 and "coverage (merge): 8/8" in r.stdout and "ΔW energy 100%" in r.stdout
    r = run_cli("merge", str(deep), str(other), "-o", str(tmp_path / "mj"), "-q", "--json")
    payload = json.loads(r.stdout)
    assert r.returncode == 0 and payload["coverage"]["complete"] and payload["coverage"]["layers"] == 8
    assert payload["layers"] == 8 and payload["method"] == "task_arithmetic" and (tmp_path / "mj").is_dir()
    r = run_cli("merge", str(deep), str(other), "-o", str(tmp_path / "m2"), "-q", "--drop", "x*")
    assert r.returncode == 1 and "names no layer" in r.stderr and not (tmp_path / "m2").exists()


def test_cli_info_with_a_base_shows_the_coverage(setup):
    t, base, deep, _ = setup
    r = run_cli("info", str(deep), "--base", str(base), "--no-layers", "-q")
    assert r.returncode == 0 and "4/6 layers land" in r.stdout and "NOT landing: model.layers.2" in r.stdout
    cov = json.loads(run_cli("info", str(deep), "--base", str(base), "--no-layers", "-q", "--json").stdout)["coverage"]
    assert cov["counts"]["unmatched"] == 2 and not cov["complete"]
    assert [r["path"] for r in cov["not_landing"]] == DEEP
