"""Throughput of the built-in synthetic sets through `data.make_loader`.

    python scripts/bench_data.py                      # all sets, batch 256, 20 batches
    python scripts/bench_data.py --sets shapes --resolution 128
    python scripts/bench_data.py --sets clevr-lite --resolution 64 128 --threads 1   # one core
    python scripts/bench_data.py --sets clevr-lite --resolution 64 128 --grid docs/clevr_lite.png
    python scripts/bench_data.py --redraws 4096      # how often clevr-lite re-draws a scene, and why

Prints one line per set and resolution: name, resolution, images/s (the first
batch, which pays for the loader's first shuffle and a set's one-off tables, is
not timed). Measure on an otherwise idle machine (here: /work/tools/cpu --exclusive).
With --grid PATH nothing is timed: PATH gets validation images 0-7 of each set,
each above its mask (data.colorize), one pair of rows per set and resolution.
With --redraws N nothing is timed: for clevr-lite training images 0..N-1 it prints, per draw,
how many scenes were drawn and how many of them failed CLEVR's rules (an object found no
place; an object shows too few pixels), as data._render_clevr_lite applies them.
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
    p.add_argument("--redraws", type=int, metavar="N", default=None,
                   help="count clevr-lite's re-drawn scenes over training images 0..N-1 instead of timing")
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


def redraw_counts(n, resolution=None):
    """[(draw, scenes drawn, failed placement, failed min. pixels)] for clevr-lite train 0..n-1."""
    cam = data._clevr_camera(resolution or 64, torch.device("cpu"))
    need = data._CLEVR_MIN_PIXELS * (cam.res / data._CLEVR_CROP[2]) ** 2
    pending, rows = torch.arange(n), []
    for attempt in range(data._CLEVR_ATTEMPTS):
        if not len(pending):
            break
        u = data._uniforms(0, f"clevr-lite/{attempt}", "train", pending, 1 + 6 * data._CLEVR_DRAWS)
        scene = data._clevr_scene(u, cam)
        ids = data._clevr_depth(scene, cam) & data._ID_MASK  # (n, P) mask ids
        shown = (ids[:, None] == torch.arange(1, 7)[:, None]).sum(-1)  # (n, 6) pixels per object
        placed = scene["present"].sum(1) == 3 + (u[:, 0] * 4).long()
        small = ((shown < need) & scene["present"]).any(1)
        rows.append((attempt + 1, len(pending), int((~placed).sum()), int((placed & small).sum())))
        pending = pending[~placed | small]
    return rows


def main(argv=None):
    args = parse_args(argv)
    if args.redraws is not None and args.redraws < 1:
        sys.exit("error: --redraws needs at least one image")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    try:
        if args.grid:
            write_grid(args.grid, args.sets, args.resolution)
            return
        if args.redraws is not None:
            for draw, drawn, unplaced, small in redraw_counts(args.redraws, args.resolution[0]):
                print(f"draw {draw}: {drawn:6d} scenes, {unplaced:5d} with an object not placed, "
                      f"{small:5d} (of the rest) with an object under CLEVR's pixel count", flush=True)
            return
        for name in args.sets:
            for resolution in args.resolution:
                res, rate = bench(name, args.batch_size, args.batches, resolution, args.device)
                print(f"{name:16s} {res:4d} px {rate:10.0f} images/s", flush=True)
    except data.DataError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
