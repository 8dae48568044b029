"""Docs JSONL -> SentencePiece BPE tokenizer + upstream-format token shards.

    python data/tokenize_docs.py --docs DOCS.jsonl --vocab-size 1024 --num-val-docs 50000 \\
        --out data/datasets/mine_sp1024 --tokenizer-out data/tokenizers/mine_1024_bpe

Follows upstream's exporter (data/download_hf_docs_and_tokenize.py in openai/parameter-golf): the same
SentencePiece trainer settings, every doc written as [BOS] + sp.encode(text) with no EOS, val = the first K docs,
train = the rest, docs packed across shard boundaries, shards named fineweb_{val,train}_%06d.bin. Two deliberate
differences, both stated in --help: the tokenizer trains on train docs only unless --tokenizer-sees-val, and
docs longer than SentencePiece's sentence limit are split for training instead of silently dropped.
Shards are written and read by data/shards.py (write_shard, load_shard).

--caseops builds a CaseOps dataset (record N's lossless-case tokenizer; docs/data.md): every doc goes through
data/caseops.encode before the tokenizer (training and export), the four operator characters are user-defined pieces
with ids 4..7, the tokenizer does no normalization (identity, whitespace kept) so its tokens decode to exactly the
encoded text, and each val shard gets a byte sidecar fineweb_val_bytes_%06d.bin (data/sidecar.py) whose entries sum to
each doc's original UTF-8 bytes.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import re
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import sentencepiece as spm
from tqdm import tqdm

from data import caseops, sidecar
from data.shards import BOS_ID, write_shard

DEFAULT_SHARD_TOKENS = 10**8  # upstream SHARD_SIZE
# Upstream's SentencePiece trainer settings, exactly (docs/data.md). minloglevel only silences the trainer's log spam.
SP_TRAINER_SETTINGS: dict[str, object] = dict(
    model_type="bpe", byte_fallback=True, split_digits=True, normalization_rule_name="nmt_nfkc",
    add_dummy_prefix=False, character_coverage=0.999, pad_id=0, bos_id=BOS_ID, eos_id=2, unk_id=3,
    hard_vocab_limit=False,
)
NUM_META_PIECES = 4 + 256  # pad/bos/eos/unk + one piece per byte (byte_fallback)
# CaseOps: the operators are whole pieces (ids 4..7, never split or byte-fallen-back), and no normalization: nmt_nfkc
# rewrites text (NFKC: "ﬁ" -> "fi", "½" -> "1⁄2"; runs of whitespace -> one space; leading/trailing whitespace
# dropped), so its tokens could not be mapped back to the document's bytes. With identity + whitespace kept, the
# tokens decode to exactly the encoded text (one exception, a literal U+2581; data/sidecar.py).
CASEOPS_TRAINER_OVERRIDES: dict[str, object] = dict(
    normalization_rule_name="identity", remove_extra_whitespaces=False, user_defined_symbols=list(caseops.OPERATORS))
CASEOPS_OPERATOR_IDS = {caseops.OPERATOR_NAMES[op]: 4 + i for i, op in enumerate(caseops.OPERATORS)}
# The trainer silently skips any sentence longer than max_sentence_length (4192 bytes, checked before
# normalization); we cut longer docs at whitespace into chunks below that, with margin.
TRAINER_MAX_SENTENCE_BYTES = 4096
ENCODE_BATCH_DOCS = 1024  # upstream MATCHED_FINEWEB_SP_BATCH_SIZE default


class DocsError(ValueError):
    """Bad user input (docs file, split sizes, vocab size); main() prints it as one line."""


def iter_docs(path: Path) -> Iterator[str]:
    """The "text" field of each JSONL line; errors name file:line."""
    if not path.is_file():
        raise DocsError(f"{path}: no such docs file")
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DocsError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
            if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                raise DocsError(f'{path}:{lineno}: expected a JSON object with a string field "text"')
            text = obj["text"]
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:
                raise DocsError(f"{path}:{lineno}: text is not encodable as UTF-8 (lone surrogate?)") from None
            yield text


def count_docs(path: Path) -> int:
    """Number of docs in a JSONL file (validates every line)."""
    return sum(1 for _ in iter_docs(path))


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_json_atomic(path: Path, obj: object) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def trainer_sentences(texts: Iterable[str]) -> Iterator[str]:
    """What the SentencePiece trainer sees: upstream's cleaning (NUL -> space, strip, skip empty), with docs
    over the trainer's sentence limit cut at whitespace (BPE pieces never span whitespace, so cutting there
    costs only the '▁' of one word per chunk) instead of being dropped."""
    for text in texts:
        text = text.replace("\x00", " ").strip()
        if not text:
            continue
        if len(text.encode("utf-8")) <= TRAINER_MAX_SENTENCE_BYTES:
            yield text
            continue
        chunk, size = [], 0
        for part in re.split(r"(\s+)", text):
            n = len(part.encode("utf-8"))
            if size + n > TRAINER_MAX_SENTENCE_BYTES and chunk:
                if (joined := "".join(chunk).strip()):
                    yield joined
                chunk, size = [], 0
            while n > TRAINER_MAX_SENTENCE_BYTES:  # one huge "word" (URL, base64): cut by characters
                head = part.encode("utf-8")[:TRAINER_MAX_SENTENCE_BYTES].decode("utf-8", errors="ignore")
                if head.strip():
                    yield head
                part = part[len(head):]
                n = len(part.encode("utf-8"))
            chunk.append(part)
            size += n
        if (joined := "".join(chunk).strip()):
            yield joined


def train_tokenizer(texts: Iterable[str], vocab_size: int, model_prefix: str | Path, caseops_mode: bool = False) -> Path:
    """Train SentencePiece BPE (upstream settings) on texts; write MODEL_PREFIX.model/.vocab atomically and
    return the .model path. Deterministic: same texts, same model bytes. caseops_mode: texts are raw docs, trained
    on as caseops.encode(text) with CASEOPS_TRAINER_OVERRIDES."""
    meta = NUM_META_PIECES + (len(caseops.OPERATORS) if caseops_mode else 0)
    if vocab_size <= meta:
        raise DocsError(f"vocab size {vocab_size} is too small: byte-fallback BPE needs more than {meta} "
                        f"ids (4 special{' + 4 CaseOps operator' if caseops_mode else ''} + 256 byte pieces) plus one "
                        f"per character of the text")
    if vocab_size > 2**16:
        raise DocsError(f"vocab size {vocab_size} does not fit the uint16 shard format (max 65536)")
    prefix = Path(model_prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    model = io.BytesIO()  # model_writer, not model_prefix: the model bytes then do not embed an output path
    settings = {**SP_TRAINER_SETTINGS, **(CASEOPS_TRAINER_OVERRIDES if caseops_mode else {})}
    if caseops_mode:
        texts = map(caseops.encode, texts)
    try:
        spm.SentencePieceTrainer.train(sentence_iterator=trainer_sentences(texts), model_writer=model,
                                       vocab_size=vocab_size, minloglevel=2, **settings)
    except RuntimeError as e:
        msg = str(e)
        if m := re.search(r"smaller than required_chars\. (\d+) vs (\d+)", msg):
            raise DocsError(f"vocab size {m[1]} is too small for this text: SentencePiece needs at least {m[2]} "
                            f"({meta - 256} special + 256 byte pieces + {int(m[2]) - meta} characters)") from None
        raise DocsError(f"SentencePiece training failed: {msg.splitlines()[0] if msg else type(e).__name__}") from None
    sp = spm.SentencePieceProcessor(model_proto=model.getvalue())
    if caseops_mode and {n: sp.piece_to_id(op) for op, n in caseops.OPERATOR_NAMES.items()} != CASEOPS_OPERATOR_IDS:
        raise DocsError(f"the CaseOps operators did not get ids {CASEOPS_OPERATOR_IDS}")  # a sentencepiece change
    # The .vocab file the trainer writes itself with a model_prefix: "piece<TAB>score" per id, byte-identical.
    vocab = "".join(f"{sp.id_to_piece(i)}\t{sp.get_score(i):g}\n" for i in range(sp.vocab_size()))
    model_path, vocab_path = prefix.with_name(prefix.name + ".model"), prefix.with_name(prefix.name + ".vocab")
    for path, data in ((vocab_path, vocab.encode("utf-8")), (model_path, model.getvalue())):
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)
    return model_path


class _ShardWriter:
    """Packs [BOS]+doc token runs into fixed-size shards of one split (docs straddle shard boundaries)."""

    def __init__(self, out_dir: Path, split: str, shard_tokens: int):
        self.out_dir, self.split, self.shard_tokens = out_dir, split, shard_tokens
        self.buf = np.empty(0, dtype=np.uint16)  # allocated per shard and freed after it: one split live at a time
        self.fill = 0
        self.stats: dict = {"docs": 0, "tokens": 0, "bytes": 0, "files": []}

    def add(self, tokens: np.ndarray, text_bytes: int) -> None:
        """tokens: one doc's [BOS]+ids (for the val_bytes writer: its sidecar entries, one per token)."""
        self.stats["docs"] += 1
        self.stats["bytes"] += text_bytes
        self.stats["tokens"] += tokens.size
        pos = 0
        while pos < tokens.size:
            n = min(tokens.size - pos, self.shard_tokens - self.fill)
            if self.buf.size == 0:
                self.buf = np.empty(self.shard_tokens, dtype=np.uint16)
            self.buf[self.fill:self.fill + n] = tokens[pos:pos + n]
            self.fill += n
            pos += n
            if self.fill == self.shard_tokens:
                self.flush()

    def flush(self) -> None:
        if self.fill == 0:
            return
        path = self.out_dir / f"fineweb_{self.split}_{len(self.stats['files']):06d}.bin"
        write_shard(path, self.buf[:self.fill])
        self.stats["files"].append({"name": path.name, "tokens": self.fill, "sha256": file_sha256(path)})
        self.fill = 0
        self.buf = np.empty(0, dtype=np.uint16)


def export_dataset(docs: Iterable[str], sp: spm.SentencePieceProcessor, num_val_docs: int, out_dir: str | Path,
                   shard_tokens: int = DEFAULT_SHARD_TOKENS, caseops_mode: bool = False) -> dict:
    """Tokenize docs in order as [BOS]+sp.encode(text); the first num_val_docs go to val shards, the rest to
    train shards. Removes stale shards first. Returns {"val": stats, "train": stats} with docs, tokens,
    bytes (UTF-8 of the raw texts) and files [{name, tokens, sha256}]. caseops_mode: docs are tokenized as
    caseops.encode(text) and val also gets byte sidecars, aligned token for token and shard for shard (val stats
    gain sidecar_files, sidecar_bytes and u2581_chars)."""
    if num_val_docs < 1:
        raise DocsError(f"--num-val-docs must be >= 1, got {num_val_docs}")
    if shard_tokens < 1:
        raise DocsError(f"--shard-tokens must be >= 1, got {shard_tokens}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.glob("fineweb_*_*.bin"):
        stale.unlink()
    splits = ("val", "train") + (("val_bytes",) if caseops_mode else ())
    writers = {s: _ShardWriter(out_dir, s, shard_tokens) for s in splits}  # val_bytes: fineweb_val_bytes_%06d.bin
    bos, zero = np.array([BOS_ID], dtype=np.int64), np.zeros(1, dtype=np.int64)
    piece_bytes = sidecar.decoded_piece_bytes(sp) if caseops_mode else None
    index, u2581_chars = 0, 0
    batch: list[str] = []

    def encode_batch() -> None:
        nonlocal index, u2581_chars
        inputs = [caseops.encode(t) for t in batch] if caseops_mode else batch
        for text, encoded, ids in zip(batch, inputs, sp.encode(inputs, out_type=int), strict=True):
            is_val = index < num_val_docs
            if not is_val and writers["val"].fill:
                for name in ("val", "val_bytes") if caseops_mode else ("val",):  # sidecars split where val does
                    writers[name].flush()
            tokens = np.concatenate([bos, np.asarray(ids, dtype=np.int64)])
            n_bytes = len(text.encode("utf-8"))
            writers["val" if is_val else "train"].add(tokens, n_bytes)
            if is_val and caseops_mode:
                try:
                    counts = sidecar.token_original_bytes(encoded, ids, sp, piece_bytes)
                except sidecar.SidecarError as e:
                    raise DocsError(f"val doc {index}: {e}") from None
                if int(counts.sum()) != n_bytes:  # cannot happen by construction; never write a wrong sidecar
                    raise DocsError(f"val doc {index}: sidecar sums to {int(counts.sum())}, the doc has {n_bytes} bytes")
                writers["val_bytes"].add(np.concatenate([zero, counts]), int(counts.sum()))
                u2581_chars += text.count(sidecar.U2581)
            index += 1
        batch.clear()

    for text in tqdm(docs, desc="tokenize", unit="doc", disable=None, leave=False):
        batch.append(text)
        if len(batch) == ENCODE_BATCH_DOCS:
            encode_batch()
    encode_batch()
    for w in writers.values():
        w.flush()
    if index <= num_val_docs:
        raise DocsError(f"--num-val-docs {num_val_docs} leaves no train docs: the docs file has {index} docs")
    stats = {s: writers[s].stats for s in ("val", "train")}
    if caseops_mode:
        stats["val"].update(sidecar_files=writers["val_bytes"].stats["files"],
                            sidecar_bytes=writers["val_bytes"].stats["bytes"], u2581_chars=u2581_chars)
        if u2581_chars:
            print(f"note: the val docs hold {u2581_chars} literal U+2581 characters; SentencePiece decodes them as "
                  f"spaces, so bpb_audit lists them as a named term", file=sys.stderr)
    return stats


def build_dataset(docs_path: str | Path, vocab_size: int, num_val_docs: int, out_dir: str | Path,
                  model_prefix: str | Path, shard_tokens: int = DEFAULT_SHARD_TOKENS,
                  tokenizer_sees_val: bool = False, extra: dict | None = None, caseops_mode: bool = False) -> dict:
    """Docs JSONL -> tokenizer + shards + out_dir/manifest.json (written last, atomically: a manifest means a
    complete dataset). `extra` fields are merged into the manifest. caseops_mode: a CaseOps dataset (module
    docstring). Returns the manifest."""
    docs_path, out_dir = Path(docs_path), Path(out_dir)
    n_docs = count_docs(docs_path)
    if num_val_docs < 1 or num_val_docs >= n_docs:
        raise DocsError(f"--num-val-docs must be in [1, {n_docs - 1}]: {docs_path} has {n_docs} docs and train "
                        f"needs at least one")
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "manifest.json").unlink(missing_ok=True)

    def tokenizer_texts() -> Iterator[str]:
        for i, text in enumerate(iter_docs(docs_path)):
            if tokenizer_sees_val or i >= num_val_docs:
                yield text

    t0 = time.perf_counter()
    model_path = train_tokenizer(tokenizer_texts(), vocab_size, model_prefix, caseops_mode)
    t_tok = time.perf_counter() - t0
    sp = spm.SentencePieceProcessor(model_file=str(model_path))
    if sp.vocab_size() != vocab_size:  # hard_vocab_limit=False lets the trainer stop short on small text
        print(f"warning: tokenizer has {sp.vocab_size()} pieces, not the requested {vocab_size}; "
              f"train with VOCAB_SIZE={sp.vocab_size()}", file=sys.stderr)
    t0 = time.perf_counter()
    splits = export_dataset(iter_docs(docs_path), sp, num_val_docs, out_dir, shard_tokens, caseops_mode)
    t_exp = time.perf_counter() - t0
    manifest = {
        "vocab_size": sp.vocab_size(),
        "vocab_size_requested": vocab_size,
        "tokenizer": os.path.relpath(model_path.resolve(), out_dir.resolve()),
        "tokenizer_sha256": file_sha256(model_path),
        "bos_id": BOS_ID,
        "eos_appended": False,
        "tokenizer_trained_on": "train+val" if tokenizer_sees_val else "train",
        "docs_sha256": file_sha256(docs_path),
        "shard_tokens": shard_tokens,
        "splits": splits,
        "seconds": {"tokenizer": round(t_tok, 3), "export": round(t_exp, 3)},
        **(extra or {}),
    }
    if caseops_mode:
        manifest.update(caseops=True, text_transform=caseops.TRANSFORM_NAME, byte_sidecar=sidecar.SIDECAR_GLOB,
                        val_glob=sidecar.VAL_TOKEN_GLOB, operator_ids=CASEOPS_OPERATOR_IDS,
                        tokenizer_normalization="identity (whitespace kept)")
    write_json_atomic(out_dir / "manifest.json", manifest)
    return manifest


def split_summary(manifest: dict) -> str:
    s = manifest["splits"]
    return "  ".join(f"{k}: {s[k]['docs']:,} docs {s[k]['tokens']:,} tokens {s[k]['bytes']:,} bytes "
                     f"({len(s[k]['files'])} shard{'s' * (len(s[k]['files']) != 1)})" for k in ("train", "val"))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Tokenizer training text. By default only TRAIN docs. Upstream's exporter trains on docs from the\n"
               "top of the file and val is the first docs of that same file, so its tokenizer has seen the val\n"
               "text: val text leaks into the tokenizer (pieces fitted to the very text being scored).\n"
               "--tokenizer-sees-val reproduces upstream. Docs over SentencePiece's 4192-byte sentence limit are\n"
               "cut at whitespace for training (upstream's trainer silently skips them).",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--docs", type=Path, required=True, help='JSONL file, one object per line with a "text" field')
    ap.add_argument("--vocab-size", type=int, required=True, help="SentencePiece vocab size (e.g. 1024, 8192)")
    ap.add_argument("--num-val-docs", type=int, required=True,
                    help="the first K docs form the val split (FineWeb: 50000)")
    ap.add_argument("--out", type=Path, required=True, help="dataset dir for fineweb_{train,val}_*.bin + manifest.json")
    ap.add_argument("--tokenizer-out", type=Path, required=True,
                    help="model prefix: writes PREFIX.model and PREFIX.vocab")
    ap.add_argument("--shard-tokens", type=int, default=DEFAULT_SHARD_TOKENS,
                    help=f"tokens per shard (default {DEFAULT_SHARD_TOKENS:.0e}, as upstream)")
    ap.add_argument("--tokenizer-sees-val", action="store_true",
                    help="train the tokenizer on val docs too (upstream's behaviour; see below)")
    ap.add_argument("--caseops", action="store_true",
                    help="CaseOps dataset: lossless case transform, operator pieces 4..7, val byte sidecars "
                         "fineweb_val_bytes_*.bin (docs/data.md)")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    try:
        manifest = build_dataset(args.docs, args.vocab_size, args.num_val_docs, args.out, args.tokenizer_out,
                                 args.shard_tokens, args.tokenizer_sees_val, caseops_mode=args.caseops)
    except DocsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"tokenize_docs: vocab {manifest['vocab_size']} (tokenizer trained on {manifest['tokenizer_trained_on']}) "
          f"{split_summary(manifest)}  -> {args.out} in {time.perf_counter() - t0:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
