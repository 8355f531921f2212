"""The release format (``segkit-export format=pretrained``): a directory anyone can load without pickle,
network access or the training config::

    model.safetensors   the weights (the checkpoint's state dict, as trained)
    config.json         format, the settings that rebuild the network, the label space, the
                        weights' sha256 and where they came from
    README.md           a model card: backbone, dataset, iterations, metrics, classes, sha256

:func:`read_release` checks the directory (files present, weights matching the sha256 that
config.json records) and returns a :class:`~segkit.checkpoints.checkpoint.ModelCheckpoint`, so everything that
reads checkpoints (``Predictor.from_pretrained``, ``eval_seg.py checkpoint=DIR``, ``segkit-export``)
reads releases too.
"""
from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file as load_safetensors
from safetensors.torch import save_file as save_safetensors

from segkit import __version__
from segkit.checkpoints.checkpoint import ModelCheckpoint, read_label_space
from segkit.data.label_space import LabelSpace
from segkit.errors import CheckpointError
from segkit.files import sha256_file, write_text_atomic

FORMAT = "segkit-pretrained"
FORMAT_VERSION = 1
WEIGHTS = "model.safetensors"
CONFIG = "config.json"
CARD = "README.md"


PREDICTOR_USAGE = """```python
from segkit import Predictor

predictor = Predictor.from_pretrained("THIS_DIRECTORY", tta=True)   # tta=False: single scale
prediction = predictor.predict("image.jpg")
prediction.save("out/", kinds=("labels", "color", "overlay"))
```"""


def source_sha256(source: ModelCheckpoint) -> str:
    """The sha256 of a checkpoint file, or of a release directory's weights."""
    return sha256_file(source.path / WEIGHTS if source.path.is_dir() else source.path)


def release_config(config: Mapping[str, Any], label_space: LabelSpace, source: ModelCheckpoint, weights: Path,
                   fmt: str = FORMAT, **extra: Any) -> dict[str, Any]:
    """What config.json holds: ``config`` (the dataset, backbone and model settings), the label space,
    the ``weights`` file (already written) with its sha256, the source checkpoint, and ``extra``."""
    return {"format": fmt, "format_version": FORMAT_VERSION, "segkit_version": __version__,
            "config": dict(config), "label_space": label_space.to_dict(),
            "weights": {"file": weights.name, "sha256": sha256_file(weights)},
            "source": {"checkpoint": source.path.name, "sha256": source_sha256(source),
                       "iteration": source.iteration, "metrics": source.metrics}, **extra}


def write_meta(directory: Path, meta: Mapping[str, Any], usage: str) -> None:
    """config.json and the README.md model card (``usage``: how to run the model, Markdown)."""
    write_text_atomic(directory / CONFIG, json.dumps(meta, indent=2) + "\n")
    write_text_atomic(directory / CARD, model_card(meta, usage))


def model_card(meta: Mapping[str, Any], usage: str) -> str:
    """README.md of a release, from its config.json."""
    cfg, space, src = meta["config"], meta["label_space"], meta["source"]
    backbone, model = cfg["backbone"], cfg["model"]
    metrics = src["metrics"]
    metric_lines = ([f"| {k} | {v:.4f} |" for k, v in metrics.items() if isinstance(v, (int, float))]
                    if metrics else [])
    scales = space["eval_scales"]
    lines = [
        f"# DeepLabV3 + {backbone['name']} on {space['dataset']}",
        "",
        "Semantic segmentation model exported by segkit "
        f"{meta['segkit_version']} (release format {meta['format']} v{meta['format_version']}).",
        "",
        "| | |", "|---|---|",
        f"| backbone | {backbone['name']}, output stride {backbone['output_stride']}, norm {backbone['norm']} |",
        f"| head | DeepLabV3 (ASPP), {model['channels']} channels, auxiliary FCN head: {model['aux']} |",
        f"| dataset | {space['dataset']}, {len(space['classes'])} classes |",
        f"| training iterations | {src['iteration'] if src['iteration'] is not None else 'not recorded'} |",
        f"| source checkpoint | {src['checkpoint']}, sha256 `{src['sha256']}` |",
        f"| weights | {meta['weights']['file']}, sha256 `{meta['weights']['sha256']}` |",
        f"| input | RGB, values / 255 normalised with mean {space['mean']}, std {space['std']} |",
        f"| evaluation | base size {space['base_size']}, crop {space['crop_size']}, "
        f"scales {scales if scales else 'single scale'} |",
        "",
        "## Metrics",
        "",
        *(_published_lines(meta["published"]) if meta.get("published") else
          ["Validation metrics recorded in the source checkpoint (single scale):", "", "| metric | value |",
           "|---|---|", *metric_lines] if metric_lines
          else ["The source checkpoint records no metrics (``best.pt`` holds those it was chosen by)."]),
        "",
        "## Use",
        "",
        usage,
        "",
        "## Classes",
        "",
        "| id | name | submission value | colour |", "|---|---|---|---|",
        *[f"| {i} | {name} | {value} | {tuple(colour)} |" for i, (name, value, colour)
          in enumerate(zip(space["classes"], space["submission_values"], space["palette"]))],
        "",
    ]
    return "\n".join(lines)


def _published_lines(published: Mapping[str, Any]) -> list[str]:
    """The model card's metrics of a release that quotes published numbers (``published`` in
    config.json: the metrics, ``source`` and ``reproduce``, the command that measures them)."""
    values = [(k, v) for k, v in published.items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
    return [f"Published by {published.get('source', 'its authors')} (multi-scale + flip):", "",
            "| metric | value |", "|---|---|", *[f"| {k} | {v:.2f} |" for k, v in values], "",
            *(["Reproduce them (the recipe's evaluation settings are this release's):", "", "```",
               *published["reproduce"], "```"] if published.get("reproduce") else [])]


def write_release(directory: Path, state: Mapping[str, torch.Tensor], config: Mapping[str, Any],
                  label_space: LabelSpace, source: ModelCheckpoint, usage: str = PREDICTOR_USAGE,
                  **extra: Any) -> None:
    """Write the release files into ``directory`` (an empty one: see :func:`segkit.files.write_dir_atomic`);
    ``usage`` goes into the model card, ``extra`` into config.json."""
    weights = directory / WEIGHTS
    # safetensors wants contiguous tensors that share no memory.
    save_safetensors({k: v.detach().contiguous().clone() for k, v in state.items()}, str(weights),
                     metadata={"format": "pt"})
    write_meta(directory, release_config(config, label_space, source, weights, **extra), usage)


def read_release(directory: Path) -> ModelCheckpoint:
    """A release directory as a checkpoint; CheckpointError naming the missing, malformed or
    mismatched file."""
    config_path, weights_path = directory / CONFIG, directory / WEIGHTS
    for path in (config_path, weights_path):
        if not path.is_file():
            raise CheckpointError(f"{directory} is not a complete segkit release: {path.name} is missing "
                                  f"(a release holds {WEIGHTS}, {CONFIG} and {CARD})")
    try:
        meta = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{config_path}: not readable JSON ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{config_path}: not a segkit release config (format must be {FORMAT!r})")
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{config_path}: release format version {meta.get('format_version')!r}; this segkit "
                              f"reads version {FORMAT_VERSION}")
    missing = [k for k in ("config", "label_space", "weights", "source") if not isinstance(meta.get(k), dict)]
    if missing:
        raise CheckpointError(f"{config_path}: missing {', '.join(missing)}")
    expected = meta["weights"].get("sha256")
    if sha256_file(weights_path) != expected:
        raise CheckpointError(f"{weights_path} does not match {CONFIG} (sha256 differs from {expected}): the "
                              f"weights belong to another release or are damaged")
    try:
        state = load_safetensors(str(weights_path))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{weights_path}: not a usable safetensors file ({e})") from None
    source = meta["source"]
    return ModelCheckpoint(directory, state, meta["config"], read_label_space(meta["label_space"], config_path),
                           source.get("iteration"), source.get("metrics"))
