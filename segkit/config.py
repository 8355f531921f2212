"""The configuration boundary: the one module that reads Hydra's ``DictConfig``.

The schemas (:mod:`segkit.settings`) are registered in Hydra's ConfigStore, so Hydra rejects a
value of the wrong type or an unknown key while it composes the config. :func:`train_job`,
:func:`eval_job` and :func:`export_model_job` then turn the composed config into typed settings,
check the rules between keys, and build what the layers below take whole (the inference options of
an evaluation). Everything below takes those objects, never a ``DictConfig``.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from segkit.errors import ConfigError
from segkit.inference.options import InferenceOptions
from segkit.settings import (CHECKPOINT_GROUPS, DemoDatasetSettings, EvalJob, ExportModelJob, FolderDatasetSettings,
                             TrainJob, check_class_weights, check_dataset, check_eval_sizes, check_max_batch,
                             check_resume, describe_omegaconf_error, physical_memory, saved_node, to_settings,
                             validate)


def register_schemas() -> None:
    """Store the schemas in Hydra's ConfigStore (``conf/train.yaml``, ``conf/eval.yaml`` and
    ``conf/export_model.yaml`` start from ``train_schema`` / ``eval_schema`` / ``export_model_schema``;
    ``conf/dataset/demo.yaml`` and ``folder.yaml`` from ``schema/<name>_dataset``)."""
    store = ConfigStore.instance()
    store.store(name="train_schema", node=TrainJob)
    store.store(name="eval_schema", node=EvalJob)
    store.store(name="export_model_schema", node=ExportModelJob)
    store.store(group="schema", name="demo_dataset", node=DemoDatasetSettings)
    store.store(group="schema", name="folder_dataset", node=FolderDatasetSettings)



def train_job(cfg: DictConfig) -> TrainJob:
    """The typed, checked settings of a training run."""
    job = to_settings(cfg, TrainJob)
    validate(job)
    check_resume(job.resume)
    check_class_weights(job.model.loss.class_weights)
    check_dataset(job.dataset, job.backbone.output_stride)
    return job


def checkpoint_path(cfg: DictConfig) -> Path:
    """``checkpoint=...`` of an evaluation (read before the rest: the checkpoint supplies defaults)."""
    value = OmegaConf.select(cfg, "checkpoint", throw_on_missing=False)
    if value in (None, "", "???") or OmegaConf.is_missing(cfg, "checkpoint"):
        raise ConfigError("the config needs a value for 'checkpoint': pass checkpoint=...")
    return Path(str(value)).expanduser()


#: Config nodes a segkit checkpoint carries, which rebuild its model and dataset.
def _with_saved(cfg: DictConfig, saved: Mapping[str, Any] | None, overrides: Sequence[str]) -> DictConfig:
    """``cfg`` with the dataset, backbone and model nodes of ``saved`` (the config a segkit checkpoint
    carries; None for a bare state dict) in place of the defaults, unless the command line picked
    that group (``dataset=cityscapes``); keys set on the command line (``dataset.root=/data``) win
    over both."""
    if saved is None:
        return cfg
    picked = {o.lstrip("+~").split("=", 1)[0] for o in overrides}
    keys = [o.lstrip("+") for o in overrides if "." in o.split("=", 1)[0]
            and o.lstrip("+").split(".", 1)[0] in CHECKPOINT_GROUPS]
    # Untyped, so that the saved dataset node may be of another schema than the default's.
    cfg = OmegaConf.create(OmegaConf.to_container(cfg, resolve=False))
    try:
        for group in CHECKPOINT_GROUPS:
            if isinstance(saved.get(group), Mapping) and group not in picked:
                cfg[group] = saved_node(group, saved[group])
        return OmegaConf.merge(cfg, OmegaConf.from_dotlist(keys))
    except OmegaConfBaseException as e:
        raise ConfigError(describe_omegaconf_error(e)) from None


def eval_job(cfg: DictConfig, saved: Mapping[str, Any] | None, overrides: Sequence[str]) -> EvalJob:
    """The typed, checked settings of an evaluation (``saved``: see :func:`_with_saved`)."""
    job = to_settings(_with_saved(cfg, saved, overrides), EvalJob)
    validate(job)
    check_max_batch(job.eval.max_batch)
    if job.eval.amp is not None and job.eval.dtype is not None:
        raise ConfigError(f"eval.amp={job.eval.amp} and eval.dtype={job.eval.dtype} are two ways to run in "
                          f"lower precision: pick one (amp: autocast per layer; dtype: weights cast once)")
    check_dataset(job.dataset, job.backbone.output_stride)
    check_eval_sizes(job.eval, job.dataset, physical_memory())
    if job.predict.input is not None and job.export.dir is None:
        raise ConfigError("predict.input needs export.dir=DIR: predictions are only written as files")
    return job


def inference_options(job: EvalJob) -> InferenceOptions:
    """The inference options of an evaluation, built once here and passed whole to the evaluator,
    the Predictor and model preparation: each field is the ``eval.*`` key of its name."""
    return InferenceOptions.from_settings(job.eval)


def export_model_job(cfg: DictConfig, saved: Mapping[str, Any] | None, overrides: Sequence[str]) -> ExportModelJob:
    """The typed, checked settings of ``segkit-export`` (``saved``: see :func:`_with_saved`)."""
    job = to_settings(_with_saved(cfg, saved, overrides), ExportModelJob)
    validate(job)
    check_dataset(job.dataset, job.backbone.output_stride)
    for size in job.check_sizes:
        if len(size) != 2 or min(size) < 2 * job.backbone.output_stride:
            raise ConfigError(f"check_sizes={job.check_sizes!r} is invalid: expected [height, width] pairs, "
                              f"each >= {2 * job.backbone.output_stride}")
    return job
