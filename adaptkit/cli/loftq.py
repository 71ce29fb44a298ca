"""``adaptkit loftq``: a LoftQ-initialised LoRA for a base model (quantised base + LoRA ~ original weights)."""

from __future__ import annotations

import click

from ..core.params import ALPHA, BITS, ITERS, RANK
from ._options import declared, output_options, overwrite_option, progress_options
from ._render import render_table


@click.command()
@click.argument("base")
@click.option("--out", "-o", required=True, help="Output directory: the adapter, plus base/ (adjusted weights) when --iters > 1.")
@click.option("--target-modules", "-t", default=None, help="Comma-separated module names (q_proj,v_proj) or all-linear.")
@declared(RANK, "-r", default=16, show_default=True, help="LoRA rank.")
@declared(ALPHA, default=None, help="LoRA alpha (default: the rank); the scale is compensated.")
@declared(BITS, default=4, show_default=True, help="4: NF4 (block 64), 8: int8.")
@declared(ITERS, default=1, show_default=True, help="Alternating LoftQ iterations.")
@click.option("--adapter", "existing", default=None, help="Existing LoRA adapter to take targets, ranks and alphas from.")
@overwrite_option("an existing output directory")
@progress_options
@output_options
def loftq(base: str, out: str, target_modules: str | None, rank: int, alpha: float | None, bits: int, iters: int,
          existing: str | None, overwrite: bool, progress: bool | None, as_json: bool, as_csv: bool) -> None:
    """LoftQ-initialise a LoRA for BASE so that quantised base + LoRA approximates the original weights.

    Examples:

    \b
      adaptkit loftq ./base-model -o loftq/ --target-modules q_proj,v_proj --rank 16
      adaptkit loftq org/base-model -o loftq/ --target-modules all-linear --bits 8
      adaptkit loftq ./base-model -o loftq/ --adapter ./my-adapter --iters 5   # also writes loftq/base
    """
    from ..ops.loftq import loftq as run_loftq

    result = run_loftq(base, target_modules, bits=bits, iters=iters, rank=rank, alpha=alpha, adapter=existing,
                       out=out, overwrite=overwrite, progress=progress)
    header = {"out": str(result.out), "adjusted base": str(result.base_out) if result.base_out else "- (quantise BASE)",
              "quantisation": "nf4 (block 64)" if bits == 4 else "int8 (row-wise)", "layers": len(result.report),
              "mean error reduction": f"{result.mean_reduction:.1%}"}
    render_table(result.report, as_json=as_json, as_csv=as_csv, header=header)


COMMANDS = (loftq,)
