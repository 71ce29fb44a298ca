"""``adaptkit merge``: combine adapters into one with PEFT's merge methods (or the exact weighted sum)."""

from __future__ import annotations

import json

import click

from ..core.params import (
    COMMON,
    DENSITY,
    EPSILON,
    GAMMA,
    KEEP,
    MAJORITY_SIGN,
    RANK,
    SEED,
    WEIGHTS,
)
from ..ops.merging.catalog import METHODS, help_text
from ._options import (
    base_option,
    component_option,
    declared,
    drop_option,
    overwrite_option,
    progress_options,
)
from ._render import print_json

#: merge method names (the table itself: adaptkit.ops.merging.catalog.METHODS, torch-free, so help stays fast)
MERGE_METHODS = tuple(METHODS)


@click.command(epilog="\b\nMethods (name: what it does [its parameters]):\n" + help_text())
@click.argument("sources", nargs=-1, required=True)
@click.option("--out", "-o", required=True, help="Output directory (PEFT, diffusers) or file (kohya).")
@declared(WEIGHTS, default=None, help="Comma-separated weights, one per source (default 1 each); negative subtracts.")
@click.option("--method", default="task_arithmetic", show_default=True,
              help="A method of the table below: " + ", ".join(MERGE_METHODS) + ".")
@declared(DENSITY, default=None, help="Fraction of entries to keep (ties, dare_*, magnitude_prune*, breadcrumbs*, della*).")
@declared(RANK, default=None, help="Output rank (svd, *_svd, task_arithmetic).")
@declared(MAJORITY_SIGN, default="total", show_default=True, help="TIES sign election: total or frequency.")
@declared(GAMMA, default=None, help="Fraction of largest entries dropped as outliers (breadcrumbs*; default 0.01).")
@declared(EPSILON, default=None, help="DELLA keep probabilities span density +- epsilon (della*; default 0.1).")
@declared(SEED, default=None, help="Seed for the random drop (dare_*, della*, knots_dare).")
@declared(KEEP, default=None, help="Fraction of each task's singular components kept (tsv; default 1/number of sources).")
@declared(COMMON, default=None, help="Fraction of the rank given to the common subspace (iso_cts; default 0.8).")
@click.option("--format", "fmt", default="peft", show_default=True, help="Output format (peft, kohya, diffusers).")
@base_option("to resolve kohya/LyCORIS module names")
@component_option("only this component's layers, in its own namespace (each: one adapter per component).")
@drop_option
@overwrite_option()
@progress_options
@click.option("--json", "as_json", is_flag=True, help="Print the result (layers, rank, coverage certificate) as JSON.")
def merge(sources: tuple[str, ...], out: str, weights: list[float] | None, method: str, density: float | None,
          rank: int | None, majority_sign: str, gamma: float | None, epsilon: float | None, seed: int | None,
          keep: float | None, common: float | None, fmt: str, base: str | None, component: str | None,
          drop: tuple[str, ...], overwrite: bool, progress: bool | None, as_json: bool) -> None:
    """Merge adapters (SOURCE... are hub ids, directories or files) into one: PEFT's methods with PEFT's numbers,
    mergekit's breadcrumbs / DELLA, and LoRA-native KnOTS, TSV-M, Iso-C/CTS and core-space merging.

    Examples:

    \b
      adaptkit merge ./a ./b -o merged/ --weights 1,0.5 --method ties_svd --density 0.2 --rank 16
      adaptkit merge ./a ./b -o merged/         # task_arithmetic: the exact weighted sum
      adaptkit merge a.safetensors b.safetensors -o merged.safetensors --format kohya --weights 1,-1
      adaptkit merge ./a ./b ./c -o merged/ --method core_ties --density 0.3
      adaptkit merge ./a ./b -o merged/ --method iso_cts --common 0.8 --rank 32
    """
    from ..core.coverage import read_metadata
    from ..ops.merging import PROVENANCE_KEY, merge_to

    merged = merge_to(list(sources), out, format=fmt, overwrite=overwrite, weights=weights, method=method,
                      density=density, rank=rank, majority_sign=majority_sign, seed=seed, base=base, gamma=gamma, epsilon=epsilon,
                      keep=keep, common=common,
                      component=component, progress=progress, drop=list(drop) or None)
    ranks = sorted({layer.rank for layer in merged.layers.values() if layer.rank is not None})
    rank_text = "-" if not ranks else str(ranks[0]) if len(ranks) == 1 else f"{ranks[0]}..{ranks[-1]}"
    applied = json.loads(merged.metadata[PROVENANCE_KEY]).get("applied_method")
    how = method if applied is None else f"{method} (applied as {applied}, as PEFT does for one adapter)"
    cert = read_metadata(merged.metadata)
    if as_json:
        print_json({"output": out, "format": fmt, "method": method, "applied_method": applied,
                    "sources": list(sources), "layers": len(merged), "kinds": sorted(merged.kinds),
                    "ranks": ranks, "coverage": cert})
        return
    click.echo(f"merged {len(sources)} adapter{'s' * (len(sources) != 1)} with {how} into {out} ({fmt}): "
               f"{len(merged)} layers, kind {', '.join(sorted(merged.kinds))}, rank {rank_text}")
    if cert is not None:
        share = cert["energy_share"]
        click.echo(f"coverage (merge): {cert['counts']['matched']}/{cert['layers']} input layers and extra tensors "
                   f"reach the output, ΔW energy {'n/a' if share is None else f'{100 * share:.4g}%'}"
                   + (f", {cert['counts']['dropped']} dropped on request" if cert["counts"]["dropped"] else ""))


COMMANDS = (merge,)
