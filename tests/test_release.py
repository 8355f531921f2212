"""segkit-export format=pretrained (safetensors + config.json + model card): the round trip, no pickle,
refused and damaged directories through the API and the CLI; and the safe loading of
PyTorch-Encoding's training checkpoints."""
import json
import shutil
import zipfile

import numpy as np
import pytest
import torch

from segkit import Predictor
from segkit.checkpoints.load import load_model
from segkit.errors import CheckpointError
from segkit.files import load_file, sha256_file
from config_helpers import export_settings
from segkit.inference.export_job import export_model


@pytest.fixture(scope="module")
def data_root(shared_data_root):
    return shared_data_root


@pytest.fixture
def command(cli):
    """``command(script, args, data_root, check=True)``: export_model.py or eval_seg.py, in this process."""
    def run(script, args, data_root, check=True):
        proc = cli({"export_model.py": "export", "eval_seg.py": "eval"}[script], args, data_root)
        if check:
            assert proc.returncode == 0, proc.stderr[-3000:]
        return proc
    return run


def one_line_error(proc, *fragments):
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.fixture(scope="module")
def release(tmp_path_factory, data_root, trained_best):
    """The shared run's release, written as export_model.py writes it (its settings, its job)."""
    out = tmp_path_factory.mktemp("release") / "model"
    ckpt = load_model(trained_best)
    assert export_model(export_settings(f"checkpoint={trained_best}", f"out={out}", saved=ckpt.config), ckpt) == out
    return out


def test_release_round_trip_without_pickle(tmp_path, data_root, trained_best, release, command):
    assert sorted(p.name for p in release.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    for path in release.iterdir():
        data = path.read_bytes()
        assert not zipfile.is_zipfile(path) and not data.startswith(b"\x80"), path  # neither torch.save nor pickle
    header = int.from_bytes(release.joinpath("model.safetensors").read_bytes()[:8], "little")
    json.loads(release.joinpath("model.safetensors").read_bytes()[8:8 + header])  # a safetensors header

    meta = json.loads((release / "config.json").read_text())
    assert meta["format"] == "segkit-pretrained" and meta["label_space"]["classes"][0] == "plain"
    assert meta["source"]["sha256"] == sha256_file(trained_best) and meta["source"]["iteration"] == 2
    card = (release / "README.md").read_text()
    for fact in ("resnest14", "demo, 7 classes", "training iterations | 2", sha256_file(trained_best), "mIoU",
                 "horizontal stripes"):
        assert fact in card, fact

    # Loads with the checkpoint, its run directory and the data gone: the same outputs.
    copy = tmp_path / "copy"
    shutil.copytree(release, copy)
    rgb = np.random.default_rng(0).integers(0, 256, (37, 45, 3), dtype=np.uint8)
    for tta in (False, True):
        ours = Predictor.from_pretrained(copy, device="cpu", tta=tta).predict(rgb, probabilities=True)
        theirs = Predictor.from_checkpoint(trained_best, device="cpu", tta=tta).predict(rgb, probabilities=True)
        assert (ours.labels == theirs.labels).all() and np.array_equal(ours.probabilities, theirs.probabilities)
    state = load_model(copy).state
    assert all(torch.equal(v, torch.load(trained_best, weights_only=True)["model"][k]) for k, v in state.items())

    # eval_seg.py takes a release directory as its checkpoint (no training config needed).
    photos = tmp_path / "photos"
    photos.mkdir()
    from PIL import Image
    Image.fromarray(rgb).save(photos / "a.png")
    command("eval_seg.py", [f"checkpoint={copy}", f"predict.input={photos}", f"export.dir={tmp_path / 'out'}",
                        f"hydra.run.dir={tmp_path / 'e'}", "eval.progress=false"], data_root)
    assert (np.asarray(Image.open(tmp_path / "out" / "labels" / "a.png")) == ours.encoded()).all()


@pytest.mark.parametrize("damage, message", [
    (lambda d: (d / "config.json").unlink(), "config.json is missing"),
    (lambda d: (d / "model.safetensors").unlink(), "model.safetensors is missing"),
    (lambda d: (d / "model.safetensors").write_bytes(b"\0" * 64), "does not match config.json"),
    (lambda d: (d / "config.json").write_text("{not json"), "not readable JSON"),
    (lambda d: (d / "config.json").write_text('{"format": "other"}'), "not a segkit release config"),
])
def test_damaged_release_is_refused_by_the_api_and_the_cli(tmp_path, data_root, release, damage, message, command):
    broken = tmp_path / "broken"
    shutil.copytree(release, broken)
    damage(broken)
    with pytest.raises(CheckpointError, match=message):
        Predictor.from_pretrained(broken, device="cpu")
    proc = command("export_model.py", [f"checkpoint={broken}", f"out={tmp_path / 'again'}"], data_root, check=False)
    one_line_error(proc, message)
    assert not (tmp_path / "again").exists()


def test_weights_of_another_release_are_refused(tmp_path, release):
    other = tmp_path / "other"
    shutil.copytree(release, other)
    meta = json.loads((other / "config.json").read_text())
    meta["config"]["model"]["channels"] = 32  # a config whose architecture the weights do not fit
    (other / "config.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="does not fit Segmentor"):
        Predictor.from_pretrained(other, device="cpu")
    with pytest.raises(CheckpointError, match="not a release directory"):
        Predictor.from_pretrained(other / "config.json")


def test_export_refuses_a_non_empty_directory_and_unknown_formats(tmp_path, data_root, trained_best, command):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    proc = command("export_model.py", [f"checkpoint={trained_best}", f"out={out}"], data_root, check=False)
    one_line_error(proc, f"out={out} is not empty", "overwrite=true")
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    command("export_model.py", [f"checkpoint={trained_best}", f"out={out}", "overwrite=true"], data_root)
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary directory left

    proc = command("export_model.py", [f"checkpoint={trained_best}", f"out={tmp_path / 'x'}", "format=tflite"], data_root,
               check=False)
    one_line_error(proc, "format='tflite' is invalid", "pretrained, onnx, torchscript, exported_program")
    proc = command("export_model.py", [f"checkpoint={trained_best}"], data_root, check=False)
    one_line_error(proc, "out=...")


def test_pytorch_encoding_training_checkpoint_loads_safely(tmp_path):
    """PyTorch-Encoding's checkpoint.pth.tar: {state_dict, epoch, best_pred (numpy float64)}."""
    state = {"pretrained.conv1.0.weight": torch.randn(4, 3, 3, 3), "head.aspp.b0.0.weight": torch.randn(2, 4, 1, 1)}
    for zipped in (True, False):  # torch >= 1.6 files, and the older format of the paper's era
        path = tmp_path / f"checkpoint{int(zipped)}.pth.tar"
        torch.save({"state_dict": state, "epoch": 120, "best_pred": np.float64(0.4512)}, path,
                   _use_new_zipfile_serialization=zipped)
        loaded = load_file(path)
        assert loaded["epoch"] == 120 and loaded["best_pred"] == np.float64(0.4512)
        assert type(loaded["best_pred"]) is np.float64
        ckpt = load_model(path)
        assert ckpt.config is None and torch.equal(ckpt.state["backbone.conv1.0.weight"],
                                                   state["pretrained.conv1.0.weight"])
    # Files written under numpy 1 name the scalar's reconstructor numpy.core.multiarray.scalar.
    numpy1 = tmp_path / "numpy1.pth.tar"
    numpy1.write_bytes((tmp_path / "checkpoint0.pth.tar").read_bytes().replace(
        b"numpy._core.multiarray", b"numpy.core.multiarray"))
    assert load_file(numpy1)["best_pred"] == np.float64(0.4512)

    # Only float64 scalars are allowed, and nothing stays allowed after the load.
    for other in (np.float32(1.0), np.arange(3), np.int64(3)):
        torch.save({"best_pred": other}, tmp_path / "other.pt")
        with pytest.raises(CheckpointError, match="not a usable PyTorch checkpoint"):
            load_file(tmp_path / "other.pt")
    with pytest.raises(Exception, match="Weights only load failed"):
        torch.load(tmp_path / "checkpoint1.pth.tar", weights_only=True)
