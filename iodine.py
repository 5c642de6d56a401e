"""IODINE: iterative amortised inference with the full refinement network.

Paper
  Greff et al., "Multi-Object Representation Learning with Iterative Variational Inference", ICML 2019,
  arXiv 1903.00450; official TensorFlow code deepmind-research iodine/ (configurations.py, modules/), whose
  configuration the paper preset follows where it differs from the paper's prose (each case below).

What is implemented
  - Posterior q(z_k | lambda_k), lambda_k = (mu_k, s_k), diagonal Gaussian with scale sqrt(softplus(s_k))
    (the code's "var" parameterisation); the initial lambda is one learned vector shared by all K slots.
  - Spatial broadcast decoder (App. B): [z_k, 5.0] tiled, + linear [y, x] in [-1, 1], 4 x conv SAME ELU,
    conv to RGB mean and mask logit; masks = softmax over K. The first convolution skips the tiling by an
    exact identity (broadcast_conv; --plain-decoder for the textbook computation); convolutions channels-last.
  - Likelihood: the pixel mixture sum_k m_k p(x | mu_k), p logistic with fixed scale 0.03 per channel as in
    every official configuration (--likelihood gaussian: the common reimplementations' sigma 0.1); the
    posterior and leave-one-out inputs use the same p.
  - Refinement (Sec. 2.2, Table 3): lambda_k <- lambda_k + f_phi(z_k, x, a_k), --iters T times, with every
    input of the official code (stop-gradient and LayerNorm where it has them): strided ELU CNN, average
    pooling, MLP; the flat inputs join after it; LSTM (none for Tetrominoes); linear head. The K slots run
    as one batch of B*K; the gradient inputs are first order (autograd.grad without create_graph).
  - Objective: sum_{t=0..T} (t/T) (NLL_t + KL_t); Adam beta1 0.95, clip 5, lr x 0.1^(step/1M); Sonnet's
    initialisation as in the official code (sonnet_init_; --init torch for PyTorch's defaults).
  - Evaluation: ARI, FG-ARI, mIoU, mBO of the final masks, FG-ARI after every step (fg_ari_iter_t) and the
    plateau diagnostics mask_std and colour_fg_ari (see plateau_diagnostics and docs/iodine.md).

This file's names and the official code's (modules/iodine.py _get_inputs_for, decode, _get_initial_z)
  lam -> zp        lambda0 -> initial_sample_distribution     means -> components      mask_logits -> mask
  masks -> pred_mask      posterior -> posterior      log_px -> log_prob      loo -> counterfactual
  dmeans, dlogits, dlam -> dcomponents, dmask, dzp      coords -> coordinates
  capacity, flat_capacity -> capacity, flat_capacity (0.5 everywhere)

Deviations and choices (each one stated so a reader can undo it)
  - Prior N(0, ln 2 I): the code's (its latent distribution at zero parameters, scale sqrt(softplus(0))),
    which every official configuration uses; the paper writes N(0, I) (--prior-scale 1).
  - The gradient inputs are of the per-image loss summed over the batch (the code's batch mean differs by
    1/B, which the LayerNorm removes). The loo input is computed in closed form (the code: K mixtures).
  - The paper's batch sizes were spread over 8 GPUs; with another total batch the learning rate is
    scaled by sqrt(batch / paper_batch), as the official configurations do (batch counts all processes).
  - --compile compiles the decoder and the refinement network in place (torch.autograd.grad inside
    the forward pass would split a whole-model graph anyway); checkpoints keep the plain names.

Commands
  GPU, paper configuration (Multi-dSprites-like data, K=6, T=5, batch 128, 1M steps):
    python iodine.py --data shapes --device cuda --dtype bf16
  Tetrominoes (K=4, no LSTM) and CLEVR6 from the DeepMind HDF5 file (128 px, K=7):
    python iodine.py --data tetrominoes
    python iodine.py --data /data/clevr_with_masks.h5 --batch-size 8
  CPU, tiny preset (a smoke test that does not segment yet: see PRESETS and docs/iodine.md):
    python iodine.py --preset tiny
  Several GPUs (or CPU processes with gloo):
    torchrun --nproc_per_node=8 iodine.py --data shapes --batch-size 16
"""
import argparse
import json
import math
import os
import random
import resource
import signal
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange, repeat
from tqdm import tqdm

import data
import losses
import metrics

# --- Arguments

# Per-preset defaults; explicit flags override. None in the parser means "from the preset".
PRESETS = {
    # deepmind-research iodine/configurations.py: 1M steps, lr x 0.1^(step/1M), gradient clip 5, no warm-up
    "paper": dict(steps=1_000_000, warmup_steps=0, decay_steps=1_000_000, grad_clip=5.0, log_every=100,
                  eval_every=5_000, eval_size=320, save_every=5_000),
    # tiny: a smoke test, not a segmenter. Tetrominoes at its native 35 px (other data: 32 px), ~15 minutes on
    # one core; it stays on the colour plateau (FG-ARI ~0; no CPU setting tried left it in 30 minutes,
    # docs/iodine.md), where the paper trains 1M steps at batch 256.
    "tiny": dict(batch_size=16, steps=2_000, lr=1e-3, warmup_steps=0, decay_steps=1_000_000, grad_clip=5.0,
                 latent_dim=16, dec_channels=16, dec_kernel=3, ref_channels=16, ref_kernel=3, ref_layers=3,
                 ref_mlp=[64], log_every=50, eval_every=250, eval_size=64, save_every=500),
}
# Per-data defaults (arXiv 1903.00450 App. B and the official configurations): K, latent size,
# decoder, refinement network, coordinate channels of the refinement inputs, the paper's batch and lr.
SPRITES = dict(resolution=64, num_slots=6, latent_dim=16, dec_channels=32, dec_kernel=5, ref_channels=32,
               ref_kernel=5, ref_layers=3, ref_mlp=[128], lstm_hidden=128, coord="cos", paper_batch=128,
               paper_lr=3e-4)
CLEVR = dict(resolution=128, num_slots=7, latent_dim=64, dec_channels=64, dec_kernel=3, ref_channels=64,
             ref_kernel=3, ref_layers=4, ref_mlp=[256, 256], lstm_hidden=256, coord="linear", paper_batch=32,
             paper_lr=1e-3)
TETROMINOES = {**SPRITES, "resolution": 35, "num_slots": 4, "latent_dim": 32, "lstm_hidden": 0,
               "paper_batch": 256}
DATA_DEFAULTS = {
    "shapes": SPRITES,
    "shapes-colored": {**SPRITES, "num_slots": 5},
    "shapes-binary": {**SPRITES, "num_slots": 4},
    "tetrominoes": TETROMINOES,
    "clevr-lite": CLEVR,  # built-in CLEVR6-like set: CLEVR6's row, rendered at 128
    # Real files, recognised by name: DeepMind HDF5 conversions, ClevrTex; anything else: 64 px sprites sizes.
    "clevr": CLEVR,  # CLEVR6
    "clevrtex": {**CLEVR, "num_slots": 11},
    "objects_room": {**SPRITES, "num_slots": 7},
    "dsprites": SPRITES,
    "tetromino": TETROMINOES,
    "other": {**SPRITES, "num_slots": 7},
}
# Flags that shape the weights: --resume and --eval-only take them from the checkpoint and refuse other values.
ARCH_KEYS = ("resolution", "latent_dim", "dec_channels", "dec_kernel", "ref_channels", "ref_kernel", "ref_layers",
             "ref_mlp", "lstm_hidden", "coord")
# What the papers vary at test time (free under --eval-only), recorded in eval.json.
TEST_KEYS = ("data", "num_slots", "iters", "eval_size")
# Flags of this invocation only, never taken from a checkpoint.
RUNTIME_KEYS = ("resume", "eval_only", "device", "workers", "compile", "out_dir", "run_name", "given")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="IODINE (arXiv 1903.00450): iterative amortised inference.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter, allow_abbrev=False)
    a = p.add_argument
    a("--preset", choices=["paper", "tiny"], default="paper",
      help="paper: the paper's configuration for --data; tiny: a CPU-sized model. Explicit flags override.")
    a("--data", default=None, help="built-in set (%s) or a dataset path (default: shapes; tetrominoes "
      "with --preset tiny)" % ", ".join(data.BUILTIN))
    a("--train-size", type=int, default=None, help="use only the first N training images (None: all)")
    a("--resolution", type=int, default=None, help="image side in pixels (None: preset/data default)")
    a("--num-slots", type=int, default=None, help="number of slots K (None: per data set)")
    a("--iters", type=int, default=5, help="refinement steps T (T+1 decodes)")
    a("--latent-dim", type=int, default=None, help="latent size per slot (z_k), lambda_k has twice as many")
    a("--dec-channels", type=int, default=None, help="decoder conv channels")
    a("--dec-kernel", type=int, default=None, help="decoder conv kernel size (odd)")
    a("--ref-channels", type=int, default=None, help="refinement CNN channels")
    a("--ref-kernel", type=int, default=None, help="refinement CNN kernel size (odd)")
    a("--ref-layers", type=int, default=None, help="refinement CNN layers (each stride 2)")
    a("--ref-mlp", type=int, nargs="+", default=None, help="refinement MLP widths after average pooling")
    a("--lstm-hidden", type=int, default=None, help="refinement LSTM size (0: no LSTM, the Tetrominoes setting)")
    a("--no-lstm", action="store_true", help="drop the refinement LSTM (same as --lstm-hidden 0)")
    a("--coord", choices=["linear", "cos"], default=None,
      help="coordinate channels of the refinement inputs: 2 linear, or 8 cosine basis functions")
    a("--likelihood", choices=["logistic", "gaussian"], default="logistic",  # configurations.py: "logistic"
      help="pixel distribution of each component (logistic: official code; gaussian: common reimplementations)")
    a("--pixel-scale", type=float, default=None,  # configurations.py: scale "fixed", scale_val 0.03
      help="fixed scale of the pixel distribution, images in [0, 1] (None: 0.03 logistic, 0.1 gaussian)")
    a("--prior-scale", type=float, default=math.sqrt(math.log(2)),  # modules/distributions.py get_default_prior
      help="std of the N(0, s^2) latent prior (official code: sqrt(ln 2) = 0.8326; the paper's text: 1)")
    a("--init", choices=["sonnet", "torch"], default="sonnet",
      help="weight initialisation: Sonnet's (official code) or PyTorch's defaults")
    a("--plain-decoder", action="store_true",
      help="tile the latent and convolve it (the textbook computation) instead of the exact broadcast_conv")
    a("--batch-size", type=int, default=None, help="images per step and process (None: the paper's)")
    a("--steps", type=int, default=None, help="total optimiser steps")
    a("--lr", type=float, default=None,
      help="peak Adam learning rate (None: the paper's x sqrt(total batch / paper batch))")
    a("--warmup-steps", type=int, default=None, help="linear learning-rate warm-up, in steps")
    a("--decay-steps", type=int, default=None, help="lr is multiplied by 0.1^(step/decay_steps)")
    a("--grad-clip", type=float, default=None, help="max gradient norm (0: no clipping; paper: 5)")
    a("--seed", type=int, default=0, help="seeds python, numpy, torch and the data order")
    a("--device", choices=["auto", "cpu", "cuda", "mps"], default="auto", help="auto: cuda, then mps, then cpu")
    a("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32",
      help="autocast precision of the convolutions (likelihoods and KL stay fp32)")
    a("--compile", action="store_true", help="torch.compile the decoder and the refinement network")
    a("--workers", type=int, default=0, help="data loader worker processes")
    a("--out-dir", default="runs", help="parent folder of run folders")
    a("--run-name", default=None, help="run folder name (default: iodine-DATA-seedN)")
    a("--log-every", type=int, default=None, help="steps between train log lines")
    a("--eval-every", type=int, default=None, help="steps between evaluations (0: only at the end)")
    a("--eval-size", type=int, default=None, help="held-out images per evaluation")
    a("--save-every", type=int, default=None, help="steps between checkpoints")
    a("--resume", default=None, metavar="CKPT|auto", help="continue a run from its checkpoint (its folder is reused; "
      "flags given here override the checkpoint's); auto: this run folder's checkpoint if there is one, else start")
    a("--eval-only", default=None, metavar="CKPT", help="evaluate a checkpoint, write eval.json, exit")
    args = p.parse_args(argv)
    # the flags this command line gives: under --resume / --eval-only they override the checkpoint's
    args.given = sorted({t[2:].split("=")[0].replace("-", "_") for t in (sys.argv[1:] if argv is None else argv)
                         if t.startswith("--")})


    if args.data is None:
        args.data = "tetrominoes" if args.preset == "tiny" else "shapes"
    key = args.data if args.data in DATA_DEFAULTS else next(
        (k for k in ("clevrtex", "clevr", "objects_room", "dsprites", "tetromino") if k in args.data.lower()), "other")
    defaults = {**DATA_DEFAULTS[key], **PRESETS[args.preset]}
    if args.preset == "tiny" and defaults["resolution"] != 35:
        defaults["resolution"] = 32
    for k, v in defaults.items():
        if k not in ("paper_batch", "paper_lr") and getattr(args, k, None) is None:
            setattr(args, k, v)
    if args.no_lstm:
        args.lstm_hidden = 0
    if args.pixel_scale is None:
        args.pixel_scale = 0.03 if args.likelihood == "logistic" else 0.1
    if args.batch_size is None:
        args.batch_size = defaults["paper_batch"]
    if args.lr is None:  # official configurations: lr x sqrt(batch / paper batch); torchrun's processes count
        total = args.batch_size * int(os.environ.get("WORLD_SIZE", 1))
        args.lr = defaults["paper_lr"] * math.sqrt(total / defaults["paper_batch"])
    positive = ("resolution", "iters", "latent_dim", "dec_channels", "dec_kernel", "ref_channels", "ref_kernel",
                "ref_layers", "batch_size", "steps", "log_every", "save_every", "eval_size", "decay_steps",
                "pixel_scale", "prior_scale")
    for k in positive:
        if getattr(args, k) <= 0:
            p.error(f"--{k.replace('_', '-')} must be positive, got {getattr(args, k)}")
    for k in ("warmup_steps", "grad_clip", "eval_every", "workers", "lr", "lstm_hidden"):
        if getattr(args, k) < 0:
            p.error(f"--{k.replace('_', '-')} must be non-negative, got {getattr(args, k)}")
    if args.num_slots < 2:
        p.error(f"--num-slots must be at least 2 (the leave-one-out input needs another slot), got {args.num_slots}")
    if any(w <= 0 for w in args.ref_mlp):
        p.error(f"--ref-mlp widths must be positive, got {args.ref_mlp}")
    if args.dec_kernel % 2 == 0 or args.ref_kernel % 2 == 0:
        p.error("--dec-kernel and --ref-kernel must be odd (SAME padding)")
    if args.train_size is not None and args.train_size <= 0:
        p.error("--train-size must be positive")
    return args


# --- Model

# The refinement inputs in the order they are concatenated (Table 3; official names in the docstring's table).
SPATIAL_INPUTS = ("image", "means", "masks", "mask_logits", "dmeans", "dlogits", "posterior", "log_px", "loo",
                  "coords", "capacity")
FLAT_INPUTS = ("lam", "dlam", "flat_capacity")
POSTERIOR_EPS = 1e-6  # deepmind-research iodine/modules/iodine.py _get_mask_posterior: p_k / (sum_j p_j + 1e-6)


def coordinate_channels(h, w, kind="linear", freqs=3, device=None):
    """Coordinate channels (C, h, w): "linear" is [y, x] in [-1, 1]; "cos" the 2-D cosine basis
    cos(f_y y) cos(f_x x), x, y in [0, pi], f in 0..freqs-1, without the constant one (freqs^2 - 1)."""
    if kind == "linear":
        y, x = torch.meshgrid(torch.linspace(-1, 1, h, device=device), torch.linspace(-1, 1, w, device=device),
                              indexing="ij")
        return torch.stack([y, x])  # (2, h, w)
    f = torch.arange(freqs, dtype=torch.float32, device=device)
    cy = torch.cos(torch.linspace(0, math.pi, h, device=device)[:, None] * f)  # (h, F)
    cx = torch.cos(torch.linspace(0, math.pi, w, device=device)[:, None] * f)  # (w, F)
    basis = torch.einsum("hf,wg->fghw", cy, cx).reshape(freqs * freqs, h, w)  # (F*F, h, w)
    return basis[1:]  # (F*F - 1, h, w)


def pixel_log_likelihood(x, means, kind="logistic", scale=0.03):
    """Per-slot, per-pixel log-likelihood with channels independent given the slot, (B, K, H, W) from
    x (B, C, H, W) and means (B, K, C, H, W). "logistic" (the official configurations, fixed scale s = 0.03):
    sum_c [-u - log s - 2 softplus(-u)], u = (x_c - mu_kc) / s; "gaussian": log N(x; mu_k, s^2 I)."""
    if kind == "gaussian":
        return losses.gaussian_log_likelihood(x, means, scale)
    u = (x[:, None] - means) / scale  # (B, K, C, H, W)
    return (-u - math.log(scale) - 2 * F.softplus(-u)).sum(dim=2)


def sonnet_init_(module):
    """Sonnet 1's default initialisation, which the official code uses: weights truncated normal (at 2 std)
    with std 1/sqrt(fan_in), biases 0; LSTM gate weights and biases at std 1/sqrt(input + hidden), plus
    Sonnet's forget_bias 1 (added in its forward pass; a learned bias started 1 higher is the same model)."""
    def trunc_(t, std):
        nn.init.trunc_normal_(t, std=std, a=-2 * std, b=2 * std)
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            trunc_(m.weight, 1 / math.sqrt(m.weight[0].numel()))  # fan_in = in_channels * k * k, or in_features
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LSTMCell):
            std = 1 / math.sqrt(m.input_size + m.hidden_size)
            for t in (m.weight_ih, m.weight_hh, m.bias_ih):
                trunc_(t, std)
            nn.init.zeros_(m.bias_hh)  # PyTorch has two bias vectors; Sonnet one
            with torch.no_grad():
                m.bias_ih[m.hidden_size:2 * m.hidden_size] += 1.0  # forget gate (PyTorch order i, f, g, o)


def broadcast_conv(conv, z, coords):
    """conv(cat[tile(z), coords]) without tiling z (exact; --plain-decoder does the plain computation).

    A tiled latent is constant in space and the convolution is linear, so with W = [W_z, W_P]:
        conv(cat[tile(z), P])[n, o, p] = conv_{W_P}(P)[o, p] + b_o + sum_c z_nc R[o, c, p],
        R[o, c, p] = sum of the taps of W_z[o, c] that fall inside the image around output pixel p
    (the summed kernel in the interior, fewer taps within k//2 of a zero-padded border). conv_{W_P}(P) runs
    once at batch 1; the z part is one (N, C) x (C, O*H*W) product instead of a k*k-tap convolution.
    conv: nn.Conv2d with stride 1 and any zero padding; z (N, C); coords (P, H, W). Returns (N, O, H', W')."""
    c, k, pad = z.shape[1], conv.kernel_size[0], conv.padding[0]

    def inside(n):  # (n_out, k): 1 where the tap reads a pixel of the image, 0 where it reads zero padding
        pos = torch.arange(n + 2 * pad - k + 1, device=z.device)[:, None] + torch.arange(k, device=z.device) - pad
        return ((pos >= 0) & (pos < n)).to(z.dtype)

    r = torch.einsum("ocij,yi,xj->cyxo", conv.weight[:, :c], inside(coords.shape[1]), inside(coords.shape[2]))
    base = F.conv2d(coords[None].to(z.dtype), conv.weight[:, c:], conv.bias, padding=pad)  # (1, O, H', W')
    out = base.permute(0, 2, 3, 1) + torch.einsum("nc,cyxo->nyxo", z, r)  # r (C, H', W', O) -> (N, H', W', O)
    return out.permute(0, 3, 1, 2)  # (N, O, H', W'), channels-last in memory like the convolutions after it


class BroadcastDecoder(nn.Module):
    """Spatial broadcast decoder (App. B): [z, 5.0] tiled to H x W, + [y, x] in [-1, 1], 4 x conv SAME ELU,
    conv -> 4 channels (RGB mean, mask logit). The constant unit 5.0 is the official decode()'s ("legacy").
    Every slot is decoded independently as part of B*K."""

    def __init__(self, latent_dim, channels, kernel, resolution, plain=False):
        super().__init__()
        self.resolution, self.plain = resolution, plain
        self.register_buffer("coords", coordinate_channels(resolution, resolution), persistent=False)  # (2, H, W)
        layers, c = [], latent_dim + 1 + 2
        for _ in range(4):
            layers += [nn.Conv2d(c, channels, kernel, padding=kernel // 2), nn.ELU()]
            c = channels
        layers += [nn.Conv2d(channels, 4, kernel, padding=kernel // 2)]
        self.cnn = nn.Sequential(*layers)

    def forward(self, z):
        b, k, _ = z.shape
        z = torch.cat([z, torch.full_like(z[..., :1], 5.0)], dim=-1).flatten(0, 1)  # (B*K, Z+1)
        if self.plain:  # the textbook computation: tile, append the coordinates, convolve
            x = repeat(z, "n d -> n d h w", h=self.resolution, w=self.resolution)  # (B*K, Z+1, H, W)
            x = self.cnn[0](torch.cat([x, self.coords.expand(len(z), -1, -1, -1).to(x.dtype)], dim=1))
        else:
            x = broadcast_conv(self.cnn[0], z, self.coords)  # (B*K, channels, H, W), the same numbers
        x = rearrange(self.cnn[1:](x).contiguous(), "(b k) c h w -> b k c h w", b=b)  # (B, K, 4, H, W)
        return x[:, :, :3], x[:, :, 3]  # means (B, K, 3, H, W), mask logits (B, K, H, W)


class RefinementNetwork(nn.Module):
    """f_phi (Sec. 2.2, Fig. 3): strided ELU CNN over the image-sized inputs, average pooling, MLP;
    then [h, flat inputs], the LSTM (optional) and a linear head giving the update of lambda."""

    def __init__(self, in_channels, flat_dim, lam_dim, channels, kernel, layers, mlp, lstm_hidden):
        super().__init__()
        convs, c = [], in_channels
        for _ in range(layers):
            convs += [nn.Conv2d(c, channels, kernel, stride=2, padding=kernel // 2), nn.ELU()]
            c = channels
        self.cnn = nn.Sequential(*convs)
        widths, mlp_layers = [channels, *mlp], []
        for i in range(len(mlp)):  # ELU between layers, none after the last (the code's snt MLP)
            mlp_layers += [nn.Linear(widths[i], widths[i + 1])] + ([nn.ELU()] if i < len(mlp) - 1 else [])
        self.mlp = nn.Sequential(*mlp_layers)
        self.lstm = nn.LSTMCell(mlp[-1] + flat_dim, lstm_hidden) if lstm_hidden else None
        self.head = nn.Linear(lstm_hidden or mlp[-1] + flat_dim, lam_dim)

    def forward(self, spatial, flat, state=None):
        """spatial (B*K, C, H, W); flat (B*K, F); state: LSTM (h, c) or None. Returns (update, state)."""
        h = self.mlp(self.cnn(spatial).mean(dim=(2, 3)))  # average pool: (B*K, channels) -> (B*K, mlp[-1])
        h = torch.cat([h, flat.to(h.dtype)], dim=1)  # (B*K, mlp[-1] + F)
        if self.lstm is not None:
            state = self.lstm(h, state)
            h = state[0]  # (B*K, lstm_hidden)
        return self.head(h), state


def logsumexp_others(v):
    """log sum_{j != k} exp(v_j) for every k along dim 1, exactly and in O(K): the log-sum-exp of the
    slots before k (exclusive prefix) log-added to that of the slots after k (exclusive suffix)."""
    pad = torch.full_like(v[:, :1], -math.inf)
    before = torch.cat([pad, v.logcumsumexp(dim=1)[:, :-1]], dim=1)  # LSE_{j<k}, (B, K, ...)
    after = torch.cat([v.flip(1).logcumsumexp(dim=1).flip(1)[:, 1:], pad], dim=1)  # LSE_{j>k}, (B, K, ...)
    return torch.logaddexp(before, after)


def leave_one_out_log_likelihood(mask_logits, log_lik):
    """log p(x | z_{j != k}): the mixture without slot k, its masks renormalised over the other slots,

        log sum_{j != k} softmax_{j != k}(a)_j p(x | mu_j) = LSE_{j != k}(a_j + l_j) - LSE_{j != k}(a_j),

    in closed form from the per-slot log-likelihoods l (B, K, H, W) and mask logits a (B, K, H, W)."""
    return logsumexp_others(mask_logits + log_lik) - logsumexp_others(mask_logits)  # (B, K, H, W)


def mask_posterior(log_lik):
    """p(x | mu_k) / (sum_j p(x | mu_j) + eps) (B, K, H, W), the official form, computed stably as
    softmax_k(l) * S / (S + eps) = softmax_k(l) * sigmoid(log S - log eps) with log S = LSE_j(l_j)."""
    return log_lik.softmax(dim=1) * torch.sigmoid(log_lik.logsumexp(dim=1, keepdim=True) - math.log(POSTERIOR_EPS))


class IODINE(nn.Module):
    """Decoder + refinement network + learned initial posterior; forward runs the T refinement steps."""

    def __init__(self, resolution=64, num_slots=6, latent_dim=16, dec_channels=32, dec_kernel=5, ref_channels=32,
                 ref_kernel=5, ref_layers=3, ref_mlp=(128,), lstm_hidden=128, coord="cos", iters=5,
                 likelihood="logistic", pixel_scale=0.03, prior_scale=math.sqrt(math.log(2)), init="sonnet",
                 plain_decoder=False):
        super().__init__()
        self.num_slots, self.latent_dim, self.iters = num_slots, latent_dim, iters
        self.likelihood, self.pixel_scale, self.prior_logvar = likelihood, pixel_scale, 2 * math.log(prior_scale)
        self.decoder = BroadcastDecoder(latent_dim, dec_channels, dec_kernel, resolution, plain_decoder)
        self.register_buffer("coords", coordinate_channels(resolution, resolution, coord), persistent=False)
        # Spatial inputs per slot: image 3, means 3, mask 1, mask logit 1, dmeans 3, dlogit 1, posterior 1,
        # log p(x) 1, leave-one-out 1, coordinates, capacity 1; flat: lambda 2Z, dL/dlambda 2Z, capacity 1.
        self.refine = RefinementNetwork(16 + self.coords.shape[0], 4 * latent_dim + 1, 2 * latent_dim, ref_channels,
                                        ref_kernel, ref_layers, list(ref_mlp), lstm_hidden)
        if init == "sonnet":
            sonnet_init_(self)
        bound = math.sqrt(3 / (2 * latent_dim))  # Glorot-uniform of a (2Z,) variable, as tf.get_variable
        self.lambda0 = nn.Parameter(torch.empty(2 * latent_dim).uniform_(-bound, bound))  # (mu, s), all slots
        # LayerNorm of the stop-gradient inputs (Sec. 2.2): over (C, H, W) of each slot, per-channel affine
        # (GroupNorm with one group is exactly snt.LayerNorm on (H*W, C)); over the 2Z entries for dL/dlambda.
        self.norms = nn.ModuleDict({"dmeans": nn.GroupNorm(1, 3), "dlogits": nn.GroupNorm(1, 1),
                                    "log_px": nn.GroupNorm(1, 1), "loo": nn.GroupNorm(1, 1)})
        self.norm_dlam = nn.LayerNorm(2 * latent_dim)
        self.to(memory_format=torch.channels_last)  # conv weights NHWC: the convolutions run ~1.25x faster on CPU

    def decode(self, image, lam, noise):
        """Sample z_k = mu_k + sqrt(softplus(s_k)) eps, decode, and score: the per-image NLL and KL (B,)."""
        mu, s = lam.float().chunk(2, dim=-1)  # (B, K, Z) each
        var = F.softplus(s)
        z = mu + var.sqrt() * noise  # (B, K, Z), reparameterised
        means, logits = self.decoder(z)  # (B, K, 3, H, W), (B, K, H, W)
        log_lik = pixel_log_likelihood(image, means.float(), self.likelihood, self.pixel_scale)  # (B, K, H, W)
        log_px = torch.logsumexp(F.log_softmax(logits.float(), dim=1) + log_lik, dim=1)  # (B, H, W) mixture
        nll = -log_px.flatten(1).sum(dim=1)  # (B,)
        kl = losses.kl_diag_gaussian(mu, var.log(), 0.0, self.prior_logvar).sum(dim=(1, 2))  # (B,)
        return dict(means=means, logits=logits, log_lik=log_lik, log_px=log_px, nll=nll, kl=kl, mu=mu)

    def decode_with_grads(self, image, lam, noise, refine):
        """One decode and, if a refinement follows, the first-order gradients dL/d(means, mask logits, lambda)
        of its loss L = sum_b (NLL + KL) (constants: no second-order graph). Training keeps the graph of the
        decode for the final loss; evaluation (no_grad) builds a graph from this lambda alone, frees it at once,
        and returns detached values."""
        training = torch.is_grad_enabled()
        with torch.set_grad_enabled(training or refine):
            if refine and not training:
                lam = lam.detach().requires_grad_()
            dec = self.decode(image, lam, noise)
            grads = torch.autograd.grad((dec["nll"] + dec["kl"]).sum(), [dec["means"], dec["logits"], lam],
                                        retain_graph=training) if refine else None
        return (dec if training else {k: v.detach() for k, v in dec.items()}), grads

    def refinement_inputs(self, image, lam, dec, grads):
        """The inputs a_k of Table 3 by name: spatial (B, K, C, H, W), flat (B, K, F). The gradient, log p(x)
        and leave-one-out inputs are stop-gradient and LayerNorm-ed."""
        dmeans, dlogits, dlam = grads  # constants: autograd.grad without create_graph
        b, k, h, w = dec["logits"].shape
        with torch.no_grad():
            log_px = dec["log_px"].unsqueeze(1)  # (B, 1, H, W)
            loo = log_px - leave_one_out_log_likelihood(dec["logits"].float(), dec["log_lik"])  # (B, K, H, W)

        def norm(name, x):  # LayerNorm over (C, H, W) of each slot's map
            return self.norms[name](x.flatten(0, 1).float()).view(x.shape)

        expand = lambda x: x.expand(b, k, *x.shape[2:])  # noqa: E731  (B, 1, ...) -> (B, K, ...)
        half = image.new_full((1, 1, 1), 0.5)  # the official constant "capacity" inputs (0.5, "legacy")
        return dict(
            image=expand(image.unsqueeze(1)), means=dec["means"], masks=dec["logits"].softmax(dim=1).unsqueeze(2),
            mask_logits=dec["logits"].unsqueeze(2), dmeans=norm("dmeans", dmeans),
            dlogits=norm("dlogits", dlogits.unsqueeze(2)), posterior=mask_posterior(dec["log_lik"]).unsqueeze(2),
            log_px=expand(self.norms["log_px"](log_px).unsqueeze(1)), loo=norm("loo", loo.unsqueeze(2)),
            coords=self.coords.expand(b, k, -1, -1, -1), capacity=half.expand(b, k, 1, h, w),
            lam=lam, dlam=self.norm_dlam(dlam.float()), flat_capacity=half.expand(b, k, 1))

    def forward(self, image, noise=None, keep_inputs=False):
        """image (B, 3, H, W) in [0, 1]; noise: optional (T+1, B, K, Z) standard normal draws. The IODINE loop
        (Sec. 2.2): decode lambda^t, score it, feed the feedback a^t to f_phi, add the update; T times."""
        b = image.shape[0]
        if noise is None:
            noise = torch.randn(self.iters + 1, b, self.num_slots, self.latent_dim, device=image.device)
        lam = repeat(self.lambda0, "p -> b k p", b=b, k=self.num_slots)  # lambda^0: one learned vector, all slots
        state, decodes, inputs = None, [], []
        for t in range(self.iters + 1):
            dec, grads = self.decode_with_grads(image, lam, noise[t], refine=t < self.iters)
            decodes.append(dec)
            if t == self.iters:
                break
            a = self.refinement_inputs(image, lam, dec, grads)
            spatial = torch.cat([a[n] for n in SPATIAL_INPUTS], dim=2).flatten(0, 1)  # (B*K, C, H, W)
            flat = torch.cat([a[n] for n in FLAT_INPUTS], dim=-1).flatten(0, 1)  # (B*K, 4Z + 1)
            update, state = self.refine(spatial, flat, state)
            lam = lam + update.float().view_as(lam)  # lambda_k <- lambda_k + f_phi(z_k, x, a_k)
            inputs.append(a)
        return self.outputs(decodes, inputs if keep_inputs else None)

    @staticmethod
    def outputs(decodes, inputs=None):
        """The last decode (recon, means, masks, mask logits, per-slot log-likelihoods, posterior means "slots"),
        per-step NLL and KL (T+1, B), per-step masks (detached) and, if kept, each step's refinement inputs."""
        last = decodes[-1]
        masks, means = last["logits"].float().softmax(dim=1), last["means"].float()  # (B, K, H, W), (B, K, 3, H, W)
        out = dict(recon=(masks.unsqueeze(2) * means).sum(dim=1), means=means, masks=masks,
                   mask_logits=last["logits"], log_lik=last["log_lik"], slots=last["mu"],
                   nll=torch.stack([d["nll"] for d in decodes]), kl=torch.stack([d["kl"] for d in decodes]),
                   iter_masks=[d["logits"].detach().float().softmax(dim=1) for d in decodes])
        if inputs is not None:
            out["inputs"] = inputs
        return out


def build_model(args):
    return IODINE(args.resolution, args.num_slots, args.latent_dim, args.dec_channels, args.dec_kernel,
                  args.ref_channels, args.ref_kernel, args.ref_layers, args.ref_mlp, args.lstm_hidden, args.coord,
                  args.iters, args.likelihood, args.pixel_scale, args.prior_scale, args.init, args.plain_decoder)


# --- Objective


def iteration_weights(iters):
    """(t / T) for t = 0..T: the initial decode counts 0, the last 1 (official "linspace")."""
    return torch.linspace(0, 1, iters + 1)


def compute_loss(out, image, args):
    """Named loss terms and their total (arXiv 1903.00450 eq. 5 with the code's linspace weights):

    loss = sum_{t=0..T} (t/T) (NLL_t + KL_t),  NLL_t = -sum_pixels log sum_k m_k p(x | mu_k),
    KL_t = sum_k KL(q(z_k | lambda_k^t) || N(0, s^2 I)); each averaged over the batch.
    nll_t and kl_t are logged for every step; mse is that of the final reconstruction.
    """
    nll, kl = out["nll"].float().mean(dim=1), out["kl"].float().mean(dim=1)  # (T+1,)
    w = iteration_weights(args.iters).to(nll.device)  # (T+1,)
    terms = {f"nll_{t}": nll[t] for t in range(len(nll))} | {f"kl_{t}": kl[t] for t in range(len(kl))}
    terms["mse"] = F.mse_loss(out["recon"].float(), image).detach()
    terms["loss"] = (w * (nll + kl)).sum()
    return terms


# --- Training

EXIT_PREEMPTED = 3  # exit status of a run stopped by a signal after writing its checkpoint (requeue it)


def lr_at(step, args):
    """Linear warm-up (0 steps in the paper) times 0.1^(step/decay_steps) (the official exponential decay)."""
    warm = min(1.0, (step + 1) / args.warmup_steps) if args.warmup_steps else 1.0
    return args.lr * warm * 0.1 ** (step / args.decay_steps)


def pick_device(name, local_rank):
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise data.DataError("--device cuda asked for, but no CUDA device is available")
        return torch.device("cuda", local_rank)
    if name == "mps" and not torch.backends.mps.is_available():
        raise data.DataError("--device mps asked for, but MPS is not available")
    return torch.device(name)


def load_checkpoint(path):
    """Weights-only load: a file that needs arbitrary unpickling is refused, never executed."""
    path = Path(path)
    if not path.is_file():
        raise data.DataError(f"{path}: checkpoint not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # UnpicklingError for hostile files, RuntimeError for corrupt ones
        raise data.DataError(f"{path}: not a weights-only checkpoint ({type(e).__name__}); refusing to load it")


def save_checkpoint(path, model, opt, scaler, step, args, rng):
    """Atomically (temporary file, then rename): a crash or a kill never leaves a half-written checkpoint."""
    state = dict(model=model.state_dict(), optimizer=opt.state_dict(), scaler=scaler.state_dict(),
                 step=step, args=vars(args), **rng)
    tmp = path.with_suffix(".tmp")
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)  # a full disk leaves no partial file behind


def rng_states(device, world, group):
    """Every rank's torch RNG states as (world, n) uint8 tensors: a resumed run continues each rank's stream."""
    states = {"rng_torch": torch.get_rng_state()}
    if device.type == "cuda":
        states["rng_cuda"] = torch.cuda.get_rng_state(device)
    if world == 1:
        return {k: v[None] for k, v in states.items()}
    for k, mine in states.items():
        every = [torch.empty_like(mine) for _ in range(world)]
        torch.distributed.all_gather(every, mine, group=group)
        states[k] = torch.stack(every)
    return states


def open_run(args, name):
    """(run folder, checkpoint or None) for --eval-only CKPT, --resume CKPT, --resume auto or a fresh run."""
    if args.eval_only or args.resume not in (None, "auto"):
        path = Path(args.eval_only or args.resume)
        return path.parent, load_checkpoint(path)
    run_dir = Path(args.out_dir) / (args.run_name or name)
    if not (run_dir / "checkpoint.pt").exists():
        return run_dir, None  # --resume auto with nothing to resume starts fresh: a requeued job reruns as is
    if args.resume != "auto":
        raise data.DataError(f"{run_dir} already holds a run; pass --resume auto to continue it, or another --run-name")
    return run_dir, load_checkpoint(run_dir / "checkpoint.pt")


def checkpoint_args(args, saved):
    """--resume and --eval-only continue the checkpoint's configuration. A flag given on this command line
    overrides it (what the papers vary at test time: --data, --num-slots, --iters, --eval-size; or --steps to
    extend a run), except a flag that shapes the weights (ARCH_KEYS): the checkpoint's value wins."""
    for k, v in saved.items():
        if k in RUNTIME_KEYS or not hasattr(args, k) or (k in args.given and k not in ARCH_KEYS):
            continue
        if k in args.given and getattr(args, k) != v:
            print(f"note: --{k.replace('_', '-')} {getattr(args, k)} ignored: the checkpoint's weights need {v}")
        setattr(args, k, v)


def start_log(run_dir, step):
    """metrics.jsonl opened for appending, holding exactly the lines up to `step` (the checkpoint's; 0 for a
    fresh run): a killed run may have logged past its last checkpoint, and a hard kill can tear the last line.
    Sample grids and eval.json from beyond `step` go too, so a resumed run holds every step once."""
    path, kept = run_dir / "metrics.jsonl", []
    for line in (path.read_text().splitlines() if path.exists() else []):
        try:
            if json.loads(line)["step"] > step:
                break
        except (ValueError, KeyError, TypeError):  # a torn line: what follows is newer than the checkpoint
            break
        kept.append(line + "\n")
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(kept))
    os.replace(tmp, path)
    for grid in (run_dir / "samples").glob("step_*.png"):
        if int(grid.stem[len("step_"):]) > step:
            grid.unlink()
    final = run_dir / "eval.json"
    try:
        stale = final.exists() and json.loads(final.read_text())["step"] > step
    except (ValueError, KeyError, TypeError):
        stale = True
    if stale:
        final.unlink()
    return open(path, "a")


class Preempted(Exception):
    """A stop signal arrived: the step finished and the checkpoint is written (exit status EXIT_PREEMPTED)."""


def catch_stop_signals():
    """SIGTERM and SIGUSR1 (a cluster's preemption notices) and SIGINT (Ctrl-C) only raise a flag: the loop
    finishes its step, writes the checkpoint and exits. A second Ctrl-C interrupts at once.
    Returns the list the handlers append to and a function that restores the previous handlers."""
    caught = []

    def handler(signum, frame):
        if signum == signal.SIGINT and caught:
            raise KeyboardInterrupt
        caught.append(signum)

    if threading.current_thread() is not threading.main_thread():
        return caught, lambda: None  # signal handlers can only be set from the main thread
    old = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)}
    return caught, lambda: [signal.signal(s, h) for s, h in old.items()]


def reduce_max(flags, world, group=None):
    """Elementwise max of a small tensor over the ranks, so that every rank takes the same decision."""
    if world > 1:
        torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX, group=group)
    return flags


def stop_requested(caught, world, group):
    """True on every rank at the same step once any rank caught a stop signal (no collective on one process)."""
    return bool(caught) if world == 1 else reduce_max(torch.tensor([len(caught)]), world, group).item() > 0


def autocast(device, dtype):
    dt = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    return torch.autocast(device.type, dtype=dt, enabled=dt is not None)


def plateau_diagnostics(true_mask, masks, log_lik, num_background):
    """Two per-image (B,) measures that move before FG-ARI does. mask_std: the std of each slot's mask over the
    pixels, averaged over slots (0 for uniform masks, the colour plateau). colour_fg_ari: FG-ARI of the colour
    posterior, each pixel assigned to argmax_k p(x | mu_k), the slot whose mean explains its colour best."""
    return {"mask_std": masks.flatten(2).float().std(dim=2).mean(dim=1),  # (B, K, H*W) -> (B,)
            "colour_fg_ari": metrics.fg_ari(true_mask, log_lik, num_background)}


@torch.no_grad()
def evaluate(model, dataset, args, device, split_seed=1234):
    """Segmentation metrics of the last decode's masks, FG-ARI after every refinement step, the plateau
    diagnostics, and the final MSE and NLL on the first `eval_size` images of `dataset`. RNG is forked so
    evaluation never changes training."""
    model.eval()
    n = min(args.eval_size, len(dataset))
    loader = data.make_loader(torch.utils.data.Subset(dataset, range(n)), args.batch_size, shuffle=False)
    per_image, first = {}, None
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(split_seed)
        for batch in loader:
            image = batch["image"].to(device)
            with autocast(device, args.dtype):
                out = model(image)
            m = {"mse": ((out["recon"] - image) ** 2).mean(dim=(1, 2, 3)), "nll": out["nll"][-1].float()}
            if first is None:
                first = (image, out)
            if dataset_has_masks(dataset):
                nb, true = base(dataset).num_background, batch["mask"]
                m |= metrics.segmentation_metrics(true, out["masks"].cpu(), nb)
                m |= plateau_diagnostics(true, out["masks"].cpu(), out["log_lik"].cpu(), nb)
                for t, masks_t in enumerate(out["iter_masks"]):  # the refinement at work
                    m[f"fg_ari_iter_{t}"] = metrics.fg_ari(true, masks_t.cpu(), nb)
            for k, v in m.items():
                per_image.setdefault(k, []).append(v.cpu())
    model.train()
    return metrics.average_metrics({k: torch.cat(v) for k, v in per_image.items()}), first


def eval_settings(args):
    """The test-time settings eval.json records next to the metrics."""
    return {k: getattr(args, k) for k in TEST_KEYS}


def base(dataset):
    """The dataset under a Subset (for its attributes)."""
    return dataset.dataset if isinstance(dataset, torch.utils.data.Subset) else dataset


def dataset_has_masks(dataset):
    return getattr(base(dataset), "has_masks", True)


def write_samples(path, image, out):
    """The final decomposition: input, reconstruction, argmax of the masks, the colour posterior
    argmax_k p(x | mu_k), each slot's mean under its mask."""
    data.save_grid(path, image.cpu(), out["recon"].clamp(0, 1).cpu(), out["masks"].cpu(),
                   out["means"].clamp(0, 1).cpu(), extra_masks=[out["log_lik"].cpu()])


def peak_memory_mb(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # resident set of the process, MiB


def main(argv=None):
    args = parse_args(argv)
    try:
        _main(args)
    except (data.DataError, FloatingPointError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except Preempted as e:
        if int(os.environ.get("RANK", 0)) == 0:
            print(f"preempted: {e}", file=sys.stderr)
        sys.exit(EXIT_PREEMPTED)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    finally:
        if torch.distributed.is_initialized():  # the group _main set up under torchrun, error exits too:
            torch.distributed.destroy_process_group()  # a rank leaving it standing can abort at exit


def _main(args):
    # Distributed: torchrun sets WORLD_SIZE / RANK / LOCAL_RANK.
    world = int(os.environ.get("WORLD_SIZE", 1))
    rank, local_rank = int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0))
    device = pick_device(args.device, local_rank)
    cpu_group = None  # stop flags and RNG states travel on the CPU (gloo), never waiting for the GPU
    if world > 1:
        if not torch.distributed.is_initialized():  # else the caller set it up (tests do)
            torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
        cpu_group = torch.distributed.new_group(backend="gloo") if device.type == "cuda" else None
    is_main = rank == 0

    run_dir, ckpt = open_run(args, f"iodine-{Path(args.data).stem}-seed{args.seed}")
    if ckpt is not None:
        checkpoint_args(args, ckpt["args"])
    step = ckpt["step"] if ckpt is not None and not args.eval_only else 0
    random.seed(args.seed + rank)
    np.random.seed(args.seed + rank)
    torch.manual_seed(args.seed + rank)  # posterior noise differs across ranks, as in a bigger batch

    test_ds = data.make_dataset(args.data, "test", args.resolution)

    model = build_model(args).to(device)
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
    n_params = sum(p.numel() for p in model.parameters())

    if args.eval_only:
        if is_main:
            result, _ = evaluate(model, test_ds, args, device)
            result = {"step": ckpt["step"], **eval_settings(args), **result}
            (run_dir / "eval.json").write_text(json.dumps(result, indent=2))
            print(json.dumps(result))
        return model
    if step >= args.steps:
        if is_main:
            print(f"{run_dir} is complete at step {step} (--steps {args.steps}); nothing to do")
        return model

    data_opts = {"size": args.train_size} if args.train_size and args.data in data.BUILTIN else {}
    train_ds = data.make_dataset(args.data, "train", args.resolution, **data_opts)
    if args.train_size and args.data not in data.BUILTIN:
        train_ds = torch.utils.data.Subset(train_ds, range(min(args.train_size, len(train_ds))))
    eval_ds = data.make_dataset(args.data, "val", args.resolution)
    if is_main:  # bad data failed above and wrote nothing; an unwritable output folder fails here, before training
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "args.json").write_text(json.dumps(vars(args), indent=2))
        except OSError as e:
            raise data.DataError(f"{run_dir}: cannot write the run folder ({e.strerror})")

    opt = torch.optim.Adam(model.parameters(), lr=args.lr, betas=(0.95, 0.999))  # beta1 0.95 (paper)
    scaler = torch.amp.GradScaler(device.type, enabled=args.dtype == "fp16")
    if ckpt is not None:
        opt.load_state_dict(ckpt["optimizer"])
        scaler.load_state_dict(ckpt["scaler"])
        if len(ckpt["rng_torch"]) == world:  # each rank continues its own random stream
            torch.set_rng_state(ckpt["rng_torch"][rank].clone())  # clone: torch 2.13 segfaults on a row view
            if device.type == "cuda" and "rng_cuda" in ckpt:
                torch.cuda.set_rng_state(ckpt["rng_cuda"][rank].clone(), device)
        elif is_main:
            print(f"note: the checkpoint was written by {len(ckpt['rng_torch'])} process(es), this run has {world}: "
                  f"the random streams restart from --seed")
    plain = model  # checkpoints hold the plain module's weights
    if args.compile:  # in place: state_dict names stay those of the plain module
        model.decoder.compile()
        model.refine.compile()
    if world > 1:
        model = nn.parallel.DistributedDataParallel(model, device_ids=[local_rank] if device.type == "cuda" else None)

    if is_main:
        print(f"device {device} | {n_params / 1e6:.2f}M parameters | run folder {run_dir}"
              + (f" | resumed at step {step}" if step else ""))
    log = start_log(run_dir, step) if is_main else None

    def write(record):
        log.write(json.dumps(record) + "\n")
        log.flush()

    loader = data.make_loader(train_ds, args.batch_size, shuffle=True, seed=args.seed, workers=args.workers,
                              distributed=world > 1, start_step=step)
    batches = iter(loader)
    bar = tqdm(total=args.steps, initial=step, disable=not is_main, dynamic_ncols=True)
    sums, n_sum, t0, fg_ari = {}, 0, time.time(), float("nan")
    bad_step = torch.zeros((), dtype=torch.long, device=device)
    bad_terms = torch.zeros(2 * (args.iters + 1) + 2, dtype=torch.bool, device=device)  # nll_t, kl_t, mse, loss
    caught, restore_signals = catch_stop_signals()
    model.train()
    try:
        while step < args.steps:
            image = next(batches)["image"].to(device, non_blocking=True)
            lr = lr_at(step, args)
            for g in opt.param_groups:
                g["lr"] = lr
            with autocast(device, args.dtype):
                out = model(image)
            terms = compute_loss(out, image, args)
            opt.zero_grad(set_to_none=True)
            scaler.scale(terms["loss"]).backward()
            if args.grad_clip > 0:
                scaler.unscale_(opt)
                nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
            scaler.step(opt)
            scaler.update()
            step += 1
            for k, v in terms.items():  # summed on the device: no host sync inside the step
                sums[k] = sums.get(k, 0.0) + v.detach()
            n_sum += 1
            # first step with a non-finite term, and which terms, tracked on the device (0: none yet); after it
            # the weights are broken and every term goes non-finite, so the culprit is kept from that step
            finite = torch.stack([torch.isfinite(v.detach()) for v in terms.values()])  # (n_terms,)
            new_bad = ~finite.all() & (bad_step == 0)
            bad_terms = torch.where(new_bad, ~finite, bad_terms)
            bad_step = torch.where(new_bad, step, bad_step)

            last = step == args.steps
            stop = stop_requested(caught, world, cpu_group) and not last
            save = step % args.save_every == 0 or last or stop
            if step % args.log_every == 0 or save:
                # every rank stops on a non-finite term of any rank (a lone rank would hang the others),
                # and before a checkpoint could store the broken weights
                bad = reduce_max(torch.cat([bad_step[None], bad_terms.long()]), world).tolist()  # (1 + T,)
                if bad[0]:
                    names = [k for k, b in zip(terms, bad[1:]) if b]
                    term = next((k for k in names if k != "loss"), names[0])  # a named term before the total
                    raise FloatingPointError(f"non-finite loss term {term!r} at step {bad[0]}; stopped, "
                                             f"last good checkpoint kept in {run_dir}")
                if is_main and (step % args.log_every == 0 or last):
                    means = {k: (v / n_sum).item() for k, v in sums.items()}
                    dt = time.time() - t0
                    write({"step": step, "split": "train", **means, "lr": lr,
                           "images_per_s": n_sum * args.batch_size * world / dt, "peak_mem_mb": peak_memory_mb(device)})
                    bar.set_postfix(loss=f"{means['loss']:.1f}", img_s=f"{n_sum * args.batch_size * world / dt:.0f}",
                                    fg_ari=f"{fg_ari:.3f}")
                    sums, n_sum, t0 = {}, 0, time.time()
            if is_main and not stop and ((args.eval_every and step % args.eval_every == 0) or last):
                t_eval = time.time()
                result, (image_s, out_s) = evaluate(plain, test_ds if last else eval_ds, args, device)
                fg_ari = result.get("fg_ari", float("nan"))
                write({"step": step, "split": "eval", **result})
                write_samples(run_dir / "samples" / f"step_{step:07d}.png", image_s, out_s)
                if last:
                    (run_dir / "eval.json").write_text(json.dumps({"step": step, **eval_settings(args), **result},
                                                                  indent=2))
                t0 += time.time() - t_eval  # evaluation time does not count against images/s
            if save:
                rng = rng_states(device, world, cpu_group)  # a collective: every rank
                if is_main:
                    save_checkpoint(run_dir / "checkpoint.pt", plain, opt, scaler, step, args, rng)
            if stop:
                if world > 1:
                    torch.distributed.barrier()  # the checkpoint is on disk before any rank exits
                raise Preempted(f"stopped by a signal at step {step}, checkpoint written in {run_dir}; "
                                f"rerun the same command with --resume auto to continue")
            bar.update(1)
    finally:
        restore_signals()
        bar.close()
        if log:
            log.close()
    if world > 1:
        torch.distributed.barrier()  # rank 0's last evaluation and checkpoint are written when any rank returns
    return plain


if __name__ == "__main__":
    main()
