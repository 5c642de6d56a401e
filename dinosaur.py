"""DINOSAUR: slot attention on frozen self-supervised ViT features, and the experiments of arXiv 2306.02577.

Papers
  Seitzer et al., "Bridging the Gap to Real-World Object-Centric Learning", ICLR 2023, arXiv 2209.14860.
  "Covariance / cosine regularisation of slots", arXiv 2306.02577 (COVLOSS, COSINELOSS, image target on COCO).

What is implemented
  - A DINO ViT written here (no timm), key for key the layout of the official DINO checkpoints (cls_token,
    pos_embed, patch_embed.proj, blocks.i.{norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2}, norm), loaded
    with strict=True and weights_only=True; LayerNorm eps 1e-6, exact GELU, scaled_dot_product_attention,
    position embedding interpolated bicubically for other grids. `load_vit(name, weights)` returns it frozen;
    its features are the last block's output, CLS dropped, WITHOUT the final LayerNorm (2209.14860 Sec. 4).
  - The encoder runs under no_grad in eval mode; it is in neither the optimiser nor the checkpoint.
    --cache-features DIR computes its features once per (data, split, resolution, ViT, weights, flip) as
    float16 memory-mapped arrays with a manifest; a stale cache is detected from the manifest and rebuilt.
  - Input MLP (LayerNorm, Linear D->D, ReLU, Linear D->slot_dim), no position embedding; Slot Attention
    (3 iterations, GRU, residual MLP 4 x slot_dim) with learned Gaussian slot initialisation.
  - --target features (DINOSAUR): MLP decoder, each slot broadcast over the P patches + a learned position
    embedding (std 0.02), shared MLP (3 x 2048, ReLU) to D + 1, alpha softmaxed over slots, reconstruction
    sum_k alpha_k y_k, MSE to the frozen features (2209.14860 Sec. 3.2).
    --target image (the baseline of 2306.02577): the same slots decoded by a spatial broadcast CNN decoder
    (CLEVR family of Slot Attention) to the image resized to --target-resolution (128), MSE on [-1, 1].
  - --loss mse | cov | vicreg | cosine with --beta: the slot regularisers of 2306.02577, as in slot_attention.py.
  - Evaluation: patch (or decoder) alpha masks resized bilinearly to the mask resolution, argmax; ARI, FG-ARI
    (crowd / overlapping pixels ignored: data.py marks them -1), mIoU, mBO. --baseline blocks evaluates the
    fixed block masks (same rectangles for every image) with the same metrics.

Deviations and choices (each one stated so a reader can undo it)
  - Without --weights the ViT is randomly initialised (a fixed seed, so a checkpoint evaluates the same
    later); results are then meaningless and the run says so. "vit_tiny" (patch 4, 64-d, 2 blocks) exists
    only for the tests and the tiny preset; DINO released no such model.
  - The block baseline splits the image into K rectangles: floor(sqrt(K)) rows of equal height, the columns
    of each row as equal as possible (2209.14860 does not fix the layout; we state ours).
  - Horizontal flips (COCO by default) are drawn per (seed, step, rank, image), so resuming is exact. With a
    cache, both orientations of every training image are stored (twice the disk) instead of flipping features.
  - The image-target decoder's width is not given in 2306.02577; we use the CLEVR decoder of Slot Attention
    (broadcast at target/16, 4 transposed convs stride 2, --dec-channels 64), which needs a multiple of 16.
  - COVLOSS under DDP uses the B*K slots of the local batch; --cov-norm dim (paper) or dim2 (reported runs).

Commands
  GPU, DINOSAUR on COCO 2017 with the official DINO ViT-B/16 (224 px, K=7, 500k steps), cached features:
    python dinosaur.py --data /data/coco --vit vit_b16 --weights dino_vitbase16_pretrain.pth \\
        --cache-features /data/dino_cache --dtype bf16
  The COCO experiments of arXiv 2306.02577 (add the --data/--weights/--cache-features flags above):
    python dinosaur.py --target image --loss mse        # stripes
    python dinosaur.py --target image --loss cov        # COVLOSS
    python dinosaur.py --target image --loss cosine --beta 0.01
    python dinosaur.py --loss cov                       # DINOSAUR + COV
    python dinosaur.py --slot-dim 1024                  # collapse; add --loss cov to prevent it
    python dinosaur.py --baseline blocks                # block masks
  CPU, tiny preset (random tiny ViT: shows the pipeline only):
    python dinosaur.py --preset tiny
  Several GPUs (or CPU processes with gloo):
    torchrun --nproc_per_node=4 dinosaur.py --data /data/coco --weights dino_vitbase16_pretrain.pth
"""
import argparse
import hashlib
import json
import math
import os
import random
import resource
import signal
import shutil
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
    "paper": dict(batch_size=64, steps=500_000, lr=4e-4, warmup_steps=10_000, decay_steps=100_000,
                  grad_clip=1.0, vit="vit_b16", resolution=224, slot_dim=256, dec_hidden=2048,
                  target_resolution=128, dec_channels=64, log_every=100, eval_every=5_000, eval_size=500,
                  save_every=5_000, proj_dim=1024),
    "tiny": dict(batch_size=16, steps=3_000, lr=4e-4, warmup_steps=200, decay_steps=100_000, grad_clip=1.0,
                 vit="vit_tiny", resolution=32, slot_dim=32, dec_hidden=128, target_resolution=32,
                 dec_channels=16, log_every=50, eval_every=500, eval_size=64, save_every=500, proj_dim=128),
}
# Per-data defaults: K (2209.14860: 7 on COCO; the synthetic sets as in slot_attention.py) and flips.
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
ARCH_KEYS = ("vit", "resolution", "slot_dim", "mlp_hidden", "dec_hidden", "dec_channels", "target", "target_resolution",
             "loss", "proj_dim", "proj_norm")
# What the papers vary at test time (free under --eval-only), recorded in eval.json.
TEST_KEYS = ("data", "num_slots", "iters", "eval_size")
# Flags of this invocation only, never taken from a checkpoint.
RUNTIME_KEYS = ("resume", "eval_only", "device", "workers", "compile", "out_dir", "run_name", "given")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="DINOSAUR (arXiv 2209.14860) on a frozen DINO ViT, with the "
                                "experiments of arXiv 2306.02577.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter, allow_abbrev=False)
    a = p.add_argument
    a("--preset", choices=["paper", "tiny"], default="paper",
      help="paper: the paper's configuration; tiny: a random tiny ViT and a CPU-sized model. Flags override.")
    a("--data", default="shapes", help="built-in set (%s) or a dataset path (COCO 2017 folder)" % ", ".join(data.BUILTIN))
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
    a("--dec-channels", type=int, default=None, help="channels of the image-target CNN decoder")
    a("--target-resolution", type=int, default=None, help="image side of --target image (multiple of 16)")
    a("--eps", type=float, default=1e-8, help="epsilon added to the attention before the weighted mean")
    a("--implicit-grad", action="store_true",
      help="implicit differentiation: backprop only through one final iteration on detached slots")
    a("--loss", choices=LOSSES, default="mse",
      help="mse: paper; cov: MSE + beta*cov; vicreg: MSE + beta*(var + cov); cosine: MSE + beta*cos")
    a("--beta", type=float, default=1.0, help="weight of the slot regulariser")
    a("--proj-dim", type=int, default=None, help="projection head output size for cov/vicreg")
    a("--proj-norm", choices=["layer", "batch"], default="layer", help="normalisation in the projection head")
    a("--cov-norm", choices=["dim", "dim2"], default="dim",
      help="divide the off-diagonal covariance sum by D (paper) or D^2 (reported runs)")
    a("--var-gamma", type=float, default=1.0, help="target standard deviation of the variance term")
    a("--var-eps", type=float, default=1e-4, help="epsilon inside the variance term's square root")
    a("--cos-margin", type=float, default=0.2, help="margin of the cosine slot loss")
    a("--baseline", choices=["blocks"], default=None, help="evaluate the fixed block-mask baseline and exit")
    a("--batch-size", type=int, default=None, help="images per step (per process under torchrun)")
    a("--steps", type=int, default=None, help="total optimiser steps")
    a("--lr", type=float, default=None, help="peak Adam learning rate")
    a("--warmup-steps", type=int, default=None, help="linear learning-rate warm-up, in steps")
    a("--decay-steps", type=int, default=None, help="lr is multiplied by 0.5^(step/decay_steps)")
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
    a("--eval-size", type=int, default=None, help="held-out images per evaluation")
    a("--save-every", type=int, default=None, help="steps between checkpoints")
    a("--resume", default=None, metavar="CKPT|auto", help="continue a run from its checkpoint (its folder is reused; "
      "flags given here override the checkpoint's); auto: this run folder's checkpoint if there is one, else start")
    a("--eval-only", default=None, metavar="CKPT", help="evaluate a checkpoint on the test split, write eval.json")
    args = p.parse_args(argv)
    # the flags this command line gives: under --resume / --eval-only they override the checkpoint's
    args.given = sorted({t[2:].split("=")[0].replace("-", "_") for t in (sys.argv[1:] if argv is None else argv)
                         if t.startswith("--")})


    key = args.data if args.data in DATA_DEFAULTS else (
        "coco" if Path(args.data).is_dir() and any((Path(args.data) / "annotations").glob("instances_*2017.json"))
        else "other")
    for k, v in {**DATA_DEFAULTS[key], **PRESETS[args.preset]}.items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)
    if args.mlp_hidden is None:
        args.mlp_hidden = 4 * args.slot_dim  # DINOSAUR: slot MLP 4 x dim
    positive = ("resolution", "num_slots", "iters", "slot_dim", "mlp_hidden", "dec_hidden", "dec_channels",
                "target_resolution", "batch_size", "steps", "proj_dim", "log_every", "save_every", "eval_size",
                "decay_steps")
    for k in positive:
        if getattr(args, k) <= 0:
            p.error(f"--{k.replace('_', '-')} must be positive, got {getattr(args, k)}")
    for k in ("warmup_steps", "grad_clip", "eval_every", "workers", "beta", "lr"):
        if getattr(args, k) < 0:
            p.error(f"--{k.replace('_', '-')} must be non-negative, got {getattr(args, k)}")
    patch = VIT_CONFIGS[args.vit][0]
    if args.resolution % patch:
        p.error(f"--resolution must be a multiple of the {args.vit} patch size {patch}, got {args.resolution}")
    if args.target == "image" and args.target_resolution % 16:
        p.error(f"the image decoder upsamples 16x from a broadcast grid: --target-resolution must be a "
                f"multiple of 16, got {args.target_resolution}")
    if args.train_size is not None and args.train_size <= 0:
        p.error("--train-size must be positive")
    if args.cache_features and args.data in data.BUILTIN and args.train_size is None \
            and not (args.eval_only or args.baseline):
        p.error(f"--cache-features on the built-in set {args.data} (1,000,000 training images) needs --train-size")
    return args


# --- Model


class Attention(nn.Module):
    """Multi-head self-attention with one fused qkv projection (DINO key names: attn.qkv, attn.proj)."""

    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        q, k, v = rearrange(self.qkv(x), "b n (three h d) -> three b h n d", three=3, h=self.heads)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, h, N, d), scale d^-0.5
        return self.proj(rearrange(out, "b h n d -> b n (h d)"))  # (B, N, D)


class Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)  # exact GELU

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(LN(x)), then x + mlp(LN(x))."""

    def __init__(self, dim, heads):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim, eps=1e-6), Attention(dim, heads)
        self.norm2, self.mlp = nn.LayerNorm(dim, eps=1e-6), Mlp(dim, 4 * dim)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    def __init__(self, patch, dim):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, patch, stride=patch)


class VisionTransformer(nn.Module):
    """DINO ViT backbone. forward: images in [0, 1] (B, 3, H, W) -> DINOSAUR features (B, N_patches, D):
    ImageNet normalisation, patches + CLS + position embedding, all blocks; CLS dropped, final `norm` NOT
    applied (it exists so that official checkpoints load strictly)."""

    def __init__(self, patch, dim, depth, heads, grid):
        super().__init__()
        self.patch, self.dim, self.grid = patch, dim, grid
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + grid * grid, dim))
        self.patch_embed = PatchEmbed(patch, dim)
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
        """pos_embed for a gh x gw patch grid; the patch part interpolated bicubically from the native grid."""
        if (gh, gw) == (self.grid, self.grid):
            return self.pos_embed
        cls, patch = self.pos_embed[:, :1], self.pos_embed[:, 1:]  # (1, 1, D), (1, g*g, D)
        patch = rearrange(patch, "1 (h w) d -> 1 d h w", h=self.grid)  # (1, D, g, g)
        patch = F.interpolate(patch, size=(gh, gw), mode="bicubic", align_corners=False)
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
        path = Path(weights)
        if not path.is_file():
            raise data.DataError(f"{path}: weights file not found; expected an official DINO .pth")
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise data.DataError(f"{path}: not a weights-only checkpoint ({type(e).__name__}); refusing to load it")
        if isinstance(sd, dict) and "teacher" in sd:
            sd = {k.removeprefix("module.").removeprefix("backbone."): v for k, v in sd["teacher"].items()
                  if not k.removeprefix("module.").startswith("head.")}
        if not isinstance(sd, dict):
            raise data.DataError(f"{path}: holds a {type(sd).__name__}, expected a state dict")
        expected = vit.state_dict()
        for k, v in expected.items():
            if k not in sd:
                raise data.DataError(f"{path}: missing key {k!r}; not a {name} DINO checkpoint")
            if not torch.is_tensor(sd[k]) or tuple(sd[k].shape) != tuple(v.shape):
                got = tuple(sd[k].shape) if torch.is_tensor(sd[k]) else type(sd[k]).__name__
                raise data.DataError(f"{path}: key {k!r} has shape {got}, expected {tuple(v.shape)} for {name}")
        extra = [k for k in sd if k not in expected]
        if extra:
            raise data.DataError(f"{path}: unexpected key {extra[0]!r}; not a {name} DINO checkpoint")
        vit.load_state_dict(sd, strict=True)
    return vit.eval().requires_grad_(False)


def position_grid(h, w, device=None):
    """[y, x, 1-y, 1-x] with y, x = linspace(0, 1), shape (h, w, 4) (2006.15055 App. E.1)."""
    y, x = torch.meshgrid(torch.linspace(0, 1, h, device=device), torch.linspace(0, 1, w, device=device),
                          indexing="ij")
    return torch.stack([y, x, 1 - y, 1 - x], dim=-1)  # (h, w, 4)


class SoftPositionEmbed(nn.Module):
    """Adds a learned linear projection of the position grid to a (B, C, h, w) feature map."""

    def __init__(self, channels, h, w):
        super().__init__()
        self.proj = nn.Linear(4, channels)
        self.register_buffer("grid", position_grid(h, w), persistent=False)  # (h, w, 4)

    def forward(self, x):
        return x + rearrange(self.proj(self.grid), "h w c -> 1 c h w")  # (B, C, h, w)


class SlotAttention(nn.Module):
    """Algorithm 1 of arXiv 2006.15055: iterative attention in which slots compete for inputs."""

    def __init__(self, num_slots, slot_dim, input_dim, mlp_hidden, iters=3, eps=1e-8, implicit_grad=False):
        super().__init__()
        self.num_slots, self.slot_dim, self.iters, self.eps = num_slots, slot_dim, iters, eps
        self.implicit_grad = implicit_grad
        self.scale = slot_dim ** -0.5
        # Slot distribution N(mu, sigma^2), sampled by reparameterisation so both train.
        self.slots_mu = nn.Parameter(nn.init.xavier_uniform_(torch.empty(1, 1, slot_dim)))
        self.slots_log_sigma = nn.Parameter(nn.init.xavier_uniform_(torch.empty(1, 1, slot_dim)))
        self.norm_inputs = nn.LayerNorm(input_dim)
        self.norm_slots = nn.LayerNorm(slot_dim)
        self.norm_mlp = nn.LayerNorm(slot_dim)
        self.to_q = nn.Linear(slot_dim, slot_dim, bias=False)
        self.to_k = nn.Linear(input_dim, slot_dim, bias=False)
        self.to_v = nn.Linear(input_dim, slot_dim, bias=False)
        self.gru = nn.GRUCell(slot_dim, slot_dim)
        self.mlp = nn.Sequential(nn.Linear(slot_dim, mlp_hidden), nn.ReLU(), nn.Linear(mlp_hidden, slot_dim))

    def sample_slots(self, batch_size):
        """slots = mu + sigma * noise, noise ~ N(0, I): (B, K, D)."""
        noise = torch.randn(batch_size, self.num_slots, self.slot_dim, device=self.slots_mu.device)
        return self.slots_mu + self.slots_log_sigma.exp() * noise

    def step(self, slots, k, v):
        """One iteration. slots (B, K, D); k, v (B, N, D). Returns new slots and attention (B, N, K)."""
        q = self.to_q(self.norm_slots(slots))  # (B, K, D)
        logits = torch.einsum("bnd,bkd->bnk", k, q) * self.scale  # (B, N, K)
        attn = logits.softmax(dim=-1) + self.eps  # softmax over slots: slots compete for each input
        weights = attn / attn.sum(dim=1, keepdim=True)  # (B, N, K) weighted mean over inputs
        updates = torch.einsum("bnk,bnd->bkd", weights, v)  # (B, K, D)
        b, kk, d = slots.shape
        slots = self.gru(updates.reshape(b * kk, d), slots.reshape(b * kk, d)).reshape(b, kk, d)
        slots = slots + self.mlp(self.norm_mlp(slots))  # residual MLP
        return slots, attn

    def forward(self, inputs, slots=None):
        """inputs (B, N, C); slots: optional initial slots (B, K, D), else sampled."""
        inputs = self.norm_inputs(inputs)
        k, v = self.to_k(inputs), self.to_v(inputs)  # (B, N, D) each
        if slots is None:
            slots = self.sample_slots(inputs.shape[0])
        if self.implicit_grad:
            with torch.no_grad():
                for _ in range(self.iters):
                    slots, _ = self.step(slots, k, v)
            return self.step(slots.detach(), k, v)  # the gradient flows through this step only
        attn = None
        for _ in range(self.iters):
            slots, attn = self.step(slots, k, v)
        return slots, attn


class MLPDecoder(nn.Module):
    """DINOSAUR's MLP decoder (2209.14860 Sec. 3.2): slot k broadcast to every patch p, plus a learned
    position embedding e_p; a shared MLP (3 hidden layers, ReLU) gives y_kp (D) and alpha logit a_kp;
    alpha = softmax over slots; reconstruction y_p = sum_k alpha_kp y_kp."""

    def __init__(self, slot_dim, feat_dim, num_patches, hidden):
        super().__init__()
        self.pos = nn.Parameter(torch.randn(1, 1, num_patches, slot_dim) * 0.02)  # std 0.02
        self.mlp = nn.Sequential(nn.Linear(slot_dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                 nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, feat_dim + 1))

    def forward(self, slots):
        x = self.mlp(slots.unsqueeze(2) + self.pos)  # (B, K, 1, Ds) + (1, 1, P, Ds) -> (B, K, P, D + 1)
        y, logits = x[..., :-1], x[..., -1]  # (B, K, P, D), (B, K, P)
        masks = logits.softmax(dim=1)  # (B, K, P), alpha over slots
        return torch.einsum("bkp,bkpd->bpd", masks, y), masks  # (B, P, D), (B, K, P)


class BroadcastDecoder(nn.Module):
    """Spatial broadcast CNN decoder (Slot Attention's CLEVR decoder) for --target image: each slot is
    tiled on a (res/16)^2 grid, position-embedded, 4 transposed convs stride 2 + conv 5x5 + conv 3x3
    to RGB (3) + alpha logit (1)."""

    def __init__(self, slot_dim, channels, resolution):
        super().__init__()
        self.grid = resolution // 16
        self.pos = SoftPositionEmbed(slot_dim, self.grid, self.grid)
        layers, c = [], slot_dim
        for _ in range(4):  # 8 -> 16 -> 32 -> 64 -> 128 at 128 px
            layers += [nn.ConvTranspose2d(c, channels, 5, stride=2, padding=2, output_padding=1), nn.ReLU()]
            c = channels
        layers += [nn.Conv2d(c, channels, 5, padding=2), nn.ReLU(), nn.Conv2d(channels, 4, 3, padding=1)]
        self.cnn = nn.Sequential(*layers)

    def forward(self, slots):
        b = slots.shape[0]
        x = repeat(slots, "b k d -> (b k) d h w", h=self.grid, w=self.grid)  # (B*K, D, g, g)
        x = rearrange(self.cnn(self.pos(x)), "(b k) c h w -> b k c h w", b=b)  # (B, K, 4, H, W)
        rgb, masks = x[:, :, :3], x[:, :, 3].softmax(dim=1)  # (B, K, 3, H, W), (B, K, H, W) alpha over slots
        return (masks.unsqueeze(2) * rgb).sum(dim=1), masks, rgb  # recon (B, 3, H, W) in [-1, 1]


class ProjectionHead(nn.Module):
    """h: slot_dim -> proj_dim, Linear-norm-ReLU, Linear-norm-ReLU, Linear (VICReg; 2306.02577)."""

    def __init__(self, slot_dim, proj_dim, norm="layer"):
        super().__init__()
        Norm = nn.LayerNorm if norm == "layer" else nn.BatchNorm1d
        self.net = nn.Sequential(nn.Linear(slot_dim, proj_dim), Norm(proj_dim), nn.ReLU(),
                                 nn.Linear(proj_dim, proj_dim), Norm(proj_dim), nn.ReLU(),
                                 nn.Linear(proj_dim, proj_dim))

    def forward(self, slots):
        return self.net(slots.flatten(0, 1))  # (B*K, P): covariance is over all slots of the batch


class Dinosaur(nn.Module):
    """Frozen features -> input MLP -> Slot Attention -> MLP feature decoder (or CNN image decoder)."""

    def __init__(self, feat_dim, num_patches, num_slots=7, slot_dim=256, mlp_hidden=1024, iters=3, eps=1e-8,
                 implicit_grad=False, target="features", dec_hidden=2048, dec_channels=64, target_resolution=128,
                 proj_dim=None, proj_norm="layer"):
        super().__init__()
        self.target = target
        # 2209.14860 Sec. 3.1: LayerNorm, Linear(D, D), ReLU, Linear(D, slot_dim); no position embedding.
        self.input_mlp = nn.Sequential(nn.LayerNorm(feat_dim), nn.Linear(feat_dim, feat_dim), nn.ReLU(),
                                       nn.Linear(feat_dim, slot_dim))
        self.slot_attention = SlotAttention(num_slots, slot_dim, slot_dim, mlp_hidden, iters, eps, implicit_grad)
        self.decoder = (MLPDecoder(slot_dim, feat_dim, num_patches, dec_hidden) if target == "features"
                        else BroadcastDecoder(slot_dim, dec_channels, target_resolution))
        # Only the cov / vicreg objectives use a projection head; it trains with the model.
        self.projector = ProjectionHead(slot_dim, proj_dim, proj_norm) if proj_dim else None

    def forward(self, feats, slots=None):
        """feats (B, P, D) frozen ViT features; slots: optional initial slots (B, K, Ds).
        masks: (B, K, P) patch alphas (features) or (B, K, h, w) decoder alphas (image)."""
        slots, attn = self.slot_attention(self.input_mlp(feats), slots)  # (B, K, Ds), (B, P, K)
        if self.target == "features":
            recon, masks = self.decoder(slots)  # (B, P, D), (B, K, P)
            out = dict(recon=recon, masks=masks)
        else:
            recon, masks, rgb = self.decoder(slots)  # (B, 3, h, w), (B, K, h, w), (B, K, 3, h, w)
            out = dict(recon=recon, masks=masks, rgb=rgb)
        out.update(slots=slots, attn=attn)
        if self.projector is not None:
            out["proj"] = self.projector(slots)  # (B*K, P)
        return out


def build_model(args):
    patch, dim = VIT_CONFIGS[args.vit][:2]
    proj = args.proj_dim if args.loss in ("cov", "vicreg") else None
    return Dinosaur(dim, (args.resolution // patch) ** 2, args.num_slots, args.slot_dim, args.mlp_hidden,
                    args.iters, args.eps, args.implicit_grad, args.target, args.dec_hidden, args.dec_channels,
                    args.target_resolution, proj, args.proj_norm)


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

EXIT_PREEMPTED = 3  # exit status of a run stopped by a signal after writing its checkpoint (requeue it)


def lr_at(step, args):
    """Linear warm-up times 0.5^(step/decay_steps) from step 0 (2209.14860 App.; as Slot Attention)."""
    warm = min(1.0, (step + 1) / args.warmup_steps) if args.warmup_steps else 1.0
    return args.lr * warm * 0.5 ** (step / args.decay_steps)


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


class FeatureCache(torch.utils.data.Dataset):
    """A dataset whose batches carry `feat` float32 (B, V, P, D) read from a float16 memory-mapped array
    (V = 2 orientations when flips are cached, else 1), plus the base dataset's image/mask if `with_images`."""

    def __init__(self, base, file, with_images):
        self.base, self.file, self.with_images, self._array = base, file, with_images, None

    def __len__(self):
        return len(self.base)

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
    number of images, flips, data) means stale: the folder is rebuilt in a temporary folder, then swapped in.
    """
    flips = args.hflip and split == "train"
    ident = str(Path(args.data).resolve()) if args.data not in data.BUILTIN else args.data
    folder = Path(args.cache_features) / f"{Path(args.data).name}-{split}-{args.resolution}px-{args.vit}"
    expected = dict(version=1, vit=args.vit, weights_sha256=encoder_sha, data=ident, split=split,
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
    small = F.interpolate(image, size=(args.target_resolution,) * 2, mode="bilinear", antialias=True,
                          align_corners=False)
    return feats, image, small * 2 - 1  # the image target works on [-1, 1] (2306.02577, as Slot Attention)


def masks_at(masks, size, args):
    """Patch alphas (B, K, P) or decoder alphas (B, K, h, w) resized bilinearly to `size` (DINOSAUR)."""
    if masks.dim() == 3:
        g = args.resolution // VIT_CONFIGS[args.vit][0]
        masks = rearrange(masks, "b k (h w) -> b k h w", h=g)  # (B, K, g, g)
    return F.interpolate(masks.float(), size=size, mode="bilinear", align_corners=False)  # (B, K, H, W)


def block_masks(k, h, w):
    """The block baseline: K fixed rectangles, one-hot (K, h, w). floor(sqrt(K)) rows of equal height;
    row r holds K // rows columns, the last K % rows rows one more."""
    rows = max(1, math.isqrt(k))
    per_row = [k // rows + (r >= rows - k % rows) for r in range(rows)]
    row = (torch.arange(h) * rows // h)  # (h,) row of each pixel row
    first = torch.tensor([0] + per_row).cumsum(0)  # slot id of each row's first block
    cols = torch.tensor(per_row)[row]  # (h,) blocks in that row
    col = torch.arange(w).view(1, -1) * cols.view(-1, 1) // w  # (h, w) block within its row
    ids = first[row].view(-1, 1) + col  # (h, w)
    return F.one_hot(ids, k).permute(2, 0, 1).float()  # (K, h, w)


@torch.no_grad()
def evaluate(model, encoder, dataset, args, device, split_seed=1234):
    """Segmentation metrics and the reconstruction MSE on the first `eval_size` images of `dataset`;
    model None evaluates the block baseline. RNG is forked so evaluation never changes training."""
    if model is not None:
        model.eval()
    n = min(args.eval_size, len(dataset))
    loader = data.make_loader(torch.utils.data.Subset(dataset, range(n)), args.batch_size, shuffle=False)
    per_image, mse, first = {}, [], None
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(split_seed)
        for batch in loader:
            size = tuple(batch["mask"].shape[-2:])
            if model is None:
                masks, out = block_masks(args.num_slots, *size).expand(len(batch["mask"]), -1, -1, -1), {}
                image = batch["image"]
            else:
                feats, image, target = prepare(batch, encoder, args, device)
                with autocast(device, args.dtype):
                    out = model(feats)
                mse.append(((out["recon"].float() - target) ** 2).flatten(1).mean(dim=1).cpu())
                masks = masks_at(out["masks"], size, args).cpu()  # (B, K, H, W)
            if first is None:
                first = (image, masks, out)
            if getattr(base(dataset), "has_masks", True):
                m = metrics.segmentation_metrics(batch["mask"], masks, base(dataset).num_background)
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


def base(dataset):
    """The dataset under a Subset or a FeatureCache (for its attributes)."""
    while isinstance(dataset, (torch.utils.data.Subset, FeatureCache)):
        dataset = dataset.dataset if isinstance(dataset, torch.utils.data.Subset) else dataset.base
    return dataset


def write_samples(path, image, masks, out):
    """Input | reconstruction | argmax segmentation | each slot. With the feature target there is no image
    to show, so the 'reconstruction' paints each slot's region in the slot's mean input colour and the slot
    columns show the input under each mask."""
    image = image.float().cpu()
    size = image.shape[-2:]
    if "rgb" in out:  # image target: the decoded image and each slot's RGB, resized to the input
        rgb = F.interpolate(out["rgb"].float().flatten(0, 1), size=size, mode="bilinear").view(
            *out["rgb"].shape[:3], *size).cpu().clamp(-1, 1) / 2 + 0.5  # (B, K, 3, H, W)
        recon = (F.interpolate(out["recon"].float(), size=size, mode="bilinear").cpu().clamp(-1, 1) + 1) / 2
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

    what = "blocks" if args.baseline else f"{args.target}-{args.loss}"
    run_dir, ckpt = open_run(args, f"dinosaur-{Path(args.data).stem}-{what}-seed{args.seed}")
    if ckpt is not None:
        checkpoint_args(args, ckpt["args"])
    step = ckpt["step"] if ckpt is not None and not args.eval_only else 0
    random.seed(args.seed + rank)
    np.random.seed(args.seed + rank)
    torch.manual_seed(args.seed + rank)  # slot noise differs across ranks, as in a bigger batch

    test_ds = data.make_dataset(args.data, "test", args.resolution)
    if args.baseline and (run_dir / "eval.json").exists():
        raise data.DataError(f"{run_dir} already holds a run; pass another --run-name")

    if args.baseline:  # no network at all: fixed rectangles scored like a model's masks
        if is_main:
            result, (image, masks, _) = evaluate(None, None, test_ds, args, device)
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "args.json").write_text(json.dumps(vars(args), indent=2))
            (run_dir / "eval.json").write_text(json.dumps({"baseline": args.baseline, **result}, indent=2))
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
        if split != "train":  # rank 0 alone evaluates, on the first eval_size images only
            dataset = torch.utils.data.Subset(dataset, range(min(args.eval_size, len(dataset))))
        return cached_features(encoder, dataset, split, args, device, encoder_sha, with_images, is_main,
                               world if split == "train" else 1)

    if args.eval_only:
        test_ds = features(test_ds, "test", True) if is_main else test_ds
        if is_main:
            result, _ = evaluate(model, encoder, test_ds, args, device)
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
            lr = lr_at(step, args)
            for g in opt.param_groups:
                g["lr"] = lr
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
                    write({"step": step, "split": "train", **means, "lr": lr,
                           "images_per_s": n_sum * args.batch_size * world / dt, "peak_mem_mb": peak_memory_mb(device)})
                    bar.set_postfix(loss=f"{means['loss']:.4f}", img_s=f"{n_sum * args.batch_size * world / dt:.0f}",
                                    fg_ari=f"{fg_ari:.3f}")
                    sums, n_sum, t0 = {}, 0, time.time()
            if is_main and not stop and ((args.eval_every and step % args.eval_every == 0) or last):
                t_eval = time.time()
                result, (image_s, masks_s, out_s) = evaluate(plain, encoder, test_ds if last else eval_ds, args, device)
                fg_ari = result.get("fg_ari", float("nan"))
                write({"step": step, "split": "eval", **result})
                write_samples(run_dir / "samples" / f"step_{step:07d}.png", image_s, masks_s, out_s)
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
    if own_group:
        torch.distributed.destroy_process_group()
    return plain


if __name__ == "__main__":
    main()
