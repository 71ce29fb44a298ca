"""Where checkpoints come from: hub ids, directories and files, resolved to local paths.

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

This module only finds files. Reading them is :mod:`adaptkit.io.safetensors` (adapters, whole files) and
:mod:`adaptkit.io.base_model` (base models, tensor by tensor); writing is :mod:`adaptkit.io.outputs` (checks
and atomic outputs) with the serialisers of :mod:`adaptkit.io.safetensors`.
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath

from ..errors import SourceNotFoundError

_HUB_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.\-]*/[\w.\-]+)(?:@(?P<rev>[^:]+))?(?::(?P<sub>.+))?$")


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


__all__ = ["HUB_PROBE_TIMEOUT", "HubSelect", "Resolved", "hub_offline", "hub_unreachable", "parse_hub_id", "resolve",
           "resolve_selected"]
