"""ShardedSequenceLoader: sharding, determinism, exact resume; the held-out iterator."""

import numpy as np
import pytest
import torch

from rrt_ray.data import ShardedSequenceLoader, iter_eval_batches

SEQ_LEN = 8


def stream(num_sequences: int) -> np.ndarray:
    return np.arange(num_sequences * SEQ_LEN + 1, dtype=np.uint16)


def first_tokens(batches) -> list[int]:
    return [int(row[0]) // SEQ_LEN for batch in batches for row in batch["input_ids"]]


def test_batches_are_shifted_windows():
    loader = ShardedSequenceLoader(stream(12), SEQ_LEN, batch_size=3, seed=1)
    batch = next(iter(loader))
    assert batch["input_ids"].shape == batch["labels"].shape == (3, SEQ_LEN)
    assert batch["input_ids"].dtype == batch["labels"].dtype == torch.int64
    assert torch.equal(batch["labels"][:, :-1], batch["input_ids"][:, 1:])
    assert torch.equal(batch["labels"][:, -1], batch["input_ids"][:, -1] + 1)
    assert len(loader) == 4


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_ranks_are_disjoint_cover_the_epoch_and_step_together(world_size):
    num_sequences = 30
    per_rank = []
    for rank in range(world_size):
        loader = ShardedSequenceLoader(stream(num_sequences), SEQ_LEN, 5, rank, world_size, seed=7)
        per_rank.append(first_tokens(loader))
    assert len({len(seqs) for seqs in per_rank}) == 1  # same number of batches on every rank
    seen = [s for seqs in per_rank for s in seqs]
    assert len(seen) == len(set(seen)) == num_sequences  # disjoint and covering (30 = 2*3*5)


def test_drop_last_drops_only_the_remainder():
    loader0 = ShardedSequenceLoader(stream(23), SEQ_LEN, 2, 0, 2, seed=3)
    loader1 = ShardedSequenceLoader(stream(23), SEQ_LEN, 2, 1, 2, seed=3)
    assert len(loader0) == len(loader1) == 5  # 22 sequences dealt out, 11 per rank, 5 full batches


def test_shuffle_is_seeded_and_changes_per_epoch():
    a = ShardedSequenceLoader(stream(40), SEQ_LEN, 4, seed=11)
    b = ShardedSequenceLoader(stream(40), SEQ_LEN, 4, seed=11)
    c = ShardedSequenceLoader(stream(40), SEQ_LEN, 4, seed=12)
    epoch0 = first_tokens(a)
    assert epoch0 == first_tokens(b) and epoch0 != first_tokens(c)
    epoch1 = first_tokens(a)
    assert sorted(epoch1) == sorted(epoch0) == list(range(40)) and epoch1 != epoch0


@pytest.mark.parametrize("consumed", [0, 3, 9, 10, 14])
def test_resume_yields_exactly_the_remaining_batches(consumed, tmp_path):
    path = tmp_path / "tokens.npy"
    np.save(path, stream(41))
    def make():
        return ShardedSequenceLoader(str(path), SEQ_LEN, 4, rank=1, world_size=2, seed=5)

    uninterrupted = make()
    reference = [b for _ in range(3) for b in uninterrupted]  # 3 epochs of 5 batches

    interrupted = make()
    it, taken = iter(interrupted), []
    while len(taken) < consumed:
        try:
            taken.append(next(it))
        except StopIteration:
            it = iter(interrupted)
    state = interrupted.state_dict()

    resumed = make()
    resumed.load_state_dict(state)
    rest = []
    while len(taken) + len(rest) < len(reference):
        rest.extend(resumed)
    combined = taken + rest
    assert len(combined) == len(reference)
    for got, want in zip(combined, reference):
        assert torch.equal(got["input_ids"], want["input_ids"]) and torch.equal(got["labels"], want["labels"])


def test_load_state_from_another_run_is_refused():
    state = ShardedSequenceLoader(stream(20), SEQ_LEN, 2, seed=1).state_dict()
    with pytest.raises(ValueError, match=r"different run: saved seed 1 \(now 2\)"):
        ShardedSequenceLoader(stream(20), SEQ_LEN, 2, seed=2).load_state_dict(state)


def test_too_little_data_is_a_clear_error():
    with pytest.raises(ValueError, match="too few for one batch of 4 on each of 2 ranks"):
        ShardedSequenceLoader(stream(5), SEQ_LEN, 4, 0, 2)


def test_eval_batches_cover_the_heldout_set_in_order():
    batches = list(iter_eval_batches(stream(11), SEQ_LEN, 4))
    assert [len(b["input_ids"]) for b in batches] == [4, 4, 3]
    assert first_tokens(batches) == list(range(11))
    both = [first_tokens(iter_eval_batches(stream(11), SEQ_LEN, 4, rank, 2)) for rank in range(2)]
    assert both == [[0, 2, 4, 6, 8, 10], [1, 3, 5, 7, 9]]
