"""quant/: LQER factors, per-role bits and clip sigmas (int7 embeddings), artifact format version 2, and the
guarantee that the defaults still give the pre-LQER output byte for byte."""

from __future__ import annotations

import hashlib
import json
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import brotli
import pytest
import torch

from quant import (
    ArtifactError,
    QTensor,
    accumulate_hessian,
    decode_artifact,
    dequantize,
    describe,
    encode_artifact,
    gptq_quantize_weight,
    lqer_correction,
    lqer_factors,
    quantize_state_dict,
    save_artifact,
    sdclip_scale,
)
from quant.lqer import quantize_a, quantize_b
from quant.pack import byte_shuffle, byte_unshuffle

ROOT = Path(__file__).resolve().parent.parent
HEADER = struct.Struct("<3sBII")


def heavy_weight(rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    """Student-t(4) rows with log-normal row scales (the same recipe as tests/test_quant.py)."""
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(rows, cols, generator=g) / (torch.randn(4, rows, cols, generator=g).square().mean(0)).sqrt()
    return 0.03 * t * torch.exp(0.3 * torch.randn(rows, 1, generator=g))


def correlated_x(n: int, d: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g) / d**0.5
    return (torch.randn(n, d, generator=g) * torch.logspace(0, -2, d).sqrt()) @ mix.T


def golden_inputs() -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    state = {"tok_emb.weight": heavy_weight(96, 32).bfloat16(), "blocks.0.attn.c_q.weight": heavy_weight(32, 32, 1),
             "blocks.0.mlp.fc.weight": heavy_weight(64, 32, 3), "blocks.0.mlp.proj.weight": heavy_weight(32, 64, 4),
             "q_gain": torch.full((4,), 5.25), "step": torch.tensor(7)}
    hess = {"tok_emb.weight": accumulate_hessian(None, correlated_x(256, 32)),
            "blocks.0.attn.c_q.weight": accumulate_hessian(None, correlated_x(256, 32, 1))}
    return state, hess


def qtensor_digest(qts: list[QTensor]) -> str:
    h = hashlib.sha256()
    for qt in qts:
        h.update(f"{qt.name}|{qt.kind}|{qt.bits}|{qt.dtype}|{qt.shape}".encode())
        for t in (qt.codes, qt.scale, qt.data):
            if t is not None:
                h.update(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def split(blob: bytes) -> tuple[int, dict, bytes]:
    """(version, manifest, compressed payload) of a well-formed container."""
    _, version, mlen, _ = HEADER.unpack_from(blob)
    return version, json.loads(brotli.decompress(blob[HEADER.size:HEADER.size + mlen])), blob[HEADER.size + mlen:]


# ---------------------------------------------------------------------------------------------------- defaults


# Digests computed with the quant/ of the commit before LQER and roles existed (quantize_state_dict with only the
# keywords it had then); the same inputs must still give the same codes, scales and passthrough bytes.
GOLDEN = {
    "default": "5c508435aa677fbe3dfe447f606b99f508d58080065d768fb2b0e81a7ffe654e",
    "rtn": "0d204a7c46dc63b13285773aa51f78d929831499a413dae1d150bbdbb969aff1",
    "int5/int7": "36d353a172cd487fda513a5c2f19d54a210cc848b309d5b68d87daada5c98bf4",
}
GOLDEN_ARTIFACT = "ade1af794d426d22ce562b8af54e5d2e43de02b5d7591a79709a7c41fe44b480"  # manifest + raw payload, v1


def test_defaults_reproduce_the_pre_lqer_output_byte_for_byte() -> None:
    state, hess = golden_inputs()
    kws = {"default": {}, "rtn": {"method": "rtn"},
           "int5/int7": {"matrix_bits": 5, "embed_bits": 7, "embed_clip_sigmas": 14.0}}
    for key, kw in kws.items():
        assert qtensor_digest(quantize_state_dict(state, hess, passthrough_numel=64, **kw)) == GOLDEN[key], key
    # the trainer's exact call (its keywords as they are today) plus every new keyword at its default
    qts = quantize_state_dict(state, hess, matrix_bits=6, matrix_clip_sigmas=12.85, embed_bits=8, embed_clip_sigmas=20.0,
                              passthrough_numel=64, roles=None, attn_bits=None, attn_clip_sigmas=None, mlp_bits=None,
                              mlp_clip_sigmas=None, lqer_rank=0, lqer_top_k=3, lqer_group=64)
    assert qtensor_digest(qts) == GOLDEN["default"] and all(qt.lqer is None for qt in qts)
    version, m, payload = split(encode_artifact(qts))
    assert version == 1
    del m["compressed_bytes"], m["compressed_crc32"]
    raw = brotli.decompress(payload)
    assert hashlib.sha256(json.dumps(m, sort_keys=True).encode() + raw).hexdigest() == GOLDEN_ARTIFACT


# ---------------------------------------------------------------------------------------------------- roles


def role_state() -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, str]]:
    state = {"emb": heavy_weight(128, 32), "q": heavy_weight(32, 32, 1), "fc": heavy_weight(64, 32, 2),
             "other": heavy_weight(32, 32, 3), "gain": torch.ones(4)}
    return state, {}, {"emb": "embed", "q": "attn", "fc": "mlp", "other": "matrix"}


def test_roles_choose_bits_and_sigmas_per_tensor() -> None:
    state, hess, roles = role_state()
    qts = {qt.name: qt for qt in quantize_state_dict(
        state, hess, passthrough_numel=64, roles=roles, embed_bits=7, embed_clip_sigmas=14.0, matrix_bits=6,
        matrix_clip_sigmas=12.85, attn_clip_sigmas=13.0, mlp_clip_sigmas=11.5, mlp_bits=5)}
    expect = {"emb": (7, 14.0), "q": (6, 13.0), "fc": (5, 11.5), "other": (6, 12.85)}
    for name, (bits, sig) in expect.items():
        R = 2 ** (bits - 1) - 1
        assert qts[name].bits == bits, name
        assert torch.equal(qts[name].scale, sdclip_scale(state[name], sig, R)), name
        assert qts[name].codes.abs().max() <= R
    assert qts["gain"].kind == "passthrough"
    # attn/mlp fall back to the matrix values when not given
    plain = {qt.name: qt for qt in quantize_state_dict(state, hess, passthrough_numel=64, roles=roles)}
    assert plain["q"].bits == plain["fc"].bits == 6 and torch.equal(plain["q"].scale, sdclip_scale(state["q"], 12.85, 31))
    assert plain["emb"].bits == 8  # embed_names is not used with roles: "emb" is an embed because roles says so


def test_int7_embedding_fills_its_range_and_round_trips() -> None:
    w = heavy_weight(256, 32)
    qts = quantize_state_dict({"tok_emb.weight": w}, {}, embed_bits=7, embed_clip_sigmas=3.0, passthrough_numel=0)
    assert qts[0].bits == 7 and qts[0].codes.abs().max().item() == 63  # a tight clip hits ±63, never more
    back = decode_artifact(encode_artifact(qts))
    assert back[0].bits == 7 and torch.equal(back[0].codes, qts[0].codes)
    # a 7-bit code of 64 is out of range: the loader's range check is per bit width
    version, m, payload = split(encode_artifact(qts))
    raw = bytearray(brotli.decompress(payload))
    raw[int(qts[0].codes.reshape(-1).abs().argmax())] = 64
    with pytest.raises(ArtifactError, match="exceed ±63 for int7"):
        decode_artifact(craft(m, bytes(raw), version))


def test_role_errors_are_one_line_value_errors() -> None:
    state, hess, roles = role_state()
    cases = [
        (dict(roles={**roles, "q": "attention"}), "unknown roles \\['attention'\\]"),
        (dict(roles={k: v for k, v in roles.items() if k != "fc"}), "misses quantized tensors \\['fc'\\]"),
        (dict(roles={**roles, "ghost": "mlp"}), "not in the state dict \\['ghost'\\]"),
        (dict(mlp_clip_sigmas=12.0), "mlp_clip_sigmas need roles="),
        (dict(roles=roles, embed_bits=9), "embed bits must be an int in 2..8"),
        (dict(lqer_rank=-1), "lqer_rank >= 0"),
    ]
    for kw, match in cases:
        with pytest.raises(ValueError, match=match) as e:
            quantize_state_dict(state, hess, passthrough_numel=64, **kw)
        assert "\n" not in str(e.value)


# ---------------------------------------------------------------------------------------------------- LQER numerics


def test_int2_a_by_hand() -> None:
    a = torch.tensor([[1.5, -1.5], [0.5, -0.7], [0.0, 1.2]])
    q, s = quantize_a(a)
    assert s.dtype == torch.float16 and s.item() == 1.0  # max|A| / 1.5
    # 1.5 rounds to 2 and clamps to 1 (asymmetric INT2), -1.5 -> -2, 0.5 -> 0 (half to even), -0.7 -> -1, 1.2 -> 1
    assert q.dtype == torch.int8 and q.tolist() == [[1, -2], [0, -1], [0, 1]]
    a = torch.randn(300, 4, generator=torch.Generator().manual_seed(0))
    q, s = quantize_a(a)  # every A / sA is in [-1.5, 1.5] (up to fp16 rounding of sA): about half a step off at most
    assert q.min() >= -2 and q.max() == 1 and (a - q.float() * s.float()).abs().max() <= 0.51 * s.float()


def test_int4_b_groups_by_hand() -> None:
    b = torch.tensor([[7.5, -7.5, 3.0, 0.0, 1.0], [-2.0, 0.4, 0.0, 0.0, 0.1]])  # 10 elements, groups of 4: 4, 4, 2
    q, s = quantize_b(b, 4)
    assert s.dtype == torch.float16 and s.tolist() == pytest.approx([1.0, 2.0 / 7.5, 0.1 / 7.5], rel=1e-3)
    assert q.dtype == torch.int8 and q.shape == b.shape
    flat = q.reshape(-1).tolist()
    assert flat[:4] == [7, -8, 3, 0]  # 7.5 -> 8 clamps to 7; -7.5 -> -8 fits
    assert flat[4:8] == [4, -8, 2, 0]  # group 2: 1.0, -2.0, 0.4, 0.0 at step 2/7.5
    assert flat[8:] == [0, 8 - 1]  # group 3: 0.0, 0.1 at step 0.1/7.5 -> 7.5 -> 8 -> 7
    b = torch.randn(4, 130, generator=torch.Generator().manual_seed(0))
    q, s = quantize_b(b, 64)  # 520 elements: 8 full groups and one of 8
    step = s.float().repeat_interleave(64)[:520].reshape(4, 130)
    assert s.numel() == 9 and q.min() >= -8 and q.max() <= 7 and ((b - q.float() * step).abs() <= 0.51 * step).all()
    with pytest.raises(ValueError, match="group"):
        quantize_b(b, 0)


def gptq_residual(rows: int = 256, cols: int = 128, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A trained-looking matrix (heavy tails + a low-rank part) and its GPTQ int6 reconstruction."""
    g = torch.Generator().manual_seed(seed)
    w = heavy_weight(rows, cols, seed) + 0.01 * torch.randn(rows, 4, generator=g) @ torch.randn(4, cols, generator=g)
    s = sdclip_scale(w, 12.85, 31)
    q = gptq_quantize_weight(w, accumulate_hessian(None, correlated_x(1024, cols, seed)), s, 31)
    return w, q.float() * s.float()[:, None]


def test_lqer_reduces_the_reconstruction_error() -> None:
    w, what = gptq_residual()
    e = w - what
    f = lqer_factors(e, rank=4, group=64)
    assert (f.rank, f.group, f.a_codes.shape, f.b_codes.shape, f.b_scale.numel()) == (4, 64, (256, 4), (4, 128), 8)
    assert f.a_codes.min() >= -2 and f.a_codes.max() <= 1 and f.b_codes.min() >= -8 and f.b_codes.max() <= 7
    corrected = (w - what - lqer_correction(f)).norm()
    U, S, Vh = torch.linalg.svd(e.double(), full_matrices=False)
    exact = (e.double() - (U[:, :4] * S[:4]) @ Vh[:4]).norm()  # the unquantized rank-4 optimum
    gain, best = e.norm() - corrected, e.norm() - exact
    # INT2 A with one per-matrix step rounds most of A to 0 or -1: a fifth of the exact rank-4 gain is what it keeps
    assert corrected < e.norm() and gain > 0.1 * best, (float(e.norm()), float(corrected), float(exact))
    assert torch.equal(lqer_correction(lqer_factors(e, 4, 64)), lqer_correction(f))  # deterministic
    assert lqer_factors(e[:3, :5], rank=4).rank == 3  # capped at min(rows, cols)


def lqer_state() -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    state = {"tok_emb.weight": heavy_weight(256, 64), "a.weight": heavy_weight(64, 64, 1) * 3,
             "b.weight": heavy_weight(128, 64, 2), "c.weight": heavy_weight(64, 64, 3) * 0.1, "gain": torch.ones(8)}
    return state, {k: accumulate_hessian(None, correlated_x(512, 64, i)) for i, k in enumerate(state) if k != "gain"}


def test_quantize_state_dict_lqer_top_k() -> None:
    state, hess = lqer_state()
    base = quantize_state_dict(state, hess, passthrough_numel=64)
    norms = {qt.name: float((state[qt.name] - dequantize([qt])[qt.name]).norm()) for qt in base if qt.kind != "passthrough"}
    top2 = sorted(norms, key=norms.get)[-2:]
    qts = quantize_state_dict(state, hess, passthrough_numel=64, lqer_rank=4, lqer_top_k=2, lqer_group=64)
    assert sorted(qt.name for qt in qts if qt.lqer is not None) == sorted(top2)
    assert "c.weight" not in top2
    for a, b in zip(base, qts, strict=True):  # LQER only adds factors: the GPTQ codes are the same
        assert a.kind == b.kind and (a.codes is None or torch.equal(a.codes, b.codes))
    deq, deq0 = dequantize(qts), dequantize(base)
    for name in top2:
        assert (state[name] - deq[name]).norm() < (state[name] - deq0[name]).norm()
    assert torch.equal(deq["c.weight"], deq0["c.weight"])
    assert any(line.endswith("+ lqer (rank 4): a.weight, tok_emb.weight") or "+ lqer (rank 4)" in line
               for line in describe(qts))
    assert all(qt.lqer is None for qt in quantize_state_dict(state, hess, passthrough_numel=64, lqer_rank=4,
                                                             lqer_top_k=0))


# ---------------------------------------------------------------------------------------------------- format v2


@pytest.fixture(scope="module")
def lqer_qts() -> list[QTensor]:
    state, hess = lqer_state()
    return quantize_state_dict(state, hess, passthrough_numel=64, lqer_rank=4, lqer_top_k=2, lqer_group=48)


@pytest.fixture(scope="module")
def lqer_blob(lqer_qts: list[QTensor]) -> bytes:
    return encode_artifact(lqer_qts)


@pytest.mark.parametrize("codec", ["brotli", "zstd", "lzma"])
def test_lqer_artifact_is_version_2_and_round_trips_exactly(lqer_qts: list[QTensor], codec: str) -> None:
    blob = encode_artifact(lqer_qts, codec)
    assert blob[:4] == b"PGQ\x02"
    back = decode_artifact(blob)
    for a, b in zip(lqer_qts, back, strict=True):
        assert (a.lqer is None) == (b.lqer is None)
        if a.lqer is not None:
            for f in ("a_codes", "a_scale", "b_codes", "b_scale"):
                x, y = getattr(a.lqer, f), getattr(b.lqer, f)
                assert x.dtype == y.dtype and torch.equal(x.reshape(-1), y.reshape(-1)), f
            assert a.lqer.group == b.lqer.group == 48
    assert all(torch.equal(v, dequantize(lqer_qts)[k]) for k, v in dequantize(back).items())
    assert encode_artifact(back, codec) == blob


def craft(manifest: dict, raw_payload: bytes, version: int = 2, codec: str = "brotli") -> bytes:
    """A container around `manifest` with correct sizes and checksums for the given decompressed payload."""
    payload = brotli.compress(raw_payload) if codec == "brotli" else raw_payload
    m = dict(manifest, compressed_bytes=len(payload), compressed_crc32=zlib.crc32(payload))
    mz = brotli.compress(json.dumps(m, sort_keys=True).encode())
    return HEADER.pack(b"PGQ", version, len(mz), zlib.crc32(mz)) + mz + payload


def rejects(blob: bytes, match: str) -> None:
    with pytest.raises(ArtifactError, match=match) as e:
        decode_artifact(blob)
    assert "\n" not in str(e.value)


def test_version_1_cannot_carry_lqer(lqer_blob: bytes) -> None:
    _, m, payload = split(lqer_blob)
    rejects(craft(m, brotli.decompress(payload), version=1), "manifest keys")
    assert decode_artifact(craft(m, brotli.decompress(payload), version=2))  # the crafting itself is sound


def test_hostile_lqer_fields_are_rejected(lqer_blob: bytes) -> None:
    _, m, payload = split(lqer_blob)
    raw = brotli.decompress(payload)
    i = next(i for i, e in enumerate(m["tensors"]) if "lqer" in e)
    name, rows, cols = m["tensors"][i]["name"], *m["tensors"][i]["shape"]

    def edit(**fields: object) -> dict:
        bad = json.loads(json.dumps(m))
        f = bad["tensors"][i]["lqer"]
        for k, v in fields.items():
            if v is None:
                del f[k]
            else:
                f[k] = v
        return bad

    for fields, match in [
        (dict(rank=0), "lqer rank must be"), (dict(rank=min(rows, cols) + 1), "lqer rank must be"),
        (dict(rank=True), "lqer rank must be"), (dict(rank="4"), "lqer rank must be"),
        (dict(group=0), "lqer group must be"), (dict(group=1 << 40), "lqer group must be"),
        (dict(group=64.0), "lqer group must be"), (dict(b_scale=None), "lqer keys"), (dict(extra=[0, 1]), "lqer keys"),
        (dict(rank=3), "disagree"),  # consistent-looking rank, but the sizes no longer add up
        (dict(group=16), "disagree"),
    ]:
        rejects(craft(edit(**fields), raw), match)
    for key in ("a_codes", "b_codes", "a_scale", "b_scale"):  # every span is checked against the computed layout
        span = m["tensors"][i]["lqer"][key]
        for bad_span in ([span[0] + 1, span[1]], [span[0], span[1] + 1], [10**15, span[1]], [-1, span[1]], "x"):
            rejects(craft(edit(**{key: bad_span}), raw), "offsets/lengths")
    bad = json.loads(json.dumps(m))
    bad["tensors"][i]["lqer"] = [4, 64]
    rejects(craft(bad, raw), "lqer is not an object")
    # codes outside INT2 [-2, 1] / INT4 [-8, 7] in a well-formed file
    a_off, b_off = m["tensors"][i]["lqer"]["a_codes"][0], m["tensors"][i]["lqer"]["b_codes"][0]
    for off, val, what in ((a_off, 2, "A"), (a_off, -3, "A"), (b_off, 8, "B"), (b_off, -9, "B")):
        r = bytearray(raw)
        r[off] = val & 0xFF
        rejects(craft(m, bytes(r)), f"{name}: LQER {what} codes exceed")


def test_lqer_scales_live_in_the_shuffled_side_region(lqer_qts: list[QTensor], lqer_blob: bytes) -> None:
    _, m, payload = split(lqer_blob)
    raw = brotli.decompress(payload)
    side = byte_unshuffle(raw[m["codes_bytes"]:], m["shuffle"])
    for e, qt in zip(m["tensors"], lqer_qts, strict=True):
        if "lqer" in e:
            off, n = e["lqer"]["b_scale"]
            assert side[off - m["codes_bytes"]:off - m["codes_bytes"] + n] == qt.lqer.b_scale.numpy().tobytes()
            off, n = e["lqer"]["a_codes"]
            assert raw[off:off + n] == qt.lqer.a_codes.numpy().tobytes()
    assert byte_shuffle(side, m["shuffle"]) == raw[m["codes_bytes"]:]


def test_inspect_shows_lqer(tmp_path: Path, lqer_blob: bytes) -> None:
    path = tmp_path / "lqer.ptz"
    save_artifact(path, lqer_blob)
    r = subprocess.run([sys.executable, "-m", "quant", "inspect", str(path)], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert "format version 2" in r.stdout
    lines = [line for line in r.stdout.splitlines() if line.startswith("lqer ")]
    _, m, _ = split(lqer_blob)
    lq = [e for e in m["tensors"] if "lqer" in e]
    assert len(lines) == len(lq) == 2
    for line, e in zip(lines, lq, strict=True):
        f = e["lqer"]
        raw = f["a_codes"][1] + f["b_codes"][1] + f["a_scale"][1] + f["b_scale"][1]
        assert e["name"] in line and "rank 4" in line and "group 48" in line and f"{raw:,} raw bytes" in line
    assert "LQER: 2 tensors" in r.stdout and "+lqer4" in r.stdout


# ---------------------------------------------------------------------------------------------------- trainer


def test_trainer_loads_a_version_2_artifact(tmp_path: Path) -> None:
    """A GPT state dict quantized with roles, int7 embeddings, LQER and the rans codec reloads through the trainer's
    own loader to the weights `dequantize` gives (the trainer needs no change to read version 2)."""
    from conftest import TINY_TRAIN

    import train_gpt as tg

    cfg = tg.Config(**TINY_TRAIN)
    torch.manual_seed(0)
    state = {k: v.detach().clone() for k, v in tg.GPT(cfg).state_dict().items()}
    roles = {n: "embed" if n == "tok_emb.weight" else "attn" if ".attn." in n else "mlp" if ".mlp." in n else "matrix"
             for n, t in state.items() if t.is_floating_point() and t.ndim == 2 and t.numel() > cfg.passthrough_numel}
    qts = quantize_state_dict(state, {}, passthrough_numel=cfg.passthrough_numel, roles=roles, embed_bits=7,
                              embed_clip_sigmas=14.0, attn_clip_sigmas=13.0, mlp_clip_sigmas=11.5, lqer_rank=4,
                              lqer_top_k=3)
    assert sum(qt.lqer is not None for qt in qts) == 3 and {qt.bits for qt in qts if qt.kind != "passthrough"} == {6, 7}
    path = tmp_path / "final_model.int6.ptz"
    save_artifact(path, encode_artifact(qts, "rans"))
    model = tg.load_quantized_model(path, cfg, torch.device("cpu"))
    want = dequantize(qts)
    assert all(torch.equal(v, want[k].to(v.dtype)) for k, v in model.state_dict().items())
