"""Throughput of the built-in synthetic sets through `data.make_loader`.

    python scripts/bench_data.py                      # all sets, batch 256, 20 batches
    python scripts/bench_data.py --sets shapes --resolution 128
    python scripts/bench_data.py --sets clevr-lite --resolution 64 128 --threads 1   # one core
    python scripts/bench_data.py --sets clevr-lite --resolution 128 --grid docs/clevr_lite_samples.png

Prints one line per set and resolution: name, resolution, images/s (the first
batch, which pays for the loader's first shuffle and a set's one-off tables, is
not timed). Measure on an otherwise idle machine (here: /work/tools/cpu --exclusive).
With --grid PATH nothing is timed: PATH gets validation images 0-7 of each set,
each above its mask (data.colorize), one pair of rows per set and resolution.
"""
import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from anywhere
import data  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch-size", type=int, default=256, help="images per batch")
    p.add_argument("--batches", type=int, default=20, help="number of timed batches per set")
    p.add_argument("--sets", nargs="+", default=list(data.BUILTIN), choices=data.BUILTIN,
                   help="built-in sets to time")
    p.add_argument("--resolution", type=int, nargs="+", default=[None],
                   help="image side(s) in pixels, each timed in turn (default: each set's native size)")
    p.add_argument("--device", default="cpu", help="device the batches are generated on")
    p.add_argument("--threads", type=int, default=None,
                   help=f"torch intra-op threads (default: torch's choice, {torch.get_num_threads()} here)")
    p.add_argument("--grid", metavar="PATH", default=None,
                   help="write 8 validation images of each set above their masks to PATH (PNG) instead of timing")
    return p.parse_args(argv)


def bench(name, batch_size, batches, resolution=None, device="cpu"):
    """Images per second drawn from make_loader(shuffle=True) for one set."""
    ds = data.make_synthetic(name, "train", resolution=resolution, device=device)
    it = iter(data.make_loader(ds, batch_size, shuffle=True, seed=0))
    next(it)  # warm-up: the first epoch's permutation and first allocations
    if ds.device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(batches):
        batch = next(it)
    if ds.device.type == "cuda":
        torch.cuda.synchronize()
    assert batch["image"].shape[0] == batch_size
    return ds.resolution, batches * batch_size / (time.perf_counter() - start)


def write_grid(path, sets, resolutions, gutter=2):
    """Validation images 0-7 of each set (row) above their colourised masks (row), white gutters."""
    rows = []
    for name in sets:
        for resolution in resolutions:
            batch = data.make_synthetic(name, "val", resolution=resolution).get_batch(list(range(8)))
            image = (batch["image"].clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1)  # (8, H, W, 3)
            for cells in (image, data.colorize(batch["mask"])):
                cells = torch.nn.functional.pad(cells.permute(0, 3, 1, 2), (gutter, 0, gutter, 0), value=255)
                rows.append(torch.cat(list(cells), 2))  # (3, g + H, 8 (g + W))
    width = max(r.shape[2] for r in rows)
    rows = [torch.nn.functional.pad(r, (0, width - r.shape[2]), value=255) for r in rows]
    canvas = torch.nn.functional.pad(torch.cat(rows, 1), (0, gutter, 0, gutter), value=255)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    Image.fromarray(np.ascontiguousarray(canvas.permute(1, 2, 0).numpy())).save(tmp, format="PNG")
    tmp.replace(path)  # never a half-written picture


def main(argv=None):
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    try:
        if args.grid:
            write_grid(args.grid, args.sets, args.resolution)
            return
        for name in args.sets:
            for resolution in args.resolution:
                res, rate = bench(name, args.batch_size, args.batches, resolution, args.device)
                print(f"{name:16s} {res:4d} px {rate:10.0f} images/s", flush=True)
    except data.DataError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
