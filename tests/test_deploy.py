"""Deployment graphs (segkit-export format=onnx | torchscript | exported_program) against the PyTorch
model, run here independently of the export command's own check, at sizes and batches the export
never saw, with the normalisation inside the graph and without."""
import json
import subprocess
import sys
from collections import Counter

import numpy as np
import onnx
import onnxruntime
import pytest
import torch

from segkit import Predictor
from segkit.inference.deploy import GRAPH_FILES, deploy_model, example_size, export_graph
from train_helpers import ROOT, env

# Neither the export's example (2 x 35 x 53 at stride 8) nor the command's check sizes.
SIZES = [(1, 41, 67), (3, 64, 29)]


@pytest.fixture(scope="module")
def data_root(shared_data_root):
    return shared_data_root


@pytest.fixture(scope="module")
def predictor(trained_last):
    return Predictor.from_checkpoint(trained_last, device="cpu")


def images(n, h, w, seed=0):
    return torch.randint(0, 256, (n, h, w, 3), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


def normalised(batch, predictor):
    return torch.stack([predictor.label_space.preprocess(image) for image in batch])


def pytorch_logits(predictor, batch):
    """What the Predictor computes at a single scale (its logits), image by image."""
    from segkit.inference.multiscale import predict_image
    from segkit.inference.options import InferenceOptions
    pre = predictor.label_space.preprocess
    return torch.stack([predict_image(predictor.model, pre(image), InferenceOptions(), pad_value=pre.pad_value)
                        for image in batch]).numpy()


def assert_parity(run_graph, predictor, normalize_inside):
    for k, (n, h, w) in enumerate(SIZES):
        batch = images(n, h, w, seed=k)
        expected = pytorch_logits(predictor, batch)
        got = run_graph(batch if normalize_inside else normalised(batch, predictor))
        assert got.shape == expected.shape == (n, 7, h, w)
        assert np.abs(got - expected).max() <= 1e-4
        assert (got.argmax(1) == expected.argmax(1)).mean() >= 0.9999


def test_onnx_export_command_checks_itself_and_onnxruntime_agrees(tmp_path, data_root, trained_last, predictor):
    out = tmp_path / "onnx"
    proc = subprocess.run([sys.executable, str(ROOT / "export_model.py"), f"checkpoint={trained_last}", "format=onnx",
                           "normalize_inside=true", f"out={out}", "check_sizes=[[45,51],[30,70]]"], cwd=ROOT,
                          env=env(data_root), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "onnx parity, onnxruntime (CPU) vs PyTorch: max |logit difference|" in proc.stdout
    assert "argmax agreement 100.0000% over inputs 1x45x51, 3x30x70" in proc.stdout
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "model.onnx"]
    meta = json.loads((out / "config.json").read_text())
    assert meta["graph"]["input"]["layout"] == "N x H x W x 3 uint8 RGB"
    assert meta["graph"]["parity"]["max_abs_diff"] < 1e-4
    assert "onnxruntime" in (out / "README.md").read_text()

    model = onnx.load(out / "model.onnx")
    ops = Counter(node.op_type for node in model.graph.node)
    assert ops["BatchNormalization"] == 0 and ops["Conv"] > 0  # folded into the convolutions
    dims = [d.dim_param for d in model.graph.input[0].type.tensor_type.shape.dim]
    assert dims[:3] == ["batch", "height", "width"]
    session = onnxruntime.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    assert_parity(lambda x: session.run(["logits"], {"image": x.numpy()})[0], predictor, normalize_inside=True)


@pytest.mark.parametrize("fmt, normalize_inside", [("onnx", False), ("torchscript", False), ("torchscript", True),
                                                    ("exported_program", False), ("exported_program", True)])
def test_graph_formats_match_pytorch(tmp_path, predictor, fmt, normalize_inside):
    s = predictor.label_space
    graph = deploy_model(predictor.model, s.preprocess, predictor.output_stride, normalize_inside)
    path = tmp_path / GRAPH_FILES[fmt]
    export_graph(fmt, graph, path)
    assert example_size(8)[1:] not in [size[1:] for size in SIZES]
    if fmt == "onnx":
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        run_graph = lambda x: session.run(["logits"], {"image": x.numpy()})[0]  # noqa: E731
    elif fmt == "torchscript":
        module = torch.jit.load(str(path))
        run_graph = lambda x: module(x).detach().numpy()  # noqa: E731
    else:
        module = torch.export.load(str(path)).module()
        run_graph = lambda x: module(x).detach().numpy()  # noqa: E731
    assert_parity(run_graph, predictor, normalize_inside)
