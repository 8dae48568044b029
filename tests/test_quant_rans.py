"""quant/rans.py and the "rans" artifact codec: exact round trips, bytes at the order-0 entropy bound (below brotli-11
on GPTQ codes), determinism, and hostile streams and manifests rejected with one-line errors."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import tracemalloc
import zlib
from pathlib import Path

import brotli
import numpy as np
import pytest
import torch

from quant import (
    ArtifactError,
    accumulate_hessian,
    compress_bytes,
    decode_artifact,
    decompress_bytes,
    dequantize,
    encode_artifact,
    quantize_state_dict,
    save_artifact,
)
from quant.rans import RANS_PRECISION, rans_decode, rans_encode, rans_lanes

HEADER = struct.Struct("<3sBII")


def t_codes(n: int, seed: int = 0, width: float = 6.0, clip: int = 31) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.clip(np.round(rng.standard_t(4, n) * width), -clip, clip).astype(np.int8)


def entropy_bytes(codes: np.ndarray, segments: list[int]) -> float:
    total, pos = 0.0, 0
    for n in segments:
        c = np.bincount(codes[pos:pos + n].astype(np.int64) + 128, minlength=256)
        p = c[c > 0] / max(1, n)
        total += float(-(c[c > 0] * np.log2(p)).sum()) / 8
        pos += n
    return total


# ---------------------------------------------------------------------------------------------------- coder


@pytest.mark.parametrize("segments", [[0], [1], [5, 0, 7], [1000, 1, 999], [3000], [0, 0]])
@pytest.mark.parametrize("lanes", [1, 3, 64])
def test_round_trip(segments: list[int], lanes: int) -> None:
    n = sum(segments)
    codes = t_codes(n, seed=n + lanes)
    if n > 10:
        codes[:3] = [-128, 127, 0]  # the whole int8 alphabet is codable
    tables, states, words = rans_encode(codes, segments, lanes)
    assert len(states) == 4 * lanes and len(words) % 2 == 0
    back = rans_decode(tables, states, words, segments, lanes)
    assert back.dtype == np.int8 and np.array_equal(back, codes)
    assert rans_encode(codes, segments, lanes) == (tables, states, words)  # deterministic


def test_constant_segment_costs_no_words() -> None:
    codes = np.full(5000, -7, np.int8)
    tables, states, words = rans_encode(codes, [5000], 4)
    assert words == b"" and np.array_equal(rans_decode(tables, states, words, [5000], 4), codes)


def test_bytes_sit_at_the_entropy_bound_and_below_brotli() -> None:
    segments = [200_000, 50_000, 120_000]
    codes = np.concatenate([t_codes(200_000, 1, 6.0), t_codes(50_000, 2, 20.0, 63), t_codes(120_000, 3, 2.5)])
    lanes = rans_lanes(codes.size)
    tables, states, words = rans_encode(codes, segments, lanes)
    h0 = entropy_bytes(codes, segments)
    assert len(words) <= 1.002 * h0, (len(words), h0)  # 15-bit frequencies lose ~0.05%
    assert len(words) + len(compress_bytes(tables + states, "brotli")) < len(brotli.compress(codes.tobytes(), quality=11))


def test_lanes_policy() -> None:
    assert [rans_lanes(n) for n in (0, 1, 32767, 65536, 10**6, 36 * 10**6, 10**9)] == [1, 1, 1, 2, 31, 1024, 1024]


def test_hostile_streams_raise_value_errors() -> None:
    codes, segments, lanes = t_codes(4000, 5), [3000, 1000], 8
    tables, states, words = rans_encode(codes, segments, lanes)
    t = np.frombuffer(tables, "<u2").copy()
    bad_sum = t.copy()
    bad_sum[2] += 1
    bad_range = t.copy()
    bad_range[0] = 250  # first symbol 250 + count > 256
    cases = [
        ((bad_sum.tobytes(), states, words), "sum to"),
        ((bad_range.tobytes(), states, words), "bad table"),
        ((tables[:-2], states, words), "tables end|bad table|sum to"),
        ((tables + b"\0\0", states, words), "stray bytes"),
        ((tables[:-1], states, words), "odd byte count"),
        ((tables, states[:-4], words), "state bytes"),
        ((tables, b"\0\0\0\0" + states[4:], words), "below 2\\^16"),
        ((tables, states, words[:-2]), "ends early|does not end"),
        ((tables, states, words + b"\1\0"), "does not end"),
        ((tables, states, bytes([words[0] ^ 1]) + words[1:]), "does not end|ends early"),
        ((tables, states, words[:-1]), "word bytes"),
    ]
    for args, match in cases:
        with pytest.raises(ValueError, match=match):
            rans_decode(*args, segments, lanes)
    with pytest.raises(ValueError, match="lanes"):
        rans_decode(tables, states, words, segments, 0)
    with pytest.raises(ValueError, match="segments sum"):
        rans_encode(codes, [10], lanes)


def test_every_frequency_table_sums_to_the_precision() -> None:
    codes = np.concatenate([t_codes(999, 7, 40.0, 127), np.arange(-128, 128, dtype=np.int8)])
    tables, _, _ = rans_encode(codes, [codes.size], 2)
    t = np.frombuffer(tables, "<u2").astype(np.int64)
    assert (t[0], t[1]) == (0, 256) and t[2:].sum() == 1 << RANS_PRECISION and (t[2:] >= 1).all()


# ---------------------------------------------------------------------------------------------------- bytes API


def test_compress_bytes_rans_round_trip_and_limit() -> None:
    data = bytes(t_codes(70_000, 9).view(np.uint8)) + bytes(range(256))
    blob = compress_bytes(data, "rans")
    assert blob == compress_bytes(data, "rans")
    assert decompress_bytes(blob, "rans", len(data)) == data
    with pytest.raises(ArtifactError, match="more than"):
        decompress_bytes(blob, "rans", len(data) - 1)
    for bad in (blob[:10], blob[:-2], blob + b"\0\0"):
        with pytest.raises(ArtifactError):
            decompress_bytes(bad, "rans", len(data))
    huge = struct.pack("<IIII", 2**32 - 1, 1, 0, 0) + b"\0\0\1\0"
    tracemalloc.start()
    try:
        with pytest.raises(ArtifactError, match="more than"):  # a 4 GB claim is refused before any decoding
            decompress_bytes(huge, "rans", 1 << 20)
        assert tracemalloc.get_traced_memory()[1] < (1 << 20)
    finally:
        tracemalloc.stop()


# ---------------------------------------------------------------------------------------------------- artifacts


def heavy_weight(rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(rows, cols, generator=g) / (torch.randn(4, rows, cols, generator=g).square().mean(0)).sqrt()
    return 0.03 * t * torch.exp(0.3 * torch.randn(rows, 1, generator=g))


@pytest.fixture(scope="module")
def qts() -> list:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 64, generator=g)
    state = {"tok_emb.weight": heavy_weight(512, 64), "a.weight": heavy_weight(256, 64, 1),
             "b.weight": heavy_weight(128, 64, 2), "gain": torch.ones(16), "step": torch.tensor(3)}
    hess = {k: accumulate_hessian(None, x) for k in state if k.endswith("weight")}
    return quantize_state_dict(state, hess, passthrough_numel=64, embed_bits=7, lqer_rank=2, lqer_top_k=1)


def split(blob: bytes) -> tuple[int, dict, bytes]:
    _, version, mlen, _ = HEADER.unpack_from(blob)
    return version, json.loads(brotli.decompress(blob[HEADER.size:HEADER.size + mlen])), blob[HEADER.size + mlen:]


def craft(manifest: dict, payload: bytes, version: int = 2) -> bytes:
    m = dict(manifest, compressed_bytes=len(payload), compressed_crc32=zlib.crc32(payload))
    mz = brotli.compress(json.dumps(m, sort_keys=True).encode())
    return HEADER.pack(b"PGQ", version, len(mz), zlib.crc32(mz)) + mz + payload


def rejects(blob: bytes, match: str) -> None:
    with pytest.raises(ArtifactError, match=match) as e:
        decode_artifact(blob)
    assert "\n" not in str(e.value)


def test_rans_artifact_round_trips_and_beats_brotli(qts: list) -> None:
    blob = encode_artifact(qts, "rans")
    version, m, _ = split(blob)
    assert version == 2 and m["codec"] == "rans" and set(m["rans"]) == {"lanes", "tables_bytes", "words_bytes"}
    back = decode_artifact(blob)
    assert all(torch.equal(v, dequantize(qts)[k]) for k, v in dequantize(back).items())
    assert encode_artifact(back, "rans") == blob
    assert len(blob) < len(encode_artifact(qts, "brotli"))


def test_version_1_cannot_name_rans(qts: list) -> None:
    plain = [q for q in qts if q.lqer is None] + [type(qts[0])(**{**q.__dict__, "lqer": None}) for q in qts
                                                   if q.lqer is not None]
    _, m, payload = split(encode_artifact(plain, "rans"))
    assert decode_artifact(craft(m, payload))
    rejects(craft(m, payload, version=1), "unknown codec 'rans' for format version 1")


def test_hostile_rans_manifests_and_streams(qts: list) -> None:
    _, m, payload = split(encode_artifact(qts, "rans"))
    r = m["rans"]

    def with_rans(**kw: object) -> dict:
        bad = json.loads(json.dumps(m))
        bad["rans"] = {**r, **kw}
        return bad

    for kw, match in [(dict(lanes=0), "lanes must be"), (dict(lanes=10**6), "lanes must be"),
                      (dict(lanes=True), "lanes must be"), (dict(tables_bytes=r["tables_bytes"] + 1), "tables size"),
                      (dict(tables_bytes=10**9), "tables size"), (dict(words_bytes=len(payload) + 2), "words size"),
                      (dict(words_bytes=r["words_bytes"] + 1), "words size"), (dict(extra=1), "rans parameters"),
                      (dict(words_bytes=r["words_bytes"] - 2), "truncated|decompresses to|do not decode"),
                      (dict(tables_bytes=r["tables_bytes"] - 2), "decompresses to|do not decode"),
                      (dict(lanes=r["lanes"] + 1), "lanes must be")]:
        rejects(craft(with_rans(**kw), payload), match)
    bad = json.loads(json.dumps(m))
    del bad["rans"]
    rejects(craft(bad, payload), "manifest keys")
    bad = json.loads(json.dumps(m))
    bad["rans"] = [1, 2, 3]
    rejects(craft(bad, payload), "rans parameters")
    wb = r["words_bytes"]
    for pos in (0, wb // 2, wb - 1):  # a corrupted word with a valid checksum: the coder's end-state check catches it
        corrupt = bytearray(payload)
        corrupt[pos] ^= 0x40
        rejects(craft(m, bytes(corrupt)), "do not decode|exceed")


def test_inspect_explains_a_rans_artifact(qts: list, tmp_path: Path) -> None:
    path = tmp_path / "r.ptz"
    save_artifact(path, encode_artifact(qts, "rans"))
    r = subprocess.run([sys.executable, "-m", "quant", "inspect", str(path)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "codec rans" in r.stdout and "rans: codes in order-0 rANS" in r.stdout and "tok_emb.weight" in r.stdout
    shares = [float(line.split("%")[0].split()[-1]) for line in r.stdout.splitlines()
              if line.startswith(("tok_emb", "a.weight", "b.weight", "gain", "step"))]
    assert len(shares) == 5 and abs(sum(shares) - 100) < 0.1


def test_fuzzed_rans_payloads_fail_cleanly() -> None:
    """Random byte corruptions with the checksum recomputed, so the decoder itself must cope. In the rANS words every
    one is caught (a lane does not end at its start state, or words run out or remain); in the brotli-coded rest a
    corruption is an ArtifactError or, as with the brotli codec, decodes to something well-formed (there only the
    payload checksum protects the content). Never another exception or a hang."""
    state = {"a.weight": heavy_weight(48, 40), "b.weight": heavy_weight(24, 40, 1), "gain": torch.ones(8)}
    qts = quantize_state_dict(state, {}, passthrough_numel=64, lqer_rank=2, lqer_top_k=1)
    _, m, payload = split(encode_artifact(qts, "rans"))
    wb = m["rans"]["words_bytes"]
    g = np.random.default_rng(0)
    for pos in [*g.integers(0, wb, 120), *g.integers(wb, len(payload), 60)]:
        bad = bytearray(payload)
        bad[pos] ^= int(g.integers(1, 256))
        try:
            back = decode_artifact(craft(m, bytes(bad)))
        except ArtifactError as e:
            assert "\n" not in str(e)
            continue
        assert pos >= wb, f"a corrupted rANS word at {pos} decoded without error"
        assert [q.name for q in back] == [q.name for q in qts]


def test_a_constant_stream_cannot_buy_work_with_few_lanes() -> None:
    """One symbol with all 2^15 of the frequency never needs a word, so a few bytes can declare any number of codes:
    the code count is capped by the caller's limit and the lanes must be the writer's (rans_lanes(n)), which keeps the
    decoder at most ~32k numpy steps below 33M codes."""
    table = np.asarray([128, 1, 1 << 15], "<u2").tobytes()  # symbol 128 = code 0, frequency 2^15

    def stream(n: int, lanes: int) -> bytes:
        return struct.pack("<IIII", n, lanes, len(table), 0) + table + np.full(lanes, 1 << 16, "<u4").tobytes()

    n = 1_000_000
    with pytest.raises(ArtifactError, match="lanes"):
        decompress_bytes(stream(n, 1), "rans", n)
    assert decompress_bytes(stream(n, rans_lanes(n)), "rans", n) == bytes(n)  # legitimate: a million zeros
    with pytest.raises(ArtifactError, match="more than"):
        decompress_bytes(stream(2**31, rans_lanes(2**31)), "rans", 1 << 20)
