"""Is reconstruction the right objective? Slot Attention's core trained by reconstruction against the same core
trained by siamese self-supervision without a decoder (issue 19; the proposal of robert1003/slot-attention-
disentanglement issue 15), on the same data, steps, masks and probe.

For every seed and every --loss (mse, cov: reconstruction; simsiam, swav: two views, no decoder), three runs of
slot_attention.py in this process, each printed as the command that does the same:
  1. the core:    --loss L --steps N                               -> OUT_DIR/L-seedS
  2. a decoder:   --frozen-core OUT_DIR/L-seedS/checkpoint.pt --steps M  (encoder + slot attention frozen, a new
                  spatial broadcast decoder trained by MSE)          -> OUT_DIR/L-seedS-decoder
  3. the probe:   --eval-only OUT_DIR/L-seedS/checkpoint.pt --probe (an MLP from frozen slots to object
                  properties, Hungarian-matched; metrics.feature_probe)  -> OUT_DIR/L-seedS/probe.json
Each run continues with --resume auto: finished runs are reused, and a comparison stopped by SIGTERM / SIGINT
(the run in progress writes its checkpoint; the script exits with its status) continues when rerun as is.
Writes OUT_DIR/ssl_vs_recon.md (command, date, machine, one row per loss, mean ± sample std over seeds) and
OUT_DIR/ssl_vs_recon.json (every value per run). Columns, all on the test split:
  attn FG-ARI / attn mBO   slot attention's own attention maps as the segmentation (every loss has them)
  own dec FG-ARI           the reconstruction run's own decoder alpha masks (mse, cov only)
  frozen dec FG-ARI        the alpha masks of the decoder trained on the frozen core (step 2)
  shape acc, colour/x/y R^2  the probe (step 3)
  match agree              simsiam/swav: how often the Hungarian matching pairs slots of the same initial slot
  images/s                 core training throughput, mean over its logged windows (both views count as one image)

  OMP_NUM_THREADS=1 python scripts/ssl_vs_recon.py                        # CPU: tiny preset, shapes-colored
  OMP_NUM_THREADS=1 python scripts/ssl_vs_recon.py --seeds 0 --steps 1500 --decoder-steps 500 --probe-steps 500 \
      --extra-all="--decay-steps 1500"                                      # docs/ssl.md's table
  python scripts/ssl_vs_recon.py --preset paper --steps 100000 --decoder-steps 20000 --device cuda --dtype bf16 \\
      --probe-train-size 10000 --probe-val-size 1000 --probe-test-size 2000 --probe-steps 6000
"""
import argparse
import json
import math
import os
import platform
import shlex
import statistics
import sys
from datetime import datetime, timezone
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import slot_attention  # noqa: E402

LOSSES = ("mse", "cov", "simsiam", "swav")
COLUMNS = (("attn_fg_ari", "attn FG-ARI"), ("attn_mbo", "attn mBO"), ("own_fg_ari", "own dec FG-ARI"),
           ("frozen_fg_ari", "frozen dec FG-ARI"), ("shape_acc", "shape acc"), ("color_r2", "colour R²"),
           ("x_r2", "x R²"), ("y_r2", "y R²"), ("match_agree", "match agree"), ("images_per_s", "images/s"))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--losses", nargs="+", choices=LOSSES, default=list(LOSSES), help="objectives of the core to compare")
    a("--seeds", type=int, nargs="+", default=[0, 1], help="seeds; every loss trains once per seed")
    a("--data", default="shapes-colored", help="built-in set or path, with per-object properties for the probe")
    a("--preset", choices=["tiny", "paper"], default="tiny", help="--preset of every run")
    a("--steps", type=int, default=None, help="core training steps (default: the preset's)")
    a("--decoder-steps", type=int, default=None, help="steps of the decoder on the frozen core (default: --steps / 2)")
    a("--eval-size", type=int, default=None, help="test images of every evaluation (default: the preset's)")
    a("--probe-train-size", type=int, default=1_000, help="probe: train images (authors: 10000)")
    a("--probe-val-size", type=int, default=200, help="probe: early-stopping images (authors: 1000)")
    a("--probe-test-size", type=int, default=500, help="probe: test images (authors: 2000)")
    a("--probe-steps", type=int, default=1_000, help="probe: at most this many MLP steps (authors: 6000)")
    a("--device", choices=["auto", "cpu", "cuda", "mps"], default="auto", help="--device of every run")
    a("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32", help="--dtype of every run")
    a("--out-dir", default="runs/ssl_vs_recon", help="folder of the runs and of the table")
    a("--extra-all", type=shlex.split, default=[], metavar="FLAGS",
      help="further flags for every run (last, so they win), e.g. '--log-every 10'; a lone flag needs '='")
    args = p.parse_args(argv)
    for k in ("steps", "decoder_steps", "eval_size", "probe_train_size", "probe_val_size", "probe_test_size",
              "probe_steps"):
        if getattr(args, k) is not None and getattr(args, k) <= 0:
            p.error(f"--{k.replace('_', '-')} must be positive, got {getattr(args, k)}")
    args.command = "python scripts/ssl_vs_recon.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    # every core's flags checked by slot_attention's own parser before anything trains
    args.core_steps = {}
    for loss in args.losses:
        try:
            args.core_steps[loss] = slot_attention.parse_args(core_argv(loss, args.seeds[0], args)).steps
        except SystemExit:
            p.error(f"slot_attention.py refuses --loss {loss} with {shlex.join(core_argv(loss, args.seeds[0], args))}")
    return args


def common_argv(seed, args):
    argv = ["--preset", args.preset, "--data", args.data, "--seed", str(seed), "--device", args.device,
            "--dtype", args.dtype, "--out-dir", args.out_dir, "--resume", "auto"]
    return argv + (["--eval-size", str(args.eval_size)] if args.eval_size else [])


def core_argv(loss, seed, args):
    steps = ["--steps", str(args.steps)] if args.steps else []
    return common_argv(seed, args) + ["--loss", loss, "--run-name", f"{loss}-seed{seed}"] + steps + args.extra_all


def run(argv):
    """slot_attention.py with these flags, in this process; None, or why it failed. A run stopped by a signal
    (it wrote its checkpoint) stops the comparison with the same exit status: rerun the same command to continue."""
    print("python slot_attention.py " + shlex.join(argv), flush=True)
    try:
        slot_attention.main(argv)
    except SystemExit as e:
        if e.code in (slot_attention.EXIT_PREEMPTED, 130):
            raise
        if e.code:
            return f"exit status {e.code} (its error line is above)"
    return None


def compare_one(loss, seed, args):
    """The three runs of one (loss, seed); returns (values, None) or (None, why)."""
    core = Path(args.out_dir) / f"{loss}-seed{seed}"
    decoder_steps = args.decoder_steps or max(1, args.core_steps[loss] // 2)
    steps = [
        core_argv(loss, seed, args),
        common_argv(seed, args) + ["--frozen-core", str(core / "checkpoint.pt"), "--run-name",
                                   f"{core.name}-decoder", "--steps", str(decoder_steps)] + args.extra_all,
    ]
    if not (core / "probe.json").exists():
        steps.append(["--eval-only", str(core / "checkpoint.pt"), "--probe", "--device", args.device, "--dtype",
                      args.dtype, "--probe-train-size", str(args.probe_train_size), "--probe-val-size",
                      str(args.probe_val_size), "--probe-test-size", str(args.probe_test_size), "--probe-steps",
                      str(args.probe_steps)] + (["--eval-size", str(args.eval_size)] if args.eval_size else []))
    for argv in steps:
        error = run(argv)
        if error:
            return None, error
    own = json.loads((core / "eval.json").read_text())
    frozen = json.loads((core.parent / f"{core.name}-decoder" / "eval.json").read_text())
    probe = json.loads((core / "probe.json").read_text())
    train = [json.loads(line) for line in (core / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in train if r["split"] == "train"]
    values = dict(attn_fg_ari=own.get("attn_fg_ari"), attn_mbo=own.get("attn_mbo"),
                  own_fg_ari=own.get("fg_ari") if loss not in slot_attention.SSL_LOSSES else None,
                  frozen_fg_ari=frozen.get("fg_ari"),
                  **{k: probe.get(k) for k in ("shape_acc", "color_r2", "x_r2", "y_r2")},
                  match_agree=train[-1].get("match_agree") if train else None,
                  images_per_s=statistics.fmean(r["images_per_s"] for r in train) if train else None,
                  steps=own["step"], decoder_steps=frozen["step"])
    return values, None


def cell(values):
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return "-"
    fmt = "{:.0f}" if max(abs(v) for v in values) >= 100 else "{:.3f}"
    if len(values) == 1:
        return fmt.format(values[0])
    return f"{fmt.format(statistics.fmean(values))} ± {fmt.format(statistics.stdev(values))}"


def machine(device):
    if device == "cuda" or (device == "auto" and torch.cuda.is_available()):
        return torch.cuda.get_device_name()
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, " \
           f"{os.environ.get('OMP_NUM_THREADS', 'all')} thread(s)"


def main(argv=None):
    args = parse_args(argv)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    results, failed = {}, []
    for seed in args.seeds:
        for loss in args.losses:
            values, error = compare_one(loss, seed, args)
            if error:
                failed.append(f"{loss} seed {seed}: {error}")
                print(f"failed: {failed[-1]}", file=sys.stderr, flush=True)
            else:
                results.setdefault(loss, {})[seed] = values
    lines = [f"`{args.command}`; {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC; {machine(args.device)}; "
             f"torch {torch.__version__}", "",
             "| loss | seeds | steps (core / decoder) | " + " | ".join(name for _, name in COLUMNS) + " |",
             "|---" * (len(COLUMNS) + 3) + "|"]
    for loss, per_seed in results.items():
        runs = list(per_seed.values())
        lines.append(f"| {loss} | {' '.join(map(str, per_seed))} | {runs[0]['steps']} / {runs[0]['decoder_steps']} | "
                     + " | ".join(cell([r[k] for r in runs]) for k, _ in COLUMNS) + " |")
    lines += [""] + [f"failed: {f}" for f in failed] if failed else []
    table = "\n".join(lines) + "\n"
    for name, text in (("ssl_vs_recon.md", table), ("ssl_vs_recon.json", json.dumps(
            {"command": args.command, "results": results, "failed": failed}, indent=2))):
        tmp = out / (name + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, out / name)
    print(table)
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    main()
