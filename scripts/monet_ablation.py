"""The MONet loss ablation of arXiv 2310.03273: baseline, beta = 0, gamma = 0 and the IR loss, several seeds.

Each (variant, seed) is one `monet.py` run, called in this process through `monet.main` (torch is
imported once; the command it stands for is printed). A finished run (its eval.json exists) is reused
and an interrupted one is resumed from its checkpoint, so a stopped study continues where it stopped.
The final test-split eval.json of every run is gathered into one markdown table of mean ± std over
seeds, written to --results and printed.

  python scripts/monet_ablation.py                                    # CPU demonstration: --preset tiny
  python scripts/monet_ablation.py --preset paper --steps 100000 --seeds 0 1 2 --device cuda
"""
import argparse
import json
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
}
COLUMNS = ("ari", "fg_ari", "att_entropy", "att_binary", "dec_entropy", "dec_binary", "dec_fg_ari", "mse")


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


def run(variant, seed, args):
    """Train one (variant, seed) unless its eval.json exists; return that eval.json."""
    name = f"{Path(args.data).stem}-{args.preset}-{variant.replace('=', '')}-seed{seed}"
    result = Path(args.out_dir) / name / "eval.json"
    if not result.exists():
        argv = ["--data", args.data, "--preset", args.preset, "--seed", str(seed), "--device", args.device,
                "--out-dir", args.out_dir, "--run-name", name, "--eval-every", "0", *VARIANTS[variant],
                *args.extra.split()]
        if args.steps:
            argv += ["--steps", str(args.steps)]
        if (result.parent / "checkpoint.pt").exists():  # interrupted earlier: continue it
            argv += ["--resume", str(result.parent / "checkpoint.pt")]
        print("python monet.py " + " ".join(argv), flush=True)
        try:
            monet.main(argv)
        except SystemExit as e:  # monet.main has printed the one-line reason
            if e.code:
                sys.exit(f"error: the run {variant} seed {seed} failed (exit code {e.code})")
    return json.loads(result.read_text())


def cell(values):
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:.3f} ± {std:.3f}"


def main(argv=None):
    args = parse_args(argv)
    results = {v: [run(v, s, args) for s in args.seeds] for v in args.variants}
    steps = results[args.variants[0]][0]["step"]
    lines = [f"MONet loss ablation (arXiv 2310.03273) on `{args.data}`, `--preset {args.preset}`, {steps} steps, "
             f"seeds {' '.join(map(str, args.seeds))}; mean ± std over seeds of the final test-split evaluation"
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
