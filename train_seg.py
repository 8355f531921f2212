#!/usr/bin/env python
"""Train a segmentor. The defaults are the paper's recipe, e.g.

    python train_seg.py dataset=ade20k backbone=resnest101
    torchrun --nproc_per_node=8 train_seg.py dataset=cityscapes backbone=resnest200
"""
import json
import os
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from segkit.cli import register_resolvers, run_cli

register_resolvers()


@hydra.main(config_path="conf", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from segkit.engine.trainer import train  # after Hydra has parsed: `--help` stays fast

    summary = run_cli(lambda: train(cfg, Path(HydraConfig.get().runtime.output_dir)))
    if os.environ.get("RANK", "0") == "0":
        print(json.dumps(summary))


if __name__ == "__main__":
    main()
