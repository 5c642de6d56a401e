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


def test_log_space_recursion_equals_direct_product_form():
    model, _ = model_and_args("--num-slots", "5")
    model.eval()
    out = model(images(2))
    alpha = torch.sigmoid(out["att_logits"].double())  # (B, K-1, H, W)
    scope = torch.ones_like(alpha[:, 0])
    direct = []
    for k in range(4):  # m_k = alpha_k prod_{j<k} (1 - alpha_j); the last slot keeps the remaining scope
        direct.append(scope * alpha[:, k])
        scope = scope * (1 - alpha[:, k])
    direct = torch.stack(direct + [scope], 1)  # (B, K, H, W)
    torch.testing.assert_close(out["masks"].double(), direct, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(out["masks"].sum(1), torch.ones(2, 16, 16))
    assert torch.isfinite(out["log_masks"]).all()


def test_log_masks_stay_finite_when_the_attention_saturates():
    model, _ = model_and_args()
    with torch.no_grad():
        model.attention.head.bias.fill_(200.0)  # alpha = 1: slot 0 takes everything, exp(log m) underflows
    out = model(images(2))
    assert torch.isfinite(out["log_masks"]).all() and torch.isfinite(out["recon"]).all()
    assert (out["masks"][:, 0] > 0.999).all()


def test_the_vae_runs_all_slots_in_one_batched_call():
    model, _ = model_and_args("--num-slots", "4")
    calls = []
    model.vae.encoder.register_forward_hook(lambda mod, inp, out: calls.append(inp[0].shape))
    model(images(2))
    assert calls == [(2 * 4, 4, 16, 16)]  # one call on (B*K, [x, log m_k], H, W)


def test_images_do_not_interact_within_a_batch():
    model, _ = model_and_args()
    model.eval()  # posterior means: the result is a function of the image alone
    x = images(3)
    together = model(x)
    alone = model(x[1:2])
    for key in ("masks", "recon", "mask_logits", "mu"):
        torch.testing.assert_close(together[key][1:2], alone[key], atol=1e-5, rtol=1e-4)


VARIANTS = {  # name: (flags, terms logged)
    "nll": ([], {"nll", "kl", "mask_kl", "loss"}),
    "ir": (["--loss", "ir"], {"ir", "kl", "mask_kl", "loss"}),
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
    args.loss = "ir"
    ir = (m * ((x[:, None] - means) ** 2).sum(2) / (2 * sigma.view(1, k, 1, 1) ** 2)).sum((1, 2, 3)).mean()
    close(monet.compute_loss(out, x.float(), args)["ir"], ir)


def test_ir_loss_is_minimised_by_one_hot_masks_on_the_best_component():
    b, k, h, w = 2, 4, 5, 5
    x, means = small(b, 3, h, w, seed=7).sigmoid(), small(b, k, 3, h, w, seed=8).sigmoid()
    sigma = torch.tensor([0.09, 0.11, 0.11, 0.11], dtype=torch.float64)
    err = ((x[:, None] - means) ** 2).sum(2) / (2 * sigma.view(1, k, 1, 1) ** 2)  # (B, K, H, W)
    best = err.argmin(1)  # (B, H, W)
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
    assert monet.parse_args(["--data", name, "--num-slots", "9"]).num_slots == 9  # flags win


@pytest.mark.parametrize("name,res,k", [("tetrominoes", 35, 4), ("shapes", 32, 7), ("shapes-binary", 32, 5)])
def test_tiny_preset_keeps_tetrominoes_native_and_shrinks_the_rest(name, res, k):
    args = monet.parse_args(["--preset", "tiny", "--data", name])
    assert (args.resolution, args.num_slots, args.steps, args.lr, args.batch_size) == (res, k, 3000, 3e-4, 16)
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
        assert all(math.isfinite(l[key]) for key in [*terms, "lr", "images_per_s"])
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


def test_resume_equals_uninterrupted(tmp_path):
    common = CLI + ["--out-dir", str(tmp_path), "--eval-every", "0", "--log-every", "1", "--loss", "ir"]
    monet.main(common + ["--steps", "6", "--run-name", "full"])
    monet.main(common + ["--steps", "3", "--run-name", "part"])
    monet.main(common + ["--steps", "6", "--resume", str(tmp_path / "part" / "checkpoint.pt")])
    full = torch.load(tmp_path / "full" / "checkpoint.pt", weights_only=True)
    part = torch.load(tmp_path / "part" / "checkpoint.pt", weights_only=True)
    assert part["step"] == 6
    for k, v in full["model"].items():
        assert torch.equal(v, part["model"][k]), k
    for k, v in full["optimizer"]["state"].items():
        assert torch.equal(v["square_avg"], part["optimizer"]["state"][k]["square_avg"]), k

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


def test_bad_input_from_the_shell_is_one_line_without_traceback(tmp_path):
    r = run_cli(tmp_path, "--steps", "2", "--data", str(tmp_path / "missing.h5"))
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0
    assert r.stderr.startswith("error: ") and "missing.h5" in r.stderr and "Traceback" not in r.stderr


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch, capsys):
    real = monet.compute_loss
    calls = {"n": 0}

    def poisoned(out, image, args):
        calls["n"] += 1
        terms = real(out, image, args)
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
    assert [r.split("|")[1].strip() for r in rows[1:]] == ["baseline", "beta=0", "gamma=0", "ir"]
    assert all(r.count("±") == 8 for r in rows[1:])  # 8 metrics, mean ± std over the 2 seeds
    assert len(list((tmp_path / "runs").iterdir())) == 8  # 4 variants x 2 seeds


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_bf16_compile(tmp_path):
    r = run_cli(tmp_path, "--device", "cuda", "--dtype", "bf16", "--compile", "--steps", "6", "--run-name", "r")
    assert r.returncode == 0, r.stderr
    train = [json.loads(l) for l in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(l["loss"]) for l in train if l["split"] == "train")
