"""Real-dataset loaders of data.py: tiny files written in each public layout."""
import json
import math
import pickle
import sys

import h5py
import numpy as np
import pycocotools.mask as mask_api
import pytest
import torch
import torch.nn.functional as F
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


def write_coco(root, annotations, images=None, part="val2017", pixels=None):
    """A COCO folder; images are grey unless `pixels` maps a file name to its uint8 array."""
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    (root / part).mkdir(exist_ok=True)
    images = images or [dict(id=7, file_name="a.png", height=120, width=160),
                        dict(id=3, file_name="b.png", height=30, width=20)]
    for im in images:
        array = (pixels or {}).get(im["file_name"], np.full((im["height"], im["width"]), 128, np.uint8))
        Image.fromarray(array).save(root / part / im["file_name"])
    coco = dict(images=images, annotations=annotations, categories=[dict(id=1, name="thing")])
    (root / "annotations" / f"instances_{part}.json").write_text(json.dumps(coco))


def blob(h, w, rows, cols, seed):
    """A random bool mask inside rows x cols (slices) of an h x w canvas."""
    m = np.zeros((h, w), bool)
    m[rows, cols] = np.random.default_rng(seed).random((rows.stop - rows.start, cols.stop - cols.start)) < 0.6
    return m


def coco_case():
    """Annotations of image 7 (120 x 160; image 3 has only a crowd annotation), and the
    reference mask of each non-crowd instance, in file order, with its category."""
    h, w = 120, 160
    twelve_gon = [v for a in np.arange(12) * np.pi / 6 for v in (85 + 15 * np.cos(a), 25 + 15 * np.sin(a))]
    polygons = [  # (segmentation, category_id)
        ([[25, 10, 55, 10, 55, 40, 25, 40]], 18),  # a 30 x 30 square: 900 pixels in pycocotools
        ([twelve_gon], 1),
        ([[110, 10, 113, 10, 111.5, 13]], 44),  # small
        ([[25, 60, 135, 61, 135, 61.6, 25, 60.4]], 3),  # thin: about half a pixel high
        ([[110, 45, 120, 45, 120, 55, 110, 55], [125, 45, 128, 45, 128, 48]], 5),  # two parts
    ]
    uncompressed = blob(h, w, slice(70, 100), slice(30, 60), 1)
    compressed = blob(h, w, slice(80, 110), slice(50, 90), 2)  # overlaps the uncompressed one
    crowd = np.zeros((h, w), bool)
    crowd[100:120] = True  # covers part of the compressed-RLE instance
    anns = [dict(image_id=7, iscrowd=0, segmentation=seg, category_id=c) for seg, c in polygons]
    anns.insert(3, dict(image_id=7, iscrowd=1, segmentation=dict(counts=runs_of(crowd), size=[h, w]), category_id=1))
    anns += [dict(image_id=7, iscrowd=0, segmentation=dict(counts=runs_of(uncompressed), size=[h, w]), category_id=62),
             dict(image_id=7, category_id=67,  # no iscrowd key: not a crowd
                  segmentation=dict(counts=rle_encode_string(compressed), size=[h, w])),
             dict(image_id=3, iscrowd=1, segmentation=[[0, 0, 10, 0, 10, 10]], category_id=1)]
    refs = [mask_api.decode(mask_api.merge(mask_api.frPyObjects(seg, h, w))).astype(bool) for seg, _ in polygons]
    refs += [uncompressed, compressed]
    cats = [c for _, c in polygons] + [62, 67]
    return anns, refs, cats


def expected_masks(refs, cats, h, w):
    """Instance ids (-1 where two or more overlap) and the highest category per pixel, by a plain loop."""
    ids, classes, count = np.zeros((h, w), np.int64), np.zeros((h, w), np.int64), np.zeros((h, w), np.int64)
    for j, (m, c) in enumerate(zip(refs, cats), 1):
        ids[m], count = j, count + m
        classes[m] = np.maximum(classes[m], c)
    ids[count > 1] = -1
    return ids, classes


def test_coco_masks_as_pycocotools(tmp_path):
    anns, refs, cats = coco_case()
    assert refs[0].sum() == 900  # a filled boundary ring would make it 961
    assert 0 < refs[2].sum() < 10 and 0 < refs[3].sum() < 150  # small and thin polygons are not empty
    rle = anns[6]["segmentation"]
    assert np.array_equal(mask_api.decode(mask_api.frPyObjects(rle, 120, 160)), refs[5])  # the RLE helpers agree
    assert np.array_equal(mask_api.decode(anns[7]["segmentation"]), refs[6])
    write_coco(tmp_path, anns)
    ds = data.open_real(tmp_path, "val", resolution=120)  # short side 120: no resize, crop cols 20:140
    assert (len(ds), ds.name, ds.num_background, ds.max_objects, ds.has_masks) == (2, "coco", 1, 7, True)
    b = ds.get_batch([1, 0])  # ids in order 3, 7: image 7, then image 3
    check_batch(b, 2, 120)
    ids, classes = expected_masks(refs, cats, 120, 160)
    assert (ids == -1).sum() > 0 and (classes[ids == -1] == 67).all()  # the two RLE blobs overlap
    assert torch.equal(b["mask"][0], torch.from_numpy(ids[:, 20:140]))
    assert torch.equal(b["class_mask"][0], torch.from_numpy(classes[:, 20:140]))
    assert b["category"].dtype == torch.int64 and b["category"].tolist()[0] == [0] + cats
    assert (b["mask"][0] == 1).sum() == 900
    # image 3 has only a crowd annotation: dropped, all background, no categories
    assert b["mask"][1].max() == 0 and b["class_mask"][1].max() == 0 and b["category"][1].max() == 0


def test_coco_crowd_dropped_and_categories_aligned(tmp_path):
    anns, refs, cats = coco_case()
    write_coco(tmp_path, anns)
    b = data.open_real(tmp_path, "val", resolution=120).get_batch([1])
    mask, category, classes = b["mask"][0], b["category"][0], b["class_mask"][0]
    crowd_only = np.zeros((120, 160), bool)
    crowd_only[100:120] = ~np.any(refs, axis=0)[100:120]
    assert (mask[torch.from_numpy(crowd_only[:, 20:140])] == 0).all()  # crowd pixels: background, not ignored
    assert (mask[100:110] == 7).any()  # an instance inside the crowd region keeps its id
    # category[mask] is the category of each labelled pixel, and equals class_mask off overlaps
    for j, c in enumerate(cats, 1):
        assert category[j] == c and (classes[mask == j] == c).all()
    assert (classes[mask == 0] == 0).all()


def nearest_exact_index(n_in, n_out):
    """Source index of each output pixel in PyTorch's nearest-exact kernel: float32 scale
    in / out, floor((i + 0.5) * scale), clamped."""
    scale = np.float32(n_in) / np.float32(n_out)
    return np.minimum(np.floor((np.arange(n_out, dtype=np.float32) + np.float32(0.5)) * scale).astype(int), n_in - 1)


@pytest.mark.parametrize("portrait", [False, True])
def test_coco_evaluation_protocol_resize_and_crop(tmp_path, portrait):
    h, w = (147, 100) if portrait else (100, 147)
    rng = np.random.default_rng(5)
    pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    refs = [blob(h, w, slice(0, h), slice(0, w), seed) for seed in (3, 4, 5)]  # dense: overlaps everywhere
    anns = [dict(image_id=1, iscrowd=0, category_id=c, segmentation=dict(counts=runs_of(m), size=[h, w]))
            for m, c in zip(refs, (9, 4, 7))]
    write_coco(tmp_path, anns, [dict(id=1, file_name="x.png", height=h, width=w)], pixels={"x.png": pixels})
    b = data.make_dataset(tmp_path, "val", resolution=16, mask_resolution=24).get_batch([0])
    assert b["image"].shape == (1, 3, 16, 16) and b["mask"].shape == b["class_mask"].shape == (1, 24, 24)
    # image: short side 16, long side int(16 * 147 / 100) = int(23.52) = 23 (truncated, not rounded);
    # centre crop from round((23 - 16) / 2) = round(3.5) = 4 (halves to even, not floor 3)
    x = torch.from_numpy(pixels).permute(2, 0, 1)[None].float() / 255
    size = (23, 16) if portrait else (16, 23)
    full = F.interpolate(x, size=size, mode="bicubic", align_corners=False, antialias=False).clamp(0, 1)
    want = full[..., 4:20, :] if portrait else full[..., 4:20]
    assert torch.equal(b["image"], want)
    # masks: short side 24 nearest-exact, long side int(24 * 1.47) = int(35.28) = 35, crop from round(5.5) = 6
    ids, classes = expected_masks(refs, (9, 4, 7), h, w)
    rows, cols = nearest_exact_index(h, 35 if portrait else 24), nearest_exact_index(w, 24 if portrait else 35)
    rows, cols = (rows[6:30], cols) if portrait else (rows, cols[6:30])
    assert torch.equal(b["mask"][0], torch.from_numpy(ids[rows][:, cols]))
    assert torch.equal(b["class_mask"][0], torch.from_numpy(classes[rows][:, cols]))
    assert (b["mask"] == -1).any() and (b["mask"] > 0).any()
    # without mask_resolution the masks follow the image (16 x 16)
    same = data.make_dataset(tmp_path, "val", resolution=16).get_batch([0])
    assert torch.equal(same["image"], b["image"]) and same["mask"].shape == (1, 16, 16)


def test_coco_malformed(tmp_path, monkeypatch):
    write_coco(tmp_path / "notcoco", [])
    (tmp_path / "notcoco" / "annotations" / "instances_val2017.json").write_text('{"foo": 1}')
    with pytest.raises(DataError, match=r"instances_val2017\.json: not a COCO"):
        data.open_real(tmp_path / "notcoco", "val")
    bad = [dict(counts=[5, 5], size=[120, 160]), dict(counts=[5, 5], size=[10, 1]),
           dict(counts="0000zzzz", size=[120, 160]), "polygon", []]
    for i, seg in enumerate(bad):
        write_coco(tmp_path / f"broken{i}", [dict(image_id=7, iscrowd=0, category_id=1, segmentation=seg)])
        ds = data.open_real(tmp_path / f"broken{i}", "val")
        with pytest.raises(DataError, match=r"instances_val2017\.json: bad segmentation for a\.png") as e:
            ds.get_batch([1])
        assert "\n" not in str(e.value)
    write_coco(tmp_path / "noimage", [])
    (tmp_path / "noimage" / "val2017" / "a.png").unlink()
    with pytest.raises(DataError, match="a.png"):
        data.open_real(tmp_path / "noimage", "val").get_batch([1])
    with pytest.raises(DataError, match="unknown option"):
        data.open_real(tmp_path / "noimage", "val", variant="x")
    with pytest.raises(DataError, match="mask_resolution=0"):
        data.open_real(tmp_path / "noimage", "val", mask_resolution=0)
    monkeypatch.setitem(sys.modules, "pycocotools", None)  # as if pycocotools were not installed
    monkeypatch.setitem(sys.modules, "pycocotools.mask", None)
    with pytest.raises(DataError, match=r"reading .*instances_val2017\.json needs pycocotools: pip install -r "
                                        r"requirements-extra\.txt"):
        data.open_real(tmp_path / "noimage", "val")


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
        return data.open_real(root, "val", resolution=16, mask_resolution=20)
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
