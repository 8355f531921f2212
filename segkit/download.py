"""Fetching a file from a URL: resumable, with a progress bar.

Shared by the dataset preparation (:mod:`segkit.data.prepare`) and the model zoo
(:mod:`segkit.checkpoints.zoo`). A download goes to ``dest.part`` first and is renamed to ``dest``
when complete; a later call resumes a ``.part`` with an HTTP Range request (a server that ignores
Range is read from the start again). Checking what arrived is the caller's part.
"""
from __future__ import annotations

import http.client
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from tqdm import tqdm

from segkit.errors import DataError

CHUNK = 1 << 20
TIMEOUT_S = 60


class DownloadError(DataError):
    """A URL could not be fetched (unreachable, an HTTP error, a connection cut midway)."""


def local_source(source: str) -> Path | None:
    """The file a ``file://`` URL or plain path names; None for a network URL."""
    parsed = urllib.parse.urlparse(source)
    if parsed.scheme == "file":
        return Path(urllib.request.url2pathname(parsed.path))
    if parsed.scheme in ("http", "https", "ftp"):
        return None
    return Path(source)


def part_file(dest: Path) -> Path:
    """Where :func:`download` keeps the bytes of ``dest`` until they are complete."""
    return dest.with_name(dest.name + ".part")


def download(url: str, dest: Path, progress: bool = True) -> None:
    """Download ``url`` to ``dest`` through ``dest.part``, resuming a previous partial download;
    DownloadError (one line naming the URL) when it cannot be fetched or stops short."""
    part = part_file(dest)
    start = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={start}-"} if start else {})
    try:
        response = urllib.request.urlopen(request, timeout=TIMEOUT_S)
    except urllib.error.HTTPError as e:
        if e.code == 416 and start:  # nothing left to fetch: the .part is already complete
            part.rename(dest)
            return
        raise DownloadError(f"download of {url} failed: HTTP {e.code} {e.reason}") from None
    except (urllib.error.URLError, OSError) as e:
        raise DownloadError(f"cannot reach {url}: {getattr(e, 'reason', e)}") from None
    with response:
        resumed = start > 0 and response.status == 206
        if resumed:
            total = int(response.headers["Content-Range"].rsplit("/", 1)[1])
        else:  # fresh start, or a server that ignores Range: begin again
            start = 0
            length = response.headers.get("Content-Length")
            total = int(length) if length is not None else None
        try:
            with open(part, "ab" if resumed else "wb") as f, tqdm(
                total=total, initial=start, unit="B", unit_scale=True, desc=dest.name, disable=not progress
            ) as bar:
                while chunk := response.read(CHUNK):
                    f.write(chunk)
                    bar.update(len(chunk))
        except (OSError, http.client.HTTPException) as e:
            raise DownloadError(f"download of {url} interrupted at {part.stat().st_size} bytes ({e}); "
                                f"run the same command again to resume") from None
    size = part.stat().st_size
    if total is not None and size != total:
        raise DownloadError(f"download of {url} stopped at {size} of {total} bytes; run the same "
                            f"command again to resume")
    part.rename(dest)
