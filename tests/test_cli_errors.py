"""Through the real command line: every kind of bad input ends with one line naming the key, value
or file, exit status 2 and no traceback, also when a DataLoader worker raises it; run directories
and earlier results are never damaged.

The tables of bad values run the command's main in this process (the ``cli`` fixture), so each row
costs no interpreter start-up; a row of each kind also runs in a real subprocess, where stderr,
the exit status and the absence of a traceback are the process's own."""
import os
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from data_helpers import make_folder
from train_helpers import ROOT, TINY, env, run

EVAL = [sys.executable, str(ROOT / "eval_seg.py"), "eval.progress=false", "eval.workers=0"]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return tmp_path_factory.mktemp("data")


def one_line_error(proc) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr and "Error executing job" not in proc.stderr, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    # Python warnings (torch's "more workers than cores") may precede it, nothing else.
    others = [line for line in lines if line not in errors and "Warning: " not in line
              and not line.startswith("  self.check_worker_number_rationality")]
    assert len(errors) == 1 and lines[-1] == errors[0] and not others, proc.stderr
    return errors[0]


# One row per key family: the command line, and what the single line must name.
BAD_TRAIN = [
    (["train.batch_size=abc"], "train.batch_size: Value 'abc'"),
    (["dataset.crop_size=abc"], "dataset.crop_size: Value 'abc'"),
    (["train.epochs=0"], "train.epochs=0 is invalid: expected >= 1"),
    (["optim.base_lr=-0.1"], "optim.base_lr=-0.1 is invalid: expected > 0"),
    (["optim.base_lr=fast"], "optim.base_lr: Value 'fast'"),
    (["train.workers=-1"], "train.workers=-1 is invalid: expected >= 0"),
    (["train.log_every=0"], "train.log_every=0 is invalid"),
    (["train.amp=fp8"], "train.amp='fp8' is invalid: expected null or one of bf16, fp16"),
    (["train.device=tpu"], "train.device='tpu' is invalid: expected one of auto, cpu, cuda"),
    (["backbone.output_stride=32"], "backbone.output_stride=32 is invalid: expected one of 8, 16"),
    (["backbone.norm=ln"], "backbone.norm='ln' is invalid"),
    (["model.aspp_dropout=1.5"], "model.aspp_dropout=1.5 is invalid: expected >= 0, < 1"),
    (["model.loss.aux_weight=-1"], "model.loss.aux_weight=-1.0 is invalid"),
    (["model.loss.class_weights=[1,-2]"], "model.loss.class_weights=[1, -2] is invalid"),
    (["model.loss.ohem={thresh:2}"], "model.loss.ohem.thresh=2.0 is invalid: expected > 0, <= 1"),
    (["model.loss.ohem={thresh:0.5,kept:3}"], "model.loss.ohem.kept: Key 'kept' not in 'OhemSettings'"),
    (["schedule.power=-1"], "schedule.power=-1.0 is invalid"),
    (["dataset.scale_range=[2,1]"], "dataset.scale_range=[2.0, 1.0] is invalid"),
    (["dataset.mean=[0.5,0.5]"], "dataset.mean=[0.5, 0.5] is invalid: expected a list of 3 values"),
    (["dataset.crop_size=36"], "dataset.crop_size=36 is not a multiple of the backbone output stride 8"),
    (["train.batch_size=6", "train.accum_steps=4"], "train.batch_size=6 (the total over all ranks) must be"),
    (["train.bach_size=3"], "train.bach_size: no such key; valid keys here: batch_size"),
    (["backbone=resnest102"], "could not find config 'backbone/resnest102'; available options: resnest101"),
    (["resume=''"], "resume='' is invalid"),
]


@pytest.mark.parametrize("args,expected", BAD_TRAIN, ids=[" ".join(a) for a, _ in BAD_TRAIN])
def test_bad_training_values(tmp_path, data_root, cli, args, expected):
    line = one_line_error(cli("train", TINY + [f"hydra.run.dir={tmp_path / 'r'}", "train.iters=1", *args], data_root))
    assert expected in line
    assert not (tmp_path / "r" / "config.yaml").exists()


# A composition error (Hydra), a settings error and a rule between keys, each in a real process.
@pytest.mark.parametrize("row", [0, 2, 20], ids=lambda k: " ".join(BAD_TRAIN[k][0]))
def test_bad_training_values_in_a_process(tmp_path, data_root, row):
    args, expected = BAD_TRAIN[row]
    line = one_line_error(run(TINY + [f"hydra.run.dir={tmp_path / 'r'}", "train.iters=1", *args], data_root,
                              check=False))
    assert expected in line
    assert not (tmp_path / "r" / "config.yaml").exists()


def test_run_dir_that_is_a_file(tmp_path, data_root, cli):
    (tmp_path / "taken").write_text("not a directory")
    line = one_line_error(cli("train", TINY + [f"hydra.run.dir={tmp_path / 'taken'}"], data_root))
    assert str(tmp_path / "taken") in line and "a file stands where a directory belongs" in line


@pytest.mark.parametrize("in_process", [True, False], ids=["in-process", "subprocess"])
def test_bad_eval_values(tmp_path, data_root, cli, in_process):
    def evaluate(*args):
        if in_process:
            return cli("eval", EVAL[2:] + [f"hydra.run.dir={tmp_path / 'e'}", *args], data_root)
        return subprocess.run(EVAL + [f"hydra.run.dir={tmp_path / 'e'}", *args], cwd=ROOT, env=env(data_root),
                              capture_output=True, text=True, timeout=120)

    if not in_process:  # one value through a real process; the table in-process
        assert "eval.scales=[0] is invalid: expected null or a list of numbers" in one_line_error(
            evaluate("checkpoint=x.pt", "eval.scales=[0]"))
        return

    assert "eval.scales=[0] is invalid: expected null or a list of numbers" in one_line_error(
        evaluate("checkpoint=x.pt", "eval.scales=[0]"))
    assert "eval.scales=[-1] is invalid" in one_line_error(evaluate("checkpoint=x.pt", "eval.scales=[-1]"))
    assert "eval.scales=[] is invalid" in one_line_error(evaluate("checkpoint=x.pt", "eval.scales=[]"))
    assert "eval.workers=-1 is invalid" in one_line_error(evaluate("checkpoint=x.pt", "eval.workers=-1"))
    assert "eval.fusion='mean' is invalid: expected one of softmax, original" in one_line_error(
        evaluate("checkpoint=x.pt", "eval.fusion=mean"))
    unreadable = tmp_path / "unreadable.pt"
    unreadable.write_bytes(b"\0" * 10)
    unreadable.chmod(0)
    if os.geteuid() != 0:  # root reads anything
        assert str(unreadable) in one_line_error(evaluate(f"checkpoint={unreadable}"))
    unreadable.chmod(0o600)
    assert "not a usable PyTorch checkpoint" in one_line_error(evaluate(f"checkpoint={unreadable}"))


def _corrupt_folder(root):
    make_folder(root, n=8, size=(32, 32))
    (root / "images" / "train" / "img5.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    return root


def test_data_error_inside_a_dataloader_worker_is_one_line(tmp_path, data_root):
    root = _corrupt_folder(tmp_path / "mine")
    args = [a for a in TINY if not a.startswith(("dataset", "++dataset", "train.workers"))] + [
        "dataset=folder", f"dataset.root={root}", "dataset.base_size=32", "dataset.crop_size=32",
        "train.workers=4", "train.iters=2", "train.val_every=100", f"hydra.run.dir={tmp_path / 'r'}"]
    line = one_line_error(run(args, data_root, check=False))
    assert str(root / "images" / "train" / "img5.png") in line and "cannot decode image" in line


def test_mask_errors_inside_workers_name_the_file(tmp_path, data_root):
    root = make_folder(tmp_path / "mine", n=4, size=(32, 32))
    Image.fromarray(np.full((32, 32), 9, np.uint8)).save(root / "masks" / "val" / "img1.png")
    args = [a for a in TINY if not a.startswith(("dataset", "++dataset", "train.workers"))] + [
        "dataset=folder", f"dataset.root={root}", "dataset.base_size=32", "dataset.crop_size=32",
        "train.batch_size=2", "train.workers=2", "train.iters=1", f"hydra.run.dir={tmp_path / 'r'}"]
    line = one_line_error(run(args, data_root, check=False))
    assert str(root / "masks" / "val" / "img1.png") in line and "mask values 9" in line


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_read_only_run_directory(tmp_path, data_root):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    line = one_line_error(run(TINY + [f"hydra.run.dir={ro / 'r'}", "train.iters=1"], data_root, check=False))
    assert str(ro) in line and "Permission denied" in line


def test_run_directory_is_owned_by_one_run(tmp_path, data_root):
    """A second run on a directory in use stops with a message naming the holder; the first one
    goes on unharmed and finishes."""
    run_dir = tmp_path / "r"
    cmd = [sys.executable, str(ROOT / "train_seg.py"), *TINY, "train.iters=40", "train.val_every=100",
           "train.ckpt_every=1", f"hydra.run.dir={run_dir}"]
    first = subprocess.Popen(cmd, cwd=ROOT, env=env(data_root), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
    try:
        for _ in range(600):
            if (run_dir / "last.pt").exists():
                break
            assert first.poll() is None, first.communicate()
            time.sleep(0.1)
        line = one_line_error(run(TINY + [f"hydra.run.dir={run_dir}", "resume=true"], data_root, check=False))
        assert f"{run_dir} is in use by another run (pid {first.pid} on" in line
        fresh = one_line_error(run(TINY + [f"hydra.run.dir={run_dir}"], data_root, check=False))
        # It names what the first run has written by now: best.pt and more too on a fast machine.
        listed = fresh.split("already holds an earlier run (", 1)[1].split(")", 1)[0].split(", ")
        assert {"last.pt", "metrics.jsonl", "config.yaml"} <= set(listed), fresh
    finally:
        out, err = first.communicate(timeout=300)
    assert first.returncode == 0, err[-2000:]


def test_stale_temporaries_of_a_killed_run_are_removed(tmp_path, data_root, cli_train):
    run_dir = tmp_path / "r"
    cli_train(TINY + ["train.iters=2", "train.val_every=100", f"hydra.run.dir={run_dir}"], data_root)
    for name in (".last.pt.tmp", ".best.pt.tmp", ".metrics.jsonl.tmp"):
        (run_dir / name).write_bytes(b"half a file")
    good = (run_dir / "last.pt").read_bytes()
    cli_train(TINY + ["train.iters=2", "train.val_every=100", "resume=true", f"hydra.run.dir={run_dir}"], data_root)
    assert not list(run_dir.glob(".*.tmp")) and (run_dir / "last.pt").read_bytes() == good


def test_failed_checkpoint_write_leaves_no_temporary_and_the_old_file(tmp_path):
    from segkit.files import save_atomic

    target = tmp_path / "last.pt"
    save_atomic({"a": 1}, target)

    class Unpicklable:
        def __reduce__(self):
            raise OSError(28, "No space left on device")

    from segkit.errors import WriteError

    with pytest.raises(WriteError, match=rf"^cannot write {target}: no space left on the device"):
        save_atomic({"b": Unpicklable()}, target)
    assert not list(tmp_path.glob(".*.tmp"))
    import torch
    assert torch.load(target, weights_only=True) == {"a": 1}
