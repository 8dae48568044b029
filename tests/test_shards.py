"""data/shards.py: the document-packing train loader (record N's). The shard format, the val split and the shuffled
loader are tested in test_data.py, test_eval.py and test_trainer.py."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch

from data.shards import BOS_ID, DocumentPackingLoader, ShardError, first_bos, load_shard, write_shard

L = 8  # seq_len


def shard(path: Path, n: int, base: int, bos: list[int]) -> str:
    """A shard of distinct tokens base, base+1, ... (never BOS) with BOS at the given positions."""
    tokens = np.arange(base, base + n)
    tokens[bos] = BOS_ID
    write_shard(path, tokens)
    return str(path)


@pytest.fixture
def files(tmp_path: Path) -> list[str]:
    """Four shards, listed out of order: A (BOS at 5 and 300), B (first BOS at 10), C (too short for any call),
    D (no BOS at all)."""
    a = shard(tmp_path / "fineweb_train_000000.bin", 1000, 100, [5, 300])
    b = shard(tmp_path / "fineweb_train_000001.bin", 700, 20000, [10, 11, 400])
    c = shard(tmp_path / "fineweb_train_000002.bin", 20, 30000, [0])
    d = shard(tmp_path / "fineweb_train_000003.bin", 500, 40000, [])
    return [d, b, c, a]


def run_of(x: torch.Tensor, y: torch.Tensor) -> np.ndarray:
    """The contiguous run of batch_seqs*seq_len + 1 tokens a batch was cut from."""
    return torch.cat([x.flatten()[:1], y.flatten()]).numpy()


def batches(loader: DocumentPackingLoader, calls: int, batch_seqs: int) -> list[np.ndarray]:
    out = []
    for _ in range(calls):
        x, y = loader.next_batch(batch_seqs)
        assert x.shape == y.shape == (batch_seqs, L) and x.dtype == y.dtype == torch.int64
        assert torch.equal(x[:, 1:], y[:, :-1])  # y is x shifted by one, row by row
        assert torch.equal(x.flatten()[1:], y.flatten()[:-1])  # and the rows are consecutive
        out.append(run_of(x, y))
    return out


def test_a_fresh_loader_starts_at_the_first_bos(files: list[str]) -> None:
    x, _ = DocumentPackingLoader(files, L, 65536).next_batch(2)
    assert x[0].tolist() == [BOS_ID] + list(range(106, 113))  # shard A (sorted first) from position 5


def test_rank_slices_are_disjoint_and_contiguous(files: list[str]) -> None:
    a = load_shard(sorted(files)[0]).astype(np.int64)
    B, W = 2, 3
    span = B * L + 1
    ranks = [batches(DocumentPackingLoader(files, L, 65536, rank=r, world_size=W), 4, B) for r in range(W)]
    for k in range(4):
        together = np.concatenate([ranks[r][k] for r in range(W)])  # rank order = stream order
        start = 5 + k * W * span
        np.testing.assert_array_equal(together, a[start : start + W * span])


def test_short_tails_and_short_shards_are_skipped_then_it_wraps(files: list[str]) -> None:
    a, b = (load_shard(f).astype(np.int64) for f in sorted(files)[:2])
    B, W = 2, 2
    need = W * (B * L + 1)  # 34 tokens per call
    per_a, per_b = (1000 - 5) // need, (700 - 10) // need  # 29 and 20 calls; the tails (9 and 10 tokens) are dropped
    loader = DocumentPackingLoader(files, L, 65536, rank=1, world_size=W)
    first = batches(loader, per_a + per_b, B)
    assert first[per_a - 1][-1] == a[5 + per_a * need - 1]  # the last call in A ends where the full calls end
    np.testing.assert_array_equal(first[per_a], b[10 + need // 2 : 10 + need])  # B from its first BOS (rank 1's half)
    assert loader.epoch == 0
    # C (20 tokens) and D (no BOS) are skipped: the next call wraps to A's first BOS, and the order repeats
    second = batches(loader, per_a + per_b, B)
    assert loader.epoch == 1
    assert all(np.array_equal(p, q) for p, q in zip(first, second, strict=True))


def test_a_short_shard_is_used_when_it_is_long_enough(files: list[str]) -> None:
    c = load_shard(sorted(files)[2]).astype(np.int64)
    loader = DocumentPackingLoader(files, 4, 65536)  # 2 rows of 4 + 1 = 9 tokens per call: C holds two calls
    for _ in range((1000 - 5) // 9 + (700 - 10) // 9):
        loader.next_batch(2)
    runs = [run_of(*loader.next_batch(2)) for _ in range(3)]
    np.testing.assert_array_equal(np.concatenate(runs[:2]), c[:18])
    assert runs[2][0] == BOS_ID and runs[2][1] == 106  # D has no BOS: back to A


def test_the_order_ignores_the_seed(files: list[str]) -> None:
    one, two = (batches(DocumentPackingLoader(files, L, 65536, seed=s, world_size=2), 40, 1) for s in (1, 2))
    assert all(np.array_equal(p, q) for p, q in zip(one, two, strict=True))


def test_two_ranks_read_one_ranks_stream_plus_one_target_token_per_rank(files: list[str]) -> None:
    """Two ranks with B rows do not read what one rank with 2B rows reads: each rank's run carries its own extra
    target token, so a call of 2 ranks consumes 2*(B*L+1) tokens, one more than one rank's 2*B*L+1."""
    B = 2
    one = batches(DocumentPackingLoader(files, L, 65536), 1, 2 * B)[0]
    two = [batches(DocumentPackingLoader(files, L, 65536, rank=r, world_size=2), 1, B)[0] for r in range(2)]
    np.testing.assert_array_equal(two[0], one[: B * L + 1])  # rank 0: the first B rows, with their target token
    np.testing.assert_array_equal(two[1][:-1], one[B * L + 1 :])  # rank 1: one's last B rows shifted by one token
    assert len(np.concatenate(two)) == len(one) + 1


def test_errors_are_one_line(files: list[str], tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=re.escape("no train shard holds 8001 tokens")):
        DocumentPackingLoader(files, L, 65536).next_batch(1000)
    with pytest.raises(ValueError, match="bad loader geometry: seq_len 8, rank 2 of world_size 2"):
        DocumentPackingLoader(files, L, 65536, rank=2, world_size=2)
    with pytest.raises(ValueError, match="no train shards"):
        DocumentPackingLoader([], L, 65536)
    bad = shard(tmp_path / "bad.bin", 100, 600, [0])
    with pytest.raises(ShardError, match=re.escape(f"{bad}: token id 699 >= vocab size 512")):
        DocumentPackingLoader([bad], L, 512).next_batch(1)


def test_first_bos_scans_past_block_boundaries() -> None:
    tokens = np.full(50, 7, dtype=np.uint16)
    assert first_bos(tokens, block=4) is None
    tokens[[13, 40]] = BOS_ID
    assert first_bos(tokens, block=4) == first_bos(tokens) == 13
