"""``adaptkit fuse`` / ``unfuse`` / ``extract``: adapters into and out of base weights, streaming shard by shard."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click

from ..core.params import EMBEDDINGS, ENERGY, NORMS, RANK, SVD_METHOD
from ..errors import ConfigError
from ._options import (
    declared,
    fuse_options,
    output_options,
    overwrite_option,
    progress_options,
)
from ._render import render_table


def _run_fuse(func: Callable[..., Any], base: str, adapters: tuple[str, ...], out: str | None, dry_run: bool,
              as_json: bool, as_csv: bool, **kwargs: Any) -> None:
    if out is None and not dry_run:
        raise ConfigError("no output given; pass --out DIR (or --dry-run to only list what would change)")
    result = func(base, list(adapters), out, dry_run=dry_run, **kwargs)
    render_table(result.plan, as_json=as_json, as_csv=as_csv, header=result.summary())


@click.command()
@fuse_options
def fuse(base: str, adapters: tuple[str, ...], out: str | None, dry_run: bool, as_json: bool, as_csv: bool,
         **kwargs: Any) -> None:
    """Fuse ADAPTER... into BASE's weights (hub id, dir of safetensors shards, or file), streaming shard by shard.

    Examples:

    \b
      adaptkit fuse org/base-model ./my-adapter -o fused/
      adaptkit fuse ./base-model ./a ./b --weights 1,0.5 -o fused/ --dtype bf16 --shard-size 5GB
      adaptkit fuse ./base-model ./my-adapter --dry-run   # list what would change, write nothing
    """
    from ..ops.fuse import fuse as run

    _run_fuse(run, base, adapters, out, dry_run, as_json, as_csv, **kwargs)


@click.command()
@fuse_options
def unfuse(base: str, adapters: tuple[str, ...], out: str | None, dry_run: bool, as_json: bool, as_csv: bool,
           **kwargs: Any) -> None:
    """Subtract fused additive ADAPTER... from BASE again (DoRA and IA3 cannot be unfused).

    Examples:

    \b
      adaptkit unfuse fused/ ./my-adapter -o restored/
      adaptkit unfuse fused/ ./a ./b --weights 1,0.5 -o restored/
    """
    from ..ops.fuse import unfuse as run

    _run_fuse(run, base, adapters, out, dry_run, as_json, as_csv, **kwargs)


@click.command()
@click.argument("base")
@click.argument("tuned")
@click.option("--out", "-o", required=True, help="Output directory for the PEFT LoRA adapter.")
@declared(RANK, "-r", default=None, help="LoRA rank (the maximum with --energy).")
@declared(ENERGY, default=None, help="Per-layer rank keeping this fraction of ||tuned-base||^2 (e.g. 0.9).")
@declared(EMBEDDINGS, default="skip", show_default=True,
          help="Changed embeddings: drop, embedding LoRA, or store whole (modules_to_save).")
@declared(NORMS, default="skip", show_default=True, help="Changed norms and lone biases: drop, or store whole "
          "(modules_to_save).")
@declared(SVD_METHOD, default="auto", show_default=True, help="SVD: exact, randomized, or auto (exact for small "
          "matrices).")
@overwrite_option()
@progress_options
@output_options
def extract(base: str, tuned: str, out: str, rank: int | None, energy: float | None, embeddings: str, norms: str,
            method: str, overwrite: bool, progress: bool | None, as_json: bool, as_csv: bool) -> None:
    """Extract a LoRA from TUNED - BASE (per-layer truncated SVD) and print the retained energy per layer.

    Examples:

    \b
      adaptkit extract org/base-model ./tuned-model -o lora/ --rank 64
      adaptkit extract ./base-model ./tuned-model -o lora/ --energy 0.9 --rank 128   # per-layer ranks
      adaptkit extract ./base-model ./fused -o lora/ --rank 16 --embeddings save --norms save
    """
    from ..ops.extract import extract as run
    from ..ops.extract import total_retained

    adapter, report = run(base, tuned, rank=rank, energy=energy, out=out, embeddings=embeddings, norms=norms,
                          method=method, overwrite=overwrite, progress=progress, return_report=True)
    ranks = sorted({layer.rank for layer in adapter.layers.values()})
    header = {"out": out, "layers": len(adapter), "ranks": f"{ranks[0]}..{ranks[-1]}" if len(ranks) > 1 else ranks[0],
              "energy retained": f"{total_retained(report):.4%}"}
    render_table(report, as_json=as_json, as_csv=as_csv, header=header)


COMMANDS = (fuse, unfuse, extract)
