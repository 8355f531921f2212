"""Tiny on-disk datasets and a loopback HTTP server for the data tests."""
from __future__ import annotations

import functools
import http.server
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
                size: tuple[int, int] = (20, 28), seed: int = 0) -> Path:
    """ROOT/images, ROOT/masks (values 0..2 and 255) and ROOT/classes.yaml for train and val."""
    rng = np.random.default_rng(seed)
    for split in ("train", "val"):
        for i in range(n):
            save(root / "images" / split / f"img{i}.png", random_image(rng, *size))
            mask = rng.integers(0, 3, size=size, dtype=np.uint8)
            mask[0, :] = 255
            save(root / "masks" / split / f"img{i}.png", mask)
    (root / "classes.yaml").write_text(classes)
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
