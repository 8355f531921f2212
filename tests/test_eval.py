"""eval_seg.py end to end (its main, in this process), the PyTorch-Encoding import, and prediction on a
folder of images."""
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from segkit.models.convert import convert_encoding_state_dict, is_encoding_state_dict
from segkit.models.resnest import create_backbone
from segkit.models.segmentor import Segmentor


@pytest.fixture(scope="module")
def data_root(shared_data_root):
    return shared_data_root


def test_checkpoint_alone_rebuilds_model_and_dataset(tmp_path, data_root, cli_eval, trained_last):
    out = tmp_path / "eval"
    proc = cli_eval([f"checkpoint={trained_last}", f"hydra.run.dir={out}", "eval.scales=[0.75,1.0]",
                     f"export.dir={tmp_path / 'masks'}"], data_root)
    assert "horizontal stripes" in proc.stdout and "pixAcc" in proc.stdout  # the demo classes, from the checkpoint
    record = json.loads((out / "metrics.json").read_text())
    assert record["dataset"] == "demo" and record["backbone"] == "resnest14" and record["scales"] == [0.75, 1.0]
    assert record["flip"] is True and record["num_images"] == 2 and len(record["IoU"]) == 7
    assert len(record["checkpoint_sha256"]) == 64 and record["convention"] == "present"
    labels = sorted((tmp_path / "masks" / "labels").rglob("*.png"))
    assert len(labels) == 2

    # Exported label PNGs (the demo's submission format: train ids) scored against the ground truth
    # give the printed numbers.
    from segkit.data import build_dataset
    from segkit.evaluation.metrics import ConfusionMatrix
    from segkit.settings import DemoDatasetSettings
    dataset = build_dataset(DemoDatasetSettings(**torch.load(trained_last, weights_only=True)["config"]["dataset"]), "val")
    cm = ConfusionMatrix(dataset.num_classes)
    for i in range(len(dataset)):
        pred = np.asarray(Image.open(tmp_path / "masks" / "labels" / f"{dataset.name(i)}.png")).astype(np.int64)
        cm.update(torch.from_numpy(pred), torch.from_numpy(dataset.load(i)[1].astype(np.int64)))
    assert cm.compute("present")["mIoU"] == pytest.approx(record["mIoU"])


def test_overrides_win_and_export_refuses_to_overwrite(tmp_path, data_root, cli_eval, trained_last):
    masks = tmp_path / "masks"
    masks.mkdir()
    (masks / "keep.txt").write_text("mine")
    proc = cli_eval([f"checkpoint={trained_last}", f"hydra.run.dir={tmp_path / 'e'}", "eval.scales=null",
                     "eval.flip=false", f"export.dir={masks}"], data_root, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "export.overwrite=true" in proc.stderr
    assert (masks / "keep.txt").read_text() == "mine"


def test_missing_checkpoint_is_a_message(tmp_path, data_root, cli_eval):
    proc = cli_eval([f"checkpoint={tmp_path / 'none.pt'}", f"hydra.run.dir={tmp_path}"], data_root, check=False)
    assert proc.returncode == 2 and "checkpoint file not found" in proc.stderr and "Traceback" not in proc.stderr
    proc = cli_eval([f"hydra.run.dir={tmp_path}"], data_root, check=False)
    assert proc.returncode == 2 and "needs a value for 'checkpoint': pass checkpoint=..." in proc.stderr
    assert "Traceback" not in proc.stderr


def test_predict_a_folder_of_images(tmp_path, data_root, cli_eval, trained_last):
    photos = tmp_path / "photos" / "trip"
    photos.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name, size in (("a.jpg", (40, 30)), ("b.png", (24, 48))):
        Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(photos / name)
    out = tmp_path / "out"
    proc = cli_eval([f"checkpoint={trained_last}", f"predict.input={tmp_path / 'photos'}", f"export.dir={out}",
                     f"hydra.run.dir={tmp_path / 'e'}", "eval.scales=null", "eval.flip=false"], data_root)
    assert "wrote predictions of 2 images" in proc.stdout
    label = np.asarray(Image.open(out / "labels" / "trip" / "b.png"))
    assert label.shape == (24, 48) and label.max() < 7
    assert (out / "color" / "trip" / "a.png").is_file() and (out / "overlay" / "trip" / "a.png").is_file()


class _EncodingDeepLabV3(nn.Module):
    """The original PyTorch-Encoding module layout (names and order), to produce a state dict and a
    reference output; the backbone is ours, under the original attribute name ``pretrained``."""

    def __init__(self, num_classes):
        super().__init__()
        bn = nn.BatchNorm2d
        self.pretrained = create_backbone("resnest14", output_stride=8, num_classes=1000)
        head = nn.Module()
        aspp = nn.Module()
        for i, rate in enumerate((0, 12, 24, 36)):
            conv = nn.Conv2d(2048, 16, 1 if rate == 0 else 3, padding=rate, dilation=max(rate, 1), bias=False)
            setattr(aspp, f"b{i}", nn.Sequential(conv, bn(16), nn.ReLU()))
        aspp.b4 = nn.Module()
        aspp.b4.gap = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(2048, 16, 1, bias=False), bn(16), nn.ReLU())
        aspp.project = nn.Sequential(nn.Conv2d(80, 16, 1, bias=False), bn(16), nn.ReLU(), nn.Dropout2d(0.5))
        head.aspp = aspp
        head.block = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1, bias=False), bn(16), nn.ReLU(), nn.Dropout(0.1),
                                   nn.Conv2d(16, num_classes, 1))
        self.head = head
        self.auxlayer = nn.Module()
        self.auxlayer.conv5 = nn.Sequential(nn.Conv2d(1024, 16, 3, padding=1, bias=False), bn(16), nn.ReLU(),
                                            nn.Dropout(0.1), nn.Conv2d(16, num_classes, 1))

    def forward(self, x):
        c4 = self.pretrained(x)[-1]
        a = self.head.aspp
        pooled = a.b4.gap(c4).expand(-1, -1, *c4.shape[2:])
        feats = torch.cat([a.b0(c4), a.b1(c4), a.b2(c4), a.b3(c4), pooled], 1)
        out = self.head.block(a.project(feats))
        return F.interpolate(out, x.shape[2:], mode="bilinear", align_corners=True)


def test_pytorch_encoding_checkpoint_imports_with_identical_outputs():
    torch.manual_seed(0)
    original = _EncodingDeepLabV3(num_classes=6).eval()
    for m in original.modules():  # non-trivial BN statistics so a swapped key would show
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    state = original.state_dict()
    assert is_encoding_state_dict(state)
    ours = Segmentor(create_backbone("resnest14", output_stride=8), num_classes=6, channels=16).eval()
    ours.load_state_dict(convert_encoding_state_dict(state), strict=True)
    x = torch.randn(1, 3, 48, 64)
    with torch.no_grad():
        torch.testing.assert_close(ours(x)["out"], original(x), rtol=1e-4, atol=1e-5)
