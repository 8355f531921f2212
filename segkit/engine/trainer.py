"""Training loop: one process, one GPU, or many under torchrun (DDP), with exact resume.

Every rank runs this; rank 0 alone writes the run directory (resolved config, ``last.pt``,
``best.pt``, ``metrics.jsonl``, TensorBoard events) and shows progress. ``train.batch_size`` is the
total over ranks and accumulation steps; each step sees the same samples, with the same
augmentations, whatever the process layout (see :mod:`segkit.engine.sampler`).
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

from segkit import __version__
from segkit.checkpoint import load_file, save_atomic
from segkit.data import build_dataset
from segkit.data.transforms import build_train_transform, build_val_transform
from segkit.engine.distributed import Env, all_reduce, setup_distributed
from segkit.engine.inference import AUTOCAST_DTYPES, evaluate
from segkit.engine.optim import build_optimizer, build_scheduler
from segkit.engine.sampler import IterationBatchSampler, SeededSamples
from segkit.errors import CheckpointError, ConfigError, SegkitError
from segkit.losses import build_loss
from segkit.models.pretrained import load_into
from segkit.models.segmentor import Segmentor, build_segmentor

class TrainingDiverged(SegkitError):
    """The loss became NaN or infinite."""


def check_config(cfg: DictConfig, world_size: int) -> None:
    """Reject settings that cannot work, naming the key, the value and what would."""
    t = cfg.train
    per_step = world_size * t.accum_steps
    if t.accum_steps < 1 or t.batch_size < 1 or t.batch_size % per_step:
        raise ConfigError(
            f"train.batch_size={t.batch_size} (the total over all ranks) must be a positive multiple of "
            f"{world_size} ranks x train.accum_steps={t.accum_steps}")
    stride = cfg.backbone.output_stride
    if cfg.dataset.crop_size % stride:
        raise ConfigError(f"dataset.crop_size={cfg.dataset.crop_size} is not a multiple of the backbone "
                          f"output stride {stride}; try {cfg.dataset.crop_size // stride * stride}")
    if t.amp is not None and t.amp not in AUTOCAST_DTYPES:
        raise ConfigError(f"train.amp={t.amp!r}; valid choices: null, {', '.join(AUTOCAST_DTYPES)}")
    if t.iters is not None and t.iters < 1:
        raise ConfigError(f"train.iters={t.iters} must be positive (or null to use the epoch count)")


def resolve_resume(resume: Any, run_dir: Path) -> Path | None:
    """The checkpoint to continue from, or None for a fresh run.

    ``resume``: null/false = fresh run (refused where ``last.pt`` exists: it would be overwritten),
    true = ``last.pt`` of this run directory, ``auto`` = that file if it exists, else a path.
    """
    last = run_dir / "last.pt"
    if resume in (None, False, ""):
        if last.exists():
            raise ConfigError(f"{run_dir} already holds a training checkpoint (last.pt); continue it with "
                              f"resume=true, or pick another hydra.run.dir")
        return None
    if resume == "auto":
        return last if last.exists() else None
    return last if resume is True else Path(str(resume))


def load_training_checkpoint(path: Path) -> dict[str, Any]:
    ckpt = load_file(path)
    if not isinstance(ckpt, dict) or not {"model", "iteration", "config"} <= set(ckpt):
        raise CheckpointError(f"{path}: not a segkit training checkpoint (needs model, iteration and config)")
    return ckpt


def restore_model(model: nn.Module, ckpt: dict[str, Any], path: Path, cfg: DictConfig) -> None:
    """Load a segkit checkpoint's weights, explaining an architecture or class-count mismatch."""
    saved = ckpt.get("config", {})
    hint = (f"  hint: the checkpoint was trained with backbone={saved.get('backbone', {}).get('name')} and "
            f"{saved.get('dataset', {}).get('num_classes')} classes; this run has "
            f"backbone={cfg.backbone.name} and {cfg.dataset.num_classes} classes")
    load_into(model, ckpt["model"], str(path), hint)


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


def weight_fingerprints(model: nn.Module, env: Env) -> list[float]:
    """One float64 sum of all parameters per rank: DDP replicas must agree exactly."""
    local = torch.stack([p.detach().double().sum() for p in model.parameters()]).sum().reshape(1)
    if env.world_size == 1:
        return [local.item()]
    gathered = [torch.zeros_like(local) for _ in range(env.world_size)]
    dist.all_gather(gathered, local)
    return [g.item() for g in gathered]


class Trainer:
    def __init__(self, cfg: DictConfig, run_dir: Path) -> None:
        self.cfg, self.run_dir = cfg, Path(run_dir)
        t = cfg.train
        self.env = env = setup_distributed(t.device)
        check_config(cfg, env.world_size)
        resume_path = resolve_resume(cfg.resume, self.run_dir)
        # Read the checkpoint before anything is written, so a bad resume leaves the run untouched.
        ckpt = load_training_checkpoint(resume_path) if resume_path else None

        self.train_set = build_dataset(cfg.dataset, cfg.dataset.train_split, build_train_transform(cfg.dataset))
        self.val_set = build_dataset(cfg.dataset, cfg.dataset.val_split, build_val_transform(cfg.dataset))
        if cfg.dataset.num_classes is None:  # a folder dataset's classes come from its classes.yaml
            cfg.dataset.num_classes = self.train_set.num_classes
        self.iters_per_epoch = len(self.train_set) // t.batch_size
        if self.iters_per_epoch == 0:
            raise ConfigError(f"train.batch_size={t.batch_size} exceeds the {len(self.train_set)} images of "
                              f"split {cfg.dataset.train_split!r}")
        self.total_iters = t.iters or t.epochs * self.iters_per_epoch

        torch.manual_seed(t.seed)  # identical initial weights on every rank
        model = build_segmentor(cfg.backbone, cfg.model, cfg.dataset.num_classes, load_weights=ckpt is None)
        if ckpt is not None:
            restore_model(model, ckpt, resume_path, cfg)
        if env.device.type == "cuda" and env.world_size > 1 and t.sync_bn:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        self.memory_format = torch.channels_last if t.channels_last else torch.contiguous_format
        model.to(env.device, memory_format=self.memory_format)
        self.optimizer = build_optimizer(model, cfg.optim, t.batch_size)
        self.scheduler = build_scheduler(self.optimizer, cfg.schedule, self.total_iters)
        self.amp_dtype = AUTOCAST_DTYPES.get(t.amp)
        self.scaler = torch.amp.GradScaler(env.device.type, enabled=self.amp_dtype == torch.float16)
        self.criterion = build_loss(cfg.model.loss)
        self.start_iter, self.best_miou = 0, -1.0
        torch.manual_seed(t.seed + env.rank)  # dropout streams differ across ranks
        if ckpt is not None:
            self._restore_state(ckpt, resume_path)
        if env.world_size > 1:
            model = DistributedDataParallel(model, device_ids=[env.device.index] if env.device.type == "cuda" else None)
        self.model = torch.compile(model) if t.compile else model

        if env.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
            self._drop_records_after(self.start_iter)
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(str(self.run_dir / "tb"), purge_step=self.start_iter)

    def _restore_state(self, ckpt: dict[str, Any], path: Path) -> None:
        if ckpt["iteration"] > self.total_iters:
            raise CheckpointError(f"{path} is at iteration {ckpt['iteration']}, past this run's "
                                  f"{self.total_iters} iterations")
        try:
            self.optimizer.load_state_dict(ckpt["optimizer"])
            self.scheduler.load_state_dict(ckpt["scheduler"])
            self.scaler.load_state_dict(ckpt["scaler"])
        except (KeyError, ValueError) as e:
            raise CheckpointError(f"{path}: optimizer/scheduler state does not fit this run ({e})") from e
        self.start_iter, self.best_miou = ckpt["iteration"], ckpt.get("best_miou", -1.0)
        states = ckpt.get("rng", [])
        if len(states) == self.env.world_size:  # a different layout cannot continue the same streams
            torch.set_rng_state(states[self.env.rank]["cpu"])
            if "cuda" in states[self.env.rank] and self.env.device.type == "cuda":
                torch.cuda.set_rng_state(states[self.env.rank]["cuda"], self.env.device)

    # -- records -------------------------------------------------------------------------------
    def _weights(self, iteration: int) -> dict[str, Any]:
        """What every checkpoint holds: weights, iteration, and the resolved config that rebuilds them."""
        return {"model": _unwrap(self.model).state_dict(), "iteration": iteration,
                "config": OmegaConf.to_container(self.cfg, resolve=True), "segkit_version": __version__}

    def _state(self, iteration: int, rng: list[dict[str, torch.Tensor]]) -> dict[str, Any]:
        return {**self._weights(iteration), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
                "best_miou": self.best_miou, "rng": rng}

    def save(self, iteration: int, name: str = "last.pt") -> None:
        rng = _rng_states(self.env)  # a collective: every rank takes part
        if self.env.is_main:
            save_atomic(self._state(iteration, rng), self.run_dir / name)

    def _drop_records_after(self, iteration: int) -> None:
        """A resumed run repeats the iterations after its checkpoint: forget their old records."""
        path = self.run_dir / "metrics.jsonl"
        if not path.exists():
            return
        kept = [line for line in path.read_text().splitlines() if json.loads(line)["iter"] <= iteration]
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, path)

    def log(self, record: dict[str, Any]) -> None:
        if not self.env.is_main:
            return
        with open(self.run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        for key, value in record.items():
            if key not in ("iter", "epoch", "split") and isinstance(value, (int, float)):
                self.tb.add_scalar(f"{record.get('split', 'train')}/{key}", value, record["iter"])

    def validate(self, iteration: int) -> dict[str, Any]:
        d = self.cfg.dataset
        model = _unwrap(self.model)
        metrics = evaluate(model, self.val_set, mean=d.mean, std=d.std, convention=d.miou_convention,
                           pad_multiple=self.cfg.backbone.output_stride, autocast=self.cfg.train.amp,
                           device=self.env.device, num_workers=self.cfg.train.workers,
                           progress=self.env.is_main and self.cfg.train.progress)
        summary = {k: metrics[k] for k in ("pixAcc", "mIoU")}
        self.log({"split": "val", "iter": iteration, **summary})
        if metrics["mIoU"] > self.best_miou:
            self.best_miou = metrics["mIoU"]
            if self.env.is_main:
                save_atomic({**self._weights(iteration), "metrics": summary}, self.run_dir / "best.pt")
        return summary

    # -- the loop ------------------------------------------------------------------------------
    def _loader(self) -> DataLoader:
        t, env = self.cfg.train, self.env
        sampler = IterationBatchSampler(len(self.train_set), t.batch_size, self.total_iters, env.world_size,
                                        env.rank, t.accum_steps, t.seed, self.start_iter)
        # Its own generator: creating the iterator must not draw from the global (dropout) RNG, or a
        # resumed run would continue a different stream than the uninterrupted one.
        return DataLoader(SeededSamples(self.train_set, t.seed), batch_sampler=sampler, num_workers=t.workers,
                          pin_memory=env.device.type == "cuda", generator=torch.Generator().manual_seed(t.seed))

    def _diverged(self, iteration: int, loss: float, good_buffers: list[torch.Tensor]) -> TrainingDiverged:
        # Parameters are still those after `iteration` good steps (this step was not applied), but
        # this step's forward already moved the BN running statistics: put them back first.
        model = _unwrap(self.model)
        for buf, good in zip(model.buffers(), good_buffers):
            buf.copy_(good)
        self.save(iteration)
        return TrainingDiverged(
            f"loss is {loss} at iteration {iteration + 1}: training stopped. The last good state "
            f"(iteration {iteration}) is saved in {self.run_dir / 'last.pt'}; lower optim.base_lr "
            f"(or use train.amp=bf16 instead of fp16) and continue with resume={self.run_dir / 'last.pt'}")

    def fit(self) -> dict[str, Any]:
        t, env = self.cfg.train, self.env
        val_every = t.val_every or max(1, self.total_iters // 10)
        autocast = torch.autocast(env.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None)
        model, it, summary = self.model, self.start_iter, {}
        model.train()
        data = iter(self._loader())
        bar = tqdm(total=self.total_iters, initial=it, disable=not (env.is_main and t.progress),
                   dynamic_ncols=True, desc="train")
        window_start, window_images = time.perf_counter(), 0
        while it < self.total_iters:
            good_buffers = [b.detach().clone() for b in _unwrap(model).buffers()]
            self.optimizer.zero_grad(set_to_none=True)
            total = torch.zeros((), device=env.device)
            parts_sum: dict[str, torch.Tensor] = {}
            for a in range(t.accum_steps):
                images, masks = next(data)
                images = images.to(env.device, non_blocking=True, memory_format=self.memory_format)
                masks = masks.to(env.device, non_blocking=True)
                sync = a == t.accum_steps - 1 or not isinstance(model, DistributedDataParallel)
                with contextlib.nullcontext() if sync else model.no_sync():
                    with autocast:
                        loss, parts = self.criterion(model(images), masks)
                    self.scaler.scale(loss / t.accum_steps).backward()
                total += loss.detach() / t.accum_steps
                for k, v in parts.items():
                    parts_sum[k] = parts_sum.get(k, 0.0) + v / t.accum_steps
            # Every rank must agree to stop, or the others would hang in the next collective.
            mean_loss = all_reduce(total, average=True).item()
            if not math.isfinite(mean_loss):
                bar.close()
                raise self._diverged(it, mean_loss, good_buffers)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.scheduler.step()
            it += 1
            window_images += t.batch_size
            bar.update(1)
            if it % t.log_every == 0 or it == self.total_iters:
                seconds = time.perf_counter() - window_start
                parts = {k: float(v) for k, v in parts_sum.items()}  # host sync only when logging
                record = {"iter": it, "epoch": it / self.iters_per_epoch, "loss": mean_loss, **parts,
                          "lr": self.optimizer.param_groups[0]["lr"], "img_per_s": window_images / seconds}
                bar.set_postfix(loss=f"{mean_loss:.3f}", lr=f"{record['lr']:.2e}", img_s=f"{record['img_per_s']:.1f}")
                self.log(record)
                window_start, window_images = time.perf_counter(), 0
            if it % val_every == 0 or it == self.total_iters:
                summary = self.validate(it)
                if env.is_main:
                    bar.write(f"iter {it}: val pixAcc {summary['pixAcc']:.4f} mIoU {summary['mIoU']:.4f}")
            if it % t.ckpt_every == 0 or it == self.total_iters:
                self.save(it)
        bar.close()
        result = {"iter": it, "best_mIoU": self.best_miou, **{f"val_{k}": v for k, v in summary.items()},
                  "weight_fingerprints": weight_fingerprints(_unwrap(model), env)}
        self.log({"split": "final", **result})
        if env.is_main:
            self.tb.close()
        return result


def train(cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    """Run (or resume) the training described by ``cfg``; returns the final summary."""
    return Trainer(cfg, run_dir).fit()
