"""IODINE: refinement inputs, leave-one-out, loss weights, stop-gradients, gradients, overfitting, the CLI,
resume, DDP, bad input."""
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
import iodine as io  # noqa: E402
import losses  # noqa: E402

# A model small enough that a CPU step takes tens of milliseconds.
TINY = ["--preset", "tiny", "--resolution", "16", "--num-slots", "3", "--latent-dim", "4", "--dec-channels", "8",
        "--ref-channels", "8", "--ref-layers", "2", "--ref-mlp", "16", "--lstm-hidden", "16", "--iters", "2",
        "--batch-size", "4"]
CLI = TINY + ["--log-every", "2", "--eval-every", "3", "--save-every", "3", "--eval-size", "8", "--data", "shapes-binary"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(autouse=True)
def one_thread():
    """These models are tiny: one thread is faster than two fighting over a shared CPU; restored after."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def model_and_args(*extra):
    args = io.parse_args(TINY + list(extra))
    torch.manual_seed(0)
    return io.build_model(args), args


def images(n=4, res=16):
    return data.make_dataset("shapes", "train", res).get_batch(list(range(n)))["image"]


def run_cli(tmp_path, *extra, env=ENV):
    cmd = [sys.executable, str(ROOT / "iodine.py"), *CLI, "--out-dir", str(tmp_path), *extra]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=240, env=env)


@pytest.mark.parametrize("coord,nc", [("cos", 8), ("linear", 2)])
def test_shapes_of_outputs_and_every_refinement_input(coord, nc):
    model, args = model_and_args("--coord", coord)
    out = model(images(2), keep_inputs=True)
    assert out["recon"].shape == (2, 3, 16, 16) and out["means"].shape == (2, 3, 3, 16, 16)
    assert out["masks"].shape == out["mask_logits"].shape == (2, 3, 16, 16)
    assert out["slots"].shape == (2, 3, 4)
    assert out["nll"].shape == out["kl"].shape == (3, 2)  # T+1 decodes
    assert len(out["iter_masks"]) == 3 and len(out["inputs"]) == 2  # T refinement steps
    torch.testing.assert_close(out["masks"].sum(1), torch.ones(2, 16, 16))
    expected = {"image": 3, "means": 3, "masks": 1, "mask_logits": 1, "dmeans": 3, "dlogits": 1, "posterior": 1,
                "log_px": 1, "loo": 1, "coords": nc, "capacity": 1}
    for a in out["inputs"]:
        assert set(a) == set(expected) | {"lam", "dlam", "flat_capacity"}
        for name, c in expected.items():
            assert a[name].shape == (2, 3, c, 16, 16), name
        assert a["lam"].shape == a["dlam"].shape == (2, 3, 8)  # lambda = (mu, s) and dL/dlambda
        assert a["posterior"].sum(1).max() <= 1
        assert torch.equal(a["image"][:, 1], images(2))  # the same image for every slot


def test_leave_one_out_equals_direct_k_loop():
    torch.manual_seed(1)
    b, k, h, w = 2, 5, 4, 3
    logits, log_lik = torch.randn(b, k, h, w) * 3, torch.randn(b, k, h, w) * 20
    logits[0, 2] = 40.0  # slot 2 dominates image 0: the naive log(1 - exp(.)) form would give -inf
    got = io.leave_one_out_log_likelihood(logits, log_lik)
    ref = torch.empty(b, k, h, w, dtype=torch.float64)
    for j in range(k):  # the mixture without slot j, its masks renormalised over the others
        keep = [i for i in range(k) if i != j]
        m = torch.softmax(logits[:, keep].double(), dim=1)
        ref[:, j] = torch.log((m * log_lik[:, keep].double().exp()).sum(1))
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.double(), ref, atol=1e-4, rtol=1e-5)


def test_gaussian_mixture_nll_and_kl_match_the_shared_losses():
    model, args = model_and_args("--likelihood", "gaussian", "--prior-scale", "0.7")
    assert args.pixel_scale == 0.1
    x, lam = images(2), torch.randn(2, 3, 8)
    noise = torch.randn(2, 3, 4)
    dec = model.decode(x, lam, noise)
    nll = losses.mixture_nll(x, dec["means"], torch.log_softmax(dec["logits"], 1), args.pixel_scale)
    torch.testing.assert_close(dec["nll"], nll)
    mu, s = lam.chunk(2, -1)
    var = torch.nn.functional.softplus(s)
    q = torch.distributions.Normal(mu, var.sqrt())
    torch.testing.assert_close(dec["kl"], torch.distributions.kl_divergence(q, torch.distributions.Normal(0., .7))
                               .sum((1, 2)))


def test_loss_weights_are_t_over_T():
    torch.testing.assert_close(io.iteration_weights(5), torch.tensor([0, .2, .4, .6, .8, 1.]))
    model, args = model_and_args()
    x = images()
    out = model(x)
    t = io.compute_loss(out, x, args)
    assert {f"nll_{i}" for i in range(3)} | {f"kl_{i}" for i in range(3)} | {"mse", "loss"} == set(t)
    want = 0.5 * (t["nll_1"] + t["kl_1"]) + 1.0 * (t["nll_2"] + t["kl_2"])  # T = 2; the initial decode counts 0
    torch.testing.assert_close(t["loss"], want)


def test_stop_gradient_inputs_are_detached(monkeypatch):
    calls = []
    real = torch.autograd.grad

    def spy(outputs, inputs, *a, **kw):
        calls.append(kw.get("create_graph", False))
        return real(outputs, inputs, *a, **kw)

    monkeypatch.setattr(torch.autograd, "grad", spy)
    model, args = model_and_args()
    out = model(images(2), keep_inputs=True)
    assert calls == [False, False]  # one first-order gradient per refinement step, no second-order graph
    dec_params = list(model.decoder.parameters()) + [model.lambda0]
    for a in out["inputs"]:
        constants = sum(a[n].sum() for n in ("dmeans", "dlogits", "log_px", "loo", "dlam", "capacity"))  # up to LN
        g = real(constants, dec_params, retain_graph=True, allow_unused=True)
        assert all(gi is None for gi in g)
        for name in ("means", "masks", "mask_logits", "posterior"):  # these carry the gradient
            g = real(a[name].sum(), list(model.decoder.parameters()), retain_graph=True, allow_unused=True)
            assert any(gi is not None and gi.abs().sum() > 0 for gi in g), name
    # the final loss still backpropagates through all T steps: into the first refinement step's lambda
    io.compute_loss(out, images(2), args)["loss"].backward()
    assert model.lambda0.grad.abs().sum() > 0 and model.refine.head.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("extra", [[], ["--no-lstm"], ["--coord", "linear", "--ref-mlp", "16", "16"]])
def test_every_parameter_gets_a_gradient(extra):
    model, args = model_and_args(*extra)
    assert (model.refine.lstm is None) == ("--no-lstm" in extra)
    x = images()
    io.compute_loss(model(x), x, args)["loss"].backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_slot_permutation_equivariance():
    model, args = model_and_args()
    x, noise = images(2), torch.randn(3, 2, 3, 4)
    perm = torch.tensor([2, 0, 1])
    a, b = model(x, noise), model(x, noise[:, :, perm])
    torch.testing.assert_close(b["slots"], a["slots"][:, perm], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(b["masks"], a["masks"][:, perm], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(b["nll"], a["nll"], atol=1e-2, rtol=1e-4)


def test_evaluation_mode_refines_without_keeping_a_graph():
    model, args = model_and_args()
    x, noise = images(2), torch.randn(3, 2, 3, 4)
    train = model(x, noise)
    with torch.no_grad():
        ev = model(x, noise)
    assert not ev["nll"].requires_grad and not ev["masks"].requires_grad
    torch.testing.assert_close(ev["nll"], train["nll"].detach())  # same inference, with or without a graph


@pytest.mark.parametrize("name,res,k,z,lstm,batch,lr", [
    ("shapes", 64, 6, 16, 128, 128, 3e-4), ("tetrominoes", 35, 4, 32, 0, 256, 3e-4),
    ("/d/clevr_with_masks.h5", 128, 7, 64, 256, 32, 1e-3)])
def test_paper_preset_per_dataset(name, res, k, z, lstm, batch, lr):
    args = io.parse_args(["--data", name])
    assert (args.resolution, args.num_slots, args.latent_dim, args.lstm_hidden) == (res, k, z, lstm)
    assert (args.batch_size, args.lr, args.grad_clip, args.iters) == (batch, pytest.approx(lr), 5.0, 5)
    small = io.parse_args(["--data", name, "--batch-size", str(batch // 4)])
    assert small.lr == pytest.approx(lr * 0.5)  # sqrt(batch / paper batch)
    assert io.parse_args(["--data", name, "--lr", "1e-2", "--no-lstm"]).lr == 1e-2
    assert io.parse_args(["--data", name, "--preset", "tiny"]).lstm_hidden == lstm  # tiny keeps the LSTM choice
    assert io.parse_args(["--data", name, "--no-lstm"]).lstm_hidden == 0


def test_tiny_preset_defaults_to_tetrominoes():
    a = io.parse_args(["--preset", "tiny"])
    assert (a.data, a.resolution, a.num_slots) == ("tetrominoes", 35, 4)  # native resolution
    assert io.parse_args(["--preset", "tiny", "--data", "shapes"]).resolution == 32
    assert (a.latent_dim, a.lstm_hidden, a.steps) == (16, 0, 2000)  # Tetrominoes: no LSTM, as in the paper
    assert io.parse_args([]).data == "shapes"


def test_lr_schedule_known_values():
    args = io.parse_args(["--lr", "1e-3", "--warmup-steps", "10", "--decay-steps", "100"])
    assert io.lr_at(4, args) == pytest.approx(1e-3 * 0.5 * 0.1 ** 0.04)
    assert io.lr_at(100, args) == pytest.approx(1e-4)


def test_overfits_one_batch():
    model, args = model_and_args()
    x = images(4)
    opt = torch.optim.Adam(model.parameters(), lr=5e-3, betas=(0.95, 0.999))
    torch.manual_seed(0)
    first = None
    for _ in range(30):
        terms = io.compute_loss(model(x), x, args)
        opt.zero_grad()
        terms["loss"].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        opt.step()
        first = first if first is not None else terms["mse"].item()
    assert terms["mse"].item() < 0.2 * first


def test_cli_writes_run_files(tmp_path):
    r = run_cli(tmp_path, "--steps", "6", "--run-name", "r", "--no-lstm")
    assert r.returncode == 0, r.stderr
    run = tmp_path / "r"
    args = json.loads((run / "args.json").read_text())
    assert args["steps"] == 6 and args["lstm_hidden"] == 0
    lines = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    train = [l for l in lines if l["split"] == "train"]
    evals = [l for l in lines if l["split"] == "eval"]
    assert [l["step"] for l in train] == [2, 4, 6] and [l["step"] for l in evals] == [3, 6]
    for key in ["nll_0", "nll_1", "nll_2", "kl_0", "kl_1", "kl_2", "mse", "loss", "lr", "images_per_s"]:
        assert all(math.isfinite(l[key]) for l in train), key
    for key in ("ari", "fg_ari", "miou", "mbo", "fg_ari_iter_0", "fg_ari_iter_1", "fg_ari_iter_2", "colour_fg_ari"):
        assert -1 <= evals[-1][key] <= 1, key
    assert 0 <= evals[-1]["mask_std"] <= 0.5  # the std of a quantity in [0, 1]
    assert evals[-1]["fg_ari_iter_2"] == evals[-1]["fg_ari"]  # the last step's masks are the final ones
    ckpt = torch.load(run / "checkpoint.pt", weights_only=True)
    assert ckpt["step"] == 6 and not any(k.startswith("refine.lstm") for k in ckpt["model"])
    assert sorted(p.name for p in (run / "samples").iterdir()) == ["step_0000003.png", "step_0000006.png"]
    assert json.loads((run / "eval.json").read_text())["step"] == 6
    io.main(CLI + ["--eval-only", str(run / "checkpoint.pt")])  # in-process: no second interpreter start
    assert json.loads((run / "eval.json").read_text())["fg_ari"] == evals[-1]["fg_ari"]


def test_resume_equals_uninterrupted(tmp_path):
    common = CLI + ["--out-dir", str(tmp_path), "--eval-every", "0", "--log-every", "1"]
    io.main(common + ["--steps", "4", "--run-name", "full"])
    io.main(common + ["--steps", "2", "--run-name", "part"])
    io.main(common + ["--steps", "4", "--resume", str(tmp_path / "part" / "checkpoint.pt")])
    full = torch.load(tmp_path / "full" / "checkpoint.pt", weights_only=True)
    part = torch.load(tmp_path / "part" / "checkpoint.pt", weights_only=True)
    assert part["step"] == 4
    for k, v in full["model"].items():
        assert torch.equal(v, part["model"][k]), k
    losses_of = lambda run: [l["loss"] for l in map(json.loads, (tmp_path / run / "metrics.jsonl").open())  # noqa
                             if l["split"] == "train"]
    assert losses_of("full") == losses_of("part")


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
    (["--num-slots", "1"], "--num-slots must be at least 2"),
    (["--data", "/no/such/dataset.h5"], "no such file"),
    (["--resume", "/no/such/checkpoint.pt"], "checkpoint not found"),
])
def test_bad_input_is_one_line_error(tmp_path, capsys, extra, needle):
    with pytest.raises(SystemExit) as e:  # in-process; the shell's view: test_training.py
        io.main(CLI + ["--out-dir", str(tmp_path), "--steps", "2", *extra])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert needle in err and "error:" in err
    assert not any(tmp_path.iterdir())  # nothing half-written


@pytest.mark.parametrize("extra,needle", [(["--dec-kernel", "4"], "must be odd"),
                                          (["--pixel-scale", "0"], "--pixel-scale must be positive"),
                                          (["--ref-mlp", "16", "0"], "widths must be positive")])
def test_impossible_flags_are_refused(extra, needle, capsys):
    with pytest.raises(SystemExit) as e:
        io.parse_args(TINY + extra)
    assert e.value.code == 2 and needle in capsys.readouterr().err


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch, capsys):
    real = io.compute_loss
    calls = {"n": 0}

    def poisoned(out, image, args):
        calls["n"] += 1
        terms = real(out, image, args)
        if calls["n"] == 5:  # step 5 produces a NaN likelihood at the last refinement step
            terms["nll_2"] = terms["nll_2"] * float("nan")
            terms["loss"] = terms["loss"] + terms["nll_2"]
        return terms

    monkeypatch.setattr(io, "compute_loss", poisoned)
    with pytest.raises(SystemExit) as e:
        io.main(CLI + ["--out-dir", str(tmp_path), "--run-name", "r", "--steps", "7", "--eval-every", "0",
                       "--save-every", "4", "--log-every", "100"])
    assert e.value.code == 2
    assert "non-finite loss term 'nll_2' at step 5" in capsys.readouterr().err
    ckpt = torch.load(tmp_path / "r" / "checkpoint.pt", weights_only=True)
    assert ckpt["step"] == 4 and all(torch.isfinite(v).all() for v in ckpt["model"].values())


def test_bf16_autocast_runs_on_cpu(tmp_path):
    io.main(CLI + ["--out-dir", str(tmp_path), "--dtype", "bf16", "--steps", "3", "--run-name", "r"])
    assert json.loads((tmp_path / "r" / "eval.json").read_text())["step"] == 3


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_bf16_compile(tmp_path):
    r = run_cli(tmp_path, "--device", "cuda", "--dtype", "bf16", "--compile", "--steps", "6", "--run-name", "r")
    assert r.returncode == 0, r.stderr
    train = [json.loads(l) for l in (tmp_path / "r" / "metrics.jsonl").open()]
    assert all(math.isfinite(l["loss"]) for l in train if l["split"] == "train")


# --- Every refinement input against an independent formula (issue 14): the spatial block the refinement network
# receives is hooked and cut by this file's own layout, not iodine.py's.
def spatial_layout(nc):
    return [("image", 3), ("means", 3), ("masks", 1), ("mask_logits", 1), ("dmeans", 3), ("dlogits", 1),
            ("posterior", 1), ("log_px", 1), ("loo", 1), ("coords", nc), ("capacity", 1)]


def coords_formula(kind, h, w):
    """[y, x] in [-1, 1]; or cos(f_y pi v) cos(f_x pi u), u, v in [0, 1], f in 0..2, without f = (0, 0)."""
    v, u = torch.linspace(0, 1, h)[:, None].expand(h, w), torch.linspace(0, 1, w)[None, :].expand(h, w)
    if kind == "linear":
        return torch.stack([2 * v - 1, 2 * u - 1])
    return torch.stack([torch.cos(fy * math.pi * v) * torch.cos(fx * math.pi * u)
                        for fy in range(3) for fx in range(3)][1:])


def layer_norm(v, dims, weight=None, bias=None, eps=1e-5):
    """(v - mean) / sqrt(var + eps) over `dims`, then the per-channel affine (channel dim 2 of (B, K, C, H, W))."""
    out = (v - v.mean(dims, keepdim=True)) / torch.sqrt(v.var(dims, unbiased=False, keepdim=True) + eps)
    if weight is not None:
        shape = [1] * v.dim()
        shape[2] = -1
        out = out * weight.view(shape) + bias.view(shape)
    return out


def pixel_log_lik(x, means, args):
    """log p(x_c | mu_kc) summed over channels (B, K, H, W): the logistic density s^-1 e^-u / (1 + e^-u)^2,
    u = (x - mu) / s, or the Gaussian one."""
    s = args.pixel_scale
    u = (x[:, None] - means) / s
    if args.likelihood == "logistic":
        return torch.log(torch.exp(-u) / (s * (1 + torch.exp(-u)) ** 2)).sum(2)
    return torch.log(torch.exp(-0.5 * u ** 2) / (s * math.sqrt(2 * math.pi))).sum(2)


def expected_inputs(model, args, x, lam, noise):
    """The refinement inputs of one step from lambda (B, K, 2Z) and the step's noise, by direct formulas in float64
    (the decoder is the model's; everything after it is recomputed here)."""
    lam = lam.detach().double().requires_grad_()
    mu, s = lam.chunk(2, -1)
    var = torch.nn.functional.softplus(s)
    means, logits = model.decoder((mu + var.sqrt() * noise.double()).float())
    means, logits = means.double(), logits.double()
    xd = x.double()
    log_lik = pixel_log_lik(xd, means, args)  # (B, K, H, W)
    masks = logits.softmax(1)
    log_px = torch.log((masks * log_lik.exp()).sum(1))  # (B, H, W): the mixture, directly
    prior_var = args.prior_scale ** 2
    kl = 0.5 * (var / prior_var + mu ** 2 / prior_var - 1 - var.log() + math.log(prior_var))
    loss = -log_px.sum() + kl.sum()
    dmeans, dlogits, dlam = torch.autograd.grad(loss, [means, logits, lam])
    k = means.shape[1]
    loo = []
    for j in range(k):  # the mixture of the other K-1 components, their masks renormalised
        keep = [i for i in range(k) if i != j]
        loo.append(log_px - torch.log((logits[:, keep].softmax(1) * log_lik[:, keep].exp()).sum(1)))
    loo = torch.stack(loo, 1).unsqueeze(2)  # (B, K, 1, H, W)
    n = {name: (m.weight.double(), m.bias.double()) for name, m in model.norms.items()}  # LayerNorm affines
    b, _, h, w = x.shape
    post = log_lik.exp() / (log_lik.exp().sum(1, keepdim=True) + 1e-6)  # the official mask posterior
    log_px_in = layer_norm(log_px[:, None, None], (2, 3, 4), *n["log_px"])  # (B, 1, 1, H, W), over the pixels
    flat = [lam, layer_norm(dlam, (2,)) * model.norm_dlam.weight.double() + model.norm_dlam.bias.double(),
            torch.full((b, k, 1), 0.5, dtype=torch.double)]  # [lambda, LN(dL/dlambda), capacity 0.5]
    return dict(image=xd[:, None].expand(b, k, 3, h, w), means=means, masks=masks[:, :, None],
                mask_logits=logits[:, :, None], dmeans=layer_norm(dmeans, (2, 3, 4), *n["dmeans"]),
                dlogits=layer_norm(dlogits[:, :, None], (2, 3, 4), *n["dlogits"]), posterior=post[:, :, None],
                log_px=log_px_in.expand(b, k, 1, h, w), loo=layer_norm(loo, (2, 3, 4), *n["loo"]),
                coords=coords_formula(args.coord, h, w).double().expand(b, k, -1, h, w),
                capacity=torch.full((b, k, 1, h, w), 0.5, dtype=torch.double), flat=torch.cat(flat, -1))


def check_refinement_inputs(model, args, x, noise):
    """Run the model with a hook on the refinement network and compare every input block of every step."""
    seen = []
    hook = model.refine.register_forward_pre_hook(lambda m, a: seen.append([t.detach().clone() if torch.is_tensor(t)
                                                                           else t for t in a]))
    try:
        model(x, noise)
    finally:
        hook.remove()
    b, k = x.shape[0], args.num_slots
    assert len(seen) == args.iters
    lam = model.lambda0.detach().expand(b, k, -1)
    for t, (spatial, flat, state) in enumerate(seen):
        want = expected_inputs(model, args, x, lam, noise[t])
        spatial = spatial.view(b, k, *spatial.shape[1:])  # (B, K, C, H, W)
        start = 0
        for name, c in spatial_layout(want["coords"].shape[2]):
            torch.testing.assert_close(spatial[:, :, start:start + c].double(), want[name], atol=2e-4, rtol=1e-4,
                                       msg=lambda m: f"step {t}, input {name}: {m}")
            start += c
        assert start == spatial.shape[2]
        torch.testing.assert_close(flat.view(b, k, -1).double(), want["flat"], atol=2e-4, rtol=1e-4)
        lam = lam + model.refine(spatial.flatten(0, 1), flat, state)[0].view(b, k, -1)  # next step's lambda


def perturbed_model(*extra):
    """The tiny model with random LayerNorm affines, so that a missing or swapped affine shows."""
    model, args = model_and_args(*extra)
    with torch.no_grad():
        for m in [*model.norms.values(), model.norm_dlam]:
            m.weight.uniform_(0.5, 1.5)
            m.bias.uniform_(-0.5, 0.5)
    return model, args


@pytest.mark.parametrize("extra", [["--coord", "cos"], ["--coord", "linear", "--no-lstm", "--likelihood", "gaussian"]])
def test_every_refinement_input_equals_its_formula(extra):
    model, args = perturbed_model(*extra)
    torch.manual_seed(3)
    x, noise = images(2), torch.randn(args.iters + 1, 2, args.num_slots, args.latent_dim)
    check_refinement_inputs(model, args, x, noise)


def test_swapped_refinement_inputs_are_caught(monkeypatch):
    model, args = perturbed_model()
    x, noise = images(2), torch.randn(args.iters + 1, 2, args.num_slots, args.latent_dim)
    order = list(io.SPATIAL_INPUTS)
    i, j = order.index("masks"), order.index("posterior")
    order[i], order[j] = order[j], order[i]
    monkeypatch.setattr(io, "SPATIAL_INPUTS", tuple(order))
    with pytest.raises(AssertionError, match="input masks"):
        check_refinement_inputs(model, args, x, noise)


def test_logistic_log_likelihood_against_torch_distributions():
    torch.manual_seed(0)
    x, means = torch.rand(2, 3, 5, 4), torch.rand(2, 3, 3, 5, 4) * 1.4 - 0.2
    # the logistic distribution as an affine map of the logit of a uniform variable
    d = torch.distributions.TransformedDistribution(
        torch.distributions.Uniform(0., 1.), [torch.distributions.SigmoidTransform().inv,
                                             torch.distributions.AffineTransform(means, 0.03)])
    want = d.log_prob(x[:, None].expand_as(means)).sum(2)  # (B, K, H, W)
    torch.testing.assert_close(io.pixel_log_likelihood(x, means, "logistic", 0.03), want, atol=1e-4, rtol=1e-5)
    assert io.pixel_log_likelihood(x, x[:, None], "logistic", 0.03).max() == pytest.approx(3 * -math.log(4 * 0.03))


def test_sonnet_initialisation():
    model, _ = model_and_args("--dec-channels", "64", "--lstm-hidden", "64")
    trunc_std = 0.8796  # std of a standard normal truncated at +-2
    conv = model.decoder.cnn[2]  # 64 -> 64, 3x3: fan_in 576
    std = 1 / math.sqrt(64 * 9)
    assert conv.weight.std().item() == pytest.approx(trunc_std * std, rel=0.05)
    assert conv.weight.abs().max() <= 2 * std and not conv.bias.any()
    lstm = model.refine.lstm
    h, std = lstm.hidden_size, 1 / math.sqrt(lstm.input_size + lstm.hidden_size)
    assert lstm.weight_hh.std().item() == pytest.approx(trunc_std * std, rel=0.05) and not lstm.bias_hh.any()
    forget, others = lstm.bias_ih[h:2 * h], torch.cat([lstm.bias_ih[:h], lstm.bias_ih[2 * h:]])
    assert (forget - 1).abs().max() <= 2 * std and others.abs().max() <= 2 * std  # forget bias 1 + noise
    torch_model, _ = model_and_args("--dec-channels", "64", "--init", "torch")
    assert torch_model.decoder.cnn[2].bias.any()  # PyTorch's default: uniform biases


@pytest.mark.parametrize("res,kernel,pad", [(16, 5, 2), (35, 5, 2), (9, 3, 1), (12, 5, 0), (7, 3, 3)])
def test_broadcast_conv_equals_tile_then_conv(res, kernel, pad):
    torch.manual_seed(res)
    conv = torch.nn.Conv2d(6 + 2, 7, kernel, padding=pad).double()
    z = torch.randn(5, 6, dtype=torch.double, requires_grad=True)
    coords = io.coordinate_channels(res, res).double()
    fast = io.broadcast_conv(conv, z, coords)
    fast_grads = torch.autograd.grad((fast * fast.detach().cos()).sum(), [z, *conv.parameters()])
    tiled = torch.cat([z[:, :, None, None].expand(-1, -1, res, res), coords.expand(5, -1, -1, -1)], 1)
    plain = conv(tiled)
    torch.testing.assert_close(fast, plain)
    for g, want in zip(fast_grads, torch.autograd.grad((plain * plain.detach().cos()).sum(), [z, *conv.parameters()])):
        torch.testing.assert_close(g, want)


def test_plain_decoder_gives_the_same_model():
    model, args = model_and_args()
    plain, _ = model_and_args("--plain-decoder")
    plain.load_state_dict(model.state_dict())
    x, noise = images(2), torch.randn(3, 2, 3, 4)
    seen = []
    plain.decoder.cnn[0].register_forward_pre_hook(lambda m, inp: seen.append(inp[0]))
    a, b = model(x, noise), plain(x, noise)
    z0 = noise[0] * torch.nn.functional.softplus(model.lambda0[4:]).sqrt() + model.lambda0[:4]  # (B, K, Z)
    want = torch.cat([z0.flatten(0, 1)[:, :, None, None].expand(-1, -1, 16, 16), torch.full((6, 1, 16, 16), 5.0),
                      coords_formula("linear", 16, 16).expand(6, -1, -1, -1)], 1)  # [z, 5.0, y, x]
    torch.testing.assert_close(seen[0], want)
    torch.testing.assert_close(a["nll"], b["nll"], rtol=1e-4, atol=1e-2)
    ga = torch.autograd.grad(io.compute_loss(a, x, args)["loss"], model.decoder.cnn[0].weight)[0]
    gb = torch.autograd.grad(io.compute_loss(b, x, args)["loss"], plain.decoder.cnn[0].weight)[0]
    torch.testing.assert_close(ga, gb, rtol=1e-3, atol=1e-3)


def test_plateau_diagnostics():
    ds = data.make_dataset("tetrominoes", "test")
    batch = ds.get_batch(list(range(8)))
    x, true = batch["image"], batch["mask"]
    onehot = torch.nn.functional.one_hot(true.clamp_min(0), 4).permute(0, 3, 1, 2).float()  # (B, 4, H, W)
    # slot k's mean is the image on entity k and far from it elsewhere: the colour posterior is the truth
    means = torch.where(onehot[:, :, None] > 0, x[:, None], x[:, None] + 0.5)
    log_lik = io.pixel_log_likelihood(x, means)
    exact = io.plateau_diagnostics(true, onehot, log_lik, ds.num_background)
    assert exact["colour_fg_ari"].min().item() == pytest.approx(1.0)
    p, n = onehot.mean((2, 3)), 35 * 35  # one-hot masks: slot k covers a fraction p_k of the N pixels
    torch.testing.assert_close(exact["mask_std"], torch.sqrt(p * (1 - p) * n / (n - 1)).mean(1))
    # the colour plateau: flat masks, while the means have split the colours exactly (colour FG-ARI ignores masks)
    flat = io.plateau_diagnostics(true, torch.full_like(onehot, 0.25), log_lik, ds.num_background)
    assert flat["colour_fg_ari"].min().item() == pytest.approx(1.0)
    assert flat["mask_std"].abs().max() < 1e-6  # the colour plateau: uniform masks
