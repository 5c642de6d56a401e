"""MONet: shapes, the log-space recursion, gradients, the ablated objectives, diagnostics, overfitting, the CLI,
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
import torch.nn.functional as F
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import data  # noqa: E402
import losses  # noqa: E402
import monet  # noqa: E402

# A model small enough that a CPU step takes milliseconds.
TINY = ["--preset", "tiny", "--resolution", "16", "--num-slots", "3", "--unet-channels", "4", "--mlp-hidden", "16",
        "--enc-channels", "4", "--enc-hidden", "16", "--dec-channels", "4", "--latent-dim", "4", "--batch-size", "4"]
CLI = TINY + ["--log-every", "2", "--eval-every", "3", "--save-every", "3", "--eval-size", "8",
              "--data", "shapes-binary"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models run fastest on one thread, and far slower with two on a busy 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def model_and_args(*extra):
    args = monet.parse_args(TINY + list(extra))
    torch.manual_seed(0)
    return monet.build_model(args), args


def images(n=4, res=16):
    return data.make_dataset("shapes", "train", res).get_batch(list(range(n)))["image"]


def run_cli(tmp_path, *extra, env=None):
    cmd = [sys.executable, str(ROOT / "monet.py"), *CLI, "--out-dir", str(tmp_path), *extra]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=240,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


@pytest.mark.parametrize("res,blocks", [(16, 3), (20, 3)])  # 20 px: odd sizes on the way down (20, 10, 5)
def test_shapes_and_masks_sum_to_one(res, blocks):
    model, args = model_and_args("--resolution", str(res))
    assert args.unet_blocks == blocks and len(model.attention.down) == blocks
    out = model(images(2, res))
    assert out["recon"].shape == (2, 3, res, res)
    assert out["means"].shape == (2, 3, 3, res, res)
    for key in ("masks", "log_masks", "mask_logits"):
        assert out[key].shape == (2, 3, res, res), key
    assert out["att_logits"].shape == (2, 2, res, res)  # K-1 attention steps
    assert out["mu"].shape == out["logvar"].shape == (2, 3, 4)
    torch.testing.assert_close(out["masks"].sum(1), torch.ones(2, res, res))
    torch.testing.assert_close(out["recon"], (out["masks"].unsqueeze(2) * out["means"]).sum(1))


@pytest.mark.parametrize("k", [1, 2, 3, 5, 7])
def test_log_space_recursion_equals_direct_product_form(k):
    model, args = model_and_args("--num-slots", str(k))
    model.eval()
    out = model(images(2))
    alpha = torch.sigmoid(out["att_logits"].double())  # (B, K-1, H, W)
    assert alpha.shape == (2, k - 1, 16, 16)
    scope = torch.ones(2, 16, 16, dtype=torch.float64)
    direct = []
    for j in range(k - 1):  # m_j = alpha_j prod_{i<j} (1 - alpha_i)
        direct.append(scope * alpha[:, j])
        scope = scope * (1 - alpha[:, j])
    direct = torch.stack(direct + [scope], 1)  # (B, K, H, W); the last slot keeps the remaining scope
    torch.testing.assert_close(out["masks"].double(), direct, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(out["masks"][:, -1].double(), torch.prod(1 - alpha, dim=1), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(out["masks"].sum(1), torch.ones(2, 16, 16))
    assert torch.isfinite(out["log_masks"]).all()
    # the background slot (sigma_bg) is slot 0, the first attention step's alpha_0: baudm, addtt
    if k > 1:
        torch.testing.assert_close(out["masks"][:, 0].double(), alpha[:, 0], atol=1e-6, rtol=1e-5)
    assert monet.slot_sigmas(k, args).tolist() == pytest.approx([args.sigma_bg] + [args.sigma_fg] * (k - 1))


def test_masks_sum_to_one_under_bf16_autocast():
    model, _ = model_and_args("--num-slots", "6")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(images(2))
    assert out["log_masks"].dtype == torch.float32
    assert (out["masks"].sum(1) - 1).abs().max() < 1e-5


def test_broadcast_first_conv_equals_the_plain_broadcast():
    for n, latent, side, c_out in [(3, 4, 12, 5), (2, 16, 43, 32), (1, 7, 9, 1)]:
        conv = torch.nn.Conv2d(latent + 2, c_out, 3).double()
        z = small(n, latent, seed=side).requires_grad_()
        coords = monet.coordinate_grid(side, side).double()
        tiled = torch.cat([z[:, :, None, None].expand(-1, -1, side, side), coords.expand(n, -1, -1, -1)], 1)
        plain, fast = F.conv2d(tiled, conv.weight, conv.bias), monet.broadcast_first_conv(z, coords, conv)
        assert fast.shape == plain.shape == (n, c_out, side - 2, side - 2)
        torch.testing.assert_close(fast, plain)
        up = small(*plain.shape, seed=1)  # a random upstream gradient
        params = [z, conv.weight, conv.bias]
        for g_fast, g_plain in zip(torch.autograd.grad((fast * up).sum(), params),
                                   torch.autograd.grad((plain * up).sum(), params)):
            torch.testing.assert_close(g_fast, g_plain)


def test_conv3x3_of_upsampled_equals_upsample_then_conv():
    for b, c_in, c_out, h, w in [(2, 3, 4, 4, 4), (1, 5, 2, 5, 7), (3, 2, 6, 1, 3)]:
        x = small(b, c_in, h, w, seed=h).requires_grad_()
        weight = small(c_out, c_in, 3, 3, seed=w).requires_grad_()
        plain = F.conv2d(F.interpolate(x, scale_factor=2, mode="nearest"), weight, padding=1)
        fast = monet.conv3x3_of_upsampled(x, weight)
        assert fast.shape == plain.shape == (b, c_out, 2 * h, 2 * w)
        torch.testing.assert_close(fast, plain)
        up = small(*plain.shape, seed=2)
        for g_fast, g_plain in zip(torch.autograd.grad((fast * up).sum(), [x, weight]),
                                   torch.autograd.grad((plain * up).sum(), [x, weight])):
            torch.testing.assert_close(g_fast, g_plain)


@pytest.mark.parametrize("flag,res", [("--plain", 16), ("--plain-decoder", 18)])  # 18 px: 4 -> 9 is not 2x
def test_plain_flag_gives_the_same_values_and_gradients(flag, res):
    fast, _ = model_and_args("--resolution", str(res))
    plain, args = model_and_args(flag, "--resolution", str(res))
    assert args.plain and plain.vae.plain and plain.attention.plain and not fast.vae.plain
    plain.load_state_dict(fast.state_dict())
    fast.eval(), plain.eval()  # posterior means: no sampling
    x = images(2, res)
    a, b = fast(x), plain(x)
    for key in ("masks", "means", "mask_logits", "recon"):
        torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=1e-5)
    grads = [torch.autograd.grad(monet.compute_loss(out, x, args)["loss"], list(m.parameters()))
             for out, m in ((a, fast), (b, plain))]
    for (name, _), g_fast, g_plain in zip(fast.named_parameters(), *grads):
        torch.testing.assert_close(g_fast, g_plain, atol=1e-3, rtol=1e-3, msg=name)


VARIANTS = {  # name: (flags, terms logged)
    "nll": ([], {"nll", "kl", "mask_kl", "loss"}),
    "ir": (["--loss", "ir"], {"ir", "kl", "mask_kl", "loss"}),
    "composite": (["--loss", "composite"], {"composite", "kl", "mask_kl", "loss"}),
    "beta0": (["--beta", "0"], {"nll", "mask_kl", "loss"}),
    "gamma0": (["--gamma", "0"], {"nll", "kl", "loss"}),
}


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_parameter_gets_a_gradient(variant):
    flags, expected = VARIANTS[variant]
    model, args = model_and_args(*flags)
    x = images()
    terms = monet.compute_loss(model(x), x, args)
    assert set(terms) == expected
    terms["loss"].backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_weights_enter_the_total():
    model, args = model_and_args("--beta", "0.3", "--gamma", "0.7")
    x = images()
    t = monet.compute_loss(model(x), x, args)
    torch.testing.assert_close(t["loss"], t["nll"] + 0.3 * t["kl"] + 0.7 * t["mask_kl"])


@pytest.mark.parametrize("flag,term,fn", [("--beta", "kl", "kl_diag_gaussian"), ("--gamma", "mask_kl", "mask_kl")])
def test_zero_weight_removes_the_term_and_its_gradient(monkeypatch, flag, term, fn):
    x = images()
    model, args = model_and_args()
    torch.manual_seed(1)
    full = monet.compute_loss(model(x), x, args)
    kept = full["loss"] - 0.5 * full[term]  # the same objective without the ablated term
    ref = torch.autograd.grad(kept, list(model.parameters()), allow_unused=True)

    def forbidden(*a, **k):
        raise AssertionError(f"{fn} computed although {flag} is 0")

    monkeypatch.setattr(losses, fn, forbidden)
    args0 = monet.parse_args(TINY + [flag, "0"])
    torch.manual_seed(1)  # the same latent noise as above
    ablated = monet.compute_loss(model(x), x, args0)
    assert term not in ablated
    got = torch.autograd.grad(ablated["loss"], list(model.parameters()), allow_unused=True)
    for (name, _), g, r in zip(model.named_parameters(), got, ref):
        if r is None:
            assert g is None or not g.abs().sum(), name
        else:
            torch.testing.assert_close(g, r, atol=1e-4, rtol=1e-4, msg=name)


def small(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_objective_terms_match_direct_formulas():
    b, k, h, w = 2, 3, 2, 3
    x, means = small(b, 3, h, w, seed=1).sigmoid(), small(b, k, 3, h, w, seed=2).sigmoid()
    log_m = F.log_softmax(small(b, k, h, w, seed=3), dim=1)
    logits = small(b, k, h, w, seed=4)
    args = monet.parse_args(["--sigma-bg", "0.09", "--sigma-fg", "0.11"])
    sigma = monet.slot_sigmas(k, args).double()
    assert sigma.tolist() == pytest.approx([0.09, 0.11, 0.11])
    # mixture NLL: -sum_pix log sum_k m_k prod_c N(x_c; mu_kc, sigma_k^2), term by term
    nll = torch.zeros(b, dtype=torch.float64)
    for i in range(b):
        for y in range(h):
            for z in range(w):
                p = sum(log_m[i, j, y, z].exp() * torch.distributions.Normal(means[i, j, :, y, z], sigma[j])
                        .log_prob(x[i, :, y, z]).sum().exp() for j in range(k))
                nll[i] -= torch.log(p)
    out = dict(means=means, log_masks=log_m, mask_logits=logits, mu=small(b, k, 4, seed=5),
               logvar=small(b, k, 4, seed=6))
    terms = monet.compute_loss(out, x.float(), args)  # compute_loss works in float32, the reference in float64
    close = lambda got, ref: torch.testing.assert_close(got, ref.float(), rtol=1e-5, atol=1e-4)
    close(terms["nll"], nll.mean())
    # mask KL: sum_k sum_pix m_k log(m_k / softmax_k(l))
    m, q = log_m.exp(), logits.softmax(1)
    close(terms["mask_kl"], (m * (m / q).log()).sum((1, 2, 3)).mean())
    # VAE KL: 1/2 sum (mu^2 + var - 1 - log var)
    mu, lv = out["mu"], out["logvar"]
    close(terms["kl"], (0.5 * (mu ** 2 + lv.exp() - 1 - lv)).sum((1, 2)).mean())
    # IR: sum_pix sum_k m_k (-log prod_c N(x_c; mu_kc, sigma_k^2)), normaliser included
    args.loss = "ir"
    log_n = torch.distributions.Normal(means, sigma.view(1, k, 1, 1, 1)).log_prob(x[:, None]).sum(2)  # (B, K, H, W)
    close(monet.compute_loss(out, x.float(), args)["ir"], -(m * log_n).sum((1, 2, 3)).mean())
    # composite: -sum_pix log prod_c N(x_c; sum_k m_k mu_kc, sigma_fg^2)
    args.loss = "composite"
    recon = torch.einsum("bkhw,bkchw->bchw", m, means)
    composite = -torch.distributions.Normal(recon, 0.11).log_prob(x).sum((1, 2, 3)).mean()
    close(monet.compute_loss(out, x.float(), args)["composite"], composite)
    # the scheduled mask weight is the one in the total
    terms = monet.compute_loss(out, x.float(), args, gamma=0.2)
    close(terms["loss"], (composite + 0.5 * terms["kl"].double() + 0.2 * terms["mask_kl"].double()).float())


def test_ir_loss_is_minimised_by_one_hot_masks_on_the_best_component():
    b, k, h, w = 2, 4, 5, 5
    x, means = small(b, 3, h, w, seed=7).sigmoid(), small(b, k, 3, h, w, seed=8).sigmoid()
    sigma = torch.tensor([0.09, 0.11, 0.11, 0.11], dtype=torch.float64)
    nll = ((x[:, None] - means) ** 2).sum(2) / (2 * sigma.view(1, k, 1, 1) ** 2) + 3 * sigma.log().view(1, k, 1, 1)
    best = nll.argmin(1)  # (B, H, W): the most likely component of each pixel
    one_hot = F.one_hot(best, k).permute(0, 3, 1, 2).double()
    floor = losses.ir_loss(x, means, one_hot.clamp_min(1e-300).log(), sigma)
    for seed in range(20):  # any soft mask does worse
        log_m = F.log_softmax(3 * small(b, k, h, w, seed=100 + seed), dim=1)
        assert (losses.ir_loss(x, means, log_m, sigma) > floor).all()
    logits = torch.zeros(b, k, h, w, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.Adam([logits], lr=0.1)
    for _ in range(300):  # descending the IR loss over the masks binarises them onto the best component
        opt.zero_grad()
        losses.ir_loss(x, means, F.log_softmax(logits, 1), sigma).sum().backward()
        opt.step()
    masks = logits.softmax(1)
    assert torch.equal(masks.argmax(1), best) and (masks.amax(1) > monet.BINARY_THRESHOLD).all()


def test_mask_diagnostics_known_values():
    k = 4
    one_hot = F.one_hot(torch.randint(0, k, (2, 3, 3)), k).permute(0, 3, 1, 2).float()
    uniform = torch.full((2, k, 3, 3), 1 / k)
    ent, binary = monet.mask_diagnostics(one_hot)
    assert torch.allclose(ent, torch.zeros(2), atol=1e-6) and torch.equal(binary, torch.ones(2))
    ent, binary = monet.mask_diagnostics(uniform)
    assert torch.allclose(ent, torch.full((2,), math.log(k))) and torch.equal(binary, torch.zeros(2))
    mixed = torch.cat([one_hot[:, :, :1], uniform[:, :, 1:]], dim=2)  # one row of 3 binarised
    ent, binary = monet.mask_diagnostics(mixed)
    torch.testing.assert_close(binary, torch.full((2,), 1 / 3))
    torch.testing.assert_close(ent.mean(), losses.pixel_entropy(mixed))
    above, at = torch.tensor([0.91, 0.09, 0, 0]), torch.tensor([0.9, 0.1, 0, 0])  # threshold: strictly above 0.9
    assert monet.mask_diagnostics(above.view(1, 4, 1, 1))[1].item() == 1.0
    assert monet.mask_diagnostics(at.view(1, 4, 1, 1))[1].item() == 0.0


@pytest.mark.parametrize("name,res,k,blocks", [
    ("shapes", 64, 7, 5), ("shapes-colored", 64, 6, 5), ("tetrominoes", 35, 4, 4),
    ("/d/clevr_with_masks.h5", 128, 7, 6), ("/d/objects_room_train.h5", 64, 7, 5)])
def test_paper_preset_per_dataset(name, res, k, blocks):
    args = monet.parse_args(["--data", name])
    assert (args.resolution, args.num_slots, args.unet_blocks) == (res, k, blocks)
    assert (args.batch_size, args.lr, args.steps, args.latent_dim) == (64, 1e-4, 1_000_000, 16)
    assert (args.beta, args.gamma, args.sigma_bg, args.sigma_fg, args.loss) == (0.5, 0.5, 0.09, 0.11, "nll")
    assert (args.enc_channels, args.enc_hidden, args.dec_channels, args.mlp_hidden) == (32, 256, 32, 128)
    assert (args.optimizer, args.gamma_warmup, args.warmup_steps, args.grad_clip) == ("rmsprop-tf", 0, 0, 0)
    assert args.decay_steps == 0  # constant learning rate
    assert args.unet_channels == [64, 128, 256, 512, 512, 512][:blocks]  # baudm's blueprint widths
    assert monet.parse_args(["--data", name, "--num-slots", "9"]).num_slots == 9  # flags win


def test_unet_widths_per_level():
    args = monet.parse_args(TINY + ["--resolution", "32", "--unet-blocks", "3", "--unet-channels", "4", "6", "8"])
    unet = monet.build_model(args).attention
    assert [b[0].weight.shape[:2] for b in unet.down] == [(4, 4), (6, 4), (8, 6)]  # (out, in): x + log scope first
    assert [b[0].weight.shape[:2] for b in unet.up] == [(6, 16), (4, 12), (4, 8)]  # deepest first: [h, skip] in
    assert unet.mlp[0].in_features == 8 * 8 * 8 and unet.head.in_channels == 4
    assert all(b[0].bias is None for b in [*unet.down, *unet.up])  # bias-free convs (appendix B.2)
    assert monet.parse_args(TINY + ["--unet-channels", "5"]).unet_channels == [5, 5, 5]
    with pytest.raises(SystemExit):
        monet.parse_args(TINY + ["--unet-channels", "4", "6"])


def test_tf_rmsprop_first_and_second_update_by_hand():
    """TF1 ApplyRMSProp: ms = 0.9 ms + 0.1 g^2 with ms_0 = 1; p -= lr g / sqrt(ms + 1e-10)."""
    p0 = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)
    g1, g2 = torch.tensor([0.3, -2.0, 0.0], dtype=torch.float64), torch.tensor([1.0, 0.5, -0.1], dtype=torch.float64)
    w = torch.nn.Parameter(p0.clone())
    opt = monet.build_optimizer([w], monet.parse_args(["--optimizer", "rmsprop-tf", "--lr", "0.01"]))
    assert isinstance(opt, monet.RMSpropTF)
    expected, ms = p0.clone(), torch.ones(3, dtype=torch.float64)
    for g in (g1, g2):
        w.grad = g.clone()
        opt.step()
        ms = 0.9 * ms + 0.1 * g * g
        expected = expected - 0.01 * g / torch.sqrt(ms + 1e-10)
        torch.testing.assert_close(w.detach(), expected, rtol=1e-12, atol=1e-15)
    # PyTorch's RMSprop moves every weight by about 10 lr on its first step; TF's by about lr g
    w_torch = torch.nn.Parameter(p0.clone())
    w_torch.grad = g1.clone()
    monet.build_optimizer([w_torch], monet.parse_args(["--optimizer", "rmsprop", "--lr", "0.01"])).step()
    assert (p0 - w_torch.detach())[:2].abs().tolist() == pytest.approx([0.1, 0.1], rel=1e-5)


@pytest.mark.parametrize("name,res,k", [("tetrominoes", 35, 4), ("shapes", 32, 7), ("shapes-binary", 32, 5)])
def test_tiny_preset_keeps_tetrominoes_native_and_shrinks_the_rest(name, res, k):
    args = monet.parse_args(["--preset", "tiny", "--data", name])
    assert (args.resolution, args.num_slots, args.steps, args.lr, args.batch_size) == (res, k, 4000, 6e-4, 16)
    assert (args.sigma_bg, args.sigma_fg, args.gamma_warmup, args.decay_steps) == (0.3, 0.36, 1000, 0)  # the sweep
    assert args.unet_blocks == monet.unet_blocks_for(res)
    assert monet.parse_args(["--preset", "tiny", "--data", name, "--resolution", "24"]).resolution == 24


def test_tiny_preset_defaults_to_tetrominoes():
    assert monet.parse_args(["--preset", "tiny"]).data == "tetrominoes"
    assert monet.parse_args([]).data == "shapes"


def test_overfits_one_batch():
    model, args = model_and_args("--unet-channels", "8", "--dec-channels", "8", "--latent-dim", "8")
    x = images(4)
    opt = torch.optim.RMSprop(model.parameters(), lr=2e-3)
    torch.manual_seed(0)
    first = None
    for _ in range(100):
        terms = monet.compute_loss(model(x), x, args)
        opt.zero_grad()
        terms["loss"].backward()
        opt.step()
        first = first if first is not None else terms["nll"].item()
    # the NLL of a 16x16 image starts in the thousands of nats; a model that fits it goes negative
    assert terms["nll"].item() < first - 0.5 * abs(first) and terms["nll"].item() < 0


@pytest.mark.slow
@pytest.mark.parametrize("variant", VARIANTS)
def test_cli_writes_run_files(tmp_path, variant):
    flags, terms = VARIANTS[variant]
    r = run_cli(tmp_path, *flags, "--steps", "6", "--run-name", "r")
    assert r.returncode == 0, r.stderr
    run = tmp_path / "r"
    args = json.loads((run / "args.json").read_text())
    assert args["steps"] == 6
    for flag, value in zip(flags[::2], flags[1::2]):
        key = flag[2:].replace("-", "_")
        assert args[key] == type(args[key])(value), key
    lines = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    train = [l for l in lines if l["split"] == "train"]
    evals = [l for l in lines if l["split"] == "eval"]
    assert [l["step"] for l in train] == [2, 4, 6] and [l["step"] for l in evals] == [3, 6]
    for l in train:
        assert terms <= set(l) and not ({"nll", "ir", "kl", "mask_kl"} - terms) & set(l)  # ablated: absent
        assert all(math.isfinite(l[key]) for key in [*terms, "lr", "gamma", "images_per_s"])
    ev = evals[-1]
    for key in ("ari", "fg_ari", "dec_ari", "dec_fg_ari"):  # adjusted for chance: slightly negative is possible
        assert -1 <= ev[key] <= 1, key
    for key in ("miou", "mbo", "dec_miou", "dec_mbo", "att_binary", "dec_binary"):
        assert 0 <= ev[key] <= 1, key
    for key in ("att_entropy", "dec_entropy"):
        assert 0 <= ev[key] <= math.log(3) + 1e-6, key
    assert all(math.isfinite(ev[key]) for key in ("nll", "kl", "mask_kl", "mse"))  # every variant, comparable
    ckpt = torch.load(run / "checkpoint.pt", weights_only=True)
    assert ckpt["step"] == 6 and ckpt["args"]["loss"] == args["loss"]
    assert sorted(p.name for p in (run / "samples").iterdir()) == ["step_0000003.png", "step_0000006.png"]
    # input, recon, attention argmax, decoded argmax, 3 slots; 16 px cells upscaled to 64, 2 px gutters
    assert Image.open(run / "samples" / "step_0000006.png").size == (7 * 66 + 2, 4 * 66 + 2)
    assert json.loads((run / "eval.json").read_text())["step"] == 6


def test_logged_lr_and_gamma_are_the_applied_ones(tmp_path, monkeypatch):
    applied_lr, applied_gamma = [], []
    real_build, real_loss = monet.build_optimizer, monet.compute_loss

    def build(params, args):
        opt = real_build(params, args)
        step = opt.step
        opt.step = lambda *a: (applied_lr.append(opt.param_groups[0]["lr"]), step(*a))[1]
        return opt

    def loss(*a):
        t = real_loss(*a)  # the weight that multiplies the mask KL in the total
        applied_gamma.append(((t["loss"] - t["nll"] - 0.5 * t["kl"]) / t["mask_kl"]).item())
        return t

    monkeypatch.setattr(monet, "build_optimizer", build)
    monkeypatch.setattr(monet, "compute_loss", loss)
    monet.main(CLI + ["--out-dir", str(tmp_path), "--run-name", "r", "--steps", "6", "--log-every", "1",
                      "--eval-every", "0", "--lr", "0.002", "--warmup-steps", "4", "--decay-steps", "3",
                      "--gamma-warmup", "4"])
    train = [json.loads(l) for l in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines() if '"train"' in l]
    assert [l["lr"] for l in train] == applied_lr  # the line of step s reports step s's update
    # update s (1-based) runs at step s - 1: the warm-up factor s / 4 times the halving 0.5^((s - 1) / 3)
    expected = [0.002 * min(1, s / 4) * 0.5 ** ((s - 1) / 3) for s in range(1, 7)]
    assert [l["lr"] for l in train] == pytest.approx(expected)
    assert [l["gamma"] for l in train] == pytest.approx(applied_gamma, abs=1e-4)
    assert [l["gamma"] for l in train] == pytest.approx([0.5 * min(1, s / 4) for s in range(6)])


def test_bf16_training_then_eval_only(tmp_path):
    monet.main(CLI + ["--out-dir", str(tmp_path), "--steps", "3", "--run-name", "r", "--dtype", "bf16"])
    train = [json.loads(l) for l in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines() if '"train"' in l]
    assert train and all(math.isfinite(l["loss"]) for l in train)
    ckpt = tmp_path / "r" / "checkpoint.pt"
    (tmp_path / "r" / "eval.json").unlink()
    monet.main(CLI + ["--out-dir", str(tmp_path), "--eval-only", str(ckpt), "--eval-size", "12",
                      "--unet-channels", "99"])  # architecture flags come from the checkpoint
    ev = json.loads((tmp_path / "r" / "eval.json").read_text())
    assert ev["step"] == 3 and -1 <= ev["fg_ari"] <= 1 and 0 <= ev["att_binary"] <= 1


@pytest.mark.parametrize("optimizer", ["rmsprop-tf", "adam"])
def test_resume_equals_uninterrupted(tmp_path, optimizer):
    common = CLI + ["--out-dir", str(tmp_path), "--eval-every", "0", "--log-every", "1", "--loss", "ir",
                    "--optimizer", optimizer]
    monet.main(common + ["--steps", "6", "--run-name", "full"])
    monet.main(common + ["--steps", "3", "--run-name", "part"])
    monet.main(common + ["--steps", "6", "--resume", str(tmp_path / "part" / "checkpoint.pt")])
    full = torch.load(tmp_path / "full" / "checkpoint.pt", weights_only=True)
    part = torch.load(tmp_path / "part" / "checkpoint.pt", weights_only=True)
    assert part["step"] == 6
    for k, v in full["model"].items():
        assert torch.equal(v, part["model"][k]), k
    for k, v in full["optimizer"]["state"].items():
        for name, t in v.items():
            assert torch.equal(torch.as_tensor(t), torch.as_tensor(part["optimizer"]["state"][k][name])), (k, name)

    def losses_of(run):
        lines = map(json.loads, (tmp_path / run / "metrics.jsonl").read_text().splitlines())
        return [l["loss"] for l in lines if l["split"] == "train"]

    assert len(losses_of("full")) == 6 and losses_of("full") == losses_of("part")


class Hostile:
    def __reduce__(self):
        return (os.system, (f"touch {MARKER}",))


MARKER = None


@pytest.mark.parametrize("flag", ["--eval-only", "--resume"])
def test_hostile_checkpoint_is_refused(tmp_path, capsys, flag):
    global MARKER
    MARKER = tmp_path / "pwned"
    bad = tmp_path / "evil" / "checkpoint.pt"
    bad.parent.mkdir()
    with open(bad, "wb") as f:
        pickle.dump({"model": Hostile()}, f)
    with pytest.raises(SystemExit) as e:
        monet.main(CLI + ["--out-dir", str(tmp_path), flag, str(bad)])
    assert e.value.code == 2 and not MARKER.exists()
    assert "refusing" in capsys.readouterr().err


@pytest.mark.parametrize("extra,needle", [
    (["--num-slots", "0"], "--num-slots must be positive"),
    (["--sigma-fg", "0"], "--sigma-fg must be positive"),
    (["--beta", "-1"], "--beta must be non-negative"),
    (["--decay-steps", "-1"], "--decay-steps must be non-negative"),
    (["--unet-blocks", "5"], "use at most 3"),
    (["--data", "/no/such/dataset.h5"], "no such file"),
    (["--resume", "/no/such/checkpoint.pt"], "checkpoint not found"),
])
def test_bad_input_is_a_clean_error(tmp_path, capsys, extra, needle):
    with pytest.raises(SystemExit) as e:
        monet.main(CLI + ["--out-dir", str(tmp_path), "--steps", "2", *extra])
    assert e.value.code == 2
    assert needle in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # nothing half-written


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch, capsys):
    real = monet.compute_loss
    calls = {"n": 0}

    def poisoned(*a):
        calls["n"] += 1
        terms = real(*a)
        if calls["n"] == 5:  # step 5 produces a NaN mask term
            terms["mask_kl"] = terms["mask_kl"] * float("nan")
            terms["loss"] = terms["loss"] + terms["mask_kl"]
        return terms

    monkeypatch.setattr(monet, "compute_loss", poisoned)
    with pytest.raises(SystemExit) as e:
        monet.main(CLI + ["--out-dir", str(tmp_path), "--run-name", "r", "--steps", "9", "--eval-every", "0",
                          "--save-every", "4", "--log-every", "100"])
    assert e.value.code == 2
    assert "non-finite loss term 'mask_kl' at step 5" in capsys.readouterr().err
    ckpt = torch.load(tmp_path / "r" / "checkpoint.pt", weights_only=True)
    assert ckpt["step"] == 4 and all(torch.isfinite(v).all() for v in ckpt["model"].values())


@pytest.mark.slow
def test_ablation_script_writes_a_table(tmp_path):
    out = tmp_path / "table.md"
    cmd = [sys.executable, str(ROOT / "scripts" / "monet_ablation.py"), "--seeds", "0", "1", "--steps", "2",
           "--out-dir", str(tmp_path / "runs"), "--results", str(out), "--data", "shapes-binary", "--extra", " ".join(
               TINY + ["--eval-size", "4", "--log-every", "1"])]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=240,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    table = out.read_text()
    rows = [l for l in table.splitlines() if l.startswith("| ") and "---" not in l]
    assert rows[0].startswith("| variant") and "att_binary" in rows[0] and "fg_ari" in rows[0]
    assert [r.split("|")[1].strip() for r in rows[1:]] == ["baseline", "beta=0", "gamma=0", "ir", "composite"]
    assert all(r.count("±") == 8 for r in rows[1:])  # 8 metrics, mean ± std over the 2 seeds
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == sorted(
        f"shapes-binary-tiny-{v}-2steps-seed{s}" for v in ("baseline", "beta0", "gamma0", "ir", "composite")
        for s in (0, 1))


def test_ablation_script_resumes_checks_step_and_flags(tmp_path, monkeypatch, capsys):
    sys.path.insert(0, str(ROOT / "scripts"))
    import monet_ablation
    extra = " ".join(TINY + ["--eval-size", "4", "--log-every", "1", "--save-every", "2"])
    argv = ["--seeds", "0", "--steps", "4", "--variants", "baseline", "--out-dir", str(tmp_path),
            "--results", str(tmp_path / "t.md"), "--data", "shapes-binary", "--extra", extra]
    run = tmp_path / "shapes-binary-tiny-baseline-4steps-seed0"
    real, calls = monet.compute_loss, {"n": 0}

    def interrupted(*a):
        calls["n"] += 1
        if calls["n"] == 3:  # during step 3, after the step-2 checkpoint
            raise KeyboardInterrupt
        return real(*a)

    monkeypatch.setattr(monet, "compute_loss", interrupted)
    with pytest.raises(SystemExit):
        monet_ablation.main(argv)
    assert torch.load(run / "checkpoint.pt", weights_only=True)["step"] == 2 and not (run / "eval.json").exists()
    monkeypatch.setattr(monet, "compute_loss", real)
    monet_ablation.main(argv)  # resumes the interrupted run
    assert "--resume" in capsys.readouterr().out
    lines = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert [l["step"] for l in lines if l["split"] == "train"] == [1, 2, 3, 4]
    assert json.loads((run / "eval.json").read_text())["step"] == 4
    (run / "eval.json").write_text(json.dumps({"step": 3}))  # a stale evaluation is not reused
    monet_ablation.main(argv)
    assert "--eval-only" in capsys.readouterr().out and json.loads((run / "eval.json").read_text())["step"] == 4
    monet_ablation.main(argv)  # finished: reused, nothing runs
    assert "python monet.py" not in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:  # the same folder name with other flags is refused
        monet_ablation.main(argv[:-1] + [extra + " --sigma-fg 0.2"])
    assert "other flags (sigma_fg)" in str(e.value.code)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_bf16_compile(tmp_path):
    r = run_cli(tmp_path, "--device", "cuda", "--dtype", "bf16", "--compile", "--steps", "6", "--run-name", "r")
    assert r.returncode == 0, r.stderr
    train = [json.loads(l) for l in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(l["loss"]) for l in train if l["split"] == "train")
