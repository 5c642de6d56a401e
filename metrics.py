"""Segmentation metrics and the slot feature probe shared by every model file.

Conventions (see DESIGN.md, "Metrics contract"):

- `true_mask` is int64 (B, H, W): the entity id of every pixel; ids below the dataset's `num_background`
  are background, -1 means "ignore" (unlabelled or overlapping pixels) and never counts.
- `pred_masks` is (B, K, H, W), soft or hard; every metric uses the hard assignment argmax_k (ties go to the
  lowest slot index). An int64 (B, H, W) map of slot ids is accepted as well.
- Every function returns one float64 value per image, shape (B,); the caller averages (`average_metrics`).

All segmentation metrics come from one per-image contingency table n[b, i, j] = number of kept pixels of image
b with true id i and predicted slot j, built with a single `bincount` over the batch (no loop over pixels or
images). Truth ids are remapped to compact indices over the batch first, so large ids (COCO) cost nothing.
"""

import numpy as np
import scipy.optimize
import torch
import torch.nn as nn
import torch.nn.functional as F

# Truth ids up to this value are remapped with a lookup table (O(pixels)); larger ones go through torch.unique.
_LUT_MAX_ID = 1 << 16


# --- Contingency table

def _pred_ids(pred_masks, true_mask):
    """Hard slot id per pixel (B, H, W) and the number of slots K."""
    if pred_masks.dim() == true_mask.dim():  # already a map of slot ids
        pred = pred_masks.long()
        return pred, (int(pred.max().item()) + 1 if pred.numel() else 1)
    if pred_masks.dim() != true_mask.dim() + 1 or pred_masks.shape[2:] != true_mask.shape[1:] \
            or pred_masks.shape[0] != true_mask.shape[0]:
        raise ValueError(f"pred_masks {tuple(pred_masks.shape)} does not match true_mask "
                         f"{tuple(true_mask.shape)}; expected (B, K, H, W) and (B, H, W)")
    # max(dim).indices is the first maximum like argmax, and much faster than argmax over a strided dim on CPU.
    return pred_masks.max(dim=1).indices, pred_masks.shape[1]


def _compact_ids(labels):
    """Map the ids >= 0 in `labels` (others are -1) to 0..U-1, sorted by id; -1 stays -1. Returns (ids, values (U,))."""
    top = int(labels.max().item()) if labels.numel() else -1
    if top < 0:
        return torch.full_like(labels, -1), labels.new_zeros(0)
    if top < _LUT_MAX_ID:
        # Lookup table over id + 1 (slot 0 is "dropped"): cumsum of the present ids gives each its compact index.
        present = torch.bincount((labels + 1).flatten(), minlength=top + 2) > 0  # (top + 2,)
        present[0] = False
        lut = torch.cumsum(present, 0) - 1
        lut[0] = -1
        return lut[labels + 1], torch.nonzero(present[1:]).flatten()
    valid = labels >= 0
    values, inverse = torch.unique(labels[valid], sorted=True, return_inverse=True)
    ids = torch.full_like(labels, -1)
    ids[valid] = inverse
    return ids, values


def contingency(true_mask, pred_masks, min_id=0):
    """Per-image contingency table of the pixels whose truth id is >= max(min_id, 0).

    Returns (table, values): table float64 (B, U, K) with table[b, i, j] = #pixels of image b with true id
    values[i] and predicted slot j; values int64 (U,) are the truth ids present in the batch, sorted.
    """
    pred, K = _pred_ids(pred_masks, true_mask)
    labels = torch.where(true_mask >= min_id, true_mask.long(), true_mask.new_tensor(-1))
    ids, values = _compact_ids(labels)
    B, U = true_mask.shape[0], max(len(values), 1)
    # Flat bin of every pixel: b * U * K + i * K + j; dropped pixels go to one extra bin that is cut off.
    offset = torch.arange(B, device=ids.device).view(B, *[1] * (ids.dim() - 1)) * (U * K)
    flat = torch.where(ids >= 0, offset + ids * K + pred, torch.full_like(ids, B * U * K))
    table = torch.bincount(flat.flatten(), minlength=B * U * K + 1)[:-1]
    return table.view(B, U, K).double(), values  # (B, U, K)


# --- Scores from a contingency table

def _comb2(n):
    return n * (n - 1) / 2


def _ari_from_table(table):
    """Adjusted Rand index per image from (B, U, K) counts (Hubert & Arabie 1985, as sklearn computes it).

    ARI = (S - A B / P) / ((A + B) / 2 - A B / P) with S = sum_ij C(n_ij, 2), A = sum_i C(a_i, 2),
    B = sum_j C(b_j, 2), P = C(n, 2). Multiplied through by P so that n <= 1 needs no special case.
    Zero denominator (one cluster on both sides, or every pixel its own cluster) -> 1.0; no pixel -> NaN.
    """
    n = table.sum(dim=(1, 2))  # (B,)
    s = _comb2(table).sum(dim=(1, 2))
    a = _comb2(table.sum(dim=2)).sum(dim=1)  # rows: truth
    b = _comb2(table.sum(dim=1)).sum(dim=1)  # columns: prediction
    p = _comb2(n)
    num = p * s - a * b
    den = p * (a + b) / 2 - a * b
    ari = torch.where(den == 0, torch.ones_like(num), num / torch.where(den == 0, torch.ones_like(den), den))
    return torch.where(n > 0, ari, torch.full_like(ari, float("nan")))


def _iou_from_table(table):
    """IoU (B, U, K) of every truth segment with every predicted segment, and the row/column sizes."""
    rows = table.sum(dim=2)  # (B, U) truth segment sizes
    cols = table.sum(dim=1)  # (B, K) predicted segment sizes
    union = rows[:, :, None] + cols[:, None, :] - table  # (B, U, K)
    return table / union.clamp_min(1), rows, cols


def _miou_from_table(table):
    """ClevrTex mIoU: Hungarian matching on IoU over max(#truth, K) groups (the short side padded with empty
    segments); sum of matched IoUs / number of matched pairs where the truth or the prediction is non-empty."""
    iou, rows, cols = _iou_from_table(table)
    iou, rows, cols = iou.cpu().numpy(), rows.cpu().numpy(), cols.cpu().numpy()
    out = np.full(len(iou), np.nan)
    for b in range(len(iou)):  # scipy's matching is per image; the matrices are tiny
        present = rows[b] > 0  # truth segments absent from this image are empty: same as padding
        size_t, size_p = rows[b][present], cols[b]
        g = max(len(size_t), len(size_p))
        m = np.zeros((g, g))
        m[:len(size_t), :len(size_p)] = iou[b][present]
        r, c = scipy.optimize.linear_sum_assignment(m, maximize=True)
        t_full = np.zeros(g)
        t_full[:len(size_t)] = size_t
        p_full = np.zeros(g)
        p_full[:len(size_p)] = size_p
        counted = (t_full[r] > 0) | (p_full[c] > 0)
        if counted.any():
            out[b] = m[r, c].sum() / counted.sum()
    return torch.from_numpy(out)


def _mbo_from_table(table, fg_rows):
    """Mean over present foreground truth segments of the best IoU with any predicted segment; NaN if none."""
    iou, rows, _ = _iou_from_table(table)
    best = iou.max(dim=2).values  # (B, U)
    keep = (rows > 0) & fg_rows[None, :]
    total = (best * keep).sum(dim=1)
    count = keep.sum(dim=1)
    return torch.where(count > 0, total / count.clamp_min(1), torch.full_like(total, float("nan")))


# --- Public metrics

def ari(true_mask, pred_masks, num_background=0):
    """Adjusted Rand index per image (B,) of the hard assignment, on the pixels with label >= num_background.

    With the default num_background=0 these are all labelled pixels (the usual "ARI", background included);
    with num_background > 0 the background ids are dropped too, i.e. the same as `fg_ari`.
    Equal to sklearn.metrics.adjusted_rand_score on the kept pixels; zero denominator -> 1.0; an image with no
    kept pixel -> NaN.
    """
    table, _ = contingency(true_mask, pred_masks, min_id=max(num_background, 0))
    return _ari_from_table(table)


def fg_ari(true_mask, pred_masks, num_background=1):
    """Foreground ARI per image (B,): ARI on the pixels with label >= num_background (Greff et al. 2019).
    NaN for an image without a foreground pixel (the caller skips it; see `average_metrics`)."""
    return ari(true_mask, pred_masks, num_background=num_background)


def miou(true_mask, pred_masks, num_background=0):
    """Mean IoU per image (B,), ClevrTex convention (Karazija et al. 2021): the truth segments (background
    included with the default num_background=0; ids < num_background are dropped otherwise) and the K predicted
    argmax segments are matched one-to-one by the Hungarian algorithm maximising the summed IoU, the shorter side
    padded with empty segments; the score is the matched IoU sum divided by the number of matched pairs in which
    the truth or the prediction is non-empty (so spare non-empty slots cost). Ignored pixels (-1) are excluded
    from both sides. NaN if an image has no kept pixel."""
    table, _ = contingency(true_mask, pred_masks, min_id=max(num_background, 0))
    return _miou_from_table(table)


def mbo(true_mask, pred_masks, num_background=1):
    """Mean best overlap per image (B,) (DINOSAUR, Seitzer et al. 2022): for every foreground truth object present
    in the image (id >= num_background), the best IoU with any predicted argmax segment, averaged over the
    objects. Ignored pixels are excluded from both sides. NaN if the image has no foreground object."""
    table, values = contingency(true_mask, pred_masks)
    return _mbo_from_table(table, values >= num_background)


def mbo_class(mask, pred_masks, category=None, num_background=1):
    """Class-level mean best overlap per image (B,) (mBO^c of DINOSAUR, Seitzer et al. 2022; OCLF's
    segmentation_mask_abo): `mbo` over class segments, one per category present (all its objects merged).

    category None: `mask` is already a class mask, the category of every pixel (ids < num_background are
    background, -1 ignored), e.g. data.CocoDataset's class_mask, where overlapping objects give the pixel the
    higher category id (OCLF AddSegmentationMaskFromInstanceMask). category int64 (B, E): `mask` holds entity
    ids and category[b, i] >= 0 is the class of id i (E above every id; background entries are not read); a
    pixel the instance mask ignores (-1, e.g. an overlap) stays ignored. NaN if the image has no foreground.
    """
    if category is not None:
        if category.dim() != 2 or category.shape[0] != mask.shape[0] or (
                mask.numel() and int(mask.max()) >= category.shape[1]):
            raise ValueError(f"category {tuple(category.shape)} must be (B, E) with E above every id of the mask")
        cls = torch.gather(category.long().to(mask.device), 1, mask.clamp_min(0).flatten(1)).view_as(mask)
        mask = torch.where(mask >= num_background, num_background + cls, mask)  # classes above the background ids
    return mbo(mask, pred_masks, num_background)


def segmentation_metrics(true_mask, pred_masks, num_background):
    """All four metrics from one contingency table: dict of float64 (B,) tensors.

    ari: all labelled pixels, background included (the usual "ARI"); fg_ari: ids >= num_background;
    miou: background included (ClevrTex); mbo: foreground objects (DINOSAUR).
    """
    table, values = contingency(true_mask, pred_masks)
    fg_rows = values >= num_background  # (U,)
    return {
        "ari": _ari_from_table(table),
        "fg_ari": _ari_from_table(table * fg_rows[None, :, None]),
        "miou": _miou_from_table(table),
        "mbo": _mbo_from_table(table, fg_rows),
    }


def average_metrics(per_image):
    """nanmean of every (N,) tensor in `per_image` -> python floats, plus fg_ari_skipped = #NaN fg_ari images."""
    out = {k: float(torch.nanmean(v.double()).item()) if v.numel() else float("nan") for k, v in per_image.items()}
    if "fg_ari" in per_image:
        out["fg_ari_skipped"] = int(torch.isnan(per_image["fg_ari"]).sum().item())
    return out


# --- Feature probe

def _probe_pair_loss(out, targets, spec):
    """Per-pair loss (B, K, E): sum over properties of CE (categorical) or MSE over channels (continuous).

    out: (B, K, total outputs) MLP outputs; targets: dict of (B, E) or (B, E, C) (continuous ones standardised).
    """
    loss = 0
    for name, kind, start, size in spec:
        o = out[..., start:start + size]  # (B, K, size)
        if kind == "cat":
            logp = F.log_softmax(o, dim=-1)
            labels = targets[name].clamp(0, size - 1)  # unseen test classes: scored wrong via accuracy anyway
            idx = labels[:, None, :].expand(-1, o.shape[1], -1)  # (B, K, E)
            loss = loss - torch.gather(logp, 2, idx)
        else:
            y = targets[name].reshape(*targets[name].shape[:2], size)  # (B, E, C)
            loss = loss + ((o[:, :, None, :] - y[:, None, :, :]) ** 2).mean(-1)  # (B, K, E)
    return loss


def _hungarian(cost, visible):
    """Match slots to visible objects per image. cost (B, K, E), visible (B, E) -> index tensors (b, k, e)."""
    c = cost.detach().double().cpu().numpy()
    vis = visible.cpu().numpy()
    c = np.where(vis[:, None, :], c, 1e12)  # invisible objects are never preferred
    bs, ks, es = [], [], []
    for b in range(len(c)):  # scipy, per image (tiny K x E problems)
        r, col = scipy.optimize.linear_sum_assignment(c[b])
        ok = vis[b, col]
        bs.append(np.full(ok.sum(), b))
        ks.append(r[ok])
        es.append(col[ok])
    to = lambda a: torch.from_numpy(np.concatenate(a)).long().to(cost.device)
    return to(bs), to(ks), to(es)


def feature_probe(train_slots, train_targets, test_slots, test_targets, categorical=("shape",), hidden=256,
                  lr=1e-3, batch_size=64, steps=6000, decay_steps=2000, eval_every=250, min_delta=0.01, patience=3,
                  val_size=1000, seed=0, device="cpu"):
    """Property prediction from frozen slots (Dittadi et al. 2021, arXiv 2107.00637, as run by arXiv 2306.02577).

    The defaults are the authors' protocol (robert1003/slot-attention-disentanglement 1cbd774 feature_pred.py):
    MLP D -> 256, LeakyReLU -> all outputs; Adam, batch 64, `steps` 6000, lr 1e-3 * 0.5^(step / 2000);
    every 250 steps the loss on the `val_size` (1000) held-out train images is computed and training stops once
    it has improved by less than `min_delta` (0.01) at `patience` (3) evaluations in a row (checked at the end of
    an epoch, as the authors' loop does); the final weights are scored (no best-checkpoint selection). The caller passes 11k train images (10k fit + 1k val) and 2k test images.

    Outputs: logits for the categorical properties (classes = max train label + 1), values for the continuous
    ones (standardised with the train mean/std of the visible objects). For each image the slots are matched to
    the visible objects by the Hungarian algorithm on the per-pair loss L(k, e) = sum_props CE or MSE (mean over
    channels), and the MLP is trained on the matched pairs' mean loss.

    slots: (N, K, D); targets: dict of per-object (N, E) or (N, E, C) tensors plus `visible` bool (N, E)
    (background entities already dropped). Returns, on the test set with the same matching, {"<name>_acc"} for
    categorical properties and {"<name>_r2"} for continuous ones: R^2 = 1 - SSE/SST per channel around the test
    mean, averaged over channels (sklearn's r2_score default, as the authors score colour).

    Objects outnumbering the slots: a visible object left without a slot counts as a miss: a wrong class, and
    the train mean as its prediction (the authors' code drops it, which inflates the score when E > K).

    Caveat of the protocol (measured, not a bug): because the matching minimises the loss, a probe can pick for
    each object whichever slot's guess is closest, so spare slots (K > visible objects) lift the score of
    uninformative slots above chance (pure-noise slots, K=6, 3 objects: x R^2 0.5-0.6, shape acc ~0.6 for chance
    0.33). Compare against a noise or random-init baseline at the same K.
    """
    for slots, targets, split in ((train_slots, train_targets, "train"), (test_slots, test_targets, "test")):
        vis = targets.get("visible")
        if slots.dim() != 3 or vis is None or vis.dim() != 2 or vis.shape[0] != slots.shape[0]:
            raise ValueError(f"feature_probe: {split} slots {tuple(slots.shape)} / targets need slots (N, K, D) and "
                             f"a 'visible' (N, E) entry")
    names = [k for k in train_targets if k != "visible"]
    if not names or any(k not in test_targets for k in names):
        raise ValueError(f"feature_probe: train properties {names} must be non-empty and present in the test targets")
    n = train_slots.shape[0]
    if not 0 < val_size < n:
        raise ValueError(f"feature_probe: val_size={val_size} must be in [1, {n - 1}] for {n} train images")
    dev = torch.device(device)
    tr_vis, te_vis = train_targets["visible"].bool(), test_targets["visible"].bool()

    # Output layout and standardisation from the visible train objects.
    spec, stats, start = [], {}, 0
    for name in names:
        t = train_targets[name]
        if name in categorical:
            size = int(t[tr_vis].max().item()) + 1
            spec.append((name, "cat", start, size))
        else:
            v = t[tr_vis].double().reshape(int(tr_vis.sum()), -1)  # (objects, C)
            size = v.shape[1]
            stats[name] = (v.mean(0).float(), v.std(0).clamp_min(1e-6).float())
            spec.append((name, "cont", start, size))
        start += size

    def prepare(targets):
        out = {}
        for name, kind, _, size in spec:
            t = targets[name]
            if kind == "cat":
                out[name] = t.long()
            else:
                mean, std = stats[name]
                out[name] = ((t.float().reshape(*t.shape[:2], size) - mean) / std)  # (N, E, C)
        return out

    tr_y, te_y = prepare(train_targets), prepare(test_targets)
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n, generator=g)
    val_idx, fit_idx = perm[:val_size], perm[val_size:]

    with torch.random.fork_rng(devices=[]):  # seeded init without touching the caller's RNG
        torch.manual_seed(seed)
        mlp = nn.Sequential(nn.Linear(train_slots.shape[-1], hidden), nn.LeakyReLU(),
                            nn.Linear(hidden, start)).to(dev)
    opt = torch.optim.Adam(mlp.parameters(), lr=lr)

    def batch_loss(slots, y, vis, idx):
        s = slots[idx].float().to(dev)
        yb = {k: v[idx].to(dev) for k, v in y.items()}
        cost = _probe_pair_loss(mlp(s), yb, spec)  # (b, K, E)
        b, k, e = _hungarian(cost, vis[idx])
        return cost[b, k, e], (b, k, e)

    def val_loss():
        with torch.no_grad():
            parts = [batch_loss(train_slots, tr_y, tr_vis, val_idx[i:i + batch_size])[0]
                     for i in range(0, len(val_idx), batch_size)]
        return torch.cat(parts).mean().item()

    order, pos, prev, bad = fit_idx[torch.randperm(len(fit_idx), generator=g)], 0, None, 0
    for step in range(1, steps + 1):  # the authors count steps from 1
        if pos >= len(order):  # a new epoch; the authors' loop checks the stopping counter only here
            if bad >= patience:
                break
            order, pos = fit_idx[torch.randperm(len(fit_idx), generator=g)], 0
        idx, pos = order[pos:pos + batch_size], pos + batch_size
        for group in opt.param_groups:
            group["lr"] = lr * 0.5 ** (step / decay_steps)
        pair, _ = batch_loss(train_slots, tr_y, tr_vis, idx)
        if pair.numel():
            opt.zero_grad()
            pair.mean().backward()
            opt.step()
        if step % eval_every == 0:
            val = val_loss()
            bad = bad + 1 if prev is not None and prev - val < min_delta else 0
            prev = val

    # Test: match with the trained probe; every visible object gets a prediction (unmatched: a miss).
    n_te, e_te = te_vis.shape
    preds = {}
    for name, kind, _, size in spec:
        if kind == "cat":
            preds[name] = torch.full((n_te, e_te), -1, dtype=torch.long)  # never a class: scored wrong
        else:
            preds[name] = stats[name][0].double().expand(n_te, e_te, size).clone()  # the train mean
    with torch.no_grad():
        for i in range(0, n_te, batch_size):
            idx = torch.arange(i, min(i + batch_size, n_te))
            out = mlp(test_slots[idx].float().to(dev))  # (b, K, outputs)
            yb = {k: v[idx].to(dev) for k, v in te_y.items()}
            b, k, e = _hungarian(_probe_pair_loss(out, yb, spec), te_vis[idx])
            for name, kind, st, size in spec:
                o = out[b, k, st:st + size].cpu()  # (matched, size)
                if kind == "cat":
                    preds[name][idx[b.cpu()], e.cpu()] = o.argmax(-1)
                else:
                    mean, std = stats[name]
                    preds[name][idx[b.cpu()], e.cpu()] = (o * std + mean).double()
    result = {}
    for name, kind, _, size in spec:
        p = preds[name][te_vis]  # (visible objects,) or (visible objects, C)
        t = test_targets[name][te_vis]
        if kind == "cat":
            result[f"{name}_acc"] = float((p == t.long()).double().mean().item()) if len(t) else float("nan")
        else:
            t = t.double().reshape(-1, size)
            sse = ((p - t) ** 2).sum(0)  # (C,)
            sst = ((t - t.mean(0)) ** 2).sum(0)
            result[f"{name}_r2"] = float((1 - sse / sst).mean().item()) if (sst > 0).all() else float("nan")
    return result
