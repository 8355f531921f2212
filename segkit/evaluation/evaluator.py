"""eval_seg.py's work: rebuild the model from a checkpoint, evaluate, print and record, export masks;
or (``predict.input=DIR``) predict a folder of images through :class:`~segkit.inference.predictor.Predictor`."""
from __future__ import annotations

import contextlib
import json
import math
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from segkit import distributed
from segkit.checkpoints.checkpoint import ModelCheckpoint, label_space_of
from segkit.checkpoints.release import WEIGHTS
from segkit.data import build_dataset
from segkit.data.predict import image_files
from segkit.distributed import Env, setup_distributed
from segkit.errors import ConfigError, OutOfResources, first_line, is_out_of_memory
from segkit.evaluation.loop import evaluate
from segkit.evaluation.mask_export import MaskExporter, open_export_dir
from segkit.evaluation.metrics import format_table
from segkit.evaluation.report import REPORT_DIR, WorstImages, named_row, write_report
from segkit.files import sha256_file, write_text_atomic
from segkit.heap import keep_freed_memory
from segkit.inference.masks import export_kinds
from segkit.inference.options import InferenceOptions
from segkit.inference.predictor import Predictor
from segkit.inference.prepare import load_network
from segkit.records import read_metrics
from segkit.settings import EvalJob


def _finite(value: float) -> float | None:
    return None if isinstance(value, float) and math.isnan(value) else value


def metrics_record(metrics: dict[str, Any], classes: list[str], job: EvalJob, options: InferenceOptions,
                   checkpoint: Path, seconds: float) -> dict[str, Any]:
    """What metrics.json holds (NaN, a class that never occurs, as null)."""
    summary = {k: _finite(float(metrics[k])) for k in ("pixAcc", "mIoU", "mIoU_all", "mIoU_present", "mAcc", "fwIoU")}
    return {
        **summary, "convention": metrics["convention"],
        "IoU": {c: _finite(float(v)) for c, v in zip(classes, metrics["IoU"])},
        "acc": {c: _finite(float(v)) for c, v in zip(classes, metrics["acc"])},
        "dataset": job.dataset.name, "split": job.eval.split, "backbone": job.backbone.name,
        "scales": None if options.scales is None else list(options.scales), "flip": options.flip,
        "align_corners": options.align_corners, "fusion": options.fusion, "window_placement": options.window_placement,
        "checkpoint": str(checkpoint),
        "checkpoint_sha256": sha256_file(checkpoint / WEIGHTS if checkpoint.is_dir() else checkpoint),  # a release's weights
        "num_images": metrics["num_images"], "seconds": seconds,
        "images_per_s": metrics["num_images"] / seconds if seconds > 0 else None,
        "labelled_pixels": metrics["labelled_pixels"], "ignored_pixels": metrics["ignored_pixels"],
        "confusion": metrics["confusion"],  # rows truth, columns prediction
    }


def device_name(device: torch.device) -> str:
    """The device in words: the GPU's name, or the CPU's model (Linux) and thread count."""
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    model = ""
    with contextlib.suppress(OSError):
        model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                      if line.startswith("model name")), "")
    return f"cpu ({model + ', ' if model else ''}{torch.get_num_threads()} threads)"


def training_curve(checkpoint: Path) -> list[dict[str, Any]] | None:
    """The records of the segkit run ``checkpoint`` lies in (its metrics.jsonl), None without one;
    a damaged file costs the report its curve, not the evaluation."""
    path = checkpoint.parent / "metrics.jsonl"
    if not checkpoint.is_file() or not path.is_file():
        return None
    try:
        return read_metrics(path)
    except (ConfigError, OSError) as e:
        print(f"warning: the report shows no validation curve: {e}", file=sys.stderr)
        return None


def write_per_image(path: Path, rows: list[dict[str, Any]]) -> None:
    write_text_atomic(path, "".join(json.dumps(row) + "\n" for row in rows))


@contextlib.contextmanager
def memory_explained(job: EvalJob, options: InferenceOptions) -> Iterator[None]:
    """An out-of-memory error inside becomes OutOfResources naming the settings that need less
    (as training's :func:`segkit.training.resources.explain`); other errors pass unchanged."""
    try:
        yield
    except Exception as e:
        if not is_out_of_memory(e):
            raise
        scales = "null" if options.scales is None else list(options.scales)
        raise OutOfResources(
            f"out of memory ({first_line(e)}) while predicting: fewer or smaller eval.scales (now {scales}), a "
            f"lower eval.max_size (now {options.max_size}: longer images go through crop windows) or eval.max_batch "
            f"(now {options.max_batch}) need less; eval.amp=bf16 (now {options.amp or 'fp32'}) lowers the "
            f"network's memory; fewer eval.workers (now {job.eval.workers}) frees host memory") from e


def predict_folder(job: EvalJob, options: InferenceOptions, ckpt: ModelCheckpoint, env: Env) -> None:
    """Predict every image below ``predict.input`` into ``export.dir`` (rank r takes images r, r + world,
    ...), in the label space the checkpoint carries (older checkpoints: the configured dataset's)."""
    files = image_files(job.predict.input)
    space = label_space_of(ckpt, job.dataset).configured(job.dataset)
    x = job.export
    out_dir = open_export_dir(x.dir, x.overwrite)
    model = load_network(ckpt, job.backbone, job.model, space.num_classes, env.device, options)
    predictor = Predictor(model, space, device=env.device, output_stride=job.backbone.output_stride, options=options)
    kinds = export_kinds(x.overlay, x.side_by_side)
    names = list(files)[distributed.get_rank()::distributed.get_world_size()]
    for name in tqdm(names, unit="img", desc="predict", dynamic_ncols=True,
                     disable=not (distributed.is_main_process() and job.eval.progress)):
        predictor.predict(files[name]).save(out_dir, kinds, name=name)
    distributed.barrier()
    if distributed.is_main_process():
        print(f"wrote predictions of {len(files)} images to {x.dir}")


def run_evaluation(job: EvalJob, options: InferenceOptions, ckpt: ModelCheckpoint,
                   run_dir: Path) -> dict[str, Any] | None:
    """Evaluate ``ckpt`` as ``job`` says, predicting with ``options`` (the ones ``job.eval`` holds:
    :func:`segkit.config.inference_options`); returns the metrics record (None in prediction
    mode and on ranks other than 0)."""
    env = setup_distributed(job.eval.device, key="eval.device")
    if job.eval.keep_freed_memory and env.device.type == "cpu":
        keep_freed_memory()
    if job.predict.input is not None:
        with memory_explained(job, options):
            predict_folder(job, options, ckpt, env)
        return None
    metrics_path = run_dir / "metrics.json"
    if metrics_path.exists():  # refused now, not after the whole evaluation
        raise ConfigError(f"{metrics_path} holds an earlier evaluation; pick another hydra.run.dir")
    dataset = build_dataset(job.dataset, job.eval.split)
    model = load_network(ckpt, job.backbone, job.model, dataset.num_classes, env.device, options)
    e, x = job.eval, job.export
    exporter = (MaskExporter(x.dir, dataset, overwrite=x.overwrite, overlay=x.overlay, side_by_side=x.side_by_side)
                if x.dir else None)
    d = job.dataset
    worst = WorstImages(e.report_worst, dataset.ignore_index) if e.report else None
    date = time.strftime("%Y-%m-%d %H:%M:%S %z")
    started = time.perf_counter()
    with memory_explained(job, options):
        metrics = evaluate(model, dataset, options, base_size=d.base_size, crop_size=d.crop_size,
                           preprocess=d.preprocess, convention=d.miou_convention,
                           pad_multiple=job.backbone.output_stride, device=env.device, num_workers=e.workers,
                           progress=distributed.is_main_process() and e.progress, callback=exporter,
                           per_image=True, row_callback=worst)
    seconds = time.perf_counter() - started
    kept = worst.gathered() if worst is not None else []  # every rank takes part
    if not distributed.is_main_process():
        return None
    print(format_table(metrics, dataset.classes))
    record = metrics_record(metrics, dataset.classes, job, options, ckpt.path, seconds)
    record.update(date=date, device=device_name(env.device))
    run_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(metrics_path, json.dumps(record, indent=2))
    rows = [named_row(row, dataset.name(row["index"]), dataset.classes) for row in metrics["per_image"]]
    write_per_image(run_dir / "per_image.jsonl", rows)
    print(f"metrics written to {metrics_path}, per-image numbers to {run_dir / 'per_image.jsonl'}")
    if e.report:
        page = write_report(run_dir / REPORT_DIR, record, dataset.classes, dataset.palette,
                            {row["index"]: row for row in rows}, kept, training_curve(Path(ckpt.path)),
                            dataset.ignore_index)
        print(f"report written to {page}")
    return record
