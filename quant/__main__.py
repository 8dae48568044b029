"""`python -m quant inspect ARTIFACT`: where an artifact's bytes go, and how close they are to the entropy bound."""

from __future__ import annotations

import argparse
import math
import sys

import torch

from quant.codec import (
    ArtifactError,
    compress_bytes,
    compress_payload,
    parse_artifact,
    read_artifact_file,
    stored_codes,
)
from quant.gptq import LOWBIT_ROLES, QTensor
from quant.pack import byte_shuffle


def order0_bits(values: torch.Tensor) -> float:
    """Total order-0 (empirical, memoryless) entropy in bits of a tensor's elements, each element one symbol."""
    if values.numel() == 0:
        return 0.0
    ints = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[values.element_size()]
    _, counts = torch.unique(values.reshape(-1).view(ints), return_counts=True)
    p = counts.double() / values.numel()
    return max(0.0, float(-(counts.double() * p.log2()).sum()))


def lqer_bytes(qt: QTensor) -> bytes:
    """A tensor's LQER factors as stored (A and B codes one per byte, then the fp16 scales byte-shuffled); b"" if none."""
    f = qt.lqer
    if f is None:
        return b""
    return (f.a_codes.numpy().tobytes() + f.b_codes.numpy().tobytes()
            + byte_shuffle(f.a_scale.numpy().tobytes() + f.b_scale.numpy().tobytes(), 2))


def kind_label(qt: QTensor) -> str:
    """A quantized tensor's kind as inspect prints it: "gptq int6", "rtn int8", "sign 1-bit", "ternary 1.6-bit"."""
    return {"sign": "sign 1-bit", "ternary": "ternary 1.6-bit"}[qt.kind] if qt.kind in LOWBIT_ROLES else \
        f"{qt.kind} int{qt.bits}"


def tensor_bytes(qt: QTensor) -> bytes:
    """A tensor's payload bytes laid out as in the artifact (codes as stored: int8, or sign / ternary packed; fp16
    scales / passthrough byte-shuffled), followed by its LQER factors if it has them."""
    if qt.kind == "passthrough":
        return byte_shuffle(qt.data.reshape(-1).view(torch.uint8).numpy().tobytes(), 2)
    return stored_codes(qt) + byte_shuffle(qt.scale.numpy().tobytes(), 2) + lqer_bytes(qt)


def alone_bytes(qt: QTensor, codec: str) -> int:
    """A tensor's payload compressed alone as the artifact's codec would (rans: its codes and factors one segment each,
    its side data with brotli-11)."""
    if codec != "rans" or qt.kind == "passthrough":
        return len(compress_bytes(tensor_bytes(qt), "brotli" if codec == "rans" else codec))
    packed = stored_codes(qt)
    codes, segments, side = [packed], [len(packed)], [qt.scale.numpy().tobytes()]
    if qt.lqer is not None:
        f = qt.lqer
        codes += [f.a_codes.numpy().tobytes(), f.b_codes.numpy().tobytes()]
        segments += [f.a_codes.numel(), f.b_codes.numel()]
        side += [f.a_scale.numpy().tobytes(), f.b_scale.numpy().tobytes()]
    return len(compress_payload(b"".join(codes), segments, byte_shuffle(b"".join(side), 2), "rans")[0])


def inspect(path: str) -> None:
    blob = read_artifact_file(path)
    m, qts = parse_artifact(blob)
    compressed = m["compressed_bytes"]
    print(f"artifact {path}: {len(blob):,} bytes = header+manifest {len(blob) - compressed:,} + "
          f"compressed payload {compressed:,} (decompressed {m['payload_bytes']:,})")
    print(f"format version {blob[3]} | codec {m['codec']} | packing {m['packing']} (codes one per byte, contiguous per "
          f"tensor; sign 8 and ternary 5 per byte) | scales {m['scale_layout']} | scales+passthrough byte-shuffled, "
          f"stride {m['shuffle']}")
    print(f"share: each tensor's bytes compressed alone with {m['codec']} (artifact settings), scaled so the shares sum "
          f"to the compressed payload; H0: order-0 entropy of the codes (passthrough: of the stored values), "
          f"bound = H0 of codes + H0 of the fp16 scales (16-bit symbols); bits_per_weight: a kind's share bytes "
          f"(codes, scales and LQER) * 8 / its weights, against h0_bits = H0 of its codes per weight", flush=True)
    if m["codec"] == "rans":
        r = m["rans"]
        print(f"rans: codes in order-0 rANS with one frequency table per tensor and per LQER factor, {r['lanes']} lanes, "
              f"{r['words_bytes']:,} bytes of words; tables ({r['tables_bytes']:,} bytes), lane states, scales and "
              f"passthrough data in brotli-11")
    alone = [alone_bytes(qt, m["codec"]) for qt in qts]
    k = compressed / max(1, sum(alone))
    rows, tot_raw, tot_bound, per_kind = [], 0, 0.0, {}
    for qt, a in zip(qts, alone, strict=True):
        if qt.kind == "passthrough":
            sym, n, raw = order0_bits(qt.data), qt.data.numel(), qt.data.numel() * qt.data.element_size()
            bound, label = sym / 8, f"{qt.kind} {str(qt.data.dtype).removeprefix('torch.')}"
        else:
            sym, n, raw = order0_bits(qt.codes), qt.codes.numel(), len(stored_codes(qt)) + 2 * qt.shape[0]
            bound, label = (sym + order0_bits(qt.scale)) / 8, kind_label(qt)
            if qt.lqer is not None:  # raw bytes and bound include the LQER factors; H0 bits/sym stays the main codes'
                f = qt.lqer
                raw += len(lqer_bytes(qt))
                bound += sum(order0_bits(t) for t in (f.a_codes, f.b_codes, f.a_scale, f.b_scale)) / 8
                label += f"+lqer{f.rank}"
        tot_raw += raw
        tot_bound += bound
        if qt.kind != "passthrough":
            g = per_kind.setdefault(kind_label(qt), [0, 0, 0.0, 0.0])
            g[0], g[1], g[2], g[3] = g[0] + 1, g[1] + n, g[2] + a * k, g[3] + sym
        rows.append((qt.name, "x".join(map(str, qt.shape)) or "scalar", label, qt.dtype, f"{raw:,}", f"{a * k:,.0f}",
                     f"{100 * a * k / max(1, compressed):.2f}%", f"{sym / max(1, n):.3f}", f"{math.ceil(bound):,}"))
    head = ("name", "shape", "kind", "dtype", "raw bytes", "share bytes", "share", "H0 bits/sym", "H0 bytes")
    rows.append(("TOTAL", "", f"{len(qts)} tensors", "", f"{tot_raw:,}", f"{compressed:,}", "100.00%", "",
                 f"{math.ceil(tot_bound):,}"))
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    for r in [head, *rows]:
        print("  ".join(c.ljust(w) if i < 4 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))))
    for label, (count, n, share, sym) in sorted(per_kind.items()):  # bits per weight on disk vs the codes' H0
        print(f"bits_per_weight kind:{label.replace(' ', '_')} tensors:{count} weights:{n} share_bytes:{share:.0f} "
              f"bits:{8 * share / max(1, n):.4f} h0_bits:{sym / max(1, n):.4f}")
    print(f"entropy bound: compressed payload {compressed:,} / order-0 bound {math.ceil(tot_bound):,} bytes "
          f"= {compressed / max(1.0, tot_bound):.4f}")
    lq = [qt for qt in qts if qt.lqer is not None]
    if lq:
        print(f"LQER: {len(lq)} tensor{'s' if len(lq) > 1 else ''} with a low-rank correction W = q*s + (qA*sA)(qB*sB) "
              f"(kind +lqerR above; their raw bytes, share and bound include it); per tensor, raw = A and B codes one "
              f"per byte + fp16 scales, alone = compressed alone with {m['codec']}:")
    raw_total, alone_total = 0, 0
    for qt in lq:
        f, raw = qt.lqer, lqer_bytes(qt)
        alone = len(compress_bytes(raw, m["codec"]))
        raw_total, alone_total = raw_total + len(raw), alone_total + alone
        print(f"lqer {qt.name}: rank {f.rank}, group {f.group}; A int2 {'x'.join(map(str, f.a_codes.shape))} "
              f"(scale {f.a_scale.float().item():.4g}), B int4 {'x'.join(map(str, f.b_codes.shape))} in "
              f"{f.b_scale.numel()} groups: {len(raw):,} raw bytes, {alone:,} alone")
    if lq:
        print(f"LQER total: {raw_total:,} raw bytes, {alone_total:,} compressed alone")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m quant", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("inspect", help="print the manifest, per-tensor compressed shares and order-0 entropy bounds")
    p.add_argument("artifact", help="path to a PGQ artifact (e.g. final_model.int6.ptz)")
    args = parser.parse_args(argv)
    try:
        inspect(args.artifact)
    except ArtifactError as e:
        print(f"error: {args.artifact}: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
