"""``adaptkit demo``: the main path, end to end, on example adapters shipped inside the package.

The examples in ``adaptkit/data/examples`` were made with the real peft package on a tiny llama
(``scripts/make_examples.py``). The demo runs each step of :data:`STEPS` in order, prints what it did and
writes its outputs under one directory (``./adaptkit-demo`` by default). Each step is a small function
``step(ctx) -> None``; adding a capability to the demo means adding one entry to ``STEPS``.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from .analysis.compare import compare_adapters
from .analysis.layers import analyze_adapter
from .deploy import check as deploy_check
from .deploy import export as deploy_export
from .errors import OutputExistsError
from .formats import load, save
from .io.outputs import check_output
from .live.status import checkpoint_status, checkpoint_summary
from .ops.convert import convert_checkpoint
from .ops.fuse import fuse
from .ops.merging import merge

MARKER = ".adaptkit-demo"


def examples_dir() -> Path:
    """Directory of the bundled example adapters."""
    return Path(str(resources.files("adaptkit") / "data" / "examples"))


def example(name: str) -> Path:
    """Path of one bundled example (``lora_math``, ``lora_code``, ``dora_style``, ...)."""
    path = examples_dir() / name
    if not path.exists():
        known = sorted(p.name for p in examples_dir().iterdir())
        raise FileNotFoundError(f"no bundled example '{name}'; known: {known}")
    return path


def build_example_base(out: Path) -> Path:
    """Write the tiny llama the examples belong to (seeded random weights) as a safetensors model dir."""
    from transformers import LlamaConfig, LlamaForCausalLM

    spec = json.loads((examples_dir() / "base_config.json").read_text())
    torch.manual_seed(spec["seed"])
    model = LlamaForCausalLM(LlamaConfig(**spec["config"])).eval()
    model.save_pretrained(str(out), safe_serialization=True)
    return out


@dataclass
class DemoContext:
    """What steps share: the output directory, a printer, and results of earlier steps."""

    out: Path
    echo: Callable[[str], None]
    results: dict[str, Any] = field(default_factory=dict)
    progress: bool | None = None

    def section(self, title: str) -> None:
        """Print a step heading."""
        self.echo("")
        self.echo(f"== {title}")


def _step_info(ctx: DemoContext) -> None:
    ctx.section("info: what is inside the bundled example 'lora_code'")
    adapter = load(example("lora_code"))
    summary = checkpoint_summary(adapter)
    for key in ("format", "kinds", "num_layers", "ranks", "alphas", "dtype", "parameters"):
        ctx.echo(f"  {key:<11} {summary[key]}")
    columns = ["module", "kind", "shape", "rank", "alpha", "scale", "delta_norm"]
    table = checkpoint_status(adapter, progress=ctx.progress)[columns]
    ctx.echo(table.head(6).to_string(index=False, float_format=lambda x: f"{x:.4g}"))
    ctx.results["lora_code"] = adapter


def _step_save(ctx: DemoContext) -> None:
    ctx.section("save: write it back in PEFT format")
    adapter = ctx.results.get("lora_code") or load(example("lora_code"))
    out = save(adapter, ctx.out / "lora_code_peft", format="peft")
    again = load(out)
    same = all(
        (again.layers[p].delta() - adapter.layers[p].delta()).abs().max().item() == 0.0 for p in adapter.layers
    )
    ctx.echo(f"  wrote {out} ({len(again)} layers, identical deltas: {same})")


def _step_merge(ctx: DemoContext) -> None:
    ctx.section("merge: 'lora_math' + 0.5 x 'lora_code' (ranks 8 and 4), TIES on the deltas, SVD to rank 8")
    adapters = [load(example("lora_math")), load(example("lora_code"))]
    merged = merge(adapters, weights=[1.0, 0.5], method="ties_svd", density=0.5, rank=8,
                   progress=ctx.progress)
    out = save(merged, ctx.out / "merged_ties_svd", format="peft")
    exact = merge(adapters, weights=[1.0, 0.5], progress=ctx.progress)  # task_arithmetic: the exact weighted sum

    def weighted_sum(path: str) -> Any:
        return sum(w * a.layers[path].delta() for a, w in zip(adapters, (1.0, 0.5)) if path in a.layers)

    err = max(((exact.layers[p].delta() - weighted_sum(p)).norm() / weighted_sum(p).norm()).item() for p in exact.layers)
    ctx.echo(f"  wrote {out}: {len(merged)} layers, rank 8, no base model needed; "
             f"task_arithmetic (exact, rank up to 12) max relative error {err:.1e}")


def _step_fuse(ctx: DemoContext) -> None:
    ctx.section("fuse: bake 'lora_code' into a generated tiny base, streaming tensor by tensor")
    base = build_example_base(ctx.out / "base")
    result = fuse(base, example("lora_code"), ctx.out / "fused", progress=ctx.progress)
    ctx.echo(f"  wrote {result.out}: {result.touched} of {result.tensors} tensors fused in float32, "
             "the rest copied as raw bytes; config files copied")


def _step_convert(ctx: DemoContext) -> None:
    ctx.section("convert: a LyCORIS LoHa file (flattened kohya names) -> PEFT, names resolved on the base")
    base = ctx.out / "base"
    if not base.exists():
        build_example_base(base)
    result = convert_checkpoint("lycoris->peft", example("lycoris_loha.safetensors"), ctx.out / "lycoris_peft",
                                base=str(base), progress=ctx.progress)
    ctx.echo(f"  wrote {result.out}: {len(result.report)} LoHa layers, lossless: {result.lossless}")


def _step_deploy(ctx: DemoContext) -> None:
    ctx.section("deploy: will the adapters work in vLLM / llama.cpp? check, then export what they accept")
    base = ctx.out / "base"
    if not base.exists():
        build_example_base(base)
    report = deploy_check(example("dora_style"), base=str(base), target="vllm")
    for f in report.blocking:
        ctx.echo(f"  check dora_style -> vLLM: {f.rule} ({f.verdict}, {len(f.where)} layers): {f.message}; "
                 f"export fixes it with {f.needs or f.fix}")
    result = deploy_export(example("lora_code"), ctx.out / "lora_code_vllm", target="vllm", base=str(base))
    fixes = ", ".join(f"{k}: {n}" for k, n in result.summary()["fixes"].items()) or "none needed"
    ctx.echo(f"  wrote {result.path} for vLLM (exact fixes {fixes}); "
             f"{result.certificate.summary().splitlines()[0]}")
    if importlib.util.find_spec("gguf") is None:
        ctx.echo("  no GGUF export for llama.cpp: the gguf package is not installed (pip install 'adaptkit[gguf]')")
        return
    gguf = deploy_export(example("lora_code"), ctx.out / "lora_code.gguf", target="llama.cpp", base=str(base))
    ctx.echo(f"  wrote {gguf.path} for llama.cpp: tensor names from gguf's map, each layer's scale baked into B")


def _step_analyze(ctx: DemoContext) -> None:
    ctx.section("analyze: spectra of 'lora_math' (low-rank, dW never built); how the bundled adapters interfere")
    try:
        import matplotlib  # noqa: F401

        plots = True
    except ImportError:
        plots = False
    report = ctx.out / "analysis_report.html" if plots else None
    result = analyze_adapter(example("lora_math"), report=report, progress=ctx.progress)
    cols = ["module", "rank", "fro_norm", "spectral_norm", "effective_rank", "rank_90", "energy_share"]
    ctx.echo(result.table[cols].head(4).to_string(index=False, float_format=lambda x: f"{x:.3g}"))
    names = ("lora_math", "lora_code", "dora_style")
    compare_report = ctx.out / "compare_report.html" if plots else None
    cmp = compare_adapters([example(n) for n in names], report=compare_report, progress=ctx.progress)
    ctx.echo(cmp.pairs[["a", "b", "shared_layers", "cosine", "sign_conflict", "suggested_method"]].to_string(
        index=False, float_format=lambda x: f"{x:.3g}"))
    ctx.echo(f"  suggested merge method for all three: {cmp.method} ({cmp.reason})")
    if plots:
        ctx.echo(f"  wrote {report} and {compare_report} (open them in a browser)")
    else:
        ctx.echo("  no HTML reports: matplotlib is not installed (pip install 'adaptkit[plot]')")


#: the demo, in order: (name, step)
STEPS: list[tuple[str, Callable[[DemoContext], None]]] = [
    ("info", _step_info),
    ("save", _step_save),
    ("merge", _step_merge),
    ("fuse", _step_fuse),
    ("convert", _step_convert),
    ("deploy", _step_deploy),
    ("analyze", _step_analyze),
]


def run_demo(out: str | Path = "adaptkit-demo", echo: Callable[[str], None] = print,
             progress: bool | None = None) -> DemoContext:
    """Run every demo step, writing outputs under ``out``.

    Args:
        out: output directory. A previous demo output (it holds a ``.adaptkit-demo`` marker) is replaced;
            any other existing path is refused.
        echo: where to print what each step did.
        progress: progress bars of the steps' work on stderr (``None``: only on a terminal).

    Returns:
        The context with each step's results.

    Raises:
        OutputExistsError: ``out`` exists and is not an earlier demo output, or its parent is a file.
        OutputIsInputError: ``out`` is, contains or lies inside the bundled examples.
    """
    out = check_output(out, overwrite=True, inputs=[examples_dir()])  # replacing is decided by the marker below
    if out.exists():
        if not (out / MARKER).exists():
            raise OutputExistsError(f"{out} exists and is not an adaptkit demo output; pass another --out directory")
        shutil.rmtree(out)
    out.mkdir(parents=True)
    (out / MARKER).write_text("written by adaptkit demo; safe to delete\n")
    ctx = DemoContext(out=out, echo=echo, progress=progress)
    echo(f"adaptkit demo: bundled examples in {examples_dir()}, outputs in {out}/")
    try:
        for _, step in STEPS:
            step(ctx)
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)  # no partial demo output is left behind
        raise
    echo("")
    echo(f"done: outputs are in {out}/")
    return ctx
