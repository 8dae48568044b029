"""The artifact container: magic + version header, length-prefixed JSON manifest, one compressed payload.

Layout (little-endian): b"PGQ" | version u8 | manifest length u32 | manifest CRC-32 u32 | manifest (sorted-key JSON,
brotli-11, since size margins are a few KB) | compressed payload. The decompressed payload is the codes region (each
quantized tensor's codes, contiguous, in manifest order: int8 one per byte, or for the "sign" / "ternary" kinds of
version 3 packed 8 bits / 5 trits per byte, quant/pack.py) then the side region (fp16 scales and passthrough data
in manifest order), byte-shuffled with stride 2 as it is almost all fp16. The loader checks every length, offset and
checksum before allocating, caps and bounds every decompression, and never unpickles anything.
"""

from __future__ import annotations

import json
import lzma
import math
import os
import struct
import tempfile
import zlib

import brotli
import numpy as np
import torch
import zstandard

from quant.gptq import QTensor
from quant.lqer import LQER_A_RANGE, LQER_B_RANGE, LQERFactors, lqer_group_count
from quant.pack import byte_shuffle, byte_unshuffle, pack_signs, pack_trits, packed_len, unpack_signs, unpack_trits
from quant.rans import RANS_MAX_LANES, rans_decode, rans_encode, rans_lanes

__all__ = [
    "ARTIFACT_CODECS",
    "ARTIFACT_VERSION",
    "ARTIFACT_VERSIONS",
    "ArtifactError",
    "compress_bytes",
    "compress_payload",
    "decode_artifact",
    "decompress_bytes",
    "encode_artifact",
    "load_artifact",
    "parse_artifact",
    "read_artifact_file",
    "save_artifact",
    "stored_codes",
]

ARTIFACT_MAGIC = b"PGQ"
ARTIFACT_VERSION = 3  # the newest format version written and read; 1 (no LQER) and 2 (no sign/ternary) still read
ARTIFACT_VERSIONS = (1, 2, 3)
_PGQ_LOWBIT_KINDS = ("sign", "ternary")  # packed code kinds: format version 3 only
ARTIFACT_CODECS = ("brotli", "zstd", "lzma", "rans")  # rans: format version 2 only
ARTIFACT_MAX_BYTES = 1 << 28  # default cap on the decompressed payload (a record's is ~37 MB)
_PGQ_MANIFEST_MAX = 1 << 24  # cap on the decompressed manifest (~160 bytes per tensor)
_PGQ_HEADER = struct.Struct("<3sBII")  # magic, version, manifest length, manifest crc32
_RANS_MAX_SEGMENTS = 2048  # the decoder's slot tables take 32 KiB per code segment (a record has ~80)
_RANS_BYTES = struct.Struct("<IIII")  # compress_bytes(..., "rans") framing: symbols, lanes, tables bytes, words bytes
_PGQ_DTYPES = ("float32", "float16", "bfloat16", "float64", "int8", "uint8", "int16", "int32", "int64", "bool")


class ArtifactError(ValueError):
    """Any fault in an artifact file: one exception type with a one-line message."""


def _pgq_store_dtype(dtype: str) -> str:
    """Passthrough storage: floats as fp16 (upstream), other dtypes as themselves."""
    return "float16" if getattr(torch, dtype).is_floating_point else dtype


def compress_bytes(data: bytes, codec: str) -> bytes:
    """Compress with brotli quality 11, zstd level 22, lzma preset 9e or order-0 rANS over the bytes as one segment
    (all deterministic). In an artifact, "rans" codes each tensor's codes with its own table instead."""
    if codec == "rans":
        lanes = rans_lanes(len(data))
        tables, states, words = rans_encode(np.frombuffer(data, dtype=np.int8), [len(data)], lanes)
        return _RANS_BYTES.pack(len(data), lanes, len(tables), len(words)) + tables + states + words
    if codec == "brotli":
        return brotli.compress(data, quality=11)
    if codec == "zstd":
        return zstandard.ZstdCompressor(level=22).compress(data)
    if codec == "lzma":
        return lzma.compress(data, preset=9 | lzma.PRESET_EXTREME)
    raise ValueError(f"unknown codec {codec!r}; expected one of {', '.join(ARTIFACT_CODECS)}")


def decompress_bytes(data: bytes, codec: str, limit: int) -> bytes:
    """Decompress at most `limit` bytes: output is produced in bounded steps, so a bomb stops at the cap."""
    try:
        if codec == "rans":
            _ensure(len(data) >= _RANS_BYTES.size, "rans stream is truncated")
            n, lanes, nt, nw = _RANS_BYTES.unpack_from(data)
            _ensure(n <= limit, f"{codec} stream decompresses to more than the {limit:,} bytes allowed")
            _ensure(lanes == rans_lanes(n), f"rans stream has {lanes} lanes for {n:,} bytes, expected {rans_lanes(n)}")
            _ensure(_RANS_BYTES.size + nt + 4 * lanes + nw == len(data), "rans stream lengths disagree with its size")
            body = data[_RANS_BYTES.size:]
            out = rans_decode(body[:nt], body[nt:nt + 4 * lanes], body[nt + 4 * lanes:], [n], lanes).tobytes()
        elif codec == "brotli":
            d, parts, total = brotli.Decompressor(), [], 0
            chunk = d.process(data, output_buffer_limit=limit + 1)
            while True:
                parts.append(chunk)
                total += len(chunk)
                if total > limit or d.is_finished():
                    break
                if d.can_accept_more_data():
                    raise ArtifactError(f"{codec} stream is truncated")
                chunk = d.process(b"", output_buffer_limit=limit + 1 - total)
            out = b"".join(parts)
        elif codec == "zstd":
            dctx = zstandard.ZstdDecompressor(max_window_size=1 << max(10, min(31, limit.bit_length())))
            with dctx.stream_reader(data) as reader:
                out = reader.read(limit + 1)
        elif codec == "lzma":
            d = lzma.LZMADecompressor(format=lzma.FORMAT_XZ, memlimit=1 << 27)
            out = d.decompress(data, max_length=limit + 1)
            if len(out) <= limit and not d.eof:
                raise ArtifactError(f"{codec} stream is truncated")
        else:
            raise ArtifactError(f"unknown codec {codec!r}")
    except (brotli.error, zstandard.ZstdError, lzma.LZMAError, MemoryError) as e:
        raise ArtifactError(f"{codec} stream does not decompress: {e}") from None
    except ValueError as e:  # rans: every inconsistency of the stream
        if isinstance(e, ArtifactError):
            raise
        raise ArtifactError(f"{codec} stream does not decode: {e}") from None
    if len(out) > limit:
        raise ArtifactError(f"{codec} stream decompresses to more than the {limit:,} bytes allowed")
    return out


def scale_count(kind: str, shape: tuple[int, ...] | list[int]) -> int:
    """fp16 scales a quantized tensor stores: one per row, except one per tensor for the "sign" kind."""
    return 1 if kind == "sign" else shape[0]


def stored_codes(qt: QTensor) -> bytes:
    """A quantized tensor's codes as the codes region stores them: bit-packed signs, base-3-packed trits, else int8."""
    c = qt.codes.contiguous().numpy()
    return pack_signs(c) if qt.kind == "sign" else pack_trits(c) if qt.kind == "ternary" else c.tobytes()


def _artifact_layout(entries: list[dict]) -> tuple[int, int, list[dict]]:
    """Spans [offset, length] of every tensor's codes / scale / data in the payload; returns (codes, total, spans).

    Codes region: every quantized tensor's codes in manifest order, then the LQER codes (A then B) of the tensors that
    have them. Side region: every tensor's fp16 scales or passthrough data in manifest order, then the LQER scales."""
    codes_end, spans = 0, []
    for e in entries:
        numel = 1
        for n in e["shape"]:
            numel *= n
        if e["kind"] == "passthrough":
            spans.append({"data": numel * torch.empty(0, dtype=getattr(torch, e["store"])).element_size()})
        else:
            n = packed_len(e["kind"], numel) if e["kind"] in _PGQ_LOWBIT_KINDS else numel
            spans.append({"codes": [codes_end, n], "scale": 2 * scale_count(e["kind"], e["shape"])})
            codes_end += n
    lqer = [(s, e["shape"], e["lqer"]) for e, s in zip(entries, spans, strict=True) if "lqer" in e]
    for s, (rows, cols), f in lqer:
        s["lqer"] = {"rank": f["rank"], "group": f["group"], "a_codes": [codes_end, rows * f["rank"]],
                     "b_codes": [codes_end + rows * f["rank"], f["rank"] * cols]}
        codes_end += (rows + cols) * f["rank"]
    side = codes_end
    for s in spans:
        key = "data" if "data" in s else "scale"
        s[key] = [side, s[key]]
        side += s[key][1]
    for s, (_, cols), f in lqer:
        groups = lqer_group_count(f["rank"], cols, f["group"])
        s["lqer"].update(a_scale=[side, 2], b_scale=[side + 2, 2 * groups])
        side += 2 + 2 * groups
    return codes_end, side, spans


def _code_segments(spans: list[dict]) -> list[int]:
    """Lengths of the codes region's segments in payload order: every quantized tensor's codes, then every LQER A and
    B (the order `_artifact_layout` lays them out); "rans" gives each segment its own frequency table."""
    main = [s["codes"][1] for s in spans if "codes" in s]
    return main + [n for s in spans if "lqer" in s for n in (s["lqer"]["a_codes"][1], s["lqer"]["b_codes"][1])]


def compress_payload(codes: bytes, segments: list[int], side: bytes, codec: str) -> tuple[bytes, dict]:
    """The compressed payload of an artifact and its extra manifest fields, from the codes region (int8 codes; the
    lengths of its segments), and the side region as stored (already byte-shuffled).

    brotli / zstd / lzma compress codes + side as one stream. "rans" codes every segment of the codes region with its
    own order-0 table (quant/rans.py) and compresses the tables, the lane states and the side region with brotli-11."""
    if codec != "rans":
        return compress_bytes(codes + side, codec), {}
    if len(segments) > _RANS_MAX_SEGMENTS:
        raise ValueError(f"compress_payload: rans takes at most {_RANS_MAX_SEGMENTS} code segments, got {len(segments)}")
    lanes = rans_lanes(len(codes))
    tables, states, words = rans_encode(np.frombuffer(codes, dtype=np.int8), segments, lanes)
    extra = {"rans": {"lanes": lanes, "tables_bytes": len(tables), "words_bytes": len(words)}}
    return words + compress_bytes(tables + states + side, "brotli"), extra


def encode_artifact(qtensors: list[QTensor], codec: str = "brotli") -> bytes:
    """Serialize QTensors (in list order) into artifact bytes; the same input gives byte-identical output."""
    entries, codes, side, lqer_codes, lqer_side = [], [], [], [], []
    for qt in qtensors:
        if qt.dtype not in _PGQ_DTYPES:
            raise ValueError(f"encode_artifact: {qt.name} has unsupported dtype {qt.dtype}")
        e = {"name": qt.name, "shape": list(qt.shape), "dtype": qt.dtype, "kind": qt.kind}
        if qt.kind == "passthrough":
            e["store"] = str(qt.data.dtype).removeprefix("torch.")
            if e["store"] != _pgq_store_dtype(qt.dtype) or tuple(qt.data.shape) != qt.shape:
                raise ValueError(f"encode_artifact: {qt.name} passthrough needs {_pgq_store_dtype(qt.dtype)} data of "
                                 f"shape {qt.shape}")
            side.append(qt.data.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        else:
            if qt.codes.dtype != torch.int8 or tuple(qt.codes.shape) != qt.shape or qt.scale.dtype != torch.float16 \
                    or qt.scale.numel() != scale_count(qt.kind, qt.shape):
                raise ValueError(f"encode_artifact: {qt.name} needs int8 codes of shape {qt.shape} and "
                                 f"{scale_count(qt.kind, qt.shape)} fp16 scales")
            if qt.kind in _PGQ_LOWBIT_KINDS and (qt.bits != (1 if qt.kind == "sign" else 2) or qt.lqer is not None):
                raise ValueError(f"encode_artifact: {qt.name} {qt.kind} needs bits {1 if qt.kind == 'sign' else 2} "
                                 f"and no LQER")
            e["bits"] = qt.bits
            codes.append(stored_codes(qt))
            side.append(qt.scale.contiguous().numpy().tobytes())
            if qt.lqer is not None:
                f = qt.lqer
                rows, cols = qt.shape
                if (f.a_codes.dtype != torch.int8 or tuple(f.a_codes.shape) != (rows, f.rank)
                        or f.b_codes.dtype != torch.int8 or tuple(f.b_codes.shape) != (f.rank, cols)
                        or f.a_scale.dtype != torch.float16 or f.a_scale.numel() != 1 or f.b_scale.dtype != torch.float16
                        or f.b_scale.numel() != lqer_group_count(f.rank, cols, f.group)):
                    raise ValueError(f"encode_artifact: {qt.name} has malformed LQER factors")
                e["lqer"] = {"rank": f.rank, "group": f.group}
                lqer_codes += [f.a_codes.contiguous().numpy().tobytes(), f.b_codes.contiguous().numpy().tobytes()]
                lqer_side += [f.a_scale.reshape(1).numpy().tobytes(), f.b_scale.contiguous().numpy().tobytes()]
        entries.append(e)
    codes_bytes, payload_bytes, spans = _artifact_layout(entries)
    for e, s in zip(entries, spans, strict=True):
        e.update(s)
    # the lowest version that can hold the content, so older loaders read what they can
    version = (3 if any(e["kind"] in _PGQ_LOWBIT_KINDS for e in entries) else 2 if lqer_codes or codec == "rans"
               else 1)
    compressed, extra = compress_payload(b"".join(codes + lqer_codes), _code_segments(spans),
                                         byte_shuffle(b"".join(side + lqer_side), 2), codec)
    manifest = {
        "codec": codec, "packing": "int8", "scale_layout": "row-fp16", "shuffle": 2, "codes_bytes": codes_bytes,
        "payload_bytes": payload_bytes, "compressed_bytes": len(compressed), "compressed_crc32": zlib.crc32(compressed),
        "tensors": entries, **extra,
    }
    m = brotli.compress(json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode(), quality=11)
    return _PGQ_HEADER.pack(ARTIFACT_MAGIC, version, len(m), zlib.crc32(m)) + m + compressed


def _ensure(ok: bool, msg: str) -> None:
    if not ok:
        raise ArtifactError(msg)


def _is_count(x: object, lo: int = 0, hi: int = 1 << 62) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and lo <= x <= hi


def _check_manifest_entry(e: object, i: int, version: int) -> None:
    """Schema of one manifest tensor entry (types and ranges; spans are checked against the layout afterwards)."""
    _ensure(isinstance(e, dict), f"manifest tensor #{i} is not an object")
    name = e.get("name")
    _ensure(isinstance(name, str) and 0 < len(name) <= 512, f"manifest tensor #{i} has a bad name")
    shape, kind, dtype = e.get("shape"), e.get("kind"), e.get("dtype")
    _ensure(isinstance(shape, list) and len(shape) <= 8 and all(_is_count(n, 0, 1 << 40) for n in shape),
            f"{name}: bad shape {shape!r}")
    _ensure(dtype in _PGQ_DTYPES, f"{name}: unsupported dtype {dtype!r}")
    if kind == "passthrough":
        store = _pgq_store_dtype(dtype)
        _ensure(e.get("store") == store, f"{name}: {dtype} passthrough must be stored as {store}")
        keys = {"name", "shape", "dtype", "kind", "store", "data"}
    else:
        kinds = ("gptq", "rtn", *(_PGQ_LOWBIT_KINDS if version >= 3 else ()))
        _ensure(kind in kinds, f"{name}: unknown kind {kind!r} for format version {version}")
        _ensure(len(shape) == 2 and getattr(torch, dtype).is_floating_point, f"{name}: quantized tensors are 2-D floats")
        if kind in _PGQ_LOWBIT_KINDS:
            want = 1 if kind == "sign" else 2
            _ensure(e.get("bits") == want and not isinstance(e.get("bits"), bool),
                    f"{name}: {kind} bits must be {want}, got {e.get('bits')!r}")
        else:
            _ensure(_is_count(e.get("bits"), 2, 8), f"{name}: bits must be 2..8, got {e.get('bits')!r}")
        keys = {"name", "shape", "dtype", "kind", "bits", "codes", "scale"}
        if version >= 2 and "lqer" in e and kind not in _PGQ_LOWBIT_KINDS:
            keys.add("lqer")
            f = e["lqer"]
            _ensure(isinstance(f, dict), f"{name}: lqer is not an object")
            _ensure(_is_count(f.get("rank"), 1, min(shape)), f"{name}: lqer rank must be 1..{min(shape)}, "
                    f"got {f.get('rank')!r}")
            _ensure(_is_count(f.get("group"), 1, 1 << 20), f"{name}: lqer group must be 1..{1 << 20}, got "
                    f"{f.get('group')!r}")
            lkeys = {"rank", "group", "a_codes", "a_scale", "b_codes", "b_scale"}
            _ensure(set(f) == lkeys, f"{name}: lqer keys {sorted(f)} != {sorted(lkeys)}")
    _ensure(set(e) == keys, f"{name}: manifest keys {sorted(e)} != {sorted(keys)}")


def _rans_payload(m: dict, payload: bytes, spans: list[dict], codes_bytes: int, payload_bytes: int) -> bytes:
    """The decompressed payload of a "rans" artifact: rANS words, then brotli(tables + lane states + side region)."""
    r = m["rans"]
    _ensure(isinstance(r, dict) and set(r) == {"lanes", "tables_bytes", "words_bytes"},
            f"rans parameters {r!r} must be an object with lanes, tables_bytes and words_bytes")
    segments = _code_segments(spans)
    _ensure(len(segments) <= _RANS_MAX_SEGMENTS, f"rans takes at most {_RANS_MAX_SEGMENTS} code segments")
    lanes, tb, wb = r["lanes"], r["tables_bytes"], r["words_bytes"]
    _ensure(_is_count(lanes, 1, RANS_MAX_LANES), f"rans lanes must be 1..{RANS_MAX_LANES}, got {lanes!r}")
    # the writer's choice, enforced: few lanes for many codes would make the decoder take ~one numpy step per code
    _ensure(lanes == rans_lanes(codes_bytes), f"rans lanes must be {rans_lanes(codes_bytes)} for {codes_bytes:,} codes, "
            f"got {lanes}")
    _ensure(_is_count(tb, 0, 2 * 258 * len(segments)) and tb % 2 == 0, f"bad rans tables size {tb!r}")
    _ensure(_is_count(wb, 0, len(payload)) and wb % 2 == 0, f"bad rans words size {wb!r}")
    tail_len = tb + 4 * lanes + payload_bytes - codes_bytes
    tail = decompress_bytes(payload[wb:], "brotli", tail_len)
    _ensure(len(tail) == tail_len, f"rans side stream decompresses to {len(tail):,} bytes, expected {tail_len:,}")
    try:
        codes = rans_decode(tail[:tb], tail[tb:tb + 4 * lanes], payload[:wb], segments, lanes)
    except ValueError as e:
        raise ArtifactError(f"rans codes do not decode: {e}") from None
    return codes.tobytes() + tail[tb + 4 * lanes:]


def parse_artifact(blob: bytes, max_decompressed_bytes: int = ARTIFACT_MAX_BYTES) -> tuple[dict, list[QTensor]]:
    """Validate and decode artifact bytes into (manifest, QTensors); every fault raises ArtifactError."""
    _ensure(len(blob) >= _PGQ_HEADER.size, f"truncated: {len(blob)} bytes, shorter than the {_PGQ_HEADER.size}-byte header")
    magic, version, mlen, mcrc = _PGQ_HEADER.unpack_from(blob)
    _ensure(magic == ARTIFACT_MAGIC, "not a pgolf quant artifact (bad magic)")
    _ensure(version in ARTIFACT_VERSIONS, f"artifact format version {version}; this loader reads versions "
            f"{', '.join(map(str, ARTIFACT_VERSIONS))}")
    _ensure(mlen <= len(blob) - _PGQ_HEADER.size, f"manifest length {mlen:,} exceeds the file ({len(blob):,} bytes)")
    mbytes = blob[_PGQ_HEADER.size:_PGQ_HEADER.size + mlen]
    _ensure(zlib.crc32(mbytes) == mcrc, "manifest checksum mismatch (corrupt file)")
    mbytes = decompress_bytes(mbytes, "brotli", _PGQ_MANIFEST_MAX)
    try:
        m = json.loads(mbytes)
    except (ValueError, RecursionError) as e:
        raise ArtifactError(f"manifest is not valid JSON: {e}") from None
    _ensure(isinstance(m, dict), "manifest is not a JSON object")
    keys = {"codec", "packing", "scale_layout", "shuffle", "codes_bytes", "payload_bytes", "compressed_bytes",
            "compressed_crc32", "tensors"}
    codecs = ARTIFACT_CODECS if version >= 2 else ("brotli", "zstd", "lzma")
    _ensure(m.get("codec") in codecs, f"unknown codec {m.get('codec')!r} for format version {version}")
    if m["codec"] == "rans":
        keys.add("rans")
    _ensure(set(m) == keys, f"manifest keys {sorted(m)} != {sorted(keys)}")
    _ensure(m["packing"] == "int8", f"unknown packing {m['packing']!r}")
    _ensure(m["scale_layout"] == "row-fp16", f"unknown scale layout {m['scale_layout']!r}")
    _ensure(_is_count(m["shuffle"], 1, 16), f"bad shuffle stride {m['shuffle']!r}")
    payload = blob[_PGQ_HEADER.size + mlen:]
    _ensure(m["compressed_bytes"] == len(payload),
            f"payload is {len(payload):,} bytes but the manifest says {m['compressed_bytes']!r} (truncated file?)")
    _ensure(zlib.crc32(payload) == m["compressed_crc32"], "payload checksum mismatch (corrupt file)")
    _ensure(isinstance(m["tensors"], list), "manifest 'tensors' is not a list")
    for i, e in enumerate(m["tensors"]):
        _check_manifest_entry(e, i, version)
    names = [e["name"] for e in m["tensors"]]
    _ensure(len(set(names)) == len(names), "duplicate tensor names in the manifest")
    codes_bytes, payload_bytes, spans = _artifact_layout(m["tensors"])
    _ensure(m["codes_bytes"] == codes_bytes and m["payload_bytes"] == payload_bytes,
            f"manifest sizes ({m['codes_bytes']!r}, {m['payload_bytes']!r}) disagree with the tensor shapes "
            f"({codes_bytes:,}, {payload_bytes:,})")
    for e, s in zip(m["tensors"], spans, strict=True):
        _ensure(all(e[k] == v for k, v in s.items()), f"{e['name']}: offsets/lengths disagree with its shape and dtype")
    _ensure(payload_bytes <= max_decompressed_bytes,
            f"payload of {payload_bytes:,} bytes exceeds the cap of {max_decompressed_bytes:,} bytes")
    unpacked = sum(math.prod(e["shape"]) for e in m["tensors"] if e["kind"] in _PGQ_LOWBIT_KINDS)
    _ensure(unpacked <= max_decompressed_bytes,  # packed codes unpack to one int8 each: bound that memory too
            f"sign/ternary codes unpack to {unpacked:,} bytes, over the cap of {max_decompressed_bytes:,} bytes")
    if m["codec"] == "rans":
        raw = _rans_payload(m, payload, spans, codes_bytes, payload_bytes)
    else:
        raw = decompress_bytes(payload, m["codec"], payload_bytes)
    _ensure(len(raw) == payload_bytes, f"payload decompresses to {len(raw):,} bytes, manifest says {payload_bytes:,}")
    raw = raw[:codes_bytes] + byte_unshuffle(raw[codes_bytes:], m["shuffle"])

    def tensor(span: list[int], dtype: torch.dtype, shape: list[int]) -> torch.Tensor:
        if span[1] == 0:
            return torch.empty(shape, dtype=dtype)
        return torch.frombuffer(bytearray(raw[span[0]:span[0] + span[1]]), dtype=dtype).reshape(shape)

    out = []
    for e, s in zip(m["tensors"], spans, strict=True):  # slice with the computed spans, equal to the manifest's
        shape = tuple(e["shape"])
        if e["kind"] == "passthrough":
            data = tensor(s["data"], getattr(torch, e["store"]), e["shape"])
            out.append(QTensor(e["name"], shape, e["dtype"], "passthrough", data=data))
            continue
        if e["kind"] in _PGQ_LOWBIT_KINDS:
            packed = raw[s["codes"][0]:s["codes"][0] + s["codes"][1]]
            try:
                flat = (unpack_signs if e["kind"] == "sign" else unpack_trits)(packed, math.prod(shape))
            except ValueError as err:
                raise ArtifactError(f"{e['name']}: {err}") from None
            codes = torch.from_numpy(flat).reshape(shape)
            out.append(QTensor(e["name"], shape, e["dtype"], e["kind"], e["bits"], codes,
                               tensor(s["scale"], torch.float16, [scale_count(e["kind"], shape)])))
            continue
        codes = tensor(s["codes"], torch.int8, e["shape"])
        clip_range = 2 ** (e["bits"] - 1) - 1
        if codes.numel():
            lo, hi = torch.aminmax(codes)
            _ensure(-clip_range <= lo and hi <= clip_range, f"{e['name']}: codes exceed ±{clip_range} for int{e['bits']}")
        scale = tensor(s["scale"], torch.float16, [shape[0]])
        lqer = None
        if "lqer" in e:
            sl, r = s["lqer"], e["lqer"]["rank"]
            a = tensor(sl["a_codes"], torch.int8, [shape[0], r])
            b = tensor(sl["b_codes"], torch.int8, [r, shape[1]])
            for what, c, (lo, hi) in (("A", a, LQER_A_RANGE), ("B", b, LQER_B_RANGE)):
                cl, ch = torch.aminmax(c)
                _ensure(lo <= cl and ch <= hi, f"{e['name']}: LQER {what} codes exceed [{lo}, {hi}]")
            lqer = LQERFactors(a, tensor(sl["a_scale"], torch.float16, [1]), b,
                               tensor(sl["b_scale"], torch.float16, [sl["b_scale"][1] // 2]), e["lqer"]["group"])
        out.append(QTensor(e["name"], shape, e["dtype"], e["kind"], e["bits"], codes, scale, lqer=lqer))
    return m, out


def decode_artifact(blob: bytes, max_decompressed_bytes: int = ARTIFACT_MAX_BYTES) -> list[QTensor]:
    """QTensors from artifact bytes (see `parse_artifact`)."""
    return parse_artifact(blob, max_decompressed_bytes)[1]


def save_artifact(path: str | os.PathLike, blob: bytes) -> None:
    """Write atomically: a temp file in the same directory, then os.replace."""
    d = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".artifact-", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(blob)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def read_artifact_file(path: str | os.PathLike, max_decompressed_bytes: int = ARTIFACT_MAX_BYTES) -> bytes:
    """The bytes of an artifact file; unreadable or impossibly large files raise ArtifactError."""
    try:
        size = os.path.getsize(path)
        _ensure(size <= max_decompressed_bytes + (1 << 24), f"{size:,} bytes is larger than any valid artifact")
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise ArtifactError(f"cannot read the file: {e.strerror or e}") from None


def load_artifact(path: str | os.PathLike, max_decompressed_bytes: int = ARTIFACT_MAX_BYTES) -> list[QTensor]:
    """Read and decode an artifact file (see `parse_artifact`)."""
    return decode_artifact(read_artifact_file(path, max_decompressed_bytes), max_decompressed_bytes)
