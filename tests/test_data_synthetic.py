"""Built-in synthetic sets of data.py: format, determinism, exact masks, options."""
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import data

ROOT = Path(__file__).resolve().parent.parent
RANGES = {"shapes": (2, 5), "shapes-colored": (1, 4), "shapes-binary": (2, 3), "tetrominoes": (3, 3)}
NATIVE = {"shapes": 64, "shapes-colored": 64, "shapes-binary": 64, "tetrominoes": 35}
FLAT = tuple(RANGES)  # the flat-colour sets; clevr-lite (shaded) has tests/test_clevr_lite.py


def batch_of(name, n=64, split="train", **kw):
    return data.make_synthetic(name, split, **kw).get_batch(list(range(n)))


def pixel_counts(mask, E):
    """(B, E) number of pixels per mask id, by a plain comparison."""
    return (mask[:, None] == torch.arange(E)[None, :, None, None]).sum((2, 3))


# --- hash

def lowbias32(x):
    """Reference lowbias32 on Python ints."""
    x ^= x >> 16
    x = (x * 0x7FEB352D) & 0xFFFFFFFF
    x ^= x >> 15
    x = (x * 0x846CA68B) & 0xFFFFFFFF
    return x ^ (x >> 16)


def test_mix32_matches_python_reference():
    xs = [0, 1, 2, 12345, 0x7FFFFFFF, 0x80000000, 0xDEADBEEF, 0xFFFFFFFF]
    xs += torch.randint(0, 2 ** 32, (200,), generator=torch.Generator().manual_seed(0)).tolist()
    got = data._mix32(torch.tensor(xs, dtype=torch.int64)).tolist()
    assert got == [lowbias32(x) for x in xs]
    assert lowbias32(0) == 0 and got[1] != 1  # fixed point at 0, mixes otherwise


def test_uniforms_range_and_spread():
    u = data._uniforms(0, "shapes", "train", torch.arange(2000), 50)
    assert u.dtype == torch.float32 and u.shape == (2000, 50)
    assert u.min() >= 0 and u.max() < 1
    assert abs(u.mean().item() - 0.5) < 0.01 and abs(u.var().item() - 1 / 12) < 0.002
    # neighbouring indices and draws are uncorrelated
    assert abs(torch.corrcoef(torch.stack([u[:-1, 0], u[1:, 0]]))[0, 1]) < 0.1
    assert abs(torch.corrcoef(torch.stack([u[:, 0], u[:, 1]]))[0, 1]) < 0.1
    # large seeds (beyond 32 bits) and negative seeds are distinct streams
    v = [data._uniforms(s, "shapes", "train", torch.arange(4), 4) for s in (0, 2 ** 32, -1)]
    assert not torch.equal(v[0], v[1]) and not torch.equal(v[0], v[2])


# --- format

@pytest.mark.parametrize("name", FLAT)
def test_batch_format(name):
    ds = data.make_synthetic(name, "val")
    lo, hi = RANGES[name]
    res, E = NATIVE[name], hi + 1
    assert (ds.name, ds.split, ds.resolution, ds.max_objects, ds.num_background) == (name, "val", res, hi, 1)
    assert ds.has_masks and set(ds.properties) == {"visible", "shape", "color", "scale", "x", "y"}
    assert len(ds) == 1000 and len(data.make_synthetic(name, "train")) == 1_000_000
    assert len(data.make_synthetic(name, "test", size=17)) == 17
    b = ds.get_batch(list(range(32)))
    dtypes = {"image": torch.float32, "mask": torch.int64, "visible": torch.bool, "shape": torch.int64,
              "color": torch.float32, "scale": torch.float32, "x": torch.float32, "y": torch.float32}
    assert {k: v.dtype for k, v in b.items()} == dtypes
    assert b["image"].shape == (32, 3, res, res) and b["mask"].shape == (32, res, res)
    assert b["color"].shape == (32, E, 3)
    for k in ("visible", "shape", "scale", "x", "y"):
        assert b[k].shape == (32, E)
    assert all(v.device.type == "cpu" for v in b.values())
    assert b["image"].min() >= 0 and b["image"].max() <= 1
    assert b["mask"].min() >= 0 and b["mask"].max() <= hi
    # background entity
    assert b["visible"][:, 0].all() and (b["shape"][:, 0] == -1).all() and (b["scale"][:, 0] == 0).all()
    assert (b["x"][:, 0] == 0.5).all() and (b["y"][:, 0] == 0.5).all()
    # absent objects: visible False, shape -1, zeros
    absent = b["shape"][:, 1:] == -1
    for k in ("scale", "x", "y"):
        assert (b[k][:, 1:][absent] == 0).all()
    assert (b["color"][:, 1:][absent] == 0).all() and not b["visible"][:, 1:][absent].any()
    # present objects: centre in [0, 1], known scales and shape ids
    present = ~absent
    for k in ("x", "y"):
        assert ((b[k][:, 1:][present] > 0) & (b[k][:, 1:][present] < 1)).all()
    if name == "tetrominoes":
        assert (b["scale"][:, 1:] == 1).all() and b["shape"].max() <= 18
    else:
        scales = torch.tensor([0.5, 0.6, 0.7, 0.8, 0.9, 1.0])
        assert torch.isclose(b["scale"][:, 1:][present][:, None], scales).any(1).all()
        assert b["shape"].max() <= 2


@pytest.mark.parametrize("name", FLAT)
def test_object_counts_cover_range(name):
    b = batch_of(name, 300)
    lo, hi = RANGES[name]
    n = (b["shape"][:, 1:] != -1).sum(1)
    assert set(n.tolist()) == set(range(lo, hi + 1))
    # objects occupy the first slots, in drawing order
    present = b["shape"][:, 1:] != -1
    assert torch.equal(present, torch.arange(hi)[None] < n[:, None])


def test_colour_schemes():
    b = batch_of("shapes", 200)
    present = b["shape"][:, 1:] != -1
    c = b["color"][:, 1:][present]  # (N, 3) sprite colours
    v = c.max(1).values
    s = (v - c.min(1).values) / v
    assert (v >= 0.6 - 1e-6).all() and (s >= 0.6 - 1e-6).all()
    hue_spread = torch.atan2(math.sqrt(3) * (c[:, 1] - c[:, 2]), 2 * c[:, 0] - c[:, 1] - c[:, 2])
    assert hue_spread.min() < -2.5 and hue_spread.max() > 2.5  # hues all round the circle
    bg = b["color"][:, 0]
    assert (bg[:, 0] == bg[:, 1]).all() and (bg[:, 1] == bg[:, 2]).all() and bg[:, 0].std() > 0.2

    b = batch_of("shapes-colored", 200)
    assert (b["color"][:, 0].std(0) > 0.2).all()  # RGB background
    b = batch_of("shapes-binary", 50)
    present = b["shape"][:, 1:] != -1
    assert (b["color"][:, 0] == 0).all() and (b["color"][:, 1:][present] == 1).all()
    assert set(b["image"].unique().tolist()) == {0.0, 1.0}
    b = batch_of("tetrominoes", 200)
    palette = torch.tensor([[1., 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0], [1, 0, 1], [0, 1, 1]])
    assert (b["color"][:, 0] == 0).all()
    got = (b["color"][:, 1:, None] == palette).all(-1)  # (B, 3, 6)
    assert (got.sum(-1) == 1).all() and got.any(0).any(0).all()  # each a palette colour, all used


# --- determinism and splits

@pytest.mark.parametrize("name", data.BUILTIN)
def test_item_independent_of_batch(name):
    ds = data.make_synthetic(name, "train", seed=3)
    a = ds.get_batch([5, 100, 7])
    b = ds.get_batch([999_999, 7, 42, 5])
    for k in a:
        assert torch.equal(a[k][0], b[k][3]) and torch.equal(a[k][2], b[k][1])
    items = [ds[i] for i in (5, 100, 7)]
    for k in a:
        assert torch.equal(a[k], torch.stack([it[k] for it in items]))
    assert torch.equal(ds[-1]["image"], ds[999_999]["image"])
    again = data.make_synthetic(name, "train", seed=3).get_batch([5, 100, 7])
    assert all(torch.equal(a[k], again[k]) for k in a)
    other = data.make_synthetic(name, "train", seed=4).get_batch([5, 100, 7])
    assert not torch.equal(a["mask"], other["mask"])


@pytest.mark.parametrize("name", data.BUILTIN)
def test_splits_are_disjoint_streams(name):
    imgs = {s: batch_of(name, 100, split=s)["image"].reshape(100, -1) for s in data.SPLITS}
    for s in data.SPLITS:
        assert torch.unique(imgs[s], dim=0).shape[0] == 100  # no repeats within a split
        for t in data.SPLITS:
            if s < t:
                same = (imgs[s][:, None] == imgs[t][None]).all(-1)
                assert not same.any()


def test_sets_are_distinct_streams():
    a, b = batch_of("shapes", 8), batch_of("shapes-colored", 8)
    assert not torch.equal(a["x"][:, 1], b["x"][:, 1])


def test_index_out_of_range():
    ds = data.make_synthetic("shapes", "val", size=10)
    with pytest.raises(IndexError):
        ds[10]
    with pytest.raises(IndexError):
        ds.get_batch([0, -11])


# --- exact masks, occlusion, visibility

@pytest.mark.parametrize("name", FLAT)
@pytest.mark.parametrize("resolution", [None, 48])
def test_pixel_is_colour_of_its_entity(name, resolution):
    b = batch_of(name, 48, resolution=resolution)
    B, E = b["color"].shape[:2]
    expected = b["color"][torch.arange(B)[:, None, None], b["mask"]].permute(0, 3, 1, 2)  # (B, 3, H, W)
    assert torch.equal(b["image"], expected)
    # masks name only objects that exist
    assert (b["shape"].gather(1, b["mask"].reshape(B, -1))[b["mask"].reshape(B, -1) > 0] >= 0).all()


@pytest.mark.parametrize("name", FLAT)
def test_visible_flags_match_pixel_counts(name):
    b = batch_of(name, 400)
    counts = pixel_counts(b["mask"], b["visible"].shape[1])
    present = b["shape"] != -1
    expected = present & (counts >= 5)
    expected[:, 0] = True
    assert torch.equal(b["visible"], expected)
    assert (counts[:, 1:][~present[:, 1:]] == 0).all()
    if name == "shapes":  # with up to five sprites some are hidden behind later ones
        assert (present & ~b["visible"]).any()


def reference_sprite_mask(ds, indices):
    """Slow full-canvas painter: every sprite tested at every pixel centre, in slot order."""
    res = ds.resolution
    n = data._SPRITE_DRAWS  # draws per object slot, after 4 per image
    u = data._uniforms(ds.seed, ds.name, ds.split, torch.tensor(indices), 4 + n * ds.max_objects)
    lo, hi, _ = data._SPRITE_SETS[ds.name]
    masks = []
    for b in range(len(indices)):
        count = lo + int(u[b, 0] * (hi - lo + 1))
        mask = torch.zeros(res, res, dtype=torch.int64)
        centres = torch.arange(res, dtype=torch.float32) + 0.5
        for k in range(count):
            d = u[b, 4 + n * k: 4 + n * k + 8]
            shape = int(d[0] * 3)
            scale = torch.tensor([0.5, 0.6, 0.7, 0.8, 0.9, 1.0])[int(d[1] * 6)]
            angle = d[2] * (2 * math.pi)
            cx, cy = 0.125 + 0.75 * d[3], 0.125 + 0.75 * d[4]
            r = res / 6 * scale
            dx = ((centres - cx * res) / r)[None, :]  # columns
            dy = ((centres - cy * res) / r)[:, None]  # rows
            lu = torch.cos(angle) * dx + torch.sin(angle) * dy
            lv = -torch.sin(angle) * dx + torch.cos(angle) * dy
            inside = data._inside_sprite(torch.tensor([shape]), lu[None], lv[None])[0]
            mask[inside] = k + 1
        masks.append(mask)
    return torch.stack(masks)


@pytest.mark.parametrize("name,resolution", [("shapes", None), ("shapes-colored", 37), ("shapes-binary", 96)])
def test_sprite_masks_match_slow_painter(name, resolution):
    ds = data.make_synthetic(name, "test", resolution=resolution, seed=1)
    idx = list(range(0, 1000, 14))
    got = ds.get_batch(idx)["mask"]
    want = reference_sprite_mask(ds, idx)
    # identical up to float rounding on pixel centres lying exactly on a boundary
    assert (got != want).sum() <= 2


def test_tetrominoes_match_slow_painter():
    b = batch_of("tetrominoes", 40)
    for i in range(40):
        want = torch.zeros(35, 35, dtype=torch.int64)
        for k in range(3):
            s = int(b["shape"][i, k + 1])
            cells = data._TETRIS_CELLS[s]
            h, w = int(cells.any(1).sum()), int(cells.any(0).sum())
            top = round(float(b["y"][i, k + 1]) * 7 - h / 2)
            left = round(float(b["x"][i, k + 1]) * 7 - w / 2)
            for r, c in cells.nonzero().tolist():
                want[5 * (top + r): 5 * (top + r + 1), 5 * (left + c): 5 * (left + c + 1)] = k + 1
        assert torch.equal(b["mask"][i], want)


def test_tetromino_shapes():
    cells = data._TETRIS_CELLS
    assert cells.shape == (19, 4, 4) and (cells.sum((1, 2)) == 4).all()
    assert torch.unique(cells.reshape(19, 16), dim=0).shape[0] == 19
    # families in order I(2) O(1) T(4) S(2) Z(2) J(4) L(4)
    assert cells[0, 0].all() and cells[1][:, 0].all() and cells[2, :2, :2].all()
    b = batch_of("tetrominoes", 500)
    assert set(b["shape"][:, 1:].unique().tolist()) == set(range(19))
    # pieces rarely overlap: every piece keeps its 4 cells (4 * 25 pixels) in almost every image
    counts = pixel_counts(b["mask"], 4)[:, 1:]
    assert (counts == 100).all(1).float().mean() > 0.95


def test_centres_match_mask_geometry():
    b = batch_of("shapes-binary", 300)
    B, E = b["shape"].shape
    n = (b["shape"][:, 1:] != -1).sum(1)
    rows, cols = torch.meshgrid(torch.arange(64) + 0.5, torch.arange(64) + 0.5, indexing="ij")
    checked = 0
    for i in range(B):
        k = int(n[i])  # topmost object is never occluded
        x, y = float(b["x"][i, k]), float(b["y"][i, k])
        if b["shape"][i, k] == 2 or not (0.2 < x < 0.8 and 0.2 < y < 0.8):
            continue  # the heart's centroid is not its centre; skip sprites cut by the border
        m = b["mask"][i] == k
        assert abs(cols[m].mean().item() / 64 - x) < 0.5 / 64
        assert abs(rows[m].mean().item() / 64 - y) < 0.5 / 64
        checked += 1
    assert checked > 50


# --- options

def test_resolution_renders_same_scene():
    lo = batch_of("shapes", 16, resolution=64)
    hi = batch_of("shapes", 16, resolution=128)
    assert hi["image"].shape == (16, 3, 128, 128)
    for k in ("shape", "color", "scale", "x", "y"):
        assert torch.equal(lo[k], hi[k])
    agree = (hi["mask"][:, 1::2, 1::2] == lo["mask"]).float().mean()
    assert agree > 0.97
    t35, t70 = batch_of("tetrominoes", 8), batch_of("tetrominoes", 8, resolution=70)
    for dr in (0, 1):
        for dc in (0, 1):
            assert torch.equal(t70["mask"][:, dr::2, dc::2], t35["mask"])
            assert torch.equal(t70["image"][:, :, dr::2, dc::2], t35["image"])
    t20 = batch_of("tetrominoes", 8, resolution=20)
    src = ((torch.arange(20) + 0.5) * 35 / 20).long()
    assert torch.equal(t20["mask"], t35["mask"][:, src][:, :, src])


def test_bad_requests_raise_data_error():
    with pytest.raises(data.DataError, match="nope"):
        data.make_synthetic("nope", "train")
    with pytest.raises(data.DataError, match="colour"):
        data.make_synthetic("shapes", "train", colour="red")
    with pytest.raises(data.DataError, match="colour"):
        data.make_dataset("shapes", "train", colour="red")
    with pytest.raises(data.DataError, match="size"):
        data.make_dataset("shapes", "train", size=0)
    with pytest.raises(data.DataError):
        data.make_synthetic("shapes", "dev")
    with pytest.raises(data.DataError):
        data.make_synthetic("shapes", "train", resolution=2)
    with pytest.raises(data.DataError):
        data.make_synthetic("shapes", "train", device="nodevice")
    ds = data.make_dataset("tetrominoes", "test", resolution=70, seed=2, size=5)
    assert (len(ds), ds.resolution, ds.seed) == (5, 70, 2)


def test_loader_yields_batches():
    ds = data.make_synthetic("shapes", "train", size=1000)
    batch = next(iter(data.make_loader(ds, 8, shuffle=True, seed=0)))
    assert batch["image"].shape == (8, 3, 64, 64) and batch["mask"].shape == (8, 64, 64)
    ds = data.make_synthetic("tetrominoes", "val", size=20)
    batches = list(data.make_loader(ds, 8, shuffle=False))
    assert [b["image"].shape[0] for b in batches] == [8, 8, 4]
    whole = ds.get_batch(list(range(20)))
    for k in whole:
        assert torch.equal(torch.cat([b[k] for b in batches]), whole[k])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_generation_matches_cpu():
    cpu = batch_of("shapes", 64)
    gpu = batch_of("shapes", 64, device="cuda")
    assert gpu["image"].device.type == "cuda"
    for k in ("shape", "visible"):
        assert torch.equal(cpu[k], gpu[k].cpu())
    assert (cpu["mask"] != gpu["mask"].cpu()).float().mean() < 1e-3  # sin/cos may round differently


def test_bench_script_runs():
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_data.py"), "--batches", "2",
                          "--batch-size", "16"], capture_output=True, text=True, timeout=120, check=True)
    lines = out.stdout.strip().splitlines()
    assert [line.split()[0] for line in lines] == list(data.BUILTIN)
    for line in lines:
        assert line.endswith("images/s") and float(line.split()[-2]) > 0


@pytest.mark.parametrize("name", data.BUILTIN)
def test_plain_dataloader_default_collate(name):
    ds = data.make_dataset(name, "train", size=40)
    plain = iter(torch.utils.data.DataLoader(ds, batch_size=8))  # DESIGN.md: works as users plug it in
    fast = iter(data.make_loader(ds, 8, shuffle=False))
    for _ in range(2):
        a, b = next(plain), next(fast)
        assert a.keys() == b.keys()
        for k in a:
            assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    idx = [7, 0, 33]
    one_by_one = torch.utils.data.default_collate([ds[i] for i in idx])
    whole = ds.get_batch(idx)
    assert all(torch.equal(one_by_one[k], whole[k]) for k in whole)
