"""Where outputs go: checked before any work, written atomically, disk errors reported against the output.

:func:`check_output` refuses, before a command does any work, an output that is, contains or lies inside one
of its inputs (resolved paths: symlinks followed, hub sources as their cache folder), an existing output
without ``overwrite``, and a parent that is a file. :func:`atomic_output` writes to a hidden temporary beside
the output and renames it into place when complete; a full disk, a file-size limit or a read-only target is
one :class:`~adaptkit.errors.OutputWriteError` naming the output. Every writer (the formats' ``write``, the
fuse/unfuse/LoftQ shard writers, the HTML reports) writes inside :func:`atomic_output`; what it writes is
serialised by :mod:`adaptkit.io.safetensors`.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import itertools
import os
import re
import secrets
import shutil
import socket
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from ..errors import (
    AdaptkitError,
    OutputExistsError,
    OutputIsInputError,
    OutputWriteError,
    SourceNotFoundError,
)
from .sources import _resolve_local, parse_hub_id


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
