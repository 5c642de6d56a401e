"""Slot Attention: shapes, gradients, equivariance, overfitting, the CLI, resume, DDP, bad input."""
import json
import math
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import data  # noqa: E402
import slot_attention as sa  # noqa: E402

# A model small enough that a CPU step takes milliseconds.
TINY = ["--preset", "tiny", "--resolution", "16", "--num-slots", "3", "--slot-dim", "16", "--mlp-hidden", "16",
        "--enc-channels", "8", "--dec-channels", "8", "--proj-dim", "16", "--batch-size", "4"]
CLI = TINY + ["--log-every", "2", "--eval-every", "3", "--save-every", "3", "--eval-size", "8", "--data", "shapes-binary"]


def model_and_args(*extra):
    args = sa.parse_args(TINY + list(extra))
    torch.manual_seed(0)
    return sa.build_model(args), args


def images(n=4, res=16):
    return data.make_dataset("shapes", "train", res).get_batch(list(range(n)))["image"]


def run_cli(tmp_path, *extra, module="slot_attention.py", env=None):
    cmd = [sys.executable, str(ROOT / module), *CLI, "--out-dir", str(tmp_path), *extra]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=240, env=env)


@pytest.mark.parametrize("decoder,res", [("sprites", 16), ("clevr", 32)])
def test_shapes_and_masks_sum_to_one(decoder, res):
    model, args = model_and_args("--decoder", decoder, "--resolution", str(res))
    out = model(images(2, res))
    assert out["recon"].shape == (2, 3, res, res)
    assert out["rgb"].shape == (2, 3, 3, res, res)
    assert out["masks"].shape == (2, 3, res, res)
    assert out["slots"].shape == (2, 3, 16)
    assert out["attn"].shape == (2, res * res, 3)  # attention of the last iteration, kept for visualisation
    torch.testing.assert_close(out["masks"].sum(1), torch.ones(2, res, res))


@pytest.mark.parametrize("loss,extra", [("mse", []), ("cov", []), ("cov", ["--proj-norm", "batch"]),
                                        ("vicreg", []), ("cosine", [])])
def test_every_parameter_gets_a_gradient(loss, extra):
    model, args = model_and_args("--loss", loss, *extra)
    x = images()
    terms = sa.compute_loss(model(x), x, args)
    terms["loss"].backward()
    expected = {"mse", "loss"} | {"cov": {"cov"}, "vicreg": {"cov", "var"}, "cosine": {"cos"}, "mse": set()}[loss]
    assert set(terms) == expected
    assert (model.projector is not None) == (loss in ("cov", "vicreg"))
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name  # slots_mu and slots_log_sigma included


def test_regulariser_weight_enters_the_total():
    model, args = model_and_args("--loss", "vicreg", "--beta", "0.5")
    x = images()
    t = sa.compute_loss(model(x), x, args)
    torch.testing.assert_close(t["loss"], t["mse"] + 0.5 * (t["cov"] + t["var"]))


def test_slot_permutation_equivariance():
    model, args = model_and_args()
    x = images(2)
    init = torch.randn(2, 3, 16)
    perm = torch.tensor([2, 0, 1])
    a, b = model(x, init), model(x, init[:, perm])
    torch.testing.assert_close(b["slots"], a["slots"][:, perm], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(b["masks"], a["masks"][:, perm], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(b["recon"], a["recon"], atol=1e-5, rtol=1e-4)


def test_implicit_grad_is_one_detached_extra_iteration():
    model, args = model_and_args("--implicit-grad")
    plain, _ = model_and_args("--iters", "4")
    plain.load_state_dict(model.state_dict())
    x, init = images(2), torch.randn(2, 3, 16)
    out = model(x, init)
    torch.testing.assert_close(out["slots"], plain(x, init)["slots"], atol=1e-5, rtol=1e-4)
    out["recon"].sum().backward()
    assert model.slot_attention.slots_mu.grad is None  # no graph through the first iterations
    assert model.slot_attention.to_q.weight.grad.abs().sum() > 0


def test_reparameterised_init_trains_mu_and_sigma():
    model, _ = model_and_args()
    sa_mod = model.slot_attention
    s = sa_mod.sample_slots(5)
    assert s.shape == (5, 3, 16)
    s.pow(2).sum().backward()
    assert sa_mod.slots_mu.grad.abs().sum() > 0 and sa_mod.slots_log_sigma.grad.abs().sum() > 0


@pytest.mark.parametrize("name,res,k,dec", [
    ("shapes", 64, 6, "sprites"), ("shapes-colored", 64, 5, "sprites"), ("tetrominoes", 35, 4, "sprites"),
    ("/d/clevr_with_masks.h5", 128, 7, "clevr"), ("/d/multi_dsprites_colored_on_colored.h5", 64, 6, "sprites")])
def test_paper_preset_per_dataset(name, res, k, dec):
    args = sa.parse_args(["--data", name])
    assert (args.resolution, args.num_slots, args.decoder) == (res, k, dec)
    assert (args.batch_size, args.lr, args.steps, args.warmup_steps, args.grad_clip) == (64, 4e-4, 500_000, 10_000, 0)
    assert sa.parse_args(["--data", name, "--num-slots", "9", "--decoder", "sprites"]).num_slots == 9  # flags win


def test_tiny_preset_defaults():
    args = sa.parse_args(["--preset", "tiny"])  # the README's quick-start
    assert (args.data, args.resolution, args.num_slots, args.lr, args.steps) == ("shapes-binary", 32, 4, 1e-3, 3000)
    assert (args.decay_steps, args.grad_clip) == (1500, 0.0)
    assert sa.parse_args(["--preset", "tiny", "--data", "shapes"]).num_slots == 6
    assert sa.parse_args([]).data == "shapes"


def test_lr_schedule_known_values():
    args = sa.parse_args(["--lr", "4e-4", "--warmup-steps", "10", "--decay-steps", "100"])
    assert sa.lr_at(4, args) == pytest.approx(4e-4 * 0.5 * 0.5 ** 0.04)
    assert sa.lr_at(100, args) == pytest.approx(4e-4 * 0.5)
    args.warmup_steps = 0
    assert sa.lr_at(0, args) == pytest.approx(4e-4)


def test_overfits_one_batch():
    model, args = model_and_args("--loss", "cov")
    x = images(4)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    torch.manual_seed(0)
    first = None
    for _ in range(150):
        terms = sa.compute_loss(model(x), x, args)
        opt.zero_grad()
        terms["loss"].backward()
        opt.step()
        first = first if first is not None else terms["mse"].item()
    assert terms["mse"].item() < 0.3 * first


@pytest.mark.parametrize("loss", sa.LOSSES)
def test_cli_writes_run_files(tmp_path, loss):
    r = run_cli(tmp_path, "--loss", loss, "--steps", "6", "--run-name", "r")
    assert r.returncode == 0, r.stderr
    run = tmp_path / "r"
    args = json.loads((run / "args.json").read_text())
    assert args["loss"] == loss and args["steps"] == 6
    lines = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    train = [l for l in lines if l["split"] == "train"]
    evals = [l for l in lines if l["split"] == "eval"]
    assert [l["step"] for l in train] == [2, 4, 6] and [l["step"] for l in evals] == [3, 6]
    terms = {"mse": [], "cov": ["cov"], "vicreg": ["cov", "var"], "cosine": ["cos"]}[loss]
    for key in ["mse", "loss", "lr", "images_per_s", *terms]:
        assert all(math.isfinite(l[key]) for l in train), key
    for key in ("ari", "fg_ari"):  # adjusted for chance: below 0 is possible, above 1 is not
        assert -1 <= evals[-1][key] <= 1, key
    for key in ("miou", "mbo"):
        assert 0 <= evals[-1][key] <= 1, key
    assert 0 <= evals[-1]["mse"] <= 4  # images in [-1, 1]
    ckpt = torch.load(run / "checkpoint.pt", weights_only=True)
    assert ckpt["step"] == 6
    assert any(k.startswith("projector.") for k in ckpt["model"]) == (loss in ("cov", "vicreg"))
    assert sorted(p.name for p in (run / "samples").iterdir()) == ["step_0000003.png", "step_0000006.png"]
    assert json.loads((run / "eval.json").read_text())["step"] == 6


def test_eval_only_and_probe(tmp_path):
    assert run_cli(tmp_path, "--steps", "3", "--run-name", "r").returncode == 0
    ckpt = tmp_path / "r" / "checkpoint.pt"
    (tmp_path / "r" / "eval.json").unlink()
    r = run_cli(tmp_path, "--eval-only", str(ckpt), "--probe", "--probe-train-size", "64", "--eval-size", "32")
    assert r.returncode == 0, r.stderr
    ev = json.loads((tmp_path / "r" / "eval.json").read_text())
    assert ev["step"] == 3 and -1 <= ev["fg_ari"] <= 1
    probe = json.loads((tmp_path / "r" / "probe.json").read_text())
    assert {"shape_acc", "color_r2", "scale_r2", "x_r2", "y_r2"} <= set(probe)


def test_resume_equals_uninterrupted(tmp_path):
    common = CLI + ["--out-dir", str(tmp_path), "--eval-every", "0", "--log-every", "1"]
    sa.main(common + ["--steps", "6", "--run-name", "full"])
    sa.main(common + ["--steps", "3", "--run-name", "part"])
    sa.main(common + ["--steps", "6", "--resume", str(tmp_path / "part" / "checkpoint.pt")])
    full = torch.load(tmp_path / "full" / "checkpoint.pt", weights_only=True)
    part = torch.load(tmp_path / "part" / "checkpoint.pt", weights_only=True)
    assert part["step"] == 6
    for k, v in full["model"].items():
        assert torch.equal(v, part["model"][k]), k
    losses_of = lambda run: [l["loss"] for l in map(json.loads, (tmp_path / run / "metrics.jsonl").open())
                             if l["split"] == "train"]
    assert losses_of("full") == losses_of("part")


def test_fresh_run_does_not_append_to_a_stale_log(tmp_path):
    stale = tmp_path / "r"  # a run that failed before its first checkpoint: a log, no checkpoint.pt
    stale.mkdir()
    (stale / "metrics.jsonl").write_text(json.dumps({"step": 99, "split": "train", "loss": 1.0}) + "\n")
    sa.main(CLI + ["--out-dir", str(tmp_path), "--run-name", "r", "--steps", "2", "--eval-every", "0"])
    steps = [json.loads(l)["step"] for l in (stale / "metrics.jsonl").open()]
    assert steps == [2, 2]  # the train line and the final eval line of this run only


class Hostile:
    def __reduce__(self):
        return (os.system, (f"touch {MARKER}",))


MARKER = None


def test_hostile_checkpoint_is_refused(tmp_path):
    global MARKER
    MARKER = tmp_path / "pwned"
    bad = tmp_path / "evil" / "checkpoint.pt"
    bad.parent.mkdir()
    with open(bad, "wb") as f:
        pickle.dump({"model": Hostile()}, f)
    r = run_cli(tmp_path, "--eval-only", str(bad))
    assert r.returncode == 2 and not MARKER.exists()
    assert "refusing" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("extra,needle", [
    (["--num-slots", "0"], "--num-slots must be positive"),
    (["--decoder", "clevr", "--resolution", "40"], "multiple of 16"),
    (["--data", "/no/such/dataset.h5"], "no such file"),
    (["--resume", "/no/such/checkpoint.pt"], "checkpoint not found"),
])
def test_bad_input_is_one_line_error(tmp_path, extra, needle):
    r = run_cli(tmp_path, "--steps", "2", *extra)
    assert r.returncode == 2
    assert needle in r.stderr and "Traceback" not in r.stderr
    assert not any(tmp_path.iterdir())  # nothing half-written


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch, capsys):
    real = sa.compute_loss
    calls = {"n": 0}

    def poisoned(out, image, args):
        calls["n"] += 1
        terms = real(out, image, args)
        if calls["n"] == 5:  # step 5: the covariance term goes NaN; its gradient makes every later term NaN
            terms["cov"] = terms["cov"] * float("nan")
            terms["loss"] = terms["mse"] + terms["cov"]
        return terms

    monkeypatch.setattr(sa, "compute_loss", poisoned)
    with pytest.raises(SystemExit) as e:
        sa.main(CLI + ["--out-dir", str(tmp_path), "--run-name", "r", "--steps", "9", "--eval-every", "0",
                       "--save-every", "4", "--log-every", "100", "--loss", "cov"])
    assert e.value.code == 2
    # the term that caused it, not the first NaN in the window's means ('mse' at steps 6-8)
    assert "non-finite loss term 'cov' at step 5" in capsys.readouterr().err
    ckpt = torch.load(tmp_path / "r" / "checkpoint.pt", weights_only=True)
    assert ckpt["step"] == 4 and all(torch.isfinite(v).all() for v in ckpt["model"].values())


def test_bf16_autocast_runs_on_cpu(tmp_path):
    r = run_cli(tmp_path, "--dtype", "bf16", "--steps", "3", "--run-name", "r", "--loss", "cov")
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "r" / "eval.json").read_text())["step"] == 3


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_bf16_compile(tmp_path):
    r = run_cli(tmp_path, "--device", "cuda", "--dtype", "bf16", "--compile", "--steps", "6", "--run-name", "r")
    assert r.returncode == 0, r.stderr
    train = [json.loads(l) for l in (tmp_path / "r" / "metrics.jsonl").open()]
    assert all(math.isfinite(l["loss"]) for l in train if l["split"] == "train")
