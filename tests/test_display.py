"""What a notebook shows: layers as one concise line (never tensor values), an Adapter as an HTML summary and a
bounded, escaped layer table; and the HTML report's layer table stays reachable however wide it is."""

from __future__ import annotations

import re

import pytest
import torch

import adaptkit as ak
import adaptkit.core.kinds.base  # noqa: F401  (ak.core.kinds below)
from adaptkit.core.adapter import HTML_MAX_LAYERS
from adaptkit.demo import example

g = torch.Generator().manual_seed(0)


def _layers() -> dict[str, object]:
    return {
        "lora": ak.LoRA(down=torch.randn(8, 96, generator=g), up=torch.randn(64, 8, generator=g), alpha=16.0,
                        shape=(64, 96), rslora=True),
        "dora": ak.LoRA(down=torch.randn(4, 32), up=torch.randn(32, 4), alpha=4.0, shape=(32, 32),
                        magnitude=torch.ones(32)),
        "conv": ak.LoRA(down=torch.randn(2, 3, 3, 3), up=torch.randn(5, 2, 1, 1), alpha=1.0, shape=(5, 3, 3, 3),
                        module_type="conv"),
        "loha": ak.LoHa(w1a=torch.randn(64, 4), w1b=torch.randn(4, 96), w2a=torch.randn(64, 4),
                        w2b=torch.randn(4, 96), alpha=2.0, shape=(64, 96)),
        "lokr": ak.LoKr(alpha=1.0, rank=2, shape=(64, 96), w1=torch.randn(8, 8), w2a=torch.randn(8, 2),
                        w2b=torch.randn(2, 12)),
        "ia3": ak.IA3(vector=torch.ones(96, dtype=torch.float16), on_input=True, shape=(64, 96)),
        "full": ak.Full(diff=torch.randn(64, 96, dtype=torch.bfloat16), shape=(64, 96)),
    }


EXPECTED = {
    "lora": "LoRA(shape=(64, 96), rank=8, alpha=16, scale=5.65685, dtype=float32, rslora=True; down (8, 96), up (64, 8))",
    "dora": "LoRA(shape=(32, 32), rank=4, alpha=4, scale=1, dtype=float32; down (4, 32), up (32, 4), magnitude (32,))",
    "conv": ("LoRA(shape=(5, 3, 3, 3), rank=2, alpha=1, scale=0.5, dtype=float32, module_type='conv'; "
             "down (2, 3, 3, 3), up (5, 2, 1, 1))"),
    "ia3": "IA3(shape=(64, 96), dtype=float16, on_input=True; vector (96,))",
    "full": "Full(shape=(64, 96), dtype=bfloat16; diff (64, 96))",
}


@pytest.mark.parametrize("name", list(_layers()))
def test_layer_repr_is_one_concise_line(name):
    layer = _layers()[name]
    text = repr(layer)
    assert "tensor(" not in text and "\n" not in text and len(text) < 200, text
    assert text.startswith(type(layer).__name__ + "(shape="), text
    for t in ak.core.kinds.tensor_fields(layer).values():
        assert str(tuple(t.shape)) in text, text
    if name in EXPECTED:
        assert text == EXPECTED[name]
    if layer.rank is not None:
        assert f"rank={layer.rank}" in text and f"alpha={layer.alpha:g}" in text


def test_every_kind_uses_the_shared_repr():
    from adaptkit.core.kinds.base import layer_repr

    for cls in ak.KINDS.values():
        assert cls.__repr__ is ak.core.kinds.base.LayerRepr.__repr__, cls
    assert repr(_layers()["loha"]) == layer_repr(_layers()["loha"])


def test_adapter_html_summary_and_table():
    a = ak.load(example("dora_style"))
    page = a._repr_html_()
    assert "<table>" in page and "tensor(" not in page
    for text in ("4 (lora: 4)", "peft", "adaptkit-examples/tiny-llama", "float32", "lora (dora)", "magnitude 64",
                 "model.layers.0.self_attn.q_proj"):
        assert text in page, text
    assert page.count("<tr>") == 8 + 1 + 4  # 8 summary rows, the header, 4 layers


def test_adapter_html_is_escaped_and_bounded():
    layer = ak.LoRA(down=torch.zeros(1, 4), up=torch.zeros(4, 1), alpha=1.0, shape=(4, 4))
    layers = {f"blocks.{i}.<script>alert(1)</script>": layer for i in range(3000)}
    a = ak.Adapter(layers=layers, base_model="<b>base</b>", source="a&b")
    page = a._repr_html_()
    assert "<script>" not in page and "&lt;script&gt;" in page and "<b>base" not in page and "a&amp;b" in page
    assert len(re.findall(r"blocks\.\d+\.", page)) == HTML_MAX_LAYERS
    assert f"{3000 - HTML_MAX_LAYERS} more layers" in page and len(page) < 60_000


def test_report_layer_table_scrolls_and_wraps():
    """A table wider than the page (the layer table passes 1400 px) is reachable: its box scrolls both ways inside
    the viewport with the header kept in view, and long module names wrap instead of widening every row."""
    pytest.importorskip("matplotlib")
    from adaptkit.analysis.layers import analyze_adapter
    from adaptkit.analysis.report import analysis_html

    page = analysis_html(analyze_adapter(example("lora_math")))
    css = page.split("<style>", 1)[1].split("</style>", 1)[0]
    rules = {sel.strip(): body for sel, body in re.findall(r"([^{}]+)\{([^}]*)\}", css)}
    box = rules[".wide"]
    assert "overflow:auto" in box and "max-height" in box, box
    assert "position:sticky" in rules[".wide th"]
    assert "overflow-wrap:anywhere" in rules[".wide td:first-child"]
    layers = page.split("<h2>Layers</h2>", 1)[1]
    assert re.search(r'<div class="wide"><table[^>]*>.*?<th>module</th>.*?<th>note</th>', layers, re.S), layers[:600]
