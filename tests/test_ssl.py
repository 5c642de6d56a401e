"""The self-supervised core of slot_attention.py (issue 19): views, slot matching, SimSiam / SwAV training,
attention masks, collapse guards, --frozen-core, the CLI, resume, bad flags, scripts/ssl_vs_recon.py."""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import slot_attention as sa  # noqa: E402

TINY = ["--preset", "tiny", "--resolution", "16", "--num-slots", "3", "--slot-dim", "16", "--mlp-hidden", "16",
        "--enc-channels", "8", "--dec-channels", "8", "--proj-dim", "16", "--feat-dim", "8", "--prototypes", "6",
        "--batch-size", "4"]
CLI = TINY + ["--log-every", "2", "--eval-every", "3", "--save-every", "3", "--eval-size", "8",
              "--data", "shapes-colored"]


def gen(seed):
    return torch.Generator().manual_seed(seed)


def model_and_args(*extra):
    args = sa.parse_args(TINY + list(extra))
    torch.manual_seed(0)
    return sa.build_model(args), args


# --- Views

def test_a_pixels_label_follows_it_through_crop_and_flip():
    """The view image of a coordinate ramp tells, at each output pixel, which source pixel it shows (bilinear
    sampling of a linear function is exact); the view mask must hold that source pixel's label."""
    b, h, w = 64, 24, 20
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64),
                            indexing="ij")
    ramp = torch.stack([xs / (w - 1), ys / (h - 1), torch.zeros_like(xs)])  # (3, H, W) in [0, 1]
    image = ramp.expand(b, -1, -1, -1).contiguous()
    mask = torch.randint(-1, 7, (b, h, w), generator=gen(0))
    torch.manual_seed(1)
    view, view_mask = sa.random_views(image, mask, crop_scale=(0.2, 1.0), jitter=(0, 0, 0, 0))
    sx, sy = view[:, 0] * (w - 1), view[:, 1] * (h - 1)  # (B, H, W) source position of every output pixel
    clear = ((sx - sx.floor() - 0.5).abs() > 0.01) & ((sy - sy.floor() - 0.5).abs() > 0.01)  # no rounding tie
    src = mask[torch.arange(b)[:, None, None], sy.round().long(), sx.round().long()]
    assert clear.double().mean() > 0.9
    assert torch.equal(view_mask[clear], src[clear])
    # the views are really cropped and flipped: a mirrored view reads x decreasing along a row
    dx = view[:, 0, :, -1] - view[:, 0, :, 0]  # (B, H)
    assert (dx < 0).all(dim=1).float().mean().item() == pytest.approx(0.5, abs=0.2)
    assert (dx.abs() < 0.999).all(dim=1).any()  # some crop narrower than the image


def test_flip_only_views_mirror_image_and_mask_together():
    image = torch.rand(32, 3, 8, 8, generator=gen(2))
    mask = torch.randint(0, 5, (32, 8, 8), generator=gen(3))
    torch.manual_seed(4)
    view, view_mask = sa.random_views(image, mask, crop_scale=(1.0, 1.0), jitter=(0, 0, 0, 0), ratio=(1, 1))
    flipped = torch.tensor([torch.allclose(v, x.flip(-1), atol=1e-6) for v, x in zip(view, image)])
    kept = torch.tensor([torch.allclose(v, x, atol=1e-6) for v, x in zip(view, image)])
    assert (flipped ^ kept).all() and 5 < flipped.sum() < 27
    assert torch.equal(view_mask[flipped], mask[flipped].flip(-1)) and torch.equal(view_mask[kept], mask[kept])


def test_colour_jitter_stays_in_range_and_only_changes_colours():
    image = torch.rand(16, 3, 8, 8, generator=gen(5))
    torch.manual_seed(6)
    out = sa.colour_jitter(image, (0.4, 0.4, 0.4, 0.1), p=1.0)
    assert out.shape == image.shape and out.min() >= 0 and out.max() <= 1
    assert not torch.allclose(out, image)
    assert torch.equal(sa.colour_jitter(image, (0.4, 0.4, 0.4, 0.1), p=0.0), image)
    # a zero hue rotation is the identity (the YIQ round trip), a grey image has no hue to turn
    grey = torch.full((4, 3, 2, 2), 0.5)
    assert torch.allclose(sa.colour_jitter(grey, (0, 0, 0, 0.5), p=1.0), grey, atol=1e-5)


# --- Slot correspondence

def test_matching_recovers_a_known_permutation():
    b, k, d = 8, 6, 16
    a = torch.randn(b, k, d, generator=gen(7))
    sigma = torch.stack([torch.randperm(k, generator=gen(10 + i)) for i in range(b)])  # (B, K)
    other = torch.empty_like(a)
    other[torch.arange(b)[:, None], sigma] = a * torch.rand(b, k, 1, generator=gen(8)).add(0.5)  # cosine: any scale
    other += 0.01 * torch.randn(b, k, d, generator=gen(9))
    perm = sa.match_slots(a, other)
    assert torch.equal(perm, sigma)


def test_the_losses_compare_matched_slots():
    """View 2 holds view 1's slots in another order: SimSiam on matched pairs of identical predictions and
    targets is -1 (unmatched it would not be), SwAV equals its value on the unpermuted rows."""
    b, k, d, p = 4, 5, 16, 8
    slots = torch.randn(b, k, d, generator=gen(20))
    z = torch.randn(b, k, p, generator=gen(21))
    scores = torch.nn.functional.normalize(torch.randn(b, k, 6, generator=gen(22)), dim=-1)
    sigma = torch.stack([torch.randperm(k, generator=gen(30 + i)) for i in range(b)])  # (B, K)
    shuffle = lambda x: x[torch.arange(b)[:, None], sigma]  # row j of view 2 is row sigma[j] of view 1
    out = dict(slots=slots, slots2=shuffle(slots), z1=z, z2=shuffle(z), p1=z, p2=shuffle(z), scores1=scores,
               scores2=shuffle(scores))
    _, args = model_and_args("--loss", "simsiam")
    terms = sa.compute_loss(out, None, args)
    assert terms["simsiam"].item() == pytest.approx(-1.0, abs=1e-6) and terms["match_agree"].item() < 1
    _, args = model_and_args("--loss", "swav")
    want = sa.losses.swav_loss(scores.flatten(0, 1), scores.flatten(0, 1))
    assert sa.compute_loss(out, None, args)["swav"].item() == pytest.approx(want.item(), rel=1e-6)


def test_both_views_start_from_the_same_initial_slots(monkeypatch):
    model, args = model_and_args("--loss", "simsiam")
    monkeypatch.setattr(sa, "random_views", lambda image, mask, *a: (image, mask))  # identical views
    x = torch.rand(4, 3, 16, 16, generator=gen(11))
    out = model(x)
    assert torch.equal(out["slots"], out["slots2"])
    assert sa.compute_loss(out, x, args)["match_agree"].item() == 1.0


# --- Model, objective, evaluation outputs

@pytest.mark.parametrize("loss", sa.SSL_LOSSES)
def test_every_parameter_gets_a_gradient_and_attention_masks_sum_to_one(loss):
    model, args = model_and_args("--loss", loss, "--beta", "0.5")
    x = torch.rand(4, 3, 16, 16, generator=gen(12))
    terms = sa.compute_loss(model(x), x, args)
    assert set(terms) == {loss, "cov", "match_agree", "loss"}
    assert terms["loss"].item() == pytest.approx((terms[loss] + 0.5 * terms["cov"]).item(), rel=1e-6)
    terms["loss"].backward()
    assert [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0] == []
    assert not any(n.startswith("decoder.") for n, _ in model.named_parameters())
    model.eval()
    out = model(x)
    assert out["masks"].shape == (4, 3, 16, 16)
    assert torch.allclose(out["masks"].sum(dim=1), torch.ones(4, 16, 16), atol=1e-5)


def test_attention_masks_upsample_to_the_image():
    attn = torch.softmax(torch.randn(2, 4, 64, generator=gen(13)), dim=1)  # an 8x8 grid
    masks = sa.attention_masks(attn, (16, 16))
    assert masks.shape == (2, 4, 16, 16) and torch.allclose(masks.sum(1), torch.ones(2, 16, 16), atol=1e-6)
    assert torch.equal(sa.attention_masks(attn, (8, 8)), attn.view(2, 4, 8, 8))


def test_swav_prototypes_are_renormalised_before_each_training_forward():
    model, _ = model_and_args("--loss", "swav")
    with torch.no_grad():
        model.prototypes.weight.mul_(3)
    model(torch.rand(4, 3, 16, 16, generator=gen(14)))
    assert torch.allclose(model.prototypes.weight.norm(dim=1), torch.ones(6), atol=1e-6)


def test_collapse_guards_known_values():
    spread = torch.eye(8).repeat(4, 1)  # 32 slots on 8 orthogonal directions
    assert sa.collapse_stats(torch.ones(32, 8))["z_std"] == 0.0  # every slot the same direction
    s = sa.collapse_stats(spread, scores=spread)
    assert s["z_std"] == pytest.approx(math.sqrt(7 / 8 / 8 * 32 / 31))  # a column holds 4 ones in 32
    assert s["proto_entropy"] == pytest.approx(math.log(8)) and s["proto_entropy_max"] == pytest.approx(math.log(8))
    one = torch.zeros(32, 8)
    one[:, 2] = 1
    assert sa.collapse_stats(spread, scores=one)["proto_entropy"] == 0.0


# --- The CLI: runs, resume, --frozen-core, bad flags

def metrics_of(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("loss", sa.SSL_LOSSES)
def test_cli_runs_and_logs_the_guards(tmp_path, loss):
    sa.main(CLI + ["--out-dir", str(tmp_path), "--run-name", "r", "--loss", loss, "--steps", "6"])
    lines = metrics_of(tmp_path / "r")
    train = [l for l in lines if l["split"] == "train"]
    evals = [l for l in lines if l["split"] == "eval"]
    assert [l["step"] for l in train] == [2, 4, 6] and [l["step"] for l in evals] == [3, 6]
    assert all(0 <= l["match_agree"] <= 1 and math.isfinite(l[loss]) and "mse" not in l for l in train)
    guards = ["z_std", "z_std_spread"] + (["proto_entropy", "proto_entropy_max"] if loss == "swav" else [])
    for e in evals:
        for key in ["fg_ari", "attn_fg_ari", "view_fg_ari", "miou", "mbo", *guards]:
            assert math.isfinite(e[key]), key
        assert e["fg_ari"] == e["attn_fg_ari"]  # the attention is the segmentation
    assert (tmp_path / "r" / "samples" / "step_0000006.png").exists()
    ckpt = torch.load(tmp_path / "r" / "checkpoint.pt", weights_only=True)
    assert not any(k.startswith("decoder.") for k in ckpt["model"])


@pytest.mark.parametrize("loss", sa.SSL_LOSSES)
def test_resume_equals_uninterrupted(tmp_path, loss):
    common = CLI + ["--out-dir", str(tmp_path), "--eval-every", "0", "--log-every", "1", "--loss", loss,
                    "--beta", "0.1"]
    sa.main(common + ["--steps", "6", "--run-name", "full"])
    sa.main(common + ["--steps", "3", "--run-name", "part"])
    sa.main(common + ["--steps", "6", "--resume", str(tmp_path / "part" / "checkpoint.pt")])
    full = torch.load(tmp_path / "full" / "checkpoint.pt", weights_only=True)
    part = torch.load(tmp_path / "part" / "checkpoint.pt", weights_only=True)
    assert part["step"] == 6
    for k, v in full["model"].items():
        assert torch.equal(v, part["model"][k]), k
    train = lambda run: [(l["loss"], l["match_agree"]) for l in metrics_of(tmp_path / run) if l["split"] == "train"]
    assert train("full") == train("part") and len(train("full")) == 6


def test_frozen_core_trains_only_the_decoder(tmp_path):
    sa.main(CLI + ["--out-dir", str(tmp_path), "--run-name", "core", "--loss", "swav", "--steps", "3"])
    core = torch.load(tmp_path / "core" / "checkpoint.pt", weights_only=True)
    # an explicit flag of another size is overridden by the core's own
    sa.main(CLI + ["--out-dir", str(tmp_path), "--frozen-core", str(tmp_path / "core" / "checkpoint.pt"),
                   "--steps", "4", "--slot-dim", "32"])
    run = tmp_path / "core-decoder"
    dec = torch.load(run / "checkpoint.pt", weights_only=True)
    core_keys = [k for k in core["model"] if k.startswith(("encoder.", "slot_attention."))]
    assert core_keys and all(torch.equal(dec["model"][k], core["model"][k]) for k in core_keys)
    assert dec["args"]["slot_dim"] == 16
    n_decoder = len([k for k, _ in sa.build_model(sa.parse_args(TINY)).named_parameters() if k.startswith("decoder.")])
    assert len(dec["optimizer"]["state"]) == n_decoder  # only the decoder is optimised
    final = json.loads((run / "eval.json").read_text())
    core_final = json.loads((tmp_path / "core" / "eval.json").read_text())
    # the same frozen core and evaluation noise: the attention scores are the core run's own
    assert final["attn_fg_ari"] == pytest.approx(core_final["attn_fg_ari"], abs=1e-12)
    assert math.isfinite(final["fg_ari"]) and math.isfinite(final["mse"])
    # resuming keeps the core frozen (--frozen-core carries over from the checkpoint)
    sa.main(CLI + ["--out-dir", str(tmp_path), "--steps", "6", "--resume", str(run / "checkpoint.pt")])
    dec = torch.load(run / "checkpoint.pt", weights_only=True)
    assert dec["step"] == 6 and all(torch.equal(dec["model"][k], core["model"][k]) for k in core_keys)


def cli_error(tmp_path, capsys, argv):
    with pytest.raises(SystemExit) as e:
        sa.main(CLI + ["--out-dir", str(tmp_path / "out"), "--steps", "2"] + argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and "Traceback" not in err
    assert not (tmp_path / "out").exists()  # nothing half-written
    return [line for line in err.splitlines() if "error:" in line]


@pytest.mark.parametrize("argv,needle", [
    (["--loss", "simsiam", "--proj", "mlp"], "has its own"),
    (["--loss", "simsiam", "--proj-dim", "2"], "too small"),
    (["--loss", "swav", "--prototypes", "0"], "--prototypes must be positive"),
    (["--loss", "swav", "--crop-scale", "0", "1"], "--crop-scale needs"),
    (["--loss", "swav", "--crop-scale", "0.8", "0.5"], "--crop-scale needs"),
    (["--loss", "simsiam", "--jitter", "0.4", "0.4", "0.4", "0.7"], "--jitter"),
    (["--frozen-core", "x.pt", "--loss", "swav"], "--loss must be mse"),
    (["--frozen-core", "/no/such/checkpoint.pt"], "checkpoint not found"),
])
def test_bad_flags_are_one_line_errors(tmp_path, capsys, argv, needle):
    lines = cli_error(tmp_path, capsys, argv)
    assert len(lines) == 1 and needle in lines[0], lines


def test_frozen_core_refuses_another_architecture(tmp_path, capsys):
    sa.main(CLI + ["--out-dir", str(tmp_path), "--run-name", "core", "--loss", "simsiam", "--steps", "1"])
    ckpt = torch.load(tmp_path / "core" / "checkpoint.pt", weights_only=True)
    # a core with separate key / value projections (another Slot Attention implementation)
    w_k, w_v = ckpt["model"].pop("slot_attention.to_kv.weight").chunk(2)
    torch.save(dict(ckpt, model=dict(ckpt["model"], **{"slot_attention.to_k.weight": w_k,
                                                        "slot_attention.to_v.weight": w_v})), tmp_path / "kv.pt")
    lines = cli_error(tmp_path, capsys, ["--frozen-core", str(tmp_path / "kv.pt")])
    assert len(lines) == 1 and "another architecture" in lines[0] and "slot_attention.to_k" in lines[0]
    lines = cli_error(tmp_path, capsys, ["--frozen-core", str(tmp_path / "core" / "checkpoint.pt"), "--data", "shapes"])
    assert len(lines) == 1 and "trained on --data shapes-colored" in lines[0]
    # a checkpoint of another model file (its flags name no encoder / slot attention sizes)
    torch.save({"model": {"net.weight": torch.zeros(2)}, "args": {"latent_dim": 16}, "step": 1}, tmp_path / "o.pt")
    lines = cli_error(tmp_path, capsys, ["--frozen-core", str(tmp_path / "o.pt")])
    assert len(lines) == 1 and "not a slot_attention.py checkpoint" in lines[0]


@pytest.mark.slow
@pytest.mark.parametrize("loss", sa.SSL_LOSSES)
def test_cli_subprocess_and_eval_only(tmp_path, loss):
    def run(*extra):
        cmd = [sys.executable, str(ROOT / "slot_attention.py"), *CLI, "--out-dir", str(tmp_path), *extra]
        return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=240)

    r = run("--loss", loss, "--steps", "3", "--run-name", "r")
    assert r.returncode == 0, r.stderr
    (tmp_path / "r" / "eval.json").unlink()
    r = run("--eval-only", str(tmp_path / "r" / "checkpoint.pt"))
    assert r.returncode == 0, r.stderr
    ev = json.loads((tmp_path / "r" / "eval.json").read_text())
    assert ev["step"] == 3 and -1 <= ev["attn_fg_ari"] <= 1 and math.isfinite(ev["z_std"])


# --- scripts/ssl_vs_recon.py

@pytest.mark.slow
def test_ssl_vs_recon_smoke_writes_the_table_and_reuses_the_runs(tmp_path, capsys):
    sys.path.insert(0, str(ROOT / "scripts"))
    import ssl_vs_recon

    argv = ["--losses", "cov", "swav", "--seeds", "0", "--steps", "2", "--decoder-steps", "2", "--eval-size", "8",
            "--probe-train-size", "24", "--probe-val-size", "8", "--probe-test-size", "16", "--probe-steps", "5",
            "--out-dir", str(tmp_path), "--extra-all", " ".join(TINY[2:] + ["--log-every", "1", "--eval-every", "0"])]
    ssl_vs_recon.main(argv)
    results = json.loads((tmp_path / "ssl_vs_recon.json").read_text())["results"]
    cov, swav = results["cov"]["0"], results["swav"]["0"]
    for r in (cov, swav):
        assert (r["steps"], r["decoder_steps"]) == (2, 2)
        for k in ("attn_fg_ari", "frozen_fg_ari", "shape_acc", "x_r2", "images_per_s"):
            assert math.isfinite(r[k]), k
    assert math.isfinite(cov["own_fg_ari"]) and cov["match_agree"] is None
    assert swav["own_fg_ari"] is None and 0 <= swav["match_agree"] <= 1
    table = (tmp_path / "ssl_vs_recon.md").read_text()
    assert "| cov | 0 | 2 / 2 |" in table and "| swav | 0 | 2 / 2 |" in table
    # a second call trains nothing: every run is complete, the probe is on disk
    capsys.readouterr()
    ssl_vs_recon.main(argv)
    assert capsys.readouterr().out.count("nothing to do") == 4
    assert json.loads((tmp_path / "ssl_vs_recon.json").read_text())["results"] == results


def test_ssl_vs_recon_refuses_bad_flags(capsys):
    sys.path.insert(0, str(ROOT / "scripts"))
    import ssl_vs_recon

    with pytest.raises(SystemExit) as e:
        ssl_vs_recon.parse_args(["--steps", "0"])
    assert e.value.code == 2 and "--steps must be positive" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        ssl_vs_recon.parse_args(["--extra-all=--crop-scale 0.9 0.1"])
    assert "slot_attention.py refuses --loss mse" in capsys.readouterr().err


def test_ssl_vs_recon_stops_when_a_run_is_preempted(tmp_path, monkeypatch):
    """A run stopped by a signal (exit 3, checkpoint written) stops the comparison; a failed run does not."""
    sys.path.insert(0, str(ROOT / "scripts"))
    import ssl_vs_recon

    calls = []

    def fake_main(argv):
        calls.append(argv)
        sys.exit(3 if "swav" in argv else 2)

    monkeypatch.setattr(ssl_vs_recon.slot_attention, "main", fake_main)
    with pytest.raises(SystemExit) as e:
        ssl_vs_recon.main(["--losses", "mse", "swav", "cov", "--seeds", "0", "--out-dir", str(tmp_path)])
    assert e.value.code == 3
    assert [argv[argv.index("--loss") + 1] for argv in calls] == ["mse", "swav"]  # mse failed, swav stopped all
