"""``rng.random(out=out, dtype=np.float32)``: the same numbers, drawn in bulk.

numpy's ``Generator`` makes each float32 uniform from one 32-bit output of its bit
generator, ``(u >> 8) * 2**-24``, one C function call per number. PCG64 (numpy's
default, and ``PCG64DXSM``) makes its 32-bit outputs from its 64-bit ones: the low
half first, the high half kept for the next call. ``random_raw`` hands out the
64-bit outputs in bulk, and read as little-endian ``uint32`` pairs they are those
halves in that order; a shift and a scaling over the whole array then give the
very same floats, and leave the generator in the very same state, about 1.5x as
fast. Sampling the hidden states of CD-1 (an RBM's ``p > U(0, 1)``) and dropout
masks draw this many numbers per mini-batch.

Other bit generators, other dtypes, non-contiguous arrays and big-endian machines
go through ``rng.random`` itself.
"""

from __future__ import annotations

import sys

import numpy as np

__all__ = ["uniform"]

_HALVES = (np.random.PCG64, np.random.PCG64DXSM)
_SCALE = np.float32(2.0 ** -24)
_BULK = sys.byteorder == "little"


def uniform(rng: np.random.Generator, out: np.ndarray) -> np.ndarray:
    """Fill ``out`` with U[0, 1) draws exactly as ``rng.random(out=out, dtype=out.dtype)``; returns ``out``.

    Same numbers, same generator state afterwards (tested against numpy).
    """
    bg = rng.bit_generator
    if not (_BULK and out.dtype == np.float32 and out.flags.c_contiguous and type(bg) in _HALVES):
        return rng.random(out=out, dtype=out.dtype)
    flat = out.reshape(-1)
    start = 0
    if flat.size and bg.state["has_uint32"]:  # a high half kept from an earlier odd draw comes first
        rng.random(out=flat[:1], dtype=np.float32)
        start = 1
    pairs = (flat.size - start) // 2
    if pairs:
        bits = bg.random_raw(pairs).view(np.uint32)
        np.right_shift(bits, 8, out=bits)
        np.multiply(bits, _SCALE, out=flat[start:start + 2 * pairs], dtype=np.float32)
    if (flat.size - start) % 2:  # the last one: numpy keeps its high half, so let numpy draw it
        rng.random(out=flat[-1:], dtype=np.float32)
    return out
