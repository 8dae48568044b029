"""Byte shuffle: group the bytes of multi-byte values by position so the compressor sees similar bytes together.

Codes are stored one per byte (int6 in int8 containers): bit-packing 4 int6 symbols into 3 bytes was measured
11-24% larger after every codec (brotli-11, zstd-22, lzma-9e; bench/quant.py prints the comparison), because the
symbols then straddle byte boundaries and the entropy coders lose their alphabet.
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
