"""Throughput of the built-in synthetic sets through `data.make_loader`.

    python scripts/bench_data.py                      # all sets, batch 256, 20 batches
    python scripts/bench_data.py --sets shapes --resolution 128

Prints one line per set: name, resolution, images/s (the first batch, which pays
for the loader's first shuffle, is not timed).
"""
import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from anywhere
import data  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch-size", type=int, default=256, help="images per batch")
    p.add_argument("--batches", type=int, default=20, help="number of timed batches per set")
    p.add_argument("--sets", nargs="+", default=list(data.BUILTIN), choices=data.BUILTIN,
                   help="built-in sets to time")
    p.add_argument("--resolution", type=int, default=None,
                   help="image side in pixels (default: each set's native size)")
    p.add_argument("--device", default="cpu", help="device the batches are generated on")
    p.add_argument("--threads", type=int, default=None,
                   help=f"torch intra-op threads (default: torch's choice, {torch.get_num_threads()} here)")
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


def main(argv=None):
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    try:
        for name in args.sets:
            res, rate = bench(name, args.batch_size, args.batches, args.resolution, args.device)
            print(f"{name:16s} {res:4d} px {rate:10.0f} images/s", flush=True)
    except data.DataError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
