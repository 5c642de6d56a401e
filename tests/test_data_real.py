"""Real-dataset loaders of data.py: tiny files written in each public layout."""
import json
import math
import pickle
import sys

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

import data
from data import DataError


def check_batch(batch, b, side):
    assert batch["image"].dtype == torch.float32 and batch["image"].shape == (b, 3, side, side)
    assert 0.0 <= batch["image"].min() and batch["image"].max() <= 1.0
    assert batch["mask"].dtype == torch.int64 and batch["mask"].shape == (b, side, side)


def index_of(batch):
    """The images below store their index in the red channel of pixel (0, 0)."""
    return (batch["image"][:, 0, 0, 0] * 255).round().long().tolist()


# --- npz


def write_npz(file, n=20, h=8, w=8, e=3, **extra):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (n, h, w, 3), dtype=np.uint8)
    mask = rng.integers(0, e, (n, h, w)).astype(np.int32)
    x = rng.random((n, e)).astype(np.float32)
    color = rng.random((n, e, 3)).astype(np.float32)
    arrays = dict(image=image, mask=mask, x=x, color=color)
    arrays.update(extra)
    np.savez(file, **{k: v for k, v in arrays.items() if v is not None})
    return arrays


def test_npz_single_file_splits_and_values(tmp_path):
    a = write_npz(tmp_path / "toy.npz")
    a["image"][:, 0, 0, 0] = np.arange(20)
    np.savez(tmp_path / "toy.npz", **a)
    sets = {s: data.open_real(tmp_path / "toy.npz", s) for s in data.SPLITS}
    assert [len(sets[s]) for s in data.SPLITS] == [16, 2, 2]  # t = min(1000, 20 // 10) = 2
    seen = [index_of(sets[s].get_batch(list(range(len(sets[s]))))) for s in data.SPLITS]
    assert seen == [list(range(16)), [16, 17], [18, 19]]
    ds = sets["val"]
    assert (ds.num_background, ds.max_objects, ds.has_masks) == (1, 2, True)
    assert set(ds.properties) == {"x", "color"}
    b = ds.get_batch([1, 0])
    check_batch(b, 2, 8)
    assert torch.equal(b["mask"], torch.from_numpy(a["mask"][[17, 16]]).long())
    assert torch.allclose(b["image"] * 255, torch.from_numpy(a["image"][[17, 16]]).permute(0, 3, 1, 2).float())
    assert b["x"].dtype == torch.float32 and torch.equal(b["x"], torch.from_numpy(a["x"][[17, 16]]))
    assert b["color"].shape == (2, 3, 3)
    one = ds[0]
    assert one["image"].shape == (3, 8, 8) and torch.equal(one["mask"], b["mask"][1])
    small = data.open_real(tmp_path / "toy.npz", "train", val_size=5, test_size=0)
    assert len(small) == 15


def test_npz_resize_nearest_and_crop(tmp_path):
    a = write_npz(tmp_path / "wide.npz", h=8, w=12)
    ds = data.open_real(tmp_path / "wide.npz", "train", resolution=4)
    b = ds.get_batch([0])
    check_batch(b, 1, 4)
    # centre square = cols 2:10; nearest 8 -> 4 samples pixel centres 1, 3, 5, 7
    assert torch.equal(b["mask"][0], torch.from_numpy(a["mask"][0, 1::2, 3:11:2]).long())


def test_npz_folder_one_file_per_split(tmp_path):
    write_npz(tmp_path / "train.npz", n=6)
    write_npz(tmp_path / "test.npz", n=3)
    assert len(data.open_real(tmp_path, "train")) == 6
    assert len(data.open_real(tmp_path, "test")) == 3
    with pytest.raises(DataError, match="val.npz"):
        data.open_real(tmp_path, "val")


@pytest.mark.parametrize("change, message", [
    (dict(mask=None), "missing array 'mask'"),
    (dict(image=np.zeros((4, 8, 8, 3), np.float32)), "uint8"),
    (dict(mask=np.zeros((20, 8, 9), np.int64)), "'mask'"),
    (dict(x=np.zeros((20, 3, 2), np.float32)), "'x'"),
    (dict(x=np.zeros((20, 2), np.float32)), "disagree"),
])
def test_npz_malformed(tmp_path, change, message):
    write_npz(tmp_path / "bad.npz", **change)
    with pytest.raises(DataError, match=message) as e:
        data.open_real(tmp_path / "bad.npz", "train")
    assert "bad.npz" in str(e.value) and "\n" not in str(e.value)


def test_unreadable_files_and_options(tmp_path):
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    (tmp_path / "junk.h5").write_bytes(b"not hdf5")
    (tmp_path / "notes.txt").write_text("hello")
    for name in ("junk.npz", "junk.h5", "notes.txt"):
        with pytest.raises(DataError, match=name.replace(".", r"\.")):
            data.open_real(tmp_path / name, "train")
    write_npz(tmp_path / "ok.npz")
    with pytest.raises(DataError, match="unknown option"):
        data.open_real(tmp_path / "ok.npz", "train", variant="clevr")
    with pytest.raises(DataError, match="no such file"):
        data.open_real(tmp_path / "missing.npz", "train")


def test_make_dataset_dispatches_paths(tmp_path):
    write_npz(tmp_path / "toy.npz")
    ds = data.make_dataset(tmp_path / "toy.npz", "test", resolution=4)
    check_batch(ds.get_batch([0, 1]), 2, 4)


# --- HDF5


def write_flat_h5(file, n, h, w, e, seed=0, visibility=True):
    """Flat layout: image (N,H,W,3), mask (N,H,W,1), visibility and properties (N,E)."""
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, (n, h, w, 3), dtype=np.uint8)
    image[:, 0, 0, 0] = np.arange(n)
    mask = rng.integers(0, e, (n, h, w, 1)).astype(np.uint8)
    vis = np.ones((n, e), np.float32)
    with h5py.File(file, "w") as f:
        f["image"], f["mask"] = image, mask
        if visibility:
            f["visibility"] = vis
        f["x"] = rng.random((n, e)).astype(np.float32)
        f["shape"] = rng.integers(0, 3, (n, e))
        f["color"] = rng.integers(0, 8, (n, e))  # categorical (CLEVR): not the contract's RGB
    return image, mask


def test_h5_flat_objects_room(tmp_path):
    file = tmp_path / "objects_room_train.h5"
    image, mask = write_flat_h5(file, n=30, h=16, w=16, e=7)
    sets = {s: data.open_real(file, s) for s in data.SPLITS}
    assert [len(sets[s]) for s in data.SPLITS] == [24, 3, 3]
    ds = sets["test"]
    assert (ds.num_background, ds.max_objects, ds.name) == (4, 3, "objects_room")
    assert set(ds.properties) == {"visible", "x", "shape"}  # categorical colour left out
    b = ds.get_batch([2, 0, 2])  # unsorted, repeated: h5py needs sorted unique reads
    check_batch(b, 3, 16)
    assert index_of(b) == [29, 27, 29]
    assert torch.equal(b["mask"], torch.from_numpy(mask[[29, 27, 29], ..., 0]).long())
    assert b["shape"].dtype == torch.int64 and b["x"].shape == (3, 7)
    present = torch.stack([torch.bincount(m.flatten(), minlength=7) > 0 for m in b["mask"]])
    assert b["visible"].dtype == torch.bool and torch.equal(b["visible"], present)
    # pickled for a worker: no handle travels, and the copy reopens the file itself
    clone = pickle.loads(pickle.dumps(ds))
    assert clone._file is None and torch.equal(clone[0]["mask"], b["mask"][1])
    batches = list(data.make_loader(ds, batch_size=3, shuffle=False, workers=1))
    assert index_of(batches[0]) == [27, 28, 29]


@pytest.mark.parametrize("visibility", [True, False])
def test_h5_clevr_crop_and_clevr6_filter(tmp_path, visibility):
    n, e = 30, 11
    rng = np.random.default_rng(1)
    counts = rng.integers(3, 11, n)  # visible objects per image, some above 6
    image = np.zeros((n, 240, 320, 3), np.uint8)
    image[:, 28, :, 1] = 200  # just outside the crop
    image[:, 29, 64] = [0, 100, 50]  # first pixel of the crop
    image[:, 29, 64, 0] = np.arange(n)
    mask = np.zeros((n, 240, 320, 1), np.uint8)
    vis = np.zeros((n, e), np.float32)
    vis[:, 0] = 1
    for i, c in enumerate(counts):
        vis[i, 1:c + 1] = 1
        mask[i, 100, 100:100 + c, 0] = np.arange(1, c + 1)
    with h5py.File(tmp_path / "clevr_with_masks.h5", "w") as f:
        f["image"], f["mask"] = image, mask
        if visibility:
            f["visibility"] = vis
    file = tmp_path / "clevr_with_masks.h5"
    t = 3  # min(1000, 30 // 10)
    ranges = {"train": range(0, n - 2 * t), "val": range(n - 2 * t, n - t), "test": range(n - t, n)}
    for split, r in ranges.items():
        ds = data.open_real(file, split, resolution=192)  # no resize: index_of reads one pixel
        want = [i for i in r if counts[i] <= 6]
        assert ds.max_objects == 6 and len(ds) == len(want)
        if want:
            assert index_of(ds.get_batch(list(range(len(ds))))) == want
    everything = data.open_real(file, "train", max_objects=None)
    assert len(everything) == n - 2 * t and everything.max_objects == 10
    b = everything.get_batch([0, 1])
    check_batch(b, 2, 128)
    full = data.open_real(file, "train", resolution=192, max_objects=None).get_batch([0])
    assert torch.allclose(full["image"][0, :, 0, 0] * 255, torch.tensor([0.0, 100, 50]))
    assert full["image"][0, 1, 0, 1:].max() == 0  # row 28 (green 200) is cut off
    assert torch.equal(full["mask"][0], torch.from_numpy(mask[0, 29:221, 64:256, 0]).long())
    assert full["visible"][0].sum() == counts[0] + 1  # objects + background


def test_h5_grouped_layout(tmp_path):
    file = tmp_path / "tetrominoes.h5"
    sizes = {"train": 5, "val": 2, "test": 3}
    with h5py.File(file, "w") as f:
        for split, n in sizes.items():
            imgs = np.full((n, 12, 12, 3), 7, np.uint8)
            imgs[:, 0, 0, 0] = np.arange(n)
            masks = np.zeros((n, 4, 12, 12, 1), np.uint8)
            masks[:, 0, :6] = 255  # background covers the top half only
            masks[:, 1, 2:8, 2:8] = 255
            masks[:, 3, 4:10, 4:10] = 255  # overlaps object 1: the last one wins
            f[f"{split}/imgs"], f[f"{split}/masks"] = imgs, masks
    for split, n in sizes.items():
        assert len(data.open_real(file, split)) == n
    ds = data.open_real(file, "test")
    assert (ds.name, ds.num_background, ds.max_objects, ds.properties) == ("tetrominoes", 1, 3, ("visible",))
    b = ds.get_batch([2, 1])
    check_batch(b, 2, 12)
    assert index_of(b) == [2, 1]
    m = b["mask"][0]
    assert m[0, 0] == 0 and m[2, 2] == 1 and m[5, 5] == 3 and m[9, 9] == 3
    assert m[11, 0] == -1 and m[7, 2] == 1 and m[7, 0] == -1  # nothing set: ignore
    assert b["visible"][0].tolist() == [True, True, False, True]
    with pytest.raises(DataError, match="flat file"):
        data.open_real(file, "train", val_size=3)


def test_h5_malformed(tmp_path, monkeypatch):
    with h5py.File(tmp_path / "nokeys.h5", "w") as f:
        f["pictures"] = np.zeros((2, 4, 4, 3), np.uint8)
    with h5py.File(tmp_path / "badmask.hdf5", "w") as f:
        f["image"] = np.zeros((20, 4, 4, 3), np.uint8)
        f["mask"] = np.zeros((20, 4, 5, 1), np.uint8)
    with h5py.File(tmp_path / "badvis.h5", "w") as f:
        f["image"] = np.zeros((20, 4, 4, 3), np.uint8)
        f["mask"] = np.zeros((20, 4, 4, 1), np.uint8)
        f["visibility"] = np.zeros((19, 3), np.float32)
    with h5py.File(tmp_path / "nogroup.h5", "w") as f:
        f["train/imgs"] = np.zeros((2, 4, 4, 3), np.uint8)
    cases = [("nokeys.h5", "expected keys 'image' and 'mask'"), ("badmask.hdf5", "'mask'"),
             ("badvis.h5", "'visibility'"), ("nogroup.h5", "'masks'")]
    for name, message in cases:
        with pytest.raises(DataError, match=message) as e:
            data.open_real(tmp_path / name, "train")
        assert name in str(e.value)
    with pytest.raises(DataError, match="max_objects='six'"):
        data.open_real(tmp_path / "nokeys.h5", "train", max_objects="six")
    with pytest.raises(DataError, match="expected integers"):
        data.open_real(tmp_path / "badmask.hdf5", "train", val_size="many")
    with pytest.raises(DataError, match="unknown variant"):
        data.open_real(tmp_path / "nokeys.h5", "train", variant="mnist")
    monkeypatch.setitem(sys.modules, "h5py", None)  # as if h5py were not installed
    with pytest.raises(DataError, match=r"reading .*nokeys\.h5 needs h5py: pip install -r requirements-extra\.txt"):
        data.open_real(tmp_path / "nokeys.h5", "train")


# --- ClevrTex


def write_clevrtex(root, variant="full", n=10):
    folder = root / f"clevrtex_{variant}"
    flats = []
    for i in range(n):
        sub = folder / str(i // 1000)
        sub.mkdir(parents=True, exist_ok=True)
        image = np.full((240, 320, 3), 90, np.uint8)
        image[24, 64] = [i, 1, 2]  # top-left pixel of the centre crop
        image[23, 64] = 255
        flat = np.zeros((240, 320), np.uint8)
        flat[100:140, 100:150] = 1 + i % 10
        flat[24:30, 64:70] = 2
        Image.fromarray(image).save(sub / f"CLEVRTEX_{variant}_{i:06d}.png")
        Image.fromarray(flat).save(sub / f"CLEVRTEX_{variant}_{i:06d}_flat.png")
        flats.append(flat)
    return folder, flats


def test_clevrtex(tmp_path):
    folder, flats = write_clevrtex(tmp_path)
    sets = {s: data.open_real(folder, s, resolution=192) for s in data.SPLITS}
    got = {s: index_of(d.get_batch(list(range(len(d))))) for s, d in sets.items()}
    assert got == {"test": [0], "val": [1], "train": list(range(2, 10))}
    ds = sets["train"]
    assert (ds.name, ds.num_background, ds.max_objects, ds.has_masks) == ("clevrtex_full", 1, 10, True)
    check_batch(data.open_real(folder, "train").get_batch([0, 1]), 2, 128)
    native = data.open_real(tmp_path, "train", resolution=192)  # the parent folder works too
    b = native.get_batch([3])
    assert torch.allclose(b["image"][0, :, 0, 0] * 255, torch.tensor([5.0, 1, 2]))
    assert torch.equal(b["mask"][0], torch.from_numpy(flats[5][24:216, 64:256]).long())
    Image.new("RGB", (320, 241)).save(folder / "0" / "CLEVRTEX_full_000004.png")
    with pytest.raises(DataError, match="CLEVRTEX_full_000004.png"):
        native.get_batch([2])
    (folder / "0" / "CLEVRTEX_full_000004.png").write_bytes(b"garbage")
    with pytest.raises(DataError, match="CLEVRTEX_full_000004.png.*unreadable"):
        native.get_batch([2])
    with pytest.raises(DataError, match="clevrtex_camo"):
        data.open_real(tmp_path, "train", variant="camo")
    (tmp_path / "clevrtex_outd").mkdir()
    with pytest.raises(DataError, match="no images matching"):
        data.open_real(tmp_path / "clevrtex_outd", "train")


# --- COCO


def rle_encode_string(mask):
    """Reference COCO compressed RLE encoder (column-major runs, 5-bit groups, deltas)."""
    runs = runs_of(mask)
    out = []
    for i, r in enumerate(runs):
        x = r - runs[i - 2] if i > 2 else r
        more = True
        while more:
            c = x & 0x1F
            x >>= 5
            more = (x != -1) if c & 0x10 else (x != 0)
            out.append(chr(c + (0x20 if more else 0) + 48))
    return "".join(out)


def runs_of(mask):
    """Uncompressed COCO RLE: alternating 0/1 run lengths in column-major order, zeros first."""
    flat = mask.T.reshape(-1)
    runs, value, length = [], False, 0
    for v in flat.tolist():  # slow on purpose: an independent reference
        if v == value:
            length += 1
        else:
            runs.append(length)
            value, length = v, 1
    runs.append(length)
    return runs


def test_rle_decode_both_forms():
    rng = np.random.default_rng(3)
    for h, w in [(7, 5), (20, 33), (1, 1)]:
        for p in (0.05, 0.5, 0.97):
            mask = rng.random((h, w)) < p
            assert np.array_equal(data.rle_decode(runs_of(mask), h, w), mask)
            assert np.array_equal(data.rle_decode(rle_encode_string(mask), h, w), mask)
    long_run = np.zeros((40, 50), bool)
    long_run[:, 30:] = True  # runs of 1200 and 800 need several 5-bit groups
    assert np.array_equal(data.rle_decode(rle_encode_string(long_run), 40, 50), long_run)
    with pytest.raises(ValueError):
        data.rle_decode([3, 4], 3, 3)


def write_coco(root, annotations, images=None, part="val2017"):
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    (root / part).mkdir(exist_ok=True)
    images = images or [dict(id=7, file_name="a.jpg", height=20, width=30),
                        dict(id=3, file_name="b.jpg", height=30, width=20)]
    for im in images:
        Image.new("L", (im["width"], im["height"]), 128).save(root / part / im["file_name"])
    coco = dict(images=images, annotations=annotations, categories=[dict(id=1, name="thing")])
    (root / "annotations" / f"instances_{part}.json").write_text(json.dumps(coco))


def coco_case():
    """Annotations of image 7 (20 x 30) and the expected native-size mask."""
    rle_region = np.zeros((20, 30), bool)
    rle_region[10:15, 10:14] = True
    list_region = np.zeros((20, 30), bool)
    list_region[0:4, 20:28] = True
    crowd = np.zeros((20, 30), bool)
    crowd[16:20, :] = True
    anns = [
        dict(image_id=7, iscrowd=0, segmentation=[[2, 2, 8, 2, 8, 6, 2, 6]]),
        dict(image_id=7, iscrowd=0, segmentation=dict(counts=rle_encode_string(rle_region), size=[20, 30])),
        dict(image_id=7, iscrowd=1, segmentation=dict(counts=runs_of(crowd), size=[20, 30])),
        dict(image_id=7, iscrowd=0, segmentation=dict(counts=runs_of(list_region), size=[20, 30])),
        dict(image_id=7, iscrowd=0, segmentation=[[6, 4, 12, 4, 12, 8, 6, 8]]),
    ]
    want = np.zeros((20, 30), np.int64)
    want[2:7, 2:9] = 1  # PIL fills the polygon including its outline
    want[rle_region] = 2
    want[list_region] = 3
    want[4:9, 6:13] = 4
    want[4:7, 6:9] = -1  # covered by instances 1 and 4
    want[crowd] = -1
    return anns, want


def test_coco(tmp_path):
    anns, want = coco_case()
    write_coco(tmp_path, anns)
    ds = data.open_real(tmp_path, "val", resolution=20)
    assert (len(ds), ds.name, ds.num_background, ds.max_objects, ds.has_masks) == (2, "coco", 1, 4, True)
    b = ds.get_batch([1, 0])  # id order: image 3 then image 7
    check_batch(b, 2, 20)
    # image 7: the short side (20) is already the resolution; the crop keeps cols 5:25
    assert torch.equal(b["mask"][0], torch.from_numpy(want[:, 5:25]))
    assert torch.equal(b["mask"][1], torch.zeros(20, 20, dtype=torch.int64))
    assert torch.allclose(b["image"], torch.full_like(b["image"], 128 / 255), atol=2 / 255)
    assert len(data.open_real(tmp_path, "test")) == 2  # test reads val2017
    default = data.open_real(tmp_path, "val")
    check_batch(default.get_batch([0, 1]), 2, 224)
    small = data.open_real(tmp_path, "val", resolution=10).get_batch([1])["mask"][0]
    assert torch.equal(small, torch.from_numpy(want[1::2, 5:25:2]))  # nearest, pixel centres
    with pytest.raises(DataError, match="instances_train2017.json"):
        data.open_real(tmp_path, "train")


def test_coco_malformed(tmp_path):
    write_coco(tmp_path / "notcoco", [])
    (tmp_path / "notcoco" / "annotations" / "instances_val2017.json").write_text('{"foo": 1}')
    with pytest.raises(DataError, match=r"instances_val2017\.json: not a COCO"):
        data.open_real(tmp_path / "notcoco", "val")
    write_coco(tmp_path / "broken", [dict(image_id=7, iscrowd=0,
                                           segmentation=dict(counts=[5, 5], size=[20, 30]))])
    ds = data.open_real(tmp_path / "broken", "val")
    with pytest.raises(DataError, match="instances_val2017.json: bad segmentation for a.jpg"):
        ds.get_batch([1])
    write_coco(tmp_path / "noimage", [])
    (tmp_path / "noimage" / "val2017" / "a.jpg").unlink()
    with pytest.raises(DataError, match="a.jpg"):
        data.open_real(tmp_path / "noimage", "val").get_batch([1])


# --- Image folder


def test_image_folder(tmp_path):
    (tmp_path / "pics" / "sub").mkdir(parents=True)
    Image.new("RGB", (30, 10), (255, 0, 0)).save(tmp_path / "pics" / "a.png")
    wide = np.zeros((10, 30, 3), np.uint8)
    wide[:, 10:20] = 200  # the centre square of a 10 x 30 image
    Image.fromarray(wide).save(tmp_path / "pics" / "sub" / "b.png")
    Image.new("RGB", (16, 16), (0, 0, 255)).save(tmp_path / "pics" / "sub" / "c.jpg")
    (tmp_path / "pics" / "notes.txt").write_text("not an image")
    ds = data.open_real(tmp_path / "pics", "train")
    assert (len(ds), ds.has_masks, ds.properties) == (3, False, ())
    b = ds.get_batch([0, 1, 2])
    check_batch(b, 3, 64)
    assert (b["mask"] == -1).all()
    assert torch.allclose(b["image"][1], torch.full((3, 64, 64), 200 / 255))  # crop, then resize
    assert len(data.open_real(tmp_path / "pics", "test")) == 3  # same images for every split
    check_batch(data.open_real(tmp_path / "pics", "val", resolution=8).get_batch([2]), 1, 8)
    (tmp_path / "pics" / "sub" / "c.jpg").write_bytes(b"broken")
    with pytest.raises(DataError, match="c.jpg"):
        ds.get_batch([2])
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="empty: no .png/.jpg images"):
        data.open_real(tmp_path / "empty", "train")


# --- every dataset class in a plain DataLoader (default collate)


def write_images(folder, n=5):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.fromarray(np.full((12 + i, 10, 3), 40 * i, np.uint8)).save(folder / f"{i}.png")
    return folder


def open_kind(kind, root):
    """A small dataset of each real-data class, written under root."""
    if kind == "npz":
        write_npz(root / "toy.npz")
        return data.open_real(root / "toy.npz", "train")
    if kind == "hdf5":
        write_flat_h5(root / "objects_room.h5", n=30, h=16, w=16, e=7)
        return data.open_real(root / "objects_room.h5", "train")
    if kind == "clevrtex":
        return data.open_real(write_clevrtex(root)[0], "train", resolution=32)
    if kind == "coco":
        write_coco(root, coco_case()[0])
        return data.open_real(root, "val", resolution=16)
    return data.open_real(write_images(root / "pics"), "train", resolution=8)


def assert_same_batch(got, want):
    assert got.keys() == want.keys()
    for k in want:
        assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), k


@pytest.mark.parametrize("kind", ["npz", "hdf5", "clevrtex", "coco", "image-folder"])
def test_plain_dataloader_default_collate(tmp_path, kind):
    ds = open_kind(kind, tmp_path)
    idx = [len(ds) - 1, 0, len(ds) // 2]  # COCO has 2 images: [1, 0, 1]
    want = ds.get_batch(idx)
    assert {k: v.shape[0] for k, v in want.items()} == {k: 3 for k in want}
    # a plain DataLoader: __getitems__ through the Subset, then the default collate
    subset = torch.utils.data.Subset(ds, idx)
    assert_same_batch(next(iter(torch.utils.data.DataLoader(subset, batch_size=3))), want)
    # sample by sample (__getitem__), as a DataLoader over a dataset without __getitems__ does
    assert_same_batch(torch.utils.data.default_collate([ds[i] for i in idx]), want)
    # the same tensors as make_loader's whole-batch path, batch by batch
    plain = list(torch.utils.data.DataLoader(ds, batch_size=2, num_workers=int(kind == "hdf5")))
    fast = list(data.make_loader(ds, 2, shuffle=False))
    assert len(plain) == len(fast) == math.ceil(len(ds) / 2)
    for a, b in zip(plain, fast):
        assert_same_batch(a, b)
