"""clevr-lite (data.py): format, determinism, exact first-hit masks, occlusion, per-object truth."""
import torch

import data


def batch_of(n=16, split="train", **kw):
    return data.make_synthetic("clevr-lite", split, **kw).get_batch(list(range(n)))


def test_batch_format():
    ds = data.make_dataset("clevr-lite", "val")
    assert (ds.name, ds.resolution, ds.max_objects, ds.num_background, len(ds)) == ("clevr-lite", 64, 6, 1, 1000)
    b = ds.get_batch(list(range(8)))
    assert b["image"].shape == (8, 3, 64, 64) and b["image"].dtype == torch.float32
    assert b["mask"].shape == (8, 64, 64) and b["mask"].dtype == torch.int64
    assert 0 <= b["image"].min() and b["image"].max() <= 1
    for k in ds.properties:
        assert b[k].shape[:2] == (8, 7)


def test_determinism():
    ds = data.make_synthetic("clevr-lite", "train", seed=3)
    a = ds.get_batch([5, 100, 7])
    c = ds.get_batch([7, 5])
    for k in a:
        assert torch.equal(a[k][0], c[k][1]) and torch.equal(a[k][2], c[k][0])
