"""One command for a GPU lent for minutes: speed, memory and compile time of all five models at their paper
configuration in bf16, eager and compiled, then a short training run of the two fastest learners with their
FG-ARI curve. Writes OUT/gpu_check.md (one table per part, the command, date, device) and OUT/gpu_check.json.

  python scripts/gpu_check.py                            # CUDA, 8 minutes in all (default --budget 480)
  python scripts/gpu_check.py --budget 300 --out runs/gpu
  python scripts/gpu_check.py --device cpu --tiny        # the CPU smoke path the tests run

Every run is a subprocess of the model's own command line (`MODEL.py --preset paper --dtype bf16 ...`), so what
is measured is what a user runs. Speed part: `--steps` steps a run, logged in two windows; images/s and the
step time come from the second window, peak memory is `torch.cuda.max_memory_allocated` as the model logs it,
and the compile time is the first window's time minus its steps at the steady step time (so it holds start-up
work too; eager runs give the baseline of that). Learning part: `--learners` train on `--data` with an
evaluation every `--eval-every` steps, for as many steps as their measured eager speed allows in their share of
the budget. The budget is shared out before each run and a run that would exceed what is left is skipped and
marked so; no run is started with under 20 seconds left.
"""
import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import bench_speed  # noqa: E402

MODELS = tuple(m for m in bench_speed.MODELS if (ROOT / f"{m}.py").exists())
# --tiny: models small enough for a CPU smoke test (the sizes of the test files)
TINY = {
    "slot_attention": "--slot-dim 16 --mlp-hidden 16 --enc-channels 8 --dec-channels 8 --proj-dim 16",
    "monet": "--unet-channels 4 --mlp-hidden 16 --enc-channels 4 --enc-hidden 16 --dec-channels 4 --latent-dim 4",
    "iodine": "--latent-dim 4 --dec-channels 8 --ref-channels 8 --ref-layers 2 --ref-mlp 16 --lstm-hidden 16 --iters 2",
    "dinosaur": "--slot-dim 16 --dec-hidden 32 --dec-channels 8 --target-resolution 16 --proj-dim 16",
    "vit_mae_ocl": "--patch-size 4 --enc-dim 16 --enc-heads 2 --dec-dim 16 --dec-heads 2 --enc-depth 2 --dec-depth 1",
}
MIN_RUN_S = 20  # no run starts with less budget left than this


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="device of every run")
    p.add_argument("--budget", type=float, default=480, help="seconds for the whole check (runs are skipped past it)")
    p.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS), help="models of the speed part")
    p.add_argument("--learners", nargs="*", choices=MODELS, default=["vit_mae_ocl", "slot_attention"],
                   help="models of the learning part (the two fastest learners of the CPU comparison)")
    p.add_argument("--modes", nargs="+", choices=["eager", "compile"], default=["eager", "compile"],
                   help="eager and/or torch.compile runs of the speed part (compiling on a CPU takes minutes)")
    p.add_argument("--steps", type=int, default=30, help="steps of each speed run (two log windows)")
    p.add_argument("--learn-share", type=float, default=0.4, help="share of the budget for the learning part")
    p.add_argument("--max-learn-steps", type=int, default=50_000, help="cap on the steps of a learning run")
    p.add_argument("--data", default="tetrominoes", help="data of the learning part")
    p.add_argument("--eval-every", type=int, default=250, help="steps between evaluations in the learning part")
    p.add_argument("--tiny", action="store_true", help="tiny presets and models at 16 px: a CPU smoke test")
    p.add_argument("--out", default="runs/gpu_check", help="folder for gpu_check.md and gpu_check.json")
    args = p.parse_args(argv)
    if args.budget <= 0 or args.steps < 2 or args.eval_every <= 0 or not 0 <= args.learn_share < 1:
        p.error("--budget and --eval-every must be positive, --steps at least 2, --learn-share in [0, 1)")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available (use --device cpu --tiny for the smoke path)")
    return args


def flags(model, args):
    """The model's command line for this check: the paper configuration, or the tiny smoke sizes."""
    if args.tiny:
        return ["--preset", "tiny", "--resolution", "16", "--num-slots", "3", "--batch-size", "4", "--data",
                "shapes-binary", *TINY[model].split()]
    return ["--preset", "paper"]


def run(model, extra, args, tmp, name, timeout):
    """One training run; returns (train log lines, eval log lines, wall seconds) or raises RuntimeError."""
    cmd = [sys.executable, str(ROOT / f"{model}.py"), *flags(model, args), "--dtype", "bf16", "--device", args.device,
           "--eval-size", "8", "--save-every", "1000000000", "--out-dir", tmp, "--run-name", name, *extra]
    t0 = time.time()
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"stopped at the budget ({timeout:.0f} s)")
    if r.returncode != 0:
        raise RuntimeError((r.stderr.strip().splitlines() or ["failed"])[-1][:200])
    lines = [json.loads(l) for l in open(Path(tmp) / name / "metrics.jsonl")]
    return ([l for l in lines if l["split"] == "train"], [l for l in lines if l["split"] == "eval"],
            time.time() - t0)


def speed(model, mode, args, tmp, timeout):
    """images/s, step time and peak memory of the second window; compile time from the first."""
    half = args.steps // 2
    extra = ["--steps", str(2 * half), "--log-every", str(half), "--eval-every", "0"]
    train, _, wall = run(model, extra + (["--compile"] if mode == "compile" else []), args, tmp,
                         f"{model}-{mode}", timeout)
    first, last = train[0], train[-1]
    batch = json.loads((Path(tmp) / f"{model}-{mode}" / "args.json").read_text())["batch_size"]
    step_s = batch / last["images_per_s"]
    first_window_s = half * batch / first["images_per_s"]
    return dict(model=model, mode=mode, batch=batch, images_per_s=last["images_per_s"], step_ms=1000 * step_s,
                peak_mem_mb=last["peak_mem_mb"], warmup_s=first_window_s - half * step_s, wall_s=wall)


def learn(model, eager, args, tmp, seconds):
    """A short training run sized to `seconds` at the measured eager speed; its FG-ARI curve."""
    fit = min(int(seconds * 0.6 / (eager["step_ms"] / 1000)), args.max_learn_steps)  # 40% left for start-up, evals
    steps = max(args.eval_every, fit // args.eval_every * args.eval_every)
    extra = ["--steps", str(steps), "--eval-every", str(args.eval_every), "--log-every", str(args.eval_every)]
    if not args.tiny:
        extra += ["--data", args.data]
    _, evals, wall = run(model, extra, args, tmp, f"{model}-learn", seconds)
    return dict(model=model, steps=steps, wall_s=wall, curve=[(e["step"], e.get("fg_ari")) for e in evals])


def device_name(args):
    if args.device == "cuda":
        return f"{torch.cuda.get_device_name()} (CUDA {torch.version.cuda})"
    return f"CPU ({platform.processor() or platform.machine()}, {os.environ.get('OMP_NUM_THREADS', 'all')} threads)"


def table(rows, header, cells):
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return out + ["| " + " | ".join(cells(r)) + " |" for r in rows]


def main(argv=None):
    args = parse_args(argv)
    start = time.time()
    left = lambda: args.budget - (time.time() - start)  # noqa: E731
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    speed_rows, learn_rows = [], []
    speed_budget = args.budget * (1 - args.learn_share) if args.learners else args.budget
    with tempfile.TemporaryDirectory() as tmp:
        jobs = [(m, mode) for m in args.models for mode in args.modes]
        for i, (model, mode) in enumerate(jobs):
            share = (speed_budget - (time.time() - start)) / (len(jobs) - i)  # equal share of what is left
            if min(share, left()) < MIN_RUN_S:
                speed_rows.append(dict(model=model, mode=mode, error="skipped: budget spent"))
                continue
            try:
                speed_rows.append(speed(model, mode, args, tmp, min(share, left())))
            except RuntimeError as e:
                speed_rows.append(dict(model=model, mode=mode, error=str(e)))
            print(speed_rows[-1], flush=True)
        for i, model in enumerate(args.learners):
            eager = next((r for r in speed_rows if r["model"] == model and r["mode"] == "eager" and "error" not in r),
                         None)
            seconds = left() / (len(args.learners) - i)
            if eager is None or seconds < MIN_RUN_S:
                learn_rows.append(dict(model=model, error="skipped: no eager speed measured" if eager is None
                                       else "skipped: budget spent"))
                continue
            try:
                learn_rows.append(learn(model, eager, args, tmp, seconds))
            except RuntimeError as e:
                learn_rows.append(dict(model=model, error=str(e)))
            print(learn_rows[-1], flush=True)

    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    command = "python scripts/gpu_check.py " + " ".join(sys.argv[1:] if argv is None else argv)
    num = lambda r, k, f: f.format(r[k]) if "error" not in r else "-"  # noqa: E731
    md = [f"`{command}`", "", f"{when}; {device_name(args)}; torch {torch.__version__}; "
          f"{'tiny models at 16 px' if args.tiny else 'paper configurations'}, bf16; budget {args.budget:.0f} s, "
          f"used {time.time() - start:.0f} s.", "", "Speed (second window of each run; warm-up = first window's "
          "time beyond its steps at the steady step time, compilation included):", ""]
    md += table(speed_rows, ["model", "mode", "batch", "images/s", "ms/step", "peak MiB", "warm-up s", "note"],
                lambda r: [r["model"], r["mode"], num(r, "batch", "{}"), num(r, "images_per_s", "{:.1f}"),
                           num(r, "step_ms", "{:.1f}"), num(r, "peak_mem_mb", "{:.0f}"), num(r, "warmup_s", "{:.1f}"),
                           r.get("error", "")])
    if args.learners:
        md += ["", f"Learning ({'shapes-binary' if args.tiny else args.data}, eager, FG-ARI at each evaluation; "
               "the last point is the test split):", ""]
        md += table(learn_rows, ["model", "steps", "wall s", "FG-ARI curve (step: value)"],
                    lambda r: [r["model"], num(r, "steps", "{}"), num(r, "wall_s", "{:.1f}"),
                               r.get("error") or ", ".join(f"{s}: {v:.3f}" for s, v in r["curve"] if v is not None)])
    (out / "gpu_check.md").write_text("\n".join(md) + "\n")
    (out / "gpu_check.json").write_text(json.dumps(dict(command=command, date=when, device=device_name(args),
                                                         torch=torch.__version__, speed=speed_rows,
                                                         learning=learn_rows), indent=2))
    print("\n".join(md))


if __name__ == "__main__":
    main()
