"""Hub sources online: the repo is listed first and only the files of the one adapter loaded are downloaded.

huggingface_hub's listing and download functions are replaced by a fake hub that serves a repo from local
files into the real cache layout and records every request. ``snapshot_download`` is faked too (with
huggingface_hub's own pattern filter), so code that still downloaded by patterns would be caught fetching
the model shards. Offline (the real cache) is covered in test_peft_format.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import LoraConfig

import adaptkit as ak
from adaptkit.formats import _select_hub_files
from adaptkit.io import sources

from .conftest import make_hub_cache, make_peft_adapter, make_tiny_llama

COMMIT = "fedcba9876543210fedcba9876543210fedcba98"


class FakeHub:
    """Serve ``files`` (repo path -> local file) as hub repo ``repo_id`` at one commit; record requests."""

    def __init__(self, monkeypatch, cache: Path, repo_id: str, files: dict[str, Path]):
        import huggingface_hub
        from huggingface_hub import constants
        from huggingface_hub.utils import filter_repo_objects

        self.cache, self.repo_id, self.files = cache, repo_id, files
        self.listed: list[tuple[str, str | None]] = []
        self.downloaded: list[str] = []
        real_snapshot = huggingface_hub.snapshot_download
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setenv("HF_HUB_OFFLINE", "0")

        def list_repo_files(api, repo_id, *, revision=None, repo_type=None, token=None):
            self.listed.append((repo_id, revision))
            self._check(repo_id)
            return sorted(self.files)

        def hf_hub_download(repo_id, filename, *, revision=None, **_):
            self._check(repo_id)
            self.downloaded.append(filename)
            return str(self._store([filename], revision) / filename)

        def snapshot_download(repo_id, *, revision=None, allow_patterns=None, local_files_only=False, **kw):
            if local_files_only:
                return real_snapshot(repo_id, revision=revision, allow_patterns=allow_patterns, local_files_only=True, **kw)
            self._check(repo_id)
            names = list(filter_repo_objects(sorted(self.files), allow_patterns=allow_patterns))
            self.downloaded += names
            return str(self._store(names, revision))

        monkeypatch.setattr(sources, "hub_unreachable", lambda: None)  # the fake hub answers
        monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files", list_repo_files)
        monkeypatch.setattr(huggingface_hub, "hf_hub_download", hf_hub_download)
        monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)

    def _check(self, repo_id: str) -> None:
        if repo_id != self.repo_id:
            raise AssertionError(f"unexpected repo {repo_id}")

    def _store(self, names: list[str], revision: str | None) -> Path:
        refs = () if revision == COMMIT else (revision or "main",)
        make_hub_cache(self.cache, self.repo_id, {n: self.files[n] for n in names}, refs=refs, commit=COMMIT)
        return self.cache / ("models--" + self.repo_id.replace("/", "--")) / "snapshots" / COMMIT


def _shards(tmp_path: Path) -> dict[str, Path]:
    """Stand-ins for the merged model some adapter repos also hold (here small; on the hub: gigabytes)."""
    from safetensors.torch import save_file

    out = {}
    for i in (1, 2):
        path = tmp_path / f"shard{i}.safetensors"
        save_file({"model.embed_tokens.weight": torch.zeros(4, 4)}, str(path))
        out[f"model-0000{i}-of-00002.safetensors"] = path
    (tmp_path / "index.json").write_text('{"weight_map": {}}')
    out["model.safetensors.index.json"] = tmp_path / "index.json"
    return out


@pytest.fixture
def peft_src(tmp_path):
    return make_peft_adapter(tmp_path / "src", LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                          init_lora_weights=False), seed=3)


@pytest.fixture
def kohya_files(tmp_path, peft_src):
    a = ak.save(ak.load(peft_src), tmp_path / "a.safetensors", format="kohya")
    b = ak.save(ak.convert(ak.load(peft_src), kind="lora", rank=2), tmp_path / "b.safetensors", format="kohya")
    return {"a.safetensors": a, "b.safetensors": b}


def test_peft_repo_with_model_shards_downloads_only_the_adapter(tmp_path, hub_cache, monkeypatch, peft_src):
    files = {"adapter_config.json": peft_src / "adapter_config.json",
             "adapter_model.safetensors": peft_src / "adapter_model.safetensors",
             "README.md": peft_src / "README.md", **_shards(tmp_path)}
    hub = FakeHub(monkeypatch, hub_cache, "org/adapter", files)
    a = ak.load("org/adapter@v1")
    assert hub.downloaded == ["adapter_config.json", "adapter_model.safetensors"]
    assert hub.listed == [("org/adapter", "v1")]
    assert a.format == "peft" and len(a) == 4 and a.source == f"org/adapter@{COMMIT}"
    ref = ak.load(peft_src)
    assert all(torch.equal(a.layers[p].delta(), ref.layers[p].delta()) for p in ref.layers)
    # the ref is cached: the same id now loads offline from the cache
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    assert len(ak.load("org/adapter@v1")) == 4


def test_kohya_repo_with_model_shards_downloads_only_the_one_file(tmp_path, hub_cache, monkeypatch, kohya_files):
    files = {"lora.safetensors": kohya_files["a.safetensors"], "config.json": tmp_path / "index.json", **_shards(tmp_path)}
    hub = FakeHub(monkeypatch, hub_cache, "org/kohya", files)
    a = ak.load("org/kohya", base=make_tiny_llama(0))
    assert hub.downloaded == ["lora.safetensors"]
    assert a.format == "kohya" and len(a) == 4


def test_named_file_downloads_exactly_that_file(tmp_path, hub_cache, monkeypatch, kohya_files):
    files = {**kohya_files, "loras/b.safetensors": kohya_files["b.safetensors"], **_shards(tmp_path)}
    hub = FakeHub(monkeypatch, hub_cache, "org/kohya", files)
    base = make_tiny_llama(0)
    b = ak.load("org/kohya:b.safetensors", base=base)
    assert hub.downloaded == ["b.safetensors"]
    assert {layer.rank for layer in b.layers.values()} == {2}
    assert b.source == f"org/kohya@{COMMIT}:b.safetensors"
    hub.downloaded.clear()
    nested = ak.load("org/kohya@main:loras/b.safetensors", base=base)
    assert hub.downloaded == ["loras/b.safetensors"] and len(nested) == len(b)


def test_several_kohya_candidates_is_a_clear_error(tmp_path, hub_cache, monkeypatch, kohya_files):
    hub = FakeHub(monkeypatch, hub_cache, "org/kohya", {**kohya_files, **_shards(tmp_path)})
    with pytest.raises(ak.SourceNotFoundError) as err:
        ak.load("org/kohya")
    message = str(err.value)
    assert "\n" not in message and "a.safetensors, b.safetensors" in message and "'org/kohya:a.safetensors'" in message
    assert "model-00001" not in message
    assert hub.downloaded == []


def test_adapters_in_subfolders(tmp_path, hub_cache, monkeypatch, peft_src):
    files = {f"{name}/{f}": peft_src / f for name in ("math", "code") for f in ("adapter_config.json",
                                                                              "adapter_model.safetensors")}
    hub = FakeHub(monkeypatch, hub_cache, "org/multi", {**files, **_shards(tmp_path)})
    with pytest.raises(ak.SourceNotFoundError, match=r"subfolders \['code', 'math'\]: load one as 'org/multi:code'"):
        ak.load("org/multi")
    assert len(ak.load("org/multi:math")) == 4
    assert hub.downloaded == ["math/adapter_config.json", "math/adapter_model.safetensors"]
    with pytest.raises(ak.SourceNotFoundError, match="subfolder 'nope' does not exist"):
        ak.load("org/multi:nope")
    with pytest.raises(ak.SourceNotFoundError, match=r"no adapter found in org/multi:math \(looked for pytorch_lora_weights.safetensors\)"):
        ak.load("org/multi:math", format="diffusers")


def test_only_model_weights_is_refused_without_downloading(tmp_path, hub_cache, monkeypatch):
    hub = FakeHub(monkeypatch, hub_cache, "org/model", _shards(tmp_path))
    with pytest.raises(ak.SourceNotFoundError, match="only model weights"):
        ak.load("org/model")
    assert hub.downloaded == []


def test_unreachable_hub_falls_back_to_the_cache(tmp_path, hub_cache, monkeypatch, peft_src):
    import huggingface_hub

    make_hub_cache(hub_cache, "org/adapter", {"adapter_config.json": peft_src / "adapter_config.json",
                                              "adapter_model.safetensors": peft_src / "adapter_model.safetensors"})
    FakeHub(monkeypatch, hub_cache, "org/adapter", {})

    def no_network(*args, **kwargs):
        raise ConnectionError("network is unreachable")

    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files", no_network)
    assert len(ak.load("org/adapter")) == 4
    with pytest.raises(ak.SourceNotFoundError, match="hub could not be reached: ConnectionError"):
        ak.load("org/other")


def test_selection_by_file_names():
    diffusers_repo = ["pytorch_lora_weights.safetensors", "diffusion_pytorch_model.safetensors",
                      "unet/diffusion_pytorch_model.fp16.safetensors", "README.md"]
    assert _select_hub_files(None, diffusers_repo, None, "o/d") == (["pytorch_lora_weights.safetensors"],
                                                                    "pytorch_lora_weights.safetensors")
    peft_repo = ["adapter_config.json", "adapter_model.bin", "adapter_model.safetensors", "model.safetensors"]
    assert _select_hub_files(None, peft_repo, None, "o/p") == (["adapter_config.json", "adapter_model.safetensors"], None)
    assert _select_hub_files(None, peft_repo, "adapter_model.bin", "o/p") == (
        ["adapter_config.json", "adapter_model.bin"], "adapter_model.bin")
    assert _select_hub_files("kohya", ["x/a.safetensors", "x/model.safetensors"], "x", "o/k") == (
        ["x/a.safetensors"], "x/a.safetensors")
