"""clevr-lite (data.py): format, determinism, exact first-hit masks, occlusion, shadows, per-object
truth aligned with mask ids, loaders.

The reference here is an independent scalar ray caster: CLEVR's camera and sun written out from
their published values, and textbook ray-solid intersections over every surface of each solid
(both roots of the quadrics, both caps, three slabs), in float64 Python.
"""
import importlib
import math

import pytest
import torch

import data

CAMERA = (7.48113, -6.50764, 5.34367)  # kubric's CLEVR camera, looking at the origin
FOCAL = 35 / 32 * 320  # pixels of the 320x240 frame (35 mm lens, 32 mm sensor)
CROP = (29, 64, 192)  # CLEVR6 crop: top row, left column, side in the 320x240 frame
SUN = (11.6608, -6.62799, 25.8232)  # the sun's position; its light is parallel, towards the origin
COLOURS = [(87, 87, 87), (173, 35, 35), (42, 75, 215), (29, 105, 20),  # CLEVR properties.json
           (129, 74, 25), (129, 38, 192), (41, 208, 208), (255, 238, 51)]
SIZES = (0.35, 0.7)


def batch_of(n=16, split="train", **kw):
    return data.make_synthetic("clevr-lite", split, **kw).get_batch(list(range(n)))


# --- independent scalar ray caster

def sub(a, b):
    return tuple(x - y for x, y in zip(a, b))


def dot(a, b):
    return sum(x * y for x, y in zip(a, b))


def unit(a):
    n = math.sqrt(dot(a, a))
    return tuple(x / n for x in a)


def cross(a, b):
    return (a[1] * b[2] - a[2] * b[1], a[2] * b[0] - a[0] * b[2], a[0] * b[1] - a[1] * b[0])


def camera_ray(row, col, res):
    """Origin and unit direction of the ray through the centre of pixel (row, col)."""
    f = unit(tuple(-c for c in CAMERA))
    right = unit(cross(f, (0.0, 0.0, 1.0)))
    down = cross(f, right)
    top, left, side = CROP
    u = (left + (col + 0.5) * side / res - 160) / FOCAL
    v = (top + (row + 0.5) * side / res - 120) / FOCAL
    return CAMERA, unit(tuple(fi + u * ri + v * di for fi, ri, di in zip(f, right, down)))


def first_hit(o, d, shape, centre, half, yaw):
    """Smallest t > 0 with o + t d on the solid (inf if none). centre = (x, y, half)."""
    c = centre
    if shape == 1:  # sphere of radius half
        oc = sub(o, c)
        b, cc = dot(oc, d), dot(oc, oc) - half * half
        disc = b * b - cc
        if disc < 0:
            return math.inf
        ts = [-b - math.sqrt(disc), -b + math.sqrt(disc)]
        return min([t for t in ts if t > 1e-9], default=math.inf)
    if shape == 2:  # vertical cylinder, radius half, z in [0, 2 half]: side roots and both caps
        ts = []
        ox, oy = o[0] - c[0], o[1] - c[1]
        a, b, cc = d[0] ** 2 + d[1] ** 2, ox * d[0] + oy * d[1], ox * ox + oy * oy - half * half
        if a > 0 and b * b - a * cc >= 0:
            for sgn in (-1, 1):
                t = (-b + sgn * math.sqrt(b * b - a * cc)) / a
                if 0 <= o[2] + t * d[2] <= 2 * half:
                    ts.append(t)
        for z in (0.0, 2 * half):
            if d[2] != 0:
                t = (z - o[2]) / d[2]
                px, py = o[0] + t * d[0] - c[0], o[1] + t * d[1] - c[1]
                if px * px + py * py <= half * half:
                    ts.append(t)
        return min([t for t in ts if t > 1e-9], default=math.inf)
    # cube: slabs in the frame rotated by yaw about the vertical through the centre
    cs, sn = math.cos(yaw), math.sin(yaw)
    axes = [(cs, sn, 0.0), (-sn, cs, 0.0), (0.0, 0.0, 1.0)]
    near, far = -math.inf, math.inf
    for ax in axes:
        p, q = dot(sub(o, c), ax), dot(d, ax)
        if abs(q) < 1e-15:
            if abs(p) > half:
                return math.inf
            continue
        t1, t2 = (-half - p) / q, (half - p) / q
        near, far = max(near, min(t1, t2)), min(far, max(t1, t2))
    if near > far or far <= 1e-9:
        return math.inf
    return near if near > 1e-9 else far


def objects(b, i):
    """[(mask id, shape, centre, half, yaw)] of the present objects of image i."""
    out = []
    for e in range(1, b["shape"].shape[1]):
        if b["shape"][i, e] >= 0:
            centre = tuple(b["position"][i, e].double().tolist())
            out.append((e, int(b["shape"][i, e]), centre, centre[2], math.radians(float(b["rotation"][i, e]))))
    return out


def cast(objs, o, d):
    """Sorted [(t, mask id)] of the objects the ray o + t d meets."""
    return sorted((t, e) for e, s, c, h, y in objs if (t := first_hit(o, d, s, c, h, y)) < math.inf)


def sample_pixels(mask, n_random, gen):
    """Every pixel on an id boundary (where the mask differs from its right or lower
    neighbour) plus n_random uniform ones: (rows, cols)."""
    edge = torch.zeros_like(mask, dtype=torch.bool)
    edge[:, :-1] |= mask[:, :-1] != mask[:, 1:]
    edge[:-1] |= mask[:-1] != mask[1:]
    rows, cols = edge.nonzero().T.tolist()
    res = mask.shape[0]
    extra = torch.randint(0, res, (2, n_random), generator=gen).tolist()
    return rows + extra[0], cols + extra[1]


# --- tests

def test_batch_format():
    ds = data.make_dataset("clevr-lite", "val")
    assert (ds.name, ds.resolution, ds.max_objects, ds.num_background, len(ds)) == ("clevr-lite", 64, 6, 1, 1000)
    assert ds.has_masks and {"visible", "shape", "color", "scale", "x", "y"} <= set(ds.properties)
    assert len(data.make_synthetic("clevr-lite", "train")) == 1_000_000
    b = ds.get_batch(list(range(40)))
    dtypes = {"image": torch.float32, "mask": torch.int64, "visible": torch.bool, "shape": torch.int64,
              "color": torch.float32, "scale": torch.float32, "x": torch.float32, "y": torch.float32,
              "material": torch.int64, "position": torch.float32, "rotation": torch.float32}
    assert {k: v.dtype for k, v in b.items()} == dtypes and set(ds.properties) == set(dtypes) - {"image", "mask"}
    assert b["image"].shape == (40, 3, 64, 64) and b["mask"].shape == (40, 64, 64)
    assert b["color"].shape == (40, 7, 3) and b["position"].shape == (40, 7, 3)
    for k in ("visible", "shape", "scale", "x", "y", "material", "rotation"):
        assert b[k].shape == (40, 7)
    assert b["image"].min() >= 0 and b["image"].max() <= 1 and b["image"].std() > 0.05
    assert b["mask"].min() >= 0 and b["mask"].max() <= 6
    # the ground entity
    assert b["visible"][:, 0].all() and (b["shape"][:, 0] == -1).all() and (b["material"][:, 0] == -1).all()
    assert (b["x"][:, 0] == 0.5).all() and (b["y"][:, 0] == 0.5).all()
    # objects: 3-6 in the first slots, CLEVR's properties
    present = b["shape"][:, 1:] >= 0
    n = present.sum(1)
    assert n.min() >= 3 and n.max() <= 6 and torch.equal(present, torch.arange(6) < n[:, None])
    assert set(b["shape"][:, 1:][present].tolist()) == {0, 1, 2}
    assert set(b["material"][:, 1:][present].tolist()) == {0, 1}
    assert set(b["scale"][:, 1:][present].tolist()) == set(torch.tensor(SIZES).tolist())
    palette = torch.tensor(COLOURS) / 255
    assert (b["color"][:, 1:][present][:, None] - palette).abs().amax(-1).min(1).values.max() < 1e-6
    assert torch.isin(b["color"][:, 1:][present], palette).all()
    pos = b["position"][:, 1:][present]
    rotation = b["rotation"][:, 1:][present]
    assert pos[:, :2].abs().max() <= 3 and ((rotation >= 0) & (rotation < 360)).all()
    # each solid stands on the ground: centre height = radius, or half side (size / sqrt 2) for cubes
    half = torch.where(b["shape"][:, 1:][present] == 0, b["scale"][:, 1:][present] / math.sqrt(2),
                       b["scale"][:, 1:][present])
    assert torch.allclose(pos[:, 2], half)
    # absent objects: -1 ids, zeros
    absent = ~present
    assert not b["visible"][:, 1:][absent].any() and (b["material"][:, 1:][absent] == -1).all()
    for k in ("scale", "x", "y", "rotation", "color", "position"):
        assert (b[k][:, 1:][absent] == 0).all()
    assert data.make_synthetic("clevr-lite", "test", resolution=128).get_batch([0])["image"].shape == (1, 3, 128, 128)


def test_determinism_and_streams():
    ds = data.make_synthetic("clevr-lite", "train", seed=3)
    a = ds.get_batch([5, 100, 7])
    c = ds.get_batch([999_999, 7, 42, 5])
    items = [ds[i] for i in (5, 100, 7)]
    for k in a:
        assert torch.equal(a[k][0], c[k][3]) and torch.equal(a[k][2], c[k][1])
        assert torch.equal(a[k], torch.stack([it[k] for it in items]))  # a batch equals its images
    again = data.make_synthetic("clevr-lite", "train", seed=3).get_batch([5, 100, 7])
    assert all(torch.equal(a[k], again[k]) for k in a)
    assert not torch.equal(a["image"][0], a["image"][2])  # different i
    for other in (data.make_synthetic("clevr-lite", "val", seed=3), data.make_synthetic("clevr-lite", "train", seed=4)):
        assert not torch.equal(a["image"], other.get_batch([5, 100, 7])["image"])  # other split, other seed
    imgs = batch_of(64)["image"].reshape(64, -1)
    assert torch.unique(imgs, dim=0).shape[0] == 64


@pytest.mark.parametrize("res", [64, 40])
def test_mask_is_first_hit_of_independent_ray_cast(res):
    """At every id-boundary pixel and at random ones, the mask names the object an independent
    ray cast meets first (0 where it meets none): exact first-hit masks, occlusion included."""
    b = batch_of(12, split="test", resolution=res)
    gen = torch.Generator().manual_seed(0)
    checked = occluding = 0
    for i in range(12):
        objs = objects(b, i)
        rows, cols = sample_pixels(b["mask"][i], 60, gen)
        for r, c in zip(rows, cols):
            hits = cast(objs, *camera_ray(r, c, res))
            assert int(b["mask"][i, r, c]) == (hits[0][1] if hits else 0), (i, r, c, hits)
            checked += 1
            occluding += len(hits) > 1
    assert checked > 1000 and occluding > 10  # occlusions were exercised


def test_mask_equals_independent_ray_cast_at_every_pixel():
    """At 20 px, the whole mask equals the independent ray cast pixel for pixel: the ids
    partition the image into the ground and each object's visible surface, nothing else."""
    res = 20
    b = batch_of(6, split="val", resolution=res)
    for i in range(6):
        objs = objects(b, i)
        expected = torch.zeros(res, res, dtype=torch.int64)
        for r in range(res):
            for c in range(res):
                hits = cast(objs, *camera_ray(r, c, res))
                expected[r, c] = hits[0][1] if hits else 0
        assert torch.equal(b["mask"][i], expected), i
        assert len(expected.unique()) > 2  # the ground and at least two objects were checked


def project(p, res):
    """(row, col) of the pixel that sees world point p."""
    f = unit(tuple(-c for c in CAMERA))
    right = unit(cross(f, (0.0, 0.0, 1.0)))
    down, v = cross(f, right), sub(p, CAMERA)
    top, left, side = CROP
    col = (FOCAL * dot(v, right) / dot(v, f) + 160 - left) * res / side
    row = (FOCAL * dot(v, down) / dot(v, f) + 120 - top) * res / side
    return int(row), int(col)


def test_nearer_object_hides_farther_whatever_the_drawing_order():
    """Two large spheres on the camera's line of sight to the far one's centre: the near one
    covers that pixel, whichever of the two was drawn first."""
    cam = data._clevr_camera(64, torch.device("cpu"))
    far = torch.tensor([-1.5, 1.5])
    near = far + 0.13 * (torch.tensor(CAMERA[:2]) - far)  # 1.7 apart (no contact); the line of sight
    row, col = project((float(far[0]), float(far[1]), 0.7), 64)  # passes 0.57 above the near centre
    for first, second, near_id in ((near, far, 1), (far, near, 2)):
        scene = {"present": torch.tensor([[True, True, False, False, False, False]]),
                 "shape": torch.tensor([[1, 1, 0, 0, 0, 0]]), "size": torch.full((1, 6), 0.7),
                 "half": torch.full((1, 6), 0.7), "cos": torch.ones(1, 6), "sin": torch.zeros(1, 6),
                 "pos": torch.cat([torch.stack([first, second])[None], torch.zeros(1, 4, 2)], 1)}
        mask = (data._clevr_depth(scene, cam) & 7).reshape(64, 64)
        assert int(mask[row, col]) == near_id
        assert (mask == 3 - near_id).sum() > 20  # the far sphere still shows around the near one


def test_shadows_match_independent_shadow_rays():
    """A ground pixel is darker than the same pixel unshadowed exactly where a ray from its
    ground point towards the sun meets an object."""
    b = batch_of(48, split="val")
    ground = b["mask"] == 0  # (B, H, W)
    lum = b["image"].sum(1)  # (B, H, W)
    lit = torch.where(ground, lum, 0).amax(0)  # (H, W) brightest ground value seen at each pixel
    sun = unit(SUN)
    # ground pixels within 3 px of an object (where shadows fall) and every 7th pixel elsewhere
    near = torch.nn.functional.max_pool2d((~ground[:8, None]).float(), 7, 1, 3)[:, 0] > 0
    near[:, ::7, ::7] = True
    dark_seen = checked = 0
    for i in range(8):
        objs = objects(b, i)
        for r, c in (near[i] & ground[i]).nonzero().tolist():
            if ground[:, r, c].sum() < 8:  # too few views of this pixel's ground to know it lit
                continue
            o, d = camera_ray(r, c, 64)
            t = -o[2] / d[2]
            g = tuple(oi + t * di for oi, di in zip(o, d))  # the ground point this pixel sees
            shadowed = bool(cast(objs, g, sun))
            dark = bool(lum[i, r, c] < 0.9 * lit[r, c])
            assert dark == shadowed, (i, r, c)
            dark_seen += dark
            checked += 1
    assert checked > 1500 and dark_seen > 100


def hue(rgb):
    """Hue angle (radians) of RGB rows (N, 3)."""
    r, g, bl = rgb.unbind(-1)
    return torch.atan2(math.sqrt(3) * (g - bl), 2 * r - g - bl)


def test_per_object_truth_aligned_with_mask_ids():
    """For every visible object, the pixels its mask id names have its colour (the hue of their
    mean, or grey for gray objects) and are centred near its projected position."""
    b = batch_of(200, split="val")
    B, E = b["shape"].shape
    rows, cols = torch.meshgrid(torch.arange(64) + 0.5, torch.arange(64) + 0.5, indexing="ij")
    errors, hue_ok, n = [], 0, 0
    for i in range(B):
        for e in range(1, E):
            if not b["visible"][i, e]:
                continue
            m = b["mask"][i] == e
            mean = b["image"][i][:, m].mean(1)  # (3,)
            truth = b["color"][i, e]
            if truth.max() - truth.min() < 1e-6:  # gray: low saturation
                hue_ok += bool((mean.max() - mean.min()) / mean.max() < 0.25)
            else:
                dh = (hue(mean[None]) - hue(truth[None])).abs().item()
                hue_ok += min(dh, 2 * math.pi - dh) < 0.35
            n += 1
            errors.append(math.hypot(cols[m].mean() / 64 - b["x"][i, e], rows[m].mean() / 64 - b["y"][i, e]) * 64)
    errors = torch.tensor(errors)
    assert hue_ok == n
    assert errors.median() < 0.5 and (errors < 3).float().mean() > 0.97  # pixels; occlusion moves a centroid


def test_visible_flags_and_min_area():
    b = batch_of(200)
    counts = (b["mask"][:, None] == torch.arange(7)[None, :, None, None]).sum((2, 3))  # (B, 7)
    present = b["shape"] >= 0
    expected = present & (counts >= 5)
    expected[:, 0] = True
    assert torch.equal(b["visible"], expected)
    assert (counts[:, 1:][~present[:, 1:]] == 0).all()
    # CLEVR's 200 px of 320x240 is ~22 px here: almost every object shows at least that much
    shown = counts[:, 1:][present[:, 1:]]
    assert (shown >= 200 * (64 / 192) ** 2).float().mean() > 0.99


def test_plain_dataloader_and_make_loader():
    ds = data.make_synthetic("clevr-lite", "train", size=24)
    plain = next(iter(torch.utils.data.DataLoader(ds, batch_size=6)))  # default collate
    fast = next(iter(data.make_loader(ds, 6, shuffle=False)))
    whole = ds.get_batch(list(range(6)))
    for k in whole:
        assert torch.equal(plain[k], whole[k]) and torch.equal(fast[k], whole[k])
    shuffled = next(iter(data.make_loader(ds, 6, shuffle=True, seed=0)))
    assert shuffled["image"].shape == (6, 3, 64, 64)


def test_bad_requests_raise_data_error():
    with pytest.raises(data.DataError, match="option"):
        data.make_dataset("clevr-lite", "train", colour="red")
    with pytest.raises(data.DataError):
        data.make_synthetic("clevr-lite", "train", resolution=2)
    with pytest.raises(IndexError):
        data.make_synthetic("clevr-lite", "val", size=10)[10]


@pytest.mark.parametrize("model", ["monet", "iodine", "slot_attention", "dinosaur", "vit_mae_ocl"])
def test_models_take_clevr6_settings_for_clevr_lite(model):
    """Each model file resolves --data clevr-lite through its own DATA_DEFAULTS row (not by
    the substring "clevr"): CLEVR6's K = 7 (6 objects and the ground) and, but for DINOSAUR,
    the 128 px of their CLEVR6 rows."""
    mod = importlib.import_module(model)
    assert "clevr-lite" in mod.DATA_DEFAULTS
    args = mod.parse_args(["--data", "clevr-lite"])
    assert args.num_slots == 7
    if model != "dinosaur":  # DINOSAUR's input size is its ViT's (the preset), not the data's
        assert args.resolution == 128
    if model == "slot_attention":
        assert args.decoder == "clevr"
