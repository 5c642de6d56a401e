"""Data for object-centric learning: built-in synthetic sets, real datasets from
local files, a deterministic step-indexed loader, and the sample-grid writer.

A batch is a dict of tensors (see DESIGN.md):
  image  float32 (B, 3, H, W) in [0, 1]
  mask   int64   (B, H, W) entity id per pixel; ids < dataset.num_background are
         background, -1 means "ignore" (unlabelled or overlapping pixels)
  optional per-entity ground truth aligned with mask ids (entry e describes mask
  id e, background entities included): visible bool (B, E), shape int64 (B, E),
  color float32 (B, E, 3), scale / x / y float32 (B, E).

Every dataset has `name`, `num_background`, `max_objects`, and three ways in:
  get_batch(indices)   one batch dict for a list of indices, in one vectorised call
  __getitem__(i)       one sample (the batch of one, squeezed): image (3, H, W), mask (H, W), ...
  __getitems__(indices) a list of samples cut from one get_batch call (PyTorch's batched fetch)
so `torch.utils.data.DataLoader(dataset, batch_size=8)` works with the default
collate, and `make_loader` fetches each batch with one `get_batch` call.
"""
import importlib
import json
import math
import os
import zlib
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

SPLITS = ("train", "val", "test")


class DataError(Exception):
    """A dataset is missing, malformed or asked for impossibly. main() prints the
    message as one line and exits non-zero, without a traceback."""


def _sample(self, i):
    """Sample i of a dataset with `get_batch`: the batch of one, squeezed."""
    return {k: v[0] for k, v in self.get_batch([i]).items()}


def _samples(self, indices):
    """PyTorch's batched fetch (`__getitems__`): the samples of one `get_batch` call, as a
    list that the default collate stacks back, so a plain DataLoader is vectorised too."""
    batch = self.get_batch(indices)
    return [{k: v[j] for k, v in batch.items()} for j in range(len(indices))]


# --- Synthetic sets
#
# Built-in sets, generated on the fly (nothing is downloaded):
#   shapes          64 px, 2-5 dSprites (square, ellipse, heart) in saturated HSV
#                   colours on a random grey background (multi-dSprites colored_on_grayscale)
#   shapes-colored  64 px, 1-4 sprites, random RGB on random RGB (colored_on_colored)
#   shapes-binary   64 px, 2-3 white sprites on black (binarized)
#   tetrominoes     35 px, 3 of the 19 fixed tetrominoes, 5x5-px blocks on the 7x7
#                   cell grid, 6 colours on black
#   clevr-lite      64 px, 3-6 shaded CLEVR objects, ray cast (its own section below)
# Image i of a split is a pure function of (seed, split, i): every random number is
# a counter-based hash of (seed, set name, split, i, draw number), so a batch is
# generated in one vectorised call and an image does not depend on the batch it is
# fetched in; splits (and sets) are independent streams.
# Masks are exact: the mask names the entity whose colour the pixel has.

BUILTIN = ("shapes", "shapes-colored", "shapes-binary", "tetrominoes", "clevr-lite")  # clevr-lite: see its section

# Sprite sets: (fewest objects, most objects, colour scheme).
_SPRITE_SETS = {
    "shapes": (2, 5, "hsv-on-grey"),
    "shapes-colored": (1, 4, "rgb-on-rgb"),
    "shapes-binary": (2, 3, "white-on-black"),
}
_SPLIT_CODE = {"train": 0x1B873593, "val": 0x2C1B3C6D, "test": 0x297A2D39}
_DEFAULT_SIZE = {"train": 1_000_000, "val": 1_000, "test": 1_000}
_SPRITE_SCALES = (0.5, 0.6, 0.7, 0.8, 0.9, 1.0)  # dSprites: linspace(0.5, 1.0, 6)
_SPRITE_RADIUS = 1 / 6  # a scale-1 sprite spans ~1/3 of the image side (fits a disc of this radius)
_SPRITE_MARGIN = 0.125  # sprite centres are uniform in [margin, 1 - margin]
_MIN_VISIBLE = 5  # objects with fewer visible pixels are flagged visible=False
_M32 = 0xFFFFFFFF
_TETRIS_TRIES = 12  # candidate placements per tetromino; the first free one wins
# Draw numbers: 0 object count, 1-3 background, then a fixed number per object slot.
_SPRITE_DRAWS = 8  # shape, scale, angle, x, y, 3 colour
_TETRIS_DRAWS = 2 + 2 * _TETRIS_TRIES  # shape, colour, (row, column) per try


def _tetrominoes():
    """The 19 fixed tetrominoes as 4x4 cell masks, ordered I(2) O(1) T(4) S(2) Z(2) J(4) L(4).

    Each free piece is rotated by 90 degrees ((r, c) -> (c, -r)) and the distinct
    placements kept, normalised to the top-left corner.
    Returns (cells bool (19, 4, 4), height int64 (19,), width int64 (19,)).
    """
    free = {"I": [(0, 0), (0, 1), (0, 2), (0, 3)], "O": [(0, 0), (0, 1), (1, 0), (1, 1)],
            "T": [(0, 0), (0, 1), (0, 2), (1, 1)], "S": [(0, 1), (0, 2), (1, 0), (1, 1)],
            "Z": [(0, 0), (0, 1), (1, 1), (1, 2)], "J": [(0, 0), (1, 0), (1, 1), (1, 2)],
            "L": [(0, 2), (1, 0), (1, 1), (1, 2)]}
    pieces = []
    for cells in free.values():
        seen = []
        for _ in range(4):
            r0, c0 = min(r for r, _ in cells), min(c for _, c in cells)
            norm = sorted((r - r0, c - c0) for r, c in cells)
            if norm not in seen:
                seen.append(norm)
            cells = [(c, -r) for r, c in cells]
        pieces += seen
    grid = torch.zeros(len(pieces), 4, 4, dtype=torch.bool)
    for p, cells in enumerate(pieces):
        for r, c in cells:
            grid[p, r, c] = True
    height = grid.any(2).sum(1)
    width = grid.any(1).sum(1)
    return grid, height, width


_TETRIS_CELLS, _TETRIS_HEIGHT, _TETRIS_WIDTH = _tetrominoes()
_TETRIS_COLOURS = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0],
                                [1.0, 1.0, 0.0], [1.0, 0.0, 1.0], [0.0, 1.0, 1.0]])


def _mul32(x, c):
    """(x * c) mod 2**32 for int64 x in [0, 2**32) and a 32-bit constant c.

    Split c into 16-bit halves so no intermediate leaves int64:
    x*c = x*lo + (x*hi << 16), and only the low 16 bits of x*hi survive the shift mod 2**32.
    """
    lo, hi = c & 0xFFFF, c >> 16
    return (x * lo + (((x * hi) & 0xFFFF) << 16)) & _M32


def _mix32(x):
    """lowbias32 (C. Wellons): a bijective 32-bit avalanche hash of int64 values in [0, 2**32).

    x ^= x >> 16; x *= 0x7feb352d; x ^= x >> 15; x *= 0x846ca68b; x ^= x >> 16  (mod 2**32).
    Values stay non-negative, so >> is a logical shift.
    """
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def _uniforms(seed, name, split, indices, n_draws):
    """Counter-based uniforms in [0, 1): float32 (B, n_draws), entry (b, d) a pure
    function of (seed, set name, split, indices[b], d).

    key = mix(mix(mix(mix(seed_hi) ^ seed_lo) ^ crc32(name)) ^ split);  h_b = mix(key ^ i_b);
    u_bd = mix(h_b ^ mix(d + golden)) >> 8 / 2**24  (24 bits: exact in float32).
    """
    device = indices.device
    key = _mix32(torch.tensor((seed >> 32) & _M32, dtype=torch.int64, device=device))
    key = _mix32(_mix32(_mix32(key ^ (seed & _M32)) ^ zlib.crc32(name.encode())) ^ _SPLIT_CODE[split])
    h = _mix32(key ^ (indices & _M32))  # (B,)
    draw = _mix32(torch.arange(n_draws, dtype=torch.int64, device=device) + 0x9E3779B9)
    bits = _mix32(h[:, None] ^ draw[None, :])  # (B, n_draws)
    return (bits >> 8).to(torch.float32) * (1.0 / (1 << 24))


def _hsv_to_rgb(h, s, v):
    """HSV in [0, 1] to RGB (..., 3): channel n in (5, 3, 1) is
    v - v*s*clamp(min(k, 4 - k), 0, 1) with k = (n + 6h) mod 6."""
    n = torch.tensor([5.0, 3.0, 1.0], device=h.device)
    k = (n + 6 * h[..., None]) % 6  # (..., 3)
    return v[..., None] - (v * s)[..., None] * torch.clamp(torch.minimum(k, 4 - k), 0, 1)


def _inside_sprite(shape, u, v):
    """Whether local point (u, v) (units of the sprite radius, v pointing down) lies in
    the sprite: square max(|u|,|v|) <= 0.7; ellipse u^2 + (v/0.5)^2 <= 1; heart
    (x^2+y^2-1)^3 <= x^2 y^3 with x = 1.3u, y = 0.2 - 1.3v. All three fit the unit disc.
    shape (N,) int64, u/v (N, S, S) -> bool (N, S, S)."""
    square = torch.maximum(u.abs(), v.abs()) <= 0.7
    u2, v2 = u * u, v * v
    ellipse = u2 + 4 * v2 <= 1
    y = 0.2 - 1.3 * v
    x2, y2 = 1.69 * u2, y * y
    t = x2 + y2 - 1
    heart = t * t * t <= x2 * y2 * y
    shape = shape[:, None, None]
    return torch.where(shape == 0, square, torch.where(shape == 1, ellipse, heart))


def _render_sprites(u, res, lo, hi, colours):
    """Draw sprite images from uniforms u (B, D). Returns (mask (B, res, res),
    per-entity dict without `visible`, present bool (B, hi)).

    Each sprite is rasterised in its own (S, S) window around its centre (pixel
    centres rotated into sprite coordinates), and the windows are pasted into a
    padded canvas in painter's order with gather/scatter, one object slot at a time.
    """
    B, K, dev = u.shape[0], hi, u.device
    count = lo + (u[:, 0] * (hi - lo + 1)).long()  # (B,)
    present = torch.arange(K, device=dev)[None, :] < count[:, None]  # (B, K)
    d = u[:, 4:].reshape(B, K, _SPRITE_DRAWS)
    shape = (d[..., 0] * 3).long()  # (B, K)
    scale = torch.tensor(_SPRITE_SCALES, device=dev)[(d[..., 1] * 6).long()]
    angle = d[..., 2] * (2 * math.pi)
    cx = _SPRITE_MARGIN + (1 - 2 * _SPRITE_MARGIN) * d[..., 3]
    cy = _SPRITE_MARGIN + (1 - 2 * _SPRITE_MARGIN) * d[..., 4]
    if colours == "hsv-on-grey":
        colour = _hsv_to_rgb(d[..., 5], 0.6 + 0.4 * d[..., 6], 0.6 + 0.4 * d[..., 7])
        background = u[:, 1:2].expand(B, 3)
    elif colours == "rgb-on-rgb":
        colour, background = d[..., 5:8], u[:, 1:4]
    else:  # white on black
        colour, background = torch.ones(B, K, 3, device=dev), torch.zeros(B, 3, device=dev)

    # Window of side S = 2*half + 1 around the centre pixel: a pixel whose centre lies
    # within R of the sprite centre c has index in [c - R - 1/2, c + R - 1/2], which
    # floor(c) +- half covers when half > R - 1/2.
    half = math.floor(res * _SPRITE_RADIUS + 0.5)
    S, W = 2 * half + 1, res + 2 * half  # W: padded canvas side, so no window leaves it
    px_r = res * _SPRITE_RADIUS * scale.reshape(-1)  # (N,) sprite radius in pixels, N = B*K
    ccol = torch.floor(cx.reshape(-1) * res).long()  # (N,) centre pixel
    crow = torch.floor(cy.reshape(-1) * res).long()
    off = torch.arange(-half, half + 1, device=dev)  # (S,)
    # Pixel-centre offsets from the sprite centre, in sprite radii.
    dx = (ccol[:, None] + off[None, :] + 0.5 - cx.reshape(-1, 1) * res) / px_r[:, None]  # (N, S)
    dy = (crow[:, None] + off[None, :] + 0.5 - cy.reshape(-1, 1) * res) / px_r[:, None]  # (N, S)
    cos, sin = torch.cos(angle).reshape(-1, 1, 1), torch.sin(angle).reshape(-1, 1, 1)
    lu = cos * dx[:, None, :] + sin * dy[:, :, None]  # (N, S, S) rows = dy, cols = dx
    lv = -sin * dx[:, None, :] + cos * dy[:, :, None]
    inside = _inside_sprite(shape.reshape(-1), lu, lv).reshape(B, K, S * S)
    inside &= present[:, :, None]
    # Flat index of each window pixel in the padded canvas (centre pixel + half of padding).
    rows = crow.reshape(B, K, 1, 1) + half + off[None, None, :, None]  # (B, K, S, 1)
    cols = ccol.reshape(B, K, 1, 1) + half + off[None, None, None, :]  # (B, K, 1, S)
    flat = (rows * W + cols).reshape(B, K, S * S)
    canvas = torch.zeros(B, W * W, dtype=torch.uint8, device=dev)  # ids <= 5: bytes keep it small
    for k in range(K):  # painter's order: slot k overwrites slots < k
        cur = canvas.gather(1, flat[:, k])
        canvas.scatter_(1, flat[:, k], torch.where(inside[:, k], k + 1, cur))
    mask = canvas.reshape(B, W, W)[:, half: half + res, half: half + res].long()

    absent = ~present
    ents = {
        "shape": torch.cat([torch.full((B, 1), -1, device=dev), shape.masked_fill(absent, -1)], 1),
        "color": torch.cat([background[:, None], colour.masked_fill(absent[..., None], 0)], 1),
        "scale": torch.cat([torch.zeros(B, 1, device=dev), scale.masked_fill(absent, 0)], 1),
        "x": torch.cat([torch.full((B, 1), 0.5, device=dev), cx.masked_fill(absent, 0)], 1),
        "y": torch.cat([torch.full((B, 1), 0.5, device=dev), cy.masked_fill(absent, 0)], 1),
    }
    return mask, ents, present


def _render_tetrominoes(u, res):
    """Draw 3 tetrominoes on the 7x7 grid of 5x5-px cells (35 px) from uniforms u (B, D).

    Each piece tries _TETRIS_TRIES random placements and takes the first that
    overlaps no earlier piece (the last one if none is free; painter's order then
    decides). Occupancy is a 49-bit integer per image. At another resolution the
    35-px image is resized nearest (output pixel centre -> source pixel).
    Returns (mask (B, res, res), per-entity dict without `visible`, present (B, 3)).
    """
    B, K, dev = u.shape[0], 3, u.device
    d = u[:, 4:].reshape(B, K, _TETRIS_DRAWS)
    shape = (d[..., 0] * 19).long()  # (B, K)
    colour = _TETRIS_COLOURS.to(dev)[(d[..., 1] * 6).long()]  # (B, K, 3)
    cells = _TETRIS_CELLS.to(dev)  # (19, 4, 4)
    # Bits of each piece placed at the top-left: cell (r, c) -> bit 7r + c.
    weights = 2 ** (7 * torch.arange(4, device=dev)[:, None] + torch.arange(4, device=dev))
    piece_bits = (cells.long() * weights).sum((1, 2))  # (19,)
    h, w = _TETRIS_HEIGHT.to(dev)[shape], _TETRIS_WIDTH.to(dev)[shape]  # (B, K)
    tries = d[..., 2: 2 + 2 * _TETRIS_TRIES].reshape(B, K, _TETRIS_TRIES, 2)
    r0 = (tries[..., 0] * (8 - h)[..., None]).long()  # (B, K, T) top row in [0, 7 - h]
    c0 = (tries[..., 1] * (8 - w)[..., None]).long()
    bits = piece_bits[shape][..., None] << (7 * r0 + c0)  # (B, K, T); < 2**49, no overflow
    occupied = torch.zeros(B, dtype=torch.int64, device=dev)
    grid = torch.zeros(B, 49, dtype=torch.int64, device=dev)
    cell_bit = torch.arange(49, device=dev)
    placed_r, placed_c = [], []
    for k in range(K):
        free = (bits[:, k] & occupied[:, None]) == 0  # (B, T)
        pick = torch.where(free.any(1), free.int().argmax(1), _TETRIS_TRIES - 1)  # first free try
        chosen = bits[:, k].gather(1, pick[:, None])  # (B, 1)
        occupied |= chosen[:, 0]
        grid = torch.where((chosen >> cell_bit) & 1 == 1, k + 1, grid)  # (B, 49)
        placed_r.append(r0[:, k].gather(1, pick[:, None])[:, 0])
        placed_c.append(c0[:, k].gather(1, pick[:, None])[:, 0])
    top, left = torch.stack(placed_r, 1), torch.stack(placed_c, 1)  # (B, K)
    # Nearest resize from 35 px: output pixel p samples source pixel floor((p + 0.5) * 35 / res).
    src = torch.div((torch.arange(res, device=dev) * 2 + 1) * 35, 2 * res, rounding_mode="floor")
    cell = src // 5  # (res,) cell row/column of each output row/column
    mask = grid.reshape(B, 7, 7)[:, cell][:, :, cell]  # (B, res, res)
    ents = {
        "shape": torch.cat([torch.full((B, 1), -1, device=dev), shape], 1),
        "color": torch.cat([torch.zeros(B, 1, 3, device=dev), colour], 1),
        "scale": torch.cat([torch.zeros(B, 1, device=dev), torch.ones(B, K, device=dev)], 1),
        "x": torch.cat([torch.full((B, 1), 0.5, device=dev), (left + w / 2) / 7], 1),
        "y": torch.cat([torch.full((B, 1), 0.5, device=dev), (top + h / 2) / 7], 1),
    }
    return mask, ents, torch.ones(B, K, dtype=torch.bool, device=dev)


class SyntheticDataset(torch.utils.data.Dataset):
    """A built-in synthetic set (see BUILTIN); images are generated on the fly.

    Item i is a pure function of (seed, split, i). `get_batch(indices)` draws a
    whole batch in one vectorised call and returns one dict:
      image float32 (B, 3, H, W) in [0, 1]; mask int64 (B, H, W), 0 = background,
      object j (drawing order) = j + 1; per entity e in 0..max_objects, aligned with
      mask ids: visible bool, shape int64 (-1 background/absent), color float32 (.., 3),
      scale, x, y float32 (centre in [0, 1], x = column, y = row; background 0.5).
    """

    def __init__(self, name, split, resolution, seed, size, device):
        self.name, self.split, self.seed, self.device = name, split, seed, torch.device(device)
        self.native_resolution = 35 if name == "tetrominoes" else 64
        self.resolution = resolution or self.native_resolution
        self.size = _DEFAULT_SIZE[split] if size is None else size
        self.max_objects = 3 if name == "tetrominoes" else _SPRITE_SETS[name][1]
        self.num_background = 1
        self.has_masks = True
        self.properties = ("visible", "shape", "color", "scale", "x", "y")

    def __len__(self):
        return self.size

    __getitem__, __getitems__ = _sample, _samples  # one sample; a list of samples (plain DataLoader)

    def get_batch(self, indices):
        """A batch for a list of indices (negative indices count from the end)."""
        idx = torch.as_tensor(indices, dtype=torch.int64).reshape(-1)
        if len(idx) and (idx.min() < -self.size or idx.max() >= self.size):
            raise IndexError(f"{self.name}/{self.split}: index out of range for {self.size} items")
        idx = torch.where(idx < 0, idx + self.size, idx).to(self.device)
        per_slot = _TETRIS_DRAWS if self.name == "tetrominoes" else _SPRITE_DRAWS
        u = _uniforms(self.seed, self.name, self.split, idx, 4 + per_slot * self.max_objects)
        if self.name == "tetrominoes":
            mask, ents, present = _render_tetrominoes(u, self.resolution)
        else:
            lo, hi, colours = _SPRITE_SETS[self.name]
            mask, ents, present = _render_sprites(u, self.resolution, lo, hi, colours)
        B, E = mask.shape[0], self.max_objects + 1
        # Objects with < _MIN_VISIBLE unoccluded pixels are invisible; background always visible.
        counts = torch.zeros(B, E, dtype=torch.int64, device=mask.device).scatter_add_(
            1, mask.reshape(B, -1), torch.ones(1, 1, dtype=torch.int64, device=mask.device)
            .expand(mask.shape[0], mask[0].numel()))  # (B, E) pixels per id
        visible = counts >= _MIN_VISIBLE
        visible[:, 0] = True
        visible[:, 1:] &= present
        # Paint: every pixel takes the colour of the entity its mask names (exact masks).
        colour = ents["color"]  # (B, E, 3)
        image = colour.transpose(1, 2).gather(2, mask.reshape(B, 1, -1).expand(B, 3, -1))  # (B, 3, H*W)
        batch = {"image": image.reshape(B, 3, *mask.shape[1:]), "mask": mask, "visible": visible}
        batch.update(ents)
        return batch


def make_synthetic(name, split, resolution=None, seed=0, size=None, device="cpu", **options):
    """The built-in set `name` (one of BUILTIN) for `split`.

    resolution: output side in pixels (None: 64 for sprites and clevr-lite, 35 for tetrominoes);
    sprites and clevr-lite are drawn directly at that size, tetrominoes resized nearest.
    size: number of items (default train 1,000,000, val and test 1,000).
    device: where batches are generated (and returned).
    """
    if name not in BUILTIN:
        raise DataError(f"unknown built-in set {name!r}; expected one of {', '.join(BUILTIN)}")
    if options:
        raise DataError(f"{name}: unknown option(s) {', '.join(sorted(options))}; "
                        "expected resolution, seed, size, device")
    if split not in SPLITS:
        raise DataError(f"{name}: unknown split {split!r}; expected one of {SPLITS}")
    if resolution is not None and (not isinstance(resolution, int) or resolution < 4):
        raise DataError(f"{name}: resolution {resolution!r} is invalid; expected an integer >= 4")
    if size is not None and (not isinstance(size, int) or not 0 < size < 2 ** 32):
        raise DataError(f"{name}: size {size!r} is invalid; expected an integer in [1, 2**32)")
    if not isinstance(seed, int):
        raise DataError(f"{name}: seed {seed!r} is invalid; expected an integer")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise DataError(f"{name}: device {device!r} is invalid; expected e.g. 'cpu' or 'cuda'") from None
    if name == "clevr-lite":
        return ClevrLiteDataset(split, resolution, seed, size, device)
    return SyntheticDataset(name, split, resolution, seed, size, device)


# --- CLEVR-lite: a CLEVR-like set, ray cast in torch
#
# clevr-lite: 3-6 cubes, spheres and cylinders (CLEVR6-like) in CLEVR's 8 colours and 2 sizes,
# rubber (matte) or metal (specular, mirror-like), on a grey ground plane, seen by CLEVR's camera
# through the CLEVR6 crop (rows 29:221, cols 64:256 of the 320x240 frame). Native 64 px; any
# resolution is rendered directly (128 for the CLEVR decoders). One ray per pixel finds the first
# hit (exact instance masks, ids 1..n in drawing order); shading: ambient, three lamps, a sun whose
# light one shadow ray per pixel tests. docs/clevr_lite.md lists what differs from CLEVR.
# Every primitive sits on the ground and is seen from above, so only what a camera above the
# ground can see is intersected: a cylinder's side and top cap, a box's top and sides.

_CLEVR_COLOURS = torch.tensor([  # clevr-dataset-gen image_generation/data/properties.json "colors"
    [87, 87, 87], [173, 35, 35], [42, 75, 215], [29, 105, 20],  # gray red blue green
    [129, 74, 25], [129, 38, 192], [41, 208, 208], [255, 238, 51]]) / 255.0  # brown purple cyan yellow
_CLEVR_SIZES = (0.35, 0.7)  # properties.json "sizes": small, large (a cube's half side is size / sqrt 2)
# shape ids 0 cube, 1 sphere, 2 cylinder and material ids 0 rubber, 1 metal: properties.json's order
_CLEVR_RANGE = 3.0  # render_images.py: x, y = random.uniform(-3, 3)
_CLEVR_MIN_DIST = 0.25  # render_images.py --min_dist: centre distance minus both radii
_CLEVR_MARGIN = 0.4  # render_images.py --margin: separation along the camera's left and behind axes
_CLEVR_MIN_PIXELS = 200  # render_images.py --min_pixels_per_object, in the 320x240 frame
_CLEVR_TRIES = 32  # placements tried per object (render_images.py --max_retries 50 before a restart)
_CLEVR_ATTEMPTS = 6  # whole scenes drawn before the last one is kept as it is (CLEVR restarts forever)
# kubric challenges/movi/movi_ab_worker.py --camera clevr: position (without its jitter), look_at origin
_CLEVR_CAMERA = (7.48113, -6.50764, 5.34367)
_CLEVR_FOCAL = 350.0  # pixels of the 320-px frame: focal_length=35, sensor_width=32 (same file), 35 / 32 * 320
_CLEVR_SUN = (11.6608, -6.62799, 25.8232)  # kubric kubric/assets/utils.py get_clevr_lights: sun position
# Lighting is ours (CLEVR path-traces Blender area lamps): Lambert and Blinn-Phong terms in linear
# RGB, encoded with gamma 2 (sRGB: ~2.2) like Blender's sRGB output, so CLEVR's albedos (linear in Blender)
# come out about as light as in CLEVR's images. Lamps: kubric get_clevr_lights' key (0xffedd0),
# fill (0xc2d0ff) and back lamps (position, colour, intensity at the origin), as point lights
# whose light falls off as 1 / distance.
_CLEVR_LAMPS = (((6.44671, -2.90517, 4.2584), (1.0, 237 / 255, 208 / 255), 0.2),
                ((-4.67112, -4.0136, 3.01122), (194 / 255, 208 / 255, 1.0), 0.08),
                ((-1.1685, 2.64602, 5.81574), (1.0, 1.0, 1.0), 0.07))
_CLEVR_AMBIENT, _CLEVR_SUN_I = 0.07, 0.25  # ambient and sun (directional, shadowed) intensity
_CLEVR_FLOOR = 0.42  # ground albedo: lit, it reads 0.38 (top row) to 0.54 (bottom); CLEVR's crops ~0.41 to ~0.55
_CLEVR_SKY, _CLEVR_GROUND = 0.08, 0.3  # what a metal mirrors above and below the horizon (linear)
_CLEVR_DRAWS = 5 + 2 * _CLEVR_TRIES  # per object slot: shape, size, colour, material, yaw, tries
_CLEVR_CHUNK = 256  # images rendered together (keeps the working set in cache)
_ID_BITS, _ID_MASK = 3, 7  # a depth key holds the object id (< 8) in its low bits


def _unit(v, dim=-1):
    return v / v.norm(dim=dim, keepdim=True)


# Every per-pixel and per-object value is computed with IEEE-exact operations (+ - * / sqrt) in a
# fixed order, never with a vectorised transcendental function or a matrix product, whose last bit
# can depend on where an element sits in a vector: so an image does not depend on its batch.

def _dot3(a, b):
    """a . b over 3 components given as sequences (rows or numbers), summed in a fixed order."""
    return a[0] * b[0] + a[1] * b[1] + a[2] * b[2]


def _ipow(x, n):
    """x ** n for an integer n >= 1 by repeated squaring (exact products, no pow())."""
    out = None
    while n:
        if n & 1:
            out = x if out is None else out * x
        n >>= 1
        x = x * x if n else x
    return out


class _ClevrCamera:
    """The fixed camera and the per-pixel constants of one resolution.

    Ray of pixel (row i, col j): O + t d with d = f + U_j right + V_i down, where (U, V) are the
    pixel centre's offsets from the optical axis in units of the focal length in the 320x240
    frame, through the CLEVR6 crop; t is the depth along the viewing axis f.
    """

    def __init__(self, res, device):
        top, left, side = _CLEVR_CROP
        frame_h, frame_w = _CLEVR_SIZE
        o = torch.tensor(_CLEVR_CAMERA, dtype=torch.float64)
        f = _unit(-o)  # looks at the origin
        right = _unit(torch.linalg.cross(f, torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64)))
        down = torch.linalg.cross(f, right)
        centres = (torch.arange(res, dtype=torch.float64) + 0.5) * side / res  # (res,) in frame pixels
        u = (left + centres - frame_w / 2) / _CLEVR_FOCAL  # (res,) columns
        v = (top + centres - frame_h / 2) / _CLEVR_FOCAL  # (res,) rows
        d = f + u[None, :, None] * right + v[:, None, None] * down  # (res, res, 3)
        d = d.reshape(-1, 3).T  # (3, P)
        self.res = res
        t_floor = -o[2] / d[2]  # (P,) every ray goes down, so every pixel sees the ground
        # Rows: dx, dy, dz, |d_xy|^2, |d|^2, 1/dz, t of the ground, d / |d| (3).
        view = _unit(d, 0)
        table = torch.cat([d, torch.stack([d[0] ** 2 + d[1] ** 2, (d * d).sum(0), 1 / d[2], t_floor]), view])
        self.table = table.float().to(device)  # (10, P)
        ground = o[:, None] + t_floor * d  # (3, P) ground points
        normal = torch.tensor([[0.0], [0.0], [1.0]], dtype=torch.float64).expand_as(ground)
        albedo = torch.full_like(ground, _CLEVR_FLOOR)
        no = torch.zeros(ground.shape[1], dtype=torch.bool)
        lit, dark = (_clevr_shade(ground, normal, view, albedo, no, no | s) for s in (False, True))
        self.floor_lit = lit.float().to(device)  # (3, P)
        self.floor_dark = dark.float().to(device)
        self.floor_colour = lit.mean(1).float().to(device)  # (3,) the background entity's colour
        self.sun = _unit(torch.tensor(_CLEVR_SUN, dtype=torch.float64)).float().to(device)
        self.o = o.float().to(device)  # (3,)
        self.axes = torch.stack([f, right, down]).tolist()  # rows: the camera's axes (python floats)
        # Ground axes of render_images.py's margin rule: the camera's left and behind, flattened.
        self.ground_axes = torch.stack([_unit(-right * torch.tensor([1.0, 1, 0], dtype=torch.float64))[:2],
                                        _unit(f * torch.tensor([1.0, 1, 0], dtype=torch.float64))[:2]]).tolist()

    def project(self, p):
        """World points (..., 3) -> (x, y) in [0, 1] image coordinates (x = column, y = row) and depth."""
        top, left, side = _CLEVR_CROP
        frame_h, frame_w = _CLEVR_SIZE
        v = [p[..., i] - self.o[i] for i in range(3)]
        depth, rt, dn = (_dot3(v, a) for a in self.axes)  # (...,) each
        x = (rt / depth * _CLEVR_FOCAL + frame_w / 2 - left) / side
        y = (dn / depth * _CLEVR_FOCAL + frame_h / 2 - top) / side
        return x, y, depth


_CLEVR_CAMERAS = {}


def _clevr_camera(res, device):
    key = (res, str(device))
    if key not in _CLEVR_CAMERAS:
        _CLEVR_CAMERAS[key] = _ClevrCamera(res, device)
    return _CLEVR_CAMERAS[key]


def _clevr_shade(x, n, view, albedo, metal, shadow):
    """Colour (3, F) of surface points x (3, F) with unit normals n (3, F), seen along unit view
    rays (3, F); albedo (3, F), metal and shadow (F,) bool.

    Rubber: albedo * (ambient + the lamps' and the sun's Lambert terms) + a faint Blinn-Phong sheen.
    Metal: a little diffuse light, a mirror-like environment (the reflected ray sees the lit
    ground below the horizon and a dim sky above) and sharp highlights, tinted by the albedo as a
    metal's reflections are, plus a little white. The sun is blocked where `shadow` is set.
    """
    dt, dev = x.dtype, x.device
    dot = _dot3
    unit = lambda v: v * dot(v, v).rsqrt()  # (3, F) (a norm over the 3 rows is far slower)
    sun = _unit(torch.tensor(_CLEVR_SUN, dtype=dt, device=dev))[:, None]  # (3, 1)
    lit = (~shadow).to(dt)
    light = (_CLEVR_AMBIENT + _CLEVR_SUN_I * lit * dot(n, sun).clamp(min=0)).expand(3, -1)  # (3, F)
    gloss = [lit * dot(n, unit(sun - view)).clamp(min=0)]  # Blinn cosines: sun, then each lamp
    for pos, colour, power in _CLEVR_LAMPS:
        to = torch.tensor(pos, dtype=dt, device=dev)[:, None] - x  # (3, F)
        inv = dot(to, to).rsqrt()
        l = to * inv
        falloff = power * math.sqrt(sum(c * c for c in pos)) * inv  # `power` at the origin
        light = light + (falloff * dot(n, l).clamp(min=0)) * torch.tensor(colour, dtype=dt, device=dev)[:, None]
        gloss.append(dot(n, unit(l - view)).clamp(min=0))
    gloss = torch.stack(gloss)  # (4, F)
    sheen = _ipow(gloss, 8)  # Blinn-Phong exponents 8 (rubber) and 64 (metal), by repeated squaring
    spot = _ipow(sheen, 8)
    rubber = albedo * light + 0.04 * (((sheen[0] + sheen[1]) + sheen[2]) + sheen[3])
    refl_z = view[2] - 2 * dot(view, n) * n[2]  # height of the mirror direction
    env = _CLEVR_SKY + (_CLEVR_GROUND - _CLEVR_SKY) * ((0.1 - refl_z) / 0.3).clamp(0, 1)  # sky, then ground
    highlight = 2.0 * lit * spot[0] + ((spot[1] + spot[2]) + spot[3])
    shiny = albedo * (0.1 * light + env + highlight) + 0.3 * highlight
    return torch.where(metal, shiny, rubber).clamp(0, 1).sqrt()  # gamma 2 encoding (sRGB's is ~2.2)


def _clevr_scene(u, cam):
    """Scenes from uniforms u (B, 1 + 6 * _CLEVR_DRAWS): CLEVR's sampling (render_images.py) for
    3-6 objects. Each object takes the first of _CLEVR_TRIES positions, uniform in [-3, 3]^2, whose
    centre is in view and that keeps CLEVR's distance and margin to every object placed before it;
    an object with no such position is dropped. Placed objects come first, in drawing order.
    Returns a dict of (B, 6) tensors (x, y: world ground position; `present`: placed).
    """
    B, K, T, dev = u.shape[0], 6, _CLEVR_TRIES, u.device
    count = 3 + (u[:, 0] * 4).long()  # (B,) 3..6
    d = u[:, 1:].reshape(B, K, _CLEVR_DRAWS)
    shape = (d[..., 0] * 3).long()  # (B, K) 0 cube, 1 sphere, 2 cylinder
    size = torch.tensor(_CLEVR_SIZES, device=dev)[(d[..., 1] * 2).long()]
    half = torch.where(shape == 0, size / math.sqrt(2), size)  # cube half side / radius = centre height
    yaw = d[..., 4] * (2 * math.pi)  # render_images.py: theta = 360 * random.random() (degrees)
    tries = ((d[..., 5:] * 2 - 1) * _CLEVR_RANGE).reshape(B, K, T, 2)  # (B, K, T, 2)
    px, py, _ = cam.project(torch.cat([tries, half[..., None, None].expand(B, K, T, 1)], -1))
    ok = (px > 0) & (px < 1) & (py > 0) & (py < 1)  # (B, K, T) centre in view
    ok &= (torch.arange(K, device=dev) < count[:, None])[..., None]
    (lx, ly), (bx, by) = cam.ground_axes
    tx, ty = tries[..., 0], tries[..., 1]
    along = torch.stack([tx * lx + ty * ly, tx * bx + ty * by], -1)  # (B, K, T, 2)
    pos = torch.zeros(B, K, 2, device=dev)
    pos_along = torch.zeros(B, K, 2, device=dev)
    placed = torch.zeros(B, K, dtype=torch.bool, device=dev)
    for k in range(K):  # sequential, as in CLEVR: each object checks those placed before it
        free = ok[:, k]  # (B, T)
        if k:
            # CLEVR compares the new object's size with the earlier ones' stored radius (size/sqrt 2 for cubes)
            dx = tries[:, k, :, None, 0] - pos[:, None, :k, 0]  # (B, T, k)
            dy = tries[:, k, :, None, 1] - pos[:, None, :k, 1]
            gap = (dx * dx + dy * dy).sqrt() - size[:, k, None, None] - half[:, None, :k]
            near = (along[:, k, :, None] - pos_along[:, None, :k]).abs() < _CLEVR_MARGIN  # (B, T, k, 2)
            clash = (gap < _CLEVR_MIN_DIST) | near.any(-1)  # (B, T, k)
            free = free & ~(clash & placed[:, None, :k]).any(-1)
        first = free.int().argmax(1)[:, None, None].expand(B, 1, 2)  # first free try
        pos[:, k] = tries[:, k].gather(1, first)[:, 0]
        pos_along[:, k] = along[:, k].gather(1, first)[:, 0]
        placed[:, k] = free.any(1)
    order = torch.sort((~placed).int(), dim=1, stable=True).indices  # placed objects first
    take = lambda x: x.gather(1, order if x.dim() == 2 else order[..., None].expand_as(x))
    return {"present": take(placed), "shape": take(shape), "size": take(size), "half": take(half),
            "colour": take((d[..., 2] * 8).long()), "material": take((d[..., 3] * 2).long()),
            # cos and sin in float64, then rounded: a last-bit difference of a vectorised cos
            # cannot reach float32 (in practice), so an image does not depend on its batch
            "yaw": take(yaw), "cos": take(torch.cos(yaw.double()).float()),
            "sin": take(torch.sin(yaw.double()).float()),
            "pos": take(pos)}


def _rectangles(r0, r1, c0, c1, res):
    """Every pixel of the rectangles n = rows r0[n]..r1[n] x columns c0[n]..c1[n] of a res x res
    image (empty if r1 < r0 or c1 < c0), rectangle by rectangle, row-major: (rectangle index,
    flat pixel index row * res + column), each (F,)."""
    h, w = (r1 - r0 + 1).clamp(min=0), (c1 - c0 + 1).clamp(min=0)
    n = h * w  # (N,)
    rect = torch.repeat_interleave(torch.arange(len(n), device=n.device), n)  # (F,)
    start, wr, base = torch.stack([n.cumsum(0) - n, w, r0 * res + c0]).index_select(1, rect)  # (F,) each
    local = torch.arange(len(rect), device=n.device) - start  # index within its rectangle
    # row = local // w in float32: exact, as (local + 0.5) / w lies >= 0.5 / w from an integer
    # (and int64 division is not vectorised)
    row = ((local + 0.5) / wr).floor_().long()
    return rect, base + row * (res - wr) + local


def _clevr_bounds(centre, radius, height, cam, shadow):
    """Pixel rows/columns (r0, r1, c0, c1) (N,) that may see objects standing on the ground inside
    the vertical box centre (N, 2) +- radius, z in [0, height] (or, with shadow=True, that box swept
    along the sun's rays down to the ground), from its projected corners."""
    n, dev = len(centre), centre.device
    sx = torch.tensor([-1.0, 1.0, -1.0, 1.0], device=dev)
    sy = torch.tensor([-1.0, -1.0, 1.0, 1.0], device=dev)
    foot = centre[:, None, :] + radius[:, None, None] * torch.stack([sx, sy], 1)  # (N, 4, 2)
    z = torch.zeros(n, 4, 1, device=dev)
    pts = [torch.cat([foot, z], -1), torch.cat([foot, z + height[:, None, None]], -1)]
    if shadow:  # where the top's shadow falls on the ground
        shift = -cam.sun[:2] / cam.sun[2] * height[:, None, None]  # (N, 1, 2)
        pts.append(torch.cat([foot + shift, z], -1))
    x, y, _ = cam.project(torch.cat(pts, 1))  # (N, 8 or 12)
    res = cam.res
    # pixel j's centre is at (j + 0.5) / res: the corners' hull covers pixels ceil(x res - 0.5) ..
    eps = 1e-3  # a sliver of slack for rounding; exactness is kept by the intersection tests
    c0 = torch.ceil(x.min(1).values * res - 0.5 - eps).long().clamp(min=0)
    c1 = torch.floor(x.max(1).values * res - 0.5 + eps).long().clamp(max=res - 1)
    r0 = torch.ceil(y.min(1).values * res - 0.5 - eps).long().clamp(min=0)
    r1 = torch.floor(y.max(1).values * res - 0.5 + eps).long().clamp(max=res - 1)
    return r0, r1, c0, c1


def _clevr_params(scene, cam):
    """Per-object constants of the intersection tests, (12, B*6), object o = 6 b + k.
    Rows: L = C - O (3), radius or half side, height, cos yaw, sin yaw, |L|^2 - r^2,
    |L_xy|^2 - r^2, L along the box's two ground axes, height - O_z."""
    half, pos = scene["half"].reshape(-1), scene["pos"].reshape(-1, 2)
    o = cam.o
    lx, ly, lz = pos[:, 0] - o[0], pos[:, 1] - o[1], half - o[2]  # the centre is at height `half`
    cos, sin = scene["cos"].reshape(-1), scene["sin"].reshape(-1)
    lxy2 = lx * lx + ly * ly
    return torch.stack([lx, ly, lz, half, 2 * half, cos, sin, lxy2 + lz * lz - half * half, lxy2 - half * half,
                        cos * lx + sin * ly, cos * ly - sin * lx, 2 * half - o[2]])


def _hit_sphere(p, d, oz):
    """Depth t (F,) of the first hit of rays d (7, F) (camera table rows) with spheres p (12, F); inf if missed.
    |t d - L|^2 = r^2:  t = (b - sqrt(b^2 - a c)) / a, a = |d|^2, b = d.L, c = |L|^2 - r^2."""
    b = d[0] * p[0] + d[1] * p[1] + d[2] * p[2]
    disc = b * b - d[4] * p[7]
    t = (b - disc.clamp(min=0).sqrt()) / d[4]
    return torch.where(disc >= 0, t, math.inf)


def _hit_cylinder(p, d, oz):
    """Vertical cylinders of radius r, z in [0, h]: the side (the quadratic in x, y) where the
    entry point's height is in [0, h], else the top cap (the plane z = h within radius r)."""
    b = d[0] * p[0] + d[1] * p[1]
    disc = b * b - d[3] * p[8]
    ts = (b - disc.clamp(min=0).sqrt()) / d[3]
    zs = oz + ts * d[2]
    side = (disc >= 0) & (zs <= p[4]) & (zs >= 0)
    tc = p[11] * d[5]  # (h - O_z) / d_z
    ex, ey = tc * d[0] - p[0], tc * d[1] - p[1]
    cap = (ex * ex + ey * ey <= p[3] * p[3]) & (zs > p[4])
    return torch.where(side, ts, torch.where(cap, tc, math.inf))


def _hit_cube(p, d, oz):
    """Boxes of half side a, rotated by yaw about the vertical: slabs along the two ground axes
    (u.(t d - L) in [-a, a]) and z in [0, h]; hit where the latest entry precedes the earliest exit."""
    q1 = p[5] * d[0] + p[6] * d[1]  # ray direction along the box axes
    q2 = p[5] * d[1] - p[6] * d[0]
    i1, i2 = 1 / q1, 1 / q2
    ta, tb = (p[9] - p[3]) * i1, (p[9] + p[3]) * i1
    tc, td = (p[10] - p[3]) * i2, (p[10] + p[3]) * i2
    near = torch.maximum(torch.maximum(torch.minimum(ta, tb), torch.minimum(tc, td)), p[11] * d[5])
    far = torch.minimum(torch.minimum(torch.maximum(ta, tb), torch.maximum(tc, td)), d[6])  # d[6]: ground
    return torch.where(near <= far, near, math.inf)


_HITS = (_hit_cube, _hit_sphere, _hit_cylinder)
_NO_HIT = 0x7F800000 << _ID_BITS  # depth key of +inf, id 0: pixels keeping it see the ground (a
# missed ray's key, +inf or NaN bits with the object's id, is larger)


def _clevr_depth(scene, cam):
    """First hit of every pixel: depth keys (B, P) int64, (float32 bits of t) << 3 | mask id, so
    the smallest key is the nearest object (ties: the lower id); _NO_HIT where no object is hit.
    Only the pixels inside each object's projected bounding box are tested."""
    present, shape = scene["present"].reshape(-1), scene["shape"].reshape(-1)
    B, K = scene["shape"].shape
    P, dev = cam.res * cam.res, present.device
    par = _clevr_params(scene, cam)
    keys = torch.full((B * P,), _NO_HIT, dtype=torch.int64, device=dev)
    for s, hit in enumerate(_HITS):
        objs = torch.nonzero(present & (shape == s))[:, 0]  # (n,) objects o = 6 b + k
        r0, r1, c0, c1 = _clevr_bounds(scene["pos"].reshape(-1, 2)[objs], par[3, objs], par[4, objs], cam, False)
        rect, pix = _rectangles(r0, r1, c0, c1, cam.res)  # (F,) each
        t = hit(par[:, objs].index_select(1, rect), cam.table[:7].index_select(1, pix), cam.o[2].item())
        ids, at = torch.stack([objs % K + 1, objs // K * P]).index_select(1, rect)  # mask id, image offset
        keys.scatter_reduce_(0, at + pix, (t.view(torch.int32).long() << _ID_BITS) | ids, "amin")
    return keys.reshape(B, P)


def _shadow_sphere(p, x, sun):
    """Whether the ray X + s sun (s > 0) from surface points X meets spheres p (12, F); x = X - C
    (3, F): with b = -x.sun, b > 0 and b^2 >= |x|^2 - r^2."""
    b = -(x[0] * sun[0] + x[1] * sun[1] + x[2] * sun[2])
    return (b > 0) & (b * b >= x[0] * x[0] + x[1] * x[1] + x[2] * x[2] - p[3] * p[3])


def _prism_segment(p, x, sun):
    """A vertical prism on the ground is crossed by the ray x + s sun iff, in plan view, the ray's
    ground track from height x_z up to the top h, x_xy + (z - x_z) sun_xy / sun_z, meets its
    footprint. x = X - C (3, F). Returns the track's start and extent relative to the centre in
    plan view, and whether X is below the top."""
    rise = (p[3] - x[2]) / sun[2]  # (h - X_z) / sun_z: the centre is at height h / 2 = p[3]
    return x[0], x[1], rise * sun[0], rise * sun[1], rise > 0


def _shadow_cylinder(p, x, sun):
    """Track from a to a + e (relative to the axis) within radius r: the closest point a + s e,
    s = clamp(-a.e / e.e, 0, 1)."""
    ax, ay, ex, ey, up = _prism_segment(p, x, sun)
    s = (-(ax * ex + ay * ey) / (ex * ex + ey * ey)).clamp(0, 1)
    cx, cy = ax + s * ex, ay + s * ey
    return up & (cx * cx + cy * cy <= p[3] * p[3])


def _shadow_cube(p, x, sun):
    """Track within the rotated square |u|, |v| <= a (Liang-Barsky clipping of s in [0, 1])."""
    ax, ay, ex, ey, up = _prism_segment(p, x, sun)
    cos, sin, a = p[5], p[6], p[3]
    lo, hi = torch.zeros_like(ax), torch.ones_like(ax)
    for start, ext in ((cos * ax + sin * ay, cos * ex + sin * ey), (cos * ay - sin * ax, cos * ey - sin * ex)):
        t0, t1 = (-a - start) / ext, (a - start) / ext
        lo, hi = torch.maximum(lo, torch.minimum(t0, t1)), torch.minimum(hi, torch.maximum(t0, t1))
    return up & (lo <= hi)


_SHADOWS = (_shadow_cube, _shadow_sphere, _shadow_cylinder)


def _depth_of(keys):
    """Depth t (float32) from depth keys (any shape)."""
    return (keys >> _ID_BITS).to(torch.int32).view(torch.float32)


def _clevr_shadows(scene, cam, keys, mask):
    """Whether the sun is hidden from the surface each pixel sees: bool (B*P,). The pixels in
    each object's shadow box test one ray towards the sun against that object (an object's own
    surface is left to its Lambert term: a convex solid cannot shadow itself)."""
    present, shape = scene["present"].reshape(-1), scene["shape"].reshape(-1)
    B, K = scene["shape"].shape
    P, dev = cam.res * cam.res, present.device
    par = _clevr_params(scene, cam)
    flat_mask, flat_keys = mask.reshape(-1), keys.reshape(-1)
    shadow = torch.zeros(B * P, dtype=torch.bool, device=dev)
    for s, test in enumerate(_SHADOWS):
        objs = torch.nonzero(present & (shape == s))[:, 0]
        r0, r1, c0, c1 = _clevr_bounds(scene["pos"].reshape(-1, 2)[objs], par[3, objs], par[4, objs], cam, True)
        rect, pix = _rectangles(r0, r1, c0, c1, cam.res)
        ids, at = torch.stack([objs % K + 1, objs // K * P]).index_select(1, rect)
        at = at + pix  # (F,) flat pixel of the batch
        seen = flat_mask.index_select(0, at)  # the id each pixel sees
        keep = torch.nonzero(seen != ids)[:, 0]  # not the object's own surface
        rect, pix, at, seen = torch.stack([rect, pix, at, seen]).index_select(1, keep)
        d = cam.table[:7].index_select(1, pix)  # (7, F)
        t = torch.where(seen > 0, _depth_of(flat_keys.index_select(0, at)), d[6])
        p = par[:, objs].index_select(1, rect)
        x = [t * d[i] - p[i] for i in range(3)]  # the surface point relative to the object's centre
        shadow[at[test(p, torch.stack(x), cam.sun)]] = True
    return shadow


def _clevr_normals(shape, rel, half, cos, sin):
    """Outward unit normals (3, F) at surface points rel = X - C (3, F): a sphere's radial one; a
    cylinder's top (strictly inside the rim) or radial side; a box's face whose axis holds the
    largest |coordinate| (every face is at distance `half` from the centre)."""
    zero, one = torch.zeros_like(half), torch.ones_like(half)
    sphere = rel / half
    top = rel[0] ** 2 + rel[1] ** 2 < (half * (1 - 1e-3)) ** 2
    cylinder = torch.where(top, torch.stack([zero, zero, one]), torch.stack([rel[0], rel[1], zero]) / half)
    q1, q2 = cos * rel[0] + sin * rel[1], cos * rel[1] - sin * rel[0]
    a1, a2, a3 = q1.abs(), q2.abs(), rel[2].abs()
    cube = torch.where((a3 >= a1) & (a3 >= a2), torch.stack([zero, zero, torch.sign(rel[2])]),
                       torch.where(a1 >= a2, torch.sign(q1) * torch.stack([cos, sin, zero]),
                                   torch.sign(q2) * torch.stack([-sin, cos, zero])))
    return torch.where(shape == 0, cube, torch.where(shape == 1, sphere, cylinder))


def _render_clevr_lite(seed, split, idx, cam):
    """A batch of clevr-lite items for indices idx (B,) (see ClevrLiteDataset).

    CLEVR re-draws a scene until every object is placed and shows >= 200 pixels (320x240 frame);
    here a scene is re-drawn (attempt a uses the independent stream "clevr-lite/a") until every
    drawn object is placed and shows >= 200 * (res / 192)^2 pixels (the same area in the crop),
    at most _CLEVR_ATTEMPTS times; the last attempt is kept as it is.
    """
    B, K, P, dev = len(idx), 6, cam.res * cam.res, idx.device
    need = _CLEVR_MIN_PIXELS * (cam.res / _CLEVR_CROP[2]) ** 2  # CLEVR's area, in this view's pixels
    pending = torch.arange(B, device=dev)
    for attempt in range(_CLEVR_ATTEMPTS):
        u = _uniforms(seed, f"clevr-lite/{attempt}", split, idx[pending], 1 + K * _CLEVR_DRAWS)
        sc = _clevr_scene(u, cam)
        k = _clevr_depth(sc, cam)  # (n, P)
        m = k & _ID_MASK
        sc["counts"] = torch.zeros(len(m), K + 1, dtype=torch.int64, device=dev).scatter_add_(
            1, m, torch.ones(1, 1, dtype=torch.int64, device=dev).expand_as(m))  # (n, 7) pixels per id
        drawn = 3 + (u[:, 0] * 4).long()  # objects drawn (the placed ones come first)
        ok = (sc["present"].sum(1) == drawn) & ((sc["counts"][:, 1:] >= need) | ~sc["present"]).all(1)
        if attempt == 0:
            scene, keys = sc, k
        else:  # replace the failed scenes of the previous attempt
            ok |= attempt == _CLEVR_ATTEMPTS - 1
            for key, v in sc.items():
                scene[key][pending[ok]] = v[ok]
            keys[pending[ok]] = k[ok]
        pending = pending[~ok]
        if not len(pending):
            break

    mask = keys & _ID_MASK  # (B, P); the ground's key _NO_HIT has id 0
    shadow = _clevr_shadows(scene, cam, keys, mask)  # (B*P,)
    image = cam.floor_lit.repeat(B, 1, 1)  # (B, 3, P)
    dark = torch.nonzero((shadow & (mask.reshape(-1) == 0)).reshape(B, P))  # (S, 2) ground in shadow
    image[dark[:, :1], :, dark[:, 1:]] = cam.floor_dark.T[dark[:, 1:]]
    at = torch.nonzero(mask.reshape(-1) > 0)[:, 0]  # (F,) object pixels
    b = torch.div(at, P, rounding_mode="floor")
    pix, obj = at - b * P, b * K + mask.reshape(-1).index_select(0, at) - 1
    d = cam.table.index_select(1, pix)  # (10, F)
    x = cam.o[:, None] + _depth_of(keys.reshape(-1).index_select(0, at)) * d[:3]  # (3, F) surface points
    per_object = torch.cat([scene["pos"].reshape(-1, 2).T, torch.stack([scene[k].reshape(-1).float() for k in (
        "half", "cos", "sin", "shape", "material")]), _CLEVR_COLOURS.to(dev)[scene["colour"].reshape(-1)].T])  # (10, N)
    cx, cy, half, cos, sin, shape, metal, *albedo = per_object.index_select(1, obj)  # (F,) each
    normal = _clevr_normals(shape, x - torch.stack([cx, cy, half]), half, cos, sin)
    rgb = _clevr_shade(x, normal, d[7:], torch.stack(albedo), metal == 1, shadow.index_select(0, at))
    image[b, :, pix] = rgb.T

    present = scene["present"]
    visible = torch.cat([torch.ones(B, 1, dtype=torch.bool, device=dev),
                         present & (scene["counts"][:, 1:] >= _MIN_VISIBLE)], 1)
    position = torch.cat([scene["pos"], scene["half"][..., None]], -1) * present[..., None]  # (B, K, 3)
    px, py, _ = cam.project(position)
    col = lambda bg, v: torch.cat([torch.full((B, 1) + v.shape[2:], bg, dtype=v.dtype, device=dev), v], 1)
    absent = ~present
    return {
        "image": image.reshape(B, 3, cam.res, cam.res), "mask": mask.reshape(B, cam.res, cam.res), "visible": visible,
        "shape": col(-1, scene["shape"].masked_fill(absent, -1)),
        "color": torch.cat([cam.floor_colour.expand(B, 1, 3),
                            _CLEVR_COLOURS.to(dev)[scene["colour"]] * present[..., None]], 1),
        "scale": col(0.0, scene["size"] * present), "x": col(0.5, px * present), "y": col(0.5, py * present),
        "material": col(-1, scene["material"].masked_fill(absent, -1)),
        "position": col(0.0, position), "rotation": col(0.0, torch.rad2deg(scene["yaw"]) * present),
    }


class ClevrLiteDataset(torch.utils.data.Dataset):
    """clevr-lite (see the section comment above): item i is a pure function of (seed, split, i).

    image float32 (B, 3, H, W) in [0, 1]; mask int64 (B, H, W): 0 = ground, object j (drawing
    order) = j + 1, the first surface each pixel's ray hits. Per entity e in 0..6 (0 = ground):
    visible bool (>= 5 pixels in the mask), shape int64 (0 cube, 1 sphere, 2 cylinder; -1 ground
    or absent), color float32 (.., 3) CLEVR's RGB (the ground: its mean shaded colour), scale
    (CLEVR size: 0.35 small, 0.7 large), x, y (the projected 3D centre in [0, 1], x = column,
    y = row; ground 0.5), material int64 (0 rubber, 1 metal), position float32 (.., 3) the 3D
    centre in CLEVR's world coordinates (z up, ground z = 0; CLEVR's 3d_coords), rotation
    (yaw in degrees, CLEVR's convention). Absent objects: shape and material -1, the rest 0.
    """

    def __init__(self, split, resolution, seed, size, device):
        self.name, self.split, self.seed, self.device = "clevr-lite", split, seed, torch.device(device)
        self.native_resolution = 64
        self.resolution = resolution or self.native_resolution
        self.size = _DEFAULT_SIZE[split] if size is None else size
        self.max_objects, self.num_background, self.has_masks = 6, 1, True
        self.properties = ("visible", "shape", "color", "scale", "x", "y", "material", "position", "rotation")

    def __len__(self):
        return self.size

    __getitem__, __getitems__ = _sample, _samples  # one sample; a list of samples (plain DataLoader)

    def get_batch(self, indices):
        """A batch for a list of indices (negative indices count from the end), rendered in
        chunks of _CLEVR_CHUNK images."""
        idx = torch.as_tensor(indices, dtype=torch.int64).reshape(-1)
        if len(idx) and (idx.min() < -self.size or idx.max() >= self.size):
            raise IndexError(f"{self.name}/{self.split}: index out of range for {self.size} items")
        idx = torch.where(idx < 0, idx + self.size, idx).to(self.device)
        cam = _clevr_camera(self.resolution, self.device)
        if len(idx) <= _CLEVR_CHUNK:
            return _render_clevr_lite(self.seed, self.split, idx, cam)
        parts = [_render_clevr_lite(self.seed, self.split, idx[i: i + _CLEVR_CHUNK], cam)
                 for i in range(0, len(idx), _CLEVR_CHUNK)]
        return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


# --- Real datasets

# Every real dataset turns a list of indices into one batch dict with a single
# vectorised crop/resize; only reading files from disk loops (one file per image).
# A dataset object holds no open file handle when pickled, so DataLoader workers
# (fork or spawn) each open their own lazily.

PROPERTIES = ("visible", "shape", "color", "scale", "x", "y")  # per-entity keys of DESIGN.md
_PROPERTY_DTYPES = {"visible": torch.bool, "shape": torch.int64, "color": torch.float32,
                    "scale": torch.float32, "x": torch.float32, "y": torch.float32}
_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def _check_options(path, options, allowed):
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise DataError(f"{path}: unknown option(s) {', '.join(unknown)}; "
                        f"expected only {', '.join(allowed) or 'none'}")


def _images_to_float(images):
    """uint8 (B, H, W, C) array/tensor, C in {1, 3, 4} -> float32 (B, 3, H, W) in [0, 1]."""
    x = torch.as_tensor(np.ascontiguousarray(images))
    x = x[..., :3] if x.shape[-1] >= 3 else x.expand(*x.shape[:-1], 3)
    return x.permute(0, 3, 1, 2).float().div_(255.0)  # (B, 3, H, W)


def _resize_images(x, height, width, mode="bilinear", antialias=True):
    """float (B, 3, h, w) -> (B, 3, height, width), clamped to [0, 1] (bicubic overshoots)."""
    if x.shape[-2:] == (height, width):
        return x
    x = F.interpolate(x, size=(height, width), mode=mode, align_corners=False, antialias=antialias)
    return x.clamp_(0.0, 1.0)


def _nearest_index(n_in, n_out):
    """int64 (n_out,): the input pixel each output pixel copies in PyTorch's "nearest-exact"
    resize, floor((i + 0.5) * n_in / n_out) with PyTorch's float32 scale (pixel centres;
    the operation of OCLF's ResizeNearestExact), read off by resizing a ramp."""
    ramp = torch.arange(n_in, dtype=torch.float32).view(1, 1, n_in)
    return F.interpolate(ramp, size=n_out, mode="nearest-exact")[0, 0].long()


def _resize_masks(mask, height, width):
    """Nearest-exact resize of an integer map (B, h, w) -> (B, height, width), by index
    gathering, so ids stay exact integers."""
    h, w = mask.shape[-2:]
    if (h, w) == (height, width):
        return mask
    return mask[:, _nearest_index(h, height)][:, :, _nearest_index(w, width)]


def _centre_square(h, w):
    """(top, left, side) of the largest centred square of an h x w image."""
    side = min(h, w)
    return (h - side) // 2, (w - side) // 2, side


def _present(mask, num_entities):
    """bool (B, E): which ids 0..E-1 occur in the integer map (B, H, W) (-1 ignored).
    One bincount over offset ids instead of a loop over images."""
    b = mask.shape[0]
    flat = mask.reshape(b, -1).long()  # (B, H*W)
    ok = (flat >= 0) & (flat < num_entities)
    offset = torch.arange(b).unsqueeze(1) * num_entities  # (B, 1)
    counts = torch.bincount((flat + offset)[ok], minlength=b * num_entities)
    return counts.reshape(b, num_entities) > 0


def _index_split(path, n, split, val_size, test_size):
    """Indices of `split` in a single file of n images: test = the last t, val the t
    before those, train the rest, t = min(1000, n // 10) unless given."""
    t_default = min(1000, n // 10)
    try:
        val = t_default if val_size is None else int(val_size)
        test = t_default if test_size is None else int(test_size)
    except (TypeError, ValueError):
        raise DataError(f"{path}: val_size={val_size!r}, test_size={test_size!r}; expected "
                        f"integers") from None
    if val < 0 or test < 0 or val + test >= n:
        raise DataError(f"{path}: cannot cut val_size={val} and test_size={test} "
                        f"from {n} images; expected val_size + test_size < {n}")
    bounds = {"train": (0, n - val - test), "val": (n - val - test, n - test), "test": (n - test, n)}
    lo, hi = bounds[split]
    return np.arange(lo, hi)


def _finish_batch(images, mask, size, props=None):
    """Resize a cropped batch to size x size (images bilinear, masks nearest) and
    attach the per-entity arrays converted to the contract's dtypes."""
    out = {"image": _resize_images(images, size, size), "mask": _resize_masks(mask.long(), size, size)}
    for key, value in (props or {}).items():
        out[key] = torch.as_tensor(np.ascontiguousarray(value)).to(_PROPERTY_DTYPES[key])
    return out


class NpzDataset(torch.utils.data.Dataset):
    """Arrays in a `.npz` file: `image` uint8 (N, H, W, 3), `mask` integer (N, H, W)
    with 0 = background, optional per-entity arrays named as in PROPERTIES,
    (N, E) or (N, E, 3) for `color`. A single file is split by index (see
    `_index_split`; options val_size, test_size); a folder holds one file per split.
    Non-square images are centre-cropped to a square; resolution None keeps the side.
    """

    def __init__(self, path, split, resolution=None, file=None, val_size=None, test_size=None):
        file = path if file is None else file
        try:
            with np.load(file, allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
        except Exception as e:
            raise DataError(f"{file}: not a readable .npz archive ({type(e).__name__}); "
                            f"expected arrays 'image' and 'mask'") from None
        for key in ("image", "mask"):
            if key not in arrays:
                raise DataError(f"{file}: missing array {key!r}; expected 'image' uint8 (N,H,W,3) "
                                f"and 'mask' integer (N,H,W)")
        image, mask = arrays["image"], arrays["mask"]
        if image.dtype != np.uint8 or image.ndim != 4 or image.shape[-1] != 3:
            raise DataError(f"{file}: 'image' is {image.dtype} {image.shape}; expected uint8 (N,H,W,3)")
        if not np.issubdtype(mask.dtype, np.integer) or mask.shape != image.shape[:3]:
            raise DataError(f"{file}: 'mask' is {mask.dtype} {mask.shape}; expected integer "
                            f"{image.shape[:3]}")
        n = len(image)
        props = {k: arrays[k] for k in PROPERTIES if k in arrays}
        num_entities = int(mask.max()) + 1 if n else 1
        for key, value in props.items():
            want = 3 if key == "color" else 2
            if value.ndim != want or value.shape[0] != n or (key == "color" and value.shape[2] != 3):
                raise DataError(f"{file}: {key!r} has shape {value.shape}; expected "
                                f"(N, E{', 3' if key == 'color' else ''}) with N = {n}")
        widths = {v.shape[1] for v in props.values()}
        if len(widths) > 1:
            raise DataError(f"{file}: per-entity arrays disagree on E ({sorted(widths)}); expected one E")
        if widths:
            (e,) = widths
            if num_entities > e:
                raise DataError(f"{file}: mask ids reach {num_entities - 1} but per-entity arrays "
                                f"have E = {e}; expected ids < E")
            num_entities = e
        idx = np.arange(n) if file != path else _index_split(file, n, split, val_size, test_size)
        self.images, self.masks = image[idx], mask[idx]
        self.props = {k: v[idx] for k, v in props.items()}
        self.name = Path(file).stem if file == path else Path(path).name
        self.num_background, self.max_objects, self.has_masks = 1, max(num_entities - 1, 0), True
        self.properties = tuple(self.props)
        self.crop = _centre_square(*image.shape[1:3])
        self.resolution = resolution or self.crop[2]

    def __len__(self):
        return len(self.images)

    __getitem__, __getitems__ = _sample, _samples

    def get_batch(self, indices):
        t, l, s = self.crop
        idx = np.asarray(indices)
        images = _images_to_float(self.images[idx, t:t + s, l:l + s])
        mask = torch.from_numpy(self.masks[idx, t:t + s, l:l + s].astype(np.int64))
        return _finish_batch(images, mask, self.resolution, {k: v[idx] for k, v in self.props.items()})


# HDF5 variants of the DeepMind multi-object datasets, recognised from the file name.
_H5_VARIANTS = {"objects_room": 4, "clevr": 1, "tetrominoes": 1, "multi_dsprites": 1, "generic": 1}
_H5_NAME_HINTS = (("objects_room", "objects_room"), ("clevr", "clevr"),
                  ("tetromino", "tetrominoes"), ("dsprites", "multi_dsprites"))
_CLEVR_SIZE, _CLEVR_CROP = (240, 320), (29, 64, 192)  # rows 29:221, cols 64:256
_H5_PROPERTY_KEYS = {"visibility": "visible", "shape": "shape", "color": "color",
                     "scale": "scale", "x": "x", "y": "y"}
_SCAN_CHUNK = 256  # images per chunk when counting objects from masks at open time


def _optional_import(module, path):
    """An optional dependency, imported when a file needs it (h5py, pycocotools.mask)."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise DataError(f"reading {path} needs {module.split('.')[0]}: pip install -r "
                        f"requirements-extra.txt") from None


def _import_h5py(path):
    return _optional_import("h5py", path)


def _read_rows(dataset, idx, *slices):
    """dataset[idx, *slices] for any index order: h5py wants increasing unique indices."""
    idx = np.asarray(idx)
    uniq, inverse = np.unique(idx, return_inverse=True)
    return dataset[(uniq.tolist(),) + slices][inverse]


class H5Dataset(torch.utils.data.Dataset):
    """A DeepMind multi-object dataset converted to HDF5, in either public layout:

    (a) flat: `image` (N, H, W, C) uint8, `mask` (N, H, W, 1) categorical entity index,
        optional `visibility` (N, E) and property keys x, y, shape, color (N, E, 3),
        scale; one file split by index (options val_size, test_size).
    (b) grouped: `{split}/imgs` (N, H, W, C), `{split}/masks` (N, O, H, W, 1) in
        {0, 255}; mask id = index of the last object whose mask is set (object 0
        is the background); pixels no object covers get -1.

    Variant (from the file name, option `variant`): objects_room has
    num_background 4; clevr is cropped rows 29:221, cols 64:256 (when 240x320)
    and resized to 128 by default, keeping only images with at most
    `max_objects` visible objects (default 6 = CLEVR6; None keeps all; the
    option filters any variant, default None elsewhere). The kept index list
    is computed once at open time, from `visibility` or else from the masks.
    `visible` = the file's visibility (if any) AND present in the output mask, so
    it describes what the returned image shows. A non-square image (other than
    CLEVR) is centre-cropped to a square.
    """

    def __init__(self, path, split, resolution=None, variant=None, max_objects="default",
                 val_size=None, test_size=None):
        h5py = _import_h5py(path)
        if variant is None:
            lower = path.name.lower()
            variant = next((v for hint, v in _H5_NAME_HINTS if hint in lower), "generic")
        if variant not in _H5_VARIANTS:
            raise DataError(f"{path}: unknown variant {variant!r}; expected one of {', '.join(_H5_VARIANTS)}")
        if max_objects == "default":
            max_objects = 6 if variant == "clevr" else None
        if max_objects is not None and not (isinstance(max_objects, int) and max_objects >= 0):
            raise DataError(f"{path}: max_objects={max_objects!r}; expected a count >= 0 or None")
        self.path, self.split, self.variant, self._file, self._pid = path, split, variant, None, None
        self.num_background, self.has_masks = _H5_VARIANTS[variant], True
        try:
            with h5py.File(path, "r") as f:
                self._inspect(f, split, val_size, test_size, max_objects)
        except DataError:
            raise
        except Exception as e:  # not HDF5, truncated, unreadable dataset
            raise DataError(f"{path}: cannot read as HDF5 ({type(e).__name__}: {e}); expected a "
                            f"DeepMind multi-object HDF5 file") from None
        h, w = self.native
        if variant == "clevr" and (h, w) == _CLEVR_SIZE:
            self.crop = _CLEVR_CROP
        else:
            self.crop = _centre_square(h, w)
        default = 128 if variant == "clevr" else self.crop[2]
        self.resolution = resolution or default
        self.name = variant if variant != "generic" else path.stem

    def _inspect(self, f, split, val_size, test_size, max_objects):
        """Find the layout, check shapes, pick this split's indices (CLEVR6 filter)."""
        p, h5py = self.path, _import_h5py(self.path)
        if "image" in f and "mask" in f:
            self.layout, self.image_key, self.mask_key = "flat", "image", "mask"
            group = f
            n = f["image"].shape[0]
            base = _index_split(p, n, split, val_size, test_size)
        elif split in f and isinstance(f[split], h5py.Group):
            if val_size is not None or test_size is not None:
                raise DataError(f"{p}: has {{train,val,test}} groups; val_size/test_size apply "
                                f"only to a flat file")
            group = f[split]
            if "imgs" not in group or "masks" not in group:
                raise DataError(f"{p}: group {split!r} lacks 'imgs' or 'masks'; expected "
                                f"{split}/imgs (N,H,W,C) and {split}/masks (N,O,H,W,1)")
            self.layout = "grouped"
            self.image_key, self.mask_key = f"{split}/imgs", f"{split}/masks"
            n = group["imgs"].shape[0]
            base = np.arange(n)
        else:
            raise DataError(f"{p}: expected keys 'image' and 'mask' (flat layout) or a group "
                            f"{split!r} with 'imgs' and 'masks'; found {sorted(f.keys())}")
        image, mask = f[self.image_key], f[self.mask_key]
        if image.ndim != 4 or image.shape[-1] not in (1, 3, 4) or image.dtype != np.uint8:
            raise DataError(f"{p}: {self.image_key!r} is {image.dtype} {image.shape}; "
                            f"expected uint8 (N,H,W,C)")
        n, h, w = image.shape[:3]
        if self.layout == "flat":
            ok = mask.shape[:3] == (n, h, w) and mask.ndim in (3, 4) and mask.shape[3:] in ((), (1,))
            expect = f"({n},{h},{w},1)"
        else:
            ok = mask.ndim == 5 and mask.shape[0] == n and mask.shape[2:] == (h, w, 1)
            expect = f"({n},O,{h},{w},1)"
        if not ok or not np.issubdtype(mask.dtype, np.integer):
            raise DataError(f"{p}: {self.mask_key!r} is {mask.dtype} {mask.shape}; expected integer {expect}")
        self.native = (h, w)
        # Per-entity arrays: only the keys DESIGN.md names; a categorical colour (N, E)
        # (CLEVR's colour index) is not the contract's RGB, so it is left out.
        self.prop_keys = {}
        for key, out in _H5_PROPERTY_KEYS.items():
            if key in group and isinstance(group[key], h5py.Dataset):
                arr = group[key]
                if key == "color" and arr.ndim == 2:
                    continue
                rgb = key == "color"
                if arr.shape[0] != n or arr.ndim != 2 + rgb or (rgb and arr.shape[2] != 3):
                    raise DataError(f"{p}: {key!r} has shape {arr.shape}; expected "
                                    f"(N, E{', 3' if key == 'color' else ''}) with N = {n}")
                self.prop_keys[out] = group.name.rstrip("/") + "/" + key
        widths = {f[k].shape[1] for k in self.prop_keys.values()}
        if self.layout == "grouped":
            widths.add(mask.shape[1])
        if len(widths) > 1:
            raise DataError(f"{p}: per-entity arrays disagree on E ({sorted(widths)}); expected one E")
        self.num_entities = widths.pop() if widths else None
        if self.num_entities is None:  # flat file without properties: scan the masks once
            chunks = range(0, n, _SCAN_CHUNK)
            self.num_entities = 1 + max(int(mask[i:i + _SCAN_CHUNK].max()) for i in chunks)
        self.max_objects = max(self.num_entities - self.num_background, 0)
        if max_objects is not None:
            counts = self._count_objects(f, base)
            base = base[counts <= max_objects]
            self.max_objects = min(self.max_objects, int(max_objects))
        self.indices = base

    def _count_objects(self, f, idx):
        """Number of visible non-background objects of each image in idx, from
        `visibility` if the file has it, else from the masks, in chunks."""
        nb = self.num_background
        if "visible" in self.prop_keys:
            vis = f[self.prop_keys["visible"]][:]  # (N, E), small
            return (vis[idx, nb:] > 0).sum(1)
        counts = []
        for lo in range(0, len(idx), _SCAN_CHUNK):
            chunk = idx[lo: lo + _SCAN_CHUNK]
            m = f[self.mask_key][chunk[0]: chunk[-1] + 1][chunk - chunk[0]]
            if self.layout == "flat":
                present = _present(torch.from_numpy(m.reshape(len(chunk), *self.native).astype(np.int64)),
                                   self.num_entities).numpy()  # (n, E)
            else:
                present = (m > 127).any(axis=(2, 3, 4))  # (n, O)
            counts.append(present[:, nb:].sum(1))
        return np.concatenate(counts) if counts else np.zeros(0, dtype=np.int64)

    def __getstate__(self):
        return {**self.__dict__, "_file": None, "_pid": None}  # workers reopen the file

    def _h5(self):
        if self._file is None or self._pid != os.getpid():
            self._file = _import_h5py(self.path).File(self.path, "r")
            self._pid = os.getpid()
        return self._file

    def __len__(self):
        return len(self.indices)

    __getitem__, __getitems__ = _sample, _samples

    def get_batch(self, indices):
        f = self._h5()
        idx = self.indices[np.asarray(indices)]
        t, l, s = self.crop
        rows, cols = slice(t, t + s), slice(l, l + s)
        images = _images_to_float(_read_rows(f[self.image_key], idx, rows, cols))
        if self.layout == "flat":
            m = _read_rows(f[self.mask_key], idx, rows, cols)
            mask = torch.from_numpy(m.reshape(len(idx), s, s).astype(np.int64))
        else:
            on = torch.from_numpy(_read_rows(f[self.mask_key], idx, slice(None), rows, cols)[..., 0] > 127)
            o = on.shape[1]  # (B, O, s, s)
            last = o - 1 - on.flip(1).int().argmax(1)  # index of the last object set
            mask = torch.where(on.any(1), last, torch.full_like(last, -1)).long()
        props = {k: _read_rows(f[key], idx) for k, key in self.prop_keys.items()}
        out = _finish_batch(images, mask, self.resolution, props)
        shown = _present(out["mask"], self.num_entities)  # (B, E)
        out["visible"] = out["visible"] & shown if "visible" in out else shown
        return out

    @property
    def properties(self):
        return tuple(dict.fromkeys(("visible",) + tuple(self.prop_keys)))


def _open_image(file, mode="RGB"):
    """A PIL image file as a uint8 array (H, W, 3) (mode RGB) or (H, W) (mode None: as stored)."""
    try:
        with Image.open(file) as im:
            return np.array(im.convert(mode) if mode else im)  # a writable copy for torch
    except Exception as e:
        raise DataError(f"{file}: unreadable image ({type(e).__name__}); expected a PNG or JPEG") from None


_CLEVRTEX_SIZE, _CLEVRTEX_CROP = (240, 320), 192


class ClevrTexDataset(torch.utils.data.Dataset):
    """ClevrTex: `clevrtex_<variant>/<i//1000>/CLEVRTEX_<variant>_<i:06d>.png` with the
    label map `..._flat.png` (0 = background, objects 1..10), 320x240. Centre crop
    192, resize to `resolution` (default 128). Splits by position in the sorted
    index list: test 0-10 %, val 10-20 %, train 20-100 %. `path` is the
    `clevrtex_<variant>` folder or a folder holding it; variant full/outd/camo/...
    comes from the folder name or the option `variant`.
    """

    def __init__(self, path, split, resolution=None, variant=None):
        folder = path
        if not path.name.lower().startswith("clevrtex_"):
            subs = sorted(p for p in path.iterdir() if p.is_dir() and p.name.lower().startswith("clevrtex_"))
            names = {p.name.lower()[len("clevrtex_"):]: p for p in subs}
            if variant is None:
                variant = "full" if "full" in names or len(names) != 1 else next(iter(names))
            if variant not in names:
                raise DataError(f"{path}: no clevrtex_{variant} folder; expected one of "
                                f"{', '.join(p.name for p in subs) or 'clevrtex_<variant>'}")
            folder = names[variant]
        elif variant is None:
            variant = path.name[len("clevrtex_"):]
        pattern = f"*/CLEVRTEX_{variant}_" + "[0-9]" * 6 + ".png"
        files = sorted(folder.glob(pattern), key=lambda p: int(p.stem.rsplit("_", 1)[1]))
        if not files:
            raise DataError(f"{folder}: no images matching {pattern}; expected the ClevrTex layout "
                            f"clevrtex_<variant>/<i//1000>/CLEVRTEX_<variant>_<i:06d>.png")
        n = len(files)
        lo, hi = {"test": (0.0, 0.1), "val": (0.1, 0.2), "train": (0.2, 1.0)}[split]
        self.files = files[int(n * lo): int(n * hi)]
        self.name, self.num_background, self.max_objects = f"clevrtex_{variant}", 1, 10
        self.has_masks, self.properties = True, ()
        self.resolution = resolution or 128

    def __len__(self):
        return len(self.files)

    __getitem__, __getitems__ = _sample, _samples

    def get_batch(self, indices):
        images, masks = [], []
        for i in indices:
            file = self.files[i]
            flat = file.with_name(file.stem + "_flat.png")
            image, mask = _open_image(file), _open_image(flat, mode=None)
            if image.shape[:2] != _CLEVRTEX_SIZE or mask.shape != _CLEVRTEX_SIZE:
                raise DataError(f"{file}: image {image.shape[:2]} / label map {mask.shape}; "
                                f"expected both {_CLEVRTEX_SIZE} (rows, cols), label map one channel")
            images.append(image)
            masks.append(mask)
        h, w = _CLEVRTEX_SIZE
        t, l, s = (h - _CLEVRTEX_CROP) // 2, (w - _CLEVRTEX_CROP) // 2, _CLEVRTEX_CROP
        images = _images_to_float(np.stack(images)[:, t:t + s, l:l + s])
        mask = torch.from_numpy(np.stack(masks)[:, t:t + s, l:l + s].astype(np.int64))
        return _finish_batch(images, mask, self.resolution)


def _short_side_crop(h, w, size):
    """torchvision 0.15's Resize(size) + CenterCrop(size) geometry for an h x w image (OCLF's
    COCO pipeline): the short side becomes `size`, the long side int(size * long / short)
    (truncated), and the crop starts at int(round((new - size) / 2)) (Python's round, halves
    to even). Returns (new_h, new_w, top, left)."""
    nh, nw = (size, int(size * w / h)) if h <= w else (int(size * h / w), size)
    return nh, nw, int(round((nh - size) / 2)), int(round((nw - size) / 2))


def coco_masks(segmentations, height, width, path="COCO annotations"):
    """bool (n, height, width): the masks of n COCO segmentations, decoded by pycocotools
    exactly as its `COCO.annToMask` does: polygons -> `frPyObjects` + `merge` (the parts
    of one object into one RLE), an uncompressed RLE (counts a list) -> `frPyObjects`,
    a compressed RLE (counts a string) as it is, all -> `mask.decode`.

    Raises ValueError for an RLE whose size is not (height, width) or whose runs do not
    cover height * width pixels (pycocotools would leave the rest of the mask
    uninitialised), and for what pycocotools refuses. A compressed RLE is checked by
    encoding its decoded mask again: pycocotools' strings are canonical.
    """
    mask_api = _optional_import("pycocotools.mask", path)
    rles, compressed = [], []
    for seg in segmentations:
        if isinstance(seg, dict):
            if list(seg["size"]) != [height, width]:
                raise ValueError(f"RLE size {seg['size']} != image size {[height, width]}")
            if isinstance(seg["counts"], list):
                if sum(seg["counts"]) != height * width or min(seg["counts"], default=0) < 0:
                    raise ValueError(f"RLE runs cover {sum(seg['counts'])} pixels, expected {height * width}")
                seg = mask_api.frPyObjects(seg, height, width)
            else:
                compressed.append(len(rles))
        else:
            seg = mask_api.merge(mask_api.frPyObjects(seg, height, width))
        rles.append(seg)
    if not rles:
        return np.zeros((0, height, width), bool)
    masks = mask_api.decode(rles)  # (h, w, n) uint8, column-major
    for k in compressed:
        counts = rles[k]["counts"]
        again = mask_api.encode(np.asfortranarray(masks[:, :, k]))["counts"]
        if masks[:, :, k].max(initial=0) > 1 or again != (counts.encode() if isinstance(counts, str) else counts):
            raise ValueError("compressed RLE counts do not decode to one mask of the image's size")
    return masks.transpose(2, 0, 1).astype(bool)  # (n, h, w)


class CocoDataset(torch.utils.data.Dataset):
    """COCO 2017 instances: `annotations/instances_{train,val}2017.json` and
    `{train,val}2017/*.jpg`. train -> train2017; val and test both -> val2017
    (COCO's test set has no public masks). Every image listed in the JSON is used,
    in id order; images without annotations too (all background).

    The evaluation protocol of DINOSAUR (OCLF `metrics_coco_ccrop` on `coco_nocrowd`):
      data.make_dataset(path, "val", resolution=224, mask_resolution=320)
    A batch then holds, for B images and E = max_objects + 1 entities:
      image       float32 (B, 3, R, R) in [0, 1], R = resolution (default 224): short
                  side resized to R bicubic WITHOUT antialiasing (torchvision 0.15 on a
                  tensor, as OCLF's Resize(224, BICUBIC)), clamped to [0, 1], centre crop
                  R x R. ImageNet normalisation is the model's job.
      mask        int64 (B, M, M), M = mask_resolution (default: R): instance ids at the
                  native size, short side resized to M nearest-exact (OCLF's
                  ResizeNearestExact), centre crop M x M. 0 = background, 1..n = the
                  image's non-crowd annotations in file order, -1 = pixels of two or more
                  instances (OCLF's ignore_overlaps). Crowd annotations (iscrowd=1) are
                  dropped entirely, as in OCLF's coco_nocrowd and
                  martius-lab/videosaur data/save_coco.py (`getAnnIds(iscrowd=False)`):
                  a crowd region is background unless an instance covers it.
      category    int64 (B, E): category[b, j] = COCO category_id of instance j; 0 for
                  j = 0 (background) and for j > n (no such instance).
      class_mask  int64 (B, M, M): the COCO category id per pixel, 0 = background; where
                  instances overlap, the highest category id (OCLF's
                  AddSegmentationMaskFromInstanceMask), so never -1. The target of the
                  class-level best overlap mBO^c; equal to category[mask] off overlaps.
    Masks are decoded by pycocotools (see `coco_masks`), the decoder of every published
    COCO number.
    """

    def __init__(self, path, split, resolution=None, mask_resolution=None):
        part = "train2017" if split == "train" else "val2017"
        file = path / "annotations" / f"instances_{part}.json"
        if not file.is_file():
            raise DataError(f"{file}: missing; expected COCO 2017 instances annotations")
        if mask_resolution is not None and not (isinstance(mask_resolution, int) and mask_resolution >= 1):
            raise DataError(f"{path}: mask_resolution={mask_resolution!r}; expected a side in pixels >= 1")
        _optional_import("pycocotools.mask", file)  # fail at open time, not at the first batch
        try:
            with open(file) as fh:
                coco = json.load(fh)
            images = {int(im["id"]): (im["file_name"], int(im["height"]), int(im["width"]))
                      for im in coco["images"]}
            anns = {i: [] for i in images}
            for a in coco["annotations"]:
                if not a.get("iscrowd", 0):  # coco_nocrowd: crowd annotations are dropped
                    anns[int(a["image_id"])].append((a["segmentation"], int(a["category_id"])))
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise DataError(f"{file}: not a COCO instances file ({type(e).__name__}: {e}); expected "
                            f"'images' with id/file_name/height/width and 'annotations' with "
                            f"image_id/category_id/segmentation") from None
        self.folder, self.file = path / part, file
        self.items = [(images[i][0], images[i][1], images[i][2], anns[i]) for i in sorted(images)]
        if not self.items:
            raise DataError(f"{file}: lists no images; expected a COCO instances file with images")
        self.max_objects = max(len(a) for *_, a in self.items)
        self.name, self.num_background, self.has_masks, self.properties = "coco", 1, True, ("category",)
        # DINOSAUR: OCLF _preprocessing_coco_dino_feature_recon_ccrop.yaml Resize(224) + CenterCrop(224)
        self.resolution = resolution or 224
        self.mask_resolution = mask_resolution or self.resolution

    def __len__(self):
        return len(self.items)

    __getitem__, __getitems__ = _sample, _samples

    def _masks(self, name, h, w, anns):
        """int64 (2, m, m), m = mask_resolution: instance ids (-1 on overlaps) and class ids.

        Each instance mask is decoded at the native size, then sampled nearest-exact and
        cropped (the pixels OCLF's ResizeNearestExact + CenterCrop keep) before the ids
        are assigned, so the per-pixel work is at the output size."""
        try:
            inst = coco_masks([seg for seg, _ in anns], h, w, self.file)  # (n, h, w)
        except Exception as e:  # pycocotools raises bare Exception for unknown formats
            raise DataError(f"{self.file}: bad segmentation for {name} ({type(e).__name__}: {e}); "
                            f"expected polygons or an RLE with counts and size") from None
        m = self.mask_resolution
        nh, nw, t, l = _short_side_crop(h, w, m)
        rows, cols = _nearest_index(h, nh)[t:t + m].numpy(), _nearest_index(w, nw)[l:l + m].numpy()
        inst = inst[:, rows][:, :, cols]  # (n, m, m)
        covered = np.concatenate([np.zeros((1, m, m), bool), inst])  # (1 + n, m, m); layer 0: nothing
        count = inst.sum(0)  # (m, m) instances covering each pixel
        ids = np.where(count == 1, covered.argmax(0), 0)  # the one instance where count == 1
        ids[count > 1] = -1
        # The highest category covering a pixel: the first layer set, with the layers sorted
        # highest category first (argmax finds it without an (n, m, m) int array).
        cats = np.array([0] + [c for _, c in anns], dtype=np.int64)  # (1 + n,)
        order = np.argsort(cats, kind="stable")[::-1]
        classes = np.where(count > 0, cats[order][covered[order].argmax(0)], 0)  # (m, m)
        return torch.from_numpy(np.stack([ids, classes]))  # (2, m, m)

    def get_batch(self, indices):
        r = self.resolution
        images, masks = [], []
        category = torch.zeros(len(indices), self.max_objects + 1, dtype=torch.int64)
        for b, i in enumerate(indices):
            name, h, w, anns = self.items[i]
            image = _open_image(self.folder / name)
            if image.shape[:2] != (h, w):
                raise DataError(f"{self.folder / name}: size {image.shape[:2]} differs from the "
                                f"annotation's {(h, w)}")
            nh, nw, t, l = _short_side_crop(h, w, r)
            x = _resize_images(_images_to_float(image[None]), nh, nw, mode="bicubic", antialias=False)
            images.append(x[0, :, t:t + r, l:l + r])
            masks.append(self._masks(name, h, w, anns))
            category[b, 1:len(anns) + 1] = torch.tensor([c for _, c in anns], dtype=torch.int64)
        masks = torch.stack(masks)  # (B, 2, m, m)
        return {"image": torch.stack(images).contiguous(), "mask": masks[:, 0].contiguous(),
                "category": category, "class_mask": masks[:, 1].contiguous()}


class ImageFolderDataset(torch.utils.data.Dataset):
    """Unlabelled images (png/jpg, found recursively, sorted by path): for training
    only. `mask` is all -1 and has_masks is False; every split returns the same
    images (there are no labels to hold out). Each image is centre-cropped to a
    square and resized to `resolution` (default 64).
    """

    def __init__(self, path, split, resolution=None):
        self.files = sorted(p for p in path.rglob("*") if p.suffix.lower() in _IMAGE_SUFFIXES)
        if not self.files:
            raise DataError(f"{path}: no .png/.jpg images found; expected a dataset file, a "
                            f"dataset folder (npz splits, ClevrTex, COCO) or a folder of images")
        self.name, self.num_background, self.max_objects = path.name, 1, 0
        self.has_masks, self.properties = False, ()
        self.resolution = resolution or 64

    def __len__(self):
        return len(self.files)

    __getitem__, __getitems__ = _sample, _samples

    def get_batch(self, indices):
        r, images = self.resolution, []
        for i in indices:
            image = _open_image(self.files[i])
            t, l, s = _centre_square(*image.shape[:2])
            images.append(_resize_images(_images_to_float(image[None, t:t + s, l:l + s]), r, r)[0])
        images = torch.stack(images)  # (B, 3, r, r)
        return {"image": images, "mask": torch.full((len(indices), r, r), -1, dtype=torch.int64)}


def open_real(path, split, resolution=None, **options):
    """Open a real dataset from a local path; the format is recognised from it:

    - `X.npz` file, or a folder with train.npz/val.npz/test.npz: NpzDataset
      (options val_size, test_size for a single file)
    - `X.h5` / `X.hdf5`: H5Dataset (options variant, max_objects, val_size, test_size)
    - a folder holding annotations/instances_*2017.json: CocoDataset (option mask_resolution)
    - a `clevrtex_<variant>` folder, or one holding such folders: ClevrTexDataset (option variant)
    - any other folder: ImageFolderDataset (images without labels)
    Anything else raises DataError.
    """
    path = Path(path)
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; expected one of {SPLITS}")
    if not path.exists():
        raise DataError(f"{path}: no such file or folder; expected a dataset path")
    suffix = path.suffix.lower()
    if path.is_file() and suffix == ".npz":
        _check_options(path, options, ("val_size", "test_size"))
        return NpzDataset(path, split, resolution, **options)
    if path.is_file() and suffix in (".h5", ".hdf5"):
        _check_options(path, options, ("variant", "max_objects", "val_size", "test_size"))
        return H5Dataset(path, split, resolution, **options)
    if path.is_file():
        raise DataError(f"{path}: unknown file type {suffix or '(none)'}; expected .npz, .h5/.hdf5 "
                        f"or a dataset folder")
    if any((path / f"{s}.npz").exists() for s in SPLITS):
        _check_options(path, options, ())
        file = path / f"{split}.npz"
        if not file.is_file():
            raise DataError(f"{file}: missing; expected one .npz per split in {path}")
        return NpzDataset(path, split, resolution, file=file)
    if any((path / "annotations").glob("instances_*2017.json")):
        _check_options(path, options, ("mask_resolution",))
        return CocoDataset(path, split, resolution, **options)
    if path.name.lower().startswith("clevrtex_") or any(path.glob("clevrtex_*")):
        _check_options(path, options, ("variant",))
        return ClevrTexDataset(path, split, resolution, **options)
    _check_options(path, options, ())
    return ImageFolderDataset(path, split, resolution)



# --- Dispatch


def make_dataset(name_or_path, split, resolution=None, seed=0, **options):
    """Return the Dataset for a built-in name or a local path.

    name_or_path: one of BUILTIN, or a path to a real dataset (see module docstring
    of the real-data section). split: "train" | "val" | "test". resolution: output
    side length in pixels (None: the dataset's native size). seed: the seed of the
    built-in generators (image i of a split is a pure function of seed, split, i).
    """
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; expected one of {SPLITS}")
    if resolution is not None and resolution < 4:
        raise DataError(f"resolution {resolution} is too small; expected at least 4 pixels")
    if name_or_path in BUILTIN:
        return make_synthetic(name_or_path, split, resolution, seed, **options)
    path = Path(name_or_path)
    if not path.exists():
        raise DataError(f"{path}: no such file or folder; expected a built-in set "
                        f"({', '.join(BUILTIN)}) or a dataset path")
    return open_real(path, split, resolution, **options)


# --- Loading


class StepBatchSampler(torch.utils.data.Sampler):
    """Index lists for a DataLoader, addressed by training step.

    shuffle=True: an endless stream; epoch e is a permutation drawn from
    (seed, e), dealt round-robin to the DDP ranks, batch `b` of the stream is
    step `b`, and the stream starts at `start_step`. So a run resumed at step s
    sees exactly the batches an uninterrupted run would have seen.
    shuffle=False: one ordered pass over this rank's share (the last batch may be short).
    """

    def __init__(self, n, batch_size, shuffle, seed=0, rank=0, world=1, start_step=0):
        if n < world or (shuffle and n // world < batch_size):
            raise DataError(f"dataset of {n} items is too small for batch size {batch_size} "
                            f"on {world} process(es)")
        self.n, self.batch_size, self.shuffle = n, batch_size, shuffle
        self.seed, self.rank, self.world, self.start_step = seed, rank, world, start_step
        self.per_rank = n // world  # equal shares, so every rank runs the same number of steps
        self.steps_per_epoch = self.per_rank // batch_size

    def _epoch_indices(self, epoch):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        order = torch.randperm(self.n, generator=g)
        return order[self.rank: self.per_rank * self.world: self.world]  # (per_rank,)

    def __iter__(self):
        if not self.shuffle:
            idx = torch.arange(self.rank, self.n, self.world)
            for i in range(0, len(idx), self.batch_size):
                yield idx[i: i + self.batch_size].tolist()
            return
        epoch, b = divmod(self.start_step, self.steps_per_epoch)
        while True:
            idx = self._epoch_indices(epoch)
            for j in range(b, self.steps_per_epoch):
                yield idx[j * self.batch_size: (j + 1) * self.batch_size].tolist()
            epoch, b = epoch + 1, 0

    def __len__(self):
        if self.shuffle:
            raise TypeError("a shuffling StepBatchSampler is endless")
        return math.ceil(len(range(self.rank, self.n, self.world)) / self.batch_size)


def fetch_batch(dataset, indices):
    """One batch dict for a list of indices: `dataset.get_batch(indices)`, looked up through
    any `torch.utils.data.Subset` wrappers; a dataset without `get_batch` gets its samples
    stacked by the default collate."""
    while isinstance(dataset, torch.utils.data.Subset):
        indices = [dataset.indices[i] for i in indices]
        dataset = dataset.dataset
    if hasattr(dataset, "get_batch"):
        return dataset.get_batch(indices)
    return torch.utils.data.default_collate([dataset[i] for i in indices])


class _Batches(torch.utils.data.Dataset):
    """make_loader's view of a dataset: the item at a list of indices is the whole batch."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __getitem__(self, indices):
        return fetch_batch(self.dataset, indices)


def _as_is(batch):
    return batch


def make_loader(dataset, batch_size, shuffle, seed=0, workers=0, distributed=False, start_step=0):
    """A DataLoader of batched dicts, deterministic given `seed`.

    shuffle=True gives an endless training stream starting at `start_step`
    (for exact resumption); shuffle=False one ordered evaluation pass.
    distributed=True shards the indices across the torch.distributed ranks.
    Each batch is one `fetch_batch` call (one vectorised `get_batch`): the sampler
    yields whole index lists and automatic batching is off (batch_size=None).
    """
    rank, world = 0, 1
    if distributed and torch.distributed.is_available() and torch.distributed.is_initialized():
        rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    sampler = StepBatchSampler(len(dataset), batch_size, shuffle, seed, rank, world, start_step)
    return torch.utils.data.DataLoader(
        _Batches(dataset), sampler=sampler, batch_size=None, collate_fn=_as_is, num_workers=workers,
        persistent_workers=workers > 0,
        # pinning only helps host tensors; a dataset generated on the GPU is already there
        pin_memory=torch.cuda.is_available() and getattr(dataset, "device", torch.device("cpu")).type == "cpu",
        # its own generator: creating an iterator must not draw from the global RNG, or a
        # resumed run's model noise would differ from an uninterrupted run's
        generator=torch.Generator().manual_seed(seed))


# --- Sample grid


# A fixed palette of distinct colours (cycled when K exceeds it): saturated hues
# first, so the first slots are the easiest to tell apart.
PALETTE = torch.tensor([
    [230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48],
    [145, 30, 180], [70, 240, 240], [240, 50, 230], [210, 245, 60], [250, 190, 212],
    [0, 128, 128], [220, 190, 255], [170, 110, 40], [255, 250, 200], [128, 0, 0],
    [170, 255, 195], [128, 128, 0], [255, 215, 180], [0, 0, 128], [128, 128, 128],
    [0, 0, 0], [255, 160, 0], [100, 149, 237], [0, 100, 0],
], dtype=torch.uint8)  # (P, 3)

_GUTTER, _MIN_CELL = 2, 64


def colorize(seg):
    """int (B, H, W) segmentation -> uint8 (B, H, W, 3) RGB: id k gets PALETTE[k mod P];
    negative ids (ignored pixels) are white."""
    seg = torch.as_tensor(seg).long().cpu()
    out = PALETTE[seg.clamp(min=0) % len(PALETTE)]  # (B, H, W, 3)
    out[seg < 0] = 255
    return out


def _to_uint8(x):
    """float (..., 3, H, W) in [0, 1] (clamped) -> uint8 (..., 3, H, W)."""
    return (x.detach().float().cpu().clamp(0, 1) * 255).round().to(torch.uint8)


def save_grid(path, image, recon, masks, slot_recons, extra_masks=None, max_images=8, fill=1.0):
    """Write DESIGN.md's sample grid as an image file (format from the suffix, PNG by default).

    image, recon: (B, 3, H, W) in [0, 1]; masks: (B, K, H, W) soft or hard;
    slot_recons: (B, K, 3, H, W) in [0, 1]; extra_masks: optional list of
    (B, K, H, W) (e.g. MONet's attention masks next to its decoded masks).
    One row per image (the first max_images). Columns:
      input | reconstruction | argmax(masks) in PALETTE | argmax(extra) ... |
      slot k: masks[k] * slot_recons[k] + (1 - masks[k]) * fill, for k = 1..K (fill: a grey level,
      default white; 0.5 keeps white objects and black backgrounds visible).
    Cells are upscaled nearest to at least 64 px and separated by 2 px white
    gutters (also around the border), so the file is
    (rows * (h + 2) + 2) x (cols * (w + 2) + 2) pixels for upscaled cell size h x w.
    Written to a temporary file and renamed, so a reader never sees half a file.
    """
    b = min(image.shape[0], max_images)
    masks = masks[:b].detach().float().cpu()
    k, h, w = masks.shape[1:]
    extra = list(extra_masks or [])
    got = [image.shape[1:], recon.shape[1:], slot_recons.shape[1:]] + [e.shape[1:] for e in extra]
    want = [(3, h, w), (3, h, w), (k, 3, h, w)] + [(k, h, w)] * len(extra)
    if [tuple(g) for g in got] != want:
        raise ValueError(f"save_grid: image {tuple(image.shape)}, recon {tuple(recon.shape)}, masks "
                         f"{(b, k, h, w)}, slot_recons {tuple(slot_recons.shape)}; expected (B,3,H,W), "
                         f"(B,3,H,W), (B,K,H,W), (B,K,3,H,W)")
    cols = [_to_uint8(image[:b]), _to_uint8(recon[:b])]  # each (b, 3, H, W)
    for m in [masks] + [e[:b].detach().float().cpu() for e in extra]:
        cols.append(colorize(m.argmax(1)).permute(0, 3, 1, 2))  # (b, 3, H, W)
    background = torch.full((1, 1, 3, 1, 1), float(fill))
    slots = slot_recons[:b].detach().float().cpu().clamp(0, 1)  # (b, K, 3, H, W)
    weight = masks.clamp(0, 1).unsqueeze(2)  # (b, K, 1, H, W)
    masked = _to_uint8(weight * slots + (1 - weight) * background)  # (b, K, 3, H, W)
    cells = torch.cat([torch.stack(cols, 1), masked], 1)  # (b, C, 3, H, W)
    scale = max(1, math.ceil(_MIN_CELL / min(h, w)))
    cells = cells.repeat_interleave(scale, -2).repeat_interleave(scale, -1)  # (b, C, 3, sH, sW)
    g = _GUTTER
    cells = F.pad(cells, (g, 0, g, 0), value=255)  # gutter above and left of every cell
    rows, ncol, _, ch, cw = cells.shape
    canvas = cells.permute(2, 0, 3, 1, 4).reshape(3, rows * ch, ncol * cw)  # (3, b*ch, C*cw)
    canvas = F.pad(canvas, (0, g, 0, g), value=255)  # closing gutter on the right and bottom
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fmt = Image.registered_extensions().get(path.suffix.lower(), "PNG")
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    Image.fromarray(canvas.permute(1, 2, 0).contiguous().numpy()).save(tmp, format=fmt)
    os.replace(tmp, path)
