#!/usr/bin/env bash
# The loss and masking ablations of Vikstrom & Ilin 2022 (appendix, Tables 4-6) with vit_mae_ocl.py:
# full model, no object entropy, no pixel entropy, neither, no masking; every variant over SEEDS.
# Writes OUT/ablation.md: FG-ARI, ARI and mIoU (test split, mask ratio 0), mean +- std over seeds (sample
# std; 0 for one seed); with --select topN-of-M-by-KEY also the mean +- std of the N best of M seeds by KEY
# (fg_ari, ari or miou), as the paper summarises unstable runs.
#
#   bash scripts/vit_mae_ablation.sh                              # tiny preset on CPU, paper preset on a GPU
#   SEEDS="0 1 2 3 4" DATA=tetrominoes bash scripts/vit_mae_ablation.sh
#   DATA=/data/clevrtex_full bash scripts/vit_mae_ablation.sh --select top3-of-10-by-miou   # seeds 0-9
#   PRESET=tiny STEPS=3000 EXTRA="--data shapes-binary" bash scripts/vit_mae_ablation.sh
#
# Environment: SEEDS (default "0 1 2 3 4", the paper's 5 runs; with --select ...-of-M-..., 0 to M-1),
# DATA (default shapes), PRESET (default: paper when CUDA is available, else tiny), STEPS (default: the
# preset's), OUT (default runs/vit_mae_ablation), EXTRA (more flags for every run; the variant's own flags
# come last and win).
# Re-running the script continues where it stopped: a run folder (named VARIANT-STEPSsteps-seedN) whose
# eval.json has the run's step count is reused, an interrupted run resumes from its checkpoint, and a
# folder whose args.json disagrees with the run's flags is reported, not reused. All runs share one Python
# process; a run that fails is reported and left out of the table, and the script then exits non-zero.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:-shapes}
PRESET=${PRESET:-$(python -c 'import torch; print("paper" if torch.cuda.is_available() else "tiny")')}
OUT=${OUT:-runs/vit_mae_ablation}
mkdir -p "$OUT"
python - "$OUT" "$DATA" "$PRESET" "${STEPS:-}" "${SEEDS:-}" "${EXTRA:-}" "$@" <<'PY'
import argparse
import json
import re
import shlex
import statistics
import sys
from pathlib import Path

import torch

import vit_mae_ocl

out, dataset, preset, steps, seeds, extra = sys.argv[1:7]
p = argparse.ArgumentParser(prog="vit_mae_ablation.sh")
p.add_argument("--select", default=None, metavar="topN-of-M-by-KEY",
               help="also summarise the N best of M seeds by KEY (fg_ari, ari, miou), e.g. top3-of-10-by-miou")
opts = p.parse_args(sys.argv[7:])
select = re.fullmatch(r"top(\d+)(?:-of-(\d+))?-by-(fg_ari|ari|miou)", opts.select or "")
if opts.select and not select:
    p.error(f"--select {opts.select!r}: expected topN-of-M-by-KEY with KEY one of fg_ari, ari, miou")
top, of, by = (int(select[1]), select[2] and int(select[2]), select[3]) if select else (None, None, None)
seeds = seeds.split() or [str(s) for s in range(of or 5)]
if of and len(seeds) != of:
    p.error(f"--select {opts.select}: {of} seeds asked for, SEEDS has {len(seeds)}")
if top and top > len(seeds):
    p.error(f"--select {opts.select}: cannot take the best {top} of {len(seeds)} seeds")

VARIANTS = [("full", []), ("no object entropy", ["--object-entropy", "0"]),
            ("no pixel entropy", ["--pixel-entropy", "0"]),
            ("neither entropy", ["--pixel-entropy", "0", "--object-entropy", "0"]),
            ("no masking", ["--mask-ratio", "0"])]
IGNORED = set(vit_mae_ocl.RUNTIME_KEYS)  # flags of one invocation: they do not change what a run computes
base = ["--preset", preset, "--data", dataset, "--out-dir", out] + (["--steps", steps] if steps else [])
base += shlex.split(extra)


def resolved(argv):
    """The arguments a run of argv would record in args.json (steps counted from its training set)."""
    a = vit_mae_ocl.parse_args(argv)
    if a.steps is None or a.warmup_steps is None or a.cooldown_steps is None:
        vit_mae_ocl.schedule_in_steps(a, len(vit_mae_ocl.make_train_set(a)))
    return vars(a)


def run(name, argv):
    """Train (or resume, or only evaluate) one run; its eval.json, or None after a failure."""
    want = resolved(argv)
    folder = Path(out) / f"{name.replace(' ', '-')}-{want['steps']}steps-seed{want['seed']}"
    argv = argv + ["--run-name", folder.name]
    print("python vit_mae_ocl.py " + shlex.join(argv), flush=True)
    if (folder / "args.json").exists():
        have = json.loads((folder / "args.json").read_text())
        diff = sorted(k for k in want if k not in IGNORED and have.get(k) != want[k])
        if diff:
            print(f"{folder} holds a run with other flags ({', '.join(diff)}); remove it to rerun", file=sys.stderr)
            return None
    try:
        if (folder / "eval.json").exists() and json.loads((folder / "eval.json").read_text())["step"] == want["steps"]:
            pass  # finished earlier
        elif (folder / "checkpoint.pt").exists():
            ckpt = folder / "checkpoint.pt"
            done = torch.load(ckpt, map_location="cpu", weights_only=True)["step"] >= want["steps"]
            vit_mae_ocl.main(argv + (["--eval-only", str(ckpt)] if done else ["--resume", str(ckpt)]))
        else:
            vit_mae_ocl.main(argv)
        return json.loads((folder / "eval.json").read_text())
    except SystemExit as e:
        print(f"run {folder.name} failed (exit {e.code})", file=sys.stderr)
        return None


def row(name, flags, scores):
    cells = [[100 * s[k] for s in scores] for k in ("fg_ari", "ari", "miou")]
    cells = [f"{statistics.mean(x):.1f} +- {statistics.stdev(x) if len(x) > 1 else 0.0:.1f}" if x else "-"
             for x in cells]
    return f"| {name} | `{' '.join(flags) or '(paper)'}` | {len(scores)} | " + " | ".join(cells) + " |"


rows, best, failed = [], [], 0
for name, flags in VARIANTS:
    scores = [run(name, base + ["--seed", seed, "--eval-every", "0"] + flags) for seed in seeds]
    failed += scores.count(None)
    scores = [s for s in scores if s is not None]
    rows.append(row(name, flags, scores))
    if top:
        best.append(row(name, flags, sorted(scores, key=lambda s: -s[by])[:top]))
title = (f"vit_mae_ocl.py on {dataset} (preset {preset}{', ' + steps + ' steps' if steps else ''}"
         f"{', flags ' + extra if extra else ''}); test split, mask ratio 0, x100")
header = ["| variant | flags | seeds | FG-ARI | ARI | mIoU |", "|---|---|---|---|---|---|"]
table = [f"Ablations of {title}, mean +- std over seeds {' '.join(seeds)}.", ""] + header + rows
if top:
    table += ["", f"The best {top} of each variant's {len(seeds)} seeds by {by} ({opts.select}):", ""] + header + best
(Path(out) / "ablation.md").write_text("\n".join(table) + "\n")
print("\n".join(table))
sys.exit(1 if failed else 0)
PY
