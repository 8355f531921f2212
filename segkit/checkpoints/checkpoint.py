"""The segkit checkpoint format, and reading the files a model can be loaded from.

A segkit checkpoint is a dict saved with ``torch.save`` and read with ``weights_only=True``:

* ``model``: the state dict (plain BatchNorm keys, loads on CPU), ``iteration``, ``config`` (the
  run's settings as plain containers; they rebuild the model and name its dataset), ``label_space``
  (:meth:`LabelSpace.to_dict`: classes, palette, submission format, preprocessing; older files lack
  it) and ``segkit_version`` in every file;
* ``metrics`` in ``best.pt``: the validation summary it was chosen by;
* in ``last.pt`` also the training state: ``optimizer``, ``scheduler``, ``scaler``, ``best_miou``
  and ``rng`` (every rank's RNG states), which make a resumed run continue exactly.

Evaluation also reads PyTorch-Encoding's DeepLabV3 state dicts (also their ``checkpoint.pth.tar``
training files), bare state dicts and release directories (:mod:`segkit.checkpoints.release`):
:func:`segkit.checkpoints.load.load_model` reads them all.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from segkit import __version__
from segkit.data.label_space import LabelSpace
from segkit.errors import CheckpointError, DataError
from segkit.files import load_file, save_atomic
from segkit.models.convert import convert_encoding_state_dict, is_encoding_state_dict
from segkit.models.pretrained import load_into, unwrap_state_dict

if TYPE_CHECKING:
    from segkit.settings import DatasetSettings

TRAINING_KEYS = ("optimizer", "scheduler", "scaler", "best_miou", "rng")


def model_record(state: Mapping[str, torch.Tensor], iteration: int, config: Mapping[str, Any],
                 metrics: Mapping[str, float] | None = None, *, label_space: LabelSpace) -> dict[str, Any]:
    """What every checkpoint holds (``best.pt`` adds the ``metrics`` it was chosen by)."""
    record = {"model": dict(state), "iteration": iteration, "config": dict(config),
              "label_space": label_space.to_dict(), "segkit_version": __version__}
    if metrics is not None:
        record["metrics"] = dict(metrics)
    return record


def training_record(state: Mapping[str, torch.Tensor], iteration: int, config: Mapping[str, Any], *,
                    optimizer: dict, scheduler: dict, scaler: dict, best_miou: float,
                    rng: list[dict[str, torch.Tensor]], label_space: LabelSpace) -> dict[str, Any]:
    """``last.pt``: the model record plus the state that resumes training exactly."""
    return {**model_record(state, iteration, config, label_space=label_space), "optimizer": optimizer,
            "scheduler": scheduler, "scaler": scaler, "best_miou": best_miou, "rng": rng}


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
    """Weights to evaluate, and the settings they were trained with (None for a bare state dict),
    the label space they predict in (None before checkpoints carried it), the training iteration and
    the validation metrics recorded with them (None where the file has none)."""

    path: Path
    state: dict[str, torch.Tensor]
    config: dict[str, Any] | None
    label_space: LabelSpace | None = None
    iteration: int | None = None
    metrics: dict[str, float] | None = None


def read_model_file(path: Path) -> ModelCheckpoint:
    """A segkit checkpoint file, a PyTorch-Encoding DeepLabV3 state dict (renamed to segkit's keys)
    or a bare state dict."""
    obj = load_file(path)
    if isinstance(obj, dict) and "model" in obj and "config" in obj:
        space = read_label_space(obj["label_space"], path) if "label_space" in obj else None
        return ModelCheckpoint(path, obj["model"], obj["config"], space, obj.get("iteration"), obj.get("metrics"))
    state = unwrap_state_dict(obj, str(path))
    return ModelCheckpoint(path, convert_encoding_state_dict(state) if is_encoding_state_dict(state) else state,
                           None)


def read_label_space(data: Any, source: Path) -> LabelSpace:
    """A saved label space (:meth:`LabelSpace.to_dict`), or CheckpointError naming ``source``."""
    try:
        return LabelSpace.from_dict(data)
    except ValueError as e:
        raise CheckpointError(f"{source}: unusable label space ({e})") from None


def label_space_of(ckpt: ModelCheckpoint, settings: DatasetSettings) -> LabelSpace:
    """The label space ``ckpt`` carries, or for older checkpoints and bare state dicts the one
    ``settings`` name (a built-in dataset's, or a folder dataset's classes.yaml if it still exists)."""
    if ckpt.label_space is not None:
        return ckpt.label_space
    try:
        return LabelSpace.from_settings(settings)
    except DataError as e:
        raise CheckpointError(f"{ckpt.path} does not record its classes (saved before checkpoints carried "
                              f"them), and they cannot be read from the dataset either: {e}") from None


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


def _modules(keys: list[str]) -> list[str]:
    """The modules the parameter and buffer ``keys`` belong to, in order, each once."""
    return list(dict.fromkeys(k.rsplit(".", 1)[0] for k in keys))


def init_from(model: nn.Module, source: ModelCheckpoint, label: str, backbone: str) -> str:
    """Start ``model`` (a segmentor with backbone ``backbone``) from ``source``'s weights, as
    ``model.init=label`` asks: every weight whose name and shape match is loaded, the rest (the
    classifiers, when the class count differs) keep their fresh initialisation. A backbone that
    does not match is refused (CheckpointError). Returns one line saying what was loaded and what
    was re-initialised."""
    saved = (source.config or {}).get("backbone", {}).get("name")
    if saved is not None and saved != backbone:
        raise CheckpointError(f"model.init={label} is a {saved} model, this run's backbone is {backbone}: "
                              f"pass backbone={saved} to start from it")
    own = model.state_dict()
    state = source.state
    unfit = [k for k, v in own.items() if k.startswith("backbone.") and (k not in state or state[k].shape != v.shape)]
    if unfit:
        shown = ", ".join(f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" if k in state else f"{k} missing"
                          for k in unfit[:3])
        raise CheckpointError(f"model.init={label}: its backbone does not fit backbone={backbone} ({len(unfit)} of "
                              f"its weights missing or of another shape: {shown}); pick the backbone it was trained as")
    loaded = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    fresh = [k for k in own if k not in loaded]
    model.load_state_dict(loaded, strict=False)
    line = f"model.init={label}: loaded {len(loaded)} of {len(own)} weights"
    if fresh:
        classes = state.get("head.classifier.weight")
        count = (f" ({classes.shape[0]} -> {own['head.classifier.weight'].shape[0]} classes)"
                 if classes is not None and classes.shape[1:] == own["head.classifier.weight"].shape[1:] else "")
        line += f"; re-initialised {', '.join(_modules(fresh))}{count}"
    else:
        line += "; nothing re-initialised"
    unused = [k for k in state if k not in own]
    return line + (f"; not used: {', '.join(_modules(unused))}" if unused else "")
