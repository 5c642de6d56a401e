"""Speed of the segmentation metrics on random masks (CPU by default).

    python scripts/bench_metrics.py --images 1000 --size 64 --slots 7 --objects 6
"""

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import metrics  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=1000, help="number of images in the batch")
    p.add_argument("--size", type=int, default=64, help="image height and width in pixels")
    p.add_argument("--slots", type=int, default=7, help="number of predicted slots K")
    p.add_argument("--objects", type=int, default=6, help="foreground objects per image (plus background id 0)")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats; the best is reported")
    p.add_argument("--seed", type=int, default=0, help="seed of the random masks")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    g = torch.Generator().manual_seed(args.seed)
    n, s = args.images, args.size
    # Blocky truth (4x4 cells) so segments are contiguous, 1% ignored pixels; soft random predictions.
    cells = torch.randint(0, args.objects + 1, (n, s // 4 + 1, s // 4 + 1), generator=g)
    true = cells.repeat_interleave(4, 1).repeat_interleave(4, 2)[:, :s, :s].contiguous()
    true[torch.rand(n, s, s, generator=g) < 0.01] = -1
    pred = torch.rand(n, args.slots, s, s, generator=g)
    runs = {
        "ari": lambda: metrics.ari(true, pred),
        "fg_ari": lambda: metrics.fg_ari(true, pred, num_background=1),
        "ari+fg_ari": lambda: (metrics.ari(true, pred), metrics.fg_ari(true, pred, num_background=1)),
        "miou": lambda: metrics.miou(true, pred),
        "mbo": lambda: metrics.mbo(true, pred, num_background=1),
        "segmentation_metrics": lambda: metrics.segmentation_metrics(true, pred, num_background=1),
    }
    print(f"{n} images {s}x{s}, K={args.slots}, {args.objects} objects, torch threads {torch.get_num_threads()}")
    for name, fn in runs.items():
        fn()  # warm-up
        best = float("inf")
        for _ in range(args.repeats):
            t = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - t)
        print(f"{name:22s} {best:8.3f} s  {n / best:10.0f} images/s")


if __name__ == "__main__":
    main()
