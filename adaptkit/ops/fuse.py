"""Fuse adapters into base weights, unfuse them again, and extract a LoRA from two models; all streaming.

A base model is never instantiated: :mod:`adaptkit.shards` reads its safetensors headers, plans every
output file in advance, and streams tensor by tensor. Tensors no adapter touches are copied as raw bytes
(in the kernel, no decoding); a touched tensor is read, computed in float32
(``W + sum_i w_i * dW_i``; DoRA and IA3 through their ``apply``), checked to be finite and written back
in the base dtype (or ``dtype``). Peak memory is a few tensors per worker, independent of the model size.
Outputs are written to a hidden temporary directory beside ``out`` and renamed into place.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from ..core.adapter import Adapter
from ..core.coverage import METADATA_KEY, Certificate, Outcome, certify, combine, split
from ..core.kinds import Layer, Replace
from ..core.params import SHARD_SIZE, WEIGHTS, WORKERS, check_weights
from ..errors import ConfigError, ShapeMismatchError, UnsupportedError
from ..formats.arch.remap import to_base_names
from ..formats.coverage import extra_module, match_layers
from ..formats.inputs import as_adapters
from ..io.base_model import TensorInfo, WeightSet, find_matches, open_base, parse_dtype
from ..io.outputs import atomic_output, check_output
from ..io.safetensors import FLOAT_ST
from ..io.shard_writer import (
    OutFile,
    Transform,
    copy_side_files,
    plan_group_files,
    write_index,
    write_out_file,
)
from ..progress import bar
from .experts import split_experts


def parse_size(size: int | str | None) -> int | None:
    """Bytes from ``5000000``, ``"500MB"``, ``"5GB"`` (powers of 10) or ``"4GiB"`` (powers of 2); ``None`` as is.

    Raises:
        ConfigError: not a positive size (the one rule of :data:`~adaptkit.core.params.SHARD_SIZE`).
    """
    return SHARD_SIZE.optional(size)


@dataclass(frozen=True)
class FuseResult:
    """What :func:`fuse` / :func:`unfuse` did (or, with ``dry_run``, would do).

    Args:
        out: the output path, or ``None`` for a dry run.
        plan: one row per tensor that changes: ``tensor``, ``file``, ``shape``, ``dtype``, ``out_dtype``,
            ``action``, ``adapters``, ``kinds``.
        tensors: number of tensors in the base.
        touched: number of tensors that change.
        bytes: bytes of tensor data written (or to write).
        seconds: wall time.
        skipped: base files not copied (weights in other formats, unused variants).
        coverage: the coverage certificate: which adapter layers (and extra tensors) land on which base tensor,
            which were dropped on request (``drop=``), and the share of the ΔW energy that is fused; also in
            every output file's ``__metadata__`` under ``adaptkit.coverage``.
    """

    out: Path | None
    plan: Any
    tensors: int
    touched: int
    bytes: int
    seconds: float
    skipped: tuple[str, ...] = ()
    coverage: Certificate | None = None

    def summary(self) -> dict[str, Any]:
        """The headline numbers as a dict (for a CLI header)."""
        gib = self.bytes / 2**30
        size = f"{gib:.3f} GiB" if gib >= 1 else f"{self.bytes / 2**20:.1f} MiB"
        out = {"output": str(self.out) if self.out else "(dry run: nothing written)", "tensors": self.tensors,
               "touched": self.touched, "size": size, "seconds": round(self.seconds, 2),
               "throughput": f"{gib / self.seconds:.2f} GiB/s" if self.seconds > 0 and self.out else "-",
               "skipped files": ", ".join(self.skipped) or "-"}
        if self.coverage is not None:
            out["coverage"] = self.coverage
        return out


def _as_adapters(adapters: Adapter | str | os.PathLike | Sequence[Adapter | str | os.PathLike],
                 base: str | os.PathLike, drop: Any = None) -> list[Adapter]:
    # kohya/LyCORIS flattened names resolve against the base being fused (its safetensors headers, or its
    # configs for a hub id), as inject resolves them against the live model; names `drop` allows to resolve to
    # nothing are left out there and carried into fuse's certificate as dropped
    out = as_adapters(adapters, against=base, drop=drop)
    if not out:
        raise ConfigError("no adapters given; pass at least one adapter to fuse")
    return out


def _label(adapter: Adapter, i: int) -> str:
    if adapter.source:
        return Path(str(adapter.source).rstrip("/")).name or f"adapter{i}"
    return f"adapter{i}"


def _check_fit(path: str, layer: Layer, info: TensorInfo) -> Layer:
    """The layer fitted to its base tensor (its own check of shapes and axes), or raise naming both."""
    if info.dtype not in FLOAT_ST:
        raise UnsupportedError(f"base tensor '{info.key}' is {info.dtype}, not floating point; fuse into an unquantized base")
    shape = layer.shape
    if shape is not None and math.prod(shape) != math.prod(info.shape):
        raise ShapeMismatchError(
            f"adapter layer {path} expects a weight of shape {tuple(shape)} but base tensor '{info.key}' has "
            f"{info.shape}; the adapter was made for another model"
        )
    try:
        return layer.fit(tuple(info.shape))  # the base's shape where the tensors leave it open; IA3 checks its axis
    except ShapeMismatchError as e:
        raise ShapeMismatchError(f"adapter layer {path} does not fit base tensor '{info.key}' of shape {info.shape} "
                                 f"({e}); the adapter was made for another model") from None


class _WeightOps:
    """The float32 transform of one base weight: every adapter op on it, in order (``W + w * (apply(W) - W)``).

    ``rows`` is set when every op is ``rowwise`` (LoRA without DoRA, IA3): the writer then streams the tensor
    in row blocks through each layer's ``apply_rows`` and never holds it whole in float32.
    """

    def __init__(self, ops: list[tuple[Layer, float]]) -> None:
        self.ops = ops
        self._caches: dict[int, dict] = {}
        if all(layer.rowwise for layer, _ in ops):
            self.rows = self._rows

    def __call__(self, w: torch.Tensor) -> torch.Tensor:
        for layer, weight in self.ops:
            if layer.rowwise and w.ndim >= 2:
                w = layer.apply_rows(w, 0, w.shape[0], weight=weight)
            elif layer.additive:
                w.add_(layer.delta().reshape(w.shape), alpha=weight)
            else:
                new, _ = layer.apply(w)
                w = new if weight == 1.0 else w + weight * (new - w)
        return w

    def release(self) -> None:
        """Drop the cached factors once the tensor is written."""
        self._caches.clear()

    def _rows(self, w: torch.Tensor, r0: int, r1: int) -> torch.Tensor:
        """Apply the ops to rows ``r0:r1`` of the weight (``w`` holds just those rows)."""
        for i, (layer, weight) in enumerate(self.ops):
            w = layer.apply_rows(w, r0, r1, weight=weight, cache=self._caches.setdefault(i, {}))
        return w


def _bias_transform(ops: list[tuple[Layer, float]]) -> Transform:
    """The float32 transform of one base bias: each op's ``apply_bias`` (the bias half of its ``apply``), in order."""

    def transform(b: torch.Tensor) -> torch.Tensor:
        for layer, weight in ops:
            if layer.additive:  # b + w * db, as the weight gets W + w * dW
                b = b + weight * layer.delta_bias().reshape(b.shape)
            else:
                new = layer.apply_bias(b)
                b = new if weight == 1.0 else b + weight * (new - b)
        return b

    return transform


def _prepare(ws: WeightSet, adapters: list[Adapter], unfuse: bool) -> list[Adapter]:
    """The adapters as fuse applies them: per-expert layers, and (unfuse) checked to be subtractable."""
    out = []
    for i, adapter in enumerate(adapters):
        label = _label(adapter, i)
        if unfuse:
            bad = sorted(p for p, layer in adapter.layers.items() if not layer.additive)
            if bad:
                kind = "DoRA re-normalises" if adapter.layers[bad[0]].dora else f"{adapter.layers[bad[0]].kind.upper()} rescales"
                raise UnsupportedError(
                    f"cannot unfuse {label}: {kind} the weight ({len(bad)} layers, e.g. {bad[0]}), so it cannot be "
                    "subtracted again; keep the unfused base instead"
                )
            # a saved `<module>.base_layer.weight` is the base the delta was added to: subtracting the delta restores it
            adapter = adapter.replace(extras={k: v for k, v in adapter.extras.items() if ".base_layer." not in k})
            if adapter.extras:
                raise UnsupportedError(
                    f"cannot unfuse {label}: it replaces whole tensors ({sorted(adapter.extras)[0]}, modules_to_save); "
                    "keep the unfused base instead"
                )
        out.append(adapter.replace(layers=split_experts(adapter.layers, ws.tensors)))  # per-expert checkpoints
    return out


def _certify_one(ws: WeightSet, adapter: Adapter, operation: str) -> Certificate:
    """Where each layer and extra tensor of ``adapter`` lands in ``ws`` (names, shapes, dtypes, biases)."""
    shapes = {k: info.shape for k, info in ws.tensors.items()}
    outcomes, extras = match_layers(adapter, shapes, ws.provenance)
    found = find_matches([p for p, o in outcomes.items() if o.status == "matched"], ws.tensors)
    for path, m in found.matched.items():
        layer, info = adapter.layers[path], ws.tensors[m.weight]
        try:
            layer = _check_fit(path, layer, info)
        except UnsupportedError as e:
            outcomes[path] = Outcome(None, "refused", str(e))
            continue
        except ShapeMismatchError as e:
            outcomes[path] = Outcome(None, "shape", str(e))
            continue
        if layer.changes_bias and m.bias is None:
            try:
                layer.apply_bias(None)  # IA3: no bias to rescale, nothing to do
            except UnsupportedError:
                outcomes[path] = Outcome(None, "refused", f"base '{m.weight}' has no bias: the bias part (PEFT lora_bias, "
                                         "a LyCORIS diff_b) cannot be fused into modules that have none (peft's "
                                         "merge_and_unload refuses it too); apply it at runtime (ak.inject)")
    for key, o in extras.items():
        if o.status == "matched" and ws.tensors[o.target].dtype not in FLOAT_ST:
            extras[key] = Outcome(None, "refused", f"base tensor '{o.target}' is {ws.tensors[o.target].dtype}")
    return certify(adapter, outcomes, operation=operation, target=ws.provenance, extras=extras)


def certify_fuse(ws: WeightSet, adapters: list[Adapter], unfuse: bool = False) -> Certificate:
    """The coverage certificate of fusing ``adapters`` into ``ws`` (not gated: :func:`fuse` calls
    :meth:`~adaptkit.core.coverage.Certificate.require` with its ``drop``); ``<label>:<path>`` rows for several."""
    op = "unfuse" if unfuse else "fuse"
    labels = [_label(a, i) for i, a in enumerate(adapters)]
    return combine([(label, _certify_one(ws, a, op)) for label, a in zip(labels, adapters)], operation=op,
                   target=ws.provenance)


def _plan(ws: WeightSet, adapters: list[Adapter], weights: list[float], unfuse: bool, cert: Certificate):
    """Map every landing adapter layer (and whole tensor it carries) to base tensors.

    Returns:
        ``(transforms, names, kinds)``: base key -> float32 transform, and the adapter labels and kinds
        touching each key (for the plan table).
    """
    weight_ops: dict[str, list[tuple[Layer, float]]] = {}
    bias_ops: dict[str, list[tuple[Layer, float]]] = {}
    names: dict[str, list[str]] = {}
    kinds: dict[str, list[str]] = {}
    landing = split(cert, [_label(a, i) for i, a in enumerate(adapters)])
    for i, (adapter, w) in enumerate(zip(adapters, weights)):
        label = _label(adapter, i)
        sign = -1.0 if unfuse else 1.0
        paths = [p for p in adapter.layers if p in landing[i]]
        matches = find_matches(paths, ws.tensors).matched
        for path, m in matches.items():
            layer = _check_fit(path, adapter.layers[path], ws.tensors[m.weight])
            weight_ops.setdefault(m.weight, []).append((layer, sign * w))
            names.setdefault(m.weight, []).append(label)
            kinds.setdefault(m.weight, []).append(layer.kind + ("+dora" if layer.dora else ""))
            if layer.changes_bias:
                if m.bias is None:
                    continue  # certified: a kind with nothing to do on a bias-free module
                bias_ops.setdefault(m.bias, []).append((layer, sign * w))
                names.setdefault(m.bias, []).append(label)
                kinds.setdefault(m.bias, []).append(layer.kind + " bias")
        extras = [k for k in adapter.extras if k in landing[i]]
        if extras:
            # PEFT saves full embedding weights as `<module>.base_layer.weight` and modules_to_save as `<module>.weight`
            modules = {k: extra_module(k) for k in extras}
            extra_matches = find_matches(sorted(set(modules.values())), ws.tensors).matched
            for key, mod in modules.items():
                m = extra_matches[mod]
                target = m.bias if key.endswith(".bias") else m.weight
                weight_ops.setdefault(target, []).insert(0, (Replace(adapter.extras[key]), 1.0))
                names.setdefault(target, []).append(label)
                kinds.setdefault(target, []).append("replace")
    transforms: dict[str, Transform] = {k: _WeightOps(v) for k, v in weight_ops.items()}
    transforms.update({k: _bias_transform(v) for k, v in bias_ops.items()})
    return transforms, names, kinds


def _plan_frame(ws: WeightSet, transforms: dict, names: dict, kinds: dict, out_dtype: str | None, unfuse: bool):
    rows = []
    for key in sorted(transforms, key=lambda k: (str(ws.tensors[k].file), ws.tensors[k].begin)):
        info = ws.tensors[key]
        rows.append({"tensor": key, "file": info.file.name, "shape": "x".join(map(str, info.shape)), "dtype": info.dtype,
                     "out_dtype": out_dtype or info.dtype, "action": "unfuse" if unfuse else "fuse",
                     "adapters": ", ".join(dict.fromkeys(names[key])), "kinds": ", ".join(dict.fromkeys(kinds[key]))})
    return pd.DataFrame(rows, columns=["tensor", "file", "shape", "dtype", "out_dtype", "action", "adapters", "kinds"])


def _run(base, adapters, out, weights, dtype, shard_size, overwrite, dry_run, progress, workers, fsync, unfuse,
         drop=None) -> FuseResult:
    start = time.perf_counter()
    workers, size, out_dtype = WORKERS.optional(workers), SHARD_SIZE.optional(shard_size), parse_dtype(dtype)
    if weights is not None:
        weights = WEIGHTS.check(weights)
    ads = _as_adapters(adapters, base, drop)
    for ad in ads:
        ad.check_finite("unfuse" if unfuse else "fuse")
    weights = check_weights(weights, len(ads))
    if out is not None and not dry_run:
        check_output(out, overwrite, inputs=[base, adapters])
    ws = open_base(base)
    shapes = {k: tuple(info.shape) for k, info in ws.tensors.items()}
    ads = [to_base_names(a, shapes, drop) for a in ads]  # a Flux LoRA in BFL names onto a diffusers transformer ...
    ads = _prepare(ws, ads, unfuse)
    cert = certify_fuse(ws, ads, unfuse).require(drop)
    transforms, names, kinds = _plan(ws, ads, weights, unfuse, cert)
    plan = _plan_frame(ws, transforms, names, kinds, out_dtype, unfuse)
    stamp = {METADATA_KEY: cert.to_json()}
    groups = [(g, [replace(f, metadata={**f.metadata, **stamp})
                   for f in plan_group_files(g, ws, out_dtype, transforms, size)]) for g in ws.groups]
    files = [f for _, fs in groups for f in fs]
    total = sum(f.data_bytes for f in files)
    if dry_run or out is None:
        return FuseResult(None, plan, len(ws.tensors), len(transforms), total, time.perf_counter() - start, ws.skipped,
                          cert)
    single = ws.is_file and Path(out).suffix == ".safetensors"
    with atomic_output(out, overwrite=overwrite, directory=not single) as tmp:
        targets = [(f, tmp if single else tmp / f.rel_path) for f in files]
        for _, path in targets:
            path.parent.mkdir(parents=True, exist_ok=True)
        _write_all(targets, total, progress, workers, fsync)
        if not single:
            for group, fs in groups:
                write_index(group, fs, tmp)
            copy_side_files(ws, tmp)
    return FuseResult(Path(out), plan, len(ws.tensors), len(transforms), total, time.perf_counter() - start, ws.skipped,
                      cert)


def _write_all(targets: list[tuple[OutFile, Path]], total: int, progress: bool | None, workers: int | None,
               fsync: bool) -> None:
    n = workers or min(len(targets), os.cpu_count() or 1, 8)
    overall = bar(desc="fuse", total=total, unit="B", unit_scale=True, progress=progress)
    slots = list(range(1, n + 1))

    def work(item: tuple[OutFile, Path]) -> None:
        plan, path = item
        slot = slots.pop() if slots else n + 1
        file_bar = bar(desc=Path(plan.rel_path).name, total=len(plan.entries), unit="tensor", position=slot,
                       progress=progress)

        def tick(entry: Any) -> None:
            file_bar.update(1)
            overall.update(entry.nbytes)

        # one torch thread per worker: the row blocks are small (cache-resident), and splitting each op across
        # threads cost more in synchronisation than it gained (measured on 2 cores with other load: 10x slower
        # with 2 threads per worker). torch also keeps this as the default for new threads: restored below.
        torch.set_num_threads(1)
        try:
            write_out_file(plan, path, on_tensor=tick, fsync=fsync)
        finally:
            file_bar.close()
            slots.append(slot)

    order = sorted(targets, key=lambda t: -t[0].data_bytes)
    threads = torch.get_num_threads()
    try:
        if n <= 1:
            for item in order:
                work(item)
        else:
            with ThreadPoolExecutor(max_workers=n) as pool:
                futures = [pool.submit(work, item) for item in order]
                try:
                    for fut in futures:
                        fut.result()
                except BaseException:
                    for fut in futures:
                        fut.cancel()
                    raise
    finally:
        torch.set_num_threads(threads)  # the caller's setting, for its own thread and the threads it starts later
        overall.close()


def fuse(base: str | os.PathLike, adapters: Any, out: str | os.PathLike | None, weights: Sequence[float] | None = None,
         dtype: str | torch.dtype | None = None, shard_size: int | str | None = None, overwrite: bool = False,
         dry_run: bool = False, progress: bool | None = None, workers: int | None = None, fsync: bool = False,
         drop: Sequence[str] | str | None = None) -> FuseResult:
    """Fuse adapters into a base model's weights, streaming tensor by tensor.

    Args:
        base: hub id (``org/name[@rev][:sub]``), directory of safetensors shards (with
            ``model.safetensors.index.json``), a diffusers pipeline directory, or one ``.safetensors`` file.
        adapters: one or more adapters (:class:`~adaptkit.graph.Adapter` or sources for :func:`adaptkit.load`);
            the flattened module names of kohya/LyCORIS files are resolved against ``base`` itself.
        out: output directory (a ``.safetensors`` path when ``base`` is one file), written atomically.
        weights: one multiplier per adapter (default 1.0): ``W + sum_i w_i * dW_i``; for DoRA/IA3 layers
            ``W + w_i * (apply_i(W) - W)``.
        dtype: output dtype (``"bf16"``, ``"fp16"``, ``"fp32"``); default: each tensor keeps its dtype.
        shard_size: re-shard the output at this size (bytes or ``"5GB"``); default: the base's shards.
        overwrite: replace an existing output.
        dry_run: only plan; nothing is written (``FuseResult.plan`` lists what would change).
        progress: show progress bars (``None``: only on a terminal).
        workers: output files written in parallel, at least 1 (default: one per core, at most 8).
        fsync: flush every output file to the disk before the rename (survives a power loss, not only a
            killed process; slower: the write-back is waited for).
        drop: globs naming the adapter layers (or extra tensors) that may be left out when they do not land
            (``"*lm_head*"``, ``"status:unmatched"``; ``<label>:<path>`` with several adapters); the layers they
            name are not fused and are listed as ``dropped`` in the certificate. A glob naming no such layer
            is an error.

    Returns:
        A :class:`FuseResult`; ``result.coverage`` is the coverage certificate, also written into every output
        file's ``__metadata__`` under ``adaptkit.coverage``.

    Raises:
        CoverageError: layers that would not land and are not named by ``drop``: no base weight (all are
            listed), several, another shape (:class:`~adaptkit.core.coverage.CoverageShapeError`, also a
            ShapeMismatchError), a bias the base module lacks or a quantized base tensor (also an UnsupportedError).
        ConfigError: bad weights/dtype/size/workers.
        NonFiniteError: an adapter holds NaN or Inf (tensors, alpha or scale), or a fused tensor is not
            finite (nothing is written).
        FormatError: a base shard is corrupt or truncated. OutputExistsError: ``out`` exists.
    """
    return _run(base, adapters, out, weights, dtype, shard_size, overwrite, dry_run, progress, workers, fsync, unfuse=False,
                drop=drop)


def unfuse(base: str | os.PathLike, adapters: Any, out: str | os.PathLike | None, weights: Sequence[float] | None = None,
           dtype: str | torch.dtype | None = None, shard_size: int | str | None = None, overwrite: bool = False,
           dry_run: bool = False, progress: bool | None = None, workers: int | None = None, fsync: bool = False,
         drop: Sequence[str] | str | None = None) -> FuseResult:
    """Subtract fused additive adapters again: ``W - sum_i w_i * dW_i`` (the inverse of :func:`fuse`).

    Takes the same arguments as :func:`fuse`, with ``base`` the fused model. Fuse then unfuse returns the
    base within the rounding of its dtype.

    Raises:
        UnsupportedError: an adapter has DoRA or IA3 layers (they rescale the weight and cannot be
            subtracted) or replaces whole tensors; plus everything :func:`fuse` raises.
    """
    return _run(base, adapters, out, weights, dtype, shard_size, overwrite, dry_run, progress, workers, fsync, unfuse=True,
                drop=drop)


from .extract import extract

__all__ = ["FuseResult", "certify_fuse", "extract", "fuse", "parse_size", "unfuse"]
