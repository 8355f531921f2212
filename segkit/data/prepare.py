"""Fetch, verify and convert the official datasets.

    python -m segkit.data.prepare ade20k --root DIR [--url URL_OR_PATH] [--sha256 HEX]
    python -m segkit.data.prepare cityscapes --root DIR [--workers N]
    python -m segkit.data.prepare pascal_context --root DIR [--json PATH] [--workers N]
    python -m segkit.data.prepare folder --root DIR --to-index [--workers N] [--out DIR]

ADE20K is downloaded (resuming an interrupted download from its ``.part`` file through an HTTP
Range request), checked against a known digest, extracted and counted. Cityscapes needs a login,
so its two archives are downloaded by hand into ``DIR``; this extracts them (or accepts an already
extracted layout), counts the images and writes ``*_gtFine_labelTrainIds.png`` next to every
``*_gtFine_labelIds.png`` in parallel. Pascal Context needs the VOC2010 images extracted into
``DIR`` and the Detail API's ``trainval_merged.json`` (in ``DIR/VOCdevkit/VOC2010`` or given by
``--json``); this paints each image's annotations into a PNG of the 0..59 context values in
``SegmentationClassContext`` in parallel and writes the split lists (mmsegmentation's layout).
Conversions resume: finished files are kept, each file is written under a temporary name and
renamed into place. ``--expect-counts TRAIN,VAL`` / ``--no-expect-counts`` change the image count
check (for subsets and tests).

``folder --to-index`` converts a folder dataset's colour masks (``ROOT/masks/<split>/``, colours from
the ``palette`` / ``ignore_color`` of ``ROOT/classes.yaml``) to index PNGs in a new tree,
``ROOT/masks_index/<split>/`` by default, then used with ``dataset.mask_dir=masks_index``. Index
masks (PIL mode L/P) already in the tree are rewritten with their values unchanged, unless
``--mask-format rgb`` reads every mask as colours. The tree is written next to its destination and
renamed into place at the end, so it is complete or absent; an existing destination is an error,
never overwritten. Colours not in the palette are an error (or ignore with
``--map-out-of-range-to-ignore``).

Expected problems end with a one-line message and exit status 2.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing
import os
import shutil
import sys
import tempfile
import urllib.parse
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path, PurePosixPath
from typing import Any, NamedTuple

import numpy as np

from PIL import Image
from tqdm import tqdm

from segkit.data.ade20k import ARCHIVE_DIR
from segkit.data.base import IGNORE_INDEX, ColorLut, index_files, map_labels, read_mask
from segkit.data.cityscapes import IMAGE_ENDING, LABEL_ID_LUT, LABEL_IDS_ENDING, TRAIN_IDS_ENDING
from segkit.data.pascal_context import (
    ANNOTATION_JSON,
    ANNOTATION_URL,
    DEVKIT_DIR,
    IMAGE_DIR,
    MASK_DIR,
    SPLIT_DIR,
    VOC2010_URL,
    context_base,
    context_value,
)
from segkit.data.rle import decode_rle
from segkit.data.folder import MASK_SUFFIXES, color_lut_for, load_class_file
from segkit.download import CHUNK, download, local_source
from segkit.errors import DataError, SegkitError

ADE20K_URL = "http://data.csail.mit.edu/places/ADEchallenge/ADEChallengeData2016.zip"
# Digests by archive name. The SHA-1 of ADEChallengeData2016.zip is the one GluonCV and
# PyTorch-Encoding check; add "sha256"/"size" entries here once measured on a trusted copy.
KNOWN_FILES: dict[str, dict[str, str | int]] = {
    "ADEChallengeData2016.zip": {"sha1": "219e1696abb36c8ba3a3afe7fb2f4b4606a897c7"},
}
ADE20K_COUNTS = {"training": 20210, "validation": 2000}
CITYSCAPES_COUNTS = {"train": 2975, "val": 500}
PASCAL_CONTEXT_COUNTS = {"train": 4998, "val": 5105}
CITYSCAPES_ARCHIVES = {"leftImg8bit": "leftImg8bit_trainvaltest.zip", "gtFine": "gtFine_trainvaltest.zip"}
CITYSCAPES_DOWNLOADS = "https://www.cityscapes-dataset.com/downloads/ (login required)"
def verify(path: Path, expected: Mapping[str, str | int], remove_on_mismatch: bool) -> None:
    """Check ``path`` against ``expected`` size and digests (hashlib names: sha256, sha1, ...)."""
    if not expected:
        print(f"no known checksum for {path.name}; pass --sha256 to verify it", file=sys.stderr)
        return
    problems = []
    size = path.stat().st_size
    if "size" in expected and size != expected["size"]:
        problems.append(f"size {size} != expected {expected['size']}")
    hashes = {name: hashlib.new(name) for name in expected if name != "size"}
    with open(path, "rb") as f, tqdm(total=size, unit="B", unit_scale=True, desc=f"verify {path.name}") as bar:
        while chunk := f.read(CHUNK):
            for h in hashes.values():
                h.update(chunk)
            bar.update(len(chunk))
    problems += [f"{name} {h.hexdigest()} != expected {expected[name]}"
                 for name, h in hashes.items() if h.hexdigest() != str(expected[name]).lower()]
    if problems:
        if remove_on_mismatch:
            path.unlink()
        action = "it was deleted, run again to download it again" if remove_on_mismatch else "replace it"
        raise DataError(f"{path} is corrupt or not the expected file ({'; '.join(problems)}); {action}")


def extract(archive: Path, parent: Path, top: str) -> None:
    """Extract the ``top/`` folder of a zip archive into ``parent``, all or nothing."""
    try:
        with zipfile.ZipFile(archive) as zf:
            members = [m for m in zf.infolist() if m.filename.split("/", 1)[0] == top]
            if not members:
                raise DataError(f"{archive} has no top-level '{top}/' folder; is it the right archive?")
            # Extracting next to the target and renaming keeps a killed run from leaving half a tree.
            tmp = Path(tempfile.mkdtemp(prefix=f".{top}-", dir=parent))
            try:
                for member in tqdm(members, unit="file", desc=f"extract {archive.name}"):
                    zf.extract(member, tmp)  # zipfile drops absolute and ".." path parts
                os.rename(tmp / top, parent / top)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    except (zipfile.BadZipFile, EOFError) as e:
        raise DataError(f"{archive} is not a valid zip archive ({e}); delete it and fetch it again") from None


def count_files(directory: Path, ending: str) -> int:
    return sum(1 for _ in directory.rglob(f"*{ending}")) if directory.is_dir() else 0


def check_counts(found: Mapping[str, tuple[int, int]], expected: Mapping[str, int] | None, where: Path) -> None:
    """``found`` maps split -> (images, labels); both must equal ``expected[split]``."""
    if expected is None:
        return
    wrong = [f"{split}: {images} images / {labels} labels, expected {expected[split]}"
             for split, (images, labels) in found.items() if not images == labels == expected[split]]
    if wrong:
        raise DataError(f"unexpected file counts in {where} ({'; '.join(wrong)}); the download or "
                        f"extraction is incomplete (delete it and run again) or pass --no-expect-counts")


def prepare_ade20k(root: Path, source: str, sha256: str | None, counts: Mapping[str, int] | None) -> None:
    target = root / ARCHIVE_DIR
    if not target.is_dir():
        root.mkdir(parents=True, exist_ok=True)
        archive = local_source(source)
        downloaded = archive is None
        if archive is None:
            archive = root / (Path(urllib.parse.urlparse(source).path).name or f"{ARCHIVE_DIR}.zip")
            if not archive.is_file():
                download(source, archive)
        elif not archive.is_file():
            raise DataError(f"archive {archive} does not exist")
        expected = {"sha256": sha256} if sha256 else KNOWN_FILES.get(archive.name, {})
        verify(archive, expected, remove_on_mismatch=downloaded)
        extract(archive, root, ARCHIVE_DIR)
    check_counts({split: (count_files(target / "images" / split, ".jpg"),
                          count_files(target / "annotations" / split, ".png"))
                  for split in ADE20K_COUNTS}, counts, target)
    print(f"ADE20K ready in {target}")


def _write_train_ids(label_ids: Path) -> str | None:
    """Convert one labelIds PNG (pool worker); returns an error message instead of raising."""
    try:
        train_ids = map_labels(read_mask(label_ids), LABEL_ID_LUT, label_ids, out_of_range_to_ignore=False)
    except DataError as e:
        return str(e)
    out = label_ids.with_name(label_ids.name[: -len(LABEL_IDS_ENDING)] + TRAIN_IDS_ENDING)
    tmp = out.with_name(out.name + ".tmp")
    Image.fromarray(train_ids).save(tmp, format="PNG")
    os.replace(tmp, out)  # never a truncated PNG that a resumed run would skip
    return None


def prepare_cityscapes(root: Path, workers: int, counts: Mapping[str, int] | None) -> None:
    if not root.is_dir():
        raise DataError(f"{root} does not exist; download {' and '.join(CITYSCAPES_ARCHIVES.values())} "
                        f"from {CITYSCAPES_DOWNLOADS} into it")
    for top, name in CITYSCAPES_ARCHIVES.items():
        if not (root / top).is_dir():
            if not (root / name).is_file():
                raise DataError(f"neither {root / top}/ nor {root / name} found; download {name} "
                                f"from {CITYSCAPES_DOWNLOADS}")
            extract(root / name, root, top)
    check_counts({split: (count_files(root / "leftImg8bit" / split, IMAGE_ENDING),
                          count_files(root / "gtFine" / split, LABEL_IDS_ENDING))
                  for split in CITYSCAPES_COUNTS}, counts, root)
    sources = sorted((root / "gtFine").rglob(f"*{LABEL_IDS_ENDING}"))
    todo = [p for p in sources
            if not p.with_name(p.name[: -len(LABEL_IDS_ENDING)] + TRAIN_IDS_ENDING).exists()]
    if todo:
        with multiprocessing.Pool(max(1, workers)) as pool:
            results = pool.imap_unordered(_write_train_ids, todo, chunksize=8)
            errors = [e for e in tqdm(results, total=len(todo), unit="file", desc="labelTrainIds") if e]
        if errors:
            raise DataError(f"{len(errors)} label file(s) could not be converted, e.g. {errors[0]}")
    print(f"Cityscapes ready in {root} ({len(sources)} label files, {len(todo)} converted now)")


class ContextImage(NamedTuple):
    """One image of the Detail json and what its mask needs: (category id, RLE, where) per
    annotation, in the json's order (later annotations paint over earlier ones, as in the Detail
    API's getMask)."""
    name: str
    phase: str
    image: Path
    mask: Path
    height: int
    width: int
    segments: list[tuple[int, Any, str]]
    source: Path


def _int_field(entry: Mapping[str, Any], key: str, where: str, source: Path, minimum: int = 0) -> int:
    value = entry.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise DataError(f"{source}: {where} has {key}={value!r}, expected an integer >= {minimum}")
    return value


def _require(entry: Any, keys: Sequence[str], where: str, source: Path) -> None:
    if not isinstance(entry, dict):
        raise DataError(f"{source}: {where} is a {type(entry).__name__}, expected an object")
    missing = [k for k in keys if k not in entry]
    if missing:
        raise DataError(f"{source}: {where} has no {', '.join(repr(k) for k in missing)} key; is this the "
                        f"Detail API's {ANNOTATION_JSON}?")


def read_detail_json(source: Path, base: Path, phases: Sequence[str] = ("train", "val")) -> list[ContextImage]:
    """The images of ``phases`` in a Detail API annotation file with their segmentations."""
    try:
        with open(source, "rb") as f:
            data = json.load(f)
    except OSError as e:
        raise DataError(f"{source}: cannot read ({e.strerror or e})") from None
    except (ValueError, UnicodeDecodeError) as e:  # json.JSONDecodeError is a ValueError
        raise DataError(f"{source}: not valid JSON ({e})") from None
    _require(data, ("images", "annos_segmentation"), "the top level", source)
    if not isinstance(data["images"], list) or not isinstance(data["annos_segmentation"], list):
        raise DataError(f"{source}: 'images' and 'annos_segmentation' must be lists")

    by_id: dict[int, ContextImage | None] = {}
    names: dict[str, int] = {}
    for i, img in enumerate(data["images"]):
        where = f"images[{i}]"
        _require(img, ("image_id", "file_name", "phase", "height", "width"), where, source)
        image_id = _int_field(img, "image_id", where, source)
        file_name = img["file_name"]
        if not isinstance(file_name, str) or not file_name.lower().endswith(".jpg") or "/" in file_name:
            raise DataError(f"{source}: {where} has file_name={file_name!r}, expected a name like 2008_000002.jpg")
        if image_id in by_id:
            raise DataError(f"{source}: {where} repeats image_id {image_id}")
        if img["phase"] not in phases:
            by_id[image_id] = None  # another phase (test): its annotations are skipped
            continue
        name = PurePosixPath(file_name).stem
        if name in names:
            raise DataError(f"{source}: {where} repeats file_name {file_name!r} (image_id {names[name]})")
        names[name] = image_id
        by_id[image_id] = ContextImage(
            name, img["phase"], base / IMAGE_DIR / file_name, base / MASK_DIR / f"{name}.png",
            _int_field(img, "height", where, source, 1), _int_field(img, "width", where, source, 1), [], source)

    for j, ann in enumerate(data["annos_segmentation"]):
        where = f"annos_segmentation[{j}]"
        _require(ann, ("image_id", "category_id", "segmentation"), where, source)
        image_id = _int_field(ann, "image_id", where, source)
        if image_id not in by_id:
            raise DataError(f"{source}: {where} refers to image_id {image_id}, which 'images' does not list")
        image = by_id[image_id]
        if image is not None:
            image.segments.append((_int_field(ann, "category_id", where, source), ann["segmentation"],
                                   f"{where} (id {ann.get('id')}, image {image.name})"))
    return sorted((img for img in by_id.values() if img is not None), key=lambda img: img.name)


def _mask_is_complete(path: Path, height: int, width: int) -> bool:
    """Whether ``path`` is a fully decodable single-channel PNG of the image's size."""
    try:
        with Image.open(path) as im:
            if im.format != "PNG" or im.mode != "L" or im.size != (width, height):
                return False
            im.load()
        return True
    except (OSError, SyntaxError, ValueError):
        return False


def context_mask(image: ContextImage) -> tuple[np.ndarray, set[int]]:
    """The uint8 mask of 0..59 values of one image and the category ids it met that are not
    among the 59 classes (painted as background)."""
    mask = np.zeros((image.height, image.width), dtype=np.uint8)
    unknown = set()
    for category_id, rle, where in image.segments:
        try:
            pixels = decode_rle(rle)
        except ValueError as e:
            raise DataError(f"{image.source}: {where}: {e}") from None
        if pixels.shape != mask.shape:
            raise DataError(f"{image.source}: {where}: segmentation is {pixels.shape[1]}x{pixels.shape[0]} but "
                            f"the image is {image.width}x{image.height} (width x height)")
        value = context_value(category_id)
        if value == 0 and category_id != 0:
            unknown.add(category_id)
        mask[pixels] = value
    return mask, unknown


def _write_context_mask(image: ContextImage) -> tuple[bool, set[int], str | None]:
    """Write one mask PNG unless a complete one exists (pool worker); returns (written, unknown
    category ids, error message) instead of raising."""
    try:
        with Image.open(image.image) as im:
            size = im.size
    except (OSError, SyntaxError, ValueError) as e:
        return False, set(), f"{image.image}: cannot open image ({e})"
    if size != (image.width, image.height):
        return False, set(), (f"{image.image}: image is {size[0]}x{size[1]} but {image.source.name} gives "
                              f"{image.width}x{image.height} (width x height)")
    if _mask_is_complete(image.mask, image.height, image.width):
        return False, set(), None
    try:
        mask, unknown = context_mask(image)
    except DataError as e:
        return False, set(), str(e)
    tmp = image.mask.with_name(image.mask.name + ".tmp")
    try:
        Image.fromarray(mask).save(tmp, format="PNG")
        os.replace(tmp, image.mask)  # never a truncated PNG that a resumed run would keep
    except OSError as e:
        tmp.unlink(missing_ok=True)
        return False, set(), f"{image.mask}: cannot write ({e.strerror or e})"
    return True, unknown, None


def _write_lines(path: Path, lines: Sequence[str]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(f"{line}\n" for line in lines), encoding="utf-8")
    os.replace(tmp, path)


def prepare_pascal_context(root: Path, json_path: Path | None, workers: int,
                           counts: Mapping[str, int] | None) -> None:
    base = context_base(root)
    image_dir = base / IMAGE_DIR
    if not image_dir.is_dir():
        raise DataError(f"{image_dir} not found; download {VOC2010_URL} and extract it into {root}")
    if json_path is None:
        candidates = [base / ANNOTATION_JSON, root / ANNOTATION_JSON]
        json_path = next((p for p in candidates if p.is_file()), None)
        if json_path is None:
            raise DataError(f"{ANNOTATION_JSON} not found in {base} or {root}; download {ANNOTATION_URL} "
                            f"into {base} or pass --json PATH")
    elif not json_path.is_file():
        raise DataError(f"{json_path} does not exist; download {ANNOTATION_URL} or fix --json")
    images = read_detail_json(json_path, base, tuple(PASCAL_CONTEXT_COUNTS))
    found = {split: sum(img.phase == split for img in images) for split in PASCAL_CONTEXT_COUNTS}
    if counts is not None and found != dict(counts):
        wrong = "; ".join(f"{split}: {found[split]} images, expected {counts[split]}" for split in found
                          if found[split] != counts[split])
        raise DataError(f"{json_path}: unexpected image counts ({wrong}); is it the full {ANNOTATION_JSON}? "
                        f"Pass --no-expect-counts for a subset")
    present = set(os.listdir(image_dir))
    missing = [img.image for img in images if img.image.name not in present]
    if missing:
        raise DataError(f"{missing[0]} not found ({len(missing)} of the {len(images)} images in {json_path.name} "
                        f"are missing from {image_dir}); extract {VOC2010_URL} there completely")

    mask_dir = base / MASK_DIR
    mask_dir.mkdir(parents=True, exist_ok=True)
    for stale in mask_dir.glob("*.png.tmp"):  # left by an interrupted run
        stale.unlink()
    results = []
    # The bar is closed (its line ended) before an interruption's message is printed.
    with tqdm(total=len(images), unit="file", desc="SegmentationClassContext") as bar:
        if workers > 1:
            with multiprocessing.Pool(workers) as pool:
                for result in pool.imap_unordered(_write_context_mask, images, chunksize=16):
                    results.append(result)
                    bar.update()
        else:
            for image in images:
                results.append(_write_context_mask(image))
                bar.update()
    errors = [error for _, _, error in results if error]
    if errors:
        raise DataError(f"{len(errors)} mask(s) could not be written, e.g. {errors[0]}")
    unknown = set().union(*(ids for _, ids, _ in results))
    if unknown:
        print(f"note: category ids outside the 59 classes were painted as background (0): "
              f"{', '.join(map(str, sorted(unknown)))}", file=sys.stderr)

    split_dir = base / SPLIT_DIR
    split_dir.mkdir(parents=True, exist_ok=True)
    for split in PASCAL_CONTEXT_COUNTS:  # written last: a listed split is a complete one
        _write_lines(split_dir / f"{split}.txt", [img.name for img in images if img.phase == split])
    converted = sum(written for written, _, _ in results)
    print(f"Pascal Context ready in {base} ({len(images)} masks, {converted} converted now)")


def _write_index_mask(job: tuple[Path, Path, str, ColorLut, int, bool]) -> tuple[str | None, bool]:
    """Convert one mask (pool worker): (error message or None, whether it was a colour mask)."""
    src, dst, mask_format, lut, ignore_value, out_of_range_to_ignore = job
    try:
        raw = read_mask(src, mask_format)
        colour = raw.ndim == 3
        if colour:
            raw = lut(raw, src, out_of_range_to_ignore)
            raw[raw == IGNORE_INDEX] = ignore_value  # the class file's own ignore value
    except DataError as e:
        return str(e), False
    dst.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(raw).save(dst, format="PNG")
    return None, colour


def prepare_folder_to_index(root: Path, out: Path | None, workers: int, mask_format: str,
                            out_of_range_to_ignore: bool) -> Path:
    """Write index PNGs for every mask of ``ROOT/masks/<split>/`` into a new tree (see module doc)."""
    if not root.is_dir():
        raise DataError(f"{root} does not exist")
    masks = root / "masks"
    if not masks.is_dir():
        raise DataError(f"{masks} does not exist; expected colour masks in {masks}/<split>/")
    meta = load_class_file(root)
    lut = color_lut_for(meta)  # errors unless the class file gives distinct palette colours
    out = (root / "masks_index") if out is None else out
    if out.exists():
        raise DataError(f"{out} already exists; delete it to convert again, or choose another --out "
                        f"(existing masks are never overwritten)")
    if out.resolve().is_relative_to(masks.resolve()):
        raise DataError(f"--out {out} is inside {masks}; choose a folder outside the colour masks")
    splits = sorted(d.name for d in masks.iterdir() if d.is_dir())
    jobs = []
    for split in splits:
        lossy = index_files(masks / split, (".jpg", ".jpeg"))
        if lossy:
            raise DataError(f"JPEG masks in {masks / split} ({', '.join(sorted(lossy)[:3])}): JPEG compression "
                            f"changes colours, export the masks as PNG")
        jobs += [(path, Path(split, key + ".png")) for key, path in index_files(masks / split, MASK_SUFFIXES).items()]
    if not jobs:
        raise DataError(f"no masks ({', '.join(MASK_SUFFIXES)}) found in {masks}/<split>/")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        tasks = [(src, tmp / rel, mask_format, lut, meta.ignore[0], out_of_range_to_ignore) for src, rel in jobs]
        with multiprocessing.Pool(max(1, workers)) as pool:
            results = list(tqdm(pool.imap(_write_index_mask, tasks, chunksize=8), total=len(tasks),
                                unit="file", desc="index masks"))
        errors = [e for e, _ in results if e]
        if errors:
            raise DataError(f"{len(errors)} of {len(jobs)} mask(s) could not be converted, e.g. {errors[0]}")
        os.rename(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    converted = sum(colour for _, colour in results)
    mask_dir = out.relative_to(root) if out.is_relative_to(root) else out
    print(f"{len(jobs)} index masks for split(s) {', '.join(splits)} written to {out} ({converted} from "
          f"colour masks, {len(jobs) - converted} copied); train on them with dataset.mask_dir={mask_dir} "
          f"dataset.mask_format=index ({masks} is unchanged)")
    return out


def _counts(value: str) -> tuple[int, int]:
    try:
        train, val = (int(v) for v in value.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected TRAIN,VAL image counts, got {value!r}") from None
    return train, val


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m segkit.data.prepare", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="dataset", required=True)
    commands = {
        "ade20k": (sub.add_parser("ade20k", help="download, verify and extract ADE20K"), ADE20K_COUNTS),
        "cityscapes": (sub.add_parser("cityscapes", help="extract Cityscapes and write labelTrainIds"),
                       CITYSCAPES_COUNTS),
        "pascal_context": (sub.add_parser("pascal_context", help="convert the Detail API annotations of "
                                          "Pascal Context into mask PNGs and split lists"), PASCAL_CONTEXT_COUNTS),
    }
    for command, official in commands.values():
        command.add_argument("--root", type=Path, required=True, help="dataset directory")
        command.add_argument("--expect-counts", type=_counts, default=tuple(official.values()),
                             metavar="TRAIN,VAL", help=f"image counts to check (default: "
                             f"{','.join(map(str, official.values()))})")
        command.add_argument("--no-expect-counts", dest="expect_counts", action="store_const", const=None,
                             help="skip the image count check")
    ade = commands["ade20k"][0]
    ade.add_argument("--url", default=ADE20K_URL, help="archive URL, file:// URL or local path")
    ade.add_argument("--sha256", help="expected SHA-256 of the archive (replaces the known digest)")
    for name in ("cityscapes", "pascal_context"):
        commands[name][0].add_argument("--workers", type=int, default=os.cpu_count() or 1,
                                       help="conversion processes")
    commands["pascal_context"][0].add_argument(
        "--json", type=Path, help=f"the Detail API's {ANNOTATION_JSON} (default: in "
        f"ROOT/{DEVKIT_DIR.as_posix()} or ROOT)")
    folder = sub.add_parser("folder", help="convert a folder dataset's colour masks to index PNGs")
    folder.add_argument("--root", type=Path, required=True, help="dataset directory (with classes.yaml)")
    folder.add_argument("--to-index", action="store_true", required=True,
                        help="write index PNGs for the colour masks of ROOT/masks/<split>/")
    folder.add_argument("--out", type=Path, help="new folder for the index masks (default: ROOT/masks_index)")
    folder.add_argument("--mask-format", choices=("auto", "rgb"), default="auto",
                        help="auto: L/P masks are already indices and copied; rgb: every mask is colours")
    folder.add_argument("--map-out-of-range-to-ignore", action="store_true",
                        help="colours not in the palette become ignore instead of an error")
    folder.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="conversion processes")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.dataset == "folder":
            prepare_folder_to_index(args.root, args.out, args.workers, args.mask_format,
                                    args.map_out_of_range_to_ignore)
            return 0
        official = {"ade20k": ADE20K_COUNTS, "cityscapes": CITYSCAPES_COUNTS,
                    "pascal_context": PASCAL_CONTEXT_COUNTS}[args.dataset]
        counts = dict(zip(official, args.expect_counts)) if args.expect_counts is not None else None
        if args.dataset == "ade20k":
            prepare_ade20k(args.root, args.url, args.sha256, counts)
        elif args.dataset == "cityscapes":
            prepare_cityscapes(args.root, args.workers, counts)
        else:
            prepare_pascal_context(args.root, args.json, args.workers, counts)
    except SegkitError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
