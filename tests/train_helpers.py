"""Running train_seg.py on a tiny demo set in a subprocess, as a user would."""
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]

# Small enough for seconds on 2 cores: 32 px crops, a narrow head, no dropout (so runs with
# different process layouts draw no random masks and stay comparable).
TINY = ["dataset=demo", "backbone=resnest14", "backbone.pretrained=null", "dataset.base_size=32",
        "dataset.crop_size=32", "++dataset.image_size=32", "++dataset.num_train=16", "++dataset.num_val=2",
        "model.channels=16", "model.aspp_dropout=0", "model.dropout=0", "model.aux_dropout=0",
        "train.batch_size=4", "train.workers=0", "train.progress=false", "train.log_every=1"]


def env(data_root: Path, threads: int = 1) -> dict:
    return {**os.environ, "SEGKIT_DATA": str(data_root), "OMP_NUM_THREADS": str(threads),
            "NO_ALBUMENTATIONS_UPDATE": "1", "PYTHONUNBUFFERED": "1"}


def run(args: list[str], data_root: Path, nproc: int = 1, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
                if nproc > 1 else [sys.executable])
    proc = subprocess.run(launcher + [str(ROOT / "train_seg.py"), *args], cwd=ROOT, env=env(data_root),
                          capture_output=True, text=True, timeout=300, **kwargs)
    if check and proc.returncode != 0:
        raise AssertionError(f"train_seg.py failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def model_state(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


def records(run_dir: Path, split: str) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r.get("split", "train") == split]


def run_eval(args: list[str], data_root: Path, check: bool = True) -> subprocess.CompletedProcess:
    """eval_seg.py in a subprocess, quietly and without workers."""
    proc = subprocess.run([sys.executable, str(ROOT / "eval_seg.py"), "eval.progress=false", "eval.workers=0", *args],
                          cwd=ROOT, env=env(data_root), capture_output=True, text=True, timeout=300)
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc
