"""GGUF LoRA export for llama.cpp, checked with gguf's own reader (no llama.cpp needed).

Real PEFT adapters on tiny transformers bases are exported with :func:`adaptkit.deploy.llamacpp.export_gguf`; the
file is read back with ``gguf.GGUFReader`` and checked against what llama.cpp's loader requires
(``src/llama-adapter.cpp``: ``general.type``, ``adapter.type``, ``adapter.lora.alpha``, ``<tensor>.lora_a/b``
pairs with ``a.ne[0] = in``, ``b.ne[1] = out``, ``a.ne[1] = b.ne[0] = r``; ``token_embd`` flipped), and the
delta llama.cpp computes from it (``scale = alpha / r`` per tensor, 1 when alpha is 0) against peft's
``get_delta_weight`` with the converter's q/k row permutation. Bad inputs: one error, no file.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

gguf = pytest.importorskip("gguf")

import adaptkit as ak
from adaptkit.core.coverage import CoverageError
from adaptkit.deploy.llamacpp import export_gguf, load_gguf, permute_rows, unpermute_rows
from adaptkit.errors import UnsupportedError

from .gguf_models import build_base, make_adapter

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf_bases")
    return {t: build_base(root / t, t) for t in ("llama", "phi3")}


def _peft_deltas(base_dir, adapter_dir) -> dict[str, torch.Tensor]:
    from peft import PeftModel
    from peft.tuners.tuners_utils import BaseTunerLayer
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), adapter_dir)
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, BaseTunerLayer) and hasattr(module, "get_delta_weight"):
            out[name.removeprefix("base_model.model.")] = module.get_delta_weight("default").double()
    return out


def _read(path):
    r = gguf.GGUFReader(str(path))
    fields = {k: f.contents() for k, f in r.fields.items()}
    tensors = {t.name: torch.from_numpy(t.data.copy()).double().reshape([int(s) for s in reversed(t.shape)])
               for t in r.tensors}
    ne = {t.name: [int(s) for s in t.shape] for t in r.tensors}
    return fields, tensors, ne


def _cpp_delta(fields, tensors, name):
    """The delta llama.cpp adds to base tensor ``name`` (numpy orientation of the GGUF tensor), at adapter scale 1."""
    a, b = tensors[name + ".lora_a"], tensors[name + ".lora_b"]
    alpha, r = fields["adapter.lora.alpha"], b.shape[-1]
    scale = alpha / r if alpha else 1.0
    if name == "token_embd.weight":  # a (vocab, r) gathered by token, b (n_embd, r): row t gets b @ a[t]
        return scale * a @ b.T
    return scale * b @ a


def test_names_shapes_alpha_and_delta_match_llama_cpps_rule(bases, tmp_path):
    """rsLoRA + rank/alpha patterns + embed_tokens + lm_head on llama: every pair as llama.cpp requires it,
    alpha 0 because ranks differ, and llama.cpp's delta = converter-permuted peft delta."""
    src = make_adapter(bases["llama"], tmp_path / "ad", r=4, lora_alpha=8, use_rslora=True,
                       target_modules=[*ALL, "embed_tokens", "lm_head"],
                       rank_pattern={"layers.1.self_attn.q_proj": 2, "layers.0.mlp.up_proj": 6},
                       alpha_pattern={"layers.0.mlp.down_proj": 3, "layers.1.self_attn.k_proj": 20})
    out = export_gguf(ak.load(src), tmp_path / "ad.gguf", base=bases["llama"])
    fields, tensors, ne = _read(out)
    assert fields["general.type"] == "adapter" and fields["adapter.type"] == "lora"
    assert fields["general.architecture"] == "llama"
    assert fields["adapter.lora.alpha"] == 0.0  # ranks 2, 4, 6: alpha 0 makes every scale 1 (B holds it)
    gg = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
          "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}
    expected = {f"blk.{i}.{g}.weight.lora_{x}" for i in range(2) for g in gg.values() for x in "ab"}
    expected |= {f"{t}.weight.lora_{x}" for t in ("token_embd", "output") for x in "ab"}
    assert set(tensors) == expected
    assert ne["blk.1.attn_q.weight.lora_a"] == [64, 2] and ne["blk.1.attn_q.weight.lora_b"] == [2, 64]
    assert ne["blk.0.attn_k.weight.lora_a"] == [64, 4] and ne["blk.0.attn_k.weight.lora_b"] == [4, 32]
    assert ne["blk.0.ffn_up.weight.lora_b"] == [6, 128] and ne["output.weight.lora_b"] == [4, 96]
    assert ne["token_embd.weight.lora_a"] == [4, 96] and ne["token_embd.weight.lora_b"] == [4, 64]
    peft = _peft_deltas(bases["llama"], src)
    assert len(peft) == 16
    for path, d in peft.items():
        if path == "model.embed_tokens":
            name, want = "token_embd.weight", d
        elif path == "lm_head":
            name, want = "output.weight", d
        else:
            i, mod = path.split(".")[2], path.split(".")[-1]
            name, want = f"blk.{i}.{gg[mod]}.weight", d
            if mod in ("q_proj", "k_proj"):  # convert_hf_to_gguf permutes these rows of the base
                want = permute_rows(d, 4 if mod == "q_proj" else 2)
        got = _cpp_delta(fields, tensors, name)
        assert torch.allclose(got, want, rtol=0, atol=1e-6 * want.abs().max()), path
    cov = json.loads(fields["adaptkit.coverage"])
    # 16 layers + the 2 full embedding/lm_head copies peft saves (save_embedding_layers): equal to the base, no-ops
    assert cov["complete"] and cov["energy_share"] == 1.0 and cov["counts"]["matched"] == 18


def test_uniform_rank_writes_alpha_r_and_round_trips(bases, tmp_path):
    """One rank everywhere: adapter.lora.alpha = r (scale 1 with B scaled); load_gguf gives peft's deltas back."""
    src = make_adapter(bases["llama"], tmp_path / "ad", r=4, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj"])
    a = ak.load(src)
    out = export_gguf(a, tmp_path / "ad.gguf", base=bases["llama"], dtype="f32")
    fields, tensors, _ = _read(out)
    assert fields["adapter.lora.alpha"] == 4.0
    assert len(tensors) == 12
    back = load_gguf(out)
    assert set(back.layers) == set(a.layers)
    for p in a.layers:
        assert torch.allclose(back.layers[p].delta(), a.layers[p].delta(), atol=1e-6), p


def test_phi3_fused_qkv_and_gate_up_names(bases, tmp_path):
    """phi3 keeps transformers' fused qkv_proj / gate_up_proj: they land on attn_qkv / ffn_up, no permutation."""
    src = make_adapter(bases["phi3"], tmp_path / "ad", r=3, lora_alpha=5, target_modules="all-linear")
    out = export_gguf(ak.load(src), tmp_path / "ad.gguf", base=bases["phi3"])
    fields, tensors, ne = _read(out)
    assert fields["general.architecture"] == "phi3"
    assert {n.rsplit(".", 2)[0] for n in tensors} == {f"blk.{i}.{g}" for i in range(2)
                                                        for g in ("attn_qkv", "attn_output", "ffn_up", "ffn_down")}
    assert ne["blk.0.attn_qkv.weight.lora_b"] == [3, 128] and ne["blk.0.ffn_up.weight.lora_b"] == [3, 256]
    peft = _peft_deltas(bases["phi3"], src)
    got = _cpp_delta(fields, tensors, "blk.1.attn_qkv.weight")
    assert torch.allclose(got, peft["model.layers.1.self_attn.qkv_proj"], atol=1e-6)


def test_permutation_is_llama_cpps_and_inverts():
    """permute_rows is llama.cpp's LlamaModel.permute (per head: rotary halves -> interleaved pairs) and inverts."""
    rows = torch.arange(16.0).reshape(16, 1)  # 2 heads of 8 rows
    assert permute_rows(rows, 2).flatten().tolist() == [0, 4, 1, 5, 2, 6, 3, 7, 8, 12, 9, 13, 10, 14, 11, 15]
    x = torch.randn(32, 5)
    assert torch.equal(unpermute_rows(permute_rows(x, 4), 4), x)


# ------------------------------------------------------------------------------------------- bad inputs


def test_dora_is_refused_and_nothing_written(bases, tmp_path):
    src = make_adapter(bases["llama"], tmp_path / "ad", r=2, target_modules=["q_proj"], use_dora=True)
    with pytest.raises(UnsupportedError, match="DoRA"):
        export_gguf(ak.load(src), tmp_path / "x.gguf", base=bases["llama"])
    assert not list(tmp_path.glob("*.gguf")) and not list(tmp_path.glob(".x.gguf*"))


def test_lora_bias_is_refused(bases, tmp_path):
    src = make_adapter(bases["llama"], tmp_path / "ad", r=2, target_modules=["v_proj"], lora_bias=True)
    with pytest.raises(UnsupportedError, match="no bias"):
        export_gguf(ak.load(src), tmp_path / "x.gguf", base=bases["llama"])
    assert not (tmp_path / "x.gguf").exists()


def test_modules_to_save_is_refused(bases, tmp_path):
    """A trained modules_to_save copy is a full weight, not a LoRA pair (an untrained one equals the base: no-op)."""
    src = make_adapter(bases["llama"], tmp_path / "ad", r=2, target_modules=["q_proj"], modules_to_save=["lm_head"])
    with pytest.raises(UnsupportedError, match="LoRA pairs only"):
        export_gguf(ak.load(src), tmp_path / "x.gguf", base=bases["llama"])
    assert not (tmp_path / "x.gguf").exists()


def test_unknown_layer_fails_coverage_unless_dropped(bases, tmp_path):
    src = make_adapter(bases["llama"], tmp_path / "ad", r=2, target_modules=["q_proj", "v_proj"])
    a = ak.load(src)
    layers = dict(a.layers)
    layers["model.layers.0.self_attn.bogus_proj"] = layers["model.layers.0.self_attn.q_proj"]
    bad = a.replace(layers=layers)
    with pytest.raises(CoverageError, match="bogus_proj"):
        export_gguf(bad, tmp_path / "x.gguf", base=bases["llama"])
    assert not (tmp_path / "x.gguf").exists()
    with pytest.raises(CoverageError, match="names no layer"):  # a typo in --drop is an error, not a silent no-op
        export_gguf(bad, tmp_path / "x.gguf", base=bases["llama"], drop=["*bogus_prj"])
    out = export_gguf(bad, tmp_path / "x.gguf", base=bases["llama"], drop=["*bogus_proj"])
    fields, tensors, _ = _read(out)
    assert len(tensors) == 8
    cov = json.loads(fields["adaptkit.coverage"])
    assert cov["counts"]["dropped"] == 1 and not cov["complete"]
    assert cov["not_landing"][0]["path"] == "model.layers.0.self_attn.bogus_proj"


def test_tied_lm_head_does_not_land(tmp_path):
    """With tied embeddings the GGUF base has no output.weight (llama.cpp reuses token_embd): an lm_head LoRA would
    be looked up as token_embd with the wrong layout; adaptkit refuses it instead of writing it."""
    base = build_base(tmp_path / "tied", "llama", tie_word_embeddings=True)
    src = make_adapter(base, tmp_path / "ad", r=2, target_modules=["q_proj", "lm_head"])
    with pytest.raises(CoverageError, match="lm_head"):
        export_gguf(ak.load(src), tmp_path / "x.gguf", base=base)
    out = export_gguf(ak.load(src), tmp_path / "x.gguf", base=base, drop=["lm_head*"])
    assert len(_read(out)[1]) == 4


def test_unknown_architecture_is_refused(bases, tmp_path):
    base = tmp_path / "other"
    shutil.copytree(bases["llama"], base)
    cfg = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt_neox"}))
    src = make_adapter(bases["llama"], tmp_path / "ad", r=2, target_modules=["q_proj"])
    with pytest.raises(UnsupportedError, match="no architecture 'gpt_neox'"):
        export_gguf(ak.load(src), tmp_path / "x.gguf", base=base)


def test_existing_output_needs_overwrite_and_bad_dtype(bases, tmp_path):
    src = make_adapter(bases["llama"], tmp_path / "ad", r=2, target_modules=["q_proj"])
    a = ak.load(src)
    (tmp_path / "x.gguf").write_bytes(b"keep")
    with pytest.raises(ak.errors.OutputExistsError if hasattr(ak, "errors") else FileExistsError):
        export_gguf(a, tmp_path / "x.gguf", base=bases["llama"])
    assert (tmp_path / "x.gguf").read_bytes() == b"keep"
    with pytest.raises(UnsupportedError, match="dtype"):
        export_gguf(a, tmp_path / "y.gguf", base=bases["llama"], dtype="q4_0")
    assert not (tmp_path / "y.gguf").exists()
    out = export_gguf(a, tmp_path / "x.gguf", base=bases["llama"], overwrite=True, dtype="f16")
    assert load_gguf(out).layers["model.layers.0.self_attn.q_proj"].delta().shape == (64, 64)


def test_reader_refuses_a_model_file(bases, tmp_path):
    from adaptkit.errors import FormatError

    w = gguf.GGUFWriter(str(tmp_path / "m.gguf"), "llama")
    w.add_string("general.type", "model")
    w.add_tensor("token_embd.weight", torch.zeros(4, 4).numpy())
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    with pytest.raises(FormatError, match="not a LoRA adapter"):
        load_gguf(tmp_path / "m.gguf")


# ------------------------------------------------------------------------------------------- the CLI


def test_cli_check_and_export_llamacpp(bases, tmp_path):
    """`adaptkit check --target llama.cpp` names the scales llama.cpp's one alpha cannot express (exit 1);
    `adaptkit export ... --target llama.cpp` writes the GGUF file with the certificate; without --base: exit 1,
    no file; DoRA without --lossy dora: exit 1, no file."""
    from .conftest import run_cli

    src = make_adapter(bases["llama"], tmp_path / "ad", r=4, lora_alpha=8, use_rslora=True,
                       target_modules=["q_proj", "v_proj"], rank_pattern={"layers.1.self_attn.q_proj": 2})
    r = run_cli("check", str(src), "--target", "llama.cpp", "--base", str(bases["llama"]), "--json")
    assert r.returncode == 1, r.stderr
    findings = {f["rule"]: f for f in json.loads(r.stdout)["findings"]}
    assert findings["llama.cpp.rslora"]["verdict"] == "exact"
    assert findings["llama.cpp.rank_pattern"]["verdict"] == "accepted"
    out = tmp_path / "out.gguf"
    r = run_cli("export", str(src), "-o", str(out), "--target", "llama.cpp", "--base", str(bases["llama"]))
    assert r.returncode == 0, r.stderr
    fields, tensors, _ = _read(out)
    assert len(tensors) == 8 and fields["adapter.lora.alpha"] == 0.0
    assert json.loads(fields["adaptkit.coverage"])["complete"]
    assert json.loads(fields["adaptkit.export"])["target"] == "llama.cpp"
    r = run_cli("export", str(src), "-o", str(tmp_path / "nobase.gguf"), "--target", "llama.cpp")
    assert r.returncode == 1 and "needs --base" in r.stderr and not (tmp_path / "nobase.gguf").exists()
    dora = make_adapter(bases["llama"], tmp_path / "dora", r=2, target_modules=["q_proj"], use_dora=True)
    r = run_cli("export", str(dora), "-o", str(tmp_path / "dora.gguf"), "--target", "llama.cpp", "--base",
                str(bases["llama"]))
    assert r.returncode == 1 and "--lossy dora" in r.stderr and not (tmp_path / "dora.gguf").exists()


def test_gguf_base_check_names_and_shapes(bases, tmp_path):
    """``gguf_base=``: a model lacking a tensor, or holding it in another shape, is refused before writing."""
    from adaptkit.errors import ShapeMismatchError

    src = make_adapter(bases["llama"], tmp_path / "ad", r=2, target_modules=["q_proj"])
    a = ak.load(src)

    def model(path, shapes):
        w = gguf.GGUFWriter(str(path), "llama")
        for name, shape in shapes.items():
            w.add_tensor(name, torch.zeros(shape).numpy())
        w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
        return path

    good = {f"blk.{i}.attn_q.weight": (64, 64) for i in range(2)}
    export_gguf(a, tmp_path / "ok.gguf", base=bases["llama"], gguf_base=model(tmp_path / "good.gguf", good))
    with pytest.raises(ShapeMismatchError, match="has no tensor blk.1.attn_q.weight"):
        export_gguf(a, tmp_path / "x.gguf", base=bases["llama"],
                    gguf_base=model(tmp_path / "short.gguf", {"blk.0.attn_q.weight": (64, 64)}))
    with pytest.raises(ShapeMismatchError, match="does not fit"):
        export_gguf(a, tmp_path / "x.gguf", base=bases["llama"],
                    gguf_base=model(tmp_path / "wide.gguf", {**good, "blk.1.attn_q.weight": (64, 128)}))
    assert not (tmp_path / "x.gguf").exists()


def test_layer_without_a_gguf_name_does_not_land(bases, tmp_path, monkeypatch):
    """A base weight that gguf's tensor-name map does not name for the architecture is never applied by llama.cpp:
    check's llama.cpp.module_names rule names it and export's certificate refuses it (here q_proj under an
    architecture row whose GGUF arch, GPT-2, has fused attn_qkv only)."""
    from adaptkit.deploy import check, llamacpp

    src = make_adapter(bases["llama"], tmp_path / "ad", r=2, target_modules=["q_proj", "o_proj"])
    monkeypatch.setitem(llamacpp.ARCHS, "llama", llamacpp.Arch("GPT2"))
    report = check(str(src), base=str(bases["llama"]), target="llama.cpp")
    names = next(f for f in report.findings if f.rule == "llama.cpp.module_names")
    assert names.verdict == "refused" and names.where == ("model.layers.0.self_attn.q_proj",
                                                          "model.layers.1.self_attn.q_proj")
    with pytest.raises(CoverageError, match="tensor-name map has no tensor"):
        export_gguf(ak.load(src), tmp_path / "x.gguf", base=bases["llama"])
    out = export_gguf(ak.load(src), tmp_path / "x.gguf", base=bases["llama"], drop=["*q_proj"])
    fields, tensors, _ = _read(out)
    assert fields["general.architecture"] == "gpt2" and {n.rsplit(".", 2)[0] for n in tensors} == {
        "blk.0.attn_output", "blk.1.attn_output"}
