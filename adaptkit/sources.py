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

Pickled checkpoints are never executed: ``torch.load(..., weights_only=True)`` refuses any pickle that
would run code, and adaptkit reports that as a :class:`~adaptkit.errors.FormatError`.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import pickle
import re
import secrets
import shutil
import socket
import struct
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import torch

from .errors import FormatError, OutputExistsError, SourceNotFoundError

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
    return _resolve_hub(text, *_hub_parts(text), allow_patterns=allow_patterns)


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
    if hub_offline():
        return _resolve_hub(text, repo, rev, sub, allow_patterns=allow_patterns)
    files, unreachable = _list_hub_files(text, repo, rev)
    if sub:
        sub = sub.strip("/") or None
    if files is None:
        return _resolve_hub(text, repo, rev, sub, allow_patterns=allow_patterns, unreachable=unreachable)
    if sub and sub not in files and not any(f.startswith(f"{sub}/") for f in files):
        raise SourceNotFoundError(f"subfolder '{sub}' does not exist in {repo}@{rev or 'main'}; check the subfolder name")
    wanted, target = select(files, sub, text.rsplit(":", 1)[0] if sub else text)
    root = _download_hub_files(text, repo, rev, wanted)
    path = root / target if target else root
    return Resolved(path=path, spec=text, repo_id=repo, revision=rev, commit=root.name, subfolder=sub)


def hub_offline() -> bool:
    """Whether huggingface_hub runs offline (``HF_HUB_OFFLINE=1``), as it decides itself."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _resolve_local(text: str) -> Resolved | None:
    """An existing file or directory, or ``dir:subfolder``; ``None`` when the source is not local."""
    local = Path(text).expanduser()
    if local.exists():
        return Resolved(path=local, spec=text)
    if ":" in text:
        base, sub = text.rsplit(":", 1)
        if Path(base).expanduser().is_dir():
            target = Path(base).expanduser() / sub
            if not target.exists():
                raise SourceNotFoundError(f"subfolder '{sub}' does not exist in {base}; list the directory to see its adapters")
            return Resolved(path=target, spec=text, subfolder=sub)
    return None


def _hub_parts(text: str) -> tuple[str, str | None, str | None]:
    parts = parse_hub_id(text)
    if parts is None or text.startswith((".", "/", "~")):
        raise SourceNotFoundError(
            f"'{text}' is neither an existing file or directory nor a hub id of the form org/name[@revision][:subfolder]"
        )
    return parts


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
        raise _hub_error(spec, repo, rev, e, where) from e
    path = root / sub if sub else root
    if not path.exists() or (path.is_dir() and not any(path.iterdir())):
        raise SourceNotFoundError(f"subfolder '{sub}' does not exist in {repo}@{rev or 'main'}; check the subfolder name")
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
    if not isinstance(header, dict):
        raise FormatError(f"{path.name} has a corrupt safetensors header (not a JSON object); {fix}")
    data_len = size - 8 - n
    end_max = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = info["dtype"], info["shape"], info["data_offsets"]
            nbytes = ST_DTYPE_SIZES[dtype]
            for s in shape:
                nbytes *= int(s)
        except (KeyError, TypeError, ValueError) as e:
            raise FormatError(f"{path.name}: tensor '{name}' has an invalid header entry; {fix}") from e
        if end - begin != nbytes or begin < 0:
            raise FormatError(
                f"{path.name}: header of tensor '{name}' lies about its size ({dtype} {shape} needs {nbytes} bytes, "
                f"offsets give {end - begin}); {fix}"
            )
        end_max = max(end_max, end)
    if end_max > data_len:
        raise FormatError(f"{path.name} is truncated: tensors need {end_max} bytes of data, the file has {data_len}; {fix}")
    return header, 8 + n


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


def check_output(path: str | os.PathLike, overwrite: bool = False) -> Path:
    """Refuse an existing output path unless ``overwrite``; return it as a ``Path``."""
    out = Path(path).expanduser()
    if out.exists() and not overwrite:
        raise OutputExistsError(f"output {out} already exists; choose another path or pass overwrite=True (--overwrite)")
    return out


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike, overwrite: bool = False, directory: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it into place when the block succeeds.

    On any exception (or a kill) nothing appears at ``path``: the temporary is removed on exceptions and
    is a hidden ``.<name>.adaptkit-tmp-<pid>@<host>-*`` sibling otherwise; the next write to the same
    ``path`` removes such leftovers of processes of this host that no longer run (a ``kill -9`` during a
    fuse would otherwise leave a model-sized hidden directory). An existing ``path`` is replaced only
    with ``overwrite``.

    Args:
        path: final output path.
        overwrite: replace an existing output.
        directory: the output is a directory (else a single file).
    """
    out = check_output(path, overwrite)
    parent = out.parent if str(out.parent) else Path(".")
    parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(parent, out.name)
    prefix = f".{out.name}.adaptkit-tmp-{os.getpid()}@{_host()}-"
    tmp = _new_temporary(parent, prefix, directory)
    try:
        yield tmp
        if out.exists():
            if not overwrite:
                raise OutputExistsError(f"output {out} appeared while writing; choose another path or pass overwrite=True")
            old = parent / f".{out.name}.adaptkit-old-{os.getpid()}"
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink(missing_ok=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        raise


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
        shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink(missing_ok=True)


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
    from safetensors.torch import save_file

    clean = {k: v.detach().contiguous().clone() if _shares_storage(v) else v.detach().contiguous() for k, v in tensors.items()}
    meta = {str(k): str(v) for k, v in (metadata or {}).items()}
    save_file(clean, str(path), metadata=meta or None)


def _shares_storage(t: torch.Tensor) -> bool:
    return t.untyped_storage().nbytes() != t.numel() * t.element_size()
