"""eval_seg.py's work: rebuild the model from a checkpoint, evaluate, print and record, export masks."""
from __future__ import annotations

import hashlib
import json
import math
import time
from pathlib import Path
from typing import Any

from segkit import distributed
from segkit.checkpoint import ModelCheckpoint, restore_model
from segkit.config import EvalJob
from segkit.data import build_dataset
from segkit.data.predict import image_folder
from segkit.distributed import setup_distributed
from segkit.engine.inference import evaluate, prepare_model
from segkit.errors import ConfigError
from segkit.export import MaskExporter
from segkit.files import write_text_atomic
from segkit.metrics import format_table
from segkit.models.segmentor import build_segmentor


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _finite(value: float) -> float | None:
    return None if isinstance(value, float) and math.isnan(value) else value


def metrics_record(metrics: dict[str, Any], classes: list[str], job: EvalJob, checkpoint: Path,
                   seconds: float) -> dict[str, Any]:
    """What metrics.json holds (NaN, a class that never occurs, as null)."""
    summary = {k: _finite(float(metrics[k])) for k in ("pixAcc", "mIoU", "mIoU_all", "mIoU_present", "mAcc", "fwIoU")}
    return {
        **summary, "convention": metrics["convention"],
        "IoU": {c: _finite(float(v)) for c, v in zip(classes, metrics["IoU"])},
        "acc": {c: _finite(float(v)) for c, v in zip(classes, metrics["acc"])},
        "dataset": job.dataset.name, "split": job.eval.split, "backbone": job.backbone.name,
        "scales": job.eval.scales, "flip": job.eval.flip, "checkpoint": str(checkpoint),
        "checkpoint_sha256": _sha256(checkpoint), "num_images": metrics["num_images"], "seconds": seconds,
        "images_per_s": metrics["num_images"] / seconds if seconds > 0 else None,
    }


def run_evaluation(job: EvalJob, ckpt: ModelCheckpoint, run_dir: Path) -> dict[str, Any] | None:
    """Evaluate ``ckpt`` as ``job`` says; returns the metrics record (None in prediction mode and on
    ranks other than 0)."""
    env = setup_distributed(job.eval.device, key="eval.device")
    predict = job.predict.input is not None
    metrics_path = run_dir / "metrics.json"
    if not predict and metrics_path.exists():  # refused now, not after the whole evaluation
        raise ConfigError(f"{metrics_path} holds an earlier evaluation; pick another hydra.run.dir")
    dataset = (image_folder(job.dataset, job.predict.input) if predict
               else build_dataset(job.dataset, job.eval.split))
    model = build_segmentor(job.backbone, job.model, dataset.num_classes, load_weights=False)
    restore_model(model, ckpt.state, ckpt.path, ckpt.config, job.backbone.name, dataset.num_classes)
    e = job.eval
    model = prepare_model(model, env.device, channels_last=e.channels_last, fold_bn=e.fold_bn, dtype=e.dtype,
                          compile=e.compile)

    x = job.export
    exporter = (MaskExporter(x.dir, dataset, overwrite=x.overwrite, overlay=x.overlay, side_by_side=x.side_by_side)
                if x.dir else None)
    d = job.dataset
    started = time.perf_counter()
    metrics = evaluate(model, dataset, scales=e.scales, flip=e.flip, base_size=d.base_size,
                       crop_size=d.crop_size, preprocess=d.preprocess, convention=d.miou_convention,
                       pad_multiple=job.backbone.output_stride, max_batch=e.max_batch, autocast=e.amp,
                       device=env.device, num_workers=e.workers,
                       progress=distributed.is_main_process() and e.progress, callback=exporter)
    seconds = time.perf_counter() - started
    if not distributed.is_main_process():
        return None
    if predict:
        print(f"wrote predictions of {metrics['num_images']} images to {x.dir}")
        return None
    print(format_table(metrics, dataset.classes))
    record = metrics_record(metrics, dataset.classes, job, ckpt.path, seconds)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(metrics_path, json.dumps(record, indent=2))
    print(f"metrics written to {metrics_path}")
    return record
