"""pgolf train_gpt.py: the Parameter Golf record stack in one file (<= 1,500 lines, enforced by a test).

Run: `torchrun --standalone --nproc_per_node=8 train_gpt.py` (8xH100) or `--nproc_per_node=2` on CPU; config is
the record's defaults, overridden by env vars (`SEED=42 torchrun ...`). Importing this file has no side effects.

Glossary: layer = a parameter block; pass = one execution of a layer; loop = a repeated span of layers.
doc = BOS + tokens; window = an eval context; chunk = the targets of a document a TTT step scores. bits / clip_range =
2**(bits-1)-1 / clip_sigmas / scale are the quantizer's terms; rank / world_size / master are the distributed ones.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import difflib
import glob
import hashlib
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
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import brotli
import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
import zstandard
from torch import Tensor, nn

# >>> inline local modules: data/shards.py, evals/phased_ttt.py, quant/lowbit.py, quant/lqer.py, quant/pack.py, quant/rans.py, quant/sdclip.py, quant/gptq.py, quant/codec.py (inlined by tools/build_record.py)

# ---- data/shards.py
# Token shards: the format, its one reader and writer, the val split, byte accounting, the train loaders, and
# the loading of a run's data (train_gpt.py imports them from here).
#
# Shard = 256 little-endian int32 header (magic, version, token count) + uint16 tokens. Every doc is [BOS]+tokens,
# no EOS, and docs run on across shard boundaries (docs/data.md).
#
# tools/build_record.py inlines this module into a record's single train_gpt.py, like quant/: it imports only the
# standard library, numpy, torch (and sentencepiece, lazily), never train_gpt or another local module, and has no
# module-level state.


SHARD_MAGIC, SHARD_VERSION, SHARD_HEADER_INTS = 20240520, 1, 256
# A dataset dir: train and val token shards, and for a transformed tokenizer (CaseOps) a byte sidecar per val shard
# (uint16 per val token: the original UTF-8 bytes that token stands for). "fineweb_val_*" would match the sidecars.
TRAIN_GLOB, VAL_GLOB, VAL_BYTES_GLOB = "fineweb_train_*.bin", "fineweb_val_[0-9]*.bin", "fineweb_val_bytes_*.bin"
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


def load_val_bytes(dataset_dir: Path, num_tokens: int) -> Tensor | None:
    """The val byte sidecar, if the dataset has one: shard i pairs with val shard i token for token, and it is cut
    like the val tokens (num_tokens = the truncated length). None for a plain dataset (bytes come from the LUTs)."""
    sidecars, shards = sorted(glob.glob(str(dataset_dir / VAL_BYTES_GLOB))), shard_files(str(dataset_dir / VAL_GLOB))
    if not sidecars:
        return None
    if len(sidecars) != len(shards) or any(read_shard_header(a) != read_shard_header(b) for a, b in zip(sidecars, shards)):
        raise ShardError(f"{dataset_dir}: the byte sidecars do not pair with the val shards token for token")
    return torch.from_numpy(np.concatenate([load_shard(f) for f in sidecars])[:num_tokens].astype(np.int64))


def build_byte_luts(sp, vocab_size: int) -> tuple[Tensor, Tensor, Tensor]:
    """Per-token byte tables from a SentencePiece model (docs/data.md): base UTF-8 bytes without a leading '▁',
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
    """Rank-disjoint shuffled training sequences over all train shards (after record P's loader).

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


def first_bos(tokens: np.ndarray, block: int = 1 << 16) -> int | None:
    """Index of the first BOS in tokens (scanned block by block, so a memmap is not read whole), None if there is none."""
    for lo in range(0, len(tokens), block):
        hits = np.flatnonzero(np.asarray(tokens[lo : lo + block]) == BOS_ID)
        if hits.size:
            return lo + int(hits[0])
    return None


class DocumentPackingLoader:
    """Contiguous document-packed training sequences, read in order (record N, PR #1855 lineage).

    All ranks walk the same sorted shard list in lock step, wrapping around after the last shard. A shard is read
    from its first BOS, so the first row after a shard change starts a document. Each next_batch(batch_seqs) takes
    the next world_size * (batch_seqs*seq_len + 1) tokens of the current shard; rank r gets the r-th run of
    batch_seqs*seq_len + 1 of them, cut into rows (x = run[:-1], y = run[1:]). When the shard's remainder is shorter
    than that, the remainder is dropped and the next shard starts. Ranks never share a token. There is no shuffling:
    the seed argument exists for a drop-in interface with ShuffledSequenceLoader and does not change the order, so
    seeds vary only the initialization.
    """

    def __init__(self, files: list[str], seq_len: int, vocab_size: int, seed: int = 0, rank: int = 0,
                 world_size: int = 1):
        if not files:
            raise ValueError("no train shards to read")
        if seq_len <= 0 or not 0 <= rank < world_size:
            raise ValueError(f"bad loader geometry: seq_len {seq_len}, rank {rank} of world_size {world_size}")
        self.files, self.seq_len, self.vocab_size = sorted(files), seq_len, vocab_size
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.sizes = [read_shard_header(f) for f in self.files]
        self.shard, self.pos, self.epoch = -1, 0, 0  # epoch: completed passes over the shard list
        self.tokens: np.ndarray | None = None  # the current shard (a memmap, validated when opened)

    def _next_shard(self, need: int) -> None:
        """Move to the next shard (wrapping) that holds `need` tokens from its first BOS on; an error if none does."""
        for _ in range(len(self.files)):
            if self.shard == len(self.files) - 1:
                self.epoch += 1
            self.shard = (self.shard + 1) % len(self.files)
            if self.sizes[self.shard] < need:
                continue
            tokens = load_shard(self.files[self.shard], self.vocab_size, mmap=True)
            start = first_bos(tokens)
            if start is not None and len(tokens) - start >= need:
                self.tokens, self.pos = tokens, start
                return
        raise ValueError(f"no train shard holds {need} tokens (world_size x (batch_seqs*seq_len + 1)) from its first "
                         f"BOS on; use fewer or shorter sequences per step")

    def next_batch(self, batch_seqs: int) -> tuple[Tensor, Tensor]:
        """(x, y) int64 [batch_seqs, seq_len], y = x shifted by one token."""
        span = batch_seqs * self.seq_len + 1
        need = self.world_size * span
        if self.tokens is None or len(self.tokens) - self.pos < need:
            self._next_shard(need)
        start = self.pos + self.rank * span
        buf = torch.from_numpy(np.array(self.tokens[start : start + span], dtype=np.int64))
        self.pos += need
        return buf[:-1].view(batch_seqs, self.seq_len), buf[1:].view(batch_seqs, self.seq_len)


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def load_tokenizer(path: Path, vocab_size: int):
    import sentencepiece as spm
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer {path} not found; download it with `python data/cached_challenge_fineweb.py "
                                f"--variant sp{vocab_size}` or build the offline set with `python data/builtin_corpus.py`")
    sp = spm.SentencePieceProcessor(model_file=str(path))
    if sp.vocab_size() != vocab_size:
        raise ValueError(f"tokenizer {path} has vocab {sp.vocab_size()} but VOCAB_SIZE={vocab_size}")
    return sp


@dataclass
class Data:
    """What a run reads: byte tables of the tokenizer, train shard paths, the val tokens (truncated as upstream)."""

    luts: tuple[Tensor, Tensor, Tensor]
    train_files: list[str]
    val_tokens: Tensor
    tokenizer_sha256: str
    val_bytes: Tensor | None = None  # the byte sidecar of a transformed tokenizer (CaseOps); None: the LUTs count

    def byte_total(self) -> int:
        """UTF-8 bytes of every scored target (the bpb denominator of a full eval)."""
        t = self.val_tokens
        return int(self.val_bytes[1:].sum() if self.val_bytes is not None else target_bytes(t[:-1], t[1:], self.luts).sum())


def load_data(dataset_dir: str | Path, tokenizer_file: str | Path, vocab_size: int, eval_seq_len: int) -> Data:
    """The one loader of a run's data, shared by the trainer and the tools (they pass a Config's dataset_dir,
    tokenizer_file, vocab_size and eval_seq_len). The tokenizer is part of the data: if the dataset's manifest.json
    names a tokenizer hash, a different tokenizer file is an error (its byte tables would make the bpb wrong even
    with the same vocab size)."""
    dataset_dir, tokenizer_file = Path(dataset_dir), Path(tokenizer_file)
    sp = load_tokenizer(tokenizer_file, vocab_size)
    sha = sha256_file(tokenizer_file)
    manifest = dataset_dir / "manifest.json"
    want = json.loads(manifest.read_text()).get("tokenizer_sha256") if manifest.is_file() else None
    if want and want != sha:
        raise ValueError(f"tokenizer {tokenizer_file} (sha256 {sha[:16]}...) is not the one {manifest} was built "
                         f"with (sha256 {want[:16]}...); bpb would be counted with the wrong byte tables")
    val = load_val_tokens(str(dataset_dir / VAL_GLOB), eval_seq_len, vocab_size)
    return Data(build_byte_luts(sp, vocab_size), shard_files(str(dataset_dir / TRAIN_GLOB)), val, sha,
                load_val_bytes(dataset_dir, val.numel()))


# ---- evals/phased_ttt.py
# Record N's phased score-first TTT with per-document LoRA (PR #1855; alpha/rank, warm A: PR #1767), the driver.
# The adapters live in the model (train_gpt.TTTAdapters, GPT.forward_logits(ids, lora)); this module never imports
# train_gpt (a record inlines it into train_gpt.py), so it receives the model, the config and the eval context.
#
# Documents: each BOS to the next BOS inclusive (its last target is that BOS), the last one to the end of the stream.
# They are sorted by length, cut into batches of TTT_BATCH_SIZE and processed longest batch first. In a batch every
# document has its own adapter slot; its targets go in chunks of TTT_CHUNK_SIZE, each predicted from the window of
# the last <= TTT_EVAL_SEQ_LEN document tokens ending at the chunk's end. A step SCORES the chunk of every document
# (its losses and bytes go into the sums) and THEN, unless it is a document's last chunk, takes one AdamW step on the
# sum over documents of the mean loss of that chunk. When PHASED_TTT_NUM_PHASES boundaries of scored documents are
# crossed, the base model itself takes one epoch of SGD on the first `boundary` scored documents (global_sgd), and
# the adapters start over.
#
# How this differs from record N, and why it is still score-first. N's ranks pull batches from a lock-file counter in
# /tmp and pause for a phase when a shared counter of scored documents crosses a boundary, so which rank runs which
# batch (and so which batches warm each adapter's A) depends on timing. Here the schedule is static and has no files:
# batch q of the queue runs on lane q % TTT_LANES, lane l on rank l % world_size; a lane keeps its adapters' A from
# batch to batch (B zeroed, optimizer state new: N's warm start), so lanes play N's GPUs (TTT_LANES=8 as N's 8) and
# the score does not depend on the world size. A round is TTT_LANES consecutive batches; a phase runs at the end of
# the first round after which its boundary is reached (N: after each rank's batch in flight). Every dependency points
# backwards in the processing order (batch q, chunk, slot, position; processing_order): a score uses the base
# weights after the phases of earlier rounds (trained only on documents scored in them), its lane's A after earlier
# batches of the lane, and its own slot's adapters after steps on earlier chunks of its own document; never a token
# after its target in its document, nor a document scored later. tools/check_legality.py tests exactly this.
# Other deviations: global SGD rows are EVAL_SEQ_LEN windows of the concatenated documents with the model's own
# document isolation (N: one flat row with cu_seqlens), one step per GLOBAL_TTT_CHUNK_TOKENS chunk on the mean loss
# of all its rows over all ranks (N: per 32 rows of a rank's share, the same for N's 16-row chunks); a short batch
# gets fresh adapters as in N, their A drawn like every A from a generator seeded by (SEED, phase, lane).


def find_docs(tokens: Tensor) -> list[tuple[int, int]]:
    """(start, length) of every document: a BOS to the next BOS inclusive, the last one to the end of the stream (a
    stream that does not start with a BOS starts with a document too; a lone final BOS has no target and is
    dropped). Document (s, l) holds targets s .. s+l-2, so the documents partition the stream's targets."""
    bos = torch.nonzero(tokens == BOS_ID).flatten().tolist()
    starts = bos if bos and bos[0] == 0 else [0, *bos]
    ends = [s + 1 for s in starts[1:]] + [tokens.numel()]
    return [(s, e - s) for s, e in zip(starts, ends) if e - s >= 2]


@dataclass(frozen=True)
class Plan:
    """The static schedule: documents, their indices by length (record N orders global-SGD documents so), the batch
    queue (document indices, each batch ascending by length) and the phase boundaries."""

    docs: list[tuple[int, int]]
    order: list[int]
    queue: list[list[int]]
    boundaries: list[int]


def make_plan(tokens: Tensor, batch_size: int, prefix_docs: int, num_phases: int) -> Plan:
    """Record N's batching: documents sorted by length (stable), cut into batches, longest batch first (ties keep
    their order); phase k's boundary is prefix * (k+1) / num_phases documents, prefix = min(docs, PREFIX_DOCS)."""
    docs = find_docs(tokens)
    order = sorted(range(len(docs)), key=lambda i: docs[i][1])
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    queue = sorted(batches, key=lambda b: -docs[b[-1]][1])
    prefix, phases = min(len(docs), prefix_docs), max(1, num_phases)
    return Plan(docs, order, queue, [prefix * (k + 1) // phases for k in range(phases)] if prefix > 0 else [])


@dataclass(frozen=True)
class Rows:
    """One step's input rows (one per document slot, padded after the valid tokens): x, y; the target index each
    position predicts; which positions are scored (this chunk) and trained on (a full chunk that is not the
    document's last)."""

    x: Tensor
    y: Tensor
    target: Tensor
    score: Tensor
    train: Tensor


def chunk_rows(tokens: Tensor, starts: Tensor, preds: Tensor, ci: int, chunk: int, window: int, ctx: int) -> Rows:
    """Rows for chunk ci of documents (starts, preds = number of targets; 0 for a padding slot). A document's window
    is [end - window, end) clipped at 0, end = the chunk's end (its last target + 1), and it starts the row."""
    nc = (preds + chunk - 1) // chunk
    end = torch.where(nc - 1 == ci, preds, (ci + 1) * chunk)
    lo = (end - window).clamp(min=0)
    pos = torch.arange(ctx)
    valid = (nc > ci)[:, None] & (pos < (end - lo)[:, None])
    local = lo[:, None] + pos  # document-local target position of each row position
    target = torch.where(valid, starts[:, None] + local, 0)
    x, y = torch.where(valid, tokens[target], 0), torch.where(valid, tokens[target + 1], 0)
    score = valid & (local >= ci * chunk)
    return Rows(x, y, target, score, score & (nc - 1 > ci)[:, None])


def context(ci: int, chunk: int, window: int, static: bool) -> int:
    """Row length of chunk ci: the longest window, min((ci+1) * chunk, window) (record N); with static shapes (a
    compiled forward) rounded up to a power of two of at least window/8, at most the window: four shapes for a
    power-of-two window, well inside the compiler's recompile limit."""
    n = min((ci + 1) * chunk, window)
    return min(max(1 << (n - 1).bit_length(), window // 8), window) if static else n


def context_sizes(chunk: int, window: int, static: bool) -> list[int]:
    """Every row length a TTT eval uses (its compile warm-up)."""
    return sorted({context(ci, chunk, window, static) for ci in range(-(-window // chunk))})


def batch_slots(n: int, batch_size: int, static: bool) -> int:
    """Rows of a batch of n documents: n; with static shapes (a compiled step) the next power of two, at most
    TTT_BATCH_SIZE, so that full batches share one shape and the short batch (record N's ordering puts the
    remainder, e.g. 16 of 50,000 documents, on the longest documents) is not padded to a full batch: on 8xH100 its
    ~2,000 steps at 64 rows would take ~4x as long as at 16 (tools/planner.py)."""
    return min(batch_size, 1 << max(n - 1, 0).bit_length()) if static else n


def slot_sizes(tokens: Tensor, cfg: object) -> list[int]:
    """Every row count a static-shape TTT eval of tokens uses (its compile warm-up; only the document count matters)."""
    plan = make_plan(tokens, cfg.ttt_batch_size, cfg.phased_ttt_prefix_docs, cfg.phased_ttt_num_phases)
    return sorted({batch_slots(len(b), cfg.ttt_batch_size, True) for b in plan.queue})


def score_rows(nll: Tensor, rows: Rows, ev: object, luts: tuple[Tensor, ...], nll_out: Tensor | None = None,
               hits_out: Tensor | None = None) -> Tensor:
    """float64 (nll, targets, bytes) of the scored positions (rows on nll's device), bytes from the byte sidecar or
    the LUTs as in train_gpt.score_windows; per-target outputs for tools/check_legality.py."""
    m = rows.score
    nbytes = target_bytes(rows.x, rows.y, luts) if ev.val_bytes is None else \
        ev.val_bytes[(rows.target + 1).cpu()].to(nll.device)
    nll = nll.double()
    if nll_out is not None or hits_out is not None:
        t = rows.target[m].cpu()
        if nll_out is not None:
            nll_out[t] = nll[m].cpu()
        if hits_out is not None:
            hits_out.index_add_(0, t, torch.ones(len(t), dtype=hits_out.dtype))
    return torch.stack((nll[m].sum(), m.sum().double(), nbytes[m].double().sum()))


def ttt_step(logits_fn: Callable, lora: nn.Module, opt: torch.optim.Optimizer, rows: Rows, ev: object,
             luts: tuple[Tensor, ...], nll_out: Tensor | None = None, hits_out: Tensor | None = None) -> Tensor:
    """Score, then adapt: the chunk's losses enter the sums from this forward, before the one AdamW step on the
    mean loss of each document's chunk (summed over documents) that this same forward's graph gives (record N)."""
    train = bool(rows.train.any())  # on the host, before the rows move to the device
    rows = Rows(*(t.to(ev.device) for t in (rows.x, rows.y, rows.target, rows.score, rows.train)))
    with torch.enable_grad(), ev.amp():  # also on a last chunk: one grad mode, so one compiled variant per shape
        logits = logits_fn(rows.x, lora)
    nll = F.cross_entropy(logits.float().flatten(0, 1), rows.y.flatten(), reduction="none").view_as(rows.y)
    sums = score_rows(nll.detach(), rows, ev, luts, nll_out, hits_out)
    if train:
        w = rows.train.float()
        opt.zero_grad(set_to_none=True)
        ((nll * w).sum(1) / w.sum(1).clamp(min=1)).sum().backward()
        opt.step()
    return sums


def run_batch(logits_fn: Callable, lora: nn.Module, slots: int, tokens: Tensor, docs: list[tuple[int, int]],
              cfg: object, ev: object, luts: tuple[Tensor, ...], nll_out: Tensor | None = None,
              hits_out: Tensor | None = None) -> Tensor:
    """One batch of documents in `slots` rows, chunk by chunk (ttt_step), with a new AdamW on the adapters (record
    N's settings: its optimizer state is reset for every batch)."""
    opt = torch.optim.AdamW(lora.parameters(), lr=cfg.ttt_lora_lr, betas=(cfg.ttt_beta1, cfg.ttt_beta2), eps=1e-10,
                            weight_decay=cfg.ttt_weight_decay)
    pad = slots - len(docs)
    starts = torch.tensor([s for s, _ in docs] + [0] * pad)
    preds = torch.tensor([n - 1 for _, n in docs] + [0] * pad)
    sums = torch.zeros(3, dtype=torch.float64, device=ev.device)
    C, W = cfg.ttt_chunk_size, cfg.ttt_eval_seq_len
    for ci in range(-(-int(preds.max()) // C)):
        rows = chunk_rows(tokens, starts, preds, ci, C, W, context(ci, C, W, ev.static_shapes))
        sums += ttt_step(logits_fn, lora, opt, rows, ev, luts, nll_out, hits_out)
    return sums


def global_sgd(model: nn.Module, toks: Tensor, cfg: object, ev: object) -> None:
    """Record N's global TTT phase: one epoch of full-parameter SGD (momentum GLOBAL_TTT_MOMENTUM) on the base model
    over toks, in chunks of GLOBAL_TTT_CHUNK_TOKENS cut into EVAL_SEQ_LEN rows that the ranks share. One step per
    chunk on the mean loss of all its rows (summed gradients over ranks), clipped to norm 1.0, lr
    GLOBAL_TTT_LR * cosine over the chunks; the last chunk is skipped."""
    L, C = cfg.eval_seq_len, cfg.global_ttt_chunk_tokens
    num_chunks, rows = -(-(toks.numel() - 1) // C), C // L
    lo, hi = rows * ev.rank // ev.world_size, rows * (ev.rank + 1) // ev.world_size
    params = list(model.parameters())
    opt = torch.optim.SGD(params, lr=cfg.global_ttt_lr, momentum=cfg.global_ttt_momentum)
    for ci in range(num_chunks - 1):
        for group in opt.param_groups:
            group["lr"] = cfg.global_ttt_lr * 0.5 * (1 + math.cos(math.pi * ci / max(num_chunks - 1, 1)))
        idx = ci * C + torch.arange(lo * L, hi * L).view(-1, L)
        x, y = toks[idx].to(ev.device), toks[idx + 1].to(ev.device)
        with torch.enable_grad(), ev.amp():
            loss = model(x, y) * (hi - lo) / rows if hi > lo else sum(p.sum() for p in params) * 0.0
        loss.backward()
        if dist.is_available() and dist.is_initialized():
            for p in params:
                if p.grad is not None:
                    dist.all_reduce(p.grad)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)


def adapter_seed(seed: int, phase: int, key: int) -> torch.Generator:
    """The generator of one adapter set's A: a function of (SEED, phase, lane) only, so equal on any world size."""
    return torch.Generator().manual_seed(int(np.random.SeedSequence([seed, phase, key]).generate_state(1)[0]))


def eval_phased_ttt(model: nn.Module, tokens: Tensor, cfg: object, ev: object, make_adapters: Callable,
                    logits_fn: Callable | None = None, log: Callable[..., None] | None = None,
                    nll_out: Tensor | None = None, hits_out: Tensor | None = None) -> tuple[float, float]:
    """(val_loss, val_bpb) of record N's phased score-first TTT over every target of tokens exactly once (module
    docstring). make_adapters(bsz, generator) builds train_gpt.TTTAdapters for the model; logits_fn(ids, lora) is
    the (compiled) model.forward_logits; log(kind, **values) writes a train_gpt.LOG_FORMATS line. The model's weights
    change (the global phases); its parameters' requires_grad is left True."""
    logits_fn, log, t0 = logits_fn or model.forward_logits, log or (lambda kind, **values: None), time.perf_counter()
    plan = make_plan(tokens, cfg.ttt_batch_size, cfg.phased_ttt_prefix_docs, cfg.phased_ttt_num_phases)
    bounds, n = plan.boundaries, tokens.numel() - 1
    prefix = bounds[-1] if bounds else 0
    log("ttt_start", docs=len(plan.docs), prefix=prefix, suffix=len(plan.docs) - prefix, phases=len(bounds),
        boundaries=bounds)
    luts = tuple(t.to(ev.device) for t in ev.luts)
    sums = torch.zeros(3, dtype=torch.float64, device=ev.device)
    rank = {d: i for i, d in enumerate(plan.order)}
    lanes: dict[int, nn.Module] = {}
    scored: list[int] = []  # length ranks of the scored documents
    phase = 0
    model.requires_grad_(False)
    for r0 in range(0, len(plan.queue), cfg.ttt_lanes):
        for q in range(r0, min(r0 + cfg.ttt_lanes, len(plan.queue))):
            lane, batch = q - r0, plan.queue[q]
            if lane % ev.world_size != ev.rank:
                continue
            slots = batch_slots(len(batch), cfg.ttt_batch_size, ev.static_shapes)
            if len(batch) < cfg.ttt_batch_size:  # a short batch gets fresh adapters (record N)
                lora = make_adapters(slots, adapter_seed(cfg.seed, phase, cfg.ttt_lanes + q))
            else:
                if lane not in lanes:
                    lanes[lane] = make_adapters(slots, adapter_seed(cfg.seed, phase, lane))
                lora = lanes[lane]
                lora.reset()
            sums += run_batch(logits_fn, lora, slots, tokens, [plan.docs[d] for d in batch], cfg, ev, luts, nll_out,
                              hits_out)
        scored += [rank[d] for b in plan.queue[r0 : r0 + cfg.ttt_lanes] for d in b]
        if phase < len(bounds) and len(scored) >= bounds[phase]:
            chosen = [plan.docs[plan.order[r]] for r in sorted(scored)[: bounds[phase]]]
            log("ttt_phase", k=phase + 1, phases=len(bounds), scored=len(scored), docs=len(chosen),
                seconds=time.perf_counter() - t0)
            model.requires_grad_(True)
            global_sgd(model, torch.cat([tokens[s : s + m] for s, m in chosen] or [tokens[:0]]), cfg, ev)
            model.requires_grad_(False)
            lanes, phase = {}, phase + 1
    model.requires_grad_(True)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(sums)
    if int(sums[1]) != n:
        raise RuntimeError(f"phased TTT scored {int(sums[1])} targets, expected each of {n} exactly once")
    nll, count, nbytes = (float(v) for v in sums)
    return nll / count, nll / math.log(2) / nbytes


def processing_order(tokens: Tensor, cfg: object) -> Tensor:
    """Every target index in the order the phased TTT scores it: batch in the queue, chunk, document slot,
    position. Every score depends only on targets earlier in this order (module docstring)."""
    plan, out = make_plan(tokens, cfg.ttt_batch_size, cfg.phased_ttt_prefix_docs, cfg.phased_ttt_num_phases), []
    C, W = cfg.ttt_chunk_size, cfg.ttt_eval_seq_len
    for batch in plan.queue:
        starts = torch.tensor([plan.docs[d][0] for d in batch])
        preds = torch.tensor([plan.docs[d][1] - 1 for d in batch])
        for ci in range(-(-int(preds.max()) // C)):
            rows = chunk_rows(tokens, starts, preds, ci, C, W, context(ci, C, W, False))
            out.append(rows.target[rows.score])
    return torch.cat(out)


# ---- quant/lowbit.py
# Low-bit codes for weights trained in the forward pass at that precision (experiments/pm1.py): "sign" (1 bit) and
# "ternary" (log2(3) bits), with an fp16 mean |w| scale: one per tensor for signs (a per-row scale would cost 16 / cols
# bits per weight, 0.125 at 128 columns, for a number the ±1 forward never reads), one per row for ternary codes (pure
# tensor functions).
#
# No Hessian and no error feedback: the model's forward already uses exactly these codes (times a fixed 1/sqrt(fan_in)),
# so storing them is lossless for that model. The scale only makes `dequantize` give a weight of the right magnitude
# (±scale); a model whose forward re-derives the codes from the dequantized weight gets the same codes back.


LOWBIT_EPS = 2.0**-24  # fp16's smallest subnormal: the floor of every scale, so a stored scale is never 0


def absmean_scale(w: Tensor) -> Tensor:
    """Per-row mean |w| in fp32 [rows, 1], floored at LOWBIT_EPS."""
    return w.detach().float().abs().mean(dim=1, keepdim=True).clamp_min(LOWBIT_EPS)


def _fp16_scale(s: Tensor) -> Tensor:
    return s.reshape(-1).clamp(LOWBIT_EPS, 65504.0).half()


def sign_quantize(w: Tensor) -> tuple[Tensor, Tensor]:
    """(codes, scale): codes int8 [rows, cols] = +1 where w >= 0 (so +0.0 and -0.0 are +1), -1 elsewhere (NaN -> -1);
    scale fp16 [1] = mean |w| of the whole tensor, in [2**-24, 65504]. Dequantized: codes * scale."""
    if w.ndim != 2:
        raise ValueError(f"sign_quantize: need a 2-D weight, got shape {tuple(w.shape)}")
    codes = torch.where(w.detach() >= 0, 1, -1).to(torch.int8)
    return codes, _fp16_scale(absmean_scale(w.reshape(1, -1)))


def ternary_codes(w: Tensor) -> Tensor:
    """BitNet b1.58 absmean ternary (Ma et al. 2024), per row: clamp(round(w / mean|w_row|), -1, 1), fp32 math."""
    return torch.round(w.detach().float() / absmean_scale(w)).clamp_(-1, 1)


def ternary_quantize(w: Tensor) -> tuple[Tensor, Tensor]:
    """(codes, scale): codes int8 [rows, cols] in {-1, 0, 1} (`ternary_codes`), scale fp16 [rows] = mean |w| of the
    row. Re-deriving codes from the dequantized codes * scale gives the same codes (a nonzero code is >= the new
    row mean, a zero stays zero), so a ternary forward reloads exactly."""
    if w.ndim != 2:
        raise ValueError(f"ternary_quantize: need a 2-D weight, got shape {tuple(w.shape)}")
    return ternary_codes(w).to(torch.int8), _fp16_scale(absmean_scale(w))


# ---- quant/lqer.py
# LQER: a low-rank correction of the quantization residual, stored as INT2 / INT4 factors (pure tensor functions).
#
# LQER asymmetric: PR #1797. After GPTQ, the residual `E = W − q·s` of a matrix is approximated by its rank-r SVD
# truncation `A·B` with `A = U[:, :r]·S[:r]` [rows, r] and `B = Vᵀ[:r, :]` [r, cols]. A is stored as INT2 codes in
# [−2, 1] with one fp16 scale per matrix (max|A| / 1.5); B as INT4 codes in [−8, 7] with one fp16 scale per group of
# `group` consecutive elements of B flattened row-major (max|g| / 7.5; the last group may be shorter). The dequantized
# weight is `q·s + (qA·sA)(qB·sB)`. Codes live in int8 containers like the GPTQ codes. docs/artifact.md has the format.


LQER_A_RANGE = (-2, 1)  # INT2, asymmetric
LQER_B_RANGE = (-8, 7)  # INT4, asymmetric
_MIN_SCALE = 2.0**-24  # fp16's smallest subnormal: every stored step stays > 0


@dataclass(frozen=True, eq=False)
class LQERFactors:
    """Quantized factors of one matrix's correction: `a_codes` int8 [rows, rank], `a_scale` fp16 [1], `b_codes` int8
    [rank, cols], `b_scale` fp16 [ceil(rank·cols / group)]."""

    a_codes: Tensor
    a_scale: Tensor
    b_codes: Tensor
    b_scale: Tensor
    group: int

    @property
    def rank(self) -> int:
        return self.a_codes.shape[1]


def lqer_group_count(rank: int, cols: int, group: int) -> int:
    """Number of B groups (and fp16 B scales): ceil(rank·cols / group)."""
    return -(-rank * cols // group)


def quantize_a(a: Tensor) -> tuple[Tensor, Tensor]:
    """INT2 codes `clamp(round(A / sA), −2, 1)` with one per-matrix step `sA = max|A| / 1.5` (fp16, used rounded)."""
    a = a.float()
    s = (a.abs().max() / 1.5).clamp_min(_MIN_SCALE).half().reshape(1)
    q = torch.round(a / s.float()).clamp_(*LQER_A_RANGE).to(torch.int8)
    return q, s


def quantize_b(b: Tensor, group: int) -> tuple[Tensor, Tensor]:
    """INT4 codes `clamp(round(g / s_g), −8, 7)` per group g of `group` consecutive elements of B flattened, with
    `s_g = max|g| / 7.5` (fp16, used rounded); a short last group is padded with zeros for its max only."""
    if group < 1:
        raise ValueError(f"lqer: group must be >= 1, got {group}")
    flat = b.float().reshape(-1)
    n = flat.numel()
    padded = torch.cat([flat, flat.new_zeros(-n % group)]).reshape(-1, group)
    s = (padded.abs().amax(dim=1) / 7.5).clamp_min(_MIN_SCALE).half()
    q = torch.round(padded / s.float()[:, None]).clamp_(*LQER_B_RANGE).to(torch.int8)
    return q.reshape(-1)[:n].reshape(b.shape), s


def _dequantize_b(codes: Tensor, scale: Tensor, group: int) -> Tensor:
    per_elem = scale.float().repeat_interleave(group)[: codes.numel()]
    return codes.float().reshape(-1).mul(per_elem).reshape(codes.shape)


def lqer_factors(residual: Tensor, rank: int, group: int = 64) -> LQERFactors:
    """Quantized rank-`rank` factors of `residual` [rows, cols] (the SVD runs on the CPU in fp64, so the result does
    not depend on the device); the rank is capped at min(rows, cols)."""
    if rank < 1:
        raise ValueError(f"lqer: rank must be >= 1, got {rank}")
    e = residual.detach().to("cpu", torch.float64)
    r = min(rank, *e.shape)
    U, S, Vh = torch.linalg.svd(e, full_matrices=False)
    a_codes, a_scale = quantize_a((U[:, :r] * S[:r]).float())
    b_codes, b_scale = quantize_b(Vh[:r, :].float(), group)
    return LQERFactors(a_codes.contiguous(), a_scale, b_codes.contiguous(), b_scale, group)


def lqer_correction(f: LQERFactors) -> Tensor:
    """The dequantized correction `(qA·sA)(qB·sB)` as fp32 [rows, cols]."""
    a = f.a_codes.float() * f.a_scale.float()
    return a @ _dequantize_b(f.b_codes, f.b_scale, f.group)


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


# Low-bit codes (the "sign" and "ternary" kinds, PGQ format version 3): a tensor's codes flattened row-major.
TRITS_PER_BYTE = 5  # 3**5 = 243 <= 256
_TRIT_DIGITS = np.array([[(b // 3**i) % 3 for i in range(TRITS_PER_BYTE)] for b in range(3**TRITS_PER_BYTE)], np.int8)


def packed_len(kind: str, numel: int) -> int:
    """Bytes of a low-bit kind's packed codes: ceil(numel / 8) for "sign", ceil(numel / 5) for "ternary"."""
    per = {"sign": 8, "ternary": TRITS_PER_BYTE}[kind]
    return -(-numel // per)


def pack_signs(codes: np.ndarray) -> bytes:
    """±1 codes (any shape, flattened row-major) as bits, 8 per byte, `np.packbits` order (bitorder "big"): code i is
    bit 7 - i % 8 of byte i // 8 (the first code is the most significant bit); bit 1 = +1, bit 0 = -1; the last
    byte's unused low bits are 0."""
    c = np.asarray(codes).reshape(-1)
    if c.size and not np.isin(c, (-1, 1)).all():
        raise ValueError("pack_signs: codes must be -1 or +1")
    return np.packbits(c > 0).tobytes()


def unpack_signs(data: bytes, numel: int) -> np.ndarray:
    """Inverse of `pack_signs`: int8 ±1 codes [numel]. Raises ValueError on a wrong length or nonzero padding bits."""
    if len(data) != packed_len("sign", numel):
        raise ValueError(f"sign codes: {len(data):,} bytes for {numel:,} codes, expected {packed_len('sign', numel):,}")
    bits = np.unpackbits(np.frombuffer(data, dtype=np.uint8))
    if bits[numel:].any():
        raise ValueError("sign codes: nonzero padding bits")
    return bits[:numel].astype(np.int8) * 2 - 1


def pack_trits(codes: np.ndarray) -> bytes:
    """Ternary codes in {-1, 0, 1} (flattened row-major) 5 per byte in base 3, little-endian digits: byte j =
    sum_i (code[5j + i] + 1) * 3**i, i = 0..4 (so bytes are 0..242); the last byte is padded with 0 codes (digit 1)."""
    c = np.asarray(codes).reshape(-1).astype(np.int64)
    if c.size and (c.min() < -1 or c.max() > 1):
        raise ValueError("pack_trits: codes must be -1, 0 or +1")
    d = np.ones(packed_len("ternary", c.size) * TRITS_PER_BYTE, np.int64)
    d[:c.size] = c + 1
    return (d.reshape(-1, TRITS_PER_BYTE) @ (3 ** np.arange(TRITS_PER_BYTE))).astype(np.uint8).tobytes()


def unpack_trits(data: bytes, numel: int) -> np.ndarray:
    """Inverse of `pack_trits`: int8 codes in {-1, 0, 1} [numel]. Raises ValueError on a wrong length, a byte above
    242 or padding that is not 0 codes."""
    if len(data) != packed_len("ternary", numel):
        raise ValueError(f"ternary codes: {len(data):,} bytes for {numel:,} codes, expected "
                         f"{packed_len('ternary', numel):,}")
    b = np.frombuffer(data, dtype=np.uint8)
    if b.size and b.max() >= 3**TRITS_PER_BYTE:
        raise ValueError(f"ternary codes: byte {int(b.max())} is not 5 base-3 digits (max 242)")
    digits = _TRIT_DIGITS[b].reshape(-1)
    if (digits[numel:] != 1).any():
        raise ValueError("ternary codes: padding is not 0 codes")
    return digits[:numel] - 1


# ---- quant/rans.py
# Static order-0 rANS for the codes region: one frequency table per code segment (a tensor's codes, an LQER factor),
# interleaved over `lanes` independent coder states so numpy runs every lane of a step at once (pure functions).
#
# Why: the codes of one tensor are close to i.i.d. draws from one distribution (SDClip makes every row's codes share
# it), so the best a memoryless coder can do is the tensor's order-0 entropy. brotli-11 lands 1-2% above that bound
# (its prefix codes spend whole bits per symbol); rANS with 15-bit probabilities lands within ~0.1% of it, encodes in
# seconds where brotli-11 takes a minute or more on a record-size model, and decodes in seconds. docs/artifact.md describes the
# stream.
#
# Coder (Duda's range ANS, byte-aligned variant with 16-bit words): state x in [2^16, 2^32); to encode symbol s with
# frequency f and cumulative frequency c (frequencies sum to 2^15), first emit the low 16 bits while x >= f << 17, then
# x <- (x // f) << 15 + x % f + c. Decoding inverts it exactly: slot = x mod 2^15 names s, x <- f·(x >> 15) + slot − c,
# then x <- x << 16 | next word while x < 2^16. Symbols are encoded last to first, so the decoder reads forward.
# Position i belongs to lane i mod lanes; the words of one step are written in lane order, steps in decode order.


RANS_PRECISION = 15  # frequencies sum to 2**15
RANS_MAX_LANES = 4096
_LOW = 1 << 16  # lower bound of a normalized state; a final state equals it
_M = 1 << RANS_PRECISION


def rans_lanes(n: int) -> int:
    """Lanes for n symbols: at most 32,768 sequential numpy steps until the cap of 1,024 lanes (a lane's final state
    costs 4 bytes; a record's ~36M codes take 1,024 lanes and ~35k steps)."""
    return max(1, min(1024, -(-n // 32768)))


def _quantize_counts(counts: np.ndarray) -> np.ndarray:
    """Frequencies summing to 2**15 from symbol counts: proportional, every present symbol >= 1, the rounding slack
    given to (or taken from) the most frequent symbol."""
    counts = counts.astype(np.int64)
    f = counts * _M // max(1, int(counts.sum()))
    f[(counts > 0) & (f == 0)] = 1
    f[int(np.argmax(f))] += _M - int(f.sum())
    return f


def _segment_bounds(segments: Sequence[int]) -> np.ndarray:
    return np.concatenate([[0], np.cumsum(np.asarray(segments, dtype=np.int64))]).astype(np.int64)


def rans_encode(codes: np.ndarray, segments: Sequence[int], lanes: int) -> tuple[bytes, bytes, bytes]:
    """Encode int8 `codes` (the segments back to back) with `lanes` lanes; returns (tables, states, words).

    tables: per segment, little-endian uint16 `first symbol + 128, count` then `count` frequencies (count 0 for an
    empty segment); states: the `lanes` final states as uint32; words: the 16-bit words in decode order."""
    sym = np.ascontiguousarray(codes, dtype=np.int8).reshape(-1).astype(np.int64) + 128
    bounds = _segment_bounds(segments)
    if bounds[-1] != sym.size or not 1 <= lanes <= RANS_MAX_LANES:
        raise ValueError(f"rans: segments sum to {bounds[-1]} for {sym.size} codes, lanes {lanes}")
    nseg = len(segments)
    F = np.zeros((max(1, nseg), 256), dtype=np.uint64)
    table = []
    for k in range(nseg):
        counts = np.bincount(sym[bounds[k]:bounds[k + 1]], minlength=256)
        present = np.flatnonzero(counts)
        if present.size == 0:
            table += [0, 0]
            continue
        lo, hi = int(present[0]), int(present[-1]) + 1
        f = _quantize_counts(counts[lo:hi])
        F[k, lo:hi] = f
        table += [lo, hi - lo, *f.tolist()]
    C = np.concatenate([np.zeros((F.shape[0], 1), np.uint64), np.cumsum(F, axis=1, dtype=np.uint64)[:, :-1]], axis=1)
    n = sym.size
    x = np.full(lanes, _LOW, dtype=np.uint64)
    chunks: list[np.ndarray] = []
    for i in range(-(-n // lanes) - 1, -1, -1):
        lo, hi = i * lanes, min(n, (i + 1) * lanes)
        seg = np.searchsorted(bounds, np.arange(lo, hi), side="right") - 1
        s = sym[lo:hi]
        f, c, xs = F[seg, s], C[seg, s], x[: hi - lo]
        emit = xs >= (f << np.uint64(32 - RANS_PRECISION))  # would leave [2^16, 2^32) after the update: emit first
        chunks.append((xs[emit] & np.uint64(0xFFFF)).astype("<u2"))
        xs = np.where(emit, xs >> np.uint64(16), xs)
        x[: hi - lo] = ((xs // f) << np.uint64(RANS_PRECISION)) + xs % f + c
    words = np.concatenate(chunks[::-1]) if chunks else np.zeros(0, "<u2")
    return (np.asarray(table, dtype="<u2").tobytes(), x.astype("<u4").tobytes(), words.tobytes())


def _parse_tables(tables: bytes, segments: Sequence[int]) -> np.ndarray:
    """Frequencies [nseg, 256] from the serialized tables; raises ValueError unless they are exactly well-formed."""
    if len(tables) % 2:
        raise ValueError("rans: tables have an odd byte count")
    t = np.frombuffer(tables, dtype="<u2").astype(np.int64)
    F = np.zeros((max(1, len(segments)), 256), dtype=np.int64)
    pos = 0
    for k, length in enumerate(segments):
        if pos + 2 > t.size:
            raise ValueError(f"rans: tables end at segment {k}")
        lo, cnt = int(t[pos]), int(t[pos + 1])
        pos += 2
        if length == 0 and cnt == 0:
            continue
        if not (length > 0 and cnt >= 1 and lo + cnt <= 256 and pos + cnt <= t.size):
            raise ValueError(f"rans: segment {k} has a bad table (first {lo}, count {cnt}, {length} symbols)")
        F[k, lo:lo + cnt] = t[pos:pos + cnt]
        pos += cnt
        if int(F[k].sum()) != _M:
            raise ValueError(f"rans: segment {k} frequencies sum to {int(F[k].sum())}, not {_M}")
    if pos != t.size:
        raise ValueError(f"rans: {2 * (t.size - pos)} stray bytes after the tables")
    return F


def rans_decode(tables: bytes, states: bytes, words: bytes, segments: Sequence[int], lanes: int) -> np.ndarray:
    """Inverse of `rans_encode`: the int8 codes. Raises ValueError on any inconsistency (bad tables, states out of
    range, words missing or left over, final states not at their start value) and never reads out of bounds. Its
    memory is one byte per declared code (plus 32 KiB per segment) and its time ceil(n / lanes) numpy steps: callers
    that read untrusted streams insist on lanes == rans_lanes(n), so a stream cannot declare many codes on few lanes."""
    if not 1 <= lanes <= RANS_MAX_LANES or len(states) != 4 * lanes or len(words) % 2:
        raise ValueError(f"rans: {len(states)} state bytes for {lanes} lanes, {len(words)} word bytes")
    F = _parse_tables(tables, segments)
    x = np.frombuffer(states, dtype="<u4").astype(np.uint64)
    if (x < _LOW).any():
        raise ValueError("rans: a lane's state is below 2^16")
    C = np.concatenate([np.zeros((F.shape[0], 1), np.int64), np.cumsum(F, axis=1)[:, :-1]], axis=1)
    S = np.zeros((F.shape[0], _M), dtype=np.uint8)  # slot -> symbol
    for k in range(F.shape[0]):
        if F[k].any():
            S[k] = np.repeat(np.arange(256), F[k])
    F, C = F.astype(np.uint64), C.astype(np.uint64)
    w = np.frombuffer(words, dtype="<u2").astype(np.uint64)
    bounds = _segment_bounds(segments)
    n = int(bounds[-1])
    out = np.empty(n, dtype=np.uint8)  # one byte per code: the output is never larger than the codes it declares
    p, mask = 0, np.uint64(_M - 1)
    for i in range(-(-n // lanes)):
        lo, hi = i * lanes, min(n, (i + 1) * lanes)
        seg = np.searchsorted(bounds, np.arange(lo, hi), side="right") - 1
        xs = x[: hi - lo]
        slot = xs & mask
        s = S[seg, slot.astype(np.int64)].astype(np.int64)
        out[lo:hi] = s ^ 128  # symbol = code + 128, so the code's two's-complement byte is symbol xor 0x80
        xs = F[seg, s] * (xs >> np.uint64(RANS_PRECISION)) + slot - C[seg, s]
        need = xs < _LOW
        k = int(np.count_nonzero(need))
        if k:
            if p + k > w.size:
                raise ValueError("rans: the word stream ends early")
            xs[need] = (xs[need] << np.uint64(16)) | w[p:p + k]
            p += k
        x[: hi - lo] = xs
    if p != w.size or (x != _LOW).any():
        raise ValueError("rans: the stream does not end where the codes do (corrupt or mismatched)")
    return out.view(np.int8)


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

    `kind` is "gptq", "rtn", "sign" (codes ±1, bits 1), "ternary" (codes -1/0/1, bits 2) or "passthrough"; `bits` is
    the code width (0 for passthrough); `dtype` names the original dtype restored by `dequantize`; `data` holds
    passthrough values (fp16 for floats, the original dtype otherwise); `lqer` holds the optional low-rank correction
    of a gptq/rtn matrix (quant/lqer.py). Sign and ternary codes are int8 in memory, bit-/trit-packed on disk.
    """

    name: str
    shape: tuple[int, ...]
    dtype: str
    kind: str
    bits: int = 0
    codes: Tensor | None = None
    scale: Tensor | None = None
    data: Tensor | None = None
    lqer: LQERFactors | None = None


ROLES = ("embed", "attn", "mlp", "matrix", "sign", "ternary")  # quantization roles of matrices; the caller assigns them
LOWBIT_ROLES = {"sign": sign_quantize, "ternary": ternary_quantize}  # role = kind; codes from the weight alone


def _check_bits(what: str, bits: int) -> None:
    if not (isinstance(bits, int) and 2 <= bits <= 8):
        raise ValueError(f"quantize_state_dict: {what} must be an int in 2..8 (codes live in int8), got {bits!r}")


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
    roles: Mapping[str, str] | None = None,
    attn_bits: int | None = None,
    attn_clip_sigmas: float | None = None,
    mlp_bits: int | None = None,
    mlp_clip_sigmas: float | None = None,
    lqer_rank: int = 0,
    lqer_top_k: int = 3,
    lqer_group: int = 64,
) -> list[QTensor]:
    """Quantize a state dict in its order: 2-D floats above `passthrough_numel` elements get SDClip codes (GPTQ with
    their Hessian, round-to-nearest without one or with method="rtn"); everything else is passthrough (floats as fp16).
    Runs on the weights' device; the returned tensors are on the CPU.

    Roles: without `roles`, a quantized tensor named in `embed_names` is an "embed", every other one a "matrix".
    With `roles` (name -> one of ROLES), every quantized tensor must be named there and `embed_names` is not used.
    Bits and SDClip sigmas per role: embed -> embed_bits / embed_clip_sigmas; attn -> attn_bits / attn_clip_sigmas;
    mlp -> mlp_bits / mlp_clip_sigmas; matrix -> matrix_bits / matrix_clip_sigmas. An attn or mlp value left None
    falls back to the matrix value (per-role sigmas: record N, e.g. int7 embeddings at 14-15σ, MLP 11.5-12σ, attention
    13σ, other matrices 12.85σ). The embedding is GPTQ'd as the tied output head: rows = vocab, Hessian of the final
    hidden states (PR #1493). Roles "sign" and "ternary" (quant/lowbit.py) ignore bits, sigmas and Hessians: 1-bit
    signs (one fp16 mean |w| scale per tensor) or absmean ternary codes (one per row), for weights the model's forward
    already uses at that precision (experiments/pm1.py); they never get LQER.

    LQER (`lqer_rank` > 0 and `lqer_top_k` > 0): the `lqer_top_k` quantized tensors with the largest residual
    ‖W − q·s‖_F get a rank-`lqer_rank` INT2/INT4 correction with INT4 groups of `lqer_group` (quant/lqer.py).
    The defaults (no roles, no LQER) give today's output exactly.
    """
    if method not in ("gptq", "rtn"):
        raise ValueError(f"quantize_state_dict: method must be 'gptq' or 'rtn', got {method!r}")
    per_role_given = [k for k, v in (("attn_bits", attn_bits), ("attn_clip_sigmas", attn_clip_sigmas),
                                     ("mlp_bits", mlp_bits), ("mlp_clip_sigmas", mlp_clip_sigmas)) if v is not None]
    if roles is None and per_role_given:
        raise ValueError(f"quantize_state_dict: {', '.join(per_role_given)} need roles= (name -> role) to apply")
    bits_of = {"embed": embed_bits, "matrix": matrix_bits, "attn": matrix_bits if attn_bits is None else attn_bits,
               "mlp": matrix_bits if mlp_bits is None else mlp_bits}
    sigmas_of = {"embed": embed_clip_sigmas, "matrix": matrix_clip_sigmas,
                 "attn": matrix_clip_sigmas if attn_clip_sigmas is None else attn_clip_sigmas,
                 "mlp": matrix_clip_sigmas if mlp_clip_sigmas is None else mlp_clip_sigmas}
    for role, bits in bits_of.items():
        _check_bits(f"{role} bits", bits)
    for role, sig in sigmas_of.items():
        if not sig > 0:
            raise ValueError(f"quantize_state_dict: {role} clip sigmas must be > 0, got {sig!r}")
    lqer_on = lqer_rank > 0 and lqer_top_k > 0
    if lqer_rank < 0 or lqer_top_k < 0 or lqer_group < 1:
        raise ValueError(f"quantize_state_dict: need lqer_rank >= 0, lqer_top_k >= 0 and lqer_group >= 1, got "
                         f"{lqer_rank}, {lqer_top_k}, {lqer_group}")

    def quantized(t: Tensor) -> bool:
        return t.is_floating_point() and t.ndim == 2 and t.numel() > passthrough_numel

    if roles is not None:
        unknown = sorted({r for r in roles.values() if r not in ROLES})
        missing = [n for n, t in state.items() if quantized(t) and n not in roles]
        stray = [n for n in roles if n not in state]
        if unknown or missing or stray:
            raise ValueError("quantize_state_dict: roles= " + "; ".join(
                msg for msg in (f"has unknown roles {unknown} (use {', '.join(ROLES)})" if unknown else "",
                                f"misses quantized tensors {missing[:5]}" if missing else "",
                                f"names tensors not in the state dict {stray[:5]}" if stray else "") if msg))
    out, residual_norms = [], {}
    for name, t in state.items():
        t = t.detach()
        dtype = str(t.dtype).removeprefix("torch.")
        if not quantized(t):
            data = t.half() if t.is_floating_point() else t
            out.append(QTensor(name, tuple(t.shape), dtype, "passthrough", data=data.cpu().clone().contiguous()))
            continue
        role = roles[name] if roles is not None else ("embed" if name in embed_names else "matrix")
        if role in LOWBIT_ROLES:
            codes, scale = LOWBIT_ROLES[role](t)
            out.append(QTensor(name, tuple(t.shape), dtype, role, 1 if role == "sign" else 2, codes.cpu().contiguous(),
                               scale.cpu()))
            continue
        bits = bits_of[role]
        clip_range = 2 ** (bits - 1) - 1
        scale = sdclip_scale(t, sigmas_of[role], clip_range)
        H = hessians.get(name)
        if method == "gptq" and H is not None:
            codes, kind = gptq_quantize_weight(t, H, scale, clip_range), "gptq"
        else:
            codes, kind = quantize_rtn(t, scale, clip_range), "rtn"
        if lqer_on:
            residual_norms[len(out)] = float(torch.linalg.vector_norm(t.float() - codes.float() * scale.float()[:, None]))
        out.append(QTensor(name, tuple(t.shape), dtype, kind, bits, codes.cpu().contiguous(), scale.cpu()))
    if lqer_on:
        top = sorted(residual_norms, key=lambda i: -residual_norms[i])[:lqer_top_k]
        for i in sorted(top):
            qt = out[i]
            w = state[qt.name].detach().to("cpu", torch.float32)
            residual = w - qt.codes.float() * qt.scale.float()[:, None]
            out[i] = replace(qt, lqer=lqer_factors(residual, lqer_rank, lqer_group))
    return out


def dequantize(qtensors: list[QTensor]) -> dict[str, Tensor]:
    """State dict back from QTensors: `W = q·s[:, None]` (+ the LQER correction `(qA·sA)(qB·sB)` where present; fp32
    math) or passthrough data, cast to the original dtype."""
    out = {}
    for qt in qtensors:
        dtype = getattr(torch, qt.dtype)
        if qt.kind == "passthrough":
            out[qt.name] = qt.data.to(dtype).reshape(qt.shape)
        else:
            w = qt.codes.float() * qt.scale.float()[:, None]
            if qt.lqer is not None:
                w = w + lqer_correction(qt.lqer)
            out[qt.name] = w.to(dtype)
    return out


LOWBIT_LABELS = {"sign": "sign (1-bit)", "ternary": "ternary (1.6-bit)"}  # describe(): ternary is log2(3) ~ 1.58 bits


def describe(qtensors: list[QTensor]) -> list[str]:
    """Upstream's `Quantized weights:` lines, one per category, names with layer indices collapsed, sorted unique."""
    groups: dict[str, set[str]] = {}
    for qt in qtensors:
        label = (f"passthrough ({str(qt.data.dtype).removeprefix('torch.')})" if qt.kind == "passthrough"
                 else LOWBIT_LABELS[qt.kind] if qt.kind in LOWBIT_LABELS
                 else f"{qt.kind} (int{qt.bits})" + (f" + lqer (rank {qt.lqer.rank})" if qt.lqer is not None else ""))
        groups.setdefault(label, set()).add(re.sub(r"\.\d+(?=\.|$)", "", qt.name))
    return [f"{label}: {', '.join(sorted(names))}" for label, names in sorted(groups.items())]


# ---- quant/codec.py
# The artifact container: magic + version header, length-prefixed JSON manifest, one compressed payload.
#
# Layout (little-endian): b"PGQ" | version u8 | manifest length u32 | manifest CRC-32 u32 | manifest (sorted-key JSON,
# brotli-11, since size margins are a few KB) | compressed payload. The decompressed payload is the codes region (each
# quantized tensor's codes, contiguous, in manifest order: int8 one per byte, or for the "sign" / "ternary" kinds of
# version 3 packed 8 bits / 5 trits per byte, quant/pack.py) then the side region (fp16 scales and passthrough data
# in manifest order), byte-shuffled with stride 2 as it is almost all fp16. The loader checks every length, offset and
# checksum before allocating, caps and bounds every decompression, and never unpickles anything.


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


# <<< inline local modules

ARTIFACT_LIMIT_BYTES = 16_000_000  # decimal, code + compressed model
TIME_LIMIT_SECONDS = 600.0  # training, and separately evaluation, on 8xH100 SXM
# The log contract (docs/log_format.md): every line the tools read is written from one of these formats, and
# tools/parse_log.py builds its parsers from the same strings. Change a format here and the parser follows.
LOG_FORMATS = dict(
    source_file="source_file: {name} bytes:{n}",
    train_shards="train_shards: {n}",
    val_tokens="val_tokens: {n}",
    tokenizer="tokenizer: sha256:{sha256} vocab:{vocab}",
    val_bytes="val_bytes: source:{source} total:{total}",
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
    ttt_start="ttt_phased: total_docs:{docs} prefix_docs:{prefix} suffix_docs:{suffix} num_phases:{phases} "
              "boundaries:{boundaries}",
    ttt_phase="ttpp: phase:{k}/{phases} pd:{scored} gd:{docs} t:{seconds:.1f}s",
    ledger="time_ledger phase:{phase} seconds:{seconds:.3f} budget:{budget}",
    ledger_total="time_ledger_total train:{train:.3f} eval:{eval:.3f} limit:{limit:g}",
)


def log_line(kind: str, **values: object) -> str:
    return LOG_FORMATS[kind].format(**values)

# -----------------------------------------------------------------------------
# CONFIG: one frozen dataclass; env vars override (upper-case names). Model and training defaults are record N
# (PR #1855, 1.0614); configs/record_p.env gives record P (PR #1493, 1.0810).
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
    # model shape (11L x 512d, 8 heads / 4 KV heads, MLP 4x, vocab 8192 -> 35,945,671 params; P: 35,944,536)
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
    qk_gain_init: float = 5.0  # QK-gain (PR #1493 uses 5.25)
    xsa_last_n: int = 11  # XSA on the last n layers (11 = all)
    ln_scale: bool = True  # 1/sqrt(layer+1) on every block input norm
    skip_gates_enabled: bool = True  # sigmoid-gated U-Net skips; off = the baseline's additive skips
    num_loops: int = 2  # depth recurrence: layers loop_start..loop_end run num_loops+1 times
    loop_start: int = 3
    loop_end: int = 5
    enable_looping_at: float = 0.35  # fraction of the train budget after which looping switches on
    parallel_residual_start: int = 8  # parallel attn+MLP from this physical layer on (upstream: PARALLEL_START_LAYER)
    parallel_lanes: int = 2  # 2: two residual lanes mixed by learned lambdas (record N); 1: one lane, GPT-J (P)
    smear_gate_enabled: bool = True  # SmearGate with the BOS fix
    sparse_attn_gate_enabled: bool = True  # per-head sigmoid gate on the attention output
    sparse_attn_gate_scale: float = 1.0
    doc_isolation: bool = True  # attention never crosses a BOS: documents are isolated in every forward
    # optimization
    iterations: int = 20000
    train_batch_tokens: int = 786_432
    train_seq_len: int = 2048
    grad_accum_steps: int = 0  # 0 = 8 // world_size (upstream), so the global batch is the same on 1-8 ranks
    max_wallclock_seconds: float = 600.0  # 0 = no cap (step-based schedule)
    gptq_reserve_seconds: float = 8.0  # Hessian collection must end inside the 600 s train budget
    train_loader: str = "packed"  # packed: record N's sequential document stream; shuffled: record P's loader
    warmdown_frac: float = 0.75
    min_lr: float = 0.1  # LR floor of the warmdown, as a fraction of the peak
    warmup_steps: int = 20  # compile warm-up steps, undone afterwards
    matrix_lr: float = 0.026
    scalar_lr: float = 0.02
    tied_embed_lr: float = 0.03
    muon_momentum: float = 0.97
    muon_momentum_warmup_start: float = 0.92
    muon_momentum_warmup_steps: int = 1500
    muon_backend_steps: int = 5
    muon_ns: str = "polar"  # Newton-Schulz coefficients: polar (Polar Express, one triple per step) or quintic
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
    precision: str = "auto"  # auto = bf16 on CUDA (record P's dtype policy), fp32 on CPU; bf16 runs on CPU too
    attention: str = "auto"  # auto = FlashAttention-3 on CUDA when usable, else SDPA; fa3 = FA3 or an error; sdpa
    # evaluation
    eval_seq_len: int = 2048
    eval_stride: int = 64
    sliding_window_enabled: bool = True
    ttt_enabled: bool = True  # record N's phased score-first TTT with per-document LoRA (evals/phased_ttt.py)
    ttt_lora_rank: int = 96
    ttt_lora_alpha: float = 144.0  # adapters scale by alpha / rank
    ttt_lora_lr: float = 1e-4  # AdamW on the adapters
    ttt_beta1: float = 0.0
    ttt_beta2: float = 0.999
    ttt_weight_decay: float = 1.0
    ttt_chunk_size: int = 48  # targets of a document scored, then trained on, per step
    ttt_eval_seq_len: int = 2048  # a step's window: the last <= this many tokens of the document up to the chunk end
    ttt_batch_size: int = 64  # documents per batch, one adapter slot each
    ttt_lanes: int = 8  # adapter sets that carry A from batch to batch (record N: one per GPU); batch q uses q % lanes
    phased_ttt_prefix_docs: int = 2000  # global SGD phases on the base model train on up to this many scored docs
    phased_ttt_num_phases: int = 3
    global_ttt_lr: float = 1e-3
    global_ttt_momentum: float = 0.9
    global_ttt_chunk_tokens: int = 32_768
    # quantization (quant/)
    gptq_calibration_batches: int = 16
    matrix_bits: int = 6
    attn_clip_sigmas: float = 13.0  # per-role SDClip sigmas (record N): attention and MLP matrices
    mlp_clip_sigmas: float = 12.0
    embed_bits: int = 7  # int7 embeddings (record N; P: 8 bits at 20 sigmas)
    embed_clip_sigmas: float = 15.0
    lqer_enabled: bool = True  # LQER: rank-4 INT2/INT4 correction of the 3 largest GPTQ residuals (PR #1797)
    lqer_rank: int = 4
    lqer_top_k: int = 3
    lqer_asym_group: int = 64
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
        need(0 < self.ttt_chunk_size <= self.ttt_eval_seq_len, "TTT_CHUNK_SIZE must be in 1..TTT_EVAL_SEQ_LEN")
        need(self.global_ttt_chunk_tokens % self.eval_seq_len == 0 and self.ttt_batch_size > 0 and self.ttt_lanes > 0,
             "GLOBAL_TTT_CHUNK_TOKENS must be a multiple of EVAL_SEQ_LEN; TTT_BATCH_SIZE and TTT_LANES >= 1")
        need(self.compile in ("auto", "0", "1"), f"COMPILE={self.compile!r}: use auto, 0 or 1")
        need(self.precision in ("auto", "fp32", "bf16"), f"PRECISION={self.precision!r}: use auto, fp32 or bf16")
        need(self.attention in ("auto", "fa3", "sdpa"), f"ATTENTION={self.attention!r}: use auto, fa3 or sdpa")
        need(self.parallel_lanes in (1, 2), f"PARALLEL_LANES={self.parallel_lanes}: use 1 or 2")
        need(self.parallel_lanes == 1 or self.num_loops == 0 or self.loop_end < self.parallel_residual_start,
             "two parallel lanes need the looped layers before PARALLEL_RESIDUAL_START (a lane cannot end mid-model)")
        need(self.muon_ns in NS_COEFFS, f"MUON_NS={self.muon_ns!r}: use {' or '.join(NS_COEFFS)}")
        need(self.train_loader in ("packed", "shuffled"), f"TRAIN_LOADER={self.train_loader!r}: use packed or shuffled")
        need(self.compressor in ARTIFACT_CODECS, f"COMPRESSOR={self.compressor!r}: use {', '.join(ARTIFACT_CODECS)}")
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
        kwargs = {}
        for key, raw in env.items():
            if key in UPSTREAM_FIXED and _same(raw, UPSTREAM_FIXED[key][0]):
                continue
            if key in UPSTREAM_FIXED or key in UPSTREAM_REFUSED:
                why = UPSTREAM_FIXED[key][1] if key in UPSTREAM_FIXED else UPSTREAM_REFUSED[key]
                raise ValueError(f"{key}={raw}: {why}; remove it (docs/config.md)")
            name = UPSTREAM_ALIASES.get(key, key)
            if name in fields:
                kwargs[fields[name].name] = _parse_env(key, raw, fields[name].type)
            elif key not in _FOREIGN_ENV and key.replace("_", "").isupper():
                close = difflib.get_close_matches(key, [*fields, *UPSTREAM_ALIASES, *UPSTREAM_FIXED], n=1, cutoff=0.88)
                if close:
                    raise ValueError(f"unknown config env var {key}; did you mean {close[0]}?")
        return cls(**kwargs)


# Env names of upstream records (the baseline B, P, N) that are not pgolf's: aliases of fields, switches pgolf does
# not have (accepted only at the value pgolf behaves as), and features it lacks. docs/config.md tells each one's story.
UPSTREAM_ALIASES = {"PARALLEL_START_LAYER": "PARALLEL_RESIDUAL_START", "ARTIFACT_DIR": "OUT_DIR"}  # N
UPSTREAM_FIXED = {  # name: (pgolf's behaviour as that switch's value, why)
    "TIE_EMBEDDINGS": ("1", "the embedding is always tied to the output head"),
    "PARALLEL_FINAL_LANE": ("mean", "two parallel lanes always end in their mean"),
    "ROPE_YARN": ("0", "RoPE has no YaRN scaling"),
    "FUSED_CE_ENABLED": ("0", "the loss is torch's softcapped cross-entropy, no fused Triton kernel (same math)"),
    "GATE_WINDOW": ("12", "SmearGate and the sparse attention gate read 12 input dims"),
    "SPARSE_ATTN_GATE_INIT_STD": ("0", "the sparse attention gate starts at zero"),
    "ATTN_OUT_GATE_ENABLED": ("0", "the attention gates are the sparse gate only (SPARSE_ATTN_GATE_ENABLED)"),
    "GATED_ATTN_ENABLED": ("0", "the attention gates are the sparse gate only (SPARSE_ATTN_GATE_ENABLED)"),
    "GATED_ATTN_QUANT_GATE": ("0", "it quantizes the dense attention gate, which pgolf does not have"),
    "LQER_FACTOR_BITS": ("4", "LQER's B factor is INT4 (A is INT2), asymmetric"),
    "LQER_ASYM_ENABLED": ("1", "LQER's factors are always the asymmetric INT2/INT4 form"),
    **{k: (v, "pgolf's phased TTT has record N's setting of this switch only") for k, v in (
        ("TTT_GRAD_STEPS", "1"), ("TTT_K_LORA", "1"), ("TTT_MLP_LORA", "1"), ("TTT_O_LORA", "1"), ("TTT_OPTIMIZER", "adam"),
        ("TTT_WARM_START_A", "1"), ("TTT_EVAL_BATCHES", ""), ("VAL_DOC_FRACTION", "1"), ("GLOBAL_TTT_EPOCHS", "1"),
        ("GLOBAL_TTT_BATCH_SEQS", "32"), ("GLOBAL_TTT_GRAD_CLIP", "1"), ("GLOBAL_TTT_WARMUP_START_LR", "0"),
        ("GLOBAL_TTT_WARMUP_CHUNKS", "0"), ("GLOBAL_TTT_RESPECT_DOC_BOUNDARIES", "1"))},
    **dict.fromkeys(("TTT_EVAL_ONLY", "PREQUANT_ONLY"), ("0", "a run always trains, quantizes and scores")),
}
UPSTREAM_REFUSED = {
    **dict.fromkeys(("EMBED_LR", "HEAD_LR"), "pgolf ties the embedding; its rate is TIED_EMBED_LR"),
    "MATRIX_CLIP_SIGMAS": "clip sigmas are per role: ATTN_CLIP_SIGMAS and MLP_CLIP_SIGMAS",
    "CASEOPS_ENABLED": "point DATA_PATH and TOKENIZER_PATH at the CaseOps variant; bytes come from its sidecar",
}


def _same(raw: str, value: str) -> bool:
    try:
        return float(raw) == float(value)
    except ValueError:
        return raw.strip().lower() == value


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



# -----------------------------------------------------------------------------
# MODEL: 11L x 512d GPT with XSA, partial RoPE, QK-gain, depth recurrence, parallel residuals, gated U-Net skips
# -----------------------------------------------------------------------------


def rms_norm(x: Tensor) -> Tensor:
    """Parameter-free RMSNorm that returns x's dtype: CUDA autocast (torch >= 2.12) runs rms_norm in fp32, which would
    silently turn a bf16 residual stream and q/k into fp32 (and FlashAttention-3 rejects mixed q/k/v dtypes)."""
    return F.rms_norm(x, (x.size(-1),)).to(x.dtype)


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


def rope_tables(seq_len: int, rope_dims: int, base: float, device: torch.device | None = None) -> tuple[Tensor, Tensor]:
    """cos/sin [seq_len, rope_dims/2] in fp32 with inv_freq_j = base^(-2j/rope_dims). Computed per forward (a few
    thousand values) rather than held in buffers: a model without buffers needs no DDP buffer-sync keyword, whose
    name differs between torch versions (broadcast_buffers / forward_sync_buffers)."""
    inv_freq = 1.0 / base ** (torch.arange(0, rope_dims, 2, dtype=torch.float32, device=device) / rope_dims)
    freqs = torch.outer(torch.arange(seq_len, dtype=torch.float32, device=device), inv_freq)
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


DOC_MIN_TOKENS = 16  # a row isolates up to T / 16 documents (a static count, so attention compiles with fullgraph)


def doc_starts(ids: Tensor) -> Tensor:
    """(B, T // DOC_MIN_TOKENS) int64: the document starts of each row, ascending, padded with T. A row starts a
    document at position 0 and at every BOS. A row with more documents than that keeps its first boundaries and its
    last documents attend to each other (still causal, never across rows)."""
    B, T = ids.shape
    pos = torch.arange(T, device=ids.device).expand(B, T)
    key = torch.where((ids == BOS_ID) | (pos == 0), pos, T)
    return key.sort(dim=1).values[:, : max(1, T // DOC_MIN_TOKENS)].contiguous()


@dataclass(frozen=True)
class Docs:
    """How attention isolates documents, computed once per forward (doc_mask): for SDPA a (B, 1, T, T) boolean mask
    (causal and same document), for FlashAttention-3's varlen entry point int32 cu_seqlens over the flattened
    rows, with zero-length padding segments, and the longest possible segment. None everywhere = plain causal."""

    mask: Tensor | None = None
    cu_seqlens: Tensor | None = None
    max_len: int = 0


def doc_mask(ids: Tensor, fa3: Callable | None, enabled: bool) -> Docs:
    """Document isolation from the BOS tokens in ids: the same segments (doc_starts) for SDPA and for FA3 varlen
    (record N trains and evaluates with flash_attn_varlen_func; PR #1530 lineage)."""
    if not enabled:
        return Docs()
    B, T = ids.shape
    starts = doc_starts(ids)
    if fa3 is not None:
        flat = starts + T * torch.arange(B, device=ids.device)[:, None]
        end = torch.full((1,), B * T, dtype=flat.dtype, device=ids.device)
        return Docs(cu_seqlens=torch.cat((flat.flatten(), end)).to(torch.int32), max_len=T)
    pos = torch.arange(T, device=ids.device)
    seg = torch.searchsorted(starts, pos.expand(B, T).contiguous(), right=True)  # document index of each position
    same = seg[:, :, None] == seg[:, None, :]
    return Docs(mask=(same & (pos[None, :] <= pos[:, None]))[:, None])


def attention(q: Tensor, k: Tensor, v: Tensor, fa3: Callable | None = None, docs: Docs = Docs()) -> Tensor:
    """Causal GQA attention on (B, T, H, D) / (B, T, Hkv, D), documents isolated by `docs`: FlashAttention-3
    (flash_attn_func, or its varlen entry point with cu_seqlens) when given, else SDPA. FA3 takes q, k, v in one
    16-bit dtype: v's when it is 16-bit (bf16 under autocast), else bf16."""
    if fa3 is not None:
        dt = v.dtype if v.dtype in (torch.bfloat16, torch.float16) else torch.bfloat16
        q, k, v = q.to(dt), k.to(dt), v.to(dt)
        if docs.cu_seqlens is None:
            out = fa3(q, k, v, causal=True)
        else:
            cu, m = docs.cu_seqlens, docs.max_len
            out = fa3.varlen(q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), cu_seqlens_q=cu, cu_seqlens_k=cu,
                             max_seqlen_q=m, max_seqlen_k=m, causal=True)
        out = out[0] if isinstance(out, tuple) else out  # some FA3 builds return (out, softmax_lse)
        return out.view_as(q)
    y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=docs.mask,
                                       is_causal=docs.mask is None, enable_gqa=True)
    return y.transpose(1, 2)


ATTN_GATE_DIMS = SMEAR_GATE_DIMS = 12  # input dims read by the sparse attention gate and by SmearGate


def smear(x: Tensor, ids: Tensor, w: Tensor, lam: Tensor) -> Tensor:
    """SmearGate (PR #1667) with the BOS fix (PR #1851): x_t += lam * sigmoid(w . x_t[:12]) * x_{t-1} for t >= 1,
    the gate forced to 0 where token t is BOS, so no document leaks into the next one. Identity at init (w, lam = 0)."""
    g = torch.sigmoid(F.linear(x[:, 1:, :SMEAR_GATE_DIMS], w.to(x.dtype))).masked_fill(ids[:, 1:, None] == BOS_ID, 0)
    return torch.cat((x[:, :1], x[:, 1:] + lam.to(x.dtype) * g * x[:, :-1]), dim=1)


class CausalSelfAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int, num_kv_heads: int, qk_gain_init: float, use_xsa: bool,
                 fa3: Callable | None = None, gate_scale: float | None = None):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, dim // num_heads
        self.use_xsa, self.fa3, self.gate_scale = use_xsa, fa3, gate_scale
        self.c_q = nn.Linear(dim, dim, bias=False)
        self.c_k = nn.Linear(dim, num_kv_heads * self.head_dim, bias=False)
        self.c_v = nn.Linear(dim, num_kv_heads * self.head_dim, bias=False)
        self.proj = nn.Linear(dim, dim, bias=False)
        self.q_gain = nn.Parameter(torch.full((num_heads,), qk_gain_init))  # QK-gain (PR #1493 uses 5.25)
        if gate_scale is not None:  # sparse attention output gate (PR #1787): 12 input dims per head, 0.5 at init
            self.attn_gate_w = nn.Parameter(torch.zeros(num_heads, ATTN_GATE_DIMS))

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, docs: Docs = Docs(), ad: nn.ModuleDict | None = None) -> Tensor:
        """ad: this pass's TTT adapters (TTTAdapters); q, k, v and the output get ad[...](x) of the attention input."""
        B, T, _ = x.shape
        q, k, v = self.c_q(x), self.c_k(x), self.c_v(x)
        if ad is not None:
            q, k, v = q + ad["q"](x), k + ad["k"](x), v + ad["v"](x)
        q = q.view(B, T, self.num_heads, self.head_dim)
        k = k.view(B, T, self.num_kv_heads, self.head_dim)
        v = v.view(B, T, self.num_kv_heads, self.head_dim)
        q = apply_partial_rope(rms_norm(q), cos, sin) * self.q_gain.to(q.dtype)[None, None, :, None]
        k = apply_partial_rope(rms_norm(k), cos, sin)
        y = attention(q, k, v, self.fa3, docs)  # (B, T, H, D)
        if self.use_xsa:  # XSA: PR #1019 lineage
            y = xsa(y, v)
        if self.gate_scale is not None:
            gate = F.linear(x[..., :ATTN_GATE_DIMS], self.attn_gate_w.to(x.dtype)) * self.gate_scale
            y = y * torch.sigmoid(gate)[..., None]
        out = self.proj(y.reshape(B, T, -1))
        return out if ad is None else out + ad["o"](x)


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int, leaky_slope: float):
        super().__init__()
        self.fc = nn.Linear(dim, hidden, bias=False)
        self.proj = nn.Linear(hidden, dim, bias=False)
        self.leaky_slope = leaky_slope

    def forward(self, x: Tensor, ad: nn.ModuleDict | None = None) -> Tensor:
        out = self.proj(F.leaky_relu(self.fc(x), self.leaky_slope).square())
        return out if ad is None else out + ad["mlp"](x)


class Block(nn.Module):
    def __init__(self, cfg: Config, layer_idx: int, fa3: Callable | None = None):
        super().__init__()
        dim = cfg.model_dim
        self.attn = CausalSelfAttention(dim, cfg.num_heads, cfg.num_kv_heads, cfg.qk_gain_init,
                                        use_xsa=layer_idx >= cfg.num_layers - cfg.xsa_last_n, fa3=fa3,
                                        gate_scale=cfg.sparse_attn_gate_scale if cfg.sparse_attn_gate_enabled else None)
        self.mlp = MLP(dim, int(cfg.mlp_mult * dim), cfg.mlp_leaky_slope)
        self.attn_scale = nn.Parameter(torch.ones(dim))
        self.mlp_scale = nn.Parameter(torch.ones(dim))
        self.resid_mix = nn.Parameter(torch.stack((torch.ones(dim), torch.zeros(dim))))
        self.norm_scale = 1.0 / math.sqrt(layer_idx + 1) if cfg.ln_scale else 1.0  # physical index, kept when looped
        self.parallel = layer_idx >= cfg.parallel_residual_start  # parallel residuals: PR #1204, #1412

    def forward(self, x: Tensor, x0: Tensor, cos: Tensor, sin: Tensor, docs: Docs, lane1: Tensor | None = None,
                lambdas: tuple[Tensor, Tensor] | None = None,
                ad: nn.ModuleDict | None = None) -> tuple[Tensor, Tensor | None]:
        """x (lane 0) and lane 1 after this layer. With two lanes (record N), attention reads lane 0 (mixed with x0),
        the MLP reads lane 1, and each lane takes rho * itself + pi-weighted attention and MLP outputs. ad: the TTT
        adapters of this pass, passed to attention and MLP."""
        dt = x.dtype
        mix = self.resid_mix.to(dt)
        mixed = mix[0] * x + mix[1] * x0
        h = rms_norm(mixed) * self.norm_scale
        a = self.attn_scale.to(dt) * self.attn(h, cos, sin, docs, ad)
        if lane1 is not None:
            rho, pi = (t.to(dt) for t in lambdas)
            m = self.mlp_scale.to(dt) * self.mlp(rms_norm(lane1) * self.norm_scale, ad)
            return rho[0] * x + pi[0, 0] * a + pi[1, 0] * m, rho[1] * lane1 + pi[0, 1] * a + pi[1, 1] * m
        if self.parallel:
            return mixed + a + self.mlp_scale.to(dt) * self.mlp(h, ad), None
        x = mixed + a
        return x + self.mlp_scale.to(dt) * self.mlp(rms_norm(x) * self.norm_scale, ad), None


class GPT(nn.Module):
    """fa3: FlashAttention-3 for every attention call (see resolve_attention), None for SDPA."""

    def __init__(self, cfg: Config, fa3: Callable | None = None):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.model_dim)  # tied with the output head
        self.blocks = nn.ModuleList(Block(cfg, i, fa3) for i in range(cfg.num_layers))
        enc, dec = layer_schedule(cfg.num_layers, cfg.loop_start, cfg.loop_end, cfg.num_loops, looping=True)
        self.num_skips = min(len(enc), len(dec))  # sized for the looped lists, also used unlooped
        self.skip_weights = nn.Parameter(torch.ones(self.num_skips, cfg.model_dim))
        self.skip_gates = nn.Parameter(torch.zeros(self.num_skips, cfg.model_dim)) if cfg.skip_gates_enabled else None
        if cfg.smear_gate_enabled:
            self.smear_gate = nn.Parameter(torch.zeros(1, SMEAR_GATE_DIMS))
            self.smear_lambda = nn.Parameter(torch.zeros(1))
        if cfg.parallel_lanes == 2:  # two-lane parallel residuals (PR #1530 lineage), one row per physical layer
            self.parallel_resid_lambdas = nn.Parameter(torch.full((cfg.num_layers, 2), 1.1))
            self.parallel_post_lambdas = nn.Parameter(torch.ones(cfg.num_layers, 2, 2))
        self.fa3 = fa3
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

    def forward_hidden(self, ids: Tensor, lora: TTTAdapters | None = None) -> Tensor:
        """Final normed hidden states (B, T, D): the input of the tied output head. lora: TTT adapters, one set per
        layer pass, added inside the same blocks (gates, SmearGate, document isolation and looping unchanged)."""
        cfg = self.cfg
        enc, dec = layer_schedule(cfg.num_layers, cfg.loop_start, cfg.loop_end, cfg.num_loops, self.looping)
        cos, sin = rope_tables(ids.size(1), cfg.rope_dims, cfg.rope_base, ids.device)
        docs = doc_mask(ids, self.fa3, cfg.doc_isolation)
        x = self.tok_emb(ids)
        if cfg.smear_gate_enabled:
            x = smear(x, ids, self.smear_gate, self.smear_lambda)
        x = rms_norm(x)
        x0, skips, lane1 = x, [], None

        def block(i: int, p: int, x: Tensor, lane1: Tensor | None) -> tuple[Tensor, Tensor | None]:
            ad = None if lora is None else lora.passes[p]
            lambdas = (self.parallel_resid_lambdas[i], self.parallel_post_lambdas[i]) if lane1 is not None else None
            return self.blocks[i](x, x0, cos, sin, docs, lane1, lambdas, ad)

        for p, i in enumerate(enc):
            if lane1 is None and cfg.parallel_lanes == 2 and self.blocks[i].parallel:
                lane1 = x  # both lanes start as the stream entering the first two-lane layer
            x, lane1 = block(i, p, x, lane1)
            skips.append(x)
        for j, i in enumerate(dec):
            if lane1 is None and cfg.parallel_lanes == 2 and self.blocks[i].parallel:
                lane1 = x  # before this layer's skip: the skip joins lane 0 only (as record N)
            if j < self.num_skips and skips:  # the U-Net skip joins lane 0
                s = self.skip_weights[j].to(x.dtype) * skips.pop()
                if self.skip_gates is None:
                    x = x + s
                else:  # sigmoid skip gates: lerp(s, x, g); init 0 -> 50/50
                    x = torch.lerp(s, x, torch.sigmoid(self.skip_gates[j]).to(x.dtype))
            x, lane1 = block(i, len(enc) + j, x, lane1)
        return rms_norm(x if lane1 is None else 0.5 * (x + lane1))

    def forward_logits(self, ids: Tensor, lora: TTTAdapters | None = None) -> Tensor:
        h = self.forward_hidden(ids, lora)
        logits = F.linear(h, self.tok_emb.weight)
        if lora is not None:  # the head's adapter, before the softcap
            logits = logits + lora.head(h)
        c = self.cfg.logit_softcap
        return c * torch.tanh(logits / c)

    def forward(self, ids: Tensor, targets: Tensor) -> Tensor:
        logits = self.forward_logits(ids)
        return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())


class LoRA(nn.Module):
    """Record N's batched TTT adapter (BatchedLinearLoRA; alpha/rank scaling: PR #1767): slot b of dim 0 (one
    document) maps x to (x A_b^T) B_b^T * alpha/rank. A ~ U(+-1/sqrt(in)) from gen, B = 0: a new adapter adds 0."""

    def __init__(self, bsz: int, fan_in: int, fan_out: int, rank: int, alpha: float, gen: torch.Generator):
        super().__init__()
        self.A = nn.Parameter(torch.empty(bsz, rank, fan_in).uniform_(-fan_in**-0.5, fan_in**-0.5, generator=gen))
        self.B = nn.Parameter(torch.zeros(bsz, fan_out, rank))
        self.scale = alpha / rank

    def forward(self, x: Tensor) -> Tensor:
        return (x @ self.A.transpose(1, 2)) @ self.B.transpose(1, 2) * self.scale


class TTTAdapters(nn.Module):
    """Record N's TTT LoRA for `bsz` documents: on Q, K, V, the attention output and the MLP of every layer pass (a
    looped layer gets one set per pass; parallel adapters from the attention / MLP input to its output) and on the
    head (final hidden -> logits, before the softcap). GPT.forward_logits(ids, lora) applies them."""

    def __init__(self, model: GPT, bsz: int, rank: int, alpha: float, gen: torch.Generator):
        super().__init__()
        c, d = model.cfg, model.cfg.model_dim
        kv = c.num_kv_heads * (d // c.num_heads)
        passes = sum(map(len, layer_schedule(c.num_layers, c.loop_start, c.loop_end, c.num_loops, model.looping)))
        lora = lambda fan_in, fan_out: LoRA(bsz, fan_in, fan_out, rank, alpha, gen)
        self.head = lora(d, c.vocab_size)
        self.passes = nn.ModuleList(nn.ModuleDict(dict(q=lora(d, d), k=lora(d, kv), v=lora(d, kv), o=lora(d, d),
                                                       mlp=lora(d, d))) for _ in range(passes))
        self.to(model.tok_emb.weight.device)

    def reset(self) -> None:
        """B = 0 again, A kept (record N's warm start, TTT_WARM_START_A=1)."""
        with torch.no_grad():
            for m in self.modules():
                if isinstance(m, LoRA):
                    m.B.zero_()


def ttt_forward(model: GPT, ids: Tensor, lora: TTTAdapters) -> Tensor:
    """The TTT forward as a frame of its own, so compiling it (Run.score) caches its shapes apart from the eval's."""
    return model.forward_logits(ids, lora)


def apply_precision(model: GPT, precision: str) -> GPT:
    """Record P's dtype policy for "bf16": the tied embedding is stored in bf16, so the residual stream is bf16; block
    matrices and control tensors stay fp32 masters; matmuls run under bf16 autocast (Runtime.amp). "fp32": all fp32."""
    model.tok_emb.to(torch.bfloat16 if precision == "bf16" else torch.float32)
    return model


def param_roles(model: GPT) -> dict[str, str]:
    """Each parameter's optimizer role, assigned once and explicitly: 'muon' for block matrices, 'embed' for the
    tied embedding, 'scalar' for everything else (gains, scales, mixes, skip weights/gates)."""
    roles = {name: "scalar" for name, _ in model.named_parameters()}
    roles["tok_emb.weight"] = "embed"
    for name, mod in model.blocks.named_modules():
        if isinstance(mod, nn.Linear):
            roles[f"blocks.{name}.weight"] = "muon"
    return roles


def quant_roles(model: GPT) -> dict[str, str]:
    """Each matrix's quantization role (quant.ROLES), assigned once and explicitly: the tied embedding, and the
    attention and MLP matrices of every block (each role has its own bits / clip sigmas)."""
    roles = {"tok_emb.weight": "embed"}
    for name, mod in model.blocks.named_modules():
        if isinstance(mod, nn.Linear):
            roles[f"blocks.{name}.weight"] = "attn" if ".attn." in f".{name}." else "mlp"
    return roles


# -----------------------------------------------------------------------------
# OPTIMIZERS: MuonEq-R for block matrices (rank-sharded), AdamW for the embedding and scalars
# -----------------------------------------------------------------------------

NS_COEFFS = {  # (a, b, c) of each Newton-Schulz step; the last triple repeats past the table's end
    "quintic": ((3.4445, -4.7750, 2.0315),),  # Keller Jordan's Muon: every step the same
    "polar": ((8.156554524902461, -22.48329292557795, 15.878769915207462),  # Polar Express (PR #1344, #1787)
              (4.042929935166739, -2.808917465908714, 0.5000178451051316),
              (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
              (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
              (2.3465413258596377, -1.7097828382687081, 0.42323551169305323)),
}


def zeropower_via_newtonschulz5(G: Tensor, steps: int, dtype: torch.dtype = torch.float32,
                                coeffs: tuple[tuple[float, float, float], ...] = NS_COEFFS["quintic"]) -> Tensor:
    """Approximately orthogonalize G: about U S' V^T with S'_ii near 1 rather than exactly 1, which is what a few
    fixed-coefficient steps trade for speed (the Polar Express table gets closer in 5 steps than the quintic). Runs
    in `dtype` (bf16 on GPU, fp32 on CPU)."""
    X = G.to(dtype)
    X = X / (X.norm() + 1e-7)
    transposed = X.size(0) > X.size(1)
    if transposed:
        X = X.T
    for i in range(steps):
        a, b, c = coeffs[min(i, len(coeffs) - 1)]
        A = X @ X.T
        X = a * X + (b * A + c * (A @ A)) @ X
    return X.T if transposed else X


def muon_update(grad: Tensor, buf: Tensor, momentum: float, ns_steps: int, row_normalize: bool,
                dtype: torch.dtype = torch.float32, ns: Callable = zeropower_via_newtonschulz5) -> Tensor:
    """One Muon direction: Nesterov momentum (updates buf in place), MuonEq-R row normalization (PR #1394),
    Newton-Schulz (`ns`, the compiled function on GPU), and the sqrt(max(1, rows/cols)) shape scale."""
    buf.mul_(momentum).add_(grad)
    u = grad.add(buf, alpha=momentum)
    if row_normalize:
        u = u / u.float().norm(dim=1, keepdim=True).clamp_min(1e-7).to(u.dtype)
    u = ns(u, ns_steps, dtype)
    return u * max(1.0, grad.size(0) / grad.size(1)) ** 0.5


class Muon(torch.optim.Optimizer):
    """Muon over 2-D matrices. Matrix i is orthogonalized by rank i % world_size into a flat buffer (zeros
    elsewhere); one all-reduce SUM hands every rank every update; each rank applies decoupled weight decay and
    the update to all matrices. Momentum buffers live in self.state on the owning rank, so loading a saved
    optimizer state restores (or clears) them too. The exchange buffers are allocated once, not per step."""

    def __init__(self, params: list[Tensor], lr: float, momentum: float, ns_steps: int, weight_decay: float,
                 row_normalize: bool, rank: int = 0, world_size: int = 1, dtype: torch.dtype = torch.float32,
                 ns: Callable = zeropower_via_newtonschulz5):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay))
        self.ns_steps, self.row_normalize, self.dtype, self.ns = ns_steps, row_normalize, dtype, ns
        self.rank, self.world_size = rank, world_size
        self.flat = [torch.zeros(sum(p.numel() for p in g["params"]), dtype=dtype, device=g["params"][0].device)
                     for g in self.param_groups]

    @torch.no_grad()
    def step(self) -> None:
        for group, flat in zip(self.param_groups, self.flat):
            params = group["params"]
            flat.zero_()
            offset = 0
            for i, p in enumerate(params):
                if i % self.world_size == self.rank and p.grad is not None:
                    state = self.state[p]
                    if "momentum_buffer" not in state:
                        state["momentum_buffer"] = torch.zeros_like(p.grad)
                    u = muon_update(p.grad, state["momentum_buffer"], group["momentum"], self.ns_steps,
                                    self.row_normalize, self.dtype, self.ns)
                    flat[offset : offset + p.numel()] = u.flatten()
                offset += p.numel()
            all_reduce_(flat)
            offset = 0
            for p in params:
                p.mul_(1 - group["lr"] * group["weight_decay"])
                p.add_(flat[offset : offset + p.numel()].view_as(p).to(p.dtype), alpha=-group["lr"])
                offset += p.numel()


class Optimizers:
    """The three optimizers of the record with their base learning rates; one schedule drives all of them.
    AdamW is the fused kernel (record P) on CUDA and CPU; `ns` is the Newton-Schulz function Muon calls."""

    def __init__(self, model: GPT, cfg: Config, rank: int = 0, world_size: int = 1, ns_dtype: torch.dtype = torch.float32,
                 ns: Callable = zeropower_via_newtonschulz5):
        roles, named = param_roles(model), dict(model.named_parameters())
        by_role = {r: [named[n] for n, role in roles.items() if role == r] for r in ("muon", "embed", "scalar")}
        betas, fused = (cfg.beta1, cfg.beta2), named["tok_emb.weight"].device.type in ("cuda", "cpu")
        coeffs = NS_COEFFS[cfg.muon_ns]
        self.muon = Muon(by_role["muon"], cfg.matrix_lr, cfg.muon_momentum, cfg.muon_backend_steps, cfg.muon_wd,
                         cfg.muon_row_normalize, rank, world_size, ns_dtype, lambda g, k, dt: ns(g, k, dt, coeffs))
        self.embed = torch.optim.AdamW(by_role["embed"], lr=cfg.tied_embed_lr, betas=betas, eps=cfg.adam_eps,
                                       weight_decay=cfg.embed_wd, fused=fused)
        self.scalar = torch.optim.AdamW(by_role["scalar"], lr=cfg.scalar_lr, betas=betas, eps=cfg.adam_eps,
                                        weight_decay=cfg.adam_wd, fused=fused)
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


@dataclass(frozen=True)
class Schedule:
    """Everything that moves with training progress, in one place: progress, LR multiplier, Muon momentum, the
    looping switch and the calibration deadline. Pure functions of the config."""

    cfg: Config

    @property
    def cap_ms(self) -> float:
        """The train loop's cap: the 600 s budget minus the GPTQ reserve (0 = no cap, step-based progress)."""
        c = self.cfg
        return 1000.0 * max(0.0, c.max_wallclock_seconds - c.gptq_reserve_seconds) if c.max_wallclock_seconds > 0 else 0.0

    def frac(self, step: int, elapsed_ms: float) -> float:
        return elapsed_ms / self.cap_ms if self.cap_ms > 0 else step / self.cfg.iterations

    def lr_mul(self, frac: float) -> float:
        """Flat at 1, then linear warmdown over the last warmdown_frac of training to min_lr (no LR warmup)."""
        c = self.cfg
        return 1.0 if frac < 1.0 - c.warmdown_frac else max((1.0 - frac) / c.warmdown_frac, c.min_lr)

    def muon_momentum(self, step: int) -> float:
        c = self.cfg
        k = min(step / c.muon_momentum_warmup_steps, 1.0) if c.muon_momentum_warmup_steps > 0 else 1.0
        return (1 - k) * c.muon_momentum_warmup_start + k * c.muon_momentum

    def looping(self, frac: float) -> bool:
        """Depth recurrence is on from enable_looping_at of the budget; it never switches off."""
        return self.cfg.num_loops > 0 and frac >= self.cfg.enable_looping_at

    def calibration_seconds(self, train_ms: float) -> float:
        """What is left of the train budget after a loop of train_ms: Hessian collection reads training data, so it
        must end inside the budget (upstream rulings around #677 and the #1868 rerun)."""
        return self.cfg.max_wallclock_seconds - train_ms / 1000 if self.cfg.max_wallclock_seconds > 0 else math.inf


@torch.no_grad()
def ema_update_(ema: list[Tensor], params: list[Tensor], decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * params, in fp32."""
    torch._foreach_lerp_(ema, [p.float() for p in params], 1.0 - decay)


# -----------------------------------------------------------------------------
# EVALUATION: one window scorer under plain and sliding-window evaluation; record N's phased score-first TTT is
# evals/phased_ttt.py (inlined into a record like data/shards.py), on the model's forward with TTT adapters.
#
# Targets are indexed 0..N-1 (target j is tokens[j+1], predicted from tokens[..j]). A window starting at s reads
# tokens[s : s+seq_len] and scores targets s+first .. s+wlen-1, where first = 0 for s = 0 and seq_len - stride
# otherwise. With stride = seq_len this is the plain non-overlapping eval.
# -----------------------------------------------------------------------------


def window_starts(num_targets: int, seq_len: int, stride: int) -> np.ndarray:
    """Window starts 0, stride, 2*stride, ... while start + (seq_len - stride) < num_targets (record P):
    every target is scored exactly once, each after the first seq_len with >= seq_len - stride tokens of context."""
    ctx = seq_len - stride
    return np.arange(0, max(1, num_targets - ctx), stride, dtype=np.int64)


@dataclass(frozen=True)
class EvalContext:
    """What every scorer needs besides the model and the tokens. static_shapes pads every batch to batch_windows
    rows, so a compiled forward sees one shape (no recompiles); eager runs skip the padding."""

    luts: tuple[Tensor, Tensor, Tensor]
    batch_windows: int
    device: torch.device = torch.device("cpu")
    val_bytes: Tensor | None = None  # the byte sidecar (val token i's original bytes), used instead of the LUTs
    amp: Callable = contextlib.nullcontext
    rank: int = 0
    world_size: int = 1
    static_shapes: bool = False

    def share(self, items: np.ndarray) -> np.ndarray:
        """This rank's contiguous share of items."""
        n = len(items)
        return items[n * self.rank // self.world_size : n * (self.rank + 1) // self.world_size]


def bpb_from_sums(sums: Tensor) -> tuple[float, float]:
    """(val_loss in nats/token, val_bpb) from float64 sums (nll, targets, bytes)."""
    nll, count, nbytes = (float(v) for v in sums)
    return nll / count, nll / math.log(2) / nbytes


@torch.no_grad()
def score_windows(logits_fn: Callable[[Tensor], Tensor], tokens: Tensor, starts: np.ndarray, seq_len: int,
                  stride: int, ev: EvalContext, nll_out: Tensor | None = None, hits_out: Tensor | None = None) -> Tensor:
    """float64 sums (nll, targets, bytes) over the targets these windows score. Short windows are padded to seq_len
    by repeating the last token (causal attention: padding after a position cannot change it); with static shapes,
    short batches get all-masked rows. If given, nll_out[j] receives target j's nll and hits_out[j] counts how often
    target j was scored (check_legality.py)."""
    n = tokens.numel() - 1
    ctx = seq_len - stride
    offsets = torch.arange(seq_len)
    sums = torch.zeros(3, dtype=torch.float64, device=ev.device)
    luts = tuple(t.to(ev.device) for t in ev.luts)
    for b in range(0, len(starts), ev.batch_windows):
        s = torch.from_numpy(starts[b : b + ev.batch_windows])[:, None]
        real = torch.ones(len(s), 1, dtype=torch.bool)
        if ev.static_shapes and len(s) < ev.batch_windows:
            pad = ev.batch_windows - len(s)
            s, real = torch.cat((s, s.new_zeros(pad, 1))), torch.cat((real, real.new_zeros(pad, 1)))
        pos = s + offsets  # (W, seq_len) target index of each position
        mask = (pos < n) & (pos >= torch.where(s == 0, 0, s + ctx)) & real
        x = tokens[pos.clamp(max=n - 1)].to(ev.device)
        y = tokens[(pos + 1).clamp(max=n)].to(ev.device)
        mask = mask.to(ev.device)
        with ev.amp():
            logits = logits_fn(x)
        nll = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="none").view_as(y).double()
        nll = torch.where(mask, nll, 0.0)
        nbytes = target_bytes(x, y, luts) if ev.val_bytes is None else ev.val_bytes[(pos + 1).clamp(max=n)].to(ev.device)
        sums += torch.stack((nll.sum(), mask.sum().double(), (nbytes * mask).sum().double()))
        if nll_out is not None:
            nll_out[pos[mask.cpu()]] = nll[mask].cpu()
        if hits_out is not None:
            hits_out.index_add_(0, pos[mask.cpu()], torch.ones(int(mask.sum()), dtype=hits_out.dtype))
    return sums


def evaluate(logits_fn: Callable[[Tensor], Tensor], tokens: Tensor, seq_len: int, stride: int,
             ev: EvalContext) -> tuple[float, float]:
    """Plain (stride = seq_len) or sliding-window eval; windows split contiguously over ranks, sums all-reduced."""
    starts = ev.share(window_starts(tokens.numel() - 1, seq_len, stride))
    sums = all_reduce_(score_windows(logits_fn, tokens, starts, seq_len, stride, ev))
    n = tokens.numel() - 1
    if int(sums[1]) != n:
        raise RuntimeError(f"eval scored {int(sums[1])} targets, expected each of {n} exactly once")
    return bpb_from_sums(sums)


# -----------------------------------------------------------------------------
# RUNTIME: device, precision and attention backend, chosen once per process
# -----------------------------------------------------------------------------


@dataclass
class Runtime:
    """The process's place in the run. precision "bf16" is record P's CUDA dtype policy (apply_precision + bf16
    autocast) and runs on CPU too, so CI exercises the GPU precision path; "fp32" is the fast CPU path. fa3 is
    FlashAttention-3's flash_attn_func when attention runs on it (resolve_attention), else None: SDPA."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    precision: str = "fp32"
    fa3: Callable | None = None
    attention_note: str = "sdpa"

    @property
    def is_master(self) -> bool:
        return self.rank == 0

    @property
    def attention(self) -> str:
        return "fa3" if self.fa3 is not None else "sdpa"

    @property
    def ns_dtype(self) -> torch.dtype:  # Newton-Schulz and the Muon exchange buffer
        return torch.bfloat16 if self.precision == "bf16" else torch.float32

    def amp(self) -> contextlib.AbstractContextManager:
        if self.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()


@dataclass(frozen=True)
class FA3:
    """FlashAttention-3's two entry points: calling it is flash_attn_func (B, T, H, D); .varlen is
    flash_attn_varlen_func on flattened rows with cu_seqlens (document isolation)."""

    func: Callable
    varlen: Callable

    def __call__(self, *args: object, **kwargs: object) -> object:
        return self.func(*args, **kwargs)


def load_fa3(device: torch.device) -> tuple[FA3 | None, str]:
    """FA3 if `flash_attn_interface` imports and runs a tiny causal GQA call of both entry points on device, else
    (None, why). A wheel built for another torch or CUDA fails here, at import or first call, not mid-run."""
    try:
        from flash_attn_interface import flash_attn_func, flash_attn_varlen_func
        q = torch.zeros(1, 4, 2, 64, dtype=torch.bfloat16, device=device)
        flash_attn_func(q, q[:, :, :1], q[:, :, :1], causal=True)
        cu = torch.tensor([0, 1, 4], dtype=torch.int32, device=device)
        flash_attn_varlen_func(q[0], q[0, :, :1], q[0, :, :1], cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=4,
                               max_seqlen_k=4, causal=True)
    except Exception as e:  # ImportError, OSError/undefined symbol (ABI), RuntimeError (no kernel for this GPU)
        return None, f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:200]}"
    return FA3(flash_attn_func, flash_attn_varlen_func), "flash_attn_interface ok"


def resolve_attention(mode: str, device: torch.device) -> tuple[Callable | None, str]:
    """ATTENTION=auto: FlashAttention-3 on CUDA when usable, else SDPA; fa3: FA3 or a hard error; sdpa: SDPA."""
    if mode == "sdpa" or (mode == "auto" and device.type != "cuda"):
        return None, "sdpa " + ("requested" if mode == "sdpa" else "(no CUDA)")
    fa3, why = load_fa3(device)
    if fa3 is None and mode == "fa3":
        raise RuntimeError(f"ATTENTION=fa3 but FlashAttention-3 is unusable: {why} (install it: requirements-gpu.txt)")
    return fa3, why


def setup_runtime(cfg: Config) -> Runtime:
    """The one place that looks at the device (and reads torchrun's RANK/WORLD_SIZE/LOCAL_RANK): CUDA + NCCL, or
    CPU + gloo; then the precision (auto: bf16 on CUDA, fp32 on CPU) and the attention backend."""
    world_size, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        backend = "nccl"
    else:
        device = torch.device("cpu")
        per_rank = (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", per_rank))))  # an explicit choice wins
        backend = "gloo"
    if world_size > 1:
        dist.init_process_group(backend, device_id=device if device.type == "cuda" else None)
    precision = cfg.precision if cfg.precision != "auto" else ("bf16" if device.type == "cuda" else "fp32")
    fa3, note = resolve_attention(cfg.attention, device)
    return Runtime(rank, world_size, local_rank, device, precision, fa3, note)


# -----------------------------------------------------------------------------
# TRAINING PIECES: steps, warm-up, calibration, the data a run reads
# -----------------------------------------------------------------------------


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


def load_quantized_model(path: str | Path, cfg: Config, device: torch.device, precision: str = "fp32",
                         fa3: Callable | None = None) -> GPT:
    """A fresh model with the artifact's dequantized weights, looping on, in eval mode (what every score uses)."""
    model = apply_precision(GPT(cfg, fa3).to(device), precision)
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


def code_sources() -> dict[str, bytes]:
    """Every code file this run executes, by repo-relative name: train_gpt.py, plus the local modules it imports
    when they are imported as modules (a repo run): data/shards.py, evals/*.py and quant/*.py with their packages'
    __init__.py. In a packed record they are inlined, so the record file is the only one. Their total is the run's
    code bytes."""
    files = {"train_gpt.py": Path(__file__).read_bytes()}
    if load_data.__module__ == "data.shards":
        data_dir = Path(sys.modules["data.shards"].__file__).parent
        files.update({f"data/{name}": (data_dir / name).read_bytes() for name in ("__init__.py", "shards.py")})
    if eval_phased_ttt.__module__ == "evals.phased_ttt":
        evals_dir = Path(sys.modules["evals"].__file__).parent
        files.update({f"evals/{p.name}": p.read_bytes() for p in sorted(evals_dir.glob("*.py"))})
    if quantize_state_dict.__module__.startswith("quant."):
        quant_dir = Path(sys.modules["quant"].__file__).parent
        files.update({f"quant/{p.name}": p.read_bytes() for p in sorted(quant_dir.glob("*.py")) if p.name != "__main__.py"})
    return files


# -----------------------------------------------------------------------------
# THE RUN: build, train, calibrate, serialize, score, summarize
# -----------------------------------------------------------------------------


class Run:
    """One run as named phases. run() calls them in order; tools reuse them on a saved checkpoint
    (Run.from_checkpoint, then calibrate / serialize / score). Building loads the data and makes the model."""

    def __init__(self, cfg: Config, rt: Runtime, log_to_file: bool = False):
        self.cfg, self.rt = cfg, rt
        self.out_dir, self.run_id = Path(cfg.out_dir), cfg.run_id or str(uuid.uuid4())
        self.artifact_path = self.out_dir / "final_model.int6.ptz"
        self.log = Logger(self.out_dir / "logs" / f"{self.run_id}.txt" if log_to_file and rt.is_master else None)
        self.ledger, self.schedule, self.results = Ledger(), Schedule(cfg), {}
        self.compiled = cfg.compile == "1" or (cfg.compile == "auto" and rt.device.type == "cuda")
        self.accum = grad_accum_steps(cfg, rt.world_size)
        self.data = load_data(cfg.dataset_dir, cfg.tokenizer_file, cfg.vocab_size, cfg.eval_seq_len)
        torch.manual_seed(cfg.seed)
        np.random.seed(cfg.seed)
        self.model = apply_precision(GPT(cfg, rt.fa3).to(rt.device), rt.precision)
        self.logits_fn = self.compile(self.model.forward_logits)
        windows = max(1, cfg.val_batch_tokens // (rt.world_size * self.accum * cfg.eval_seq_len))
        self.ev = EvalContext(self.data.luts, windows, device=rt.device, val_bytes=self.data.val_bytes, amp=rt.amp,
                              rank=rt.rank, world_size=rt.world_size, static_shapes=self.compiled)
        self.step, self.train_ms, self.looping_step = 0, 0.0, None

    @classmethod
    def from_checkpoint(cls, cfg: Config, rt: Runtime, path: str | Path) -> Run:
        r = cls(cfg, rt)
        r.model.load_state_dict(torch.load(path, map_location=rt.device, weights_only=True), strict=True)
        r.model.looping = cfg.num_loops > 0
        return r

    def compile(self, fn: Callable) -> Callable:
        if self.compiled:  # the TTT step's static shapes: 2 row counts x 4 row lengths for record N (N sets 16 too)
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 16)
        return torch.compile(fn, dynamic=False, fullgraph=True) if self.compiled else fn

    def make_loader(self, kind: str | None = None) -> ShuffledSequenceLoader | DocumentPackingLoader:
        """The training loader (TRAIN_LOADER); calibration asks for shuffled windows, as record N does."""
        c = self.cfg
        cls = DocumentPackingLoader if (kind or c.train_loader) == "packed" else ShuffledSequenceLoader
        return cls(self.data.train_files, c.train_seq_len, c.vocab_size, c.seed, self.rt.rank, self.rt.world_size)

    @property
    def micro_seqs(self) -> int:
        return self.cfg.train_batch_tokens // (self.rt.world_size * self.accum * self.cfg.train_seq_len)

    def plain_eval(self, logits_fn: Callable) -> tuple[float, float]:
        L = self.cfg.eval_seq_len
        return evaluate(logits_fn, self.data.val_tokens, L, L, self.ev)

    def timed_eval(self, label: str, budget: str, fn: Callable[[], tuple[float, float]]) -> None:
        sync(self.rt.device)
        t = time.perf_counter()
        vl, vb = fn()
        sync(self.rt.device)
        dt = time.perf_counter() - t
        self.ledger.add(label.replace("-", "_").replace(" ", "_"), dt, budget)
        self.results[label] = dict(val_loss=vl, val_bpb=vb, eval_time_ms=1000 * dt)
        self.log(log_line("eval", label=label, val_loss=vl, val_bpb=vb, ms=1000 * dt))

    def log_header(self) -> None:
        """Every code file that ran (byte-exact framing: tools/parse_log.py reads them back), the environment, the
        resolved config, and what this process runs on."""
        cfg, rt, log = self.cfg, self.rt, self.log
        self.code = b"".join(body for body in code_sources().values())
        for name, body in code_sources().items():
            log(log_line("source_file", name=name, n=len(body)) + f"\n{body.decode()}", console=False)
        log("=" * 100, console=False)
        log(f"Running Python {sys.version}", console=False)
        log(f"Running PyTorch {torch.__version__}", console=False)
        log(nvidia_smi(), console=False)
        log("=" * 100, console=False)
        log("Hyperparameters:")
        derived = dict(dataset_dir=cfg.dataset_dir, tokenizer_file=cfg.tokenizer_file, world_size=rt.world_size,
                       rank=rt.rank, grad_accum_effective=self.accum, device=rt.device, run_id=self.run_id)
        for key, value in sorted({**dataclasses.asdict(cfg), **derived}.items()):
            log(f"  {key}: {value}")
        log(log_line("train_shards", n=len(self.data.train_files)))
        log(log_line("val_tokens", n=self.data.val_tokens.numel() - 1))
        log(log_line("tokenizer", sha256=self.data.tokenizer_sha256, vocab=cfg.vocab_size))
        log(log_line("val_bytes", source="lut" if self.data.val_bytes is None else "sidecar", total=self.data.byte_total()))
        log(log_line("model_params", n=sum(p.numel() for p in self.model.parameters())))
        log(log_line("runtime", world_size=rt.world_size, accum=self.accum, device=rt.device.type, cpus=os.cpu_count(),
                     attention=rt.attention, compile=self.compiled, precision=rt.precision))
        if rt.device.type == "cuda" and rt.fa3 is None:
            log(f"WARNING attention: FlashAttention-3 unusable ({rt.attention_note}); running SDPA, slower than the "
                f"record's attention. ATTENTION=fa3 makes this an error.")

    def train(self) -> None:
        """Compile warm-up (undone), then the timed loop under the wallclock cap; EMA weights applied at the end."""
        cfg, rt, model, log, sched = self.cfg, self.rt, self.model, self.log, self.schedule
        ns = self.compile(zeropower_via_newtonschulz5)
        self.opts = opts = Optimizers(model, cfg, rt.rank, rt.world_size, rt.ns_dtype, ns)
        train_model: nn.Module = self.compile(model)
        if rt.world_size > 1:
            torch._dynamo.config.optimize_ddp = False  # as record P: DDP around a compiled module
            train_model = nn.parallel.DistributedDataParallel(
                train_model, device_ids=[rt.local_rank] if rt.device.type == "cuda" else None)
        if sched.cap_ms > 0:
            log(log_line("gptq_reserve", seconds=cfg.gptq_reserve_seconds, ms=sched.cap_ms))

        def step_on(loader: ShuffledSequenceLoader) -> Tensor:
            batches = [tuple(t.to(rt.device, non_blocking=True) for t in loader.next_batch(self.micro_seqs))
                       for _ in range(self.accum)]
            return train_step(train_model, opts, batches, cfg.grad_clip_norm, rt.amp)

        t0 = time.perf_counter()
        compile_warmup(model, opts, step_on, self.make_loader, cfg, log)
        sync(rt.device)
        self.ledger.add("compile_warmup", time.perf_counter() - t0, "none")
        loader = self.make_loader()
        ema = [p.detach().float().clone() for p in model.parameters()]
        step, stop_after = 0, None
        sync(rt.device)
        t_start = time.perf_counter()
        while True:
            last = step == cfg.iterations or step == stop_after
            if last or (cfg.val_loss_every > 0 and step % cfg.val_loss_every == 0):
                sync(rt.device)
                self.train_ms += 1000 * (time.perf_counter() - t_start)
                vl, vb = self.plain_eval(self.logits_fn)
                log(log_line("val", step=step, iterations=cfg.iterations, val_loss=vl, val_bpb=vb))
                sync(rt.device)
                t_start = time.perf_counter()
            if last:
                if stop_after is not None and step < cfg.iterations:
                    log(log_line("stop", ms=self.train_ms, step=step, iterations=cfg.iterations))
                break
            frac = sched.frac(step, self.train_ms + 1000 * (time.perf_counter() - t_start))
            if sched.looping(frac) and not model.looping:
                model.looping, self.looping_step = True, step
                enc, dec = layer_schedule(cfg.num_layers, cfg.loop_start, cfg.loop_end, cfg.num_loops, True)
                log(log_line("layer_loop", step=step, frac=frac, encoder=enc, decoder=dec))
            opts.set_schedule(sched.lr_mul(frac), sched.muon_momentum(step))
            loss = step_on(loader)
            ema_update_(ema, list(model.parameters()), cfg.ema_decay)
            step += 1
            elapsed_ms = self.train_ms + 1000 * (time.perf_counter() - t_start)
            flags = all_reduce_(torch.stack(((~torch.isfinite(loss)).float(), torch.tensor(
                float(sched.cap_ms > 0 and elapsed_ms >= sched.cap_ms), device=rt.device))), dist.ReduceOp.MAX)
            if flags[0] > 0:
                log(f"stopping: non-finite train loss at step {step}")
                raise SystemExit(1)
            if step <= 5 or step % cfg.train_log_every == 0:
                log(log_line("train", step=step, iterations=cfg.iterations, train_loss=loss.item(),
                             minutes=elapsed_ms / 60000, tok_s=step * cfg.train_batch_tokens / (elapsed_ms / 1000)))
            if flags[1] > 0 and stop_after is None:
                stop_after = step
        self.step = step
        self.ledger.add("train_loop", self.train_ms / 1000, "train")
        if rt.device.type == "cuda":
            log(log_line("peak_memory", allocated=torch.cuda.max_memory_allocated() // 2**20,
                         reserved=torch.cuda.max_memory_reserved() // 2**20))
        log("ema:applying EMA weights")
        with torch.no_grad():
            for p, e in zip(model.parameters(), ema):
                p.copy_(e.to(p.dtype))
        model.looping = cfg.num_loops > 0  # the final model always runs looped
        self.timed_eval("pre-quantization post-ema", "none", lambda: self.plain_eval(self.logits_fn))
        if rt.is_master:  # the float checkpoint: input of tools/requantize.py, not counted
            torch.save(model.state_dict(), self.out_dir / "final_model.pt")
            log(log_line("serialized_raw", n=(self.out_dir / "final_model.pt").stat().st_size))
            log(log_line("code_size", n=len(self.code)))

    def calibrate(self, seconds: float | None = None) -> dict[str, Tensor]:
        """GPTQ Hessians from a fresh training loader, averaged over every rank's batches. Calibration reads training
        data, so it stops taking batches before one would end past `seconds` (default: what is left of the train
        budget after the loop)."""
        cfg, rt, log = self.cfg, self.rt, self.log
        seconds = self.schedule.calibration_seconds(self.train_ms) if seconds is None else seconds
        log("GPTQ:collecting Hessians from calibration data...")
        sync(rt.device)
        t = time.perf_counter()
        loader = self.make_loader("shuffled")

        def batches() -> Iterator[Tensor]:
            for i in range(cfg.gptq_calibration_batches):
                spent = time.perf_counter() - t
                if i > 0 and spent + spent / i > seconds:  # the next batch would end past the train budget
                    return
                yield loader.next_batch(self.micro_seqs)[0].to(rt.device)

        hessians, count = collect_hessians(self.model, batches(), cfg.passthrough_numel, rt.amp)
        total = int(all_reduce_(torch.tensor(float(count), device=rt.device)))
        for name in sorted(hessians):  # improvement on upstream: calibrate on every rank's data, not rank 0's only
            hessians[name] = all_reduce_(hessians[name]) / total
        sync(rt.device)
        self.ledger.add("gptq_hessians", time.perf_counter() - t, "train")
        wanted = cfg.gptq_calibration_batches * rt.world_size
        if total < wanted:
            log(log_line("gptq_cut", done=total, wanted=wanted, limit=cfg.max_wallclock_seconds))
        log(log_line("gptq_collected", n=len(hessians), seconds=time.perf_counter() - t))
        return hessians

    def serialize(self, hessians: dict[str, Tensor], path: Path | None = None, cfg: Config | None = None,
                  method: str = "gptq") -> int:
        """GPTQ (on the master, where the weights are) and the artifact, written atomically; every rank waits for it.
        cfg overrides the quantization settings (tools/requantize.py sweeps them). Returns the artifact's bytes."""
        cfg, path, log = cfg or self.cfg, path or self.artifact_path, self.log
        t = time.perf_counter()
        if self.rt.is_master:
            state = {k: v.detach() for k, v in self.model.state_dict().items()}
            roles = {k: r for k, r in quant_roles(self.model).items() if state[k].numel() > cfg.passthrough_numel}
            qtensors = quantize_state_dict(
                state, hessians, matrix_bits=cfg.matrix_bits, embed_bits=cfg.embed_bits, roles=roles,
                embed_clip_sigmas=cfg.embed_clip_sigmas, attn_clip_sigmas=cfg.attn_clip_sigmas,
                mlp_clip_sigmas=cfg.mlp_clip_sigmas,
                lqer_rank=cfg.lqer_rank if cfg.lqer_enabled else 0, lqer_top_k=cfg.lqer_top_k,
                lqer_group=cfg.lqer_asym_group, passthrough_numel=cfg.passthrough_numel, method=method)
            save_artifact(path, encode_artifact(qtensors, codec=cfg.compressor))
            n, code = path.stat().st_size, len(getattr(self, "code", b""))
            log("Quantized weights:")
            for line in describe(qtensors):
                log(f"  {line}")
            log(log_line("serialized", codec=cfg.compressor, n=n))
            log(log_line("total_size", codec=cfg.compressor, n=n + code))
            for part, value in (("code", code), ("model", n), ("total", n + code)):
                log(log_line("bytes", part=part, n=value))
            log(log_line("artifact", name=path.name, sha256=sha256_file(path)))
        if dist_ready():
            dist.barrier()
        self.ledger.add("serialize", time.perf_counter() - t, "none")
        return path.stat().st_size

    def score(self, path: Path | None = None) -> dict[str, dict[str, float]]:
        """Every rank reloads the artifact from disk, and every score below comes from it: quantized (diagnostic),
        sliding window and record N's phased score-first TTT (the eval budget; it changes qmodel's weights)."""
        cfg, rt, val, L = self.cfg, self.rt, self.data.val_tokens, self.cfg.eval_seq_len
        t = time.perf_counter()
        qmodel = load_quantized_model(path or self.artifact_path, cfg, rt.device, rt.precision, rt.fa3)
        self.ledger.add("deserialize", time.perf_counter() - t, "none")
        qlogits = self.compile(qmodel.forward_logits)
        adapters = lambda bsz, gen: TTTAdapters(qmodel, bsz, cfg.ttt_lora_rank, cfg.ttt_lora_alpha, gen)
        compiled_ttt = self.compile(ttt_forward)
        ttt_logits = lambda ids, lora: compiled_ttt(qmodel, ids, lora)
        if self.compiled:  # compile outside the eval clock, on random tokens (no val data), like record N
            t = time.perf_counter()
            with torch.no_grad(), rt.amp():
                qlogits(torch.randint(0, cfg.vocab_size, (self.ev.batch_windows, L), device=rt.device))
            qmodel.requires_grad_(False)  # as in the TTT: gradients reach the adapters only
            sizes = [(n, T) for n in slot_sizes(val, cfg) for T in context_sizes(cfg.ttt_chunk_size,
                     cfg.ttt_eval_seq_len, True)] if cfg.ttt_enabled else []  # row counts: from the document count
            for n, T in sizes:  # the TTT forward and backward at every shape, on throwaway adapters
                with rt.amp():
                    ttt_logits(torch.randint(0, cfg.vocab_size, (n, T), device=rt.device),
                               adapters(n, torch.Generator())).float().mean().backward()
            qmodel.requires_grad_(True)
            sync(rt.device)
            self.ledger.add("eval_compile_warmup", time.perf_counter() - t, "none")
        self.timed_eval("quantized", "none", lambda: self.plain_eval(qlogits))
        if cfg.sliding_window_enabled:
            self.timed_eval("quantized_sliding_window", "eval", lambda: evaluate(qlogits, val, L, cfg.eval_stride, self.ev))
        if cfg.ttt_enabled:
            self.timed_eval("quantized_ttt_phased", "eval", lambda: eval_phased_ttt(
                qmodel, val, cfg, self.ev, adapters, ttt_logits, lambda kind, **v: self.log(log_line(kind, **v))))
        return self.results

    def summarize(self) -> dict:
        """The time ledger into the log, and run_summary.json (every figure of the final lines, machine-readable)."""
        for phase, seconds, budget in self.ledger.rows:
            self.log(log_line("ledger", phase=phase, seconds=seconds, budget=budget))
        self.log(log_line("ledger_total", train=self.ledger.total("train"), eval=self.ledger.total("eval"),
                          limit=TIME_LIMIT_SECONDS))
        rt, results = self.rt, self.results
        summary = dict(
            run_id=self.run_id, seed=self.cfg.seed, steps=self.step, train_time_ms=round(self.train_ms),
            model_params=sum(p.numel() for p in self.model.parameters()), world_size=rt.world_size,
            device=rt.device.type, precision=rt.precision, attention=rt.attention, torch_version=torch.__version__,
            layer_loop_step=self.looping_step, val_tokens=self.data.val_tokens.numel() - 1, evals=results,
            final_label=list(results)[-1], final_val_bpb=list(results.values())[-1]["val_bpb"],
            tokenizer_sha256=self.data.tokenizer_sha256,
            time_ledger=[dict(phase=p, seconds=s, budget=b) for p, s, b in self.ledger.rows],
            time_totals=dict(train=self.ledger.total("train"), eval=self.ledger.total("eval"), limit=TIME_LIMIT_SECONDS),
            config=dataclasses.asdict(self.cfg))
        if rt.is_master:
            n, code = self.artifact_path.stat().st_size, len(self.code)
            summary.update(bytes_code=code, bytes_model=n, bytes_total=code + n, bytes_limit=ARTIFACT_LIMIT_BYTES,
                           artifact=str(self.artifact_path), artifact_sha256=sha256_file(self.artifact_path),
                           log=str(self.log.path))
            tmp = self.out_dir / "run_summary.json.tmp"  # written whole or not at all
            tmp.write_text(json.dumps(summary, indent=2))
            os.replace(tmp, self.out_dir / "run_summary.json")
        return summary


def run(cfg: Config, rt: Runtime) -> dict:
    r = Run(cfg, rt, log_to_file=True)
    r.log_header()
    r.train()
    hessians = r.calibrate()
    r.serialize(hessians)
    r.score()
    return r.summarize()


def main() -> None:
    cfg = Config.from_env()
    rt = setup_runtime(cfg)
    try:
        run(cfg, rt)
    finally:
        if dist_ready():
            dist.destroy_process_group()


# ---- experiments/pm1.py (the entry script)
# Strict ±1 weights: every block matrix is sign(w) in the forward pass (issue 16), stored at 1 bit per weight.
#
# Every attention and MLP matrix of every block becomes a SignLinear: its forward uses where(w >= 0, +1, -1) /
# sqrt(fan_in) (no learned per-channel scale) with a clipped straight-through estimator, while the latent fp32 weights
# stay Muon-trained exactly like train_gpt's block matrices (SignLinear is an nn.Linear, so param_roles is unchanged).
# The artifact stores the signs bit-packed (quantization role "sign", PGQ format version 3, quant/lowbit.py), which is
# exactly what the forward used: the quantized eval equals the pre-quantization eval up to the fp16 rounding of the
# small float passthrough tensors (gains, mixes, gates).
#
# Env vars added to train_gpt's Config:
#   PM1_EMBED=1    the tied embedding is sign(E) / sqrt(model_dim) too, in the input lookup and in the output head
#                  (logits = h . sign(E)^T / sqrt(d) for the rms-normed final hidden h: unit-variance logits for random
#                  signs, at most sqrt(d) before the softcap); stored as "sign" instead of int8 GPTQ.
#   PM1_TERNARY=1  block matrices use BitNet b1.58 absmean ternary codes clamp(round(w / mean|w_row|), -1, 1) /
#                  sqrt(fan_in) instead of signs, stored as "ternary" (5 trits per byte).
# Every block matrix must be larger than PASSTHROUGH_NUMEL (checked), or it would be stored as fp16 instead of codes.
#
# Run: torchrun --standalone --nproc_per_node=2 experiments/pm1.py (same env vars, log, artifact and run_summary.json
# as train_gpt.py; e.g. `set -a; . configs/cpu_tiny.env; set +a` first).

train_gpt = sys.modules[__name__]  # packed: train_gpt is this very file


PM1_EPS = 2.0**-24  # floor of the ternary row scale; equals quant's LOWBIT_EPS so the stored codes reload exactly


@dataclass(frozen=True)
class PM1Config(train_gpt.Config):
    pm1_embed: bool = False  # sign(E) / sqrt(d) for the tied embedding and head, stored as sign bits
    pm1_ternary: bool = False  # absmean ternary block matrices instead of signs

    def __post_init__(self) -> None:
        super().__post_init__()
        d = self.model_dim
        kv = self.num_kv_heads * (d // self.num_heads)
        smallest = d * min(kv, d, int(self.mlp_mult * d))
        if self.passthrough_numel >= smallest:
            raise ValueError(f"bad config: PASSTHROUGH_NUMEL={self.passthrough_numel} would store block matrices of "
                             f"{smallest} weights as fp16, not as their PM1 codes; use < {smallest}")
        if self.pm1_embed and self.passthrough_numel >= self.vocab_size * d:
            raise ValueError(f"bad config: PM1_EMBED=1 needs PASSTHROUGH_NUMEL < {self.vocab_size * d} (the embedding)")


def pm1_codes(w: Tensor, ternary: bool) -> Tensor:
    """The codes the forward uses, in w's dtype: +1 where w >= 0 else -1 (sign(0) = sign(-0.0) = +1, as quant's
    "sign" role); ternary: BitNet b1.58 absmean (Ma et al. 2024) clamp(round(w / mean|w_row|), -1, 1) in fp32."""
    if not ternary:
        return torch.where(w >= 0, 1.0, -1.0).to(w.dtype)
    wf = w.float()
    return torch.round(wf / wf.abs().mean(dim=1, keepdim=True).clamp_min(PM1_EPS)).clamp_(-1, 1).to(w.dtype)


class PM1STE(torch.autograd.Function):
    """Forward: pm1_codes(w) / sqrt(fan_in). Backward: the clipped straight-through estimator of BinaryConnect
    (Courbariaux et al. 2015/2016): the gradient of the coded weight passes to w where |w| <= 1 and is 0 elsewhere."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, w: Tensor, ternary: bool) -> Tensor:
        ctx.save_for_backward(w)
        return pm1_codes(w, ternary) / math.sqrt(w.shape[1])

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: Tensor) -> tuple[Tensor, None]:
        (w,) = ctx.saved_tensors
        return grad * (w.abs() <= 1).to(grad.dtype), None


def pm1_weight(w: Tensor, ternary: bool = False) -> Tensor:
    """The weight a PM1 layer computes with: codes / sqrt(fan_in), clipped STE gradient (PM1STE)."""
    return PM1STE.apply(w, ternary)


class SignLinear(nn.Linear):
    """An nn.Linear whose forward uses pm1_weight(weight): only the signs (or ternary codes) of the latent weight."""

    ternary: bool = False

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, pm1_weight(self.weight, self.ternary).to(x.dtype))


class SignEmbedding(nn.Embedding):
    """The tied embedding as sign(E) / sqrt(model_dim), in the lookup and (PM1GPT.forward_logits) in the head."""

    def forward(self, ids: Tensor) -> Tensor:
        return F.embedding(ids, pm1_weight(self.weight))


class PM1GPT(train_gpt.GPT):
    """train_gpt's GPT with every block nn.Linear swapped for a SignLinear sharing its weight (and, with PM1_EMBED,
    the tied embedding for a SignEmbedding). The zero-initialised output projections (attention and MLP .proj) get an
    orthogonal init like the other matrices instead: sign(0) = +1 would make each an all-ones (rank-1) matrix."""

    def __init__(self, cfg: PM1Config, fa3: object = None):
        if not isinstance(cfg, PM1Config):
            raise TypeError(f"PM1GPT needs a PM1Config, got {type(cfg).__name__}")
        super().__init__(cfg, fa3)
        for mod in list(self.blocks.modules()):
            for child_name, child in list(mod.named_children()):
                if type(child) is nn.Linear:
                    new = SignLinear(child.in_features, child.out_features, bias=False, device="meta")
                    new.weight, new.ternary = child.weight, cfg.pm1_ternary
                    if child_name == "proj":
                        nn.init.orthogonal_(new.weight)
                    setattr(mod, child_name, new)
        if cfg.pm1_embed:
            emb = SignEmbedding(cfg.vocab_size, cfg.model_dim, device="meta")
            emb.weight = self.tok_emb.weight
            self.tok_emb = emb

    def forward_logits(self, ids: Tensor, lora: train_gpt.TTTAdapters | None = None) -> Tensor:
        if not self.cfg.pm1_embed:
            return super().forward_logits(ids, lora)
        h = self.forward_hidden(ids, lora)
        logits = F.linear(h, pm1_weight(self.tok_emb.weight).to(h.dtype))  # as GPT.forward_logits, signed head
        if lora is not None:
            logits = logits + lora.head(h)
        c = self.cfg.logit_softcap
        return c * torch.tanh(logits / c)


class PM1Run(train_gpt.Run):
    def log_header(self) -> None:
        """train_gpt's header plus one line: how many weights the forward uses as codes, and of which kind."""
        super().log_header()
        cfg, model = self.cfg, self.model
        coded = [m.weight for m in model.modules() if isinstance(m, (SignLinear, SignEmbedding))]
        n = sum(w.numel() for w in coded)
        total = sum(p.numel() for p in model.parameters())
        self.log(f"pm1 blocks:{'ternary' if cfg.pm1_ternary else 'sign'} embed:{'sign' if cfg.pm1_embed else 'float'} "
                 f"coded_weights:{n} float_weights:{total - n} coded_tensors:{len(coded)}")


def pm1_quant_roles(model: PM1GPT) -> dict[str, str]:
    """train_gpt's quantization roles with every SignLinear weight "sign" (or "ternary") and, with PM1_EMBED, the
    embedding "sign": the artifact stores the codes the forward uses."""
    coded = {f"{name}.weight": ("ternary" if m.ternary else "sign") if isinstance(m, SignLinear) else "sign"
             for name, m in model.named_modules() if isinstance(m, (SignLinear, SignEmbedding))}
    return {**ORIGINAL_QUANT_ROLES(model), **coded}


def pm1_code_sources() -> dict[str, bytes]:
    """train_gpt's code files plus this one (unless packed into the record, where train_gpt is this very file)."""
    files = ORIGINAL_CODE_SOURCES()
    here = Path(__file__).resolve()
    if Path(train_gpt.__file__).resolve() != here:
        files[f"experiments/{here.name}"] = here.read_bytes()
    return files


ORIGINAL_CODE_SOURCES = train_gpt.code_sources
ORIGINAL_QUANT_ROLES = train_gpt.quant_roles
PATCHES = dict(Config=PM1Config, GPT=PM1GPT, Run=PM1Run, quant_roles=pm1_quant_roles, code_sources=pm1_code_sources)


@contextlib.contextmanager
def installed() -> Iterator[None]:
    """train_gpt's globals rebound to this experiment's classes and functions; restored on exit."""
    saved = {k: getattr(train_gpt, k) for k in PATCHES}
    try:
        for k, v in PATCHES.items():
            setattr(train_gpt, k, v)
        yield
    finally:
        for k, v in saved.items():
            setattr(train_gpt, k, v)


def experiment_main() -> None:
    with installed():
        train_gpt.main()


if __name__ == "__main__":
    experiment_main()
