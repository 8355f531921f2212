"""train_seg.py end to end: one process, two gloo ranks, kill + resume, and bad input.

Runs of one process go through the command's main in this process (``train``: the ``cli``
fixture); two ranks and killed runs are real processes (``run``)."""
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from segkit.checkpoints.checkpoint import load_training, restore_model
from segkit.errors import CheckpointError
from segkit.models.resnest import create_backbone
from segkit.models.segmentor import Segmentor
from data_helpers import make_folder
from train_helpers import ROOT, TINY, env, model_state, records, run


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return tmp_path_factory.mktemp("data")


@pytest.fixture
def train(cli_train, data_root):
    """``train(args, check=True)``: train_seg.py ``args`` in this process, as ``run`` in a subprocess."""
    return lambda args, check=True: cli_train(args, data_root, check)


def test_end_to_end_writes_the_run_directory(tmp_path, train):
    run_dir = tmp_path / "run"
    proc = train(TINY + ["train.iters=4", "train.val_every=2", "train.ckpt_every=2", f"hydra.run.dir={run_dir}"])
    assert {"config.yaml", "last.pt", "best.pt", "metrics.jsonl", "tb"} <= {p.name for p in run_dir.iterdir()}
    assert not list(run_dir.glob(".*.tmp"))  # atomic writes leave no temporaries
    train = records(run_dir, "train")
    assert [r["iter"] for r in train] == [1, 2, 3, 4] and all(r["loss"] > 0 for r in train)
    assert train[0]["lr"] == pytest.approx(0.01 * 4 / 16 * (1 - 1 / 4) ** 0.9)  # scaled, poly after step 1
    assert [r["iter"] for r in records(run_dir, "val")] == [2, 4]
    last = torch.load(run_dir / "last.pt", map_location="cpu", weights_only=True)
    assert last["iteration"] == 4 and last["config"]["backbone"]["name"] == "resnest14"
    assert '"iter": 4' in proc.stdout


def test_two_gloo_ranks_match_one_process_with_the_same_total_batch(tmp_path, data_root):
    common = TINY + ["train.iters=3", "train.val_every=100", "train.ckpt_every=100"]
    run(common + ["train.accum_steps=2", f"hydra.run.dir={tmp_path / 'one'}"], data_root)
    run(common + [f"hydra.run.dir={tmp_path / 'two'}"], data_root, nproc=2)
    one, two = model_state(tmp_path / "one" / "last.pt"), model_state(tmp_path / "two" / "last.pt")
    params = [k for k in one if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    for k in params:
        torch.testing.assert_close(two[k], one[k], rtol=1e-4, atol=1e-6, msg=k)
    moved = model_state(tmp_path / "one" / "last.pt")["head.classifier.bias"]
    assert moved.abs().sum() > 0  # training happened


def test_killed_run_resumes_to_the_same_weights(tmp_path, data_root):
    common = TINY + ["train.iters=8", "train.val_every=3", "train.ckpt_every=2", "model.dropout=0.1"]
    run(common + [f"hydra.run.dir={tmp_path / 'straight'}"], data_root)

    killed = tmp_path / "killed"
    cmd = [sys.executable, str(ROOT / "train_seg.py"), *common, f"hydra.run.dir={killed}"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env(data_root), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        ckpt = killed / "last.pt"
        if ckpt.exists() and torch.load(ckpt, map_location="cpu", weights_only=True)["iteration"] >= 4:
            break
        time.sleep(0.2)
    assert proc.poll() is None, "the run finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert torch.load(killed / "last.pt", map_location="cpu", weights_only=True)["iteration"] < 8

    run(common + [f"hydra.run.dir={killed}", "resume=true"], data_root)
    straight, resumed = model_state(tmp_path / "straight" / "last.pt"), model_state(killed / "last.pt")
    for k in straight:
        assert torch.equal(straight[k], resumed[k]), k
    # The log reads as one run: iterations repeated after the checkpoint are not recorded twice.
    assert [r["iter"] for r in records(killed, "train")] == list(range(1, 9))
    losses = [r["loss"] for r in records(killed, "train")]
    assert losses == [r["loss"] for r in records(tmp_path / "straight", "train")]


def _error(proc):
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    return proc.stderr


def test_bad_input_ends_with_a_message_not_a_traceback(tmp_path, train):
    base = TINY + [f"hydra.run.dir={tmp_path / 'r'}", "train.iters=2"]
    assert "train.batch_size=5" in _error(train(base + ["train.batch_size=5", "train.accum_steps=2"], check=False))
    assert "dataset.crop_size=36 is not a multiple of the backbone output stride 8" in _error(
        train(base + ["dataset.crop_size=36"], check=False))
    assert "train.amp='fp8'" in _error(train(base + ["train.amp=fp8"], check=False))
    missing = train(base + [f"resume={tmp_path / 'nope.pt'}"], check=False)
    assert "checkpoint file not found" in _error(missing)
    assert not (tmp_path / "r" / "last.pt").exists()
    # Hydra's own errors for a mistyped group option list the valid choices.
    typo = train(TINY[:1] + ["backbone=resnest102"], check=False)
    assert typo.returncode != 0 and "resnest101" in typo.stderr


def test_batch_not_divisible_across_ranks(tmp_path, data_root):
    proc = run(TINY + ["train.batch_size=3", f"hydra.run.dir={tmp_path / 'r'}"], data_root, nproc=2, check=False)
    assert proc.returncode != 0 and "must be a positive multiple of 2 ranks" in proc.stderr


def test_corrupt_or_foreign_checkpoint_leaves_the_run_directory_untouched(tmp_path, train):
    run_dir = tmp_path / "r"
    train(TINY + ["train.iters=2", "train.val_every=100", f"hydra.run.dir={run_dir}"])
    before = {p.name: p.stat().st_mtime_ns for p in run_dir.rglob("*")}

    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"not a checkpoint")
    err = _error(train(TINY + [f"hydra.run.dir={run_dir}", f"resume={corrupt}"], check=False))
    assert "corrupt.pt: not a usable PyTorch checkpoint" in err

    fresh = _error(train(TINY + [f"hydra.run.dir={run_dir}"], check=False))
    assert "already holds an earlier run (last.pt, best.pt, metrics.jsonl, config.yaml, train.log, tb); continue it with resume=true" in fresh
    other_arch = _error(train(TINY + [f"hydra.run.dir={run_dir}", "resume=true", "backbone=resnest26",
                                      "backbone.pretrained=null"], check=False))
    assert "missing keys" in other_arch and "backbone=resnest14" in other_arch
    assert {p.name: p.stat().st_mtime_ns for p in run_dir.rglob("*")} == before


def test_nan_loss_stops_with_the_last_good_state(tmp_path, train):
    run_dir = tmp_path / "r"
    proc = train(TINY + ["train.iters=30", "optim.base_lr=1e12", "train.val_every=100", "train.ckpt_every=100",
                         f"hydra.run.dir={run_dir}"], check=False)
    err = _error(proc)
    assert "training stopped" in err and ("loss is nan" in err or "loss is inf" in err)
    last = torch.load(run_dir / "last.pt", map_location="cpu", weights_only=True)
    assert f"iteration {last['iteration'] + 1}" in err
    assert all(torch.isfinite(v).all() for v in last["model"].values() if v.is_floating_point())


def test_checkpoint_of_another_class_count_is_a_clear_error(tmp_path, train):
    run_dir = tmp_path / "r"
    train(TINY + ["train.iters=1", "train.val_every=100", f"hydra.run.dir={run_dir}"])
    ckpt = load_training(run_dir / "last.pt")
    model = Segmentor(create_backbone("resnest14", output_stride=8), num_classes=5, channels=16)
    with pytest.raises(CheckpointError) as err:
        restore_model(model, ckpt["model"], run_dir / "last.pt", ckpt["config"], "resnest14", 5)
    assert "shape mismatch" in str(err.value) and "head.classifier.weight (7, 16, 1, 1) vs (5, 16, 1, 1)" in str(err.value)
    assert "trained with backbone=resnest14 and 7 classes; this run has backbone=resnest14 and 5 classes" in str(err.value)


def test_resume_auto_starts_fresh_then_continues(tmp_path, train):
    args = TINY + ["train.iters=2", "train.val_every=100", "resume=auto", f"hydra.run.dir={tmp_path / 'r'}"]
    train(args)
    first = (tmp_path / "r" / "last.pt").stat().st_mtime_ns
    proc = train(args)  # already complete: nothing to train, nothing rewritten
    assert '"iter": 2' in proc.stdout and (tmp_path / "r" / "last.pt").stat().st_mtime_ns == first


def test_folder_dataset_takes_its_class_count_from_classes_yaml(tmp_path, train):
    root = make_folder(tmp_path / "mine", counts={"train": 8, "val": 2}, size=(32, 32))
    folder = [a for a in TINY if "dataset" not in a] + [
        "dataset=folder", f"dataset.root={root}", "dataset.base_size=32", "dataset.crop_size=32",
        "train.iters=1", "train.val_every=100", f"hydra.run.dir={tmp_path / 'r'}"]
    train(folder)
    last = torch.load(tmp_path / "r" / "last.pt", map_location="cpu", weights_only=True)
    assert last["config"]["dataset"]["num_classes"] == 3 and last["model"]["head.classifier.weight"].shape[0] == 3


def test_bf16_autocast_and_channels_last_train(tmp_path, train):
    train(TINY + ["train.iters=2", "train.amp=bf16", "train.channels_last=true", "train.val_every=2",
                  f"hydra.run.dir={tmp_path / 'r'}"])
    assert all(r["loss"] > 0 for r in records(tmp_path / "r", "train"))
    assert records(tmp_path / "r", "val")[0]["mIoU"] >= 0


def test_recomputation_trains_to_the_same_weights(tmp_path, train):
    # Dropout on too (TINY turns it off): the recomputation must redraw the same masks.
    common = TINY + ["train.iters=2", "train.val_every=100", "model.dropout=0.1", "model.aspp_dropout=0.5"]
    train(common + [f"hydra.run.dir={tmp_path / 'plain'}"])
    plain = model_state(tmp_path / "plain" / "last.pt")
    for option in ("train.grad_checkpointing=true", "train.selective_recompute=true"):
        out = tmp_path / option.split(".")[1].split("=")[0]
        train(common + [option, f"hydra.run.dir={out}"])
        recomputed = model_state(out / "last.pt")
        assert plain.keys() == recomputed.keys()
        for k in plain:  # weights and BatchNorm statistics alike
            assert torch.equal(plain[k], recomputed[k]), (option, k)


def test_pascal_context_prepared_from_detail_json_trains(tmp_path, train):
    from data_helpers import make_pascal_context
    from segkit.data import prepare
    root = tmp_path / "pascal_context"
    make_pascal_context(root, {"train": 4, "val": 1}, size=(32, 32))
    assert prepare.main(["pascal_context", "--root", str(root), "--expect-counts", "4,1", "--workers", "1"]) == 0
    args = [a for a in TINY if "dataset" not in a] + [
        "dataset=pascal_context", f"dataset.root={root}", "dataset.base_size=32", "dataset.crop_size=32",
        "train.iters=2", "train.val_every=2", f"hydra.run.dir={tmp_path / 'r'}"]
    train(args)
    last = torch.load(tmp_path / "r" / "last.pt", map_location="cpu", weights_only=True)
    assert last["config"]["dataset"]["name"] == "pascal_context"
    assert last["model"]["head.classifier.weight"].shape[0] == 59  # background is ignored, not a class
    assert [r["iter"] for r in records(tmp_path / "r", "val")] == [2]
