"""The typed config boundary: every group composes into its schema, and every key's bad values are
caught right after composition with a message naming the key, the value and what is valid."""
import dataclasses
import typing

import pytest

from config_helpers import compose_cfg, eval_settings, export_settings, train_settings
from segkit.config import eval_job, export_model_job
from segkit.settings import DemoDatasetSettings, EvalJob, TrainJob, as_dict, check_world_size
from segkit.errors import ConfigError


def _leaves(settings, prefix=""):
    """(dotted key, field) for every setting below a job, nested groups included."""
    hints = typing.get_type_hints(type(settings))
    for f in dataclasses.fields(settings):
        value = getattr(settings, f.name)
        if dataclasses.is_dataclass(value):
            yield from _leaves(value, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", f, hints[f.name]


def _bad_values(rules, typ):
    """Values that break each rule (in the field's own type, so only the rule can reject them)."""
    number = float if float in typing.get_args(typ) + (typ,) else int
    if "choices" in rules:
        yield "no-such-choice" if isinstance(rules["choices"][0], str) else 7
    for op, delta in (("ge", -1), ("gt", 0), ("le", 1), ("lt", 0)):
        if op in rules:
            yield number(rules[op] + delta)
    if "length" in rules:
        yield [1.0] * (rules["length"] + 1)
    if rules.get("nonempty"):
        yield [] if typing.get_origin(typing.get_args(typ)[0] if typing.get_args(typ) else typ) is list else ""
    if "each" in rules:
        inner = rules["each"]
        bad = inner["gt"] if "gt" in inner else inner["ge"] - 1 if "ge" in inner else inner["le"] + 1
        yield [float(bad)] * rules.get("length", 1)
    if rules.get("ascending"):
        yield [2.0, 1.0]


TRAIN_BASE = ("dataset=demo", "backbone=resnest14")
ROWS = []
for job, base in ((train_settings(*TRAIN_BASE), "train"), (eval_settings(), "eval")):
    for key, f, typ in _leaves(job):
        for value in _bad_values(f.metadata.get("rules", {}), typ):
            ROWS.append((base, key, value))
for key, f, typ in _leaves(export_settings()):
    if not key.startswith(("dataset.", "backbone.", "model.")):  # the eval rows cover those groups
        for value in _bad_values(f.metadata.get("rules", {}), typ):
            ROWS.append(("export", key, value))


def test_every_constrained_key_has_a_row():
    keys = {key for _, key, _ in ROWS}
    assert {"train.batch_size", "train.epochs", "train.workers", "train.log_every", "optim.base_lr",
            "dataset.crop_size", "eval.scales", "eval.workers", "dataset.eval_scales", "backbone.name",
            "dataset.demo" if False else "dataset.image_size", "model.loss.aux_weight", "schedule.power"} <= keys
    assert len(ROWS) > 60


@pytest.mark.parametrize("config,key,value", ROWS, ids=[f"{c}:{k}={v!r}" for c, k, v in ROWS])
def test_bad_value_names_key_and_value(config, key, value):
    override = f"{key}={value!r}" if isinstance(value, str) else f"{key}={value}"
    override = override.replace(" ", "")
    with pytest.raises(ConfigError) as err:
        if config == "train":
            train_settings(*TRAIN_BASE, override)
        elif config == "export":
            export_settings(override)
        else:
            eval_settings(override)
    message = str(err.value)
    assert message.startswith(f"{key}=") and "expected" in message and "\n" not in message


@pytest.mark.parametrize("dataset", ["ade20k", "cityscapes", "demo", "folder"])
@pytest.mark.parametrize("backbone", ["resnest14", "resnest50", "resnet50d", "resnest269"])
def test_every_group_composes_into_its_schema(dataset, backbone):
    job = train_settings(f"dataset={dataset}", f"backbone={backbone}")
    assert isinstance(job, TrainJob) and job.dataset.name == dataset and job.backbone.name == backbone
    assert isinstance(job.dataset, DemoDatasetSettings) == (dataset == "demo")
    ev = eval_settings(f"dataset={dataset}", f"backbone={backbone}")
    assert isinstance(ev, EvalJob) and ev.eval.scales == job.dataset.eval_scales
    assert ev.eval.split == job.dataset.val_split


def test_cross_field_rules():
    with pytest.raises(ConfigError, match=r"^dataset.crop_size=36 is not a multiple of the backbone output stride 8"):
        train_settings("dataset.crop_size=36")
    with pytest.raises(ConfigError, match=r"train.batch_size=6 .* multiple of 2 ranks x train.accum_steps=2"):
        check_world_size(train_settings("train.batch_size=6", "train.accum_steps=2").train, 2)
    check_world_size(train_settings("train.batch_size=8", "train.accum_steps=2").train, 2)
    with pytest.raises(ConfigError, match="eval.max_batch='many' is invalid: expected auto or an integer >= 1"):
        eval_settings("eval.max_batch=many")
    with pytest.raises(ConfigError, match="eval.max_batch=0"):
        eval_settings("eval.max_batch=0")
    assert eval_settings("eval.max_batch=3").eval.max_batch == 3
    with pytest.raises(ConfigError, match=r"^eval.amp=bf16 and eval.dtype=bf16 are two ways .* pick one"):
        eval_settings("eval.amp=bf16", "eval.dtype=bf16")
    assert eval_settings("eval.dtype=bf16").eval.dtype == "bf16"
    assert train_settings("train.grad_checkpointing=true").train.grad_checkpointing is True
    assert train_settings().train.selective_recompute is False  # the original keeps everything
    assert train_settings("train.selective_recompute=true").train.selective_recompute is True
    with pytest.raises(ConfigError, match="predict.input needs export.dir"):
        eval_settings("predict.input=photos")
    with pytest.raises(ConfigError, match="the config needs a value for 'checkpoint'"):
        eval_job(compose_cfg("eval"), None, [])


def test_export_settings_take_the_checkpoint_and_check_sizes():
    saved = as_dict(train_settings("dataset=demo", "backbone=resnest26", "model.channels=32"))
    job = export_settings("format=onnx", saved=saved)
    assert (job.format, job.dataset.name, job.backbone.name, job.model.channels) == ("onnx", "demo", "resnest26", 32)
    assert export_settings("dataset=cityscapes", saved=saved).dataset.name == "cityscapes"
    export_rows = [(k, v) for c, k, v in ROWS if c == "export"]
    assert ("format", "no-such-choice") in export_rows and ("tolerance", 0.0) in export_rows
    with pytest.raises(ConfigError, match=r"check_sizes=\[\[97, 131, 3\]\] is invalid: expected \[height, width\]"):
        export_settings("check_sizes=[[97,131,3]]")
    with pytest.raises(ConfigError, match="each >= 16"):
        export_settings("check_sizes=[[8,64]]")
    with pytest.raises(ConfigError, match="the config needs a value for 'out'"):
        export_model_job(compose_cfg("export_model", "checkpoint=x.pt"), None, [])


def test_resume_values():
    for value, expected in (("null", None), ("true", True), ("auto", "auto"), ("/x/last.pt", "/x/last.pt")):
        assert train_settings(f"resume={value}").resume == expected
    with pytest.raises(ConfigError, match="resume=3 is invalid"):
        train_settings("resume=3")


def test_one_key_per_setting():
    cfg = compose_cfg("eval", "checkpoint=x.pt")
    assert "convention" not in cfg.eval and "ignore_index" not in cfg.dataset and "name" not in cfg.model
    assert "ignore_index" not in cfg.model.loss


def test_settings_from_a_checkpoint_config():
    """An evaluation takes the checkpoint's dataset/backbone/model (older ones may hold removed
    keys), the command line's group choices and keys on top."""
    saved = as_dict(train_settings("dataset=demo", "backbone=resnest26", "dataset.num_train=5", "model.channels=32"))
    saved["model"]["name"] = "deeplabv3"  # keys of older checkpoints
    saved["dataset"]["ignore_index"] = 255
    saved["model"]["loss"]["ignore_index"] = 255
    job = eval_settings(saved=saved)
    assert (job.dataset.name, job.dataset.num_train, job.backbone.name, job.model.channels) == ("demo", 5, "resnest26", 32)
    assert job.eval.scales == [0.75, 1.0, 1.25]  # the demo's, not ADE20K's
    job = eval_settings("dataset.root=/data", "backbone=resnest50", saved=saved)
    assert (job.dataset.root, job.dataset.num_train, job.backbone.name, job.model.channels) == ("/data", 5, "resnest50", 32)
    job = eval_settings("dataset=cityscapes", saved=saved)
    assert job.dataset.name == "cityscapes" and job.dataset.crop_size == 768


def test_engine_reads_no_dictconfig():
    import pathlib
    import re
    engine = pathlib.Path(__file__).resolve().parents[1] / "segkit" / "engine"
    for path in engine.glob("*.py"):
        text = path.read_text()
        assert not re.search(r"\bcfg\.", text) and "DictConfig" not in text, path.name
