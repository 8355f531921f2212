"""Predict from Python: a trained model with everything around it (reading, normalisation, padding,
batching, multi-scale + flip) and predictions that know their classes::

    from segkit import Predictor

    predictor = Predictor.from_checkpoint("runs/x/best.pt", tta=True)   # or Predictor.from_pretrained(DIR)
    prediction = predictor.predict("photo.jpg")
    prediction.labels                        # H x W class ids at the input's size
    prediction.save("out/", kinds=("labels", "color", "overlay"))

The predictions are the evaluator's: each image goes through
:func:`~segkit.inference.multiscale.predict_image`, as in :func:`~segkit.evaluation.loop.evaluate`,
with the same preprocessing, model preparation and options, so ``eval_seg.py``'s exported labels
and these agree pixel for pixel on the same device and precision. ``eval_seg.py
predict.input=DIR`` runs through this class.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import numpy as np
import torch
from PIL import Image
from torch import nn

from segkit.checkpoints.checkpoint import label_space_of
from segkit.checkpoints.load import load_model
from segkit.checkpoints.zoo import zoo_name
from segkit.data.base import read_image, rgb_array
from segkit.data.label_space import LabelSpace
from segkit.errors import CheckpointError, ConfigError
from segkit.inference.masks import colorize, overlay, write_masks
from segkit.inference.multiscale import predict_image, probabilities, resolve_max_batch
from segkit.inference.options import InferenceOptions
from segkit.inference.prepare import load_network
from segkit.settings import saved_settings

#: One input of :meth:`Predictor.predict`: an image file, a PIL image, an H x W x 3 uint8 RGB array
#: or a 3 x H x W RGB tensor (uint8 0..255, or floating point 0..1).
ImageInput = Union[str, os.PathLike, Image.Image, np.ndarray, torch.Tensor]
#: ``tta`` of :meth:`Predictor.from_checkpoint`: False, True or a list of scales.
TTA = Union[bool, Sequence[float]]


@dataclass
class Prediction:
    """One image's prediction: class ids ``labels`` (H x W int64, the input's size), the image it was
    made from (H x W x 3 uint8; for a float tensor, its values x 255 rounded), class
    ``probabilities`` (C x H x W float32, when asked for) and the label space they belong to."""

    labels: np.ndarray
    image: np.ndarray
    label_space: LabelSpace
    probabilities: np.ndarray | None = None
    name: str | None = None  # the file's stem, for an image read from a file

    @property
    def classes(self) -> tuple[str, ...]:
        return self.label_space.classes

    @property
    def palette(self) -> np.ndarray:
        """num_classes x 3 uint8 colours."""
        return self.label_space.palette_array

    def encoded(self) -> np.ndarray:
        """The labels in the dataset's submission format (uint8)."""
        return self.label_space.encode_prediction(self.labels)

    def colorize(self) -> np.ndarray:
        """H x W x 3 uint8: each pixel in its class's colour."""
        return colorize(self.labels, self.palette)

    def overlay(self, alpha: float = 0.5) -> np.ndarray:
        """H x W x 3 uint8: the class colours blended over the image."""
        return overlay(self.image, self.labels, self.palette, alpha)

    def save(self, out_dir: str | os.PathLike, kinds: Sequence[str] = ("labels", "color", "overlay"),
             name: str | None = None) -> dict[str, Path]:
        """Write ``out_dir/<kind>/<name>.png`` for each of ``kinds`` (labels: the submission format,
        color, overlay, compare: image | colours), as ``eval_seg.py export.dir=...`` does; returns the
        paths by kind. ``name`` (may hold '/') defaults to the input file's stem."""
        name = name if name is not None else self.name
        if name is None:
            raise ValueError("this prediction is not of an image file: pass name=... to save it")
        return write_masks(out_dir, name, kinds, self.labels, self.image, self.palette,
                           self.label_space.encode_prediction)


def resolve_device(device: torch.device | str) -> torch.device:
    """``"auto"`` is the GPU when there is one, else the CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device)
    except RuntimeError as e:
        raise ValueError(f"device={device!r} is not a device; use auto, cpu or cuda") from e


def tta_options(tta: TTA, label_space: LabelSpace) -> dict[str, Any]:
    """The ``scales`` and ``flip`` options of ``tta``: False = the whole image once; True = the
    dataset's evaluation scales (the whole image when it has none) with flip; a list = those scales
    with flip."""
    if tta is False:
        return {"scales": None, "flip": False}
    if tta is True:
        return {"scales": label_space.eval_scales, "flip": True}
    if not (isinstance(tta, Sequence) and not isinstance(tta, str) and tta):
        raise ValueError(f"tta must be False, True or a non-empty list of scales > 0, got {tta!r}")
    return {"scales": tuple(tta), "flip": True}


class Predictor:
    """Predicts with a prepared model (eval mode, on ``device``) in ``label_space``.

    ``options`` (:class:`~segkit.inference.options.InferenceOptions`) choose the test-time
    augmentation and its numerics, as ``eval.*`` does for ``eval_seg.py``; as a convenience its
    fields may also be given as keyword arguments (``scales=[0.75, 1.0], flip=True``), which
    replace those of ``options`` (``autocast`` is the ``amp`` field). ``output_stride`` is the
    multiple images are padded to. Build one with :meth:`from_checkpoint` or :meth:`from_pretrained`.
    """

    def __init__(self, model: nn.Module, label_space: LabelSpace, *, device: torch.device | str,
                 output_stride: int = 8, options: InferenceOptions | None = None, **fields: Any) -> None:
        self.model = model
        self.label_space = label_space
        self.device = resolve_device(device)
        self.output_stride = output_stride
        self.options = _with_fields(options or InferenceOptions(), fields)

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike, device: torch.device | str = "auto", tta: TTA = False,
                        options: InferenceOptions | None = None, **fields: Any) -> Predictor:
        """A segkit checkpoint (``best.pt``, ``last.pt``) or release directory. ``tta``: False, True
        (the dataset's evaluation scales with flip) or a list of scales (with flip). ``options`` and
        ``fields`` as for the constructor; the model is prepared as they say (``channels_last``,
        ``fold_bn``, ``dtype``, ``compile``, as ``eval.*``)."""
        ckpt = load_model(path)
        if ckpt.config is None:
            raise CheckpointError(
                f"{path} is a bare state dict: it does not say which network and classes it holds. Make a "
                f"release of it first: segkit-export checkpoint={path} dataset=... backbone=... out=DIR")
        try:
            settings = saved_settings(ckpt.config)
        except ConfigError as e:
            raise CheckpointError(f"{path}: its saved settings are unusable ({e})") from None
        space = label_space_of(ckpt, settings.dataset)
        device = resolve_device(device)
        chosen = _with_fields(options or InferenceOptions(), {**tta_options(tta, space), **fields})
        model = load_network(ckpt, settings.backbone, settings.model, space.num_classes, device, chosen)
        return cls(model, space, device=device, output_stride=settings.backbone.output_stride, options=chosen)

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, device: torch.device | str = "auto", tta: TTA = False,
                        options: InferenceOptions | None = None, **fields: Any) -> Predictor:
        """A release directory written by ``segkit-export format=pretrained`` (no network access, no
        training config needed), or ``zoo:NAME``, a released model by name (downloaded once, see
        :mod:`segkit.checkpoints.zoo`); arguments as :meth:`from_checkpoint`."""
        if zoo_name(directory) is None and not Path(directory).expanduser().is_dir():
            raise CheckpointError(f"{directory} is not a release directory (model.safetensors + config.json)")
        return cls.from_checkpoint(directory, device, tta, options, **fields)

    def predict(self, x: ImageInput | Sequence[ImageInput], probabilities: bool = False
                ) -> Prediction | list[Prediction]:
        """Predict an image or a list of images of any sizes: a file path, a PIL image, an H x W x 3
        uint8 RGB array or a 3 x H x W RGB tensor (uint8 0..255, or float 0..1). At a single scale,
        consecutive equal-sized images of a list share forwards. ``probabilities`` adds the class
        probabilities (C x H x W) to each prediction. Bad input raises ValueError (an unreadable
        file: DataError)."""
        if isinstance(x, (list, tuple)):
            images = [_as_image(item) for item in x]
            return self._predict_all(images, probabilities)
        return self._predict_all([_as_image(x)], probabilities)[0]

    def _predict_all(self, images: list[_Image], want_probabilities: bool) -> list[Prediction]:
        out: list[Prediction] = []
        for chunk in self._chunks(images):
            # One image alone keeps its tensor as the evaluator has it (no copy into a batch).
            batch = (torch.stack([self._normalised(i) for i in chunk]) if len(chunk) > 1
                     else self._normalised(chunk[0])[None])
            scores = self._scores(batch)
            labels = scores.argmax(1).cpu().numpy()
            probs = (probabilities(scores, self.options).cpu().numpy()
                     if want_probabilities else [None] * len(chunk))
            out += [Prediction(labels[k], image.rgb, self.label_space, probs[k], image.name)
                    for k, image in enumerate(chunk)]
        return out

    def _chunks(self, images: list[_Image]) -> list[list[_Image]]:
        """Runs of equal-sized images of at most as many per forward as ``max_batch`` allows for
        windows of their longer side (one image per forward with multi-scale prediction, which
        batches the image's own windows)."""
        chunks: list[list[_Image]] = []
        for image in images:
            h, w = image.pixels.shape[-2:]
            last = chunks[-1] if chunks else None
            fits = (last is not None and self.options.scales is None and last[0].pixels.shape[-2:] == (h, w)
                    and len(last) < resolve_max_batch(self.options.max_batch, max(h, w), self.device))
            if fits:
                last.append(image)
            else:
                chunks.append([image])
        return chunks

    def _normalised(self, image: _Image) -> torch.Tensor:
        preprocess = self.label_space.preprocess
        pixels = image.pixels.to(self.device)
        if pixels.dtype == torch.uint8:
            return preprocess(pixels.permute(1, 2, 0))
        return preprocess.normalize(pixels.float())

    def _scores(self, batch: torch.Tensor) -> torch.Tensor:
        s = self.label_space
        return predict_image(self.model, batch, self.options, base_size=s.base_size, crop_size=s.crop_size,
                             num_classes=s.num_classes, pad_multiple=self.output_stride,
                             pad_value=s.preprocess.pad_value)


def _with_fields(options: InferenceOptions, fields: dict[str, Any]) -> InferenceOptions:
    """``options`` with ``fields`` replaced (``autocast``: the ``amp`` field); TypeError naming an
    unknown one."""
    if "autocast" in fields:
        fields = dict(fields)
        fields["amp"] = fields.pop("autocast")
    return options.replace(**fields) if fields else options


@dataclass
class _Image:
    pixels: torch.Tensor  # 3 x H x W, uint8 or float 0..1
    rgb: np.ndarray  # H x W x 3 uint8
    name: str | None


def _as_image(x: Any) -> _Image:
    """One input of :meth:`Predictor.predict` as pixels; ValueError (DataError for files) otherwise."""
    if isinstance(x, (str, os.PathLike)):
        path = Path(x).expanduser()
        rgb = read_image(path)
        return _Image(torch.from_numpy(rgb).permute(2, 0, 1), rgb, path.stem)
    if isinstance(x, Image.Image):
        rgb = rgb_array(x, "image")
        return _Image(torch.from_numpy(rgb).permute(2, 0, 1), rgb, None)
    if isinstance(x, np.ndarray):
        if x.dtype != np.uint8 or x.ndim != 3 or x.shape[2] != 3 or 0 in x.shape:
            raise ValueError(f"expected an H x W x 3 uint8 RGB array, got shape {x.shape} and dtype {x.dtype} "
                             f"(convert float images with (x * 255).round().astype(np.uint8))")
        rgb = np.ascontiguousarray(x)
        return _Image(torch.from_numpy(rgb).permute(2, 0, 1), rgb, None)
    if isinstance(x, torch.Tensor):
        if x.dim() != 3 or x.shape[0] != 3 or 0 in x.shape or not (x.dtype == torch.uint8 or x.is_floating_point()):
            raise ValueError(f"expected a 3 x H x W RGB tensor (uint8 0..255 or floating point 0..1), got shape "
                             f"{tuple(x.shape)} and dtype {x.dtype}")
        x = x.detach()
        if x.dtype == torch.uint8:
            return _Image(x, x.permute(1, 2, 0).cpu().numpy(), None)
        low, high = x.min().item(), x.max().item()
        if not (0 <= low and high <= 1):  # also false for NaN
            raise ValueError(f"a floating point image tensor must hold values 0..1, got {low}..{high}")
        rgb = (x.float() * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
        return _Image(x, rgb, None)
    raise ValueError(f"cannot predict a {type(x).__name__}: pass a file path, a PIL image, an H x W x 3 uint8 array "
                     f"or a 3 x H x W tensor (or a list of them)")

