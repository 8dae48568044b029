"""pgolf train_gpt.py: the Parameter Golf record stack in one file (<= 1,500 lines, enforced by a test).

Run: `torchrun --standalone --nproc_per_node=8 train_gpt.py` (8xH100) or `--nproc_per_node=2` on CPU; config is
the record's defaults, overridden by env vars (`SEED=42 torchrun ...`). Importing this file has no side effects.

Glossary: layer = a parameter block; pass = one execution of a layer; loop = a repeated span of layers.
doc = BOS + tokens; window = an eval context; chunk = a TTT unit of val tokens. bits / clip_range = 2**(bits-1)-1
/ clip_sigmas / scale are the quantizer's terms; rank / world_size / master are the distributed ones.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import glob
import json
import lzma
import math
import os
import re
import struct
import subprocess
import sys
import tempfile
import time
import uuid
import zlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import brotli
import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
import zstandard
from torch import Tensor, nn

# >>> inline quant: quant/pack.py, quant/sdclip.py, quant/gptq.py, quant/codec.py (inlined by tools/build_record.py)

# ---- quant/pack.py
# Byte shuffle: group the bytes of multi-byte values by position so the compressor sees similar bytes together.
#
# Codes are stored one per byte (int6 in int8 containers, unshuffled: shuffling them changed sizes by < 0.1%).
# Bit-packing 4 int6 symbols into 3 bytes came out 13-25% larger with every codec (brotli-11 +14%, zstd-22 +24%,
# lzma-9e +13% on GPTQ int6 codes; `python bench/quant.py` prints the comparison): the symbols straddle byte
# boundaries and the coders lose their alphabet. Shuffling the fp16 scales with stride 2 saves 5-10%.


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


# ---- quant/sdclip.py
# SDClip per-row step sizes and round-to-nearest quantization (pure tensor functions).


def sdclip_scale(w: Tensor, clip_sigmas: float, clip_range: int) -> Tensor:
    """Per-row step `s_r = clip_sigmas * std(w[r, :]) / clip_range` (unbiased std of the original weights), fp16 [rows].

    SDClip: PR #1394 (@clarkkev). The compressed size of the codes is about their entropy, ≈ log2(σ/s) + const bits
    per weight, so a step proportional to the row's σ gives every row the same rate/distortion trade-off whatever its
    scale; at int6 with 12.85σ the clamp is almost never hit, so `clip_sigmas` is really a step-size choice.
    `clip_range = 2**(bits-1) - 1`. Callers must use the fp16-rounded value returned here.
    """
    s = clip_sigmas * w.float().std(dim=1) / clip_range
    # Upstream clamps at 1e-10, which fp16 flushes to 0; fp16's smallest subnormal 2**-24 keeps every step > 0.
    return s.clamp_min(2.0**-24).half()


def quantize_rtn(w: Tensor, scale: Tensor, clip_range: int) -> Tensor:
    """Round-to-nearest codes `clamp(round(w / s), -clip_range, clip_range)` as int8 [rows, cols]."""
    q = torch.round(w.float() / scale.float()[:, None])
    return q.clamp_(-clip_range, clip_range).to(torch.int8)


# ---- quant/gptq.py
# Full-Hessian GPTQ with actorder and fixed SDClip scales, plus the state-dict level API used by the trainer.


def accumulate_hessian(H: Tensor | None, x: Tensor) -> Tensor:
    """Return `H + XᵀX` in fp32 for x flattened to [tokens, in_features]; H is updated in place (created if None).

    Autocast is switched off here: calibration runs under bf16 autocast on GPU, where `x.T @ x` would come out bf16
    (losing the sums' precision) and the next `addmm_` of fp32 inputs into a bf16 H would raise."""
    with torch.autocast(x.device.type, enabled=False):
        x = x.detach().reshape(-1, x.shape[-1]).float()
        if H is None:
            return x.T @ x
        return H.addmm_(x.T, x)


def _gptq_inverse_factor(H: Tensor) -> Tensor:
    """Upper Cholesky factor U of H⁻¹ (H already damped); more damping if H is not numerically PD, identity (RTN) last."""
    eye = torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
    mean_diag = H.diagonal().mean()
    for extra in (0.0, 0.1, 1.0, 10.0):
        L, info = torch.linalg.cholesky_ex(H + extra * mean_diag * eye)
        if info == 0:
            U, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(L), upper=True)
            if info == 0 and bool(torch.isfinite(U).all()):
                return U
    return eye


def gptq_quantize_weight(w: Tensor, H: Tensor, scale: Tensor, clip_range: int, block_size: int = 128) -> Tensor:
    """GPTQ codes (int8 [rows, cols], original column order) for w with input Hessian H ≈ XᵀX [cols, cols].

    GPTQ (Frantar et al. 2022, arXiv:2210.17323) with actorder and full-Hessian error feedback, as in PR #1493: each
    column is rounded at the fixed per-row step `scale` (SDClip, never re-fitted), and its rounding error, divided by
    U[j, j], is pushed onto the not-yet-quantized columns through row j of U, the upper Cholesky factor of H⁻¹
    (H⁻¹ = UᵀU). This greedily minimizes the layer-output error ‖XWᵀ − XQᵀ‖; with H = I it is round-to-nearest.
    """
    rows, cols = w.shape
    if H.shape != (cols, cols) or scale.shape != (rows,):
        raise ValueError(f"gptq: w {tuple(w.shape)} needs H ({cols}, {cols}) and scale ({rows},), "
                         f"got {tuple(H.shape)} and {tuple(scale.shape)}")
    W = w.detach().float().clone()
    H = H.detach().to(W.device, torch.float32, copy=True)
    dead = H.diagonal() == 0  # inputs that never fire: their weights cannot matter, so code them as 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    H.diagonal().add_(0.01 * H.diagonal().mean())  # 1% damping
    perm = torch.argsort(H.diagonal(), descending=True, stable=True)  # actorder: most active inputs first
    W, H = W[:, perm], H[perm][:, perm]
    U = _gptq_inverse_factor(H)
    s = scale.float()
    Q = torch.zeros(rows, cols, dtype=torch.int8, device=W.device)
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        W1, U1 = W[:, i1:i2].clone(), U[i1:i2, i1:i2]
        Err1 = torch.zeros_like(W1)
        for j in range(i2 - i1):
            q = torch.round(W1[:, j] / s).clamp_(-clip_range, clip_range)
            Q[:, i1 + j] = q.to(torch.int8)
            err = (W1[:, j] - q * s) / U1[j, j]
            W1[:, j:] -= err[:, None] * U1[j, j:][None, :]  # in-block error feedback
            Err1[:, j] = err
        W[:, i2:] -= Err1 @ U[i1:i2, i2:]  # lazy batch update of the remaining blocks
    return Q[:, torch.argsort(perm)]


@dataclass(frozen=True, eq=False)
class QTensor:
    """One entry of a quantized state dict: either codes (int8 [rows, cols]) + scale (fp16 [rows]), or passthrough data.

    `kind` is "gptq", "rtn" or "passthrough"; `bits` is the code width (0 for passthrough); `dtype` names the original
    dtype restored by `dequantize`; `data` holds passthrough values (fp16 for floats, the original dtype otherwise).
    """

    name: str
    shape: tuple[int, ...]
    dtype: str
    kind: str
    bits: int = 0
    codes: Tensor | None = None
    scale: Tensor | None = None
    data: Tensor | None = None


def quantize_state_dict(
    state: dict[str, Tensor],
    hessians: dict[str, Tensor],
    *,
    matrix_bits: int = 6,
    matrix_clip_sigmas: float = 12.85,
    embed_bits: int = 8,
    embed_clip_sigmas: float = 20.0,
    embed_names: tuple[str, ...] = ("tok_emb.weight",),
    passthrough_numel: int = 65536,
    method: str = "gptq",
) -> list[QTensor]:
    """Quantize a state dict in its order: 2-D floats above `passthrough_numel` elements get SDClip codes (GPTQ with
    their Hessian, round-to-nearest without one or with method="rtn"); everything else is passthrough (floats as fp16).
    Runs on the weights' device; the returned tensors are on the CPU.

    Embeddings (`embed_names`) use the embed bits/sigmas and are GPTQ'd as the tied output head: rows = vocab,
    Hessian of the final hidden states (PR #1493).
    """
    if method not in ("gptq", "rtn"):
        raise ValueError(f"quantize_state_dict: method must be 'gptq' or 'rtn', got {method!r}")
    out = []
    for name, t in state.items():
        t = t.detach()
        dtype = str(t.dtype).removeprefix("torch.")
        if not t.is_floating_point() or t.ndim != 2 or t.numel() <= passthrough_numel:
            data = t.half() if t.is_floating_point() else t
            out.append(QTensor(name, tuple(t.shape), dtype, "passthrough", data=data.cpu().clone().contiguous()))
            continue
        embed = name in embed_names
        bits = embed_bits if embed else matrix_bits
        clip_range = 2 ** (bits - 1) - 1
        scale = sdclip_scale(t, embed_clip_sigmas if embed else matrix_clip_sigmas, clip_range)
        H = hessians.get(name)
        if method == "gptq" and H is not None:
            codes, kind = gptq_quantize_weight(t, H, scale, clip_range), "gptq"
        else:
            codes, kind = quantize_rtn(t, scale, clip_range), "rtn"
        out.append(QTensor(name, tuple(t.shape), dtype, kind, bits, codes.cpu().contiguous(), scale.cpu()))
    return out


def dequantize(qtensors: list[QTensor]) -> dict[str, Tensor]:
    """State dict back from QTensors: `W = q·s[:, None]` (fp32 math) or passthrough data, cast to the original dtype."""
    out = {}
    for qt in qtensors:
        dtype = getattr(torch, qt.dtype)
        if qt.kind == "passthrough":
            out[qt.name] = qt.data.to(dtype).reshape(qt.shape)
        else:
            out[qt.name] = (qt.codes.float() * qt.scale.float()[:, None]).to(dtype)
    return out


def describe(qtensors: list[QTensor]) -> list[str]:
    """Upstream's `Quantized weights:` lines, one per category, names with layer indices collapsed, sorted unique."""
    groups: dict[str, set[str]] = {}
    for qt in qtensors:
        label = (f"passthrough ({str(qt.data.dtype).removeprefix('torch.')})" if qt.kind == "passthrough"
                 else f"{qt.kind} (int{qt.bits})")
        groups.setdefault(label, set()).add(re.sub(r"\.\d+(?=\.|$)", "", qt.name))
    return [f"{label}: {', '.join(sorted(names))}" for label, names in sorted(groups.items())]


# ---- quant/codec.py
# The artifact container: magic + version header, length-prefixed JSON manifest, one compressed payload.
#
# Layout (little-endian): b"PGQ" | version u8 | manifest length u32 | manifest CRC-32 u32 | manifest (sorted-key JSON,
# brotli-11, since size margins are a few KB) | compressed payload. The decompressed payload is the codes region (each
# quantized tensor's int8 codes, contiguous, in manifest order) then the side region (fp16 scales and passthrough data
# in manifest order), byte-shuffled with stride 2 as it is almost all fp16. The loader checks every length, offset and
# checksum before allocating, caps and bounds every decompression, and never unpickles anything.


ARTIFACT_MAGIC = b"PGQ"
ARTIFACT_VERSION = 1
ARTIFACT_CODECS = ("brotli", "zstd", "lzma")
ARTIFACT_MAX_BYTES = 1 << 28  # default cap on the decompressed payload (a record's is ~37 MB)
_PGQ_MANIFEST_MAX = 1 << 24  # cap on the decompressed manifest (~160 bytes per tensor)
_PGQ_HEADER = struct.Struct("<3sBII")  # magic, version, manifest length, manifest crc32
_PGQ_DTYPES = ("float32", "float16", "bfloat16", "float64", "int8", "uint8", "int16", "int32", "int64", "bool")


class ArtifactError(ValueError):
    """Any fault in an artifact file: one exception type with a one-line message."""


def _pgq_store_dtype(dtype: str) -> str:
    """Passthrough storage: floats as fp16 (upstream), other dtypes as themselves."""
    return "float16" if getattr(torch, dtype).is_floating_point else dtype


def compress_bytes(data: bytes, codec: str) -> bytes:
    """Compress with brotli quality 11, zstd level 22 or lzma preset 9e (all deterministic)."""
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
        if codec == "brotli":
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
    if len(out) > limit:
        raise ArtifactError(f"{codec} stream decompresses to more than the {limit:,} bytes allowed")
    return out


def _artifact_layout(entries: list[dict]) -> tuple[int, int, list[dict]]:
    """Spans [offset, length] of every tensor's codes / scale / data in the payload; returns (codes, total, spans)."""
    codes_end, spans = 0, []
    for e in entries:
        numel = 1
        for n in e["shape"]:
            numel *= n
        if e["kind"] == "passthrough":
            spans.append({"data": numel * torch.empty(0, dtype=getattr(torch, e["store"])).element_size()})
        else:
            spans.append({"codes": [codes_end, numel], "scale": 2 * e["shape"][0]})
            codes_end += numel
    side = codes_end
    for s in spans:
        key = "data" if "data" in s else "scale"
        s[key] = [side, s[key]]
        side += s[key][1]
    return codes_end, side, spans


def encode_artifact(qtensors: list[QTensor], codec: str = "brotli") -> bytes:
    """Serialize QTensors (in list order) into artifact bytes; the same input gives byte-identical output."""
    entries, codes, side = [], [], []
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
            if qt.codes.dtype != torch.int8 or tuple(qt.codes.shape) != qt.shape or qt.scale.dtype != torch.float16:
                raise ValueError(f"encode_artifact: {qt.name} needs int8 codes of shape {qt.shape} and fp16 scales")
            e["bits"] = qt.bits
            codes.append(qt.codes.contiguous().numpy().tobytes())
            side.append(qt.scale.contiguous().numpy().tobytes())
        entries.append(e)
    codes_bytes, payload_bytes, spans = _artifact_layout(entries)
    for e, s in zip(entries, spans, strict=True):
        e.update(s)
    compressed = compress_bytes(b"".join(codes) + byte_shuffle(b"".join(side), 2), codec)
    manifest = {
        "codec": codec, "packing": "int8", "scale_layout": "row-fp16", "shuffle": 2, "codes_bytes": codes_bytes,
        "payload_bytes": payload_bytes, "compressed_bytes": len(compressed), "compressed_crc32": zlib.crc32(compressed),
        "tensors": entries,
    }
    m = brotli.compress(json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode(), quality=11)
    return _PGQ_HEADER.pack(ARTIFACT_MAGIC, ARTIFACT_VERSION, len(m), zlib.crc32(m)) + m + compressed


def _ensure(ok: bool, msg: str) -> None:
    if not ok:
        raise ArtifactError(msg)


def _is_count(x: object, lo: int = 0, hi: int = 1 << 62) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and lo <= x <= hi


def _check_manifest_entry(e: object, i: int) -> None:
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
        _ensure(kind in ("gptq", "rtn"), f"{name}: unknown kind {kind!r}")
        _ensure(len(shape) == 2 and getattr(torch, dtype).is_floating_point, f"{name}: quantized tensors are 2-D floats")
        _ensure(_is_count(e.get("bits"), 2, 8), f"{name}: bits must be 2..8, got {e.get('bits')!r}")
        keys = {"name", "shape", "dtype", "kind", "bits", "codes", "scale"}
    _ensure(set(e) == keys, f"{name}: manifest keys {sorted(e)} != {sorted(keys)}")


def parse_artifact(blob: bytes, max_decompressed_bytes: int = ARTIFACT_MAX_BYTES) -> tuple[dict, list[QTensor]]:
    """Validate and decode artifact bytes into (manifest, QTensors); every fault raises ArtifactError."""
    _ensure(len(blob) >= _PGQ_HEADER.size, f"truncated: {len(blob)} bytes, shorter than the {_PGQ_HEADER.size}-byte header")
    magic, version, mlen, mcrc = _PGQ_HEADER.unpack_from(blob)
    _ensure(magic == ARTIFACT_MAGIC, "not a pgolf quant artifact (bad magic)")
    _ensure(version == ARTIFACT_VERSION, f"artifact format version {version}; this loader reads version {ARTIFACT_VERSION}")
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
    _ensure(set(m) == keys, f"manifest keys {sorted(m)} != {sorted(keys)}")
    _ensure(m["codec"] in ARTIFACT_CODECS, f"unknown codec {m['codec']!r}")
    _ensure(m["packing"] == "int8", f"unknown packing {m['packing']!r}")
    _ensure(m["scale_layout"] == "row-fp16", f"unknown scale layout {m['scale_layout']!r}")
    _ensure(_is_count(m["shuffle"], 1, 16), f"bad shuffle stride {m['shuffle']!r}")
    payload = blob[_PGQ_HEADER.size + mlen:]
    _ensure(m["compressed_bytes"] == len(payload),
            f"payload is {len(payload):,} bytes but the manifest says {m['compressed_bytes']!r} (truncated file?)")
    _ensure(zlib.crc32(payload) == m["compressed_crc32"], "payload checksum mismatch (corrupt file)")
    _ensure(isinstance(m["tensors"], list), "manifest 'tensors' is not a list")
    for i, e in enumerate(m["tensors"]):
        _check_manifest_entry(e, i)
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
        codes = tensor(s["codes"], torch.int8, e["shape"])
        clip_range = 2 ** (e["bits"] - 1) - 1
        if codes.numel():
            lo, hi = torch.aminmax(codes)
            _ensure(-clip_range <= lo and hi <= clip_range, f"{e['name']}: codes exceed ±{clip_range} for int{e['bits']}")
        scale = tensor(s["scale"], torch.float16, [shape[0]])
        out.append(QTensor(e["name"], shape, e["dtype"], e["kind"], e["bits"], codes, scale))
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


# <<< inline quant

try:  # FlashAttention-3 on Hopper (requirements-gpu.txt); SDPA everywhere else
    from flash_attn_interface import flash_attn_func as _fa3_func
except ImportError:
    _fa3_func = None

ARTIFACT_LIMIT_BYTES = 16_000_000  # decimal, code + compressed model
TIME_LIMIT_SECONDS = 600.0  # training, and separately evaluation, on 8xH100 SXM
# The log contract (docs/log_format.md): every line the tools read is written from one of these formats, and
# tools/parse_log.py builds its parsers from the same strings. Change a format here and the parser follows.
LOG_FORMATS = dict(
    source_file="source_file: {name} bytes:{n}",
    train_shards="train_shards: {n}",
    val_tokens="val_tokens: {n}",
    tokenizer="tokenizer: sha256:{sha256} vocab:{vocab}",
    model_params="model_params:{n}",
    runtime="world_size:{world_size} grad_accum_steps:{accum} device:{device} cpus:{cpus} attention:{attention} "
            "compile:{compile} precision:{precision}",
    gptq_reserve="gptq:reserving {seconds:g}s, effective={ms:.0f}ms",
    warmup="{label}: {k}/{n}",
    val="{step}/{iterations} val_loss: {val_loss:.4f} val_bpb: {val_bpb:.4f}",
    train="{step}/{iterations} train_loss: {train_loss:.4f} train_time: {minutes:.1f}m tok/s: {tok_s:.0f}",
    layer_loop="layer_loop:enabled step:{step} frac:{frac:.3f} encoder:{encoder} decoder:{decoder}",
    stop="stopping_early: wallclock_cap train_time: {ms:.0f}ms step: {step}/{iterations}",
    peak_memory="peak memory allocated: {allocated} MiB reserved: {reserved} MiB",
    eval="{label} val_loss:{val_loss:.8f} val_bpb:{val_bpb:.8f} eval_time:{ms:.0f}ms",
    serialized_raw="Serialized model: {n} bytes",
    code_size="Code size: {n} bytes",
    gptq_collected="GPTQ:collected {n} Hessians in {seconds:.1f}s",
    gptq_cut="GPTQ:calibration stopped at {done}/{wanted} batches to end inside the {limit:g}s train budget",
    serialized="Serialized model quantized+{codec}: {n} bytes",
    total_size="Total submission size quantized+{codec}: {n} bytes",
    bytes="bytes_{part}:{n}",
    artifact="artifact: {name} sha256:{sha256}",
    ttt_start="ttt:start chunks={chunks} ttt_lr={lr:g} ttt_epochs={epochs}",
    ledger="time_ledger phase:{phase} seconds:{seconds:.3f} budget:{budget}",
    ledger_total="time_ledger_total train:{train:.3f} eval:{eval:.3f} limit:{limit:g}",
)


def log_line(kind: str, **values: object) -> str:
    return LOG_FORMATS[kind].format(**values)

# -----------------------------------------------------------------------------
# CONFIG: one frozen dataclass; defaults are record P (PR #1493) as it ran; env vars override (upper-case names)
# -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Config:
    # data and outputs
    data_dir: str = "./data/"
    data_path: str = ""  # dataset dir with fineweb_{train,val}_*.bin; "" = DATA_DIR/datasets/fineweb10B_sp{VOCAB_SIZE}
    tokenizer_path: str = ""  # "" = DATA_DIR/tokenizers/fineweb_{VOCAB_SIZE}_bpe.model
    out_dir: str = "."  # logs/, final_model.pt, final_model.int6.ptz, run_summary.json
    run_id: str = ""  # "" = a fresh uuid4
    seed: int = 1337  # init, data order (with rank) and TTT randomness
    # model shape (record P: 11L x 512d, 8 heads / 4 KV heads, MLP 4x, vocab 8192 -> 35,944,536 params)
    vocab_size: int = 8192
    num_layers: int = 11
    model_dim: int = 512
    num_heads: int = 8
    num_kv_heads: int = 4
    mlp_mult: float = 4.0
    mlp_leaky_slope: float = 0.5  # LeakyReLU(0.5)^2 (PR #549); 0.0 gives the baseline's relu^2
    tied_embed_init_std: float = 0.005
    logit_softcap: float = 30.0
    rope_base: float = 10000.0
    rope_dims: int = 16  # partial RoPE: rotate the first 16 of 64 head dims
    qk_gain_init: float = 5.25  # QK-gain 5.25 (PR #1493)
    xsa_last_n: int = 11  # XSA on the last n layers (11 = all)
    ln_scale: bool = True  # 1/sqrt(layer+1) on every block input norm
    skip_gates_enabled: bool = True  # sigmoid-gated U-Net skips; off = the baseline's additive skips
    num_loops: int = 2  # depth recurrence: layers loop_start..loop_end run num_loops+1 times
    loop_start: int = 3
    loop_end: int = 5
    enable_looping_at: float = 0.35  # fraction of the train budget after which looping switches on
    parallel_residual_start: int = 7  # GPT-J style parallel attn+MLP from this physical layer on
    # optimization
    iterations: int = 20000
    train_batch_tokens: int = 786_432
    train_seq_len: int = 2048
    grad_accum_steps: int = 0  # 0 = 8 // world_size (upstream), so the global batch is the same on 1-8 ranks
    max_wallclock_seconds: float = 600.0  # 0 = no cap (step-based schedule)
    gptq_reserve_seconds: float = 12.0  # Hessian collection must end inside the 600 s train budget
    warmdown_frac: float = 0.72
    min_lr: float = 0.0
    warmup_steps: int = 20  # compile warm-up steps, undone afterwards
    matrix_lr: float = 0.022
    scalar_lr: float = 0.02
    tied_embed_lr: float = 0.03
    muon_momentum: float = 0.99
    muon_momentum_warmup_start: float = 0.92
    muon_momentum_warmup_steps: int = 1500
    muon_backend_steps: int = 5
    muon_wd: float = 0.095
    muon_row_normalize: bool = True  # MuonEq-R (PR #1394)
    beta1: float = 0.9
    beta2: float = 0.95
    adam_eps: float = 1e-8
    adam_wd: float = 0.02
    embed_wd: float = 0.085
    grad_clip_norm: float = 0.3
    ema_decay: float = 0.9965
    train_log_every: int = 500
    val_loss_every: int = 4000  # 0 = only the final validation
    val_batch_tokens: int = 524_288
    compile: str = "auto"  # auto = torch.compile on CUDA, eager on CPU; "1" / "0" force it
    # evaluation
    eval_seq_len: int = 2048
    eval_stride: int = 64
    sliding_window_enabled: bool = True
    ttt_enabled: bool = True
    ttt_lr: float = 0.005
    ttt_epochs: int = 3
    ttt_momentum: float = 0.9
    ttt_chunk_tokens: int = 32_768
    # quantization (quant/)
    gptq_calibration_batches: int = 64
    matrix_bits: int = 6
    matrix_clip_sigmas: float = 12.85
    embed_bits: int = 8
    embed_clip_sigmas: float = 20.0
    compressor: str = "brotli"
    passthrough_numel: int = 65_536  # float tensors with at most this many elements are stored fp16, not quantized

    def __post_init__(self) -> None:
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ValueError(f"bad config: {msg}")
        need(self.model_dim % self.num_heads == 0, f"MODEL_DIM={self.model_dim} not divisible by NUM_HEADS={self.num_heads}")
        need(self.num_heads % self.num_kv_heads == 0, f"NUM_HEADS={self.num_heads} not a multiple of NUM_KV_HEADS")
        head_dim = self.model_dim // self.num_heads
        need(self.rope_dims % 2 == 0 and 0 < self.rope_dims <= head_dim,
             f"ROPE_DIMS={self.rope_dims} must be even and <= head dim {head_dim}")
        need(self.num_loops == 0 or 0 <= self.loop_start <= self.loop_end < self.num_layers,
             f"loop span {self.loop_start}..{self.loop_end} outside {self.num_layers} layers")
        need(self.train_batch_tokens % self.train_seq_len == 0, "TRAIN_BATCH_TOKENS must be a multiple of TRAIN_SEQ_LEN")
        need(self.eval_seq_len % self.eval_stride == 0 and self.eval_stride > 0, "EVAL_STRIDE must divide EVAL_SEQ_LEN")
        need(self.ttt_chunk_tokens % self.eval_stride == 0 and self.ttt_chunk_tokens % self.eval_seq_len == 0,
             "TTT_CHUNK_TOKENS must be a multiple of EVAL_SEQ_LEN (and so of EVAL_STRIDE)")
        need(self.compile in ("auto", "0", "1"), f"COMPILE={self.compile!r}: use auto, 0 or 1")
        need(self.compressor in ("brotli", "zstd", "lzma"), f"COMPRESSOR={self.compressor!r}: use brotli, zstd or lzma")
        need(0 < self.vocab_size <= 65536, "VOCAB_SIZE must be in 1..65536 (uint16 shards)")

    @property
    def dataset_dir(self) -> Path:
        return Path(self.data_path or Path(self.data_dir) / "datasets" / f"fineweb10B_sp{self.vocab_size}")

    @property
    def tokenizer_file(self) -> Path:
        return Path(self.tokenizer_path or Path(self.data_dir) / "tokenizers" / f"fineweb_{self.vocab_size}_bpe.model")

    @classmethod
    def from_summary(cls, path: str | Path, **overrides: object) -> Config:
        """The config a run used, from its run_summary.json ("config"), with keyword overrides."""
        return cls(**{**json.loads(Path(path).read_text())["config"], **overrides})

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Config:
        """Config from upper-case env vars (SEED=42 ...). A near-miss name (MODEL_DIMS) is an error with a hint."""
        env = os.environ if env is None else env
        fields = {f.name.upper(): f for f in dataclasses.fields(cls)}
        for key in env:
            if key in fields or key in _FOREIGN_ENV or not key.replace("_", "").isupper():
                continue
            close = difflib.get_close_matches(key, list(fields), n=1, cutoff=0.88)
            if close:
                raise ValueError(f"unknown config env var {key}; did you mean {close[0]}?")
        kwargs = {}
        for key, f in fields.items():
            if key in env:
                kwargs[f.name] = _parse_env(key, env[key], f.type)
        return cls(**kwargs)


_FOREIGN_ENV = {"RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK", "MASTER_ADDR",
                "MASTER_PORT", "OMP_NUM_THREADS", "TORCHELASTIC_RUN_ID", "PYTHONPATH", "CUDA_VISIBLE_DEVICES"}


def _parse_env(key: str, raw: str, typ: str) -> object:
    try:
        if typ == "bool":
            if raw.strip().lower() not in ("0", "1", "true", "false"):
                raise ValueError
            return raw.strip().lower() in ("1", "true")
        return {"int": int, "float": float, "str": str}[typ](raw)
    except ValueError:
        raise ValueError(f"{key}={raw!r} is not a valid {typ}") from None


# -----------------------------------------------------------------------------
# DISTRIBUTED + LOGGING
# -----------------------------------------------------------------------------


def dist_ready() -> bool:
    return dist.is_available() and dist.is_initialized()


def all_reduce_(t: Tensor, op: dist.ReduceOp.RedOpType = dist.ReduceOp.SUM) -> Tensor:
    """In-place all-reduce; a no-op in a single process."""
    if dist_ready():
        dist.all_reduce(t, op=op)
    return t


class Logger:
    """Master-only log: console and logs/<RUN_ID>.txt. Other ranks stay silent."""

    def __init__(self, path: Path | None):
        self.path = path
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("")

    def __call__(self, msg: str, console: bool = True) -> None:
        if self.path is None:
            return
        if console:
            print(msg, flush=True)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(msg + "\n")


def atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)



# -----------------------------------------------------------------------------
# DATA: token shards, val tokens, byte accounting
#
# Shard = 256 little-endian int32 header (magic, version, token count) + uint16 tokens. Every doc is [BOS]+tokens,
# no EOS. This is the one implementation of the format: data/ scripts and tools/ import it from here.
# -----------------------------------------------------------------------------

SHARD_MAGIC, SHARD_VERSION, SHARD_HEADER_INTS = 20240520, 1, 256
SHARD_HEADER_BYTES = SHARD_HEADER_INTS * 4
BOS_ID = 1


class ShardError(ValueError):
    """A token shard that is not in the upstream format; the message names the file and the fault."""


def read_shard_header(path: str | Path) -> int:
    """Validate a shard's header and size; return its token count."""
    path = Path(path)
    if not path.is_file():
        raise ShardError(f"{path}: no such shard file")
    size = path.stat().st_size
    if size < SHARD_HEADER_BYTES:
        raise ShardError(f"{path}: {size} bytes, shorter than the {SHARD_HEADER_BYTES}-byte header")
    header = np.fromfile(path, dtype="<i4", count=SHARD_HEADER_INTS)
    if int(header[0]) != SHARD_MAGIC:
        raise ShardError(f"{path}: bad magic {int(header[0])} (expected {SHARD_MAGIC}); not a token shard")
    if int(header[1]) != SHARD_VERSION:
        raise ShardError(f"{path}: unsupported shard version {int(header[1])} (expected {SHARD_VERSION})")
    n = int(header[2])
    if n < 0 or size != SHARD_HEADER_BYTES + 2 * n:
        raise ShardError(f"{path}: header says {n} tokens ({SHARD_HEADER_BYTES + 2 * n} bytes) "
                         f"but the file has {size} bytes; truncated or corrupt")
    return n


def load_shard(path: str | Path, vocab_size: int | None = None, mmap: bool = False) -> np.ndarray:
    """The shard's uint16 tokens (validated); with vocab_size, every id must be < vocab_size."""
    n = read_shard_header(path)
    if mmap:
        tokens = np.memmap(path, dtype="<u2", mode="r", offset=SHARD_HEADER_BYTES, shape=(n,))
    else:
        tokens = np.fromfile(path, dtype="<u2", count=n, offset=SHARD_HEADER_BYTES)
    if vocab_size is not None and n and (top := int(tokens.max())) >= vocab_size:
        raise ShardError(f"{path}: token id {top} >= vocab size {vocab_size}; shards and tokenizer disagree")
    return tokens


def write_shard(path: str | Path, tokens: np.ndarray) -> None:
    """Write tokens as a shard, atomically (temp file, then rename)."""
    tokens = np.asarray(tokens)
    if tokens.size and (int(tokens.min()) < 0 or int(tokens.max()) >= 2**16):
        raise ValueError(f"{path}: token ids must fit in uint16")
    header = np.zeros(SHARD_HEADER_INTS, dtype="<i4")
    header[:3] = (SHARD_MAGIC, SHARD_VERSION, tokens.size)
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(header.tobytes())
        f.write(tokens.astype("<u2").tobytes())
    os.replace(tmp, path)


def shard_files(pattern: str) -> list[str]:
    """Sorted shard paths matching a glob; an error naming the pattern and the download command if none."""
    files = sorted(glob.glob(pattern))
    if not files:
        raise FileNotFoundError(f"no shards match {pattern}; download them with `python data/cached_challenge_fineweb.py "
                                f"--variant sp<VOCAB>` or build the offline set with `python data/builtin_corpus.py`")
    return files


def load_val_tokens(pattern: str, seq_len: int, vocab_size: int | None = None) -> Tensor:
    """All val shards concatenated, truncated to ((N-1)//seq_len)*seq_len + 1 tokens (upstream rule: the tail
    partial sequence is dropped from every eval mode). Returns int64 tokens on CPU."""
    tokens = np.concatenate([load_shard(f, vocab_size) for f in shard_files(pattern)])
    usable = (tokens.size - 1) // seq_len * seq_len
    if usable <= 0:
        raise ValueError(f"val split {pattern} has {tokens.size} tokens, fewer than one sequence of {seq_len}+1")
    return torch.from_numpy(tokens[: usable + 1].astype(np.int64))


def build_byte_luts(sp, vocab_size: int) -> tuple[Tensor, Tensor, Tensor]:
    """Per-token byte tables from a SentencePiece model (STACK.md §0): base UTF-8 bytes without a leading '▁',
    whether the piece has a leading '▁', and whether it is a boundary (control/unknown/unused) token.
    Byte-fallback pieces count 1 byte. Sized max(sp vocab, vocab_size); ids past the model are boundaries."""
    if sp.piece_to_id("\u2581") == sp.unk_id():
        raise ValueError("tokenizer has no standalone '\u2581' piece: spaces would be counted as byte-fallback "
                         "bytes and bpb would be wrong (upstream issue #897)")
    n = max(sp.vocab_size(), vocab_size)
    base = np.zeros(n, dtype=np.int16)
    leading_space = np.zeros(n, dtype=np.bool_)
    boundary = np.ones(n, dtype=np.bool_)
    for i in range(sp.vocab_size()):
        if sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i):
            continue
        boundary[i] = False
        if sp.is_byte(i):
            base[i] = 1
            continue
        piece = sp.id_to_piece(i)
        if piece.startswith("\u2581"):
            leading_space[i] = True
            piece = piece[1:]
        base[i] = len(piece.encode("utf-8"))
    return torch.from_numpy(base), torch.from_numpy(leading_space), torch.from_numpy(boundary)


def target_bytes(prev: Tensor, target: Tensor, luts: tuple[Tensor, Tensor, Tensor]) -> Tensor:
    """UTF-8 bytes each target token accounts for: base bytes + its '▁' unless the previous token is a boundary."""
    base, leading_space, boundary = luts
    return base[target].to(torch.int64) + (leading_space[target] & ~boundary[prev]).to(torch.int64)


class ShuffledSequenceLoader:
    """Rank-disjoint shuffled training sequences over all train shards (after record P's loader, STACK.md §B.6).

    Each epoch every shard gets a random phase (drawn from SEED, so equal on all ranks) and is cut into windows
    of seq_len+1 tokens at phase + k*seq_len; rank r owns the windows with k % world_size == r and visits them in
    an order shuffled by (SEED, epoch, rank); the next window comes from a shard drawn with probability
    proportional to its remaining windows. Ranks never share a sequence within an epoch. Unlike upstream (seeded
    by rank only), SEED changes the data order too, so seeds vary data as well as init.
    """

    def __init__(self, files: list[str], seq_len: int, vocab_size: int, seed: int, rank: int = 0, world_size: int = 1):
        self.files, self.seq_len, self.vocab_size = files, seq_len, vocab_size
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.sizes = [read_shard_header(f) for f in files]
        self.tokens: list[np.ndarray | None] = [None] * len(files)  # memmaps, validated on first use
        self.epoch = 0
        self._start_epoch()

    def _start_epoch(self) -> None:
        shared = np.random.default_rng([self.seed, self.epoch])
        self.rng = np.random.default_rng([self.seed, self.epoch, 1 + self.rank])
        self.queues, self.cursor = [], []
        for n in self.sizes:
            max_phase = min(self.seq_len - 1, n - self.seq_len - 1)
            phase = int(shared.integers(0, max_phase + 1)) if max_phase > 0 else 0
            mine = np.arange(self.rank, max(0, (n - 1 - phase) // self.seq_len), self.world_size)
            self.rng.shuffle(mine)
            self.queues.append(phase + mine * self.seq_len)
            self.cursor.append(0)
        if not sum(len(q) for q in self.queues):
            raise ValueError(f"train shards hold no full sequence of {self.seq_len}+1 tokens for rank {self.rank}")

    def next_batch(self, batch_seqs: int) -> tuple[Tensor, Tensor]:
        """(x, y) int64 [batch_seqs, seq_len], y = x shifted by one token."""
        rows = []
        for _ in range(batch_seqs):
            left = np.array([len(q) - c for q, c in zip(self.queues, self.cursor)], dtype=np.float64)
            if left.sum() == 0:
                self.epoch += 1
                self._start_epoch()
                left = np.array([len(q) for q in self.queues], dtype=np.float64)
            i = int(self.rng.choice(len(left), p=left / left.sum()))
            start = int(self.queues[i][self.cursor[i]])
            self.cursor[i] += 1
            if self.tokens[i] is None:
                self.tokens[i] = load_shard(self.files[i], self.vocab_size, mmap=True)
            rows.append(np.asarray(self.tokens[i][start : start + self.seq_len + 1], dtype=np.int64))
        buf = torch.from_numpy(np.stack(rows))
        return buf[:, :-1], buf[:, 1:]


# -----------------------------------------------------------------------------
# MODEL: 11L x 512d GPT with XSA, partial RoPE, QK-gain, depth recurrence, parallel residuals, gated U-Net skips
# -----------------------------------------------------------------------------


def rms_norm(x: Tensor) -> Tensor:
    return F.rms_norm(x, (x.size(-1),))


def layer_schedule(num_layers: int, loop_start: int, loop_end: int, num_loops: int,
                   looping: bool) -> tuple[list[int], list[int]]:
    """Encoder and decoder layer lists. Looping repeats layers loop_start..loop_end num_loops extra times; the
    virtual sequence is split in half (depth recurrence: PR #1331/#1437). P: [0,1,2,3,4,5,3,4] / [5,3,4,5,6,...,10]."""
    seq = list(range(num_layers))
    if looping and num_loops > 0:
        span = list(range(loop_start, loop_end + 1))
        seq = seq[:loop_start] + span * (num_loops + 1) + seq[loop_end + 1 :]
    half = len(seq) // 2
    return seq[:half], seq[half:]


def rope_tables(seq_len: int, rope_dims: int, base: float) -> tuple[Tensor, Tensor]:
    """cos/sin [seq_len, rope_dims/2] with inv_freq_j = base^(-2j/rope_dims)."""
    inv_freq = 1.0 / base ** (torch.arange(0, rope_dims, 2, dtype=torch.float32) / rope_dims)
    freqs = torch.outer(torch.arange(seq_len, dtype=torch.float32), inv_freq)
    return freqs.cos(), freqs.sin()


def apply_partial_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate-half RoPE on the first 2*cos.size(-1) dims of each head (x: (B, T, H, D)); the rest pass through.
    Partial RoPE: PR #1019 lineage."""
    half = cos.size(-1)
    a, b, rest = x[..., :half], x[..., half : 2 * half], x[..., 2 * half :]
    c, s = cos[None, : x.size(1), None, :].to(x.dtype), sin[None, : x.size(1), None, :].to(x.dtype)
    return torch.cat((a * c + b * s, b * c - a * s, rest), dim=-1)


def xsa(y: Tensor, v: Tensor) -> Tensor:
    """Exclusive self-attention: remove from each head's output (B, T, H, D) its component along the unit value
    vector of its own token (v: (B, T, Hkv, D); head h reads KV group h // (H/Hkv))."""
    v_hat = F.normalize(v, dim=-1).repeat_interleave(y.size(2) // v.size(2), dim=2)
    return y - (y * v_hat).sum(-1, keepdim=True) * v_hat


def attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Causal GQA attention on (B, T, H, D) / (B, T, Hkv, D): FA3 on CUDA when importable, else SDPA."""
    if _fa3_func is not None and q.is_cuda:
        out = _fa3_func(q, k, v, causal=True)
        return out[0] if isinstance(out, tuple) else out  # some FA3 builds return (out, softmax_lse)
    y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True,
                                       enable_gqa=True)
    return y.transpose(1, 2)


class CausalSelfAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int, num_kv_heads: int, qk_gain_init: float, use_xsa: bool):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, dim // num_heads
        self.use_xsa = use_xsa
        self.c_q = nn.Linear(dim, dim, bias=False)
        self.c_k = nn.Linear(dim, num_kv_heads * self.head_dim, bias=False)
        self.c_v = nn.Linear(dim, num_kv_heads * self.head_dim, bias=False)
        self.proj = nn.Linear(dim, dim, bias=False)
        self.q_gain = nn.Parameter(torch.full((num_heads,), qk_gain_init))  # QK-gain (PR #1493 uses 5.25)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        B, T, _ = x.shape
        q = self.c_q(x).view(B, T, self.num_heads, self.head_dim)
        k = self.c_k(x).view(B, T, self.num_kv_heads, self.head_dim)
        v = self.c_v(x).view(B, T, self.num_kv_heads, self.head_dim)
        q = apply_partial_rope(rms_norm(q), cos, sin) * self.q_gain.to(q.dtype)[None, None, :, None]
        k = apply_partial_rope(rms_norm(k), cos, sin)
        y = attention(q, k, v)  # (B, T, H, D)
        if self.use_xsa:  # XSA: PR #1019 lineage
            y = xsa(y, v)
        return self.proj(y.reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int, leaky_slope: float):
        super().__init__()
        self.fc = nn.Linear(dim, hidden, bias=False)
        self.proj = nn.Linear(hidden, dim, bias=False)
        self.leaky_slope = leaky_slope

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(F.leaky_relu(self.fc(x), self.leaky_slope).square())


class Block(nn.Module):
    def __init__(self, cfg: Config, layer_idx: int):
        super().__init__()
        dim = cfg.model_dim
        self.attn = CausalSelfAttention(dim, cfg.num_heads, cfg.num_kv_heads, cfg.qk_gain_init,
                                        use_xsa=layer_idx >= cfg.num_layers - cfg.xsa_last_n)
        self.mlp = MLP(dim, int(cfg.mlp_mult * dim), cfg.mlp_leaky_slope)
        self.attn_scale = nn.Parameter(torch.ones(dim))
        self.mlp_scale = nn.Parameter(torch.ones(dim))
        self.resid_mix = nn.Parameter(torch.stack((torch.ones(dim), torch.zeros(dim))))
        self.norm_scale = 1.0 / math.sqrt(layer_idx + 1) if cfg.ln_scale else 1.0  # physical index, kept when looped
        self.parallel = layer_idx >= cfg.parallel_residual_start  # parallel residuals: PR #1204, #1412

    def forward(self, x: Tensor, x0: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        mix = self.resid_mix.to(x.dtype)
        x = mix[0] * x + mix[1] * x0
        h = rms_norm(x) * self.norm_scale
        if self.parallel:
            return x + self.attn_scale.to(x.dtype) * self.attn(h, cos, sin) + self.mlp_scale.to(x.dtype) * self.mlp(h)
        x = x + self.attn_scale.to(x.dtype) * self.attn(h, cos, sin)
        return x + self.mlp_scale.to(x.dtype) * self.mlp(rms_norm(x) * self.norm_scale)


class GPT(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.model_dim)  # tied with the output head
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_layers))
        enc, dec = layer_schedule(cfg.num_layers, cfg.loop_start, cfg.loop_end, cfg.num_loops, looping=True)
        self.num_skips = min(len(enc), len(dec))  # sized for the looped lists, also used unlooped
        self.skip_weights = nn.Parameter(torch.ones(self.num_skips, cfg.model_dim))
        self.skip_gates = nn.Parameter(torch.zeros(self.num_skips, cfg.model_dim)) if cfg.skip_gates_enabled else None
        cos, sin = rope_tables(max(cfg.train_seq_len, cfg.eval_seq_len), cfg.rope_dims, cfg.rope_base)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.looping = False  # depth recurrence switches on during training (Config.enable_looping_at)
        self._init_weights()

    def _init_weights(self) -> None:
        nn.init.normal_(self.tok_emb.weight, std=self.cfg.tied_embed_init_std)
        for name, mod in self.named_modules():
            if isinstance(mod, nn.Linear):
                if name.endswith(".proj"):  # attention and MLP output projections start at zero
                    nn.init.zeros_(mod.weight)
                elif min(mod.weight.shape) >= 64:
                    nn.init.orthogonal_(mod.weight)

    def forward_hidden(self, ids: Tensor) -> Tensor:
        """Final normed hidden states (B, T, D): the input of the tied output head."""
        cfg = self.cfg
        enc, dec = layer_schedule(cfg.num_layers, cfg.loop_start, cfg.loop_end, cfg.num_loops, self.looping)
        cos, sin = self.rope_cos, self.rope_sin
        x = rms_norm(self.tok_emb(ids))
        x0, skips = x, []
        for i in enc:
            x = self.blocks[i](x, x0, cos, sin)
            skips.append(x)
        for j, i in enumerate(dec):
            if j < self.num_skips and skips:
                s = self.skip_weights[j].to(x.dtype) * skips.pop()
                if self.skip_gates is None:
                    x = x + s
                else:  # sigmoid skip gates: lerp(s, x, g); init 0 -> 50/50
                    x = torch.lerp(s, x, torch.sigmoid(self.skip_gates[j]).to(x.dtype))
            x = self.blocks[i](x, x0, cos, sin)
        return rms_norm(x)

    def forward_logits(self, ids: Tensor) -> Tensor:
        logits = F.linear(self.forward_hidden(ids), self.tok_emb.weight)
        c = self.cfg.logit_softcap
        return c * torch.tanh(logits / c)

    def forward(self, ids: Tensor, targets: Tensor) -> Tensor:
        logits = self.forward_logits(ids)
        return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())


def param_roles(model: GPT) -> dict[str, str]:
    """Each parameter's optimizer role, assigned once and explicitly: 'muon' for block matrices, 'embed' for the
    tied embedding, 'scalar' for everything else (gains, scales, mixes, skip weights/gates)."""
    roles = {name: "scalar" for name, _ in model.named_parameters()}
    roles["tok_emb.weight"] = "embed"
    for name, mod in model.blocks.named_modules():
        if isinstance(mod, nn.Linear):
            roles[f"blocks.{name}.weight"] = "muon"
    return roles


# -----------------------------------------------------------------------------
# OPTIMIZERS: MuonEq-R for block matrices (rank-sharded), AdamW for the embedding and scalars
# -----------------------------------------------------------------------------

NS_COEFFS = (3.4445, -4.7750, 2.0315)  # classic quintic Newton-Schulz coefficients (Keller Jordan's Muon)


def zeropower_via_newtonschulz5(G: Tensor, steps: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """Approximately orthogonalize G: returns about U S' V^T with S'_ii ~ Uniform(0.5, 1.5) rather than exactly 1,
    which is what the quintic coefficients trade for speed. Runs in `dtype` (bf16 on GPU, fp32 on CPU)."""
    a, b, c = NS_COEFFS
    X = G.to(dtype)
    X = X / (X.norm() + 1e-7)
    transposed = X.size(0) > X.size(1)
    if transposed:
        X = X.T
    for _ in range(steps):
        A = X @ X.T
        X = a * X + (b * A + c * (A @ A)) @ X
    return X.T if transposed else X


def muon_update(grad: Tensor, buf: Tensor, momentum: float, ns_steps: int, row_normalize: bool,
                dtype: torch.dtype = torch.float32) -> Tensor:
    """One Muon direction: Nesterov momentum (updates buf in place), MuonEq-R row normalization (PR #1394),
    Newton-Schulz, and the sqrt(max(1, rows/cols)) shape scale."""
    buf.mul_(momentum).add_(grad)
    u = grad.add(buf, alpha=momentum)
    if row_normalize:
        u = u / u.float().norm(dim=1, keepdim=True).clamp_min(1e-7).to(u.dtype)
    u = zeropower_via_newtonschulz5(u, ns_steps, dtype)
    return u * max(1.0, grad.size(0) / grad.size(1)) ** 0.5


class Muon(torch.optim.Optimizer):
    """Muon over 2-D matrices. Matrix i is orthogonalized by rank i % world_size into a flat buffer (zeros
    elsewhere); one all-reduce SUM hands every rank every update; each rank applies decoupled weight decay and
    the update to all matrices. Momentum buffers live in self.state on the owning rank, so loading a saved
    optimizer state restores (or clears) them too."""

    def __init__(self, params: list[Tensor], lr: float, momentum: float, ns_steps: int, weight_decay: float,
                 row_normalize: bool, rank: int = 0, world_size: int = 1, dtype: torch.dtype = torch.float32):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay))
        self.ns_steps, self.row_normalize, self.dtype = ns_steps, row_normalize, dtype
        self.rank, self.world_size = rank, world_size

    @torch.no_grad()
    def step(self) -> None:
        for group in self.param_groups:
            params = group["params"]
            flat = torch.zeros(sum(p.numel() for p in params), dtype=self.dtype, device=params[0].device)
            offset = 0
            for i, p in enumerate(params):
                if i % self.world_size == self.rank and p.grad is not None:
                    buf = self.state[p].setdefault("momentum_buffer", torch.zeros_like(p.grad))
                    u = muon_update(p.grad, buf, group["momentum"], self.ns_steps, self.row_normalize, self.dtype)
                    flat[offset : offset + p.numel()] = u.flatten()
                offset += p.numel()
            all_reduce_(flat)
            offset = 0
            for p in params:
                p.mul_(1 - group["lr"] * group["weight_decay"])
                p.add_(flat[offset : offset + p.numel()].view_as(p).to(p.dtype), alpha=-group["lr"])
                offset += p.numel()


class Optimizers:
    """The three optimizers of the record with their base learning rates; one schedule drives all of them."""

    def __init__(self, model: GPT, cfg: Config, rank: int = 0, world_size: int = 1, ns_dtype: torch.dtype = torch.float32):
        roles, named = param_roles(model), dict(model.named_parameters())
        by_role = {r: [named[n] for n, role in roles.items() if role == r] for r in ("muon", "embed", "scalar")}
        betas = (cfg.beta1, cfg.beta2)
        self.muon = Muon(by_role["muon"], cfg.matrix_lr, cfg.muon_momentum, cfg.muon_backend_steps, cfg.muon_wd,
                         cfg.muon_row_normalize, rank, world_size, ns_dtype)
        self.embed = torch.optim.AdamW(by_role["embed"], lr=cfg.tied_embed_lr, betas=betas, eps=cfg.adam_eps,
                                       weight_decay=cfg.embed_wd)
        self.scalar = torch.optim.AdamW(by_role["scalar"], lr=cfg.scalar_lr, betas=betas, eps=cfg.adam_eps,
                                        weight_decay=cfg.adam_wd)
        self.all = [self.muon, self.embed, self.scalar]
        self.base_lrs = [cfg.matrix_lr, cfg.tied_embed_lr, cfg.scalar_lr]

    def set_schedule(self, lr_mul: float, muon_momentum: float) -> None:
        for opt, base in zip(self.all, self.base_lrs):
            for group in opt.param_groups:
                group["lr"] = base * lr_mul
        for group in self.muon.param_groups:
            group["momentum"] = muon_momentum

    def step(self) -> None:
        for opt in self.all:
            opt.step()
            opt.zero_grad(set_to_none=True)

    def state_dict(self) -> list[dict]:
        return [copy.deepcopy(opt.state_dict()) for opt in self.all]

    def load_state_dict(self, states: list[dict]) -> None:
        for opt, state in zip(self.all, states):
            opt.load_state_dict(copy.deepcopy(state))


def lr_multiplier(frac: float, warmdown_frac: float, min_lr: float) -> float:
    """Flat at 1, then linear warmdown over the last warmdown_frac of training to min_lr (no LR warmup)."""
    if frac < 1.0 - warmdown_frac:
        return 1.0
    return max((1.0 - frac) / warmdown_frac, min_lr)


def muon_momentum_at(step: int, start: float, end: float, warmup_steps: int) -> float:
    k = min(step / warmup_steps, 1.0) if warmup_steps > 0 else 1.0
    return (1 - k) * start + k * end


@torch.no_grad()
def ema_update_(ema: list[Tensor], params: list[Tensor], decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * params, in fp32."""
    torch._foreach_lerp_(ema, [p.float() for p in params], 1.0 - decay)


# -----------------------------------------------------------------------------
# EVALUATION: one window scorer under plain, sliding-window and score-first TTT evaluation
#
# Targets are indexed 0..N-1 (target j is tokens[j+1], predicted from tokens[..j]). A window starting at s reads
# tokens[s : s+seq_len] and scores targets s+first .. s+wlen-1, where first = 0 for s = 0 and seq_len - stride
# otherwise. With stride = seq_len this is the plain non-overlapping eval.
# -----------------------------------------------------------------------------


def window_starts(num_targets: int, seq_len: int, stride: int) -> np.ndarray:
    """Window starts 0, stride, 2*stride, ... while start + (seq_len - stride) < num_targets (STACK.md §D.2):
    every target is scored exactly once, each after the first seq_len with >= seq_len - stride tokens of context."""
    ctx = seq_len - stride
    return np.arange(0, max(1, num_targets - ctx), stride, dtype=np.int64)


def bpb_from_sums(sums: Tensor) -> tuple[float, float]:
    """(val_loss in nats/token, val_bpb) from float64 sums (nll, targets, bytes)."""
    nll, count, nbytes = (float(v) for v in sums)
    return nll / count, nll / math.log(2) / nbytes


@torch.no_grad()
def score_windows(logits_fn: Callable[[Tensor], Tensor], tokens: Tensor, starts: np.ndarray, seq_len: int,
                  stride: int, luts: tuple[Tensor, Tensor, Tensor], batch_windows: int, device: torch.device,
                  amp: Callable, nll_out: Tensor | None = None, hits_out: Tensor | None = None) -> Tensor:
    """float64 sums (nll, targets, bytes) over the targets these windows score. Short windows are padded to seq_len
    by repeating the last token (causal attention: padding after a position cannot change it). If given,
    nll_out[j] receives target j's nll and hits_out[j] counts how often target j was scored (check_legality.py)."""
    n = tokens.numel() - 1
    ctx = seq_len - stride
    offsets = torch.arange(seq_len)
    sums = torch.zeros(3, dtype=torch.float64, device=device)
    luts = tuple(t.to(device) for t in luts)
    for b in range(0, len(starts), batch_windows):
        s = torch.from_numpy(starts[b : b + batch_windows])[:, None]
        pos = s + offsets  # (W, seq_len) target index of each position
        mask = (pos < n) & (pos >= torch.where(s == 0, 0, s + ctx))
        x = tokens[pos.clamp(max=n - 1)].to(device)
        y = tokens[(pos + 1).clamp(max=n)].to(device)
        mask = mask.to(device)
        with amp():
            logits = logits_fn(x)
        nll = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="none").view_as(y).double()
        nll = torch.where(mask, nll, 0.0)
        sums += torch.stack((nll.sum(), mask.sum().double(), (target_bytes(x, y, luts) * mask).sum().double()))
        if nll_out is not None:
            nll_out[pos[mask.cpu()]] = nll[mask].cpu()
        if hits_out is not None:
            hits_out.index_add_(0, pos[mask.cpu()], torch.ones(int(mask.sum()), dtype=hits_out.dtype))
    return sums


def evaluate(logits_fn: Callable[[Tensor], Tensor], tokens: Tensor, seq_len: int, stride: int,
             luts: tuple[Tensor, Tensor, Tensor], batch_windows: int, device: torch.device, amp: Callable,
             rank: int = 0, world_size: int = 1) -> tuple[float, float]:
    """Plain (stride = seq_len) or sliding-window eval; windows split contiguously over ranks, sums all-reduced."""
    starts = window_starts(tokens.numel() - 1, seq_len, stride)
    mine = starts[len(starts) * rank // world_size : len(starts) * (rank + 1) // world_size]
    sums = all_reduce_(score_windows(logits_fn, tokens, mine, seq_len, stride, luts, batch_windows, device, amp))
    n = tokens.numel() - 1
    if int(sums[1]) != n:
        raise RuntimeError(f"eval scored {int(sums[1])} targets, expected each of {n} exactly once")
    return bpb_from_sums(sums)


def ttt_chunks(num_targets: int, seq_len: int, stride: int, chunk_tokens: int) -> list[np.ndarray]:
    """Sliding windows grouped by chunk: chunk c's windows score exactly targets c*chunk .. (c+1)*chunk - 1
    (window starts and their first scored position are multiples of stride, which divides chunk_tokens)."""
    starts = window_starts(num_targets, seq_len, stride)
    num_chunks = -(-num_targets // chunk_tokens)
    first = np.where(starts == 0, 0, seq_len - stride)
    chunk_of = np.minimum((starts + first) // chunk_tokens, num_chunks - 1)
    return [starts[chunk_of == c] for c in range(num_chunks)]


def adapt_on_chunk(model: GPT, opt: torch.optim.Optimizer, tokens: Tensor, chunk: int, chunk_tokens: int,
                   seq_len: int, epochs: int, device: torch.device, amp: Callable, rank: int = 0,
                   world_size: int = 1, batch_seqs: int = 32) -> None:
    """SGD on chunk `chunk`'s tokens only: sequences tokens[c*C + k*L ...], targets shifted by one, so the last
    target is token (c+1)*C, which the chunk's windows have already scored. Rank r takes its share of the
    sequences; gradients are averaged over ranks and clipped to norm 1 before each step."""
    n_seq = chunk_tokens // seq_len
    lo, hi = n_seq * rank // world_size, n_seq * (rank + 1) // world_size
    idx = chunk * chunk_tokens + torch.arange(lo * seq_len, hi * seq_len).view(-1, seq_len)
    x, y = tokens[idx].to(device), tokens[idx + 1].to(device)
    steps = math.ceil(math.ceil(n_seq / world_size) / batch_seqs)  # the same number of steps on every rank
    params = [p for p in model.parameters() if p.requires_grad]
    model.train()
    for _ in range(epochs):
        for i in range(steps):
            xb, yb = x[i * batch_seqs : (i + 1) * batch_seqs], y[i * batch_seqs : (i + 1) * batch_seqs]
            if len(xb):
                with amp():
                    model(xb, yb).backward()
            for p in params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                all_reduce_(p.grad, dist.ReduceOp.AVG)
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
    model.eval()


def eval_ttt(model: GPT, tokens: Tensor, cfg: Config, luts: tuple[Tensor, Tensor, Tensor], batch_windows: int,
             device: torch.device, amp: Callable, logits_fn: Callable[[Tensor], Tensor] | None = None,
             rank: int = 0, world_size: int = 1, nll_out: Tensor | None = None,
             hits_out: Tensor | None = None) -> tuple[float, float]:
    """Legal score-first TTT (record P, STACK.md §D.3; framework PR #549, #1413). For each chunk in order:
    score it under no_grad with weights that have only trained on earlier chunks, add it to the totals, and only
    then adapt on it. The last chunk is never trained on. Issue #1017 conditions: causal, normalized, score
    before update, single pass."""
    n, L, S, C = tokens.numel() - 1, cfg.eval_seq_len, cfg.eval_stride, cfg.ttt_chunk_tokens
    chunks = ttt_chunks(n, L, S, C)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.ttt_lr, momentum=cfg.ttt_momentum)
    logits_fn = logits_fn or model.forward_logits
    sums = torch.zeros(3, dtype=torch.float64, device=device)
    model.eval()
    for c, starts in enumerate(chunks):
        mine = starts[len(starts) * rank // world_size : len(starts) * (rank + 1) // world_size]
        sums += score_windows(logits_fn, tokens, mine, L, S, luts, batch_windows, device, amp, nll_out, hits_out)  # score
        if c < len(chunks) - 1:  # then adapt, on tokens just scored
            for group in opt.param_groups:
                group["lr"] = cfg.ttt_lr * 0.5 * (1 + math.cos(math.pi * c / (len(chunks) - 1)))
            adapt_on_chunk(model, opt, tokens, c, C, L, cfg.ttt_epochs, device, amp, rank, world_size)
    all_reduce_(sums)
    if int(sums[1]) != n:
        raise RuntimeError(f"TTT scored {int(sums[1])} targets, expected each of {n} exactly once")
    return bpb_from_sums(sums)


# -----------------------------------------------------------------------------
# TRAINING
# -----------------------------------------------------------------------------


@dataclass
class Runtime:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    amp: Callable  # a context-manager factory: bf16 autocast on CUDA, nothing on CPU (fp32 is ~3x faster there)
    ns_dtype: torch.dtype  # Newton-Schulz / Muon exchange dtype
    is_master: bool = field(init=False)

    def __post_init__(self) -> None:
        self.is_master = self.rank == 0


def setup_runtime() -> Runtime:
    """The one place that looks at the device: CUDA + NCCL + bf16, or CPU + gloo + fp32. Reads torchrun's vars."""
    import contextlib
    world_size, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        amp, ns_dtype, backend = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)), torch.bfloat16, "nccl"
    else:
        device = torch.device("cpu")
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))
        amp, ns_dtype, backend = contextlib.nullcontext, torch.float32, "gloo"
    if world_size > 1:
        dist.init_process_group(backend, device_id=device if device.type == "cuda" else None)
    return Runtime(rank, world_size, local_rank, device, amp, ns_dtype)


def grad_accum_steps(cfg: Config, world_size: int) -> int:
    """Micro-steps per optimizer step: GRAD_ACCUM_STEPS, else 8 // world_size (1 for 16+ ranks), so the global
    batch is the same on any world size that divides it."""
    accum = cfg.grad_accum_steps or (8 // world_size if 8 % world_size == 0 else 1)
    per_rank = cfg.train_batch_tokens / (world_size * accum)
    if per_rank != int(per_rank) or int(per_rank) % cfg.train_seq_len:
        raise ValueError(f"TRAIN_BATCH_TOKENS={cfg.train_batch_tokens} cannot be split over world_size={world_size} x "
                         f"grad_accum={accum} into sequences of TRAIN_SEQ_LEN={cfg.train_seq_len}")
    return accum


def train_step(model: nn.Module, opts: Optimizers, batches: list[tuple[Tensor, Tensor]], grad_clip: float,
               amp: Callable) -> Tensor:
    """One optimizer step over micro-batches (grads averaged over micro-batches, and over ranks by DDP)."""
    ddp = isinstance(model, nn.parallel.DistributedDataParallel)
    total = torch.zeros((), device=batches[0][0].device)
    for i, (x, y) in enumerate(batches):
        if ddp:
            model.require_backward_grad_sync = i == len(batches) - 1
        with amp():
            loss = model(x, y)
        (loss / len(batches)).backward()
        total += loss.detach()
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_([p for g in opts.all for grp in g.param_groups for p in grp["params"]], grad_clip)
    opts.step()
    return total / len(batches)


@torch.no_grad()
def collect_hessians(model: GPT, batches: Iterator[Tensor], min_numel: int, amp: Callable) -> tuple[dict[str, Tensor], int]:
    """Sum of X^T X per quantized matrix over calibration batches: forward hooks on every block Linear with more
    than min_numel weights, and the final hidden states for the tied embedding (GPTQ'd as the output head)."""
    hessians: dict[str, Tensor] = {}

    def hook(name: str) -> Callable:
        def fn(mod: nn.Module, inputs: tuple[Tensor, ...], out: Tensor) -> None:
            hessians[name] = accumulate_hessian(hessians.get(name), inputs[0])
        return fn

    handles = [mod.register_forward_hook(hook(f"{name}.weight")) for name, mod in model.named_modules()
               if isinstance(mod, nn.Linear) and mod.weight.numel() > min_numel]
    model.eval()
    count = 0
    try:
        for x in batches:
            with amp():
                h = model.forward_hidden(x)
            if model.tok_emb.weight.numel() > min_numel:
                hessians["tok_emb.weight"] = accumulate_hessian(hessians.get("tok_emb.weight"), h)
            count += 1
    finally:
        for handle in handles:
            handle.remove()
    return hessians, count


def compile_warmup(model: GPT, opts: Optimizers, step_fn: Callable[[ShuffledSequenceLoader], Tensor],
                   make_loader: Callable[[], ShuffledSequenceLoader], cfg: Config, log: Callable[[str], None]) -> None:
    """Compile warm-up (PR #1394 lineage): WARMUP_STEPS real steps with looping off, then as many with looping on,
    then weights, optimizer state (Muon momentum buffers included: an upstream bug left them dirty) and looping
    are put back exactly as they were, so the timed run starts from the initial state. The caller makes a fresh
    loader afterwards."""
    if cfg.warmup_steps <= 0:
        return
    initial_model = {k: v.detach().clone() for k, v in model.state_dict().items()}
    initial_opts = opts.state_dict()
    loader = make_loader()
    opts.set_schedule(1.0, cfg.muon_momentum_warmup_start)
    for label, looping in (("warmup_step", False), ("loop_warmup_step", True))[: 2 if cfg.num_loops > 0 else 1]:
        model.looping = looping
        if looping:
            enc, dec = layer_schedule(cfg.num_layers, cfg.loop_start, cfg.loop_end, cfg.num_loops, True)
            log(f"loop_warmup:enabled encoder:{enc} decoder:{dec}")
        for k in range(1, cfg.warmup_steps + 1):
            step_fn(loader)
            if k <= 6 or k % 10 == 0 or k == cfg.warmup_steps:
                log(log_line("warmup", label=label, k=k, n=cfg.warmup_steps))
    model.looping = False
    with torch.no_grad():
        model.load_state_dict(initial_model)
    opts.load_state_dict(initial_opts)


def load_quantized_model(path: str | Path, cfg: Config, device: torch.device) -> GPT:
    """A fresh model with the artifact's dequantized weights, looping on, in eval mode (what every score uses)."""
    model = GPT(cfg).to(device)
    model.load_state_dict({k: v.to(device) for k, v in dequantize(load_artifact(path)).items()}, strict=True)
    model.looping = cfg.num_loops > 0
    return model.eval()


class Ledger:
    """Time per phase and the budget it counts toward: 'train' (600 s), 'eval' (600 s) or 'none'."""

    def __init__(self) -> None:
        self.rows: list[tuple[str, float, str]] = []

    def add(self, phase: str, seconds: float, budget: str) -> None:
        self.rows.append((phase, seconds, budget))

    def total(self, budget: str) -> float:
        return sum(s for _, s, b in self.rows if b == budget)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def nvidia_smi() -> str:
    try:
        return subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.SubprocessError):
        return "nvidia-smi: not available (CPU run)"


def load_tokenizer(path: Path, vocab_size: int):
    import sentencepiece as spm
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer {path} not found; download it with `python data/cached_challenge_fineweb.py "
                                f"--variant sp{vocab_size}` or build the offline set with `python data/builtin_corpus.py`")
    sp = spm.SentencePieceProcessor(model_file=str(path))
    if sp.vocab_size() != vocab_size:
        raise ValueError(f"tokenizer {path} has vocab {sp.vocab_size()} but VOCAB_SIZE={vocab_size}")
    return sp


def code_sources() -> dict[str, bytes]:
    """Every code file this run executes, by repo-relative name: train_gpt.py, plus quant/*.py when quant/ is
    imported as a package (a repo run). In a packed record quant/ is inlined, so the record file is the only one.
    Their total is the run's code bytes."""
    files = {"train_gpt.py": Path(__file__).read_bytes()}
    if quantize_state_dict.__module__.startswith("quant."):
        quant_dir = Path(sys.modules["quant"].__file__).parent
        files.update({f"quant/{p.name}": p.read_bytes() for p in sorted(quant_dir.glob("*.py")) if p.name != "__main__.py"})
    return files


def main() -> None:
    cfg = Config.from_env()
    rt = setup_runtime()
    try:
        run(cfg, rt)
    finally:
        if dist_ready():
            dist.destroy_process_group()


def run(cfg: Config, rt: Runtime) -> dict:
    out_dir = Path(cfg.out_dir)
    run_id = cfg.run_id or str(uuid.uuid4())
    log = Logger(out_dir / "logs" / f"{run_id}.txt" if rt.is_master else None)
    sources = code_sources()
    code = b"".join(sources.values())
    for name, body in sources.items():  # byte-exact framing: tools/parse_log.py reads the sources back
        log(log_line("source_file", name=name, n=len(body)) + f"\n{body.decode()}", console=False)
    log("=" * 100, console=False)
    log(f"Running Python {sys.version}", console=False)
    log(f"Running PyTorch {torch.__version__}", console=False)
    log(nvidia_smi(), console=False)
    log("=" * 100, console=False)
    ws, dev, amp = rt.world_size, rt.device, rt.amp
    accum = grad_accum_steps(cfg, ws)
    use_compile = cfg.compile == "1" or (cfg.compile == "auto" and dev.type == "cuda")
    log("Hyperparameters:")
    derived = dict(dataset_dir=cfg.dataset_dir, tokenizer_file=cfg.tokenizer_file, world_size=ws, rank=rt.rank,
                   grad_accum_effective=accum, device=dev, run_id=run_id)
    for key, value in sorted({**dataclasses.asdict(cfg), **derived}.items()):
        log(f"  {key}: {value}")

    # data
    sp = load_tokenizer(cfg.tokenizer_file, cfg.vocab_size)
    luts = build_byte_luts(sp, cfg.vocab_size)
    train_files = shard_files(str(cfg.dataset_dir / "fineweb_train_*.bin"))
    val_tokens = load_val_tokens(str(cfg.dataset_dir / "fineweb_val_*.bin"), cfg.eval_seq_len, cfg.vocab_size)
    micro_seqs = cfg.train_batch_tokens // (ws * accum * cfg.train_seq_len)
    eval_windows = max(1, cfg.val_batch_tokens // (ws * accum * cfg.eval_seq_len))

    def make_loader() -> ShuffledSequenceLoader:
        return ShuffledSequenceLoader(train_files, cfg.train_seq_len, cfg.vocab_size, cfg.seed, rt.rank, ws)

    log(log_line("train_shards", n=len(train_files)))
    log(log_line("val_tokens", n=val_tokens.numel() - 1))

    # model and optimizers
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    model = GPT(cfg).to(dev)
    log(log_line("model_params", n=sum(p.numel() for p in model.parameters())))
    log(f"world_size:{ws} grad_accum_steps:{accum} device:{dev.type} cpus:{os.cpu_count()} "
        f"attention:{'fa3' if _fa3_func is not None and dev.type == 'cuda' else 'sdpa'} compile:{use_compile}")
    train_model: nn.Module = torch.compile(model, dynamic=False, fullgraph=True) if use_compile else model
    logits_fn = torch.compile(model.forward_logits, dynamic=False, fullgraph=True) if use_compile else model.forward_logits
    if ws > 1:
        torch._dynamo.config.optimize_ddp = False  # as record P: DDP around a compiled module
        train_model = nn.parallel.DistributedDataParallel(
            train_model, device_ids=[rt.local_rank] if dev.type == "cuda" else None, forward_sync_buffers=False)
    opts = Optimizers(model, cfg, rt.rank, ws, rt.ns_dtype)
    capped = cfg.max_wallclock_seconds > 0
    cap_ms = 1000.0 * max(0.0, cfg.max_wallclock_seconds - cfg.gptq_reserve_seconds) if capped else 0.0
    if capped:
        log(log_line("gptq_reserve", seconds=cfg.gptq_reserve_seconds, ms=cap_ms))
    ledger = Ledger()

    def step_on(loader: ShuffledSequenceLoader) -> Tensor:
        batches = [tuple(t.to(dev, non_blocking=True) for t in loader.next_batch(micro_seqs)) for _ in range(accum)]
        return train_step(train_model, opts, batches, cfg.grad_clip_norm, amp)

    def encoder_decoder() -> str:
        enc, dec = layer_schedule(cfg.num_layers, cfg.loop_start, cfg.loop_end, cfg.num_loops, model.looping)
        return f"encoder:{enc} decoder:{dec}"

    t0 = time.perf_counter()
    compile_warmup(model, opts, step_on, make_loader, cfg, log)
    sync(dev)
    ledger.add("compile_warmup", time.perf_counter() - t0, "none")
    loader = make_loader()
    ema = [p.detach().float().clone() for p in model.parameters()]

    def plain_eval() -> tuple[float, float]:
        return evaluate(logits_fn, val_tokens, cfg.eval_seq_len, cfg.eval_seq_len, luts, eval_windows, dev, amp, rt.rank, ws)

    train_ms, step, stop_after, looping_step = 0.0, 0, None, None
    sync(dev)
    t_start = time.perf_counter()
    while True:
        last = step == cfg.iterations or step == stop_after
        if last or (cfg.val_loss_every > 0 and step % cfg.val_loss_every == 0):
            sync(dev)
            train_ms += 1000 * (time.perf_counter() - t_start)
            vl, vb = plain_eval()
            log(log_line("val", step=step, iterations=cfg.iterations, val_loss=vl, val_bpb=vb))
            sync(dev)
            t_start = time.perf_counter()
        if last:
            if stop_after is not None and step < cfg.iterations:
                log(log_line("stop", ms=train_ms, step=step, iterations=cfg.iterations))
            break
        elapsed_ms = train_ms + 1000 * (time.perf_counter() - t_start)
        frac = elapsed_ms / cap_ms if cap_ms > 0 else step / cfg.iterations
        if cfg.num_loops > 0 and not model.looping and frac >= cfg.enable_looping_at:
            model.looping, looping_step = True, step
            log(f"layer_loop:enabled step:{step} frac:{frac:.3f} {encoder_decoder()}")
        opts.set_schedule(lr_multiplier(frac, cfg.warmdown_frac, cfg.min_lr),
                          muon_momentum_at(step, cfg.muon_momentum_warmup_start, cfg.muon_momentum,
                                           cfg.muon_momentum_warmup_steps))
        loss = step_on(loader)
        ema_update_(ema, list(model.parameters()), cfg.ema_decay)
        step += 1
        elapsed_ms = train_ms + 1000 * (time.perf_counter() - t_start)
        flags = all_reduce_(torch.stack(((~torch.isfinite(loss)).float(),
                                         torch.tensor(float(cap_ms > 0 and elapsed_ms >= cap_ms), device=dev))),
                            dist.ReduceOp.MAX)
        if flags[0] > 0:
            log(f"stopping: non-finite train loss at step {step}")
            raise SystemExit(1)
        if step <= 5 or step % cfg.train_log_every == 0:
            tok_s = step * cfg.train_batch_tokens / (elapsed_ms / 1000)
            log(f"{step}/{cfg.iterations} train_loss: {loss.item():.4f} "
                f"train_time: {elapsed_ms / 60000:.1f}m tok/s: {tok_s:.0f}")
        if flags[1] > 0 and stop_after is None:
            stop_after = step
    ledger.add("train_loop", train_ms / 1000, "train")
    if dev.type == "cuda":
        log(f"peak memory allocated: {torch.cuda.max_memory_allocated() // 2**20} MiB "
            f"reserved: {torch.cuda.max_memory_reserved() // 2**20} MiB")
    log("ema:applying EMA weights")
    with torch.no_grad():
        for p, e in zip(model.parameters(), ema):
            p.copy_(e.to(p.dtype))
    model.looping = cfg.num_loops > 0  # the final model always runs looped
    results: dict[str, dict[str, float]] = {}

    def timed_eval(label: str, budget: str, fn: Callable[[], tuple[float, float]]) -> None:
        sync(dev)
        t = time.perf_counter()
        vl, vb = fn()
        sync(dev)
        dt = time.perf_counter() - t
        ledger.add(label.replace("-", "_").replace(" ", "_"), dt, budget)
        results[label] = dict(val_loss=vl, val_bpb=vb, eval_time_ms=1000 * dt)
        log(log_line("eval", label=label, val_loss=vl, val_bpb=vb, ms=1000 * dt))

    timed_eval("pre-quantization post-ema", "none", plain_eval)

    # serialize: float checkpoint (not counted), Hessians inside the train budget, GPTQ, artifact written atomically
    model_path, artifact_path = out_dir / "final_model.pt", out_dir / "final_model.int6.ptz"
    if rt.is_master:
        torch.save(model.state_dict(), model_path)
        log(log_line("serialized_raw", n=model_path.stat().st_size))
        log(log_line("code_size", n=len(code)))
    log("GPTQ:collecting Hessians from calibration data...")
    sync(dev)
    t = time.perf_counter()
    calib = make_loader()
    deadline = t + cfg.max_wallclock_seconds - train_ms / 1000 if capped else math.inf  # 600 s includes calibration

    def calibration_batches() -> Iterator[Tensor]:
        for i in range(cfg.gptq_calibration_batches):
            now = time.perf_counter()
            if i > 0 and now + (now - t) / i > deadline:  # the next batch would end past the train budget
                return
            yield calib.next_batch(micro_seqs)[0].to(dev)

    hessians, count = collect_hessians(model, calibration_batches(), cfg.passthrough_numel, amp)
    total = int(all_reduce_(torch.tensor(float(count), device=dev)))
    for name in sorted(hessians):  # improvement on upstream: calibrate on every rank's data, not rank 0's only
        hessians[name] = all_reduce_(hessians[name]) / total
    sync(dev)
    ledger.add("gptq_hessians", time.perf_counter() - t, "train")
    if total < cfg.gptq_calibration_batches * ws:
        log(f"GPTQ:calibration stopped at {total}/{cfg.gptq_calibration_batches * ws} batches to end inside the "
            f"{cfg.max_wallclock_seconds:g}s train budget")
    log(log_line("gptq_collected", n=len(hessians), seconds=time.perf_counter() - t))
    t = time.perf_counter()
    if rt.is_master:
        qtensors = quantize_state_dict(
            {k: v.detach() for k, v in model.state_dict().items()}, hessians,  # GPTQ runs where the weights are
            matrix_bits=cfg.matrix_bits, matrix_clip_sigmas=cfg.matrix_clip_sigmas, embed_bits=cfg.embed_bits,
            embed_clip_sigmas=cfg.embed_clip_sigmas, passthrough_numel=cfg.passthrough_numel)
        save_artifact(artifact_path, encode_artifact(qtensors, codec=cfg.compressor))
        model_bytes = artifact_path.stat().st_size
        log("Quantized weights:")
        for line in describe(qtensors):
            log(f"  {line}")
        log(log_line("serialized", codec=cfg.compressor, n=model_bytes))
        log(log_line("total_size", codec=cfg.compressor, n=model_bytes + len(code)))
        log(log_line("bytes", part="code", n=len(code)))
        log(log_line("bytes", part="model", n=model_bytes))
        log(log_line("bytes", part="total", n=model_bytes + len(code)))
    if dist_ready():
        dist.barrier()
    ledger.add("serialize", time.perf_counter() - t, "none")

    # every rank reloads the artifact from disk; all scores below come from it
    t = time.perf_counter()
    qmodel = load_quantized_model(artifact_path, cfg, dev)
    ledger.add("deserialize", time.perf_counter() - t, "none")
    qlogits = torch.compile(qmodel.forward_logits, dynamic=False, fullgraph=True) if use_compile else qmodel.forward_logits
    L = cfg.eval_seq_len
    timed_eval("quantized", "none", lambda: evaluate(qlogits, val_tokens, L, L, luts, eval_windows, dev, amp, rt.rank, ws))
    if cfg.sliding_window_enabled:
        timed_eval("quantized_sliding_window", "eval", lambda: evaluate(
            qlogits, val_tokens, L, cfg.eval_stride, luts, eval_windows, dev, amp, rt.rank, ws))
    if cfg.ttt_enabled:
        log(f"ttt:start chunks={len(ttt_chunks(val_tokens.numel() - 1, L, cfg.eval_stride, cfg.ttt_chunk_tokens))} "
            f"ttt_lr={cfg.ttt_lr:g} ttt_epochs={cfg.ttt_epochs}")
        timed_eval("quantized_ttt", "eval", lambda: eval_ttt(
            qmodel, val_tokens, cfg, luts, eval_windows, dev, amp, qlogits, rt.rank, ws))

    for phase, seconds, budget in ledger.rows:
        log(log_line("ledger", phase=phase, seconds=seconds, budget=budget))
    log(log_line("ledger_total", train=ledger.total("train"), eval=ledger.total("eval"), limit=TIME_LIMIT_SECONDS))
    summary = dict(run_id=run_id, seed=cfg.seed, steps=step, train_time_ms=round(train_ms), model_params=sum(
        p.numel() for p in model.parameters()), world_size=ws, device=dev.type, torch_version=torch.__version__,
        layer_loop_step=looping_step, val_tokens=val_tokens.numel() - 1, evals=results,
        final_label=list(results)[-1], final_val_bpb=list(results.values())[-1]["val_bpb"],
        time_ledger=[dict(phase=p, seconds=s, budget=b) for p, s, b in ledger.rows],
        time_totals=dict(train=ledger.total("train"), eval=ledger.total("eval"), limit=600), config=dataclasses.asdict(cfg))
    if rt.is_master:
        model_bytes = artifact_path.stat().st_size
        summary.update(bytes_code=len(code), bytes_model=model_bytes, bytes_total=len(code) + model_bytes,
                       bytes_limit=ARTIFACT_LIMIT_BYTES, artifact=str(artifact_path), log=str(log.path))
        atomic_write_bytes(out_dir / "run_summary.json", json.dumps(summary, indent=2).encode())
    return summary


if __name__ == "__main__":
    main()
