"""Composing the packaged configs into typed settings, as the command-line entry points do."""
from hydra import compose, initialize_config_module

from segkit.cli import register_resolvers
from segkit.config import eval_job, export_model_job, train_job
from segkit.settings import DatasetSettings, EvalJob, ExportModelJob, TrainJob


def compose_cfg(config_name: str, *overrides: str, hydra: bool = False):
    """The composed config; with ``hydra``, also its ``hydra`` node (the run directory, ...)."""
    register_resolvers()
    with initialize_config_module("segkit.conf", version_base="1.3"):
        return compose(config_name, overrides=list(overrides), return_hydra_config=hydra)


def train_settings(*overrides: str) -> TrainJob:
    return train_job(compose_cfg("train", *overrides))


def eval_settings(*overrides: str, saved: dict | None = None) -> EvalJob:
    return eval_job(compose_cfg("eval", "checkpoint=x.pt", *overrides), saved, list(overrides))


def export_settings(*overrides: str, saved: dict | None = None) -> ExportModelJob:
    return export_model_job(compose_cfg("export_model", "checkpoint=x.pt", "out=o", *overrides), saved, list(overrides))


def dataset_settings(name: str, *overrides: str) -> DatasetSettings:
    return train_settings(f"dataset={name}", *overrides).dataset
