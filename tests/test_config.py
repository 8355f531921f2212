"""Every config composes with Hydra's compose API, and typos are caught with the valid choices."""
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from segkit.cli import register_resolvers

CONF = Path(__file__).resolve().parents[1] / "conf"
DATASETS = sorted(p.stem for p in (CONF / "dataset").glob("*.yaml"))
BACKBONES = sorted(p.stem for p in (CONF / "backbone").glob("*.yaml"))


@pytest.fixture(scope="module", autouse=True)
def hydra_conf():
    register_resolvers()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        yield


def test_groups_hold_what_the_issue_names():
    assert {"ade20k", "cityscapes", "demo", "folder"} <= set(DATASETS)
    assert set(BACKBONES) == {"resnest14", "resnest26", "resnest50", "resnest101", "resnest200", "resnest269",
                              "resnet50d", "resnet101d"}


@pytest.mark.parametrize("dataset", DATASETS)
@pytest.mark.parametrize("backbone", BACKBONES)
def test_every_dataset_and_backbone_composes(dataset, backbone):
    cfg = compose("train", overrides=[f"dataset={dataset}", f"backbone={backbone}"])
    OmegaConf.resolve(cfg)
    assert cfg.backbone.name == backbone and cfg.dataset.name == dataset
    assert cfg.dataset.crop_size % cfg.backbone.output_stride == 0


@pytest.mark.parametrize("dataset,epochs,crop", [("ade20k", 120, 480), ("cityscapes", 240, 768)])
def test_defaults_are_the_paper_recipe(dataset, epochs, crop):
    cfg = compose("train", overrides=[f"dataset={dataset}", "backbone=resnest101"])
    assert cfg.train.batch_size == 16 and cfg.train.epochs == epochs and cfg.dataset.crop_size == crop
    assert (cfg.optim.base_lr, cfg.optim.base_batch_size, cfg.optim.head_lr_mult) == (0.01, 16, 10)
    assert (cfg.optim.momentum, cfg.optim.weight_decay) == (0.9, 1e-4)
    assert (cfg.schedule.name, cfg.schedule.power) == ("poly", 0.9)
    assert cfg.backbone.output_stride == 8 and cfg.backbone.pretrained == "imagenet"
    assert cfg.model.aux and cfg.model.loss.aux_weight == 0.2


def test_user_override_names_exist():
    cfg = compose("train", overrides=["dataset.root=/x", "dataset.crop_size=256", "train.batch_size=8",
                                      "train.iters=5", "train.amp=bf16", "train.seed=3", "resume=true"])
    assert (cfg.dataset.root, cfg.dataset.crop_size, cfg.train.batch_size, cfg.train.iters) == ("/x", 256, 8, 5)


def test_unknown_group_option_lists_valid_choices():
    with pytest.raises(ConfigCompositionException, match=r"(?s)resnest102.*resnest101"):
        compose("train", overrides=["backbone=resnest102"])


def test_unknown_key_is_rejected():
    with pytest.raises(ConfigCompositionException, match="bach_size"):
        compose("train", overrides=["train.bach_size=8"])


def test_slurm_launcher_preset_composes():
    cfg = compose("train", overrides=["hydra/launcher=slurm", "hydra.launcher.nodes=2"], return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("submitit_launcher.SlurmLauncher")
    assert (launcher.nodes, launcher.tasks_per_node, launcher.gpus_per_node) == (2, 8, 8)
