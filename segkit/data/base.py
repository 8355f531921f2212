"""File handling shared by every dataset: listing, image/mask pairing, decoding, label mapping.

A dataset subclass only describes its layout (which files pair up) and its label table; reading,
validation and the (image, mask) contract live here. Checks that need every file opened (decoding,
sizes, label values) happen lazily in :meth:`SegmentationDataset.load` and name the file; listing
checks (missing directories, unpaired files, empty splits) happen at construction.

Masks are single-channel class indices, or with ``mask_format="rgb"`` colour images whose colours
are the classes' palette colours (``"auto"`` decides per file: PIL mode L/P -> index, RGB/RGBA ->
colour), decoded through a :class:`ColorLut`.
"""
from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from segkit.data.preprocess import Preprocess
from segkit.data.transforms import IGNORE_INDEX, normalize_transform
from segkit.errors import DataError

if TYPE_CHECKING:  # importing albumentations goes through segkit.data.transforms (update check off)
    import albumentations as A

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
# PIL modes of images with more than 8 bits per channel. They are rejected rather than rescaled:
# 12/16-bit sensor data has no standard intensity window and a guessed one silently hurts training.
HIGH_BIT_DEPTH_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")
MASK_FORMATS = ("index", "rgb", "auto")
INDEX_MASK_MODES = ("L", "P")
COLOR_MASK_MODES = ("RGB", "RGBA")
_EXAMPLES = 3
_COLOR_EXAMPLES = 5


class Sample(NamedTuple):
    name: str  # relative path without suffix; names exported predictions
    image: Path
    mask: Path | None


def default_data_root() -> Path:
    """``$SEGKIT_DATA`` or ``./data``, the parent of every dataset root in conf/dataset/."""
    return Path(os.environ.get("SEGKIT_DATA", "data"))


def make_lut(mapping: Mapping[int, int]) -> np.ndarray:
    """256-entry table from raw 8-bit mask value to train id; -1 marks values that must not occur."""
    lut = np.full(256, -1, dtype=np.int16)
    for raw, train_id in mapping.items():
        lut[raw] = train_id
    return lut


def format_values(values: Iterable[int]) -> str:
    """Sorted integers as compact ranges: ``0..150`` or ``0..18, 255``."""
    values = sorted(int(v) for v in values)
    runs: list[str] = []
    start = prev = None
    for v in [*values, None]:
        if prev is not None and v == prev + 1:
            prev = v
            continue
        if start is not None:
            runs.append(str(start) if start == prev else f"{start}..{prev}")
        start = prev = v
    return ", ".join(runs)


def bit_palette(num_classes: int) -> np.ndarray:
    """Deterministic distinct colours: the PASCAL VOC colour map (the bits of the class index
    spread over the high bits of R, G and B), so class 0 is black and 1 is dark red."""
    palette = np.zeros((num_classes, 3), dtype=np.uint8)
    for index in range(num_classes):
        value, shift = index, 7
        while value:
            for channel in range(3):
                palette[index, channel] |= ((value >> channel) & 1) << shift
            value >>= 3
            shift -= 1
    return palette


def _examples(names: Sequence[str]) -> str:
    more = f", ... ({len(names)} in all)" if len(names) > _EXAMPLES else ""
    return ", ".join(names[:_EXAMPLES]) + more


def index_files(directory: Path, endings: Sequence[str]) -> dict[str, Path]:
    """Files below ``directory`` whose name ends with one of ``endings`` (case-insensitive),
    keyed by their relative path with that ending removed."""
    files: dict[str, Path] = {}
    lowered = tuple(e.lower() for e in endings)
    for dirpath, dirnames, filenames in os.walk(directory):
        dirnames.sort()
        for filename in sorted(filenames):
            ending = next((e for e in lowered if filename.lower().endswith(e)), None)
            if ending is None:
                continue
            path = Path(dirpath, filename)
            key = path.relative_to(directory).as_posix()[: -len(ending)]
            if key in files:
                raise DataError(f"{files[key]} and {path} have the same name; keep only one of them")
            files[key] = path
    return files


def pair_samples(
    images: Mapping[str, Path], masks: Mapping[str, Path] | None, image_dir: Path, mask_dir: Path | None
) -> list[Sample]:
    """Match images and masks by key; any unmatched file on either side is an error.
    ``masks=None`` means an unlabelled split."""
    if not images:
        raise DataError(f"split is empty: no images found in {image_dir}")
    if masks is None:
        return [Sample(key, images[key], None) for key in sorted(images)]
    no_mask = sorted(images.keys() - masks.keys())
    no_image = sorted(masks.keys() - images.keys())
    problems = []
    if no_mask:
        problems.append(f"{len(no_mask)} image(s) in {image_dir} have no mask in {mask_dir} "
                        f"({_examples(no_mask)})")
    if no_image:
        problems.append(f"{len(no_image)} mask(s) in {mask_dir} have no image in {image_dir} "
                        f"({_examples(no_image)})")
    if problems:
        raise DataError("; ".join(problems))
    return [Sample(key, images[key], masks[key]) for key in sorted(images)]


def missing_split_error(
    dataset: str, root: Path, split: str, missing: Path, layout: str, hint: str,
    available: Sequence[str] | None = None,
) -> DataError:
    """The error for an absent root or split directory: what was expected and how to get it.
    ``available`` names the splits that do exist (default: the folders next to ``missing``)."""
    if not root.exists():
        problem = f"{dataset} not found: {root} does not exist."
    else:
        parent = missing.parent
        if available is None:
            available = sorted(p.name for p in parent.iterdir() if p.is_dir()) if parent.is_dir() else []
        found = f" (splits found: {', '.join(available)})" if available else ""
        problem = f"{dataset} split '{split}' not found under {root}: {missing} does not exist{found}."
    return DataError(f"{problem}\nExpected layout:\n{layout}\n{hint}")


def rgb_array(img: Image.Image, source: object) -> np.ndarray:
    """An 8-bit PIL image as RGB uint8 HxWx3; grayscale, palette and RGBA (alpha dropped) are
    converted, high bit depth images are rejected (DataError naming ``source``)."""
    if img.mode in HIGH_BIT_DEPTH_MODES:
        raise DataError(
            f"{source}: {img.mode} image has more than 8 bits per channel; convert it to "
            f"8-bit RGB first (segkit does not guess an intensity window)"
        )
    return np.array(img.convert("RGB"))


def read_image(path: Path) -> np.ndarray:
    """Decode an 8-bit image file as RGB uint8 HxWx3 (:func:`rgb_array`)."""
    try:
        with Image.open(path) as img:
            return rgb_array(img, path)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise DataError(f"{path}: cannot decode image ({e})") from None


def read_mask(path: Path, mask_format: str = "index") -> np.ndarray:
    """Decode a mask: raw uint8 HxW class values for an index mask (PIL mode L or P), uint8 HxWx3
    colours for a colour mask (mode RGB, RGBA with the alpha dropped, or P through its palette).

    ``mask_format`` is ``index``, ``rgb`` or ``auto`` (by mode: L/P -> index, RGB/RGBA -> colour);
    the result's ``ndim`` tells which one was read.
    """
    if mask_format not in MASK_FORMATS:
        raise ValueError(f"mask_format must be one of {', '.join(MASK_FORMATS)}, got {mask_format!r}")
    try:
        with Image.open(path) as img:
            mode = img.mode
            colour = mask_format == "rgb" or (mask_format == "auto" and mode in COLOR_MASK_MODES)
            if not colour:
                if mode not in INDEX_MASK_MODES:
                    hint = (" (or read as colours: dataset.mask_format=rgb or auto)"
                            if mode in COLOR_MASK_MODES and mask_format == "index" else "")
                    raise DataError(
                        f"{path}: mask has PIL mode {mode}; expected a single-channel 8-bit PNG "
                        f"of class indices (mode L or P), colour-coded or 16-bit masks must be "
                        f"converted{hint}"
                    )
                return np.array(img)
            if mode not in (*COLOR_MASK_MODES, "P"):
                raise DataError(f"{path}: mask has PIL mode {mode}; colour masks (mask_format={mask_format}) "
                                f"must be 8-bit RGB or RGBA images (single-channel index masks: "
                                f"mask_format=index or auto)")
            return np.array(img.convert("RGB"))
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise DataError(f"{path}: cannot decode mask ({e})") from None


def color_codes(rgb: np.ndarray) -> np.ndarray:
    """uint8 ...x3 colours -> uint32 ``R << 16 | G << 8 | B`` (one integer per colour)."""
    rgb = np.asarray(rgb, dtype=np.uint8)
    return ((rgb[..., 0].astype(np.uint32) << 16) | (rgb[..., 1].astype(np.uint32) << 8)
            | rgb[..., 2].astype(np.uint32))


def format_color(code: int) -> str:
    """A colour code from :func:`color_codes` as ``(r, g, b)``."""
    code = int(code)
    return f"({code >> 16}, {(code >> 8) & 255}, {code & 255})"


def map_labels(raw: np.ndarray, lut: np.ndarray, path: Path, out_of_range_to_ignore: bool) -> np.ndarray:
    """Raw mask values -> uint8 train ids through ``lut``; values the table does not define are
    an error naming the file, or ignore when ``out_of_range_to_ignore``."""
    mapped = lut[raw]
    invalid = mapped < 0
    if invalid.any():
        if not out_of_range_to_ignore:
            raise DataError(
                f"{path}: mask values {format_values(np.unique(raw[invalid]))} are outside the "
                f"valid values {format_values(np.flatnonzero(lut >= 0))}; fix the mask or set "
                f"dataset.map_out_of_range_to_ignore=true"
            )
        mapped[invalid] = IGNORE_INDEX
    return mapped.astype(np.uint8)


def _perfect_hash(codes: np.ndarray) -> tuple[np.uint32, int]:
    """Multiplier and bit count of a multiply-shift hash ``(code * a mod 2^32) >> (32 - bits)``
    without collisions on ``codes`` (deterministic search; tables of at most a few 2^17 slots)."""
    rng = np.random.default_rng(0)
    for bits in range(max(1, (2 * len(codes)).bit_length()), 25):
        for _ in range(32):
            a = np.uint32(rng.integers(0, 1 << 32, dtype=np.uint64) | 1)
            if len(np.unique((codes * a) >> np.uint32(32 - bits))) == len(codes):
                return a, bits
    # A random multiplier is collision-free with probability ~exp(-K^2 / 2^(bits+1)): with 32 tries
    # per table size this is not reached for any palette.
    raise RuntimeError(f"no collision-free colour hash found for {len(codes)} colours")


class ColorLut:
    """Exact colour -> train id table for colour masks: each palette colour is its class index,
    each of ``ignore_colors`` is ignore (255). Colours must be distinct (ValueError naming them);
    ``source`` names where the palette came from in error messages.

    Lookups hash each pixel's 24-bit colour into a small collision-free table and compare the stored
    colour: a few array passes per mask (~25 ms for 2048x1024, several times faster than a binary
    search over the sorted palette).
    """

    def __init__(self, palette: np.ndarray, ignore_colors: np.ndarray | Sequence[Sequence[int]] = (),
                 source: str = "the palette") -> None:
        palette = np.asarray(palette, dtype=np.uint8).reshape(-1, 3)
        ignore = np.asarray(ignore_colors, dtype=np.uint8).reshape(-1, 3)
        codes = color_codes(np.concatenate([palette, ignore]))
        values = np.concatenate([np.arange(len(palette)), np.full(len(ignore), IGNORE_INDEX)]).astype(np.uint8)
        labels = [f"class {i}" for i in range(len(palette))] + ["ignore_color"] * len(ignore)
        seen: dict[int, str] = {}
        for code, label in zip(codes.tolist(), labels):
            if code in seen:
                raise ValueError(f"colour {format_color(code)} is given to both {seen[code]} and {label}; "
                                 f"colours must be distinct")
            seen[code] = label
        self.source = source
        self._mul, bits = _perfect_hash(codes)
        self._shift = np.uint32(32 - bits)
        slots = (codes * self._mul) >> self._shift
        self._slot_codes = np.full(1 << bits, 0xFFFFFFFF, dtype=np.uint32)  # no 24-bit colour
        self._slot_codes[slots] = codes
        self._slot_values = np.full(1 << bits, IGNORE_INDEX, dtype=np.uint8)
        self._slot_values[slots] = values

    def __call__(self, rgb: np.ndarray, path: Path, out_of_range_to_ignore: bool = False) -> np.ndarray:
        """HxWx3 uint8 colours -> HxW uint8 train ids. Colours not in the table are an error naming
        the file, the colours and their pixel counts, or ignore when ``out_of_range_to_ignore``."""
        codes = color_codes(rgb)
        slots = codes * self._mul  # wraps modulo 2^32
        slots >>= self._shift
        known = self._slot_codes[slots] == codes
        mapped = self._slot_values[slots]
        if not known.all():
            unknown = ~known
            if not out_of_range_to_ignore:
                colors, counts = np.unique(codes[unknown], return_counts=True)
                order = np.argsort(-counts, kind="stable")[:_COLOR_EXAMPLES]
                listed = ", ".join(f"{format_color(colors[i])} on {counts[i]} px" for i in order)
                more = f", ... ({len(colors)} colours in all)" if len(colors) > _COLOR_EXAMPLES else ""
                raise DataError(
                    f"{path}: {int(counts.sum())} pixel(s) have colours not in {self.source}: {listed}{more}; "
                    f"fix the mask (antialiased or lossy export?), add the colour to the palette (or as "
                    f"ignore_color), or set dataset.map_out_of_range_to_ignore=true"
                )
            mapped[unknown] = IGNORE_INDEX
        return mapped


class SegmentationDataset(Dataset):
    """(image, mask) pairs with masks in train ids and :attr:`ignore_index` (255) for ignore.

    Subclasses list the files of their layout and pass them in with the class names, palette and
    the table from raw mask values to train ids. ``transform`` is an albumentations pipeline ending
    in ``ToTensorV2``; without one, ``__getitem__`` only normalises (``preprocess``).
    """

    ignore_index: int = IGNORE_INDEX

    def __init__(
        self,
        root: str | Path,
        split: str,
        samples: list[Sample],
        classes: Sequence[str],
        palette: np.ndarray,
        label_lut: np.ndarray,
        *,
        transform: A.Compose | None = None,
        preprocess: Preprocess = Preprocess(),
        map_out_of_range_to_ignore: bool = False,
        mask_format: str = "index",
        color_lut: ColorLut | None = None,
    ) -> None:
        if mask_format not in MASK_FORMATS:
            raise ValueError(f"mask_format must be one of {', '.join(MASK_FORMATS)}, got {mask_format!r}")
        if mask_format == "rgb" and color_lut is None:
            raise ValueError("mask_format='rgb' needs a color_lut")
        self.root = Path(root)
        self.split = split
        self.samples = samples
        self.classes = list(classes)
        self.palette = np.asarray(palette, dtype=np.uint8)
        if self.palette.shape != (len(self.classes), 3):
            raise ValueError(f"palette shape {self.palette.shape} != ({len(self.classes)}, 3)")
        self.label_lut = label_lut
        self.transform = transform
        self.map_out_of_range_to_ignore = map_out_of_range_to_ignore
        self.mask_format = mask_format
        self.color_lut = color_lut
        self._normalize = normalize_transform(preprocess)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return len(self.samples)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(root={str(self.root)!r}, split={self.split!r}, "
                f"{len(self)} images, {self.num_classes} classes)")

    def name(self, i: int) -> str:
        return self.samples[i].name

    def image_path(self, i: int) -> Path:
        return self.samples[i].image

    def label_lut_for(self, mask_path: Path) -> np.ndarray:
        """The raw-value table for one mask file (datasets mixing label encodings override it)."""
        return self.label_lut

    def missing_palette_error(self, mask_path: Path) -> DataError:
        """The error for a colour mask met (``mask_format="auto"``) without a colour table."""
        return DataError(f"{mask_path}: colour mask, but no class palette to read its colours with")

    def load(self, i: int) -> tuple[np.ndarray, np.ndarray | None]:
        """Raw RGB uint8 HxWx3 image and HxW uint8 train-id mask (None when unlabelled)."""
        sample = self.samples[i]
        image = read_image(sample.image)
        if sample.mask is None:
            return image, None
        raw = read_mask(sample.mask, self.mask_format)
        if raw.shape[:2] != image.shape[:2]:
            raise DataError(
                f"{sample.mask}: mask is {raw.shape[1]}x{raw.shape[0]} but its image "
                f"{sample.image} is {image.shape[1]}x{image.shape[0]} (width x height)"
            )
        if raw.ndim == 3:
            if self.color_lut is None:
                raise self.missing_palette_error(sample.mask)
            return image, self.color_lut(raw, sample.mask, self.map_out_of_range_to_ignore)
        lut = self.label_lut_for(sample.mask)
        return image, map_labels(raw, lut, sample.mask, self.map_out_of_range_to_ignore)

    def encode_prediction(self, pred: np.ndarray) -> np.ndarray:
        """Train-id prediction -> uint8 array in the dataset's submission format (here: as is)."""
        return self._check_prediction(pred).astype(np.uint8)

    def _check_prediction(self, pred: np.ndarray) -> np.ndarray:
        pred = np.asarray(pred)
        if pred.size and (pred.min() < 0 or pred.max() >= self.num_classes):
            raise ValueError(f"prediction values must lie in 0..{self.num_classes - 1}, got "
                             f"{pred.min()}..{pred.max()}")
        return pred

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        image, mask = self.load(i)
        if mask is None:
            mask = np.full(image.shape[:2], self.ignore_index, dtype=np.uint8)
        transform = self.transform if self.transform is not None else self._normalize
        out = transform(image=image, mask=mask)
        return out["image"], out["mask"].long()

