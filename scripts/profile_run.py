"""Where a model's training time goes: torch.profiler around a short run of the model file's own main().

The run is the model's CLI with `--steps` steps, no periodic evaluation and one final evaluation of
`--eval-size` images, so the table is dominated by the training step. Prints the operators by self
time (CUDA time on a GPU), and writes the table to `--out` if given.

  OMP_NUM_THREADS=1 python scripts/profile_run.py --model iodine --extra "--data tetrominoes"
  python scripts/profile_run.py --model slot_attention --preset paper --device cuda --extra "--dtype bf16"
"""
import argparse
import importlib
import shlex
import sys
import tempfile
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from bench_speed import MODELS  # this folder is on sys.path when a script runs

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=MODELS, required=True, help="model file to profile")
    p.add_argument("--preset", choices=["tiny", "paper"], default="tiny", help="--preset of the run")
    p.add_argument("--steps", type=int, default=10, help="training steps inside the profiler")
    p.add_argument("--eval-size", type=int, default=8, help="images of the one final evaluation")
    p.add_argument("--device", default="auto", help="--device of the run")
    p.add_argument("--rows", type=int, default=20, help="operators in the table")
    p.add_argument("--extra", default="", help="more flags for the run, e.g. '--data tetrominoes --dtype bf16'")
    p.add_argument("--out", default=None, help="also write the table to this file")
    args = p.parse_args(argv)
    if args.steps <= 0 or args.eval_size <= 0 or args.rows <= 0:
        p.error("--steps, --eval-size and --rows must be positive")
    return args


def main(argv=None):
    args = parse_args(argv)
    module = importlib.import_module(args.model)
    cuda = torch.cuda.is_available() and args.device in ("auto", "cuda")
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with tempfile.TemporaryDirectory() as tmp:
        # a file with --test-size evaluates the whole test split at the end unless told otherwise
        test = ["--test-size", str(args.eval_size)] if hasattr(module.parse_args([]), "test_size") else []
        run = ["--preset", args.preset, "--steps", str(args.steps), "--eval-every", "0", "--eval-size",
               str(args.eval_size), *test, "--save-every", str(10 ** 9), "--log-every", str(args.steps), "--device",
               args.device, "--out-dir", tmp, "--run-name", "profile", *shlex.split(args.extra)]
        with profile(activities=activities) as prof:
            module.main(run)
    table = prof.key_averages().table(sort_by="self_cuda_time_total" if cuda else "self_cpu_time_total",
                                      row_limit=args.rows)
    title = f"{args.model}.py --preset {args.preset} --steps {args.steps} {args.extra} (whole run profiled)"
    print(title + "\n" + table)
    if args.out:
        Path(args.out).write_text(title + "\n" + table + "\n")


if __name__ == "__main__":
    main()
