"""Released segmentation models by name: ``zoo:NAME`` wherever a checkpoint is accepted.

The registry is ``zoo.yaml`` next to this module (PyTorch-Encoding's DeepLabV3-ResNeSt models, the
paper's), plus the entries of the file ``$SEGKIT_ZOO_FILE`` names, which add to or replace them. An
entry gives the file's URL (``{base}`` is ``$SEGKIT_ZOO_URL``, else PyTorch-Encoding's host), the
SHA-1 of the ``.pth`` (inside the ``.zip``, as PyTorch-Encoding checks it), the dataset and backbone
presets of ``conf/`` that rebuild the network and say how it is evaluated, and the published numbers.

:func:`fetch` downloads a model once into ``$SEGKIT_HOME/zoo`` (default ``~/.cache/segkit/zoo``),
resuming a cut download (:mod:`segkit.download`), checks the SHA-1 before anything is kept (a file
that fails is deleted), and converts the weights into a release directory
(:mod:`segkit.checkpoints.release`: model.safetensors, config.json with the label space and the
recipe's evaluation settings, a model card with the published numbers and the commands that
reproduce them). The release is written whole or not at all, under a lock file, so two processes
fetching the same model at once download it once. A cached model needs no network; without one,
the error names the URL to fetch by hand and :func:`install` (``segkit-zoo import NAME FILE``)
checks and installs that file.
"""
from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import importlib.resources
import json
import os
import tempfile
import urllib.parse
import zipfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import yaml

from segkit.checkpoints.checkpoint import ModelCheckpoint, read_model_file, restore_model
from segkit.checkpoints.release import CONFIG, write_release
from segkit.data.label_space import LabelSpace
from segkit.download import DownloadError, download, local_source
from segkit.errors import CheckpointError, ConfigError
from segkit.files import write_dir_atomic
from segkit.models.resnest import BACKBONES
from segkit.models.segmentor import build_segmentor
from segkit.settings import CHECKPOINT_GROUPS, saved_settings

PREFIX = "zoo:"
#: PyTorch-Encoding's host (``encoding_repo_url`` of its encoding/models/model_store.py).
DEFAULT_BASE = "https://s3.us-west-1.wasabisys.com/encoding"
REGISTRY = Path(__file__).with_name("zoo.yaml")
_REQUIRED = ("url", "sha1", "dataset", "backbone")
_OPTIONAL = ("published", "train", "settings")
#: Presets an entry's dataset may name: those whose classes are built in (a folder dataset's live in
#: its classes.yaml, which a download does not bring).
_DATASETS = ("ade20k", "pascal_context", "cityscapes", "demo")


@dataclass(frozen=True)
class ZooEntry:
    """One model of the registry (``registry``: the file that defined it)."""

    name: str
    url: str
    sha1: str
    dataset: str
    backbone: str
    registry: Path
    published: dict[str, Any] | None = None
    train: str | None = None
    settings: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def resolved_url(self) -> str:
        return self.url.replace("{base}", zoo_base())

    @property
    def file_name(self) -> str:
        """The name of the file the URL serves."""
        return PurePosixPath(urllib.parse.urlparse(self.resolved_url).path).name

    def to_dict(self) -> dict[str, Any]:
        """Every field, the URL resolved, and where the model is cached."""
        return {"name": self.name, "url": self.resolved_url, "sha1": self.sha1, "dataset": self.dataset,
                "backbone": self.backbone, "published": self.published, "train": self.train,
                "settings": self.settings, "registry": str(self.registry), "cached": is_cached(self),
                "path": str(release_dir(self.name))}


def zoo_home() -> Path:
    """``$SEGKIT_HOME/zoo`` (default ``~/.cache/segkit/zoo``)."""
    return Path(os.environ.get("SEGKIT_HOME") or "~/.cache/segkit").expanduser() / "zoo"


def zoo_base() -> str:
    """What ``{base}`` in a URL stands for: ``$SEGKIT_ZOO_URL``, else PyTorch-Encoding's host."""
    return (os.environ.get("SEGKIT_ZOO_URL") or DEFAULT_BASE).rstrip("/")


def release_dir(name: str) -> Path:
    return zoo_home() / name


# -- the registry -------------------------------------------------------------------------------
def _bad(path: Path, name: str, key: str, problem: str) -> ConfigError:
    return ConfigError(f"{path}: entry {name!r}, key {key!r}: {problem}")


def _entry(path: Path, name: Any, data: Any) -> ZooEntry:
    if not isinstance(name, str) or not name or "/" in name or name.startswith("."):
        raise ConfigError(f"{path}: entry name {name!r} is invalid: expected a non-empty name without '/'")
    if not isinstance(data, Mapping):
        raise ConfigError(f"{path}: entry {name!r} is not a mapping of {', '.join(_REQUIRED + _OPTIONAL)}")
    for key in data:
        if key not in _REQUIRED + _OPTIONAL:
            raise _bad(path, name, key, f"unknown key; valid keys: {', '.join(_REQUIRED + _OPTIONAL)}")
    for key in _REQUIRED:
        if not isinstance(data.get(key), str) or not data[key]:
            raise _bad(path, name, key, "missing or not a string")
    sha1 = data["sha1"].lower()
    if len(sha1) != 40 or any(c not in "0123456789abcdef" for c in sha1):
        raise _bad(path, name, "sha1", f"{data['sha1']!r} is not 40 hex digits")
    if data["dataset"] not in _DATASETS:
        raise _bad(path, name, "dataset", f"{data['dataset']!r} is not one of {', '.join(_DATASETS)}")
    if data["backbone"] not in BACKBONES:
        raise _bad(path, name, "backbone", f"{data['backbone']!r} is not one of {', '.join(BACKBONES)}")
    published = data.get("published")
    if published is not None and not (isinstance(published, Mapping) and all(
            isinstance(v, (int, float, str)) and not isinstance(v, bool) for v in published.values())):
        raise _bad(path, name, "published", "expected a mapping of metric names to numbers (and source)")
    if data.get("train") is not None and not isinstance(data["train"], str):
        raise _bad(path, name, "train", "expected a command line (a string)")
    settings = data.get("settings") or {}
    if not isinstance(settings, Mapping) or not all(
            g in CHECKPOINT_GROUPS and isinstance(v, Mapping) for g, v in settings.items()):
        raise _bad(path, name, "settings", f"expected a mapping of {', '.join(CHECKPOINT_GROUPS)} to key: value")
    return ZooEntry(name, data["url"], sha1, data["dataset"], data["backbone"], path,
                    dict(published) if published is not None else None, data.get("train"),
                    {g: dict(v) for g, v in settings.items()})


def read_registry(path: Path) -> dict[str, ZooEntry]:
    """The entries of a registry file; ConfigError naming the file, the entry and the key."""
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except OSError as e:
        raise ConfigError(f"cannot read the zoo registry {path}: {e.strerror}") from None
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not a YAML registry ({' '.join(str(e).split())})") from None
    if data is None:
        return {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"{path}: expected a mapping of model names to entries")
    return {name: _entry(Path(path), name, value) for name, value in data.items()}


def registry() -> dict[str, ZooEntry]:
    """The packaged entries, with those of ``$SEGKIT_ZOO_FILE`` added or in their place."""
    entries = read_registry(REGISTRY)
    extra = os.environ.get("SEGKIT_ZOO_FILE")
    if extra:
        entries.update(read_registry(Path(extra).expanduser()))
    return entries


def entry(name: str) -> ZooEntry:
    entries = registry()
    if name not in entries:
        raise CheckpointError(f"no model {name!r} in the zoo; known: {', '.join(sorted(entries))} "
                              f"(add your own in a file named by $SEGKIT_ZOO_FILE)")
    return entries[name]


def zoo_name(source: str | os.PathLike) -> str | None:
    """NAME of a ``zoo:NAME`` source; None for anything else."""
    text = str(source)
    return text[len(PREFIX):] if text.startswith(PREFIX) else None


# -- the recipe a model is rebuilt and evaluated with -------------------------------------------
def _preset(group: str, name: str) -> dict[str, Any]:
    """``conf/<group>/<name>.yaml`` as shipped (its interpolations kept: the dataset root follows
    ``$SEGKIT_DATA`` where the model is used)."""
    data = yaml.safe_load((importlib.resources.files("segkit.conf") / group / f"{name}.yaml").read_text("utf-8"))
    data.pop("defaults", None)
    return data


def recipe_config(e: ZooEntry) -> dict[str, Any]:
    """The dataset, backbone and model settings ``train_seg.py dataset=D backbone=B`` would compose,
    with the entry's ``settings`` changed; the weights come whole, so no ImageNet ones."""
    nodes = {"dataset": _preset("dataset", e.dataset), "backbone": {**_preset("backbone", e.backbone), "pretrained": None},
             "model": _preset("model", "deeplabv3")}
    for group, values in e.settings.items():
        nodes[group].update(values)
    return nodes


def usage(name: str) -> str:
    return f"""```python
from segkit import Predictor

predictor = Predictor.from_pretrained("zoo:{name}", tta=True)   # tta=False: single scale
prediction = predictor.predict("image.jpg")
prediction.save("out/", kinds=("labels", "color", "overlay"))
```

Evaluate: `python eval_seg.py checkpoint=zoo:{name} dataset.root=DIR`.
Fine-tune on your own classes: `python train_seg.py dataset=folder dataset.root=DIR backbone=... model.init=zoo:{name}`."""


# -- download, check, convert -------------------------------------------------------------------
def is_cached(e: ZooEntry) -> bool:
    """A complete release of this entry's file (same SHA-1) is in the cache."""
    try:
        meta = json.loads((release_dir(e.name) / CONFIG).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and isinstance(meta.get("zoo"), dict) and meta["zoo"].get("sha1") == e.sha1


@contextlib.contextmanager
def _locked(name: str) -> Iterator[None]:
    """Held by one process (and one thread) at a time per model: flock on a file of its own."""
    home = zoo_home()
    home.mkdir(parents=True, exist_ok=True)
    with open(home / f".{name}.lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def fetch(name: str, progress: bool = True) -> Path:
    """The release directory of zoo model ``name``, downloaded, checked and converted if not cached."""
    e = entry(name)
    if is_cached(e):
        return release_dir(e.name)
    with _locked(e.name):
        if not is_cached(e):  # another process may have finished it while this one waited
            url = e.resolved_url
            local = local_source(url)
            if local is not None:
                if not local.is_file():
                    raise CheckpointError(f"zoo model {e.name}: {local} does not exist (url of the entry in "
                                          f"{e.registry})")
                _install(e, local, url, delete_bad=False)
            else:
                _install(e, _download(e, url, progress), url, delete_bad=True)
    return release_dir(e.name)


def install(name: str, file: str | os.PathLike) -> Path:
    """``segkit-zoo import NAME FILE``: check a file fetched by hand (the .zip or the .pth) against
    the entry's SHA-1 and install it as the cached model (the file itself is left as it is)."""
    e = entry(name)
    file = Path(file).expanduser()
    if not file.is_file():
        raise CheckpointError(f"{file} does not exist")
    with _locked(e.name):
        _install(e, file, str(file), delete_bad=False)
    return release_dir(e.name)


def _download(e: ZooEntry, url: str, progress: bool) -> Path:
    downloads = zoo_home() / "downloads"
    downloads.mkdir(parents=True, exist_ok=True)
    dest = downloads / e.file_name
    if not dest.is_file():
        try:
            download(url, dest, progress)
        except DownloadError as err:
            raise CheckpointError(f"{err}; to install zoo model {e.name} by hand, fetch {url} and run: "
                                  f"segkit-zoo import {e.name} {e.file_name}") from None
    return dest


def _weights_file(file: Path, origin: str, tmp: Path) -> Path:
    """The .pth: ``file`` itself, or the one inside ``file``, a .zip (extracted into ``tmp``). By the
    name: a .pth of PyTorch >= 1.6 is a zip archive too."""
    if file.suffix.lower() != ".zip":
        return file
    if not zipfile.is_zipfile(file):
        raise CheckpointError(f"{origin}: not a zip archive (damaged or cut short)")
    try:
        with zipfile.ZipFile(file) as zf:
            members = [m for m in zf.infolist() if m.filename.endswith(".pth") and not m.is_dir()]
            if len(members) != 1:
                raise CheckpointError(f"{origin}: expected one .pth in the zip archive, found "
                                      f"{[m.filename for m in members] or 'none'}")
            target = tmp / PurePosixPath(members[0].filename).name
            with zf.open(members[0]) as src, open(target, "wb") as dst:
                while chunk := src.read(1 << 20):
                    dst.write(chunk)
    except (zipfile.BadZipFile, EOFError, zipfile.LargeZipFile) as e:
        raise CheckpointError(f"{origin}: not a usable zip archive ({e})") from None
    return target


def _sha1(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha1").hexdigest()


def _install(e: ZooEntry, file: Path, origin: str, delete_bad: bool) -> None:
    """Check ``file`` (from ``origin``) and convert it into the cache; a downloaded file
    (``delete_bad``) is deleted when it fails its check, and once converted."""
    with tempfile.TemporaryDirectory(prefix=f".{e.name}.", dir=zoo_home()) as tmp:
        try:
            weights = _weights_file(file, origin, Path(tmp))
            actual = _sha1(weights)
            if actual != e.sha1:
                raise CheckpointError(f"{origin}: SHA-1 of {weights.name} is {actual}, expected {e.sha1} "
                                      f"(zoo model {e.name})")
        except CheckpointError as err:
            if delete_bad:
                file.unlink(missing_ok=True)
                raise CheckpointError(f"{err}; the downloaded file was deleted, run again to download it "
                                      f"again") from None
            raise
        _convert(e, read_model_file(weights), origin)
    if delete_bad:
        file.unlink(missing_ok=True)  # the release holds the weights now


def _convert(e: ZooEntry, ckpt: ModelCheckpoint, origin: str) -> None:
    """Write ``ckpt`` as the release of ``e``, after checking that it rebuilds the entry's network."""
    config = ckpt.config if ckpt.config is not None else recipe_config(e)
    try:
        settings = saved_settings(config)
    except ConfigError as err:
        raise ConfigError(f"{e.registry}: entry {e.name!r}: {err}") from None
    if settings.backbone.name != e.backbone:
        raise CheckpointError(f"{origin} holds a {settings.backbone.name} model, but zoo entry {e.name} "
                              f"({e.registry}) says backbone {e.backbone}")
    space = ckpt.label_space or LabelSpace.from_settings(settings.dataset)
    net = build_segmentor(settings.backbone, settings.model, space.num_classes, load_weights=False)
    try:
        restore_model(net, ckpt.state, Path(origin), config, settings.backbone.name, space.num_classes)
    except CheckpointError as err:
        raise CheckpointError(" ".join(f"zoo model {e.name}: {err}".split())) from None
    published = dict(e.published or {})
    if published:
        published["reproduce"] = ["# these weights, evaluated with the recipe's settings (multi-scale + flip):",
                                  f"python eval_seg.py checkpoint=zoo:{e.name} dataset.root=DIR",
                                  *(["# trained again:", e.train] if e.train else [])]
    zoo = {"name": e.name, "url": e.resolved_url, "sha1": e.sha1, "registry": str(e.registry)}
    write_dir_atomic(release_dir(e.name), lambda d: write_release(d, ckpt.state, config, space, ckpt, usage(e.name),
                                                                  zoo=zoo, published=published or None))


# -- segkit-zoo ---------------------------------------------------------------------------------
def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="segkit-zoo", description="Released segmentation models by name "
                                     "(zoo:NAME wherever a checkpoint is accepted).")
    commands = parser.add_subparsers(dest="command", required=True)
    listing = commands.add_parser("list", help="the models: name, dataset, backbone, published numbers, cached")
    listing.add_argument("--json", action="store_true", help="every field of every entry, as JSON")
    get = commands.add_parser("download", help="download, check and convert models into the cache")
    get.add_argument("names", nargs="+", metavar="NAME")
    imp = commands.add_parser("import", help="check a file fetched by hand and install it as model NAME")
    imp.add_argument("name", metavar="NAME")
    imp.add_argument("file", metavar="FILE")
    where = commands.add_parser("path", help="the release directory of a cached model")
    where.add_argument("name", metavar="NAME")
    return parser


def _table(entries: Sequence[ZooEntry]) -> str:
    def number(e: ZooEntry, key: str) -> str:
        value = (e.published or {}).get(key)
        return f"{value:.2f}" if isinstance(value, (int, float)) else "-"

    rows = [("name", "dataset", "backbone", "pixAcc", "mIoU", "cached")]
    rows += [(e.name, e.dataset, e.backbone, number(e, "pixAcc"), number(e, "mIoU"), "yes" if is_cached(e) else "no")
             for e in entries]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def command(argv: Sequence[str]) -> int:
    """``segkit-zoo``; expected errors raise SegkitError (one line and exit status 2 through
    :func:`segkit.cli.run_cli`)."""
    args = _parser().parse_args(list(argv))
    if args.command == "list":
        entries = list(registry().values())
        print(json.dumps([e.to_dict() for e in entries], indent=2) if args.json else _table(entries))
    elif args.command == "download":
        for e in [entry(n) for n in args.names]:  # every name checked before anything is fetched
            print(fetch(e.name))
    elif args.command == "import":
        print(install(args.name, args.file))
    else:
        e = entry(args.name)
        if not is_cached(e):
            raise CheckpointError(f"zoo model {e.name} is not in the cache ({zoo_home()}); fetch it with: "
                                  f"segkit-zoo download {e.name}")
        print(release_dir(e.name))
    return 0
