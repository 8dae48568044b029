"""Token shards: the format, its one reader and writer, the val split, byte accounting, the train loaders, and
the loading of a run's data (train_gpt.py imports them from here).

Shard = 256 little-endian int32 header (magic, version, token count) + uint16 tokens. Every doc is [BOS]+tokens,
no EOS, and docs run on across shard boundaries (docs/data.md).

tools/build_record.py inlines this module into a record's single train_gpt.py, like quant/: it imports only the
standard library, numpy, torch (and sentencepiece, lazily), never train_gpt or another local module, and has no
module-level state.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

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
