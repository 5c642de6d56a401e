"""The MONet loss ablation of arXiv 2310.03273 (baseline, beta = 0, gamma = 0, the IR loss) and the composite
control (a Gaussian on sum_k m_k mu_k, no winner-take-all), several seeds.

Each (variant, seed) is one `monet.py` run, called in this process through `monet.main` (torch is imported once;
the command it stands for is printed). Its folder is OUT_DIR/DATA-PRESET-VARIANT-STEPSsteps-seedN. A run is
reused only when its eval.json is at the requested step and its args.json holds the requested flags; a run
interrupted after a checkpoint is resumed from it (or only evaluated, when the checkpoint is at the last step); a
folder that holds a run with other flags is an error, never silently reused. The final test-split eval.json of every
run goes into one markdown table of mean ± std over seeds (ARI with the background and FG-ARI without it, mask
entropy and binarisation), written to --results and printed. --preset paper evaluates on 1,000 held-out test images,
as 2310.03273 held out 1,000.

  python scripts/monet_ablation.py --data tetrominoes --seeds 0 1   # CPU, --preset tiny, 4000 steps: docs/monet.md
  python scripts/monet_ablation.py --data shapes --preset paper --steps 100000 --seeds 0 1 2 --device cuda
"""
import argparse
import json
import shlex
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import monet  # noqa: E402

VARIANTS = {  # name: the flags that make it (2310.03273: drop the VAE KL, drop the mask term, swap the likelihood)
    "baseline": [],
    "beta=0": ["--beta", "0"],
    "gamma=0": ["--gamma", "0"],
    "ir": ["--loss", "ir"],
    "composite": ["--loss", "composite"],  # our control: the same KL and mask terms, no winner-take-all
}
COLUMNS = ("fg_ari", "ari", "att_entropy", "att_binary", "dec_fg_ari", "dec_entropy", "dec_binary", "mse")
# args.json keys that do not change what a run computes: left out of the comparison
IGNORED = {"out_dir", "run_name", "resume", "eval_only", "device", "workers", "compile", "log_every", "save_every",
           "given"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="shapes", help="data set passed to monet.py --data")
    p.add_argument("--preset", choices=["tiny", "paper"], default="tiny", help="monet.py --preset")
    p.add_argument("--steps", type=int, default=None, help="training steps per run (None: the preset's)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds run for every variant")
    p.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS), help="variants to run")
    p.add_argument("--device", default="auto", help="monet.py --device")
    p.add_argument("--out-dir", default="runs/monet_ablation", help="parent folder of the run folders")
    p.add_argument("--results", default="runs/monet_ablation/results.md", help="markdown file the table goes to")
    p.add_argument("--extra", default="", help="further flags for every run, e.g. '--eval-size 1000 --dtype bf16'")
    return p.parse_args(argv)


def call(argv):
    print("python monet.py " + shlex.join(argv), flush=True)
    try:
        monet.main(argv)
    except SystemExit as e:  # monet.main has printed the one-line reason
        if e.code:
            sys.exit(f"error: `python monet.py {shlex.join(argv)}` failed (exit code {e.code})")


def run(variant, seed, args):
    """Train (or resume, or reuse) one (variant, seed); return its final eval.json."""
    steps = args.steps or monet.PRESETS[args.preset]["steps"]
    name = f"{Path(args.data).stem}-{args.preset}-{variant.replace('=', '')}-{steps}steps-seed{seed}"
    folder = Path(args.out_dir) / name
    argv = ["--data", args.data, "--preset", args.preset, "--seed", str(seed), "--device", args.device,
            "--out-dir", args.out_dir, "--run-name", name, "--eval-every", "0", "--steps", str(steps),
            *(["--eval-size", "1000"] if args.preset == "paper" else []), *shlex.split(args.extra), *VARIANTS[variant]]
    if (folder / "args.json").exists():
        want, have = vars(monet.parse_args(argv)), json.loads((folder / "args.json").read_text())
        diff = sorted(k for k in want.keys() - IGNORED if json.dumps(want[k]) != json.dumps(have.get(k)))
        if diff:
            sys.exit(f"error: {folder} holds a run with other flags ({', '.join(diff)}); remove it or use "
                     f"another --out-dir")
    result, ckpt = folder / "eval.json", folder / "checkpoint.pt"
    if result.exists() and json.loads(result.read_text()).get("step") == steps:
        return json.loads(result.read_text())
    if ckpt.exists() and monet.load_checkpoint(ckpt)["step"] >= steps:  # stopped between checkpoint and eval.json
        call(argv + ["--eval-only", str(ckpt)])
    else:
        call(argv + (["--resume", str(ckpt)] if ckpt.exists() else []))  # interrupted: continue it
    evaluation = json.loads(result.read_text())
    if evaluation.get("step") != steps:
        sys.exit(f"error: {result} is at step {evaluation.get('step')}, expected {steps}")
    return evaluation


def cell(values):
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:.3f} ± {std:.3f}"


def main(argv=None):
    args = parse_args(argv)
    results = {v: [run(v, s, args) for s in args.seeds] for v in args.variants}
    steps = results[args.variants[0]][0]["step"]
    lines = [f"MONet loss ablation (arXiv 2310.03273) on `{args.data}`, `--preset {args.preset}`, {steps} steps, "
             f"seeds {' '.join(map(str, args.seeds))}; mean ± std over seeds of the final test-split evaluation "
             "(fg_ari: background excluded; ari: included; att_/dec_: attention / decoded masks)"
             + (f"; extra flags `{args.extra}`" if args.extra else "") + ".",
             "",
             "| variant | " + " | ".join(COLUMNS) + " |",
             "|---|" + "---|" * len(COLUMNS)]
    for v, evals in results.items():
        lines.append(f"| {v} | " + " | ".join(cell([e[c] for e in evals]) for c in COLUMNS) + " |")
    table = "\n".join(lines) + "\n"
    Path(args.results).parent.mkdir(parents=True, exist_ok=True)
    Path(args.results).write_text(table)
    print(table)


if __name__ == "__main__":
    main()
