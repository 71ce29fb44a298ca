"""GGUF LoRA adapter files, as llama.cpp loads them (``llama_adapter_lora_init``).

The container only: what goes in the file and how it is read back. Which base tensor each adapter layer
lands on, and the transforms llama.cpp's converter applied to the base, are the export's business
(:mod:`adaptkit.deploy.llamacpp`); this module writes what it is given.

What llama.cpp reads (``src/llama-adapter.cpp`` and ``src/llama-graph.cpp`` of the llama.cpp vendored in
llama-cpp-python 0.3.36):

* KV ``general.type = "adapter"``, ``general.architecture`` equal to the base's, ``adapter.type = "lora"``,
  ``adapter.lora.alpha`` (f32; absent reads as 0);
* tensor pairs ``<base tensor>.lora_a`` / ``<base tensor>.lora_b`` (``blk.0.attn_q.weight.lora_a``); any other
  suffix but ``_norm.weight`` is an error;
* for a base tensor of ggml shape ``ne = [in, out]`` (numpy ``(out, in)``): ``lora_a`` numpy ``(r, in)``,
  ``lora_b`` numpy ``(out, r)``; the delta is ``scale * B @ A``;
* for ``token_embd.weight`` (numpy ``(vocab, n_embd)``) A and B are flipped: ``lora_a`` numpy ``(vocab, r)``
  (rows are gathered by token id), ``lora_b`` numpy ``(n_embd, r)``;
* ``scale = adapter_scale * alpha / r`` with ``r = lora_b.ne[0]`` taken per tensor, or ``adapter_scale``
  when ``alpha == 0`` (``llama_adapter_lora_weight::get_scale``).

adaptkit writes the per-layer scale into ``lora_b``, so ``alpha`` is ``r`` when every pair has the same rank
and 0 (scale 1 everywhere) when they differ; both make llama.cpp's rule exact for every tensor.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import FormatError, ShapeMismatchError, UnsupportedError
from ..io.outputs import atomic_output

#: the KV adaptkit adds: a JSON list of [base tensor, module path, transform] (read back by :func:`read_gguf_lora`)
MODULES_KEY = "adaptkit.modules"
#: the KV with the coverage certificate's summary (JSON)
COVERAGE_KEY = "adaptkit.coverage"
#: tensor-name suffixes of the two factors
SUFFIX_A, SUFFIX_B = ".lora_a", ".lora_b"
#: GGUF tensor types the writer offers
DTYPES = ("f32", "f16")


def gguf_module():
    """The gguf package (llama.cpp's gguf-py), imported on first use.

    Raises:
        UnsupportedError: it is not installed (the message names the extra).
    """
    try:
        import gguf  # optional dependency (pip install 'adaptkit[gguf]')
    except ImportError as e:
        raise UnsupportedError("writing or reading GGUF needs the gguf package; pip install 'adaptkit[gguf]'") from e
    return gguf


@dataclass(frozen=True)
class GGUFPair:
    """One LoRA pair of a GGUF adapter, in the file's layout.

    Args:
        tensor: the base tensor it adapts (``blk.0.attn_q.weight``).
        a: ``lora_a`` as numpy lays it out: ``(r, in)``, or ``(vocab, r)`` for ``token_embd.weight``.
        b: ``lora_b``: ``(out, r)``, or ``(n_embd, r)`` for ``token_embd.weight``; the scale is in it.
    """

    tensor: str
    a: torch.Tensor
    b: torch.Tensor

    @property
    def rank(self) -> int:
        """``r`` as llama.cpp takes it: ``lora_b.ne[0]``, numpy's last axis of ``b``."""
        return int(self.b.shape[-1])


@dataclass(frozen=True)
class GGUFAdapter:
    """A GGUF LoRA adapter file's content.

    Args:
        arch: ``general.architecture`` (``llama``, ``qwen2``, ``phi3``).
        alpha: ``adapter.lora.alpha``.
        pairs: the LoRA pairs, by base tensor name.
        metadata: the other string KVs (``adaptkit.coverage``, ``adaptkit.modules``, ``general.name``).
    """

    arch: str
    alpha: float
    pairs: Mapping[str, GGUFPair]
    metadata: Mapping[str, str]

    def scale(self, tensor: str, adapter_scale: float = 1.0) -> float:
        """llama.cpp's scale of one pair: ``adapter_scale * alpha / r``, ``adapter_scale`` when alpha is 0."""
        return adapter_scale * self.alpha / self.pairs[tensor].rank if self.alpha else adapter_scale


def exact_alpha(pairs: Mapping[str, GGUFPair]) -> float:
    """The ``adapter.lora.alpha`` that makes llama.cpp's scale 1 for every pair whose ``b`` holds its scale.

    ``r`` when all pairs share one rank (``alpha / r = 1``), else 0 (llama.cpp then uses the adapter scale, 1).
    """
    ranks = {p.rank for p in pairs.values()}
    return float(ranks.pop()) if len(ranks) == 1 else 0.0


def write_gguf_lora(adapter: GGUFAdapter, path: str | os.PathLike, *, overwrite: bool = False,
                    dtype: str = "f32") -> Path:
    """Write a GGUF LoRA adapter file atomically (nothing appears at ``path`` on failure).

    Args:
        adapter: what to write.
        path: the ``.gguf`` file.
        overwrite: replace an existing file.
        dtype: ``"f32"`` or ``"f16"`` for the factors.

    Raises:
        ConfigError/UnsupportedError: an unknown ``dtype``; the gguf package is missing.
        OutputExistsError: ``path`` exists and ``overwrite`` is false.
    """
    gguf = gguf_module()
    if dtype not in DTYPES:
        raise UnsupportedError(f"GGUF dtype {dtype!r} is not offered; use one of {', '.join(DTYPES)}")
    if not adapter.pairs:
        raise UnsupportedError("the adapter has no layer llama.cpp can load; there is nothing to write")
    np_dtype = np.float32 if dtype == "f32" else np.float16
    with atomic_output(path, overwrite=overwrite, directory=False) as tmp:
        writer = gguf.GGUFWriter(str(tmp), adapter.arch)
        writer.add_string(gguf.Keys.General.TYPE, gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(adapter.alpha))
        for key, value in adapter.metadata.items():
            writer.add_string(key, value)
        for name, pair in adapter.pairs.items():
            writer.add_tensor(name + SUFFIX_A, pair.a.detach().to(torch.float32).numpy().astype(np_dtype))
            writer.add_tensor(name + SUFFIX_B, pair.b.detach().to(torch.float32).numpy().astype(np_dtype))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return Path(path)


def _field_value(field) -> object:
    return field.contents()


def read_gguf_lora(path: str | os.PathLike) -> GGUFAdapter:
    """Read a GGUF LoRA adapter file (any writer's: adaptkit's or llama.cpp's ``convert_lora_to_gguf.py``).

    Raises:
        FormatError: the file is not a GGUF LoRA adapter (``general.type``/``adapter.type``), a pair misses a
            factor, a tensor has another suffix, or the factor shapes disagree on the rank.
    """
    gguf = gguf_module()
    try:
        reader = gguf.GGUFReader(str(path))
    except (ValueError, OSError, IndexError) as e:
        raise FormatError(f"{Path(path).name} is not a readable GGUF file ({e}); check the file") from e
    fields = {name: _field_value(f) for name, f in reader.fields.items()}
    if fields.get(gguf.Keys.General.TYPE) != gguf.GGUFType.ADAPTER or fields.get(gguf.Keys.Adapter.TYPE) != "lora":
        raise FormatError(f"{Path(path).name} is a GGUF file but not a LoRA adapter (general.type="
                          f"{fields.get(gguf.Keys.General.TYPE)!r}); give a file written for llama.cpp's --lora")
    halves: dict[str, dict[str, torch.Tensor]] = {}
    for t in reader.tensors:
        for suffix in (SUFFIX_A, SUFFIX_B):
            if t.name.endswith(suffix):
                halves.setdefault(t.name.removesuffix(suffix), {})[suffix] = torch.from_numpy(
                    np.array(t.data, dtype=np.float32).reshape([int(s) for s in reversed(t.shape)]))
                break
        else:
            if not t.name.endswith("_norm.weight"):  # llama.cpp skips norm vectors and refuses the rest
                raise FormatError(f"GGUF adapter tensor {t.name!r} is neither .lora_a nor .lora_b; the file is not a LoRA")
    pairs = {}
    for name, h in sorted(halves.items()):
        if len(h) != 2:
            raise FormatError(f"GGUF adapter pair {name!r} misses {SUFFIX_A if SUFFIX_A not in h else SUFFIX_B}")
        pairs[name] = GGUFPair(name, h[SUFFIX_A], h[SUFFIX_B])
    meta = {k: v for k, v in fields.items() if isinstance(v, str) and not k.startswith("GGUF.")
            and k not in (gguf.Keys.General.TYPE, gguf.Keys.Adapter.TYPE, gguf.Keys.General.ARCHITECTURE)}
    alpha = float(fields.get(gguf.Keys.Adapter.LORA_ALPHA) or 0.0)
    return GGUFAdapter(str(fields.get(gguf.Keys.General.ARCHITECTURE)), alpha, pairs, meta)


def check_fits_base(adapter: GGUFAdapter, base: str | os.PathLike) -> None:
    """Refuse an adapter that llama.cpp would refuse on the GGUF model ``base``, before it gets there.

    The checks of ``llama_adapter_lora_init_impl``: the same ``general.architecture``, every pair's tensor in the
    model, ``a.ne[0] = in`` and ``b.ne[1] = out`` of the model tensor (for ``token_embd``: ``b.ne[1] = n_embd``,
    ``a.ne[1] = vocab``) and ``a.ne[1] = b.ne[0]``.

    Raises:
        FormatError: ``base`` is not a readable GGUF model.
        ShapeMismatchError: another architecture, a tensor the model lacks, or a pair that does not fit it.
    """
    gguf = gguf_module()
    try:
        reader = gguf.GGUFReader(str(base))
    except (ValueError, OSError, IndexError) as e:
        raise FormatError(f"{Path(base).name} is not a readable GGUF model ({e}); give the .gguf llama.cpp loads") from e
    arch = reader.fields[gguf.Keys.General.ARCHITECTURE].contents() if gguf.Keys.General.ARCHITECTURE in reader.fields \
        else None
    if arch != adapter.arch:
        raise ShapeMismatchError(f"the GGUF base {Path(base).name} is a {arch!r} model, the adapter is for "
                                 f"{adapter.arch!r}; llama.cpp refuses it ('model arch and LoRA arch mismatch')")
    ne = {t.name: [int(s) for s in t.shape] for t in reader.tensors}
    for name, pair in adapter.pairs.items():
        if name not in ne:
            raise ShapeMismatchError(f"the GGUF base {Path(base).name} has no tensor {name}; llama.cpp refuses the "
                                     "adapter ('does not exist in base model'): export against the base it came from")
        model = ne[name]
        a, b = [int(s) for s in reversed(pair.a.shape)], [int(s) for s in reversed(pair.b.shape)]
        if name == "token_embd.weight":
            fits = model[0] == b[1] and model[1] == a[1] and a[0] == b[0]
        else:
            fits = model[0] == a[0] and model[1] == b[1] and a[1] == b[0]
        if not fits:
            raise ShapeMismatchError(f"GGUF adapter pair {name} (lora_a ne {a}, lora_b ne {b}) does not fit the base "
                                     f"tensor (ne {model}); the adapter belongs to another base")


def modules_of(adapter: GGUFAdapter) -> list[tuple[str, str, str]]:
    """The ``[base tensor, module path, transform]`` rows adaptkit stored in ``adaptkit.modules`` (empty if none)."""
    raw = adapter.metadata.get(MODULES_KEY)
    if not raw:
        return []
    try:
        return [tuple(row) for row in json.loads(raw)]
    except (ValueError, TypeError) as e:
        raise FormatError(f"the {MODULES_KEY} entry of the GGUF adapter is not valid JSON ({e}); rewrite the file") from e


__all__ = ["COVERAGE_KEY", "DTYPES", "MODULES_KEY", "GGUFAdapter", "GGUFPair", "check_fits_base", "exact_alpha", "gguf_module", "modules_of",
           "read_gguf_lora", "write_gguf_lora"]
