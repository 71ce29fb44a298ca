"""Where checkpoints come from and go to: hub ids, directories, files; safe reading; atomic writing.

A *source* is one of:

* a hub id ``org/name``, ``org/name@revision``, ``org/name:subfolder``, ``org/name@revision:subfolder``
  (the subfolder may name one file), resolved through ``huggingface_hub`` (so ``HF_HOME``, ``HF_HUB_CACHE``,
  ``HF_HUB_OFFLINE``, ``HF_TOKEN`` and ``HF_ENDPOINT`` are honoured exactly as in every HF library):
  :func:`resolve` downloads by patterns with ``snapshot_download``; :func:`resolve_selected` lists the repo
  first and downloads exactly the files a caller picks (adapters use it, so a repo that also holds model
  shards costs only the adapter's files);
* a local directory (optionally ``dir:subfolder``);
* a local file (``.safetensors``, or a legacy ``.bin`` loaded with ``weights_only=True`` only).

A subfolder never leaves its snapshot or directory: an absolute subfolder, a ``..`` component, or a symlink
that resolves outside the snapshot (for hub files: outside the repo's cache folder, where the snapshot's
links point) is refused with a :class:`~adaptkit.errors.SourceNotFoundError`.

Pickled checkpoints are never executed: ``torch.load(..., weights_only=True)`` refuses any pickle that
would run code, and adaptkit reports that as a :class:`~adaptkit.errors.FormatError`.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import glob
import itertools
import json
import os
import pickle
import re
import secrets
import shutil
import socket
import struct
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

import torch

from .errors import AdaptkitError, FormatError, OutputExistsError, OutputIsInputError, OutputWriteError, SourceNotFoundError

_HUB_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.\-]*/[\w.\-]+)(?:@(?P<rev>[^:]+))?(?::(?P<sub>.+))?$")

#: dtypes of the safetensors format and their sizes in bytes
ST_DTYPE_SIZES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8,
}


@dataclass(frozen=True)
class Resolved:
    """A source resolved to local files.

    Args:
        path: the local directory or file.
        spec: the source as the user gave it.
        repo_id: the hub repo for hub sources, else ``None``.
        revision: the requested revision (hub), else ``None``.
        commit: the commit hash of the snapshot (hub), else ``None``.
        subfolder: the subfolder inside the repo or directory, else ``None``.
    """

    path: Path
    spec: str
    repo_id: str | None = None
    revision: str | None = None
    commit: str | None = None
    subfolder: str | None = None

    @property
    def provenance(self) -> str:
        """``repo@commit:sub`` for hub sources, the absolute path otherwise."""
        if self.repo_id is None:
            return str(self.path)
        text = f"{self.repo_id}@{self.commit or self.revision or 'main'}"
        return f"{text}:{self.subfolder}" if self.subfolder else text


def parse_hub_id(spec: str) -> tuple[str, str | None, str | None] | None:
    """Split ``org/name[@revision][:subfolder]`` into its parts, or ``None`` when it is not a hub id."""
    m = _HUB_ID.match(spec)
    if not m:
        return None
    return m.group("repo"), m.group("rev"), m.group("sub")


def resolve(spec: str | os.PathLike, allow_patterns: list[str] | None = None) -> Resolved:
    """Resolve a source to local files.

    Args:
        spec: hub id, directory, ``directory:subfolder`` or file.
        allow_patterns: for hub ids, the file patterns to download (relative to the subfolder);
            ``None`` downloads the whole snapshot.

    Returns:
        A :class:`Resolved` whose ``path`` exists locally.

    Raises:
        SourceNotFoundError: the path does not exist, or the hub repo, revision or subfolder cannot be
            found (offline: not in the local cache).
    """
    text = os.fspath(spec)
    local = _resolve_local(text)
    if local is not None:
        return local
    repo, rev, sub = _hub_parts(text)
    unreachable = None if hub_offline() else hub_unreachable()
    return _resolve_hub(text, repo, rev, sub, allow_patterns=allow_patterns, unreachable=unreachable)


#: ``select(files, subfolder, repo_spec) -> (repo paths to download, repo path to read or None for the root)``
HubSelect = Callable[[list[str], str | None, str], tuple[list[str], str | None]]


def resolve_selected(spec: str | os.PathLike, select: HubSelect, allow_patterns: list[str] | None = None) -> Resolved:
    """Resolve a source like :func:`resolve`, downloading from the hub only the files ``select`` picks.

    Online, the repo's files are listed first (``HfApi().list_repo_files`` at the requested revision, so
    ``HF_TOKEN`` and ``HF_ENDPOINT`` apply), then ``select`` chooses from the names and exactly those
    files are fetched with ``hf_hub_download``. Offline (``HF_HUB_OFFLINE=1``), or when the hub cannot be
    reached, this is :func:`resolve` with ``allow_patterns``: the local cache snapshot is read.

    Args:
        spec: hub id, directory, ``directory:subfolder`` or file (local sources resolve as in :func:`resolve`).
        select: called as ``select(files, subfolder, repo_spec)`` with every file path of the repo,
            the subfolder (``None`` for the root; it may name a file) and the source without its
            subfolder (for messages). Returns the repo paths to download and the repo path the result
            should point at (``None``: the repo root). It raises to refuse (e.g. an ambiguous repo).
        allow_patterns: the patterns used offline, as in :func:`resolve`.

    Returns:
        A :class:`Resolved` whose ``path`` exists locally.

    Raises:
        SourceNotFoundError: as :func:`resolve`, or whatever ``select`` raises.
    """
    text = os.fspath(spec)
    local = _resolve_local(text)
    if local is not None:
        return local
    repo, rev, sub = _hub_parts(text)
    repo_spec = text.rsplit(":", 1)[0] if sub else text
    unreachable = None
    if not hub_offline():
        unreachable = hub_unreachable()
        if unreachable is None:
            files, unreachable = _list_hub_files(text, repo, rev)
    if hub_offline() or unreachable:  # the local cache: choose from the files it holds, as online from the listing
        cached = _resolve_hub(text, repo, rev, sub, allow_patterns=allow_patterns, unreachable=unreachable)
        root = _snapshot_root(cached)
        _, target = select(_snapshot_files(root), sub, repo_spec)
        path = root / target if target else root
        _confine(path, root, text)
        return Resolved(path=path, spec=text, repo_id=repo, revision=rev, commit=root.name, subfolder=sub)
    if sub and sub not in files and not any(f.startswith(f"{sub}/") for f in files):
        raise SourceNotFoundError(f"subfolder '{sub}' does not exist in {repo}@{rev or 'main'}; check the subfolder name")
    wanted, target = select(files, sub, repo_spec)
    root = _download_hub_files(text, repo, rev, wanted)
    path = root / target if target else root
    _confine(path, root, text)
    return Resolved(path=path, spec=text, repo_id=repo, revision=rev, commit=root.name, subfolder=sub)


def hub_offline() -> bool:
    """Whether huggingface_hub runs offline (``HF_HUB_OFFLINE=1``), as it decides itself."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def hub_unreachable() -> str | None:
    """``None`` when the hub (``HF_ENDPOINT``) answers, else why not; asked once per process and endpoint.

    One ``HEAD`` request through huggingface_hub's own HTTP client (its proxies, certificates and headers),
    without retries and with a connect limit of :data:`HUB_PROBE_TIMEOUT` seconds (less if
    ``HF_HUB_ETAG_TIMEOUT`` is smaller). Any HTTP answer counts as reachable. Without it an unreachable hub
    cost ~30 s of huggingface_hub's retries and a dozen lines of retry warnings before any result.
    """
    from huggingface_hub import constants

    return _probe(constants.ENDPOINT)


#: seconds to wait for a connection to the hub before using the local cache
HUB_PROBE_TIMEOUT = 5.0


@functools.lru_cache(maxsize=None)
def _probe(endpoint: str) -> str | None:
    from huggingface_hub import constants
    from huggingface_hub.utils import get_session

    limit = min(HUB_PROBE_TIMEOUT, float(constants.HF_HUB_ETAG_TIMEOUT))
    try:
        get_session().head(endpoint, timeout=limit, follow_redirects=False)
    except Exception as e:  # noqa: BLE001 - connection refused, DNS, timeout, proxy, TLS: all mean "not reachable"
        return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'no answer'}"
    return None


def _check_subfolder(sub: str, where: str) -> None:
    """Refuse a subfolder that could leave its snapshot or directory: absolute, or with a ``..`` component."""
    posix, windows = PurePosixPath(sub), PureWindowsPath(sub)
    if posix.is_absolute() or windows.is_absolute() or windows.anchor or ".." in (*posix.parts, *windows.parts):
        raise SourceNotFoundError(
            f"subfolder '{sub}' of {where} is absolute or has a '..' component, so it would leave {where}; "
            "name a path inside it, or pass the other directory as the source itself"
        )


def _confine(path: Path, root: Path, spec: str, local: bool = False) -> None:
    """Refuse ``path`` when it, or (hub snapshots) anything under it, resolves outside ``root``.

    Hub snapshot files are links into the repo's ``blobs`` folder, so for hub sources the repo's cache folder
    (the snapshot's grandparent) is the boundary; a local ``dir:sub`` must stay inside ``dir``.
    """
    inside = [root.resolve()] if local else [root.resolve(), (root.parent.parent / "blobs").resolve()]

    def escapes(p: Path) -> bool:
        r = p.resolve()
        return not any(r == b or b in r.parents for b in inside)

    where = f"directory {root}" if local else f"the snapshot of {spec.split(':', 1)[0]}"
    bad = path if escapes(path) else None
    if bad is None and not local and path.is_dir() and not path.is_symlink():
        bad = next((Path(d) / n for d, dirs, files in os.walk(path) for n in [*dirs, *files]
                    if Path(d, n).is_symlink() and escapes(Path(d) / n)), None)
    if bad is not None:
        raise SourceNotFoundError(
            f"'{spec}' leads outside {where}: {bad} resolves to {bad.resolve()}; remove that link, "
            "or pass the target directory as the source itself"
        )


def _snapshot_root(resolved: Resolved) -> Path:
    """The snapshot directory of a hub :class:`Resolved`."""
    root = resolved.path
    for _ in PurePosixPath(resolved.subfolder or "").parts:
        root = root.parent
    return root


def _snapshot_files(root: Path) -> list[str]:
    """Repo paths of the files a cache snapshot holds (links into the blobs count; linked directories not)."""
    files = []
    for d, dirs, names in os.walk(root):
        dirs[:] = [n for n in dirs if not Path(d, n).is_symlink()]
        files += [(Path(d) / n).relative_to(root).as_posix() for n in names]
    return sorted(files)


def _resolve_local(text: str) -> Resolved | None:
    """An existing file or directory, or ``dir:subfolder``; ``None`` when the source is not local."""
    local = Path(text).expanduser()
    if local.exists():
        return Resolved(path=local, spec=text)
    if ":" in text:
        base, sub = text.rsplit(":", 1)
        if Path(base).expanduser().is_dir():
            _check_subfolder(sub, base)
            target = Path(base).expanduser() / sub
            if not target.exists():
                raise SourceNotFoundError(f"subfolder '{sub}' does not exist in {base}; list the directory to see its adapters")
            _confine(target, Path(base).expanduser(), text, local=True)
            return Resolved(path=target, spec=text, subfolder=sub)
    return None


def _hub_parts(text: str) -> tuple[str, str | None, str | None]:
    """``(repo, revision, subfolder)`` of a hub id; the subfolder is checked and stripped of outer ``/``."""
    parts = parse_hub_id(text)
    if parts is None or text.startswith((".", "/", "~")):
        raise SourceNotFoundError(
            f"'{text}' is neither an existing file or directory nor a hub id of the form org/name[@revision][:subfolder]"
        )
    repo, rev, sub = parts
    if sub is not None:
        _check_subfolder(sub, f"hub repo {repo}")
        sub = sub.strip("/") or None
    return repo, rev, sub


def _hub_errors() -> tuple[type[BaseException], ...]:
    """What huggingface_hub raises for missing repos/files, bad ids and network failures."""
    from huggingface_hub.errors import (
        EntryNotFoundError,
        HfHubHTTPError,
        HFValidationError,
    )

    return (HFValidationError, EntryNotFoundError, OSError, *HfHubHTTPError.__bases__)


def _hub_error(spec: str, repo: str, rev: str | None, e: BaseException, where: str) -> SourceNotFoundError:
    """The one-line :class:`SourceNotFoundError` for a huggingface_hub exception."""
    from huggingface_hub.errors import (
        EntryNotFoundError,
        HFValidationError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    if isinstance(e, RevisionNotFoundError):
        return SourceNotFoundError(f"revision '{rev}' of {repo} was not found; check the branch, tag or commit")
    if isinstance(e, RepositoryNotFoundError):
        return SourceNotFoundError(
            f"hub repo '{repo}' was not found or is private; check the id, or set HF_TOKEN for a private repo"
        )
    if isinstance(e, (EntryNotFoundError, FileNotFoundError)):
        return SourceNotFoundError(
            f"'{spec}' could not be found {where}; download it once with network access or check the id and revision"
        )
    if isinstance(e, HFValidationError):
        return SourceNotFoundError(f"'{spec}' is not a valid hub id: {e}")
    # network problems surface as OSError / HTTP error subclasses
    return SourceNotFoundError(
        f"'{spec}' could not be downloaded ({type(e).__name__}: {e}); check the network or set HF_HUB_OFFLINE=1 to use the cache"
    )


def _list_hub_files(spec: str, repo: str, rev: str | None) -> tuple[list[str] | None, str | None]:
    """``(files, None)``: every file path of the repo at ``rev``; ``(None, reason)`` when the hub is unreachable."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import (
        HFValidationError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        return list(HfApi().list_repo_files(repo, revision=rev)), None
    except (RepositoryNotFoundError, RevisionNotFoundError, HFValidationError) as e:
        raise _hub_error(spec, repo, rev, e, "on the hub") from e
    except _hub_errors() as e:  # no network, hub down, ...: fall back to the cache as huggingface_hub does
        return None, f"{type(e).__name__}: {e}"


def _download_hub_files(spec: str, repo: str, rev: str | None, files: list[str]) -> Path:
    """Download exactly ``files`` (repo paths) with ``hf_hub_download``; return the snapshot directory."""
    from huggingface_hub import hf_hub_download

    root: Path | None = None
    revision = rev
    for name in files:
        try:
            local = Path(hf_hub_download(repo, name, revision=revision))
        except _hub_errors() as e:
            raise _hub_error(spec, repo, rev, e, "on the hub") from e
        if root is None:
            root = local.parents[len(PurePosixPath(name).parts) - 1]
            revision = root.name  # the rest from the same commit, even if the branch moves meanwhile
    if root is None:
        raise SourceNotFoundError(f"nothing to download for '{spec}'; name the file or subfolder to load")
    return root


def _resolve_hub(spec: str, repo: str, rev: str | None, sub: str | None, allow_patterns: list[str] | None,
                 unreachable: str | None = None) -> Resolved:
    """``snapshot_download`` with patterns; only the local cache when the hub was found ``unreachable``."""
    from huggingface_hub import snapshot_download

    patterns = None
    if allow_patterns is not None:
        patterns = [f"{sub}/{p}" if sub else p for p in allow_patterns]
    elif sub:
        patterns = [f"{sub}/*", f"{sub}/**"]
    if unreachable:
        where = f"in the local cache (the hub could not be reached: {unreachable})"
    elif hub_offline() or os.environ.get("HF_HUB_OFFLINE", "").lower() in {"1", "true", "yes", "on"}:
        where = "in the local cache (HF_HUB_OFFLINE is set)"
    else:
        where = "on the hub"
    try:
        root = Path(snapshot_download(repo, revision=rev, allow_patterns=patterns, local_files_only=bool(unreachable)))
    except _hub_errors() as e:
        from huggingface_hub.errors import EntryNotFoundError

        if unreachable and isinstance(e, (EntryNotFoundError, FileNotFoundError)):
            raise SourceNotFoundError(
                f"'{spec}' is not in the local cache and the hub could not be reached: {unreachable}; check the network "
                "(or HF_ENDPOINT), or download it once with network access; offline, set HF_HUB_OFFLINE=1 to use "
                "the cache without trying the hub"
            ) from e
        raise _hub_error(spec, repo, rev, e, where) from e
    path = root / sub if sub else root
    if not path.exists() or (path.is_dir() and not any(path.iterdir())):
        raise SourceNotFoundError(f"subfolder '{sub}' does not exist in {repo}@{rev or 'main'}; check the subfolder name")
    _confine(path, root, spec)
    return Resolved(path=path, spec=spec, repo_id=repo, revision=rev, commit=root.name, subfolder=sub)


# ----------------------------------------------------------------------------------------------- reading


def read_safetensors_header(path: Path) -> tuple[dict, int]:
    """Read and validate a safetensors header without loading tensors.

    Returns:
        ``(header, data_start)``: the parsed JSON header (with ``__metadata__`` if present) and the byte
        offset where tensor data begins.

    Raises:
        FormatError: the file is truncated, the header is not JSON, or offsets/shapes/sizes disagree.
    """
    size = path.stat().st_size
    fix = "re-download or re-export the file"
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise FormatError(f"{path.name} is not a safetensors file (only {size} bytes); {fix}")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8 or n > 100_000_000:
            raise FormatError(f"{path.name} is truncated or corrupt: its header claims {n} bytes but the file has {size}; {fix}")
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FormatError(f"{path.name} has a corrupt safetensors header ({e.__class__.__name__}); {fix}") from e
    except RecursionError as e:  # thousands of nested [ or {: json gives up at the interpreter's depth limit, at once
        raise FormatError(f"{path.name} has a corrupt safetensors header (nested too deeply to be a header); {fix}") from e
    if not isinstance(header, dict):
        raise FormatError(f"{path.name} has a corrupt safetensors header (not a JSON object); {fix}")
    data_len = size - 8 - n
    end_max = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
            nbytes = ST_DTYPE_SIZES[dtype]
            if not isinstance(shape, list):
                raise TypeError("shape is not a list")
            for s in shape:
                nbytes *= int(s)
        except (KeyError, TypeError, ValueError) as e:
            raise FormatError(f"{path.name}: tensor '{name}' has an invalid header entry; {fix}") from e
        if any(not _is_count(s) for s in shape):
            raise FormatError(f"{path.name}: tensor '{name}' has shape {shape}; sizes must be integers >= 0; {fix}")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(o) for o in offsets)
                and offsets[0] <= offsets[1]):
            raise FormatError(
                f"{path.name}: tensor '{name}' has data_offsets {offsets}; they must be two integers 0 <= begin <= end; {fix}"
            )
        begin, end = offsets
        if end - begin != nbytes:
            raise FormatError(
                f"{path.name}: header of tensor '{name}' lies about its size ({dtype} {shape} needs {nbytes} bytes, "
                f"offsets give {end - begin}); {fix}"
            )
        end_max = max(end_max, end)
    if end_max > data_len:
        raise FormatError(f"{path.name} is truncated: tensors need {end_max} bytes of data, the file has {data_len}; {fix}")
    return header, 8 + n


def _is_count(x: Any) -> bool:
    """An integer >= 0 (``bool`` is not one)."""
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Load all tensors and the metadata of a safetensors file, after validating its header.

    Raises:
        FormatError: the file is truncated or corrupt.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

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
    import warnings

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


# ----------------------------------------------------------------------------------------------- writing


def check_output(path: str | os.PathLike, overwrite: bool = False, inputs: Iterable[Any] = ()) -> Path:
    """Check an output path before any work is done; return it as a ``Path``.

    Args:
        path: the output file or directory.
        overwrite: allow replacing an existing output.
        inputs: what the command reads (sources as given: paths, ``dir:sub``, hub ids; adapters, whose
            ``source`` is used; lists of these; anything else is ignored), see :func:`check_not_input`.

    Raises:
        OutputIsInputError: the output is, contains or lies inside an input (checked even with ``overwrite``).
        OutputExistsError: ``path`` exists and ``overwrite`` is false, or a parent of ``path`` is a file.
    """
    out = Path(path).expanduser()
    check_not_input(out, inputs)
    for parent in out.absolute().parents:
        if parent.exists() or parent.is_symlink():
            if not parent.is_dir():
                raise OutputExistsError(
                    f"output {out} cannot be created: {parent} is a file, not a directory; "
                    "choose an output path whose parent is a directory"
                )
            break
    if out.exists() and not overwrite:
        raise OutputExistsError(f"output {out} already exists; choose another path or pass overwrite=True (--overwrite)")
    return out


def check_not_input(out: str | os.PathLike, inputs: Iterable[Any]) -> None:
    """Refuse an output that is, contains or lies inside an input, comparing resolved paths.

    Replacing an input would destroy it (``fuse B LORA -o B --overwrite`` replaced the base); writing inside
    one would change it. Paths are compared with symlinks resolved, and the targets of links inside a local
    input directory count as that input; a hub input occupies its repo's folder of the local cache (its
    snapshots and the blobs they link to).

    Raises:
        OutputIsInputError: with both paths and what to do.
    """
    target = Path(out).expanduser().resolve()
    for label, place in input_locations(inputs):
        if target == place:
            how, fix = "is", "writing it would destroy the input (--overwrite does not change that); choose another output path"
        elif place in target.parents:
            how, fix = "lies inside", f"writing there would change the input; choose an output outside {place}"
        elif target in place.parents:
            how, fix = "contains", f"replacing it would delete the input; choose an output that does not contain {place}"
        else:
            continue
        raise OutputIsInputError(f"output {out} {how} the input {label}: {fix}")


#: links followed inside one local input directory at most (a directory of links into a cache, say)
_MAX_LINKS_SCANNED = 10_000


def input_locations(inputs: Iterable[Any]) -> list[tuple[str, Path]]:
    """``(label, resolved path)`` for every place the given inputs occupy on this machine.

    Local paths (and ``dir:sub``) resolve with symlinks followed, plus the targets of the links inside a
    directory; a hub id, or an adapter's hub provenance ``org/name@commit:sub``, is its repo's folder in the
    local cache. Adapters count by their ``source``; sources that do not exist, and objects that are not
    sources (modules, tensors), are skipped: whatever reads them reports that.
    """
    found: list[tuple[str, Path]] = []
    todo = [inputs] if isinstance(inputs, (str, os.PathLike)) else list(inputs)
    while todo:
        item = todo.pop(0)
        if isinstance(item, (list, tuple)):
            todo[:0] = list(item)
            continue
        if not isinstance(item, (str, os.PathLike)):
            item = getattr(item, "source", None)
            if not isinstance(item, (str, os.PathLike)):
                continue
        found += _locations(os.fspath(item))
    return found


def _locations(text: str) -> list[tuple[str, Path]]:
    try:
        local = _resolve_local(text)
    except SourceNotFoundError:
        return []
    if local is not None:
        path = local.path.resolve()
        places = [(f"{text} ({path})" if str(path) != text else text, path)]
        if path.is_dir():
            links = (Path(d, n) for d, dirs, names in os.walk(path) for n in [*dirs, *names])
            for entry in itertools.islice(links, _MAX_LINKS_SCANNED):
                if entry.is_symlink():
                    places.append((f"{text} (its link {entry} points there)", entry.resolve()))
        return places
    parts = parse_hub_id(text)
    if parts is None or text.startswith((".", "/", "~")):
        return []
    from huggingface_hub import constants
    from huggingface_hub.file_download import repo_folder_name

    folder = (Path(constants.HF_HUB_CACHE) / repo_folder_name(repo_id=parts[0], repo_type="model")).resolve()
    return [(f"hub repo {parts[0]} (its local cache {folder})", folder)]


#: disk errors a write can meet: what went wrong, and what to do
_WRITE_ERRORS = {
    errno.ENOSPC: ("the disk is full (no space left on device)", "free space there or choose an output on another disk"),
    getattr(errno, "EDQUOT", errno.ENOSPC): ("the disk quota is exceeded",
                                             "free space within the quota or choose an output on another disk"),
    errno.EFBIG: ("a file would exceed the file-size limit (ulimit -f) or the file system's largest file",
                  "raise the limit (ulimit -f unlimited), write smaller shards (fuse --shard-size), or choose an "
                  "output on another file system"),
    errno.EROFS: ("the file system is read-only", "choose an output on a writable disk"),
    errno.EACCES: ("permission denied", "choose an output in a directory you can write to"),
    errno.EPERM: ("operation not permitted", "choose an output in a directory you can write to"),
}


def _write_error(out: Path, tmp: Path | None, e: BaseException) -> OutputWriteError | None:
    """The :class:`OutputWriteError` for a disk error met while writing ``out``; ``None`` for other errors.

    A permission error counts only while the temporary is made (``tmp`` is ``None``) or when it names the
    temporary or ``out``: an input that cannot be read is not a write error. The others come only from writing.
    """
    if not isinstance(e, OSError) or isinstance(e, AdaptkitError) or e.errno not in _WRITE_ERRORS:
        return None
    if e.errno in (errno.EACCES, errno.EPERM) and tmp is not None and e.filename is not None:
        name = os.fspath(e.filename)
        if not (name == str(out) or name.startswith(str(tmp))):
            return None
    what, fix = _WRITE_ERRORS[e.errno]
    err = OutputWriteError(f"could not write {out}: {what} [{errno.errorcode[e.errno]}]; {fix} (nothing was written)")
    err.errno = e.errno
    return err


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike, overwrite: bool = False, directory: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it into place when the block succeeds.

    On any exception (or a kill) nothing appears at ``path``: the temporary is removed on exceptions and
    is a hidden ``.<name>.adaptkit-tmp-<pid>@<host>-*`` sibling otherwise; the next write to the same
    ``path`` removes such leftovers of processes of this host that no longer run (a ``kill -9`` during a
    fuse would otherwise leave a model-sized hidden directory). An existing ``path`` is replaced only
    with ``overwrite``; when ``path`` is a symlink, the link is replaced (its target is left alone).

    Args:
        path: final output path.
        overwrite: replace an existing output.
        directory: the output is a directory (else a single file).

    Raises:
        OutputExistsError: as :func:`check_output`.
        OutputWriteError: the disk is full, a file too large, the target read-only or not writable: one
            error naming ``path`` (not the temporary), raised from the ``OSError``.
    """
    out = check_output(path, overwrite)
    parent = out.parent if str(out.parent) else Path(".")
    tmp: Path | None = None
    try:
        parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_temporaries(parent, out.name)
        prefix = f".{out.name}.adaptkit-tmp-{os.getpid()}@{_host()}-"
        tmp = _new_temporary(parent, prefix, directory)
    except OSError as e:
        err = _write_error(out, tmp, e)
        if err is None:
            raise
        raise err from e
    try:
        yield tmp
        if out.exists() or out.is_symlink():
            if not overwrite:
                raise OutputExistsError(f"output {out} appeared while writing; choose another path or pass overwrite=True")
            old = parent / f".{out.name}.adaptkit-old-{os.getpid()}"
            os.replace(out, old)
            os.replace(tmp, out)
            _remove(old)
        else:
            os.replace(tmp, out)
    except BaseException as e:
        _remove(tmp)
        err = _write_error(out, tmp, e)
        if err is None:
            raise
        raise err from e


def _remove(path: Path) -> None:
    """Remove a file, a link (never what it points to) or a directory tree; quietly."""
    if path.is_symlink() or not path.is_dir():
        path.unlink(missing_ok=True)
    else:
        shutil.rmtree(path, ignore_errors=True)


def _new_temporary(parent: Path, prefix: str, directory: bool) -> Path:
    """Create a fresh ``prefix<random>`` directory or empty file in ``parent``.

    Made with ``mkdir``/``open(O_EXCL)`` and the modes a plain ``mkdir``/``open`` use, so the kernel applies
    the umask (``tempfile.mkdtemp``/``mkstemp`` would make the output private to the owner, and reading the
    umask with ``os.umask`` would briefly change it for every thread of the process).
    """
    for _ in range(100):
        tmp = parent / f"{prefix}{secrets.token_hex(4)}"
        try:
            if directory:
                os.mkdir(tmp, 0o777)
            else:
                os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"could not create a temporary beside {parent}; remove the {prefix}* entries there")


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9]", "", socket.gethostname())[:32] or "host"


_TEMP_OWNER = re.compile(r"\.adaptkit-tmp-(\d+)@([A-Za-z0-9]+)-")


def _remove_stale_temporaries(parent: Path, name: str) -> None:
    """Remove ``.<name>.adaptkit-tmp-*`` leftovers whose writer (a process of this host) is gone."""
    host = _host()
    for stale in parent.glob(f".{glob.escape(name)}.adaptkit-tmp-*"):
        m = _TEMP_OWNER.search(stale.name)
        if not m or m.group(2) != host or _pid_alive(int(m.group(1))):
            continue  # another host's, a running writer's, or not ours to judge
        _remove(stale)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user
        return True
    return True


def write_safetensors(tensors: Mapping[str, torch.Tensor], path: Path, metadata: Mapping[str, str] | None = None) -> None:
    """Write tensors (made contiguous, storage not shared) and string metadata to ``path``."""
    from safetensors.torch import save

    clean = {k: v.detach().contiguous().clone() if _shares_storage(v) else v.detach().contiguous() for k, v in tensors.items()}
    meta = {str(k): str(v) for k, v in (metadata or {}).items()}
    data = save(clean, metadata=meta or None)  # serialised here and written by Python: disk errors keep their errno
    with open(path, "wb") as f:
        f.write(data)


def _shares_storage(t: torch.Tensor) -> bool:
    return t.untyped_storage().nbytes() != t.numel() * t.element_size()
