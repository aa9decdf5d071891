"""Long runs and faults: kill -9 mid-epoch, SIGTERM, torchrun restarts, crafted checkpoints, a
second writer, non-finite steps and a full disk, for `gaea search` and `gaea train`.

Interruptions happen at a known step: a small driver script wraps the loop's step function to
kill or signal its own process after the K-th step, then runs the real `gaea` entry point.
"""
from __future__ import annotations

import errno
import json
import os
import pickle
import signal
import subprocess
import sys

import pytest
import torch

from gaea_ext.cli import main
from gaea_ext.search import rundir
from conftest import run_log, run_result

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# digits: 1438 training images, 22 steps of 64 per epoch
SEARCH = ["search", "--epochs", "2", "--channels", "4", "--cells", "1", "--batch-size", "64", "--seed", "3",
          "--checkpoint-every", "4"]
TRAIN = ["train", "--genotype", "DARTS_V2", "--layers", "3", "--channels", "4", "--train-images", "128",
         "--batch-size", "16", "--seed", "3", "--device", "cpu", "--epochs", "2", "--cutout", "4",
         "--drop-path", "0.3", "--checkpoint-every", "3"]  # 8 steps per epoch
TIMING = {"seconds", "images_per_s", "peak_mem_mb"}

# Runs `gaea ARGS` with the loop's step wrapped: after step K (counted over this process), do
# ACTION: "kill" (SIGKILL itself), "term" (one SIGTERM), "term2" (two SIGTERMs), "write" (SIGKILL
# halfway through writing the next checkpoint). Under torchrun only rank RANK_ONLY acts, and only
# in the first attempt (TORCHELASTIC_RESTART_COUNT 0).
DRIVER = r"""
import os, signal, sys
kind, action, k, only = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
acting = (only == "any" or os.environ.get("RANK") == only) and os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
if kind == "search":
    from gaea_ext.search.loop import Search as Loop
else:
    from gaea_ext.train.loop import Trainer as Loop
from gaea_ext.search import rundir
done = [0]
inner = Loop.step
def step(self, *a, **kw):
    out = inner(self, *a, **kw)
    done[0] += 1
    if acting and done[0] == k:
        if action == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        elif action == "term":
            os.kill(os.getpid(), signal.SIGTERM)
        elif action == "term2":
            os.kill(os.getpid(), signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGTERM)
        elif action == "write":
            write = rundir._atomic_write
            def half(path, data):
                with open(os.path.join(os.path.dirname(path), rundir.TMP_PREFIX + "checkpoint.pt.x"), "wb") as f:
                    f.write(data[: len(data) // 2])
                os.kill(os.getpid(), signal.SIGKILL)
            rundir._atomic_write = half
    return out
Loop.step = step
from gaea_ext.cli import main
sys.exit(main([kind, *sys.argv[5:]]))
"""


def _env():
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)


def drive(tmp_path, args, action, k, only="any", launcher=(sys.executable,)):
    script = tmp_path / "driver.py"
    script.write_text(DRIVER)
    return subprocess.run([*launcher, str(script), args[0], action, str(k), only, *args[1:]],
                          capture_output=True, text=True, env=_env(), timeout=600)


def cli(args):
    return subprocess.run([sys.executable, "-m", "gaea_ext", *args], capture_output=True, text=True, env=_env(),
                          timeout=600)


def strip(records):
    return [{k: v for k, v in r.items() if k not in TIMING} for r in records]


def model_of(out):
    return rundir.load_checkpoint(os.path.join(out, "checkpoint.pt"))["model"]


def assert_same_run(full, part):
    """Bitwise the same log records (timing aside), architecture weights and final weights."""
    assert strip(run_log(full)) == strip(run_log(part))
    assert run_result(full)["arch_weights"] == run_result(part)["arch_weights"]
    a, b = model_of(full), model_of(part)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The runs compared bitwise must sum in the same order: the killed and preempted runs are
    subprocesses with OMP_NUM_THREADS=1, so the in-process reference and resumed runs use one
    thread too (CPU convolutions and reductions sum in a thread-count-dependent order)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def search_ref(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("ref") / "search")
    assert main([*SEARCH, "--out", out]) == 0
    return out


@pytest.fixture(scope="module")
def train_ref(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("ref") / "train")
    assert main([*TRAIN, "--out", out]) == 0
    return out


# --- kill -9 and preemption: exact resume ---------------------------------------------------

@pytest.mark.parametrize("action,k", [("kill", 31), ("write", 10)], ids=["epoch2-step9", "during-checkpoint-write"])
def test_search_killed_mid_epoch_resumes_exactly(tmp_path, search_ref, action, k):
    part = str(tmp_path / "part")
    res = drive(tmp_path, [*SEARCH, "--out", part], action, k)
    assert res.returncode == -signal.SIGKILL, res.stderr[-2000:]
    assert not os.path.exists(os.path.join(part, "result.json"))
    if action == "write":  # the half-written file is a temporary one; the checkpoint is the previous one
        assert any(n.startswith(rundir.TMP_PREFIX) for n in os.listdir(part))
    state = rundir.load_checkpoint(os.path.join(part, "checkpoint.pt"))
    assert state["sums"] is not None  # a mid-epoch checkpoint
    assert main(["search", "--resume", part]) == 0
    assert not any(n.startswith(rundir.TMP_PREFIX) for n in os.listdir(part))
    assert_same_run(search_ref, part)


def test_gaea_gdas_search_killed_mid_epoch_resumes_exactly(tmp_path):
    """GAEA-GDAS draws its Gumbel noise from the global RNG: exact only if the checkpoint's RNG
    states are restored (GAEA's search above draws none after it starts)."""
    args = [*SEARCH, "--method", "gaea-gdas", "--epochs", "1"]
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    assert main([*args, "--out", full]) == 0
    res = drive(tmp_path, [*args, "--out", part], "kill", 10)  # 2 steps after the save at step 8
    assert res.returncode == -signal.SIGKILL, res.stderr[-2000:]
    assert rundir.load_checkpoint(os.path.join(part, "checkpoint.pt"))["loader_w"]["position"] == 8
    assert main(["search", "--resume", part]) == 0
    assert_same_run(full, part)


def test_train_sigterm_checkpoints_and_resumes_exactly(tmp_path, train_ref):
    part = str(tmp_path / "part")
    # epoch 2, step 5 of 8: drop path (0 in epoch 1) draws from the global RNG there, so the
    # resume is exact only if the checkpoint's RNG states are restored
    res = drive(tmp_path, [*TRAIN, "--out", part], "term", 13)
    assert res.returncode == 143, res.stderr[-2000:]
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "SIGTERM" in lines[0] and f"gaea train --resume {part}" in lines[0]
    state = rundir.load_checkpoint(os.path.join(part, "checkpoint.pt"))
    assert state["train_loader"]["position"] == 5 and state["epoch"] == 1
    assert main(["train", "--resume", part]) == 0
    assert strip(run_log(train_ref)) == strip(run_log(part))
    a, b = model_of(train_ref), model_of(part)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_search_sigterm_then_second_signal_exits_at_once(tmp_path):
    part = str(tmp_path / "part")
    res = drive(tmp_path, [*SEARCH, "--checkpoint-every", "0", "--out", part], "term2", 3)
    assert res.returncode == 143, res.stderr[-2000:]
    assert "second SIGTERM" in res.stderr and "resume with" not in res.stderr
    assert not os.path.exists(os.path.join(part, "checkpoint.pt"))  # no wait for the step's checkpoint


def test_search_sigterm_mid_epoch(tmp_path):
    part = str(tmp_path / "part")
    res = drive(tmp_path, [*SEARCH, "--checkpoint-every", "0", "--out", part], "term", 3)
    assert res.returncode == 143 and "gaea search --resume" in res.stderr, res.stderr[-2000:]
    state = rundir.load_checkpoint(os.path.join(part, "checkpoint.pt"))
    assert state["loader_w"]["position"] == 3 and state["sums"][0]["seen"] == 3 * 64


# --- torchrun elastic restart ------------------------------------------------------------------

DDP = ["search", "--epochs", "2", "--channels", "4", "--cells", "1", "--batch-size", "32", "--seed", "1",
       "--train-images", "256", "--device", "cpu", "--checkpoint-every", "2"]  # 4 steps per epoch per rank


TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]


@pytest.fixture(scope="module")
def ddp_full(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ddp")
    full = str(tmp / "full")
    res = drive(tmp, [*DDP, "--out", full], "none", 0, launcher=TORCHRUN)
    assert res.returncode == 0, res.stderr[-3000:]
    return full


def test_torchrun_restart_after_a_killed_worker_resumes(tmp_path, ddp_full):
    launch = [*TORCHRUN, "--max-restarts=1"]
    full, part = ddp_full, str(tmp_path / "part")
    res = drive(tmp_path, [*DDP, "--out", part], "kill", 3, only="1", launcher=launch)  # rank 1, epoch 1, step 3
    assert res.returncode == 0, res.stderr[-3000:]
    assert "resuming" in res.stdout and "step 2/4" in res.stdout, res.stdout
    assert strip(run_log(full)) == strip(run_log(part))
    assert run_result(full)["arch_weights"] == run_result(part)["arch_weights"]


def test_torchrun_sigterm_on_one_rank_stops_every_rank_after_the_same_step(tmp_path, ddp_full):
    """SIGTERM reaches rank 1 only, after epoch 2's first step; its flag goes out with the next
    step and both ranks stop after step 2/4, checkpointed; a torchrun --resume ends as the
    uninterrupted run."""
    part = str(tmp_path / "part")
    res = drive(tmp_path, [*DDP, "--out", part], "term", 5, only="1", launcher=TORCHRUN)
    assert res.returncode != 0, res.stderr[-3000:]
    assert "exitcode  : 143" in res.stderr and "stopped by SIGTERM in epoch 2 after step 2/4" in res.stderr, res.stderr[-3000:]
    state = rundir.load_checkpoint(os.path.join(part, "checkpoint.pt"))
    assert (state["epoch"], state["loader_w"]["position"]) == (1, 2)
    assert [s["seen"] for s in state["sums"]] == [2 * 32, 2 * 32]  # both ranks stopped after step 2
    res = drive(tmp_path, ["search", "--resume", part], "none", 0, launcher=TORCHRUN)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "resuming" in res.stdout and "step 2/4" in res.stdout, res.stdout
    assert strip(run_log(ddp_full)) == strip(run_log(part))
    assert run_result(ddp_full)["arch_weights"] == run_result(part)["arch_weights"]


# --- untrusted checkpoints -----------------------------------------------------------------------

class _Plant:
    """Unpickling this calls open(path, "w"): a file appears if the pickle is executed."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_crafted_checkpoint_is_refused_without_running_code(tmp_path):
    from gaea_ext.search.config import resolve

    out = tmp_path / "run"
    out.mkdir()
    (out / "config.json").write_text(json.dumps(resolve(None, {"epochs": 1}).to_dict()))
    planted = tmp_path / "planted"
    torch.save({"epoch": 1, "model": _Plant(str(planted))}, str(out / "checkpoint.pt"))
    res = cli(["search", "--resume", str(out)])
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "refusing checkpoint" in lines[0] and "Traceback" not in res.stderr
    assert not planted.exists()
    # the payload is live: an unsafe load would have run it
    torch.load(str(out / "checkpoint.pt"), weights_only=False)
    assert planted.exists()


# --- one writer per run dir ---------------------------------------------------------------------

def test_second_writer_exits_2_and_a_crash_leaves_no_stale_lock(tmp_path):
    out = str(tmp_path / "run")
    with rundir.lock(out):
        for args in (["search", "--epochs", "1", "--out", out], ["train", "--genotype", "DARTS_V2", "--out", out]):
            res = cli(args)
            assert res.returncode == 2 and "in use by another gaea process" in res.stderr, res.stderr
            assert len(res.stderr.strip().splitlines()) == 1
    # a holder killed by SIGKILL does not leave the directory locked
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from gaea_ext.search import rundir\n"
                               "with rundir.lock(sys.argv[1]):\n print('held', flush=True); time.sleep(600)", out],
                              stdout=subprocess.PIPE, text=True, env=_env())
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(rundir.RunDirError, match="in use"):
        with rundir.lock(out):
            pass
    holder.kill()
    holder.wait()
    with rundir.lock(out):
        pass


# --- non-finite values ---------------------------------------------------------------------------

def test_absurd_lr_skips_counts_and_stops_with_status_3(tmp_path):
    out = str(tmp_path / "nan")
    res = cli([*SEARCH, "--lr", "1e30", "--checkpoint-every", "1", "--max-nonfinite", "4", "--out", out])
    assert res.returncode == 3, res.stderr[-2000:]
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "non-finite" in lines[0]
    state = rundir.load_checkpoint(os.path.join(out, "checkpoint.pt"))  # the last good one, loadable
    assert all(bool(torch.isfinite(v).all()) for v in state["method"].values())
    assert all(bool(torch.isfinite(v).all()) for v in state["model"].values() if v.is_floating_point())
    # a patient run goes on skipping, and logs how many steps it skipped
    out2 = str(tmp_path / "patient")
    assert main([*SEARCH, "--epochs", "1", "--lr", "1e30", "--max-nonfinite", "1000", "--out", out2]) == 0
    rec = run_log(out2)[0]
    assert 0 < rec["nonfinite_steps"] < 22 and rec["arch_nonfinite"] > 0
    assert all(torch.isfinite(torch.tensor(run_result(out2)["arch_weights"])).flatten())
    # skipped means not applied: weights, momentum and BN statistics never take a NaN step
    assert all(bool(torch.isfinite(v).all()) for v in model_of(out2).values() if v.is_floating_point())
    momentum = rundir.load_checkpoint(os.path.join(out2, "checkpoint.pt"))["w_opt"]["state"]
    assert momentum and all(bool(torch.isfinite(st["momentum_buffer"]).all()) for st in momentum.values())


def test_weight_optimizer_skips_on_the_device_even_its_first_step():
    """A skipped step leaves weights and momentum untouched, also as the very first step (fused
    SGD would leave its new momentum buffers uninitialised); applied steps match torch's SGD."""
    from gaea_ext.precision import Precision
    from gaea_ext.search import faults

    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(64))
    q = torch.nn.Parameter(p.detach().clone())
    opt = faults.weight_optimizer([p], 0.1, 0.9, 1e-2)
    ref = torch.optim.SGD([q], lr=0.1, momentum=0.9, weight_decay=1e-2)
    prec = Precision(None, torch.device("cpu"))
    p.grad = torch.full((64,), float("nan"))
    faults.skip_if_not(torch.tensor(False), opt, prec)
    assert torch.equal(p, q) and not hasattr(opt, "found_inf")
    for _ in range(3):
        g = torch.randn(64)
        p.grad, q.grad = g.clone(), g.clone()
        faults.skip_if_not(torch.tensor(True), opt, prec)
        ref.step()
    torch.testing.assert_close(p.detach(), q.detach())
    torch.testing.assert_close(opt.state[p]["momentum_buffer"], ref.state[q]["momentum_buffer"])


def test_darts_architecture_step_with_a_non_finite_gradient_is_skipped_and_counted():
    from gaea_ext.search.config import resolve
    from gaea_ext.search.loop import Search

    s = Search(resolve(None, dict(method="darts", epochs=1, channels=4, cells=1, batch_size=16, train_images=64)),
               None, echo=lambda *a: None)
    s.sums = {"arch_nonfinite": torch.zeros((), dtype=torch.long)}
    params = s.method.params()
    before = [p.detach().clone() for p in params]
    for p in params:
        p.grad = torch.ones_like(p)
    params[0].grad[0, 0] = float("inf")
    s.arch_update(params)
    assert all(torch.equal(p, b) for p, b in zip(params, before)) and int(s.sums["arch_nonfinite"]) == 1
    assert all(float(s.method.optimizer.state[p]["step"]) == 0 for p in params)
    params[0].grad[0, 0] = 1.0
    s.arch_update(params)
    assert not any(torch.equal(p, b) for p, b in zip(params, before)) and int(s.sums["arch_nonfinite"]) == 1


def test_train_absurd_lr_stops_with_status_3(tmp_path):
    res = cli([*TRAIN, "--lr", "1e30", "--max-nonfinite", "3", "--out", str(tmp_path / "t")])
    assert res.returncode == 3 and "non-finite" in res.stderr, res.stderr[-2000:]
    # a patient run skips and counts; skipped steps change no weight, momentum or BN statistic
    out = str(tmp_path / "patient")
    assert main([*TRAIN, "--epochs", "1", "--lr", "1e30", "--max-nonfinite", "1000", "--out", out]) == 0
    assert 0 < run_log(out)[0]["nonfinite_steps"] < 8
    state = rundir.load_checkpoint(os.path.join(out, "checkpoint.pt"))
    assert all(bool(torch.isfinite(v).all()) for v in state["model"].values() if v.is_floating_point())
    assert all(bool(torch.isfinite(st["momentum_buffer"]).all()) for st in state["optimizer"]["state"].values())


# --- disk errors --------------------------------------------------------------------------------

def test_failed_checkpoint_write_keeps_the_previous_one(tmp_path, monkeypatch, capsys):
    out = str(tmp_path / "full")
    real_fsync, saves = os.fsync, []

    def fsync(fd):  # the disk fills up while the second checkpoint is written
        if "checkpoint.pt" in os.readlink(f"/proc/self/fd/{fd}"):
            saves.append(fd)
            if len(saves) >= 2:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_fsync(fd)

    monkeypatch.setattr(rundir.os, "fsync", fsync)
    assert main([*SEARCH, "--out", out]) == 4
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "No space left on device" in err[0] and "checkpoint.pt" in err[0]
    assert sorted(os.listdir(out)) == [".lock", "checkpoint.pt", "config.json", "log.jsonl"]  # no partial file
    state = rundir.load_checkpoint(os.path.join(out, "checkpoint.pt"))
    assert state["loader_w"]["position"] == 4 and state["epoch"] == 0


def test_checkpoint_files_hold_no_pickled_code(tmp_path, search_ref):
    """What the loops save loads under weights_only=True, RNG states included."""
    with open(os.path.join(search_ref, "checkpoint.pt"), "rb") as f:
        state = torch.load(f, weights_only=True)
    assert set(state["rng"]) >= {"torch", "python", "numpy"}
    assert pickle.dumps(state["rng"]["python"])  # plain tuples


def test_log_never_ends_mid_record(tmp_path, monkeypatch):
    """A kill mid-append leaves a cut line, which reading drops; a failed append is cut back."""
    log = str(tmp_path / "log.jsonl")
    rundir.append_log(log, {"epoch": 1})
    with open(log, "a") as f:
        f.write('{"epoch": 2, "train_lo')  # what a kill -9 mid-write leaves
    assert rundir.read_log(log) == [{"epoch": 1}]
    rundir.truncate_log(log, 1)
    size = os.path.getsize(log)

    class Full:
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def tell(self):
            return self.f.tell()

        def truncate(self, n):
            return self.f.truncate(n)

        def write(self, data):  # half the line reaches the file, then the disk is full
            self.f.write(data[: len(data) // 2])
            self.f.flush()
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        def flush(self):
            self.f.flush()

    real_open = open
    monkeypatch.setattr("builtins.open", lambda p, m="r", *a, **k: Full(real_open(p, m, *a, **k))
                        if p == log and "a" in m else real_open(p, m, *a, **k))
    with pytest.raises(rundir.CheckpointWriteError, match="No space left"):
        rundir.append_log(log, {"epoch": 2})
    monkeypatch.undo()
    assert os.path.getsize(log) == size and rundir.read_log(log) == [{"epoch": 1}]
