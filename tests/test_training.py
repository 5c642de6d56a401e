"""What every model file's training program promises (DESIGN.md: reliability, scale), tested on all five:
preemption by signals, `--resume auto`, a log that holds every step once, an unwritable output folder,
hostile `--resume` files, `--eval-only` with test-time settings, and DDP on two gloo processes (ranks end
with equal weights, disjoint data shards, each rank's RNG resumed, a non-finite loss on one rank stops all).
"""
import importlib
import json
import os
import pickle
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from torch.optim.optimizer import register_optimizer_step_pre_hook

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import data  # noqa: E402

# The tiny sizes of each model's own test file: a CPU step takes milliseconds.
SMALL = ["--preset", "tiny", "--resolution", "16", "--num-slots", "3", "--batch-size", "4", "--data", "shapes-binary",
         "--eval-size", "4", "--eval-every", "0", "--log-every", "1"]
MODELS = {
    "slot_attention": ["--slot-dim", "16", "--mlp-hidden", "16", "--enc-channels", "8", "--dec-channels", "8",
                       "--proj-dim", "16"],
    "monet": ["--unet-channels", "4", "--mlp-hidden", "16", "--enc-channels", "4", "--enc-hidden", "16",
              "--dec-channels", "4", "--latent-dim", "4"],
    "iodine": ["--latent-dim", "4", "--dec-channels", "8", "--ref-channels", "8", "--ref-layers", "2",
               "--ref-mlp", "16", "--lstm-hidden", "16", "--iters", "2"],
    "dinosaur": ["--slot-dim", "16", "--dec-hidden", "32", "--dec-channels", "8", "--target-resolution", "16",
                 "--proj-dim", "16"],
    "vit_mae_ocl": ["--patch-size", "4", "--enc-dim", "16", "--enc-heads", "2", "--dec-dim", "16", "--dec-heads", "2",
                    "--enc-depth", "2", "--dec-depth", "1", "--mask-ratio", "0.5", "--warmup-steps", "2",
                    "--cooldown-steps", "1"],
}
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Bitwise comparisons across processes need the same summation order: one thread everywhere."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def argv(name, tmp_path, *extra):
    return [*SMALL, *MODELS[name], "--device", "cpu", "--out-dir", str(tmp_path), *extra]


def steps_logged(run):
    """[(step, split)] of a run folder's metrics.jsonl; every line must parse."""
    return [(r["step"], r["split"]) for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())]


def weights(run):
    return torch.load(run / "checkpoint.pt", weights_only=True)["model"]


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def one_error_line(err):
    """The one `error:` line of a refused run (a warning may come before it, never a traceback)."""
    lines = [l for l in err.splitlines() if l.startswith("error")]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


@pytest.mark.slow
@pytest.mark.parametrize("name", MODELS)
def test_sigterm_checkpoints_and_resume_auto_equals_uninterrupted(tmp_path, name):
    """A tiny run as a subprocess gets SIGTERM after its first logged steps: it finishes the step, writes the
    checkpoint and exits 3 with one line; the same command with --resume auto ends as an uninterrupted run."""
    module = importlib.import_module(name)
    steps = 60
    module.main(argv(name, tmp_path, "--steps", str(steps), "--run-name", "whole"))
    cmd = [sys.executable, str(ROOT / f"{name}.py"), *argv(name, tmp_path, "--steps", str(steps), "--run-name", "cut",
                                                            "--save-every", "1000", "--resume", "auto")]
    run = tmp_path / "cut"
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV, cwd=ROOT)
    deadline = time.time() + 120
    while not ((run / "metrics.jsonl").exists() and (run / "metrics.jsonl").read_text().count("\n") >= 2) \
            and time.time() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 3, err[-2000:]
    lines = [l for l in err.splitlines() if "preempted" in l]
    assert len(lines) == 1 and "--resume auto" in lines[0] and "Traceback" not in err, err[-2000:]
    stopped = torch.load(run / "checkpoint.pt", weights_only=True)["step"]
    assert 2 <= stopped < steps  # the step in flight finished, off the --save-every schedule
    assert [s for s, split in steps_logged(run)] == list(range(1, stopped + 1))
    assert not (run / "eval.json").exists()

    module.main(argv(name, tmp_path, "--steps", str(steps), "--run-name", "cut", "--save-every", "1000",
                     "--resume", "auto"))  # the requeued job: the same command line
    assert_same_weights(weights(tmp_path / "whole"), weights(run))
    assert steps_logged(run) == steps_logged(tmp_path / "whole")  # every step once, and the final evaluation
    module.main(argv(name, tmp_path, "--steps", str(steps), "--run-name", "cut", "--resume", "auto"))
    assert steps_logged(run) == steps_logged(tmp_path / "whole")  # a complete run is left as it is


@pytest.mark.parametrize("name", MODELS)
def test_resume_drops_log_lines_past_the_checkpoint_and_a_torn_line(tmp_path, name):
    module = importlib.import_module(name)
    module.main(argv(name, tmp_path, "--steps", "2", "--run-name", "r"))
    run = tmp_path / "r"
    with open(run / "metrics.jsonl", "a") as log:  # what a run killed after its last checkpoint leaves behind
        log.write(json.dumps({"step": 3, "split": "train", "loss": -1.0}) + "\n")
        log.write('{"step": 4, "split": "tr')
    (run / "samples").mkdir(exist_ok=True)
    (run / "samples" / "step_0000003.png").write_bytes(b"stale")
    module.main(argv(name, tmp_path, "--steps", "4", "--eval-every", "2", "--run-name", "r", "--resume", "auto"))
    records = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r["step"] for r in records if r["split"] == "train"]
    assert train == [1, 2, 3, 4] and all(r.get("loss") != -1.0 for r in records)
    assert not (run / "samples" / "step_0000003.png").exists() and (run / "samples" / "step_0000004.png").exists()
    assert json.loads((run / "eval.json").read_text())["step"] == 4


@pytest.mark.parametrize("name", MODELS)
def test_unwritable_output_folder_is_one_line_error_before_training(tmp_path, capsys, name):
    module = importlib.import_module(name)
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(SystemExit) as e:
        module.main(argv(name, tmp_path / "file", "--steps", "2"))
    assert e.value.code == 2
    captured = capsys.readouterr()
    assert "cannot write the run folder" in one_error_line(captured.err)
    assert "parameters" not in captured.out  # refused before the model was announced or trained


class Hostile:
    def __reduce__(self):
        return (Path.write_text, (MARKER, "executed"))


MARKER = None


@pytest.mark.parametrize("name", MODELS)
def test_hostile_resume_file_is_refused(tmp_path, capsys, name):
    global MARKER
    MARKER = tmp_path / "pwned"
    bad = tmp_path / "evil" / "checkpoint.pt"
    bad.parent.mkdir()
    with open(bad, "wb") as f:
        pickle.dump({"model": Hostile(), "args": {}}, f)
    module = importlib.import_module(name)
    for how in (["--resume", str(bad)], ["--run-name", "evil", "--resume", "auto"]):
        with pytest.raises(SystemExit) as e:
            module.main(argv(name, tmp_path, "--steps", "2", *how))
        assert e.value.code == 2 and not MARKER.exists()
        assert "not a weights-only checkpoint" in one_error_line(capsys.readouterr().err)


@pytest.mark.parametrize("name", MODELS)
def test_eval_only_takes_test_time_settings_from_the_command_line(tmp_path, capsys, name):
    """Trained with K=3 on shapes-binary: evaluated with K=5 on tetrominoes, as the papers evaluate with more
    slots and on other data; flags that shape the weights stay the checkpoint's."""
    module = importlib.import_module(name)
    module.main(argv(name, tmp_path, "--steps", "2", "--run-name", "r"))
    ckpt = str(tmp_path / "r" / "checkpoint.pt")
    capsys.readouterr()
    module.main(["--eval-only", ckpt, "--device", "cpu", "--data", "tetrominoes", "--num-slots", "5",
                 "--eval-size", "6"])
    result = json.loads((tmp_path / "r" / "eval.json").read_text())
    k_free = "num_slots" in module.TEST_KEYS  # the ViT-MAE's K is its number of class tokens: a weight shape
    assert result["data"] == "tetrominoes" and result["eval_size"] == 6 and result["step"] == 2
    assert result.get("num_slots", 3) == (5 if k_free else 3)
    assert -1 <= result["fg_ari"] <= 1
    if not k_free:
        assert "--num-slots 5 ignored" in capsys.readouterr().out


BAD_INPUT = [  # (flags, what the one error line must name); each refused before a run folder exists
    (["--data", "no-such-set"], "no-such-set"),
    (["--data", "/missing/clevr.h5"], "/missing/clevr.h5"),
    (["--steps", "-1"], "--steps"),
    (["--batch-size", "0"], "--batch-size"),
    (["--num-slots", "0"], "--num-slots"),
    (["--lr", "-1"], "--lr"),
    (["--resume", "/missing/checkpoint.pt"], "/missing/checkpoint.pt"),
    (["--eval-only", "/missing/checkpoint.pt"], "/missing/checkpoint.pt"),
]


@pytest.mark.parametrize("name", MODELS)
def test_bad_input_is_one_error_line_naming_it(tmp_path, capsys, name):
    """DESIGN.md, reliability: bad input is one `error:` line that names the problem (argparse may print its
    usage above it), a non-zero exit, no traceback and no half-written run folder."""
    module = importlib.import_module(name)
    for flags, needle in BAD_INPUT:
        with pytest.raises(SystemExit) as e:
            module.main(argv(name, tmp_path / "out", "--steps", "2", *flags))
        err = capsys.readouterr().err
        lines = [l for l in err.splitlines() if "error:" in l]
        assert e.value.code not in (0, None) and len(lines) == 1, (flags, err)
        assert lines[0] == err.splitlines()[-1] and needle in lines[0] and "Traceback" not in err, (flags, err)
        assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir()), flags


@pytest.mark.slow
@pytest.mark.parametrize("name", MODELS)
def test_bad_input_from_the_shell_is_one_line_without_traceback(tmp_path, name):
    """The same from a shell: one line on stderr, the run never starts."""
    cmd = [sys.executable, str(ROOT / f"{name}.py"), *argv(name, tmp_path, "--steps", "2", "--data",
                                                          str(tmp_path / "missing.h5"))]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=240, env=ENV)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0
    assert r.stderr.startswith("error: ") and "missing.h5" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("name", MODELS)
def test_logged_lr_is_the_optimisers_and_bf16_terms_are_finite(tmp_path, name):
    """Every train line's `lr` is the learning rate the optimiser stepped with (read from param_groups by a
    global step hook, not recomputed), during warm-up where it changes every step; under bf16 autocast every
    logged term is finite."""
    module = importlib.import_module(name)
    used = []
    hook = register_optimizer_step_pre_hook(
        lambda opt, args, kwargs: used.append(opt.param_groups[0]["lr"]))
    try:
        module.main(argv(name, tmp_path, "--steps", "4", "--warmup-steps", "3", "--run-name", "r", "--dtype", "bf16"))
    finally:
        hook.remove()
    train = [r for r in map(json.loads, (tmp_path / "r" / "metrics.jsonl").read_text().splitlines())
             if r["split"] == "train"]
    assert [r["step"] for r in train] == [1, 2, 3, 4] and len(used) == 4
    assert [r["lr"] for r in train] == pytest.approx(used, rel=1e-6)
    assert len(set(used)) >= 3  # warm-up: the test would not see a schedule that is computed but not applied
    for r in train:
        for k, v in r.items():
            assert not isinstance(v, float) or torch.isfinite(torch.tensor(v)), (k, r)


# --- Two processes (gloo), in-test


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spy_loaders(module, seen, kill_at=None):
    """Wrap make_loader: record the indices each training batch holds, and signal this process at a batch."""
    real = data.make_loader

    def make_loader(dataset, batch_size, shuffle, **kw):
        loader = real(dataset, batch_size, shuffle, **kw)
        if not shuffle:
            return loader

        def batches():
            for i, (idx, batch) in enumerate(zip(loader.sampler, loader)):
                seen.append(idx)
                if i == kill_at:
                    os.kill(os.getpid(), signal.SIGUSR1)  # this rank alone: the others learn it from the reduction
                yield batch
        return batches()
    module.data.make_loader = make_loader
    return real


def ddp_worker(rank, name, out, port):
    """One rank: the process group is set up once here, and each run of the file's _main uses it."""
    os.environ.update(WORLD_SIZE="2", RANK=str(rank), LOCAL_RANK=str(rank))
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    torch.set_num_threads(1)
    sys.path.insert(0, str(ROOT))
    module = importlib.import_module(name)
    common = argv(name, out, "--steps", "4", "--train-size", "16", "--save-every", "1000")  # same flags on both ranks
    result = {}
    seen = []
    real = spy_loaders(module, seen)
    plain = module._main(module.parse_args(common + ["--run-name", "whole"]))
    result["whole"] = {k: v.clone() for k, v in plain.state_dict().items()}
    result["indices"] = seen[:2]  # 16 images, batch 4, two ranks: steps 1 and 2 are one epoch
    data.make_loader = real

    real = spy_loaders(module, [], kill_at=1 if rank == 0 else None)
    try:
        module._main(module.parse_args(common + ["--run-name", "cut"]))
        result["preempted"] = False
    except module.Preempted:
        result["preempted"] = torch.load(Path(out) / "cut" / "checkpoint.pt", weights_only=True)["step"]
    data.make_loader = real
    plain = module._main(module.parse_args(common + ["--run-name", "cut", "--resume", "auto"]))
    result["resumed"] = {k: v.clone() for k, v in plain.state_dict().items()}

    compute_loss = module.compute_loss

    def poisoned(*a, **kw):  # rank 1's loss goes non-finite; rank 0's stays finite
        terms = compute_loss(*a, **kw)
        return {k: v * float("nan") for k, v in terms.items()} if rank == 1 else terms
    module.compute_loss = poisoned
    try:
        module._main(module.parse_args(common + ["--run-name", "nan"]))
        result["nan"] = None
    except FloatingPointError as e:
        result["nan"] = str(e)
    torch.save(result, Path(out) / f"rank{rank}.pt")
    torch.distributed.barrier()  # rank 0 hosts the store: leaving while rank 1 still uses it can abort
    torch.distributed.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("name", MODELS)
def test_two_ranks_train_one_model_and_resume_each_rank(tmp_path, name):
    """Two gloo ranks, whose torch RNGs are seeded differently (--seed + rank), end with identical weights (DDP
    broadcasts rank 0's initial weights and averages the gradients: without the wrapper they train apart), see disjoint shards covering the epoch, resume each rank's own RNG after a signal
    that only rank 0 received, and both stop on a non-finite loss of rank 1 instead of hanging."""
    ctx = mp.start_processes(ddp_worker, args=(name, str(tmp_path), free_port()), nprocs=2, join=False,
                             start_method="spawn")
    deadline = time.time() + 240
    while not ctx.join(timeout=5):
        assert time.time() < deadline, "the ranks hung"
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert_same_weights(r0["whole"], r1["whole"])
    shard0, shard1 = sum(r0["indices"], []), sum(r1["indices"], [])
    assert not set(shard0) & set(shard1) and sorted(shard0 + shard1) == list(range(16))
    assert r0["preempted"] == r1["preempted"] == 2  # both stopped after the step in flight, checkpoint on disk
    assert_same_weights(r0["resumed"], r0["whole"])
    assert_same_weights(r1["resumed"], r1["whole"])
    for r in (r0, r1):
        assert r["nan"] and "non-finite loss term" in r["nan"] and "at step 1" in r["nan"], r["nan"]
    assert not (tmp_path / "nan" / "checkpoint.pt").exists()


@pytest.mark.slow
def test_torchrun_cli_two_processes(tmp_path):
    """The command line under torchrun itself (the tests above call _main in spawned processes)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "slot_attention.py"), *argv("slot_attention", tmp_path, "--steps", "4", "--run-name", "ddp",
                                                  "--log-every", "2")]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=240, env=ENV)
    assert r.returncode == 0, r.stderr[-2000:]
    assert [p.name for p in tmp_path.iterdir()] == ["ddp"]
    assert steps_logged(tmp_path / "ddp") == [(2, "train"), (4, "train"), (4, "eval")]  # rank 0 alone writes
    assert torch.load(tmp_path / "ddp" / "checkpoint.pt", weights_only=True)["step"] == 4
