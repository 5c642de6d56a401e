"""The sample grid of data.py: layout, sizes, palette colours, degenerate shapes."""
import numpy as np
import pytest
import torch
from PIL import Image

import data


def inputs(b, k, h, w, seed=0):
    g = torch.Generator().manual_seed(seed)
    image = torch.rand(b, 3, h, w, generator=g)
    recon = torch.rand(b, 3, h, w, generator=g) * 1.4 - 0.2  # out of range: must be clamped
    masks = torch.softmax(torch.randn(b, k, h, w, generator=g), 1)
    slots = torch.rand(b, k, 3, h, w, generator=g)
    return image, recon, masks, slots


def read(path):
    return np.array(Image.open(path).convert("RGB"))


def test_grid_size_and_cells(tmp_path):
    b, k, h, w = 3, 4, 16, 16
    image, recon, masks, slots = inputs(b, k, h, w)
    seg = torch.zeros(b, h, w, dtype=torch.long)
    seg[:, :, 8:] = 2  # right half slot 2, left half slot 0
    masks = torch.nn.functional.one_hot(seg, k).permute(0, 3, 1, 2).float()  # (B, K, H, W)
    extra = torch.roll(masks, 1, dims=1)  # argmax shifted by one slot
    path = tmp_path / "new" / "dir" / "step_0000001.png"
    data.save_grid(path, image, recon, masks, slots, extra_masks=[extra])
    grid = read(path)
    cell, g = 64, 2  # 16 px upscaled 4x
    cols = 2 + 1 + 1 + k
    assert grid.shape == (b * (cell + g) + g, cols * (cell + g) + g, 3)
    assert list(path.parent.iterdir()) == [path]  # no temporary file left behind

    def at(row, col, y, x):  # pixel (y, x) of the native image in cell (row, col)
        return grid[g + row * (cell + g) + 4 * y + 1, g + col * (cell + g) + 4 * x + 2]

    assert (grid[:g] == 255).all() and (grid[:, :g] == 255).all()
    assert (grid[:, g + cell: 2 * g + cell] == 255).all()  # gutter after the first column
    expected = (image[1, :, 5, 9] * 255).round().to(torch.uint8).numpy()
    assert np.array_equal(at(1, 0, 5, 9), expected)
    assert np.array_equal(at(2, 1, 0, 0), (recon[2, :, 0, 0].clamp(0, 1) * 255).round().to(torch.uint8).numpy())
    palette = data.PALETTE.numpy()
    assert np.array_equal(at(0, 2, 3, 2), palette[0]) and np.array_equal(at(0, 2, 3, 12), palette[2])
    assert np.array_equal(at(2, 3, 3, 2), palette[1]) and np.array_equal(at(2, 3, 3, 12), palette[3])
    # slot 2's masked reconstruction: the slot's colours where its mask is 1, white elsewhere
    slot2 = (slots[0, 2, :, 4, 12] * 255).round().to(torch.uint8).numpy()
    assert np.array_equal(at(0, 4 + 2, 4, 12), slot2)
    assert (at(0, 4 + 2, 4, 2) == 255).all()


@pytest.mark.parametrize("b, k, h, w", [(1, 1, 8, 8), (1, 3, 5, 7), (10, 2, 100, 100)])
def test_grid_degenerate_shapes(tmp_path, b, k, h, w):
    image, recon, masks, slots = inputs(b, k, h, w, seed=b + k)
    path = tmp_path / "grid.png"
    data.save_grid(path, image, recon, masks, slots)
    scale = max(1, -(-64 // min(h, w)))
    rows = min(b, 8)  # max_images
    assert read(path).shape == (rows * (h * scale + 2) + 2, (3 + k) * (w * scale + 2) + 2, 3)
    data.save_grid(path, image, recon, masks, slots, max_images=1)  # overwrite in place
    assert read(path).shape[0] == h * scale + 4


def test_palette_and_colorize():
    p = data.PALETTE
    assert p.dtype == torch.uint8 and p.shape[1] == 3 and len(p) >= 20
    assert len({tuple(c) for c in p.tolist()}) == len(p)  # all distinct
    seg = torch.tensor([[[0, 1], [len(p), -1]]])
    rgb = data.colorize(seg)
    assert rgb.shape == (1, 2, 2, 3) and rgb.dtype == torch.uint8
    assert torch.equal(rgb[0, 0, 0], p[0]) and torch.equal(rgb[0, 0, 1], p[1])
    assert torch.equal(rgb[0, 1, 0], p[0])  # cycles past the palette's end
    assert (rgb[0, 1, 1] == 255).all()  # ignored pixels are white


def test_grid_rejects_mismatched_shapes(tmp_path):
    image, recon, masks, slots = inputs(2, 3, 8, 8)
    with pytest.raises(ValueError, match="slot_recons"):
        data.save_grid(tmp_path / "g.png", image, recon, masks, slots[:, :2])
    assert not (tmp_path / "g.png").exists()
