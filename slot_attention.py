"""Slot Attention, with the covariance, variance and cosine slot regularisers.

Papers
  Locatello et al., "Object-Centric Learning with Slot Attention", NeurIPS 2020, arXiv 2006.15055.
  "Covariance / cosine regularisation of slots", arXiv 2306.02577 (COVLOSS, COSINELOSS).

What is implemented
  - CNN encoder (4 x conv 5x5, SAME, ReLU), soft position embedding on [y, x, 1-y, 1-x],
    flatten, LayerNorm, MLP (Sec. 2.2 and App. E.1 of 2006.15055).
  - The Slot Attention module (Algorithm 1): slots sampled by reparameterisation
    mu + exp(log_sigma) * eps so both statistics train; bias-free q, k, v; softmax over
    slots (competition), +eps, weighted mean over inputs; GRU whose hidden state is the
    previous (un-normalised) slots; residual MLP. Optional implicit differentiation
    (Chang et al. 2022): iterate without a graph, then one more iteration on detached slots.
  - Spatial broadcast decoders of both families: "clevr" (broadcast at res/16, 4 transposed
    convs stride 2, 128 px) and "sprites" (broadcast at full resolution). Each slot decodes
    RGB + alpha logit; alpha is softmaxed over slots; the image is sum_k alpha_k * rgb_k.
  - Objectives (--loss): mse (the paper), cov (COVLOSS: MSE + beta * covariance of projected
    slots), vicreg (MSE + beta * (variance + covariance)), cosine (COSINELOSS: MSE + beta *
    hinge on pairwise slot cosine similarity, margin 0.2).
  - Evaluation with ARI, FG-ARI, mIoU, mBO on the decoder alpha masks, and the feature
    probe of arXiv 2306.02577 (--probe: shape accuracy and colour/scale/x/y R^2).

Deviations and choices (each one stated so a reader can undo it)
  - The sprites decoder's exact width is not given in the paper's text; we use 4 x conv 5x5
    with --dec-channels 32 then conv 3x3 to 4 channels (the Multi-dSprites decoder of IODINE
    that Slot Attention adopts). The CLEVR decoder follows the official code.
  - The "clevr" decoder needs a resolution divisible by 16 (broadcast at res/16); other
    resolutions are refused with a clear error.
  - Slot mean and log-sigma are initialised Glorot-uniform as in the official code.
  - With --implicit-grad the slot initialisation receives no gradient (the first iterations
    run without a graph); that is the method, not a bug.
  - COVLOSS under DDP uses the B*K slots of the local batch (no all-gather), as a
    single-GPU run of the reported experiments would.
  - The covariance normaliser is a flag: --cov-norm dim (the paper's equation, / D) or
    dim2 (/ D^2, the reported runs).

Commands
  GPU, paper configuration (Multi-dSprites-like data, K=6, 500k steps):
    python slot_attention.py --data shapes --device cuda --dtype bf16
  The data of arXiv 2306.02577 with COVLOSS / COSINELOSS:
    python slot_attention.py --data shapes-colored --loss cov --beta 1.0
    python slot_attention.py --data shapes-colored --loss cosine --beta 0.01 --probe
  CLEVR6 from the DeepMind HDF5 file (128 px, K=7, CLEVR decoder):
    python slot_attention.py --data /data/clevr_with_masks.h5
  CPU, tiny preset (shapes-binary at 32 px, 3000 steps; FG-ARI ~0.7 in ~13 min on one core):
    python slot_attention.py --preset tiny
  Several GPUs (or CPU processes with gloo):
    torchrun --nproc_per_node=4 slot_attention.py --data shapes-colored --loss cov
"""
import argparse
import json
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
    "paper": dict(batch_size=64, steps=500_000, lr=4e-4, warmup_steps=10_000, decay_steps=100_000,
                  grad_clip=0.0, slot_dim=64, mlp_hidden=128, enc_channels=64, log_every=100,
                  eval_every=5_000, eval_size=320, save_every=5_000, proj_dim=1024),
    # tiny: sized so one CPU core learns to segment shapes-binary in minutes (README). The paper's
    # 4e-4 stays on the one-slot background plateau for thousands of steps at this width; 1e-3 leaves
    # it, and the paper's decay compressed to 1.5k steps keeps the end of the run stable (at a constant
    # 1e-3 one run lost its segmentation in the last 50 steps; clipping at 1 slowed learning 3x).
    "tiny": dict(batch_size=16, steps=3_000, lr=1e-3, warmup_steps=200, decay_steps=1_500,
                 grad_clip=0.0, slot_dim=32, mlp_hidden=64, enc_channels=32, dec_channels=16,
                 resolution=32, log_every=50, eval_every=500, eval_size=64, save_every=500,
                 proj_dim=128),
}
# Per-data defaults (2006.15055 Table/App. E; 2306.02577 Sec. 4): resolution, K, decoder.
DATA_DEFAULTS = {
    "shapes": dict(resolution=64, num_slots=6, decoder="sprites", dec_channels=32),
    "shapes-colored": dict(resolution=64, num_slots=5, decoder="sprites", dec_channels=32),
    "shapes-binary": dict(resolution=64, num_slots=4, decoder="sprites", dec_channels=32),
    "tetrominoes": dict(resolution=35, num_slots=4, decoder="sprites", dec_channels=32),
    # Real files, recognised by name: DeepMind HDF5 conversions, ClevrTex; anything else: 64 px.
    "clevr": dict(resolution=128, num_slots=7, decoder="clevr", dec_channels=64),  # CLEVR6
    "clevrtex": dict(resolution=128, num_slots=11, decoder="clevr", dec_channels=64),
    "objects_room": dict(resolution=64, num_slots=7, decoder="sprites", dec_channels=32),
    "dsprites": dict(resolution=64, num_slots=6, decoder="sprites", dec_channels=32),
    "tetromino": dict(resolution=35, num_slots=4, decoder="sprites", dec_channels=32),
    "other": dict(resolution=64, num_slots=7, decoder="sprites", dec_channels=32),
}
LOSSES = ("mse", "cov", "vicreg", "cosine")
# Flags that shape the weights: --resume and --eval-only take them from the checkpoint and refuse other values.
ARCH_KEYS = ("resolution", "slot_dim", "mlp_hidden", "enc_channels", "dec_channels", "decoder", "loss", "proj_dim",
             "proj_norm")
# What the papers vary at test time (free under --eval-only), recorded in eval.json.
TEST_KEYS = ("data", "num_slots", "iters", "eval_size")
# Flags of this invocation only, never taken from a checkpoint.
RUNTIME_KEYS = ("resume", "eval_only", "device", "workers", "compile", "out_dir", "run_name", "given")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Slot Attention (arXiv 2006.15055) with the slot "
                                "regularisers of arXiv 2306.02577.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter, allow_abbrev=False)
    a = p.add_argument
    a("--preset", choices=["paper", "tiny"], default="paper",
      help="paper: the paper's configuration for --data; tiny: a CPU-sized model. Explicit flags override.")
    a("--data", default=None, help="built-in set (%s) or a dataset path (default: shapes; shapes-binary "
      "with --preset tiny)" % ", ".join(data.BUILTIN))
    a("--train-size", type=int, default=None, help="use only the first N training images (None: all)")
    a("--resolution", type=int, default=None, help="image side in pixels (None: preset/data default)")
    a("--num-slots", type=int, default=None, help="number of slots K (None: per data set)")
    a("--iters", type=int, default=3, help="slot attention iterations T")
    a("--slot-dim", type=int, default=None, help="slot size D")
    a("--mlp-hidden", type=int, default=None, help="hidden width of the slot MLP")
    a("--enc-channels", type=int, default=None, help="encoder CNN channels")
    a("--dec-channels", type=int, default=None, help="decoder CNN channels")
    a("--decoder", choices=["auto", "sprites", "clevr"], default="auto",
      help="spatial broadcast decoder family (auto: per data set)")
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
    a("--batch-size", type=int, default=None, help="images per step (per process under torchrun)")
    a("--steps", type=int, default=None, help="total optimiser steps")
    a("--lr", type=float, default=None, help="peak Adam learning rate")
    a("--warmup-steps", type=int, default=None, help="linear learning-rate warm-up, in steps")
    a("--decay-steps", type=int, default=None, help="lr is multiplied by 0.5^(step/decay_steps)")
    a("--grad-clip", type=float, default=None, help="max gradient norm (0: no clipping, the paper)")
    a("--seed", type=int, default=0, help="seeds python, numpy, torch and the data order")
    a("--device", choices=["auto", "cpu", "cuda", "mps"], default="auto", help="auto: cuda, then mps, then cpu")
    a("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32", help="autocast precision")
    a("--compile", action="store_true", help="torch.compile the model")
    a("--workers", type=int, default=0, help="data loader worker processes")
    a("--out-dir", default="runs", help="parent folder of run folders")
    a("--run-name", default=None, help="run folder name (default: slot_attention-DATA-LOSS-seedN)")
    a("--log-every", type=int, default=None, help="steps between train log lines")
    a("--eval-every", type=int, default=None, help="steps between evaluations (0: only at the end)")
    a("--eval-size", type=int, default=None, help="held-out images per evaluation")
    a("--save-every", type=int, default=None, help="steps between checkpoints")
    a("--resume", default=None, metavar="CKPT|auto", help="continue a run from its checkpoint (its folder is reused; "
      "flags given here override the checkpoint's); auto: this run folder's checkpoint if there is one, else start")
    a("--eval-only", default=None, metavar="CKPT", help="evaluate a checkpoint, write eval.json, exit")
    a("--probe", action="store_true", help="run the feature probe on frozen slots, write probe.json")
    a("--probe-train-size", type=int, default=None, help="train images for the probe (default 10x eval size)")
    args = p.parse_args(argv)
    # the flags this command line gives: under --resume / --eval-only they override the checkpoint's
    args.given = sorted({t[2:].split("=")[0].replace("-", "_") for t in (sys.argv[1:] if argv is None else argv)
                         if t.startswith("--")})

    if args.data is None:
        args.data = "shapes-binary" if args.preset == "tiny" else "shapes"
    key = args.data if args.data in DATA_DEFAULTS else next(
        (k for k in ("clevrtex", "clevr", "objects_room", "dsprites", "tetromino") if k in args.data.lower()), "other")
    for k, v in {**DATA_DEFAULTS[key], **PRESETS[args.preset]}.items():
        if k == "decoder":
            args.decoder = v if args.decoder == "auto" else args.decoder
        elif getattr(args, k, None) is None:
            setattr(args, k, v)
    if args.probe_train_size is None:
        args.probe_train_size = 10 * args.eval_size
    positive = ("resolution", "num_slots", "iters", "slot_dim", "mlp_hidden", "enc_channels",
                "dec_channels", "batch_size", "steps", "proj_dim", "log_every", "save_every",
                "eval_size", "decay_steps")
    for k in positive:
        if getattr(args, k) <= 0:
            p.error(f"--{k.replace('_', '-')} must be positive, got {getattr(args, k)}")
    for k in ("warmup_steps", "grad_clip", "eval_every", "workers", "beta", "lr"):
        if getattr(args, k) < 0:
            p.error(f"--{k.replace('_', '-')} must be non-negative, got {getattr(args, k)}")
    if args.decoder == "clevr" and args.resolution % 16:
        p.error(f"the clevr decoder upsamples 16x from a broadcast grid: --resolution must be a "
                f"multiple of 16, got {args.resolution}")
    if args.train_size is not None and args.train_size <= 0:
        p.error("--train-size must be positive")
    return args


# --- Model


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


class Encoder(nn.Module):
    """4 x conv 5x5 SAME ReLU -> soft position embedding -> flatten -> LayerNorm -> MLP."""

    def __init__(self, resolution, channels):
        super().__init__()
        layers = []
        for i in range(4):
            layers += [nn.Conv2d(3 if i == 0 else channels, channels, 5, padding=2), nn.ReLU()]
        self.cnn = nn.Sequential(*layers)
        self.pos = SoftPositionEmbed(channels, resolution, resolution)
        self.norm = nn.LayerNorm(channels)
        self.mlp = nn.Sequential(nn.Linear(channels, channels), nn.ReLU(), nn.Linear(channels, channels))

    def forward(self, image):
        x = self.pos(self.cnn(image))  # (B, C, H, W)
        x = rearrange(x, "b c h w -> b (h w) c")  # (B, N, C)
        return self.mlp(self.norm(x))


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


class BroadcastDecoder(nn.Module):
    """Spatial broadcast decoder: each slot is tiled on a grid, position-embedded and decoded
    independently into RGB (3) + alpha logit (1).

    sprites: grid = full resolution, 4 x conv 5x5 ReLU, conv 3x3 -> 4.
    clevr:   grid = res/16, 4 x transposed conv 5x5 stride 2 ReLU, conv 5x5 ReLU, conv 3x3 -> 4.
    """

    def __init__(self, kind, slot_dim, channels, resolution):
        super().__init__()
        self.grid = resolution if kind == "sprites" else resolution // 16
        self.pos = SoftPositionEmbed(slot_dim, self.grid, self.grid)
        layers, c = [], slot_dim
        if kind == "clevr":
            for _ in range(4):  # 8 -> 16 -> 32 -> 64 -> 128 at 128 px
                layers += [nn.ConvTranspose2d(c, channels, 5, stride=2, padding=2, output_padding=1), nn.ReLU()]
                c = channels
            layers += [nn.Conv2d(c, channels, 5, padding=2), nn.ReLU()]
        else:
            for _ in range(4):
                layers += [nn.Conv2d(c, channels, 5, padding=2), nn.ReLU()]
                c = channels
        layers += [nn.Conv2d(channels, 4, 3, padding=1)]
        self.cnn = nn.Sequential(*layers)

    def forward(self, slots):
        b = slots.shape[0]
        x = repeat(slots, "b k d -> (b k) d h w", h=self.grid, w=self.grid)  # (B*K, D, g, g)
        x = self.cnn(self.pos(x))  # (B*K, 4, H, W)
        x = rearrange(x, "(b k) c h w -> b k c h w", b=b)  # (B, K, 4, H, W)
        return x[:, :, :3], x[:, :, 3]  # rgb (B, K, 3, H, W), alpha logits (B, K, H, W)


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


class SlotAttentionAutoEncoder(nn.Module):
    """Encoder -> Slot Attention -> broadcast decoder -> alpha compositing (Sec. 2.2)."""

    def __init__(self, resolution=64, num_slots=6, slot_dim=64, mlp_hidden=128, enc_channels=64,
                 dec_channels=32, decoder="sprites", iters=3, eps=1e-8, implicit_grad=False,
                 proj_dim=None, proj_norm="layer"):
        super().__init__()
        self.encoder = Encoder(resolution, enc_channels)
        self.slot_attention = SlotAttention(num_slots, slot_dim, enc_channels, mlp_hidden, iters, eps,
                                            implicit_grad)
        self.decoder = BroadcastDecoder(decoder, slot_dim, dec_channels, resolution)
        # Only the cov / vicreg objectives use a projection head; it trains with the model.
        self.projector = ProjectionHead(slot_dim, proj_dim, proj_norm) if proj_dim else None

    def forward(self, image, slots=None):
        """image (B, 3, H, W) in [0, 1]; slots: optional initial slots (B, K, D)."""
        feats = self.encoder(image * 2 - 1)  # the paper works on images in [-1, 1]; (B, N, C)
        slots, attn = self.slot_attention(feats, slots)  # (B, K, D), (B, N, K)
        rgb, alpha_logits = self.decoder(slots)  # (B, K, 3, H, W), (B, K, H, W)
        masks = alpha_logits.softmax(dim=1)  # alpha normalised over slots
        recon = (masks.unsqueeze(2) * rgb).sum(dim=1)  # (B, 3, H, W), in [-1, 1]
        out = dict(recon=recon, rgb=rgb, masks=masks, slots=slots, attn=attn)
        if self.projector is not None:
            out["proj"] = self.projector(slots)  # (B*K, P)
        return out


def build_model(args):
    proj = args.proj_dim if args.loss in ("cov", "vicreg") else None
    return SlotAttentionAutoEncoder(args.resolution, args.num_slots, args.slot_dim, args.mlp_hidden,
                                    args.enc_channels, args.dec_channels, args.decoder, args.iters, args.eps,
                                    args.implicit_grad, proj, args.proj_norm)


# --- Objective


def compute_loss(out, image, args):
    """Named loss terms and their total (2006.15055 Sec. 2.2; 2306.02577 Sec. 3).

    mse:    ||x - x_hat||^2 on images in [-1, 1]
    cov:    mse + beta * C(h(slots))              (COVLOSS)
    vicreg: mse + beta * (V(h(slots)) + C(h(slots)))
    cosine: mse + beta * mean_{i!=j} max(0, cos(s_i, s_j) - margin)   (COSINELOSS)
    """
    terms = {"mse": F.mse_loss(out["recon"].float(), image * 2 - 1)}
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
    """Linear warm-up times 0.5^(step/decay_steps) from step 0 (2006.15055 App. E)."""
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
    """Segmentation metrics of the decoder alpha masks and the reconstruction MSE on the first
    `eval_size` images of `dataset`. RNG is forked so evaluation never changes training."""
    model.eval()
    n = min(args.eval_size, len(dataset))
    loader = data.make_loader(torch.utils.data.Subset(dataset, range(n)), args.batch_size, shuffle=False)
    per_image, mse, first = {}, [], None
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(split_seed)
        for batch in loader:
            image = batch["image"].to(device)
            with autocast(device, args.dtype):
                out = model(image)
            masks = out["masks"].float()
            mse.append(((out["recon"].float() - (image * 2 - 1)) ** 2).mean(dim=(1, 2, 3)).cpu())
            if first is None:
                first = (image, out)
            if dataset_has_masks(dataset):
                m = metrics.segmentation_metrics(batch["mask"], masks.cpu(), base(dataset).num_background)
                for k, v in m.items():
                    per_image.setdefault(k, []).append(v)
    model.train()
    result = metrics.average_metrics({k: torch.cat(v) for k, v in per_image.items()}) if per_image else {}
    result["mse"] = torch.cat(mse).mean().item()
    return result, first


def eval_settings(args):
    """The test-time settings eval.json records next to the metrics."""
    return {k: getattr(args, k) for k in TEST_KEYS}


def base(dataset):
    """The dataset under a Subset (for its attributes)."""
    return dataset.dataset if isinstance(dataset, torch.utils.data.Subset) else dataset


def dataset_has_masks(dataset):
    return getattr(base(dataset), "has_masks", True)


def write_samples(path, image, out):
    """Input, reconstruction, argmax of the alpha masks, each slot's RGB on white where its alpha is low
    (save_grid applies the alpha)."""
    rgb01 = (out["rgb"].float().clamp(-1, 1) + 1) / 2  # (B, K, 3, H, W)
    data.save_grid(path, image.cpu(), ((out["recon"].float() + 1) / 2).clamp(0, 1).cpu(), out["masks"].float().cpu(),
                   rgb01.cpu())


@torch.no_grad()
def collect_slots(model, dataset, n, args, device):
    """Frozen slots (N, K, D) and per-object targets (background entities dropped) for the probe."""
    ds = torch.utils.data.Subset(dataset, range(min(n, len(dataset))))
    nb = base(dataset).num_background
    keys = [k for k in ("visible", "shape", "color", "scale", "x", "y") if k in base(dataset).properties]
    slots, targets = [], {k: [] for k in keys}
    model.eval()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(0)
        for batch in data.make_loader(ds, args.batch_size, shuffle=False):
            with autocast(device, args.dtype):
                slots.append(model(batch["image"].to(device))["slots"].float().cpu())
            for k in keys:
                targets[k].append(batch[k][:, nb:])
    model.train()
    return torch.cat(slots), {k: torch.cat(v) for k, v in targets.items()}


def run_probe(model, args, device, run_dir):
    train_ds = data.make_dataset(args.data, "train", args.resolution)
    test_ds = data.make_dataset(args.data, "test", args.resolution)
    if "visible" not in getattr(train_ds, "properties", ()):
        raise data.DataError(f"{args.data}: the probe needs per-object properties, which this dataset lacks")
    tr_slots, tr_t = collect_slots(model, train_ds, args.probe_train_size, args, device)
    te_slots, te_t = collect_slots(model, test_ds, args.eval_size, args, device)
    scores = metrics.feature_probe(tr_slots, tr_t, te_slots, te_t, categorical=("shape",), seed=args.seed,
                                   device=device)
    (run_dir / "probe.json").write_text(json.dumps(scores, indent=2))
    return scores


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
    """Train (or evaluate) as `args` say; returns the plain model."""
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

    run_dir, ckpt = open_run(args, f"slot_attention-{Path(args.data).stem}-{args.loss}-seed{args.seed}")
    if ckpt is not None:
        checkpoint_args(args, ckpt["args"])
    step = ckpt["step"] if ckpt is not None and not args.eval_only else 0
    random.seed(args.seed + rank)
    np.random.seed(args.seed + rank)
    torch.manual_seed(args.seed + rank)  # slot noise differs across ranks, as in a bigger batch

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
            if args.probe:
                print(json.dumps(run_probe(model, args, device, run_dir)))
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

    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
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
                           "images_per_s": n_sum * args.batch_size * world / dt,
                           "peak_mem_mb": peak_memory_mb(device)})
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
    if is_main and args.probe:
        print(json.dumps(run_probe(plain, args, device, run_dir)))
    if world > 1:
        torch.distributed.barrier()  # rank 0's last evaluation and checkpoint are written when any rank returns
    if own_group:
        torch.distributed.destroy_process_group()
    return plain


if __name__ == "__main__":
    main()
