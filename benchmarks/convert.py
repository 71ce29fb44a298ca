"""Benchmark: converting a ~1 GB LyCORIS file to PEFT vs reading and writing the same bytes with safetensors.

The file is a LoCon (kohya ``lora_down``/``lora_up``/``alpha``) on every linear and conv module of the
SDXL UNet and both text encoders, with real sd-scripts names (LDM ``input_blocks_...`` for the UNet), at a
rank chosen so the file is about ``--size-gb`` (fp16). Both timings run in the same process on the same
file, best of ``--repeat``; the page cache is warm for both. The ratio printed is
``(safetensors read + write) / (adaptkit convert)``; the target is at least 0.5.

Run: ``python benchmarks/convert.py [--size-gb 1.0] [--repeat 3]`` (peak memory about 2.5x the file size).
"""

from __future__ import annotations

import argparse
import math
import shutil
import tempfile
import time
from pathlib import Path

import torch


def make_file(path: Path, size_gb: float) -> tuple[int, int]:
    """Write the LyCORIS file; returns ``(layers, rank)``."""
    from safetensors.torch import save_file

    from adaptkit.formats import names

    inv = names.shipped("sdxl")
    prefix = {"unet": "lora_unet_", "text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}
    ldm = {c: {p: a for a, p in al.items()} for c, al in inv.aliases.items()}
    targets = []
    for comp, mods in inv.modules.items():
        for p, shape in mods.items():
            if len(shape) in (2, 4) and min(shape[:2]) >= 64 and "embed" not in p:
                # sd-scripts names the UNet in LDM form and both CLIP encoders text_model_encoder_...
                bare_clip = comp != "unet" and p.startswith(("encoder.", "embeddings.", "final_layer_norm"))
                name = ldm["unet"].get(p, p) if comp == "unet" else "text_model." + p if bare_clip else p
                targets.append((prefix[comp] + name.replace(".", "_"), tuple(shape)))
    per_rank = sum(s[0] + math.prod(s[1:]) for _, s in targets) * 2  # fp16 bytes per unit of rank
    rank = max(1, round(size_gb * 1e9 / per_rank))
    g = torch.Generator().manual_seed(0)
    sd = {}
    for name, shape in targets:
        r = min(rank, shape[0], math.prod(shape[1:]))
        sd[f"{name}.lora_down.weight"] = (torch.randn(r, *shape[1:], generator=g) * 0.01).half()
        up_shape = (shape[0], r, 1, 1) if len(shape) == 4 else (shape[0], r)
        sd[f"{name}.lora_up.weight"] = (torch.randn(*up_shape, generator=g) * 0.01).half()
        sd[f"{name}.alpha"] = torch.tensor(float(r) / 2).half()
    save_file(sd, str(path), metadata={"ss_base_model_version": "sdxl_base_v1-0", "ss_network_module": "lycoris.kohya"})
    return len(targets), rank


def best_of(repeat: int, fn, out: Path) -> float:
    """Best wall time of ``fn(out)``; the output is removed between runs, outside the timing."""
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn(out)
        times.append(time.perf_counter() - t)
        shutil.rmtree(out) if out.is_dir() else out.unlink()
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-gb", type=float, default=1.0)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--dir", default=None, help="working directory (default: a temporary one)")
    args = parser.parse_args()

    from safetensors.torch import load_file, save_file

    from adaptkit.ops.convert import convert_checkpoint

    work = Path(args.dir or tempfile.mkdtemp(prefix="adaptkit-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        src = work / "lycoris.safetensors"
        layers, rank = make_file(src, args.size_gb)
        size = src.stat().st_size
        print(f"file: {size / 1e9:.2f} GB, {layers} LoCon layers (SDXL UNet + both text encoders), rank {rank}, fp16")

        def baseline(out: Path) -> None:
            from safetensors import safe_open

            with safe_open(str(src), "pt") as f:
                meta = f.metadata()
            tensors = load_file(str(src))
            save_file(tensors, str(out), metadata=meta)

        def convert(out: Path) -> None:
            convert_checkpoint("lycoris->peft", src, out)

        best_of(1, convert, work / "peft")  # warm imports and the page cache for both sides
        t_base = best_of(args.repeat, baseline, work / "copy.safetensors")
        t_conv = best_of(args.repeat, convert, work / "peft")
        convert(work / "peft")
        written = (work / "peft" / "adapter_model.safetensors").stat().st_size
        print(f"written: {written / 1e9:.2f} GB PEFT LoRA ({written / size:.3f} of the source bytes)")
        print(f"safetensors read+write: {t_base:.2f} s ({size / 1e9 / t_base:.2f} GB/s)")
        print(f"adaptkit convert lycoris->peft: {t_conv:.2f} s ({size / 1e9 / t_conv:.2f} GB/s)")
        print(f"ratio (baseline / convert): {t_base / t_conv:.2f}x (target >= 0.5x)")
    finally:
        if args.dir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
