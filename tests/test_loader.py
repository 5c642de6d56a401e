"""make_loader / StepBatchSampler: determinism, exact resumption, DDP sharding."""
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import data  # noqa: E402


class Indexed(torch.utils.data.Dataset):
    """Item i is the number i; counts how many batched fetches were made."""

    def __init__(self, n):
        self.n, self.fetches = n, 0

    def __len__(self):
        return self.n

    def get_batch(self, indices):
        self.fetches += 1
        return {"i": torch.tensor(indices)}


class Plain(torch.utils.data.Dataset):
    """A map-style dataset without get_batch: sample i is {"i": i, "sq": i * i}."""

    def __len__(self):
        return 12

    def __getitem__(self, i):
        return {"i": torch.tensor(i), "sq": torch.tensor([i * i])}


def take(loader, n):
    it = iter(loader)
    return [next(it)["i"].tolist() for _ in range(n)]


def test_whole_batch_in_one_fetch_and_endless():
    ds = Indexed(10)
    batches = take(data.make_loader(ds, 4, shuffle=True, seed=0), 7)  # more steps than one epoch
    assert ds.fetches == 7 and all(len(b) == 4 for b in batches)
    first_epoch = batches[0] + batches[1]
    assert len(set(first_epoch)) == 8  # a permutation: no repeats within an epoch


def test_same_seed_same_order_other_seed_other_order():
    a = take(data.make_loader(Indexed(100), 8, shuffle=True, seed=3), 20)
    b = take(data.make_loader(Indexed(100), 8, shuffle=True, seed=3), 20)
    c = take(data.make_loader(Indexed(100), 8, shuffle=True, seed=4), 20)
    assert a == b and a != c


def test_start_step_continues_the_stream():
    full = take(data.make_loader(Indexed(50), 8, shuffle=True, seed=1), 15)  # crosses epochs (6 per epoch)
    for start in (0, 5, 6, 13):
        assert take(data.make_loader(Indexed(50), 8, shuffle=True, seed=1, start_step=start), 15 - start) == full[start:]


def test_loader_does_not_touch_the_global_rng():
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    take(data.make_loader(Indexed(20), 4, shuffle=True, seed=0), 3)
    assert torch.equal(torch.rand(3), expected)


def test_ranks_get_disjoint_equal_shares():
    n, bs, world = 103, 5, 3
    shares = []
    for rank in range(world):
        s = data.StepBatchSampler(n, bs, shuffle=True, seed=2, rank=rank, world=world)
        it = iter(s)
        shares.append([i for _ in range(s.steps_per_epoch) for i in next(it)])
    flat = [i for sh in shares for i in sh]
    assert len(flat) == len(set(flat))  # no index on two ranks in one epoch
    assert len({len(sh) for sh in shares}) == 1  # the same number of steps on every rank


def test_ordered_pass_covers_everything_once():
    s0 = data.StepBatchSampler(11, 4, shuffle=False, rank=0, world=2)
    s1 = data.StepBatchSampler(11, 4, shuffle=False, rank=1, world=2)
    got = sorted(i for s in (s0, s1) for b in s for i in b)
    assert got == list(range(11)) and len(s0) == 2 and len(s1) == 2


def test_too_small_dataset_is_a_data_error():
    with pytest.raises(data.DataError, match="too small"):
        data.make_loader(Indexed(3), 4, shuffle=True)


def test_subsets_and_datasets_without_get_batch():
    ds = Indexed(30)
    inner = torch.utils.data.Subset(ds, list(range(29, -1, -1)))  # reversed
    outer = torch.utils.data.Subset(inner, [3, 1, 4, 1, 5])
    assert data.fetch_batch(outer, [0, 2, 4])["i"].tolist() == [26, 25, 24]
    assert ds.fetches == 1  # resolved to one get_batch call on the base dataset
    batches = list(data.make_loader(outer, 2, shuffle=False))
    assert [b["i"].tolist() for b in batches] == [[26, 28], [25, 28], [24]] and ds.fetches == 4
    # no get_batch: the samples are stacked by the default collate
    b = next(iter(data.make_loader(Plain(), 4, shuffle=False)))
    assert b["i"].tolist() == [0, 1, 2, 3] and b["sq"].tolist() == [[0], [1], [4], [9]]
