"""Benchmark: adaptkit's merge against peft's ``add_weighted_adapter`` on TinyLlama-shaped adapters.

Three LoRA adapters (r=16 on q/k/v/o/gate/up/down, random non-zero weights, different seeds) are made with
peft on a llama with TinyLlama-1.1B's shapes (hidden 2048, intermediate 5632, 32 heads, 4 KV heads). Both
tools merge the same adapters in the same process for ``svd`` (rank 16), ``ties_svd`` (density 0.2, rank 16)
and ``cat``; peft works on the live model, adaptkit on the ``Adapter`` objects read from the files peft
saved. Reported per method: wall time of the merge call only (model building and loading excluded;
adaptkit: best of several runs without the memory sampler, peft: one run), the speed-up, the extra
resident memory during the call (peak RSS minus RSS before it, sampled every 10 ms from another thread,
after returning freed memory to the OS; adaptkit measured in a separate run), and the largest per-layer
relative Frobenius difference between the two merged deltas (the "equal accuracy" check).

TinyLlama has 22 decoder layers; by default this builds 2 (``--layers``) with a 256-token vocabulary to
keep memory (~1 GB) and peft's run time modest. Every layer costs the same, so the ratios do not depend
on the layer count.

Run: ``python benchmarks/merge_vs_peft.py [--layers N] [--threads T]``.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import tempfile
import threading
import time
import warnings
from pathlib import Path

import torch

warnings.filterwarnings("ignore")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
WEIGHTS = [1.0, 0.6, -0.4]
CASES = [("svd", {"svd_rank": 16}, {"rank": 16}),
         ("ties_svd", {"svd_rank": 16, "density": 0.2}, {"rank": 16, "density": 0.2}),
         ("cat", {}, {})]


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _trim() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:  # not glibc
        pass


def timed(fn):
    """Run ``fn()``; return (result, seconds)."""
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def measure(fn):
    """Run ``fn()``; return (result, seconds, extra peak RSS in MiB)."""
    _trim()
    base = _rss()
    peak = [base]
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], _rss())
            time.sleep(0.01)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    start = time.perf_counter()
    result = fn()
    seconds = time.perf_counter() - start
    done.set()
    t.join()
    peak[0] = max(peak[0], _rss())
    return result, seconds, (peak[0] - base) / 2**20


def build(layers: int, root: Path):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=2048, intermediate_size=5632, num_hidden_layers=layers, num_attention_heads=32,
                      num_key_value_heads=4, vocab_size=256, max_position_embeddings=256)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    lcfg = dict(r=16, lora_alpha=32, target_modules=TARGETS, init_lora_weights=False)
    torch.manual_seed(1)
    pm = get_peft_model(model, LoraConfig(**lcfg), adapter_name="a0")
    for i in (1, 2):
        torch.manual_seed(1 + i)
        pm.add_adapter(f"a{i}", LoraConfig(**lcfg))
    pm.save_pretrained(str(root))  # a0 at the root... peft puts non-default names in subfolders
    dirs = [root / f"a{i}" if (root / f"a{i}").exists() else root for i in range(3)]
    return pm, dirs


def peft_deltas(pm, name: str) -> dict[str, torch.Tensor]:
    out = {}
    for n, mod in pm.named_modules():
        if hasattr(mod, "lora_A") and name in mod.lora_A:
            out[n.removeprefix("base_model.model.")] = mod.get_delta_weight(name).detach()
    return out


def main() -> None:
    import adaptkit as ak

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=2, help="decoder layers to build (TinyLlama has 22)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        pm, dirs = build(args.layers, Path(tmp))
        adapters = [ak.load(d) for d in dirs]
        print(f"TinyLlama-shaped llama, {args.layers} decoder layers, {len(adapters[0])} LoRA layers per adapter, "
              f"r=16, 3 adapters, weights {WEIGHTS}, torch threads {torch.get_num_threads()}")
        print(f"{'method':<10}{'peft s':>10}{'adaptkit s':>12}{'speed-up':>10}{'peft +MiB':>11}"
              f"{'adaptkit +MiB':>15}{'max rel diff':>14}")
        for method, peft_kw, ak_kw in CASES:
            def ours():
                return ak.merge(adapters, WEIGHTS, method=method, progress=False, **ak_kw)

            ak_s = min(timed(ours)[1] for _ in range(3 if method == "ties_svd" else 7))  # no sampler running
            merged, _, ak_mb = measure(ours)
            name = f"m_{method}"
            _, peft_s, peft_mb = measure(lambda: pm.add_weighted_adapter(
                ["a0", "a1", "a2"], WEIGHTS, name, combination_type=method, **peft_kw))
            ref = peft_deltas(pm, name)
            diff = max(((merged.layers[p].delta() - d).norm() / d.norm()).item() for p, d in ref.items())
            pm.delete_adapter(name)
            del ref
            print(f"{method:<10}{peft_s:>10.3f}{ak_s:>12.4f}{peft_s / ak_s:>9.0f}x{peft_mb:>11.0f}{ak_mb:>15.0f}"
                  f"{diff:>14.1e}", flush=True)


if __name__ == "__main__":
    main()
