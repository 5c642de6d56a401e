"""Training throughput and peak memory of the model files, measured through their own CLI.

Each configuration (model x preset x eager/compile x fp32/bf16) runs as a subprocess
for `--steps` steps; the figure is the last logged window (the first half of the steps,
which holds start-up and compilation, is excluded), so it times data + forward + loss +
backward + optimiser step. Prints one markdown table.

  python scripts/bench_speed.py                                  # tiny, eager, fp32 + bf16
  python scripts/bench_speed.py --presets tiny paper --modes eager compile --device cuda

With --baseline REV the model files of git revision REV (with the data.py, losses.py and
metrics.py of that revision) are exported to a temporary folder and timed side by side with
the working tree's, interleaved (old, new, new, old, ...) `--repeats` times, one thread each;
the table gives the medians and the speed-up new / old:

  python scripts/bench_speed.py --baseline b0b76e7 --presets paper --dtypes fp32 --steps 6 --repeats 3
"""
import argparse
import json
import os
import platform
import statistics
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
    p.add_argument("--new-extra", default="", help="with --baseline: flags for the working tree's runs only, e.g. "
                   "'--dec-layers 4' to match what the older file had fixed")
    p.add_argument("--baseline", default=None, metavar="REV",
                   help="also time the model files of this git revision, interleaved, and report new/old")
    p.add_argument("--repeats", type=int, default=3, help="with --baseline: runs of each side (medians)")
    p.add_argument("--threads", type=int, default=None,
                   help="OMP_NUM_THREADS of each run (default: 1 with --baseline, else inherited)")
    p.add_argument("--out", default=None, help="also write the table to this markdown file")
    args = p.parse_args(argv)
    if args.steps < 2 or args.repeats < 1:
        p.error("--steps must be at least 2 and --repeats at least 1")
    if args.threads is None and args.baseline:
        args.threads = 1
    return args


def measure(tree, model, preset, mode, dtype, args, tmp, tag="", extra=""):
    """One run of `tree/model.py`; returns (last train log line, None) or (None, error line)."""
    log_every = max(1, args.steps // 2)
    name = f"{model}-{preset}-{mode}-{dtype}{tag}"
    cmd = [sys.executable, str(tree / f"{model}.py"), "--preset", preset, "--steps", str(args.steps),
           "--log-every", str(log_every), "--eval-every", "0", "--eval-size", "8", "--save-every", "1000000000",
           "--dtype", dtype, "--device", args.device, "--out-dir", tmp, "--run-name", name, *args.extra.split(),
           *extra.split()]
    if args.batch_size:
        cmd += ["--batch-size", str(args.batch_size)]
    if mode == "compile":
        cmd.append("--compile")
    env = dict(os.environ, **({"OMP_NUM_THREADS": str(args.threads)} if args.threads else {}))
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=tree, env=env)
    if r.returncode != 0:
        return None, (r.stderr.strip().splitlines() or ["failed"])[-1]
    lines = [json.loads(l) for l in open(Path(tmp) / name / "metrics.jsonl")]
    return [l for l in lines if l["split"] == "train"][-1], None


def export_revision(rev, dest):
    """The files of git revision `rev` in `dest` (git archive: the working tree is untouched)."""
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev], capture_output=True)
    if archive.returncode != 0:
        sys.exit(f"error: git archive {rev}: {archive.stderr.decode().strip()}")
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive.stdout, check=True)


def compare_row(model, preset, mode, dtype, args, tmp, old_tree):
    """Interleaved old/new runs; one table row with median ms/step and the speed-up."""
    speeds = {"old": [], "new": []}
    for i in range(args.repeats):
        order = ("old", "new") if i % 2 == 0 else ("new", "old")  # alternate so drift cancels
        for side in order:
            tree = old_tree if side == "old" else ROOT
            rec, err = measure(tree, model, preset, mode, dtype, args, tmp, tag=f"-{side}{i}",
                               extra=args.new_extra if side == "new" else "")
            if rec is None:
                return f"| {model} | {preset} | {mode} | {dtype} | {side} failed: {err} | - | - |"
            speeds[side].append(rec["images_per_s"])
    old, new = statistics.median(speeds["old"]), statistics.median(speeds["new"])
    step_ms = {k: 1000 * args_batch(model, preset, args, tmp) / v for k, v in (("old", old), ("new", new))}
    return (f"| {model} | {preset} | {mode} | {dtype} | {step_ms['old']:.0f} | {step_ms['new']:.0f} "
            f"| {new / old:.2f}x |")


def args_batch(model, preset, args, tmp):
    """Batch size the new file resolved for this run (from its args.json)."""
    if args.batch_size:
        return args.batch_size
    run = next(Path(tmp).glob(f"{model}-{preset}-*-new*/args.json"))
    return json.loads(run.read_text())["batch_size"]


def main(argv=None):
    args = parse_args(argv)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() and args.device in ("auto", "cuda") \
        else f"CPU ({platform.processor() or platform.machine()}, {args.threads or torch.get_num_threads()} threads)"
    if args.baseline:
        rows = [f"| model | preset | mode | dtype | {args.baseline} ms/step | new ms/step | speed-up |",
                "|---|---|---|---|---:|---:|---:|"]
    else:
        rows = ["| model | preset | mode | dtype | images/s | peak memory (MiB) |", "|---|---|---|---|---|---|"]
    with tempfile.TemporaryDirectory() as tmp:
        old_tree = None
        if args.baseline:
            old_tree = Path(tmp) / "baseline"
            old_tree.mkdir()
            export_revision(args.baseline, old_tree)
        for model in args.models:
            for preset in args.presets:
                for mode in args.modes:
                    for dtype in args.dtypes:
                        if args.baseline:
                            rows.append(compare_row(model, preset, mode, dtype, args, tmp, old_tree))
                        else:
                            rec, err = measure(ROOT, model, preset, mode, dtype, args, tmp)
                            cells = (f"{rec['images_per_s']:.1f} | {rec['peak_mem_mb']:.0f}" if rec
                                     else f"failed: {err} | -")
                            rows.append(f"| {model} | {preset} | {mode} | {dtype} | {cells} |")
                        print(rows[-1], flush=True)
    what = (f"{args.repeats} interleaved runs a side, medians" if args.baseline else "one run each")
    table = (f"Device: {device}; torch {torch.__version__}; {args.steps} steps a run, second half timed; "
             f"{what}.\n\n" + "\n".join(rows))
    print("\n" + table)
    if args.out:
        Path(args.out).write_text(table + "\n")


if __name__ == "__main__":
    main()
