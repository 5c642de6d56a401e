"""DINOSAUR: slot attention on frozen self-supervised ViT features, and the COCO experiments of arXiv 2306.02577.

Papers
  Seitzer et al., "Bridging the Gap to Real-World Object-Centric Learning", ICLR 2023, arXiv 2209.14860.
  "Covariance / cosine regularisation of slots", arXiv 2306.02577 (COVLOSS, COSINELOSS, image target on COCO).
  Where the papers are silent the authors' code decides: amazon-science/object-centric-learning-framework
  (OCLF, configs/experiment/projects/bridging/) and robert1003/slot-attention-disentanglement (its README's commits).

What is implemented (model and objective first; the frozen ViT, the feature cache and the baseline below)
  - Input MLP (LayerNorm, Linear D->D, ReLU, Linear D->slot_dim; no position embedding), Slot Attention
    (3 iterations, GRU, residual MLP 4 x slot_dim; the class of slot_attention.py) with learned Gaussian slots.
  - --target features (DINOSAUR): MLP decoder, each slot broadcast over the P patches + a learned position
    embedding (std 0.02), shared MLP (3 x 2048, ReLU) to D + 1, alpha softmaxed over slots, reconstruction
    sum_k alpha_k y_k, MSE to the frozen features (2209.14860 Sec. 3.2).
    --target image: a spatial broadcast CNN to the image at --target-resolution (128): --image-decoder savi
    (OCLF's image baseline, the "stripes" of 2306.02577: tanh, [-1, 1]) or adaptive (robert1003's COVLOSS /
    COSINELOSS COCO runs, with --image-range unit). The first layer after the broadcast is computed without
    convolving the tiled slots (broadcast_conv, exact; --plain-decoder for the textbook way).
  - --loss mse | cov | vicreg | cosine with --beta, --proj mlp | identity: the slot regularisers of 2306.02577
    (Table 3's "DINOSAUR + covLoss" is vicreg on the identity, / D); the head runs in fp32 and only in training.
  - The frozen encoder: a DINO ViT written here (no timm), key for key the official checkpoints, loaded strict
    and weights_only; features = the last block's output, CLS dropped, WITHOUT the final LayerNorm (2209.14860
    Sec. 4); under no_grad, in neither optimiser nor checkpoint; --cache-features DIR stores them once.
  - Evaluation: patch (or decoder) alphas resized bilinearly to the masks, argmax; ARI, FG-ARI, mIoU, mBO. On
    COCO as OCLF's metrics_coco_ccrop: 224-px centre crops, masks nearest-exact + centre-cropped at 320 (the
    decoder's 128 px for --target image), crowd annotations dropped (coco_nocrowd), overlaps ignored, all 5,000
    val2017 images in eval.json, mBO^c (mbo_c) beside mBO; fg_ari skips images without an object, fg_ari_oclf
    scores them 1 as OCLF does. --baseline blocks scores OCLF's fixed 11 blocks with the same metrics.

Deviations and choices (each one stated so a reader can undo it)
  - Without --weights the ViT is randomly initialised (a fixed seed, so a checkpoint evaluates the same
    later); results are then meaningless and the run says so. "vit_tiny" (patch 4, 64-d, 2 blocks) exists
    only for the tests and the tiny preset; DINO released no such model.
  - Horizontal flips (COCO by default) are drawn per (seed, step, rank, image), so resuming is exact. With a
    cache, both orientations of every training image are stored (twice the disk) instead of flipping features.
  - robert1003's COCO runs decay the lr from step 0 and use their own input MLP; every setting here uses OCLF's
    schedule and DINOSAUR's input MLP (docs/dinosaur.md). COVLOSS under DDP uses the local batch's B*K slots.

Commands (docs/dinosaur.md has one for every reported configuration)
  GPU, DINOSAUR on COCO 2017 with the official DINO ViT-B/16 (224 px, K=7, 500k steps), cached features:
    python dinosaur.py --data /data/coco --vit vit_b16 --weights dino_vitbase16_pretrain.pth \\
        --cache-features /data/dino_cache --dtype bf16
  CPU, tiny preset (random tiny ViT: shows the pipeline only):
    python dinosaur.py --preset tiny
  Several GPUs (or CPU processes with gloo):
    torchrun --nproc_per_node=4 dinosaur.py --data /data/coco --weights dino_vitbase16_pretrain.pth
"""
import argparse
import functools
import hashlib
import json
import math
import os
import random
import resource
import shutil
import signal
import sys
import threading
import time
from collections import OrderedDict
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

# OCLF configs/experiment/projects/bridging/ (OCLF below): dinosaur/_base_feature_recon.yaml (Adam lr 0.0004,
# exponential_decay_after_optional_warmup warmup_steps 10000 decay_steps 100000, gradient_clip_val 1.0) and
# dinosaur/coco_feat_rec_dino_base16.yaml (8 devices x batch 8, max_steps 500000, vit_base_patch16_224_dino,
# object_dim 256, PatchDecoder features [2048, 2048, 2048]); experiment_image_feature_rec/: target Resize 128,
# get_savi_decoder_backbone channel_multiplier 1 (64 channels); proj_dim 1024: robert1003 train.py --proj_dim.
PRESETS = {
    "paper": dict(batch_size=64, steps=500_000, lr=4e-4, warmup_steps=10_000, decay_steps=100_000,
                  grad_clip=1.0, vit="vit_b16", resolution=224, slot_dim=256, dec_hidden=2048,
                  target_resolution=128, dec_channels=64, log_every=100, eval_every=5_000, eval_size=500,
                  save_every=5_000, proj_dim=1024),
    "tiny": dict(batch_size=16, steps=3_000, lr=4e-4, warmup_steps=200, decay_steps=100_000, grad_clip=1.0,
                 vit="vit_tiny", resolution=32, slot_dim=32, dec_hidden=128, target_resolution=32,
                 dec_channels=16, log_every=50, eval_every=500, eval_size=64, save_every=500, proj_dim=128),
}
# Per-data defaults: K (OCLF RandomConditioning n_slots 7 on COCO; the synthetic sets as in slot_attention.py)
# and flips (OCLF _preprocessing_coco_dino_feature_recon_ccrop.yaml: RandomHorizontalFlip in training).
DATA_DEFAULTS = {
    "shapes": dict(num_slots=6, hflip=False), "shapes-colored": dict(num_slots=5, hflip=False),
    "shapes-binary": dict(num_slots=4, hflip=False), "tetrominoes": dict(num_slots=4, hflip=False),
    "clevr-lite": dict(num_slots=7, hflip=False),  # CLEVR6-like: K as slot_attention.py's CLEVR6 row
    "coco": dict(num_slots=7, hflip=True), "other": dict(num_slots=7, hflip=False),
}
# name: (patch, dim, depth, heads, native grid of pos_embed). DINO (Caron et al. 2021) trains at 224 px.
VIT_CONFIGS = {
    "vit_s16": (16, 384, 12, 6, 14), "vit_s8": (8, 384, 12, 6, 28),
    "vit_b16": (16, 768, 12, 12, 14), "vit_b8": (8, 768, 12, 12, 28),
    "vit_tiny": (4, 64, 2, 2, 8),  # tests and the tiny preset only (no released weights)
}

LOSSES = ("mse", "cov", "vicreg", "cosine")
# Flags that shape the weights: --resume and --eval-only take them from the checkpoint and refuse other values.
ARCH_KEYS = ("vit", "resolution", "slot_dim", "mlp_hidden", "dec_hidden", "dec_channels", "target", "image_decoder",
             "dec_convs", "target_resolution", "loss", "proj", "proj_dim", "proj_norm")
# What the papers vary at test time (free under --eval-only), recorded in eval.json.
TEST_KEYS = ("data", "num_slots", "iters", "eval_size", "test_size", "mask_resolution")
# Flags of this invocation only, never taken from a checkpoint (test_size and mask_resolution are resolved for the
# --data of this invocation).
RUNTIME_KEYS = ("resume", "eval_only", "device", "workers", "compile", "out_dir", "run_name", "given", "test_size",
                "mask_resolution")


def data_key(name):
    """The DATA_DEFAULTS entry of --data: a built-in name, "coco" for a COCO 2017 folder, else "other"."""
    if name in DATA_DEFAULTS:
        return name
    coco = Path(name).is_dir() and any((Path(name) / "annotations").glob("instances_*2017.json"))
    return "coco" if coco else "other"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="DINOSAUR (arXiv 2209.14860) on a frozen DINO ViT, with the "
                                "experiments of arXiv 2306.02577.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter, allow_abbrev=False)
    a = p.add_argument
    a("--preset", choices=["paper", "tiny"], default="paper",
      help="paper: the paper's configuration; tiny: a random tiny ViT and a CPU-sized model. Flags override.")
    a("--data", default="shapes", help=f"built-in set ({', '.join(data.BUILTIN)}) or a dataset path (COCO 2017 folder)")
    a("--train-size", type=int, default=None, help="use only the first N training images (None: all)")
    a("--vit", choices=sorted(VIT_CONFIGS), default=None, help="frozen DINO ViT architecture")
    a("--weights", default=None, help="official DINO backbone .pth (None: random ViT, results meaningless)")
    a("--cache-features", default=None, metavar="DIR", help="precompute the ViT features once, train from DIR")
    a("--hflip", action=argparse.BooleanOptionalAction, default=None,
      help="random horizontal flips in training (None: on for COCO, off for the synthetic sets)")
    a("--resolution", type=int, default=None, help="image side in pixels fed to the ViT (multiple of the patch)")
    a("--num-slots", type=int, default=None, help="number of slots K (None: per data set)")
    a("--iters", type=int, default=3, help="slot attention iterations T")
    a("--slot-dim", type=int, default=None, help="slot size (256; 1024 for the collapse experiment)")
    a("--mlp-hidden", type=int, default=None, help="hidden width of the slot MLP (None: 4 x slot dim)")
    a("--target", choices=["features", "image"], default="features",
      help="features: DINOSAUR's MLP decoder to the ViT features; image: CNN decoder to the image (2306.02577)")
    a("--dec-hidden", type=int, default=None, help="hidden width of the 3-hidden-layer MLP feature decoder")
    a("--image-decoder", choices=["savi", "adaptive"], default="savi",
      help="--target image decoder: savi (OCLF's image baseline, the stripes) or adaptive (robert1003's COCO runs)")
    a("--dec-channels", type=int, default=None, help="channels of the image decoder (savi: 64; adaptive: 32)")
    a("--dec-convs", type=int, default=6, help="adaptive decoder: conv layers (stride-2 ones: convs - 2)")
    a("--target-resolution", type=int, default=None,
      help="image side of --target image (a multiple of 16 for savi, of 2^(convs-2) for adaptive)")
    a("--image-range", choices=["signed", "unit"], default="signed",
      help="--target image in [-1, 1] (OCLF, Slot Attention) or [0, 1] (robert1003's COCO runs)")
    a("--plain-decoder", action="store_true",
      help="image decoder: tile the slots and convolve (textbook) instead of the exact broadcast shortcut")
    a("--eps", type=float, default=1e-8, help="epsilon added to the attention before the weighted mean")
    a("--implicit-grad", action="store_true",
      help="implicit differentiation: backprop only through one final iteration on detached slots")
    a("--loss", choices=LOSSES, default="mse",
      help="mse: paper; cov: MSE + beta*cov; vicreg: MSE + beta*(var + cov); cosine: MSE + beta*cos")
    a("--beta", type=float, default=1.0, help="weight of the slot regulariser")
    a("--proj", choices=["mlp", "identity"], default="mlp",
      help="cov/vicreg on a projection head h(slots) (mlp) or on the slots themselves (identity)")
    a("--proj-dim", type=int, default=None, help="projection head output size for cov/vicreg")
    a("--proj-norm", choices=["layer", "batch"], default="layer",
      help="projection head normalisation: layer (the reported runs, robert1003 --proj-layernorm) or batch "
      "(BatchNorm1d per dimension over the B*K slots, as VICReg; robert1003's BatchNorm1d(num_slots) differs)")
    a("--cov-norm", choices=["dim", "dim2"], default="dim",
      help="divide the off-diagonal covariance sum by D (paper) or D^2 (reported runs)")
    a("--var-gamma", type=float, default=1.0, help="target standard deviation of the variance term")
    a("--var-eps", type=float, default=1e-4, help="epsilon inside the variance term's square root")
    a("--cos-margin", type=float, default=0.2, help="margin of the cosine slot loss")
    a("--baseline", choices=["blocks"], default=None, help="evaluate the fixed block-mask baseline and exit")
    a("--block-slots", type=int, default=11, help="blocks of --baseline blocks (OCLF metrics_coco_ccrop_random: 11)")
    a("--block-cols", type=int, default=3, help="columns of --baseline blocks (OCLF: 3; the last takes the rest)")
    a("--batch-size", type=int, default=None, help="images per step (per process under torchrun)")
    a("--steps", type=int, default=None, help="total optimiser steps")
    a("--lr", type=float, default=None, help="peak Adam learning rate")
    a("--warmup-steps", type=int, default=None, help="linear learning-rate warm-up, in steps")
    a("--decay-steps", type=int, default=None,
      help="after the warm-up, lr is multiplied by 0.5^((step - warmup_steps) / decay_steps)")
    a("--grad-clip", type=float, default=None, help="max gradient norm (0: no clipping; DINOSAUR: 1.0)")
    a("--seed", type=int, default=0, help="seeds python, numpy, torch, the data order and the flips")
    a("--device", choices=["auto", "cpu", "cuda", "mps"], default="auto", help="auto: cuda, then mps, then cpu")
    a("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32", help="autocast precision")
    a("--compile", action="store_true", help="torch.compile the slot model")
    a("--workers", type=int, default=0, help="data loader worker processes")
    a("--out-dir", default="runs", help="parent folder of run folders")
    a("--run-name", default=None, help="run folder name (default: dinosaur-DATA-TARGET-LOSS-seedN)")
    a("--log-every", type=int, default=None, help="steps between train log lines")
    a("--eval-every", type=int, default=None, help="steps between evaluations (0: only at the end)")
    a("--mask-resolution", type=int, default=None,
      help="COCO: side of the evaluation masks (None: 320 for --target features as OCLF's metrics_coco_ccrop, "
      "--target-resolution for --target image as OCLF's image baseline and robert1003's runs)")
    a("--eval-size", type=int, default=None, help="validation images per evaluation during training")
    a("--test-size", type=int, default=None,
      help="test images of the final evaluation and --eval-only (None: every one for a dataset folder, e.g. all "
      "5,000 of COCO val2017 as OCLF's metrics_coco_ccrop; --eval-size for the built-in sets)")
    a("--save-every", type=int, default=None, help="steps between checkpoints")
    a("--resume", default=None, metavar="CKPT|auto", help="continue a run from its checkpoint (its folder is reused; "
      "flags given here override the checkpoint's); auto: this run folder's checkpoint if there is one, else start")
    a("--eval-only", default=None, metavar="CKPT", help="evaluate a checkpoint on the test split, write eval.json")
    args = p.parse_args(argv)
    # the flags this command line gives: under --resume / --eval-only they override the checkpoint's
    args.given = sorted({t[2:].split("=")[0].replace("-", "_") for t in (sys.argv[1:] if argv is None else argv)
                         if t.startswith("--")})

    key = data_key(args.data)
    for k, v in {**DATA_DEFAULTS[key], **PRESETS[args.preset]}.items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)
    if args.mlp_hidden is None:
        args.mlp_hidden = 4 * args.slot_dim  # DINOSAUR: slot MLP 4 x dim
    positive = ("resolution", "num_slots", "iters", "slot_dim", "mlp_hidden", "dec_hidden", "dec_channels", "dec_convs",
                "target_resolution", "batch_size", "steps", "proj_dim", "log_every", "save_every", "eval_size",
                "decay_steps")
    for k in positive:
        if getattr(args, k) <= 0:
            p.error(f"--{k.replace('_', '-')} must be positive, got {getattr(args, k)}")
    for k in ("warmup_steps", "grad_clip", "eval_every", "workers", "beta", "lr"):
        if getattr(args, k) < 0:
            p.error(f"--{k.replace('_', '-')} must be non-negative, got {getattr(args, k)}")
    if not 1 <= args.block_cols <= args.block_slots:
        p.error(f"--block-cols must be between 1 and --block-slots ({args.block_slots}), got {args.block_cols}")
    patch = VIT_CONFIGS[args.vit][0]
    if args.resolution % patch:
        p.error(f"--resolution must be a multiple of the {args.vit} patch size {patch}, got {args.resolution}")
    up = 2 ** (4 if args.image_decoder == "savi" else args.dec_convs - 2)
    if args.target == "image" and (args.dec_convs < 2 or args.target_resolution % up):
        p.error(f"the {args.image_decoder} decoder upsamples {up}x from a broadcast grid: --target-resolution must "
                f"be a multiple of {up} (and --dec-convs at least 2), got {args.target_resolution}")
    for k in ("train_size", "test_size", "mask_resolution"):
        if getattr(args, k) is not None and getattr(args, k) <= 0:
            p.error(f"--{k.replace('_', '-')} must be positive")
    if args.cache_features and args.data in data.BUILTIN and args.train_size is None \
            and not (args.eval_only or args.baseline):
        p.error(f"--cache-features on the built-in set {args.data} (1,000,000 training images) needs --train-size")
    return args


# --- Model


def position_grid(h, w, device=None):
    """[y, x, 1-y, 1-x] with y, x = linspace(0, 1), shape (h, w, 4) (2006.15055 App. E.1)."""
    y, x = torch.meshgrid(torch.linspace(0, 1, h, device=device), torch.linspace(0, 1, w, device=device),
                          indexing="ij")
    return torch.stack([y, x, 1 - y, 1 - x], dim=-1)  # (h, w, 4)


class SlotAttention(nn.Module):
    """Algorithm 1 of arXiv 2006.15055: iterative attention in which slots compete for inputs.

    Fast form, same numbers (tested against a transcription of Algorithm 1):
      - the attention is (B, K, N): the softmax over the K slots runs over dim 1, the renormalisation over the
        N inputs over the contiguous last dimension (a softmax over a last dimension of size K is slow);
      - keys and values are never materialised. With x_n the normalised inputs, by associativity
            q_k . k_n = q_k . (W_k x_n) = (W_k^T q_k) . x_n   and   sum_n w_kn v_n = W_v (sum_n w_kn x_n),
        so W_k and W_v (one Linear, to_kv) act on K slot-sized vectors instead of N inputs: the (N, C) x (C, 2D)
        projection and its backward disappear, and the attention reads x directly (C = D here: no larger).
    """

    def __init__(self, num_slots, slot_dim, input_dim, mlp_hidden, iters=3, eps=1e-8, implicit_grad=False):
        super().__init__()
        self.num_slots, self.slot_dim, self.iters, self.eps = num_slots, slot_dim, iters, eps
        self.implicit_grad = implicit_grad
        # Slot distribution N(mu, sigma^2), sampled by reparameterisation so both train. OCLF ocl/conditioning.py
        # RandomConditioning: torch's xavier_uniform_ on the (1, 1, D) mean and log-sigma, PyTorch LayerNorms.
        self.slots_mu = nn.Parameter(nn.init.xavier_uniform_(torch.empty(1, 1, slot_dim)))
        self.slots_log_sigma = nn.Parameter(nn.init.xavier_uniform_(torch.empty(1, 1, slot_dim)))
        self.norm_inputs = nn.LayerNorm(input_dim)
        self.norm_slots = nn.LayerNorm(slot_dim)
        self.norm_mlp = nn.LayerNorm(slot_dim)
        self.to_q = nn.Linear(slot_dim, slot_dim, bias=False)
        self.to_kv = nn.Linear(input_dim, 2 * slot_dim, bias=False)  # weight [W_k; W_v], each (D, C)
        self.gru = nn.GRUCell(slot_dim, slot_dim)
        self.mlp = nn.Sequential(nn.Linear(slot_dim, mlp_hidden), nn.ReLU(), nn.Linear(mlp_hidden, slot_dim))

    def sample_slots(self, batch_size):
        """slots = mu + sigma * noise, noise ~ N(0, I): (B, K, D)."""
        noise = torch.randn(batch_size, self.num_slots, self.slot_dim, device=self.slots_mu.device)
        return self.slots_mu + self.slots_log_sigma.exp() * noise

    def step(self, slots, x):
        """One iteration. slots (B, K, D); x (B, N, C) the normalised inputs.
        Returns the new slots and the attention before +eps, (B, K, N)."""
        w_k, w_v = self.to_kv.weight.chunk(2)  # (D, C) each
        q = self.to_q(self.norm_slots(slots)) * self.slot_dim ** -0.5  # (B, K, D), the logits' scale applied here
        attn = torch.bmm(q @ w_k, x.transpose(1, 2)).softmax(dim=1)  # (B, K, N): softmax over slots, they compete
        weights = attn + self.eps
        weights = weights / weights.sum(dim=-1, keepdim=True)  # (B, K, N): weighted mean over the inputs
        updates = torch.bmm(weights, x) @ w_v.T  # (B, K, D)
        b, kk, d = slots.shape
        slots = self.gru(updates.reshape(b * kk, d), slots.reshape(b * kk, d)).reshape(b, kk, d)  # hidden: previous
        return slots + self.mlp(self.norm_mlp(slots)), attn  # residual MLP

    def forward(self, inputs, slots=None):
        """inputs (B, N, C); slots: optional initial slots (B, K, D), else sampled."""
        x = self.norm_inputs(inputs)  # (B, N, C)
        if slots is None:
            slots = self.sample_slots(inputs.shape[0])
        if self.implicit_grad:  # Chang et al. 2022: iterate without a graph, differentiate one last step
            init = slots
            with torch.no_grad():
                for _ in range(self.iters):
                    slots, _ = self.step(slots, x)
            # Straight-through to the initialisation (BO-QSA, Jia et al. 2023): the value is the detached fixed
            # point, the gradient reaches mu and sigma as if d slots / d init = I. Without it they get no
            # gradient, which DDP rejects at the second step.
            return self.step(slots.detach() + init - init.detach(), x)
        attn = None
        for _ in range(self.iters):
            slots, attn = self.step(slots, x)
        return slots, attn


def zero_biases(mlp):
    """OCLF ocl/neural_networks/convenience.py build_mlp, which builds DINOSAUR's input MLP, slot MLP and decoder
    MLP: every Linear bias starts at zero (the weights keep torch's default initialisation)."""
    for m in mlp.modules():
        if isinstance(m, nn.Linear):
            nn.init.zeros_(m.bias)
    return mlp


class MLPDecoder(nn.Module):
    """DINOSAUR's MLP decoder (2209.14860 Sec. 3.2): slot k broadcast to every patch p, plus a learned
    position embedding e_p; a shared MLP (3 hidden layers, ReLU) gives y_kp (D) and alpha logit a_kp;
    alpha = softmax over slots; reconstruction y_p = sum_k alpha_kp y_kp."""

    def __init__(self, slot_dim, feat_dim, num_patches, hidden):
        super().__init__()
        self.pos = nn.Parameter(torch.randn(1, 1, num_patches, slot_dim) * 0.02)  # std 0.02 (OCLF PatchDecoder)
        self.mlp = zero_biases(nn.Sequential(nn.Linear(slot_dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden),
                                             nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                             nn.Linear(hidden, feat_dim + 1)))

    def forward(self, slots):
        x = self.mlp(slots.unsqueeze(2) + self.pos)  # (B, K, 1, Ds) + (1, 1, P, Ds) -> (B, K, P, D + 1)
        y, logits = x[..., :-1], x[..., -1]  # (B, K, P, D), (B, K, P)
        masks = logits.softmax(dim=1)  # (B, K, P), alpha over slots
        return torch.einsum("bkp,bkpd->bpd", masks, y), masks  # (B, P, D), (B, K, P)


@functools.lru_cache(maxsize=None)
def tap_sets(transposed, k, stride, padding, output_padding, g):
    """Which taps of a k-wide kernel reach each of the L output positions along one axis of a (transposed)
    convolution on a g-wide map: the layer applied to an all-ones row through one-hot kernels, (k, L) of 0/1.
    Returns its distinct columns (k, U) and the column of each position (L,). In the interior every position
    sees all taps (per output parity when strided); zero padding and the map's edge cut taps at the borders,
    so U is small: 1 for a 1x1 layer, 5 for a 5x5 stride-2 transposed conv on 8x8 (two parities, three borders)."""
    ones, eye = torch.ones(1, 1, g), torch.eye(k)
    taps = (F.conv_transpose1d(ones, eye.view(1, k, k), stride=stride, padding=padding, output_padding=output_padding)
            if transposed else F.conv1d(ones, eye.view(k, 1, k), stride=stride, padding=padding))[0]  # (k, L)
    return torch.unique(taps, dim=1, return_inverse=True)


def broadcast_conv(slots, pos, conv):
    """conv(tile(s) + P) for every slot s, without convolving the tiled slot (exact).

    A tiled slot is constant over the grid and a convolution is linear, so with zero padding
        conv(tile(s) + P) = conv(P) + sum_c s_c R_c,   R_c = conv of an all-ones map in input channel c (no bias).
    conv(P), the position embedding's convolution with the bias, is computed once at batch 1. Output pixel (y, x)
    is reached by the taps Ty(y) x Tx(x), so R[c, o, y, x] = sum_{ky in Ty(y), kx in Tx(x)} W[c, o, ky, kx]: one
    value per pair of distinct tap sets (tap_sets), computed once per set pair, multiplied with the slots in one
    (N, C) x (C, O*U*U) product and gathered to the pixels. slots (N, C); pos (1, C, h, w); conv an nn.Conv2d or
    nn.ConvTranspose2d (square kernel, equal strides and paddings, no dilation). Returns (N, O, H, W), the output
    of conv on the (N, C, h, w) broadcast, in channels_last memory layout (as the tiled path's: the following
    convolutions run their faster kernels, measured). slot_attention.py computes R with a grouped convolution of
    the all-ones map instead; on DINOSAUR's 8x8 transposed conv that took 5x the plain layer's time (docs/dinosaur.md).
    """
    transposed = isinstance(conv, nn.ConvTranspose2d)
    sets, index = tap_sets(transposed, conv.kernel_size[0], conv.stride[0], conv.padding[0],
                           conv.output_padding[0] if transposed else 0, pos.shape[-1])  # (k, U), (L,)
    sets, index = sets.to(conv.weight), index.to(conv.weight.device)
    w = conv.weight if transposed else conv.weight.transpose(0, 1)  # (C, O, k, k)
    r = torch.einsum("cokl,ku,lv->couv", w, sets, sets)  # (C, O, U, U): the all-ones response per tap-set pair
    per_slot = torch.einsum("nc,couv->nuvo", slots, r)[:, index[:, None], index[None, :]]  # (N, H, W, O)
    return per_slot.permute(0, 3, 1, 2) + conv(pos)  # (N, O, H, W), channels_last strides


class ImageDecoder(nn.Module):
    """Spatial broadcast decoder for --target image: each slot tiled on a g x g grid plus a position embedding,
    decoded on its own to RGB (3) + alpha logit (1); alpha softmaxed over slots, recon = sum_k alpha_k rgb_k.

    savi: OCLF experiment_image_feature_rec/coco_image_rec_base16_frozen.yaml, the image-reconstruction baseline
        of 2209.14860 Sec. 4.3 (the "stripes" of 2306.02577): g = res/16 (8 at 128 px), embedding a Linear of
        [y, x] in [-1, 1] (SoftPositionEmbed savi_style), ConvT 5x5 stride 2 D -> C, 3 more ConvT 5x5 stride 2,
        ConvT 1x1 -> 4 (ocl/decoding.py get_savi_decoder_backbone, larger_input_arch, C = 64), tanh on the RGB.
    adaptive: robert1003 af7b5f8 pytorch/model.py COCOAdaptiveDecoder (the COVLOSS and COSINELOSS COCO runs):
        g = res / 2^(convs-2) (8 at 128 px with 6 convs), embedding a Linear of [y, x, 1-y, 1-x], a per-position
        MLP D -> C -> C -> C (1x1 convs), (convs-2) x ConvT 5x5 stride 2, ConvT 5x5, ConvT 3x3 -> 4; RGB linear.

    fast: the first layer after the broadcast by broadcast_conv (the same numbers); fast=False tiles and convolves.
    """

    def __init__(self, kind, slot_dim, channels, resolution, convs=6, fast=True):
        super().__init__()
        self.kind, self.fast = kind, fast
        self.grid = g = resolution // 2 ** (4 if kind == "savi" else convs - 2)
        coords = position_grid(g, g)  # (g, g, 4): [y, x, 1-y, 1-x]
        self.register_buffer("coords", coords[..., :2] * 2 - 1 if kind == "savi" else coords, persistent=False)
        self.pos = nn.Linear(self.coords.shape[-1], slot_dim)

        def up(c_in):  # 5x5 transposed conv, stride 2: doubles the side
            return [nn.ConvTranspose2d(c_in, channels, 5, stride=2, padding=2, output_padding=1), nn.ReLU()]
        if kind == "savi":
            self.first = up(slot_dim)[0]
            rest = [nn.ReLU(), *up(channels), *up(channels), *up(channels), nn.ConvTranspose2d(channels, 4, 1)]
        else:
            self.first = nn.Conv2d(slot_dim, channels, 1)  # the MLP's first Linear, at every position
            rest = [nn.ReLU(), nn.Conv2d(channels, channels, 1), nn.ReLU(), nn.Conv2d(channels, channels, 1)]
            rest += [m for _ in range(convs - 2) for m in up(channels)]
            rest += [nn.ConvTranspose2d(channels, channels, 5, padding=2), nn.ReLU(),
                     nn.ConvTranspose2d(channels, 4, 3, padding=1)]
        self.cnn = nn.Sequential(*rest)

    def forward(self, slots):
        b = slots.shape[0]
        pos = rearrange(self.pos(self.coords), "h w d -> 1 d h w")  # (1, D, g, g)
        if self.fast:
            x = broadcast_conv(slots.flatten(0, 1), pos, self.first)  # (B*K, C, h, w)
        else:
            x = self.first(repeat(slots, "b k d -> (b k) d h w", h=self.grid, w=self.grid) + pos)  # tiled slots
        x = rearrange(self.cnn(x), "(b k) c h w -> b k c h w", b=b)  # (B, K, 4, H, W)
        rgb = torch.tanh(x[:, :, :3]) if self.kind == "savi" else x[:, :, :3]  # (B, K, 3, H, W)
        masks = x[:, :, 3].softmax(dim=1)  # (B, K, H, W), alpha over slots
        return (masks.unsqueeze(2) * rgb).sum(dim=1), masks, rgb  # recon (B, 3, H, W)


class ProjectionHead(nn.Module):
    """h: slot_dim -> proj_dim, Linear-norm-ReLU, Linear-norm-ReLU, Linear (VICReg; 2306.02577)."""

    def __init__(self, slot_dim, proj_dim, norm="layer"):
        super().__init__()
        Norm = nn.LayerNorm if norm == "layer" else nn.BatchNorm1d
        self.net = nn.Sequential(nn.Linear(slot_dim, proj_dim), Norm(proj_dim), nn.ReLU(),
                                 nn.Linear(proj_dim, proj_dim), Norm(proj_dim), nn.ReLU(),
                                 nn.Linear(proj_dim, proj_dim))

    def forward(self, slots):
        return self.net(slots)  # (B*K, P)


class Dinosaur(nn.Module):
    """Frozen features -> input MLP -> Slot Attention -> decoder; the projection head (cov / vicreg) on the side.

    decoder: MLPDecoder (features) or ImageDecoder (image); projector: ProjectionHead, nn.Identity (the
    regulariser on the slots themselves) or None."""

    def __init__(self, feat_dim, slot_attention, decoder, projector=None):
        super().__init__()
        # 2209.14860 Sec. 3.1 (OCLF build_two_layer_mlp, initial_layer_norm): LayerNorm, Linear(D, D), ReLU,
        # Linear(D, slot_dim); no position embedding.
        self.input_mlp = zero_biases(nn.Sequential(nn.LayerNorm(feat_dim), nn.Linear(feat_dim, feat_dim), nn.ReLU(),
                                                   nn.Linear(feat_dim, slot_attention.slot_dim)))
        zero_biases(slot_attention.mlp)  # OCLF's ff_mlp is a build_two_layer_mlp too
        self.slot_attention, self.decoder, self.projector = slot_attention, decoder, projector

    def forward(self, feats, slots=None):
        """feats (B, P, D) frozen ViT features; slots: optional initial slots (B, K, Ds).
        masks: (B, K, P) patch alphas (features) or (B, K, h, w) decoder alphas (image)."""
        slots, attn = self.slot_attention(self.input_mlp(feats), slots)  # (B, K, Ds), (B, K, P)
        recon, masks, *rgb = self.decoder(slots)  # (B, P, D), (B, K, P) or (B, 3, h, w), (B, K, h, w), rgb
        out = dict(recon=recon, masks=masks, slots=slots, attn=attn)
        if rgb:
            out["rgb"] = rgb[0]  # (B, K, 3, h, w)
        if self.projector is not None and self.training:  # the regularisers only train; evaluation skips the head
            with torch.autocast(feats.device.type, enabled=False):  # fp32: the reported covariance reaches ~1e-10
                out["proj"] = self.projector(slots.flatten(0, 1).float())  # (B*K, P): covariance over all slots
        return out


def build_model(args):
    patch, dim = VIT_CONFIGS[args.vit][:2]
    sa = SlotAttention(args.num_slots, args.slot_dim, args.slot_dim, args.mlp_hidden, args.iters, args.eps,
                       args.implicit_grad)
    if args.target == "features":
        decoder = MLPDecoder(args.slot_dim, dim, (args.resolution // patch) ** 2, args.dec_hidden)
    else:
        decoder = ImageDecoder(args.image_decoder, args.slot_dim, args.dec_channels, args.target_resolution,
                               args.dec_convs, fast=not args.plain_decoder)
    projector = None
    if args.loss in ("cov", "vicreg"):
        projector = nn.Identity() if args.proj == "identity" else ProjectionHead(args.slot_dim, args.proj_dim,
                                                                                 args.proj_norm)
    return Dinosaur(dim, sa, decoder, projector)


# --- Objective


def compute_loss(out, target, args):
    """Named loss terms and their total (2209.14860 Sec. 3.2; 2306.02577 Sec. 3).

    target: the frozen features (B, P, D) for --target features, the image in [-1, 1] at the target
    resolution (B, 3, h, w) for --target image.
    mse:    ||target - recon||^2
    cov:    mse + beta * C(h(slots))              (COVLOSS)
    vicreg: mse + beta * (V(h(slots)) + C(h(slots)))
    cosine: mse + beta * mean_{i!=j} max(0, cos(s_i, s_j) - margin)   (COSINELOSS)
    """
    terms = {"mse": F.mse_loss(out["recon"].float(), target.float())}
    reg = 0.0
    if args.loss in ("cov", "vicreg"):
        z = out["proj"].float()
        terms["cov"] = losses.covariance_loss(z, normalize=args.cov_norm)
        reg = terms["cov"]
        if args.loss == "vicreg":
            terms["var"] = losses.variance_loss(z, gamma=args.var_gamma, eps=args.var_eps)
            reg = reg + terms["var"]
    elif args.loss == "cosine":
        terms["cos"] = losses.cosine_slot_loss(out["slots"].float(), margin=args.cos_margin)
        reg = terms["cos"]
    terms["loss"] = terms["mse"] + args.beta * reg
    return terms


# --- Training


# The frozen encoder: DINO's ViT, written here key for key in the layout of the official checkpoints (cls_token,
# pos_embed, patch_embed.proj, blocks.i.{norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2}, norm), so they load
# strict; LayerNorm eps 1e-6, exact GELU, position embedding interpolated bicubically for other grids.


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(LN(x)), then x + mlp(LN(x)); one fused qkv projection."""

    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)  # attribute order = the official key order
        self.attn = nn.ModuleDict(dict(qkv=nn.Linear(dim, 3 * dim), proj=nn.Linear(dim, dim)))
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = nn.Sequential(OrderedDict(fc1=nn.Linear(dim, 4 * dim), act=nn.GELU(), fc2=nn.Linear(4 * dim, dim)))

    def forward(self, x):
        qkv = self.attn.qkv(self.norm1(x))  # (B, N, 3D)
        q, k, v = rearrange(qkv, "b n (three h d) -> three b h n d", three=3, h=self.heads)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, h, N, d), scale d^-0.5
        x = x + self.attn.proj(rearrange(out, "b h n d -> b n (h d)"))  # (B, N, D)
        return x + self.mlp(self.norm2(x))


class VisionTransformer(nn.Module):
    """DINO ViT backbone. forward: images in [0, 1] (B, 3, H, W) -> DINOSAUR features (B, N_patches, D):
    ImageNet normalisation, patches + CLS + position embedding, all blocks; CLS dropped, final `norm` NOT
    applied (it exists so that official checkpoints load strictly)."""

    def __init__(self, patch, dim, depth, heads, grid):
        super().__init__()
        self.patch, self.dim, self.grid = patch, dim, grid
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + grid * grid, dim))
        self.patch_embed = nn.ModuleDict(dict(proj=nn.Conv2d(3, dim, patch, stride=patch)))
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1), persistent=False)
        for p in (self.cls_token, self.pos_embed):
            nn.init.trunc_normal_(p, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def position_embedding(self, gh, gw):
        """pos_embed for a gh x gw patch grid; the patch part interpolated bicubically from the native grid as DINO
        does (facebookresearch/dino vision_transformer.py interpolate_pos_encoding): by the scale factor
        (g + 0.1) / g_native, their guard against a floating-point size error, not by the size, which samples
        slightly other points. The paper configurations run at the native grid (224 px) and interpolate nothing."""
        if (gh, gw) == (self.grid, self.grid):
            return self.pos_embed
        cls, patch = self.pos_embed[:, :1], self.pos_embed[:, 1:]  # (1, 1, D), (1, g*g, D)
        patch = rearrange(patch, "1 (h w) d -> 1 d h w", h=self.grid)  # (1, D, g, g)
        patch = F.interpolate(patch, scale_factor=((gh + 0.1) / self.grid, (gw + 0.1) / self.grid), mode="bicubic",
                              align_corners=False)  # (1, D, gh, gw)
        return torch.cat([cls, rearrange(patch, "1 d h w -> 1 (h w) d")], dim=1)  # (1, 1 + gh*gw, D)

    def forward(self, image):
        x = self.patch_embed.proj((image - self.mean) / self.std)  # (B, D, gh, gw)
        gh, gw = x.shape[-2:]
        x = rearrange(x, "b d h w -> b (h w) d")  # (B, N, D), row-major patches
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)  # (B, 1 + N, D)
        x = x + self.position_embedding(gh, gw)
        for block in self.blocks:
            x = block(x)
        return x[:, 1:]  # (B, N, D): CLS dropped, no final LayerNorm (2209.14860 Sec. 4)


def state_hash(module):
    """sha256 of a module's state dict (names, shapes, bytes): identifies the frozen encoder."""
    h = hashlib.sha256()
    for k, v in module.state_dict().items():
        t = v.detach().cpu().contiguous()
        h.update(f"{k}{tuple(t.shape)}{t.dtype}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def load_vit(name, weights=None):
    """Frozen DINO ViT `name` (see VIT_CONFIGS) in eval mode, requires_grad False.

    weights: an official DINO backbone file (a plain state dict; a full training checkpoint's "teacher"
    entry with its "module."/"backbone." prefixes is accepted too), loaded weights_only and strict. A file
    of the wrong layout or shape raises data.DataError naming the first mismatching key. weights=None: a
    random ViT, initialised from a fixed seed (the same every time, without touching the global RNG).
    """
    if name not in VIT_CONFIGS:
        raise data.DataError(f"unknown ViT {name!r}; expected one of {', '.join(sorted(VIT_CONFIGS))}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        vit = VisionTransformer(*VIT_CONFIGS[name])
    if weights is not None:
        sd = load_checkpoint(weights, "weights file")
        if isinstance(sd, dict) and "teacher" in sd:
            sd = {k.removeprefix("module.").removeprefix("backbone."): v for k, v in sd["teacher"].items()
                  if not k.removeprefix("module.").startswith("head.")}
        if not isinstance(sd, dict):
            raise data.DataError(f"{weights}: holds a {type(sd).__name__}, expected a state dict")
        expected = vit.state_dict()
        for k, v in expected.items():
            got = tuple(sd[k].shape) if torch.is_tensor(sd.get(k)) else None
            if got != tuple(v.shape):
                why = f"missing key {k!r}" if k not in sd else f"key {k!r} has shape {got}, expected {tuple(v.shape)}"
                raise data.DataError(f"{weights}: {why}; not a {name} DINO checkpoint")
        extra = [k for k in sd if k not in expected]
        if extra:
            raise data.DataError(f"{weights}: unexpected key {extra[0]!r}; not a {name} DINO checkpoint")
        vit.load_state_dict(sd, strict=True)
    return vit.eval().requires_grad_(False)


EXIT_PREEMPTED = 3  # exit status of a run stopped by a signal after writing its checkpoint (requeue it)


def lr_at(step, args):
    """lr of the optimiser step that follows `step` completed steps: linear warm-up step / warmup_steps, THEN
    0.5^((step - warmup_steps) / decay_steps) (OCLF ocl/scheduling.py exponential_decay_after_optional_warmup,
    as configured in bridging/dinosaur/_base_feature_recon.yaml: the decay starts after the warm-up, so the
    peak lr is reached at step warmup_steps). Like OCLF's LambdaLR, the very first step runs at lr 0."""
    warm = min(1.0, step / args.warmup_steps) if args.warmup_steps else 1.0
    return args.lr * warm * 0.5 ** (max(0, step - args.warmup_steps) / args.decay_steps)


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


def load_checkpoint(path, what="checkpoint"):
    """Weights-only load: a file that needs arbitrary unpickling is refused, never executed."""
    path = Path(path)
    if not path.is_file():
        raise data.DataError(f"{path}: {what} not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # UnpicklingError for hostile files, RuntimeError for corrupt ones
        raise data.DataError(f"{path}: not a weights-only checkpoint ({type(e).__name__}); refusing to load it")


def save_checkpoint(path, model, opt, scaler, step, args, rng, encoder_sha):
    """The slot model only (the frozen encoder is identified by its hash, never stored), written atomically
    (temporary file, then rename): a crash or a kill never leaves a half-written checkpoint."""
    state = dict(model=model.state_dict(), optimizer=opt.state_dict(), scaler=scaler.state_dict(),
                 step=step, args=vars(args), encoder_sha256=encoder_sha, **rng)
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


def flip_bits(step, n, args, rank):
    """Which images of this step's batch are flipped: a pure function of (seed, step, rank), so a resumed
    run flips exactly as an uninterrupted one. None without --hflip."""
    if not args.hflip:
        return None
    g = torch.Generator().manual_seed((args.seed * 1_000_003 + step) * 1_009 + rank)
    return torch.rand(n, generator=g) < 0.5  # (B,)


def prepare(batch, encoder, args, device, flips=None):
    """(features (B, P, D), image (B, 3, H, W), target) of a batch, flipped where `flips` says so."""
    image = batch["image"].to(device, non_blocking=True) if "image" in batch else None
    if flips is not None and image is not None:
        image = torch.where(flips.to(device).view(-1, 1, 1, 1), image.flip(-1), image)
    if "feat" in batch:
        feat = batch["feat"].to(device, non_blocking=True)  # (B, V, P, D)
        v = flips.long().to(device) if flips is not None else torch.zeros(len(feat), dtype=torch.long, device=device)
        feats = feat[torch.arange(len(feat), device=device), v]  # (B, P, D): the orientation of each image
    else:
        with torch.no_grad(), autocast(device, args.dtype):
            feats = encoder(image)
        feats = feats.float()
    if args.target == "features":
        return feats, image, feats
    # OCLF _preprocessing_coco_dino_image_recon.yaml: the target is the image resized bicubically to 128 and
    # clamped, normalised to [-1, 1]; robert1003's COCO runs kept [0, 1] (--image-range unit).
    small = F.interpolate(image, size=(args.target_resolution,) * 2, mode="bicubic", antialias=True).clamp(0, 1)
    return feats, image, small * 2 - 1 if args.image_range == "signed" else small


def masks_at(masks, size, args):
    """Patch alphas (B, K, P) or decoder alphas (B, K, h, w) resized bilinearly to `size` (DINOSAUR)."""
    if masks.dim() == 3:
        g = args.resolution // VIT_CONFIGS[args.vit][0]
        masks = rearrange(masks, "b k (h w) -> b k h w", h=g)  # (B, K, g, g)
    return F.interpolate(masks.float(), size=size, mode="bilinear", align_corners=False)  # (B, K, H, W)


def eval_masks(out, size, args, n):
    """(n, K, *size) masks the metrics score: the block baseline's rectangles when out is None (the same for every
    image, cut at `size` as OCLF cuts them at the masks' 320 px), else the model's alphas resized bilinearly."""
    if out is None:
        return block_masks(args.block_slots, args.block_cols, *size).expand(n, -1, -1, -1)
    return masks_at(out["masks"], tuple(size), args).cpu()


@torch.no_grad()
def evaluate(model, encoder, dataset, args, device, size, split_seed=1234):
    """Segmentation metrics and the reconstruction MSE on the first `size` images of `dataset` (None: all);
    model None evaluates the block baseline. RNG is forked so evaluation never changes training."""
    if model is not None:
        model.eval()
    n = len(dataset) if size is None else min(size, len(dataset))
    loader = data.make_loader(torch.utils.data.Subset(dataset, range(n)), args.batch_size, shuffle=False)
    per_image, mse, first = {}, [], None
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(split_seed)
        for batch in loader:
            out, image = None, batch["image"]
            if model is not None:
                feats, image, target = prepare(batch, encoder, args, device)
                with autocast(device, args.dtype):
                    out = model(feats)
                mse.append(((out["recon"].float() - target) ** 2).flatten(1).mean(dim=1).cpu())
            masks = eval_masks(out, batch["mask"].shape[-2:], args, len(image))  # (B, K, H, W); COCO: 320 px
            if first is None:  # the sample grid shows them at the image's resolution
                first = (image, eval_masks(out, image.shape[-2:], args, len(image)), out or {})
            if getattr(base(dataset), "has_masks", True):
                nb = base(dataset).num_background
                m = metrics.segmentation_metrics(batch["mask"], masks, nb)
                m["fg_ari_oclf"] = m["fg_ari"].nan_to_num(1.0)  # OCLF's ARIMetric: no foreground scores 1
                if "class_mask" in batch:  # COCO: class-level best overlap beside the instance-level one
                    m["mbo_c"] = metrics.mbo_class(batch["class_mask"], masks, num_background=nb)
                for k, v in m.items():
                    per_image.setdefault(k, []).append(v)
    if model is not None:
        model.train()
    result = metrics.average_metrics({k: torch.cat(v) for k, v in per_image.items()}) if per_image else {}
    if mse:
        result["mse"] = torch.cat(mse).mean().item()
    return result, first


def eval_settings(args):
    """The test-time settings eval.json records next to the metrics."""
    return {k: getattr(args, k) for k in TEST_KEYS}


def write_samples(path, image, masks, out, args):
    """Input | reconstruction | argmax segmentation | each slot. With the feature target there is no image
    to show, so the 'reconstruction' paints each slot's region in the slot's mean input colour and the slot
    columns show the input under each mask."""
    image = image.float().cpu()
    size = image.shape[-2:]
    if "rgb" in out:  # image target: the decoded image and each slot's RGB, resized to the input, in [0, 1]
        unit = (lambda x: x.clamp(-1, 1) / 2 + 0.5) if args.image_range == "signed" else (lambda x: x.clamp(0, 1))
        rgb = unit(F.interpolate(out["rgb"].float().flatten(0, 1), size=size, mode="bilinear").view(
            *out["rgb"].shape[:3], *size).cpu())  # (B, K, 3, H, W)
        recon = unit(F.interpolate(out["recon"].float(), size=size, mode="bilinear").cpu())
    else:
        rgb = image.unsqueeze(1).expand(-1, masks.shape[1], -1, -1, -1)  # (B, K, 3, H, W)
        colour = torch.einsum("bkhw,bchw->bkc", masks, image) / masks.sum((2, 3)).clamp_min(1e-6)[..., None]
        recon = torch.einsum("bkhw,bkc->bchw", masks, colour)  # (B, 3, H, W)
    data.save_grid(path, image, recon, masks, rgb)


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

    what = "blocks" if args.baseline else f"{args.target}-{args.loss}"
    run_dir, ckpt = open_run(args, f"dinosaur-{Path(args.data).stem}-{what}-seed{args.seed}")
    if ckpt is not None:
        checkpoint_args(args, ckpt["args"])
    step = ckpt["step"] if ckpt is not None and not args.eval_only else 0
    coco = data_key(args.data) == "coco"  # resolved for this invocation's --data (and the checkpoint's --target)
    if args.mask_resolution is not None and not coco:
        raise data.DataError(f"--mask-resolution applies to a COCO folder; --data is {args.data}")
    if coco and args.mask_resolution is None:  # OCLF metrics_coco_ccrop: 320; the image decoder's own 128
        args.mask_resolution = 320 if args.target == "features" else args.target_resolution
    if args.test_size is None and args.data in data.BUILTIN:
        args.test_size = args.eval_size
    random.seed(args.seed + rank)
    np.random.seed(args.seed + rank)
    torch.manual_seed(args.seed + rank)  # slot noise differs across ranks, as in a bigger batch

    # COCO: evaluation masks at their own resolution (nearest-exact + centre crop, crowd dropped: data.py)
    held_out = {"mask_resolution": args.mask_resolution} if args.mask_resolution else {}
    test_ds = data.make_dataset(args.data, "test", args.resolution, **held_out)
    if args.baseline and (run_dir / "eval.json").exists():
        raise data.DataError(f"{run_dir} already holds a run; pass another --run-name")

    if args.baseline:  # no network at all: fixed rectangles scored like a model's masks
        if is_main:
            result, (image, masks, _) = evaluate(None, None, test_ds, args, device, args.test_size)
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "args.json").write_text(json.dumps(vars(args), indent=2))
            result = {"baseline": args.baseline, **eval_settings(args), **result}
            (run_dir / "eval.json").write_text(json.dumps(result, indent=2))
            data.save_grid(run_dir / "samples" / "blocks.png", image, image, masks,
                           image.unsqueeze(1).expand(-1, masks.shape[1], -1, -1, -1))
            print(json.dumps(result))
        return

    encoder = load_vit(args.vit, args.weights).to(device)
    encoder_sha = state_hash(encoder)
    if args.weights is None and is_main:
        print(f"WARNING: {args.vit} is RANDOMLY INITIALISED (no --weights): the features, and every metric of "
              f"this run, are meaningless; pass an official DINO checkpoint (see README)", file=sys.stderr)
    if ckpt is not None and ckpt.get("encoder_sha256") != encoder_sha:
        raise data.DataError(f"{args.resume or args.eval_only}: trained on other encoder weights than "
                             f"{args.weights or 'the random ' + args.vit}; pass the --weights it was trained with")
    model = build_model(args).to(device)
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
    n_params = sum(p.numel() for p in model.parameters())

    def features(dataset, split, with_images):
        if not args.cache_features:
            return dataset
        if split != "train":  # rank 0 alone evaluates, on the first eval_size / test_size images only
            n = args.eval_size if split == "val" else args.test_size or len(dataset)
            dataset = torch.utils.data.Subset(dataset, range(min(n, len(dataset))))
        return cached_features(encoder, dataset, split, args, device, encoder_sha, with_images, is_main,
                               world if split == "train" else 1)

    if args.eval_only:
        test_ds = features(test_ds, "test", True) if is_main else test_ds
        if is_main:
            result, _ = evaluate(model, encoder, test_ds, args, device, args.test_size)
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
    eval_ds = data.make_dataset(args.data, "val", args.resolution, **held_out)
    if is_main:  # bad data failed above and wrote nothing; an unwritable output folder fails here, before training
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "args.json").write_text(json.dumps(vars(args), indent=2))
        except OSError as e:
            raise data.DataError(f"{run_dir}: cannot write the run folder ({e.strerror})")
    train_ds = features(train_ds, "train", args.target == "image")
    if is_main:  # only rank 0 evaluates
        test_ds, eval_ds = features(test_ds, "test", True), features(eval_ds, "val", True)

    opt = torch.optim.Adam(model.parameters(), lr=args.lr)  # the encoder is frozen: not here
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
        print(f"device {device} | {n_params / 1e6:.2f}M trainable parameters | frozen {args.vit} "
              f"{encoder_sha[:12]} | run folder {run_dir}" + (f" | resumed at step {step}" if step else ""))
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
            batch = next(batches)
            feats, _, target = prepare(batch, encoder, args, device, flip_bits(step, args.batch_size, args, rank))
            for g in opt.param_groups:
                g["lr"] = lr_at(step, args)
            with autocast(device, args.dtype):
                out = model(feats)
            terms = compute_loss(out, target, args)
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
                    write({"step": step, "split": "train", **means, "lr": opt.param_groups[0]["lr"],
                           "images_per_s": n_sum * args.batch_size * world / dt, "peak_mem_mb": peak_memory_mb(device)})
                    bar.set_postfix(loss=f"{means['loss']:.4f}", img_s=f"{n_sum * args.batch_size * world / dt:.0f}",
                                    fg_ari=f"{fg_ari:.3f}")
                    sums, n_sum, t0 = {}, 0, time.time()
            if is_main and not stop and ((args.eval_every and step % args.eval_every == 0) or last):
                t_eval = time.time()
                result, (image_s, masks_s, out_s) = evaluate(plain, encoder, test_ds if last else eval_ds, args,
                                                             device, args.test_size if last else args.eval_size)
                fg_ari = result.get("fg_ari", float("nan"))
                write({"step": step, "split": "eval", **result})
                write_samples(run_dir / "samples" / f"step_{step:07d}.png", image_s, masks_s, out_s, args)
                if last:
                    (run_dir / "eval.json").write_text(json.dumps({"step": step, **eval_settings(args), **result},
                                                                  indent=2))
                t0 += time.time() - t_eval  # evaluation time does not count against images/s
            if save:
                rng = rng_states(device, world, cpu_group)  # a collective: every rank
                if is_main:
                    save_checkpoint(run_dir / "checkpoint.pt", plain, opt, scaler, step, args, rng, encoder_sha)
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



# Feature cache and the block baseline: what the training program needs around the model, kept out of its way.


class FeatureCache(torch.utils.data.Dataset):
    """A dataset whose batches carry `feat` float32 (B, V, P, D) read from a float16 memory-mapped array
    (V = 2 orientations when flips are cached, else 1), plus the base dataset's image/mask if `with_images`."""

    def __init__(self, base, file, with_images):
        self.base, self.file, self.with_images, self._array = base, file, with_images, None

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):  # one sample, for a plain DataLoader; make_loader calls get_batch
        return {k: v[0] for k, v in self.get_batch([i]).items()}

    def __getstate__(self):  # loader workers open their own map
        return {**self.__dict__, "_array": None}

    def get_batch(self, indices):
        if self._array is None:
            self._array = np.load(self.file, mmap_mode="r")  # (V, N, P, D) float16
        batch = data.fetch_batch(self.base, indices) if self.with_images else {}
        batch["feat"] = torch.from_numpy(self._array[:, np.asarray(indices)].astype(np.float32)).transpose(0, 1)
        return batch


def cached_features(encoder, dataset, split, args, device, encoder_sha, with_images, is_main, world):
    """FeatureCache of `dataset` under args.cache_features, (re)built by rank 0 when missing or stale.

    The manifest names everything the features depend on; any difference (other weights, resolution,
    number of images, flips, data, the version of the code that computes them: 2 since the position embedding
    is interpolated as DINO does) means stale: the folder is rebuilt in a temporary folder, then swapped in.
    """
    flips = args.hflip and split == "train"
    ident = str(Path(args.data).resolve()) if args.data not in data.BUILTIN else args.data
    folder = Path(args.cache_features) / f"{Path(args.data).name}-{split}-{args.resolution}px-{args.vit}"
    expected = dict(version=2, vit=args.vit, weights_sha256=encoder_sha, data=ident, split=split,
                    resolution=args.resolution, count=len(dataset), hflip=flips, dtype="float16",
                    patches=(args.resolution // encoder.patch) ** 2, dim=encoder.dim)
    manifest = folder / "manifest.json"
    if is_main:
        found = json.loads(manifest.read_text()) if manifest.is_file() else None
        if found != expected:
            why = "missing" if found is None else "stale: " + ", ".join(
                f"{k} {found.get(k)!r} != {v!r}" for k, v in expected.items() if found.get(k) != v)
            print(f"feature cache {folder}: {why}; building {len(dataset)} images", file=sys.stderr)
            tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            arr = np.lib.format.open_memmap(tmp / "features.npy", mode="w+", dtype=np.float16,
                                            shape=(1 + flips, len(dataset), expected["patches"], encoder.dim))
            loader = data.make_loader(dataset, args.batch_size, shuffle=False)
            i = 0
            for batch in tqdm(loader, desc=f"caching {split}", dynamic_ncols=True):
                image = batch["image"].to(device)
                for v in range(1 + flips):  # orientation 0: as loaded; 1: flipped horizontally
                    with autocast(device, args.dtype), torch.no_grad():
                        f = encoder(image.flip(-1) if v else image)  # (B, P, D)
                    arr[v, i:i + len(image)] = f.float().cpu().numpy().astype(np.float16)
                i += len(image)
            arr.flush()
            del arr
            (tmp / "manifest.json").write_text(json.dumps(expected, indent=2))  # written last: complete
            shutil.rmtree(folder, ignore_errors=True)
            os.replace(tmp, folder)
    if world > 1:
        torch.distributed.barrier()  # other ranks wait for rank 0's cache
    return FeatureCache(dataset, folder / "features.npy", with_images)


def base(dataset):
    """The dataset under a Subset or a FeatureCache (for its attributes)."""
    while isinstance(dataset, (torch.utils.data.Subset, FeatureCache)):
        dataset = dataset.dataset if isinstance(dataset, torch.utils.data.Subset) else dataset.base
    return dataset


def block_masks(k, cols, h, w):
    """The block baseline, one-hot (K, h, w), the same for every image: OCLF's layout (ocl/utils/masking.py
    CreateRandomMaskPatterns(pattern=blocks)): `cols` columns of width ceil(w / cols); each holds K // cols
    blocks, the last one K % cols more; a column of n blocks cuts rows of height ceil(h / n); slots are
    numbered column by column, top to bottom. K=11, cols=3: columns of 3, 3 and 5 blocks."""
    per_col = torch.full((cols,), k // cols)
    per_col[-1] += k % cols
    col = torch.arange(w) // math.ceil(w / cols)  # (w,) column of each pixel column
    height = (h + per_col[col] - 1) // per_col[col]  # (w,) block height in that column: ceil(h / n)
    row = torch.arange(h).view(-1, 1) // height.view(1, -1)  # (h, w) block within its column
    first = torch.cat([per_col.new_zeros(1), per_col.cumsum(0)[:-1]])  # slot id of each column's top block
    return F.one_hot(first[col].view(1, -1) + row, k).permute(2, 0, 1).float()  # (K, h, w)

if __name__ == "__main__":
    main()
