"""The capability table (kinds × operations): docs/formats.md holds the generated copy, and its claims hold.

The table is built from the code's declarations (:mod:`adaptkit.capabilities`); these tests regenerate it and
compare with the docs, show that a kind registered from outside gets a row, and check the claims against what the
code does for the protocol samples of ``tests/test_kinds_protocol.py``: ``inject: exact`` layers give the fused
layer's outputs, ``unfuse`` / ``merge`` / ``convert to LoRA`` refuse exactly where the table says so, and every
``read``/``write`` of a format agrees with that format's ``can_store``.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import adaptkit as ak
from adaptkit.capabilities import (
    END,
    START,
    capability_markdown,
    capability_rows,
    capability_table,
    replace_between_markers,
)
from adaptkit.core.adapter import Adapter
from adaptkit.core.kinds import KINDS
from adaptkit.errors import UnsupportedError
from adaptkit.formats.registry import FORMATS

from .conftest import run_cli
from .test_architecture_kinds import ScaledIdentity
from .test_kinds_protocol import SAMPLES

DOC = Path(__file__).resolve().parents[1] / "docs" / "formats.md"


def test_docs_table_is_the_generated_one():
    text = DOC.read_text()
    assert START in text and END in text
    want = replace_between_markers(text, capability_markdown())
    assert text == want, "docs/formats.md's capability table is stale: run python scripts/doc_tables.py capabilities --write"


def test_frame_has_a_row_per_kind_and_a_column_pair_per_format():
    frame = capability_table()
    assert list(frame.index) == list(KINDS)
    for name in FORMATS:
        assert {f"read {name}", f"write {name}"} <= set(frame.columns)
    assert {"fuse", "unfuse", "merge", "convert to LoRA", "inject"} <= set(frame.columns)
    # spot checks of what the declarations give (not a copy of the table: each from a different declaration)
    assert frame.loc["lycoris_oft", "read kohya"] == "exact" and frame.loc["lycoris_oft", "read peft"] == "—"
    assert frame.loc["glora", "merge"].startswith("refused") and frame.loc["glora", "convert to LoRA"] == "needs base"
    assert frame.loc["loha", "unfuse"].startswith("exact") and frame.loc["ln_tuning", "inject"].startswith("refused")


def test_cli_kinds():
    res = run_cli("kinds", "--json")
    assert res.returncode == 0, res.stderr
    rows = json.loads(res.stdout)
    assert [r["kind"] for r in rows] == list(KINDS) and rows[0]["fuse"] == "exact"
    res = run_cli("kinds", "--markdown")
    assert res.returncode == 0 and res.stdout == capability_markdown()
    res = run_cli("kinds")
    assert res.returncode == 0 and "lycoris_oft" in res.stdout


def test_markers_are_required():
    with pytest.raises(ValueError, match="capabilities:start"):
        replace_between_markers("no markers here", "| table |")


def test_a_registered_kind_adds_a_row():
    assert "scaled_identity" not in KINDS
    ak.register_kind(ScaledIdentity)
    try:
        rows = {r["kind"]: r for r in capability_rows()}
        row = rows["scaled_identity"]
        assert row["class"] == "ScaledIdentity" and row["fuse"] == "exact" and row["unfuse"] == "exact"
        assert row["read peft"] == "—" and row["inject"] == "exact"
        assert "`scaled_identity`" in capability_markdown()
    finally:
        KINDS.pop("scaled_identity")
    assert "scaled_identity" not in capability_markdown()


# ------------------------------------------------------------------------------- the claims hold for samples


ROWS = {r["kind"]: r for r in capability_rows()}


def _module(layer) -> nn.Module | None:
    shape = tuple(layer.shape) if layer.shape is not None else None
    torch.manual_seed(0)
    if shape is None or layer.fan_in_fan_out:
        return None
    if layer.module_type == "embedding":
        return nn.Embedding(shape[0], shape[1])
    if layer.module_type == "conv" and len(shape) == 4:
        return nn.Conv2d(shape[1], shape[0], shape[2:], bias=True)
    if layer.module_type == "linear" and len(shape) == 2:
        return nn.Linear(shape[1], shape[0], bias=True)
    return None


def _reference(mod: nn.Module, layer, x: torch.Tensor) -> torch.Tensor:
    w, b = layer.apply(mod.weight, getattr(mod, "bias", None))
    if isinstance(mod, nn.Embedding):
        return F.embedding(x, w)
    if isinstance(mod, nn.Conv2d):
        return F.conv2d(x, w, b)
    return F.linear(x, w, b)


@pytest.mark.parametrize("name", list(SAMPLES))
def test_inject_claim(name):
    layer = SAMPLES[name]()
    mod = _module(layer)
    claim = ROWS[layer.kind]["inject"]
    if mod is None:
        if claim.startswith("refused"):  # a norm / experts layer: nothing for the wrapper to wrap
            assert layer.module_type not in ("linear", "conv", "embedding")
        return
    assert claim == "exact", claim
    torch.manual_seed(1)
    if isinstance(mod, nn.Embedding):
        x = torch.randint(0, mod.num_embeddings, (3, 4))
    elif isinstance(mod, nn.Conv2d):
        x = torch.randn(2, mod.in_channels, 5, 5)
    else:
        x = torch.randn(3, mod.in_features)
    root = nn.ModuleDict({"m": copy.deepcopy(mod)})
    with torch.no_grad():
        want = _reference(mod, layer, x)
        ak.inject(root, Adapter(layers={"m": layer}))
        got = root["m"](x)
    torch.testing.assert_close(got, want.to(got.dtype), rtol=1e-5, atol=1e-5)


def _raises(fn) -> bool:
    try:
        fn()
    except UnsupportedError:
        return True
    return False


@pytest.mark.parametrize("name", list(SAMPLES))
def test_unfuse_merge_and_lora_claims(name):
    layer = SAMPLES[name]()
    row = ROWS[layer.kind]
    # unfuse subtracts additive layers (ops.fuse refuses the others); DoRA layers are refused where the row says so
    if layer.dora:
        assert "DoRA layers refused" in row["unfuse"]
    else:
        assert row["unfuse"].startswith("exact") == layer.additive
    # merge: through the delta, in the kind's own parameters, or refused
    if row["merge"].startswith("refused"):
        assert not layer.has_delta and _raises(lambda: type(layer).weighted_sum([layer, layer], [0.5, 0.5]))
    elif layer.has_delta:
        assert row["merge"].startswith("exact")
    else:
        assert not _raises(lambda: type(layer).weighted_sum([layer, layer], [0.5, 0.5]))
    # convert to LoRA: "needs base" exactly where the layer names an obstacle (DoRA layers noted per row)
    if row["convert to LoRA"] == "needs base":
        assert layer.lora_obstacle() is not None
    elif layer.lora_obstacle() is not None:
        assert layer.dora and "DoRA" in row["convert to LoRA"]


@pytest.mark.parametrize("name", list(SAMPLES))
def test_write_claims_agree_with_can_store(name):
    layer = SAMPLES[name]()
    row = ROWS[layer.kind]
    for fname, fmt in FORMATS.items():
        why = fmt.can_store(layer, "m")
        cell = row[f"write {fname}"]
        if cell == "—":
            assert why is not None, (fname, name)
        elif cell == "exact":
            assert why is None, (fname, name, why)
        else:  # "exact, limited": this layer may be one of those refused, with a reason
            assert cell == "exact, limited"
