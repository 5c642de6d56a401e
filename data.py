"""Data for object-centric learning: built-in synthetic sets, real datasets from
local files, a deterministic step-indexed loader, and the sample-grid writer.

A batch is a dict of tensors (see DESIGN.md):
  image  float32 (B, 3, H, W) in [0, 1]
  mask   int64   (B, H, W) entity id per pixel; ids < dataset.num_background are
         background, -1 means "ignore" (unlabelled or overlapping pixels)
  optional per-entity ground truth aligned with mask ids (entry e describes mask
  id e, background entities included): visible bool (B, E), shape int64 (B, E),
  color float32 (B, E, 3), scale / x / y float32 (B, E).

Every dataset has `name`, `num_background`, `max_objects`, and implements
`__getitems__(indices)`, returning a whole batch as one dict, so a DataLoader
built by `make_loader` fetches a batch with one vectorised call.
"""
import math
import zlib
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

SPLITS = ("train", "val", "test")


class DataError(Exception):
    """A dataset is missing, malformed or asked for impossibly. main() prints the
    message as one line and exits non-zero, without a traceback."""


def _collate_batch(batch):
    """`__getitems__` already returns a batched dict: pass it through."""
    return batch


# --- Synthetic sets
#
# Built-in sets, generated on the fly (nothing is downloaded):
#   shapes          64 px, 2-5 dSprites (square, ellipse, heart) in saturated HSV
#                   colours on a random grey background (multi-dSprites colored_on_grayscale)
#   shapes-colored  64 px, 1-4 sprites, random RGB on random RGB (colored_on_colored)
#   shapes-binary   64 px, 2-3 white sprites on black (binarized)
#   tetrominoes     35 px, 3 of the 19 fixed tetrominoes, 5x5-px blocks on the 7x7
#                   cell grid, 6 colours on black
# Image i of a split is a pure function of (seed, split, i): every random number is
# a counter-based hash of (seed, set name, split, i, draw number), so a batch is
# generated in one vectorised call and an image does not depend on the batch it is
# fetched in; splits (and sets) are independent streams.
# Masks are exact: the mask names the entity whose colour the pixel has.

BUILTIN = ("shapes", "shapes-colored", "shapes-binary", "tetrominoes")

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

    Item i is a pure function of (seed, split, i). `__getitems__(indices)` draws a
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

    def __getitem__(self, i):
        """One unbatched item (the batch of one, squeezed)."""
        return {k: v[0] for k, v in self.__getitems__([i]).items()}

    def __getitems__(self, indices):
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

    resolution: output side in pixels (None: 64 for sprites, 35 for tetrominoes);
    sprites are rasterised directly at that size, tetrominoes resized nearest.
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
    return SyntheticDataset(name, split, resolution, seed, size, device)



# --- Real datasets


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


def make_loader(dataset, batch_size, shuffle, seed=0, workers=0, distributed=False, start_step=0):
    """A DataLoader of batched dicts, deterministic given `seed`.

    shuffle=True gives an endless training stream starting at `start_step`
    (for exact resumption); shuffle=False one ordered evaluation pass.
    distributed=True shards the indices across the torch.distributed ranks.
    """
    rank, world = 0, 1
    if distributed and torch.distributed.is_available() and torch.distributed.is_initialized():
        rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    sampler = StepBatchSampler(len(dataset), batch_size, shuffle, seed, rank, world, start_step)
    return torch.utils.data.DataLoader(
        dataset, batch_sampler=sampler, collate_fn=_collate_batch, num_workers=workers,
        persistent_workers=workers > 0, pin_memory=torch.cuda.is_available(),
        # its own generator: creating an iterator must not draw from the global RNG, or a
        # resumed run's model noise would differ from an uninterrupted run's
        generator=torch.Generator().manual_seed(seed))


# --- Sample grid
