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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import data  # noqa: E402
import vit_mae_ocl as vm  # noqa: E402

# A model small enough that a CPU step takes milliseconds: 16 px, patch 4 -> 16 patches.
TINY = ["--preset", "tiny", "--resolution", "16", "--patch-size", "4", "--num-slots", "3", "--enc-dim", "16",
        "--enc-heads", "2", "--dec-dim", "16", "--dec-heads", "2", "--enc-depth", "2", "--dec-depth", "1",
        "--batch-size", "4", "--mask-ratio", "0.5"]
CLI = TINY + ["--log-every", "2", "--eval-every", "3", "--save-every", "3", "--eval-size", "8",
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


@pytest.mark.parametrize("n,ratio", [(16, 0.5), (49, 0.75), (64, 0.5), (16, 0.0), (10, 0.33)])
def test_masking_keeps_exact_count_of_distinct_patches(n, ratio):
    torch.manual_seed(0)
    keep = vm.random_masking(n, ratio, 6, "cpu")
    assert keep.shape == (6, round(n * (1 - ratio)))
    assert all(len(set(row.tolist())) == keep.shape[1] for row in keep)  # distinct patches
    assert not torch.equal(keep[0], keep[1])  # a different draw per image
    assert ((keep >= 0) & (keep < n)).all()


@pytest.mark.parametrize("ratio", [0.0, 0.5])
def test_decoder_input_is_slot_embedding_at_visible_patches_and_mask_token_elsewhere(ratio):
    """Sec. 3.2 written out patch by patch: the first decoder block sees, in raster order, the embedding
    of [s_k, log a_ik] (+ position) at each visible patch i and the mask token (+ position) at the others."""
    model, _ = model_and_args()
    seen = {}
    model.decoder[0].register_forward_pre_hook(lambda m, a: seen.setdefault("y", a[0]))
    torch.manual_seed(3)
    out = model(images(2), mask_ratio=ratio)
    y = seen["y"].view(2, 3, 16, -1)  # (B, K, N, Dd)
    emb = model.slot_embed(out["slots"])  # (B, K, Dd)
    log_a = out["attn"].log()  # (B, Nv, K)
    for b in range(2):
        keep = out["ids_keep"][b].tolist()
        for i in range(16):
            for k in range(3):
                want = (emb[b, k] + log_a[b, keep.index(i), k] * model.log_attn_embed if i in keep
                        else model.mask_token[0, 0]) + model.dec_pos[0, i]
                torch.testing.assert_close(y[b, k, i], want, atol=1e-5, rtol=1e-5)


def test_sincos_position_embedding():
    pe = vm.sincos_2d(8, 3)  # (9, 8): [sin y, cos y, sin x, cos x] with 2 frequencies each
    assert pe.shape == (9, 8)
    torch.testing.assert_close(pe[4], torch.tensor([math.sin(1), math.sin(1e-2), math.cos(1), math.cos(1e-2),
                                                    math.sin(1), math.sin(1e-2), math.cos(1), math.cos(1e-2)]))
    torch.testing.assert_close(pe[0, 4:], pe[3, 4:])  # same column, same x half


def test_schedules_known_values():
    args = vm.parse_args(["--steps", "101", "--warmup-steps", "10", "--cooldown-steps", "11", "--lr", "5e-4",
                          "--min-lr", "1e-5", "--mask-ratio", "0.75"])
    assert vm.lr_at(0, args) == pytest.approx(1e-5)  # warm-up starts at min_lr
    assert vm.lr_at(5, args) == pytest.approx(1e-5 + 0.5 * 4.9e-4)
    assert vm.lr_at(10, args) == pytest.approx(5e-4)  # warm-up end: peak
    assert vm.lr_at(50, args) == pytest.approx(1e-5 + 4.9e-4 / 2)  # half-way through the 80-step cosine
    assert vm.lr_at(90, args) == pytest.approx(1e-5) and vm.lr_at(100, args) == pytest.approx(1e-5)  # cool-down
    short = vm.parse_args(["--steps", "20", "--warmup-steps", "10", "--cooldown-steps", "15", "--lr", "5e-4",
                           "--min-lr", "1e-5"])  # shorter than warm-up + cool-down: no cosine phase
    assert vm.lr_at(5, short) == pytest.approx(1e-5 + 0.5 * 4.9e-4) and vm.lr_at(10, short) == 1e-5
    # mask ratio: held during warm-up, linear to 0 at the last step (100)
    assert vm.mask_ratio_at(0, args) == vm.mask_ratio_at(9, args) == vm.mask_ratio_at(10, args) == 0.75
    assert vm.mask_ratio_at(55, args) == pytest.approx(0.375)
    assert vm.mask_ratio_at(100, args) == 0.0
    # entropy weights: 1e-4 during warm-up, then linear to 3e-3 (pixel) and 1e-2 (object)
    assert vm.entropy_weights_at(3, args) == (1e-4, 1e-4)
    assert vm.entropy_weights_at(55, args) == pytest.approx(((1e-4 + 3e-3) / 2, (1e-4 + 1e-2) / 2))
    assert vm.entropy_weights_at(100, args) == pytest.approx((3e-3, 1e-2))
    # the ablations switch a term off for the whole run
    off = vm.parse_args(["--steps", "101", "--warmup-steps", "10", "--cooldown-steps", "0", "--pixel-entropy", "0"])
    assert [vm.entropy_weights_at(s, off)[0] for s in (0, 55, 100)] == [0.0, 0.0, 0.0]
    assert vm.entropy_weights_at(100, off)[1] == pytest.approx(1e-2)


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


@pytest.mark.parametrize("flags", [[], ["--pixel-entropy", "0"], ["--object-entropy", "0"],
                                   ["--pixel-entropy", "0", "--object-entropy", "0"]])
def test_every_parameter_gets_a_gradient(flags):
    model, args = model_and_args(*flags)
    x = images()
    terms = vm.compute_loss(model(x, mask_ratio=0.5, token_noise=0.1), x, args, step=0)
    terms["loss"].backward()
    assert set(terms) == {"mse", "pixel_entropy", "object_entropy", "loss"}
    w_pix, w_obj = vm.entropy_weights_at(0, args)
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
    assert (a.pixel_entropy, a.object_entropy, a.pixel_entropy_init, a.object_entropy_init) == (3e-3, 1e-2, 1e-4, 1e-4)
    assert vm.parse_args(["--data", name, "--num-slots", "9"]).num_slots == 9  # flags win


def test_tiny_preset_defaults():
    a = vm.parse_args(["--preset", "tiny"])  # the quick-start: Tetrominoes at its native size, one spare slot
    assert (a.data, a.resolution, a.patch_size, a.num_slots) == ("tetrominoes", 35, 5, 5)
    assert (a.enc_dim, a.token_noise) == (64, 0.1)
    assert vm.parse_args(["--preset", "tiny", "--num-slots", "4"]).num_slots == 4  # the paper's K, by flag
    assert vm.parse_args(["--data", "tetrominoes"]).num_slots == 4  # the paper preset keeps the paper's K
    a = vm.parse_args(["--preset", "tiny", "--data", "shapes"])  # 64 px sets shrink to 32 px / patch 4
    assert (a.resolution, a.patch_size, a.num_slots) == (32, 4, 6)
    assert vm.parse_args([]).data == "shapes" and vm.parse_args([]).token_noise == 0.0
    assert vm.parse_args(["--preset", "tiny", "--token-noise", "0"]).token_noise == 0.0  # flags win


def test_optimizer_is_adamw_without_decay_on_tokens():
    model, args = model_and_args()
    opt = vm.make_optimizer(model, args)
    assert isinstance(opt, torch.optim.AdamW) and opt.defaults["betas"] == (0.9, 0.95)
    no_decay = {id(p) for p in opt.param_groups[1]["params"]}
    assert id(model.class_tokens) in no_decay and id(model.mask_token) in no_decay
    assert id(model.head.weight) not in no_decay and opt.param_groups[0]["weight_decay"] == 0.05


def test_overfits_one_batch():
    model, args = model_and_args("--mask-ratio", "0")
    x = images(4)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    torch.manual_seed(0)
    first = None
    for _ in range(120):
        terms = vm.compute_loss(model(x), x, args, step=0)
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
    for key in ("ari", "fg_ari", "miou", "mbo", "mse"):
        assert 0 <= evals[-1][key] <= 1 or key in ("mse", "fg_ari", "ari"), key
        assert math.isfinite(evals[-1][key]), key
    ckpt = torch.load(run / "checkpoint.pt", weights_only=True)
    assert ckpt["step"] == 6 and "class_tokens" in ckpt["model"]
    assert sorted(p.name for p in (run / "samples").iterdir()) == ["step_0000003.png", "step_0000006.png"]
    assert json.loads((run / "eval.json").read_text())["step"] == 6


def test_eval_only(tmp_path):
    assert run_main(tmp_path, "--steps", "3", "--run-name", "r") == 0
    ckpt = tmp_path / "r" / "checkpoint.pt"
    (tmp_path / "r" / "eval.json").unlink()
    assert run_main(tmp_path, "--eval-only", str(ckpt), "--eval-size", "16") == 0
    ev = json.loads((tmp_path / "r" / "eval.json").read_text())
    assert ev["step"] == 3 and -1 <= ev["fg_ari"] <= 1 and 0 <= ev["miou"] <= 1


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

    def poisoned(out, image, args, step):
        calls["n"] += 1
        terms = real(out, image, args, step)
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


def test_ablation_script_writes_table(tmp_path):
    env = {**os.environ, "SEEDS": "0 1", "STEPS": "2", "OUT": str(tmp_path), "OMP_NUM_THREADS": "1",
           "EXTRA": " ".join(TINY[2:] + ["--eval-size", "8", "--warmup-steps", "1", "--cooldown-steps", "0",
                                          "--data", "shapes-binary"])}
    r = subprocess.run(["bash", str(ROOT / "scripts" / "vit_mae_ablation.sh")], capture_output=True, text=True,
                       cwd=ROOT, timeout=240, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    table = (tmp_path / "ablation.md").read_text().splitlines()
    rows = [l for l in table if l.startswith("| ") and "---" not in l]
    assert rows[0].split("|")[1:-1] == [" variant ", " flags ", " seeds ", " FG-ARI ", " ARI ", " mIoU "]
    assert [r.split("|")[1].strip() for r in rows[1:]] == ["full", "no object entropy", "no pixel entropy",
                                                          "neither entropy", "no masking"]
    for row in rows[1:]:
        cells = [c.strip() for c in row.split("|")[1:-1]]
        assert cells[2] == "2"
        for cell in cells[3:]:
            mean, std = cell.split(" +- ")
            assert math.isfinite(float(mean)) and float(std) >= 0
    assert len(list(tmp_path.glob("*/eval.json"))) == 10


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_bf16_compile(tmp_path):
    r = run_cli(tmp_path, "--device", "cuda", "--dtype", "bf16", "--compile", "--steps", "6", "--run-name", "r")
    assert r.returncode == 0, r.stderr
    train = [json.loads(l) for l in (tmp_path / "r" / "metrics.jsonl").open()]
    assert all(math.isfinite(l["loss"]) for l in train if l["split"] == "train")
