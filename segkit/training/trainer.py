"""Training: one process, one GPU, or many under torchrun (DDP), with exact resume.

:func:`build_training` turns the typed settings into the parts of a run (datasets, model,
optimizer, schedule, loss, the checkpoint to continue from); :class:`Trainer` runs the loop.
Every rank runs both; rank 0 alone owns and writes the run directory (``config.yaml``, ``last.pt``,
``best.pt``, ``metrics.jsonl``, TensorBoard events) and shows progress. ``train.batch_size`` is the
total over ranks and accumulation steps; each step sees the same samples, with the same
augmentations, whatever the process layout (see :mod:`segkit.training.sampler`).
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from omegaconf import OmegaConf
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

from segkit import distributed
from segkit.checkpoints import checkpoint
from segkit.checkpoints.load import load_model
from segkit.data import build_dataset, train_transform
from segkit.data.base import SegmentationDataset
from segkit.data.label_space import LabelSpace
from segkit.distributed import Env, all_reduce, setup_distributed
from segkit.errors import CheckpointError, ConfigError, OutOfResources, SegkitError
from segkit.evaluation.loop import evaluate
from segkit.heap import keep_freed_memory
from segkit.inference.masks import comparison
from segkit.inference.options import AUTOCAST_DTYPES, InferenceOptions
from segkit.models.segmentor import Segmentor, build_segmentor
from segkit.settings import TrainJob, as_dict, check_world_size
from segkit.training import resources
from segkit.training.interrupt import Interrupted, StopSignals
from segkit.training.losses import Ohem, SegmentationLoss, auto_class_weights
from segkit.training.optim import build_optimizer, build_scheduler
from segkit.training.run_dir import RunLock, RunRecords, take_run_dir
from segkit.training.sampler import IterationBatchSampler, SeededSamples


class TrainingDiverged(SegkitError):
    """The loss became NaN or infinite."""


def resolve_resume(resume: Any, run_dir: Path) -> Path | None:
    """The checkpoint to continue from, or None for a fresh run.

    ``resume``: null/false = fresh run, true = ``last.pt`` of this run directory, ``auto`` = that
    file if it exists (so does ``latest``, whose run directory is the newest run of the experiment,
    see :mod:`segkit.cli`), else a path.
    """
    last = run_dir / "last.pt"
    if resume in (None, False):
        return None
    if resume in ("auto", "latest"):
        return last if last.exists() else None
    return last if resume is True else Path(str(resume)).expanduser()


def _unwrap(model: nn.Module) -> Segmentor:
    model = model.module if isinstance(model, DistributedDataParallel) else model
    return getattr(model, "_orig_mod", model)  # torch.compile wrapper


def _rng_states(env: Env) -> list[dict[str, torch.Tensor]]:
    """Every rank's torch RNG state (dropout), gathered so a resumed run continues each stream."""
    state = {"cpu": torch.get_rng_state()}
    if env.device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(env.device)
    if env.world_size == 1:
        return [state]
    gathered: list[Any] = [None] * env.world_size
    dist.all_gather_object(gathered, state)
    return gathered


@dataclass
class TrainingParts:
    """What :func:`build_training` builds and :class:`Trainer` runs."""

    job: TrainJob  # with the class count resolved from the data
    env: Env
    train_set: SegmentationDataset
    val_set: SegmentationDataset
    model: nn.Module  # DDP-wrapped and compiled as configured
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    criterion: SegmentationLoss
    total_iters: int
    iters_per_epoch: int
    start_iter: int = 0
    best_miou: float = -1.0


def _restore_training_state(parts: TrainingParts, ckpt: dict[str, Any], path: Path) -> None:
    if ckpt["iteration"] > parts.total_iters:
        raise CheckpointError(f"{path} is at iteration {ckpt['iteration']}, past this run's "
                              f"{parts.total_iters} iterations")
    try:
        parts.optimizer.load_state_dict(ckpt["optimizer"])
        parts.scheduler.load_state_dict(ckpt["scheduler"])
        parts.scaler.load_state_dict(ckpt["scaler"])
    except (KeyError, ValueError) as e:
        raise CheckpointError(f"{path}: optimizer/scheduler state does not fit this run ({e})") from e
    parts.start_iter, parts.best_miou = ckpt["iteration"], ckpt.get("best_miou", -1.0)
    states, env = ckpt.get("rng", []), parts.env
    if len(states) == env.world_size:  # a different layout cannot continue the same streams
        torch.set_rng_state(states[env.rank]["cpu"])
        if "cuda" in states[env.rank] and env.device.type == "cuda":
            torch.cuda.set_rng_state(states[env.rank]["cuda"], env.device)


def _resolve_class_weights(job: TrainJob, train_set: SegmentationDataset, ckpt: dict[str, Any] | None) -> TrainJob:
    """``class_weights=auto`` becomes the weights themselves (computed once from the training masks,
    or those of the checkpoint being resumed), so config.yaml and every checkpoint record them."""
    loss = job.model.loss
    if loss.class_weights != "auto":
        return job
    saved = (ckpt or {}).get("config", {}).get("model", {}).get("loss", {}).get("class_weights")
    weights = saved if isinstance(saved, list) else auto_class_weights(
        train_set, loss.balance, num_workers=job.train.workers, progress=distributed.is_main_process() and job.train.progress)
    return dataclasses.replace(job, model=dataclasses.replace(
        job.model, loss=dataclasses.replace(loss, class_weights=[float(w) for w in weights])))


def _build_loss(job: TrainJob, ignore_index: int) -> SegmentationLoss:
    loss = job.model.loss
    ohem = Ohem(loss.ohem.thresh, loss.ohem.min_kept) if loss.ohem is not None else None
    return SegmentationLoss(loss.aux_weight, ignore_index, loss.extra, class_weights=loss.class_weights,
                            ohem=ohem, num_classes=job.dataset.num_classes, align_corners=job.model.align_corners)


def build_training(job: TrainJob, run_dir: Path) -> TrainingParts:
    """Join the process group and build everything a run needs, reading the checkpoint to resume
    from first, so that a bad one stops the run before anything is written."""
    t = job.train
    env = setup_distributed(t.device)
    if t.keep_freed_memory and env.device.type == "cpu":
        keep_freed_memory()
    check_world_size(t, env.world_size)
    resume_path = resolve_resume(job.resume, run_dir)
    ckpt = checkpoint.load_training(resume_path) if resume_path else None

    train_set = build_dataset(job.dataset, "train", train_transform(job.dataset))
    val_set = build_dataset(job.dataset, "val")
    if job.dataset.num_classes is None:  # a folder dataset's classes come from its classes.yaml
        job = dataclasses.replace(job, dataset=dataclasses.replace(job.dataset, num_classes=train_set.num_classes))
    iters_per_epoch = len(train_set) // t.batch_size
    if iters_per_epoch == 0:
        raise ConfigError(f"train.batch_size={t.batch_size} exceeds the {len(train_set)} images of "
                          f"split {job.dataset.train_split!r}")
    total_iters = t.iters or t.epochs * iters_per_epoch

    torch.manual_seed(t.seed)  # identical initial weights on every rank
    job = _resolve_class_weights(job, train_set, ckpt)
    init = job.model.init if ckpt is None else None  # a resumed run continues from its own weights
    # ImageNet weights only for a run that starts from nothing else.
    model = build_segmentor(job.backbone, job.model, job.dataset.num_classes, load_weights=ckpt is None and not init)
    model.set_grad_checkpointing(t.grad_checkpointing)
    model.set_selective_recompute(t.selective_recompute)
    if ckpt is not None:
        checkpoint.restore_model(model, ckpt["model"], resume_path, ckpt.get("config"), job.backbone.name,
                                 job.dataset.num_classes)
    elif init:
        line = checkpoint.init_from(model, load_model(init), init, job.backbone.name)
        if distributed.is_main_process():
            print(line, flush=True)
    if env.device.type == "cuda" and env.world_size > 1 and t.sync_bn:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model.to(env.device, memory_format=torch.channels_last if t.channels_last else torch.contiguous_format)
    optimizer = build_optimizer(model, job.optim, t.batch_size)
    amp_dtype = AUTOCAST_DTYPES.get(t.amp)
    parts = TrainingParts(
        job=job, env=env, train_set=train_set, val_set=val_set, model=model, optimizer=optimizer,
        scheduler=build_scheduler(optimizer, job.schedule, total_iters),
        scaler=torch.amp.GradScaler(env.device.type, enabled=amp_dtype == torch.float16),
        criterion=_build_loss(job, train_set.ignore_index),
        total_iters=total_iters, iters_per_epoch=iters_per_epoch)
    torch.manual_seed(t.seed + env.rank)  # dropout streams differ across ranks
    if ckpt is not None:
        _restore_training_state(parts, ckpt, resume_path)
    if env.world_size > 1:
        model = DistributedDataParallel(model, device_ids=[env.device.index] if env.device.type == "cuda" else None)
    parts.model = torch.compile(model) if t.compile else model
    return parts


class Trainer:
    """The training loop over :class:`TrainingParts`, writing into ``run_dir`` (rank 0)."""

    def __init__(self, parts: TrainingParts, run_dir: Path) -> None:
        self.parts, self.run_dir = parts, Path(run_dir)
        self.job, self.env, self.model = parts.job, parts.env, parts.model
        self.memory_format = torch.channels_last if self.job.train.channels_last else torch.contiguous_format
        self.amp_dtype = AUTOCAST_DTYPES.get(self.job.train.amp)
        # Validation: each image whole at one scale (crop windows past train.val_max_size), as trained.
        self.val_options = InferenceOptions(max_size=self.job.train.val_max_size, amp=self.job.train.amp)
        self.is_main = distributed.is_main_process()
        self.lock: RunLock | None = None
        self.records: RunRecords | None = None
        # Written into every checkpoint, so that it predicts without the dataset.
        self.label_space = LabelSpace.from_dataset(parts.val_set, self.job.dataset)
        self.stop = StopSignals()
        # The iteration run_dir/last.pt holds, for the messages that send the user back to it.
        resumed_from = resolve_resume(self.job.resume, self.run_dir)
        self.last_saved = parts.start_iter if resumed_from == self.run_dir / "last.pt" else None

    def _open_run_dir(self) -> None:
        """Rank 0 takes the directory; every rank learns whether it could."""
        error: SegkitError | None = None
        if self.is_main:
            try:
                resuming = resolve_resume(self.job.resume, self.run_dir) is not None
                self.lock = take_run_dir(self.run_dir, resuming)
            except SegkitError as e:
                error = e
        failed = all_reduce(torch.tensor([error is not None], dtype=torch.int32, device=self.env.device))
        if error is not None:
            raise error
        if failed.item():
            raise ConfigError(f"rank 0 could not take the run directory {self.run_dir}")
        if self.is_main:
            yaml = OmegaConf.to_yaml(OmegaConf.create(self.config))
            self.records = RunRecords(self.run_dir, yaml, self.parts.start_iter)

    @property
    def config(self) -> dict[str, Any]:
        """The run's settings as plain containers, as checkpoints and ``config.yaml`` hold them."""
        return as_dict(self.job)

    # -- records -------------------------------------------------------------------------------
    def save(self, iteration: int) -> None:
        rng = _rng_states(self.env)  # a collective: every rank takes part
        if self.is_main:
            p = self.parts
            checkpoint.save(checkpoint.training_record(
                _unwrap(self.model).state_dict(), iteration, self.config, optimizer=p.optimizer.state_dict(),
                scheduler=p.scheduler.state_dict(), scaler=p.scaler.state_dict(), best_miou=p.best_miou, rng=rng,
                label_space=self.label_space),
                self.run_dir / "last.pt")
        self.last_saved = iteration

    def log(self, record: dict[str, Any]) -> None:
        if self.records is not None:
            self.records.log(record)

    def validate(self, iteration: int) -> dict[str, Any]:
        t, d = self.job.train, self.job.dataset
        shown: list[np.ndarray] = []
        palette = self.parts.val_set.palette

        def keep_pictures(index: int, image: np.ndarray, mask: np.ndarray | None, pred: np.ndarray) -> None:
            # The first images of rank 0's shard: the same ones at every validation.
            if self.records is not None and len(shown) < t.val_images:
                shown.append(comparison(image, pred, mask, palette))

        metrics = evaluate(_unwrap(self.model), self.parts.val_set, self.val_options, preprocess=d.preprocess,
                           convention=d.miou_convention, pad_multiple=self.job.backbone.output_stride,
                           crop_size=d.crop_size, device=self.env.device, num_workers=t.workers,
                           progress=self.is_main and t.progress, callback=keep_pictures)
        summary = {k: metrics[k] for k in ("pixAcc", "mIoU")}
        self.log({"split": "val", "iter": iteration, **summary})
        if self.records is not None:
            self.records.add_images("val", shown, iteration)
            self.records.say(f"iter {iteration}: val pixAcc {summary['pixAcc']:.4f} mIoU {summary['mIoU']:.4f}")
        if metrics["mIoU"] > self.parts.best_miou:
            self.parts.best_miou = metrics["mIoU"]
            if self.is_main:
                checkpoint.save(checkpoint.model_record(_unwrap(self.model).state_dict(), iteration, self.config,
                                                        summary, label_space=self.label_space),
                                self.run_dir / "best.pt")
        return summary

    # -- the loop ------------------------------------------------------------------------------
    def _loader(self) -> DataLoader:
        t, env, p = self.job.train, self.env, self.parts
        sampler = IterationBatchSampler(len(p.train_set), t.batch_size, p.total_iters, env.world_size,
                                        env.rank, t.accum_steps, t.seed, p.start_iter)
        # Its own generator: creating the iterator must not draw from the global (dropout) RNG, or a
        # resumed run would continue a different stream than the uninterrupted one.
        return DataLoader(SeededSamples(p.train_set, t.seed), batch_sampler=sampler, num_workers=t.workers,
                          pin_memory=env.device.type == "cuda", generator=torch.Generator().manual_seed(t.seed))

    def _diverged(self, iteration: int, loss: float, good_buffers: list[torch.Tensor]) -> TrainingDiverged:
        # Parameters are still those after `iteration` good steps (this step was not applied), but
        # this step's forward already moved the BN running statistics: put them back first.
        for buf, good in zip(_unwrap(self.model).buffers(), good_buffers):
            buf.copy_(good)
        self.save(iteration)
        return TrainingDiverged(
            f"loss is {loss} at iteration {iteration + 1}: training stopped. The last good state "
            f"(iteration {iteration}) is saved in {self.run_dir / 'last.pt'}; lower optim.base_lr "
            f"(or use train.amp=bf16 instead of fp16) and continue with resume={self.run_dir / 'last.pt'}")

    # -- stopping ------------------------------------------------------------------------------
    def _stop_flag(self) -> torch.Tensor:
        return torch.full((), float(self.stop.requested), device=self.env.device)

    def _agree_to_stop(self) -> bool:
        """Whether any rank was asked to stop (a collective: every rank calls it at the same point)."""
        return all_reduce(self._stop_flag()).item() > 0

    def _interrupted(self, iteration: int, saved: bool) -> Interrupted:
        """Every rank stops after ``iteration``: write last.pt (unless just written), then wait for
        rank 0 to finish it, so that no rank's exit makes the launcher stop the others mid-write."""
        if not saved:
            self.save(iteration)
        distributed.barrier()
        note = self.stop.chain()  # SLURM: requeue now that last.pt is written
        return Interrupted(self.stop.signum, iteration, self.parts.total_iters, self.run_dir / "last.pt", note)

    def _on_disk(self) -> str:
        return resources.checkpoint_state(self.run_dir, self.last_saved, self.job.train.ckpt_every)

    def fit(self) -> dict[str, Any]:
        self._open_run_dir()
        self.stop = StopSignals(announce=self.is_main, forced=self._on_disk,
                                failed_status=2 if self.env.world_size > 1 else None)
        try:
            with self.stop:
                return self._fit()
        except Exception as e:
            message = resources.explain(e, self.job, self.run_dir, self.last_saved)
            if message is None:
                raise
            raise OutOfResources(message) from e
        finally:
            if self.records is not None:
                self.records.close()
            if self.lock is not None:
                self.lock.release()

    def _fit(self) -> dict[str, Any]:
        t, env, p = self.job.train, self.env, self.parts
        val_every = t.val_every or max(1, p.total_iters // 10)
        autocast = torch.autocast(env.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None)
        model, it, summary = self.model, p.start_iter, {}
        model.train()
        data = iter(self._loader())
        bar = tqdm(total=p.total_iters, initial=it, disable=not (self.is_main and t.progress),
                   dynamic_ncols=True, desc="train")
        window_start, window_images = time.perf_counter(), 0
        while it < p.total_iters:
            good_buffers = [b.detach().clone() for b in _unwrap(model).buffers()]
            p.optimizer.zero_grad(set_to_none=True)
            total = torch.zeros((), device=env.device)
            parts_sum: dict[str, torch.Tensor] = {}
            for a in range(t.accum_steps):
                images, masks = next(data)
                images = images.to(env.device, non_blocking=True, memory_format=self.memory_format)
                masks = masks.to(env.device, non_blocking=True)
                sync = a == t.accum_steps - 1 or not isinstance(model, DistributedDataParallel)
                with contextlib.nullcontext() if sync else model.no_sync():
                    with autocast:
                        loss, parts = p.criterion(model(images), masks)
                    p.scaler.scale(loss / t.accum_steps).backward()
                total += loss.detach() / t.accum_steps
                for k, v in parts.items():
                    parts_sum[k] = parts_sum.get(k, 0.0) + v / t.accum_steps
            # Every rank must agree to stop, or the others would hang in the next collective: one
            # all_reduce carries the loss and whether any rank was asked to stop (a signal).
            mean_loss, stop_votes = all_reduce(torch.stack([total, self._stop_flag()]), average=True).tolist()
            stop = stop_votes > 0
            if not math.isfinite(mean_loss):
                bar.close()
                raise self._diverged(it, mean_loss, good_buffers)
            p.scaler.step(p.optimizer)
            p.scaler.update()
            p.scheduler.step()
            it += 1
            window_images += t.batch_size
            bar.update(1)
            if it % t.log_every == 0 or it == p.total_iters:
                seconds = time.perf_counter() - window_start
                losses = {k: float(v) for k, v in parts_sum.items()}  # host sync only when logging
                record = {"iter": it, "epoch": it / p.iters_per_epoch, "loss": mean_loss, **losses,
                          "lr": p.optimizer.param_groups[0]["lr"], "img_per_s": window_images / seconds}
                bar.set_postfix(loss=f"{mean_loss:.3f}", lr=f"{record['lr']:.2e}", img_s=f"{record['img_per_s']:.1f}")
                self.log(record)
                window_start, window_images = time.perf_counter(), 0
            if it % val_every == 0 or it == p.total_iters:
                summary = self.validate(it)
                stop = stop or self._agree_to_stop()  # a signal during validation: stop now, not a step later
            if it % t.ckpt_every == 0 or it == p.total_iters:
                self.save(it)
            if stop and it < p.total_iters:
                bar.close()
                raise self._interrupted(it, saved=it % t.ckpt_every == 0)
        bar.close()
        result = {"iter": it, "best_mIoU": p.best_miou, **{f"val_{k}": v for k, v in summary.items()}}
        self.log({"split": "final", **result})
        best = self.run_dir / "best.pt"
        if self.records is not None and best.exists():
            self.records.say(f"best checkpoint: {best} (val mIoU {p.best_miou:.4f}); evaluate it (multi-scale + flip) "
                             f"with: segkit-eval checkpoint={best}")
        return result


def train(job: TrainJob, run_dir: Path) -> dict[str, Any]:
    """Run (or resume) the training described by ``job``; returns the final summary."""
    return Trainer(build_training(job, run_dir), run_dir).fit()
