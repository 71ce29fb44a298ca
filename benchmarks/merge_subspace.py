"""Benchmark: the LoRA-native merge methods (KnOTS, TSV-M, Iso-C/CTS, core space) against their dense form.

Three random LoRA adapters (rank 16, different seeds, weights 1.0, 0.6, -0.4 where the method takes weights) on one
decoder layer at TinyLlama-1.1B's shapes (q/o 2048 x 2048, k/v 256 x 2048, gate/up 5632 x 2048, down 2048 x 5632).
For each method: **adaptkit** is ``ak.merge`` (factors only: bases from the stacked factors, coefficient matrices of
R x R or R x n, R = 48), **dense** the straightforward float64 implementation of the paper's algorithm that
``tests/test_merging_subspace.py`` checks adaptkit against (dense m x n deltas, full SVDs), run on the same layers.
``--modules`` picks the modules (default the attention ones: the dense form's full SVDs of the 5632-wide MLP
matrices take minutes each on one thread). Printed per method: median seconds of each (``--repeats`` runs, dense once), the ratio, adaptkit's peak extra
resident memory for one call, and the largest per-layer relative difference of the merged ΔW (float32 vs float64).

Run: ``python benchmarks/merge_subspace.py [--threads T] [--repeats R]`` (from the repository root).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import adaptkit as ak  # noqa: E402
from adaptkit.core.kinds import LoRA  # noqa: E402
from benchmarks.merge_vs_peft import measure  # noqa: E402
from tests import test_merging_subspace as ref  # noqa: E402

SHAPES = {"q_proj": (2048, 2048), "k_proj": (256, 2048), "v_proj": (256, 2048), "o_proj": (2048, 2048),
          "gate_proj": (5632, 2048), "up_proj": (5632, 2048), "down_proj": (2048, 5632)}
WEIGHTS = [1.0, 0.6, -0.4]
CASES = {
    "knots": ({"density": 0.2}, lambda d, w: ref.ref_knots(d, w, 0.2)),
    "tsv": ({}, lambda d, w: ref.ref_tsv(d, w, 1 / 3)),
    "iso_c": ({}, ref.ref_iso_c),
    "iso_cts": ({}, lambda d, w: ref.ref_iso_cts(d, w, 0.8)),
    "core_linear": ({}, None),
    "core_ties": ({"density": 0.2}, None),
}


def adapters(rank: int = 16) -> list[ak.Adapter]:
    out = []
    for seed in range(3):
        g = torch.Generator().manual_seed(seed)
        out.append(ak.Adapter(layers={f"layers.0.{n}": LoRA(down=torch.randn(rank, i, generator=g) * 0.02,
                                                            up=torch.randn(o, rank, generator=g) * 0.02,
                                                            alpha=2.0 * rank, shape=(o, i))
                                      for n, (o, i) in SHAPES.items()}))
    return out


def dense_core(ads: list[ak.Adapter], path: str, density: float | None) -> torch.Tensor:
    one = [ak.Adapter(layers={"m.q": a.layers[path]}) for a in ads]
    return ref.ref_core(one, WEIGHTS, density)


def timed(fn, repeats: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--modules", default="q_proj,k_proj,v_proj,o_proj",
                        help="which of the layer's modules (the dense SVDs of gate/up/down take minutes each)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    keep = set(args.modules.split(","))
    ads = [a.replace(layers={p: v for p, v in a.layers.items() if p.rsplit(".", 1)[-1] in keep}) for a in adapters()]
    print(f"{'method':<12} {'adaptkit s':>10} {'dense s':>9} {'ratio':>7} {'peak MiB':>9} {'max rel dΔW':>12}")
    for name, (options, dense) in CASES.items():
        t_ak, merged = timed(lambda: ak.merge(ads, weights=WEIGHTS, method=name, **options), args.repeats)
        _, _, peak = measure(lambda: ak.merge(ads, weights=WEIGHTS, method=name, **options))

        def run_dense():
            out = {}
            for path in ads[0].layers:
                if dense is None:
                    out[path] = dense_core(ads, path, options.get("density"))
                else:
                    deltas = [ref.dw(ak.Adapter(layers={"m.q": a.layers[path]})) for a in ads]
                    out[path] = dense(deltas, WEIGHTS)
            return out

        t_dense, want = timed(run_dense, 1)  # one run: the dense SVDs take tens of seconds
        err = max(ref.rel(merged.layers[p].delta_math(), want[p]) for p in want)
        print(f"{name:<12} {t_ak:>10.3f} {t_dense:>9.3f} {t_dense / t_ak:>6.1f}x {peak:>9.1f} {err:>12.2e}",
              flush=True)


if __name__ == "__main__":
    main()
