"""Independent check of the bpb denominator: decode the scored val tokens to text and count UTF-8 bytes.

    python tools/bpb_audit.py --data-dir data/datasets/builtin_sp1024 --tokenizer data/tokenizers/builtin_1024_bpe.model
    python tools/bpb_audit.py --data-dir data/datasets/builtin_caseops_sp1024 \
        --tokenizer data/tokenizers/builtin_caseops_1024_bpe.model

The trainer's byte count (docs/data.md) comes from per-piece lookup tables (data/shards.py: build_byte_luts and
target_bytes). This tool takes exactly the tokens the trainer scores (load_val_tokens: the tail partial
sequence dropped; targets = tokens[1:], previous = tokens[:-1]), splits them into docs at BOS, decodes each doc
with sp.decode and counts the bytes of the text. Where the two rules legitimately differ the difference is
listed as a named reconciliation term with its counts; PASS only if every doc's LUT bytes equal its decoded
bytes after those terms. Exit 0 PASS, 1 FAIL, 2 bad input. Wrong byte counts have produced fake records
upstream (issue #897: no standalone '▁' piece; Scylla #1271: byte-fallback counted as U+FFFD).

A dataset with a byte sidecar (fineweb_val_bytes_*.bin, CaseOps) is scored from it, not the LUT, so then the audit
proves the sidecar (data/sidecar.py): each val doc's sidecar sum equals the UTF-8 bytes of its decoded, inverse-
transformed text, and so does the trainer's scored-range sum. A tokenizer not named by manifest.json is refused.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import sentencepiece as spm
import torch

from data import caseops, sidecar
from data.shards import BOS_ID, build_byte_luts, load_shard, load_val_tokens, shard_files, target_bytes
from data.tokenize_docs import file_sha256


class AuditError(ValueError):
    """Missing or unreadable input; printed as one line, exit 2."""


@dataclass
class Reconciliation:
    """A rule where decoding and the LUT legitimately count the same tokens differently."""
    name: str
    why: str
    tokens: int = 0
    decoded_bytes: int = 0  # what sp.decode's text has for these tokens
    lut_bytes: int = 0  # what the LUT counts for them


@dataclass
class AuditResult:
    seq_len: int
    vocab_size: int
    val_tokens: int  # all val tokens, before the seq_len truncation
    scored_tokens: int
    docs: int  # doc segments in the scored stream (the last may be cut by the truncation)
    last_doc_truncated: bool
    lut_bytes: int
    decoded_bytes: int
    terms: list[Reconciliation]
    mismatches: list[tuple[int, int, int, str]] = field(default_factory=list)  # (doc, lut, reconciled, text head)
    decoded_bytes_all_val: int = 0  # every val doc decoded, untruncated
    raw_doc_bytes: int | None = None  # manifest.json: UTF-8 bytes of the raw val doc texts

    @property
    def reconciled_bytes(self) -> int:
        return self.decoded_bytes - sum(t.decoded_bytes - t.lut_bytes for t in self.terms)

    @property
    def passed(self) -> bool:
        return self.reconciled_bytes == self.lut_bytes and not self.mismatches


def _segments(ids: np.ndarray) -> np.ndarray:
    """Start offsets of docs in a token stream: 0 and every BOS."""
    return np.unique(np.concatenate([[0], np.flatnonzero(ids == BOS_ID)]))


def _utf8_len(texts: list[str]) -> np.ndarray:
    return np.array([len(t.encode("utf-8")) for t in texts], dtype=np.int64)


def load_inputs(data_dir: Path, tokenizer: Path) -> tuple[spm.SentencePieceProcessor, dict]:
    """The tokenizer and the dataset's manifest.json ({} if none); refuses a tokenizer the manifest does not name."""
    if not data_dir.is_dir():
        raise AuditError(f"{data_dir}: no such dataset dir")
    if not tokenizer.is_file():
        raise AuditError(f"{tokenizer}: no such tokenizer model")
    try:
        sp = spm.SentencePieceProcessor(model_file=str(tokenizer))
    except (OSError, RuntimeError) as e:
        raise AuditError(f"{tokenizer}: not a SentencePiece model ({str(e).splitlines()[0]})") from None
    manifest_path = data_dir / "manifest.json"
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8")) if manifest_path.is_file() else {}
    except (OSError, ValueError) as e:
        raise AuditError(f"{manifest_path}: not readable JSON ({e})") from None
    if (want := manifest.get("tokenizer_sha256")) and want != (got := file_sha256(tokenizer)):
        raise AuditError(f"{tokenizer} has sha256 {got}, but {manifest_path} names tokenizer_sha256 {want}: "
                         f"not the tokenizer these shards were made with")
    return sp, manifest


def audit(data_dir: str | Path, tokenizer: str | Path, seq_len: int = 2048, vocab_size: int | None = None,
          max_mismatches: int = 5) -> AuditResult:
    """Count the scored val bytes twice (LUT and decoded text) and reconcile; see the module docstring."""
    data_dir, tokenizer = Path(data_dir), Path(tokenizer)
    sp, manifest = load_inputs(data_dir, tokenizer)
    vocab_size = vocab_size or manifest.get("vocab_size") or sp.vocab_size()
    pattern = str(data_dir / sidecar.VAL_TOKEN_GLOB)
    try:
        tokens = load_val_tokens(pattern, seq_len, vocab_size).numpy()
        full = np.concatenate([load_shard(f, vocab_size) for f in shard_files(pattern)])
        luts = build_byte_luts(sp, vocab_size)
    except (FileNotFoundError, ValueError) as e:  # ShardError is a ValueError
        raise AuditError(str(e)) from None
    if sp.vocab_size() < vocab_size and int(full.max()) >= sp.vocab_size():
        raise AuditError(f"val tokens use id {int(full.max())} but {tokenizer} has only {sp.vocab_size()} pieces")

    # The trainer's count, through the trainer's own functions.
    t = torch.from_numpy(tokens)
    per_token = target_bytes(t[:-1], t[1:], luts).numpy()
    targets = tokens[1:]

    # The independent count: split the scored targets into docs at BOS, decode each doc, count UTF-8 bytes.
    starts = _segments(targets)
    ends = np.append(starts[1:], targets.size)
    docs = [targets[s:e].tolist() for s, e in zip(starts, ends, strict=True)]
    decoded = sp.decode(docs)
    decoded_per_doc = _utf8_len(decoded)
    lut_per_doc = np.add.reduceat(per_token, starts)
    doc_of = np.repeat(np.arange(starts.size), ends - starts)  # target position -> doc index
    adjust = np.zeros(starts.size, dtype=np.int64)  # per doc: decoded - LUT explained by the terms

    base, leading_space, boundary = (x.numpy() for x in luts)
    prev = tokens[:-1]
    # (a) A '▁' piece right after BOS: the LUT does not count its space (previous token is a boundary) and
    # sp.decode drops the '▁' that starts a sequence (remove_extra_whitespaces), so decode each alone to measure.
    lead = Reconciliation("leading '▁' right after BOS",
                          "LUT skips the space after a boundary token; sp.decode drops a sequence-initial '▁'")
    for pos in np.flatnonzero(leading_space[targets] & boundary[prev]):
        n_dec = len(sp.decode([int(targets[pos])]).encode("utf-8"))
        lead.tokens += 1
        lead.decoded_bytes += n_dec
        lead.lut_bytes += int(per_token[pos])
        adjust[doc_of[pos]] += n_dec - int(per_token[pos])
    # (b) Byte-fallback runs that are not valid UTF-8 (a character cut by the val truncation): the LUT counts
    # 1 byte per byte token, sp.decode renders each undecodable byte as U+FFFD (3 bytes).
    bad_runs = Reconciliation("invalid-UTF-8 byte-fallback runs",
                              "LUT counts 1 per byte token; sp.decode emits U+FFFD (3 bytes) per bad byte")
    is_byte = np.array([sp.is_byte(i) for i in range(sp.vocab_size())] + [False] * (len(base) - sp.vocab_size()))
    byte_mask = is_byte[targets]
    if byte_mask.any():
        edges = np.flatnonzero(np.diff(np.concatenate([[0], byte_mask.astype(np.int8), [0]])))
        for s, e in zip(edges[::2], edges[1::2], strict=True):
            run = targets[s:e].tolist()
            raw = bytes(int(sp.id_to_piece(i)[1:-1], 16) for i in run)  # pieces are '<0xNN>'
            try:
                raw.decode("utf-8")
                continue
            except UnicodeDecodeError:
                pass
            n_dec = len(sp.decode(run).encode("utf-8"))
            bad_runs.tokens += len(run)
            bad_runs.decoded_bytes += n_dec
            bad_runs.lut_bytes += int(per_token[s:e].sum())
            adjust[doc_of[s]] += n_dec - int(per_token[s:e].sum())

    mismatches = []
    for d in np.flatnonzero(decoded_per_doc - adjust != lut_per_doc)[:max_mismatches]:
        mismatches.append((int(d), int(lut_per_doc[d]), int(decoded_per_doc[d] - adjust[d]), decoded[d][:60]))

    # Information only: every val doc decoded (untruncated) vs the raw doc bytes the manifest recorded.
    tail = full[1 + starts[-1]:]  # the last scored doc, uncut, and any docs dropped by the truncation
    tail_starts = _segments(tail)
    tail_docs = [tail[s:e].tolist() for s, e in zip(tail_starts, np.append(tail_starts[1:], tail.size), strict=True)]
    decoded_all = int(decoded_per_doc[:-1].sum() + _utf8_len(sp.decode(tail_docs)).sum())
    raw = manifest.get("splits", {}).get("val", {}).get("bytes")

    return AuditResult(
        seq_len=seq_len, vocab_size=vocab_size, val_tokens=int(full.size), scored_tokens=int(targets.size),
        docs=int(starts.size), last_doc_truncated=bool(full.size > tokens.size and full[tokens.size] != BOS_ID),
        lut_bytes=int(per_token.sum()), decoded_bytes=int(decoded_per_doc.sum()), terms=[lead, bad_runs],
        mismatches=mismatches, decoded_bytes_all_val=decoded_all, raw_doc_bytes=raw)


def report(r: AuditResult, data_dir: Path) -> str:
    lines = [f"bpb_audit: {data_dir}  (seq_len {r.seq_len}, vocab {r.vocab_size})"]
    lines += [
        f"scored tokens:                 {r.scored_tokens:>12,}  (of {r.val_tokens:,} val tokens; "
        f"{r.val_tokens - r.scored_tokens:,} dropped by the seq_len truncation, incl. the unscored first BOS)",
        f"docs in the scored stream:     {r.docs:>12,}  (last doc cut by the truncation: "
        f"{'yes' if r.last_doc_truncated else 'no'})",
        f"LUT bytes (train_gpt; scored): {r.lut_bytes:>12,}",
        f"decoded bytes (sp.decode):     {r.decoded_bytes:>12,}",
        f"raw difference decoded - LUT:  {r.decoded_bytes - r.lut_bytes:>+12,}",
        "reconciliation terms (decoded - LUT explained by a stated rule):",
    ]
    for t in r.terms:
        lines.append(f"  {t.name}: {t.tokens:,} tokens, decode counts {t.decoded_bytes:,} bytes, "
                     f"LUT counts {t.lut_bytes:,} -> {t.decoded_bytes - t.lut_bytes:+,} ({t.why})")
    lines.append(f"reconciled decoded bytes:      {r.reconciled_bytes:>12,}  "
                 f"(difference to LUT {r.reconciled_bytes - r.lut_bytes:+,})")
    for d, lut, dec, head in r.mismatches:
        lines.append(f"  MISMATCH doc {d}: LUT {lut:,} bytes, reconciled decoded {dec:,}: {head!r}")
    lines.append(f"tokens/byte {r.scored_tokens / r.lut_bytes:.6f}   bytes/token {r.lut_bytes / r.scored_tokens:.6f}"
                 f"   (val_bpb = val_loss / ln 2 * tokens/byte)")
    if r.raw_doc_bytes is not None:
        delta = r.decoded_bytes_all_val - r.raw_doc_bytes
        lines.append(f"info: raw val doc bytes (manifest.json) {r.raw_doc_bytes:,} vs all val docs decoded "
                     f"{r.decoded_bytes_all_val:,}: {delta:+,} ({delta / r.raw_doc_bytes:+.2%}; NFKC + whitespace "
                     f"normalization: newlines and runs of spaces become one space)")
    verdict = "PASS" if r.passed else "FAIL"
    lines.append(f"{verdict}: LUT bytes {r.lut_bytes:,} {'==' if r.passed else '!='} reconciled decoded bytes "
                 f"{r.reconciled_bytes:,}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data-dir", type=Path, required=True,
                    help="dataset dir with fineweb_val_*.bin (and fineweb_val_bytes_*.bin for a sidecar dataset)")
    ap.add_argument("--tokenizer", type=Path, required=True, help="SentencePiece .model the shards were made with")
    ap.add_argument("--seq-len", type=int, default=2048, help="eval sequence length (sets the val truncation)")
    ap.add_argument("--vocab-size", type=int, default=None,
                    help="the trainer's VOCAB_SIZE (LUT size; default: manifest.json's, else the tokenizer's)")
    ap.add_argument("--transform", choices=("auto", caseops.TRANSFORM_NAME, "identity"), default="auto",
                    help="sidecar datasets: the text transform to invert (auto: manifest.json, else CaseOps if the "
                         "tokenizer has its operator pieces)")
    args = ap.parse_args(argv)
    try:
        if sidecar.sidecar_files(args.data_dir):
            sp, manifest = load_inputs(args.data_dir, args.tokenizer)
            try:
                result = sidecar.audit_sidecar(args.data_dir, sp, args.seq_len, args.vocab_size, args.transform, manifest)
            except (FileNotFoundError, ValueError) as e:  # ShardError is a ValueError
                raise AuditError(str(e)) from None
            print("\n".join([f"bpb_audit: {args.data_dir}  (seq_len {args.seq_len})", *sidecar.report_lines(result)]))
        else:
            result = audit(args.data_dir, args.tokenizer, args.seq_len, args.vocab_size)
            print(report(result, args.data_dir))
    except AuditError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0 if result.passed else 1


if __name__ == "__main__":
    sys.exit(main())
