"""Composing the packaged configs into typed settings, as the command-line entry points do."""
from hydra import compose, initialize_config_module

from segkit.cli import register_resolvers
from segkit.config import DatasetSettings, EvalJob, TrainJob, eval_job, train_job


def compose_cfg(config_name: str, *overrides: str):
    register_resolvers()
    with initialize_config_module("segkit.conf", version_base="1.3"):
        return compose(config_name, overrides=list(overrides))


def train_settings(*overrides: str) -> TrainJob:
    return train_job(compose_cfg("train", *overrides))


def eval_settings(*overrides: str, saved: dict | None = None) -> EvalJob:
    return eval_job(compose_cfg("eval", "checkpoint=x.pt", *overrides), saved, list(overrides))


def dataset_settings(name: str, *overrides: str) -> DatasetSettings:
    return train_settings(f"dataset={name}", *overrides).dataset
