"""``adaptkit convert``: a checkpoint in another format (``'FROM->TO'`` or ``--from/--to``), or PiSSA/OLoRA/CorDA
back to plain LoRA."""

from __future__ import annotations

import os

import click

from ..core.params import RANK
from ._options import (
    base_option,
    component_option,
    declared,
    drop_option,
    output_options,
    overwrite_option,
    progress_options,
)
from ._render import render_table


class SpecCommand(click.Command):
    """``convert``: a conversion spec is an argument even when it starts with ``-`` (``'->kohya'``).

    click reads ``->kohya`` as the short options ``-> -k -o -h``, and ``-h`` printed the help; so before
    parsing, every argument that starts with ``-`` and holds ``->`` is swapped for a placeholder that click
    takes as an argument, and put back afterwards. Options may come before, between or after the arguments.
    """

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        specs: dict[str, str] = {}
        swapped = []
        for arg in args:
            if arg.startswith("-") and "->" in arg:
                specs[key := f"\0spec{len(specs)}"] = arg
                arg = key
            swapped.append(arg)
        rest = super().parse_args(ctx, swapped)
        for name, value in ctx.params.items():
            if isinstance(value, tuple):
                ctx.params[name] = tuple(specs.get(v, v) if isinstance(v, str) else v for v in value)
            elif isinstance(value, str):
                ctx.params[name] = specs.get(value, value)
        return rest


def _looks_like_spec(arg: str) -> bool:
    return "->" in arg and not os.path.exists(arg)


def split_args(args: tuple[str, ...]) -> tuple[str | None, str, str]:
    """``(spec, source, out)`` from ``'FROM->TO' SOURCE OUT`` or ``SOURCE OUT``.

    Raises:
        click.UsageError: another number of arguments, or the spec in the wrong place.
    """
    if len(args) not in (2, 3):
        raise click.UsageError("expected 'FROM->TO' SOURCE OUT, or SOURCE OUT with --to")
    if len(args) == 2 and _looks_like_spec(args[0]):
        raise click.UsageError(f"expected 'FROM->TO' SOURCE OUT, got the spec '{args[0]}' and one path")
    if len(args) == 3 and not _looks_like_spec(args[0]) and _looks_like_spec(args[1]):
        raise click.UsageError(f"the spec '{args[1]}' comes first: 'FROM->TO' SOURCE OUT")
    return (None, *args) if len(args) == 2 else args  # type: ignore[return-value]


@click.command(cls=SpecCommand)
@click.argument("args", nargs=-1, required=True)
@click.option("--from", "src_format", default=None, help="Source format or reparametrisation (pissa, olora, corda).")
@click.option("--to", "dst_format", default=None, help="Target format (peft, kohya/lycoris, diffusers) or lora.")
@declared(RANK, "-r", default=None, help="Allow a lossy conversion to LoRA of this rank (loss reported).")
@click.option("--kind", default=None, help="Convert every layer to this kind (lora).")
@base_option("to resolve module names, and (with --kind lora / --rank) to give base-dependent layers (OFT, GLoRA, "
             "IA3, per-input DoRA) their LoRA form")
@click.option("--initial", default=None, help="pissa/olora/corda->lora: the adapter saved before training.")
@component_option("write only this component's layers, in its own namespace (each: one adapter per component in "
                  "OUT/<component>/).")
@click.option("--arch", default=None, help="Diffusion architecture (flux, wan, ...; `adaptkit formats` lists them) whose "
              "module map moves layers between original and diffusers names; found from the adapter when omitted.")
@click.option("--naming", default=None, help="kohya output: 'original' names (sd-scripts / musubi-tuner) or "
              "'diffusers' names; default: the source's.")
@drop_option
@overwrite_option()
@progress_options
@output_options
def convert(args: tuple[str, ...], src_format: str | None, dst_format: str | None, rank: int | None, kind: str | None,
            base: str | None, initial: str | None, component: str | None, arch: str | None, naming: str | None,
            drop: tuple[str, ...], overwrite: bool, progress: bool | None, as_json: bool, as_csv: bool) -> None:
    """Convert a checkpoint: convert 'FROM->TO' SOURCE OUT (quote the spec), or SOURCE OUT --to TO.

    FROM may be left out ('->kohya': detected from the keys); formats are peft, kohya (aliases lycoris, musubi),
    diffusers and comfyui (original names under diffusion_model.), and 'pissa->lora' (olora, corda) undoes a
    PiSSA-style initialisation. Diffusion-transformer layers move between original and diffusers names as the target
    needs (Flux's qkv/linear1 stacked or split exactly). Options go before or after the arguments.

    Examples:

    \b
      adaptkit convert '->kohya' ./my-adapter lora.safetensors
      adaptkit convert 'lycoris->peft' my_loha.safetensors out/ --base stabilityai/stable-diffusion-xl-base-1.0
      adaptkit convert my_lokr.safetensors out/ --to diffusers --rank 32   # lossy: prints the loss table
      adaptkit convert 'lycoris->peft' my_oft.safetensors out/ --base ./base-model --kind lora
      adaptkit convert 'pissa->lora' runs/pissa-trained runs/as-lora --initial runs/pissa-init
      adaptkit convert 'kohya->peft' sdxl_lora.safetensors out/ --base ./sdxl --drop 'lora_te2_*'   # see coverage
      adaptkit convert 'kohya->diffusers' flux_lora.safetensors out/    # BFL names -> diffusers, qkv split
      adaptkit convert 'diffusers->comfyui' ./flux-lora flux_comfy.safetensors
      adaptkit convert 'diffusers->kohya' ./flux-lora flux_sd_scripts.safetensors --naming original
    """
    spec, source, out = split_args(args)
    from ..ops.convert import convert_checkpoint

    options = {"initial": initial} if initial is not None else {}
    options.update({k: v for k, v in (("arch", arch), ("naming", naming)) if v is not None})
    result = convert_checkpoint(spec, source, out, src_format=src_format, dst_format=dst_format, rank=rank, kind=kind,
                                base=base, overwrite=overwrite, component=component, progress=progress,
                                drop=list(drop) or None, **options)
    header = {"out": str(result.out), "from": result.source_format, "to": result.target_format,
              "lossless": result.lossless, **({"note": result.note} if result.note else {}),
              **({"coverage": result.coverage} if result.coverage is not None else {})}
    render_table(result.report, as_json=as_json, as_csv=as_csv, header=header)


COMMANDS = (convert,)
