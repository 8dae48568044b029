"""Byte shuffle: group the bytes of multi-byte values by position so the compressor sees similar bytes together.

Codes are stored one per byte (int6 in int8 containers, unshuffled: shuffling them changed sizes by < 0.1%).
Bit-packing 4 int6 symbols into 3 bytes came out 13-25% larger with every codec (brotli-11 +14%, zstd-22 +24%,
lzma-9e +13% on GPTQ int6 codes; `python bench/quant.py` prints the comparison): the symbols straddle byte
boundaries and the coders lose their alphabet. Shuffling the fp16 scales with stride 2 saves 5-10%.
"""

from __future__ import annotations

import numpy as np

__all__ = ["byte_shuffle", "byte_unshuffle"]


def byte_shuffle(data: bytes, stride: int) -> bytes:
    """All bytes at offsets ≡ 0 (mod stride), then ≡ 1, ... (fp16 low bytes, then high bytes, for stride 2)."""
    a = np.frombuffer(data, dtype=np.uint8)
    return b"".join(a[i::stride].tobytes() for i in range(stride))


def byte_unshuffle(data: bytes, stride: int) -> bytes:
    """Inverse of `byte_shuffle`: chunk i holds n // stride + (i < n % stride) bytes."""
    a = np.frombuffer(data, dtype=np.uint8)
    out, pos = np.empty_like(a), 0
    for i in range(stride):
        cnt = len(a) // stride + (i < len(a) % stride)
        out[i::stride] = a[pos:pos + cnt]
        pos += cnt
    return out.tobytes()
