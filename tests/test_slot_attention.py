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
import torch.nn.functional as F

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
    assert out["attn"].shape == (2, 3, res * res)  # attention of the last iteration, kept for visualisation
    torch.testing.assert_close(out["masks"].sum(1), torch.ones(2, res, res))


@pytest.mark.parametrize("loss,extra", [("mse", []), ("cov", []), ("cov", ["--proj-norm", "batch"]),
                                        ("vicreg", []), ("cosine", []), ("cosine", ["--proj", "mlp"])])
def test_every_parameter_gets_a_gradient(loss, extra):
    model, args = model_and_args("--loss", loss, *extra)
    x = images()
    terms = sa.compute_loss(model(x), x, args)
    terms["loss"].backward()
    expected = {"mse", "loss"} | {"cov": {"cov"}, "vicreg": {"cov", "var"}, "cosine": {"cos"}, "mse": set()}[loss]
    assert set(terms) == expected
    assert isinstance(model.projector, sa.ProjectionHead) == (args.proj == "mlp")
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


def algorithm1_iteration(m, inputs, slots):
    """One iteration of Algorithm 1 of arXiv 2006.15055, written out from the paper with the module's weights
    (an independent transcription: no call into slot_attention.py). inputs (B, N, C), slots (B, K, D)."""
    ln = lambda x, norm: F.layer_norm(x, x.shape[-1:], norm.weight, norm.bias, norm.eps)
    w_k, w_v = kv_weights(m)
    x = ln(inputs, m.norm_inputs)
    k, v = x @ w_k.T, x @ w_v.T  # (B, N, D)
    q = ln(slots, m.norm_slots) @ m.to_q.weight.T  # (B, K, D)
    attn = torch.softmax(k @ q.transpose(1, 2) / math.sqrt(slots.shape[-1]), dim=2)  # (B, N, K), over the slots
    w = (attn + m.eps) / (attn + m.eps).sum(dim=1, keepdim=True)  # renormalised over the inputs
    updates = w.transpose(1, 2) @ v  # (B, K, D): weighted mean of the values
    g = m.gru  # GRU (Cho et al. 2014) with the previous slots as the hidden state
    i_r, i_z, i_n = (updates @ g.weight_ih.T + g.bias_ih).chunk(3, dim=-1)
    h_r, h_z, h_n = (slots @ g.weight_hh.T + g.bias_hh).chunk(3, dim=-1)
    r, z = torch.sigmoid(i_r + h_r), torch.sigmoid(i_z + h_z)
    h = (1 - z) * torch.tanh(i_n + r * h_n) + z * slots
    fc1, fc2 = m.mlp[0], m.mlp[2]
    return h + fc2(torch.relu(fc1(ln(h, m.norm_mlp)))), attn  # residual MLP


def kv_weights(m):
    return m.to_kv.weight.chunk(2, dim=0)  # the fused Linear holds [W_k; W_v]


def random_slot_attention(iters):
    torch.manual_seed(0)
    m = sa.SlotAttention(num_slots=3, slot_dim=8, input_dim=6, mlp_hidden=10, iters=iters, eps=1e-3)
    with torch.no_grad():
        for p in m.parameters():  # LayerNorm gains and biases away from 1 and 0 so that every weight matters
            p.copy_(torch.randn_like(p) * 0.7)
    return m


@pytest.mark.parametrize("iters", [1, 3])
def test_slot_attention_equals_transcription_of_algorithm_1(iters):
    m = random_slot_attention(iters)
    inputs, init = torch.randn(2, 20, 6), torch.randn(2, 3, 8)
    want, attn = init, None
    for _ in range(iters):
        want, attn = algorithm1_iteration(m, inputs, want)
    got, got_attn = m(inputs, init)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # attention of the last iteration, before +eps: (B, K, N), each input's column sums to 1 over the slots
    torch.testing.assert_close(got_attn, attn.transpose(1, 2), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(got_attn.sum(dim=1), torch.ones(2, 20))


def test_implicit_grad_is_one_detached_extra_iteration():
    model, args = model_and_args("--implicit-grad")
    plain, _ = model_and_args("--iters", "4")
    plain.load_state_dict(model.state_dict())
    x, init = images(2), torch.randn(2, 3, 16)
    out = model(x, init)
    torch.testing.assert_close(out["slots"], plain(x, init)["slots"], atol=1e-5, rtol=1e-4)


def test_implicit_grad_straight_through_init_trains_mu_and_sigma():
    # The last step's input is slots.detach() + init - init.detach(): the gradient reaches mu and sigma as if
    # d(slots)/d(init) = I (BO-QSA). Without it they get none and DDP fails at the second step.
    model, args = model_and_args("--implicit-grad")
    m = model.slot_attention
    feats = torch.randn(2, 10, m.to_kv.in_features)
    torch.manual_seed(1)
    init = m.sample_slots(2).detach()
    torch.manual_seed(1)
    slots, _ = m(feats)
    slots.sum().backward(inputs=[m.slots_mu, m.slots_log_sigma, m.to_q.weight])
    # Through the straight-through path the init's gradient equals the gradient of the last step's input.
    with torch.no_grad():
        fixed = init
        for _ in range(m.iters):
            fixed, _ = m.step(fixed, m.norm_inputs(feats))
    last_in = fixed.clone().requires_grad_(True)
    m.step(last_in, m.norm_inputs(feats))[0].sum().backward()
    noise = (init - m.slots_mu) / m.slots_log_sigma.exp()
    torch.testing.assert_close(m.slots_mu.grad, last_in.grad.sum(dim=(0, 1), keepdim=True))
    torch.testing.assert_close(m.slots_log_sigma.grad,
                               (last_in.grad * noise * m.slots_log_sigma.exp()).sum(dim=(0, 1), keepdim=True))
    assert m.to_q.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("conv,grid", [
    (torch.nn.Conv2d(6, 5, 5, padding=2), 8), (torch.nn.Conv2d(6, 5, 5, padding=2), 3),  # grid < kernel
    (torch.nn.Conv2d(6, 5, 3, padding=1), 7), (torch.nn.Conv2d(6, 5, 3, padding=0), 6),  # unpadded (MONet)
    (torch.nn.Conv2d(6, 5, 5, padding=3, stride=2), 9), (torch.nn.Conv2d(6, 5, (3, 5), padding=(1, 2)), 5),
    (torch.nn.ConvTranspose2d(6, 5, 5, stride=2, padding=2, output_padding=1), 8),  # the clevr decoder's first
    (torch.nn.ConvTranspose2d(6, 5, 5, stride=2, padding=2, output_padding=1), 1)])
def test_broadcast_conv_equals_convolving_the_tiled_slots(conv, grid):
    torch.manual_seed(0)
    slots = torch.randn(7, 6, requires_grad=True)
    pos = torch.randn(1, 6, grid, grid, requires_grad=True)
    tiled = slots[:, :, None, None].expand(7, 6, grid, grid) + pos  # the textbook: broadcast, add, convolve
    want = conv(tiled)
    got = sa.broadcast_conv(slots, pos, conv)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    g = torch.randn_like(want)
    params = [slots, pos, conv.weight, conv.bias]
    for a, b in zip(torch.autograd.grad(got, params, g), torch.autograd.grad(want, params, g)):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("decoder,res", [("sprites", 16), ("clevr", 32)])
def test_plain_decoder_flag_gives_the_same_model(decoder, res):
    fast, args = model_and_args("--decoder", decoder, "--resolution", str(res))
    plain, _ = model_and_args("--decoder", decoder, "--resolution", str(res), "--plain-decoder")
    plain.load_state_dict(fast.state_dict())
    slots = torch.randn(2, 3, 16)
    for a, b in zip(fast.decoder(slots), plain.decoder(slots)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_reparameterised_init_trains_mu_and_sigma():
    model, _ = model_and_args()
    sa_mod = model.slot_attention
    s = sa_mod.sample_slots(5)
    assert s.shape == (5, 3, 16)
    s.pow(2).sum().backward()
    assert sa_mod.slots_mu.grad.abs().sum() > 0 and sa_mod.slots_log_sigma.grad.abs().sum() > 0


@pytest.mark.parametrize("name,res,k,dec", [
    ("shapes", 64, 6, "sprites"), ("shapes-colored", 64, 5, "sprites"), ("tetrominoes", 35, 4, "sprites"),
    ("/d/clevr_with_masks.h5", 128, 7, "clevr"), ("/d/multi_dsprites_colored_on_colored.h5", 64, 5, "sprites"),
    ("/d/multi_dsprites_colored_on_grayscale.h5", 64, 6, "sprites")])
def test_paper_preset_per_dataset(name, res, k, dec):
    args = sa.parse_args(["--data", name])
    assert (args.resolution, args.num_slots, args.decoder) == (res, k, dec)
    assert (args.batch_size, args.lr, args.steps, args.warmup_steps, args.grad_clip) == (64, 4e-4, 500_000, 10_000, 0)
    assert args.dec_layers == 3 and args.image_range == ("unit" if "colored" in name and "gray" not in name else "signed")
    assert sa.parse_args(["--data", name, "--num-slots", "9", "--decoder", "sprites"]).num_slots == 9  # flags win


def test_tiny_preset_defaults():
    args = sa.parse_args(["--preset", "tiny"])  # the README's quick-start
    assert (args.data, args.resolution, args.num_slots, args.lr, args.steps) == ("shapes-binary", 32, 4, 1e-3, 7000)
    assert (args.decay_steps, args.grad_clip) == (3500, 0.0)
    assert sa.parse_args(["--preset", "tiny", "--data", "shapes"]).num_slots == 6
    assert sa.parse_args([]).data == "shapes"


def test_lr_schedule_known_values():
    args = sa.parse_args(["--lr", "4e-4", "--warmup-steps", "10", "--decay-steps", "100"])
    assert sa.lr_at(0, args) == 0.0  # the official warm-up is global_step / warmup_steps from step 0
    assert sa.lr_at(4, args) == pytest.approx(4e-4 * 0.4 * 0.5 ** 0.04)
    assert sa.lr_at(10, args) == pytest.approx(4e-4 * 0.5 ** 0.1)
    assert sa.lr_at(100, args) == pytest.approx(4e-4 * 0.5)
    args.warmup_steps = 0
    assert sa.lr_at(0, args) == pytest.approx(4e-4)


def encoder_input(model, x):
    seen = []
    handle = model.encoder.register_forward_pre_hook(lambda mod, inp: seen.append(inp[0]))
    out = model(x)
    handle.remove()
    return seen[0], out


def test_users_command_is_the_reported_covloss_run():
    # `python slot_attention.py --loss cov --beta 1.0` = robert1003 ec1a6fb's COVLOSS command on cMdSprites:
    # --num_slots 5 --hid_dim 64 --proj_weight 1.0 --var_weight 0 --cov_weight 1.0 --cov-div-sq --proj-layernorm,
    # --proj_dim 1024 (default), images in [0, 1] (no --dataset-rescale), the MSE on that range.
    args = sa.parse_args(["--loss", "cov", "--beta", "1.0"])
    assert (args.data, args.num_slots, args.slot_dim, args.enc_channels, args.dec_channels, args.dec_layers) == \
        ("shapes-colored", 5, 64, 64, 64, 3)
    assert (args.image_range, args.cov_norm, args.proj, args.proj_dim, args.proj_norm, args.beta) == \
        ("unit", "dim2", "mlp", 1024, "layer", 1.0)
    assert (args.train_size, args.eval_size) == (60_000, 320)
    torch.manual_seed(0)
    model = sa.build_model(args)
    x = data.make_dataset("shapes-colored", "train", 64).get_batch([0, 1])["image"]
    seen, out = encoder_input(model, x)
    terms = sa.compute_loss(out, x, args)
    assert set(terms) == {"mse", "cov", "loss"}
    torch.testing.assert_close(seen, x)  # the encoder reads [0, 1]
    # The reported formula, written out: covariance of the B*K projected slots, centred, / (N - 1), sum of the
    # squared off-diagonal entries, / D^2; MSE of the reconstruction against the [0, 1] image.
    z = out["proj"].reshape(2 * 5, 1024).double()
    zc = z - z.mean(0)
    c = zc.T @ zc / (10 - 1)
    cov = ((c ** 2).sum() - (c.diagonal() ** 2).sum()) / 1024 ** 2
    mse = ((out["recon"].double() - x.double()) ** 2).mean()
    torch.testing.assert_close(terms["cov"].double(), cov, rtol=1e-4, atol=1e-12)
    torch.testing.assert_close(terms["mse"].double(), mse, rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(terms["loss"].double(), mse + cov, rtol=1e-5, atol=1e-9)


def test_cosine_and_vicreg_defaults_are_the_reported_runs():
    cos = sa.parse_args(["--loss", "cosine"])  # be8d9c8: --info-nce-weight 0.01 --identity-proj --proj_dim 64
    assert (cos.data, cos.beta, cos.proj, cos.proj_dim, cos.cos_margin) == ("shapes-colored", 0.01, "identity", 64, 0.2)
    vic = sa.parse_args(["--loss", "vicreg"])  # Table 3 "+ CovLoss": identity, var 1 (gamma 1), cov 1, / D
    assert (vic.beta, vic.proj, vic.cov_norm, vic.var_gamma) == (1.0, "identity", "dim", 1.0)
    model, args = model_and_args("--loss", "cosine")
    out = model(images(2))
    torch.testing.assert_close(out["proj"], out["slots"])  # the identity head: the slots themselves
    t = sa.compute_loss(out, images(2), args)
    torch.testing.assert_close(t["loss"], t["mse"] + 0.01 * t["cos"])


def test_mse_term_is_f_mse_loss_on_the_papers_range():
    model, args = model_and_args("--data", "shapes")  # SA paper: images in [-1, 1]
    x = images()
    seen, out = encoder_input(model, x)
    torch.testing.assert_close(seen, x * 2 - 1)
    torch.testing.assert_close(sa.compute_loss(out, x, args)["mse"], F.mse_loss(out["recon"], x * 2 - 1))


def test_projection_head_runs_in_fp32_under_bf16_and_not_in_eval():
    model, args = model_and_args("--loss", "cov")
    x = images(2)
    dtypes = []
    model.projector.net[0].register_forward_hook(lambda mod, inp, o: dtypes.append(o.dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
        terms = sa.compute_loss(out, x, args)
    assert out["rgb"].dtype == torch.bfloat16  # autocast is on for the rest of the model
    assert dtypes == [torch.float32] and out["proj"].dtype == torch.float32
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in terms.values())
    model.eval()
    assert "proj" not in model(x)


def test_slot_init_uses_the_keras_glorot_bound():
    m = sa.SlotAttention(num_slots=3, slot_dim=64, input_dim=8, mlp_hidden=8)
    keras, torch_xavier = math.sqrt(6 / (1 + 64)), math.sqrt(3 / 64)
    for p in (m.slots_mu, m.slots_log_sigma):  # 64 draws: P(all below the xavier bound) ~ 4e-10
        assert torch_xavier < p.abs().max() <= keras


def test_decoder_depth_flag():
    for layers in (3, 2):
        model, _ = model_and_args("--dec-layers", str(layers))
        convs = [m for m in model.decoder.cnn if isinstance(m, torch.nn.Conv2d)]
        assert [c.kernel_size for c in convs] == [(5, 5)] * layers + [(3, 3)]


def test_logged_lr_is_the_optimisers(tmp_path, monkeypatch):
    applied = []
    real_step = torch.optim.Adam.step
    monkeypatch.setattr(torch.optim.Adam, "step", lambda self, *a, **k: (applied.append(self.param_groups[0]["lr"]),
                                                                         real_step(self, *a, **k))[1])
    sa.main(CLI + ["--out-dir", str(tmp_path), "--run-name", "r", "--steps", "5", "--eval-every", "0",
                   "--log-every", "1", "--warmup-steps", "3", "--decay-steps", "4"])
    logged = [l["lr"] for l in map(json.loads, (tmp_path / "r" / "metrics.jsonl").open()) if l["split"] == "train"]
    assert logged == applied and len(applied) == 5
    assert applied[:2] == [0.0, pytest.approx(1e-3 / 3 * 0.5 ** 0.25)]  # the tiny preset's lr, warm-up 3, decay 4


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
    assert any(k.startswith("projector.") for k in ckpt["model"]) == (args["proj"] == "mlp") == (loss == "cov")
    assert sorted(p.name for p in (run / "samples").iterdir()) == ["step_0000003.png", "step_0000006.png"]
    assert json.loads((run / "eval.json").read_text())["step"] == 6


def test_eval_only_and_probe(tmp_path):
    # shapes: coloured sprites (in shapes-binary every object is white and colour R^2 is undefined)
    assert run_cli(tmp_path, "--steps", "3", "--run-name", "r", "--data", "shapes").returncode == 0
    ckpt = tmp_path / "r" / "checkpoint.pt"
    (tmp_path / "r" / "eval.json").unlink()
    # --data again: under --eval-only a given --data (CLI's shapes-binary) overrides the checkpoint's
    r = run_cli(tmp_path, "--eval-only", str(ckpt), "--data", "shapes", "--probe", "--probe-train-size", "48",
                "--probe-val-size", "16",
                "--probe-test-size", "32", "--probe-steps", "20", "--eval-size", "32")
    assert r.returncode == 0, r.stderr
    ev = json.loads((tmp_path / "r" / "eval.json").read_text())
    assert ev["step"] == 3 and -1 <= ev["fg_ari"] <= 1
    probe = json.loads((tmp_path / "r" / "probe.json").read_text())
    assert 0 <= probe["shape_acc"] <= 1
    assert all(math.isfinite(probe[k]) and probe[k] <= 1 for k in ("color_r2", "scale_r2", "x_r2", "y_r2"))
    protocol = probe["protocol"]
    assert (protocol["train_images"], protocol["val_images"], protocol["test_images"], protocol["max_steps"]) == \
        (48, 16, 32, 20)
    assert protocol["authors_protocol"] is False


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
    (["--loss", "cosine", "--proj-dim", "32"], "--proj-dim must equal --slot-dim"),
    (["--decoder", "clevr", "--resolution", "32", "--dec-layers", "2"], "the clevr decoder is fixed"),
    (["--decoder", "clevr", "--resolution", "40"], "multiple of 16"),
    (["--data", "/no/such/dataset.h5"], "no such file"),
    (["--resume", "/no/such/checkpoint.pt"], "checkpoint not found"),
])
def test_bad_input_is_one_line_error(tmp_path, capsys, extra, needle):
    with pytest.raises(SystemExit) as e:  # in-process; the shell's view: test_training.py
        sa.main(CLI + ["--out-dir", str(tmp_path), "--steps", "2", *extra])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert needle in err and "error:" in err
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


@pytest.mark.slow
def test_torchrun_implicit_grad(tmp_path):
    # DDP needs a gradient on every parameter: with --implicit-grad the slot mean and log-sigma get theirs through
    # the straight-through initialisation (without it the second step failed). tests/test_training.py runs the
    # other torchrun checks for every model.
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "slot_attention.py"), *CLI, "--out-dir", str(tmp_path), "--run-name", "ddp", "--steps", "4",
           "--device", "cpu", "--implicit-grad"]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=240,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    assert torch.load(tmp_path / "ddp" / "checkpoint.pt", weights_only=True)["step"] == 4


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
