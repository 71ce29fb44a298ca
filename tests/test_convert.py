"""``ak.convert`` (any kind -> LoRA, truncated SVD with a loss report) and the ``adaptkit convert`` command."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

import adaptkit as ak
from adaptkit.cli import main
from adaptkit.core.adapter import Adapter
from adaptkit.core.kinds import IA3, Full, LoHa, LoKr, LoRA
from adaptkit.errors import ConfigError, UnsupportedError
from adaptkit.ops.convert import CONVERTERS, parse_spec, plan

from .test_kohya_lycoris import make_lycoris


def _g(seed):
    return torch.Generator().manual_seed(seed)


def mixed_adapter() -> Adapter:
    g = _g(0)
    return Adapter(layers={
        "a": LoHa(w1a=torch.randn(12, 3, generator=g), w1b=torch.randn(3, 10, generator=g), w2a=torch.randn(12, 3, generator=g),
                  w2b=torch.randn(3, 10, generator=g), alpha=2.0, shape=(12, 10)),
        "b": LoKr(alpha=1.0, rank=2, shape=(12, 8), w1=torch.randn(3, 2, generator=g), w2a=torch.randn(4, 2, generator=g),
                  w2b=torch.randn(2, 4, generator=g)),
        "c": Full(diff=torch.randn(6, 4, 3, 3, generator=g), shape=(6, 4, 3, 3), module_type="conv"),
        "d": LoRA(down=torch.randn(6, 10, generator=g), up=torch.randn(12, 6, generator=g), alpha=3.0, shape=(12, 10)),
    })


def test_convert_to_lora_is_the_truncated_svd_and_reports_the_loss():
    adapter = mixed_adapter()
    out, report = ak.convert(adapter, kind="lora", rank=3, return_report=True)
    assert out.kinds == {"lora"} and all(layer.rank <= 3 for layer in out.layers.values())
    rows = report.set_index("module")
    for path, layer in adapter.layers.items():
        d = layer.delta().reshape(layer.shape[0], -1)
        s = torch.linalg.svdvals(d.double())
        best = torch.sqrt((s[3:] ** 2).sum() / (s ** 2).sum()).item()
        got = out[path].delta().reshape(layer.shape[0], -1)
        err = (torch.linalg.norm(d - got) / torch.linalg.norm(d)).item()
        assert err == pytest.approx(best, rel=1e-3, abs=1e-5)  # optimal rank-3 approximation
        assert rows.loc[path, "relative_error"] == pytest.approx(err, rel=1e-3, abs=1e-5)
        assert rows.loc[path, "retained_energy"] == pytest.approx(1 - best ** 2, rel=1e-4)
        assert rows.loc[path, "method"] == "svd"
    assert out["c"].down.shape == (3, 4, 3, 3) and out["c"].up.shape == (6, 3, 1, 1)


def test_convert_without_rank_keeps_the_full_numerical_rank():
    adapter = mixed_adapter()
    out, report = ak.convert(adapter, return_report=True)
    assert out["d"] is adapter["d"]  # LoRA kept as it is
    for path, layer in adapter.layers.items():
        torch.testing.assert_close(out[path].delta(), layer.delta(), rtol=1e-4, atol=1e-4)
    assert out["b"].rank <= 8  # kron of rank-3 and rank-2 factors has rank 6 at most, not min(12, 8)
    assert set(report["method"]) == {"kept", "exact-svd"}


def test_convert_refuses_what_has_no_lora_form():
    adapter = Adapter(layers={"x": IA3(vector=torch.ones(4)), "n": Full(diff=torch.ones(4), shape=(4,), module_type="norm"),
                              "ok": mixed_adapter()["a"]})
    with pytest.raises(UnsupportedError, match="2 layer") as e:
        ak.convert(adapter, kind="lora", rank=2)
    assert "IA3" in str(e.value) or "norm" in str(e.value)
    with pytest.raises(ConfigError):
        ak.convert(adapter, kind="loha")
    with pytest.raises(ConfigError):
        ak.convert(adapter, rank=0)


def test_plan_names_the_layers_and_why():
    adapter = mixed_adapter()
    reasons = plan(adapter, "peft")
    assert set(reasons) == {"a", "b", "c"}  # mixed kinds: everything but the LoRA layer
    assert "full" in reasons["c"]
    assert set(plan(adapter, "diffusers")) == {"a", "b", "c"}
    assert plan(adapter, "lycoris") == {}


def test_parse_spec():
    assert parse_spec("lycoris->peft") == ("lycoris", "peft")
    assert parse_spec(None, dst_format="kohya") == (None, "kohya")
    assert parse_spec("->diffusers") == (None, "diffusers")
    for bad in ("lycoris-peft", None):
        with pytest.raises(ConfigError):
            parse_spec(bad)
    with pytest.raises(ConfigError, match="contradicts"):
        parse_spec("kohya->peft", dst_format="diffusers")
    # a kind or rank conversion without a target stays in the source's format (None: decided after reading)
    assert parse_spec(None, same=True) == (None, None)
    with pytest.raises(ConfigError, match="--kind lora / --rank R"):
        parse_spec(None)
    assert isinstance(CONVERTERS, dict)


@pytest.fixture
def lyco(tmp_path):
    """A LyCORIS LoHa file and its base model saved as a safetensors directory."""
    path, base, applied, x = make_lycoris(tmp_path, algo="loha", linear_dim=2, linear_alpha=1)
    (tmp_path / "base").mkdir()
    save_file({k: v.contiguous() for k, v in base.state_dict().items()}, str(tmp_path / "base" / "model.safetensors"))
    return path, tmp_path / "base"


def test_cli_convert_lossless_and_lossy(tmp_path, lyco):
    src, base = lyco
    runner = CliRunner()
    r = runner.invoke(main, ["convert", "lycoris->peft", str(src), str(tmp_path / "peft"), "--base", str(base)])
    assert r.exit_code == 0, r.output
    assert "lossless" in r.output and (tmp_path / "peft" / "adapter_config.json").is_file()
    assert ak.load(tmp_path / "peft").kinds == {"loha"}
    # diffusers holds LoRA only: refused without --rank, nothing written, the layers named
    r = runner.invoke(main, ["convert", str(src), str(tmp_path / "d"), "--to", "diffusers", "--base", str(base)])
    assert r.exit_code == 1 and "--rank" in r.output and "blocks.0.conv_in" in r.output
    assert not (tmp_path / "d").exists()
    r = runner.invoke(main, ["convert", str(src), str(tmp_path / "p2"), "--from", "kohya", "--to", "peft", "--kind", "lora",
                             "--rank", "2", "--base", str(base), "--json"])
    assert r.exit_code == 0, r.output
    payload = json.loads(r.output)
    assert payload["lossless"] is False and len(payload["layers"]) == 6
    assert all(0 < row["retained_energy"] <= 1 and row["method"] == "svd" for row in payload["layers"])
    assert ak.load(tmp_path / "p2").kinds == {"lora"}
    # --kind lora without --to: a LoRA in the source's own format (a LyCORIS file here)
    r = runner.invoke(main, ["convert", str(src), str(tmp_path / "same.safetensors"), "--kind", "lora", "--base", str(base)])
    assert r.exit_code == 0, r.output
    same = ak.load(tmp_path / "same.safetensors", base=base)
    assert same.format == "kohya" and same.kinds == {"lora"}
    original = ak.load(src, base=base)
    for path, layer in same.layers.items():
        torch.testing.assert_close(layer.delta(), original.layers[path].delta(), rtol=1e-5, atol=1e-6)
    # an existing output is refused, then replaced with --overwrite
    args = ["convert", "lycoris->peft", str(src), str(tmp_path / "peft"), "--base", str(base)]
    assert runner.invoke(main, args).exit_code == 1
    assert runner.invoke(main, [*args, "--overwrite"]).exit_code == 0
    # a spec with the source format left out ('->peft', auto-detected) is an argument, not an option
    r = runner.invoke(main, ["convert", "->peft", str(src), str(tmp_path / "auto"), "--base", str(base)])
    assert r.exit_code == 0, r.output
    assert ak.load(tmp_path / "auto").kinds == {"loha"}
    r = runner.invoke(main, ["convert", "->peft", str(src), str(tmp_path / "typo"), "--rnak", "2"])
    assert r.exit_code == 1 and not (tmp_path / "typo").exists()
    assert r.stderr == "error: no such option '--rnak'; did you mean --rank? (see 'adaptkit convert --help')\n", r.output


def test_cli_convert_bad_inputs(tmp_path, lyco):
    src, base = lyco
    runner = CliRunner()
    for args, needle in (
        (["convert", "lycoris=>peft", str(src), str(tmp_path / "o")], "from->to"),
        (["convert", "lycoris->onnx", str(src), str(tmp_path / "o")], "unknown format"),
        (["convert", "lycoris->peft", str(src), str(tmp_path / "o")], "base"),  # names need the base model
        (["convert", "lycoris->peft", str(tmp_path / "missing.safetensors"), str(tmp_path / "o")], "neither"),
    ):
        r = runner.invoke(main, args)
        assert r.exit_code == 1, (args, r.output)
        assert needle in r.output and r.output.count("\n") == 1, r.output
        assert not (tmp_path / "o").exists()
    wrong = tmp_path / "wrong.safetensors"
    save_file({"lycoris_blocks_0_down_proj.lora_down.weight": torch.ones(2, 9),
               "lycoris_blocks_0_down_proj.lora_up.weight": torch.ones(12, 2)}, str(wrong))
    r = runner.invoke(main, ["convert", "lycoris->peft", str(wrong), str(tmp_path / "o"), "--base", str(base)])
    assert r.exit_code == 1 and "shape" in r.output and not (tmp_path / "o").exists()
    unknown = tmp_path / "unknown.safetensors"
    save_file({"some_model.weight": torch.ones(2)}, str(unknown))
    r = runner.invoke(main, ["convert", "kohya->peft", str(unknown), str(tmp_path / "o")])
    assert r.exit_code == 1 and "unknown key scheme" in r.output


def test_cli_subprocess_exit_code(tmp_path, lyco):
    from .conftest import run_cli_process

    src, base = lyco
    r = run_cli_process("convert", "lycoris->diffusers", str(src), str(tmp_path / "o"), "--base", str(base))
    assert r.returncode == 1 and r.stderr.startswith("error: ") and "Traceback" not in r.stderr
    assert not (tmp_path / "o").exists()
