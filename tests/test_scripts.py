"""Smoke tests of scripts/compare.py, bench_speed.py and profile_run.py: real subprocesses, tiny models."""
import importlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import compare as compare_script  # noqa: E402
import profile_run  # noqa: E402

pytestmark = pytest.mark.slow  # every test here starts real subprocesses

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
# The model sizes of tests/test_slot_attention.py and tests/test_vit_mae_ocl.py: a CPU step takes milliseconds.
COMMON = "--log-every 1 --batch-size 4 --resolution 16 --num-slots 3"
SLOT_ATTENTION = "slot_attention=--slot-dim 16 --mlp-hidden 16 --enc-channels 8 --dec-channels 8 --proj-dim 16"
VIT_MAE = ("vit_mae_ocl=--patch-size 4 --enc-dim 16 --enc-heads 2 --dec-dim 16 --dec-heads 2 --enc-depth 2 "
           "--dec-depth 1 --warmup-steps 2 --cooldown-steps 1")
NUMBER = r"-?\d+(\.\d+)?"


def script(name, *argv):
    return subprocess.run([sys.executable, str(ROOT / "scripts" / name), *argv], capture_output=True, text=True,
                          env=ENV, cwd=ROOT, timeout=300)


def compare(out_dir, *argv):
    return script("compare.py", "--models", "slot_attention", "vit_mae_ocl", "--steps", "4", "--eval-size", "8",
                  "--out-dir", str(out_dir), "--extra-all", COMMON, "--extra", SLOT_ATTENTION, "--extra", VIT_MAE,
                  *argv)


def test_compare_writes_table_and_plot_then_reuses_the_runs(tmp_path):
    r = compare(tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    md = (tmp_path / "compare.md").read_text()
    assert md.startswith("`python scripts/compare.py --models slot_attention vit_mae_ocl --steps 4")
    assert " UTC; CPU (" in md.splitlines()[0] and "torch " in md.splitlines()[0]
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in md.splitlines() if line.startswith("| ") and not line.startswith("| model")}
    assert set(rows) == {"slot_attention", "vit_mae_ocl"}
    for model, (px, k, steps, fg_ari, ari, miou, mbo, img_s, peak, params, wall) in rows.items():
        assert (px, k, steps) == ("16", "3", "4"), model
        for value in (fg_ari, ari, miou, mbo):  # one seed: std 0
            assert re.fullmatch(rf"{NUMBER} ± 0\.000", value), (model, value)
            assert -1 <= float(value.split()[0]) <= 1
        assert float(img_s) > 0 and float(peak) > 0, model
        assert int(params.replace(",", "")) > 1000, model
        assert re.fullmatch(rf"{NUMBER} ± 0\.0", wall), (model, wall)
    for model in rows:  # the table shows each run's own final evaluation
        final = json.loads((tmp_path / f"{model}-shapes-binary-tiny-seed0" / "eval.json").read_text())
        assert rows[model][3:7] == [f"{final[k]:.3f} ± 0.000" for k in ("fg_ari", "ari", "miou", "mbo")]
    with Image.open(tmp_path / "fg_ari.png") as im:
        assert im.format == "PNG" and im.size[0] >= 400 and im.size[1] >= 300
        colours = {c for _, c in im.convert("RGB").getcolors(1 << 16)}
    assert len(colours) > 3  # the curves' colours, not a blank page
    assert not list(tmp_path.glob("*.tmp"))

    log = tmp_path / "vit_mae_ocl-shapes-binary-tiny-seed0" / "metrics.jsonl"
    before = log.read_text()
    r2 = compare(tmp_path)
    assert r2.returncode == 0, r2.stderr[-2000:]
    assert r2.stdout.count("reusing") == 2 and "python slot_attention.py" not in r2.stdout
    assert log.read_text() == before  # nothing retrained
    assert [l for l in (tmp_path / "compare.md").read_text().splitlines() if l.startswith("|")] == \
        [l for l in md.splitlines() if l.startswith("|")]


def test_compare_refuses_a_reused_run_trained_with_other_flags(tmp_path):
    run = tmp_path / "slot_attention-shapes-binary-tiny-seed0"
    run.mkdir()
    (run / "args.json").write_text('{"steps": 1000}')
    (run / "eval.json").write_text('{"fg_ari": 1.0}')
    r = script("compare.py", "--models", "slot_attention", "--steps", "4", "--out-dir", str(tmp_path))
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "was trained with other flags" in r.stderr and "steps: 1000 there, 4 here" in r.stderr
    assert "Failed and left out: slot_attention seed 0" in (tmp_path / "compare.md").read_text()


def test_compare_unknown_model_is_a_one_line_error(tmp_path):
    r = script("compare.py", "--models", "slot_attention", "nonesuch", "--out-dir", str(tmp_path / "out"))
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    errors = [l for l in r.stderr.splitlines() if "error" in l]
    assert len(errors) == 1 and errors[0].startswith("compare.py: error:") and "'nonesuch'" in errors[0], r.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("argv, reason", [
    (["--steps", "0"], "--steps must be positive"),
    (["--extra", "--patch-size 4"], "expected MODEL=FLAGS"),
    (["--extra-all", "--a 'b"], "No closing quotation"),
    (["--models", "vit_mae_ocl", "--extra", "vit_mae_ocl=--resolution 18"], "not divisible by --patch-size"),
])
def test_compare_bad_flags_are_argparse_errors(tmp_path, capsys, argv, reason):
    """In-process (the subprocess test above covers the no-traceback exit): each is refused before any run."""
    with pytest.raises(SystemExit) as e:
        compare_script.main(["--out-dir", str(tmp_path / "out"), *argv])
    assert e.value.code == 2
    errors = [l for l in capsys.readouterr().err.splitlines() if "error" in l]
    assert len(errors) == 1 and reason in errors[0], errors
    assert not (tmp_path / "out").exists()


def test_bench_speed_writes_a_table(tmp_path):
    out = tmp_path / "speed.md"  # --data: vit_mae_ocl's tiny default is Tetrominoes at patch 5, which 16 px refuses
    r = script("bench_speed.py", "--models", "slot_attention", "vit_mae_ocl", "--steps", "2", "--dtypes", "fp32",
               "--device", "cpu", "--extra", "--data shapes-binary " + COMMON, "--out", str(out))
    assert r.returncode == 0, r.stderr[-2000:]
    table = out.read_text()
    for model in ("slot_attention", "vit_mae_ocl"):
        row = re.search(rf"^\| {model} \| tiny \| eager \| fp32 \| (\S+) \| (\S+) \|$", table, re.M)
        assert row, table
        assert float(row.group(1)) > 0 and float(row.group(2)) > 0


def test_bench_speed_baseline_times_an_exported_revision_side_by_side(tmp_path):
    out = tmp_path / "speed.md"
    r = script("bench_speed.py", "--models", "slot_attention", "--steps", "2", "--repeats", "1", "--dtypes", "fp32",
               "--device", "cpu", "--baseline", "HEAD", "--extra", "--data shapes-binary " + COMMON, "--out", str(out))
    assert r.returncode == 0, r.stderr[-2000:]
    table = out.read_text()
    assert "1 interleaved runs a side, medians" in table and "| HEAD ms/step | new ms/step | speed-up |" in table
    row = re.search(rf"^\| slot_attention \| tiny \| eager \| fp32 \| (\d+) \| (\d+) \| ({NUMBER})x \|$", table, re.M)
    assert row, table
    assert int(row.group(1)) > 0 and int(row.group(2)) > 0 and float(row.group(3)) > 0
    bad = script("bench_speed.py", "--models", "slot_attention", "--baseline", "no-such-rev", "--steps", "2")
    assert bad.returncode == 1 and bad.stderr.startswith("error: git archive no-such-rev") and "Traceback" not in bad.stderr
    only_new = script("bench_speed.py", "--models", "slot_attention", "--steps", "2", "--repeats", "1", "--dtypes",
                      "fp32", "--device", "cpu", "--baseline", "HEAD", "--extra", "--data shapes-binary " + COMMON,
                      "--new-extra", "--num-slots 0")
    assert "| new failed: " in only_new.stdout and "--num-slots must be positive" in only_new.stdout  # old ran clean


def test_profile_run_writes_an_operator_table(tmp_path):
    out = tmp_path / "profile.txt"
    tiny = SLOT_ATTENTION.partition("=")[2]
    r = script("profile_run.py", "--model", "slot_attention", "--steps", "2", "--rows", "5", "--device", "cpu",
               "--extra", f"--data shapes-binary {COMMON} {tiny}", "--out", str(out))
    assert r.returncode == 0, r.stderr[-2000:]
    table = out.read_text()
    assert table.startswith("slot_attention.py --preset tiny --steps 2")
    ops = re.findall(r"^\s*(aten::\w+)\s", table, re.M)
    assert 0 < len(ops) <= 5 and "aten::convolution_backward" in table, table  # a conv model trained: backward ran
    assert script("profile_run.py", "--model", "nope").returncode == 2


@pytest.mark.parametrize("model", ["slot_attention", "vit_mae_ocl", "dinosaur"])
def test_profile_run_evaluates_only_eval_size_images(monkeypatch, model):
    """The profiled run's final evaluation is --eval-size images, also for the files whose final evaluation
    takes the whole test split unless --test-size says otherwise (it dominated the paper-preset profile)."""
    module = importlib.import_module(model)
    seen = []
    monkeypatch.setattr(module, "main", lambda argv: seen.append(module.parse_args(argv)))  # resolve, don't train
    profile_run.main(["--model", model, "--preset", "paper", "--steps", "1", "--eval-size", "5", "--device", "cpu"])
    resolved = seen[0]
    assert resolved.eval_size == 5 and getattr(resolved, "test_size", 5) == 5


def test_gpu_check_cpu_smoke_path_writes_its_tables(tmp_path):
    r = script("gpu_check.py", "--device", "cpu", "--tiny", "--models", "slot_attention", "vit_mae_ocl",
               "--modes", "eager", "--learners", "vit_mae_ocl", "--steps", "4", "--eval-every", "10", "--max-learn-steps", "30",
               "--budget", "120",
               "--out", str(tmp_path))
    assert r.returncode == 0, r.stderr[-2000:]
    md = (tmp_path / "gpu_check.md").read_text()
    assert md.startswith("`python scripts/gpu_check.py --device cpu --tiny")
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    assert [(s["model"], s["mode"]) for s in result["speed"]] == [("slot_attention", "eager"), ("vit_mae_ocl", "eager")]
    for row in result["speed"]:
        assert row["images_per_s"] > 0 and row["step_ms"] > 0 and row["peak_mem_mb"] > 0 and row["batch"] == 4
        assert re.search(rf"^\| {row['model']} \| {row['mode']} \| 4 \| {row['images_per_s']:.1f} \|", md, re.M)
    (learner,) = result["learning"]
    assert learner["model"] == "vit_mae_ocl" and learner["steps"] >= 10 and learner["steps"] % 10 == 0
    steps = [s for s, _ in learner["curve"]]
    assert steps == list(range(10, learner["steps"] + 1, 10))  # every evaluation (the last one on the test split)
    assert all(-1 <= v <= 1 for _, v in learner["curve"])
    bad = script("gpu_check.py", "--device", "cuda")  # no CUDA here: a one-line argparse error
    assert bad.returncode == 2 and "no CUDA device" in bad.stderr and "Traceback" not in bad.stderr
