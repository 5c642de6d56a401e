"""slot_attention.py of a git revision against the working tree's, in-process: the slot-attention module alone
and the autoencoder (no data loading), forward + loss + backward + Adam step, one thread, the two sides
interleaved, medians. Prints markdown table rows: case | old ms | new ms | speed-up.

  OMP_NUM_THREADS=1 python scripts/bench_slot_attention.py b0b76e7 5

(scripts/bench_speed.py --baseline times whole runs through the command line instead.)
"""
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def load(path, name):
    """slot_attention.py of `path` as module `name`, with the data/losses/metrics beside it."""
    sys.path.insert(0, str(path))
    for m in ("data", "losses", "metrics"):
        sys.modules.pop(m, None)
    spec = importlib.util.spec_from_file_location(name, Path(path) / "slot_attention.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    sys.path.pop(0)
    return mod


def autoencoder(mod, argv):
    args = mod.parse_args(argv)
    torch.manual_seed(0)
    model = mod.build_model(args)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    x = torch.rand(args.batch_size, 3, args.resolution, args.resolution)

    def step():
        loss = mod.compute_loss(model(x), x, args)["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def module(mod, b=64, n=4096, d=64, k=6):
    """The configuration of issue 20's comparison with lucidrains' slot_attention."""
    torch.manual_seed(0)
    m = mod.SlotAttention(k, d, d, 128)
    opt = torch.optim.Adam(m.parameters(), lr=1e-4)
    x = torch.randn(b, n, d)

    def step():
        loss = m(x)[0].pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def main():
    torch.set_num_threads(1)
    rev, reps = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 5
    old_dir = tempfile.mkdtemp()
    for f in ("slot_attention.py", "data.py", "losses.py", "metrics.py"):
        src = subprocess.run(["git", "show", f"{rev}:{f}"], capture_output=True, text=True, check=True, cwd=ROOT)
        Path(old_dir, f).write_text(src.stdout)
    old, new = load(old_dir, "old"), load(ROOT, "new")
    paper = ["--data", "shapes", "--batch-size", "16"]
    cases = {
        "slot-attention module, B=64 N=4096 D=64 K=6": (module(old), module(new)),
        "autoencoder, 64 px sprites K=6 batch 16, same decoder (4 x 5x5)":
            (autoencoder(old, paper), autoencoder(new, paper + ["--dec-layers", "4"])),
        "autoencoder, 64 px sprites K=6 batch 16, each file's paper preset (old 4, new 3 x 5x5)":
            (autoencoder(old, paper), autoencoder(new, paper)),
        "new file: --plain-decoder (old) vs the broadcast_conv shortcut (new)":
            (autoencoder(new, paper + ["--plain-decoder"]), autoencoder(new, paper)),
    }
    print(f"| case | {rev} ms | new ms | speed-up |\n|---|---:|---:|---:|")
    for name, (a, b) in cases.items():
        a(), b()  # warm-up
        ta, tb = [], []
        for i in range(reps):  # alternate the order so that drift cancels
            for f, t in ((a, ta), (b, tb)) if i % 2 == 0 else ((b, tb), (a, ta)):
                t0 = time.perf_counter()
                f()
                t.append(time.perf_counter() - t0)
        ma, mb = statistics.median(ta) * 1e3, statistics.median(tb) * 1e3
        print(f"| {name} | {ma:.0f} | {mb:.0f} | {ma / mb:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
