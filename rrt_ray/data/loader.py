"""Deterministic, resumable, rank-sharded batches of packed sequences.

Each epoch e puts the N sequences in one seeded order, identical on every rank, and deals it out
round-robin, so ranks are disjoint and together cover the epoch:

    order:   s7 s2 s9 s0 s4 s1 s8 s5 | s3 s6   (world_size 2: the last N % 2 are dropped)
    rank 0:  s7    s9    s4    s8
    rank 1:     s2    s0    s1    s5

The order is a two-level shuffle: the stream is cut into blocks of `block_tokens` tokens (a sequence
belongs to the block its first token is in), the blocks are permuted with (seed, e), and each block's
sequences with (seed, e, block). At any moment every rank reads from one block, which is what lets a
sharded token set (`rrt_ray.data.token_sets`) keep one shard mapped and download the next one ahead
of use; an in-memory stream and a token set of the same tokens with shards of `block_tokens` give the
same batches. The order is generated block by block, never as an N-long array.

With drop_last (the default) every rank gets the same number of full batches, which keeps the
collectives of data-parallel training in step. The state is (epoch, batches consumed in it): after
`load_state_dict`, iteration resumes at exactly the next batch.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rrt_ray.data.packing import num_sequences

DEFAULT_BLOCK_TOKENS = 2**20  # the shuffle block and a token set's default shard size (1M tokens, 2 MB as uint16)


class ShardedSequenceLoader:
    """Batches {"input_ids": (B, L), "labels": (B, L)} of int64 from a token stream.

    tokens: the stream: an np.ndarray, the path of a .npy file (memory-mapped), or a token-set split
        (`rrt_ray.data.token_sets.TokenSetStream`: sliceable, with `block_tokens` and `will_need`).
    block_tokens: the shuffle block (default: the stream's own `block_tokens`, else DEFAULT_BLOCK_TOKENS).
    Each `iter()` continues the current epoch from the next batch; once an epoch is used up the next
    `iter()` starts the following one with a fresh permutation. shuffle=False keeps sequence order
    (for evaluation).
    """

    def __init__(
        self,
        tokens: np.ndarray | str | Path,
        seq_len: int,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        drop_last: bool = True,
        shuffle: bool = True,
        block_tokens: int | None = None,
    ) -> None:
        if isinstance(tokens, (str, Path)):
            tokens = np.load(Path(tokens).expanduser(), mmap_mode="r")
        if tokens.ndim != 1:
            raise ValueError(f"tokens must be a 1-D token stream, got shape {tokens.shape}")
        if seq_len < 1 or batch_size < 1:
            raise ValueError(f"seq_len and batch_size must be >= 1, got {seq_len} and {batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size), got rank {rank}, world_size {world_size}")
        self.tokens = tokens
        self.seq_len, self.batch_size = seq_len, batch_size
        self.rank, self.world_size = rank, world_size
        self.seed, self.drop_last, self.shuffle = seed, drop_last, shuffle
        self.num_sequences = num_sequences(len(tokens), seq_len)
        self.block_tokens = block_tokens or getattr(tokens, "block_tokens", DEFAULT_BLOCK_TOKENS)
        # sequence i starts at token i * seq_len: block b holds sequences [starts[b], starts[b + 1])
        num_blocks = -(-max(1, self.num_sequences * seq_len) // self.block_tokens)
        self._block_starts = np.minimum(-(-np.arange(num_blocks + 1) * self.block_tokens // seq_len), self.num_sequences)
        if len(self) == 0:
            raise ValueError(
                f"{len(tokens)} tokens make {self.num_sequences} sequences of {seq_len + 1} tokens: too few for "
                f"one batch of {batch_size} on each of {world_size} ranks (use more text or a smaller seq_len/batch)"
            )
        self.epoch = 0
        self.batch_in_epoch = 0  # batches of self.epoch already yielded

    def __len__(self) -> int:
        """Batches per epoch on this rank."""
        per_rank = self._rank_count(self._usable())
        return per_rank // self.batch_size if self.drop_last else -(-per_rank // self.batch_size)

    def _usable(self) -> int:
        """Sequences dealt out per epoch (drop_last drops the last N % world_size of the order)."""
        return self.num_sequences - (self.num_sequences % self.world_size if self.drop_last else 0)

    def _rank_count(self, end: int) -> int:
        """How many of the order positions [0, end) belong to this rank (positions rank, rank + W, ...)."""
        return max(0, -(-(end - self.rank) // self.world_size))

    def _epoch_blocks(self, epoch: int) -> np.ndarray:
        num_blocks = len(self._block_starts) - 1
        return np.random.default_rng([self.seed, epoch]).permutation(num_blocks) if self.shuffle else np.arange(num_blocks)

    def _rank_sequences(self, epoch: int, skip: int) -> Iterator[int]:
        """This rank's sequence ids of the epoch in order, after its first `skip` ones."""
        blocks, usable, position = self._epoch_blocks(epoch), self._usable(), 0
        for k, block in enumerate(blocks):
            start, stop = int(self._block_starts[block]), int(self._block_starts[block + 1])
            size, first = stop - start, position
            position += size
            mine = self._rank_count(min(position, usable)) - self._rank_count(min(first, usable))
            if skip >= mine:  # the whole block was consumed before the resume point: no permutation needed
                skip -= mine
                continue
            if k + 1 < len(blocks) and hasattr(self.tokens, "will_need"):
                self.tokens.will_need(int(blocks[k + 1]))  # fetch the next block's shard while this one trains
            ids = np.arange(start, stop)
            if self.shuffle:
                ids = ids[np.random.default_rng([self.seed, epoch, int(block)]).permutation(size)]
            offset = (self.rank - first) % self.world_size
            ids = ids[offset: max(0, min(position, usable) - first):self.world_size]
            yield from (int(i) for i in ids[skip:])
            skip = 0

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        if self.batch_in_epoch >= len(self):
            self.epoch, self.batch_in_epoch = self.epoch + 1, 0
        sequences = self._rank_sequences(self.epoch, self.batch_in_epoch * self.batch_size)
        for index in range(self.batch_in_epoch, len(self)):
            rows = list(itertools.islice(sequences, self.batch_size))
            self.batch_in_epoch = index + 1
            yield self._batch(np.asarray(rows))

    def _batch(self, rows: np.ndarray) -> dict[str, torch.Tensor]:
        L = self.seq_len
        block = np.stack([self.tokens[row * L: row * L + L + 1] for row in rows]).astype(np.int64)  # (B, L+1)
        block = torch.from_numpy(block)
        return {"input_ids": block[:, :-1].contiguous(), "labels": block[:, 1:].contiguous()}  # (B, L) each

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch,
            "seed": self.seed,
            "world_size": self.world_size,
            "num_sequences": self.num_sequences,
            "seq_len": self.seq_len,
            "batch_size": self.batch_size,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume at the batch after the last one yielded when `state` was taken.

        Raises ValueError when the data or the sharding differ from the saved run's.
        """
        mine = self.state_dict()
        keys = ("seed", "world_size", "num_sequences", "seq_len", "batch_size")
        differ = [f"{key} {state.get(key)} (now {mine[key]})" for key in keys if state.get(key) != mine[key]]
        if differ:
            raise ValueError(f"loader state is from a different run: saved {', '.join(differ)}")
        self.epoch, self.batch_in_epoch = int(state["epoch"]), int(state["batch_in_epoch"])


def iter_eval_batches(
    tokens: np.ndarray | str | Path, seq_len: int, batch_size: int, rank: int = 0, world_size: int = 1
) -> Iterator[dict[str, torch.Tensor]]:
    """Every held-out sequence once, in order, dealt round-robin to ranks; the last batch may be short."""
    loader = ShardedSequenceLoader(tokens, seq_len, batch_size, rank, world_size, drop_last=False, shuffle=False)
    return iter(loader)
