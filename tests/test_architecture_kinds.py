"""The kinds own their math: no kind is tested by name or class outside ``adaptkit/core/kinds``, and a kind
defined here (not in the library) works through fuse, merge, convert, inject, status and analysis once
registered with ``ak.register_kind``.

The toy kind is a scaled identity, ``dW = s * I`` (``I`` the ``(out, in)`` matrix with ones on the diagonal):
the smallest real additive kind. It subclasses ``DeltaMixin`` (which derives the protocol from
``delta_math()``) and implements only ``delta_math`` and ``to_lora``.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import adaptkit as ak
from adaptkit.core.adapter import Adapter
from adaptkit.core.kinds import KINDS, LoRA
from adaptkit.core.kinds.common import DeltaMixin
from adaptkit.core.kinds.lora import dense_to_lora
from adaptkit.formats.peft_layers import PEFT_NAMES

ROOT = Path(ak.__file__).parent
#: a kind tested by class or by name: isinstance(x, LoRA) / (LoRA, IA3) ..., x.kind == / != / in
KIND_TEST = re.compile(r"isinstance\([^)]*, *\(?(LoRA|LoHa|LoKr|IA3|Full|Replace)\b|\.kind *(==|!=|in\b)")
#: a protocol member read with a default (the protocol has no optional members)
GETATTR_DEFAULT = re.compile(r"getattr\([^,]+, *\"(magnitude|magnitude_axis|fan_in_fan_out|mid|rslora|module_type|"
                             r"scale_bias|on_input|diff_b|alpha|rank|scale|t1|t2|shape|vector)\"")


def scan(text: str) -> list[str]:
    """The lines of a source text that test a kind by name or class, or read a layer attribute with a default."""
    return [line.strip() for line in text.splitlines() if KIND_TEST.search(line) or GETATTR_DEFAULT.search(line)]


def _violations() -> dict[str, list[str]]:
    found = {}
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        if rel.startswith("core/kinds/"):
            continue
        hits = scan(path.read_text())
        if hits:
            found[rel] = hits
    return found


def test_no_kind_tests_outside_core_kinds():
    found = _violations()
    assert not found, found


def test_the_scan_finds_a_planted_violation(tmp_path):
    planted = "def f(layer):\n    if isinstance(layer, LoRA):\n        return 1\n    return layer.kind == 'ia3'\n"
    planted += "m = getattr(layer, \"magnitude\", None)\nok = isinstance(layer, Adapter)\n"
    assert len(scan(planted)) == 3
    assert scan("if isinstance(l, (LoHa, LoKr)) and x:\n") and not scan("layer.kind + ' bias'\n")


# ---------------------------------------------------------------------------------------------- the toy kind


@dataclass(frozen=True, eq=False, repr=False)
class ScaledIdentity(DeltaMixin):
    """``dW = s * I``: every input feature ``i`` adds ``s * x_i`` to output ``i``."""

    s: torch.Tensor  # a 1-element tensor, so the layer has a dtype and a finiteness check like any other
    shape: tuple[int, ...]

    kind: ClassVar[str] = "scaled_identity"
    fan_in_fan_out: ClassVar[bool] = False
    module_type: ClassVar[str] = "linear"
    rank: ClassVar[None] = None
    alpha: ClassVar[None] = None
    scale: ClassVar[float] = 1.0

    def delta_math(self) -> torch.Tensor:
        return self.s.float().reshape(()) * torch.eye(*self.shape)

    def to_lora(self, rank):
        return dense_to_lora(self, rank)

    def settings(self) -> dict:
        return {"size": self.shape[0]}  # what a file needs besides s: the (square) weight's size

    @classmethod
    def from_parts(cls, parts, *, shape, settings):
        n = int(settings["size"])
        return cls(s=parts["s"], shape=(n, n))


@pytest.fixture
def toy():
    ak.register_kind(ScaledIdentity)
    yield ScaledIdentity
    KINDS.pop("scaled_identity")


@pytest.fixture
def toy_with_peft_names():
    """The toy kind registered with its PEFT names (``<module>.toy_s``, peft_type ``SCALED_IDENTITY``, ``toy_size``)."""
    ak.register_kind(ScaledIdentity, peft={"peft_type": "SCALED_IDENTITY", "parts": {"toy_s": "s"},
                                          "settings": {"toy_size": "size"}})
    yield ScaledIdentity
    KINDS.pop("scaled_identity")
    PEFT_NAMES.pop("scaled_identity")


def _toy(value: float, n: int = 6) -> ScaledIdentity:
    return ScaledIdentity(s=torch.tensor([value]), shape=(n, n))


def _lora(n: int = 6, seed: int = 0) -> LoRA:
    g = torch.Generator().manual_seed(seed)
    return LoRA(down=torch.randn(2, n, generator=g), up=torch.randn(n, 2, generator=g), alpha=2.0, shape=(n, n))


def test_register_kind_refuses_a_class_without_the_protocol():
    @dataclass(frozen=True)
    class Half:
        kind: ClassVar[str] = "half"

    with pytest.raises(ak.ConfigError, match="lacks the layer protocol methods"):
        ak.register_kind(Half)
    assert "half" not in KINDS


def test_toy_kind_fuses_into_a_safetensors_base(toy, tmp_path):
    base = {"model.proj.weight": torch.randn(6, 6), "model.proj.bias": torch.randn(6), "model.other.weight": torch.randn(3, 6)}
    save_file(base, tmp_path / "base.safetensors")
    adapter = Adapter(layers={"model.proj": _toy(0.5)})
    ak.fuse(tmp_path / "base.safetensors", adapter, tmp_path / "fused.safetensors", weights=[2.0])
    fused = load_file(tmp_path / "fused.safetensors")
    torch.testing.assert_close(fused["model.proj.weight"], base["model.proj.weight"] + torch.eye(6))
    assert torch.equal(fused["model.proj.bias"], base["model.proj.bias"])
    assert torch.equal(fused["model.other.weight"], base["model.other.weight"])
    ak.unfuse(tmp_path / "fused.safetensors", adapter, tmp_path / "back.safetensors", weights=[2.0])
    torch.testing.assert_close(load_file(tmp_path / "back.safetensors")["model.proj.weight"], base["model.proj.weight"])


def test_toy_kind_merges_through_its_delta_with_a_lora(toy):
    a = Adapter(layers={"m.proj": _toy(0.25)})
    b = Adapter(layers={"m.proj": _lora()})
    merged = ak.merge([a, b], weights=[1.0, 0.5], method="task_arithmetic", rank=6)
    want = 0.25 * torch.eye(6) + 0.5 * b.layers["m.proj"].delta()
    torch.testing.assert_close(merged.layers["m.proj"].delta(), want, rtol=1e-4, atol=1e-5)
    with pytest.raises(ak.ConfigError, match="rank"):  # no LoRA factors: the exact sum needs a rank
        ak.merge([a, b], method="task_arithmetic")


def test_toy_kind_converts_to_lora(toy):
    adapter = Adapter(layers={"m.proj": _toy(-1.5)})
    lora, report = ak.convert(adapter, "lora", None, return_report=True)
    layer = lora.layers["m.proj"]
    assert isinstance(layer, LoRA) and layer.rank == 6
    torch.testing.assert_close(layer.delta(), -1.5 * torch.eye(6), rtol=1e-5, atol=1e-5)
    assert report["source_kind"].tolist() == ["scaled_identity"] and report["method"].tolist() == ["exact-svd"]
    small, report = ak.convert(adapter, "lora", 3, return_report=True)
    assert small.layers["m.proj"].rank == 3 and report["retained_energy"].iloc[0] == pytest.approx(0.5)


def test_toy_kind_injects_with_status(toy):
    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("proj", nn.Linear(6, 6))
    x = torch.randn(3, 6)
    before = model(x)
    ak.inject(model, Adapter(layers={"proj": _toy(0.5)}))
    torch.testing.assert_close(model(x), before + 0.5 * x)
    live = ak.layer_status(model)
    assert live["active_adapters"].tolist() == [["default"]]
    assert ak.model_status(model)["merged_adapters"][0] == []
    static = ak.layer_status(Adapter(layers={"proj": _toy(0.5)}))
    assert static["kind"].tolist() == ["scaled_identity"]
    assert static["delta_norm"].iloc[0] == pytest.approx(0.5 * math.sqrt(6))
    ak.merge_adapters(model, "default")
    torch.testing.assert_close(model(x), before + 0.5 * x)


def test_toy_kind_analysis_and_comparison(toy):
    a = Adapter(layers={"m.proj": _toy(0.5)})
    b = Adapter(layers={"m.proj": _toy(-2.0)})
    table = ak.analyze(a)
    row = table.iloc[0]
    assert row["kind"] == "scaled_identity" and row["fro_norm"] == pytest.approx(0.5 * math.sqrt(6))
    assert row["rank_99"] == 6 and row["method"] == "dense"
    layers = ak.compare({"a": a, "b": b})  # the per-layer table
    assert layers["cosine"].iloc[0] == pytest.approx(-1.0)
    assert layers["norm_b"].iloc[0] == pytest.approx(2.0 * math.sqrt(6))


def test_lora_on_a_grouped_conv_takes_the_dense_path():
    conv = nn.Conv2d(4, 4, 3, groups=2, padding=1)
    g = torch.Generator().manual_seed(1)
    layer = LoRA(down=torch.randn(2, 2, 3, 3, generator=g), up=torch.randn(4, 2, 1, 1, generator=g), alpha=2.0,
                 shape=(4, 2, 3, 3), module_type="conv")
    model = nn.Sequential()
    model.add_module("conv", conv)
    x = torch.randn(1, 4, 5, 5)
    want = nn.functional.conv2d(x, conv.weight + layer.delta(), conv.bias, padding=1, groups=2)
    ak.inject(model, Adapter(layers={"conv": layer}))
    torch.testing.assert_close(model(x), want, rtol=1e-4, atol=1e-5)


def test_toy_kind_end_to_end_from_a_state_dict(toy_with_peft_names, tmp_path):
    """One registration, no library edit: a PEFT-named state dict loads, fuses, merges, converts, reports."""
    sd = {"base_model.model.model.proj.toy_s": torch.tensor([0.5])}
    adapter = ak.load(_save_peft_dir(tmp_path / "toy", sd, size=6))
    layer = adapter.layers["model.proj"]
    assert isinstance(layer, ScaledIdentity) and layer.shape == (6, 6) and adapter.kinds == {"scaled_identity"}
    again = ak.load(ak.save(adapter, tmp_path / "written"))  # written back through the same table row
    assert json.loads((tmp_path / "written" / "adapter_config.json").read_text())["toy_size"] == 6
    torch.testing.assert_close(again.layers["model.proj"].delta(), 0.5 * torch.eye(6))

    base = {"model.proj.weight": torch.randn(6, 6), "model.proj.bias": torch.randn(6)}
    save_file(base, tmp_path / "base.safetensors")
    ak.fuse(tmp_path / "base.safetensors", adapter, tmp_path / "fused.safetensors")
    fused = load_file(tmp_path / "fused.safetensors")
    torch.testing.assert_close(fused["model.proj.weight"], base["model.proj.weight"] + 0.5 * torch.eye(6))

    lora = Adapter(layers={"model.proj": _lora()})
    merged = ak.merge([adapter, lora], weights=[2.0, 1.0], method="task_arithmetic", rank=6)
    torch.testing.assert_close(merged.layers["model.proj"].delta(), torch.eye(6) + lora.layers["model.proj"].delta(),
                               rtol=1e-4, atol=1e-5)
    converted = ak.convert(adapter, "lora")
    torch.testing.assert_close(converted.layers["model.proj"].delta(), 0.5 * torch.eye(6), rtol=1e-5, atol=1e-5)
    assert ak.layer_status(adapter)["delta_norm"].iloc[0] == pytest.approx(0.5 * math.sqrt(6))
    assert ak.analyze(adapter).iloc[0]["fro_norm"] == pytest.approx(0.5 * math.sqrt(6))


def _save_peft_dir(path: Path, tensors: dict[str, torch.Tensor], size: int) -> Path:
    """A PEFT directory for the toy kind, as another tool would write it."""
    path.mkdir()
    save_file(tensors, path / "adapter_model.safetensors")
    config = {"peft_type": "SCALED_IDENTITY", "target_modules": ["proj"], "toy_size": size}
    (path / "adapter_config.json").write_text(json.dumps(config))
    return path
