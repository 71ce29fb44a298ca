"""One home for each parameter (adaptkit.core.params) and each report column (adaptkit.core.columns).

Every library function and the command line check ``rank``, ``density``, ``weights``, ... with the one declaration,
so the same bad value gets the same one-sentence ConfigError everywhere; the top-k count of compare is the count a
TIES merge keeps; no report uses a retired column name.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import click
import numpy as np
import pytest
import torch

import adaptkit as ak
from adaptkit.cli import main
from adaptkit.core import params as P
from adaptkit.core.columns import (
    DELTA_NORM,
    MODULE,
    RELATIVE_ERROR,
    RETAINED_ENERGY,
    RETIRED,
)
from adaptkit.demo import build_example_base, example
from adaptkit.errors import ConfigError

from .conftest import cli_error, run_cli

ROOT = Path(__file__).resolve().parents[1]
MISSING = "/nonexistent/adaptkit-test"


# ------------------------------------------------------------------------------------------- the declarations


def test_every_declaration_is_complete():
    assert set(P.PARAMS) >= {"rank", "density", "weights", "seed", "workers", "alpha", "energy", "bits", "iters",
                             "shard_size", "dtype", "majority_sign"}
    for name, p in P.PARAMS.items():
        assert p.name == name and p.description and isinstance(p.type, P.ParamType), name
        assert p.flag is None or p.flag == "--" + name.replace("_", "-"), (name, p.flag)
        assert (p.type is P.ParamType.CHOICE) == bool(p.choices), name
    assert P.ParamType.INTEGER == "integer"  # a str enum, not bare strings
    assert P.RANK.rule == "an integer of at least 1" and P.DENSITY.rule == "a number in (0, 1]"
    assert P.ALPHA.rule == "a finite number greater than 0" and P.BITS.rule == "one of 4, 8"
    assert P.SEED.rule == "an integer" and P.WEIGHTS.rule == "finite numbers"


@pytest.mark.parametrize("value", [2.7, 4.0, True, 0, -1, "4", None, float("nan"), torch.tensor([1, 2])],
                         ids=repr)
def test_rank_rule_and_message(value):
    with pytest.raises(ConfigError) as e:
        P.RANK.check(value)
    assert str(e.value) == f"rank (--rank) must be an integer of at least 1, got {value!r}"
    assert e.value.argument == "rank"


def test_integers_from_numpy_and_torch_are_integers_bools_are_not_numbers():
    for value in (3, np.int64(3), np.int32(3), np.uint8(3), torch.tensor(3)):
        got = P.RANK.check(value)
        assert got == 3 and type(got) is int
    assert P.BITS.check(np.int64(8)) == 8 and type(P.BITS.check(np.int64(8))) is int
    for value in (0.5, np.float32(0.5), np.float64(0.5), torch.tensor(0.5), 1):
        got = P.DENSITY.check(value)
        assert got == 0.5 or got == 1.0
        assert type(got) is float
    for param in (P.DENSITY, P.ALPHA, P.ENERGY, P.SEED, P.WORKERS, P.BITS):
        with pytest.raises(ConfigError, match=re.escape(f"{param.label} must be")):
            param.check(True)
    with pytest.raises(ConfigError, match=re.escape("weights (--weights) must be finite numbers, got [1.0, True]")):
        P.WEIGHTS.check([1.0, True])
    assert P.WEIGHTS.check(np.array([1.0, -0.5])) == [1.0, -0.5] and P.WEIGHTS.check((1, 2)) == [1.0, 2.0]
    assert P.SHARD_SIZE.check("4GiB") == 4 * 2**30 and P.SHARD_SIZE.check("5GB") == 5 * 10**9
    assert P.SHARD_SIZE.optional(None) is None


# ------------------------------------------------------------------- every library function: one rule, one message


def _rank_calls():
    lora = ak.load(example("lora_code"))
    return {
        "merge": lambda r: ak.merge([lora, lora], method="svd", rank=r),
        "convert": lambda r: ak.convert(lora, rank=r),
        "extract": lambda r: ak.extract(MISSING, MISSING, rank=r),
        "loftq": lambda r: ak.loftq(MISSING, "q_proj", rank=r),
        "pissa_to_lora": lambda r: ak.pissa_to_lora(MISSING, MISSING, rank=r),
    }


@pytest.mark.parametrize("value", [2.7, True, 0], ids=repr)
def test_every_function_taking_a_rank_refuses_the_same_values_with_the_same_message(value):
    """Before: 3 rules in 6 places: ``int(rank) < 1`` let 2.7 through (convert, extract), merge took True."""
    for name, call in _rank_calls().items():
        with pytest.raises(ConfigError) as e:
            call(value)
        assert str(e.value) == f"rank (--rank) must be an integer of at least 1, got {value!r}", name


def test_every_function_taking_a_rank_takes_a_numpy_integer():
    """Before: ``isinstance(rank, int)`` refused np.int64 in loftq and pissa_to_lora."""
    calls = _rank_calls()
    assert {layer.rank for layer in calls["convert"](np.int64(2)).layers.values()} == {2}
    assert {layer.rank for layer in calls["merge"](np.int64(2)).layers.values()} == {2}
    for name in ("extract", "loftq", "pissa_to_lora"):  # the rank is fine: what fails is the missing source
        with pytest.raises(ak.SourceNotFoundError):
            calls[name](np.int64(2))


@pytest.mark.parametrize("value", [0, 1.5, True, float("nan")], ids=repr)
def test_density_one_message_in_merge_and_compare(value):
    adapters = [example("lora_code"), example("lora_math")]
    for call in (lambda: ak.merge(adapters, method="ties", density=value), lambda: ak.compare(adapters, density=value)):
        with pytest.raises(ConfigError) as e:
            call()
        assert str(e.value) == f"density (--density) must be a number in (0, 1], got {value!r}"


def test_weights_one_rule_in_merge_and_fuse(tmp_path):
    """Before: merge checked weights finite, fuse did not (it went on to open the base)."""
    lora = example("lora_code")
    bad = [float("nan")]
    for call in (lambda: ak.merge([lora], weights=bad), lambda: ak.fuse(MISSING, lora, tmp_path / "o", weights=bad)):
        with pytest.raises(ConfigError) as e:
            call()
        assert str(e.value) == "weights (--weights) must be finite numbers, got [nan]"
    for call in (lambda: ak.merge([lora, lora], weights=[1, 2, 3]),
                 lambda: ak.fuse(MISSING, [lora, lora], None, weights=[1, 2, 3], dry_run=True)):
        with pytest.raises(ConfigError) as e:
            call()
        assert str(e.value) == "weights (--weights): 3 weights for 2 adapters; give one weight per adapter"
    assert not (tmp_path / "o").exists()


def test_cli_weights_parsed_and_checked_by_the_same_module(tmp_path):
    lora = str(example("lora_code"))
    for args in (["merge", lora, "-o", str(tmp_path / "m")], ["fuse", MISSING, lora, "-o", str(tmp_path / "f")]):
        cli_error(run_cli(*args, "--weights", "1,x"), "weights (--weights) must be comma-separated numbers like 1,0.5, got '1,x'")
    line = cli_error(run_cli("fuse", MISSING, lora, "-o", str(tmp_path / "f"), "--weights", "nan"))
    assert line == "error: weights (--weights) must be finite numbers, got [nan]"
    assert not list(tmp_path.iterdir())


def test_cli_range_errors_name_the_option(tmp_path):
    lora = str(example("lora_code"))
    line = cli_error(run_cli("merge", lora, lora, "-o", str(tmp_path / "m"), "--method", "svd", "--rank", "0"))
    assert line == "error: rank (--rank) must be an integer of at least 1, got 0"
    line = cli_error(run_cli("extract", MISSING, MISSING, "-o", str(tmp_path / "x"), "--energy", "2"))
    assert line == "error: energy (--energy) must be a number in (0, 1], got 2.0"
    line = cli_error(run_cli("fuse", MISSING, lora, "-o", str(tmp_path / "f"), "--shard-size", "lots"))
    assert line == ("error: shard_size (--shard-size) must be a positive number of bytes, or a size like 500MB, 5GB, "
                    "4GiB, got 'lots'")
    assert not list(tmp_path.iterdir())


def test_cli_options_are_built_from_the_declarations():
    """Every option named like a declared parameter has its flag, and its click type follows the declaration."""
    types = {P.ParamType.INTEGER: click.types.IntParamType, P.ParamType.NUMBER: click.types.FloatParamType,
             P.ParamType.CHOICE: click.Choice, P.ParamType.SIZE: click.types.StringParamType}
    seen = set()
    for command_name, command in main.commands.items():
        for option in command.params:
            p = P.PARAMS.get(option.name or "")
            if p is None or not isinstance(option, click.Option) or (command_name, option.name) == ("merge", "method"):
                continue  # merge's --method is a merge method (a table of its own), not extract's SVD method
            seen.add(p.name)
            assert p.flag in option.opts, (command_name, option.opts)
            if p.type in types:
                assert isinstance(option.type, types[p.type]), (command_name, p.name, option.type)
            if p.type is P.ParamType.CHOICE:
                assert tuple(option.type.choices) == p.choices, (command_name, p.name)
    assert seen >= {"rank", "density", "weights", "seed", "workers", "alpha", "energy", "bits", "iters", "shard_size",
                    "dtype", "majority_sign", "method", "embeddings", "norms"}


def test_no_parameter_rule_outside_the_parameter_module():
    """The checks live in core/params.py: no range test or type test of a declared parameter anywhere else."""
    names = "rank|density|weights|seed|workers|alpha|energy|bits|iters|shard_size|max_entries"
    patterns = [
        re.compile(rf"isinstance\(({names}),"),
        re.compile(rf"int\(({names})\)\s*[<>!]"),
        re.compile(rf"not\s+0(\.0)?\s*<\s*(float\()?({names})"),
        re.compile(rf"""["'](\{{?)({names})(\}}?) must be"""),
    ]
    hits = []
    for path in sorted((ROOT / "adaptkit").rglob("*.py")):
        if path.name == "params.py":
            continue
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if any(p.search(line) for p in patterns):
                hits.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
    assert not hits, "\n".join(hits)


# ------------------------------------------------------------------------------------------- one top-k rule


def test_compare_counts_conflicts_among_the_entries_a_ties_merge_keeps():
    """PEFT keeps int(density * n) entries (magnitude_based_pruning); compare used ceil, so at density 0.25 of 10
    entries it looked at 3 where the merge keeps 2."""
    from peft.utils.merge_utils import magnitude_based_pruning

    from adaptkit.analysis.compare import sign_conflict, topk_mask
    from adaptkit.ops.merging.primitives import magnitude_prune

    g = torch.Generator().manual_seed(0)
    for n, density in ((10, 0.25), (7, 0.5), (1000, 0.013), (30, 0.1)):
        v = torch.randn(n, generator=g)
        mask = topk_mask(v, density)
        assert torch.equal(mask, magnitude_prune(v, density) != 0), (n, density)
        assert torch.equal(mask, magnitude_based_pruning(v, density) != 0), (n, density)
        assert int(mask.sum()) == P.kept_entries(density, n) == int(density * n)
    conflict, overlap, shared = sign_conflict(torch.randn(4, generator=g), torch.randn(4, generator=g), 0.2)
    assert shared == 0 and math.isnan(conflict) and math.isnan(overlap)  # int(0.8) = 0: a merge keeps nothing here


# ------------------------------------------------------------------------------------------- one name per column


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    root = tmp_path_factory.mktemp("columns")
    base = build_example_base(root / "base")
    ak.fuse(base, example("lora_code"), root / "tuned", progress=False)
    return base, root / "tuned"


def _no_retired(name: str, columns) -> set[str]:
    columns = set(columns)
    assert not columns & set(RETIRED), (name, sorted(columns & set(RETIRED)))
    return columns


def test_every_report_uses_the_shared_column_names(tuned):
    from adaptkit.analysis.compare import compare_adapters
    from adaptkit.live.status import checkpoint_status

    base, tuned_dir = tuned
    lora, loha = ak.load(example("lora_code")), ak.load(example("lycoris_loha.safetensors"), base=str(base))
    approx = {MODULE, RETAINED_ENERGY, RELATIVE_ERROR}
    assert _no_retired("convert", ak.convert(loha, rank=2, return_report=True)[1].columns) >= approx
    _, report = ak.extract(base, tuned_dir, rank=2, return_report=True, progress=False)
    assert _no_retired("extract", report.columns) >= approx | {DELTA_NORM}
    loftq_cols = _no_retired("loftq", ak.loftq(base, "q_proj", rank=2).report.columns)
    assert loftq_cols >= {MODULE, f"{RELATIVE_ERROR}_qlora", f"{RELATIVE_ERROR}_loftq"}
    assert _no_retired("status", checkpoint_status(lora).columns) >= {MODULE, DELTA_NORM}
    assert MODULE in _no_retired("analyze", ak.analyze(lora).columns)
    comparison = compare_adapters([example("lora_code"), example("lora_math")])
    assert MODULE in _no_retired("compare", comparison.layers.columns)


def test_docs_use_the_shared_column_names():
    retired = [f"`{name}`" for name in ("rel_error", "rel_qlora", "rel_loftq")] + ['report["path"]', "report's `energy`"]
    for page in sorted((ROOT / "docs").glob("*.md")):
        text = page.read_text()
        for name in retired:
            assert name not in text, (page.name, name)
