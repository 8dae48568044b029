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


# Low-bit codes (the "sign" and "ternary" kinds, PGQ format version 3): a tensor's codes flattened row-major.
TRITS_PER_BYTE = 5  # 3**5 = 243 <= 256
_TRIT_DIGITS = np.array([[(b // 3**i) % 3 for i in range(TRITS_PER_BYTE)] for b in range(3**TRITS_PER_BYTE)], np.int8)


def packed_len(kind: str, numel: int) -> int:
    """Bytes of a low-bit kind's packed codes: ceil(numel / 8) for "sign", ceil(numel / 5) for "ternary"."""
    per = {"sign": 8, "ternary": TRITS_PER_BYTE}[kind]
    return -(-numel // per)


def pack_signs(codes: np.ndarray) -> bytes:
    """±1 codes (any shape, flattened row-major) as bits, 8 per byte, `np.packbits` order (bitorder "big"): code i is
    bit 7 - i % 8 of byte i // 8 (the first code is the most significant bit); bit 1 = +1, bit 0 = -1; the last
    byte's unused low bits are 0."""
    c = np.asarray(codes).reshape(-1)
    if c.size and not np.isin(c, (-1, 1)).all():
        raise ValueError("pack_signs: codes must be -1 or +1")
    return np.packbits(c > 0).tobytes()


def unpack_signs(data: bytes, numel: int) -> np.ndarray:
    """Inverse of `pack_signs`: int8 ±1 codes [numel]. Raises ValueError on a wrong length or nonzero padding bits."""
    if len(data) != packed_len("sign", numel):
        raise ValueError(f"sign codes: {len(data):,} bytes for {numel:,} codes, expected {packed_len('sign', numel):,}")
    bits = np.unpackbits(np.frombuffer(data, dtype=np.uint8))
    if bits[numel:].any():
        raise ValueError("sign codes: nonzero padding bits")
    return bits[:numel].astype(np.int8) * 2 - 1


def pack_trits(codes: np.ndarray) -> bytes:
    """Ternary codes in {-1, 0, 1} (flattened row-major) 5 per byte in base 3, little-endian digits: byte j =
    sum_i (code[5j + i] + 1) * 3**i, i = 0..4 (so bytes are 0..242); the last byte is padded with 0 codes (digit 1)."""
    c = np.asarray(codes).reshape(-1).astype(np.int64)
    if c.size and (c.min() < -1 or c.max() > 1):
        raise ValueError("pack_trits: codes must be -1, 0 or +1")
    d = np.ones(packed_len("ternary", c.size) * TRITS_PER_BYTE, np.int64)
    d[:c.size] = c + 1
    return (d.reshape(-1, TRITS_PER_BYTE) @ (3 ** np.arange(TRITS_PER_BYTE))).astype(np.uint8).tobytes()


def unpack_trits(data: bytes, numel: int) -> np.ndarray:
    """Inverse of `pack_trits`: int8 codes in {-1, 0, 1} [numel]. Raises ValueError on a wrong length, a byte above
    242 or padding that is not 0 codes."""
    if len(data) != packed_len("ternary", numel):
        raise ValueError(f"ternary codes: {len(data):,} bytes for {numel:,} codes, expected "
                         f"{packed_len('ternary', numel):,}")
    b = np.frombuffer(data, dtype=np.uint8)
    if b.size and b.max() >= 3**TRITS_PER_BYTE:
        raise ValueError(f"ternary codes: byte {int(b.max())} is not 5 base-3 digits (max 242)")
    digits = _TRIT_DIGITS[b].reshape(-1)
    if (digits[numel:] != 1).any():
        raise ValueError("ternary codes: padding is not 0 codes")
    return digits[:numel] - 1
