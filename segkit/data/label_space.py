"""What a trained model's outputs mean and how its inputs are made: the record every checkpoint carries.

A :class:`LabelSpace` holds the class names, the palette, the ignore index, the submission encoding
(the label-PNG value of each class: ADE20K class + 1, Cityscapes labelIds, Pascal Context's 0..59
values, the class itself for the demo and folder datasets), the normalisation and the evaluation
geometry (base size, crop size, multi-scale scales). With it a model predicts and exports without
the dataset's files, e.g. after a folder dataset's ``classes.yaml`` is gone.

The submission encoding is stored as a table (one value per class), read off the dataset's own
``encode_prediction``: every dataset's encoding maps each class id independently, so the table
reproduces it exactly and needs no code of its own.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from segkit.data import (ADE20K_CLASSES, ADE20K_PALETTE, CITYSCAPES_CLASSES, CITYSCAPES_PALETTE, DATASETS, DEMO_CLASSES,
                         DEMO_PALETTE)
from segkit.data.base import SegmentationDataset, make_lut
from segkit.data.folder import read_class_file
from segkit.data.pascal_context import label_space as pascal_context_classes
from segkit.data.preprocess import Preprocess

if TYPE_CHECKING:
    from segkit.settings import DatasetSettings

#: Label spaces fixed by a built-in dataset (a folder dataset's live in its classes.yaml; Pascal
#: Context's depend on its num_classes).
BUILT_IN = {"ade20k": (ADE20K_CLASSES, ADE20K_PALETTE), "cityscapes": (CITYSCAPES_CLASSES, CITYSCAPES_PALETTE),
            "demo": (DEMO_CLASSES, DEMO_PALETTE)}
_FIELDS = ("dataset", "classes", "palette", "submission_values", "ignore_index", "mean", "std", "base_size",
           "crop_size", "eval_scales")


class LabelledDataset(Protocol):
    classes: list[str]
    palette: np.ndarray
    ignore_index: int

    def encode_prediction(self, pred: np.ndarray) -> np.ndarray: ...


@dataclass(frozen=True)
class LabelSpace:
    """Classes, colours and submission format of a model's outputs, and its input preprocessing.

    ``submission_values[c]`` is the value class ``c`` takes in a submission label PNG.
    ``eval_scales`` is None when the dataset evaluates at a single scale. Invalid values raise
    ValueError.
    """

    dataset: str
    classes: tuple[str, ...]
    palette: tuple[tuple[int, int, int], ...]
    submission_values: tuple[int, ...]
    ignore_index: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    base_size: int
    crop_size: int
    eval_scales: tuple[float, ...] | None

    def __post_init__(self) -> None:
        n = len(self.classes)
        problems = []
        if not 1 <= n <= 255 or not all(isinstance(c, str) and c for c in self.classes):
            problems.append(f"classes must be 1 to 255 names, got {list(self.classes)!r}")
        if len(self.palette) != n or not all(len(c) == 3 and all(_is_byte(v) for v in c) for c in self.palette):
            problems.append(f"palette must hold {n} [R, G, B] colours with values 0..255")
        if len(self.submission_values) != n or not all(_is_byte(v) for v in self.submission_values):
            problems.append(f"submission_values must hold {n} values 0..255 (one per class)")
        if not _is_byte(self.ignore_index):
            problems.append(f"ignore_index must lie in 0..255, got {self.ignore_index!r}")
        if self.base_size < 1 or self.crop_size < 1:
            problems.append(f"base_size and crop_size must be >= 1, got {self.base_size}, {self.crop_size}")
        if self.eval_scales is not None and not (self.eval_scales and all(
                _is_number(s) and s > 0 for s in self.eval_scales)):
            problems.append(f"eval_scales must be null or numbers > 0, got {self.eval_scales!r}")
        if problems:
            raise ValueError("; ".join(problems))
        Preprocess(self.mean, self.std)  # checks mean and std

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def palette_array(self) -> np.ndarray:
        """num_classes x 3 uint8."""
        return np.asarray(self.palette, dtype=np.uint8).reshape(-1, 3)

    @property
    def preprocess(self) -> Preprocess:
        return Preprocess(self.mean, self.std)

    def encode_prediction(self, pred: np.ndarray) -> np.ndarray:
        """Class ids -> uint8 submission values (the dataset's ``encode_prediction``); ValueError for
        values outside 0..num_classes-1."""
        pred = np.asarray(pred)
        if pred.size and (pred.min() < 0 or pred.max() >= self.num_classes):
            raise ValueError(f"prediction values must lie in 0..{self.num_classes - 1}, got {pred.min()}..{pred.max()}")
        return np.asarray(self.submission_values, dtype=np.uint8)[pred]

    def configured(self, settings: DatasetSettings) -> LabelSpace:
        """These classes with the normalisation and evaluation geometry of ``settings`` (a run's dataset
        settings, where the command line may have changed them)."""
        return dataclasses.replace(self, mean=tuple(settings.mean), std=tuple(settings.std),
                                   base_size=settings.base_size, crop_size=settings.crop_size,
                                   eval_scales=_scales(settings.eval_scales))

    # -- construction and (de)serialisation ---------------------------------------------------
    @classmethod
    def from_dataset(cls, dataset: LabelledDataset, settings: DatasetSettings) -> LabelSpace:
        """The label space of a built dataset (its classes, palette and encoding) with ``settings``'
        preprocessing and evaluation geometry."""
        ids = np.arange(len(dataset.classes))
        return cls(dataset=settings.name, classes=tuple(dataset.classes),
                   palette=tuple(tuple(int(v) for v in c) for c in np.asarray(dataset.palette)),
                   submission_values=tuple(int(v) for v in dataset.encode_prediction(ids)),
                   ignore_index=int(dataset.ignore_index), mean=tuple(settings.mean), std=tuple(settings.std),
                   base_size=settings.base_size, crop_size=settings.crop_size,
                   eval_scales=_scales(settings.eval_scales))

    @classmethod
    def from_settings(cls, settings: DatasetSettings) -> LabelSpace:
        """The label space ``settings`` name without the dataset's files: a built-in dataset's table,
        or a folder dataset's ``classes.yaml`` (DataError when it is missing)."""
        name = settings.name
        if name == "folder":
            classes, _, palette = read_class_file(Path(settings.root).expanduser())
        elif name == "pascal_context":
            classes, palette = pascal_context_classes(settings.num_classes or 59)
        else:
            classes, palette = BUILT_IN[name]
        # The dataset class supplies encode_prediction; its constructor, which lists the dataset's
        # files, is skipped.
        dataset = DATASETS[name].__new__(DATASETS[name])
        SegmentationDataset.__init__(dataset, settings.root, "predict", [], classes, palette, make_lut({}))
        return cls.from_dataset(dataset, settings)

    def to_dict(self) -> dict[str, Any]:
        """Plain containers (what a checkpoint and a release's config.json hold)."""
        return {"dataset": self.dataset, "classes": list(self.classes), "palette": [list(c) for c in self.palette],
                "submission_values": list(self.submission_values), "ignore_index": self.ignore_index,
                "mean": list(self.mean), "std": list(self.std), "base_size": self.base_size,
                "crop_size": self.crop_size,
                "eval_scales": None if self.eval_scales is None else list(self.eval_scales)}

    @classmethod
    def from_dict(cls, data: Any) -> LabelSpace:
        """The inverse of :meth:`to_dict`; ValueError naming what is missing or invalid."""
        if not isinstance(data, Mapping):
            raise ValueError(f"expected a mapping with {', '.join(_FIELDS)}, got {type(data).__name__}")
        missing = [k for k in _FIELDS if k not in data]
        if missing:
            raise ValueError(f"missing {', '.join(missing)}")
        try:
            return cls(dataset=str(data["dataset"]), classes=tuple(data["classes"]),
                       palette=tuple(tuple(c) for c in data["palette"]),
                       submission_values=tuple(data["submission_values"]), ignore_index=data["ignore_index"],
                       mean=tuple(data["mean"]), std=tuple(data["std"]), base_size=data["base_size"],
                       crop_size=data["crop_size"], eval_scales=_scales(data["eval_scales"]))
        except TypeError as e:
            raise ValueError(f"malformed value ({e})") from None


def _scales(scales: Sequence[float] | None) -> tuple[float, ...] | None:
    return None if scales is None else tuple(float(s) for s in scales)


def _is_byte(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool) and 0 <= value <= 255


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
