"""adaptkit's GGUF LoRA adapters in the real llama.cpp (llama-cpp-python built from source) against peft.

Tiny llama, qwen2 and phi3 bases are converted to GGUF f32 by llama.cpp's own ``convert_hf_to_gguf.py`` (once per
session); real PEFT adapters (plain LoRA, rsLoRA with rank/alpha patterns over all linear layers, embed_tokens +
lm_head, phi3's fused qkv/gate_up) are exported by adaptkit and loaded with ``Llama(lora_path=...)``. On the same
prompt (token ids), llama.cpp and peft must agree on 32 greedy tokens and on every logit of the sequence within
1e-3 of the largest logit; and the adapter must move the logits far more than that (the comparison can fail).

Skipped when llama_cpp, gguf, sentencepiece or the converter (``ADAPTKIT_LLAMA_CPP_DIR``, or the folder
``.ci/run`` extracts into the wheel cache) are missing.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

pytest.importorskip("gguf")
pytest.importorskip("sentencepiece")
llama_cpp = pytest.importorskip("llama_cpp")

import adaptkit as ak
from adaptkit.deploy.llamacpp import export_gguf

from .gguf_models import (
    PROMPT,
    build_base,
    convert_bases,
    converter_dir,
    cpp_greedy,
    cpp_logits,
    hf_greedy,
    make_adapter,
    peft_model,
)

N_NEW = 32
RTOL = 1e-3
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

CASES = {
    "llama-plain": ("llama", {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]}),
    "llama-rslora-patterns-all-linear": ("llama", {
        "r": 4, "lora_alpha": 8, "use_rslora": True, "target_modules": "all-linear",
        "rank_pattern": {"layers.1.self_attn.q_proj": 2, "layers.0.mlp.up_proj": 6},
        "alpha_pattern": {"layers.0.mlp.down_proj": 3, "layers.1.self_attn.k_proj": 20}}),
    "llama-embed-lm_head": ("llama", {"r": 3, "lora_alpha": 6, "target_modules": [*ALL, "embed_tokens", "lm_head"]}),
    "qwen2-all-linear": ("qwen2", {"r": 4, "lora_alpha": 8, "target_modules": "all-linear",
                                       "alpha_pattern": {"layers.0.self_attn.k_proj": 2}}),
    "phi3-fused-all-linear-rslora": ("phi3", {"r": 4, "lora_alpha": 4, "use_rslora": True, "target_modules": "all-linear",
                                                  "rank_pattern": {"layers.0.self_attn.qkv_proj": 8}}),
}

#: figures of the last run, printed by the summary test (docs/deploy.md quotes them)
FIGURES: dict[str, tuple[float, int, float]] = {}


@pytest.fixture(scope="session")
def gguf_bases(tmp_path_factory):
    conv = converter_dir()
    if conv is None:
        pytest.skip("llama.cpp's convert_hf_to_gguf.py not found (set ADAPTKIT_LLAMA_CPP_DIR; .ci/run extracts it)")
    root = tmp_path_factory.mktemp("llamacpp")
    out = {t: (build_base(root / t, t), root / f"{t}.gguf") for t in ("llama", "qwen2", "phi3")}
    out["llama-tied"] = (build_base(root / "llama-tied", "llama", tie_word_embeddings=True), root / "llama-tied.gguf")
    convert_bases(dict(out.values()), conv)
    return out


def _llama(model_path, lora_path=None):
    kw = {"lora_path": str(lora_path)} if lora_path else {}
    return llama_cpp.Llama(model_path=str(model_path), n_ctx=64, n_batch=64, logits_all=True, n_threads=2,
                           verbose=False, seed=0, type_k=0, type_v=0, flash_attn=False, **kw)  # f32 KV cache


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def test_base_conversion_matches_transformers(gguf_bases):
    """The converted base alone agrees with transformers (so a mismatch below is the adapter's)."""
    hf_dir, gguf_path = gguf_bases["llama"]
    want_tokens, want = hf_greedy(peft_model(hf_dir, None), PROMPT, N_NEW)
    llm = _llama(gguf_path)
    assert cpp_greedy(llm, PROMPT, N_NEW) == want_tokens
    got = cpp_logits(llm, PROMPT + want_tokens)
    assert _rel(got, want) < RTOL


@pytest.mark.parametrize("case", list(CASES))
def test_llamacpp_matches_peft(gguf_bases, tmp_path, case):
    arch, lora = CASES[case]
    hf_dir, gguf_path = gguf_bases[arch]
    src = make_adapter(hf_dir, tmp_path / "adapter", **lora)
    out = export_gguf(ak.load(src), tmp_path / "adapter.gguf", base=hf_dir, gguf_base=gguf_path)
    want_tokens, want = hf_greedy(peft_model(hf_dir, src), PROMPT, N_NEW)
    _, base_logits = hf_greedy(peft_model(hf_dir, None), PROMPT, N_NEW)
    llm = _llama(gguf_path, out)
    tokens = cpp_greedy(llm, PROMPT, N_NEW)
    got = cpp_logits(llm, PROMPT + want_tokens)  # the same sequence as peft's, whatever llama.cpp generated
    rel = _rel(got, want)
    effect = _rel(base_logits[: len(PROMPT)], want[: len(PROMPT)])
    FIGURES[case] = (rel, sum(a == b for a, b in zip(tokens, want_tokens)), effect)
    assert effect > 100 * RTOL, "the adapter barely changes the model: the comparison would prove nothing"
    assert tokens == want_tokens
    assert rel < RTOL


def test_gguf_base_check_refuses_what_llama_cpp_refuses(gguf_bases, tmp_path):
    """``gguf_base=`` runs llama.cpp's loader checks before writing: a llama adapter on the Phi-3 GGUF (another arch)
    is refused. llama.cpp refuses it too, and llama-cpp-python 0.3.36 does not notice (it tests the NULL adapter
    pointer with ``is None``) and the first eval crashes: run in a child process, it must not exit cleanly."""
    from adaptkit.errors import ShapeMismatchError

    hf_dir, llama_gguf = gguf_bases["llama"]
    phi3_gguf = gguf_bases["phi3"][1]
    src = make_adapter(hf_dir, tmp_path / "adapter", r=2, lora_alpha=4, target_modules=["q_proj"])
    a = ak.load(src)
    with pytest.raises(ShapeMismatchError, match="arch"):
        export_gguf(a, tmp_path / "x.gguf", base=hf_dir, gguf_base=phi3_gguf)
    assert not (tmp_path / "x.gguf").exists()
    ok = export_gguf(a, tmp_path / "ok.gguf", base=hf_dir, gguf_base=llama_gguf)
    code = (f"import llama_cpp; l = llama_cpp.Llama(model_path={str(phi3_gguf)!r}, lora_path={str(ok)!r}, n_ctx=64, "
            f"verbose=False); l.eval({PROMPT!r}); print('ran')")
    run = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=120)
    assert run.returncode != 0 and "ran" not in run.stdout


def test_convert_lora_to_gguf_style_single_alpha_would_be_wrong(gguf_bases, tmp_path):
    """The control: the same rank/alpha-pattern adapter with llama.cpp's converter rule (one global lora_alpha,
    patterns and rsLoRA ignored) is measurably off, so the exact scaling above is what makes the match."""
    from adaptkit.formats.gguf import GGUFAdapter, read_gguf_lora, write_gguf_lora

    arch, lora = CASES["llama-rslora-patterns-all-linear"]
    hf_dir, gguf_path = gguf_bases[arch]
    src = make_adapter(hf_dir, tmp_path / "adapter", **lora)
    a = ak.load(src)
    g = read_gguf_lora(export_gguf(a, tmp_path / "ok.gguf", base=hf_dir))
    # undo the baked scale and write B as stored with alpha = the config's lora_alpha (what convert_lora_to_gguf does)
    scales = {t: a.layers[p].scale for t, p, _ in json.loads(g.metadata["adaptkit.modules"])}
    naive = {t: type(pair)(t, pair.a, pair.b / scales[t]) for t, pair in g.pairs.items()}
    bad = write_gguf_lora(GGUFAdapter(g.arch, float(lora["lora_alpha"]), naive, {}), tmp_path / "naive.gguf")
    want_tokens, want = hf_greedy(peft_model(hf_dir, src), PROMPT, N_NEW)
    got = cpp_logits(_llama(gguf_path, bad), PROMPT + want_tokens)
    FIGURES["control-one-global-alpha"] = (_rel(got, want), sum(a == b for a, b in zip(cpp_greedy(_llama(
        gguf_path, bad), PROMPT, N_NEW), want_tokens)), float("nan"))
    assert _rel(got, want) > 10 * RTOL


def test_deploy_export_path_matches_peft(gguf_bases, tmp_path):
    """Through ``adaptkit export --target llama.cpp`` (the rules' fixes, then the GGUF writer): trainable tokens
    become a token_embd LoRA (``through_base``) and rsLoRA is baked (``bake_scale``); llama.cpp = peft."""
    from adaptkit.deploy import export

    hf_dir, gguf_path = gguf_bases["llama"]
    case = "trainable-tokens"
    lora = {"r": 2, "lora_alpha": 4, "use_rslora": True, "target_modules": ["q_proj", "v_proj"],
                "trainable_token_indices": {"embed_tokens": [5, 17, 61]}}
    src = make_adapter(hf_dir, tmp_path / "adapter", **lora)
    result = export(str(src), tmp_path / "adapter.gguf", target="llama.cpp", base=str(hf_dir))
    assert result.check.ok and result.certificate.complete
    want_tokens, want = hf_greedy(peft_model(hf_dir, src), PROMPT, N_NEW)
    _, base_logits = hf_greedy(peft_model(hf_dir, None), PROMPT, N_NEW)
    llm = _llama(gguf_path, result.path)
    assert cpp_greedy(llm, PROMPT, N_NEW) == want_tokens
    got = cpp_logits(llm, PROMPT + want_tokens)
    FIGURES[f"export-{case}"] = (_rel(got, want), N_NEW, _rel(base_logits[: len(PROMPT)], want[: len(PROMPT)]))
    assert _rel(base_logits[: len(PROMPT)], want[: len(PROMPT)]) > 100 * RTOL
    assert _rel(got, want) < RTOL


def test_dora_folded_with_lossy_option(gguf_bases, tmp_path):
    """``--lossy dora``: the DoRA layers folded through the base into LoRA (reported error per layer); llama.cpp runs
    exactly the folded adapter (the same as peft with it), and differs from peft's DoRA by what the fold lost."""
    from adaptkit.deploy import export

    hf_dir, gguf_path = gguf_bases["llama"]
    src = make_adapter(hf_dir, tmp_path / "adapter", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                       use_dora=True, std=0.05)
    result = export(str(src), tmp_path / "adapter.gguf", target="llama.cpp", base=str(hf_dir), lossy="dora")
    assert {r.fix for r in result.fixes} >= {"fold_dora"} and result.max_error > 0
    folded = ak.save(result.adapter, tmp_path / "folded", format="peft")
    want_tokens, want = hf_greedy(peft_model(hf_dir, folded), PROMPT, N_NEW)
    _, dora = hf_greedy(peft_model(hf_dir, src), PROMPT, N_NEW)
    llm = _llama(gguf_path, result.path)
    assert cpp_greedy(llm, PROMPT, N_NEW) == want_tokens
    got = cpp_logits(llm, PROMPT + want_tokens)
    FIGURES["dora-folded (effect: folded vs DoRA in peft)"] = (_rel(got, want), N_NEW,
                                                               _rel(want[: len(PROMPT)], dora[: len(PROMPT)]))
    assert _rel(got, want) < RTOL


_RUN_LORA = """
import sys, llama_cpp
llm = llama_cpp.Llama(model_path=sys.argv[1], lora_path=sys.argv[2], n_ctx=64, n_batch=64, n_threads=2, verbose=False)
llm.eval([int(t) for t in sys.argv[3].split(",")])
print("ran")
"""


def test_tied_token_embd_lora_aborts_llama_cpp(gguf_bases, tmp_path):
    """Why ``llama.cpp.tied_embeddings`` refuses: a tied model's GGUF has no ``output`` tensor, llama.cpp uses
    ``token_embd`` for the output matmul and looks LoRA pairs up by that tensor's name, so the token_embd pair of
    trainable tokens is applied there too and aborts the process (GGML_ASSERT ggml_can_mul_mat). export refuses it;
    the same pair forced into a file (planned on an untied copy of the config) aborts, and the file without it runs."""
    from adaptkit.deploy import export
    from adaptkit.deploy.fixes import through_base
    from adaptkit.deploy.rules import Context
    from adaptkit.errors import UnsupportedError

    hf_dir, gguf_path = gguf_bases["llama-tied"]
    src = make_adapter(hf_dir, tmp_path / "adapter", r=2, lora_alpha=4, target_modules=["q_proj"],
                       trainable_token_indices={"embed_tokens": [5, 17, 30]})
    with pytest.raises(UnsupportedError, match="tied"):
        export(str(src), tmp_path / "refused.gguf", target="llama.cpp", base=str(hf_dir))
    untied = tmp_path / "untied"
    untied.mkdir()
    for f in hf_dir.iterdir():
        if f.is_file():
            (untied / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((untied / "config.json").read_text())
    (untied / "config.json").write_text(json.dumps({**cfg, "tie_word_embeddings": False}))
    adapter = ak.load(src)
    fitted, _ = through_base(adapter, Context("llama.cpp", None, None, str(untied)), ["model.embed_tokens"])
    assert set(fitted.layers) == set(adapter.layers)  # no lm_head added on the untied copy
    forced = export_gguf(fitted, tmp_path / "forced.gguf", base=untied)
    control = export_gguf(fitted.replace(layers={p: l for p, l in fitted.layers.items() if "embed" not in p}),
                          tmp_path / "control.gguf", base=untied)
    runs = {name: subprocess.run([sys.executable, "-c", _RUN_LORA, str(gguf_path), str(f), ",".join(map(str, PROMPT))],
                                 capture_output=True, text=True, timeout=120, check=False)
            for name, f in (("forced", forced), ("control", control))}
    assert runs["control"].returncode == 0 and "ran" in runs["control"].stdout, runs["control"].stderr[-2000:]
    assert runs["forced"].returncode != 0 and "ggml_can_mul_mat" in runs["forced"].stderr, runs["forced"].stderr[-2000:]


def test_zz_report_figures():
    """Print the measured figures (run with -s); they are quoted in docs/deploy.md."""
    if not FIGURES:
        pytest.skip("no comparison ran")
    for case, (rel, agree, effect) in FIGURES.items():
        print(f"\n{case}: max rel logit diff {rel:.2e}, greedy tokens {agree}/{N_NEW}, adapter effect {effect:.2f}")
