"""In-process runs on composed configs (no subprocess): training, evaluation, what a run directory
holds for people (train.log, TensorBoard pictures), bounded validation memory, and that DDP
replicas stay identical."""
import socket
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from config_helpers import compose_cfg, eval_settings, train_settings
from segkit.checkpoints.load import load_model
from segkit.evaluation.evaluator import run_evaluation
from segkit.config import inference_options
from segkit.training.trainer import Trainer, build_training, train
from train_helpers import TINY, records


@pytest.fixture(autouse=True)
def data_root(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("SEGKIT_DATA", str(tmp_path_factory.getbasetemp() / "data"))
    torch.set_num_threads(1)


def tiny(*overrides):
    return train_settings(*[a.lstrip("+") for a in TINY], *overrides)


def test_train_then_evaluate_in_process(tmp_path, capsys):
    summary = train(tiny("train.iters=3", "train.val_every=3", "train.val_images=2"), tmp_path / "run")
    assert summary["iter"] == 3 and 0 <= summary["val_mIoU"] <= 1
    log = (tmp_path / "run" / "train.log").read_text()
    assert "iter 3: val pixAcc" in log and f"best checkpoint: {tmp_path / 'run' / 'best.pt'}" in log
    assert f"segkit-eval checkpoint={tmp_path / 'run' / 'best.pt'}" in capsys.readouterr().out

    from tensorboard.backend.event_processing.event_accumulator import IMAGES, EventAccumulator
    events = EventAccumulator(str(tmp_path / "run" / "tb"), size_guidance={IMAGES: 0}).Reload()
    assert sorted(events.Tags()["images"]) == ["val/0", "val/1"]
    picture = events.Images("val/0")[0]
    assert picture.step == 3 and (picture.width, picture.height) == (3 * 32, 32)  # image | prediction | truth

    ckpt = load_model(tmp_path / "run" / "best.pt")
    job = eval_settings("eval.progress=false", "eval.workers=0", "eval.scales=[1.0]", "eval.flip=false",
                        saved=ckpt.config)
    record = run_evaluation(job, inference_options(job), ckpt, tmp_path / "eval")
    assert record["num_images"] == 2 and record["dataset"] == "demo"
    assert record["mIoU"] == pytest.approx(summary["val_mIoU"], abs=0.05)
    with pytest.raises(Exception, match="holds an earlier evaluation"):
        run_evaluation(job, inference_options(job), ckpt, tmp_path / "eval")


def _run_dir_for(*overrides: str) -> Path:
    """hydra.run.dir as train_seg.py resolves it (relative to the working directory)."""
    return Path(compose_cfg("train", *[a.lstrip("+") for a in TINY], *overrides, hydra=True).hydra.run.dir)


def test_resume_latest_continues_the_newest_run_of_the_experiment(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    runs = Path("runs/demo-resnest14")
    first = _run_dir_for("resume=latest")
    assert first.parent == runs and not first.exists()  # no earlier run: a new time-stamped directory

    train(tiny("train.iters=2", "train.val_every=100"), first)
    (runs / "2000-01-01_00-00-00").mkdir()
    (runs / "2000-01-01_00-00-00" / "last.pt").write_bytes(b"an older run")
    (runs / "2999-01-01_00-00-00").mkdir()  # newer, but it never wrote a checkpoint
    assert _run_dir_for("resume=latest") == first
    assert _run_dir_for("resume=latest", "backbone=resnest26").parent == Path("runs/demo-resnest26")
    assert _run_dir_for("resume=null").parent == runs
    assert _run_dir_for("resume=null") not in (first, runs / "2999-01-01_00-00-00")

    # A fresh run would refuse this directory (it holds records), so finishing proves it continued.
    summary = train(tiny("train.iters=4", "train.val_every=100", "resume=latest"), first)
    assert summary["iter"] == 4
    assert [r["iter"] for r in records(first, "train")] == [1, 2, 3, 4]


def test_original_preset_reaches_the_evaluation(tmp_path):
    train(tiny("train.iters=1", "train.val_every=100"), tmp_path / "run")
    ckpt = load_model(tmp_path / "run" / "last.pt")
    job = eval_settings("+eval_preset=original", "eval.progress=false", "eval.workers=0", saved=ckpt.config)
    assert (job.eval.fusion, job.eval.window_placement, job.eval.align_corners, job.eval.flip) == (
        "original", "original", True, True)
    assert job.eval.scales == ckpt.config["dataset"]["eval_scales"]
    record = run_evaluation(job, inference_options(job), ckpt, tmp_path / "eval")
    assert (record["fusion"], record["window_placement"]) == ("original", "original")


class Huge:
    """One 4000 x 3000 image (and mask) in the segkit dataset contract."""

    num_classes, ignore_index = 7, 255

    def __len__(self):
        return 1

    def load(self, index):
        rng = np.random.default_rng(0)
        return (rng.integers(0, 255, (3000, 4000, 3), dtype=np.uint8),
                rng.integers(0, 7, (3000, 4000), dtype=np.uint8))


def _peak_rss_mb(code: str) -> float:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    return float(out.stdout.split()[-1])


MEMORY_PROBE = """
import resource, sys, torch
from torch import nn
sys.path.insert(0, {tests!r})
from test_train_inprocess import Huge
from segkit.evaluation.loop import evaluate
from segkit.inference.options import InferenceOptions
torch.set_num_threads(2)

class Windowed(nn.Module):  # per-pixel scores; refuses anything larger than a 512 x 512 window
    def __init__(self):
        super().__init__()
        self.head = nn.Conv2d(3, 7, 1)

    def forward(self, x):
        assert x.shape[-2] <= 512 and x.shape[-1] <= 512, x.shape
        return {{"out": self.head(x)}}

base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
evaluate(Windowed().eval(), Huge(), InferenceOptions(max_size=2048), crop_size=512, pad_multiple=1, num_workers=0,
         progress=False)
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024)
"""


def test_validation_of_a_4000x3000_image_stays_within_its_memory_bound():
    """The network sees 512 x 512 windows only (it refuses more), and the process grows by less
    than 800 MB: image and mask (48 MB), the normalised image (144 MB), class scores 7 x 3000 x
    4000 x 4 B (336 MB), label maps and one batch of windows. A ResNeSt at stride 8 would need
    several GB per layer for the whole image at once."""
    tests = str(__import__("pathlib").Path(__file__).parent)
    assert _peak_rss_mb(MEMORY_PROBE.format(tests=tests)) < 800


def _worker(rank, world_size, port, run_dir, out):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=120))
    import os
    os.environ["RANK"] = str(rank)
    torch.set_num_threads(1)
    try:
        parts = build_training(tiny("train.iters=2", "train.val_every=100"), run_dir)
        Trainer(parts, run_dir).fit()
        weights = torch.cat([p.detach().flatten() for p in parts.model.module.parameters()])
        torch.save(weights, out / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_ddp_replicas_stay_identical(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_worker, args=(2, port, tmp_path / "run", tmp_path), nprocs=2, join=True)
    assert torch.equal(torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt"))
