"""The ``adaptkit`` command line: a thin click layer over the library.

Every command parses its arguments, calls ONE library function and renders the result. Errors are one
line on stderr (``error: ...``) with exit code 1 and no traceback; set ``ADAPTKIT_DEBUG=1`` to get one.
Tables print as text, or as JSON/CSV with ``--json`` / ``--csv``. Commands that can take more than a second
draw a progress bar on stderr when it is a terminal (:mod:`adaptkit.progress`); ``--quiet`` / ``-q`` turns bars
and notes off, ``--progress`` forces the bar when piped. Every command's help ends with examples.
"""

from __future__ import annotations

import functools
import json
import math
import os
import sys
from collections.abc import Callable
from typing import Any

import click

from ._version import __version__


def _debug() -> bool:
    return os.environ.get("ADAPTKIT_DEBUG", "") not in {"", "0", "false", "False"}


def handle_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn any exception into one ``error: ...`` line and exit code 1 (traceback with ADAPTKIT_DEBUG=1)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from .errors import AdaptkitError

        try:
            return fn(*args, **kwargs)
        except click.exceptions.ClickException:
            raise
        except (click.exceptions.Exit, click.exceptions.Abort):
            raise
        except AdaptkitError as e:
            if _debug():
                raise
            click.echo(f"error: {e}", err=True)
            sys.exit(1)
        except KeyboardInterrupt:
            click.echo("error: interrupted; nothing was written", err=True)
            sys.exit(1)
        except BrokenPipeError:  # the reader went away (`adaptkit info X | head`): stop quietly
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            sys.exit(1)
        except Exception as e:  # an unexpected failure: still one line, the type tells what broke
            if _debug():
                raise
            msg = str(e).splitlines()[0] if str(e) else ""
            click.echo(f"error: {type(e).__name__}: {msg} (set ADAPTKIT_DEBUG=1 for a traceback)", err=True)
            sys.exit(1)

    return wrapper


def _one_output_format(ctx: click.Context, param: click.Parameter, value: bool) -> bool:
    """Refuse ``--json`` with ``--csv`` while parsing (before a command does any work)."""
    if value:
        chosen = ctx.meta.setdefault("adaptkit.output_format", param.opts[0])
        if chosen != param.opts[0]:
            raise click.UsageError("--json and --csv exclude each other; pass one of them")
    return value


def output_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Add ``--json`` and ``--csv`` (one at a time) to a command that prints a table."""
    fn = click.option("--csv", "as_csv", is_flag=True, callback=_one_output_format, help="Print the table as CSV.")(fn)
    fn = click.option("--json", "as_json", is_flag=True, callback=_one_output_format,
                      help="Print machine-readable JSON.")(fn)
    return fn


_QUIET_KEY = "adaptkit.quiet"


def progress_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Add ``--quiet`` / ``-q`` and ``--progress/--no-progress``; the command gets one ``progress: bool | None``.

    ``None`` (neither given): a bar when stderr is a terminal. ``--quiet``: no bar and no notes on stderr (errors
    still print); ``--no-progress``: no bar; ``--progress``: a bar even when stderr is piped.
    """

    @functools.wraps(fn)
    def wrapper(*args: Any, quiet: bool, progress: bool | None, **kwargs: Any) -> Any:
        if quiet and progress:
            raise click.UsageError("--quiet and --progress exclude each other; pass one of them",
                                   ctx=click.get_current_context())
        click.get_current_context().meta[_QUIET_KEY] = quiet
        if quiet or progress is False:
            from .progress import silence_libraries

            silence_libraries()
        return fn(*args, progress=False if quiet else progress, **kwargs)

    wrapper = click.option("--progress/--no-progress", default=None,
                           help="Force the progress bar on (even when piped) or off; default: on a terminal.")(wrapper)
    return click.option("--quiet", "-q", is_flag=True, help="No progress bar and no notes on stderr.")(wrapper)


def note(message: str) -> None:
    """Print a note on stderr (``report written to ...``), unless ``--quiet``."""
    ctx = click.get_current_context(silent=True)
    if ctx is None or not ctx.meta.get(_QUIET_KEY):
        click.echo(message, err=True)


def _json_default(o: Any) -> Any:
    if hasattr(o, "item"):
        return o.item()
    return str(o)


def _clean(v: Any) -> Any:
    if isinstance(v, float) and math.isnan(v):
        return None
    return v


def render_table(df: Any, as_json: bool = False, as_csv: bool = False, header: dict[str, Any] | None = None,
                 float_format: str = "{:.4g}") -> None:
    """Print a DataFrame (and an optional header dict) as text, JSON or CSV."""
    if as_csv:
        click.echo(df.to_csv(index=False), nl=False)
        return
    if as_json:
        rows = [{k: _clean(v) for k, v in row.items()} for row in df.to_dict(orient="records")]
        payload: Any = {**header, "layers": rows} if header is not None else rows
        click.echo(json.dumps(payload, indent=2, default=_json_default))
        return
    if header:
        width = max(len(k) for k in header)
        for k, v in header.items():
            if isinstance(v, dict):
                v = ", ".join(f"{a}: {b}" for a, b in v.items()) or "-"
            click.echo(f"{k.ljust(width)}  {v}")
        click.echo("")
    if df.empty:
        click.echo("(no rows)")
        return
    with _pandas_display():
        click.echo(df.to_string(index=False, float_format=lambda x: float_format.format(x)))


def _pandas_display():
    import pandas as pd

    return pd.option_context("display.max_rows", None, "display.max_columns", None, "display.width", 250,
                             "display.max_colwidth", 80)


class _OneLineError(click.ClickException):
    """A click error re-raised to print as one ``error: ...`` line with exit code 1."""

    exit_code = 1

    def show(self, file: Any = None) -> None:
        click.echo(f"error: {self.message}", err=True)


def _one_line(e: click.ClickException) -> _OneLineError:
    """Rewrite click's 3-line usage error block as ``<what is wrong> (see 'adaptkit CMD --help')``."""
    if isinstance(e, click.exceptions.NoSuchOption):
        msg = e.message.rstrip(".") + (f"; did you mean {' or '.join(e.possibilities)}?" if e.possibilities else "")
    else:
        msg = e.format_message().rstrip(".")
    msg = " ".join(msg.split())
    if msg[:1].isupper() and msg[1:2].islower():  # "Missing argument 'SOURCE'" -> "missing argument 'SOURCE'"
        msg = msg[0].lower() + msg[1:]
    ctx = getattr(e, "ctx", None)
    if ctx is not None:
        msg += f" (see '{ctx.command_path} --help')"
    return _OneLineError(msg)


class _Group(click.Group):
    """The ``adaptkit`` group: click's usage errors become one ``error: ...`` line with exit code 1 (DESIGN.md)."""

    def make_context(self, *args: Any, **kwargs: Any) -> click.Context:
        try:
            return super().make_context(*args, **kwargs)
        except click.exceptions.NoArgsIsHelpError:  # `adaptkit` alone: click's help
            raise
        except click.ClickException as e:
            raise _one_line(e) from e

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.exceptions.NoArgsIsHelpError, _OneLineError):
            raise
        except click.ClickException as e:
            raise _one_line(e) from e


@click.group("adaptkit", cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", prog_name="adaptkit")
def main() -> None:
    """adaptkit: adapter checkpoints (LoRA, DoRA, LoHa, LoKr, IA3) across PEFT, kohya/LyCORIS and diffusers.

    SOURCE arguments are hub ids (org/name[@revision][:subfolder]), directories or files. Long-running commands
    draw a progress bar on a terminal (--quiet / -q: none). `adaptkit COMMAND --help` shows each command's
    options and examples.

    Examples:

    \b
      adaptkit info ./my-adapter                # format, kinds, ranks, size, per-layer table
      adaptkit merge ./a ./b -o merged/ --weights 1,0.5 --method ties_svd --density 0.2 --rank 16
      adaptkit convert '->kohya' ./my-adapter lora.safetensors
      adaptkit demo                             # the main path on the bundled examples
    """
    if not _debug():  # third-party warnings are noise on a command line; adaptkit's own stay visible
        import warnings

        warnings.filterwarnings("ignore")
        warnings.filterwarnings("default", module=r"adaptkit(\..*)?")
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


@main.command()
@click.argument("source")
@click.option("--format", "fmt", default=None, help="Source format (peft, kohya/lycoris, diffusers); detected if omitted.")
@click.option("--base", default=None, help="Base model (hub id or dir) to resolve module names.")
@click.option("--layers/--no-layers", default=True, help="Print the per-layer table.")
@progress_options
@output_options
@handle_errors
def info(source: str, fmt: str | None, base: str | None, layers: bool, progress: bool | None, as_json: bool,
         as_csv: bool) -> None:
    """Show what is inside an adapter: format, kinds, base model, ranks, size, and a per-layer table.

    Examples:

    \b
      adaptkit info ./my-adapter                # format, kinds, ranks, size, per-layer table
      adaptkit info org/name@v1 --json          # the same for machines (also --csv)
      adaptkit info lora.safetensors --base ./base-model --no-layers
    """
    from .formats import adapter_subfolders, load
    from .live.status import checkpoint_status, checkpoint_summary

    adapter = load(source, format=fmt, base=base)
    table = checkpoint_status(adapter, progress=progress)
    if not layers:
        table = table.iloc[0:0]
    header = checkpoint_summary(adapter)
    if subs := adapter_subfolders(source):  # PEFT keeps every adapter but the default in a subfolder
        header["subfolders"] = f"{subs} hold more adapters: load one as '{source}:{subs[0]}'"
    if not (as_json or as_csv):
        table = table.drop(columns=["tensors"])
    render_table(table, as_json=as_json, as_csv=as_csv, header=header)


@main.command()
@click.option("--out", "-o", default="adaptkit-demo", show_default=True, help="Directory for the demo's outputs.")
@progress_options
@handle_errors
def demo(out: str, progress: bool | None) -> None:
    """Run the main path end to end on the bundled example adapters.

    Examples:

    \b
      adaptkit demo                             # writes ./adaptkit-demo/
      adaptkit demo --out /tmp/adaptkit-demo -q
    """
    from .demo import run_demo

    run_demo(out, echo=click.echo, progress=progress)


#: merge method names for help texts (the table itself is adaptkit.merging.METHODS; a test keeps them equal)
MERGE_METHODS = ("task_arithmetic", "svd", "linear", "cat", "ties", "ties_svd", "dare_linear", "dare_ties",
                 "dare_linear_svd", "dare_ties_svd", "magnitude_prune", "magnitude_prune_svd")


@main.command()
@click.argument("sources", nargs=-1, required=True)
@click.option("--out", "-o", required=True, help="Output directory (PEFT, diffusers) or file (kohya).")
@click.option("--weights", default=None, help="Comma-separated weights, one per source (default 1 each); negative subtracts.")
@click.option("--method", default="task_arithmetic", show_default=True, help="One of: " + ", ".join(MERGE_METHODS) + ".")
@click.option("--density", type=float, default=None, help="Fraction of entries to keep (ties, dare_*, magnitude_prune*).")
@click.option("--rank", type=int, default=None, help="Output rank (svd, *_svd, task_arithmetic).")
@click.option("--majority-sign", default="total", show_default=True, help="TIES sign election: total or frequency.")
@click.option("--seed", type=int, default=None, help="Seed for the DARE methods' random drop.")
@click.option("--format", "fmt", default="peft", show_default=True, help="Output format (peft, kohya, diffusers).")
@click.option("--base", default=None, help="Base model (hub id or dir) to resolve kohya/LyCORIS module names.")
@click.option("--component", default=None, help="kohya output: the component of bare module paths (unet, transformer, "
              "text_encoder, text_encoder_2/_3; lycoris keeps lycoris_ names); detected if omitted. PEFT output: only "
              "this component's layers, in its own namespace (each: one adapter per component).")
@click.option("--overwrite", is_flag=True, help="Replace an existing output.")
@progress_options
@handle_errors
def merge(sources: tuple[str, ...], out: str, weights: str | None, method: str, density: float | None,
          rank: int | None, majority_sign: str, seed: int | None, fmt: str, base: str | None, component: str | None,
          overwrite: bool, progress: bool | None) -> None:
    """Merge adapters (SOURCE... are hub ids, directories or files) into one, with PEFT's merge methods.

    Examples:

    \b
      adaptkit merge ./a ./b -o merged/ --weights 1,0.5 --method ties_svd --density 0.2 --rank 16
      adaptkit merge ./a ./b -o merged/         # task_arithmetic: the exact weighted sum
      adaptkit merge a.safetensors b.safetensors -o merged.safetensors --format kohya --weights 1,-1
    """
    from .errors import ConfigError
    from .ops.merging import PROVENANCE_KEY, merge_to

    parsed = None
    if weights is not None:
        try:
            parsed = [float(x) for x in weights.split(",") if x.strip()]
        except ValueError:
            raise ConfigError(f"--weights must be comma-separated numbers like 1,0.5 (got '{weights}')") from None
    merged = merge_to(list(sources), out, format=fmt, overwrite=overwrite, weights=parsed, method=method,
                      density=density, rank=rank, majority_sign=majority_sign, seed=seed, base=base,
                      component=component, progress=progress)
    ranks = sorted({layer.rank for layer in merged.layers.values() if layer.rank is not None})
    rank_text = "-" if not ranks else str(ranks[0]) if len(ranks) == 1 else f"{ranks[0]}..{ranks[-1]}"
    applied = json.loads(merged.metadata[PROVENANCE_KEY]).get("applied_method")
    how = method if applied is None else f"{method} (applied as {applied}, as PEFT does for one adapter)"
    click.echo(f"merged {len(sources)} adapter{'s' * (len(sources) != 1)} with {how} into {out} ({fmt}): "
               f"{len(merged)} layers, kind {', '.join(sorted(merged.kinds))}, rank {rank_text}")


@main.command()
@click.argument("source")
@click.option("--format", "fmt", default=None, help="Source format (peft, kohya/lycoris, diffusers); detected if omitted.")
@click.option("--base", default=None, help="Base model (hub id or dir) to resolve module names.")
@progress_options
@output_options
@handle_errors
def status(source: str, fmt: str | None, base: str | None, progress: bool | None, as_json: bool, as_csv: bool) -> None:
    """Per-layer status of a checkpoint: kind, shape, rank, alpha, scale, dtype, ||dW||, finite.

    Examples:

    \b
      adaptkit status ./my-adapter              # text table
      adaptkit status org/name@main --json      # list of rows (also --csv)
      adaptkit status lora.safetensors --base ./base-model
    """
    from .formats import load
    from .live.status import checkpoint_status

    table = checkpoint_status(load(source, format=fmt, base=base), progress=progress)
    if not (as_json or as_csv):
        table = table.drop(columns=["tensors"])
    render_table(table, as_json=as_json, as_csv=as_csv)


@main.command()
@click.argument("base")
@click.option("--out", "-o", required=True, help="Output directory: the adapter, plus base/ (adjusted weights) when --iters > 1.")
@click.option("--target-modules", "-t", default=None, help="Comma-separated module names (q_proj,v_proj) or all-linear.")
@click.option("--rank", "-r", default=16, show_default=True, type=int, help="LoRA rank.")
@click.option("--alpha", default=None, type=float, help="LoRA alpha (default: the rank); the scale is compensated.")
@click.option("--bits", default="4", show_default=True, type=click.Choice(["4", "8"]), help="4: NF4 (block 64), 8: int8.")
@click.option("--iters", default=1, show_default=True, type=int, help="Alternating LoftQ iterations.")
@click.option("--adapter", "existing", default=None, help="Existing LoRA adapter to take targets, ranks and alphas from.")
@click.option("--overwrite", is_flag=True, help="Replace an existing output directory.")
@progress_options
@output_options
@handle_errors
def loftq(base: str, out: str, target_modules: str | None, rank: int, alpha: float | None, bits: str, iters: int,
          existing: str | None, overwrite: bool, progress: bool | None, as_json: bool, as_csv: bool) -> None:
    """LoftQ-initialise a LoRA for BASE so that quantised base + LoRA approximates the original weights.

    Examples:

    \b
      adaptkit loftq ./base-model -o loftq/ --target-modules q_proj,v_proj --rank 16
      adaptkit loftq org/base-model -o loftq/ --target-modules all-linear --bits 8
      adaptkit loftq ./base-model -o loftq/ --adapter ./my-adapter --iters 5   # also writes loftq/base
    """
    from .ops.loftq import loftq as run_loftq

    result = run_loftq(base, target_modules, bits=int(bits), iters=iters, rank=rank, alpha=alpha, adapter=existing,
                       out=out, overwrite=overwrite, progress=progress)
    header = {"out": str(result.out), "adjusted base": str(result.base_out) if result.base_out else "- (quantise BASE)",
              "quantisation": "nf4 (block 64)" if bits == "4" else "int8 (row-wise)", "layers": len(result.report),
              "mean error reduction": f"{result.mean_reduction:.1%}"}
    render_table(result.report, as_json=as_json, as_csv=as_csv, header=header)


class _SpecCommand(click.Command):
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


@main.command(cls=_SpecCommand)
@click.argument("args", nargs=-1, required=True)
@click.option("--from", "src_format", default=None, help="Source format or reparametrisation (pissa, olora, corda).")
@click.option("--to", "dst_format", default=None, help="Target format (peft, kohya/lycoris, diffusers) or lora.")
@click.option("--rank", "-r", default=None, type=int, help="Allow a lossy conversion to LoRA of this rank (loss reported).")
@click.option("--kind", default=None, help="Convert every layer to this kind (lora).")
@click.option("--base", default=None, help="Base model (hub id or dir) to resolve module names.")
@click.option("--initial", default=None, help="pissa/olora/corda->lora: the adapter saved before training.")
@click.option("--component", default=None, help="kohya output: the component of bare module paths (unet, transformer, "
              "text_encoder, text_encoder_2/_3; lycoris keeps lycoris_ names); detected if omitted. PEFT output: write "
              "only this component's layers, in its own namespace (each: one adapter per component in OUT/<component>/).")
@click.option("--overwrite", is_flag=True, help="Replace an existing output.")
@progress_options
@output_options
@handle_errors
def convert(args: tuple[str, ...], src_format: str | None, dst_format: str | None, rank: int | None, kind: str | None,
            base: str | None, initial: str | None, component: str | None, overwrite: bool, progress: bool | None,
            as_json: bool, as_csv: bool) -> None:
    """Convert a checkpoint: convert 'FROM->TO' SOURCE OUT (quote the spec), or SOURCE OUT --to TO.

    FROM may be left out ('->kohya': detected); formats are peft, kohya (alias lycoris) and diffusers, and
    'pissa->lora' (olora, corda) undoes a PiSSA-style initialisation. Options go before or after the arguments.

    Examples:

    \b
      adaptkit convert '->kohya' ./my-adapter lora.safetensors
      adaptkit convert 'lycoris->peft' my_loha.safetensors out/ --base stabilityai/stable-diffusion-xl-base-1.0
      adaptkit convert my_lokr.safetensors out/ --to diffusers --rank 32   # lossy: prints the loss table
      adaptkit convert 'pissa->lora' runs/pissa-trained runs/as-lora --initial runs/pissa-init
    """
    from .ops.convert import convert_checkpoint

    if len(args) not in (2, 3):
        raise click.UsageError("expected 'FROM->TO' SOURCE OUT, or SOURCE OUT with --to")
    def looks_like_spec(arg: str) -> bool:
        return "->" in arg and not os.path.exists(arg)

    if len(args) == 2 and looks_like_spec(args[0]):
        raise click.UsageError(f"expected 'FROM->TO' SOURCE OUT, got the spec '{args[0]}' and one path")
    if len(args) == 3 and not looks_like_spec(args[0]) and looks_like_spec(args[1]):
        raise click.UsageError(f"the spec '{args[1]}' comes first: 'FROM->TO' SOURCE OUT")
    spec, source, out = args if len(args) == 3 else (None, *args)
    options = {"initial": initial} if initial is not None else {}
    result = convert_checkpoint(spec, source, out, src_format=src_format, dst_format=dst_format, rank=rank, kind=kind,
                                base=base, overwrite=overwrite, component=component, progress=progress, **options)
    header = {"out": str(result.out), "from": result.source_format, "to": result.target_format,
              "lossless": result.lossless, **({"note": result.note} if result.note else {})}
    render_table(result.report, as_json=as_json, as_csv=as_csv, header=header)


def _fuse_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Options shared by ``fuse`` and ``unfuse``."""
    fn = progress_options(output_options(fn))
    for opt in reversed([
        click.argument("base"), click.argument("adapters", nargs=-1, required=True),
        click.option("--out", "-o", default=None, help="Output directory (or .safetensors file for a one-file base)."),
        click.option("--weights", default=None, help="Comma-separated weights, one per adapter (default 1 each)."),
        click.option("--dtype", type=click.Choice(["bf16", "fp16", "fp32"]), default=None, help="Output dtype (default: the base's)."),
        click.option("--shard-size", default=None, help="Re-shard the output (e.g. 5GB); default: the base's shards."),
        click.option("--workers", type=int, default=None, help="Files written in parallel (default: one per core)."),
        click.option("--dry-run", is_flag=True, help="List the tensors that would change; write nothing."),
        click.option("--overwrite", is_flag=True, help="Replace an existing output."),
        click.option("--fsync", is_flag=True, help="Flush files to disk before the rename (power-loss safe; slower)."),
    ]):
        fn = opt(fn)
    return fn


def _run_fuse(func: Callable[..., Any], base: str, adapters: tuple[str, ...], out: str | None, weights: str | None,
              dry_run: bool, as_json: bool, as_csv: bool, **kwargs: Any) -> None:
    from .errors import ConfigError

    if out is None and not dry_run:
        raise ConfigError("no output given; pass --out DIR (or --dry-run to only list what would change)")
    parsed = None
    if weights is not None:
        try:
            parsed = [float(x) for x in weights.split(",") if x.strip()]
        except ValueError:
            raise ConfigError(f"--weights must be comma-separated numbers like 1,0.5 (got '{weights}')") from None
    result = func(base, list(adapters), out, weights=parsed, dry_run=dry_run, **kwargs)
    render_table(result.plan, as_json=as_json, as_csv=as_csv, header=result.summary())


@main.command()
@_fuse_options
@handle_errors
def fuse(base: str, adapters: tuple[str, ...], out: str | None, weights: str | None, dry_run: bool, as_json: bool,
         as_csv: bool, **kwargs: Any) -> None:
    """Fuse ADAPTER... into BASE's weights (hub id, dir of safetensors shards, or file), streaming shard by shard.

    Examples:

    \b
      adaptkit fuse org/base-model ./my-adapter -o fused/
      adaptkit fuse ./base-model ./a ./b --weights 1,0.5 -o fused/ --dtype bf16 --shard-size 5GB
      adaptkit fuse ./base-model ./my-adapter --dry-run   # list what would change, write nothing
    """
    from .ops.fuse import fuse as run

    _run_fuse(run, base, adapters, out, weights, dry_run, as_json, as_csv, **kwargs)


@main.command()
@_fuse_options
@handle_errors
def unfuse(base: str, adapters: tuple[str, ...], out: str | None, weights: str | None, dry_run: bool, as_json: bool,
           as_csv: bool, **kwargs: Any) -> None:
    """Subtract fused additive ADAPTER... from BASE again (DoRA and IA3 cannot be unfused).

    Examples:

    \b
      adaptkit unfuse fused/ ./my-adapter -o restored/
      adaptkit unfuse fused/ ./a ./b --weights 1,0.5 -o restored/
    """
    from .ops.fuse import unfuse as run

    _run_fuse(run, base, adapters, out, weights, dry_run, as_json, as_csv, **kwargs)


@main.command()
@click.argument("base")
@click.argument("tuned")
@click.option("--out", "-o", required=True, help="Output directory for the PEFT LoRA adapter.")
@click.option("--rank", "-r", type=int, default=None, help="LoRA rank (the maximum with --energy).")
@click.option("--energy", type=float, default=None, help="Per-layer rank keeping this fraction of ||tuned-base||^2 (e.g. 0.9).")
@click.option("--embeddings", type=click.Choice(["skip", "lora", "save"]), default="skip", show_default=True,
              help="Changed embeddings: drop, embedding LoRA, or store whole (modules_to_save).")
@click.option("--norms", type=click.Choice(["skip", "save"]), default="skip", show_default=True,
              help="Changed norms and lone biases: drop, or store whole (modules_to_save).")
@click.option("--method", type=click.Choice(["auto", "exact", "randomized"]), default="auto", show_default=True,
              help="SVD: exact, randomized, or auto (exact for small matrices).")
@click.option("--overwrite", is_flag=True, help="Replace an existing output.")
@progress_options
@output_options
@handle_errors
def extract(base: str, tuned: str, out: str, rank: int | None, energy: float | None, embeddings: str, norms: str,
            method: str, overwrite: bool, progress: bool | None, as_json: bool, as_csv: bool) -> None:
    """Extract a LoRA from TUNED - BASE (per-layer truncated SVD) and print the retained energy per layer.

    Examples:

    \b
      adaptkit extract org/base-model ./tuned-model -o lora/ --rank 64
      adaptkit extract ./base-model ./tuned-model -o lora/ --energy 0.9 --rank 128   # per-layer ranks
      adaptkit extract ./base-model ./fused -o lora/ --rank 16 --embeddings save --norms save
    """
    from .ops.extract import extract as run
    from .ops.extract import total_retained

    adapter, report = run(base, tuned, rank=rank, energy=energy, out=out, embeddings=embeddings, norms=norms,
                          method=method, overwrite=overwrite, progress=progress, return_report=True)
    ranks = sorted({layer.rank for layer in adapter.layers.values()})
    header = {"out": out, "layers": len(adapter), "ranks": f"{ranks[0]}..{ranks[-1]}" if len(ranks) > 1 else ranks[0],
              "energy retained": f"{total_retained(report):.4%}"}
    render_table(report, as_json=as_json, as_csv=as_csv, header=header)


_REPORT_HELP = "Also write a self-contained HTML report with plots here (needs: pip install 'adaptkit[plot]')."


@main.command()
@click.argument("source")
@click.option("--format", "fmt", default=None, help="Source format (peft, kohya/lycoris, diffusers); detected if omitted.")
@click.option("--base", default=None, help="Base model (hub id or dir) to resolve module names (kohya files).")
@click.option("--report", default=None, help=_REPORT_HELP)
@progress_options
@output_options
@handle_errors
def analyze(source: str, fmt: str | None, base: str | None, report: str | None, progress: bool | None, as_json: bool,
            as_csv: bool) -> None:
    """Per-layer analysis: ||dW||, spectral norm, stable/effective rank, 90/99% energy rank, energy share, sparsity.

    Examples:

    \b
      adaptkit analyze ./my-adapter --report r.html   # spectra and energy; HTML needs: pip install 'adaptkit[plot]'
      adaptkit analyze lora.safetensors --base ./base-model --json
    """
    from .analysis.layers import analyze_adapter

    result = analyze_adapter(source, format=fmt, base=base, report=report, progress=progress)
    render_table(result.table, as_json=as_json, as_csv=as_csv, header=None if as_csv else result.summary())
    if report:
        note(f"report written to {report}")


@main.command()
@click.argument("sources", nargs=-1, required=True)
@click.option("--density", type=float, default=0.2, show_default=True,
              help="Fraction of largest entries kept per adapter for the TIES sign-conflict rate.")
@click.option("--format", "fmt", default=None, help="Source format (peft, kohya/lycoris, diffusers); detected if omitted.")
@click.option("--base", default=None, help="Base model (hub id or dir) to resolve module names (kohya files).")
@click.option("--report", default=None, help=_REPORT_HELP)
@progress_options
@output_options
@handle_errors
def compare(sources: tuple[str, ...], density: float, fmt: str | None, base: str | None, report: str | None,
            progress: bool | None, as_json: bool, as_csv: bool) -> None:
    """Compare adapters: cosine similarity and sign conflicts per layer and pair, shared targets, merge suggestion.

    Examples:

    \b
      adaptkit compare ./a ./b --json           # how two adapters interfere, and a merge method suggestion
      adaptkit compare ./a ./b ./c --density 0.2 --report compare.html
    """
    from .analysis.compare import compare_adapters

    result = compare_adapters(list(sources), density=density, format=fmt, base=base, report=report, progress=progress)
    if as_json:
        click.echo(json.dumps(result.to_dict(), indent=2, default=_json_default))
    elif as_csv:
        render_table(result.layers, as_csv=True)
    else:
        render_table(result.pairs)
        click.echo("")
        render_table(result.layers)
        click.echo(f"\nsuggested merge method: {result.method} ({result.reason})")
    if report:
        note(f"report written to {report}")


if __name__ == "__main__":  # pragma: no cover
    main()
