"""Training throughput and peak memory of the model files, measured through their own CLI.

Each configuration (model x preset x eager/compile x fp32/bf16) runs as a subprocess
for `--steps` steps; the figure is the last logged window (the first `--log-every`
steps, which hold start-up and compilation, are excluded). Prints one markdown table.

  python scripts/bench_speed.py                                  # tiny, eager, fp32 + bf16
  python scripts/bench_speed.py --presets tiny paper --modes eager compile --device cuda
"""
import argparse
import json
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
MODELS = ("slot_attention", "monet", "iodine", "dinosaur", "vit_mae_ocl")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=[m for m in MODELS if (ROOT / f"{m}.py").exists()],
                   help="model files to measure (default: all that exist)")
    p.add_argument("--presets", nargs="+", default=["tiny"], choices=["tiny", "paper"], help="presets to measure")
    p.add_argument("--modes", nargs="+", default=["eager"], choices=["eager", "compile"], help="torch.compile or not")
    p.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16", "fp16"],
                   help="autocast precisions")
    p.add_argument("--steps", type=int, default=20, help="steps per run; the second half is measured")
    p.add_argument("--batch-size", type=int, default=None, help="override the preset's batch size")
    p.add_argument("--device", default="auto", help="passed to the model file")
    p.add_argument("--extra", default="", help="extra flags for every run, e.g. '--data tetrominoes'")
    p.add_argument("--out", default=None, help="also write the table to this markdown file")
    return p.parse_args(argv)


def measure(model, preset, mode, dtype, args, tmp):
    log_every = max(1, args.steps // 2)
    cmd = [sys.executable, str(ROOT / f"{model}.py"), "--preset", preset, "--steps", str(args.steps),
           "--log-every", str(log_every), "--eval-every", "0", "--eval-size", "8", "--save-every", "1000000000",
           "--dtype", dtype, "--device", args.device, "--out-dir", tmp,
           "--run-name", f"{model}-{preset}-{mode}-{dtype}", *args.extra.split()]
    if args.batch_size:
        cmd += ["--batch-size", str(args.batch_size)]
    if mode == "compile":
        cmd.append("--compile")
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if r.returncode != 0:
        return None, (r.stderr.strip().splitlines() or ["failed"])[-1]
    lines = [json.loads(l) for l in open(Path(tmp) / cmd[cmd.index("--run-name") + 1] / "metrics.jsonl")]
    train = [l for l in lines if l["split"] == "train"]
    return train[-1], None


def main(argv=None):
    args = parse_args(argv)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() and args.device in ("auto", "cuda") \
        else f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    rows = ["| model | preset | mode | dtype | images/s | peak memory (MiB) |", "|---|---|---|---|---|---|"]
    with tempfile.TemporaryDirectory() as tmp:
        for model in args.models:
            for preset in args.presets:
                for mode in args.modes:
                    for dtype in args.dtypes:
                        rec, err = measure(model, preset, mode, dtype, args, tmp)
                        cells = (f"{rec['images_per_s']:.1f} | {rec['peak_mem_mb']:.0f}" if rec
                                 else f"failed: {err} | -")
                        rows.append(f"| {model} | {preset} | {mode} | {dtype} | {cells} |")
                        print(rows[-1], flush=True)
    table = f"Device: {device}; torch {torch.__version__}; {args.steps} steps, second half timed.\n\n" + "\n".join(rows)
    print("\n" + table)
    if args.out:
        Path(args.out).write_text(table + "\n")


if __name__ == "__main__":
    main()
