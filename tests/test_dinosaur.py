"""DINOSAUR: the DINO ViT layout and features, the cache, gradients, equivariance, overfitting, the CLI,
resume, DDP, bad input (tiny random ViT, CPU)."""
import json
import math
import os
import pickle
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import data  # noqa: E402
import dinosaur as dn  # noqa: E402
import metrics  # noqa: E402

# A model small enough that a CPU step takes milliseconds: vit_tiny (patch 4, 64-d, 2 blocks) at 16 px = 16 patches.
TINY = ["--preset", "tiny", "--resolution", "16", "--num-slots", "3", "--slot-dim", "16", "--dec-hidden", "32",
        "--dec-channels", "8", "--target-resolution", "16", "--proj-dim", "16", "--batch-size", "4"]
CLI = TINY + ["--log-every", "2", "--eval-every", "3", "--save-every", "3", "--eval-size", "8", "--data", "shapes-binary"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These models are tiny: one thread is many times faster than two fighting over shared cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def model_and_args(*extra):
    args = dn.parse_args(TINY + list(extra))
    torch.manual_seed(0)
    return dn.build_model(args), args


def images(n=4, res=16):
    return data.make_dataset("shapes", "train", res).get_batch(list(range(n)))["image"]


def run_main(tmp_path, capsys, *extra):
    """main() in this process (no interpreter start-up): (exit code, stderr)."""
    try:
        dn.main(CLI + ["--out-dir", str(tmp_path), *extra])
        code = 0
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


def run_cli(tmp_path, *extra, env=None):
    cmd = [sys.executable, str(ROOT / "dinosaur.py"), *CLI, "--out-dir", str(tmp_path), *extra]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=240,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


# --- The frozen ViT


def official_layout(patch, dim, depth, grid, seed=0):
    """A state dict in the official DINO backbone layout: random tensors of the right shapes."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g) * 0.1  # noqa: E731
    sd = {"cls_token": r(1, 1, dim), "pos_embed": r(1, 1 + grid * grid, dim),
          "patch_embed.proj.weight": r(dim, 3, patch, patch), "patch_embed.proj.bias": r(dim)}
    for i in range(depth):
        p = f"blocks.{i}."
        sd.update({p + "norm1.weight": 1 + r(dim), p + "norm1.bias": r(dim),
                   p + "attn.qkv.weight": r(3 * dim, dim), p + "attn.qkv.bias": r(3 * dim),
                   p + "attn.proj.weight": r(dim, dim), p + "attn.proj.bias": r(dim),
                   p + "norm2.weight": 1 + r(dim), p + "norm2.bias": r(dim),
                   p + "mlp.fc1.weight": r(4 * dim, dim), p + "mlp.fc1.bias": r(4 * dim),
                   p + "mlp.fc2.weight": r(dim, 4 * dim), p + "mlp.fc2.bias": r(dim)})
    sd.update({"norm.weight": 1 + r(dim), "norm.bias": r(dim)})
    return sd


def reference_features(sd, image, patch, heads, depth):
    """Independent straightforward DINO forward: unfold patches, explicit per-head softmax attention, hand-written
    LayerNorm and erf GELU, pos_embed resized bicubically; CLS dropped, no final norm."""
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    x = (image - mean) / std
    b, _, h, w = x.shape
    cols = F.unfold(x, patch, stride=patch).transpose(1, 2)  # (B, N, 3*p*p), channel-major like the conv weight
    tok = cols @ sd["patch_embed.proj.weight"].flatten(1).T + sd["patch_embed.proj.bias"]
    d = tok.shape[-1]
    tok = torch.cat([sd["cls_token"].expand(b, 1, d), tok], 1)
    g0 = int(math.isqrt(sd["pos_embed"].shape[1] - 1))
    grid = sd["pos_embed"][0, 1:].T.reshape(1, d, g0, g0)
    if (h // patch, w // patch) != (g0, g0):  # DINO's interpolate_pos_encoding: bicubic, scale (grid + 0.1) / g0
        grid = F.interpolate(grid, scale_factor=((h // patch + 0.1) / g0, (w // patch + 0.1) / g0), mode="bicubic")
    tok = tok + torch.cat([sd["pos_embed"][:, :1], grid.flatten(2).transpose(1, 2)], 1)

    def ln(t, wt, bs):
        mu, var = t.mean(-1, keepdim=True), t.var(-1, unbiased=False, keepdim=True)
        return (t - mu) / torch.sqrt(var + 1e-6) * wt + bs

    hd = d // heads
    for i in range(depth):
        p = lambda n: sd[f"blocks.{i}.{n}"]  # noqa: E731
        y = ln(tok, p("norm1.weight"), p("norm1.bias"))
        qkv = y @ p("attn.qkv.weight").T + p("attn.qkv.bias")  # (B, N, 3D)
        heads_out = []
        for hh in range(heads):
            q = qkv[..., hh * hd:(hh + 1) * hd]
            k = qkv[..., d + hh * hd:d + (hh + 1) * hd]
            v = qkv[..., 2 * d + hh * hd:2 * d + (hh + 1) * hd]
            a = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(hd), -1)
            heads_out.append(a @ v)
        tok = tok + torch.cat(heads_out, -1) @ p("attn.proj.weight").T + p("attn.proj.bias")
        y = ln(tok, p("norm2.weight"), p("norm2.bias"))
        y = y @ p("mlp.fc1.weight").T + p("mlp.fc1.bias")
        y = 0.5 * y * (1 + torch.erf(y / math.sqrt(2)))
        tok = tok + y @ p("mlp.fc2.weight").T + p("mlp.fc2.bias")
    return tok[:, 1:]


@pytest.mark.parametrize("res", [32, 24])  # native grid (8x8) and an interpolated one (6x6)
def test_official_layout_loads_strict_and_matches_reference(tmp_path, res):
    patch, dim, depth, heads, grid = dn.VIT_CONFIGS["vit_tiny"]
    sd = official_layout(patch, dim, depth, grid)
    path = tmp_path / "dino.pth"
    torch.save(sd, path)
    vit = dn.load_vit("vit_tiny", path)
    assert not vit.training and not any(p.requires_grad for p in vit.parameters())
    assert list(vit.state_dict()) == list(sd)  # same keys, same order as the official file
    x = images(2, res)
    torch.testing.assert_close(vit(x), reference_features(sd, x, patch, heads, depth), atol=1e-4, rtol=1e-4)
    assert vit(x).shape == (2, (res // patch) ** 2, dim)


def test_official_full_size_layouts_have_the_dino_shapes():
    for name, dim, n in [("vit_s16", 384, 197), ("vit_s8", 384, 785), ("vit_b16", 768, 197), ("vit_b8", 768, 785)]:
        with torch.device("meta"):  # shapes only: no memory, no initialisation cost
            sd = dn.VisionTransformer(*dn.VIT_CONFIGS[name]).state_dict()
        assert sd["pos_embed"].shape == (1, n, dim) and sd["blocks.11.attn.qkv.weight"].shape == (3 * dim, dim)
        assert len(sd) == 4 + 12 * 12 + 2 and "head.weight" not in sd


@pytest.mark.parametrize("edit,needle", [
    (lambda sd: sd.__setitem__("blocks.1.attn.qkv.weight", torch.zeros(5, 64)), "'blocks.1.attn.qkv.weight' has shape"),
    (lambda sd: sd.pop("blocks.0.norm2.bias"), "missing key 'blocks.0.norm2.bias'"),
    (lambda sd: sd.__setitem__("head.weight", torch.zeros(3)), "unexpected key 'head.weight'"),
])
def test_wrong_layout_is_refused_naming_the_key(tmp_path, edit, needle):
    sd = official_layout(*[dn.VIT_CONFIGS["vit_tiny"][i] for i in (0, 1, 2, 4)])
    edit(sd)
    torch.save(sd, tmp_path / "bad.pth")
    with pytest.raises(data.DataError, match=needle.replace("(", r"\(")):
        dn.load_vit("vit_tiny", tmp_path / "bad.pth")


def test_full_dino_training_checkpoint_teacher_is_accepted(tmp_path):
    sd = official_layout(*[dn.VIT_CONFIGS["vit_tiny"][i] for i in (0, 1, 2, 4)])
    full = {"teacher": {**{"backbone." + k: v for k, v in sd.items()}, "head.mlp.0.weight": torch.zeros(2)}}
    torch.save(full, tmp_path / "full.pth")
    vit = dn.load_vit("vit_tiny", tmp_path / "full.pth")
    torch.testing.assert_close(vit.state_dict()["pos_embed"], sd["pos_embed"])


def test_random_vit_is_deterministic_and_leaves_the_rng_alone():
    torch.manual_seed(5)
    before = torch.get_rng_state()
    a, b = dn.load_vit("vit_tiny"), dn.load_vit("vit_tiny")
    assert torch.equal(torch.get_rng_state(), before)
    assert dn.state_hash(a) == dn.state_hash(b)


# --- The slot model


@pytest.mark.parametrize("target", ["features", "image"])
def test_shapes_and_masks_sum_to_one(target):
    model, args = model_and_args("--target", target)
    feats = dn.load_vit("vit_tiny")(images(2))  # (2, 16, 64)
    out = model(feats)
    if target == "features":
        assert out["recon"].shape == (2, 16, 64) and out["masks"].shape == (2, 3, 16)
    else:
        assert out["recon"].shape == (2, 3, 16, 16) and out["masks"].shape == (2, 3, 16, 16)
        assert out["rgb"].shape == (2, 3, 3, 16, 16)
    assert out["slots"].shape == (2, 3, 16) and out["attn"].shape == (2, 3, 16)
    torch.testing.assert_close(out["masks"].sum(1), torch.ones_like(out["masks"][:, 0]))
    assert dn.masks_at(out["masks"], (16, 16), args).shape == (2, 3, 16, 16)


def algorithm1_iteration(sa, inputs, slots):
    """One iteration of Algorithm 1 of arXiv 2006.15055, written out from the module's weights: LayerNorm the
    inputs and the slots, softmax over SLOTS, + eps, renormalise over INPUTS (weighted mean), a GRU step written
    gate by gate with the previous slots as hidden state, then the residual MLP on LayerNorm-ed slots."""
    d = slots.shape[-1]
    ln = lambda x, m: F.layer_norm(x, x.shape[-1:], m.weight, m.bias, m.eps)  # noqa: E731
    x = ln(inputs, sa.norm_inputs)
    w_k, w_v = key_value_weights(sa)
    k, v = x @ w_k.T, x @ w_v.T  # (B, N, D)
    q = ln(slots, sa.norm_slots) @ sa.to_q.weight.T  # (B, K, D)
    logits = q @ k.transpose(1, 2) / math.sqrt(d)  # (B, K, N)
    attn = torch.exp(logits - logits.max(1, keepdim=True).values)
    attn = attn / attn.sum(1, keepdim=True) + sa.eps  # softmax over the K slots, then + eps
    weights = attn / attn.sum(2, keepdim=True)  # each slot's weights over the N inputs sum to 1
    u, h = weights @ v, slots  # updates (B, K, D), hidden state = previous slots
    g = sa.gru
    wi, wh = g.weight_ih.view(3, d, d), g.weight_hh.view(3, d, d)  # PyTorch gate order: reset, update, new
    bi, bh = g.bias_ih.view(3, d), g.bias_hh.view(3, d)
    r = torch.sigmoid(u @ wi[0].T + bi[0] + h @ wh[0].T + bh[0])
    z = torch.sigmoid(u @ wi[1].T + bi[1] + h @ wh[1].T + bh[1])
    n = torch.tanh(u @ wi[2].T + bi[2] + r * (h @ wh[2].T + bh[2]))
    h = (1 - z) * n + z * h
    fc1, fc2 = sa.mlp[0], sa.mlp[2]
    return h + torch.relu(ln(h, sa.norm_mlp) @ fc1.weight.T + fc1.bias) @ fc2.weight.T + fc2.bias


def key_value_weights(sa):
    """(W_k, W_v), each (D, C), of a SlotAttention module (stacked in its fused to_kv)."""
    return sa.to_kv.weight.chunk(2, dim=0)


def test_slot_attention_equals_algorithm_1():
    torch.manual_seed(0)
    sa = dn.SlotAttention(num_slots=4, slot_dim=8, input_dim=6, mlp_hidden=12, iters=1)
    with torch.no_grad():  # non-trivial LayerNorm affines, so a dropped norm or swapped one shows
        for m in (sa.norm_inputs, sa.norm_slots, sa.norm_mlp):
            m.weight.uniform_(0.5, 1.5)
            m.bias.normal_(0, 0.3)
    inputs, slots = torch.randn(3, 10, 6) * 2, torch.randn(3, 4, 8)
    out, attn = sa(inputs, slots)
    torch.testing.assert_close(out, algorithm1_iteration(sa, inputs, slots), atol=1e-5, rtol=1e-5)
    assert attn.shape == (3, 4, 10)  # (B, K, N)
    torch.testing.assert_close(attn.sum(1), torch.ones(3, 10))  # before eps: each input's column sums to 1


def plain_layout_forward(sa, inputs, slots):
    """The textbook (B, N, K) layout with separate k and v products, T iterations of the module's own step
    pieces (norms, GRU, MLP): the fast (B, K, N) layout must give the same numbers."""
    w_k, w_v = key_value_weights(sa)
    x = sa.norm_inputs(inputs)
    k, v = x @ w_k.T, x @ w_v.T  # (B, N, D)
    for _ in range(sa.iters):
        q = sa.to_q(sa.norm_slots(slots))
        attn = torch.einsum("bnd,bkd->bnk", k, q).mul(sa.slot_dim ** -0.5).softmax(dim=-1)  # (B, N, K)
        weights = (attn + sa.eps) / (attn + sa.eps).sum(dim=1, keepdim=True)
        b, kk, d = slots.shape
        h = sa.gru(torch.einsum("bnk,bnd->bkd", weights, v).reshape(b * kk, d), slots.reshape(b * kk, d))
        slots = h.view(b, kk, d) + sa.mlp(sa.norm_mlp(h.view(b, kk, d)))
    return slots, attn


def test_fast_layout_equals_plain_layout():
    torch.manual_seed(1)
    sa = dn.SlotAttention(num_slots=5, slot_dim=16, input_dim=12, mlp_hidden=32, iters=3)
    inputs, slots = torch.randn(2, 30, 12, requires_grad=True), torch.randn(2, 5, 16)
    fast, attn = sa(inputs, slots)
    plain, plain_attn = plain_layout_forward(sa, inputs, slots)
    torch.testing.assert_close(fast, plain, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(attn, plain_attn.transpose(1, 2), atol=1e-6, rtol=1e-5)
    g_fast, = torch.autograd.grad(fast.square().sum(), inputs)
    g_plain, = torch.autograd.grad(plain.square().sum(), inputs)
    torch.testing.assert_close(g_fast, g_plain, atol=1e-5, rtol=1e-4)


def test_implicit_grad_reaches_the_slot_distribution():
    torch.manual_seed(0)
    sa = dn.SlotAttention(num_slots=3, slot_dim=8, input_dim=8, mlp_hidden=16, implicit_grad=True)
    slots, _ = sa(torch.randn(2, 10, 8))
    slots.sum().backward()
    assert sa.slots_mu.grad.abs().sum() > 0 and sa.slots_log_sigma.grad.abs().sum() > 0


def test_mlp_decoder_alpha_is_softmax_over_slots():
    torch.manual_seed(0)
    dec = dn.MLPDecoder(slot_dim=8, feat_dim=5, num_patches=6, hidden=16)
    slots = torch.randn(2, 3, 8)
    recon, masks = dec(slots)
    x = torch.stack([torch.stack([dec.mlp(slots[b, k] + dec.pos[0, 0]) for k in range(3)]) for b in range(2)])
    alpha = torch.exp(x[..., -1]) / torch.exp(x[..., -1]).sum(1, keepdim=True)  # (B, K, P) over the K slots
    torch.testing.assert_close(masks, alpha, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(recon, (alpha[..., None] * x[..., :-1]).sum(1), atol=1e-5, rtol=1e-5)


def test_mlp_biases_start_at_zero_as_oclf():
    """OCLF's build_mlp zeroes every Linear bias of the input MLP, the slot MLP and the decoder MLP (weights keep
    torch's default init); the GRU and the image decoder's convolutions keep torch's defaults."""
    for target in ("features", "image"):
        model, _ = model_and_args("--target", target)
        mlps = [model.input_mlp, model.slot_attention.mlp] + ([model.decoder.mlp] if target == "features" else [])
        for mlp in mlps:
            linears = [m for m in mlp if isinstance(m, torch.nn.Linear)]
            assert len(linears) >= 2 and all((m.bias == 0).all() and m.weight.std() > 0 for m in linears)
        assert model.slot_attention.gru.bias_ih.abs().sum() > 0
        if target == "image":
            assert model.decoder.first.bias.abs().sum() > 0


def test_patch_masks_are_upsampled_bilinearly():
    args = dn.parse_args(TINY)
    masks = torch.rand(1, 3, 16).softmax(1)  # a 4x4 patch grid
    up = dn.masks_at(masks, (16, 16), args)
    ref = F.interpolate(masks.view(1, 3, 4, 4), size=(16, 16), mode="bilinear", align_corners=False)
    torch.testing.assert_close(up, ref)
    torch.testing.assert_close(up.sum(1), torch.ones(1, 16, 16))


@pytest.mark.parametrize("target", ["features", "image"])
@pytest.mark.parametrize("loss", dn.LOSSES)
def test_every_parameter_gets_a_gradient_and_the_encoder_none(target, loss):
    model, args = model_and_args("--loss", loss, "--target", target)
    encoder = dn.load_vit("vit_tiny")
    batch = {"image": images()}
    feats, _, tgt = dn.prepare(batch, encoder, args, torch.device("cpu"))
    terms = dn.compute_loss(model(feats), tgt, args)
    terms["loss"].backward()
    expected = {"mse", "loss"} | {"cov": {"cov"}, "vicreg": {"cov", "var"}, "cosine": {"cos"}, "mse": set()}[loss]
    assert set(terms) == expected
    assert (model.projector is not None) == (loss in ("cov", "vicreg"))
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name
    assert all(p.grad is None for p in encoder.parameters())
    assert tgt.shape == ((4, 16, 64) if target == "features" else (4, 3, 16, 16))


def test_regulariser_weight_enters_the_total():
    model, args = model_and_args("--loss", "vicreg", "--beta", "0.5")
    feats = torch.randn(4, 16, 64)
    t = dn.compute_loss(model(feats), feats, args)
    torch.testing.assert_close(t["loss"], t["mse"] + 0.5 * (t["cov"] + t["var"]))


def test_table3_covloss_is_variance_plus_covariance_of_the_slots_over_d():
    """2306.02577 Table 3 "DINOSAUR + covLoss" (robert1003 db5b29a: --identity-proj --std_target 1 --var_weight 1
    --cov_weight 1, no --cov-div-sq), transcribed: over the B*K slots, C = centred Z^T Z / (N - 1),
    cov = sum_{i != j} C_ij^2 / D, var = mean_j relu(1 - sqrt(Var_j + 1e-4)); loss = MSE + var + cov."""
    model, args = model_and_args("--loss", "vicreg", "--proj", "identity", "--cov-norm", "dim", "--var-gamma", "1")
    assert isinstance(model.projector, torch.nn.Identity) and not any(model.projector.parameters())
    feats = torch.randn(4, 16, 64)
    out = model(feats)
    t = dn.compute_loss(out, feats, args)
    z = out["slots"].reshape(-1, 16).double()  # (B*K, D)
    zc = z - z.mean(0)
    c = zc.T @ zc / (len(z) - 1)
    cov = (c.square().sum() - c.diagonal().square().sum()) / 16
    var = torch.relu(1 - torch.sqrt(zc.square().sum(0) / (len(z) - 1) + 1e-4)).mean()
    mse = ((out["recon"] - feats) ** 2).mean()
    torch.testing.assert_close(t["cov"].double(), cov)
    torch.testing.assert_close(t["var"].double(), var)
    torch.testing.assert_close(t["loss"].double(), (mse + var + cov).double())


def test_projection_head_runs_in_fp32_and_only_in_training():
    model, args = model_and_args("--loss", "cov")
    feats = torch.randn(2, 16, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(feats)
    assert out["recon"].dtype == torch.bfloat16 and out["proj"].dtype == torch.float32
    assert "proj" not in model.eval()(feats)


def test_image_target_range_and_resize():
    batch = {"image": images(2, 32)}
    for rng, lo in (("signed", -1), ("unit", 0)):
        args = dn.parse_args(TINY + ["--resolution", "32", "--target", "image", "--image-range", rng])
        _, _, target = dn.prepare(batch, dn.load_vit("vit_tiny"), args, torch.device("cpu"))
        small = F.interpolate(batch["image"], size=(16, 16), mode="bicubic", antialias=True).clamp(0, 1)
        torch.testing.assert_close(target, small * (1 - lo) + lo)
        recon = torch.rand(2, 3, 16, 16) * 2 - 1  # the objective's MSE is on that range, averaged over every value
        mse = dn.compute_loss({"recon": recon}, target, args)["mse"]
        torch.testing.assert_close(mse, ((recon - (small * (1 - lo) + lo)) ** 2).sum() / recon.numel())


@pytest.mark.parametrize("conv,g", [(torch.nn.ConvTranspose2d(6, 5, 5, stride=2, padding=2, output_padding=1), g)
                                    for g in (1, 2, 3, 8)] + [
    (torch.nn.Conv2d(6, 5, 5, padding=2), 4), (torch.nn.Conv2d(6, 5, 3), 5), (torch.nn.Conv2d(6, 5, 1), 8),
    (torch.nn.Conv2d(6, 5, 3, stride=2, padding=1), 7), (torch.nn.ConvTranspose2d(6, 5, 3, padding=1), 6),
    (torch.nn.ConvTranspose2d(6, 5, 4, stride=2, padding=1), 5)])
def test_broadcast_conv_equals_tiling_then_convolving(conv, g):
    torch.manual_seed(0)
    slots, pos = torch.randn(4, 6, requires_grad=True), torch.randn(1, 6, g, g, requires_grad=True)
    fast = dn.broadcast_conv(slots, pos, conv)
    plain = conv(slots[:, :, None, None].expand(-1, -1, g, g) + pos)  # tile, add, convolve
    torch.testing.assert_close(fast, plain, atol=1e-5, rtol=1e-5)
    up = torch.randn_like(plain)  # an arbitrary upstream gradient
    wrt = (slots, pos, conv.weight, conv.bias)
    for a, b in zip(torch.autograd.grad((fast * up).sum(), wrt), torch.autograd.grad((plain * up).sum(), wrt)):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kind,res", [("savi", 16), ("savi", 64), ("adaptive", 16), ("adaptive", 32)])
def test_image_decoder_fast_equals_plain(kind, res):
    torch.manual_seed(0)
    fast = dn.ImageDecoder(kind, 12, 8, res, convs=5)
    plain = dn.ImageDecoder(kind, 12, 8, res, convs=5, fast=False)
    plain.load_state_dict(fast.state_dict())
    slots = torch.randn(2, 3, 12)
    a, b = fast(slots), plain(slots)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-5)
    assert a[0].shape == (2, 3, res, res) and a[1].shape == (2, 3, res, res)
    a[0].square().sum().backward()
    b[0].square().sum().backward()
    for (name, p), q in zip(fast.named_parameters(), plain.parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-4, rtol=1e-4, msg=name)


def test_image_decoders_are_the_authors():
    savi = dn.ImageDecoder("savi", 256, 64, 128)  # OCLF coco_image_rec_base16_frozen at 128 px
    convs = [m for m in savi.modules() if isinstance(m, (torch.nn.ConvTranspose2d, torch.nn.Conv2d))]
    assert savi.grid == 8 and [(m.in_channels, m.out_channels, m.kernel_size[0], m.stride[0]) for m in convs] == [
        (256, 64, 5, 2), (64, 64, 5, 2), (64, 64, 5, 2), (64, 64, 5, 2), (64, 4, 1, 1)]
    with torch.no_grad():
        convs[-1].bias.fill_(5.0)  # raw RGB near 5: tanh squashes it into (-1, 1)
    rgb = savi(torch.randn(1, 2, 256))[2]
    assert 0.99 < rgb.max() < 1
    ada = dn.ImageDecoder("adaptive", 64, 32, 128, convs=6)  # robert1003 COCOAdaptiveDecoder: 8x8, 32 ch, 6 convs
    convt = [m for m in ada.modules() if isinstance(m, torch.nn.ConvTranspose2d)]
    assert ada.grid == 8 and len(convt) == 6 and [m.stride[0] for m in convt] == [2, 2, 2, 2, 1, 1]
    assert [m.kernel_size[0] for m in convt] == [5, 5, 5, 5, 5, 3] and convt[-1].out_channels == 4
    assert ada.pos.in_features == 4 and savi.pos.in_features == 2


@pytest.mark.parametrize("target", ["features", "image"])
def test_slot_permutation_equivariance(target):
    model, args = model_and_args("--target", target)
    feats, init, perm = torch.randn(2, 16, 64), torch.randn(2, 3, 16), torch.tensor([2, 0, 1])
    a, b = model(feats, init), model(feats, init[:, perm])
    torch.testing.assert_close(b["slots"], a["slots"][:, perm], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(b["masks"], a["masks"][:, perm], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(b["recon"], a["recon"], atol=1e-5, rtol=1e-4)


def oclf_blocks(k, cols, h, w):
    """OCLF's CreateRandomMaskPatterns(pattern=blocks) as a loop over rectangles (ocl/utils/masking.py)."""
    m, slot = torch.zeros(k, h, w), 0
    for c in range(cols):
        rows = k // cols + (k % cols if c == cols - 1 else 0)
        bw, bh = math.ceil(w / cols), math.ceil(h / rows)
        for r in range(rows):
            m[slot, r * bh:(r + 1) * bh, c * bw:(c + 1) * bw] = 1
            slot += 1
    return m


@pytest.mark.parametrize("k,cols,h,w", [(11, 3, 320, 320), (11, 3, 16, 16), (11, 3, 23, 31), (7, 2, 9, 13),
                                        (4, 1, 8, 8)])
def test_block_masks_are_oclfs_layout(k, cols, h, w):
    m = dn.block_masks(k, cols, h, w)
    assert torch.equal(m, oclf_blocks(k, cols, h, w))
    assert torch.equal(m.sum(0), torch.ones(h, w))


def test_default_block_layout_is_three_columns_of_3_3_5():
    args = dn.parse_args(["--baseline", "blocks"])
    assert (args.block_slots, args.block_cols) == (11, 3)
    ids = dn.block_masks(11, 3, 320, 320).argmax(0)  # (h, w) slot id
    columns = [ids[:, x].unique().tolist() for x in (0, 160, 319)]
    assert columns == [[0, 1, 2], [3, 4, 5], [6, 7, 8, 9, 10]]
    assert ids[0].unique().tolist() == [0, 3, 6]  # the top row crosses the three columns


def test_paper_preset_and_coco_defaults(tmp_path):
    args = dn.parse_args([])
    assert (args.vit, args.resolution, args.slot_dim, args.mlp_hidden, args.dec_hidden) == ("vit_b16", 224, 256, 1024, 2048)
    assert (args.batch_size, args.lr, args.steps, args.warmup_steps, args.grad_clip) == (64, 4e-4, 500_000, 10_000, 1.0)
    assert (args.target, args.target_resolution, args.hflip) == ("features", 128, False)
    (tmp_path / "annotations").mkdir()
    (tmp_path / "annotations" / "instances_val2017.json").write_text("{}")
    coco = dn.parse_args(["--data", str(tmp_path)])
    assert (coco.num_slots, coco.hflip) == (7, True)
    assert dn.parse_args(["--data", str(tmp_path), "--no-hflip", "--num-slots", "9"]).hflip is False


def oclf_lr(step, peak, warmup, decay):
    """OCLF _exp_decay_after_warmup_fn times the peak: min(1, s/w), and 0.5^((s - w)/d) only once s >= w."""
    factor = min(1.0, step / warmup)
    return peak * (factor if step < warmup else factor * 0.5 ** ((step - warmup) / decay))


def docs_commands(coco):
    """The `python dinosaur.py` lines of docs/dinosaur.md's command block, $COCO expanded, --data pointing at `coco`."""
    block = (ROOT / "docs" / "dinosaur.md").read_text().split("```bash")[1].split("```")[0]
    flags = shlex.split(block.split('COCO="')[1].split('"')[0].replace("/data/coco", str(coco)))
    return [[f for w in shlex.split(line.split(" #")[0])[2:] for f in (flags if w == "$COCO" else [w])]
            for line in block.splitlines() if line.startswith("python dinosaur.py")]


def test_docs_commands_parse(tmp_path):
    write_tiny_coco(tmp_path / "coco")
    runs = [dn.parse_args(c) for c in docs_commands(tmp_path / "coco")]
    pick = lambda **kw: [a for a in runs if all(getattr(a, k) == v for k, v in kw.items())]  # noqa: E731
    paper = dict(vit="vit_b16", resolution=224, num_slots=7, hflip=True, batch_size=64, steps=500_000, lr=4e-4)
    assert all(all(getattr(a, k) == v for k, v in paper.items()) for a in pick(data=str(tmp_path / "coco")))
    assert len(pick(data=str(tmp_path / "coco"))) == 9
    dino, = pick(target="features", loss="mse", dec_hidden=2048, slot_dim=256, baseline=None, eval_only=None,
                 resume=None, preset="paper")
    stripes, = pick(target="image", loss="mse")
    assert (stripes.image_decoder, stripes.slot_dim, stripes.dec_channels, stripes.target_resolution,
            stripes.image_range) == ("savi", 256, 64, 128, "signed")
    cov, = pick(target="image", loss="cov")
    assert (cov.image_decoder, cov.slot_dim, cov.dec_channels, cov.dec_convs, cov.target_resolution, cov.image_range,
            cov.beta, cov.cov_norm, cov.proj, cov.proj_dim, cov.proj_norm) == (
        "adaptive", 64, 32, 6, 128, "unit", 1.0, "dim2", "mlp", 1024, "layer")
    cosine, = pick(target="image", loss="cosine")
    assert (cosine.image_decoder, cosine.slot_dim, cosine.dec_channels, cosine.beta) == ("adaptive", 128, 32, 0.01)
    table3 = pick(target="features", dec_hidden=3072)
    assert sorted((a.slot_dim, a.loss) for a in table3) == [(256, "mse"), (256, "vicreg"), (1024, "mse"),
                                                            (1024, "vicreg")]
    assert all((a.proj, a.cov_norm, a.var_gamma, a.beta) == ("identity", "dim", 1.0, 1.0) for a in pick(loss="vicreg"))
    assert len(pick(baseline="blocks")) == 1 and len(pick(preset="tiny")) == 1
    for a in (cov, cosine):
        out = dn.build_model(a)(torch.randn(1, 196, 768))
        assert out["recon"].shape == (1, 3, 128, 128) and out["masks"].shape == (1, 7, 128, 128)


def test_lr_warms_up_then_decays_after_the_warmup():
    args = dn.parse_args(["--lr", "4e-4", "--warmup-steps", "10", "--decay-steps", "100"])
    assert dn.lr_at(10, args) == 4e-4  # the peak, undecayed, right after the warm-up
    assert dn.lr_at(0, args) == 0 and dn.lr_at(4, args) == pytest.approx(4e-4 * 0.4)
    assert dn.lr_at(110, args) == pytest.approx(2e-4)
    for step in (0, 1, 9, 10, 11, 57, 110, 1234):
        assert dn.lr_at(step, args) == pytest.approx(oclf_lr(step, 4e-4, 10, 100), rel=1e-12)


def test_logged_lr_is_the_applied_lr(tmp_path, capsys, monkeypatch):
    applied, real_step = [], torch.optim.Adam.step

    def step(self, *a, **k):
        applied.append(self.param_groups[0]["lr"])
        return real_step(self, *a, **k)

    monkeypatch.setattr(torch.optim.Adam, "step", step)
    code, err = run_main(tmp_path, capsys, "--steps", "6", "--log-every", "1", "--eval-every", "0", "--lr", "1e-3",
                         "--warmup-steps", "3", "--decay-steps", "2", "--run-name", "r")
    assert code == 0, err
    logged = [l["lr"] for l in map(json.loads, (tmp_path / "r" / "metrics.jsonl").open()) if l["split"] == "train"]
    assert logged == applied
    assert applied == pytest.approx([oclf_lr(s, 1e-3, 3, 2) for s in range(6)], rel=1e-12)


def test_flips_are_a_function_of_the_step():
    args = dn.parse_args(TINY + ["--hflip"])
    a, b = dn.flip_bits(7, 64, args, 0), dn.flip_bits(7, 64, args, 0)
    assert torch.equal(a, b) and 10 < a.sum() < 54 and not torch.equal(a, dn.flip_bits(8, 64, args, 0))
    assert dn.flip_bits(7, 4, dn.parse_args(TINY), 0) is None


@pytest.mark.parametrize("target", ["features", "image"])
def test_overfits_one_batch(target):
    model, args = model_and_args("--target", target, "--loss", "cov")
    batch = {"image": images(4)}
    feats, _, tgt = dn.prepare(batch, dn.load_vit("vit_tiny"), args, torch.device("cpu"))
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    first = None
    for _ in range(150):
        terms = dn.compute_loss(model(feats), tgt, args)
        opt.zero_grad()
        terms["loss"].backward()
        opt.step()
        first = first if first is not None else terms["mse"].item()
    assert terms["mse"].item() < 0.3 * first


# --- Feature cache


def test_cache_round_trips_and_rebuilds_when_stale(tmp_path, capsys):
    args = dn.parse_args(TINY + ["--data", "shapes", "--train-size", "12", "--cache-features", str(tmp_path),
                                 "--hflip"])
    dev = torch.device("cpu")
    enc = dn.load_vit("vit_tiny")
    sha = dn.state_hash(enc)
    ds = data.make_dataset("shapes", "train", 16, size=12)
    cache = dn.cached_features(enc, ds, "train", args, dev, sha, False, True, 1)
    assert "missing" in capsys.readouterr().err
    batch = cache.get_batch([3, 0, 7])
    assert set(batch) == {"feat"} and batch["feat"].shape == (3, 2, 16, 64)
    x = ds.get_batch([3, 0, 7])["image"]
    with torch.no_grad():
        torch.testing.assert_close(batch["feat"][:, 0], enc(x), atol=2e-3, rtol=2e-3)  # float16 storage
        torch.testing.assert_close(batch["feat"][:, 1], enc(x.flip(-1)), atol=2e-3, rtol=2e-3)
        flips = torch.tensor([True, False, True])
        feats, _, _ = dn.prepare(batch, enc, args, dev, flips)
        torch.testing.assert_close(feats, torch.where(flips.view(-1, 1, 1), enc(x.flip(-1)), enc(x)),
                                   atol=2e-3, rtol=2e-3)
    folder = cache.file.parent
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["count"] == 12 and manifest["weights_sha256"] == sha and manifest["hflip"] is True
    stamp = cache.file.stat().st_mtime_ns
    dn.cached_features(enc, ds, "train", args, dev, sha, False, True, 1)  # fresh: reused
    assert capsys.readouterr().err == "" and cache.file.stat().st_mtime_ns == stamp
    # other weights: the manifest no longer matches, the cache is rebuilt (never silently used)
    other = official_layout(*[dn.VIT_CONFIGS["vit_tiny"][i] for i in (0, 1, 2, 4)])
    torch.save(other, tmp_path / "w.pth")
    enc2 = dn.load_vit("vit_tiny", tmp_path / "w.pth")
    cache2 = dn.cached_features(enc2, ds, "train", args, dev, dn.state_hash(enc2), False, True, 1)
    assert "stale: weights_sha256" in capsys.readouterr().err
    with torch.no_grad():
        torch.testing.assert_close(cache2.get_batch([3])["feat"][:, 0], enc2(x[:1]), atol=2e-3, rtol=2e-3)
    # fewer images: rebuilt with the new count
    small = data.make_dataset("shapes", "train", 16, size=8)
    cache3 = dn.cached_features(enc2, small, "train", args, dev, dn.state_hash(enc2), True, True, 1)
    assert "count 12 != 8" in capsys.readouterr().err
    assert set(cache3.get_batch([0])) >= {"feat", "image", "mask"}
    assert [p.name for p in tmp_path.iterdir() if p.is_dir()] == [folder.name]  # no temporary folder left


# --- Command line


@pytest.mark.parametrize("target,loss", [("features", "mse"), ("features", "vicreg"), ("image", "cov"),
                                         ("image", "cosine")])
def test_cli_writes_run_files(tmp_path, target, loss):
    r = run_cli(tmp_path, "--target", target, "--loss", loss, "--steps", "6", "--run-name", "r")
    assert r.returncode == 0, r.stderr
    assert "RANDOMLY INITIALISED" in r.stderr
    run = tmp_path / "r"
    args = json.loads((run / "args.json").read_text())
    assert args["loss"] == loss and args["target"] == target and args["steps"] == 6
    lines = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    train = [l for l in lines if l["split"] == "train"]
    evals = [l for l in lines if l["split"] == "eval"]
    assert [l["step"] for l in train] == [2, 4, 6] and [l["step"] for l in evals] == [3, 6]
    terms = {"mse": [], "cov": ["cov"], "vicreg": ["cov", "var"], "cosine": ["cos"]}[loss]
    for key in ["mse", "loss", "lr", "images_per_s", *terms]:
        assert all(math.isfinite(l[key]) for l in train), key
    for key in ("ari", "fg_ari", "miou", "mbo"):
        assert -1 <= evals[-1][key] <= 1, key
    ckpt = torch.load(run / "checkpoint.pt", weights_only=True)
    assert ckpt["step"] == 6
    assert not any(k.startswith(("blocks.", "patch_embed", "cls_token", "pos_embed")) for k in ckpt["model"])
    assert any(k.startswith("projector.") for k in ckpt["model"]) == (loss in ("cov", "vicreg"))
    assert sorted(p.name for p in (run / "samples").iterdir()) == ["step_0000003.png", "step_0000006.png"]
    assert json.loads((run / "eval.json").read_text())["step"] == 6


def test_cached_run_equals_uncached_and_eval_only(tmp_path, capsys):
    common = ["--eval-every", "0", "--log-every", "1", "--steps", "4", "--train-size", "16", "--hflip"]
    assert run_main(tmp_path, capsys, *common, "--run-name", "plain")[0] == 0
    code, err = run_main(tmp_path, capsys, *common, "--run-name", "cached", "--cache-features", str(tmp_path / "cache"))
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [
        "shapes-binary-test-16px-vit_tiny", "shapes-binary-train-16px-vit_tiny", "shapes-binary-val-16px-vit_tiny"]
    loss = lambda run: [l["loss"] for l in map(json.loads, (tmp_path / run / "metrics.jsonl").open())  # noqa: E731
                        if l["split"] == "train"]
    assert loss("cached") == pytest.approx(loss("plain"), rel=1e-2)  # only float16 storage differs
    ev = json.loads((tmp_path / "cached" / "eval.json").read_text())
    (tmp_path / "cached" / "eval.json").unlink()
    code, err = run_main(tmp_path, capsys, "--eval-only", str(tmp_path / "cached" / "checkpoint.pt"),
                         "--cache-features", str(tmp_path / "cache"))
    assert code == 0 and "building" not in err, err  # the test split's cache is reused
    again = json.loads((tmp_path / "cached" / "eval.json").read_text())
    assert again["step"] == 4 and again["fg_ari"] == pytest.approx(ev["fg_ari"])


def write_tiny_coco(root, n_train=8, n_val=4, empty=()):
    """A COCO 2017 folder: 24 x 32 images, each with one bright rectangle (a polygon) and a crowd strip (an RLE);
    the val images listed in `empty` have the crowd strip only (no foreground object)."""
    from PIL import Image
    (root / "annotations").mkdir(parents=True)
    for part, n in (("train2017", n_train), ("val2017", n_val)):
        (root / part).mkdir()
        images, anns = [], []
        for i in range(n):
            x0, y0 = 2 + 3 * (i % 5), 2 + 2 * (i % 4)
            pixels = torch.full((24, 32, 3), 40, dtype=torch.uint8)
            pixels[y0:y0 + 8, x0:x0 + 10] = torch.tensor([200, 60 + 20 * i, 90], dtype=torch.uint8)
            Image.fromarray(pixels.numpy()).save(root / part / f"{i}.jpg")
            images.append(dict(id=i, file_name=f"{i}.jpg", height=24, width=32))
            if not (part == "val2017" and i in empty):
                anns.append(dict(image_id=i, iscrowd=0, category_id=1,
                                 segmentation=[[x0, y0, x0 + 9, y0, x0 + 9, y0 + 7, x0, y0 + 7]]))
            anns.append(dict(image_id=i, iscrowd=1, category_id=1, segmentation=dict(counts=[23, 1] * 32, size=[24, 32])))
        (root / "annotations" / f"instances_{part}.json").write_text(
            json.dumps(dict(images=images, annotations=anns, categories=[dict(id=1, name="thing")])))


def test_coco_folder_with_flips_and_cache(tmp_path, capsys):
    write_tiny_coco(tmp_path / "coco")
    code, err = run_main(tmp_path, capsys, "--data", str(tmp_path / "coco"), "--steps", "2", "--eval-size", "4",
                         "--run-name", "c", "--cache-features", str(tmp_path / "cache"), "--eval-every", "0")
    assert code == 0, err
    args = json.loads((tmp_path / "c" / "args.json").read_text())
    assert args["hflip"] is True and args["num_slots"] == 3  # COCO flips by default; the flag wins over K=7
    manifest = json.loads((tmp_path / "cache" / "coco-train-16px-vit_tiny" / "manifest.json").read_text())
    assert manifest["hflip"] is True and manifest["count"] == 8
    ev = json.loads((tmp_path / "c" / "eval.json").read_text())
    assert ev["step"] == 2 and 0 <= ev["mbo"] <= 1 and -1 <= ev["fg_ari"] <= 1 and ev["fg_ari_skipped"] == 0
    assert 0 <= ev["mbo_c"] <= 1 and args["mask_resolution"] == 320


def test_coco_final_evaluation_scores_every_val_image_and_empty_ones_both_ways(tmp_path, capsys):
    write_tiny_coco(tmp_path / "coco", n_val=6, empty=(2,))
    code, err = run_main(tmp_path, capsys, "--data", str(tmp_path / "coco"), "--baseline", "blocks", "--run-name", "b",
                         "--eval-size", "2")
    assert code == 0, err
    ev = json.loads((tmp_path / "b" / "eval.json").read_text())
    assert ev["fg_ari_skipped"] == 1  # all 6 val images scored (not --eval-size 2); the empty one skipped...
    assert ev["fg_ari_oclf"] == pytest.approx((5 * ev["fg_ari"] + 1) / 6)  # ...or scored 1, as OCLF's ARIMetric
    assert json.loads((tmp_path / "b" / "args.json").read_text())["mask_resolution"] == 320
    # OCLF metrics_coco_ccrop: 320-px masks (crowd dropped: background, not ignored), the 11 blocks cut at 320
    batch = data.make_dataset(tmp_path / "coco", "test", 16, mask_resolution=320).get_batch(list(range(6)))
    assert batch["mask"].shape == (6, 320, 320) and (batch["mask"] >= 0).all()
    blocks = oclf_blocks(11, 3, 320, 320).expand(6, -1, -1, -1)
    m = metrics.average_metrics(metrics.segmentation_metrics(batch["mask"], blocks, 1))
    m["mbo_c"] = metrics.average_metrics({"x": metrics.mbo(batch["class_mask"], blocks, 1)})["x"]
    for k in ("fg_ari", "ari", "miou", "mbo", "mbo_c"):
        assert ev[k] == pytest.approx(m[k]), k


def test_eval_only_resolves_the_coco_protocol_for_its_own_data(tmp_path, capsys):
    write_tiny_coco(tmp_path / "coco")
    assert run_main(tmp_path, capsys, "--data", str(tmp_path / "coco"), "--steps", "2", "--eval-every", "0",
                    "--run-name", "c")[0] == 0
    ckpt = str(tmp_path / "c" / "checkpoint.pt")
    code, err = run_main(tmp_path, capsys, "--eval-only", ckpt, "--data", "shapes-binary", "--test-size", "4")
    assert code == 0, err  # the COCO run's 320-px masks do not follow the checkpoint onto a built-in set
    ev = json.loads((tmp_path / "c" / "eval.json").read_text())
    assert (ev["data"], ev["mask_resolution"], ev["test_size"]) == ("shapes-binary", None, 4) and "mbo_c" not in ev
    code, err = run_main(tmp_path, capsys, "--eval-only", ckpt, "--data", str(tmp_path / "coco"),
                         "--mask-resolution", "64")
    assert code == 0, err
    ev = json.loads((tmp_path / "c" / "eval.json").read_text())
    assert (ev["mask_resolution"], ev["test_size"]) == (64, None) and 0 <= ev["mbo_c"] <= 1


def test_block_baseline(tmp_path):
    r = run_cli(tmp_path, "--baseline", "blocks", "--run-name", "b", "--eval-size", "16")
    assert r.returncode == 0, r.stderr
    ev = json.loads((tmp_path / "b" / "eval.json").read_text())
    assert ev["baseline"] == "blocks" and 0 <= ev["mbo"] <= 1 and "mse" not in ev
    ds = data.make_dataset("shapes-binary", "test", 16)
    batch = ds.get_batch(list(range(16)))
    m = metrics.segmentation_metrics(batch["mask"], oclf_blocks(11, 3, 16, 16).expand(16, -1, -1, -1), 1)
    assert ev["fg_ari"] == pytest.approx(metrics.average_metrics(m)["fg_ari"])
    assert (tmp_path / "b" / "samples" / "blocks.png").is_file()


def test_resume_equals_uninterrupted(tmp_path):
    common = CLI + ["--out-dir", str(tmp_path), "--eval-every", "0", "--log-every", "1", "--hflip"]
    dn.main(common + ["--steps", "6", "--run-name", "full"])
    dn.main(common + ["--steps", "3", "--run-name", "part"])
    dn.main(common + ["--steps", "6", "--resume", str(tmp_path / "part" / "checkpoint.pt")])
    full = torch.load(tmp_path / "full" / "checkpoint.pt", weights_only=True)
    part = torch.load(tmp_path / "part" / "checkpoint.pt", weights_only=True)
    assert part["step"] == 6
    for k, v in full["model"].items():
        assert torch.equal(v, part["model"][k]), k
    losses_of = lambda run: [l["loss"] for l in map(json.loads, (tmp_path / run / "metrics.jsonl").open())  # noqa: E731
                             if l["split"] == "train"]
    assert losses_of("full") == losses_of("part")


class Hostile:
    def __reduce__(self):
        return (os.system, (f"touch {MARKER}",))


MARKER = None


@pytest.mark.parametrize("flag", ["--eval-only", "--weights"])
def test_hostile_file_is_refused(tmp_path, capsys, flag):
    global MARKER
    MARKER = tmp_path / "pwned"
    bad = tmp_path / "evil" / "checkpoint.pt"
    bad.parent.mkdir()
    with open(bad, "wb") as f:
        pickle.dump({"model": Hostile()}, f)
    code, err = run_main(tmp_path, capsys, flag, str(bad), "--steps", "2", "--run-name", "r")
    assert code == 2 and not MARKER.exists()
    assert "refusing" in err and not (tmp_path / "r").exists()


@pytest.mark.parametrize("extra,needle", [
    (["--num-slots", "0"], "--num-slots must be positive"),
    (["--resolution", "18"], "multiple of the vit_tiny patch size 4"),
    (["--target", "image", "--target-resolution", "40"], "multiple of 16"),
    (["--data", "/no/such/coco"], "no such file"),
    (["--resume", "/no/such/checkpoint.pt"], "checkpoint not found"),
    (["--weights", "/no/such/dino.pth"], "weights file not found"),
    (["--data", "shapes", "--cache-features", "/tmp/x"], "needs --train-size"),
    (["--mask-resolution", "320"], "--mask-resolution applies to a COCO folder"),
    (["--target", "image", "--image-decoder", "adaptive", "--dec-convs", "7"], "must be a multiple of 32"),
    (["--block-cols", "12", "--baseline", "blocks"], "--block-cols must be between 1 and --block-slots"),
])
def test_bad_input_is_one_line_error(tmp_path, capsys, extra, needle):
    code, err = run_main(tmp_path, capsys, "--steps", "2", *extra)
    assert code == 2
    last = err.strip().splitlines()[-1]  # argparse prints its usage line first
    assert "error: " in last and needle in last
    assert not any(tmp_path.iterdir())  # nothing half-written


def test_checkpoint_of_other_encoder_weights_is_refused(tmp_path, capsys):
    assert run_main(tmp_path, capsys, "--steps", "2", "--run-name", "r", "--eval-every", "0")[0] == 0
    torch.save(official_layout(*[dn.VIT_CONFIGS["vit_tiny"][i] for i in (0, 1, 2, 4)]), tmp_path / "w.pth")
    code, err = run_main(tmp_path, capsys, "--eval-only", str(tmp_path / "r" / "checkpoint.pt"),
                         "--weights", str(tmp_path / "w.pth"))
    assert code == 2 and "other encoder weights" in err.strip().splitlines()[-1]


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch, capsys):
    real = dn.compute_loss
    calls = {"n": 0}

    def poisoned(out, target, args):
        calls["n"] += 1
        terms = real(out, target, args)
        if calls["n"] == 5:  # step 5 produces a NaN reconstruction error
            terms["mse"] = terms["mse"] * float("nan")
            terms["loss"] = terms["mse"]
        return terms

    monkeypatch.setattr(dn, "compute_loss", poisoned)
    with pytest.raises(SystemExit) as e:
        dn.main(CLI + ["--out-dir", str(tmp_path), "--run-name", "r", "--steps", "9", "--eval-every", "0",
                       "--save-every", "4", "--log-every", "100"])
    assert e.value.code == 2
    assert "non-finite loss term 'mse' at step 5" in capsys.readouterr().err
    ckpt = torch.load(tmp_path / "r" / "checkpoint.pt", weights_only=True)
    assert ckpt["step"] == 4 and all(torch.isfinite(v).all() for v in ckpt["model"].values())


def test_bf16_autocast_runs_on_cpu(tmp_path, capsys):
    code, err = run_main(tmp_path, capsys, "--dtype", "bf16", "--steps", "3", "--run-name", "r", "--loss", "cosine",
                         "--log-every", "1")
    assert code == 0, err
    train = [l for l in map(json.loads, (tmp_path / "r" / "metrics.jsonl").open()) if l["split"] == "train"]
    assert [l["step"] for l in train] == [1, 2, 3]
    assert all(math.isfinite(l[k]) for l in train for k in ("mse", "cos", "loss"))  # every term, every step
    final = json.loads((tmp_path / "r" / "eval.json").read_text())
    assert final["step"] == 3 and math.isfinite(final["mse"]) and -1 <= final["ari"] <= 1


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_bf16_compile(tmp_path):
    r = run_cli(tmp_path, "--device", "cuda", "--dtype", "bf16", "--compile", "--steps", "6", "--run-name", "r")
    assert r.returncode == 0, r.stderr
    train = [json.loads(l) for l in (tmp_path / "r" / "metrics.jsonl").open()]
    assert all(math.isfinite(l["loss"]) for l in train if l["split"] == "train")
