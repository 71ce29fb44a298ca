"""Bad paths: subfolders that leave their snapshot or directory, outputs that are (or hold, or sit inside) an
input, symlinked outputs, parents that are files, existing outputs. Each is refused with one clear error before
any work is done, and the input is left byte for byte as it was.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch
from peft import LoraConfig

import adaptkit as ak
from adaptkit.errors import OutputIsInputError

from .conftest import cli_error, make_hub_cache, make_peft_adapter, make_tiny_llama, run_cli, tree_digest

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def adapter_dir(tmp_path):
    path = make_peft_adapter(tmp_path / "adapter", LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                              init_lora_weights=False), seed=3)
    (path / "notes.txt").write_text("the user's own file")
    return path


@pytest.fixture
def base_dir(tmp_path):
    path = tmp_path / "models" / "base"
    make_tiny_llama(0).save_pretrained(str(path))
    return path


def _no_leftovers(directory):
    assert not [p for p in Path(directory).rglob("*") if "adaptkit-tmp" in p.name or "adaptkit-old" in p.name]


def _hub_env(cache: Path) -> dict[str, str]:
    return {"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}


# ------------------------------------------------------------------------------- subfolders stay inside


def test_hub_subfolder_cannot_leave_the_snapshot(tmp_path, hub_cache, adapter_dir):
    make_hub_cache(hub_cache, "org/name", {"adapter_config.json": adapter_dir / "adapter_config.json",
                                           "adapter_model.safetensors": adapter_dir / "adapter_model.safetensors"})
    outside = make_peft_adapter(tmp_path / "outside", LoraConfig(r=2, target_modules=["k_proj"], init_lora_weights=False))
    snapshot = hub_cache / "models--org--name" / "snapshots" / COMMIT
    dotdot = os.path.relpath(outside, snapshot)
    assert dotdot.startswith("..") and (snapshot / dotdot).resolve() == outside.resolve()
    for sub in (str(outside), dotdot, f"x/../{dotdot}"):
        with pytest.raises(ak.SourceNotFoundError, match="absolute or has a '..' component"):
            ak.load(f"org/name:{sub}")
    line = cli_error(run_cli("info", f"org/name:{outside}", env=_hub_env(hub_cache)), "absolute", "hub repo org/name")
    assert "lora" not in line
    assert len(ak.load("org/name")) == 4  # the repo itself still loads


def test_hub_symlink_leaving_the_snapshot_is_refused(tmp_path, hub_cache, adapter_dir):
    outside = make_peft_adapter(tmp_path / "outside", LoraConfig(r=2, target_modules=["k_proj"], init_lora_weights=False))
    kohya = ak.save(ak.load(outside), tmp_path / "outside.safetensors", format="kohya")
    make_hub_cache(hub_cache, "org/name", {"adapter_config.json": adapter_dir / "adapter_config.json",
                                           "adapter_model.safetensors": adapter_dir / "adapter_model.safetensors"})
    make_hub_cache(hub_cache, "org/k", {"x/readme.md": adapter_dir / "notes.txt"})
    repo = hub_cache / "models--org--name"
    snapshot = repo / "snapshots" / COMMIT
    # a real cache links each snapshot file into blobs/: those links are inside and keep working
    (repo / "blobs").mkdir()
    blob = repo / "blobs" / "abc123"
    shutil.move(snapshot / "adapter_model.safetensors", blob)
    (snapshot / "adapter_model.safetensors").symlink_to(os.path.relpath(blob, snapshot))
    assert len(ak.load("org/name")) == 4
    (snapshot / "evil").symlink_to(outside, target_is_directory=True)
    k_snapshot = hub_cache / "models--org--k" / "snapshots" / COMMIT
    (k_snapshot / "x" / "evil.safetensors").symlink_to(kohya)
    for spec in ("org/name:evil", "org/k:x/evil.safetensors", "org/k:x", "org/name"):
        with pytest.raises(ak.SourceNotFoundError, match="leads outside the snapshot"):
            ak.load(spec)
    cli_error(run_cli("info", "org/name:evil", env=_hub_env(hub_cache)), "leads outside the snapshot of org/name",
              str(outside))


def test_local_subfolder_stays_inside_its_directory(tmp_path, adapter_dir):
    parent = tmp_path / "adapters"
    shutil.copytree(adapter_dir, parent / "mine")
    outside = make_peft_adapter(tmp_path / "outside", LoraConfig(r=2, target_modules=["k_proj"], init_lora_weights=False))
    (parent / "link").symlink_to(outside, target_is_directory=True)
    assert len(ak.load(f"{parent}:mine")) == 4
    for sub in (str(outside), "../outside", "mine/../../outside"):
        with pytest.raises(ak.SourceNotFoundError, match="absolute or has a '..' component"):
            ak.load(f"{parent}:{sub}")
    with pytest.raises(ak.SourceNotFoundError, match="leads outside directory"):
        ak.load(f"{parent}:link")
    cli_error(run_cli("info", f"{parent}:../outside"), "absolute or has a '..' component")


# ------------------------------------------------------------------------------- output is an input


def test_fuse_refuses_an_output_that_is_contains_or_lies_inside_an_input(tmp_path, base_dir, adapter_dir):
    before_base, before_adapter = tree_digest(base_dir), tree_digest(adapter_dir)
    cases = [(base_dir, "is the input"), (base_dir / "fused", "lies inside the input"),
             (base_dir.parent, "contains the input"), (adapter_dir, "is the input")]
    for out, how in cases:
        with pytest.raises(OutputIsInputError, match=how) as e:
            ak.fuse(base_dir, [adapter_dir], out=out, overwrite=True)
        assert str(out) in str(e.value)
        assert isinstance(e.value, ak.OutputExistsError)
    line = cli_error(run_cli("fuse", str(base_dir), str(adapter_dir), "-o", str(base_dir), "--overwrite"),
                     f"output {base_dir} is the input {base_dir}", "choose another output path")
    assert "overwrite" in line
    cli_error(run_cli("unfuse", str(base_dir), str(adapter_dir), "-o", str(base_dir / "x")), "lies inside the input")
    assert tree_digest(base_dir) == before_base and tree_digest(adapter_dir) == before_adapter
    _no_leftovers(tmp_path)


def test_fuse_refuses_an_output_reached_through_symlinks(tmp_path, base_dir, adapter_dir):
    link = tmp_path / "link-to-base"
    link.symlink_to(base_dir, target_is_directory=True)
    with pytest.raises(OutputIsInputError, match="is the input"):
        ak.fuse(base_dir, [adapter_dir], out=link, overwrite=True)
    # a base directory whose weights are links into another directory: that directory is the input too
    real = tmp_path / "real"
    real.mkdir()
    linked = tmp_path / "linked"
    linked.mkdir()
    for f in base_dir.iterdir():
        shutil.copy(f, real / f.name)
        (linked / f.name).symlink_to(real / f.name)
    before = tree_digest(real)
    with pytest.raises(OutputIsInputError, match="contains the input") as e:
        ak.fuse(linked, [adapter_dir], out=real, overwrite=True)
    assert "points there" in str(e.value)
    assert tree_digest(real) == before


def test_convert_merge_save_refuse_writing_over_their_source(tmp_path, adapter_dir):
    from adaptkit.ops.convert import convert_checkpoint
    from adaptkit.ops.merging import merge_to

    before = tree_digest(adapter_dir)
    a = ak.load(adapter_dir)
    with pytest.raises(OutputIsInputError, match="is the input"):
        convert_checkpoint("->peft", adapter_dir, adapter_dir, overwrite=True)
    with pytest.raises(OutputIsInputError, match="lies inside the input"):
        convert_checkpoint("->kohya", adapter_dir, adapter_dir / "a.safetensors")
    with pytest.raises(OutputIsInputError, match="is the input"):
        merge_to([adapter_dir, adapter_dir], adapter_dir, overwrite=True)
    with pytest.raises(OutputIsInputError, match="is the input"):
        ak.save(a, adapter_dir, overwrite=True)
    with pytest.raises(OutputIsInputError, match="contains the input"):
        ak.save(a, adapter_dir.parent, overwrite=True)
    cli_error(run_cli("convert", "->peft", str(adapter_dir), str(adapter_dir), "--overwrite"),
              f"output {adapter_dir} is the input {adapter_dir}")
    cli_error(run_cli("merge", str(adapter_dir), str(adapter_dir), "-o", str(adapter_dir), "--overwrite"),
              "is the input")
    assert tree_digest(adapter_dir) == before
    _no_leftovers(tmp_path)


def test_extract_and_loftq_refuse_writing_over_their_models(tmp_path, base_dir):
    tuned = tmp_path / "tuned"
    make_tiny_llama(1).save_pretrained(str(tuned))
    before_base, before_tuned = tree_digest(base_dir), tree_digest(tuned)
    with pytest.raises(OutputIsInputError, match="is the input"):
        ak.extract(base_dir, tuned, rank=2, out=tuned, overwrite=True)
    with pytest.raises(OutputIsInputError, match="lies inside the input"):
        ak.loftq(base_dir, target=["q_proj"], rank=2, out=base_dir / "loftq")
    cli_error(run_cli("extract", str(base_dir), str(tuned), "-r", "2", "-o", str(base_dir), "--overwrite"),
              "is the input")
    cli_error(run_cli("loftq", str(base_dir), "-t", "q_proj", "-r", "2", "-o", str(base_dir), "--overwrite"),
              "is the input")
    assert tree_digest(base_dir) == before_base and tree_digest(tuned) == before_tuned


def test_hub_input_refuses_an_output_in_its_cache(tmp_path, hub_cache, adapter_dir):
    make_hub_cache(hub_cache, "org/name", {"adapter_config.json": adapter_dir / "adapter_config.json",
                                           "adapter_model.safetensors": adapter_dir / "adapter_model.safetensors"})
    snapshot = hub_cache / "models--org--name" / "snapshots" / COMMIT
    before = tree_digest(hub_cache)
    a = ak.load("org/name")
    with pytest.raises(OutputIsInputError, match="hub repo org/name"):
        ak.save(a, snapshot, overwrite=True)
    cli_error(run_cli("convert", "->peft", "org/name", str(snapshot / "x"), env=_hub_env(hub_cache)),
              "lies inside the input hub repo org/name")
    assert tree_digest(hub_cache) == before


def test_demo_and_report_refuse_their_inputs(tmp_path, monkeypatch, adapter_dir):
    from adaptkit import demo

    examples = tmp_path / "examples"
    shutil.copytree(demo.examples_dir(), examples)
    monkeypatch.setattr(demo, "examples_dir", lambda: examples)
    before = tree_digest(examples)
    with pytest.raises(OutputIsInputError, match="lies inside the input"):
        demo.run_demo(examples / "out", echo=lambda _: None)
    assert tree_digest(examples) == before
    pytest.importorskip("matplotlib")
    before = tree_digest(adapter_dir)
    weights = adapter_dir / "adapter_model.safetensors"
    cli_error(run_cli("analyze", str(adapter_dir), "--report", str(weights)), f"output {weights} lies inside the input")
    assert tree_digest(adapter_dir) == before


def test_every_writer_leaves_its_inputs_byte_for_byte(tmp_path, base_dir, adapter_dir):
    """The guarantee itself, on success: no command writes to what it reads (loftq iters=2 rewrites base
    weights, in its own copy)."""
    from adaptkit.ops.convert import convert_checkpoint
    from adaptkit.ops.merging import merge_to

    tuned = tmp_path / "tuned"
    make_tiny_llama(1).save_pretrained(str(tuned))
    inputs = (base_dir, adapter_dir, tuned)
    before = [tree_digest(p) for p in inputs]
    out = tmp_path / "out"
    ak.fuse(base_dir, [adapter_dir], out=out / "fused")
    ak.unfuse(out / "fused", [adapter_dir], out=out / "unfused")
    convert_checkpoint("->kohya", adapter_dir, out / "k.safetensors")
    merge_to([adapter_dir, adapter_dir], out / "merged", weights=[1.0, -0.5])
    ak.save(ak.load(adapter_dir), out / "saved")
    ak.extract(base_dir, tuned, rank=2, out=out / "extracted")
    ak.loftq(base_dir, target=["q_proj"], rank=2, iters=2, out=out / "loftq")
    assert (out / "loftq" / "base").is_dir()
    assert [tree_digest(p) for p in inputs] == before
    _no_leftovers(tmp_path)


# ------------------------------------------------------------------------------- where outputs go


def test_parent_that_is_a_file_is_one_clear_error(tmp_path, adapter_dir, base_dir):
    a = ak.load(adapter_dir)
    blocker = tmp_path / "blocker.txt"
    blocker.write_text("a file")
    for out in (blocker / "out", blocker / "deeper" / "out"):
        with pytest.raises(ak.OutputExistsError, match=f"{blocker} is a file, not a directory"):
            ak.save(a, out)
    with pytest.raises(ak.OutputExistsError, match="is a file, not a directory"):
        ak.fuse(base_dir, [adapter_dir], out=blocker / "fused")
    cli_error(run_cli("convert", str(adapter_dir), str(blocker / "a.safetensors"), "--to", "kohya"),
              f"{blocker} is a file, not a directory")
    assert blocker.read_text() == "a file"


def test_overwrite_through_a_symlinked_output_leaves_no_old_link(tmp_path, adapter_dir):
    a = ak.load(adapter_dir)
    target = tmp_path / "earlier"
    ak.save(a, target)
    before = tree_digest(target)
    link = tmp_path / "out"
    link.symlink_to(target, target_is_directory=True)
    out = ak.save(a, link, overwrite=True)
    assert out == link and link.is_dir() and not link.is_symlink()
    assert (link / "adapter_model.safetensors").is_file()
    assert tree_digest(target) == before  # the link was replaced; what it pointed to is left alone
    _no_leftovers(tmp_path)
    file_link = tmp_path / "k.safetensors"
    file_link.symlink_to(ak.save(a, tmp_path / "k-earlier.safetensors", format="kohya"))
    ak.save(a, file_link, format="kohya", overwrite=True)
    assert file_link.is_file() and not file_link.is_symlink()
    _no_leftovers(tmp_path)


def test_output_exists_is_refused_and_untouched(adapter_dir, tmp_path):
    a = ak.load(adapter_dir)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ak.OutputExistsError, match="already exists"):
        ak.save(a, out)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    _no_leftovers(tmp_path)
    ak.save(a, out, overwrite=True)
    assert (out / "adapter_model.safetensors").exists() and not (out / "keep.txt").exists()
    _no_leftovers(tmp_path)
    res = run_cli("demo", "--out", str(adapter_dir))
    assert res.returncode == 1 and "not an adaptkit demo output" in res.stderr
    assert (adapter_dir / "adapter_model.safetensors").exists()


def test_failed_write_leaves_nothing(adapter_dir, tmp_path):
    a = ak.load(adapter_dir)
    full = ak.Full(diff=torch.zeros(2, 2), shape=(2, 2))
    bad = a.replace(layers={**a.layers, "x": full})
    with pytest.raises(ak.UnsupportedError):
        ak.save(bad, tmp_path / "never")
    assert not (tmp_path / "never").exists()
    _no_leftovers(tmp_path)


def test_outputs_get_ordinary_permissions(adapter_dir, tmp_path):
    umask = os.umask(0)
    os.umask(umask)
    out = ak.save(ak.load(adapter_dir), tmp_path / "out")
    assert out.stat().st_mode & 0o777 == 0o777 & ~umask  # not mkdtemp's owner-only 0700


# ------------------------------------------------------------------------------- sources holding several adapters


def test_local_directory_of_adapters_names_its_subfolders(tmp_path, adapter_dir, base_dir):
    a = ak.load(adapter_dir)
    collection = tmp_path / "collection"
    ak.save(a, collection / "style" / "style.safetensors", format="kohya")
    ak.save(a, collection / "subject" / "subject.safetensors", format="kohya")
    with pytest.raises(ak.FormatError, match=r"subfolders \['style', 'subject'\]") as e:
        ak.load(collection)
    assert f"'{collection}:style'" in str(e.value)
    assert len(ak.load(f"{collection}:style", base=base_dir)) == 4
    cli_error(run_cli("info", str(collection)), f"load one as '{collection}:style'")


def test_info_mentions_adapters_beside_the_default(tmp_path):
    from peft import get_peft_model

    pm = get_peft_model(make_tiny_llama(0), LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    pm.add_adapter("other", LoraConfig(r=2, target_modules=["v_proj"], init_lora_weights=False))
    pm.save_pretrained(str(tmp_path / "both"))
    res = run_cli("info", str(tmp_path / "both"))
    assert res.returncode == 0, res.stderr
    assert f"['other'] hold more adapters: load one as '{tmp_path / 'both'}:other'" in res.stdout
    import json

    payload = json.loads(run_cli("info", str(tmp_path / "both"), "--json").stdout)
    assert "'other'" in payload["subfolders"]


def test_offline_multi_adapter_hub_repo_hint_names_the_hub_form(hub_cache, adapter_dir, tmp_path):
    other = make_peft_adapter(tmp_path / "other", LoraConfig(r=2, target_modules=["k_proj"], init_lora_weights=False))
    make_hub_cache(hub_cache, "org/multi", {"a": adapter_dir, "b": other}, refs=("main", "v1"))
    for spec, hint in (("org/multi", "'org/multi:a'"), ("org/multi@v1", "'org/multi@v1:a'")):
        with pytest.raises(ak.SourceNotFoundError, match=r"subfolders \['a', 'b'\]") as e:
            ak.load(spec)
        assert hint in str(e.value) and str(hub_cache) not in str(e.value)
    assert len(ak.load("org/multi@v1:b")) == 2
    line = cli_error(run_cli("info", "org/multi@v1", env=_hub_env(hub_cache)), "load one as 'org/multi@v1:a'")
    assert str(hub_cache) not in line
