"""Which files of a hub repo make up one adapter, asked of each format in :data:`~adaptkit.formats.FORMATS`.

Online :func:`adaptkit.formats.load` lists the repo first and downloads exactly one adapter's files. Each
format says which files of a folder listing are its adapter (``select_files``); this module walks the
formats in table order (PEFT, then diffusers, then a single kohya/LyCORIS file), narrows the listing to
the requested subfolder, and explains what it looked for when nothing matches.
"""

from __future__ import annotations

from ..errors import SourceNotFoundError
from .base import AmbiguousSelection, is_model_weights
from .registry import FORMATS, format_module


def allow_patterns(fmt: str | None) -> list[str]:
    """The file patterns of one format, or of all (offline access reads only these)."""
    if fmt is not None:
        return list(format_module(fmt).ALLOW_PATTERNS)
    patterns: list[str] = []
    for f in FORMATS.values():
        patterns += [p for p in f.ALLOW_PATTERNS if p not in patterns]
    return patterns


def select_hub_files(fmt: str | None, files: list[str], sub: str | None, repo_spec: str) -> tuple[list[str], str | None]:
    """Pick the files of the one adapter at ``sub`` of a hub repo from the repo's file names.

    The formats are asked in table order (PEFT ``adapter_config.json`` + weights, then diffusers
    ``pytorch_lora_weights.safetensors``, then a single kohya/LyCORIS ``.safetensors`` at the top of the
    (sub)folder); ``fmt`` restricts the choice to one format. A ``sub`` that names a file selects that file
    (plus what its format needs beside it, such as a PEFT config).

    Returns:
        ``(repo paths to download, repo path to read)``, as :func:`adaptkit.io.sources.resolve_selected` wants.

    Raises:
        SourceNotFoundError: no adapter of the format there, or several candidates (the message lists them and
            says how to name one).
    """
    names = set(files)
    if sub and sub in names:  # one file of the repo
        folder, _, file_name = sub.rpartition("/")
        prefix = f"{folder}/" if folder else ""
        listing = sorted(f[len(prefix):] for f in files if f.startswith(prefix) and "/" not in f[len(prefix):])
        for f in FORMATS.values():
            chosen = f.select_files(listing, file_name)
            if chosen is not None:
                return [prefix + n for n in chosen.files], sub
        return [sub], sub
    prefix = f"{sub}/" if sub else ""
    top = sorted(f[len(prefix):] for f in files if f.startswith(prefix) and "/" not in f[len(prefix):])
    wanted = [format_module(fmt)] if fmt else list(FORMATS.values())
    for f in wanted:
        try:
            chosen = f.select_files(top)
        except AmbiguousSelection as e:
            raise SourceNotFoundError(
                f"{repo_spec}{':' + sub if sub else ''} holds {len(e.candidates)} candidate adapter files "
                f"({', '.join(e.candidates)}); name the one to load, e.g. '{repo_spec}:{prefix}{e.candidates[0]}'"
            ) from None
        if chosen is not None:
            return [prefix + n for n in chosen.files], (prefix + chosen.read if chosen.read else sub)
    where = f"{repo_spec}:{sub}" if sub else repo_spec
    looked = "; ".join(f.LOOKED_FOR for f in wanted)
    models = [n for n in top if is_model_weights(n)]
    subs = sorted({rel.split("/")[0] for f in files if f.startswith(prefix) and (rel := f[len(prefix):]).count("/") == 1
                   and any(g.is_adapter_file(rel.split("/")[1]) for g in FORMATS.values())})
    if subs:
        hint = f"it holds adapters in subfolders {subs}: load one as '{repo_spec}:{prefix}{subs[0]}'"
    elif models:
        hint = f"it holds only model weights ({', '.join(models[:3])}); name the file as '{repo_spec}:{prefix}<file>' if it is an adapter"
    else:
        hint = f"name the adapter's file or subfolder as '{repo_spec}:<path>'"
    raise SourceNotFoundError(f"no adapter found in {where} (looked for {looked}); {hint}")


__all__ = ["allow_patterns", "select_hub_files"]
