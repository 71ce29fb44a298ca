"""Pure-torch NF4 and int8 weight quantisers that reproduce what bitsandbytes stores (no bitsandbytes needed).

* **NF4** (``load_in_4bit``, ``bnb_4bit_quant_type="nf4"``): the flattened weight is cut into blocks of 64
  values; each block stores its absolute maximum (float32, ``compress_statistics=False``) and, per value,
  the index of the nearest of 16 "NormalFloat" levels to ``x / absmax``. Dequantisation is
  ``NF4_CODE[index] * absmax``. The 16 levels are hard-coded from bitsandbytes' ``get_4bit_type("nf4")``
  (``bitsandbytes/functional.py``; the same table is in its CUDA kernel ``dDequantizeNF4``). Ties between two
  levels go to the lower one, as bitsandbytes' kernel (``x > midpoint`` goes up) does.
* **int8** (``load_in_8bit``, ``Int8Params``): the weight is first cast to float16 (``Int8Params._quantize`` does
  this; its CUDA kernel takes ``half`` only), then row-wise ("vector-wise") absmax, ``round(x * 127 / absmax)``,
  dequantised as ``q * absmax / 127`` (bitsandbytes' ``int8_vectorwise_quant`` / ``int8_vectorwise_dequant``).

The residual ``W - dequantize(quantize(W))`` is therefore the one a QLoRA user sees.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..core.kinds.base import tensor_is_finite
from ..core.params import BITS
from ..errors import NonFiniteError

#: bitsandbytes' NF4 code book (``bitsandbytes.functional.get_4bit_type("nf4")``), index 0..15
NF4_CODE = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
], dtype=torch.float32)
#: decision thresholds between neighbouring levels (bitsandbytes' ``dQuantizeNF4`` uses these midpoints)
NF4_MIDPOINTS = (NF4_CODE[1:] + NF4_CODE[:-1]) / 2
#: bitsandbytes' default 4-bit block size
NF4_BLOCKSIZE = 64
#: bitsandbytes multiplies int8 codes by this float32 constant (1/127) when dequantising
INT8_INV = 7.874015718698502e-3


@dataclass(frozen=True, eq=False)
class Quantized:
    """A quantised weight.

    Args:
        codes: ``uint8`` NF4 level indices (one per value, unpacked, padded to whole blocks) or ``int8`` codes.
        absmax: float32 scales: one per block (NF4) or per row (int8).
        shape: the original weight shape.
        bits: 4 (NF4) or 8 (int8).
        blocksize: NF4 block size (0 for int8).
    """

    codes: torch.Tensor
    absmax: torch.Tensor
    shape: tuple[int, ...]
    bits: int
    blocksize: int = 0


def quantize_nf4(weight: torch.Tensor, blocksize: int = NF4_BLOCKSIZE) -> Quantized:
    """Block-wise absmax NF4 quantisation, as bitsandbytes' ``quantize_4bit(quant_type="nf4")``.

    Args:
        weight: any shape; computed in float32.
        blocksize: values per absmax block (bitsandbytes' default 64).
    """
    flat = weight.detach().to(torch.float32).reshape(-1)
    pad = (-flat.numel()) % blocksize
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    blocks = flat.view(-1, blocksize)
    absmax = blocks.abs().amax(dim=1)
    inv = torch.where(absmax > 0, 1.0 / absmax, torch.zeros_like(absmax))
    scaled = blocks * inv[:, None]
    codes = torch.bucketize(scaled, NF4_MIDPOINTS, right=False).to(torch.uint8)
    return Quantized(codes=codes, absmax=absmax, shape=tuple(weight.shape), bits=4, blocksize=blocksize)


def quantize_int8(weight: torch.Tensor) -> Quantized:
    """Row-wise absmax int8 quantisation, as bitsandbytes' ``Int8Params`` (float16 cast, ``int8_vectorwise_quant``).

    Raises:
        NonFiniteError: a value is beyond float16's range (bitsandbytes would quantise ``inf``).
    """
    w = weight.detach().to(torch.float16)
    if not tensor_is_finite(w):
        raise NonFiniteError("int8 quantisation casts the weight to float16 as bitsandbytes does, and a value is beyond "
                             "float16's range (|x| > 65504) or not finite; use bits=4 for this weight")
    w = w.to(torch.float32)
    rows = w.reshape(w.shape[0], -1) if w.ndim > 1 else w.reshape(1, -1)
    absmax = rows.abs().amax(dim=1)
    scale = torch.where(absmax > 0, 127.0 / absmax, torch.zeros_like(absmax))
    codes = torch.round(rows * scale[:, None]).clamp(-127, 127).to(torch.int8)
    return Quantized(codes=codes, absmax=absmax, shape=tuple(weight.shape), bits=8)


def quantize(weight: torch.Tensor, bits: int) -> Quantized:
    """NF4 for ``bits=4``, int8 for ``bits=8``.

    Raises:
        ConfigError: any other ``bits``.
    """
    bits = BITS.check(bits)
    return quantize_nf4(weight) if bits == 4 else quantize_int8(weight)


def dequantize(q: Quantized) -> torch.Tensor:
    """Float32 weight of ``q.shape`` from a :class:`Quantized` (bitsandbytes' dequantisation)."""
    n = 1
    for s in q.shape:
        n *= s
    if q.bits == 4:
        values = NF4_CODE[q.codes.long()] * q.absmax[:, None]
        return values.reshape(-1)[:n].reshape(q.shape)
    values = q.codes.to(torch.float32) * q.absmax[:, None] * INT8_INV
    return values.reshape(q.shape)


def fake_quantize(weight: torch.Tensor, bits: int) -> torch.Tensor:
    """``dequantize(quantize(weight, bits))`` in float32: the weight a quantised model computes with."""
    return dequantize(quantize(weight, bits))


__all__ = ["NF4_BLOCKSIZE", "NF4_CODE", "Quantized", "dequantize", "fake_quantize", "quantize", "quantize_int8", "quantize_nf4"]
