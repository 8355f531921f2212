"""The model zoo (segkit.checkpoints.zoo, segkit-zoo, zoo:NAME, model.init) offline: a loopback HTTP
server started here serves a zip written here (a tiny DeepLabV3-ResNeSt-14 in PyTorch-Encoding's
layout); $SEGKIT_HOME points into tmp_path. The packaged registry is checked against a copy of the
upstream lines (tests/data/pytorch_encoding_model_zoo.txt)."""
from __future__ import annotations

import functools
import hashlib
import http.server
import json
import re
import sys
import threading
import zipfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from data_helpers import _RangeHandler, make_folder, serve
from segkit import Predictor
from segkit.checkpoints import zoo
from segkit.checkpoints.checkpoint import ModelCheckpoint, init_from
from segkit.checkpoints.load import load_model
from segkit.errors import CheckpointError, ConfigError
from segkit.models.resnest import create_backbone
from segkit.models.segmentor import Segmentor
from test_eval import _EncodingDeepLabV3

UPSTREAM = Path(__file__).parent / "data" / "pytorch_encoding_model_zoo.txt"
NAME = "tiny_demo"
TINY_SETTINGS = """  settings:
    dataset: {base_size: 32, crop_size: 32, image_size: 32, num_train: 16, num_val: 2, eval_scales: null}
    model: {channels: 16, aspp_dropout: 0, dropout: 0, aux_dropout: 0}
"""


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A directory to serve holding ``tiny_demo-<sha1[:8]>.zip`` (one .pth: a 7-class demo model in
    PyTorch-Encoding's layout), and that .pth with its SHA-1."""
    torch.manual_seed(0)
    original = _EncodingDeepLabV3(num_classes=7).eval()
    for m in original.modules():  # non-trivial BN statistics, so a lost or swapped weight shows
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    root = tmp_path_factory.mktemp("served")
    pth = root / "weights" / f"{NAME}.pth"
    pth.parent.mkdir()
    torch.save(original.state_dict(), pth)
    sha1 = hashlib.sha1(pth.read_bytes()).hexdigest()
    www = root / "www"
    www.mkdir()
    with zipfile.ZipFile(www / f"{NAME}-{sha1[:8]}.zip", "w") as zf:
        zf.write(pth, f"{NAME}-{sha1[:8]}.pth")
    return www, pth, sha1


def registry_file(path: Path, sha1: str, name: str = NAME, url: str | None = None, extra: str = TINY_SETTINGS) -> Path:
    url = url or f"{{base}}/{name}-{sha1[:8]}.zip"
    path.write_text(f"""{name}:
  url: "{url}"
  sha1: {sha1}
  dataset: demo
  backbone: resnest14
  published: {{pixAcc: 91.25, mIoU: 77.5, source: a test}}
  train: "python train_seg.py dataset=demo backbone=resnest14"
{extra}""")
    return path


@pytest.fixture
def home(tmp_path, monkeypatch, served):
    """$SEGKIT_HOME in tmp_path and the tiny entry in $SEGKIT_ZOO_FILE."""
    _, _, sha1 = served
    monkeypatch.setenv("SEGKIT_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("SEGKIT_ZOO_FILE", str(registry_file(tmp_path / "zoo.yaml", sha1)))
    monkeypatch.delenv("SEGKIT_ZOO_URL", raising=False)
    return tmp_path / "home" / "zoo"


def zoo_cli(monkeypatch, capfd, *args: str) -> tuple[int, str, str]:
    """segkit-zoo in this process: exit status, stdout, stderr."""
    from segkit.cli import zoo_main

    monkeypatch.setattr(sys, "argv", ["segkit-zoo", *args])
    capfd.readouterr()
    with pytest.raises(SystemExit) as exit_:
        zoo_main()
    out, err = capfd.readouterr()
    return exit_.value.code, out, err


def one_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip() and "it/s]" not in line and "B/s]" not in line]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


@contextmanager
def counting_server(directory: Path):
    """Like data_helpers.serve, also counting the GET requests."""
    gets: list[str] = []

    class Handler(_RangeHandler):
        range_requests: list[str] = []

        def do_GET(self) -> None:
            gets.append(self.path)
            super().do_GET()

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(directory)))
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", gets
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def leftovers(home: Path) -> list[str]:
    """What the cache holds besides the lock files."""
    return sorted(str(p.relative_to(home)) for p in home.rglob("*") if not p.name.endswith(".lock"))


# -- the packaged registry ----------------------------------------------------------------------
def test_list_json_equals_the_upstream_model_store_and_model_zoo_table(monkeypatch, capfd, tmp_path):
    monkeypatch.setenv("SEGKIT_HOME", str(tmp_path))
    monkeypatch.delenv("SEGKIT_ZOO_FILE", raising=False)
    monkeypatch.delenv("SEGKIT_ZOO_URL", raising=False)
    text = UPSTREAM.read_text()
    assert re.search(r"at commit [0-9a-f]{40}", text)
    hashes = dict((name, sha) for sha, name in re.findall(r"\('([0-9a-f]{40})', '(deeplab_resnest\d+_\w+)'\)", text))
    base = re.search(r"^encoding_repo_url = '(.+)'$", text, re.M).group(1)
    url_format = re.search(r"^_url_format = '(.+)'$", text, re.M).group(1)
    table = {f"deeplab_resnest{n}_{'ade' if d == 'ADE' else 'pcontext'}": (float(px), float(mi))
             for n, d, px, mi in re.findall(r"^DeepLab_ResNeSt(\d+)_(ADE|PContext)\s+([\d.]+)%\s+([\d.]+)%", text, re.M)}
    epochs = {f"deeplab_{bb}_{'ade' if d == 'ADE20K' else 'pcontext'}": e or None
              for d, bb, e in re.findall(r"python train.py --dataset (\w+) --model deeplab --aux --backbone (\w+)"
                                         r"(?: --epochs (\d+))?", text)}
    assert len(hashes) == len(table) == len(epochs) == 8

    code, out, _ = zoo_cli(monkeypatch, capfd, "list", "--json")
    assert code == 0
    entries = {e["name"]: e for e in json.loads(out)}
    assert sorted(entries) == sorted(hashes)
    for name, e in entries.items():
        assert e["sha1"] == hashes[name]
        # upstream: '{repo_url}models/{file_name}.zip', repo_url with a '/' added, file_name = name-<sha1[:8]>
        assert e["url"] == url_format.format(repo_url=base.rstrip("/") + "/", file_name=f"{name}-{hashes[name][:8]}")
        assert (e["published"]["pixAcc"], e["published"]["mIoU"]) == table[name]
        assert e["backbone"] == name.split("_")[1]
        assert e["dataset"] == ("ade20k" if name.endswith("_ade") else "pascal_context")
        assert ("train.epochs=" + epochs[name] in e["train"]) if epochs[name] else "epochs" not in e["train"]
        assert e["cached"] is False and e["path"] == str(tmp_path / "zoo" / name)

    code, out, _ = zoo_cli(monkeypatch, capfd, "list")
    assert code == 0 and re.search(r"deeplab_resnest269_pcontext\s+pascal_context\s+resnest269\s+83.06\s+58.92\s+no", out)


def test_each_packaged_entry_rebuilds_the_recipe_network():
    """The recipe settings of every entry are valid and name the paper's evaluation (ADE's six
    scales, the 'all classes' mIoU) and the class count of the upstream models (150 / 59)."""
    from segkit.settings import saved_settings

    for e in zoo.read_registry(zoo.REGISTRY).values():
        s = saved_settings(zoo.recipe_config(e))
        assert s.backbone.name == e.backbone and s.backbone.pretrained is None and s.model.channels == 256
        assert s.dataset.num_classes == {"ade20k": 150, "pascal_context": 59}[e.dataset]
        assert s.dataset.eval_scales == [0.5, 0.75, 1.0, 1.25, 1.5, 1.75] and s.dataset.miou_convention == "all"


# -- download, cache, checks --------------------------------------------------------------------
def test_cut_download_resumes_then_converts_once(home, served, monkeypatch):
    www, pth, sha1 = served
    archive = next(www.glob("*.zip"))
    with serve(www, cut_after=3000) as (url, _):
        monkeypatch.setenv("SEGKIT_ZOO_URL", url)
        with pytest.raises(CheckpointError, match="stopped at 3000 of .*run the same command again to resume"):
            zoo.fetch(NAME, progress=False)
    assert (home / "downloads" / f"{archive.name}.part").stat().st_size == 3000
    assert not zoo.is_cached(zoo.entry(NAME))
    with serve(www) as (url, ranges):
        monkeypatch.setenv("SEGKIT_ZOO_URL", url)
        path = zoo.fetch(NAME, progress=False)
    assert ranges == ["bytes=3000-"]
    assert path == home / NAME
    assert leftovers(home) == sorted(["downloads", NAME, f"{NAME}/README.md", f"{NAME}/config.json",
                                      f"{NAME}/model.safetensors"])  # the archive is gone: the release holds the weights
    meta = json.loads((path / "config.json").read_text())
    assert meta["zoo"]["sha1"] == sha1 and meta["zoo"]["url"].endswith(archive.name)
    assert meta["label_space"]["dataset"] == "demo" and len(meta["label_space"]["classes"]) == 7
    assert meta["config"]["dataset"]["root"] == "${oc.env:SEGKIT_DATA,./data}/demo"  # follows $SEGKIT_DATA
    card = (path / "README.md").read_text()
    assert "| mIoU | 77.50 |" in card and "| pixAcc | 91.25 |" in card and "a test" in card
    assert f"python eval_seg.py checkpoint=zoo:{NAME}" in card and "python train_seg.py dataset=demo" in card
    assert f'Predictor.from_pretrained("zoo:{NAME}"' in card
    # The weights are the served ones, renamed to segkit's keys.
    ckpt = load_model(f"zoo:{NAME}")
    original = torch.load(pth, weights_only=True)
    torch.testing.assert_close(ckpt.state["backbone.conv1.0.weight"], original["pretrained.conv1.0.weight"])
    torch.testing.assert_close(ckpt.state["head.classifier.bias"], original["head.block.4.bias"])


def test_hash_mismatch_and_corrupt_zip_are_deleted_with_one_line(home, served, tmp_path, monkeypatch, capfd):
    www, _, sha1 = served
    wrong = "0123456789" * 4
    registry_file(tmp_path / "zoo.yaml", wrong, url=f"{{base}}/{NAME}-{sha1[:8]}.zip")
    with serve(www) as (url, _):
        monkeypatch.setenv("SEGKIT_ZOO_URL", url)
        code, _, err = zoo_cli(monkeypatch, capfd, "download", NAME)
    line = one_line(err)
    assert code == 2 and f"{url}/{NAME}-{sha1[:8]}.zip" in line and wrong in line and sha1 in line
    assert "deleted" in line and leftovers(home) == ["downloads"]

    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "broken.zip").write_bytes(b"PK\x03\x04 not really a zip archive" * 50)
    registry_file(tmp_path / "zoo.yaml", sha1, url="{base}/broken.zip")
    with serve(bad) as (url, _):
        monkeypatch.setenv("SEGKIT_ZOO_URL", url)
        code, _, err = zoo_cli(monkeypatch, capfd, "download", NAME)
    line = one_line(err)
    assert code == 2 and f"{url}/broken.zip" in line and "zip archive" in line and "deleted" in line
    assert leftovers(home) == ["downloads"]

    with zipfile.ZipFile(bad / "empty.zip", "w") as zf:
        zf.writestr("readme.txt", "no weights here")
    registry_file(tmp_path / "zoo.yaml", sha1, url="{base}/empty.zip")
    with serve(bad) as (url, _):
        monkeypatch.setenv("SEGKIT_ZOO_URL", url)
        code, _, err = zoo_cli(monkeypatch, capfd, "download", NAME)
    assert code == 2 and "expected one .pth in the zip archive, found none" in one_line(err)


def test_missing_file_unreachable_host_and_import_by_hand(home, served, tmp_path, monkeypatch, capfd):
    www, pth, sha1 = served
    with serve(tmp_path) as (url, _):  # a server without the file: HTTP 404
        monkeypatch.setenv("SEGKIT_ZOO_URL", url)
        code, _, err = zoo_cli(monkeypatch, capfd, "download", NAME)
    line = one_line(err)
    assert code == 2 and "HTTP 404" in line and f"{url}/{NAME}-{sha1[:8]}.zip" in line
    # Offline (the server is gone): the line names the URL and the file to fetch by hand.
    code, _, err = zoo_cli(monkeypatch, capfd, "download", NAME)
    line = one_line(err)
    assert code == 2 and "cannot reach" in line and f"{url}/{NAME}-{sha1[:8]}.zip" in line
    assert f"segkit-zoo import {NAME} {NAME}-{sha1[:8]}.zip" in line
    code, _, err = zoo_cli(monkeypatch, capfd, "path", NAME)
    assert code == 2 and f"segkit-zoo download {NAME}" in one_line(err)

    # A file fetched by hand: checked, installed, left where it was; a wrong one is refused and kept.
    wrong = tmp_path / "other.pth"
    torch.save({"x": torch.zeros(1)}, wrong)
    code, _, err = zoo_cli(monkeypatch, capfd, "import", NAME, str(wrong))
    assert code == 2 and sha1 in one_line(err) and wrong.is_file()
    archive = next(www.glob("*.zip"))
    code, out, _ = zoo_cli(monkeypatch, capfd, "import", NAME, str(archive))
    assert code == 0 and out.strip() == str(home / NAME) and archive.is_file()
    code, out, _ = zoo_cli(monkeypatch, capfd, "path", NAME)
    assert code == 0 and out.strip() == str(home / NAME)
    # A .pth itself works too, and so does a plain path as the entry's url.
    registry_file(tmp_path / "zoo.yaml", sha1, name="from_path", url=str(pth))
    assert (zoo.fetch("from_path") / "model.safetensors").is_file() and pth.is_file()

    code, _, err = zoo_cli(monkeypatch, capfd, "download", "deeplab_resnest50_ade", "nope")
    line = one_line(err)
    assert code == 2 and "'nope'" in line and "deeplab_resnest50_ade" in line and "from_path" in line


def test_two_downloads_at_once_fetch_once(home, served, monkeypatch):
    www, _, _ = served
    results: list[Path | BaseException] = []

    def fetch() -> None:
        try:
            results.append(zoo.fetch(NAME, progress=False))
        except BaseException as e:  # noqa: BLE001 - reported by the assertion below
            results.append(e)

    with counting_server(www) as (url, gets):
        monkeypatch.setenv("SEGKIT_ZOO_URL", url)
        threads = [threading.Thread(target=fetch) for _ in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert results == [home / NAME] * 3 and len(gets) == 1
    assert load_model(f"zoo:{NAME}").state  # complete and matching its sha256


def test_bad_registry_file_names_file_entry_and_key(home, tmp_path, monkeypatch, capfd):
    path = tmp_path / "zoo.yaml"
    for text, key in [("x:\n  url: a.zip\n  sha1: abc\n  dataset: demo\n  backbone: resnest14\n", "'sha1'"),
                      ("x:\n  url: a.zip\n  sha1: " + "a" * 40 + "\n  dataset: folder\n  backbone: resnest14\n",
                       "'dataset'"),
                      ("x:\n  url: a.zip\n  sha1: " + "a" * 40 + "\n  dataset: demo\n  backbone: resnest14\n"
                       "  colour: red\n", "'colour'")]:
        path.write_text(text)
        code, _, err = zoo_cli(monkeypatch, capfd, "list")
        line = one_line(err)
        assert code == 2 and str(path) in line and "entry 'x'" in line and f"key {key}" in line
    monkeypatch.setenv("SEGKIT_ZOO_FILE", str(tmp_path / "missing.yaml"))
    code, _, err = zoo_cli(monkeypatch, capfd, "list")
    assert code == 2 and "missing.yaml" in one_line(err)


def test_zoo_file_overrides_a_packaged_entry(home, served, tmp_path, monkeypatch, capfd):
    """A mirror: the same name, another URL (here a file:// one); list shows it, fetch uses it."""
    www, _, sha1 = served
    archive = next(www.glob("*.zip"))
    registry_file(tmp_path / "zoo.yaml", sha1, name="deeplab_resnest50_ade", url=archive.as_uri(),
                  extra=TINY_SETTINGS.replace("backbone: resnest14", ""))
    code, out, _ = zoo_cli(monkeypatch, capfd, "list", "--json")
    entries = {e["name"]: e for e in json.loads(out)}
    assert code == 0 and len(entries) == 8 and entries["deeplab_resnest50_ade"]["url"] == archive.as_uri()
    assert entries["deeplab_resnest50_ade"]["registry"] == str(tmp_path / "zoo.yaml")
    assert zoo.fetch("deeplab_resnest50_ade").name == "deeplab_resnest50_ade"
    code, out, _ = zoo_cli(monkeypatch, capfd, "list")
    assert re.search(r"deeplab_resnest50_ade\s+demo\s+resnest14\s+91.25\s+77.50\s+yes", out)


# -- by name, wherever a checkpoint is accepted -------------------------------------------------
def test_private_entry_predicts_as_segkits_import_also_offline(home, served, tmp_path, monkeypatch, cli):
    www, pth, _ = served
    image = np.random.default_rng(0).integers(0, 255, (37, 45, 3), dtype=np.uint8)
    quick = {"device": "cpu", "fold_bn": False}  # the same for every predictor compared here
    with serve(www) as (url, _):
        monkeypatch.setenv("SEGKIT_ZOO_URL", url)
        online = Predictor.from_pretrained(f"zoo:{NAME}", **quick).predict(image).labels
    offline = Predictor.from_pretrained(f"zoo:{NAME}", **quick).predict(image).labels  # the server is gone

    # segkit's own import of the same state dict: segkit-export of the .pth with the entry's settings.
    out = tmp_path / "imported"
    proc = cli("export", [f"checkpoint={pth}", f"out={out}", "dataset=demo", "backbone=resnest14",
                          "backbone.pretrained=null", "model.channels=16"], tmp_path / "data")
    assert proc.returncode == 0, proc.stderr
    imported = Predictor.from_pretrained(out, **quick).predict(image).labels
    assert online.shape == (37, 45) and len(np.unique(imported)) > 1
    np.testing.assert_array_equal(online, imported)
    np.testing.assert_array_equal(offline, imported)

    # segkit-export takes zoo:NAME as well, and writes the same weights.
    proc = cli("export", [f"checkpoint=zoo:{NAME}", f"out={tmp_path / 'again'}"], tmp_path / "data")
    assert proc.returncode == 0, proc.stderr
    again, ours = load_model(tmp_path / "again"), load_model(out)
    assert again.state.keys() == ours.state.keys()
    assert all(torch.equal(again.state[k], ours.state[k]) for k in ours.state)


def test_eval_seg_evaluates_a_zoo_model(home, served, tmp_path, monkeypatch, cli_eval):
    www, _, _ = served
    with serve(www) as (url, _):
        monkeypatch.setenv("SEGKIT_ZOO_URL", url)
        proc = cli_eval([f"checkpoint=zoo:{NAME}", f"hydra.run.dir={tmp_path / 'eval'}"], tmp_path / "data")
    record = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert record["dataset"] == "demo" and record["backbone"] == "resnest14" and record["num_images"] == 2
    assert 0 <= record["mIoU"] <= 1 and "mIoU" in proc.stdout
    assert record["checkpoint_sha256"] == json.loads((home / NAME / "config.json").read_text())["weights"]["sha256"]


# -- fine-tuning ------------------------------------------------------------------------------
def test_init_loads_matching_weights_and_refuses_another_backbone(home, served, monkeypatch):
    www, _, _ = served
    with serve(www) as (url, _):
        monkeypatch.setenv("SEGKIT_ZOO_URL", url)
        source = load_model(f"zoo:{NAME}")
    torch.manual_seed(1)
    model = Segmentor(create_backbone("resnest14", output_stride=8), num_classes=3, channels=16)
    fresh = {k: v.clone() for k, v in model.state_dict().items()}
    line = init_from(model, source, f"zoo:{NAME}", "resnest14")
    assert line.startswith(f"model.init=zoo:{NAME}: loaded ")
    assert line.endswith("re-initialised head.classifier, aux_head.classifier (7 -> 3 classes)"), line
    for k, v in model.state_dict().items():
        expected = fresh[k] if ".classifier." in k else source.state[k]
        torch.testing.assert_close(v, expected, rtol=0, atol=0, msg=k)

    with pytest.raises(CheckpointError, match="is a resnest14 model, this run's backbone is resnest26"):
        init_from(Segmentor(create_backbone("resnest26", output_stride=8), 3, channels=16), source, "zoo:x", "resnest26")
    bare = ModelCheckpoint(Path("bare.pth"), source.state, None)
    with pytest.raises(CheckpointError, match="its backbone does not fit backbone=resnest26"):
        init_from(Segmentor(create_backbone("resnest26", output_stride=8), 3, channels=16), bare, "bare.pth", "resnest26")


def test_fine_tune_a_three_class_folder_dataset_from_the_served_model(home, served, tmp_path, monkeypatch, cli_train):
    www, _, _ = served
    data = make_folder(tmp_path / "data" / "folder", n=4)
    with serve(www) as (url, _):
        monkeypatch.setenv("SEGKIT_ZOO_URL", url)
        proc = cli_train(["dataset=folder", f"dataset.root={data}", "dataset.base_size=32", "dataset.crop_size=32",
                          "dataset.eval_scales=null", "backbone=resnest14",
                          # ImageNet weights are not loaded over the model: this file does not exist.
                          f"backbone.pretrained={tmp_path / 'no-such-imagenet.pth'}",
                          "model.channels=16", f"model.init=zoo:{NAME}", "train.batch_size=2", "train.iters=2",
                          "train.workers=0", "train.progress=false", f"hydra.run.dir={tmp_path / 'run'}"],
                         tmp_path / "data")
    assert f"model.init=zoo:{NAME}: loaded " in proc.stdout
    assert "re-initialised head.classifier, aux_head.classifier (7 -> 3 classes)" in proc.stdout
    best = load_model(tmp_path / "run" / "last.pt")
    assert best.state["head.classifier.weight"].shape[0] == 3 and best.label_space.num_classes == 3
    assert best.config["model"]["init"] == f"zoo:{NAME}"


def test_init_errors_are_one_line(home, tmp_path, cli_train):
    data = make_folder(tmp_path / "data" / "folder", n=2)
    proc = cli_train(["dataset=folder", f"dataset.root={data}", "dataset.base_size=32", "dataset.crop_size=32",
                      "backbone=resnest14", "backbone.pretrained=null", "model.channels=16", "model.init=zoo:nope",
                      "train.batch_size=2", "train.iters=1", "train.workers=0", f"hydra.run.dir={tmp_path / 'run'}"],
                     tmp_path / "data", check=False)
    assert proc.returncode == 2 and "no model 'nope' in the zoo" in one_line(proc.stderr)


def test_registry_errors_are_config_errors(tmp_path):
    (tmp_path / "r.yaml").write_text("- a list\n")
    with pytest.raises(ConfigError, match="expected a mapping of model names"):
        zoo.read_registry(tmp_path / "r.yaml")
