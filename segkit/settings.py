"""The typed settings: one dataclass per config group, each key with its default and its rules.

The YAML files in ``conf/`` are presets of these schemas, and :mod:`segkit.config` (the one module
that reads Hydra's ``DictConfig``) turns a composed config into them. Everything else (data,
models, checkpoints, inference, evaluation, training) takes these typed settings, never a
``DictConfig``. :func:`validate` checks every key against the rules next to its default
(:func:`setting`) and raises :class:`~segkit.errors.ConfigError` naming the key, the value and what
is valid, so the checks, the table-driven tests and this file cannot disagree.
:func:`saved_settings` reads the settings a segkit checkpoint carries.
"""
from __future__ import annotations

import dataclasses
import math
import os
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from omegaconf import MISSING, OmegaConf
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

from segkit.data import DATASETS
from segkit.data.preprocess import Preprocess
from segkit.errors import ConfigError
from segkit.models.norm import NORM_LAYERS
from segkit.models.resnest import BACKBONES

AMP_CHOICES = ("bf16", "fp16")
DEVICE_CHOICES = ("auto", "cpu", "cuda")
CONVENTIONS = ("all", "present")

def setting(default: Any = MISSING, *, ge: float | None = None, gt: float | None = None,
            le: float | None = None, lt: float | None = None, choices: Sequence[Any] | None = None,
            length: int | None = None, nonempty: bool = False, each: Mapping[str, Any] | None = None,
            ascending: bool = False, numbers: bool = False, doc: str = "") -> Any:
    """A dataclass field with its default and its constraints (checked by :func:`validate`).

    ``ge``/``gt``/``le``/``lt`` bound a number, ``choices`` lists the allowed values (``None`` is
    always allowed for an Optional field), ``length``/``nonempty``/``ascending`` constrain a list
    and ``each`` holds the bounds of its items; ``numbers`` requires a list of numbers (for a field
    typed ``Any``).
    """
    rules = {k: v for k, v in dict(ge=ge, gt=gt, le=le, lt=lt, choices=choices, length=length,
                                   nonempty=nonempty, each=each, ascending=ascending, numbers=numbers).items()
             if v is not None and v is not False}
    metadata = {"rules": rules, "doc": doc}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=metadata)
    return field(default=default, metadata=metadata)


# -- schemas -----------------------------------------------------------------------------------
@dataclass
class DatasetSettings:
    name: str = setting(choices=tuple(DATASETS))
    root: str = setting(nonempty=True)
    num_classes: Optional[int] = setting(None, ge=1, le=255, doc="null: from the data (folder datasets)")
    base_size: int = setting(ge=1)
    crop_size: int = setting(ge=1)
    scale_range: List[float] = setting([0.5, 2.0], length=2, each={"gt": 0}, ascending=True)
    mean: List[float] = setting([0.485, 0.456, 0.406], length=3, each={"ge": 0, "le": 1})
    std: List[float] = setting([0.229, 0.224, 0.225], length=3, each={"gt": 0})
    eval_scales: Optional[List[float]] = setting(None, nonempty=True, each={"gt": 0})
    miou_convention: str = setting("present", choices=CONVENTIONS)
    epochs: int = setting(ge=1)
    train_split: str = setting(nonempty=True)
    val_split: str = setting(nonempty=True)
    jitter: bool = False
    map_out_of_range_to_ignore: bool = False

    @property
    def preprocess(self) -> Preprocess:
        return Preprocess(tuple(self.mean), tuple(self.std))


@dataclass
class DemoDatasetSettings(DatasetSettings):
    """The built-in demo scenes also say how to generate them."""

    seed: int = setting(0, ge=0)
    num_train: int = setting(400, ge=1)
    num_val: int = setting(80, ge=1)
    image_size: int = setting(64, ge=16)


@dataclass
class FolderDatasetSettings(DatasetSettings):
    """A user's own data also says how its masks are stored."""

    mask_format: str = setting("index", choices=("index", "rgb", "auto"),
                               doc="index PNGs, RGB colours of classes.yaml's palette, or per file")
    mask_dir: str = setting("masks", nonempty=True, doc="ROOT/<mask_dir>/<split>/ (masks_index after "
                                                        "prepare folder --to-index)")


@dataclass
class BackboneSettings:
    name: str = setting(choices=tuple(BACKBONES))
    pretrained: Optional[str] = setting(None, doc="null | imagenet | a local file | an http(s) URL")
    output_stride: int = setting(8, choices=(8, 16))
    norm: str = setting("bn", choices=tuple(NORM_LAYERS))
    zero_init_last: bool = False


@dataclass
class OhemSettings:
    thresh: float = setting(0.7, gt=0, le=1, doc="keep pixels whose true-class probability is below this")
    min_kept: int = setting(100_000, ge=1, doc="... and at least this many of the hardest per batch")


@dataclass
class LossSettings:
    aux_weight: float = setting(0.2, ge=0)
    extra: List[Dict[str, Any]] = setting([], doc="segmentation-models-pytorch losses: [{name, weight}]")
    class_weights: Any = setting(None, doc="null | one weight per class | auto (from the training masks)")
    balance: str = setting("median_frequency", choices=("median_frequency", "inverse_log"),
                           doc="how class_weights=auto is computed")
    # Any, not Optional[OhemSettings]: OmegaConf cannot merge an override into a None structured
    # node; _typed_ohem() turns the mapping into OhemSettings (keys and types checked).
    ohem: Any = setting(None, doc="null | {thresh, min_kept}: hard pixels only (main head)")


@dataclass
class ModelSettings:
    aux: bool = True
    channels: int = setting(256, ge=1)
    aspp_dropout: float = setting(0.5, ge=0, lt=1)
    dropout: float = setting(0.1, ge=0, lt=1)
    aux_dropout: float = setting(0.1, ge=0, lt=1)
    align_corners: bool = True
    loss: LossSettings = field(default_factory=LossSettings)
    init: Optional[str] = setting(None, nonempty=True, doc="null | zoo:NAME | a checkpoint | a release directory: "
                                                           "start training from these weights (fine-tuning)")


@dataclass
class OptimSettings:
    name: str = setting("sgd", choices=("sgd",))
    base_lr: float = setting(0.01, gt=0)
    base_batch_size: int = setting(16, ge=1)
    momentum: float = setting(0.9, ge=0, lt=1)
    weight_decay: float = setting(1e-4, ge=0)
    nesterov: bool = False
    head_lr_mult: float = setting(10.0, gt=0)


@dataclass
class ScheduleSettings:
    name: str = setting("poly", choices=("poly",))
    power: float = setting(0.9, ge=0)
    warmup_iters: int = setting(0, ge=0)


@dataclass
class TrainSettings:
    batch_size: int = setting(16, ge=1, doc="total over all ranks and accumulation steps")
    accum_steps: int = setting(1, ge=1)
    epochs: int = setting(ge=1)
    iters: Optional[int] = setting(None, ge=1)
    seed: int = setting(0, ge=0)
    device: str = setting("auto", choices=DEVICE_CHOICES)
    workers: int = setting(4, ge=0)
    amp: Optional[str] = setting(None, choices=AMP_CHOICES)
    channels_last: bool = False
    compile: bool = False
    keep_freed_memory: bool = setting(True, doc="CPU: malloc keeps freed memory for reuse, no page faults per map (RSS stays at its peak)")
    # Both recompute in backward for less memory, with the same gradients; off, as the original.
    selective_recompute: bool = setting(False, doc="keep conv outputs, recompute BN/ReLU/attention in backward")
    grad_checkpointing: bool = setting(False, doc="recompute whole blocks and heads in backward")
    sync_bn: bool = True
    log_every: int = setting(20, ge=1)
    val_every: Optional[int] = setting(None, ge=1)
    val_max_size: Optional[int] = setting(2048, ge=1, doc="validation: longer images go through crop windows")
    val_images: int = setting(4, ge=0, doc="validation images shown in TensorBoard (image | prediction | truth)")
    ckpt_every: int = setting(1000, ge=1)
    progress: bool = True


@dataclass
class EvalSettings:
    split: str = setting(nonempty=True)
    # Any, not Optional[List[float]]: OmegaConf cannot merge an interpolation (the dataset's scales)
    # into a typed list; the rules below check the list instead.
    scales: Any = setting(None, numbers=True, nonempty=True, each={"gt": 0}, doc="null = single scale")
    flip: bool = True
    # The original evaluation (PyTorch-Encoding's MultiEvalModule) resizes with align_corners=True,
    # fuses views as exp(logits + flipped logits) summed over scales and starts every window at
    # k * stride; segkit's defaults differ in fusion and window placement (README, "Evaluation").
    align_corners: bool = setting(True, doc="bilinear resizes of images and scores, as the original")
    fusion: str = setting("softmax", choices=("softmax", "original"),
                          doc="softmax: mean of probabilities; original: exp-sum of logits (overflow-safe)")
    window_placement: str = setting("border", choices=("border", "original"),
                                    doc="border: last window ends at the border; original: k * stride, padded")
    max_batch: Any = setting("auto", doc="auto or a positive integer")
    max_size: Optional[int] = setting(2048, ge=1, doc="single scale: longer images go through crop windows")
    amp: Optional[str] = setting(None, choices=AMP_CHOICES)
    dtype: Optional[str] = setting(None, choices=("bf16",), doc="the prepared model's weights, end to end")
    channels_last: bool = True
    fold_bn: bool = True
    compile: bool = False
    keep_freed_memory: bool = setting(True, doc="CPU: malloc keeps freed memory for reuse, no page faults per map (RSS stays at its peak)")
    device: str = setting("auto", choices=DEVICE_CHOICES)
    workers: int = setting(2, ge=0)
    progress: bool = True
    report: bool = setting(True, doc="write report/index.html next to metrics.json")
    report_worst: int = setting(24, ge=0, doc="the report's worst images by per-image mIoU")


@dataclass
class ExportSettings:
    dir: Optional[str] = setting(None, nonempty=True)
    overwrite: bool = False
    overlay: bool = True
    side_by_side: bool = False


@dataclass
class PredictSettings:
    input: Optional[str] = setting(None, nonempty=True)


@dataclass
class TrainJob:
    """Everything ``train_seg.py`` runs on."""

    dataset: DatasetSettings = MISSING
    backbone: BackboneSettings = MISSING
    model: ModelSettings = MISSING
    optim: OptimSettings = MISSING
    schedule: ScheduleSettings = MISSING
    train: TrainSettings = field(default_factory=TrainSettings)
    resume: Any = setting(None, doc="null | true | auto | latest | a checkpoint path")


@dataclass
class EvalJob:
    """Everything ``eval_seg.py`` runs on."""

    checkpoint: str = setting(nonempty=True)
    dataset: DatasetSettings = MISSING
    backbone: BackboneSettings = MISSING
    model: ModelSettings = MISSING
    eval: EvalSettings = field(default_factory=EvalSettings)
    export: ExportSettings = field(default_factory=ExportSettings)
    predict: PredictSettings = field(default_factory=PredictSettings)


#: ``format=`` choices of ``segkit-export`` (:mod:`segkit.checkpoints.release`, :mod:`segkit.inference.deploy`).
EXPORT_FORMATS = ("pretrained", "onnx", "torchscript", "exported_program")


@dataclass
class ExportModelJob:
    """Everything ``segkit-export`` runs on: a checkpoint turned into a release or a deployable graph."""

    checkpoint: str = setting(nonempty=True)
    format: str = setting("pretrained", choices=EXPORT_FORMATS)
    out: str = setting(nonempty=True, doc="the directory to write (refused when not empty unless overwrite)")
    overwrite: bool = False
    normalize_inside: bool = setting(False, doc="onnx/torchscript/exported_program: uint8 N x H x W x 3 "
                                                "input, normalised inside the graph")
    check_sizes: List[List[int]] = setting([[97, 131], [160, 121]], nonempty=True,
                                           doc="H, W of the parity checks (other than the export's own)")
    tolerance: float = setting(1e-4, gt=0, doc="largest accepted |logit difference| / max(1, |logit|)")
    dataset: DatasetSettings = MISSING
    backbone: BackboneSettings = MISSING
    model: ModelSettings = MISSING


@dataclass
class SavedSettings:
    """What a segkit checkpoint's config rebuilds: the network and its data settings."""

    dataset: DatasetSettings = MISSING
    backbone: BackboneSettings = MISSING
    model: ModelSettings = MISSING


#: A dataset whose settings extend :class:`DatasetSettings` (the others use it as is).
DATASET_SCHEMAS: dict[str, type[DatasetSettings]] = {"demo": DemoDatasetSettings,
                                                      "folder": FolderDatasetSettings}


# -- checks ------------------------------------------------------------------------------------
def _expected(rules: Mapping[str, Any], optional: bool) -> str:
    parts = []
    if "choices" in rules:
        parts.append("one of " + ", ".join(map(str, rules["choices"])))
    for key, word in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")):
        if key in rules:
            parts.append(f"{word} {rules[key]}")
    if rules.get("numbers"):
        parts.append("a list of numbers")
    if "length" in rules:
        parts.append(f"a list of {rules['length']} values")
    elif rules.get("nonempty"):
        parts.append("not empty")
    if "each" in rules:
        parts.append("each value " + _expected(rules["each"], False))
    if rules.get("ascending"):
        parts.append("in increasing order")
    text = ", ".join(parts)
    return f"null or {text}" if optional else text


def _breaks(value: Any, rules: Mapping[str, Any]) -> bool:
    if rules.get("numbers") and not (isinstance(value, (list, tuple)) and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)):
        return True
    if "choices" in rules and value not in rules["choices"]:
        return True
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if isinstance(value, float) and not math.isfinite(value):
            return True
        return _breaks_bounds(float(value), rules)
    if isinstance(value, (list, tuple, str)):
        if rules.get("nonempty") and len(value) == 0:
            return True
        if "length" in rules and len(value) != rules["length"]:
            return True
    if isinstance(value, (list, tuple)):
        if "each" in rules and any(_breaks(v, rules["each"]) for v in value):
            return True
        if rules.get("ascending") and any(a > b for a, b in zip(value, value[1:])):
            return True
    return False


def _breaks_bounds(value: float, rules: Mapping[str, Any]) -> bool:
    return (("ge" in rules and not value >= rules["ge"]) or ("gt" in rules and not value > rules["gt"])
            or ("le" in rules and not value <= rules["le"]) or ("lt" in rules and not value < rules["lt"]))


def validate(settings: Any, prefix: str = "") -> None:
    """Check every field of a settings dataclass (recursively) against its :func:`setting` rules."""
    for f in dataclasses.fields(settings):
        value, key = getattr(settings, f.name), f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            validate(value, f"{key}.")
            continue
        rules = f.metadata.get("rules", {})
        if value is None or not rules:
            continue
        if _breaks(value, rules):
            hint = typing.get_type_hints(type(settings))[f.name]
            optional = hint is Any or type(None) in typing.get_args(hint)
            raise ConfigError(f"{key}={_show(value)} is invalid: expected {_expected(rules, optional)}")


def _show(value: Any) -> str:
    return repr(list(value)) if isinstance(value, tuple) else repr(value)


def check_dataset(d: DatasetSettings, output_stride: int) -> None:
    if d.crop_size % output_stride:
        raise ConfigError(f"dataset.crop_size={d.crop_size} is not a multiple of the backbone output stride "
                          f"{output_stride}; try {max(output_stride, d.crop_size // output_stride * output_stride)}")


def check_max_batch(value: Any) -> None:
    if value != "auto" and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ConfigError(f"eval.max_batch={value!r} is invalid: expected auto or an integer >= 1")


def physical_memory() -> int:
    """Bytes of memory this machine has."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def check_eval_sizes(e: EvalSettings, d: DatasetSettings, memory: int) -> None:
    """ConfigError when ``eval.scales`` (or, single scale, ``eval.max_size``) imply more memory for one
    image than the machine has (``memory`` bytes).

    Multi-scale prediction resizes the image so that its long side is ``ceil(dataset.base_size *
    scale)`` and holds every scale's resized image (3 x L x L float32, at worst square) with the
    class scores of one scale (C x L x L); single scale, an image up to ``eval.max_size`` a side goes
    through the network whole, with its C x L x L scores. These are lower bounds of what prediction
    needs (the network's activations come on top), so a setting refused here cannot work."""
    classes = d.num_classes or 1  # a folder dataset's count comes from its data: at least one
    per_pixel = 4 * (3 + classes)  # float32 image and scores
    if e.scales is not None:
        sides = [math.ceil(d.base_size * s) for s in e.scales]
        needed = 4 * 3 * sum(side * side for side in sides) + 4 * classes * max(sides) ** 2
        if needed > memory:
            largest = max(e.scales)
            fits = math.isqrt(memory // per_pixel) / d.base_size
            raise ConfigError(
                f"eval.scales={list(e.scales)} is too large: at scale {largest:g} the image's long side is "
                f"{max(sides)} px (ceil(dataset.base_size={d.base_size} x {largest:g})), and the scaled images with "
                f"the class scores of one ({classes} classes x {max(sides)} x {max(sides)} float32) need at least "
                f"{needed / 2**30:.1f} GiB, more than this machine's {memory / 2**30:.1f} GiB of memory; "
                f"a single scale up to about {fits:.2f} fits")
    elif e.max_size is not None and per_pixel * e.max_size ** 2 > memory:
        fits = math.isqrt(memory // per_pixel)
        raise ConfigError(
            f"eval.max_size={e.max_size} is too large: an image up to {e.max_size} px a side is predicted whole, "
            f"and it with its class scores ({classes} classes x {e.max_size} x {e.max_size} float32) needs at least "
            f"{per_pixel * e.max_size ** 2 / 2**30:.1f} GiB, more than this machine's {memory / 2**30:.1f} GiB of "
            f"memory; at most about {fits} fits (longer images then go through crop windows)")


def check_class_weights(value: Any) -> None:
    if value is None or value == "auto":
        return
    if not (isinstance(value, (list, tuple)) and value and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0 for v in value)):
        raise ConfigError(f"model.loss.class_weights={value!r} is invalid: expected null, auto or a list of "
                          f"one weight >= 0 per class")


def check_resume(value: Any) -> None:
    if not (value is None or isinstance(value, bool) or (isinstance(value, str) and value)):
        raise ConfigError(f"resume={value!r} is invalid: expected null, true, auto, latest or a checkpoint path")


def check_world_size(train: TrainSettings, world_size: int) -> None:
    """The total batch must split evenly over the ranks and accumulation steps."""
    if train.batch_size % (world_size * train.accum_steps):
        raise ConfigError(
            f"train.batch_size={train.batch_size} (the total over all ranks) must be a positive multiple of "
            f"{world_size} ranks x train.accum_steps={train.accum_steps}")


# -- from a config to settings -----------------------------------------------------------------
def to_settings(cfg: Any, schema: type) -> Any:
    """Resolve ``cfg`` into ``schema``'s dataclasses (the dataset node into its own schema)."""
    try:
        node = OmegaConf.structured(schema)
        node.dataset = DATASET_SCHEMAS.get(OmegaConf.select(cfg, "dataset.name"), DatasetSettings)
        job = OmegaConf.to_object(OmegaConf.merge(node, cfg))
        job.model.loss.ohem = _typed_ohem(job.model.loss.ohem)
        return job
    except MissingMandatoryValue as e:
        raise ConfigError(f"the config needs a value for '{e.full_key}': pass {e.full_key}=...") from None
    except OmegaConfBaseException as e:
        raise ConfigError(describe_omegaconf_error(e)) from None


def _typed_ohem(value: Any) -> OhemSettings | None:
    if value is None or isinstance(value, OhemSettings):
        return value
    if not isinstance(value, Mapping):
        raise ConfigError(f"model.loss.ohem={value!r} is invalid: expected null or {{thresh: 0.7, min_kept: 100000}}")
    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(OhemSettings), value))
    except OmegaConfBaseException as e:
        raise ConfigError(f"model.loss.ohem.{describe_omegaconf_error(e)}") from None


def describe_omegaconf_error(e: OmegaConfBaseException) -> str:
    """One line for an OmegaConf error: the key it concerns and its first line of explanation."""
    message = str(getattr(e, "msg", "") or e).strip().splitlines()[0]
    key = getattr(e, "full_key", None)
    return f"{key}: {message}" if key else message


CHECKPOINT_GROUPS = ("dataset", "backbone", "model")


def _known_keys(schema: type, data: Mapping[str, Any]) -> dict[str, Any]:
    """``data`` without the keys ``schema`` does not have (older checkpoints hold removed keys)."""
    types = typing.get_type_hints(schema)
    out = {}
    for key, value in data.items():
        if key not in types:
            continue
        nested = types[key]
        out[key] = (_known_keys(nested, value) if dataclasses.is_dataclass(nested) and isinstance(value, Mapping)
                    else value)
    return out


def saved_node(group: str, saved: Mapping[str, Any]) -> dict[str, Any]:
    schema = {"dataset": DATASET_SCHEMAS.get(saved.get("name"), DatasetSettings),
              "backbone": BackboneSettings, "model": ModelSettings}[group]
    return _known_keys(schema, saved)


def saved_settings(saved: Mapping[str, Any]) -> SavedSettings:
    """The typed, checked dataset, backbone and model settings of a segkit checkpoint's config
    (ConfigError naming the key when one is missing or invalid)."""
    missing = [g for g in CHECKPOINT_GROUPS if not isinstance(saved.get(g), Mapping)]
    if missing:
        raise ConfigError(f"the saved config has no {', '.join(missing)} settings")
    nodes = {g: saved_node(g, saved[g]) for g in CHECKPOINT_GROUPS}
    settings = to_settings(OmegaConf.create(nodes), SavedSettings)
    validate(settings)
    return settings


def as_dict(settings: Any) -> dict[str, Any]:
    """Plain containers (what checkpoints and ``config.yaml`` hold)."""
    return dataclasses.asdict(settings)
