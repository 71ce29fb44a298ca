"""Benchmark: per-layer analysis in the low-rank space vs a dense-SVD reference, in the same run.

For each layer shape (LLaMA-7B-like attention and MLP projections by default) a random LoRA layer of rank
``--rank`` is built. Two timings per layer, best of ``--repeat``:

* ``adaptkit``: :func:`adaptkit.analysis.layers.analyze_layer` (QR of the factors + SVD of the ``r x r`` core, plus
  sparsity and the finite check): the whole row of ``ak.analyze``.
* ``dense``: the reference a user would write: build ``dW = scale * B @ A`` (float32) and take
  ``torch.linalg.svdvals(dW)`` plus a zero count, the same statistics.

It prints both times per layer, the ratio dense / adaptkit, and the largest relative difference of the top
``rank`` singular values (a correctness check). The dense reference is skipped above ``--max-dense``
entries (its memory and time grow with ``m * n``); the low-rank row is still timed (e.g. 200k x 200k).

Run: ``python benchmarks/analyze.py [--rank 16] [--repeat 3] [--dense-repeat 1]
[--shapes 4096x4096,4096x11008] [--threads N]`` (the dense 4096 x 11008 SVD alone takes minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from adaptkit.analysis.layers import analyze_layer
from adaptkit.core.kinds import LoRA


def best_of(fn, repeat: int) -> tuple[float, object]:
    """Best wall time of ``repeat`` calls and the last result."""
    best, out = float("inf"), None
    for _ in range(repeat):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return best, out


def dense_reference(layer: LoRA) -> tuple[np.ndarray, float]:
    """Singular values and zero fraction of the dense delta (what the low-rank path avoids)."""
    d = layer.delta()
    s = torch.linalg.svdvals(d)
    return s.double().numpy(), float((d == 0).float().mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--repeat", type=int, default=3, help="best of this many runs of the low-rank path")
    parser.add_argument("--dense-repeat", type=int, default=1, help="best of this many dense SVDs (slow)")
    parser.add_argument("--shapes", default="1024x1024,4096x4096,4096x11008,200000x200000",
                        help="comma-separated OUTxIN layer shapes")
    parser.add_argument("--max-dense", type=float, default=5e7, help="largest m*n for the dense reference")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, rank {args.rank}, "
          f"best of {args.repeat} (low-rank) / {args.dense_repeat} (dense)")
    print(f"{'shape':>16} {'adaptkit ms':>12} {'dense ms':>12} {'dense/adaptkit':>15} {'max rel diff':>13}")
    g = torch.Generator().manual_seed(0)
    for spec in args.shapes.split(","):
        m, n = (int(x) for x in spec.lower().split("x"))
        layer = LoRA(down=torch.randn(args.rank, n, generator=g) / n**0.5,
                     up=torch.randn(m, args.rank, generator=g) / args.rank**0.5, alpha=2 * args.rank, shape=(m, n))
        analyze_layer("warm-up", layer)  # first-call costs (allocations, LAPACK set-up) are not the layer's
        t_fast, (row, s_fast) = best_of(lambda: analyze_layer("layer", layer), args.repeat)
        if m * n > args.max_dense:
            print(f"{spec:>16} {t_fast * 1e3:>12.2f} {'(skipped)':>12} {'-':>15} {'-':>13}")
            continue
        t_dense, (s_dense, _) = best_of(lambda: dense_reference(layer), args.dense_repeat)
        top = s_dense[: args.rank]
        diff = float(np.max(np.abs(s_fast[: args.rank] - top) / top))
        print(f"{spec:>16} {t_fast * 1e3:>12.2f} {t_dense * 1e3:>12.1f} {t_dense / t_fast:>14.0f}x {diff:>13.1e}")


if __name__ == "__main__":
    main()
