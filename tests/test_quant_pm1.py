"""Strict ±1 / ternary weights: quant's "sign" and "ternary" roles, their packing, PGQ format version 3 (and the
byte-identical older versions), `python -m quant inspect` bits per weight, and experiments/pm1.py's layers and model
(fast: no training; tests/test_pm1.py runs the experiment end to end)."""

from __future__ import annotations

import hashlib
import json
import math
import re
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import brotli
import numpy as np
import pytest
import torch
from conftest import TINY_MODEL

import train_gpt
from experiments import pm1
from quant import (
    ARTIFACT_CODECS,
    ArtifactError,
    QTensor,
    decode_artifact,
    dequantize,
    describe,
    encode_artifact,
    pack_signs,
    pack_trits,
    parse_artifact,
    quantize_state_dict,
    save_artifact,
    sign_quantize,
    ternary_codes,
    ternary_quantize,
    unpack_signs,
    unpack_trits,
)

ROOT = Path(__file__).resolve().parent.parent
HEADER = struct.Struct("<3sBII")
SHAPES = [(1, 1), (3, 5), (13, 7), (8, 8), (17, 40), (5, 63)]  # numel not a multiple of 8 or 5 in most


def weight(rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    """Normal weights with exact zeros, negative zeros and a zero row when there is room."""
    w = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))
    w.view(-1)[::7] = 0.0
    w.view(-1)[3::11] = -0.0
    if rows > 2:
        w[1] = 0.0
    return w


def same(a: QTensor, b: QTensor) -> bool:
    return ((a.name, a.shape, a.dtype, a.kind, a.bits) == (b.name, b.shape, b.dtype, b.kind, b.bits)
            and torch.equal(a.codes, b.codes) and torch.equal(a.scale, b.scale) and a.codes.dtype == b.codes.dtype)


# ---------------------------------------------------------------------------------------------------- codes and packing


def test_pack_layouts_by_hand() -> None:
    # signs: np.packbits order, first code = most significant bit, +1 = 1, padding bits 0
    assert pack_signs(np.array([1, -1, -1, -1, -1, -1, -1, -1, 1])) == b"\x80\x80"
    assert pack_signs(np.array([-1, 1, 1])) == b"\x60"
    # trits: digit = code + 1, little-endian base 3, padded with 0 codes (digit 1)
    assert pack_trits(np.array([1, 0, -1, 1, 1, 0])) == bytes([2 + 1 * 3 + 0 * 9 + 2 * 27 + 2 * 81, 1 + 3 + 9 + 27 + 81])
    for n in (0, 1, 7, 8, 9, 39, 40, 41, 1001):
        g = np.random.default_rng(n)
        s, t = g.choice([-1, 1], n).astype(np.int8), g.integers(-1, 2, n).astype(np.int8)
        assert len(pack_signs(s)) == math.ceil(n / 8) and len(pack_trits(t)) == math.ceil(n / 5)
        assert np.array_equal(unpack_signs(pack_signs(s), n), s) and np.array_equal(unpack_trits(pack_trits(t), n), t)
    for bad, why in ((lambda: unpack_signs(b"\x81", 7), "padding"), (lambda: unpack_signs(b"\x80", 9), "expected"),
                     (lambda: unpack_trits(bytes([243]), 5), "max 242"), (lambda: unpack_trits(bytes([0]), 4), "padding"),
                     (lambda: pack_signs(np.array([1, 0])), "-1 or \\+1"), (lambda: pack_trits(np.array([2])), "-1, 0")):
        with pytest.raises(ValueError, match=why):
            bad()


def test_sign_codes_and_dequantize() -> None:
    w = weight(13, 7)
    codes, scale = sign_quantize(w)
    assert codes.dtype == torch.int8 and scale.dtype == torch.float16 and scale.shape == (1,)  # one per tensor
    assert torch.equal(codes, torch.where(w >= 0, 1, -1).to(torch.int8))
    assert codes.view(-1)[3] == 1 and w.view(-1)[3].item() == 0 and math.copysign(1, w.view(-1)[3].item()) == -1
    assert torch.equal(scale, w.abs().mean().reshape(1).half())
    assert sign_quantize(torch.zeros(3, 4))[1].item() == 2**-24  # an all-zero tensor keeps a nonzero scale
    deq = dequantize(quantize_state_dict({"w": w}, {}, roles={"w": "sign"}, passthrough_numel=0))["w"]
    assert torch.equal(deq, codes.float() * scale.float()) and torch.equal(deq >= 0, w >= 0)
    assert torch.equal(sign_quantize(deq)[0], codes)  # re-deriving the signs from the dequantized weight is exact


def test_ternary_codes_and_reload_exactness() -> None:
    for seed, (rows, cols) in enumerate(SHAPES):
        w = weight(rows, cols, seed) * 10.0 ** (seed - 3)  # tiny to large rows
        codes, scale = ternary_quantize(w)
        s = w.abs().mean(1, keepdim=True).clamp_min(2**-24)
        assert torch.equal(codes, torch.round(w / s).clamp(-1, 1).to(torch.int8))  # BitNet b1.58 absmean
        assert torch.equal(scale, s.reshape(-1).half())
        deq = dequantize(quantize_state_dict({"w": w}, {}, roles={"w": "ternary"}, passthrough_numel=0))["w"]
        assert torch.equal(deq, codes.float() * scale.float()[:, None])
        assert torch.equal(ternary_quantize(deq)[0], codes)  # the forward re-derives the same codes after a reload
    assert torch.equal(ternary_codes(torch.tensor([[1e-30, -1e-30, 0.0]])), torch.zeros(1, 3))


@pytest.mark.parametrize("codec", ARTIFACT_CODECS)
def test_container_round_trip_sign_and_ternary(codec: str) -> None:
    state = {f"s{i}": weight(r, c, i) for i, (r, c) in enumerate(SHAPES)}
    state |= {f"t{i}": weight(r, c, 10 + i).bfloat16() for i, (r, c) in enumerate(SHAPES)}
    state |= {"g.weight": torch.randn(24, 40), "gain": torch.ones(5)}
    roles = {k: "sign" if k[0] == "s" else "ternary" if k[0] == "t" else "matrix" for k in state if k != "gain"}
    qts = quantize_state_dict(state, {}, roles=roles, passthrough_numel=0, lqer_rank=2, lqer_top_k=99, lqer_group=8)
    by = {qt.name: qt for qt in qts}
    assert by["g.weight"].lqer is not None and all(by[k].lqer is None for k in roles if k != "g.weight")  # no LQER
    assert [by[k].bits for k in ("s0", "t0", "g.weight")] == [1, 2, 6]
    blob = encode_artifact(qts, codec)
    assert blob[:4] == b"PGQ\x03"
    back = decode_artifact(blob)
    assert all(same(a, b) for a, b in zip(qts, back, strict=True) if a.kind != "passthrough")
    assert all(torch.equal(dequantize(qts)[k], v) for k, v in dequantize(back).items())
    assert encode_artifact(back, codec) == blob
    assert describe([by["s0"], by["t0"]]) == ["sign (1-bit): s0", "ternary (1.6-bit): t0"]


@pytest.mark.parametrize("codec", ARTIFACT_CODECS)
def test_sign_bits_per_weight_on_disk(codec: str) -> None:
    w = torch.randn(512, 512, generator=torch.Generator().manual_seed(1))
    blob = encode_artifact(quantize_state_dict({"w": w}, {}, roles={"w": "sign"}, passthrough_numel=0), codec)
    assert 8 * len(blob) / w.numel() <= 1.1  # 1 bit of sign + 16 bits of scale per 512-weight row + container
    tern = encode_artifact(quantize_state_dict({"w": w}, {}, roles={"w": "ternary"}, passthrough_numel=0), codec)
    assert 8 * len(tern) / w.numel() <= 8 / 5 + 0.1


# ---------------------------------------------------------------------------------------------------- format versions


def fixed_qtensors() -> list[QTensor]:
    """Integer-built tensors (no float math), so the artifact bytes are a pure function of the format."""
    codes = (torch.arange(24 * 40) % 63 - 31).to(torch.int8).reshape(24, 40)
    scale = (torch.arange(24, dtype=torch.float32) / 64 + 0.25).half()
    emb = (torch.arange(32 * 8) % 255 - 127).to(torch.int8).reshape(32, 8)
    return [QTensor("blocks.0.mlp.fc.weight", (24, 40), "float32", "gptq", 6, codes, scale),
            QTensor("tok_emb.weight", (32, 8), "bfloat16", "rtn", 8, emb, torch.full((32,), 0.5).half()),
            QTensor("blocks.0.attn_scale", (40,), "float32", "passthrough", data=(torch.arange(40) / 8).half()),
            QTensor("step", (), "int64", "passthrough", data=torch.tensor(7))]


def test_old_versions_byte_identical_without_new_roles() -> None:
    """sha256 of the same tensors encoded by the quant package before the sign/ternary roles existed."""
    golden = {"brotli": "377df0cca17a8eb79a6f5c52531ff1896320f9ac4ead7e97c1f3b0446bf14e9a",
              "zstd": "ee5a30674a1cc900ccc79b64f1c7dbb268b35f56c6ea145d621357fe3c50fad3",
              "lzma": "297ddc953c62fa1138a8ed7a4797fc74b9a13af1dc4ad2c5779830e471f31270"}
    for codec, sha in golden.items():
        blob = encode_artifact(fixed_qtensors(), codec)
        assert blob[3] == 1 and hashlib.sha256(blob).hexdigest() == sha, codec
    assert encode_artifact(fixed_qtensors(), "rans")[3] == 2
    codes, scale = sign_quantize(torch.randn(4, 9))
    assert encode_artifact([*fixed_qtensors(), QTensor("x", (4, 9), "float32", "sign", 1, codes, scale)])[3] == 3


def craft(manifest: dict, raw: bytes, version: int) -> bytes:
    """A brotli container with correct checksums around a manifest and an uncompressed payload."""
    payload = brotli.compress(raw)
    m = dict(manifest, compressed_bytes=len(payload), compressed_crc32=zlib.crc32(payload))
    mz = brotli.compress(json.dumps(m, sort_keys=True).encode())
    return HEADER.pack(b"PGQ", version, len(mz), zlib.crc32(mz)) + mz + payload


def rejects(blob: bytes, match: str, **kw: int) -> None:
    with pytest.raises(ArtifactError, match=match) as e:
        decode_artifact(blob, **kw)
    assert "\n" not in str(e.value)


def test_hostile_sign_artifacts() -> None:
    codes, scale = sign_quantize(weight(3, 5))  # 15 codes: 2 bytes, 1 padding bit
    blob = encode_artifact([QTensor("x", (3, 5), "float32", "sign", 1, codes, scale)])
    m, _ = parse_artifact(blob)
    raw = brotli.decompress(blob[-m["compressed_bytes"]:])
    assert len(raw) == 2 + 2  # 2 bytes of signs, one fp16 scale
    assert craft(m, raw, 3) != blob and decode_artifact(craft(m, raw, 3))[0].codes.equal(codes)
    for v in (4, 255):
        rejects(blob[:3] + bytes([v]) + blob[4:], f"artifact format version {v}; this loader reads versions 1, 2, 3")
    rejects(craft(m, raw, 2), "unknown kind 'sign' for format version 2")  # an older version cannot hold sign codes
    rejects(blob[:-3], "truncated")
    rejects(craft(m, bytes([raw[0], raw[1] | 1]) + raw[2:], 3), "x: sign codes: nonzero padding bits")
    bad = json.loads(json.dumps(m))
    bad["tensors"][0]["bits"] = 2
    rejects(craft(bad, raw, 3), "sign bits must be 1")
    big = json.loads(json.dumps(m))
    big["tensors"][0]["shape"] = [3, 6]  # 18 codes need 3 bytes: spans disagree
    rejects(craft(big, raw, 3), "disagree")
    with pytest.raises(ValueError, match="1 fp16 scales"):  # a sign tensor stores one scale, not one per row
        encode_artifact([QTensor("x", (3, 5), "float32", "sign", 1, codes, scale.repeat(3))])
    t_codes, t_scale = ternary_quantize(weight(2, 3))  # 6 trits: 2 bytes
    tblob = encode_artifact([QTensor("t", (2, 3), "float32", "ternary", 2, t_codes, t_scale)])
    tm, _ = parse_artifact(tblob)
    traw = brotli.decompress(tblob[-tm["compressed_bytes"]:])
    rejects(craft(tm, bytes([250]) + traw[1:], 3), "t: ternary codes: byte 250")
    w = torch.randn(512, 512)  # 32 KiB of packed signs unpack to 256 KiB of int8 codes: bounded by the cap too
    s_blob = encode_artifact(quantize_state_dict({"w": w}, {}, roles={"w": "sign"}, passthrough_numel=0))
    rejects(s_blob, "unpack to 262,144 bytes", max_decompressed_bytes=40_000)
    with pytest.raises(ValueError, match="no LQER"):
        encode_artifact([QTensor("x", (3, 5), "float32", "sign", 2, codes, scale)])


def test_inspect_reports_bits_per_weight(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(3)
    state = {"s.weight": torch.randn(256, 256, generator=g), "t.weight": torch.randn(128, 256, generator=g)}
    state["s.weight"] += 0.8416  # i.i.d. signs with P(+1) = Phi(0.8416) = 0.8: H0 = H(0.8) = 0.722 bits
    path = tmp_path / "m.ptz"
    save_artifact(path, encode_artifact(quantize_state_dict(state, {}, roles={"s.weight": "sign", "t.weight": "ternary"},
                                                            passthrough_numel=0)))
    r = subprocess.run([sys.executable, "-m", "quant", "inspect", str(path)], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert "format version 3" in r.stdout and "sign 1-bit" in r.stdout and "ternary 1.6-bit" in r.stdout
    rows = {m["kind"]: m for m in (dict(kv.split(":", 1) for kv in line.split()[1:])
                                   for line in r.stdout.splitlines() if line.startswith("bits_per_weight "))}
    sign, tern = rows["sign_1-bit"], rows["ternary_1.6-bit"]
    assert float(sign["h0_bits"]) == pytest.approx(-(0.8 * math.log2(0.8) + 0.2 * math.log2(0.2)), abs=0.01)
    assert float(sign["h0_bits"]) < float(sign["bits"]) < float(sign["h0_bits"]) + 0.15  # the codec gets near H0
    assert int(sign["weights"]) == 256 * 256 and int(sign["tensors"]) == 1
    assert 1.3 < float(tern["h0_bits"]) < float(tern["bits"]) <= 1.7  # ~1.5 bits of trits, 1.6 packed
    assert float(r.stdout.strip().splitlines()[-1].rsplit("= ", 1)[1]) > 0.9  # the last line is still the ratio


# ---------------------------------------------------------------------------------------------------- pm1 layers


def test_ste_passes_gradient_only_inside_clip() -> None:
    w = torch.tensor([[-2.0, -1.0, -0.5, -0.0, 0.0, 0.5, 1.0, 1.5]], requires_grad=True)
    out = pm1.pm1_weight(w)
    assert torch.equal(out, torch.tensor([[-1.0, -1, -1, 1, 1, 1, 1, 1]]) / math.sqrt(8))  # sign(±0) = +1
    out.backward(torch.arange(1.0, 9.0)[None])
    assert torch.equal(w.grad, torch.tensor([[0.0, 2, 3, 4, 5, 6, 7, 0]]))  # |w| <= 1 passes, outside is 0
    w.grad = None
    pm1.pm1_weight(w, ternary=True).sum().backward()
    assert torch.equal(w.grad, (w.abs() <= 1).float())


@pytest.mark.parametrize("ternary", [False, True])
def test_sign_linear_uses_only_codes(ternary: bool) -> None:
    torch.manual_seed(0)
    lin = pm1.SignLinear(48, 20, bias=False)
    lin.ternary = ternary
    x = torch.randn(5, 48)
    y = lin(x)
    with torch.no_grad():
        lin.weight.mul_(3.0 if not ternary else 2.0)  # a positive rescale keeps every code
    assert torch.equal(lin(x), y)
    codes = torch.where(lin.weight >= 0, 1.0, -1.0) if not ternary else ternary_codes(lin.weight)
    assert torch.allclose(y, x @ codes.T / math.sqrt(48), atol=1e-6)
    assert torch.equal(pm1.pm1_codes(lin.weight, ternary), codes)  # the model's codes are quant's codes


def pm1_model(**overrides: object) -> pm1.PM1GPT:
    cfg = pm1.PM1Config(**{**TINY_MODEL, "passthrough_numel": 1024, **overrides})
    torch.manual_seed(0)
    return pm1.PM1GPT(cfg)


def test_pm1_model_layers_init_and_roles() -> None:
    model = pm1_model()
    linears = [(n, m) for n, m in model.blocks.named_modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(type(m) is pm1.SignLinear for _, m in linears)
    assert all((m.weight < 0).any() and (m.weight > 0).any() for _, m in linears)  # no all-ones projection
    assert type(model.tok_emb) is torch.nn.Embedding
    assert train_gpt.param_roles(model) == train_gpt.param_roles(train_gpt.GPT(train_gpt.Config(**TINY_MODEL)))
    roles = pm1.pm1_quant_roles(model)
    assert roles["tok_emb.weight"] == "embed" and {roles[f"blocks.{n}.weight"] for n, _ in linears} == {"sign"}
    emb = pm1_model(pm1_embed=True, pm1_ternary=True)
    r2 = pm1.pm1_quant_roles(emb)
    assert type(emb.tok_emb) is pm1.SignEmbedding and r2["tok_emb.weight"] == "sign"
    assert {r2[f"blocks.{n}.weight"] for n, _ in linears} == {"ternary"}
    with pytest.raises(ValueError, match="PASSTHROUGH_NUMEL=4096 would store block matrices of 2048"):
        pm1.PM1Config(**TINY_MODEL, passthrough_numel=4096)
    with pytest.raises(ValueError, match="PM1_EMBED=1 needs PASSTHROUGH_NUMEL < 1024"):
        pm1.PM1Config(**{**TINY_MODEL, "vocab_size": 16}, passthrough_numel=2000, pm1_embed=True)
    env = pm1.PM1Config.from_env({"PM1_EMBED": "1", "PM1_TERNARY": "true"})
    assert env.pm1_embed and env.pm1_ternary and not pm1.PM1Config().pm1_embed


@pytest.mark.parametrize("embed,ternary", [(True, False), (False, True), (True, True)])
def test_artifact_reload_gives_the_same_logits(embed: bool, ternary: bool) -> None:
    """The artifact holds exactly the codes the forward used: reloading gives the logits of the original model with
    its float passthrough tensors rounded to fp16 (their storage), bit for bit."""
    model = pm1_model(pm1_embed=embed, pm1_ternary=ternary).eval()
    model.looping = True
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    state = {k: v.detach() for k, v in model.state_dict().items()}
    roles = {k: r for k, r in pm1.pm1_quant_roles(model).items() if state[k].numel() > model.cfg.passthrough_numel}
    qts = quantize_state_dict(state, {}, roles=roles, passthrough_numel=model.cfg.passthrough_numel)
    kinds = {qt.name: qt.kind for qt in qts}
    assert {kinds[k] for k in roles if k.startswith("blocks.")} == {"ternary" if ternary else "sign"}
    assert kinds["tok_emb.weight"] == ("sign" if embed else "rtn")
    reloaded = pm1_model(pm1_embed=embed, pm1_ternary=ternary).eval()
    reloaded.load_state_dict(dequantize(decode_artifact(encode_artifact(qts))), strict=True)
    reloaded.looping = True
    with torch.no_grad():
        for name, p in model.named_parameters():
            if roles.get(name) in ("sign", "ternary"):
                assert not torch.equal(p, reloaded.get_parameter(name))  # different latent weights ...
            elif name not in roles:
                p.copy_(p.half().float())  # passthrough storage
        ids = torch.randint(0, 512, (2, 64), generator=torch.Generator().manual_seed(1))
        got, want = reloaded.forward_logits(ids), model.forward_logits(ids)
    if embed:
        assert torch.equal(got, want)  # ... the same codes, the same logits
    else:  # the int8 embedding is the one lossy tensor
        assert 0 < (got - want).abs().max() < 0.5


def test_installed_patches_and_restores() -> None:
    before = {k: getattr(train_gpt, k) for k in pm1.PATCHES}
    with pm1.installed():
        assert train_gpt.Config is pm1.PM1Config and train_gpt.GPT is pm1.PM1GPT and train_gpt.Run is pm1.PM1Run
        assert train_gpt.quant_roles is pm1.pm1_quant_roles
        assert "experiments/pm1.py" in train_gpt.code_sources()
    assert {k: getattr(train_gpt, k) for k in pm1.PATCHES} == before
    with pytest.raises(RuntimeError), pm1.installed():
        raise RuntimeError
    assert {k: getattr(train_gpt, k) for k in pm1.PATCHES} == before
    names = re.findall(r"^(?:def|class) (\w+)|^(\w+) =", (ROOT / "experiments/pm1.py").read_text(), re.M)
    ours = {a or b for a, b in names}
    theirs = set(dir(train_gpt)) | {n for mod in ("quant", "quant.lowbit", "quant.codec", "quant.gptq", "quant.pack")
                                    for n in dir(sys.modules[mod])}
    assert not ours & theirs, ours & theirs  # the record packer inlines everything into one namespace
