"""The val byte sidecar of transformed-text datasets (CaseOps): file names, the byte-attribution rule, and its audit.

A dataset whose tokens encode transformed text (data/caseops.py) cannot count bytes from the pieces: an operator piece
is 3 UTF-8 bytes of text that was never in the document. Beside each val shard `fineweb_val_%06d.bin` it carries
`fineweb_val_bytes_%06d.bin`, in the same shard format and the same split, with one uint16 per val token: the number
of bytes of the ORIGINAL document (UTF-8, before the transform) that the token accounts for. The rule, per token
(docs/data.md has the worked examples):

  * BOS: 0. An operator acting as one (TITLE, ALLCAPS, CAPNEXT, an ESC that escapes): 0.
  * A byte-fallback piece: 1 (its byte). A character split into byte pieces counts 1 per piece.
  * Any other piece: the UTF-8 bytes of the characters it covers. A lowercased letter counts 1, like the capital
    it stands for; an operator character escaped by the ESC before it is literal text and counts its 3 bytes; a '▁'
    counts 1 for the space it stands for, or 3 where the document had a literal U+2581 (SentencePiece decodes both
    as a space, the one loss of its encoding; the audit names these).

So a document's sidecar entries sum to len(document.encode("utf-8")) exactly, and the trainer's val_bpb denominator
for scored target i (val-stream position i >= 1) is sidecar[i].
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import sentencepiece as spm
from tqdm import tqdm

from data import caseops
from data.shards import BOS_ID, load_shard, read_shard_header

SIDECAR_GLOB = "fineweb_val_bytes_*.bin"
VAL_TOKEN_GLOB = "fineweb_val_[0-9]*.bin"  # token shards only: "fineweb_val_*.bin" also matches the sidecars
U2581 = "\u2581"


class SidecarError(ValueError):
    """Tokens that do not reproduce the text they came from, so no exact sidecar exists for them."""


def sidecar_name(val_shard_name: str) -> str:
    """fineweb_val_000003.bin -> fineweb_val_bytes_000003.bin."""
    return val_shard_name.replace("fineweb_val_", "fineweb_val_bytes_", 1)


def val_token_files(data_dir: str | Path) -> list[Path]:
    return sorted(p for p in Path(data_dir).glob("fineweb_val_*.bin") if not p.name.startswith("fineweb_val_bytes_"))


def sidecar_files(data_dir: str | Path) -> list[Path]:
    return sorted(Path(data_dir).glob(SIDECAR_GLOB))


def decoded_piece_bytes(sp: spm.SentencePieceProcessor) -> np.ndarray:
    """int64 per id: the UTF-8 bytes the piece adds to sp.decode's text ('▁' as a space; byte pieces 1; control,
    unknown and unused pieces 0)."""
    out = np.zeros(sp.vocab_size(), dtype=np.int64)
    for i in range(sp.vocab_size()):
        if sp.is_byte(i):
            out[i] = 1
        elif not (sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i)):
            out[i] = len(sp.id_to_piece(i).replace(U2581, " ").encode("utf-8"))
    return out


def token_original_bytes(text: str, ids: Sequence[int] | np.ndarray, sp: spm.SentencePieceProcessor,
                         piece_bytes: np.ndarray, transformed: bool = True) -> np.ndarray:
    """Original-document bytes per token (int64) for the tokens `ids` of `text` (the text SentencePiece was given:
    caseops.encode(doc) when `transformed`), by the rule in the module docstring. Raises SidecarError when the
    tokens do not decode to `text` (a normalizing tokenizer: CaseOps needs normalization_rule_name=identity)."""
    ids = np.asarray(ids, dtype=np.int64)
    decoded = sp.decode(ids.tolist())
    if decoded != (expect := text.replace(U2581, " ")):
        i = caseops.first_difference(decoded, expect)
        raise SidecarError(f"the tokens decode to {decoded[max(0, i - 15):i + 15]!r} where the text has "
                           f"{expect[max(0, i - 15):i + 15]!r} (char {i}); the tokenizer normalizes text, so the "
                           f"tokens cannot be mapped back to document bytes")
    data = decoded.encode("utf-8")
    lens = piece_bytes[ids]
    if int(lens.sum()) != len(data):
        raise SidecarError(f"piece lengths add up to {int(lens.sum())} bytes, the decoded text has {len(data)}")
    weight = np.ones(len(data), dtype=np.int64)
    if transformed:
        ops = caseops.operator_byte_offsets(data)
        weight[(ops[:, None] + np.arange(3)).ravel()] = 0
    if U2581 in text:  # each became a 1-byte space in `decoded`: give that byte the 3 bytes of the original
        parts = [len(p.encode("utf-8")) for p in text.replace(U2581, " ").split(" ")]
        spaces = np.cumsum(np.array(parts[:-1], dtype=np.int64) + 1) - 1  # byte offsets of every space
        is_u2581 = np.array([s == U2581 for s in re.findall(f"[ {U2581}]", text)], dtype=bool)
        weight[spaces[is_u2581]] = 3
    cum = np.concatenate([[0], np.cumsum(weight)])
    ends = np.cumsum(lens)
    return cum[ends] - cum[ends - lens]


# -----------------------------------------------------------------------------
# audit: sidecar totals against the decoded, inverse-transformed text, document by document
# -----------------------------------------------------------------------------

@dataclass
class SidecarAudit:
    seq_len: int
    transform: str  # caseops_v1 or identity
    val_tokens: int = 0
    docs: int = 0
    sidecar_bytes: int = 0  # every val token
    decoded_bytes: int = 0  # every val doc: UTF-8 of the decoded, inverse-transformed text
    u2581_tokens: int = 0  # tokens whose sidecar counts a literal U+2581 (3 bytes) for a decoded space
    u2581_bytes: int = 0  # the +2 per U+2581 those tokens add
    bad_docs: int = 0
    mismatches: list[tuple[int, int, int, str]] = field(default_factory=list)  # (doc, sidecar, decoded, why)
    scored_tokens: int = 0
    scored_sidecar: int = 0  # the trainer's denominator: sidecar[1 : scored_tokens + 1]
    scored_decoded: int = 0  # the same range counted from the decoded docs (the cut doc from its token prefix)
    cut_doc: int | None = None  # the doc the seq_len truncation cuts, if any
    raw_doc_bytes: int | None = None  # manifest.json: UTF-8 bytes of the original val docs
    u2581_manifest: int | None = None  # manifest.json: literal U+2581 characters in the val docs
    problems: list[str] = field(default_factory=list)  # structural faults (alignment, BOS)

    @property
    def passed(self) -> bool:
        return (not self.problems and not self.bad_docs and self.sidecar_bytes == self.decoded_bytes + self.u2581_bytes
                and self.scored_sidecar == self.scored_decoded
                and self.raw_doc_bytes in (None, self.sidecar_bytes)
                and self.u2581_manifest in (None, self.u2581_bytes // 2))


def _load_pairs(data_dir: Path, vocab_size: int, result: SidecarAudit) -> tuple[np.ndarray, np.ndarray] | None:
    """Val tokens and sidecar, concatenated; None (with result.problems) if the files are not paired shard by shard."""
    vals, sides = val_token_files(data_dir), {p.name: p for p in sidecar_files(data_dir)}
    if not vals:
        raise FileNotFoundError(f"no val shards (fineweb_val_*.bin) in {data_dir}")
    for extra in sorted(set(sides) - {sidecar_name(v.name) for v in vals}):
        result.problems.append(f"{extra} has no val shard {extra.replace('_bytes_', '_', 1)}")
    tokens, counts = [], []
    for v in vals:
        s = sides.get(sidecar_name(v.name))
        if s is None:
            result.problems.append(f"{v.name} has no sidecar {sidecar_name(v.name)}")
            continue
        n_tok, n_side = read_shard_header(v), read_shard_header(s)
        if n_tok != n_side:
            result.problems.append(f"{s.name} has {n_side:,} entries but {v.name} has {n_tok:,} tokens: not aligned")
            continue
        tokens.append(load_shard(v, vocab_size))
        counts.append(load_shard(s))
    if result.problems:
        return None
    return np.concatenate(tokens).astype(np.int64), np.concatenate(counts).astype(np.int64)


def resolve_transform(sp: spm.SentencePieceProcessor, manifest: dict, transform: str = "auto") -> str:
    """auto: manifest.json's text_transform, else CaseOps when the tokenizer has the four operator pieces, else
    identity. Raises ValueError for an unknown name."""
    if transform == "auto":
        has_ops = all(sp.piece_to_id(op) != sp.unk_id() for op in caseops.OPERATORS)
        transform = manifest.get("text_transform") or (caseops.TRANSFORM_NAME if has_ops else "identity")
    if transform not in (caseops.TRANSFORM_NAME, "identity"):
        raise ValueError(f"unknown text transform {transform!r} (known: {caseops.TRANSFORM_NAME}, identity)")
    return transform


def audit_sidecar(data_dir: str | Path, sp: spm.SentencePieceProcessor, seq_len: int = 2048,
                  vocab_size: int | None = None, transform: str = "auto", manifest: dict | None = None,
                  max_mismatches: int = 5) -> SidecarAudit:
    """Prove the sidecar of data_dir: per doc, sidecar sum == UTF-8 bytes of the inverse-transformed sp.decode text
    (after the named U+2581 term), and the trainer's scored-range sum == the same count over that range.
    vocab_size: the trainer's VOCAB_SIZE (default: the manifest's, else the tokenizer's)."""
    data_dir, manifest = Path(data_dir), manifest or {}
    transform = resolve_transform(sp, manifest, transform)
    vocab_size = vocab_size or manifest.get("vocab_size") or sp.vocab_size()
    r = SidecarAudit(seq_len=seq_len, transform=transform)
    val_split = manifest.get("splits", {}).get("val", {})
    r.raw_doc_bytes, r.u2581_manifest = val_split.get("bytes"), val_split.get("u2581_chars")
    loaded = _load_pairs(data_dir, vocab_size, r)
    if loaded is None:
        return r
    tokens, side = loaded
    r.val_tokens, r.sidecar_bytes = int(tokens.size), int(side.sum())
    bos = np.flatnonzero(tokens == BOS_ID)
    if tokens[0] != BOS_ID:
        r.problems.append("the val stream does not start with BOS: documents are not delimited (BOS-less shards)")
        return r
    if (nz := bos[side[bos] != 0]).size:
        r.problems.append(f"{nz.size:,} BOS positions have nonzero sidecar bytes (first at val position {int(nz[0])})")
    usable = (tokens.size - 1) // seq_len * seq_len
    r.scored_tokens, r.scored_sidecar = usable, int(side[1:usable + 1].sum())
    ends = np.append(bos[1:], tokens.size)
    r.docs = int(bos.size)
    piece_bytes = decoded_piece_bytes(sp)
    u2581_in_piece = np.array([sp.id_to_piece(i).count(U2581) for i in range(sp.vocab_size())], dtype=np.int64)
    transformed = transform == caseops.TRANSFORM_NAME
    texts = sp.decode([tokens[s + 1:e].tolist() for s, e in zip(bos, ends, strict=True)])
    docs = tqdm(zip(bos, ends, texts, strict=True), total=bos.size, desc="sidecar audit", unit="doc", disable=None,
                leave=False)  # FineWeb has 50,000 val docs
    for d, (s, e, text) in enumerate(docs):
        ids, claimed, why = tokens[s + 1:e], int(side[s:e].sum()), ""
        try:
            n = len((caseops.decode(text) if transformed else text).encode("utf-8"))
        except caseops.CaseOpsError as err:
            n, why = 0, f"not CaseOps text: {err}"
        try:  # the ids-only rule per token; where the sidecar exceeds it by 2 per '▁' the doc had a literal U+2581
            per_token = token_original_bytes(text, ids, sp, piece_bytes, transformed)
        except SidecarError as err:
            per_token, why = np.zeros(ids.size, dtype=np.int64), why or str(err)
        extra = side[s + 1:e] - per_token
        u2581 = (extra > 0) & (extra % 2 == 0) & (extra <= 2 * u2581_in_piece[ids])
        u2581_bytes = int(extra[u2581].sum())
        r.u2581_tokens += int(u2581.sum())
        r.u2581_bytes += u2581_bytes
        r.decoded_bytes += n
        if not why and claimed != n + u2581_bytes:
            why = f"sidecar sum {claimed:,} != decoded {n:,} bytes" + (f" + {u2581_bytes} for U+2581" if u2581_bytes else "")
        if why:
            r.bad_docs += 1
            if len(r.mismatches) < max_mismatches:
                r.mismatches.append((d, claimed, n, f"{why}; text {text[:50]!r}"))
        if e <= usable + 1:
            r.scored_decoded += n + u2581_bytes
        elif s <= usable:  # the doc the truncation cuts: its scored prefix (positions s+1..usable), token by token
            r.cut_doc, k = d, usable - s
            r.scored_decoded += int(per_token[:k].sum() + extra[:k][u2581[:k]].sum())
    return r


def report_lines(r: SidecarAudit) -> list[str]:
    lines = [f"byte sidecar: {SIDECAR_GLOB}  (transform {r.transform}; sidecar rule: docs/data.md)"]
    lines += [f"FAIL: {p}" for p in r.problems]
    if r.problems and not r.val_tokens:
        return lines
    lines += [
        f"val tokens / docs:             {r.val_tokens:>12,} / {r.docs:,}",
        f"sidecar bytes (all val):       {r.sidecar_bytes:>12,}",
        f"decoded bytes (all val docs):  {r.decoded_bytes:>12,}  (UTF-8 of the inverse-transformed sp.decode text)",
        f"  U+2581 term: {r.u2581_tokens:,} tokens, +{r.u2581_bytes:,} bytes (a literal U+2581 decodes as a space)",
        f"docs whose sidecar sum != decoded bytes: {r.bad_docs:,} of {r.docs:,}",
    ]
    lines += [f"  MISMATCH doc {d}: sidecar {sc:,} bytes, decoded {dec:,}: {why}" for d, sc, dec, why in r.mismatches]
    if r.raw_doc_bytes is not None:
        lines.append(f"original val doc bytes (manifest.json) {r.raw_doc_bytes:,} "
                     f"{'==' if r.raw_doc_bytes == r.sidecar_bytes else '!='} sidecar bytes {r.sidecar_bytes:,}")
    if r.u2581_manifest is not None:
        lines.append(f"literal U+2581 in val docs (manifest.json) {r.u2581_manifest:,} vs U+2581 term "
                     f"{r.u2581_bytes // 2:,}")
    cut = f"doc {r.cut_doc} cut by the truncation, its scored prefix counted per token" if r.cut_doc is not None \
        else "no doc cut"
    lines += [
        f"scored tokens (seq_len {r.seq_len}):  {r.scored_tokens:>12,}  ({cut})",
        f"scored sidecar bytes (trainer): {r.scored_sidecar:>12,}  (sum of sidecar[1:{r.scored_tokens + 1:,}])",
        f"scored decoded bytes:           {r.scored_decoded:>12,}",
    ]
    if r.scored_tokens:
        lines.append(f"tokens/byte {r.scored_tokens / max(r.scored_sidecar, 1):.6f}   bytes/token "
                     f"{r.scored_sidecar / r.scored_tokens:.6f}   (val_bpb = val_loss / ln 2 * tokens/byte)")
    verdict = "PASS" if r.passed else "FAIL"
    lines.append(f"{verdict}: sidecar {r.sidecar_bytes:,} {'==' if r.passed else 'vs'} decoded {r.decoded_bytes:,} "
                 f"+ U+2581 {r.u2581_bytes:,}; scored {r.scored_sidecar:,} {'==' if r.passed else 'vs'} "
                 f"{r.scored_decoded:,}")
    return lines
