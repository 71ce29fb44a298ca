"""Bad or extreme ``adapter_config.json`` values: NaN/Inf alphas, pattern values of the wrong type, huge patterns.

Also PEFT's pattern matching itself: ``rank_pattern``/``alpha_pattern`` keys resolve exactly as
``peft.utils.other.get_pattern_key`` resolves them (plain names, regex keys, overlapping keys, precedence),
and a 200,000-entry pattern costs seconds, not minutes.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import time

import pytest
import torch
from peft import LoraConfig, PeftModel
from peft.utils.other import get_pattern_key

import adaptkit as ak
from adaptkit.formats.patterns import PatternMatcher
from adaptkit.live.inject import adapted_modules

from .conftest import make_peft_adapter, make_tiny_llama, run_cli

Q0, V0 = "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"
Q1, V1 = "model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"


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


def _config(directory, **changes):
    f = directory / "adapter_config.json"
    cfg = json.loads(f.read_text())
    cfg.update(changes)
    f.write_text(json.dumps(cfg))  # NaN / Infinity as Python's json (and PEFT's save_pretrained) write them
    return directory


def _cli_fails(*args, match):
    res = run_cli(*args)
    assert res.returncode == 1, res.stdout + res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    assert "Traceback" not in res.stderr
    assert match in lines[0], lines[0]
    return lines[0]


# ------------------------------------------------------------------------------------------ NaN / Inf alpha


def test_nan_lora_alpha_is_not_finite_anywhere(adapter_dir, base_dir, tmp_path):
    _config(adapter_dir, lora_alpha=float("nan"))
    a = ak.load(adapter_dir)
    assert not a.is_finite()
    assert a.nonfinite() == {p: ["alpha", "scale"] for p in (Q0, V0, Q1, V1)}
    assert not ak.layer_status(a)["finite"].any() and not ak.model_status(a)["finite"][0]
    res = run_cli("info", str(adapter_dir), "--json")
    assert res.returncode == 0, res.stderr
    payload = json.loads(res.stdout)
    assert payload["finite"] is False and not any(row["finite"] for row in payload["layers"])
    res = run_cli("info", str(adapter_dir))
    assert res.returncode == 0 and any(line.split() == ["finite", "False"] for line in res.stdout.splitlines()), res.stdout
    res = run_cli("status", str(adapter_dir), "--json")
    assert res.returncode == 0, res.stderr
    assert [row["finite"] for row in json.loads(res.stdout)] == [False] * 4
    model = make_tiny_llama(0)
    with pytest.raises(ak.NonFiniteError, match=r"alpha, scale\) \(alpha comes from lora_alpha"):
        ak.inject(model, adapter_dir)
    assert not adapted_modules(model)
    with pytest.raises(ak.NonFiniteError, match="alpha comes from lora_alpha"):
        ak.fuse(base_dir, a, tmp_path / "fused", progress=False)
    _cli_fails("fuse", str(base_dir), str(adapter_dir), "-o", str(tmp_path / "fused"), match="alpha comes from lora_alpha")
    assert not (tmp_path / "fused").exists()
    with pytest.raises(ak.NonFiniteError, match="merge needs finite"):
        ak.merge([a, ak.load(adapter_dir)], method="cat")


def test_inf_alpha_pattern_marks_only_its_layers(adapter_dir):
    _config(adapter_dir, alpha_pattern={"v_proj": float("inf")})
    a = ak.load(adapter_dir)
    assert set(a.nonfinite()) == {V0, V1}
    assert math.isinf(a.layers[V0].alpha) and a.layers[Q0].alpha == 8
    res = run_cli("status", str(adapter_dir), "--json")
    assert {row["module"]: row["finite"] for row in json.loads(res.stdout)} == {Q0: True, V0: False, Q1: True, V1: False}
    with pytest.raises(ak.NonFiniteError, match=rf"{V0} \(alpha, scale\)"):
        ak.inject(make_tiny_llama(0), adapter_dir)


# ------------------------------------------------------------------------------------------ wrong types


@pytest.mark.parametrize(("changes", "message"), [
    ({"rank_pattern": {"q_proj": "four"}}, "rank_pattern['q_proj'] is 'four', but a rank is a positive integer"),
    ({"rank_pattern": {"q_proj": 2.5}}, "rank_pattern['q_proj'] is 2.5"),
    ({"rank_pattern": {"q_proj": True}}, "rank_pattern['q_proj'] is True"),
    ({"rank_pattern": {"q_proj": -4}}, "rank_pattern['q_proj'] is -4"),
    ({"rank_pattern": ["q_proj"]}, "rank_pattern is a list, but it maps module-name patterns to values"),
    ({"r": "4"}, "r is '4', but a rank is a positive integer"),
    ({"r": 0}, "r is 0"),
    ({"lora_alpha": "8"}, "lora_alpha is '8', but an alpha is a number"),
    ({"alpha_pattern": {"v_proj": [3]}}, "alpha_pattern['v_proj'] is [3], but an alpha is a number"),
    ({"alpha_pattern": {"(v_proj": 3}}, "alpha_pattern key '(v_proj' is not a valid regular expression"),
])
def test_pattern_and_scalar_values_of_the_wrong_type(adapter_dir, changes, message):
    _config(adapter_dir, **changes)
    with pytest.raises(ak.ConfigError) as e:
        ak.load(adapter_dir)
    assert message in str(e.value)
    _cli_fails("info", str(adapter_dir), match=message)


def test_bad_config_in_state_dict_injection(clean_dir):
    from safetensors.torch import load_file

    sd = load_file(str(clean_dir / "adapter_model.safetensors"))
    cfg = json.loads((clean_dir / "adapter_config.json").read_text())
    model = make_tiny_llama(0)
    with pytest.raises(ak.ConfigError, match=r"rank_pattern\['v_proj'\] is 'x'"):
        ak.inject(model, sd, config={**cfg, "rank_pattern": {"v_proj": "x"}})
    with pytest.raises(ak.NonFiniteError, match="alpha"):
        ak.inject(model, sd, config={**cfg, "lora_alpha": float("nan")})
    assert not adapted_modules(model)
    # a rank written as a whole float (4.0) is still a rank
    assert ak.inject(model, sd, config={**cfg, "rank_pattern": {"q_proj": 4.0}}) == sorted([Q0, Q1, V0, V1])


# ------------------------------------------------------------------------------------------ matching


PATHS = [Q0, Q1, V0, "model.layers.10.self_attn.v_proj", "model.layers.11.mlp.down_proj", "model.layers.1.mlp.up_proj",
         "q_proj", "lm_head", "model.embed_tokens", "layers.1.self_attn.q_proj", "model.layers.0.self_attn.q.proj",
         "x.q_proj_extra", "transformer.h.0.attn.c_attn", "unet.down_blocks.0.attentions.0.to_q", "a.b", "ab", "a_b",
         "a..b", "", ".", "a+b", "weird\nname.q_proj", "q_proj\n"]
KEYS = ["q_proj", "v_proj", "layers.1.self_attn.q_proj", "layers.1", "self_attn.q_proj", "q.proj", "proj", "_proj",
        Q0, r"layers\.1\..*q_proj", "(q|v)_proj", ".*", "layers.1.*", r"mlp\.down_proj", "down_proj", "up_proj|down_proj",
        "lm_head", "a.b", "a", "b", "", "a+b", "^model.*", "layers.[0-9]+.mlp.up_proj", "h.0.attn.c_attn", "c_attn",
        "attn.c.attn", "to_q", "model.layers.1[01].self_attn.v_proj", "..b", "a.", "s", "name.q_proj"]


def test_pattern_matching_equals_peft_get_pattern_key():
    """Random subsets of plain, regex-ish and overlapping keys, in random orders: the same key as peft's, always."""
    rng = random.Random(0)
    checked = 0
    for _ in range(1500):
        keys = rng.sample(KEYS, rng.randint(1, len(KEYS)))
        pattern = {k: i for i, k in enumerate(keys)}
        matcher = PatternMatcher(pattern)
        for path in PATHS:
            want = pattern.get(get_pattern_key(pattern.keys(), path))
            assert matcher.value(path, None) == want, (keys, path)
            checked += 1
    assert checked == 1500 * len(PATHS)


def test_overlapping_and_regex_patterns_give_peft_ranks_and_alphas(tmp_path, input_ids):
    """Against a real peft model: the first key in dict order wins, regex keys included (and the index agrees)."""
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "up_proj"], init_lora_weights=False,
                     rank_pattern={"layers.1.self_attn.q_proj": 2, "q_proj": 3, "(k|v)_proj": 5, "model.layers.0.self_attn.k_proj": 6},
                     alpha_pattern={r"layers\.0\..*": 3, "v_proj": 7, "layers.1.mlp.up.proj": 11})
    src = make_peft_adapter(tmp_path / "a", cfg, seed=2)
    peft_model = PeftModel.from_pretrained(make_tiny_llama(0), str(src)).eval()
    ours = ak.load(src)
    for name, module in peft_model.base_model.model.named_modules():
        if hasattr(module, "lora_A") and "default" in module.lora_A:
            layer = ours.layers[name]
            assert layer.rank == module.r["default"], name
            assert layer.alpha == module.lora_alpha["default"], name
            assert layer.scale == pytest.approx(module.scaling["default"]), name
    assert ours.layers["model.layers.1.mlp.up_proj"].alpha == 11  # "." in a key is the regex wildcard, as in peft
    for field in ("rank_pattern", "alpha_pattern"):
        pattern = getattr(cfg, field)
        matcher = PatternMatcher(pattern)
        for path in ours.layers:
            assert matcher.key(path) == (lambda k: k if k in pattern else None)(get_pattern_key(pattern.keys(), path))
    injected = make_tiny_llama(0)
    ak.inject(injected, src)
    with torch.no_grad():
        torch.testing.assert_close(injected(input_ids).logits, peft_model(input_ids).logits, atol=1e-5, rtol=0)


def test_200k_entry_patterns_load_in_seconds(adapter_dir):
    """Matching costs time proportional to the file, not patterns x layers (it was ~75 s)."""
    n = 200_000
    rank_pattern = {f"model.layers.{i}.self_attn.k_proj": 8 for i in range(n)}
    rank_pattern["q_proj"] = 4
    alpha_pattern = {f"model.layers.{i}.mlp.gate_proj": 2 for i in range(n)}
    alpha_pattern.update({V1: 3, "v_proj": 5, "q_proj": 7, Q0: 9})  # Q0's own key comes after "q_proj": 7 wins
    _config(adapter_dir, rank_pattern=rank_pattern, alpha_pattern=alpha_pattern)
    start = time.perf_counter()
    a = ak.load(adapter_dir)
    seconds = time.perf_counter() - start
    assert {p: (l.rank, l.alpha) for p, l in a.layers.items()} == {Q0: (4, 7), Q1: (4, 7), V0: (4, 5), V1: (4, 3)}
    assert seconds < 10, f"loading took {seconds:.1f} s"
    print(f"200k-entry rank_pattern + alpha_pattern: ak.load in {seconds:.2f} s")
