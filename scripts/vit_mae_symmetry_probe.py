"""How different are the K slots of a vit_mae_ocl.py model? Spreads over K (std over the slot axis,
averaged) of the class tokens after the encoder's LayerNorm, the object-function logits, the slots, the
decoder alpha masks and RGB, and the pixel entropy (ln K when every slot is the same), on 16 training
images, at mask ratio 0.75 with and without class-token noise 0.1 and at ratio 0.

  python scripts/vit_mae_symmetry_probe.py --preset tiny --data clevr-lite --token-init-std 0.002  # at init
  python scripts/vit_mae_symmetry_probe.py --preset tiny --data clevr-lite --token-init-std 1.0
  CKPT=runs/RUN/checkpoint.pt python scripts/vit_mae_symmetry_probe.py --preset tiny --data clevr-lite
"""
import math
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import data  # noqa: E402
import vit_mae_ocl as vm  # noqa: E402

torch.manual_seed(0)
args = vm.parse_args(sys.argv[1:])
model = vm.build_model(args)
if os.environ.get("CKPT"):
    model.load_state_dict(vm.load_checkpoint(os.environ["CKPT"])["model"])
ds = data.make_dataset(args.data, "train", args.resolution, **({"size": 64} if args.data in data.BUILTIN else {}))
image = torch.stack([ds[i]["image"] for i in range(16)])  # (16, 3, H, W)
for ratio, noise in [(0.75, 0.0), (0.75, 0.1), (0.0, 0.0)]:
    seen = {}
    hook = model.enc_norm.register_forward_hook(lambda m, i, o: seen.__setitem__("x", o))
    with torch.no_grad():
        out = model(image, mask_ratio=ratio, token_noise=noise)
    hook.remove()
    c, z = seen["x"][:, :args.num_slots], seen["x"][:, args.num_slots:]  # (B, K, D), (B, Nv, D)
    logits = torch.einsum("bvd,bkd->bvk", z, c) / math.sqrt(z.shape[-1])  # (B, Nv, K)
    m = out["masks"]  # (B, K, H, W)
    print(f"ratio {ratio} noise {noise}: class tokens {c.std(1).mean():.4f} (norm {c.norm(dim=-1).mean():.2f}), "
          f"logits {logits.std(-1).mean():.4f}, slots {out['slots'].std(1).mean():.4f}, alpha {m.std(1).mean():.5f}, "
          f"rgb {out['rgb'].std(1).mean():.4f}, pixel entropy {-(m * m.clamp_min(1e-8).log()).sum(1).mean():.4f} "
          f"(ln K = {math.log(args.num_slots):.4f})")
