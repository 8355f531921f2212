"""``segkit-export``'s work: a checkpoint becomes a release directory (:mod:`segkit.checkpoints.release`) or a
deployment graph (:mod:`segkit.inference.deploy`) checked against PyTorch, written whole or not at all."""
from __future__ import annotations

from pathlib import Path

import torch

from segkit.checkpoints.checkpoint import ModelCheckpoint, label_space_of
from segkit.checkpoints.release import read_release, release_config, write_meta, write_release
from segkit.errors import ConfigError, ExportError
from segkit.files import tensor_bytes, write_dir_atomic
from segkit.inference.deploy import GRAPH_FILES, check_parity, deploy_model, export_graph, load_graph, usage
from segkit.inference.prepare import load_network
from segkit.settings import ExportModelJob, as_dict


def export_model(job: ExportModelJob, ckpt: ModelCheckpoint) -> Path:
    """Write ``ckpt`` to ``job.out`` in ``job.format``; returns the directory. A non-empty ``out`` is
    refused unless ``job.overwrite``; a graph whose parity check fails is not written (ExportError)."""
    out = Path(job.out).expanduser()
    if out.exists() and not out.is_dir():
        raise ConfigError(f"out={out} is a file; pass a directory")
    if out.is_dir() and any(out.iterdir()) and not job.overwrite:
        raise ConfigError(f"out={out} is not empty; choose another directory or pass overwrite=true to replace it")
    space = label_space_of(ckpt, job.dataset).configured(job.dataset)
    config = {"dataset": as_dict(job.dataset), "backbone": as_dict(job.backbone), "model": as_dict(job.model)}
    # Built (and run) before anything is written: weights that do not fit fail here.
    net = load_network(ckpt, job.backbone, job.model, space.num_classes, torch.device("cpu"))

    if job.format == "pretrained":
        write_dir_atomic(out, lambda d: write_release(d, ckpt.state, config, space, ckpt), size=tensor_bytes(ckpt.state))
        read_release(out)  # what was written reads back
        print(f"wrote release {out} (model.safetensors, config.json, README.md)")
        return out

    stride = job.backbone.output_stride

    def fill(directory: Path) -> None:
        path = directory / GRAPH_FILES[job.format]
        export_graph(job.format, deploy_model(net, space.preprocess, stride, job.normalize_inside), path)
        parity = check_parity(load_graph(job.format, path), net, space.preprocess, stride, job.normalize_inside,
                              job.check_sizes)
        runtime = "onnxruntime (CPU)" if job.format == "onnx" else "the loaded graph"
        print(f"{job.format} parity, {runtime} vs PyTorch: {parity.describe()}")
        if not parity.ok(job.tolerance):
            raise ExportError(f"the {job.format} graph does not reproduce the model: {parity.describe()} "
                              f"(tolerance {job.tolerance} x max(1, |logit|)); nothing written to {out}")
        layout = "N x H x W x 3 uint8 RGB" if job.normalize_inside else "N x 3 x H x W float32, normalised"
        graph = {"input": {"name": "image", "layout": layout}, "output": {"name": "logits",
                                                                           "layout": "N x C x H x W float32"},
                 "normalize_inside": job.normalize_inside, "output_stride": stride,
                 "parity": {"max_abs_diff": parity.max_abs_diff, "argmax_agreement": parity.argmax_agreement,
                            "inputs": [list(i) for i in parity.inputs]}}
        write_meta(directory, release_config(config, space, ckpt, path, fmt=f"segkit-{job.format}", graph=graph),
                   usage(job.format, job.normalize_inside))

    write_dir_atomic(out, fill, size=tensor_bytes(net.state_dict()))  # a graph holds about its weights' bytes
    print(f"wrote {out / GRAPH_FILES[job.format]} with config.json and README.md")
    return out
