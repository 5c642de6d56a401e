"""MONet, with the loss ablations of arXiv 2310.03273 and mask-binarisation diagnostics.

Papers
  Burgess et al., "MONet: Unsupervised Scene Decomposition and Representation", 2019, arXiv 1901.11390.
  "Ablation Study to Clarify the Mechanism of Object Segmentation in Multi-Object Representation
  Learning", arXiv 2310.03273 (beta = 0, gamma = 0 and the "IR" loss).

What is implemented
  - Attention network (appendix B.2 of 1901.11390): a U-Net on [x, log s_{k-1}], each block a bias-free conv 3x3,
    InstanceNorm with learned scale and bias, ReLU, nearest 2x down/up-sampling (none in a path's last block); MLP
    128-128 at the bottleneck; 1x1 conv to one logit a_k. floor(log2(res)) - 1 blocks (5 at 64 px, 6 at 128).
  - Stick-breaking in log space (Sec. 2): log s_0 = 0, log m_k = log s_{k-1} + logsigmoid(a_k),
    log s_k = log s_{k-1} + logsigmoid(-a_k); K-1 attention steps, the last slot takes the remaining scope
    log s_{K-1}. Slot 0, the first step, is the background slot (sigma_bg, as baudm and addtt). The recursion and
    every likelihood run in fp32 under --dtype bf16/fp16 (only the networks use the low precision).
  - Component VAE (appendix B.1), all K slots in one batched call: encoder on [x, log m_k], 4 x conv 3x3 stride 2
    (32, 32, 64, 64), MLP 256 -> mean and log-variance of a 16-d latent; spatial broadcast decoder to (H+8) x (W+8)
    with 2 coordinate channels, 4 x unpadded conv 3x3 (32), 1x1 conv to RGB mean + mask logit.
  - Objective (eq. 3), terms logged separately, summed over pixels, slots and latent dimensions, batch-averaged;
    sigma_0 = --sigma-bg, sigma_{k>0} = --sigma-fg:
      --loss nll:        -sum_pix log sum_k m_k N(x; mu_k, sigma_k^2)                 (term "nll", the paper)
      --loss ir:          sum_pix sum_k m_k (-log N(x; mu_k, sigma_k^2))              (term "ir", 2310.03273)
      --loss composite:  -sum_pix log N(x; sum_k m_k mu_k, sigma_fg^2)                (term "composite", ours)
      + beta * sum_k KL(q(z_k | x, m_k) || N(0, I))                                   (term "kl")
      + gamma * sum_k sum_pix m_k (log m_k - log_softmax_k(l)_k) = KL(m || softmax(l)) (term "mask_kl")
    --beta 0 / --gamma 0 (the ablations of 2310.03273) skip the term: not computed, logged or differentiated.
  - IR: the exact equation of 2310.03273 is not public. losses.ir_loss keeps the Gaussian normaliser, which
    depends on the masks since sigma_bg != sigma_fg; by Jensen it bounds the mixture NLL from above, equal for
    one-hot masks, and it is linear in the masks, so its minimum is the one-hot mask on each pixel's most likely
    component: the winner-take-all mechanism the paper credits for the binarisation of MONet's masks.
  - Composite (our control): masks and means enter only through the composite sum_k m_k mu_k, so nothing rewards
    one slot owning a pixel. One sigma (--sigma-fg) everywhere: a mask-weighted one would bring back a
    mask-dependent normaliser. Same KL and mask terms.
  - Evaluation: ARI (background included) and FG-ARI (excluded: the papers' score; 2310.03273 reports ARI),
    mIoU, mBO of the attention masks, dec_* of the decoded masks softmax_k(l). This project's own diagnostics
    of what 2310.03273 describes in words: mask entropy att_/dec_entropy (mean per-pixel -sum_k m_k log m_k,
    nats) and the binarisation fraction att_/dec_binary (pixels with max_k m_k > 0.9). NLL, KL, mask KL and MSE
    are computed for every variant, so runs with different losses compare.
  - Speed, exact identities with --plain for the textbook computation: the decoder's first layer never convolves
    the tiled latent (broadcast_first_conv); the U-Net convolves up-sampled maps at low resolution
    (conv3x3_of_upsampled); the decoder runs channels-last. docs/monet.md has the timings.

Deviations and choices (each one stated so a reader can undo it)
  - U-Net widths: the appendix says "a standard U-Net blueprint" and gives none. 64 doubling per level, capped at
    512 (baudm/MONet-pytorch models/networks.py Attention: 64 128 256 512 512 at 64 px); addtt/object-centric-
    library uses 32 32 64 64 64 (--unet-channels 32 32 64 64 64). Sizes that are not a power of two resize each
    up-sampled map to its skip's size (35 px: 35 -> 17 -> 8 -> 4).
  - The mixture is over whole pixels (channels independent given the slot, multiplied before the sum over slots,
    as eq. 3); baudm, addtt and clevrtex mix each channel separately: their NLLs are not comparable to ours.
  - Log-variance posterior; evaluation decodes the posterior mean. RGB means are not squashed (addtt applies a
    sigmoid); images stay in [0, 1], the range of sigma_bg 0.09 and sigma_fg 0.11.
  - --optimizer rmsprop-tf (paper preset): TF1's RMSProp, as the paper's TensorFlow code ran it (decay 0.9,
    epsilon 1e-10 inside the root, mean square from 1). rmsprop (PyTorch: alpha 0.99, eps outside the root, from
    0: its first step is ~10 * lr on every weight) and adam are options.
  - The tiny preset (CPU) is the paper's architecture narrowed (16 channels), batch 16, and where a measurement
    chose it (docs/monet.md has the sweep): PyTorch RMSprop at a constant lr 6e-4, sigma_bg 0.3 / sigma_fg 0.36
    (addtt's Tetrominoes values), the mask-KL weight ramped over 1000 steps, 4000 steps. It scores test FG-ARI
    0.56-0.87 on Tetrominoes (mean 0.72 over eight runs on two machines, seed 0: 0.71 and 0.76; the project aims
    for 0.75), where lr 3e-4 for 8000 steps scored 0.61-0.67. The lower-scoring models group pixels by colour:
    two pieces of one colour share a slot.

Commands
  GPU, paper configuration (Multi-dSprites-like built-in data, K=7, batch 64, ~1M steps):
    python monet.py --data shapes --device cuda
  The ablations of arXiv 2310.03273 and the composite control:
    python monet.py --data shapes --beta 0          # no VAE KL
    python monet.py --data shapes --gamma 0         # no mask reconstruction
    python monet.py --data shapes --loss ir         # IR loss in place of the mixture NLL
    python monet.py --data shapes --loss composite  # Gaussian on sum_k m_k mu_k: no winner-take-all
    python scripts/monet_ablation.py --data shapes --preset paper --steps 100000 --seeds 0 1 2 --device cuda
  ObjectsRoom from the DeepMind HDF5 file (64 px, K=7):
    python monet.py --data /data/objects_room_train.h5
  CPU, tiny preset (Tetrominoes at 35 px, K=4; time and scores in docs/monet.md):
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
    # 1901.11390 appendix B: RMSProp lr 1e-4 (constant), batch 64; unet_channels None: the blueprint, unet_widths()
    "paper": dict(batch_size=64, steps=1_000_000, lr=1e-4, warmup_steps=0, decay_steps=0, grad_clip=0.0,
                  unet_channels=None, mlp_hidden=128, enc_channels=32, enc_hidden=256, dec_channels=32, latent_dim=16,
                  optimizer="rmsprop-tf", gamma_warmup=0, sigma_bg=0.09, sigma_fg=0.11,  # appendix B.1
                  log_every=100, eval_every=5_000, eval_size=320, save_every=5_000),
    # tiny: defaults to Tetrominoes at its native 35 px, other data 32 px; docs/monet.md has the sweep behind it
    # (lr 6e-4, 4000 steps: FG-ARI 0.56-0.87, mean 0.72 over 8 runs; 3e-4, 8000: 0.61-0.67; 1e-3: 0.73 / 0.50)
    # sigmas of addtt/object-centric-library config/special_cases/monet-tetrominoes.yaml (bg 0.3, fg 0.36)
    "tiny": dict(batch_size=16, steps=4_000, lr=6e-4, warmup_steps=0, decay_steps=0, grad_clip=0.0,
                 unet_channels=[16], mlp_hidden=64, enc_channels=16, enc_hidden=64, dec_channels=16, latent_dim=16,
                 optimizer="rmsprop", gamma_warmup=1_000, sigma_bg=0.3, sigma_fg=0.36,
                 log_every=50, eval_every=250, eval_size=256, save_every=250),
}
TINY_RESOLUTION = 32  # tiny preset on data other than Tetrominoes
# Per-data defaults: resolution and K (one slot more than the most entities an image holds; 7 as the
# paper for CLEVR6 and ObjectsRoom; Tetrominoes: K=4, IODINE's setting, one slot per entity: MONet's
# background slot takes the background, so no spare slot is needed; K=5 measured lower, docs/monet.md).
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
LOSSES = ("nll", "ir", "composite")
OPTIMIZERS = ("rmsprop-tf", "rmsprop", "adam")
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


def unet_widths(blocks):
    """Channels per U-Net level, top to bottom: 64 doubling per level, capped at 512 (the paper's "standard U-Net
    blueprint" has no widths; baudm/MONet-pytorch models/networks.py Attention: ngf 64, 128, 256, 512, 512)."""
    return [64 * min(2 ** level, 8) for level in range(blocks)]


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
    a("--unet-channels", type=int, nargs="+", default=None,
      help="channels of each U-Net level, top to bottom, or one value for every level (None: paper 64 128 256 "
      "512 512 ..., tiny 16)")
    a("--unet-blocks", type=int, default=None,
      help="U-Net blocks per path (None: floor(log2(resolution)) - 1, i.e. 5 at 64 px, 6 at 128)")
    a("--mlp-hidden", type=int, default=None, help="width of the two hidden layers of the U-Net bottleneck MLP")
    a("--enc-channels", type=int, default=None, help="VAE encoder channels c: the 4 stride-2 convs have c, c, 2c, 2c")
    a("--enc-hidden", type=int, default=None, help="hidden width of the VAE encoder MLP")
    a("--dec-channels", type=int, default=None, help="channels of the VAE's 4 unpadded decoder convs")
    a("--latent-dim", type=int, default=None, help="size of each slot's latent z_k")
    a("--plain", "--plain-decoder", dest="plain", action="store_true", help="the textbook computations: the decoder "
      "convolves the tiled latent, the U-Net the up-sampled map (default: exact shortcuts, the same numbers, faster)")
    a("--loss", choices=LOSSES, default="nll", help="nll: mixture negative log-likelihood (paper); ir: mask-weighted "
      "per-component NLL (2310.03273); composite: Gaussian on sum_k m_k mu_k (control without winner-take-all)")
    a("--beta", type=float, default=0.5, help="weight of the VAE KL; 0 removes the term (ablation)")
    a("--gamma", type=float, default=0.5, help="weight of the mask reconstruction KL; 0 removes the term (ablation)")
    a("--gamma-warmup", type=int, default=None, help="steps over which the mask KL weight rises linearly from 0 to "
      "--gamma (0: constant, the paper)")
    a("--sigma-bg", type=float, default=None,
      help="likelihood std of the background slot (slot 0), image in [0, 1] (None: paper 0.09, tiny 0.3)")
    a("--sigma-fg", type=float, default=None,
      help="likelihood std of the other slots, image in [0, 1] (None: paper 0.11, tiny 0.36)")
    a("--optimizer", choices=OPTIMIZERS, default=None, help="rmsprop-tf: TF1 RMSProp as the paper (decay 0.9, "
      "eps 1e-10, mean square from 1); rmsprop: PyTorch's; adam (None: from the preset)")
    a("--batch-size", type=int, default=None, help="images per step (per process under torchrun)")
    a("--steps", type=int, default=None, help="total optimiser steps")
    a("--lr", type=float, default=None, help="learning rate")
    a("--warmup-steps", type=int, default=None, help="linear learning-rate warm-up, in steps (0: none, the paper)")
    a("--decay-steps", type=int, default=None, help="lr is multiplied by 0.5^(step/decay_steps) (0: constant, the "
      "paper)")
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
    widths = args.unet_channels or unet_widths(args.unet_blocks)
    args.unet_channels = widths * args.unet_blocks if len(widths) == 1 else widths
    if len(args.unet_channels) != args.unet_blocks:
        p.error(f"--unet-channels has {len(args.unet_channels)} values for {args.unet_blocks} U-Net blocks; "
                f"give one value or {args.unet_blocks}")
    positive = ("resolution", "num_slots", "unet_blocks", "mlp_hidden", "enc_channels", "enc_hidden", "dec_channels",
                "latent_dim", "batch_size", "steps", "log_every", "save_every", "eval_size", "sigma_bg", "sigma_fg")
    for k in positive:
        if getattr(args, k) <= 0:
            p.error(f"--{k.replace('_', '-')} must be positive, got {getattr(args, k)}")
    if min(args.unet_channels) <= 0:
        p.error(f"--unet-channels must be positive, got {args.unet_channels}")
    for k in ("warmup_steps", "decay_steps", "grad_clip", "eval_every", "workers", "beta", "gamma", "lr",
              "gamma_warmup"):
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
    """One U-Net block: bias-free conv 3x3 SAME, InstanceNorm with learned scale and bias, ReLU (appendix B.2 of
    1901.11390; a conv bias before InstanceNorm would be subtracted again by it)."""
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.InstanceNorm2d(c_out, affine=True),
                         nn.ReLU())


def conv3x3_of_upsampled(h, weight):
    """conv2d(nearest_upsample_2x(h), weight, padding=1), computed on the low-resolution h (exact).

    Output row 2i+a of a 3x3 SAME conv on the 2x nearest up-sampled map reads up-sampled rows 2i+a-1 .. 2i+a+1, i.e.
    low-resolution rows (i-1, i, i) for a = 0 and (i, i, i+1) for a = 1: kernel rows that land on the same low-res
    row add up, P_0 W = [W_0, W_1 + W_2] at rows (i-1, i) and P_1 W = [W_0 + W_1, W_2] at rows (i, i+1); the same for
    columns. So each output phase (a, b) is a 2x2 conv of h with P_a W P_b^T, and zero padding of h by 1 is the
    up-sampled map's zero padding. 16 taps per 4 output pixels instead of 36. h (B, C, h, w) -> (B, C_out, 2h, 2w)."""
    (b, _, hh, ww), c_out = h.shape, weight.shape[0]
    collapse = weight.new_tensor([[[1, 0, 0], [0, 1, 1]], [[1, 1, 0], [0, 0, 1]]])  # (parity, 2 low-res taps, 3 taps)
    k = torch.einsum("aru,oiuv,bsv->aboirs", collapse, weight, collapse)  # (2, 2, C_out, C, 2, 2)
    y = F.conv2d(F.pad(h, (1, 1, 1, 1)), k.reshape(4 * c_out, -1, 2, 2)).view(b, 2, 2, c_out, hh + 1, ww + 1)
    # phase (a, b) starts at padded row a, column b: the window there covers low-res rows i - 1 + a, i + a
    rows = [torch.stack([y[:, a, 0, :, a:a + hh, :ww], y[:, a, 1, :, a:a + hh, 1:]], dim=-1) for a in (0, 1)]
    return torch.stack(rows, dim=3).reshape(b, c_out, 2 * hh, 2 * ww)  # (B, C_out, h, 2, w, 2) -> interleaved


class AttentionNet(nn.Module):
    """U-Net from [x, log scope] to one attention logit per pixel (appendix B.2 of 1901.11390).

    Down path: one conv block per level (widths[i] channels), nearest 2x down-sampling after all but the last (skips
    taken before it); bottleneck: MLP hidden-hidden on the flattened deepest map; up path, deepest level first:
    nearest up-sampling to the skip's size, concatenation with the skip, conv block to the next level's width;
    1x1 conv to one logit.
    """

    def __init__(self, resolution, widths, mlp_hidden, plain=False):
        super().__init__()
        n, self.plain = len(widths), plain
        self.down = nn.ModuleList([conv_block(4 if i == 0 else widths[i - 1], widths[i]) for i in range(n)])
        # level i of the up path sees [up-sampled h, skip_i], both widths[i] wide, and hands widths[i - 1] upwards
        self.up = nn.ModuleList([conv_block(2 * widths[i], widths[max(i - 1, 0)]) for i in reversed(range(n))])
        side = resolution >> (n - 1)  # nearest 0.5x down-sampling floors odd sizes
        flat = widths[-1] * side * side
        self.mlp = nn.Sequential(nn.Linear(flat, mlp_hidden), nn.ReLU(), nn.Linear(mlp_hidden, mlp_hidden), nn.ReLU(),
                                 nn.Linear(mlp_hidden, flat), nn.ReLU())
        self.head = nn.Conv2d(widths[0], 1, 1)

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
            if self.plain or skip.shape[-2:] != (2 * h.shape[-2], 2 * h.shape[-1]):  # bottom level, odd sizes
                h = F.interpolate(h, size=skip.shape[-2:], mode="nearest")  # identity at the bottom level
                h = block(torch.cat([h, skip], dim=1))  # (B, 2 C_i, h, w) -> (B, C_{i-1}, h, w)
            else:  # conv([up(h), skip]) = conv_h(up(h)) + conv_skip(skip), the first at low resolution
                w = block[0].weight  # (C_{i-1}, 2 C_i, 3, 3)
                h = block[1:](conv3x3_of_upsampled(h, w[:, :h.shape[1]]) + F.conv2d(skip, w[:, h.shape[1]:], padding=1))
        return self.head(h)  # (B, 1, H, W) attention logits a_k


def coordinate_grid(h, w, device=None):
    """(2, h, w) channels of y and x in linspace(-1, 1): what the broadcast decoder adds to the latent."""
    y, x = torch.meshgrid(torch.linspace(-1, 1, h, device=device), torch.linspace(-1, 1, w, device=device),
                          indexing="ij")
    return torch.stack([y, x])  # (2, h, w)


def broadcast_first_conv(z, coords, conv):
    """conv(concat(tile(z), coords)) for an unpadded conv, without convolving the tiled latent.

    Split the kernel by input channel, W = [W_z, W_p]. The tile is constant in space and a VALID convolution sees
    every tap of its kernel at every output pixel, so for z (N, L) and coords P (2, H, W):

        conv(tile(z) ++ P; W, b)[n, o, i, j] = conv(P; W_p, b)[o, i, j] + sum_c z[n, c] * sum_{u,v} W_z[o, c, u, v]

    The first term does not depend on the slot: one convolution at batch 1. Exact for padding 0 only (a padded
    border would see fewer taps). Returns (N, C_out, H - kh + 1, W - kw + 1)."""
    w_z, w_p = conv.weight[:, :z.shape[1]], conv.weight[:, z.shape[1]:]  # (C_out, L, kh, kw), (C_out, 2, kh, kw)
    pos = F.conv2d(coords[None].to(w_p.dtype), w_p, conv.bias)  # (1, C_out, H', W')
    pos = pos.contiguous(memory_format=torch.channels_last)  # the sum inherits it: the decoder runs channels-last
    return pos + (z @ w_z.sum(dim=(2, 3)).T)[:, :, None, None]  # (1, C_out, H', W') + (N, C_out, 1, 1)


class ComponentVAE(nn.Module):
    """q(z_k | x, m_k) and the spatial broadcast decoder p(x_k, l_k | z_k) (appendix B.1 of 1901.11390)."""

    def __init__(self, resolution, enc_channels, enc_hidden, dec_channels, latent_dim, plain=False):
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
        self.plain = plain
        self.register_buffer("coords", coordinate_grid(resolution + 8, resolution + 8), persistent=False)

    def decode(self, z):
        """z (N, L) -> (N, 4, H, W): RGB means and the mask logit."""
        if self.plain:  # the textbook spatial broadcast: tile, append coordinates, convolve
            h, w = self.coords.shape[1:]
            grid = repeat(z, "n l -> n l h w", h=h, w=w)  # (N, L, H+8, W+8)
            coords = self.coords.to(grid.dtype).expand(z.shape[0], -1, -1, -1)  # (N, 2, H+8, W+8)
            first = self.decoder[0](torch.cat([grid, coords], dim=1))
        else:
            first = broadcast_first_conv(z, self.coords, self.decoder[0])
        # channels-last convolutions: the same numbers, faster on CPU (docs/monet.md: the step against b0b76e7)
        return self.decoder[1:](first.contiguous(memory_format=torch.channels_last)).contiguous()

    def forward(self, x, log_masks):
        """x (B, 3, H, W), log_masks (B, K, H, W): all K components in one batched call."""
        b, k, h, w = log_masks.shape
        inp = torch.cat([repeat(x, "b c h w -> (b k) c h w", k=k),
                         rearrange(log_masks, "b k h w -> (b k) 1 h w")], dim=1)  # (B*K, 4, H, W)
        mu, logvar = self.encoder(inp).chunk(2, dim=-1)  # (B*K, L) each
        z = mu + (0.5 * logvar).exp() * torch.randn_like(mu) if self.training else mu
        out = rearrange(self.decode(z), "(b k) c h w -> b k c h w", b=b)  # (B, K, 4, H, W)
        return (out[:, :, :3], out[:, :, 3],  # means (B, K, 3, H, W), mask logits (B, K, H, W)
                rearrange(mu, "(b k) l -> b k l", b=b), rearrange(logvar, "(b k) l -> b k l", b=b))


class MONet(nn.Module):
    """Recurrent attention -> K attention masks -> component VAE per slot (Sec. 2 of 1901.11390)."""

    def __init__(self, resolution=64, num_slots=7, unet_channels=None, unet_blocks=None, mlp_hidden=128,
                 enc_channels=32, enc_hidden=256, dec_channels=32, latent_dim=16, plain=False):
        super().__init__()
        self.num_slots = num_slots
        widths = unet_channels or unet_widths(unet_blocks or unet_blocks_for(resolution))
        self.attention = AttentionNet(resolution, widths, mlp_hidden, plain)
        self.vae = ComponentVAE(resolution, enc_channels, enc_hidden, dec_channels, latent_dim, plain)

    def attend(self, x):
        """Stick-breaking in log space (Sec. 2 of 1901.11390), in fp32 whatever the autocast precision: bf16
        logsigmoid(a) and logsigmoid(-a) round separately and the masks stop summing to 1 (by ~0.3%).
        Returns log m (B, K, H, W) and the attention logits a (B, K-1, H, W), both fp32."""
        log_scope = torch.zeros_like(x[:, :1], dtype=torch.float32)  # log s_0 = log 1, (B, 1, H, W)
        log_masks, logits = [], []
        for _ in range(self.num_slots - 1):  # sequential: step k needs the scope left by step k-1
            a = self.attention(x, log_scope).float()  # (B, 1, H, W)
            log_masks.append(log_scope + F.logsigmoid(a))  # log m_k = log s_{k-1} + log alpha_k
            log_scope = log_scope + F.logsigmoid(-a)  # log s_k = log s_{k-1} + log(1 - alpha_k)
            logits.append(a)
        log_masks.append(log_scope)  # the last slot takes the remaining scope
        att_logits = torch.cat(logits, dim=1) if logits else log_scope.new_zeros(x.shape[0], 0, *x.shape[2:])
        return torch.cat(log_masks, dim=1), att_logits  # (B, K, H, W), (B, K-1, H, W)

    def forward(self, image):
        """image (B, 3, H, W) in [0, 1]. Masks, log-masks and the reconstruction are fp32; means and mask logits
        come in the autocast precision (the objective casts them)."""
        log_masks, att_logits = self.attend(image)
        means, mask_logits, mu, logvar = self.vae(image, log_masks)
        masks = log_masks.exp()  # (B, K, H, W), sums to 1 over K
        recon = (masks.unsqueeze(2) * means.float()).sum(dim=1)  # (B, 3, H, W) = sum_k m_k mu_k
        return dict(recon=recon, means=means, masks=masks, log_masks=log_masks, mask_logits=mask_logits,
                    att_logits=att_logits, mu=mu, logvar=logvar)


def build_model(args):
    return MONet(args.resolution, args.num_slots, args.unet_channels, args.unet_blocks, args.mlp_hidden,
                 args.enc_channels, args.enc_hidden, args.dec_channels, args.latent_dim, args.plain)


# --- Objective


def slot_sigmas(num_slots, args, device=None):
    """Likelihood std per slot: sigma_bg for the background slot 0, sigma_fg for the others. (K,)"""
    sigma = torch.full((num_slots,), args.sigma_fg, device=device)
    sigma[0] = args.sigma_bg
    return sigma


def compute_loss(out, image, args, gamma=None):
    """Named loss terms and their total (eq. 3 of 1901.11390; 2310.03273), each averaged over the batch, in fp32.

    nll:        -sum_pix log sum_k m_k N(x; mu_k, sigma_k^2)
    ir:          sum_pix sum_k m_k (-log N(x; mu_k, sigma_k^2))         (our form; see the docstring)
    composite:  -sum_pix log N(x; sum_k m_k mu_k, sigma_fg^2)            (the control without winner-take-all)
    kl:          sum_k sum_d KL(N(mu_kd, var_kd) || N(0, 1))              only when beta > 0
    mask_kl:     sum_k sum_pix m_k (log m_k - log softmax_k(l)_k)         only when gamma > 0
    loss = (nll | ir | composite) + beta * kl + gamma * mask_kl, with `gamma` the scheduled weight (default --gamma)
    """
    means, log_masks = out["means"].float(), out["log_masks"].float()
    sigma = slot_sigmas(means.shape[1], args, means.device)
    if args.loss == "nll":
        terms = {"nll": losses.mixture_nll(image, means, log_masks, sigma).mean()}
    elif args.loss == "ir":
        terms = {"ir": losses.ir_loss(image, means, log_masks, sigma).mean()}
    else:
        recon = (log_masks.exp().unsqueeze(2) * means).sum(dim=1, keepdim=True)  # (B, 1, 3, H, W): one component
        terms = {"composite": -losses.gaussian_log_likelihood(image, recon, args.sigma_fg).flatten(1).sum(1).mean()}
    total = terms[args.loss]
    if args.beta > 0:  # beta = 0: the term is not built at all, so it has neither value nor gradient
        terms["kl"] = losses.kl_diag_gaussian(out["mu"].float(), out["logvar"].float()).sum(dim=(1, 2)).mean()
        total = total + args.beta * terms["kl"]
    if args.gamma > 0:
        terms["mask_kl"] = losses.mask_kl(log_masks, out["mask_logits"].float()).mean()
        total = total + (args.gamma if gamma is None else gamma) * terms["mask_kl"]
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
    """Constant learning rate (the paper), or halved every --decay-steps; after an optional linear warm-up."""
    warm = min(1.0, (step + 1) / args.warmup_steps) if args.warmup_steps else 1.0
    return args.lr * warm * (0.5 ** (step / args.decay_steps) if args.decay_steps else 1.0)


def gamma_at(step, args):
    """Mask-KL weight: --gamma, reached linearly over --gamma-warmup steps (0: constant, the paper)."""
    return args.gamma * (min(1.0, step / args.gamma_warmup) if args.gamma_warmup else 1.0)


class RMSpropTF(torch.optim.Optimizer):
    """TF1's RMSProp without momentum, the paper's optimiser (tensorflow r1 training/rmsprop.py: decay 0.9,
    epsilon 1e-10, the "rms" slot initialised by ones_initializer; update of raw_ops.ApplyRMSProp):

        ms <- decay * ms + (1 - decay) * g^2,      p <- p - lr * g / sqrt(ms + epsilon),      ms_0 = 1

    PyTorch's RMSprop starts ms at 0 and adds eps outside the root: its first step is lr * g / (sqrt(0.01 g^2) + eps),
    about 10 * lr on every weight; this one's first step is lr * g / sqrt(0.9 + 0.1 g^2), about lr * g."""

    def __init__(self, params, lr, decay=0.9, eps=1e-10):
        super().__init__(params, dict(lr=lr, decay=decay, eps=eps))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if not self.state[p]:
                    self.state[p]["square_avg"] = torch.ones_like(p)
                ms = self.state[p]["square_avg"]
                ms.mul_(group["decay"]).addcmul_(p.grad, p.grad, value=1 - group["decay"])
                p.addcdiv_(p.grad, (ms + group["eps"]).sqrt(), value=-group["lr"])


def build_optimizer(params, args):
    """--optimizer: rmsprop-tf (the paper's TF1 semantics), rmsprop (PyTorch's defaults) or adam."""
    if args.optimizer == "rmsprop-tf":
        return RMSpropTF(params, lr=args.lr)
    return (torch.optim.RMSprop if args.optimizer == "rmsprop" else torch.optim.Adam)(params, lr=args.lr)


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

    opt = build_optimizer(model.parameters(), args)
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
            lr, gamma = lr_at(step, args), gamma_at(step, args)
            for g in opt.param_groups:
                g["lr"] = lr
            with autocast(device, args.dtype):
                out = model(image)
            terms = compute_loss(out, image, args, gamma)
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
                    write({"step": step, "split": "train", **means, "lr": opt.param_groups[0]["lr"], "gamma": gamma,
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
    return plain


if __name__ == "__main__":
    main()
