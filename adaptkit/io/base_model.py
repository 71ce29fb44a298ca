"""Base models read tensor by tensor, and adapter paths matched to weight names.

The reading half of the streaming layer under fuse, unfuse, extract and LoftQ (:mod:`adaptkit.io.shard_writer`
is the writing half). A base model (a hub id, a directory with ``model.safetensors.index.json``, one
``.safetensors`` file, or a diffusers pipeline with one folder per component) is described from its
safetensors *headers* only (:func:`open_base` -> :class:`WeightSet`): every tensor's name, dtype, shape and
byte range; single tensors are read with ``pread`` (:func:`read_tensor`, :class:`TensorReader`), never a
whole file, so peak memory is the largest tensor, not the model.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..core.params import DTYPE
from ..errors import ConfigError, FormatError, SourceNotFoundError, UnsupportedError
from .safetensors import FLOAT_ST, ST_TO_TORCH, TORCH_TO_ST, read_safetensors_header
from .sources import resolve

#: user spellings of an output dtype
DTYPE_NAMES: dict[str, str] = {
    "bf16": "BF16", "bfloat16": "BF16", "fp16": "F16", "float16": "F16", "half": "F16",
    "fp32": "F32", "float32": "F32", "float": "F32",
}
#: files a hub download of a base model needs (no .bin/.h5/.msgpack/.onnx duplicates of the weights)
BASE_ALLOW_PATTERNS = ["*.safetensors", "*.json", "*.txt", "*.model", "*.tiktoken", "*.jinja", "*.py", "*.md",
                       "*.vocab", "*.merges", "*.spm"]
#: weight files of other formats, never copied next to fused weights (they would hold the unfused model)
OTHER_WEIGHTS = (".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".onnx", ".gguf", ".safetensors")
STANDARD_STEMS = ("model", "diffusion_pytorch_model")


def parse_dtype(dtype: str | torch.dtype | None) -> str | None:
    """The safetensors dtype name for ``"bf16"``/``"fp16"``/``"fp32"``/a torch dtype, or ``None``."""
    if dtype is None:
        return None
    if isinstance(dtype, torch.dtype):
        if dtype not in TORCH_TO_ST or TORCH_TO_ST[dtype] not in FLOAT_ST:
            raise DTYPE.error(dtype)
        return TORCH_TO_ST[dtype]
    key = str(dtype).lower().removeprefix("torch.")
    if key not in DTYPE_NAMES:
        raise DTYPE.error(dtype)
    return DTYPE_NAMES[key]


# ------------------------------------------------------------------------------------------- the base


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of a base model, located by its header.

    Args:
        name: the tensor's name in its file.
        key: the name in the model namespace (``<component>.<name>`` inside a diffusers pipeline).
        dtype: safetensors dtype name (``"BF16"``).
        shape: the tensor's shape.
        file: the file holding it.
        begin: absolute byte offset of its data in ``file``.
        nbytes: size of its data.
    """

    name: str
    key: str
    dtype: str
    shape: tuple[int, ...]
    file: Path
    begin: int
    nbytes: int

    @property
    def torch_dtype(self) -> torch.dtype:
        """The torch dtype."""
        return ST_TO_TORCH[self.dtype]


@dataclass(frozen=True)
class WeightGroup:
    """One model's weights: a single file, or the shards of one index (one diffusers component).

    Args:
        rel_dir: folder of the model relative to the base root (``""`` or ``"unet"``).
        stem: weight file stem (``model``, ``diffusion_pytorch_model``).
        files: the weight files, in index order.
        index: the ``*.safetensors.index.json`` file, or ``None``.
        prefix: namespace prefix of this group's tensors (``""`` or ``"unet."``).
    """

    rel_dir: str
    stem: str
    files: tuple[Path, ...]
    index: Path | None
    prefix: str


@dataclass(frozen=True)
class WeightSet:
    """A base model described from its safetensors headers (no tensor data is read).

    Args:
        root: the base directory, or the single file.
        provenance: hub id with commit, or the path.
        groups: the weight groups (one, or one per diffusers component).
        tensors: model-namespace key -> :class:`TensorInfo`.
        metadata: ``__metadata__`` of each weight file.
        skipped: files in the base directory that are not copied (other weight formats, unused variants).
    """

    root: Path
    provenance: str
    groups: tuple[WeightGroup, ...]
    tensors: Mapping[str, TensorInfo]
    metadata: Mapping[Path, Mapping[str, str]] = field(default_factory=dict)
    skipped: tuple[str, ...] = ()

    @property
    def is_file(self) -> bool:
        """True when the base is one ``.safetensors`` file."""
        return self.root.is_file()

    @property
    def nbytes(self) -> int:
        """Total bytes of all weight files."""
        return sum(f.stat().st_size for g in self.groups for f in g.files)

    def weight_files(self) -> set[Path]:
        """Every weight and index file of the model (excluded from side-file copying)."""
        out = {f.resolve() for g in self.groups for f in g.files}
        out |= {g.index.resolve() for g in self.groups if g.index is not None}
        return out


def _group_in_dir(directory: Path, rel_dir: str, prefix: str) -> WeightGroup | None:
    indexes = sorted(directory.glob("*.safetensors.index.json"))
    standard = [i for i in indexes if i.name.removesuffix(".safetensors.index.json") in STANDARD_STEMS]
    if standard or indexes:
        index = (standard or indexes)[0]
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
            raise FormatError(f"{index} is not a valid safetensors index ({e.__class__.__name__}); re-download it") from e
        names = list(dict.fromkeys(weight_map.values()))
        files = tuple(directory / n for n in names)
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise FormatError(f"{index.name} lists shard(s) {missing} that are missing from {directory}; re-download the model")
        return WeightGroup(rel_dir, index.name.removesuffix(".safetensors.index.json"), files, index, prefix)
    singles = sorted(directory.glob("*.safetensors"))
    if not singles:
        return None
    standard_files = [f for f in singles if f.stem in STANDARD_STEMS]
    chosen = standard_files[0] if standard_files else singles[0] if len(singles) == 1 else None
    if chosen is None:
        raise FormatError(
            f"{directory} holds several safetensors files {[f.name for f in singles]} and no index; "
            "pass the file to use as the base"
        )
    return WeightGroup(rel_dir, chosen.stem, (chosen,), None, prefix)


def open_base(base: str | os.PathLike) -> WeightSet:
    """Describe a base model from its headers: hub id, directory (sharded or not), pipeline or one file.

    Raises:
        SourceNotFoundError: the source does not exist or holds no safetensors weights.
        FormatError: a weight file or the index is corrupt or truncated.
    """
    resolved = resolve(base, allow_patterns=BASE_ALLOW_PATTERNS)
    root = resolved.path
    groups: list[WeightGroup] = []
    if root.is_file():
        if root.suffix != ".safetensors":
            raise UnsupportedError(f"base {root.name} is not a .safetensors file; convert the base model to safetensors first")
        groups.append(WeightGroup("", root.stem, (root,), None, ""))
    elif (root / "model_index.json").is_file():  # a diffusers pipeline: one group per component folder
        for sub in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
            group = _group_in_dir(sub, sub.name, sub.name + ".")
            if group is not None:
                groups.append(group)
    else:
        group = _group_in_dir(root, "", "")
        if group is not None:
            groups.append(group)
    if not groups:
        others = sorted(p.name for p in root.rglob("*") if p.suffix in OTHER_WEIGHTS) if root.is_dir() else []
        hint = f" (it has {others[:3]}: convert them to safetensors first)" if others else ""
        raise SourceNotFoundError(f"no safetensors weights found in base {resolved.spec}{hint}")
    tensors: dict[str, TensorInfo] = {}
    metadata: dict[Path, Mapping[str, str]] = {}
    for group in groups:
        for f in group.files:
            header, start = read_safetensors_header(f)
            metadata[f] = dict(header.get("__metadata__") or {})
            for name, info in header.items():
                if name == "__metadata__":
                    continue
                key = group.prefix + name
                if key in tensors:
                    raise FormatError(f"tensor '{name}' appears in both {tensors[key].file.name} and {f.name}; the base is inconsistent")
                b, e = info["data_offsets"]
                tensors[key] = TensorInfo(name, key, info["dtype"], tuple(int(s) for s in info["shape"]), f, start + b, e - b)
    used = {f.resolve() for g in groups for f in g.files}
    skipped = ()
    if root.is_dir():
        skipped = tuple(sorted(str(p.relative_to(root)) for p in root.rglob("*")
                               if p.is_file() and p.suffix in OTHER_WEIGHTS and p.resolve() not in used))
    return WeightSet(root, resolved.provenance, tuple(groups), tensors, metadata, skipped)


# -------------------------------------------------------------------------------------- name matching


@dataclass(frozen=True)
class Match:
    """An adapter module path matched to the base weight (and bias) it changes."""

    path: str
    weight: str
    bias: str | None


@dataclass(frozen=True)
class Matching:
    """The outcome of matching adapter paths to base weight keys, without raising.

    Args:
        matched: adapter path -> :class:`Match`.
        unmatched: paths that match no weight.
        ambiguous: path -> the several weight keys it matches.
    """

    matched: dict[str, Match]
    unmatched: list[str]
    ambiguous: dict[str, list[str]]


def find_matches(paths: Iterable[str], keys: Iterable[str]) -> Matching:
    """Match adapter module paths to base weight keys, reporting the paths that match none or several.

    Tried in order: ``<path>.weight`` exactly; ``<path>`` exactly (a layer on a parameter tensor); a unique key
    ending in ``.<path>.weight`` (the base adds a prefix such as transformers' ``model.`` or a pipeline
    component); the path with leading parts removed (the adapter was made on a wrapper the base does not have).
    """
    keys = set(keys)
    by_suffix: dict[str, list[str]] = {}
    for k in keys:
        if not k.endswith(".weight"):
            continue
        parts = k.removesuffix(".weight").split(".")
        for i in range(len(parts)):
            by_suffix.setdefault(".".join(parts[i:]), []).append(k)
    out: dict[str, Match] = {}
    unmatched: list[str] = []
    ambiguous: dict[str, list[str]] = {}
    for path in paths:
        found: list[str] = []
        if path + ".weight" in keys:
            found = [path + ".weight"]
        elif path in keys:  # the path of a parameter itself (PEFT target_parameters: experts.gate_up_proj)
            found = [path]
        else:
            found = sorted(by_suffix.get(path, []))
            parts = path.split(".")
            for i in (1, 2):  # the adapter was made on a wrapper: drop at most two leading parts, exact match only
                if not found and len(parts) - i >= 2 and ".".join(parts[i:]) + ".weight" in keys:
                    found = [".".join(parts[i:]) + ".weight"]
        if not found:
            unmatched.append(path)
        elif len(found) > 1:
            ambiguous[path] = found
        else:
            bias = found[0].removesuffix(".weight") + ".bias"
            out[path] = Match(path, found[0], bias if bias in keys else None)
    return Matching(out, unmatched, ambiguous)


def match_paths(paths: Iterable[str], keys: Iterable[str]) -> dict[str, Match]:
    """Match adapter module paths to base weight keys (the rules of :func:`find_matches`).

    Raises:
        ConfigError: some paths match no weight (listed), or match several.
    """
    m = find_matches(paths, keys)
    if m.unmatched:
        more = f" (+{len(m.unmatched) - 5} more)" if len(m.unmatched) > 5 else ""
        raise ConfigError(
            f"{len(m.unmatched)} adapter layer(s) match no weight of the base model: {', '.join(m.unmatched[:5])}{more}; "
            "check that the adapter belongs to this base"
        )
    if m.ambiguous:
        shown = "; ".join(f"{p} -> {f[:3]}" for p, f in list(m.ambiguous.items())[:3])
        raise ConfigError(f"adapter layer(s) match several base weights: {shown}; use a base with one model")
    return m.matched


def pread_into(fd: int, buf: bytearray, info: TensorInfo) -> None:
    """Read ``info``'s bytes into the start of ``buf`` with ``preadv`` (a short file is a clear error)."""
    view = memoryview(buf)
    done = 0
    while done < info.nbytes:
        n = os.preadv(fd, [view[done:info.nbytes]], info.begin + done)
        if n <= 0:
            raise FormatError(f"{info.file.name} ended while reading tensor '{info.name}'; the file is truncated, re-download it")
        done += n


def read_tensor(fd: int, info: TensorInfo) -> torch.Tensor:
    """Read one tensor's bytes with ``pread`` into a fresh tensor of its dtype and shape."""
    if info.nbytes == 0:
        return torch.empty(info.shape, dtype=info.torch_dtype)
    buf = bytearray(info.nbytes)
    pread_into(fd, buf, info)
    return torch.frombuffer(buf, dtype=info.torch_dtype).reshape(info.shape)


class TensorReader:
    """Reads tensors of one or more :class:`WeightSet` s one at a time, keeping one descriptor per file open.

    Use as a context manager: ``with TensorReader() as reader: t = reader.read(ws.tensors[key])``.
    """

    def __init__(self) -> None:
        self._fds: dict[Path, int] = {}

    def read(self, info: TensorInfo) -> torch.Tensor:
        """``info``'s tensor, read with ``pread`` into a fresh tensor of its dtype and shape."""
        fd = self._fds.get(info.file)
        if fd is None:
            fd = self._fds[info.file] = os.open(info.file, os.O_RDONLY)
        return read_tensor(fd, info)

    def close(self) -> None:
        """Close every file opened so far."""
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __enter__(self) -> TensorReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def is_weight_like(path: Path) -> bool:
    """True for weight files of any format (never copied as side files)."""
    return path.suffix in OTHER_WEIGHTS or path.name.endswith(".safetensors.index.json") or bool(
        re.search(r"\.(bin|safetensors)\.index\.json$", path.name))
