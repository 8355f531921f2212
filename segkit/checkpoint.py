"""The segkit checkpoint format, and reading the files a model can be loaded from.

A segkit checkpoint is a dict saved with ``torch.save`` and read with ``weights_only=True``:

* ``model``: the state dict (plain BatchNorm keys, loads on CPU), ``iteration``, ``config`` (the
  run's settings as plain containers; they rebuild the model and name its dataset) and
  ``segkit_version`` in every file;
* ``metrics`` in ``best.pt``: the validation summary it was chosen by;
* in ``last.pt`` also the training state: ``optimizer``, ``scheduler``, ``scaler``, ``best_miou``
  and ``rng`` (every rank's RNG states), which make a resumed run continue exactly.

Evaluation also reads PyTorch-Encoding's DeepLabV3 state dicts and bare state dicts.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from segkit import __version__
from segkit.errors import CheckpointError
from segkit.files import load_file, save_atomic
from segkit.models.convert import convert_encoding_state_dict, is_encoding_state_dict
from segkit.models.pretrained import load_into, unwrap_state_dict

TRAINING_KEYS = ("optimizer", "scheduler", "scaler", "best_miou", "rng")


def model_record(state: Mapping[str, torch.Tensor], iteration: int, config: Mapping[str, Any],
                 metrics: Mapping[str, float] | None = None) -> dict[str, Any]:
    """What every checkpoint holds (``best.pt`` adds the ``metrics`` it was chosen by)."""
    record = {"model": dict(state), "iteration": iteration, "config": dict(config), "segkit_version": __version__}
    if metrics is not None:
        record["metrics"] = dict(metrics)
    return record


def training_record(state: Mapping[str, torch.Tensor], iteration: int, config: Mapping[str, Any], *,
                    optimizer: dict, scheduler: dict, scaler: dict, best_miou: float,
                    rng: list[dict[str, torch.Tensor]]) -> dict[str, Any]:
    """``last.pt``: the model record plus the state that resumes training exactly."""
    return {**model_record(state, iteration, config), "optimizer": optimizer, "scheduler": scheduler,
            "scaler": scaler, "best_miou": best_miou, "rng": rng}


def save(record: Mapping[str, Any], path: Path) -> None:
    save_atomic(dict(record), path)


def load_training(path: Path) -> dict[str, Any]:
    """A segkit training checkpoint (``last.pt``) to resume from."""
    ckpt = load_file(path)
    if not isinstance(ckpt, dict) or not {"model", "iteration", "config", *TRAINING_KEYS[:3]} <= set(ckpt):
        raise CheckpointError(f"{path}: not a segkit training checkpoint (needs model, iteration, config and "
                              f"the optimizer state; best.pt holds weights only: resume from last.pt)")
    return ckpt


@dataclass
class ModelCheckpoint:
    """Weights to evaluate, and the settings they were trained with (None for a bare state dict)."""

    path: Path
    state: dict[str, torch.Tensor]
    config: dict[str, Any] | None


def load_model(path: Path) -> ModelCheckpoint:
    """A segkit checkpoint, a PyTorch-Encoding DeepLabV3 state dict or a bare state dict."""
    obj = load_file(path)
    if isinstance(obj, dict) and "model" in obj and "config" in obj:
        return ModelCheckpoint(path, obj["model"], obj["config"])
    state = unwrap_state_dict(obj, str(path))
    return ModelCheckpoint(path, convert_encoding_state_dict(state) if is_encoding_state_dict(state) else state,
                           None)


def mismatch_hint(saved_config: Mapping[str, Any] | None, backbone: str, num_classes: int) -> str:
    """What to say when a checkpoint's weights do not fit the model built for this run."""
    if not saved_config:
        return ("  hint: pass the dataset and backbone the checkpoint was trained with "
                "(dataset=... backbone=...); segkit checkpoints carry them")
    return (f"  hint: the checkpoint was trained with backbone={saved_config.get('backbone', {}).get('name')} and "
            f"{saved_config.get('dataset', {}).get('num_classes')} classes; this run has "
            f"backbone={backbone} and {num_classes} classes")


def restore_model(model: nn.Module, state: Mapping[str, torch.Tensor], path: Path,
                  saved_config: Mapping[str, Any] | None, backbone: str, num_classes: int) -> None:
    """Load checkpoint weights strictly, explaining an architecture or class-count mismatch."""
    load_into(model, dict(state), str(path), mismatch_hint(saved_config, backbone, num_classes))
