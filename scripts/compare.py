"""One comparison of the model files: the same data, preset and held-out images, one markdown table and one plot.

Each (model, seed) trains as a subprocess `python MODEL.py --preset P --data D ...` (the command is printed and
the model's progress bar passes through). Before anything trains, every model's own parse_args checks its flags,
so a combination a model refuses stops the script in seconds. A run whose eval.json exists is reused; one with a
checkpoint but no eval.json (interrupted) is resumed; a reused run must have been trained with the same resolved
flags, or it is reported and left out. A run that fails is reported with its last error line and left out of the
table, and the script exits non-zero after writing what it has:
  OUT_DIR/compare.md   the command, date, device, torch version; per model the final test-split FG-ARI, ARI,
                       mIoU, mBO (mean ± sample std over seeds), training images/s, peak memory, trained
                       parameters and wall time per run
  OUT_DIR/fg_ari.png   FG-ARI against training step, mean over seeds (validation split, last point test split)

  OMP_NUM_THREADS=1 python scripts/compare.py                          # CPU: tiny presets, shapes-binary, seed 0
  python scripts/compare.py --preset paper --steps 100000 --seeds 0 1 2 --device cuda --dtype bf16 \\
      --extra "dinosaur=--weights dino_vitbase16_pretrain.pth"      # GPU
  python scripts/compare.py --models slot_attention vit_mae_ocl --data tetrominoes --extra-all "--log-every 10"

What each model does with the data (check the px and K columns of the table):
  - tiny preset: every model runs at 32 px on every built-in set except vit_mae_ocl on tetrominoes (35 px, patch 5).
    K is each model's own default for the data: MONet has one more slot than the others (its background slot).
  - paper preset: DINOSAUR runs its ViT-B/16 at 224 px, the others at the data's paper size (64 px for the sprite
    sets, 35 for tetrominoes); the built-in scenes are the same at every size. Without --weights DINOSAUR's ViT is
    random (always so in the tiny preset: no weights exist for its tiny ViT) and its numbers only show the
    pipeline; in the paper preset give it the DINO checkpoint with --extra "dinosaur=--weights FILE".
  - A common --resolution through --extra-all must suit every model: vit_mae_ocl needs it divisible by its patch
    size (add --extra "vit_mae_ocl=--patch-size P"), dinosaur by its ViT's patch (4 tiny, 16 paper), the clevr
    decoder of slot_attention (CLEVR files) by 16. The preflight check names the model and the reason.
"""
import argparse
import contextlib
import importlib
import io
import json
import math
import os
import shlex
import signal
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import bench_speed  # noqa: E402  (this folder is on sys.path when a script runs)
import data  # noqa: E402

MODELS = tuple(m for m in bench_speed.MODELS if (ROOT / f"{m}.py").exists())
METRICS = (("fg_ari", "FG-ARI"), ("ari", "ARI"), ("miou", "mIoU"), ("mbo", "mBO"))
IGNORED = {"device", "out_dir", "resume", "eval_only", "workers"}  # may differ between a run and its reuse
COLOURS = (0, 3, 1, 5, 4, 10, 12, 7)  # data.PALETTE rows that read well on white


def shell_words(text):
    try:
        return shlex.split(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"cannot split {text!r} into flags: {e}")


def model_flags(text):
    """'MODEL=FLAGS' -> (MODEL, [flags])."""
    model, sep, flags = text.partition("=")
    if not sep or model not in MODELS:
        raise argparse.ArgumentTypeError(f"expected MODEL=FLAGS with MODEL one of {', '.join(MODELS)}, got {text!r}")
    return model, shell_words(flags)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS),
                   help="model files to compare (default: all that exist)")
    p.add_argument("--preset", choices=["tiny", "paper"], default="tiny", help="--preset of every run")
    p.add_argument("--data", default="shapes-binary", help="one data set for every model: built-in name or path")
    p.add_argument("--steps", type=int, default=None, help="training steps of every run (default: each preset's own)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="seeds; every model trains once per seed")
    p.add_argument("--eval-every", type=int, default=None,
                   help="steps between evaluations on the validation split (default: steps // 5, at least 1)")
    p.add_argument("--eval-size", type=int, default=None,
                   help="held-out images per evaluation, the same for every model (default: 64 tiny, 320 paper)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda", "mps"], default="auto", help="--device of every run")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32", help="autocast precision of every run")
    p.add_argument("--out-dir", default="runs/compare", help="folder of the runs, compare.md and fg_ari.png")
    p.add_argument("--extra", type=model_flags, action="append", default=[], metavar="MODEL=FLAGS",
                   help="further flags for one model, repeatable, e.g. 'vit_mae_ocl=--patch-size 4'")
    p.add_argument("--extra-all", type=shell_words, default=[], metavar="FLAGS",
                   help="further flags for every run (after the script's own, so they override), "
                        "e.g. '--log-every 10'; a lone flag needs '=': --extra-all=--compile")
    args = p.parse_args(argv)
    if args.steps is not None and args.steps <= 0:
        p.error(f"--steps must be positive, got {args.steps}")
    if args.eval_every is not None and args.eval_every < 0:
        p.error(f"--eval-every must be 0 (final evaluation only) or positive, got {args.eval_every}")
    if args.eval_size is not None and args.eval_size <= 0:
        p.error(f"--eval-size must be positive, got {args.eval_size}")
    args.eval_size = args.eval_size or {"tiny": 64, "paper": 320}[args.preset]
    args.command = "python scripts/compare.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    args.resolved = {}  # model -> its resolved arguments for the first seed
    for model in args.models:
        args.resolved[model], error = model_args(model, args.seeds[0], args)
        if error:
            p.error(f"{model}.py refuses the flags {shlex.join(run_argv(model, args.seeds[0], args))}: {error}")
    return args


def run_name(model, seed, args):
    return f"{model}-{Path(args.data).stem}-{args.preset}-seed{seed}"


def run_argv(model, seed, args, eval_every=None):
    """The model file's flags for one run; --extra-all, then --extra, come last and win."""
    argv = ["--preset", args.preset, "--data", args.data, "--seed", str(seed), "--device", args.device,
            "--dtype", args.dtype, "--out-dir", args.out_dir, "--run-name", run_name(model, seed, args),
            "--eval-size", str(args.eval_size)]
    argv += ["--steps", str(args.steps)] if args.steps else []
    argv += ["--eval-every", str(eval_every)] if eval_every is not None else []
    return argv + args.extra_all + [f for m, flags in args.extra if m == model for f in flags]


def model_args(model, seed, args):
    """The model's own parse_args on run_argv -> (resolved argparse Namespace, None) or (None, its error line)."""
    parse = importlib.import_module(model).parse_args
    eval_every = args.eval_every
    with contextlib.redirect_stderr(io.StringIO()) as err:
        try:
            if eval_every is None:  # steps // 5 of the steps the model will really run
                eval_every = max(1, parse(run_argv(model, seed, args)).steps // 5)
            return parse(run_argv(model, seed, args, eval_every)), None
        except SystemExit:  # argparse has written its usage and the reason
            last = (err.getvalue().strip().splitlines() or ["it exited while parsing them"])[-1]
            return None, last.partition("error: ")[2] or last


def train(model, seed, args):
    """Train one (model, seed) unless its eval.json exists; return (run folder, None) or (None, why it failed)."""
    resolved, error = model_args(model, seed, args)
    if error:
        return None, error
    run = Path(args.out_dir) / run_name(model, seed, args)
    want = {k: v for k, v in json.loads(json.dumps(vars(resolved))).items() if k not in IGNORED}
    if (run / "args.json").exists():  # the folder holds a run: it must be this one
        had = {k: v for k, v in json.loads((run / "args.json").read_text()).items() if k not in IGNORED}
        diff = [f"{k}: {had.get(k)} there, {want.get(k)} here" for k in sorted(want.keys() | had.keys())
                if had.get(k) != want.get(k)]
        if diff:
            return None, f"{run} was trained with other flags ({'; '.join(diff)}); delete it or use another --out-dir"
    if (run / "eval.json").exists():
        print(f"reusing {run} (its eval.json exists)", flush=True)
        return run, None
    argv = run_argv(model, seed, args, resolved.eval_every)
    if (run / "checkpoint.pt").exists():  # interrupted earlier: continue it
        argv += ["--resume", str(run / "checkpoint.pt")]
    print(f"python {model}.py {shlex.join(argv)}", flush=True)
    t0 = time.time()
    proc = subprocess.Popen([sys.executable, str(ROOT / f"{model}.py"), *argv], stderr=subprocess.PIPE)
    tail = b""
    try:
        for chunk in iter(lambda: proc.stderr.read1(4096), b""):  # pass the progress bar through, keep the end
            sys.stderr.buffer.write(chunk)
            sys.stderr.flush()
            tail = (tail + chunk)[-4096:]
    except KeyboardInterrupt:  # Ctrl-C in a terminal reaches the run too; a signal sent to this process alone not
        proc.send_signal(signal.SIGINT)
        proc.communicate()
        raise
    if proc.wait() != 0:
        lines = [l.strip() for l in tail.decode(errors="replace").replace("\r", "\n").splitlines() if l.strip()]
        return None, (lines or [f"exit code {proc.returncode}"])[-1]
    if not (run / "eval.json").exists():
        return None, f"{model}.py exited without writing {run / 'eval.json'}"
    (run / "compare.json").write_text(json.dumps({"wall_s": time.time() - t0, "argv": argv}, indent=2))
    return run, None


def read_log(path):
    """metrics.jsonl -> {"train": {step: record}, "eval": {step: record}}; a resumed run's repeated steps: last wins."""
    log = {"train": {}, "eval": {}}
    for line in path.read_text().splitlines():
        rec = json.loads(line)
        log.setdefault(rec["split"], {})[rec["step"]] = rec
    return log


def cell(values, fmt="{:.3f}"):
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return "-"
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{fmt.format(statistics.fmean(values))} ± {fmt.format(std)}"


def summarise(model, runs, args):
    """The table row of one model (its runs: one folder per seed) and its FG-ARI curve [(step, mean)]."""
    evals = [json.loads((r / "eval.json").read_text()) for r in runs]
    logs = [read_log(r / "metrics.jsonl") for r in runs]
    speed = []
    for log in logs:
        window = [log["train"][s]["images_per_s"] for s in sorted(log["train"])]
        speed.append(statistics.fmean(window[1:] or window))  # the first window holds start-up
    peak = max(rec["peak_mem_mb"] for log in logs for rec in log["train"].values())
    state = torch.load(runs[0] / "checkpoint.pt", map_location="cpu", weights_only=True)["model"]
    params = sum(t.numel() for t in state.values() if t.is_floating_point())
    walls = [json.loads((r / "compare.json").read_text())["wall_s"] / 60 if (r / "compare.json").exists() else None
             for r in runs]
    resolved = args.resolved[model]
    row = [model, str(resolved.resolution), str(resolved.num_slots), str(resolved.steps),
           *(cell([e.get(key) for e in evals]) for key, _ in METRICS),
           f"{statistics.fmean(speed):.1f}", f"{peak:.0f}", f"{params:,}", cell(walls, "{:.1f}")]
    steps = sorted(set.intersection(*(set(log["eval"]) for log in logs)))
    curve = [(s, statistics.fmean(log["eval"][s].get("fg_ari", math.nan) for log in logs)) for s in steps]
    return row, [(s, v) for s, v in curve if math.isfinite(v)]


def device_name(device):
    if device in ("auto", "cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name()
    if device in ("auto", "mps") and torch.backends.mps.is_available():
        return "Apple MPS"
    return f"CPU ({torch.get_num_threads()} threads)"


def plot(path, curves, title):
    """{name: [(step, value)]} -> a line chart PNG drawn with Pillow, written atomically (temporary file, rename)."""
    W, H, L, R, T, B = 760, 440, 60, 170, 40, 50  # canvas and its left/right/top/bottom margins (px)
    img, font = Image.new("RGB", (W, H), "white"), ImageFont.load_default()
    d = ImageDraw.Draw(img)

    def text(x, y, s, ax=0.0, ay=0.0):  # ax, ay: where (x, y) is on the text box, 0 left/top .. 1 right/bottom
        x0, y0, x1, y1 = d.textbbox((0, 0), s, font=font)
        d.text((x - ax * (x1 - x0) - x0, y - ay * (y1 - y0) - y0), s, fill="black", font=font)

    values = [p for c in curves.values() for p in c]
    x_hi = max([s for s, _ in values], default=1) or 1
    y_lo = min([0.0] + [math.floor(v * 4) / 4 for _, v in values])  # FG-ARI can be < 0; ticks every 0.25
    y_hi = max([1.0] + [math.ceil(v * 4) / 4 for _, v in values])

    def xy(step, value):
        return L + (W - L - R) * step / x_hi, H - B - (H - T - B) * (value - y_lo) / (y_hi - y_lo)

    unit = 10 ** math.floor(math.log10(max(x_hi / 4, 1)))
    for s in range(0, x_hi + 1, next(m * unit for m in (1, 2, 5, 10) if m * unit >= x_hi / 4)):  # x ticks: round steps
        x = xy(s, y_lo)[0]
        d.line([x, H - B, x, H - B + 4], fill="black")
        text(x, H - B + 7, f"{s:,}", ax=0.5)
    for i in range(round((y_hi - y_lo) * 4) + 1):  # y ticks and a light grid
        y = xy(0, y_lo + i / 4)[1]
        d.line([L, y, W - R, y], fill=(225, 225, 225))
        d.line([L - 4, y, L, y], fill="black")
        text(L - 7, y, f"{y_lo + i / 4:.2f}", ax=1, ay=0.5)
    d.rectangle([L, T, W - R, H - B], outline="black")
    text((L + W - R) / 2, H - 8, "training step", ax=0.5, ay=1)
    text(L, T - 6, "FG-ARI", ax=0.5, ay=1)
    text(W / 2, 8, title, ax=0.5)
    for i, (name, points) in enumerate(curves.items()):
        colour = tuple(data.PALETTE[COLOURS[i % len(COLOURS)]].tolist())
        pixels = [xy(s, v) for s, v in points]
        if len(pixels) > 1:
            d.line(pixels, fill=colour, width=2)
        for x, y in pixels:
            d.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colour)
        d.line([W - R + 15, T + 10 + 20 * i, W - R + 40, T + 10 + 20 * i], fill=colour, width=3)
        text(W - R + 47, T + 10 + 20 * i, name, ay=0.5)
    tmp = path.with_name(path.name + ".tmp")
    img.save(tmp, format="PNG")
    os.replace(tmp, path)


def write_atomic(path, text):
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def main(argv=None):
    args = parse_args(argv)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    runs, failed = {}, []
    for model in args.models:
        for seed in args.seeds:
            run, error = train(model, seed, args)
            if error:
                failed.append(f"{model} seed {seed}: {error}")
                print(f"failed: {failed[-1]}", file=sys.stderr, flush=True)
            else:
                runs.setdefault(model, []).append(run)
    rows, curves = [], {}
    for model, model_runs in runs.items():
        rows.append(summarise(model, model_runs, args))
        curves[model] = rows[-1][1]
    columns = ["model", "px", "K", "steps", *(name for _, name in METRICS), "images/s", "peak MiB", "parameters¹",
               "min/run"]
    lines = [f"`{args.command}`; {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC; {device_name(args.device)}; "
             f"torch {torch.__version__}",
             "",
             f"`--data {args.data} --preset {args.preset}`, seeds "
             f"{' '.join(map(str, args.seeds))}, `--dtype {args.dtype}`. Segmentation metrics: final evaluation on "
             f"the first {args.eval_size} test-split images (the same for every model), mean ± sample std over "
             "seeds. images/s: mean over the training log windows after the first (start-up); peak MiB: "
             "CUDA max allocated, or the process's peak resident set on CPU. min/run: wall time of the "
             "subprocess (start-up and evaluations included; a resumed run: its last part).",
             "",
             "| " + " | ".join(columns) + " |",
             "|---|" + "---:|" * (len(columns) - 1),
             *("| " + " | ".join(row) + " |" for row, _ in rows),
             "",
             "¹ floating-point tensors of the checkpoint's model state; DINOSAUR's frozen ViT is not in its "
             "checkpoint and is not counted.",
             ""]
    lines += [f"Failed and left out: {f}" for f in failed]
    write_atomic(out / "compare.md", "\n".join(lines) + "\n")
    plot(out / "fg_ari.png", curves, f"FG-ARI during training (validation split; last point: test split), "
                                     f"{args.data}, preset {args.preset}, mean of {len(args.seeds)} seed(s)")
    print("\n".join(lines))
    print(f"wrote {out / 'compare.md'} and {out / 'fg_ari.png'}")
    if failed:
        sys.exit(f"error: {len(failed)} run(s) failed: " + "; ".join(failed))


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
