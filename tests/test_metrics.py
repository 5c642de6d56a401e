"""Tests for metrics.py: cross-checks against slow, independent pair-counting / brute-force references."""

import itertools
import math

import numpy as np
import pytest
import torch

import metrics


# --- Slow references (pure python, one image at a time)

def ref_ari(labels_true, labels_pred):
    """ARI by explicit pair counting with math.comb (the textbook Hubert-Arabie formula, sklearn's special case)."""
    n = len(labels_true)
    if n == 0:
        return float("nan")
    pairs = {}
    for t, p in zip(labels_true, labels_pred):
        pairs[(t, p)] = pairs.get((t, p), 0) + 1
    rows, cols = {}, {}
    for (t, p), c in pairs.items():
        rows[t] = rows.get(t, 0) + c
        cols[p] = cols.get(p, 0) + c
    index = sum(math.comb(c, 2) for c in pairs.values())
    sa = sum(math.comb(c, 2) for c in rows.values())
    sb = sum(math.comb(c, 2) for c in cols.values())
    total = math.comb(n, 2)
    if total == 0:
        return 1.0
    expected = sa * sb / total
    maximum = (sa + sb) / 2
    if maximum == expected:
        return 1.0
    return (index - expected) / (maximum - expected)


def ref_image(true_mask, pred_masks, b, min_id):
    t = true_mask[b].flatten().tolist()
    p = pred_masks[b].argmax(0).flatten().tolist()
    keep = [i for i, v in enumerate(t) if v >= min_id]
    return [t[i] for i in keep], [p[i] for i in keep]


def ref_miou(lt, lp, K):
    """Brute force over all permutations (tiny K): ClevrTex mIoU."""
    truths = sorted(set(lt))
    g = max(len(truths), K)
    segs_t = [set(i for i, v in enumerate(lt) if v == u) for u in truths] + [set()] * (g - len(truths))
    segs_p = [set(i for i, v in enumerate(lp) if v == k) for k in range(K)] + [set()] * (g - K)
    best = None
    for perm in itertools.permutations(range(g)):
        s, cnt = 0.0, 0
        for i, j in enumerate(perm):
            union = len(segs_t[i] | segs_p[j])
            if union:
                s += len(segs_t[i] & segs_p[j]) / union
                cnt += 1
        if best is None or s > best[0] + 1e-12:
            best = (s, cnt)
    return best[0] / best[1] if best[1] else float("nan")


def ref_mbo(lt, lp, K, num_background):
    objs = sorted(u for u in set(lt) if u >= num_background)
    if not objs:
        return float("nan")
    vals = []
    for u in objs:
        st = set(i for i, v in enumerate(lt) if v == u)
        vals.append(max(len(st & sp) / len(st | sp) for sp in
                        [set(i for i, v in enumerate(lp) if v == k) for k in range(K)]))
    return sum(vals) / len(vals)


def random_case(seed, B=6, H=9, W=7, K=4, ids=5, ignore=0.1):
    g = torch.Generator().manual_seed(seed)
    true = torch.randint(0, ids, (B, H, W), generator=g)
    true[torch.rand(B, H, W, generator=g) < ignore] = -1
    pred = torch.rand(B, K, H, W, generator=g)
    return true, pred


def assert_close_nan(a, b):
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    assert torch.equal(torch.isnan(a), torch.isnan(b)), (a, b)
    assert torch.allclose(a[~torch.isnan(a)], b[~torch.isnan(b)], atol=1e-10), (a, b)


def degenerate_cases():
    """Images where the ARI denominator or the kept set is degenerate."""
    B, H, W, K = 7, 4, 5, 3
    true = torch.zeros(B, H, W, dtype=torch.long)
    pred = torch.zeros(B, K, H, W)
    pred[:, 0] = 1  # everything in slot 0
    true[1, :, 2:] = 3  # two truth clusters, one predicted
    pred[2, 1, :, :2] = 2  # one truth cluster, two predicted
    true[3] = -1  # all ignored
    true[4] = -1
    true[4, 0, 0] = 2  # a single kept pixel
    true[5] = torch.arange(H * W).view(H, W) % 2 + 1  # no background at all
    true[6, 0, :2] = 1  # a single foreground pixel pair, rest background
    pred[6, 2, 0, :2] = 5  # the object lies wholly in slot 2
    return true, pred


# --- ARI / FG-ARI

@pytest.mark.parametrize("seed", range(4))
def test_ari_matches_pair_counting_reference(seed):
    true, pred = random_case(seed, ids=3 + seed, ignore=0.2 * (seed % 2))
    got_all, got_fg = metrics.ari(true, pred), metrics.fg_ari(true, pred, num_background=1)
    for b in range(true.shape[0]):
        assert got_all[b].item() == pytest.approx(ref_ari(*ref_image(true, pred, b, 0)), abs=1e-12)
        assert got_fg[b].item() == pytest.approx(ref_ari(*ref_image(true, pred, b, 1)), abs=1e-12, nan_ok=True)
    assert got_all.dtype == torch.float64 and got_all.shape == (true.shape[0],)


# sklearn.metrics.adjusted_rand_score(truth, prediction) on these label lists, computed once (sklearn 1.x) and
# written down, so the known values need no sklearn at test time; the last case also drops background id 0.
SKLEARN_ARI = [
    ([0, 0, 1, 1, 2, 2, 2, 3], [1, 1, 0, 0, 2, 2, 3, 3], 0.6037735849056604, None),
    ([0, 0, 0, 1, 1, 1, 2, 2, 2], [0, 0, 1, 1, 1, 2, 2, 2, 2], 0.35714285714285715, None),
    ([0, 1, 2, 3, 0, 1, 2, 3, 0], [0, 0, 0, 0, 1, 1, 1, 1, 2], -0.2857142857142857, None),
    ([1, 1, 1, 1, 2, 2, 3, 3, 3, 3, 0, 0], [2, 2, 0, 0, 1, 1, 1, 1, 3, 3, 3, 0], 0.20874471086036672,
     0.2857142857142857),
]


@pytest.mark.parametrize("truth, prediction, ari, fg_ari", SKLEARN_ARI)
def test_ari_and_fg_ari_equal_known_sklearn_values(truth, prediction, ari, fg_ari):
    true = torch.tensor(truth).view(1, 1, -1)  # (B, H, W): one image, one row
    pred = torch.nn.functional.one_hot(torch.tensor(prediction), 4).T.view(1, 4, 1, -1).float()  # (B, K, H, W)
    assert metrics.ari(true, pred)[0].item() == pytest.approx(ari, abs=1e-12)
    if fg_ari is not None:
        assert metrics.fg_ari(true, pred, num_background=1)[0].item() == pytest.approx(fg_ari, abs=1e-12)


def test_ari_degenerate_cases():
    true, pred = degenerate_cases()
    got = metrics.ari(true, pred)
    fg = metrics.fg_ari(true, pred, num_background=1)
    for b in range(true.shape[0]):
        assert_close_nan(got[b], ref_ari(*ref_image(true, pred, b, 0)))
        assert_close_nan(fg[b], ref_ari(*ref_image(true, pred, b, 1)))
    assert got[0] == 1.0  # one cluster on both sides: zero denominator -> 1
    assert got[1] == 0.0 and got[2] == 0.0  # one side constant, the other not: ARI 0 (sklearn)
    assert torch.isnan(got[3])  # nothing kept
    assert got[4] == 1.0  # a single pixel
    assert torch.isnan(fg[0])  # no foreground pixel
    assert fg[6] == 1.0  # one fg object fully inside one slot


def test_perfect_and_permuted_segmentation_scores_one():
    g = torch.Generator().manual_seed(0)
    true = torch.randint(0, 5, (3, 16, 16), generator=g)
    onehot = torch.nn.functional.one_hot(true, 6).permute(0, 3, 1, 2).float()  # (B, K, H, W)
    perm = onehot[:, [3, 5, 0, 4, 1, 2]]
    for p in (onehot, perm):
        out = metrics.segmentation_metrics(true, p, num_background=1)
        for k in ("ari", "fg_ari", "miou", "mbo"):
            assert torch.allclose(out[k], torch.ones(3, dtype=torch.float64)), k


def test_large_and_sparse_truth_ids_remapped():
    true, pred = random_case(7, ids=6)
    big = torch.where(true >= 0, true * 1_000_003 + 2, true)  # huge ids take the torch.unique path
    sparse = torch.where(true >= 0, true * 90, true)  # COCO-like ids take the lookup-table path
    base = metrics.ari(true, pred)
    assert torch.allclose(metrics.ari(big, pred), base)
    assert torch.allclose(metrics.ari(sparse, pred), base)
    fg = metrics.fg_ari(true, pred, num_background=1)
    assert_close_nan(metrics.fg_ari(big, pred, num_background=1_000_005), fg)  # ids 0 -> 2, 1 -> 1000005


def test_hard_id_map_equals_argmax_of_soft_masks():
    true, pred = random_case(3)
    assert torch.equal(metrics.ari(true, pred), metrics.ari(true, pred.argmax(1)))


def test_num_background_drops_ids_in_ari():
    true, pred = random_case(5, ids=6)
    assert_close_nan(metrics.ari(true, pred, num_background=4), metrics.fg_ari(true, pred, num_background=4))
    for b in range(true.shape[0]):
        assert_close_nan(metrics.ari(true, pred, num_background=4)[b], ref_ari(*ref_image(true, pred, b, 4)))


def test_shape_mismatch_raises():
    with pytest.raises(ValueError):
        metrics.ari(torch.zeros(2, 4, 4, dtype=torch.long), torch.zeros(2, 3, 4, 5))


# --- mIoU / mBO

@pytest.mark.parametrize("seed", range(3))
def test_miou_and_mbo_match_brute_force(seed):
    K = 3 + seed % 2
    true, pred = random_case(10 + seed, B=5, H=6, W=5, K=K, ids=3 + seed)
    got_miou = metrics.miou(true, pred)
    got_mbo = metrics.mbo(true, pred, num_background=1)
    for b in range(true.shape[0]):
        lt, lp = ref_image(true, pred, b, 0)
        assert_close_nan(got_miou[b], ref_miou(lt, lp, K))
        assert_close_nan(got_mbo[b], ref_mbo(lt, lp, K, 1))


def test_miou_and_mbo_known_values():
    # 1 x 4 image: truth [0, 0, 1, 1]; prediction [a, a, a, b]
    true = torch.tensor([[[0, 0, 1, 1]]])
    pred = torch.nn.functional.one_hot(torch.tensor([[[0, 0, 0, 1]]]), 3).permute(0, 3, 1, 2).float()
    # Matching: bg<->a IoU 2/3, obj<->b IoU 1/2; the third (empty) slot pairs with nothing non-empty.
    assert metrics.miou(true, pred).item() == pytest.approx((2 / 3 + 1 / 2) / 2)
    assert metrics.mbo(true, pred).item() == pytest.approx(1 / 2)
    # Over-segmentation costs in mIoU: truth one segment, prediction two -> (1/2 + 0) / 2.
    pred2 = torch.nn.functional.one_hot(torch.tensor([[[0, 0, 1, 1]]]), 2).permute(0, 3, 1, 2).float()
    assert metrics.miou(torch.zeros(1, 1, 4, dtype=torch.long), pred2).item() == pytest.approx(0.25)
    assert torch.isnan(metrics.mbo(torch.zeros(1, 1, 4, dtype=torch.long), pred2)).all()  # no fg object


@pytest.mark.parametrize("seed", range(3))
def test_mbo_class_matches_merged_segments_brute_force(seed):
    true, pred = random_case(40 + seed, B=5, H=6, W=5, K=3, ids=6)
    g = torch.Generator().manual_seed(seed)
    category = torch.randint(0, 3, (5, 6), generator=g)  # three classes over ids 1..5; id 0 is background
    got = metrics.mbo_class(true, pred, category, num_background=1)
    for b in range(5):
        lt, lp = ref_image(true, pred, b, 0)
        merged = [v if v < 1 else 100 + int(category[b, v]) for v in lt]  # one segment per class
        assert_close_nan(got[b], ref_mbo(merged, lp, 3, 1))


def test_mbo_class_known_values():
    # 1 x 6 image: background, two objects of class 7, one of class 2, an ignored pixel; slots [a, a, a, b, b, a]
    true = torch.tensor([[[0, 1, 2, 3, 3, -1]]])
    pred = torch.nn.functional.one_hot(torch.tensor([[[0, 0, 0, 1, 1, 0]]]), 2).permute(0, 3, 1, 2).float()
    category = torch.tensor([[0, 7, 7, 2]])
    # instances: ids 1 and 2 each best IoU 1/3 with slot a (3 pixels), id 3 IoU 1 -> (1/3 + 1/3 + 1) / 3
    assert metrics.mbo(true, pred).item() == pytest.approx(5 / 9)
    # classes: {1, 2} (class 7) IoU 2/3 with slot a, class 2 IoU 1 -> 5/6
    assert metrics.mbo_class(true, pred, category).item() == pytest.approx(5 / 6)
    # a class mask (the category per pixel, overlaps given to the higher id): the same segments
    assert metrics.mbo_class(torch.tensor([[[0, 7, 7, 2, 2, -1]]]), pred).item() == pytest.approx(5 / 6)
    assert torch.isnan(metrics.mbo_class(torch.zeros(1, 1, 6, dtype=torch.long), pred, category)).all()
    with pytest.raises(ValueError, match="category"):
        metrics.mbo_class(true, pred, category[:, :3])


def test_segmentation_metrics_equals_individual_functions():
    true, pred = degenerate_cases()
    t2, p2 = random_case(21, B=7, H=4, W=5, K=3)
    true, pred = torch.cat([true, t2]), torch.cat([pred, p2])
    out = metrics.segmentation_metrics(true, pred, num_background=1)
    assert_close_nan(out["ari"], metrics.ari(true, pred, num_background=0))
    assert_close_nan(out["fg_ari"], metrics.fg_ari(true, pred, num_background=1))
    assert_close_nan(out["miou"], metrics.miou(true, pred, num_background=0))
    assert_close_nan(out["mbo"], metrics.mbo(true, pred, num_background=1))


def test_average_metrics_nanmean_and_skipped():
    out = metrics.average_metrics({"fg_ari": torch.tensor([1.0, float("nan"), 0.5]), "ari": torch.tensor([0.2, 0.4])})
    assert out == {"fg_ari": 0.75, "ari": pytest.approx(0.3), "fg_ari_skipped": 1}


# --- Feature probe

FAST_PROBE = dict(hidden=64, lr=3e-3, steps=300, val_size=60)  # the authors' protocol, shortened for tiny sets

def probe_data(n, seed, noise=False, K=4, E=3, D=24):
    """Slots that linearly encode each visible object's properties, in a random slot order; the spare slots and
    invisible objects carry nothing."""
    g = torch.Generator().manual_seed(seed)
    shape = torch.randint(0, 3, (n, E), generator=g)
    color = torch.rand(n, E, 3, generator=g)
    x = torch.rand(n, E, generator=g)
    visible = torch.rand(n, E, generator=g) < 0.85
    feats = torch.cat([torch.nn.functional.one_hot(shape, 3).float(), color, x[..., None]], -1)  # (n, E, 7)
    proj = torch.randn(7, D, generator=torch.Generator().manual_seed(99))
    slots = 0.3 * torch.randn(n, K, D, generator=g)
    obj = feats @ proj + 0.05 * torch.randn(n, E, D, generator=g)
    order = torch.argsort(torch.rand(n, K, generator=g), dim=1)[:, :E]  # slot of each object
    for e in range(E):
        sel = visible[:, e]
        slots[sel, order[sel, e]] = obj[sel, e]
    if noise:
        slots = torch.randn(n, K, D, generator=g)
    return slots, {"shape": shape, "color": color, "x": x, "visible": visible}


def test_feature_probe_recovers_linear_properties():
    tr_s, tr_t = probe_data(600, 0)
    te_s, te_t = probe_data(200, 1)
    out = metrics.feature_probe(tr_s, tr_t, te_s, te_t, **FAST_PROBE)
    assert set(out) == {"shape_acc", "color_r2", "x_r2"}
    assert out["shape_acc"] > 0.9
    assert out["color_r2"] > 0.9 and out["x_r2"] > 0.9


def test_feature_probe_on_noise_is_at_chance():
    # One slot, one object: no matching freedom, so noise must score at chance. (With spare slots, loss-based
    # matching lets a probe pick whichever slot guessed closest, which lifts noise above chance: K=6, E=3 gives
    # x R^2 ~0.5; see the feature_probe docstring.)
    tr_s, tr_t = probe_data(600, 2, noise=True, K=1, E=1)
    te_s, te_t = probe_data(1000, 3, noise=True, K=1, E=1)
    out = metrics.feature_probe(tr_s, tr_t, te_s, te_t, **FAST_PROBE)
    assert out["shape_acc"] < 1 / 3 + 0.08  # ~850 test objects: the standard error of chance is ~0.016
    assert out["color_r2"] < 0.05 and out["x_r2"] < 0.05


def test_feature_probe_ignores_invisible_objects():
    # Invisible objects carry garbage targets; they must not be matched, scored or used for the statistics.
    tr_s, tr_t = probe_data(400, 4)
    te_s, te_t = probe_data(150, 5)
    for t in (tr_t, te_t):
        t["x"] = torch.where(t["visible"], t["x"], torch.full_like(t["x"], 1e6))
        t["shape"] = torch.where(t["visible"], t["shape"], torch.full_like(t["shape"], 50))
    out = metrics.feature_probe(tr_s, tr_t, te_s, te_t, **FAST_PROBE)
    assert out["shape_acc"] > 0.9 and out["x_r2"] > 0.9 and out["color_r2"] > 0.9


def test_feature_probe_rejects_missing_visible():
    tr_s, tr_t = probe_data(20, 6)
    del tr_t["visible"]
    with pytest.raises(ValueError):
        metrics.feature_probe(tr_s, tr_t, tr_s, tr_t, steps=1, val_size=2)


def test_feature_probe_unmatched_visible_object_is_a_miss():
    # One slot, two visible objects, the slot encodes object 0 exactly: one object per image must go unmatched and
    # count as a miss (wrong class, predicted at the train mean). Dropping it instead would report ~1.0.
    def make(n, seed):
        s, t = probe_data(n, seed, K=2, E=2)
        t["visible"][:] = True
        feats = torch.cat([torch.nn.functional.one_hot(t["shape"][:, 0], 3).float(), t["color"][:, 0],
                           t["x"][:, :1]], -1)  # (n, 7)
        return (feats @ torch.randn(7, 24, generator=torch.Generator().manual_seed(7)))[:, None], t
    tr_s, tr_t = make(600, 10)
    te_s, te_t = make(400, 11)
    out = metrics.feature_probe(tr_s, tr_t, te_s, te_t, **FAST_PROBE)
    assert out["shape_acc"] == pytest.approx(0.5, abs=0.04)  # 400 of 800 objects matched and right
    assert out["x_r2"] == pytest.approx(0.5, abs=0.08)  # half exact, half at the mean (R^2 ~ 0 for those)


def test_feature_probe_r2_is_averaged_over_channels():
    # Colour channel 0 (std 1) is encoded, channels 1 and 2 (std 0.1) are not: sklearn's per-channel average gives
    # (1 + 0 + 0) / 3; R^2 pooled over channels would give ~0.98.
    def make(n, seed):
        g = torch.Generator().manual_seed(seed)
        color = torch.randn(n, 1, 3, generator=g) * torch.tensor([1.0, 0.1, 0.1])
        slots = color[..., :1] * torch.randn(1, 1, 16, generator=torch.Generator().manual_seed(3))  # (n, 1, 16)
        return slots, {"color": color, "visible": torch.ones(n, 1, dtype=torch.bool)}
    tr_s, tr_t = make(600, 12)
    te_s, te_t = make(500, 13)
    out = metrics.feature_probe(tr_s, tr_t, te_s, te_t, **FAST_PROBE)
    assert out["color_r2"] == pytest.approx(1 / 3, abs=0.05)


def test_feature_probe_stops_early_and_follows_the_schedule(monkeypatch):
    # lr 1e-3 * 0.5^(step / 2000) at every step; with nothing to learn the validation loss stalls, so training
    # stops at the first epoch end after three evaluations without an improvement of 0.01.
    seen = []
    real_step = torch.optim.Adam.step
    monkeypatch.setattr(torch.optim.Adam, "step", lambda self, *a, **k: (seen.append(self.param_groups[0]["lr"]),
                                                                         real_step(self, *a, **k))[1])
    tr_s, tr_t = probe_data(200, 14, noise=True, K=1, E=1)
    metrics.feature_probe(tr_s, tr_t, tr_s, tr_t, hidden=8, steps=6000, eval_every=5, val_size=40, batch_size=32)
    assert seen == pytest.approx([1e-3 * 0.5 ** (i / 2000) for i in range(1, len(seen) + 1)])
    assert 20 <= len(seen) < 200 and len(seen) % 5 == 0  # stopped long before 6000 steps, at an epoch end
