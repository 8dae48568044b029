"""quant/: SDClip + GPTQ numerics, the PGQ artifact container and its hostile-input handling, `python -m quant`."""

from __future__ import annotations

import json
import lzma
import math
import os
import pickle
import struct
import subprocess
import sys
import tracemalloc
import zlib
from pathlib import Path

import brotli
import pytest
import torch
import zstandard

from quant import (
    ARTIFACT_CODECS,
    ArtifactError,
    QTensor,
    accumulate_hessian,
    byte_shuffle,
    byte_unshuffle,
    decode_artifact,
    dequantize,
    describe,
    encode_artifact,
    gptq_quantize_weight,
    load_artifact,
    quantize_rtn,
    quantize_state_dict,
    save_artifact,
    sdclip_scale,
)

ROOT = Path(__file__).resolve().parent.parent
HEADER = struct.Struct("<3sBII")  # the documented on-disk header: magic, version, manifest length, manifest crc32


def heavy_weight(rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    """Student-t(4) rows (normal / sqrt(chi²₄/4)) with log-normal row scales, deterministic per seed."""
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(rows, cols, generator=g) / (torch.randn(4, rows, cols, generator=g).square().mean(0)).sqrt()
    return 0.03 * t * torch.exp(0.3 * torch.randn(rows, 1, generator=g))


def correlated_x(n: int, d: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g) / d**0.5
    return (torch.randn(n, d, generator=g) * torch.logspace(0, -2, d).sqrt()) @ mix.T


# ---------------------------------------------------------------------------------------------------- numerics


def test_sdclip_scale_by_hand() -> None:
    w = torch.tensor([[1.0, 2.0, 3.0, 4.0], [0.0, 0.0, 0.0, 0.0], [-2.0, 2.0, -2.0, 2.0]])
    # row 0: mean 2.5, squared deviations 2.25+0.25+0.25+2.25 = 5, unbiased var 5/3; row 2: var 16/3
    expected = [12.85 * math.sqrt(5 / 3) / 31, 2.0**-24, 12.85 * math.sqrt(16 / 3) / 31]
    s = sdclip_scale(w, 12.85, 31)
    assert s.dtype == torch.float16
    assert torch.equal(s, torch.tensor(expected).half())
    assert s[1] > 0  # a constant row still gets a positive step (1e-10 would flush to 0 in fp16)
    assert torch.equal(sdclip_scale(w, 20.0, 127)[2], torch.tensor(20.0 * math.sqrt(16 / 3) / 127).half())


def test_gptq_identity_hessian_is_round_to_nearest() -> None:
    w = heavy_weight(48, 200)  # 200 columns: one full 128-block and a partial one
    for bits, sigmas in ((6, 12.85), (8, 20.0), (6, 3.0)):
        R = 2 ** (bits - 1) - 1
        s = sdclip_scale(w, sigmas, R)
        assert torch.equal(gptq_quantize_weight(w, torch.eye(200), s, R), quantize_rtn(w, s, R))


def test_gptq_beats_rtn_on_layer_output() -> None:
    x, w = correlated_x(1024, 96), heavy_weight(64, 96)
    s = sdclip_scale(w, 12.85, 31)
    H = accumulate_hessian(None, x)

    def out_err(q: torch.Tensor) -> float:
        return (x @ w.T - x @ (q.float() * s.float()[:, None]).T).norm().item()

    gptq, rtn = out_err(gptq_quantize_weight(w, H, s, 31, block_size=32)), out_err(quantize_rtn(w, s, 31))
    assert gptq < 0.7 * rtn, (gptq, rtn)


@pytest.mark.parametrize("bits", [6, 8])
def test_codes_stay_in_clip_range(bits: int) -> None:
    R = 2 ** (bits - 1) - 1
    w = heavy_weight(64, 96)
    s = sdclip_scale(w, 2.0, R)  # tiny clip so both quantizers hit the clamp
    H = accumulate_hessian(None, correlated_x(512, 96))
    for q in (gptq_quantize_weight(w, H, s, R), quantize_rtn(w, s, R)):
        assert q.dtype == torch.int8 and q.abs().max().item() == R


def test_dead_columns_give_zero_codes() -> None:
    x, w = correlated_x(512, 64), heavy_weight(32, 64) + 0.5  # every weight well above a step
    dead = [3, 10, 63]
    x[:, dead] = 0
    q = gptq_quantize_weight(w, accumulate_hessian(None, x), sdclip_scale(w, 12.85, 31), 31)
    assert (q[:, dead] == 0).all() and (q[:, [0, 1, 2]] != 0).all()


def test_non_pd_hessian_does_not_crash() -> None:
    w = heavy_weight(16, 32)
    s = sdclip_scale(w, 12.85, 31)
    a = torch.randn(32, 32, generator=torch.Generator().manual_seed(1))
    indefinite = a + a.T + 0.1 * torch.eye(32) - 5 * torch.eye(32).flip(0)
    q = gptq_quantize_weight(w, indefinite, s, 31)
    assert q.shape == w.shape and q.abs().max() <= 31
    assert torch.equal(gptq_quantize_weight(w, torch.full((32, 32), float("nan")), s, 31), quantize_rtn(w, s, 31))


def test_accumulate_hessian() -> None:
    x = torch.randn(2, 5, 7)
    H = accumulate_hessian(None, x[:1])
    H2 = accumulate_hessian(H, x[1:].double())
    assert H2 is H and H.dtype == torch.float32
    torch.testing.assert_close(H, x.reshape(-1, 7).T @ x.reshape(-1, 7))


def test_accumulate_hessian_is_fp32_under_bf16_autocast() -> None:
    """Calibration runs under bf16 autocast on GPU; CPU autocast reproduces the dtype behaviour. Without the pinned
    fp32 accumulation the first product is bf16 and the second call raises (dtype mismatch in addmm_)."""
    x = torch.randn(3, 64, 32, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        H = accumulate_hessian(None, x[0])
        for i in (1, 2):
            H = accumulate_hessian(H, x[i])
    ref = x.float().reshape(-1, 32)
    assert H.dtype == torch.float32
    torch.testing.assert_close(H, ref.T @ ref, rtol=1e-6, atol=1e-5)


def test_byte_shuffle_round_trip() -> None:
    data = bytes(range(256)) * 3 + b"xyz"
    for stride in (1, 2, 3, 4, 7):
        assert byte_unshuffle(byte_shuffle(data, stride), stride) == data
    assert byte_shuffle(b"\x01\x02\x03\x04\x05", 2) == b"\x01\x03\x05\x02\x04"


# ---------------------------------------------------------------------------------------------------- state dicts


def small_state(dtype: torch.dtype = torch.float32) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    state = {
        "tok_emb.weight": heavy_weight(96, 32).to(dtype),
        "blocks.0.attn.c_q.weight": heavy_weight(32, 32, 1).to(dtype),
        "blocks.1.attn.c_q.weight": heavy_weight(32, 32, 2).to(dtype),
        "blocks.0.mlp.fc.weight": heavy_weight(64, 32, 3).to(dtype),
        "blocks.0.attn.q_gain": torch.full((4,), 5.25, dtype=dtype),
        "blocks.1.attn.q_gain": torch.full((4,), 5.25, dtype=dtype),
        "skip_weights": torch.ones(2, 32, dtype=dtype),  # 2-D but small: passthrough
        "step": torch.tensor(7),
    }
    hess = {k: accumulate_hessian(None, correlated_x(256, 32)) for k in state if k.endswith("weight")}
    del hess["blocks.0.mlp.fc.weight"]  # no Hessian -> round-to-nearest
    return state, hess


def test_quantize_state_dict_routing_and_describe() -> None:
    state, hess = small_state(torch.bfloat16)
    qts = quantize_state_dict(state, hess, passthrough_numel=64)
    by = {qt.name: qt for qt in qts}
    assert [qt.name for qt in qts] == list(state)
    assert (by["tok_emb.weight"].kind, by["tok_emb.weight"].bits) == ("gptq", 8)
    assert (by["blocks.0.attn.c_q.weight"].kind, by["blocks.0.attn.c_q.weight"].bits) == ("gptq", 6)
    assert by["blocks.0.mlp.fc.weight"].kind == "rtn"
    assert by["skip_weights"].data.dtype == torch.float16 and by["step"].data.dtype == torch.int64
    assert by["tok_emb.weight"].codes.abs().max() <= 127 and by["blocks.0.attn.c_q.weight"].codes.abs().max() <= 31
    assert describe(qts) == [
        "gptq (int6): blocks.attn.c_q.weight",
        "gptq (int8): tok_emb.weight",
        "passthrough (float16): blocks.attn.q_gain, skip_weights",
        "passthrough (int64): step",
        "rtn (int6): blocks.mlp.fc.weight",
    ]
    rtn = {qt.name: qt for qt in quantize_state_dict(state, hess, passthrough_numel=64, method="rtn")}
    assert all(qt.kind in ("rtn", "passthrough") for qt in rtn.values())
    deq = dequantize(qts)
    assert all(deq[k].dtype == v.dtype and deq[k].shape == v.shape for k, v in state.items())
    q = by["blocks.0.attn.c_q.weight"]
    assert torch.equal(deq[q.name], (q.codes.float() * q.scale.float()[:, None]).bfloat16())
    with pytest.raises(ValueError, match="method"):
        quantize_state_dict(state, hess, method="awq")


# ---------------------------------------------------------------------------------------------------- container


def one_tensor(dtype: torch.dtype, bits: int | None) -> list[QTensor]:
    w = heavy_weight(24, 40).to(dtype)
    if bits is None:
        return quantize_state_dict({"x.weight": w}, {}, passthrough_numel=10**9)
    H = {"x.weight": accumulate_hessian(None, correlated_x(128, 40))}
    return quantize_state_dict({"x.weight": w}, H, matrix_bits=bits, passthrough_numel=0)


@pytest.mark.parametrize("codec", ARTIFACT_CODECS)
@pytest.mark.parametrize("bits", [6, 8, None])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_container_round_trip(dtype: torch.dtype, bits: int | None, codec: str) -> None:
    qts = one_tensor(dtype, bits)
    back = decode_artifact(encode_artifact(qts, codec))
    for a, b in zip(qts, back, strict=True):
        assert (a.name, a.shape, a.dtype, a.kind, a.bits) == (b.name, b.shape, b.dtype, b.kind, b.bits)
        for f in ("codes", "scale", "data"):
            x, y = getattr(a, f), getattr(b, f)
            assert (x is None and y is None) or (x.dtype == y.dtype and torch.equal(x, y)), f
    assert all(torch.equal(dequantize(qts)[k], v) and v.dtype == dtype for k, v in dequantize(back).items())


def test_whole_state_round_trip_and_determinism(tmp_path: Path) -> None:
    state, hess = small_state()
    qts = quantize_state_dict(state, hess, passthrough_numel=64)
    blob = encode_artifact(qts)
    assert blob[:4] == b"PGQ\x01"
    assert encode_artifact(quantize_state_dict(state, hess, passthrough_numel=64)) == blob  # byte-identical
    save_artifact(tmp_path / "m.ptz", blob)
    assert os.listdir(tmp_path) == ["m.ptz"]  # atomic write leaves no temp file
    back = load_artifact(tmp_path / "m.ptz")
    assert encode_artifact(back) == blob
    assert all(torch.equal(v, dequantize(qts)[k]) for k, v in dequantize(back).items())


# ---------------------------------------------------------------------------------------------------- hostile files


def craft(manifest: dict, payload: bytes, version: int = 1) -> bytes:
    """A container with correct checksums around an arbitrary manifest and compressed payload."""
    m = dict(manifest, compressed_bytes=len(payload), compressed_crc32=zlib.crc32(payload))
    mz = brotli.compress(json.dumps(m, sort_keys=True).encode())
    return HEADER.pack(b"PGQ", version, len(mz), zlib.crc32(mz)) + mz + payload


def manifest_of(blob: bytes) -> dict:
    _, _, mlen, _ = HEADER.unpack_from(blob)
    return json.loads(brotli.decompress(blob[HEADER.size:HEADER.size + mlen]))


def passthrough_manifest(codec: str, n: int) -> dict:
    t = {"name": "t", "shape": [n], "dtype": "uint8", "kind": "passthrough", "store": "uint8", "data": [0, n]}
    return {"codec": codec, "packing": "int8", "scale_layout": "row-fp16", "shuffle": 2, "codes_bytes": 0,
            "payload_bytes": n, "tensors": [t]}


@pytest.fixture(scope="module")
def good_blob() -> bytes:
    state, hess = small_state()
    return encode_artifact(quantize_state_dict(state, hess, passthrough_numel=64))


def rejects(blob: bytes, match: str | None = None, **kw: int) -> str:
    with pytest.raises(ArtifactError, match=match) as e:
        decode_artifact(blob, **kw)
    msg = str(e.value)
    assert msg and "\n" not in msg
    return msg


def test_rejects_truncated(good_blob: bytes) -> None:
    mlen = HEADER.unpack_from(good_blob)[2]
    for n in (0, 3, 11, HEADER.size + mlen // 2, HEADER.size + mlen, len(good_blob) // 2, len(good_blob) - 1):
        rejects(good_blob[:n])
    rejects(good_blob[:-1], "truncated")


def test_rejects_bit_flips(good_blob: bytes) -> None:
    mlen = HEADER.unpack_from(good_blob)[2]
    for pos, what in ((HEADER.size + 5, "manifest"), (HEADER.size + mlen + 10, "payload"), (len(good_blob) - 1, "payload")):
        bad = bytearray(good_blob)
        bad[pos] ^= 0x10
        rejects(bytes(bad), f"{what} checksum")
    g = torch.Generator().manual_seed(0)  # fuzz: any flipped bit anywhere is a clean ArtifactError
    for pos in torch.randint(0, len(good_blob), (60,), generator=g).tolist():
        bad = bytearray(good_blob)
        bad[pos] ^= 1 << (pos % 8)
        rejects(bytes(bad))


def test_rejects_wrong_version_and_magic(good_blob: bytes) -> None:
    for v in (0, 4, 255):
        msg = rejects(good_blob[:3] + bytes([v]) + good_blob[4:])
        assert msg == f"artifact format version {v}; this loader reads versions 1, 2, 3"
    rejects(b"PK\x03" + good_blob[3:], "bad magic")


def test_rejects_oversized_lengths(good_blob: bytes) -> None:
    rejects(good_blob[:4] + struct.pack("<I", 0xFFFFFFFF) + good_blob[8:], "exceeds the file")
    m, payload = manifest_of(good_blob), good_blob[-manifest_of(good_blob)["compressed_bytes"]:]
    huge = json.loads(json.dumps(m))
    huge["tensors"][0]["shape"] = [10**12, 10**12]
    rejects(craft(huge, payload), "disagree")
    past_eof = json.loads(json.dumps(m))
    past_eof["tensors"][1]["codes"] = [10**9, past_eof["tensors"][1]["codes"][1]]
    rejects(craft(past_eof, payload), "offsets/lengths")
    absurd = passthrough_manifest("brotli", 10**12)
    rejects(craft(absurd, brotli.compress(b"")), "exceeds the cap")
    assert decode_artifact(craft(m, payload))  # the crafting itself is sound


@pytest.mark.parametrize("codec", ["brotli", "zstd", "lzma"])  # rans: tests/test_quant_rans.py
def test_rejects_decompression_bomb_without_allocating(codec: str) -> None:
    compress = {"brotli": lambda d: brotli.compress(d, quality=1),
                "zstd": lambda d: zstandard.ZstdCompressor(level=1).compress(d),
                "lzma": lambda d: lzma.compress(d, preset=0)}[codec]
    bomb = compress(bytes(48 << 20))
    blob = craft(passthrough_manifest(codec, 1000), bomb)
    tracemalloc.start()
    try:
        rejects(blob, "more than|does not decompress")  # zstd: the window cap stops it even earlier
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < (4 << 20), peak  # stopped near the 1,000-byte claim, far below the 48 MiB bomb
    rejects(craft(passthrough_manifest(codec, 5 << 20), bomb), "exceeds the cap", max_decompressed_bytes=1 << 20)


class _CreatesFile:
    """A pickle payload: unpickling it calls open(path, "w"), creating the file."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple:
        return (open, (self.path, "w"))


def test_pickle_payloads_are_never_executed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    canary = tmp_path / "pwned"
    evil = pickle.dumps(_CreatesFile(str(canary)))
    pickle.loads(pickle.dumps(_CreatesFile(str(tmp_path / "live"))))  # the payload is live: a naive loader runs it
    assert (tmp_path / "live").exists()
    evil_torch = tmp_path / "evil_torch.pt"  # what upstream's final_model.int6.ptz decodes to: a torch.save zip
    torch.save(_CreatesFile(str(canary)), evil_torch)

    def forbidden(*a: object, **k: object) -> None:
        raise AssertionError("the loader must never unpickle")

    for mod, fn in ((pickle, "loads"), (pickle, "load"), (pickle, "Unpickler"), (torch, "load")):
        monkeypatch.setattr(mod, fn, forbidden)
    hostile = {
        "upstream.ptz": brotli.compress(byte_shuffle(evil, 2)),  # brotli(byte_shuffle(torch.save(...)))
        "raw.pkl": evil,
        "in_container.ptz": craft(dict(passthrough_manifest("brotli", len(evil)), tensors=[
            {"name": "w", "shape": [len(evil)], "dtype": "object", "kind": "pickle", "data": [0, len(evil)]}]),
            brotli.compress(evil)),
    }
    for name, blob in hostile.items():
        (tmp_path / name).write_bytes(blob)
    for p in [*(tmp_path / n for n in hostile), evil_torch]:
        with pytest.raises(ArtifactError):
            load_artifact(p)
        assert not canary.exists()


def test_load_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match="cannot read"):
        load_artifact(tmp_path / "nope.ptz")


# ---------------------------------------------------------------------------------------------------- CLI


def run_inspect(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "quant", "inspect", str(path)], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)


def test_inspect_cli(tmp_path: Path, good_blob: bytes) -> None:
    good = tmp_path / "good.ptz"
    save_artifact(good, good_blob)
    r = run_inspect(good)
    assert r.returncode == 0, r.stderr
    assert "codec brotli" in r.stdout and "format version 1" in r.stdout and "tok_emb.weight" in r.stdout
    ratio = float(r.stdout.strip().splitlines()[-1].rsplit("= ", 1)[1])
    assert 0.9 < ratio < 2.0
    for name, blob, why in (("cut.ptz", good_blob[: len(good_blob) // 2], "truncated"),
                            ("evil.pkl", pickle.dumps(_CreatesFile(str(tmp_path / "pwned"))), "bad magic")):
        (tmp_path / name).write_bytes(blob)
        r = run_inspect(tmp_path / name)
        assert r.returncode == 2 and r.stdout == ""
        assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr and why in r.stderr
    assert not (tmp_path / "pwned").exists()
