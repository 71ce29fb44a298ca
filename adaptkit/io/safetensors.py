"""The safetensors format, and legacy pickled state dicts: one dtype table, one header parser, read and write.

Everything in adaptkit that touches safetensors bytes goes through here:

* :data:`DTYPES`: every safetensors dtype with its torch dtype and size (:data:`ST_DTYPE_SIZES`,
  :data:`ST_TO_TORCH`, :data:`TORCH_TO_ST` and :data:`FLOAT_ST` are views of it);
* :func:`parse_header` validates a header given as bytes (hostile files: a header larger than the file,
  JSON nested to exhaust the parser, negative or non-integer sizes, offsets that overlap the end, sizes
  that disagree with dtype x shape are each one :class:`~adaptkit.errors.FormatError`), and
  :func:`read_safetensors_header` applies it to a file without reading any tensor data;
* :func:`read_safetensors` / :func:`read_pickle_weights` / :func:`read_weights` load a whole (small) file:
  adapters; base models are read tensor by tensor by :mod:`adaptkit.io.base_model`;
* :func:`encode_header` builds a header and :func:`write_safetensors` streams tensors after it (the format
  writers call it inside :func:`adaptkit.io.outputs.atomic_output`; the shard writer plans its headers with
  :func:`encode_header` too).

Pickled checkpoints are never executed: ``torch.load(..., weights_only=True)`` refuses any pickle that
would run code, and adaptkit reports that as a :class:`~adaptkit.errors.FormatError`.
"""

from __future__ import annotations

import json
import math
import pickle
import struct
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from ..errors import FormatError

#: every dtype of the safetensors format: name -> (torch dtype, or ``None`` where this torch has none; bytes)
DTYPES: dict[str, tuple[torch.dtype | None, int]] = {
    "BOOL": (torch.bool, 1), "U8": (torch.uint8, 1), "I8": (torch.int8, 1),
    "F8_E5M2": (torch.float8_e5m2, 1), "F8_E4M3": (torch.float8_e4m3fn, 1),
    "I16": (torch.int16, 2), "U16": (getattr(torch, "uint16", None), 2), "F16": (torch.float16, 2),
    "BF16": (torch.bfloat16, 2), "I32": (torch.int32, 4), "U32": (getattr(torch, "uint32", None), 4),
    "F32": (torch.float32, 4), "I64": (torch.int64, 8), "U64": (getattr(torch, "uint64", None), 8),
    "F64": (torch.float64, 8),
}
#: dtype name -> bytes per element
ST_DTYPE_SIZES: dict[str, int] = {name: size for name, (_, size) in DTYPES.items()}
#: dtype name -> torch dtype (the dtypes adaptkit reads and writes; unsigned 16/32/64-bit stay byte copies)
ST_TO_TORCH: dict[str, torch.dtype] = {name: dt for name, (dt, _) in DTYPES.items()
                                       if dt is not None and name not in {"U16", "U32", "U64"}}
#: torch dtype -> dtype name
TORCH_TO_ST: dict[torch.dtype, str] = {dt: name for name, dt in ST_TO_TORCH.items()}
#: the floating-point dtypes an adapter can change (float8 weights are quantised: never fused into)
FLOAT_ST = frozenset({"F64", "F32", "F16", "BF16"})
#: largest header accepted (safetensors' own limit)
MAX_HEADER = 100_000_000
_FIX = "re-download or re-export the file"


def read_safetensors_header(path: Path) -> tuple[dict, int]:
    """Read and validate a safetensors header without loading tensors.

    Returns:
        ``(header, data_start)``: the parsed JSON header (with ``__metadata__`` if present) and the byte
        offset where tensor data begins.

    Raises:
        FormatError: the file is truncated, the header is not JSON, or offsets/shapes/sizes disagree.
    """
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        n = header_size(head, size, path.name)
        raw = f.read(n)
    return parse_header(raw, size - 8 - n, path.name), 8 + n


def header_size(head: bytes, size: int, name: str) -> int:
    """The header length a file's first 8 bytes give, checked against the file's ``size``.

    Raises:
        FormatError: fewer than 8 bytes, or a header longer than the file (or than :data:`MAX_HEADER`).
    """
    fix = _FIX
    if len(head) < 8:
        raise FormatError(f"{name} is not a safetensors file (only {size} bytes); {fix}")
    (n,) = struct.unpack("<Q", head[:8])
    if n > size - 8 or n > MAX_HEADER:
        raise FormatError(f"{name} is truncated or corrupt: its header claims {n} bytes but the file has {size}; {fix}")
    return n


def parse_header(raw: bytes, data_len: int, name: str) -> dict:
    """Parse and validate a safetensors header (the JSON after the 8-byte length), given as bytes.

    Args:
        raw: the header bytes.
        data_len: bytes of tensor data that follow the header.
        name: the file's name, for messages.

    Returns:
        The header: tensor name -> ``{"dtype", "shape", "data_offsets"}``, and ``__metadata__`` if present.

    Raises:
        FormatError: the header is not a JSON object, or an entry's dtype, shape, offsets or size is invalid
            or lies beyond ``data_len``.
    """
    fix = _FIX
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FormatError(f"{name} has a corrupt safetensors header ({e.__class__.__name__}); {fix}") from e
    except RecursionError as e:  # thousands of nested [ or {: json gives up at the interpreter's depth limit, at once
        raise FormatError(f"{name} has a corrupt safetensors header (nested too deeply to be a header); {fix}") from e
    if not isinstance(header, dict):
        raise FormatError(f"{name} has a corrupt safetensors header (not a JSON object); {fix}")
    end_max = 0
    for key, info in header.items():
        if key == "__metadata__":
            continue
        try:
            dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
            nbytes = ST_DTYPE_SIZES[dtype]
            if not isinstance(shape, list):
                raise TypeError("shape is not a list")
            for s in shape:
                nbytes *= int(s)
        except (KeyError, TypeError, ValueError) as e:
            raise FormatError(f"{name}: tensor '{key}' has an invalid header entry; {fix}") from e
        if any(not _is_count(s) for s in shape):
            raise FormatError(f"{name}: tensor '{key}' has shape {shape}; sizes must be integers >= 0; {fix}")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(o) for o in offsets)
                and offsets[0] <= offsets[1]):
            raise FormatError(
                f"{name}: tensor '{key}' has data_offsets {offsets}; they must be two integers 0 <= begin <= end; {fix}"
            )
        begin, end = offsets
        if end - begin != nbytes:
            raise FormatError(
                f"{name}: header of tensor '{key}' lies about its size ({dtype} {shape} needs {nbytes} bytes, "
                f"offsets give {end - begin}); {fix}"
            )
        end_max = max(end_max, end)
    if end_max > data_len:
        raise FormatError(f"{name} is truncated: tensors need {end_max} bytes of data, the file has {data_len}; {fix}")
    return header


def _is_count(x: Any) -> bool:
    """An integer >= 0 (``bool`` is not one)."""
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Load all tensors and the metadata of a safetensors file, after validating its header.

    Raises:
        FormatError: the file is truncated or corrupt.
    """
    header, _ = read_safetensors_header(path)
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise FormatError(f"{path.name} could not be read as safetensors ({e}); re-download or re-export the file") from e
    return tensors, dict(header.get("__metadata__") or {})


def read_pickle_weights(path: Path) -> dict[str, torch.Tensor]:
    """Load a legacy ``.bin`` state dict with ``torch.load(weights_only=True)``; never executes pickled code.

    Raises:
        FormatError: the pickle holds anything but tensors (it would run code) or is corrupt.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, AttributeError, ValueError) as e:
        raise FormatError(
            f"refusing to load {path.name}: it is not a plain tensor pickle (it may try to run code); "
            "convert it to safetensors with a tool you trust, or get the .safetensors file"
        ) from e
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise FormatError(f"{path.name} does not hold a flat state dict of tensors; get the .safetensors file")
    return dict(obj)


def read_weights(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a ``.safetensors`` or legacy ``.bin``/``.pt``/``.pth`` file."""
    if path.suffix == ".safetensors":
        return read_safetensors(path)
    if path.suffix in {".bin", ".pt", ".pth", ".ckpt"}:
        return read_pickle_weights(path), {}
    raise FormatError(f"{path.name}: unknown weight file type '{path.suffix}'; expected .safetensors (or a legacy .bin)")


def encode_header(entries: Sequence[tuple[str, str, Sequence[int]]], metadata: Mapping[str, str] | None = None
                  ) -> bytes:
    """The bytes that open a safetensors file: its 8-byte length, then the JSON header padded with spaces.

    Args:
        entries: ``(name, dtype name, shape)`` of each tensor, in the order their data follows the header.
        metadata: string metadata (``__metadata__``), or ``None``.

    Returns:
        The header bytes; tensor data starts right after them, each tensor at the offset the header names.
    """
    head: dict[str, Any] = {}
    if metadata:
        head["__metadata__"] = dict(metadata)
    offset = 0
    for name, dtype, shape in entries:
        size = math.prod(shape) * ST_DTYPE_SIZES[dtype]
        head[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(head, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """The raw little-endian bytes of a tensor (made contiguous), without copying a contiguous one."""
    flat = t.detach().contiguous().reshape(-1)
    if flat.numel() == 0:
        return memoryview(b"")
    return memoryview(flat.view(torch.uint8).numpy())


def write_safetensors(tensors: Mapping[str, torch.Tensor], path: Path, metadata: Mapping[str, str] | None = None) -> None:
    """Write tensors and string metadata to ``path`` as a safetensors file.

    The header is written first, then each tensor's bytes straight from its storage (no serialised copy of the
    whole file in memory); tensors are laid out as safetensors does (larger dtypes first, then by name) so
    every tensor is aligned. Disk errors keep their errno (``ENOSPC``, ``EROFS``) for the caller's message.

    Raises:
        FormatError: a tensor has a dtype safetensors cannot store.
    """
    meta = {str(k): str(v) for k, v in (metadata or {}).items()}
    items: list[tuple[str, str, torch.Tensor]] = []
    for name, t in tensors.items():
        dtype = TORCH_TO_ST.get(t.dtype)
        if dtype is None:
            raise FormatError(f"tensor '{name}' has dtype {t.dtype}, which safetensors cannot store; cast it first")
        items.append((str(name), dtype, t))
    items.sort(key=lambda e: (-ST_DTYPE_SIZES[e[1]], e[0]))
    with open(path, "wb") as f:
        f.write(encode_header([(n, d, tuple(t.shape)) for n, d, t in items], meta or None))
        for _, _, t in items:
            f.write(tensor_bytes(t))


__all__ = ["DTYPES", "FLOAT_ST", "MAX_HEADER", "ST_DTYPE_SIZES", "ST_TO_TORCH", "TORCH_TO_ST", "encode_header",
           "header_size", "parse_header", "read_pickle_weights", "read_safetensors", "read_safetensors_header",
           "read_weights", "tensor_bytes", "write_safetensors"]
