"""eval_seg.py's work: rebuild the model from a checkpoint, evaluate, print and record, export masks."""
from __future__ import annotations

import hashlib
import json
import math
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from segkit.checkpoint import load_file
from segkit.data import build_dataset
from segkit.data.predict import image_folder
from segkit.engine.inference import evaluate, prepare_model
from segkit.engine.distributed import setup_distributed
from segkit.errors import ConfigError
from segkit.export import MaskExporter
from segkit.metrics import format_table
from segkit.models.convert import convert_encoding_state_dict, is_encoding_state_dict
from segkit.models.pretrained import load_into, unwrap_state_dict
from segkit.models.segmentor import build_segmentor

# Config nodes a segkit checkpoint carries and that rebuild its model and dataset.
CHECKPOINT_GROUPS = ("dataset", "backbone", "model")


def read_checkpoint(path: Path) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """(segkit-keyed state dict, the checkpoint's resolved config or None for a bare state dict)."""
    obj = load_file(path)
    if isinstance(obj, dict) and "model" in obj and "config" in obj:
        return obj["model"], obj["config"]
    state = unwrap_state_dict(obj, str(path))
    return (convert_encoding_state_dict(state) if is_encoding_state_dict(state) else state), None


def merge_checkpoint_config(cfg: DictConfig, saved: dict[str, Any] | None, overrides: list[str]) -> DictConfig:
    """The checkpoint's dataset/backbone/model nodes, with the command line's choices on top.

    A group picked on the command line (``dataset=cityscapes``) replaces the checkpoint's node; a
    key set there (``dataset.root=/data``) wins over both.
    """
    if saved is None:
        return cfg
    picked = {o.lstrip("+~").split("=", 1)[0] for o in overrides}
    keys = [o.lstrip("+") for o in overrides if "." in o.split("=", 1)[0]
            and o.lstrip("+").split(".", 1)[0] in CHECKPOINT_GROUPS]
    merged = cfg.copy()
    OmegaConf.set_struct(merged, False)  # the checkpoint's nodes may hold keys the defaults lack
    for group in CHECKPOINT_GROUPS:
        if group in saved and group not in picked:
            merged[group] = saved[group]
    return OmegaConf.merge(merged, OmegaConf.from_dotlist(keys))


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _finite(value: float) -> float | None:
    return None if isinstance(value, float) and math.isnan(value) else value


def metrics_record(metrics: dict[str, Any], classes: list[str], cfg: DictConfig, checkpoint: Path,
                   seconds: float) -> dict[str, Any]:
    """What metrics.json holds (NaN, a class that never occurs, as null)."""
    summary = {k: _finite(float(metrics[k])) for k in ("pixAcc", "mIoU", "mIoU_all", "mIoU_present", "mAcc", "fwIoU")}
    return {
        **summary, "convention": metrics["convention"],
        "IoU": {c: _finite(float(v)) for c, v in zip(classes, metrics["IoU"])},
        "acc": {c: _finite(float(v)) for c, v in zip(classes, metrics["acc"])},
        "dataset": cfg.dataset.name, "split": cfg.eval.split, "backbone": cfg.backbone.name,
        "scales": OmegaConf.to_container(cfg.eval.scales) if cfg.eval.scales is not None else None,
        "flip": cfg.eval.flip, "checkpoint": str(checkpoint), "checkpoint_sha256": _sha256(checkpoint),
        "num_images": metrics["num_images"], "seconds": seconds,
        "images_per_s": metrics["num_images"] / seconds if seconds > 0 else None,
    }


def run_evaluation(cfg: DictConfig, run_dir: Path, overrides: list[str]) -> dict[str, Any] | None:
    """Evaluate ``cfg.checkpoint``; returns the metrics record (None in prediction mode)."""
    ckpt_path = Path(cfg.checkpoint).expanduser()
    state, saved = read_checkpoint(ckpt_path)
    cfg = merge_checkpoint_config(cfg, saved, overrides)
    OmegaConf.resolve(cfg)
    env = setup_distributed(cfg.eval.device)

    predict = cfg.predict.input is not None
    if predict and not cfg.export.dir:
        raise ConfigError("predict.input needs export.dir=DIR: predictions are only written as files")
    dataset = (image_folder(cfg.dataset, cfg.predict.input) if predict
               else build_dataset(cfg.dataset, cfg.eval.split))
    model = build_segmentor(cfg.backbone, cfg.model, dataset.num_classes, load_weights=False)
    hint = ("  hint: pass the dataset and backbone the checkpoint was trained with "
            "(dataset=... backbone=...); segkit checkpoints carry them" if saved is None else
            f"  hint: the checkpoint was trained with backbone={saved['backbone']['name']} and "
            f"{saved['dataset']['num_classes']} classes")
    load_into(model, state, str(ckpt_path), hint)
    model = prepare_model(model, env.device, channels_last=cfg.eval.channels_last, fold_bn=cfg.eval.fold_bn,
                          compile=cfg.eval.compile)

    exporter = (MaskExporter(cfg.export.dir, dataset, overwrite=cfg.export.overwrite, overlay=cfg.export.overlay,
                             side_by_side=cfg.export.side_by_side) if cfg.export.dir else None)
    d = cfg.dataset
    scales = list(cfg.eval.scales) if cfg.eval.scales is not None else None
    started = time.perf_counter()
    metrics = evaluate(model, dataset, scales=scales, flip=cfg.eval.flip, base_size=d.base_size,
                       crop_size=d.crop_size, mean=d.mean, std=d.std, convention=cfg.eval.convention,
                       pad_multiple=cfg.backbone.output_stride, max_batch=cfg.eval.max_batch,
                       autocast=cfg.eval.amp, device=env.device, num_workers=cfg.eval.workers,
                       progress=env.rank == 0 and cfg.eval.progress, callback=exporter)
    seconds = time.perf_counter() - started
    if env.rank != 0:
        return None
    if predict:
        print(f"wrote predictions of {metrics['num_images']} images to {cfg.export.dir}")
        return None
    print(format_table(metrics, dataset.classes))
    record = metrics_record(metrics, dataset.classes, cfg, ckpt_path, seconds)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "metrics.json").write_text(json.dumps(record, indent=2))
    print(f"metrics written to {run_dir / 'metrics.json'}")
    return record
