"""Benchmark: adaptkit's streaming fuse vs peft (from_pretrained + merge_and_unload + save_pretrained).

Builds TinyLlama-shaped bf16 models (hidden 2048, intermediate 5632, 32 heads / 4 KV heads, vocab 32000)
with fewer layers than TinyLlama's 22 so that peft's side stays within a few GB on a shared machine,
saved in several safetensors shards, plus a LoRA (r=16 on every linear layer). Then, for each model size,
in separate subprocesses (fresh interpreters, so the peak RSS of each is its own):

* ``copy``: ``shutil.copyfile`` of the weight files (the disk-speed baseline);
* ``adaptkit``: ``adaptkit.fuse(base, adapter, out)`` (and once more with ``fsync=True``, which waits for
  the write-back to the disk; the copy and peft do not);
* ``peft``: ``AutoModelForCausalLM.from_pretrained`` (bf16) + ``PeftModel.from_pretrained`` +
  ``merge_and_unload`` + ``save_pretrained`` with the same shard size.

Wall time is measured inside each child around the work only (imports excluded); peak RSS is the child's
``VmHWM`` (peak resident set since its exec), reported in total and above the child's peak after its imports. The
files are in the page cache for every run (they were just written), so this measures the tools, not the
disk. One touched tensor of both outputs is compared (within one bf16 ulp) as a sanity check.

Usage: ``python benchmarks/fuse_vs_peft.py [--layers 8 16] [--targets qv all-linear] [--workdir DIR] [--repeat 2]``
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

SHARD = "200MB"
CHILD_PRELUDE = textwrap.dedent("""
    import json, sys, time
    def rss_mb():  # peak RSS of this process since exec (ru_maxrss would include the parent's, inherited at fork)
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
""")
JOBS = {
    "copy": """
        import shutil
        from pathlib import Path
        base, out = Path(sys.argv[1]), Path(sys.argv[3])
        after_import = rss_mb(); t = time.perf_counter()
        out.mkdir()
        for f in sorted(base.iterdir()):
            shutil.copyfile(f, out / f.name)
        wall = time.perf_counter() - t
    """,
    "adaptkit": """
        import adaptkit
        after_import = rss_mb(); t = time.perf_counter()
        adaptkit.fuse(sys.argv[1], sys.argv[2], sys.argv[3], progress=False)
        wall = time.perf_counter() - t
    """,
    "adaptkit_fsync": """
        import adaptkit
        after_import = rss_mb(); t = time.perf_counter()
        adaptkit.fuse(sys.argv[1], sys.argv[2], sys.argv[3], progress=False, fsync=True)
        wall = time.perf_counter() - t
    """,
    "peft": """
        import torch, transformers, peft
        transformers.logging.set_verbosity_error()
        from transformers import AutoModelForCausalLM
        from peft import PeftModel
        after_import = rss_mb(); t = time.perf_counter()
        model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.bfloat16)
        model = PeftModel.from_pretrained(model, sys.argv[2]).merge_and_unload()
        model.save_pretrained(sys.argv[3], max_shard_size=sys.argv[4])
        wall = time.perf_counter() - t
    """,
}


def build_model(path: Path, layers: int, seed: int = 0) -> int:
    """Write a TinyLlama-shaped bf16 model tensor by tensor (never holding it whole); returns its bytes."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=2048, intermediate_size=5632, num_attention_heads=32, num_key_value_heads=4,
                      num_hidden_layers=layers, vocab_size=32000, max_position_embeddings=2048, tie_word_embeddings=False,
                      dtype="bfloat16")
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in LlamaForCausalLM(cfg).state_dict().items()}
    path.mkdir(parents=True)
    cfg.save_pretrained(str(path))
    gen = torch.Generator().manual_seed(seed)
    limit = 200_000_000
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, shape in shapes.items():
        n = 1
        for s in shape:
            n *= s
        if shards[-1] and size + 2 * n > limit:
            shards.append({})
            size = 0
        shards[-1][name] = None  # placeholder: generate when writing, one shard at a time
        size += 2 * n
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        for name in shard:
            if name.endswith("norm.weight"):
                tensors[name] = torch.ones(shapes[name], dtype=torch.bfloat16)
            else:
                tensors[name] = (torch.randn(shapes[name], generator=gen) * 0.02).to(torch.bfloat16)
            weight_map[name] = fname
            total += tensors[name].numel() * 2
        save_file(tensors, str(path / fname), metadata={"format": "pt"})
        del tensors
    (path / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return total


TARGETS = {"qv": ("q_proj", "v_proj"), "all-linear": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")}


def build_adapter(path: Path, base: Path, targets: tuple[str, ...], rank: int = 16, seed: int = 1) -> int:
    """A PEFT LoRA (r=16 on ``targets`` in every block, float32 factors); returns its layer count."""
    import torch

    import adaptkit as ak
    from adaptkit.io.base_model import open_base

    ws = open_base(base)
    gen = torch.Generator().manual_seed(seed)
    layers = {}
    for key, info in ws.tensors.items():
        if ".layers." in key and key.removesuffix(".weight").rsplit(".", 1)[-1] in targets:
            out, inp = info.shape
            layers[key.removesuffix(".weight")] = ak.LoRA(
                down=torch.randn(rank, inp, generator=gen) / inp**0.5, up=torch.randn(out, rank, generator=gen) * 0.01,
                alpha=2.0 * rank, shape=(out, inp))
    adapter = ak.Adapter(layers=layers, base_model=str(base),
                         config={"peft_type": "LORA", "task_type": "CAUSAL_LM"}, format="peft")
    ak.save(adapter, path)
    return len(layers)


def run_child(job: str, base: Path, adapter: Path, out: Path) -> dict:
    """Run one job in a fresh interpreter; returns wall seconds and peak RSS (MB) total and above imports."""
    code = CHILD_PRELUDE + textwrap.dedent(JOBS[job]) + textwrap.dedent("""
        print(json.dumps({"wall": wall, "after_import_mb": after_import, "peak_mb": rss_mb()}))
    """)
    env = dict(os.environ, TRANSFORMERS_VERBOSITY="error", HF_HUB_OFFLINE="1", PYTHONWARNINGS="ignore")
    proc = subprocess.Popen([sys.executable, "-c", code, str(base), str(adapter), str(out), SHARD],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)
    stdout, stderr = proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"{job} failed:\n{stderr[-3000:]}")
    result = json.loads(stdout.strip().splitlines()[-1])
    peak = result["peak_mb"]
    if os.environ.get("BENCH_DEBUG"):
        print(job, result, peak, file=sys.stderr)
    return {"wall": result["wall"], "peak_mb": peak, "work_mb": peak - result["after_import_mb"]}


def check_same(a: Path, b: Path, key: str) -> float:
    """Max difference of one tensor between two outputs, in bf16 ulps of the peft value."""
    import torch
    from safetensors import safe_open

    def get(d: Path):
        index = json.loads((d / "model.safetensors.index.json").read_text())["weight_map"]
        with safe_open(str(d / index[key]), "pt") as f:
            return f.get_tensor(key).float()

    x, y = get(a), get(b)
    ulp = torch.exp2(torch.floor(torch.log2(y.abs().clamp_min(2.0**-126))) - 7)
    return float(((x - y).abs() / ulp).max())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, nargs="+", default=[8, 16], help="model sizes, as numbers of blocks")
    parser.add_argument("--workdir", default=None, help="scratch directory (default: a temporary one)")
    parser.add_argument("--repeat", type=int, default=2, help="runs of copy/adaptkit per size (best is kept)")
    parser.add_argument("--targets", nargs="+", default=["qv", "all-linear"], choices=sorted(TARGETS),
                        help="LoRA target sets to benchmark")
    args = parser.parse_args()
    root = Path(args.workdir or tempfile.mkdtemp(prefix="fuse-bench-"))
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    try:
        for n in args.layers:
            base, adapter = root / f"base{n}", root / f"lora{n}"
            for p in (base, adapter):
                shutil.rmtree(p, ignore_errors=True)
            nbytes = build_model(base, n)
            shards = len(list(base.glob("*.safetensors")))
            copy = None
            for target in args.targets:
                shutil.rmtree(adapter, ignore_errors=True)
                n_layers = build_adapter(adapter, base, TARGETS[target])
                res = {}
                for job in ("copy", "adaptkit", "adaptkit_fsync", "peft"):
                    if job == "copy" and copy is not None:
                        res[job] = copy
                        continue
                    runs = []
                    for _ in range(1 if job in ("peft", "adaptkit_fsync") else args.repeat):
                        out = root / f"out-{job}-{n}"
                        shutil.rmtree(out, ignore_errors=True)
                        runs.append(run_child(job, base, adapter, out))
                        if job in ("copy", "adaptkit_fsync"):
                            shutil.rmtree(out)
                    res[job] = {"wall": min(r["wall"] for r in runs), "peak_mb": max(r["peak_mb"] for r in runs),
                                "work_mb": max(r["work_mb"] for r in runs)}
                copy = res["copy"]
                key = "model.layers.0.self_attn.q_proj.weight"
                ulps = check_same(root / f"out-adaptkit-{n}", root / f"out-peft-{n}", key)
                for job in ("adaptkit", "peft"):
                    shutil.rmtree(root / f"out-{job}-{n}", ignore_errors=True)
                gib = nbytes / 2**30
                row = {
                    "blocks": n, "lora": target, "model_GiB": round(gib, 3), "shards": shards, "lora_layers": n_layers,
                    "copy_s": round(res["copy"]["wall"], 2), "adaptkit_s": round(res["adaptkit"]["wall"], 2),
                    "adaptkit_fsync_s": round(res["adaptkit_fsync"]["wall"], 2), "peft_s": round(res["peft"]["wall"], 2),
                    "adaptkit_peak_MB": round(res["adaptkit"]["peak_mb"]), "peft_peak_MB": round(res["peft"]["peak_mb"]),
                    "adaptkit_work_MB": round(res["adaptkit"]["work_mb"]), "peft_work_MB": round(res["peft"]["work_mb"]),
                    "wall_ratio": round(res["adaptkit"]["wall"] / res["peft"]["wall"], 3),
                    "rss_ratio": round(res["adaptkit"]["peak_mb"] / res["peft"]["peak_mb"], 3),
                    "work_rss_ratio": round(res["adaptkit"]["work_mb"] / max(res["peft"]["work_mb"], 1e-9), 3),
                    "peft_peak_over_model": round(res["peft"]["peak_mb"] * 2**20 / nbytes, 2),
                    "adaptkit_GiB_s": round(gib / res["adaptkit"]["wall"], 2), "copy_GiB_s": round(gib / res["copy"]["wall"], 2),
                    "throughput_vs_copy": round(res["copy"]["wall"] / res["adaptkit"]["wall"], 3),
                    "max_ulps_vs_peft": round(ulps, 3),
                }
                rows.append(row)
                print(json.dumps(row), flush=True)
            shutil.rmtree(base)
            shutil.rmtree(adapter)
    finally:
        if args.workdir is None:
            shutil.rmtree(root, ignore_errors=True)
    print()
    keys = list(rows[0])
    width = max(len(k) for k in keys)
    for k in keys:
        print(f"{k.ljust(width)}  " + "  ".join(f"{str(r[k]):>10}" for r in rows))


if __name__ == "__main__":
    main()
