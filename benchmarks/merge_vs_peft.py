"""Benchmark: adaptkit's merge against peft's ``add_weighted_adapter``, all eleven combination types, TinyLlama shapes.

Three LoRA adapters (r=16 on q/k/v/o/gate/up/down, ``init_lora_weights=False``: random non-zero A and B,
different seeds) are made with peft on a llama with TinyLlama-1.1B's shapes (hidden 2048, intermediate 5632,
32 heads, 4 KV heads: k/v are 256 x 2048) and saved. Then, for each of PEFT's eleven ``combination_type``s
(weights 1.0, 0.6, -0.4; density 0.2 where used; rank 16 for the SVD methods), in the same process:

* **peft**: ``PeftModel.add_weighted_adapter(["a0", "a1", "a2"], ...)`` on the already-loaded model (what a
  notebook calls); the time to build the model and load the adapters is not counted, and deleting the merged
  adapter afterwards is not timed.
* **adaptkit, in memory**: ``ak.merge(adapters, ...)`` on the three ``Adapter`` objects already read from the
  files peft saved (the same numbers: the adapters are peft's).
* **adaptkit, from files**: ``ak.merge(dirs, ...)``: reading the three adapter directories is included.
* **adaptkit + certificate**: in memory, then reading the merged adapter's metadata, which measures the coverage
  certificate's float64 ``‖ΔW‖²`` of every input layer (deferred until read; ``ak.save`` reads it).

Each timing is the median of ``--repeats`` runs or more (fast calls repeat for 2 s, up to 41 runs; min-max spread and the number of runs n printed),
taken in rounds that run every tool once in turn, so that a slow minute of a shared machine slows both sides;
the rounds stop once a tool has had ``--budget`` seconds (peft's SVD methods take 35-50 s a run, so they get
two). Peak memory: the extra resident memory during one call (peak RSS minus RSS before it,
sampled every 5 ms from a thread, after returning freed memory to the OS); that sampled run is not timed
unless it took over 10 s (the sampler slows short, Python-heavy calls). The last column is the largest per-layer relative Frobenius difference between peft's merged
ΔW and adaptkit's (DARE draws differ, so there it is the difference of two random draws, not an error).

TinyLlama has 22 decoder layers; by default this builds 1 (``--layers``) with a 256-token vocabulary: every
decoder layer costs the same, so the ratios do not depend on the layer count, and peft's SVD methods take
about a minute per layer. ``--threads`` defaults to 1 (a shared machine gives unstable multi-thread timings
of small tensor operations; both tools run with the same setting).

Run: ``python benchmarks/merge_vs_peft.py [--layers N] [--threads T] [--repeats R] [--methods svd,cat,...]``.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import statistics
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
DENSITY = 0.2
RANK = 16
METHODS = ["svd", "linear", "cat", "ties", "ties_svd", "dare_linear", "dare_ties", "dare_linear_svd",
           "dare_ties_svd", "magnitude_prune", "magnitude_prune_svd"]


def options(method: str) -> tuple[dict, dict]:
    """(peft kwargs, adaptkit kwargs) for a method."""
    peft_kw, ak_kw = {}, {}
    if any(s in method for s in ("ties", "dare", "prune")):
        peft_kw["density"] = ak_kw["density"] = DENSITY
    if method == "svd" or method.endswith("_svd"):
        peft_kw["svd_rank"] = ak_kw["rank"] = RANK
    if "dare" in method:
        ak_kw["seed"] = 0
    return peft_kw, ak_kw


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _trim() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:  # not glibc
        pass


def measure(fn):
    """Run ``fn()``; return (result, seconds, extra peak RSS in MiB)."""
    _trim()
    base = _rss()
    peak = [base]
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], _rss())
            time.sleep(0.005)

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
    lcfg = dict(r=RANK, lora_alpha=32, target_modules=TARGETS, init_lora_weights=False)
    torch.manual_seed(1)
    pm = get_peft_model(model, LoraConfig(**lcfg), adapter_name="a0")
    for i in (1, 2):
        torch.manual_seed(1 + i)
        pm.add_adapter(f"a{i}", LoraConfig(**lcfg))
    pm.save_pretrained(str(root))  # a0 at the root, peft puts the other names in subfolders
    dirs = [root / f"a{i}" if (root / f"a{i}").exists() else root for i in range(3)]
    return pm, dirs


def peft_deltas(pm, name: str) -> dict[str, torch.Tensor]:
    out = {}
    for n, mod in pm.named_modules():
        if hasattr(mod, "lora_A") and name in mod.lora_A:
            out[n.removeprefix("base_model.model.")] = mod.get_delta_weight(name).detach()
    return out


def runs(makers: dict, repeats: int, budget: float) -> tuple[dict, dict, dict]:
    """Time ``make()()`` for each tool (``make`` does the untimed setup and returns the call).

    First one run of each with the memory sampler (counted as a timed run only when it took over 10 s, where
    the sampler's cost is below 0.1%). Then rounds that run every tool once, in turn, so that all of them see
    the same machine (on a shared machine a 10 ms call varies 2x over minutes; timing one tool's runs, then
    the other's, turns that into a ratio error): at least one round, then until ``repeats`` rounds (at least
    2 s of them, up to 41, for calls of milliseconds), or until a tool has had ``budget`` seconds. Returns (results, times, MiB) by tool.
    """
    results, times, mib = {}, {}, {}
    for key, make in makers.items():
        results[key], seconds, mib[key] = measure(make())
        times[key] = [seconds] if seconds > 10 else []
    rounds = 0

    def more() -> bool:
        spent = [sum(t) for t in times.values()]
        return rounds == 0 or (rounds < 41 and (rounds < repeats or min(spent) < 2.0) and max(spent) < budget)

    while more():
        for key, make in makers.items():
            fn = make()
            start = time.perf_counter()
            fn()
            times[key].append(time.perf_counter() - start)
        rounds += 1
    return results, times, mib


def _stat(times: list[float]) -> str:
    med = statistics.median(times)
    return f"{med:8.3f} ({min(times):.3f}-{max(times):.3f}) n={len(times)}"


def main() -> None:
    import adaptkit as ak

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=1, help="decoder layers to build (TinyLlama has 22)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads for both tools (default 1)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per tool and method (median reported)")
    parser.add_argument("--budget", type=float, default=60.0,
                        help="stop repeating a tool's runs of one method after this many seconds (SVD methods in peft)")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of the eleven")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    with tempfile.TemporaryDirectory() as tmp:
        pm, dirs = build(args.layers, Path(tmp))
        adapters = [ak.load(d) for d in dirs]
        print(f"TinyLlama-shaped llama, {args.layers} decoder layer(s), {len(adapters[0])} LoRA layers per adapter, "
              f"r={RANK}, 3 adapters, weights {WEIGHTS}, density {DENSITY}, rank {RANK}, torch "
              f"{torch.__version__} threads {torch.get_num_threads()}, {args.repeats} runs each: median (min-max) s")
        print(f"{'method':<20}{'peft s':>28}{'adaptkit s':>28}{'x':>9}{'from files s':>28}{'x':>9}{'+cert x':>9}"
              f"{'peft MiB':>10}{'ak MiB':>8}{'max rel diff':>13}", flush=True)
        rows = []
        for method in methods:
            peft_kw, ak_kw = options(method)
            name = f"m_{method}"
            def peft_call():
                if name in pm.peft_config:
                    pm.delete_adapter(name)  # (not timed)
                return lambda: pm.add_weighted_adapter(["a0", "a1", "a2"], WEIGHTS, name, combination_type=method,
                                                       **peft_kw)

            results, times, mem = runs({
                "ak": lambda: lambda: ak.merge(adapters, WEIGHTS, method=method, progress=False, **ak_kw),
                "files": lambda: lambda: ak.merge(dirs, WEIGHTS, method=method, progress=False, **ak_kw),
                "cert": lambda: lambda: dict(ak.merge(adapters, WEIGHTS, method=method, progress=False,
                                                      **ak_kw).metadata),
                "peft": peft_call,
            }, args.repeats, args.budget)
            merged = results["ak"]
            ref = peft_deltas(pm, name)
            diff = max(((merged.layers[p].delta() - d).norm() / d.norm()).item() for p, d in ref.items())
            pm.delete_adapter(name)
            del ref
            p, a, f, c = (statistics.median(times[k]) for k in ("peft", "ak", "files", "cert"))
            rows.append((method, p / a, p / f, p / c))
            diff_text = f"{diff:.1e}" + (" (DARE)" if "dare" in method else "")
            print(f"{method:<20}{_stat(times['peft']):>28}{_stat(times['ak']):>28}{p / a:>8.1f}x{_stat(times['files']):>28}"
                  f"{p / f:>8.1f}x{p / c:>8.1f}x{mem['peft']:>10.0f}{mem['ak']:>8.0f}{diff_text:>16}", flush=True)
        worst = min(rows, key=lambda r: r[1])
        print(f"smallest speed-up in memory: {worst[0]} {worst[1]:.1f}x; from files: "
              f"{min(rows, key=lambda r: r[2])[0]} {min(r[2] for r in rows):.1f}x; in memory + certificate: "
              f"{min(rows, key=lambda r: r[3])[0]} {min(r[3] for r in rows):.1f}x")


if __name__ == "__main__":
    main()
