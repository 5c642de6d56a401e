"""MONet, with the loss ablations of arXiv 2310.03273 and mask-binarisation diagnostics.

Papers
  Burgess et al., "MONet: Unsupervised Scene Decomposition and Representation", 2019, arXiv 1901.11390.
  "Ablation Study to Clarify the Mechanism of Object Segmentation in Multi-Object Representation
  Learning", arXiv 2310.03273 (beta = 0, gamma = 0 and the "IR" loss).

What is implemented
  - Attention network (appendix of 1901.11390): a U-Net on [x, log s_{k-1}] with conv 3x3, InstanceNorm,
    ReLU, nearest 2x down/up-sampling, an MLP 128-128 at the bottleneck and a 1x1 conv to one logit a_k.
    Depth from the resolution: floor(log2(res)) - 1 blocks (5 at 64 px, 6 at 128).
  - Stick-breaking recursion in log space (Sec. 2 of 1901.11390): log s_0 = 0,
      log m_k = log s_{k-1} + logsigmoid(a_k),   log s_k = log s_{k-1} + logsigmoid(-a_k),
    K-1 attention steps; the last slot takes the remaining scope, log m_K = log s_{K-1}. Slot 0 is the
    background slot (it gets sigma_bg). The recursion is sequential over K by nature; nothing else is.
  - Component VAE (appendix of 1901.11390), all K slots in one batched call: encoder on [x, log m_k],
    4 x conv 3x3 stride 2 (32, 32, 64, 64), MLP 256 -> (mu, log-variance) of a 16-d latent; spatial
    broadcast decoder to (H+8) x (W+8) with 2 coordinate channels, 4 x unpadded conv 3x3 (32), 1x1 conv
    to RGB mean + mask logit. The reconstruction shown in samples is sum_k m_k mu_k.
  - Objective (eq. 3 of 1901.11390), each term logged separately:
      --loss nll:  -sum_pix log sum_k m_k N(x; mu_k, sigma_k^2)                          (term "nll")
      --loss ir:    sum_pix sum_k m_k ||x - mu_k||^2 / (2 sigma_k^2)                     (term "ir")
      + beta  * sum_k KL(q(z_k | x, m_k) || N(0, I))                                     (term "kl")
      + gamma * KL(m || softmax_k(mask logits)) = sum_k sum_pix m_k (log m_k - log_softmax_k(l))   ("mask_kl")
    summed over pixels, slots and latent dimensions, averaged over the batch. sigma_0 = --sigma-bg,
    sigma_{k>0} = --sigma-fg. --beta 0 / --gamma 0 (the ablations of 2310.03273) skip the term: it is
    neither computed nor logged and contributes no gradient.
  - The IR loss: the exact equation of 2310.03273 is not public. We use the mask-weighted per-component
    reconstruction error above (losses.ir_loss). It is the Jensen upper bound of the mixture NLL (up to
    the Gaussian normaliser), equal to it for one-hot masks, and it is linear in the masks, so its
    minimum over masks is the one-hot mask on the component that reconstructs a pixel best: the same
    winner-take-all mechanism that the paper credits for the binarisation of MONet's masks.
  - Evaluation: ARI, FG-ARI, mIoU, mBO of the attention masks (and dec_* of the decoded masks
    softmax_k(l)); the binarisation diagnostics att_entropy / dec_entropy (mean per-pixel entropy
    -sum_k m_k log m_k, in nats) and att_binary / dec_binary (fraction of pixels with max_k m_k > 0.9);
    and the mixture NLL, KL, mask KL and MSE of every variant, so runs with different losses compare.

Deviations and choices (each one stated so a reader can undo it)
  - The U-Net channel width is not in our facts of the paper: every level has --unet-channels (64).
    Resolutions that are not a power of two are handled by resizing each up-sampled map to its skip
    connection's size (35 px tetrominoes: 35 -> 17 -> 8 -> 4).
  - The posterior is parameterised by its log-variance; evaluation decodes the posterior mean, training
    samples z = mu + exp(logvar / 2) * noise.
  - The decoder's RGB means are not squashed (no sigmoid), as in the paper's description; the sample
    grid clamps them to [0, 1]. Images stay in [0, 1], the range sigma_bg = 0.09 and sigma_fg = 0.11
    refer to.
  - Optimiser: RMSprop lr 1e-4 as the paper, with PyTorch's other defaults (alpha 0.99, eps 1e-8); the
    paper's decay and epsilon are not in our facts. Constant learning rate (an optional linear warm-up).
  - The attention network's input scope is log s_{k-1}, given to it as a fourth channel; the VAE's
    input is log m_k (may be very negative where a slot has no scope, never -inf).

Commands
  GPU, paper configuration (Multi-dSprites-like built-in data, K=7, batch 64, ~1M steps):
    python monet.py --data shapes --device cuda
  The ablations of arXiv 2310.03273:
    python monet.py --data shapes --beta 0          # no VAE KL
    python monet.py --data shapes --gamma 0         # no mask reconstruction
    python monet.py --data shapes --loss ir         # IR loss in place of the mixture NLL
    python scripts/monet_ablation.py --data shapes --preset paper --steps 100000 --seeds 0 1 2 --device cuda
  ObjectsRoom from the DeepMind HDF5 file (64 px, K=7):
    python monet.py --data /data/objects_room_train.h5
  CPU, tiny preset (Tetrominoes at 35 px, K=4, 3000 steps; about 11 minutes on one core):
    python monet.py --preset tiny
  Several GPUs (or CPU processes with gloo):
    torchrun --nproc_per_node=4 monet.py --data shapes
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
    "paper": dict(batch_size=64, steps=1_000_000, lr=1e-4, warmup_steps=0, grad_clip=0.0, unet_channels=64,
                  mlp_hidden=128, enc_channels=32, enc_hidden=256, dec_channels=32, latent_dim=16,
                  log_every=100, eval_every=5_000, eval_size=320, save_every=5_000),
    # tiny: defaults to Tetrominoes, at its native 35 px (11 minutes on one CPU core, README); other data 32 px.
    # Tried on Tetrominoes: lr 6e-4 and 1e-3 segment worse than 3e-4 at the same step.
    "tiny": dict(batch_size=16, steps=3_000, lr=3e-4, warmup_steps=0, grad_clip=0.0, unet_channels=16,
                 mlp_hidden=64, enc_channels=16, enc_hidden=64, dec_channels=16, latent_dim=16,
                 log_every=50, eval_every=250, eval_size=64, save_every=250),
}
TINY_RESOLUTION = 32  # tiny preset on data other than Tetrominoes
# Per-data defaults: resolution and K (one slot more than the most entities an image holds; 7 as the
# paper for CLEVR6 and ObjectsRoom; Tetrominoes: K=4, IODINE's setting, one slot per entity: MONet's
# background slot takes the background, so no spare slot is needed).
DATA_DEFAULTS = {
    "shapes": dict(resolution=64, num_slots=7),
    "shapes-colored": dict(resolution=64, num_slots=6),
    "shapes-binary": dict(resolution=64, num_slots=5),
    "tetrominoes": dict(resolution=35, num_slots=4),
    "clevr-lite": dict(resolution=128, num_slots=7),  # built-in CLEVR6-like set: CLEVR6's row, rendered at 128
    # Real files, recognised by name: DeepMind HDF5 conversions, ClevrTex; anything else: 64 px.
    "clevr": dict(resolution=128, num_slots=7),  # CLEVR6
    "clevrtex": dict(resolution=128, num_slots=11),
    "objects_room": dict(resolution=64, num_slots=7),
    "dsprites": dict(resolution=64, num_slots=7),
    "tetromino": dict(resolution=35, num_slots=4),
    "other": dict(resolution=64, num_slots=7),
}
LOSSES = ("nll", "ir")
# Flags that shape the weights: --resume and --eval-only take them from the checkpoint and refuse other values.
ARCH_KEYS = ("resolution", "unet_channels", "unet_blocks", "mlp_hidden", "enc_channels", "enc_hidden",
             "dec_channels", "latent_dim")
# What the papers vary at test time (free under --eval-only), recorded in eval.json.
TEST_KEYS = ("data", "num_slots", "eval_size")
# Flags of this invocation only, never taken from a checkpoint.
RUNTIME_KEYS = ("resume", "eval_only", "device", "workers", "compile", "out_dir", "run_name", "given")
BINARY_THRESHOLD = 0.9  # a pixel counts as "binarised" when its largest mask value exceeds this


def unet_blocks_for(resolution):
    """U-Net depth: floor(log2(res)) - 1 blocks, i.e. 5 at 64 px and 6 at 128 (appendix of 1901.11390)."""
    return max(1, int(math.log2(resolution)) - 1)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="MONet (arXiv 1901.11390) with the loss ablations of "
                                "arXiv 2310.03273.", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                allow_abbrev=False)
    a = p.add_argument
    a("--preset", choices=["paper", "tiny"], default="paper",
      help="paper: the paper's configuration for --data; tiny: a CPU-sized model. Explicit flags override.")
    a("--data", default=None, help="built-in set (%s) or a dataset path (default: shapes; tetrominoes "
      "with --preset tiny)" % ", ".join(data.BUILTIN))
    a("--train-size", type=int, default=None, help="use only the first N training images (None: all)")
    a("--resolution", type=int, default=None, help="image side in pixels (None: preset/data default)")
    a("--num-slots", type=int, default=None, help="number of slots K, background slot included (None: per data set)")
    a("--unet-channels", type=int, default=None, help="channels of every U-Net level of the attention network")
    a("--unet-blocks", type=int, default=None,
      help="U-Net blocks per path (None: floor(log2(resolution)) - 1, i.e. 5 at 64 px, 6 at 128)")
    a("--mlp-hidden", type=int, default=None, help="width of the two hidden layers of the U-Net bottleneck MLP")
    a("--enc-channels", type=int, default=None, help="VAE encoder channels c: the 4 stride-2 convs have c, c, 2c, 2c")
    a("--enc-hidden", type=int, default=None, help="hidden width of the VAE encoder MLP")
    a("--dec-channels", type=int, default=None, help="channels of the VAE's 4 unpadded decoder convs")
    a("--latent-dim", type=int, default=None, help="size of each slot's latent z_k")
    a("--loss", choices=LOSSES, default="nll",
      help="nll: mixture negative log-likelihood (paper); ir: mask-weighted reconstruction error (2310.03273)")
    a("--beta", type=float, default=0.5, help="weight of the VAE KL; 0 removes the term (ablation)")
    a("--gamma", type=float, default=0.5, help="weight of the mask reconstruction KL; 0 removes the term (ablation)")
    a("--sigma-bg", type=float, default=0.09, help="likelihood std of the background slot (slot 0), image in [0, 1]")
    a("--sigma-fg", type=float, default=0.11, help="likelihood std of the other slots, image in [0, 1]")
    a("--batch-size", type=int, default=None, help="images per step (per process under torchrun)")
    a("--steps", type=int, default=None, help="total optimiser steps")
    a("--lr", type=float, default=None, help="RMSprop learning rate")
    a("--warmup-steps", type=int, default=None, help="linear learning-rate warm-up, in steps (0: none, the paper)")
    a("--grad-clip", type=float, default=None, help="max gradient norm (0: no clipping, the paper)")
    a("--seed", type=int, default=0, help="seeds python, numpy, torch and the data order")
    a("--device", choices=["auto", "cpu", "cuda", "mps"], default="auto", help="auto: cuda, then mps, then cpu")
    a("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32", help="autocast precision")
    a("--compile", action="store_true", help="torch.compile the model")
    a("--workers", type=int, default=0, help="data loader worker processes")
    a("--out-dir", default="runs", help="parent folder of run folders")
    a("--run-name", default=None, help="run folder name (default: monet-DATA-LOSS-bBETA-gGAMMA-seedN)")
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
    tiny = {} if args.preset != "tiny" or key in ("tetrominoes", "tetromino") else {"resolution": TINY_RESOLUTION}
    for k, v in {**DATA_DEFAULTS[key], **PRESETS[args.preset], **tiny}.items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)
    if args.unet_blocks is None:
        args.unet_blocks = unet_blocks_for(args.resolution)
    positive = ("resolution", "num_slots", "unet_channels", "unet_blocks", "mlp_hidden", "enc_channels",
                "enc_hidden", "dec_channels", "latent_dim", "batch_size", "steps", "log_every", "save_every",
                "eval_size", "sigma_bg", "sigma_fg")
    for k in positive:
        if getattr(args, k) <= 0:
            p.error(f"--{k.replace('_', '-')} must be positive, got {getattr(args, k)}")
    for k in ("warmup_steps", "grad_clip", "eval_every", "workers", "beta", "gamma", "lr"):
        if getattr(args, k) < 0:
            p.error(f"--{k.replace('_', '-')} must be non-negative, got {getattr(args, k)}")
    if args.resolution < 8:
        p.error(f"--resolution must be at least 8, got {args.resolution}")
    if args.resolution >> (args.unet_blocks - 1) < 2:  # InstanceNorm needs more than one pixel
        p.error(f"--unet-blocks {args.unet_blocks} halves {args.resolution} px below 2 px; "
                f"use at most {unet_blocks_for(args.resolution)}")
    if args.train_size is not None and args.train_size <= 0:
        p.error("--train-size must be positive")
    return args


# --- Model


def conv_block(c_in, c_out):
    """One U-Net block: conv 3x3 SAME, InstanceNorm, ReLU (appendix of 1901.11390)."""
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1), nn.InstanceNorm2d(c_out, affine=True), nn.ReLU())


class AttentionNet(nn.Module):
    """U-Net from [x, log scope] to one attention logit per pixel (appendix of 1901.11390).

    Down path: `blocks` conv blocks, nearest 2x down-sampling after all but the last (skips taken before
    it); bottleneck: MLP hidden-hidden on the flattened deepest map; up path: nearest up-sampling to the
    skip's size, concatenation with the skip, conv block; 1x1 conv to one logit.
    """

    def __init__(self, resolution, channels, blocks, mlp_hidden):
        super().__init__()
        self.down = nn.ModuleList([conv_block(4 if i == 0 else channels, channels) for i in range(blocks)])
        self.up = nn.ModuleList([conv_block(2 * channels, channels) for _ in range(blocks)])
        side = resolution >> (blocks - 1)  # nearest 0.5x down-sampling floors odd sizes
        flat = channels * side * side
        self.mlp = nn.Sequential(nn.Linear(flat, mlp_hidden), nn.ReLU(), nn.Linear(mlp_hidden, mlp_hidden), nn.ReLU(),
                                 nn.Linear(mlp_hidden, flat), nn.ReLU())
        self.head = nn.Conv2d(channels, 1, 1)

    def forward(self, x, log_scope):
        h = torch.cat([x, log_scope], dim=1)  # (B, 3 + 1, H, W)
        skips = []
        for i, block in enumerate(self.down):
            h = block(h)
            skips.append(h)
            if i < len(self.down) - 1:
                h = F.interpolate(h, scale_factor=0.5, mode="nearest")
        h = self.mlp(h.flatten(1)).view_as(h)  # (B, C, s, s) -> (B, C*s*s) -> back
        for block, skip in zip(self.up, reversed(skips)):
            h = F.interpolate(h, size=skip.shape[-2:], mode="nearest")  # identity at the bottom level
            h = block(torch.cat([h, skip], dim=1))  # (B, 2C, h, w) -> (B, C, h, w)
        return self.head(h)  # (B, 1, H, W) attention logits a_k


def coordinate_grid(h, w, device=None):
    """(2, h, w) channels of y and x in linspace(-1, 1): what the broadcast decoder adds to the latent."""
    y, x = torch.meshgrid(torch.linspace(-1, 1, h, device=device), torch.linspace(-1, 1, w, device=device),
                          indexing="ij")
    return torch.stack([y, x])  # (2, h, w)


class ComponentVAE(nn.Module):
    """q(z_k | x, m_k) and the spatial broadcast decoder p(x_k, l_k | z_k) (appendix of 1901.11390)."""

    def __init__(self, resolution, enc_channels, enc_hidden, dec_channels, latent_dim):
        super().__init__()
        c = enc_channels
        layers, c_in = [], 4
        for c_out in (c, c, 2 * c, 2 * c):
            layers += [nn.Conv2d(c_in, c_out, 3, stride=2, padding=1), nn.ReLU()]
            c_in = c_out
        side = resolution
        for _ in range(4):
            side = (side + 1) // 2  # conv 3x3 stride 2 pad 1: ceil(side / 2)
        self.encoder = nn.Sequential(*layers, nn.Flatten(), nn.Linear(c_in * side * side, enc_hidden), nn.ReLU(),
                                     nn.Linear(enc_hidden, 2 * latent_dim))
        layers, c_in = [], latent_dim + 2
        for _ in range(4):  # unpadded: (H+8) -> H after four 3x3 convs
            layers += [nn.Conv2d(c_in, dec_channels, 3), nn.ReLU()]
            c_in = dec_channels
        self.decoder = nn.Sequential(*layers, nn.Conv2d(dec_channels, 4, 1))
        self.register_buffer("coords", coordinate_grid(resolution + 8, resolution + 8), persistent=False)

    def forward(self, x, log_masks):
        """x (B, 3, H, W), log_masks (B, K, H, W): all K components in one batched call."""
        b, k, h, w = log_masks.shape
        inp = torch.cat([repeat(x, "b c h w -> (b k) c h w", k=k),
                         rearrange(log_masks, "b k h w -> (b k) 1 h w")], dim=1)  # (B*K, 4, H, W)
        mu, logvar = self.encoder(inp).chunk(2, dim=-1)  # (B*K, L) each
        z = mu + (0.5 * logvar).exp() * torch.randn_like(mu) if self.training else mu
        grid = repeat(z, "n l -> n l h w", h=h + 8, w=w + 8)  # (B*K, L, H+8, W+8)
        coords = self.coords.to(grid.dtype).expand(grid.shape[0], -1, -1, -1)  # (B*K, 2, H+8, W+8)
        out = self.decoder(torch.cat([grid, coords], dim=1))  # (B*K, 4, H, W)
        out = rearrange(out, "(b k) c h w -> b k c h w", b=b)  # (B, K, 4, H, W)
        return (out[:, :, :3], out[:, :, 3],  # means (B, K, 3, H, W), mask logits (B, K, H, W)
                rearrange(mu, "(b k) l -> b k l", b=b), rearrange(logvar, "(b k) l -> b k l", b=b))


class MONet(nn.Module):
    """Recurrent attention -> K attention masks -> component VAE per slot (Sec. 2 of 1901.11390)."""

    def __init__(self, resolution=64, num_slots=7, unet_channels=64, unet_blocks=None, mlp_hidden=128,
                 enc_channels=32, enc_hidden=256, dec_channels=32, latent_dim=16):
        super().__init__()
        self.num_slots = num_slots
        blocks = unet_blocks or unet_blocks_for(resolution)
        self.attention = AttentionNet(resolution, unet_channels, blocks, mlp_hidden)
        self.vae = ComponentVAE(resolution, enc_channels, enc_hidden, dec_channels, latent_dim)

    def attend(self, x):
        """Stick-breaking in log space (Sec. 2 of 1901.11390).
        Returns log m (B, K, H, W) and the attention logits a (B, K-1, H, W)."""
        log_scope = torch.zeros_like(x[:, :1])  # log s_0 = log 1, (B, 1, H, W)
        log_masks, logits = [], []
        for _ in range(self.num_slots - 1):  # sequential: step k needs the scope left by step k-1
            a = self.attention(x, log_scope)  # (B, 1, H, W)
            log_masks.append(log_scope + F.logsigmoid(a))  # log m_k = log s_{k-1} + log alpha_k
            log_scope = log_scope + F.logsigmoid(-a)  # log s_k = log s_{k-1} + log(1 - alpha_k)
            logits.append(a)
        log_masks.append(log_scope)  # the last slot takes the remaining scope
        att_logits = torch.cat(logits, dim=1) if logits else x.new_zeros(x.shape[0], 0, *x.shape[2:])
        return torch.cat(log_masks, dim=1), att_logits  # (B, K, H, W), (B, K-1, H, W)

    def forward(self, image):
        """image (B, 3, H, W) in [0, 1]."""
        log_masks, att_logits = self.attend(image)
        means, mask_logits, mu, logvar = self.vae(image, log_masks)
        masks = log_masks.exp()  # (B, K, H, W), sums to 1 over K
        recon = (masks.unsqueeze(2) * means).sum(dim=1)  # (B, 3, H, W) = sum_k m_k mu_k
        return dict(recon=recon, means=means, masks=masks, log_masks=log_masks, mask_logits=mask_logits,
                    att_logits=att_logits, mu=mu, logvar=logvar)


def build_model(args):
    return MONet(args.resolution, args.num_slots, args.unet_channels, args.unet_blocks, args.mlp_hidden,
                 args.enc_channels, args.enc_hidden, args.dec_channels, args.latent_dim)


# --- Objective


def slot_sigmas(num_slots, args, device=None):
    """Likelihood std per slot: sigma_bg for the background slot 0, sigma_fg for the others. (K,)"""
    sigma = torch.full((num_slots,), args.sigma_fg, device=device)
    sigma[0] = args.sigma_bg
    return sigma


def compute_loss(out, image, args):
    """Named loss terms and their total (eq. 3 of 1901.11390; 2310.03273), each averaged over the batch.

    nll:     -sum_pix log sum_k m_k N(x; mu_k, sigma_k^2)
    ir:       sum_pix sum_k m_k ||x - mu_k||^2 / (2 sigma_k^2)       (our form; see the docstring)
    kl:       sum_k sum_d KL(N(mu_kd, var_kd) || N(0, 1))             only when beta > 0
    mask_kl:  sum_k sum_pix m_k (log m_k - log softmax_k(l)_k)        only when gamma > 0
    loss = (nll | ir) + beta * kl + gamma * mask_kl
    """
    means, log_masks = out["means"].float(), out["log_masks"].float()
    sigma = slot_sigmas(means.shape[1], args, means.device)
    if args.loss == "nll":
        terms = {"nll": losses.mixture_nll(image, means, log_masks, sigma).mean()}
    else:
        terms = {"ir": losses.ir_loss(image, means, log_masks, sigma).mean()}
    total = terms[args.loss]
    if args.beta > 0:  # beta = 0: the term is not built at all, so it has neither value nor gradient
        terms["kl"] = losses.kl_diag_gaussian(out["mu"].float(), out["logvar"].float()).sum(dim=(1, 2)).mean()
        total = total + args.beta * terms["kl"]
    if args.gamma > 0:
        terms["mask_kl"] = losses.mask_kl(log_masks, out["mask_logits"].float()).mean()
        total = total + args.gamma * terms["mask_kl"]
    terms["loss"] = total
    return terms


def mask_diagnostics(masks):
    """Per-image binarisation diagnostics of masks (B, K, H, W) summing to 1 over K (2310.03273):
    mean per-pixel entropy -sum_k m_k log m_k (nats; 0 for one-hot masks, log K for uniform ones) and
    the fraction of pixels whose largest mask value exceeds BINARY_THRESHOLD. Returns two (B,) tensors."""
    entropy = -(masks * masks.clamp_min(1e-8).log()).sum(dim=1).flatten(1).mean(dim=1)  # (B,)
    binary = (masks.amax(dim=1) > BINARY_THRESHOLD).flatten(1).float().mean(dim=1)  # (B,)
    return entropy, binary


# --- Training

EXIT_PREEMPTED = 3  # exit status of a run stopped by a signal after writing its checkpoint (requeue it)


def lr_at(step, args):
    """Constant learning rate (the paper) after an optional linear warm-up."""
    return args.lr * (min(1.0, (step + 1) / args.warmup_steps) if args.warmup_steps else 1.0)

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


@torch.no_grad()
def evaluate(model, dataset, args, device, split_seed=1234):
    """Metrics on the first `eval_size` images of `dataset`: segmentation of the attention masks (and dec_*
    of the decoded masks), binarisation diagnostics of both, and the objective's terms whatever --loss,
    --beta, --gamma are, so that ablated runs compare. RNG is forked so evaluation never changes training."""
    model.eval()
    n = min(args.eval_size, len(dataset))
    loader = data.make_loader(torch.utils.data.Subset(dataset, range(n)), args.batch_size, shuffle=False)
    per_image, first = {}, None

    def add(name, values):
        per_image.setdefault(name, []).append(values.double().cpu())

    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(split_seed)
        for batch in loader:
            image = batch["image"].to(device)
            with autocast(device, args.dtype):
                out = model(image)
            att, log_att = out["masks"].float(), out["log_masks"].float()  # (B, K, H, W)
            dec = out["mask_logits"].float().softmax(dim=1)  # decoded masks (B, K, H, W)
            means = out["means"].float()
            for prefix, masks in (("att", att), ("dec", dec)):
                entropy, binary = mask_diagnostics(masks)
                add(f"{prefix}_entropy", entropy)
                add(f"{prefix}_binary", binary)
            add("nll", losses.mixture_nll(image, means, log_att, slot_sigmas(means.shape[1], args, device)))
            add("kl", losses.kl_diag_gaussian(out["mu"].float(), out["logvar"].float()).sum(dim=(1, 2)))
            add("mask_kl", losses.mask_kl(log_att, out["mask_logits"].float()))
            add("mse", ((out["recon"].float() - image) ** 2).mean(dim=(1, 2, 3)))
            if first is None:
                first = (image, out)
            if dataset_has_masks(dataset):
                nb = base(dataset).num_background
                for prefix, masks in (("", att), ("dec_", dec)):
                    for k, v in metrics.segmentation_metrics(batch["mask"], masks.cpu(), nb).items():
                        per_image.setdefault(prefix + k, []).append(v)
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
    """Input | reconstruction sum_k m_k mu_k | argmax of the attention masks | argmax of the decoded masks |
    each slot's mean mu_k under its attention mask."""
    data.save_grid(path, image.cpu(), out["recon"].float().clamp(0, 1).cpu(), out["masks"].float().cpu(),
                   out["means"].float().clamp(0, 1).cpu(), extra_masks=[out["mask_logits"].float().softmax(1).cpu()])


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


def _main(args):
    # Distributed: torchrun sets WORLD_SIZE / RANK / LOCAL_RANK.
    world = int(os.environ.get("WORLD_SIZE", 1))
    rank, local_rank = int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0))
    device = pick_device(args.device, local_rank)
    cpu_group = None  # stop flags and RNG states travel on the CPU (gloo), never waiting for the GPU
    own_group = world > 1 and not torch.distributed.is_initialized()  # else the caller set it up (tests do)
    if world > 1:
        if own_group:
            torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
        cpu_group = torch.distributed.new_group(backend="gloo") if device.type == "cuda" else None
    is_main = rank == 0

    run_dir, ckpt = open_run(args, f"monet-{Path(args.data).stem}-{args.loss}-b{args.beta:g}-g{args.gamma:g}"
                                   f"-seed{args.seed}")
    if ckpt is not None:
        checkpoint_args(args, ckpt["args"])
    step = ckpt["step"] if ckpt is not None and not args.eval_only else 0
    random.seed(args.seed + rank)
    np.random.seed(args.seed + rank)
    torch.manual_seed(args.seed + rank)  # latent noise differs across ranks, as in a bigger batch

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

    opt = torch.optim.RMSprop(model.parameters(), lr=args.lr)  # the paper: RMSprop, lr 1e-4
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
    if args.compile:
        model = torch.compile(model)
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
    bad_terms = None  # which terms were non-finite at bad_step, (T,) bool in the order of `terms`
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
            # first step with a non-finite term, and which terms, tracked on the device (0: none yet). The
            # window means cannot tell: after one NaN step the weights are NaN and every term follows.
            nonfinite = ~torch.isfinite(torch.stack([v.detach().float() for v in terms.values()]))  # (T,)
            first = (bad_step == 0) & nonfinite.any()
            bad_terms = nonfinite if bad_terms is None else torch.where(first, nonfinite, bad_terms)
            bad_step = torch.where(first, step, bad_step)

            last = step == args.steps
            stop = stop_requested(caught, world, cpu_group) and not last
            save = step % args.save_every == 0 or last or stop
            if step % args.log_every == 0 or save:
                # every rank stops on a non-finite term of any rank (a lone rank would hang the others),
                # and before a checkpoint could store the broken weights
                bad = reduce_max(torch.cat([bad_step[None], bad_terms.long()]), world).tolist()  # (1 + T,)
                if bad[0]:
                    term = next(k for k, b in zip(terms, bad[1:]) if b)
                    raise FloatingPointError(f"non-finite loss term {term!r} at step {bad[0]}; stopped, "
                                             f"last good checkpoint kept in {run_dir}")
                if is_main and (step % args.log_every == 0 or last):
                    means = {k: (v / n_sum).item() for k, v in sums.items()}
                    dt = time.time() - t0
                    write({"step": step, "split": "train", **means, "lr": lr,
                           "images_per_s": n_sum * args.batch_size * world / dt, "peak_mem_mb": peak_memory_mb(device)})
                    bar.set_postfix(loss=f"{means['loss']:.4f}", img_s=f"{n_sum * args.batch_size * world / dt:.0f}",
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
    if own_group:
        torch.distributed.destroy_process_group()
    return plain


if __name__ == "__main__":
    main()
