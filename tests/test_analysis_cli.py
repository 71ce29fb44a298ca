"""``adaptkit analyze`` / ``adaptkit compare`` and the HTML report (matplotlib and Chromium tests skip without them)."""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
import sys

import pytest
from click.testing import CliRunner

import adaptkit as ak
import adaptkit.analysis.compare  # noqa: F401  (ak.analysis.compare below)
from adaptkit.cli import main
from adaptkit.demo import example

MATH, CODE, DORA = (str(example(n)) for n in ("lora_math", "lora_code", "dora_style"))


def run(*args: str):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def test_analyze_json_csv_and_text():
    res = run("analyze", MATH, "--json")
    assert res.exit_code == 0, res.output
    payload = json.loads(res.stdout)
    assert payload["adapter"] == "lora_math" and payload["layers"] and len(payload["layers"]) == 8
    table = ak.analyze(MATH).set_index("module")
    for row in payload["layers"]:
        assert row["fro_norm"] == pytest.approx(table.loc[row["module"], "fro_norm"])
        assert row["rank"] == 8 and row["method"] == "lowrank"
    res = run("analyze", MATH, "--csv")
    assert res.exit_code == 0 and res.stdout.splitlines()[0].startswith("module,kind,shape,component,depth,rank")
    assert len(res.stdout.splitlines()) == 9
    res = run("analyze", MATH)
    assert res.exit_code == 0 and "effective_rank" in res.stdout and "top_layer" in res.stdout


def test_compare_json_and_text():
    res = run("compare", MATH, CODE, DORA, "--json", "--density", "0.3")
    assert res.exit_code == 0, res.output
    payload = json.loads(res.stdout)
    assert payload["adapters"] == ["lora_math", "lora_code", "dora_style"] and payload["density"] == 0.3
    assert len(payload["pairs"]) == 3 and payload["suggestion"]["method"] == "none"  # dora_style: DoRA cannot merge
    assert "DoRA" in payload["suggestion"]["reason"]
    assert [p["suggested_method"] for p in payload["pairs"]] == ["ties_svd", "none", "none"]  # ranks 8 and 4
    first = payload["layers"][0]
    assert set(first) >= {"module", "a", "b", "cosine", "sign_conflict", "topk_overlap"} and -1 <= first["cosine"] <= 1
    res = run("compare", MATH, CODE)
    assert res.exit_code == 0 and "suggested merge method:" in res.stdout and "target_jaccard" in res.stdout


def test_cli_errors_are_one_line(tmp_path):
    res = run("compare", MATH)
    assert res.exit_code == 1 and res.stderr.strip().splitlines() == [
        "error: compare needs at least two adapters, got 1; pass two or more sources"]
    res = run("analyze", str(tmp_path / "missing"))
    assert res.exit_code == 1 and res.stderr.startswith("error:") and len(res.stderr.strip().splitlines()) == 1
    res = run("compare", MATH, CODE, "--density", "1.5")
    assert res.exit_code == 1 and "density (--density) must be a number in (0, 1], got 1.5" in res.stderr


def test_report_without_matplotlib_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    out = tmp_path / "r.html"
    res = run("analyze", MATH, "--report", str(out))
    assert res.exit_code == 1 and "pip install 'adaptkit[plot]'" in res.stderr and not out.exists()
    with pytest.raises(ak.UnsupportedError, match=r"adaptkit\[plot\]"):
        ak.analysis.compare.compare_adapters([MATH, CODE], report=out)


def _pngs(text: str) -> list[bytes]:
    return [base64.b64decode(m) for m in re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', text)]


def test_reports_are_self_contained(tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "analysis.html"
    res = run("analyze", MATH, "--report", str(out))
    assert res.exit_code == 0 and "report written" in res.stderr
    text = out.read_text()
    pngs = _pngs(text)
    assert len(pngs) == 2 and all(p.startswith(b"\x89PNG\r\n\x1a\n") and len(p) > 5000 for p in pngs)
    assert not re.search(r'(src|href)="(https?:)?//', text) and "<script" not in text
    assert "model.layers.1.self_attn.o_proj" in text
    cmp_out = tmp_path / "compare.html"
    res = run("compare", MATH, CODE, DORA, "--report", str(cmp_out), "--json")
    assert res.exit_code == 0 and json.loads(res.stdout)["adapters"]  # stdout stays pure JSON
    text = cmp_out.read_text()
    assert len(_pngs(text)) == 1 + 3 + 1  # pair heat maps, one per-layer heat map per pair, energy overlay
    assert "Suggested merge" in text and not re.search(r'(src|href)="(https?:)?//', text)


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def _screenshot(html_path, png_path, profile) -> None:
    cmd = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={profile}",
           "--hide-scrollbars", "--window-size=1280,2000", f"--screenshot={png_path}", html_path.as_uri()]
    subprocess.run(cmd, capture_output=True, timeout=120, check=False)
    assert png_path.exists(), "Chromium wrote no screenshot"


def _coloured_fraction(png_path) -> float:
    """Share of pixels that are clearly coloured (plots are; text, tables and page background are grey)."""
    from matplotlib.image import imread

    rgb = imread(str(png_path))[..., :3]
    return float(((rgb.max(axis=-1) - rgb.min(axis=-1)) > 0.25).mean())


def test_report_renders_in_headless_chromium(tmp_path):
    pytest.importorskip("matplotlib")
    if _chromium() is None:
        pytest.skip("Chromium is not installed (apt-get install chromium)")
    from adaptkit.analysis.layers import analyze_adapter
    from adaptkit.analysis.report import analysis_html

    report = tmp_path / "report.html"
    result = analyze_adapter(MATH, report=report)
    _screenshot(report, tmp_path / "shot.png", tmp_path / "profile1")
    # control: the same page without its images must show (almost) no colour
    plain = tmp_path / "plain.html"
    plain.write_text(re.sub(r'<img [^>]*>', "", analysis_html(result)))
    _screenshot(plain, tmp_path / "plain.png", tmp_path / "profile2")
    with_plots, without = _coloured_fraction(tmp_path / "shot.png"), _coloured_fraction(tmp_path / "plain.png")
    assert without < 0.002, without
    assert with_plots > 0.004, f"the screenshot shows no plots ({with_plots:.4f} of pixels coloured)"
    assert with_plots > 10 * without
    # the comparison report: similarity heat maps and the energy overlay
    from adaptkit.analysis.compare import compare_adapters
    from adaptkit.analysis.report import compare_html

    cmp_report = tmp_path / "compare.html"
    comparison = compare_adapters([MATH, CODE, DORA], report=cmp_report)
    _screenshot(cmp_report, tmp_path / "cmp.png", tmp_path / "profile3")
    (tmp_path / "cmp_plain.html").write_text(re.sub(r'<img [^>]*>', "", compare_html(comparison)))
    _screenshot(tmp_path / "cmp_plain.html", tmp_path / "cmp_plain.png", tmp_path / "profile4")
    with_plots, without = _coloured_fraction(tmp_path / "cmp.png"), _coloured_fraction(tmp_path / "cmp_plain.png")
    assert with_plots > 0.02 and with_plots > 10 * without, (with_plots, without)


def test_module_type_labels_keep_the_name_before_indices():
    from adaptkit.analysis.report import _module_type

    assert _module_type("model.layers.3.self_attn.q_proj") == "q_proj"
    assert _module_type("unet.up_blocks.1.attentions.0.transformer_blocks.0.attn1.to_out.0") == "to_out.0"


def test_analyze_kohya_file_with_base(tmp_path):
    import numpy as np

    from adaptkit.demo import build_example_base

    base = build_example_base(tmp_path / "base")
    src = str(example("lycoris_loha.safetensors"))
    res = run("analyze", src, "--base", str(base), "--json")
    assert res.exit_code == 0, res.output
    rows = json.loads(res.stdout)["layers"]
    adapter = ak.load(src, base=str(base))
    assert len(rows) == len(adapter) == 14
    for row in rows:  # LoHa at rank 4: the Hadamard product reaches rank up to 16, seen without building dW
        d = adapter.layers[row["module"]].delta().double().numpy()
        s = np.linalg.svd(d, compute_uv=False)
        assert row["method"] == "lowrank" and row["spectral_norm"] == pytest.approx(s[0], rel=1e-5)
        assert row["rank_99"] == int(np.argmax(np.cumsum(s**2) / (s**2).sum() >= 0.99) + 1) > 4
    assert run("analyze", src).exit_code == 1  # names need the base: one-line error, exit 1


def _png_size(png: bytes) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR chunk."""
    return int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")


def test_unet_report_has_one_row_of_plots_per_component(tmp_path):
    """A UNet + text encoder LoRA: the depth plots get a row per component, the table a component column."""
    pytest.importorskip("matplotlib")
    pytest.importorskip("diffusers")
    from .test_analysis import sd_lora

    src, _ = sd_lora(tmp_path / "sd")
    other, _ = sd_lora(tmp_path / "sd2", seed=1, targets=["to_q", "to_k", "to_v", "to_out.0"])
    report = tmp_path / "unet.html"
    res = run("analyze", str(src), "--report", str(report), "--csv")
    assert res.exit_code == 0, res.output
    header, first = res.stdout.splitlines()[:2]
    assert header.split(",")[3:5] == ["component", "depth"] and first.split(",")[3] == "text_encoder"
    text = report.read_text()
    profile, spectra = _pngs(text)
    assert _png_size(profile) == (1100, 720) and _png_size(spectra) == (1100, 360)  # unet row + text_encoder row
    assert ">unet<" in text and ">text_encoder<" in text
    cmp_report = tmp_path / "cmp.html"
    assert run("compare", str(src), str(other), "--report", str(cmp_report)).exit_code == 0
    pngs = _pngs(cmp_report.read_text())
    assert len(pngs) == 3 and _png_size(pngs[-1]) == (1100, 680)  # energy overlay: unet and text_encoder panels
    if _chromium() is None:
        pytest.skip("Chromium is not installed (apt-get install chromium)")
    _screenshot(report, tmp_path / "unet.png", tmp_path / "profile")
    assert _coloured_fraction(tmp_path / "unet.png") > 0.004
