"""Tiny on-disk datasets and a loopback HTTP server for the data tests."""
from __future__ import annotations

import functools
import http.server
import json
import threading
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from PIL import Image

from segkit.data.cityscapes import LABEL_IDS_ENDING


def save(path: Path, array: np.ndarray, **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, **kwargs)
    return path


def random_image(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    return rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def make_ade(root: Path, counts: dict[str, int] | None = None, size: tuple[int, int] = (24, 32),
             seed: int = 0) -> Path:
    """ADEChallengeData2016 layout: JPEG images and annotations with random values 0..150."""
    rng = np.random.default_rng(seed)
    base = root / "ADEChallengeData2016"
    for split, n in (counts or {"training": 3, "validation": 2}).items():
        prefix = "train" if split == "training" else "val"
        for i in range(n):
            stem = f"ADE_{prefix}_{i + 1:08d}"
            save(base / "images" / split / f"{stem}.jpg", random_image(rng, *size), quality=95)
            save(base / "annotations" / split / f"{stem}.png",
                 rng.integers(0, 151, size=size, dtype=np.uint8))
    return root


def make_cityscapes(root: Path, counts: dict[str, int] | None = None, size: tuple[int, int] = (16, 32),
                    seed: int = 0) -> Path:
    """leftImg8bit/gtFine layout with labelIds using every value 0..33."""
    rng = np.random.default_rng(seed)
    for split, n in (counts or {"train": 2, "val": 1}).items():
        for i in range(n):
            city = "aachen" if i % 2 == 0 else "bremen"
            stem = f"{city}_{i:06d}_000019"
            save(root / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png", random_image(rng, *size))
            save(root / "gtFine" / split / city / f"{stem}{LABEL_IDS_ENDING}",
                 rng.integers(0, 34, size=size, dtype=np.uint8))
    return root


def make_folder(root: Path, classes: str = "classes: [sky, road, car]\n", n: int = 2,
                size: tuple[int, int] = (20, 28), seed: int = 0, counts: dict[str, int] | None = None) -> Path:
    """ROOT/images, ROOT/masks (values 0..2 and 255) and ROOT/classes.yaml: ``n`` images per split,
    or ``counts`` per split."""
    rng = np.random.default_rng(seed)
    for split, count in (counts or {"train": n, "val": n}).items():
        for i in range(count):
            save(root / "images" / split / f"img{i}.png", random_image(rng, *size))
            mask = rng.integers(0, 3, size=size, dtype=np.uint8)
            mask[0, :] = 255
            save(root / "masks" / split / f"img{i}.png", mask)
    (root / "classes.yaml").write_text(classes)
    return root


# Detail API category id -> 0..59 value, by hand from the sorted list of 60 ids (2 = aeroplane is
# the 1st class, 284 = person the 37th, 458 = wood the 59th); 1 and 3 are not among the 59 classes.
CONTEXT_VALUES = {0: 0, 1: 0, 2: 1, 3: 0, 284: 37, 458: 59}


def coco_rle(mask: np.ndarray, compressed: bool = True) -> dict:
    """COCO RLE of a boolean mask: pycocotools' compressed string, or plain run lengths."""
    if compressed:
        from pycocotools import mask as mask_utils
        rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
        return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}
    flat = mask.T.reshape(-1)  # column-major
    edges = np.flatnonzero(np.diff(flat.astype(np.int8))) + 1
    runs = np.diff(np.concatenate(([0], edges, [flat.size]))).tolist()
    return {"size": list(mask.shape), "counts": ([0] if flat[0] else []) + runs}


def make_pascal_context(root: Path, counts: dict[str, int] | None = None, size: tuple[int, int] = (12, 16),
                        seed: int = 0) -> dict[str, np.ndarray]:
    """VOC2010 JPEGs and a Detail-format ROOT/VOCdevkit/VOC2010/trainval_merged.json; returns the
    expected 0..59 mask of every image by name. Each image gets: aeroplane (2) on the top rows,
    an unknown category (1) painted over its left columns, person (284) as plain run lengths,
    wood (458) on random pixels, and an unknown category (3) that is painted over by wood."""
    rng = np.random.default_rng(seed)
    base = root / "VOCdevkit" / "VOC2010"
    h, w = size
    images, annos, expected = [], [], {}
    for phase, n in (counts or {"train": 3, "val": 2}).items():
        for i in range(n):
            name = f"2008_{len(images):06d}"
            image_id = int(name.replace("_", ""))
            images.append({"image_id": image_id, "file_name": f"{name}.jpg", "phase": phase, "height": h,
                           "width": w, "date_captured": "2010-05-03"})
            save(base / "JPEGImages" / f"{name}.jpg", random_image(rng, h, w), quality=90)
            layers = []
            top = np.zeros(size, bool)
            top[: h // 2] = True
            layers.append((2, top, True))
            left = np.zeros(size, bool)
            left[:, : 1 + i] = True
            layers.append((1, left, True))
            person = np.zeros(size, bool)
            person[h // 2:, w // 2: w // 2 + 3] = True
            layers.append((284, person, False))
            wood = rng.random(size) < 0.2
            wood[0, :6] = wood[h // 2:, w // 2:] = False  # pixels the tests check by hand stay free of it
            wood[-1, 0] = True
            unknown = np.zeros(size, bool)
            unknown[-2:] = True
            layers.append((3, unknown, True))
            layers.append((458, wood, True))
            truth = np.zeros(size, np.uint8)
            for category, pixels, compressed in layers:
                annos.append({"id": len(annos) + 1, "image_id": image_id, "category_id": category,
                              "segmentation": coco_rle(pixels, compressed), "area": int(pixels.sum()),
                              "iscrowd": 0, "parts": []})
                truth[pixels] = CONTEXT_VALUES[category]
            expected[name] = truth
    categories = [{"category_id": c, "name": f"class{c}", "supercategory": "object"} for c in sorted(CONTEXT_VALUES)]
    base.mkdir(parents=True, exist_ok=True)
    (base / "trainval_merged.json").write_text(json.dumps({
        "info": {"description": "tiny"}, "images": images, "annos_segmentation": annos,
        "categories": categories, "annos_occlusion": [], "annos_boundary": [], "annos_joints": [], "parts": []}))
    return expected


def make_pascal_context_converted(root: Path, counts: dict[str, int] | None = None, size: tuple[int, int] = (12, 16),
                                  seed: int = 0) -> Path:
    """The converted layout mmsegmentation's tool writes: JPEGs, SegmentationClassContext PNGs
    with random values 0..59, ImageSets/SegmentationContext/{train,val}.txt."""
    rng = np.random.default_rng(seed)
    base = root / "VOCdevkit" / "VOC2010"
    lists = base / "ImageSets" / "SegmentationContext"
    lists.mkdir(parents=True, exist_ok=True)
    index = 0
    for split, n in (counts or {"train": 3, "val": 2}).items():
        names = []
        for _ in range(n):
            name = f"2008_{index:06d}"
            index += 1
            save(base / "JPEGImages" / f"{name}.jpg", random_image(rng, *size), quality=90)
            save(base / "SegmentationClassContext" / f"{name}.png", rng.integers(0, 60, size=size, dtype=np.uint8))
            names.append(name)
        (lists / f"{split}.txt").write_text("".join(f"{n}\n" for n in names))
    return root


def zip_tree(directory: Path, archive: Path, top: str) -> Path:
    """Zip ``directory/top`` so that members start with ``top/``, like the official archives."""
    with zipfile.ZipFile(archive, "w") as zf:
        for path in sorted((directory / top).rglob("*")):
            zf.write(path, path.relative_to(directory).as_posix())
    return archive


class _RangeHandler(http.server.SimpleHTTPRequestHandler):
    """Serves files with HTTP Range support; can cut the connection after ``cut_after`` bytes."""

    cut_after: int | None = None
    range_requests: list[str] = []

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:
        path = Path(self.translate_path(self.path))
        if not path.is_file():
            self.send_error(404)
            return
        data = path.read_bytes()
        start = 0
        header = self.headers.get("Range")
        if header:
            self.range_requests.append(header)
            start = int(header.removeprefix("bytes=").split("-")[0])
            if start >= len(data):
                self.send_error(416)
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(data) - start))
        self.end_headers()
        body = data[start:]
        if self.cut_after is not None:
            body = body[: self.cut_after]
            self.close_connection = True
        self.wfile.write(body)


@contextmanager
def serve(directory: Path, cut_after: int | None = None) -> Iterator[tuple[str, list[str]]]:
    """Serve ``directory`` on 127.0.0.1; yields the base URL and the Range headers received."""
    handler = type("Handler", (_RangeHandler,), {"cut_after": cut_after, "range_requests": []})
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(handler, directory=str(directory)))
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", handler.range_requests
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
