"""Deployment graphs of a trained model, checked against PyTorch: ONNX, TorchScript, ExportedProgram.

Each graph takes a batch of any size, height and width and returns the logits at the input's size,
as :class:`~segkit.inference.predictor.Predictor` computes them at a single scale: BatchNorm is folded into
the convolutions, and the input is padded at the bottom/right to a multiple of the output stride
(with a black pixel) and the logits cropped back inside the graph. Inputs:

* ``N x 3 x H x W`` float32 RGB, normalised with the label space's mean/std (default), or
* ``N x H x W x 3`` uint8 RGB with ``normalize_inside`` (decoded image files as they are).

:func:`check_parity` runs a graph (ONNX through onnxruntime on CPU) next to the PyTorch model at
sizes the export did not see and reports the largest logit difference and the argmax agreement.
"""
from __future__ import annotations

import copy
import io
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import List

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from segkit.data.preprocess import Preprocess
from segkit.inference.multiscale import predict_single
from segkit.inference.options import InferenceOptions
from segkit.inference.prepare import prepare_model

#: format -> file name of the graph in the export directory.
GRAPH_FILES = {"onnx": "model.onnx", "torchscript": "model.torchscript.pt", "exported_program": "model.pt2"}
ONNX_OPSET = 18
INPUT, OUTPUT = "image", "logits"


@torch.jit.script_if_tracing
def pad_to_multiple(x: torch.Tensor, multiple: int, values: List[float]) -> torch.Tensor:
    """Pad N x C x H x W at the bottom/right to multiples of ``multiple``, channel c with ``values[c]``."""
    h, w = x.shape[-2], x.shape[-1]
    # Written as a rounded-up size minus the size: torch.export's symbolic shapes prove this one >= 0.
    ph = (h + multiple - 1) // multiple * multiple - h
    pw = (w + multiple - 1) // multiple * multiple - w
    return torch.cat([F.pad(x[:, c:c + 1], [0, pw, 0, ph], value=values[c]) for c in range(len(values))], 1)


@torch.jit.script_if_tracing
def crop_like(y: torch.Tensor, x: torch.Tensor, height_dim: int) -> torch.Tensor:
    """``y[..., :H, :W]`` for ``x``'s height and width (at ``height_dim``, ``height_dim + 1``)."""
    # index_select rather than slicing: a slice that may be empty or whole makes torch.export
    # specialise on the example's case.
    h, w = x.shape[height_dim], x.shape[height_dim + 1]
    y = y.index_select(2, torch.arange(h, device=y.device))
    return y.index_select(3, torch.arange(w, device=y.device))


class DeployModel(nn.Module):
    """``model`` (a prepared segmentor, eval mode) with the padding, cropping and optionally the
    normalisation of :class:`~segkit.inference.predictor.Predictor`'s single-scale path: images in, logits out."""

    def __init__(self, model: nn.Module, preprocess: Preprocess, output_stride: int, normalize_inside: bool) -> None:
        super().__init__()
        self.model = model
        self.output_stride = output_stride
        self.normalize_inside = normalize_inside
        self.pad_values = [0.0, 0.0, 0.0] if normalize_inside else [float(v) for v in preprocess.pad_value]
        self.register_buffer("mean", torch.tensor(preprocess.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(preprocess.std).view(1, 3, 1, 1), persistent=False)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        if self.normalize_inside:  # uint8 N x H x W x 3; black padding, then normalised like the image
            x = pad_to_multiple(image.permute(0, 3, 1, 2).float() / 255, self.output_stride, self.pad_values)
            x = (x - self.mean) / self.std
            return crop_like(self.model(x)["out"], image, 1)
        x = pad_to_multiple(image, self.output_stride, self.pad_values)
        return crop_like(self.model(x)["out"], image, 2)


def deploy_model(model: nn.Module, preprocess: Preprocess, output_stride: int, normalize_inside: bool) -> DeployModel:
    """A CPU copy of ``model`` with BatchNorm folded, in NCHW, wrapped as :class:`DeployModel`."""
    net = prepare_model(copy.deepcopy(model).float(), "cpu", InferenceOptions(channels_last=False))
    return DeployModel(net, preprocess, output_stride, normalize_inside).eval()


def graph_input(images: torch.Tensor, preprocess: Preprocess, normalize_inside: bool) -> torch.Tensor:
    """uint8 N x H x W x 3 RGB images in a graph's input format."""
    return images if normalize_inside else torch.stack([preprocess(image) for image in images])


def random_images(batch: int, height: int, width: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (batch, height, width, 3), generator=gen, dtype=torch.uint8)


def example_size(output_stride: int) -> tuple[int, int, int]:
    """Batch, height and width the graphs are exported with: a batch of 2 (torch.export would fix a
    batch of 1) and sizes that are not multiples of the stride (nor would the padding be dynamic)."""
    return 2, 4 * output_stride + 3, 6 * output_stride + 5


def _dynamic_shapes(normalize_inside: bool) -> dict[str, dict[int, object]]:
    dims = (0, 1, 2) if normalize_inside else (0, 2, 3)
    return {INPUT: {d: torch.export.Dim.DYNAMIC for d in dims}}


def _name_onnx_dims(proto: object, normalize_inside: bool) -> None:
    """Call the input's dynamic dimensions batch, height and width, in the output too."""
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    names = dict(zip((dims[i].dim_param for i in ((0, 1, 2) if normalize_inside else (0, 2, 3))),
                     ("batch", "height", "width")))
    for value in (*proto.graph.input, *proto.graph.output):
        for dim in value.type.tensor_type.shape.dim:
            if dim.dim_param in names:
                dim.dim_param = names[dim.dim_param]


def export_graph(fmt: str, graph: DeployModel, path: Path) -> None:
    """Write ``graph`` (see :func:`deploy_model`) to ``path`` as ``fmt`` (a key of :data:`GRAPH_FILES`),
    with dynamic batch, height and width."""
    batch, height, width = example_size(graph.output_stride)
    # Only the example's shape and dtype matter, not its values (nor hence the normalisation).
    example = graph_input(random_images(batch, height, width), Preprocess(), graph.normalize_inside)
    with torch.no_grad():
        if fmt == "onnx":
            import onnx

            program = torch.onnx.export(graph, (example,), input_names=[INPUT], output_names=[OUTPUT],
                                        dynamic_shapes=_dynamic_shapes(graph.normalize_inside),
                                        opset_version=ONNX_OPSET, dynamo=True)
            proto = program.model_proto
            # The exporter's intermediate shape annotations name some equal dimensions differently,
            # which onnxruntime warns about at every run; it infers the shapes itself.
            del proto.graph.value_info[:]
            _name_onnx_dims(proto, graph.normalize_inside)
            onnx.save(proto, str(path))
        elif fmt == "torchscript":
            # Through memory: torch.jit.save aborts the process when the disk is full (its zip
            # writer throws again in its destructor); a plain write fails with an OSError instead.
            encoded = io.BytesIO()
            torch.jit.save(torch.jit.trace(graph, example, check_trace=False), encoded)
            path.write_bytes(encoded.getvalue())
        elif fmt == "exported_program":
            program = torch.export.export(graph, (example,), dynamic_shapes=_dynamic_shapes(graph.normalize_inside))
            torch.export.save(program, str(path))
        else:
            raise ValueError(f"unknown graph format {fmt!r}; choose from {', '.join(GRAPH_FILES)}")


def load_graph(fmt: str, path: Path) -> Callable[[torch.Tensor], np.ndarray]:
    """A function running the graph file ``path`` on a CPU input batch (ONNX: onnxruntime)."""
    if fmt == "onnx":
        import onnxruntime

        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return lambda x: session.run([OUTPUT], {INPUT: x.numpy()})[0]
    module = (torch.jit.load(str(path), map_location="cpu") if fmt == "torchscript"
              else torch.export.load(str(path)).module())

    def run(x: torch.Tensor) -> np.ndarray:
        with torch.no_grad():
            return module(x).numpy()
    return run


@dataclass
class Parity:
    """How a graph's logits compare with PyTorch's over the checked inputs (N x H x W each)."""

    max_abs_diff: float
    max_abs_logit: float
    argmax_agreement: float
    inputs: list[tuple[int, int, int]]

    def ok(self, tolerance: float) -> bool:
        """Differences within ``tolerance`` x max(1, largest |logit|) and argmax agreement >= 99.99%."""
        return (self.max_abs_diff <= tolerance * max(1.0, self.max_abs_logit) and self.argmax_agreement >= 0.9999)

    def describe(self) -> str:
        sizes = ", ".join(f"{n}x{h}x{w}" for n, h, w in self.inputs)
        return (f"max |logit difference| {self.max_abs_diff:.3g} (largest |logit| {self.max_abs_logit:.3g}), "
                f"argmax agreement {self.argmax_agreement:.4%} over inputs {sizes}")


def check_parity(run: Callable[[torch.Tensor], np.ndarray], reference: nn.Module, preprocess: Preprocess,
                 output_stride: int, normalize_inside: bool, sizes: Sequence[Sequence[int]]) -> Parity:
    """Run ``run`` (:func:`load_graph`) and ``reference`` (the PyTorch model as the Predictor runs it,
    single scale) on random images of each (height, width) in ``sizes``, batches of 1, 3, 1, ..."""
    diff = top = 0.0
    agree = total = 0
    inputs = []
    for k, (height, width) in enumerate(sizes):
        images = random_images(3 if k % 2 else 1, height, width, seed=k + 1)
        inputs.append(tuple(images.shape[:3]))
        device = next(reference.parameters()).device
        expected = torch.stack([predict_single(reference, preprocess(image.to(device)), pad_multiple=output_stride,
                                               pad_value=preprocess.pad_value) for image in images]).cpu().numpy()
        got = run(graph_input(images, preprocess, normalize_inside))
        if got.shape != expected.shape:
            return Parity(math.inf, float(np.abs(expected).max()), 0.0, inputs)
        diff = max(diff, float(np.abs(got - expected).max()))
        top = max(top, float(np.abs(expected).max()))
        agree += int((got.argmax(1) == expected.argmax(1)).sum())
        total += expected.shape[0] * height * width
    return Parity(diff, top, agree / total, inputs)


def usage(fmt: str, normalize_inside: bool) -> str:
    """How to run an exported graph without segkit (Markdown, for the model card)."""
    file = GRAPH_FILES[fmt]
    lines = ["```python", "import json", "import numpy as np", "from PIL import Image", ""]
    if fmt == "onnx":
        lines += ["import onnxruntime as ort", ""]
    else:
        lines += ["import torch", ""]
    lines += ['space = json.load(open("config.json"))["label_space"]',
              'image = np.asarray(Image.open("image.jpg").convert("RGB"))        # H x W x 3 uint8']
    if normalize_inside:
        lines += ["x = image[None]                                                    # 1 x H x W x 3 uint8"]
    else:
        lines += ['x = (image / 255 - np.array(space["mean"])) / np.array(space["std"])',
                  "x = x.transpose(2, 0, 1)[None].astype(np.float32)                # 1 x 3 x H x W"]
    if fmt == "onnx":
        lines += [f'session = ort.InferenceSession("{file}", providers=["CPUExecutionProvider"])',
                  f'logits = session.run(["{OUTPUT}"], {{"{INPUT}": x}})[0]              # 1 x C x H x W']
    else:
        load = (f'torch.jit.load("{file}")' if fmt == "torchscript" else f'torch.export.load("{file}").module()')
        lines += [f"model = {load}", "with torch.no_grad():",
                  "    logits = model(torch.from_numpy(x)).numpy()                # 1 x C x H x W"]
    lines += ["labels = logits[0].argmax(0)                                       # H x W class ids",
              'names = [space["classes"][i] for i in np.unique(labels)]',
              'colours = np.array(space["palette"], np.uint8)[labels]            # H x W x 3',
              'submission = np.array(space["submission_values"], np.uint8)[labels]   # benchmark label PNG',
              "```", "",
              "Batch, height and width are free; the graph pads to its output stride and crops the logits back "
              "itself. This is single-scale prediction; multi-scale + flip needs segkit's Predictor."]
    return "\n".join(lines)
