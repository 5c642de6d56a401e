#!/usr/bin/env bash
# The loss and masking ablations of Vikstrom & Ilin 2022 (appendix, Tables 4-6) with vit_mae_ocl.py:
# full model, no object entropy, no pixel entropy, neither, no masking; every variant over SEEDS.
# Writes OUT/ablation.md: one markdown table of FG-ARI, ARI and mIoU (test split, mask ratio 0),
# mean +- std over seeds (sample std; 0 for one seed).
#
#   bash scripts/vit_mae_ablation.sh                              # tiny preset on CPU, paper preset on a GPU
#   SEEDS="0 1 2 3 4" DATA=tetrominoes bash scripts/vit_mae_ablation.sh
#   PRESET=tiny STEPS=3000 EXTRA="--data shapes-binary" bash scripts/vit_mae_ablation.sh
#
# Environment: SEEDS (default "0 1 2"), DATA (default shapes), PRESET (default: paper when CUDA is
# available, else tiny), STEPS (default: the preset's), OUT (default runs/vit_mae_ablation),
# EXTRA (more flags for every run; the variant's own flags come last and win).
# All runs share one Python process (the start-up cost is paid once); a run that fails is reported and
# left out of the table, and the script then exits non-zero.
set -euo pipefail
cd "$(dirname "$0")/.."
SEEDS=${SEEDS:-"0 1 2"}
DATA=${DATA:-shapes}
PRESET=${PRESET:-$(python -c 'import torch; print("paper" if torch.cuda.is_available() else "tiny")')}
OUT=${OUT:-runs/vit_mae_ablation}
mkdir -p "$OUT"
python - "$OUT" "$DATA" "$PRESET" "${STEPS:-}" "$SEEDS" "${EXTRA:-}" <<'PY'
import json
import shlex
import statistics
import sys
from pathlib import Path

import vit_mae_ocl

out, dataset, preset, steps, seeds, extra = sys.argv[1:]
VARIANTS = [("full", []), ("no object entropy", ["--object-entropy", "0"]),
            ("no pixel entropy", ["--pixel-entropy", "0"]),
            ("neither entropy", ["--pixel-entropy", "0", "--object-entropy", "0"]),
            ("no masking", ["--mask-ratio", "0"])]
base = ["--preset", preset, "--data", dataset, "--out-dir", out] + (["--steps", steps] if steps else [])
base += shlex.split(extra)
rows, failed = [], 0
for name, flags in VARIANTS:
    scores = []
    for seed in seeds.split():
        run = f"{name.replace(' ', '-')}-seed{seed}"
        argv = base + ["--seed", seed, "--run-name", run, "--eval-every", "0"] + flags
        print("python vit_mae_ocl.py " + shlex.join(argv), flush=True)
        if (Path(out) / run / "eval.json").exists():  # finished earlier: reuse, so the script can be re-run
            scores.append(json.loads((Path(out) / run / "eval.json").read_text()))
            continue
        try:
            vit_mae_ocl.main(argv)
            scores.append(json.loads((Path(out) / run / "eval.json").read_text()))
        except SystemExit as e:
            failed += 1
            print(f"run {run} failed (exit {e.code})", file=sys.stderr)
    cells = []
    for key in ("fg_ari", "ari", "miou"):
        v = [100 * s[key] for s in scores]
        cells.append(f"{statistics.mean(v):.1f} +- {statistics.stdev(v) if len(v) > 1 else 0.0:.1f}"
                     if v else "-")
    rows.append(f"| {name} | `{' '.join(flags) or '(paper)'}` | {len(scores)} | " + " | ".join(cells) + " |")
table = [f"Ablations of vit_mae_ocl.py on {dataset} (preset {preset}{', ' + steps + ' steps' if steps else ''}"
         f"{', flags ' + extra if extra else ''}); test split, mask ratio 0, x100, mean +- std over seeds.", "",
         "| variant | flags | seeds | FG-ARI | ARI | mIoU |", "|---|---|---|---|---|---|"] + rows
(Path(out) / "ablation.md").write_text("\n".join(table) + "\n")
print("\n".join(table))
sys.exit(1 if failed else 0)
PY
