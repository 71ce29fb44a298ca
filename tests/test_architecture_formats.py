"""The format seams are real: a kind and a format defined in this file plug in through the public registries.

* A toy kind (a per-feature scaled identity, ``delta = gain * diag(s)``) registered with
  ``ak.register_kind(cls, peft=...)`` loads from a PEFT state dict and a PEFT directory, is written back by the
  PEFT writer from ``layer.parts()`` and reads again, without any library file knowing the kind.
* A toy format registered with ``ak.register_format`` is detected by ``ak.load``, written by ``ak.save`` and
  reached by ``convert`` (the API and the CLI), and reads state dicts in memory.
* No format capability table lives outside ``adaptkit/formats/`` (a source scan, checked on a planted violation).
"""

from __future__ import annotations

import ast
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import adaptkit as ak
from adaptkit.core.kinds.common import DeltaMixin
from adaptkit.core.kinds.lora import dense_to_lora
from adaptkit.core import kinds as core_kinds
from adaptkit.formats import FORMATS
from adaptkit.formats import registry as format_registry
from adaptkit.formats import state_dict as sd_format
from adaptkit.formats.peft_layers import PEFT_NAMES

from .conftest import run_cli

ROOT = Path(__file__).resolve().parents[1] / "adaptkit"


@pytest.fixture
def registries():
    """Restore the kind, PEFT-name and format tables after a test registered into them."""
    saved = [(table, dict(table)) for table in (core_kinds.KINDS, PEFT_NAMES, format_registry.FORMATS,
                                                 format_registry.ALIASES)]
    yield
    for table, copy in saved:
        table.clear()
        table.update(copy)


# ------------------------------------------------------------------------------------------- toy kind


@dataclass(frozen=True, eq=False, repr=False)
class ScaledIdentity(DeltaMixin):
    """A toy kind: scales each output feature of a square weight, ``delta = gain * diag(s)``.

    ``DeltaMixin`` derives the layer protocol from ``delta_math()`` (``parts()``/``settings()`` from the fields);
    ``from_parts`` takes the shape from ``s`` when the file gives none.
    """

    s: torch.Tensor
    shape: tuple[int, ...]
    gain: float = 1.0
    kind: ClassVar[str] = "toy_scaled_identity"
    fan_in_fan_out: ClassVar[bool] = False
    module_type: ClassVar[str] = "linear"
    rank: ClassVar[None] = None
    alpha: ClassVar[None] = None
    scale: ClassVar[float] = 1.0

    def delta_math(self) -> torch.Tensor:
        return self.gain * torch.diag(self.s.float())

    def to_lora(self, rank):
        return dense_to_lora(self, rank)

    @classmethod
    def from_parts(cls, parts: dict[str, torch.Tensor], *, shape: tuple[int, ...] | None,
                   settings: dict[str, Any]) -> ScaledIdentity:
        s = parts["s"].flatten()
        return cls(s=s, shape=tuple(shape) if shape else (s.numel(), s.numel()), gain=float(settings.get("gain", 1.0)))


TOY_PEFT = {"peft_type": "TOY_SCALED_IDENTITY", "parts": {"toy_s": "s"}, "settings": {"toy_gain": "gain"}}


@pytest.fixture
def toy_kind(registries):
    ak.register_kind(ScaledIdentity, peft=TOY_PEFT)
    return ScaledIdentity


def test_kohya_state_dict_is_read_in_memory(tmp_path, monkeypatch):
    """A kohya-named dict goes to kohya's read_tensors directly (it used to be written to a temporary file)."""
    g = torch.Generator().manual_seed(0)
    sd = {"lycoris_blocks_0_q.lora_down.weight": torch.randn(2, 5, generator=g),
          "lycoris_blocks_0_q.lora_up.weight": torch.randn(6, 2, generator=g),
          "lycoris_blocks_0_q.alpha": torch.tensor(4.0)}
    _no_temporary_files(monkeypatch)
    adapter = sd_format.from_state_dict(sd, base={"": {"blocks.0.q": (6, 5)}})
    assert adapter.format == "kohya" and adapter.source == "state_dict"
    assert adapter.layers["blocks.0.q"].alpha == 4.0


def test_toy_kind_loads_from_a_state_dict_and_round_trips_through_peft(toy_kind, tmp_path):
    s0, s1 = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0.5, -1.0, 4.0])
    # as model.state_dict() names it (adapter name inside the key), and with the PEFT file prefix
    sd = {"model.layers.0.q_proj.toy_s.default": s0, "base_model.model.model.layers.1.q_proj.toy_s": s1}
    adapter = sd_format.from_state_dict(sd, config={"peft_type": "TOY_SCALED_IDENTITY", "toy_gain": 2.0})
    layer = adapter.layers["model.layers.0.q_proj"]
    assert isinstance(layer, ScaledIdentity) and layer.shape == (3, 3) and layer.gain == 2.0
    torch.testing.assert_close(layer.delta(), 2.0 * torch.diag(s0))
    assert set(adapter.layers) == {"model.layers.0.q_proj", "model.layers.1.q_proj"}

    out = ak.save(adapter, tmp_path / "peft")
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "TOY_SCALED_IDENTITY" and cfg["toy_gain"] == 2.0
    assert cfg["target_modules"] == ["model.layers.0.q_proj", "model.layers.1.q_proj"]
    tensors = load_file(str(out / "adapter_model.safetensors"))
    assert set(tensors) == {"base_model.model.model.layers.0.q_proj.toy_s", "base_model.model.model.layers.1.q_proj.toy_s"}

    again = ak.load(out)
    assert again.format == "peft" and again.kinds == {"toy_scaled_identity"}
    for path, original in adapter.layers.items():
        torch.testing.assert_close(again.layers[path].s, original.s)
        assert again.layers[path].gain == original.gain
    third = ak.load(ak.save(again, tmp_path / "peft2"))  # written back from what was read: the same files
    assert load_file(str(tmp_path / "peft2" / "adapter_model.safetensors")).keys() == tensors.keys()
    assert third.layers["model.layers.1.q_proj"].gain == 2.0


def test_toy_kind_limits_come_from_can_store(toy_kind, tmp_path):
    a = ScaledIdentity(s=torch.ones(2), shape=(2, 2), gain=1.0)
    b = ScaledIdentity(s=torch.ones(2), shape=(2, 2), gain=3.0)
    mixed = ak.Adapter(layers={"x": a, "y": b})
    with pytest.raises(ak.UnsupportedError, match=r"one gain per adapter"):  # one config field for all layers
        ak.save(mixed, tmp_path / "never")
    assert not (tmp_path / "never").exists()
    one = ak.Adapter(layers={"x": a})
    from adaptkit.ops.convert import plan

    assert plan(one, "peft") == {}
    assert plan(one, "kohya") == {"x": "kohya has no toy_scaled_identity layers"}  # kohya has no names for it
    with pytest.raises(ak.UnsupportedError, match="kohya has no toy_scaled_identity layers.*format='peft'"):
        ak.save(one, tmp_path / "k.safetensors", format="kohya")


def test_peft_names_registration_refuses_clashes(registries):
    with pytest.raises(ak.ConfigError, match="belongs to kind 'lora'"):
        ak.register_peft_names("toy2", peft_type="TOY2", parts={"lora_A.weight": "a"})
    with pytest.raises(ak.ConfigError, match="peft_type 'LORA' belongs to kind 'lora'"):
        ak.register_peft_names("toy2", peft_type="LORA", parts={"toy2_x": "x"})
    with pytest.raises(ak.ConfigError, match="not a plain name"):
        ak.register_peft_names("toy2", peft_type="TOY2", parts={"toy2 x": "x"})


# ----------------------------------------------------------------------------------------- toy format


class ToyFormat:
    """A toy format: one ``.toyad`` safetensors file, keys ``toy/<module>/down|up``, alphas in the metadata."""

    NAME = "toyfmt"
    LABEL = "toy"
    LOOKED_FOR = "one .toyad file"
    ALLOW_PATTERNS = ("*.toyad",)
    WRITE_OPTIONS: tuple[str, ...] = ()

    def detect(self, path: Path) -> bool:
        if path.is_dir():
            found = sorted(path.glob("*.toyad"))
            path = found[0] if len(found) == 1 else path
        return path.is_file() and path.suffix == ".toyad"

    def detect_keys(self, keys) -> bool:
        return bool(keys) and all(k.startswith("toy/") for k in keys)

    def is_adapter_file(self, name: str) -> bool:
        return name.endswith(".toyad")

    def select_files(self, listing, named=None):
        from adaptkit.formats.base import Selection

        files = [n for n in listing if self.is_adapter_file(n)]
        return Selection((files[0],), files[0]) if named is None and len(files) == 1 else None

    def read_tensors(self, tensors, metadata=None, config=None, *, source=None, **_):
        alphas = json.loads((metadata or {}).get("toy_alphas", "{}"))
        modules = sorted({k.split("/")[1] for k in tensors})
        layers = {}
        for m in modules:
            down, up = tensors[f"toy/{m}/down"], tensors[f"toy/{m}/up"]
            layers[m] = ak.LoRA(down=down, up=up, alpha=float(alphas.get(m, down.shape[0])),
                                shape=(up.shape[0], down.shape[1]))
        return ak.Adapter(layers=layers, metadata=dict(metadata or {}), format=self.NAME, source=source)

    def read(self, path: Path, *, source=None, **_):
        path = Path(path)
        if path.is_dir():
            path = min(path.glob("*.toyad"))
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
        return self.read_tensors(load_file(str(path)), metadata, source=source or str(path))

    def can_store(self, layer, module: str) -> str | None:
        if layer.kind != "lora":
            return f"toyfmt has no {layer.kind} layers"
        if layer.mid is not None or layer.magnitude is not None or layer.bias is not None or layer.fan_in_fan_out:
            return "toyfmt holds plain linear LoRA only"
        return None

    def can_name(self, module: str) -> str | None:
        return "toyfmt keys cannot hold '/'" if "/" in module else None

    def can_store_adapter(self, adapter, **_) -> dict[str, str]:
        return {k: "toyfmt holds no extra tensors" for k in adapter.extras}

    def check_options(self, **_) -> None:
        pass

    def write(self, adapter, path, *, overwrite=False, **_) -> Path:
        path = Path(path)
        tensors = {}
        for m, layer in adapter.layers.items():
            tensors[f"toy/{m}/down"] = layer.down.contiguous()
            tensors[f"toy/{m}/up"] = layer.up.contiguous()
        alphas = {m: layer.alpha for m, layer in adapter.layers.items()}
        save_file(tensors, str(path), {"toy_alphas": json.dumps(alphas)})
        return path


def _lora(seed: int, out: int = 6, inp: int = 5, r: int = 2) -> ak.LoRA:
    g = torch.Generator().manual_seed(seed)
    return ak.LoRA(down=torch.randn(r, inp, generator=g), up=torch.randn(out, r, generator=g), alpha=3.0, shape=(out, inp))


def _loha(seed: int) -> ak.LoHa:
    g = torch.Generator().manual_seed(seed)
    return ak.LoHa(w1a=torch.randn(6, 2, generator=g), w1b=torch.randn(2, 5, generator=g),
                   w2a=torch.randn(6, 2, generator=g), w2b=torch.randn(2, 5, generator=g), alpha=2.0, shape=(6, 5))


@pytest.fixture
def toy_format(registries):
    return ak.register_format(ToyFormat(), aliases=("toy",))


def _no_temporary_files(monkeypatch):
    def refuse(*_, **__):
        raise AssertionError("state dicts are read in memory; no temporary file")

    for name in ("TemporaryDirectory", "NamedTemporaryFile", "mkdtemp", "mkstemp"):
        monkeypatch.setattr(tempfile, name, refuse)


def test_toy_format_load_save_and_state_dict(toy_format, tmp_path, monkeypatch):
    adapter = ak.Adapter(layers={"blocks.0.q": _lora(0), "blocks.1.q": _lora(1)})
    written = ak.save(adapter, tmp_path / "a.toyad", format="toy")
    assert set(load_file(str(written))) == {"toy/blocks.0.q/down", "toy/blocks.0.q/up", "toy/blocks.1.q/down",
                                            "toy/blocks.1.q/up"}
    loaded = ak.load(written)  # detected: the table asks every registered format
    assert loaded.format == "toyfmt" and set(loaded.layers) == set(adapter.layers)
    torch.testing.assert_close(loaded.layers["blocks.1.q"].delta(), adapter.layers["blocks.1.q"].delta())
    # a state dict in the toy format's names is read in memory by its read_tensors (no file in between)
    tensors = load_file(str(written))
    _no_temporary_files(monkeypatch)
    from_sd = sd_format.from_state_dict(tensors)
    assert from_sd.source == "state_dict" and set(from_sd.layers) == set(adapter.layers)
    monkeypatch.undo()
    # what it cannot store is refused with its own reason, nothing written
    with pytest.raises(ak.UnsupportedError, match=r"toy cannot store .*toyfmt has no loha layers.*format='peft'"):
        ak.save(ak.Adapter(layers={"x": _loha(2)}), tmp_path / "b.toyad", format="toyfmt")
    with pytest.raises(ak.UnsupportedError, match="toyfmt keys cannot hold '/'"):
        ak.save(ak.Adapter(layers={"a/b": _lora(3)}), tmp_path / "c.toyad", format="toyfmt")
    assert not (tmp_path / "b.toyad").exists() and not (tmp_path / "c.toyad").exists()
    with pytest.raises(ak.ConfigError, match="naming .* applies to kohya output only, not toyfmt"):
        ak.save(adapter, tmp_path / "d.toyad", format="toyfmt", naming="ldm")
    with pytest.raises(ak.ConfigError, match="taken by toyfmt"):
        ak.register_format(ToyFormat())  # another object under the same name
    ak.register_format(toy_format)  # the same one again is fine


def test_toy_format_reached_by_convert(toy_format, tmp_path):
    from adaptkit.ops.convert import convert_checkpoint, plan

    src = ak.save(ak.Adapter(layers={"blocks.0.q": _loha(0), "blocks.1.q": _loha(1)}), tmp_path / "loha")
    assert plan(ak.load(src), "toyfmt") == {p: "toyfmt has no loha layers" for p in ("blocks.0.q", "blocks.1.q")}
    with pytest.raises(ak.UnsupportedError, match=r"cannot be written as toyfmt without loss.*--rank"):
        convert_checkpoint("peft->toyfmt", src, tmp_path / "never.toyad")
    result = convert_checkpoint("peft->toy", src, tmp_path / "out.toyad", rank=3)
    assert result.target_format == "toyfmt" and set(result.report["method"]) == {"svd"}
    assert ak.load(tmp_path / "out.toyad").kinds == {"lora"}
    r = run_cli("convert", "toyfmt->peft", str(tmp_path / "out.toyad"), str(tmp_path / "back"))
    assert r.returncode == 0, r.stderr
    assert ak.load(tmp_path / "back").format == "peft"


# -------------------------------------------------------------------------- capability stays in formats/

FORMAT_NAMES = frozenset({"peft", "kohya", "lycoris", "diffusers"})
KIND_NAMES = frozenset({"lora", "loha", "lokr", "ia3", "full", "norm", "dora"})


def _strings(node: ast.AST) -> list[str]:
    if isinstance(node, ast.Call) and getattr(node.func, "id", None) in ("set", "frozenset", "tuple", "list") and node.args:
        node = node.args[0]
    if isinstance(node, (ast.Set, ast.Tuple, ast.List)):
        return [e.value for e in node.elts if isinstance(e, ast.Constant) and isinstance(e.value, str)]
    return []


def capability_findings(source: str, where: str = "<source>") -> list[str]:
    """Format-capability knowledge in a module's source: a table from format names to kinds or features
    (``{"peft": frozenset({"lora", ...})}``), a ``FORMAT_KINDS``-like name, or a test of a format name together with
    a kind name (``target == "peft" and layer.kind != "lora"``)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Dict):
            for key, value in zip(node.keys, node.values):
                if isinstance(key, ast.Constant) and key.value in FORMAT_NAMES and _strings(value):
                    found.append(f"{where}:{node.lineno}: a table of what format '{key.value}' holds")
        elif isinstance(node, ast.Name) and node.id.upper().startswith("FORMAT_") and node.id.isupper():
            found.append(f"{where}:{node.lineno}: {node.id}")
        elif isinstance(node, ast.BoolOp):
            consts = {n.value for n in ast.walk(node) if isinstance(n, ast.Constant) and isinstance(n.value, str)}
            if consts & FORMAT_NAMES and consts & KIND_NAMES:
                found.append(f"{where}:{node.lineno}: a test of format {sorted(consts & FORMAT_NAMES)} with kind "
                             f"{sorted(consts & KIND_NAMES)}")
    return found


def test_no_format_capability_outside_formats():
    findings = []
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT)
        if rel.parts[0] == "formats":
            continue
        findings += capability_findings(path.read_text(), str(rel))
    assert findings == []


@pytest.mark.parametrize("planted", [
    'FORMAT_KINDS = {"peft": frozenset({"lora", "loha"}), "diffusers": frozenset({"lora"})}',
    'STORES = {"kohya": ("lora", "full")}',
    'def plan(target, layer):\n    return target == "diffusers" and layer.kind != "lora"',
])
def test_the_capability_scan_finds_a_planted_table(planted):
    assert capability_findings(planted)


def test_every_registered_format_has_the_whole_protocol():
    from adaptkit.formats.base import Format, missing_members

    for name, fmt in FORMATS.items():
        assert missing_members(fmt) == [], name
        assert isinstance(fmt, Format), name
        assert fmt.NAME == name
    with pytest.raises(ak.ConfigError, match="lacks the format member"):
        ak.register_format(object())
