"""Object-centric MAE ViT: masking, schedules, shapes, gradients, overfitting, the CLI with the
ablation flags, resume, DDP, bad input, and the ablation script."""
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
import vit_mae_ocl as vm  # noqa: E402

# A model small enough that a CPU step takes milliseconds: 16 px, patch 4 -> 16 patches.
TINY = ["--preset", "tiny", "--resolution", "16", "--patch-size", "4", "--num-slots", "3", "--enc-dim", "16",
        "--enc-heads", "2", "--dec-dim", "16", "--dec-heads", "2", "--enc-depth", "2", "--dec-depth", "1",
        "--batch-size", "4", "--mask-ratio", "0.5"]
CLI = TINY + ["--log-every", "2", "--eval-every", "3", "--save-every", "3", "--eval-size", "8", "--test-size", "8",
              "--warmup-steps", "2", "--cooldown-steps", "1", "--data", "shapes-binary"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These models are tiny: one intra-op thread is fastest, and on a shared 2-core machine a second
    thread spin-waits for a busy core (50x slower steps). Restored after this module."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def model_and_args(*extra):
    args = vm.parse_args(TINY + list(extra))
    torch.manual_seed(0)
    return vm.build_model(args), args


def images(n=4, res=16):
    return data.make_dataset("shapes", "train", res).get_batch(list(range(n)))["image"]


def run_cli(tmp_path, *extra, env=None):
    cmd = [sys.executable, str(ROOT / "vit_mae_ocl.py"), *CLI, "--out-dir", str(tmp_path), *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=240, env=env)


def run_main(tmp_path, *extra):
    """The CLI in this process (no interpreter start-up): returns the exit code, 0 on success."""
    try:
        vm.main([*CLI, "--out-dir", str(tmp_path), *extra])
    except SystemExit as e:
        return e.code
    return 0


@pytest.mark.parametrize("n,ratio,kept", [(16, 0.5, 8), (49, 0.75, 12), (64, 0.5, 32), (16, 0.0, 16), (10, 0.33, 6)])
def test_masking_keeps_exact_count_of_distinct_patches(n, ratio, kept):
    assert vm.num_kept(n, ratio) == kept  # int(n * (1 - ratio)), rounded down as the authors' code
    torch.manual_seed(0)
    perm = vm.random_masking(n, ratio, 6, "cpu")  # (B, n): visible patches first
    assert torch.equal(perm.sort(dim=1).values, torch.arange(n).expand(6, n))  # a permutation per image
    assert not torch.equal(perm[0, :kept], perm[1, :kept])  # a different draw per image


def ref_block(blk, x):
    """A pre-norm ViT block written out: softmax(q k^T / sqrt(d)) v per head (q, k, v: the rows of the qkv
    weight in that order, heads as consecutive slices), projection, residual, MLP, residual."""
    b, n, dim = x.shape
    q, k, v = (F.linear(blk.norm1(x), w, bb).view(b, n, blk.heads, -1).transpose(1, 2)
               for w, bb in zip(blk.qkv.weight.chunk(3), blk.qkv.bias.chunk(3)))
    att = (q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])).softmax(dim=-1)
    x = x + blk.proj((att @ v).transpose(1, 2).reshape(b, n, dim))
    return x + blk.mlp(blk.norm2(x))


def reference_forward(model, image, ratio):
    """The authors' forward (objectViTAE model.py, after MAE) transcribed with plain ops on the model's
    weights: shuffle, keep the first int(N (1 - ratio)), prepend the class tokens, encode; object function;
    Linear on the concatenation [slot repeated over the visible patches, log a]; mask tokens appended and
    the whole (B*K, N, Dd) sequence unshuffled by a gather (MAE); decoder in raster order; head read as
    (RGB + alpha) x p x p per patch (this file's channel-major layout); alpha softmaxed over slots."""
    B, K, P, G = image.shape[0], model.num_slots, model.p, model.grid
    N = G * G
    x = model.patch_embed(image * 2 - 1).flatten(2).transpose(1, 2) + model.enc_pos  # (B, N, D)
    shuffle = torch.rand(B, N).argsort(dim=1)
    restore, nv = shuffle.argsort(dim=1), int(N * (1 - ratio))
    x = torch.gather(x, 1, shuffle[:, :nv, None].expand(-1, -1, x.shape[-1]))
    x = torch.cat([model.class_tokens.expand(B, -1, -1), x], dim=1)
    for blk in model.encoder:
        x = ref_block(blk, x)
    x = model.enc_norm(x)
    c, z = x[:, :K], x[:, K:]
    log_a = (torch.bmm(z, c.transpose(1, 2)) / math.sqrt(z.shape[-1])).log_softmax(dim=-1)  # (B, Nv, K)
    a = log_a.exp()
    slots = torch.bmm((a / (a.sum(dim=1, keepdim=True) + 1e-8)).transpose(1, 2), z)  # (B, K, D)
    y = torch.cat([slots.reshape(B * K, 1, -1).repeat(1, nv, 1), log_a.transpose(1, 2).reshape(B * K, nv, 1)], -1)
    y = torch.cat([model.decoder_embed(y), model.mask_token.repeat(B * K, N - nv, 1)], dim=1)
    y = torch.gather(y, 1, restore.repeat_interleave(K, 0)[..., None].expand(-1, -1, y.shape[-1])) + model.dec_pos
    for blk in model.decoder:
        y = ref_block(blk, y)
    y = model.head(model.dec_norm(y)).reshape(B, K, G, G, 4, P, P).permute(0, 1, 4, 2, 5, 3, 6)
    y = y.reshape(B, K, 4, G * P, G * P)
    masks = y[:, :, 3].softmax(dim=1)
    return (masks[:, :, None] * y[:, :, :3]).sum(dim=1), masks, slots


@pytest.mark.parametrize("ratio", [0.0, 0.5, 0.75])
def test_forward_and_gradients_equal_the_authors_computation(ratio):
    """Every shortcut of the forward (tokens kept in the encoder's order, the masked rows' first LayerNorm
    and qkv shared by the slots, W_s s + w_a log a for the concatenation, chunked qkv, in-place residuals,
    the split head, the mixture per patch) against the plain computation: values and parameter gradients."""
    model, _ = model_and_args("--num-slots", "4")
    x = images(3)
    weights = [torch.randn(3, 3, 16, 16), torch.randn(3, 4, 16, 16), torch.randn(3, 4, 16)]
    grads = []
    for forward in (lambda: reference_forward(model, x, ratio),
                    lambda: (lambda o: (o["recon"], o["masks"], o["slots"]))(model(x, mask_ratio=ratio))):
        model.zero_grad()
        torch.manual_seed(7)  # the same shuffle
        outs = forward()
        sum((o * w).sum() for o, w in zip(outs, weights)).backward()
        grads.append(({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, outs))
    (ref, ref_out), (got, got_out) = grads
    for r, g in zip(ref_out, got_out):
        torch.testing.assert_close(g, r, atol=2e-5, rtol=1e-4)
    assert set(got) == set(ref) and bool(ref["mask_token"].any()) == (ratio > 0)
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], atol=2e-4, rtol=1e-3, msg=name)


@pytest.mark.parametrize("ratio", [0.0, 0.5])
def test_decoder_input_is_slot_embedding_at_visible_patches_and_mask_token_elsewhere(ratio):
    """Sec. 3.1 written out token by token: the first decoder block sees, for every slot, the linear
    embedding of the concatenation [s_k, log a_ik] (+ position of patch i) for each visible patch i, in the
    encoder's order, then the mask token (+ position) once at each masked patch; its precomputed qkv
    projection equals the block's own on that input."""
    model, _ = model_and_args()
    seen = {}
    model.decoder[0].register_forward_pre_hook(lambda m, a: seen.update(y=a[0], qkv=a[1]))
    out = model(images(2), mask_ratio=ratio)
    y = seen["y"].view(2, 3, 16, -1)  # (B, K, N, Dd)
    torch.testing.assert_close(seen["qkv"], model.decoder[0].qkv(model.decoder[0].norm1(seen["y"])),
                               atol=1e-5, rtol=1e-5)
    log_a, keep, nv = out["attn"].log(), out["ids_keep"], out["ids_keep"].shape[1]
    for b in range(2):
        masked = sorted(set(range(16)) - set(keep[b].tolist()))
        for k in range(3):
            for j, i in enumerate(keep[b].tolist()):
                want = model.decoder_embed(torch.cat([out["slots"][b, k], log_a[b, j, k, None]])) + model.dec_pos[0, i]
                torch.testing.assert_close(y[b, k, j], want, atol=1e-5, rtol=1e-5)
            gaps = torch.cdist(y[b, k, nv:], (model.mask_token + model.dec_pos)[0])  # (N - Nv, N)
            assert sorted(gaps.argmin(dim=1).tolist()) == masked and (gaps.min(dim=1).values < 1e-5).all()


def test_sincos_position_embedding():
    pe = vm.sincos_2d(8, 3)  # (9, 8): [sin y, cos y, sin x, cos x] with 2 frequencies each
    assert pe.shape == (9, 8)
    torch.testing.assert_close(pe[4], torch.tensor([math.sin(1), math.sin(1e-2), math.cos(1), math.cos(1e-2),
                                                    math.sin(1), math.sin(1e-2), math.cos(1), math.cos(1e-2)]))
    torch.testing.assert_close(pe[0, 4:], pe[3, 4:])  # same column, same x half


def timm_cosine_lr(t, lr, min_lr, warmup_t, t_initial):
    """timm 0.5.4 CosineLRScheduler._get_lr, one cycle, no warmup_prefix, transcribed (t: a step here)."""
    if t < warmup_t:
        return min_lr + t * (lr - min_lr) / warmup_t
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * t / t_initial)) if t < t_initial else min_lr


def authors_scheduler(epoch, warmup, epochs, init, final):
    """objectViTAE utils.py Scheduler.step(epoch) for a weight (or, final 0, the mask ratio), transcribed."""
    if epoch <= warmup:
        return init
    return init + min(1.0, (epoch - warmup) / (epochs - warmup)) * (final - init)


def test_schedules_known_values():
    # 10 warm-up + 80 cosine + 11 cool-down steps; one step per "epoch"
    args = vm.parse_args(["--steps", "101", "--warmup-steps", "10", "--cooldown-steps", "11", "--lr", "5e-4",
                          "--min-lr", "1e-5", "--mask-ratio", "0.75"])
    for s in range(101):
        assert vm.lr_at(s, args) == pytest.approx(timm_cosine_lr(s, 5e-4, 1e-5, 10, 90), rel=1e-12), s
        assert vm.mask_ratio_at(s, args) == pytest.approx(authors_scheduler(s, 10, 90, 0.75, 0.0), abs=1e-12), s
        w = vm.entropy_weights_at(s, args)
        assert w == pytest.approx((authors_scheduler(s, 10, 90, 1e-4, 3e-3), authors_scheduler(s, 10, 90, 1e-4, 1e-2)))
    assert vm.lr_at(45, args) == pytest.approx(1e-5 + 4.9e-4 / 2)  # half-way through t_initial = 90
    assert vm.mask_ratio_at(50, args) == pytest.approx(0.375)
    # the cool-down (steps 90-100) holds the final values: the model trains at mask ratio 0 for 11 steps
    final = vm.schedules_at(100, args)
    assert (final["mask_ratio"], final["w_pixel_entropy"], final["w_object_entropy"]) == (0.0, 3e-3, 1e-2)
    assert all(vm.schedules_at(s, args) == final for s in range(90, 101)) and vm.schedules_at(89, args) != final
    assert final["lr"] == 1e-5 and final["token_noise"] == 0.0
    short = vm.parse_args(["--steps", "20", "--warmup-steps", "10", "--cooldown-steps", "15", "--lr", "5e-4",
                           "--min-lr", "1e-5"])  # shorter than warm-up + cool-down: warm-up, then min_lr
    assert vm.lr_at(5, short) == pytest.approx(1e-5 + 0.5 * 4.9e-4) and vm.lr_at(10, short) == 1e-5
    # the ablations switch a term off for the whole run
    off = vm.parse_args(["--steps", "101", "--warmup-steps", "10", "--cooldown-steps", "1", "--pixel-entropy", "0"])
    assert [vm.entropy_weights_at(s, off)[0] for s in (0, 55, 100)] == [0.0, 0.0, 0.0]
    assert vm.entropy_weights_at(100, off)[1] == pytest.approx(1e-2)


def test_schedule_in_steps_from_the_training_set_size():
    args = vm.parse_args(["--data", "/d/clevrtex_full"])  # paper preset: 10 + 290 epochs, 30 of cool-down
    assert (args.epochs, args.warmup_epochs, args.cooldown_epochs, args.steps) == (300, 10, 30, None)
    vm.schedule_in_steps(args, 40_000)  # ClevrTex's training split (80% of 50,000): 312 steps an epoch
    assert (args.steps, args.warmup_steps, args.cooldown_steps) == (330 * 312, 10 * 312, 30 * 312)
    two = vm.parse_args(["--data", "/d/clevr_with_masks.h5", "--batch-size", "64"])
    vm.schedule_in_steps(two, 50_000, world=2)  # each of 2 processes: 25,000 images, batches of 64
    assert (two.steps, two.warmup_steps) == (330 * 390, 10 * 390)
    bench = vm.parse_args(["--steps", "6"])  # explicit steps win; warm-up and cool-down stay in epochs
    vm.schedule_in_steps(bench, 60_000)
    assert (bench.steps, bench.warmup_steps, bench.cooldown_steps) == (6, 10 * 468, 30 * 468)
    paper = vm.parse_args([])  # built-in data: the paper preset generates 60,000 training images
    assert len(vm.make_train_set(paper)) == 60_000


def test_cli_counts_epochs_of_its_training_set(tmp_path):
    vm.main(TINY + ["--data", "shapes-binary", "--out-dir", str(tmp_path), "--run-name", "r", "--train-size", "24",
                    "--epochs", "2", "--warmup-epochs", "1", "--cooldown-epochs", "1", "--eval-every", "0",
                    "--test-size", "8"])  # the tiny preset's steps give way to the epochs on the command line
    args = json.loads((tmp_path / "r" / "args.json").read_text())  # 24 images // batch 4 = 6 steps an epoch
    assert (args["steps"], args["warmup_steps"], args["cooldown_steps"]) == (18, 6, 6)
    assert torch.load(tmp_path / "r" / "checkpoint.pt", weights_only=True)["step"] == 18


def test_shapes_alpha_sums_to_one():
    model, args = model_and_args()
    out = model(images(2), mask_ratio=0.5)
    assert out["recon"].shape == (2, 3, 16, 16)
    assert out["rgb"].shape == (2, 3, 3, 16, 16)
    assert out["masks"].shape == (2, 3, 16, 16)
    assert out["slots"].shape == (2, 3, 16)
    assert out["attn"].shape == (2, 8, 3)  # bottleneck attention over the 8 visible patches
    torch.testing.assert_close(out["masks"].sum(1), torch.ones(2, 16, 16))
    torch.testing.assert_close(out["attn"].sum(2), torch.ones(2, 8))
    attn = vm.attention_masks(model(images(2)), 4, 4)  # evaluation: ratio 0
    assert attn.shape == (2, 3, 16, 16)
    torch.testing.assert_close(attn.sum(1), torch.ones(2, 16, 16))  # ratio 0: every patch attended


def test_slots_are_normalised_weighted_means():
    model, _ = model_and_args()
    x = images(2)
    feats = {}
    model.enc_norm.register_forward_hook(lambda m, i, o: feats.setdefault("z", o))
    out = model(x)
    z = feats["z"][:, 3:]  # (B, N, D) patch tokens after the class tokens
    w = out["attn"] / (out["attn"].sum(1, keepdim=True) + 1e-8)
    torch.testing.assert_close(out["slots"], torch.einsum("bvk,bvd->bkd", w, z))


def test_ratio_zero_uses_no_mask_token():
    model, _ = model_and_args()
    x = images(2)
    torch.manual_seed(1)
    a = model(x, mask_ratio=0.0)
    a["recon"].sum().backward()
    assert model.mask_token.grad is None or not model.mask_token.grad.any()
    with torch.no_grad():
        model.mask_token.add_(10.0)
    torch.manual_seed(1)
    torch.testing.assert_close(model(x, mask_ratio=0.0)["recon"], a["recon"])
    torch.manual_seed(1)
    assert not torch.allclose(model(x, mask_ratio=0.5)["recon"], model.eval()(x, mask_ratio=0.0)["recon"])


def test_evaluation_does_not_depend_on_the_shuffle():
    model, _ = model_and_args()
    x = images(2)
    torch.manual_seed(1)
    a = model(x)["recon"]
    torch.manual_seed(2)
    torch.testing.assert_close(model(x)["recon"], a, atol=1e-5, rtol=1e-4)  # ratio 0: only the order differs


def test_mse_term_is_on_the_papers_range():
    """Eq. 7's reconstruction term compares with the image in [-1, 1] (the authors' data code), per pixel and channel."""
    model, args = model_and_args()
    x = images()
    out = model(x, mask_ratio=0.5, token_noise=0.0)
    mse = vm.compute_loss(out, x, 0.0, 0.0)["mse"]
    torch.testing.assert_close(mse, ((out["recon"] - (x * 2 - 1)) ** 2).mean())
    assert not torch.allclose(mse, ((out["recon"] - x) ** 2).mean())


@pytest.mark.parametrize("flags", [[], ["--pixel-entropy", "0"], ["--object-entropy", "0"],
                                   ["--pixel-entropy", "0", "--object-entropy", "0"]])
def test_every_parameter_gets_a_gradient(flags):
    model, args = model_and_args(*flags)
    x = images()
    w_pix, w_obj = vm.entropy_weights_at(0, args)
    terms = vm.compute_loss(model(x, mask_ratio=0.5, token_noise=0.1), x, w_pix, w_obj)
    terms["loss"].backward()
    assert set(terms) == {"mse", "pixel_entropy", "object_entropy", "loss"}
    torch.testing.assert_close(terms["loss"], terms["mse"] + w_pix * terms["pixel_entropy"]
                               + w_obj * terms["object_entropy"])
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name  # class tokens, mask token and the log-a embedding included


def test_slot_permutation_equivariance():
    model, _ = model_and_args()
    x = images(2)
    perm = torch.tensor([2, 0, 1])
    torch.manual_seed(3)
    a = model(x, mask_ratio=0.5)
    with torch.no_grad():
        model.class_tokens.copy_(model.class_tokens[:, perm])
    torch.manual_seed(3)
    b = model(x, mask_ratio=0.5)
    torch.testing.assert_close(b["slots"], a["slots"][:, perm], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(b["masks"], a["masks"][:, perm], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(b["recon"], a["recon"], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name,res,patch,k,ratio,enc,dec", [
    ("tetrominoes", 35, 5, 4, 0.75, (192, 4), (128, 4)), ("shapes", 64, 8, 6, 0.5, (384, 8), (256, 8)),
    ("/d/clevr_with_masks.h5", 128, 16, 7, 0.75, (768, 16), (512, 16)),
    ("/d/clevrtex_full", 128, 16, 11, 0.75, (768, 16), (512, 16))])
def test_paper_preset_per_dataset(name, res, patch, k, ratio, enc, dec):
    a = vm.parse_args(["--data", name])
    assert (a.resolution, a.patch_size, a.num_slots, a.mask_ratio) == (res, patch, k, ratio)
    assert (a.enc_dim, a.enc_heads, a.dec_dim, a.dec_heads, a.enc_depth, a.dec_depth) == (*enc, *dec, 4, 2)
    assert (a.batch_size, a.lr, a.min_lr, a.weight_decay, a.mlp_ratio) == (128, 5e-4, 1e-5, 0.05, 2.0)
    assert (a.epochs, a.warmup_epochs, a.cooldown_epochs, a.eval_size, a.test_size) == (300, 10, 30, 320, None)
    assert (a.pixel_entropy, a.object_entropy, a.pixel_entropy_init, a.object_entropy_init) == (3e-3, 1e-2, 1e-4, 1e-4)
    assert vm.parse_args(["--data", name, "--num-slots", "9"]).num_slots == 9  # flags win


def test_tiny_preset_defaults():
    a = vm.parse_args(["--preset", "tiny"])  # the quick-start: Tetrominoes at its native size, one spare slot
    assert (a.data, a.resolution, a.patch_size, a.num_slots) == ("tetrominoes", 35, 5, 5)
    assert (a.enc_dim, a.token_noise, a.steps, a.epochs, a.train_size) == (64, 0.1, 3000, None, None)
    assert vm.parse_args(["--preset", "tiny", "--num-slots", "4"]).num_slots == 4  # the paper's K, by flag
    assert vm.parse_args(["--data", "tetrominoes"]).num_slots == 4  # the paper preset keeps the paper's K
    a = vm.parse_args(["--preset", "tiny", "--data", "shapes"])  # 64 px sets shrink to 32 px / patch 4
    assert (a.resolution, a.patch_size, a.num_slots, a.token_init_std) == (32, 4, 6, 1.0)
    assert vm.parse_args(["--preset", "tiny"]).token_init_std == 0.002  # Tetrominoes: as measured, the authors'
    a = vm.parse_args(["--preset", "tiny", "--data", "clevr-lite"])  # CLEVR6's K, tokens drawn apart
    assert (a.resolution, a.patch_size, a.num_slots, a.mask_ratio, a.token_init_std) == (32, 4, 7, 0.75, 1.0)
    assert vm.parse_args([]).data == "shapes"


@pytest.mark.parametrize("data_name,noise", [("tetrominoes", 0.0), ("shapes", 0.0), ("/d/clevr_with_masks.h5", 0.0),
                                             ("/d/clevrtex_full", 0.1), ("/d/clevrtex_camo", 0.1)])
def test_per_data_defaults_win_over_the_preset(data_name, noise):
    """objectViTAE README.md: only the ClevrTex command adds --init_noise_scale 0.1 (train.py default 0.0)."""
    assert vm.parse_args(["--data", data_name]).token_noise == noise
    assert vm.parse_args(["--data", data_name, "--preset", "tiny"]).token_noise == 0.1  # tiny: every set
    assert vm.parse_args(["--data", data_name, "--token-noise", "0.3"]).token_noise == 0.3  # flags win


def test_class_token_initialisation_std():
    """objectViTAE model.py: normal_(cls_tokens, std=.002); --token-init-std changes it."""
    assert vm.parse_args([]).token_init_std == 0.002
    torch.manual_seed(0)
    for std in (0.002, 1.0):
        tokens = vm.ObjectCentricMAE(32, 4, 8, 64, 1, 4, 32, 1, 4, token_init_std=std).class_tokens  # 512 values
        assert tokens.mean().abs() < 0.2 * std and abs(tokens.std().item() / std - 1) < 0.1


def test_optimizer_groups_are_timms():
    """timm 0.5.4 add_weight_decay: no decay on 1-D parameters and on names ending in .bias, decay on the
    rest (class tokens, mask token, patch projection included); AdamW with its default betas and eps."""
    model, args = model_and_args()
    opt = vm.make_optimizer(model, args)
    assert isinstance(opt, torch.optim.AdamW)
    assert opt.defaults["betas"] == (0.9, 0.999) and opt.defaults["eps"] == 1e-8
    names = {id(p): n for n, p in model.named_parameters()}
    groups = {g["weight_decay"]: sorted(names[id(p)] for p in g["params"]) for g in opt.param_groups}
    assert set(groups) == {0.0, 0.05} and sum(map(len, groups.values())) == len(names)
    decayed = set(groups[0.05])
    assert {"class_tokens", "mask_token", "patch_embed.weight", "decoder_embed.weight", "head.weight",
            "encoder.0.qkv.weight", "decoder.0.mlp.2.weight"} <= decayed
    assert not any(n.endswith("bias") or "norm" in n for n in decayed)  # LayerNorm weights are 1-D
    assert set(groups[0.0]) == {n for n in names.values() if n.endswith("bias") or "norm" in n}


def test_overfits_one_batch():
    model, args = model_and_args("--mask-ratio", "0")
    x = images(4)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    torch.manual_seed(0)
    first = None
    for _ in range(120):
        terms = vm.compute_loss(model(x), x, *vm.entropy_weights_at(0, args))
        opt.zero_grad()
        terms["loss"].backward()
        opt.step()
        first = first if first is not None else terms["mse"].item()
    assert terms["mse"].item() < 0.3 * first


@pytest.mark.parametrize("flags", [[], ["--object-entropy", "0"], ["--pixel-entropy", "0"],
                                   ["--pixel-entropy", "0", "--object-entropy", "0"], ["--mask-ratio", "0"]])
def test_cli_writes_run_files(tmp_path, flags):
    run_args = (*flags, "--steps", "6", "--run-name", "r", "--token-noise", "0.1")
    if not flags:  # the paper's objective as a real subprocess; the ablations in-process (faster)
        r = run_cli(tmp_path, *run_args)
        assert r.returncode == 0, r.stderr
    else:
        assert run_main(tmp_path, *run_args) == 0
    run = tmp_path / "r"
    args = json.loads((run / "args.json").read_text())
    assert args["steps"] == 6 and args["mask_ratio"] == (0.0 if "--mask-ratio" in flags else 0.5)
    lines = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    train = [l for l in lines if l["split"] == "train"]
    evals = [l for l in lines if l["split"] == "eval"]
    assert [l["step"] for l in train] == [2, 4, 6] and [l["step"] for l in evals] == [3, 6]
    for key in ["mse", "pixel_entropy", "object_entropy", "loss", "lr", "mask_ratio", "w_pixel_entropy",
                "w_object_entropy", "images_per_s"]:
        assert all(math.isfinite(l[key]) for l in train), key
    assert [l["token_noise"] for l in train] == [0.1, 0.0, 0.0]  # warm-up only
    assert train[-1]["mask_ratio"] == 0.0  # reached at the last step
    assert all((l["w_pixel_entropy"] == 0) == ("--pixel-entropy" in flags) for l in train)
    assert all((l["w_object_entropy"] == 0) == ("--object-entropy" in flags) for l in train)
    for ev in evals + [json.loads((run / "eval.json").read_text())]:  # every evaluation, in its metric's range
        assert all(-1 <= ev[key] <= 1 for key in ("ari", "fg_ari")), ev
        assert all(0 <= ev[key] <= 1 for key in ("miou", "mbo")) and 0 <= ev["mse"] <= 4, ev  # MSE in [-1, 1]
    ckpt = torch.load(run / "checkpoint.pt", weights_only=True)
    assert ckpt["step"] == 6 and "class_tokens" in ckpt["model"]
    assert sorted(p.name for p in (run / "samples").iterdir()) == ["step_0000003.png", "step_0000006.png"]
    assert json.loads((run / "eval.json").read_text())["step"] == 6


def test_training_applies_and_logs_the_scheduled_values(tmp_path, monkeypatch):
    """Recorded where the values act, not from the log: the patches the encoder sees at every training step
    are num_kept(N, mask_ratio_at(step)) (so the mask-ratio ramp is applied); evaluation feeds every patch to
    the encoder and no mask token to the decoder; each train line logs the optimiser's lr and the values
    applied at the last step of its window."""
    seen, real_build, real_opt, real_loss = [], vm.build_model, vm.make_optimizer, vm.compute_loss

    def build(args):
        model = real_build(args)
        model.encoder[0].register_forward_pre_hook(
            lambda m, a: seen.append({"train": model.training, "visible": a[0].shape[1] - args.num_slots}))

        def mask_token_gap(m, a):  # distance of the decoder inputs to the mask token at any position
            bare = (model.mask_token + model.dec_pos)[0]  # (N, Dd)
            seen[-1]["mask_token_gap"] = torch.cdist(a[0].flatten(0, 1), bare).min().item()
        model.decoder[0].register_forward_pre_hook(mask_token_gap)
        return model

    def optimizer(model, args):
        opt = real_opt(model, args)
        opt.register_step_pre_hook(lambda o, a, k: seen[-1].update(lr=o.param_groups[0]["lr"]))
        return opt

    def loss(out, image, w_pix, w_obj):
        seen[-1].update(w_pixel_entropy=w_pix, w_object_entropy=w_obj)
        return real_loss(out, image, w_pix, w_obj)

    monkeypatch.setattr(vm, "build_model", build)
    monkeypatch.setattr(vm, "make_optimizer", optimizer)
    monkeypatch.setattr(vm, "compute_loss", loss)
    assert run_main(tmp_path, "--steps", "9", "--warmup-steps", "2", "--cooldown-steps", "2", "--run-name", "r",
                    "--mask-ratio", "0.75", "--eval-every", "4", "--log-every", "3") == 0
    args = vm.parse_args(CLI + ["--steps", "9", "--warmup-steps", "2", "--cooldown-steps", "2", "--mask-ratio", "0.75"])
    train, evals = [r for r in seen if r["train"]], [r for r in seen if not r["train"]]
    assert [r["visible"] for r in train] == [vm.num_kept(16, vm.mask_ratio_at(s, args)) for s in range(9)]
    assert len({r["visible"] for r in train}) >= 4  # the ramp really moved
    assert evals and all(r["visible"] == 16 and r["mask_token_gap"] > 1e-3 for r in evals)
    assert min(r["mask_token_gap"] for r in train) < 1e-6  # the check can see a mask token when there is one
    logged = [json.loads(l) for l in (tmp_path / "r" / "metrics.jsonl").open()]
    logged = [l for l in logged if l["split"] == "train"]
    assert [l["step"] for l in logged] == [3, 6, 9]
    for line in logged:
        applied = train[line["step"] - 1]
        assert line["mask_ratio"] == vm.mask_ratio_at(line["step"] - 1, args)
        for key in ("lr", "w_pixel_entropy", "w_object_entropy"):
            assert line[key] == applied[key], key


def test_eval_only_on_the_whole_test_split_and_on_another_data_set(tmp_path):
    assert run_main(tmp_path, "--steps", "3", "--run-name", "r") == 0  # trained on shapes-binary
    ckpt, run = tmp_path / "r" / "checkpoint.pt", tmp_path / "r"
    trained = json.loads((run / "eval.json").read_text())
    assert (trained["data"], trained["images"]) == ("shapes-binary", 8)  # --test-size 8
    for flags, name in [([], "shapes-binary"), (["--data", "shapes"], "shapes")]:
        assert vm.main(["--eval-only", str(ckpt), "--batch-size", "100", *flags]) is None
        ev = json.loads((run / "eval.json").read_text())
        assert (ev["step"], ev["data"], ev["test_size"], ev["images"]) == (3, name, None, 1000)  # the whole split
        assert -1 <= ev["fg_ari"] <= 1 and 0 <= ev["miou"] <= 1 and 0 <= ev["mse"] <= 4


def test_resume_equals_uninterrupted(tmp_path, monkeypatch):
    common = CLI + ["--out-dir", str(tmp_path), "--eval-every", "0", "--log-every", "1", "--token-noise", "0.1",
                    "--warmup-steps", "3", "--steps", "7", "--save-every", "5"]
    vm.main(common + ["--run-name", "full"])
    real, calls = vm.compute_loss, {"n": 0}

    def interrupted(*a, **k):  # the process is killed during step 6, after the checkpoint at step 5
        calls["n"] += 1
        if calls["n"] == 6:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(vm, "compute_loss", interrupted)
    with pytest.raises(SystemExit):
        vm.main(common + ["--run-name", "part"])
    monkeypatch.setattr(vm, "compute_loss", real)
    assert torch.load(tmp_path / "part" / "checkpoint.pt", weights_only=True)["step"] == 5
    vm.main(common + ["--resume", str(tmp_path / "part" / "checkpoint.pt")])
    full = torch.load(tmp_path / "full" / "checkpoint.pt", weights_only=True)
    part = torch.load(tmp_path / "part" / "checkpoint.pt", weights_only=True)
    assert part["step"] == 7
    for k, v in full["model"].items():
        assert torch.equal(v, part["model"][k]), k
    lines_of = lambda run: [(l["step"], l["loss"], l["mask_ratio"]) for l in
                            map(json.loads, (tmp_path / run / "metrics.jsonl").open()) if l["split"] == "train"]
    assert lines_of("full") == lines_of("part") and len(lines_of("full")) == 7


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
    (["--resolution", "18"], "not divisible by --patch-size"),
    (["--num-slots", "0"], "--num-slots must be positive"),
    (["--mask-ratio", "1.0"], "--mask-ratio must be in [0, 1)"),
    (["--mask-ratio", "0.99"], "leaves no visible patch"),
    (["--enc-dim", "18"], "divisible by --enc-heads"),
    (["--data", "/no/such/dataset.h5"], "no such file"),
    (["--resume", "/no/such/checkpoint.pt"], "checkpoint not found"),
])
def test_bad_input_is_one_line_error(tmp_path, extra, needle, capsys):
    # In-process: an exception other than the clean exit would escape run_main and fail the test.
    assert run_main(tmp_path, "--steps", "4", *extra) == 2
    err = capsys.readouterr().err
    assert needle in err and err.strip().splitlines()[-1].count("error: ") == 1
    assert not any(tmp_path.iterdir())  # nothing half-written


def test_bad_input_subprocess_has_no_traceback(tmp_path):
    r = run_cli(tmp_path, "--steps", "4", "--resolution", "18")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].endswith("--resolution 18 is not divisible by --patch-size 4")
    assert not any(tmp_path.iterdir())


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch, capsys):
    real = vm.compute_loss
    calls = {"n": 0}

    def poisoned(*a):
        calls["n"] += 1
        terms = real(*a)
        if calls["n"] == 5:  # step 5 produces a NaN pixel entropy
            terms["pixel_entropy"] = terms["pixel_entropy"] * float("nan")
            terms["loss"] = terms["mse"] + terms["pixel_entropy"]
        return terms

    monkeypatch.setattr(vm, "compute_loss", poisoned)
    with pytest.raises(SystemExit) as e:
        vm.main(CLI + ["--out-dir", str(tmp_path), "--run-name", "r", "--steps", "9", "--eval-every", "0",
                       "--save-every", "4", "--log-every", "100"])
    assert e.value.code == 2
    assert "non-finite loss term 'pixel_entropy' at step 5" in capsys.readouterr().err
    ckpt = torch.load(tmp_path / "r" / "checkpoint.pt", weights_only=True)
    assert ckpt["step"] == 4 and all(torch.isfinite(v).all() for v in ckpt["model"].values())


def test_bf16_autocast_runs_on_cpu(tmp_path):
    assert run_main(tmp_path, "--dtype", "bf16", "--steps", "3", "--run-name", "r") == 0
    assert json.loads((tmp_path / "r" / "eval.json").read_text())["step"] == 3


def ablation(tmp_path, *args):
    env = {**os.environ, "SEEDS": "0 1", "STEPS": "2", "OUT": str(tmp_path), "OMP_NUM_THREADS": "1",
           "EXTRA": " ".join(TINY[2:] + ["--eval-size", "8", "--test-size", "8", "--warmup-steps", "1",
                                          "--cooldown-steps", "0", "--data", "shapes-binary"])}
    return subprocess.run(["bash", str(ROOT / "scripts" / "vit_mae_ablation.sh"), *args], capture_output=True,
                          text=True, cwd=ROOT, timeout=240, env=env)


def table_rows(lines):
    return [[c.strip() for c in l.split("|")[1:-1]] for l in lines if l.startswith("| ") and "---" not in l]


@pytest.mark.slow
def test_ablation_script_writes_table_and_resumes(tmp_path):
    r = ablation(tmp_path, "--select", "top1-by-miou")
    assert r.returncode == 0, r.stderr[-2000:]
    table = (tmp_path / "ablation.md").read_text().split("\n\n")
    rows, best = table_rows(table[1].splitlines()), table_rows(table[3].splitlines())
    assert rows[0] == best[0] == ["variant", "flags", "seeds", "FG-ARI", "ARI", "mIoU"]
    assert [r[0] for r in rows[1:]] == [r[0] for r in best[1:]] == ["full", "no object entropy", "no pixel entropy",
                                                                  "neither entropy", "no masking"]
    evals = {p.parent.name: json.loads(p.read_text()) for p in tmp_path.glob("*/eval.json")}
    assert len(evals) == 10 and "full-2steps-seed1" in evals  # the step count is part of the run name
    for row, top in zip(rows[1:], best[1:]):
        assert row[2] == "2" and top[2] == "1"
        runs = [evals[f"{row[0].replace(' ', '-')}-2steps-seed{s}"] for s in (0, 1)]
        assert float(top[5].split(" +- ")[0]) == pytest.approx(100 * max(e["miou"] for e in runs), abs=0.051)
        for cell in row[3:]:
            mean, std = cell.split(" +- ")
            assert math.isfinite(float(mean)) and float(std) >= 0
    # Interrupted runs continue: one lost its final evaluation, one stopped after step 1 (its checkpoint says so).
    (tmp_path / "full-2steps-seed0" / "eval.json").unlink()
    ckpt = tmp_path / "no-masking-2steps-seed1" / "checkpoint.pt"
    torch.save({**torch.load(ckpt, weights_only=True), "step": 1}, ckpt)
    (tmp_path / "no-masking-2steps-seed1" / "eval.json").unlink()
    untouched = (tmp_path / "full-2steps-seed1" / "metrics.jsonl").read_text()
    args = json.loads((tmp_path / "no-object-entropy-2steps-seed0" / "args.json").read_text())
    (tmp_path / "no-object-entropy-2steps-seed0" / "args.json").write_text(json.dumps({**args, "lr": 1.0}))
    r = ablation(tmp_path)
    assert r.returncode == 1 and "holds a run with other flags (lr)" in r.stderr  # reported, not reused
    assert json.loads((tmp_path / "full-2steps-seed0" / "eval.json").read_text())["step"] == 2
    resumed = [json.loads(l) for l in (tmp_path / "no-masking-2steps-seed1" / "metrics.jsonl").open()]
    assert [l["step"] for l in resumed if l["split"] == "train"][-1] == 2
    assert (tmp_path / "full-2steps-seed1" / "metrics.jsonl").read_text() == untouched  # reused, not retrained
    assert "| no object entropy | `--object-entropy 0` | 1 |" in (tmp_path / "ablation.md").read_text()
    assert ablation(tmp_path, "--select", "top3-of-2-by-miou").returncode == 2  # a bad selection: a usage error


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_bf16_compile(tmp_path):
    r = run_cli(tmp_path, "--device", "cuda", "--dtype", "bf16", "--compile", "--steps", "6", "--run-name", "r")
    assert r.returncode == 0, r.stderr
    train = [json.loads(l) for l in (tmp_path / "r" / "metrics.jsonl").open()]
    assert all(math.isfinite(l["loss"]) for l in train if l["split"] == "train")
