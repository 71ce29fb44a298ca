"""LyCORIS diag-OFT, BOFT and GLoRA files against the real lycoris-lora package: read, write, fuse.

Networks are made with ``lycoris.create_lycoris`` on a small seeded model (3x3 Conv2d, Linear with and without
bias; output widths that BOFT can factor), every parameter perturbed with seeded noise, and saved with LyCORIS's
own ``save_weights`` (kohya-style ``lycoris_<module>`` names). The oracles are LyCORIS itself: the applied
network's outputs, ``get_merged_weight()``, and ``create_lycoris_from_weights`` loading what adaptkit writes.
"""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import adaptkit as ak
from adaptkit.errors import FormatError, ShapeMismatchError
from adaptkit.formats import load, save
from adaptkit.formats.kohya import group_tensors
from adaptkit.formats.kohya_layers import build_layer

from .conftest import lycoris_network, run_cli

lycoris = pytest.importorskip("lycoris")
logging.getLogger("LyCORIS").setLevel(logging.ERROR)

#: case -> max relative error measured (printed with -s)
FIGURES: dict[str, float] = {}


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv_in = nn.Conv2d(4, 8, 3, padding=1)
        self.down_proj = nn.Linear(8, 16)
        self.up_proj = nn.Linear(16, 8, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x).mean((2, 3))
        return self.up_proj(torch.relu(self.down_proj(h)))


CASES = {
    "diag-oft": dict(algo="diag-oft", linear_dim=4),
    "diag-oft-rescaled-constrained": dict(algo="diag-oft", linear_dim=4, rescaled=True, constraint=1e-2),
    "boft": dict(algo="boft", linear_dim=2),
    "boft-rescaled": dict(algo="boft", linear_dim=4, rescaled=True),
    "glora": dict(algo="glora", linear_dim=2, linear_alpha=3, conv_dim=2, conv_alpha=1),
}
MODULES = ("conv_in", "down_proj", "up_proj")


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.detach().double(), want.detach().double()
    return float((got - want).norm() / want.norm())


def _record(label: str, err: float) -> None:
    FIGURES[label] = max(FIGURES.get(label, 0.0), err)
    print(f"{label}: {err:.2e}")


def make(tmp_path, algo: str, seed: int = 0, **kw):
    """A perturbed LyCORIS network saved as a file: ``(file, base model, applied model, network, input)``."""
    torch.manual_seed(seed)
    model = Net().eval()
    base = copy.deepcopy(model)
    net = lycoris_network(model, ["Linear", "Conv2d"], algo=algo, **kw)
    torch.manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.endswith("rescale"):
                p.mul_(1 + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0, 0.2)
    path = tmp_path / "lyco.safetensors"
    net.save_weights(str(path), torch.float32, {"ss_network_module": "lycoris.kohya"})
    x = torch.randn(3, 4, 5, 5, generator=torch.Generator().manual_seed(3))
    return path, base, model, net, x


def fused_output(adapter, base: nn.Module, x: torch.Tensor) -> torch.Tensor:
    m = copy.deepcopy(base)
    mods = dict(m.named_modules())
    with torch.no_grad():
        for path, layer in adapter.layers.items():
            w, _ = layer.apply(mods[path].weight)
            mods[path].weight.copy_(w)
        return m(x)


@pytest.mark.parametrize("case", list(CASES))
def test_read_exact_fuse_and_write_back(tmp_path, case):
    path, base, applied, net, x = make(tmp_path, **CASES[case])
    adapter = load(path, base=base)
    assert adapter.format == "kohya" and sorted(adapter.layers) == sorted(MODULES)
    kind = "glora" if case == "glora" else "lycoris_oft"
    assert {l.kind for l in adapter.layers.values()} == {kind}
    for p, layer in adapter.layers.items():  # the base's shapes filled in where the file leaves them open
        assert tuple(layer.shape) == tuple(dict(base.named_modules())[p].weight.shape)
    # exact tensors: writing kohya again gives the file's tensors bit for bit
    out = save(adapter, tmp_path / "out.safetensors", format="kohya")
    src, back = load_file(path), load_file(out)
    assert sorted(back) == sorted(src)
    for k in src:
        assert back[k].dtype == src[k].dtype and torch.equal(back[k], src[k]), k
    # adaptkit's fused weights against lycoris' merged weights, and the fused model against the applied network
    lyco = {m.lora_name.removeprefix("lycoris_"): m for m in net.loras}
    mods = dict(base.named_modules())
    with torch.no_grad():
        for p, layer in adapter.layers.items():
            _record(f"{case} apply vs get_merged_weight", _rel(layer.apply(mods[p].weight)[0],
                                                               lyco[p].get_merged_weight()[0]))
        want = applied(x)
    assert _rel(want, base(x)) > 1e-2  # the adapter does something
    err = _rel(fused_output(adapter, base, x), want)
    _record(f"{case} fused output", err)
    assert err < 1e-6
    assert max(v for k, v in FIGURES.items() if k.startswith(case)) < 1e-6
    # lycoris loads what adaptkit wrote and gives the same outputs
    from lycoris import create_lycoris_from_weights

    fresh = copy.deepcopy(base)
    net2, _ = create_lycoris_from_weights(1.0, str(out), fresh)
    net2.apply_to()
    net2.load_state_dict(load_file(out), strict=False)
    assert len(net2.loras) == 3
    with torch.no_grad():
        err = _rel(fresh(x), want)
    _record(f"{case} lycoris reload output", err)
    assert err < 1e-6


@pytest.mark.parametrize("case", ["diag-oft-rescaled-constrained", "boft", "glora"])
def test_fuse_matches_lycoris_merged_weights(tmp_path, case):
    path, base, applied, net, x = make(tmp_path, **CASES[case])
    (tmp_path / "base").mkdir()
    save_file({k: v.contiguous() for k, v in base.state_dict().items()}, tmp_path / "base" / "model.safetensors")
    ak.fuse(tmp_path / "base", [path], tmp_path / "fused")
    fused = load_file(tmp_path / "fused" / "model.safetensors")
    for m in net.loras:
        name = m.lora_name.removeprefix("lycoris_")
        with torch.no_grad():
            err = _rel(fused[f"{name}.weight"], m.get_merged_weight()[0])
        _record(f"{case} ak.fuse vs get_merged_weight", err)
        assert err < 1e-6
    for k, v in base.state_dict().items():  # biases untouched (these kinds change weights only)
        if k.endswith("bias"):
            assert torch.equal(fused[k], v)
    # with the base, the LoRA form at full rank reproduces the outputs: convert(base=...) and extract(base, fused)
    want = applied(x).detach()
    adapter = load(path, base=base)
    lora, report = ak.convert(adapter, base=tmp_path / "base", return_report=True)
    assert {l.kind for l in lora.layers.values()} == {"lora"} and (report["relative_error"] < 1e-6).all()
    err = _rel(fused_output(lora, base, x), want)
    _record(f"{case} convert(base=...) at full rank, output", err)
    assert err < 1e-5
    low, report = ak.convert(adapter, rank=1, base=tmp_path / "base", return_report=True)
    assert (report["relative_error"] > 1e-3).all() and (report["retained_energy"] < 1).all()  # lossy, and reported
    extracted = ak.extract(tmp_path / "base", tmp_path / "fused", rank=16)
    err = _rel(fused_output(extracted, base, x), want)
    _record(f"{case} extract(base, fused) at full rank, output", err)
    assert err < 1e-5
    # the CLI: lycoris -> peft with --base and --kind lora
    res = run_cli("convert", "lycoris->peft", str(path), str(tmp_path / "peft"), "--base", str(tmp_path / "base"),
                  "--kind", "lora")
    assert res.returncode == 0, res.stderr
    err = _rel(fused_output(ak.load(tmp_path / "peft"), base, x), want)
    _record(f"{case} convert --base --to peft, output", err)
    assert err < 1e-5


def _module_layers(path):
    groups, _ = group_tensors(load_file(path))
    return {flat: build_layer(parts) for (_, flat), parts in groups.items()}


def test_oft_read_without_base_leaves_shape_open(tmp_path):
    path, base, _, _, _ = make(tmp_path, **CASES["diag-oft-rescaled-constrained"])
    layers = _module_layers(path)  # what the file alone fixes, before the names are resolved against a base
    layer = layers["conv_in"]
    assert layer.shape is None and layer.module_type == "conv"  # rescale (8, 1, 1, 1) tells conv, not the inputs
    assert layers["down_proj"].shape is None and layers["down_proj"].module_type == "linear"
    fitted = layer.fit(tuple(base.conv_in.weight.shape))
    assert fitted.shape == (8, 4, 3, 3)
    with pytest.raises(ShapeMismatchError, match="rotate 8 output features"):
        layer.apply(base.down_proj.weight)  # 16 rows: not this module's base
    # the GLoRA file fixes every shape
    path, base, *_ = make(tmp_path, **CASES["glora"])
    assert _module_layers(path)["conv_in"].shape == (8, 4, 3, 3)


def test_incomplete_glora_names_module_and_fix(tmp_path):
    path, base, *_ = make(tmp_path, **CASES["glora"])
    sd = load_file(path)
    del sd["lycoris_down_proj.b2.weight"]
    bad = tmp_path / "bad.safetensors"
    save_file(sd, bad)
    with pytest.raises(FormatError, match=r"lycoris_down_proj: GLoRA tensor\(s\) b2.weight missing.*re-save it"):
        load(bad, base=base)


def test_oft_blocks_of_wrong_shape(tmp_path):
    path, base, *_ = make(tmp_path, **CASES["diag-oft"])
    sd = load_file(path)
    sd["lycoris_down_proj.oft_blocks"] = torch.randn(4, 4, 3)  # not square
    bad = tmp_path / "bad.safetensors"
    save_file(sd, bad)
    with pytest.raises(ShapeMismatchError, match=r"lycoris_down_proj: LyCORIS OFT blocks \(4, 4, 3\).*\(n, b, b\)"):
        load(bad)
    # square blocks for another width: refused against the base, naming the module
    sd["lycoris_down_proj.oft_blocks"] = torch.randn(2, 2, 2)  # 4 rows, the module has 16
    save_file(sd, bad)
    with pytest.raises(ShapeMismatchError, match=r"lycoris_down_proj \(down_proj\).*do not fit a weight of shape \(16, 8\)"):
        load(bad, base=base)


def test_refusals_say_what_to_do(tmp_path):
    """Base-dependent layers: no PEFT/diffusers file, no LoRA form and no merge without the base, each refusal saying why."""
    from adaptkit.errors import UnsupportedError

    path, base, *_ = make(tmp_path, **CASES["glora"])
    glora = load(path, base=base)
    with pytest.raises(UnsupportedError, match="peft has no glora layers.*format='kohya'"):
        save(glora, tmp_path / "peft", format="peft")
    with pytest.raises(UnsupportedError, match="needs the base weight"):
        ak.convert(glora)
    for method in ("linear", "task_arithmetic"):
        with pytest.raises(UnsupportedError, match="glora layers depend on the base weight and cannot be merged"):
            ak.merge([glora, glora], method=method)
    (tmp_path / "lora").mkdir()
    path, base, *_ = make(tmp_path / "lora", algo="lora", linear_dim=2, linear_alpha=2)
    with pytest.raises(UnsupportedError, match="GLoRA and LoRA layers cannot be merged.*GLoRA has no base-free delta"):
        ak.merge([glora, load(path, base=base)], method="linear")
