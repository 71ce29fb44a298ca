"""``adaptkit check`` (will an adapter fully work on a runtime?) and ``adaptkit export`` (write one that does)."""

from __future__ import annotations

import click

from ._options import base_option, output_options, overwrite_option, progress_options
from ._render import print_json, render_table

TARGET_HELP = "Runtime: vllm, sglang, llama.cpp, peft, diffusers."


@click.command()
@click.argument("source")
@base_option("to certify that every layer lands on a module (headers/configs only) and for fixes that read weights")
@click.option("--target", "-t", default="vllm", show_default=True, help=TARGET_HELP)
@click.option("--max-rank", type=int, default=None, help="The rank the runtime serves (vLLM's --max-lora-rank; default "
              "the runtime's: 16 for vLLM, none elsewhere).")
@progress_options
@output_options
def check(source: str, base: str | None, target: str, max_rank: int | None, progress: bool | None, as_json: bool,
          as_csv: bool) -> None:
    """Check that SOURCE would fully work on a runtime: one row per finding, with the fix export applies.

    Exit code 1 when anything would be refused, dropped or applied wrongly (rerun with `adaptkit export`).

    Examples:

    \b
      adaptkit check ./my-adapter --target vllm --base meta-llama/Llama-3.1-8B
      adaptkit check ./my-adapter --target sglang --json
      adaptkit check ./my-adapter --target vllm --max-rank 64
    """
    from ..deploy import check as run_check

    report = run_check(source, base=base, target=target, max_rank=max_rank)
    if as_json:
        print_json(report.to_dict())
    else:
        render_table(report.frame(), as_csv=as_csv, header=None if as_csv else report.header())
    if not report.ok:
        raise SystemExit(1)


@click.command()
@click.argument("source")
@click.option("--out", "-o", required=True, help="Output directory (a .gguf file for llama.cpp).")
@click.option("--target", "-t", required=True, help=TARGET_HELP)
@base_option("for the coverage certificate (written into the output) and for fixes that read weights (DoRA, "
             "modules_to_save, trainable tokens, fused projections)")
@click.option("--max-rank", type=int, default=None, help="The rank the runtime serves; higher ranks need --lossy rank.")
@click.option("--lossy", default=None, help="Allow lossy fixes (comma-separated): dora, bias, modules_to_save, rank. "
              "Each layer's relative error is reported.")
@click.option("--drop", multiple=True, help="Leave out layers/saved tensors matching this glob (repeatable); named in "
              "the output's metadata.")
@click.option("--pad-to-bucket", "pad_bucket", is_flag=True, help="Zero-pad the rank to the runtime's next rank "
              "bucket (vLLM: 8, 16, 32, ...).")
@overwrite_option()
@progress_options
@output_options
def export(source: str, out: str, target: str, base: str | None, max_rank: int | None, lossy: str | None,
           drop: tuple[str, ...], pad_bucket: bool, overwrite: bool, progress: bool | None, as_json: bool,
           as_csv: bool) -> None:
    """Write SOURCE as an adapter the runtime accepts, with the same effect.

    Exact fixes run by default (scales baked into B, ranks zero-padded, fused projections built, trainable tokens as
    an embedding LoRA, no-op layers dropped); lossy ones only with --lossy, and every changed layer is reported.

    Examples:

    \b
      adaptkit export ./my-adapter -o served/ --target vllm --base meta-llama/Llama-3.1-8B
      adaptkit export ./dora-adapter -o served/ --target vllm --base ./base --lossy dora
      adaptkit export ./r64 -o served/ --target vllm --max-rank 32 --lossy rank
      adaptkit export ./my-adapter -o adapter.gguf --target llama.cpp --base ./base
    """
    from ..deploy import export as run_export

    result = run_export(source, out, target=target, base=base, max_rank=max_rank, lossy=lossy, drop=drop,
                        pad_bucket=pad_bucket, overwrite=overwrite)
    summary = result.summary()
    if as_json:
        print_json({**summary, "certificate": result.certificate.to_dict(),
                    "fixed_layers": result.frame().to_dict(orient="records")})
        return
    render_table(result.frame(), as_csv=as_csv, header=None if as_csv else summary)


COMMANDS = (check, export)
