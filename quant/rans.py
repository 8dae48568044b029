"""Static order-0 rANS for the codes region: one frequency table per code segment (a tensor's codes, an LQER factor),
interleaved over `lanes` independent coder states so numpy runs every lane of a step at once (pure functions).

Why: the codes of one tensor are close to i.i.d. draws from one distribution (SDClip makes every row's codes share
it), so the best a memoryless coder can do is the tensor's order-0 entropy. brotli-11 lands 1-2% above that bound
(its prefix codes spend whole bits per symbol); rANS with 15-bit probabilities lands within ~0.1% of it, encodes in
seconds where brotli-11 takes a minute or more on a record-size model, and decodes in seconds. docs/artifact.md describes the
stream.

Coder (Duda's range ANS, byte-aligned variant with 16-bit words): state x in [2^16, 2^32); to encode symbol s with
frequency f and cumulative frequency c (frequencies sum to 2^15), first emit the low 16 bits while x >= f << 17, then
x <- (x // f) << 15 + x % f + c. Decoding inverts it exactly: slot = x mod 2^15 names s, x <- f·(x >> 15) + slot − c,
then x <- x << 16 | next word while x < 2^16. Symbols are encoded last to first, so the decoder reads forward.
Position i belongs to lane i mod lanes; the words of one step are written in lane order, steps in decode order.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["RANS_MAX_LANES", "RANS_PRECISION", "rans_decode", "rans_encode", "rans_lanes"]

RANS_PRECISION = 15  # frequencies sum to 2**15
RANS_MAX_LANES = 4096
_LOW = 1 << 16  # lower bound of a normalized state; a final state equals it
_M = 1 << RANS_PRECISION


def rans_lanes(n: int) -> int:
    """Lanes for n symbols: at most 32,768 sequential numpy steps until the cap of 1,024 lanes (a lane's final state
    costs 4 bytes; a record's ~36M codes take 1,024 lanes and ~35k steps)."""
    return max(1, min(1024, -(-n // 32768)))


def _quantize_counts(counts: np.ndarray) -> np.ndarray:
    """Frequencies summing to 2**15 from symbol counts: proportional, every present symbol >= 1, the rounding slack
    given to (or taken from) the most frequent symbol."""
    counts = counts.astype(np.int64)
    f = counts * _M // max(1, int(counts.sum()))
    f[(counts > 0) & (f == 0)] = 1
    f[int(np.argmax(f))] += _M - int(f.sum())
    return f


def _segment_bounds(segments: Sequence[int]) -> np.ndarray:
    return np.concatenate([[0], np.cumsum(np.asarray(segments, dtype=np.int64))]).astype(np.int64)


def rans_encode(codes: np.ndarray, segments: Sequence[int], lanes: int) -> tuple[bytes, bytes, bytes]:
    """Encode int8 `codes` (the segments back to back) with `lanes` lanes; returns (tables, states, words).

    tables: per segment, little-endian uint16 `first symbol + 128, count` then `count` frequencies (count 0 for an
    empty segment); states: the `lanes` final states as uint32; words: the 16-bit words in decode order."""
    sym = np.ascontiguousarray(codes, dtype=np.int8).reshape(-1).astype(np.int64) + 128
    bounds = _segment_bounds(segments)
    if bounds[-1] != sym.size or not 1 <= lanes <= RANS_MAX_LANES:
        raise ValueError(f"rans: segments sum to {bounds[-1]} for {sym.size} codes, lanes {lanes}")
    nseg = len(segments)
    F = np.zeros((max(1, nseg), 256), dtype=np.uint64)
    table = []
    for k in range(nseg):
        counts = np.bincount(sym[bounds[k]:bounds[k + 1]], minlength=256)
        present = np.flatnonzero(counts)
        if present.size == 0:
            table += [0, 0]
            continue
        lo, hi = int(present[0]), int(present[-1]) + 1
        f = _quantize_counts(counts[lo:hi])
        F[k, lo:hi] = f
        table += [lo, hi - lo, *f.tolist()]
    C = np.concatenate([np.zeros((F.shape[0], 1), np.uint64), np.cumsum(F, axis=1, dtype=np.uint64)[:, :-1]], axis=1)
    n = sym.size
    x = np.full(lanes, _LOW, dtype=np.uint64)
    chunks: list[np.ndarray] = []
    for i in range(-(-n // lanes) - 1, -1, -1):
        lo, hi = i * lanes, min(n, (i + 1) * lanes)
        seg = np.searchsorted(bounds, np.arange(lo, hi), side="right") - 1
        s = sym[lo:hi]
        f, c, xs = F[seg, s], C[seg, s], x[: hi - lo]
        emit = xs >= (f << np.uint64(32 - RANS_PRECISION))  # would leave [2^16, 2^32) after the update: emit first
        chunks.append((xs[emit] & np.uint64(0xFFFF)).astype("<u2"))
        xs = np.where(emit, xs >> np.uint64(16), xs)
        x[: hi - lo] = ((xs // f) << np.uint64(RANS_PRECISION)) + xs % f + c
    words = np.concatenate(chunks[::-1]) if chunks else np.zeros(0, "<u2")
    return (np.asarray(table, dtype="<u2").tobytes(), x.astype("<u4").tobytes(), words.tobytes())


def _parse_tables(tables: bytes, segments: Sequence[int]) -> np.ndarray:
    """Frequencies [nseg, 256] from the serialized tables; raises ValueError unless they are exactly well-formed."""
    if len(tables) % 2:
        raise ValueError("rans: tables have an odd byte count")
    t = np.frombuffer(tables, dtype="<u2").astype(np.int64)
    F = np.zeros((max(1, len(segments)), 256), dtype=np.int64)
    pos = 0
    for k, length in enumerate(segments):
        if pos + 2 > t.size:
            raise ValueError(f"rans: tables end at segment {k}")
        lo, cnt = int(t[pos]), int(t[pos + 1])
        pos += 2
        if length == 0 and cnt == 0:
            continue
        if not (length > 0 and cnt >= 1 and lo + cnt <= 256 and pos + cnt <= t.size):
            raise ValueError(f"rans: segment {k} has a bad table (first {lo}, count {cnt}, {length} symbols)")
        F[k, lo:lo + cnt] = t[pos:pos + cnt]
        pos += cnt
        if int(F[k].sum()) != _M:
            raise ValueError(f"rans: segment {k} frequencies sum to {int(F[k].sum())}, not {_M}")
    if pos != t.size:
        raise ValueError(f"rans: {2 * (t.size - pos)} stray bytes after the tables")
    return F


def rans_decode(tables: bytes, states: bytes, words: bytes, segments: Sequence[int], lanes: int) -> np.ndarray:
    """Inverse of `rans_encode`: the int8 codes. Raises ValueError on any inconsistency (bad tables, states out of
    range, words missing or left over, final states not at their start value) and never reads out of bounds. Its
    memory is one byte per declared code (plus 32 KiB per segment) and its time ceil(n / lanes) numpy steps: callers
    that read untrusted streams insist on lanes == rans_lanes(n), so a stream cannot declare many codes on few lanes."""
    if not 1 <= lanes <= RANS_MAX_LANES or len(states) != 4 * lanes or len(words) % 2:
        raise ValueError(f"rans: {len(states)} state bytes for {lanes} lanes, {len(words)} word bytes")
    F = _parse_tables(tables, segments)
    x = np.frombuffer(states, dtype="<u4").astype(np.uint64)
    if (x < _LOW).any():
        raise ValueError("rans: a lane's state is below 2^16")
    C = np.concatenate([np.zeros((F.shape[0], 1), np.int64), np.cumsum(F, axis=1)[:, :-1]], axis=1)
    S = np.zeros((F.shape[0], _M), dtype=np.uint8)  # slot -> symbol
    for k in range(F.shape[0]):
        if F[k].any():
            S[k] = np.repeat(np.arange(256), F[k])
    F, C = F.astype(np.uint64), C.astype(np.uint64)
    w = np.frombuffer(words, dtype="<u2").astype(np.uint64)
    bounds = _segment_bounds(segments)
    n = int(bounds[-1])
    out = np.empty(n, dtype=np.uint8)  # one byte per code: the output is never larger than the codes it declares
    p, mask = 0, np.uint64(_M - 1)
    for i in range(-(-n // lanes)):
        lo, hi = i * lanes, min(n, (i + 1) * lanes)
        seg = np.searchsorted(bounds, np.arange(lo, hi), side="right") - 1
        xs = x[: hi - lo]
        slot = xs & mask
        s = S[seg, slot.astype(np.int64)].astype(np.int64)
        out[lo:hi] = s ^ 128  # symbol = code + 128, so the code's two's-complement byte is symbol xor 0x80
        xs = F[seg, s] * (xs >> np.uint64(RANS_PRECISION)) + slot - C[seg, s]
        need = xs < _LOW
        k = int(np.count_nonzero(need))
        if k:
            if p + k > w.size:
                raise ValueError("rans: the word stream ends early")
            xs[need] = (xs[need] << np.uint64(16)) | w[p:p + k]
            p += k
        x[: hi - lo] = xs
    if p != w.size or (x != _LOW).any():
        raise ValueError("rans: the stream does not end where the codes do (corrupt or mismatched)")
    return out.view(np.int8)
