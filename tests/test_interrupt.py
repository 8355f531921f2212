"""A run that survives interruption and failure on any rank (issue 15): Ctrl-C and SIGTERM, an error
on one rank, a killed launcher, a damaged metrics.jsonl, a killed DataLoader worker.

The end-to-end tests run train_seg.py as a user would, in one process and under torchrun with two
gloo ranks; the others check the pieces in this process.
"""
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from segkit.training.interrupt import StopSignals, resume_command
from segkit.training.resources import explain
from segkit.training.run_dir import read_metrics
from segkit.errors import ConfigError
from segkit.files import append_line
from data_helpers import make_folder
from train_helpers import ROOT, TINY, env, model_state, records, run

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return tmp_path_factory.mktemp("data")


# -- helpers ------------------------------------------------------------------------------------
class Launch:
    """train_seg.py started in the background (one process or torchrun), output to files."""

    def __init__(self, args, data_root, tmp_path, nproc=1, name="launch"):
        launcher = TORCHRUN if nproc > 1 else [sys.executable]
        self.out, self.err = tmp_path / f"{name}.out", tmp_path / f"{name}.err"
        with open(self.out, "w") as out, open(self.err, "w") as err:
            self.proc = subprocess.Popen(launcher + [str(ROOT / "train_seg.py"), *args], cwd=ROOT,
                                         env=env(data_root), stdout=out, stderr=err)

    def wait_for_iteration(self, run_dir, n, timeout=180):
        """Wait until metrics.jsonl records training iteration ``n`` (records are whole lines)."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            assert self.proc.poll() is None, f"the run ended early:\n{self.stderr[-3000:]}"
            path = run_dir / "metrics.jsonl"
            if path.exists() and any(r.get("iter", 0) >= n and "split" not in r
                                     for r in map(json.loads, path.read_text().splitlines())):
                return
            time.sleep(0.1)
        raise AssertionError(f"iteration {n} not reached in {timeout} s")

    def wait(self, timeout=180):
        self.proc.wait(timeout)
        return self.proc.returncode

    @property
    def stderr(self):
        return self.err.read_text()


def stopped_at(stderr, signame):
    """The iteration and continue command of the one line an interrupted run ends with."""
    lines = [line for line in stderr.splitlines() if line.startswith(f"{signame}: stopped at iteration")]
    assert len(lines) == 1, stderr[-3000:]
    m = re.match(rf"{signame}: stopped at iteration (\d+) of (\d+), saved (.+?)\. Continue with: (.+)$", lines[0])
    assert m, lines[0]
    return int(m.group(1)), m.group(4)


def run_command(command, data_root):
    """Run the command an interrupted run printed, exactly."""
    proc = subprocess.run(shlex.split(command), cwd=ROOT, env=env(data_root), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def iteration(path):
    return torch.load(path, map_location="cpu", weights_only=True)["iteration"]


def assert_same_weights(a, b):
    a, b = model_state(a), model_state(b)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def rank_tracebacks(stderr):
    """Tracebacks other than the launcher's own (torchrun reports a failed or signalled launch with
    a traceback of its own, from torch/distributed/run.py)."""
    blocks = stderr.split("Traceback (most recent call last):")[1:]
    return [b for b in blocks if "torch/distributed/run.py" not in b]


def alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has ended
    except OSError:
        return False


def children(pid):
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        found.append(int(entry))
            except (OSError, ValueError, IndexError):
                pass
    return found


# -- Ctrl-C and SIGTERM -------------------------------------------------------------------------
def test_ctrl_c_saves_the_current_step_and_the_resume_matches(tmp_path, data_root):
    """Also the damaged record: metrics.jsonl with a cut last line (as a crash during an append
    leaves it) does not stop the resume, and is clean afterwards."""
    common = TINY + ["train.iters=10", "train.val_every=4", "train.ckpt_every=100", "model.dropout=0.1"]
    run(common + [f"hydra.run.dir={tmp_path / 'straight'}"], data_root)

    run_dir = tmp_path / "interrupted"
    launch = Launch(common + [f"hydra.run.dir={run_dir}"], data_root, tmp_path)
    launch.wait_for_iteration(run_dir, 2)
    launch.proc.send_signal(signal.SIGINT)
    assert launch.wait() == 130, launch.stderr[-3000:]
    stderr = launch.stderr
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr
    stopped, command = stopped_at(stderr, "SIGINT")
    assert 2 <= stopped < 10 and iteration(run_dir / "last.pt") == stopped
    assert not list(run_dir.glob(".*.tmp"))
    assert command.endswith(f"hydra.run.dir={run_dir} resume=true") and "train.iters=10" in command

    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write('{"iter": 99, "epoch": 0.75, "lo')  # a crash in the middle of an append
    resumed = run_command(command, data_root)  # the command the message gives, as printed
    assert "dropped its last line" in resumed.stderr and "Traceback" not in resumed.stderr
    assert all(json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines())
    assert_same_weights(tmp_path / "straight" / "last.pt", run_dir / "last.pt")
    assert [r["iter"] for r in records(run_dir, "train")] == list(range(1, 11))
    assert [r["loss"] for r in records(run_dir, "train")] == [r["loss"] for r in records(tmp_path / "straight", "train")]


def test_sigterm_to_torchrun_stops_every_rank_at_the_same_step(tmp_path, data_root):
    common = TINY + ["train.iters=8", "train.val_every=3", "train.ckpt_every=100"]
    run(common + [f"hydra.run.dir={tmp_path / 'straight'}"], data_root, nproc=2)

    run_dir = tmp_path / "interrupted"
    launch = Launch(common + [f"hydra.run.dir={run_dir}"], data_root, tmp_path, nproc=2)
    launch.wait_for_iteration(run_dir, 2)
    launch.proc.send_signal(signal.SIGTERM)  # as a scheduler stops a job: torchrun forwards it to each rank
    launch.wait()
    stderr = launch.stderr
    assert not rank_tracebacks(stderr), stderr[-3000:]
    stopped, command = stopped_at(stderr, "SIGTERM")
    assert 2 <= stopped < 8
    last = torch.load(run_dir / "last.pt", map_location="cpu", weights_only=True)
    assert last["iteration"] == stopped and len(last["rng"]) == 2  # both ranks took part in this save
    assert command.startswith(shlex.join(TORCHRUN))

    run_command(command, data_root)
    assert_same_weights(tmp_path / "straight" / "last.pt", run_dir / "last.pt")
    assert [r["iter"] for r in records(run_dir, "train")] == list(range(1, 9))


# -- errors on one rank -------------------------------------------------------------------------
def _folder_dataset(root, corrupt_val):
    make_folder(root, counts={"train": 8, "val": 2}, size=(32, 32))
    (root / "images" / "val" / f"img{corrupt_val}.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    return [a for a in TINY if "dataset" not in a] + [
        "dataset=folder", f"dataset.root={root}", "dataset.base_size=32", "dataset.crop_size=32"]


def test_corrupt_image_read_by_rank_1_is_one_line_naming_it(tmp_path, data_root):
    # Evaluation gives rank r the images r, r + 2, ...: val image 1 is rank 1's alone.
    args = _folder_dataset(tmp_path / "mine", corrupt_val=1) + ["train.iters=2", "train.val_every=2"]
    proc = run(args + [f"hydra.run.dir={tmp_path / 'r'}"], data_root, nproc=2, check=False)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: [rank 1] ") and "val/img1.png" in errors[0], proc.stderr[-3000:]
    assert "cannot decode image" in errors[0]
    assert not rank_tracebacks(proc.stderr), proc.stderr[-3000:]
    assert "Connection closed by peer" not in proc.stderr and "gloo" not in proc.stderr
    # torchrun's own summary names the same line as the root cause, and both ranks' exit status 2.
    assert f"traceback : {errors[0]}" in proc.stderr and proc.stderr.count("exitcode  : 2 ") == 2
    assert "[rank 0] stopped because rank 1 failed: " in proc.stderr
    assert proc.returncode == 1  # torchrun's own status for any failed launch


# -- a killed launcher --------------------------------------------------------------------------
def test_ranks_stop_when_torchrun_is_killed(tmp_path, data_root):
    run_dir = tmp_path / "r"
    launch = Launch(TINY + ["train.iters=400", "train.val_every=1000", "train.ckpt_every=1000",
                            f"hydra.run.dir={run_dir}"], data_root, tmp_path, nproc=2)
    launch.wait_for_iteration(run_dir, 2)
    ranks = children(launch.proc.pid)
    assert len(ranks) == 2
    launch.proc.kill()
    launch.wait()
    killed = time.time()
    while any(alive(pid) for pid in ranks) and time.time() - killed < 30:
        time.sleep(0.2)
    assert not any(alive(pid) for pid in ranks), "ranks still alive 30 s after the launcher was killed"
    # They stopped cleanly: after a whole step, with last.pt written (it is not due before 1000).
    assert 2 <= iteration(run_dir / "last.pt") < 400 and not list(run_dir.glob(".*.tmp"))


# -- records ------------------------------------------------------------------------------------
def test_metrics_reader_drops_only_a_cut_last_line(tmp_path, capsys):
    path = tmp_path / "metrics.jsonl"
    append_line(path, json.dumps({"iter": 1, "loss": 1.0}))
    append_line(path, json.dumps({"iter": 2, "loss": 0.5}))
    assert [r["iter"] for r in read_metrics(path)] == [1, 2] and capsys.readouterr().err == ""
    path.write_text(path.read_text() + '{"iter": 3, "lo')
    assert [r["iter"] for r in read_metrics(path)] == [1, 2]
    assert "dropped its last line" in capsys.readouterr().err
    path.write_text('{"iter": 1}\n{"iter": 2, "lo\n{"iter": 3}\n')
    with pytest.raises(ConfigError, match="line 2: not a metrics record"):
        read_metrics(path)


# -- resources ----------------------------------------------------------------------------------
def _job(tmp_path):
    from config_helpers import train_settings
    return train_settings("dataset=demo", "train.workers=4", "train.batch_size=16", "dataset.crop_size=64")


def test_resource_failures_name_the_cause_the_settings_and_the_checkpoint(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["train_seg.py", "dataset=demo"])
    job, run_dir = _job(tmp_path), tmp_path / "r"
    killed = explain(RuntimeError("DataLoader worker (pid 4242) is killed by signal: Killed. "), job, run_dir, 1000)
    assert "DataLoader worker (pid 4242) was killed by signal: Killed" in killed and "out-of-memory killer" in killed
    for setting in ("train.workers (now 4)", "train.batch_size (now 16)", "dataset.crop_size (now 64)", "train.amp=bf16"):
        assert setting in killed
    assert "last.pt is intact at iteration 1000; continue with: " in killed and "resume=true" in killed
    gone = explain(RuntimeError("DataLoader worker (pid(s) 11, 12) exited unexpectedly"), job, run_dir, None)
    assert "(pid 11, 12) exited unexpectedly" in gone and "no last.pt was written yet" in gone
    bus = explain(RuntimeError("DataLoader worker (pid 7) is killed by signal: Bus error. "), job, run_dir, 5)
    assert "/dev/shm" in bus
    for oom in (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), MemoryError(),
                RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory: "
                             "you tried to allocate 123 bytes. Error code 12 (Cannot allocate memory)")):
        message = explain(oom, job, run_dir, 20)
        assert message.startswith("out of memory") and "train.batch_size (now 16)" in message, message
        assert "train.amp=bf16 (now fp32)" in message and "iteration 20" in message
    assert explain(RuntimeError("shape mismatch"), job, run_dir, 3) is None
    assert explain(ValueError("out of memory"), job, run_dir, 3) is None


def test_killed_dataloader_worker_ends_with_the_cause(tmp_path, data_root):
    # train_seg.py with a dataset whose worker is killed (as by the OOM killer) after 3 batches.
    script = tmp_path / "train_killed_worker.py"
    script.write_text(textwrap.dedent("""
        import os, signal, sys
        import torch.utils.data
        from segkit.training import sampler
        from segkit.cli import train_main

        served = 0
        getitem = sampler.SeededSamples.__getitem__

        def dying(self, key):
            global served
            served += 1
            if torch.utils.data.get_worker_info() is not None and served > 12:
                os.kill(os.getpid(), signal.SIGKILL)
            return getitem(self, key)

        sampler.SeededSamples.__getitem__ = dying
        train_main()
    """))
    run_dir = tmp_path / "r"
    proc = subprocess.run([sys.executable, str(script), *TINY, "train.workers=1", "train.iters=50", "train.ckpt_every=1",
                           "train.val_every=100", f"hydra.run.dir={run_dir}"], cwd=ROOT, env=env(data_root),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    [line] = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert "was killed by signal: Killed, most likely by the out-of-memory killer" in line and "train.workers (now 1)" in line
    assert f"last.pt is intact at iteration {iteration(run_dir / 'last.pt')}; continue with: " in line


# -- the pieces -----------------------------------------------------------------------------------
def test_resume_command_replaces_resume_and_run_dir(monkeypatch, tmp_path):
    monkeypatch.setattr(sys, "argv", ["train_seg.py", "dataset=demo", "resume=auto", "hydra.run.dir=old", "train.iters=5"])
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    command = shlex.split(resume_command(tmp_path / "run"))
    assert command[-5:] == ["train_seg.py", "dataset=demo", "train.iters=5", f"hydra.run.dir={tmp_path / 'run'}",
                            "resume=true"]


_SIGNALS = textwrap.dedent("""
    import os, signal, sys, time
    from segkit.training.interrupt import StopSignals
    first, second = (getattr(signal, name) for name in sys.argv[1:3])
    with StopSignals(forced=lambda: "last.pt holds iteration 7") as stop:
        if os.fork() == 0:  # a forked DataLoader worker: the signal is not its business
            os.kill(os.getpid(), first)
            os._exit(0 if stop.signum is None else 1)
        assert os.wait()[1] == 0
        os.kill(os.getpid(), first)
        assert stop.signum == first
        os.kill(os.getpid(), second)
        time.sleep(0.2)
        print("still running", stop.signum == first, flush=True)
""")


@pytest.mark.parametrize("first,second,status", [("SIGINT", "SIGINT", 130), ("SIGINT", "SIGTERM", 143),
                                                 ("SIGTERM", "SIGTERM", 0), ("SIGTERM", "SIGINT", 0)])
def test_a_second_ctrl_c_stops_at_once(first, second, status):
    proc = subprocess.run([sys.executable, "-c", _SIGNALS, first, second], cwd=ROOT, capture_output=True,
                          text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == status, proc.stderr
    assert f"{first}: stopping after the current step" in proc.stderr
    if status:  # after Ctrl-C, another Ctrl-C (or torchrun's SIGTERM on a second Ctrl-C) ends it now
        assert f"{second} again: stopped at once; last.pt holds iteration 7" in proc.stderr
        assert "still running" not in proc.stdout
    else:  # after a scheduler's signal, the stop is under way: later ones do not cut it short
        assert "still running True" in proc.stdout


def test_stop_signals_are_restored_and_hand_submitit_the_signal(monkeypatch):
    class SignalHandler:  # what submitit installs for SLURM's SIGUSR2: requeue, then exit
        calls = []

        def checkpoint_and_try_requeue(self, signum, frame):
            self.calls.append(signum)
            sys.exit(-1)

    SignalHandler.__module__ = "submitit.core.job_environment"
    monkeypatch.setenv("SLURM_JOB_ID", "1")
    handler = SignalHandler()
    previous = signal.signal(signal.SIGUSR2, handler.checkpoint_and_try_requeue)
    try:
        with StopSignals(announce=False) as stop:
            os.kill(os.getpid(), signal.SIGUSR2)
            assert stop.signum == signal.SIGUSR2 and not handler.calls
            assert stop.chain() == "the SLURM job is requeued" and handler.calls == [signal.SIGUSR2]
        assert signal.getsignal(signal.SIGUSR2) == handler.checkpoint_and_try_requeue
    finally:
        signal.signal(signal.SIGUSR2, previous)
