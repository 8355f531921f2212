#!/usr/bin/env python
"""Evaluate a checkpoint (multi-scale + flip by default) and export masks, e.g.

    python eval_seg.py checkpoint=runs/x/best.pt
    python eval_seg.py dataset=ade20k backbone=resnest101 checkpoint=PATH export.dir=masks/
    python eval_seg.py checkpoint=PATH predict.input=photos/ export.dir=out/
"""
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from segkit.cli import register_resolvers, run_cli

register_resolvers()


@hydra.main(config_path="conf", config_name="eval", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from segkit.engine.evaluator import run_evaluation

    hydra_cfg = HydraConfig.get()
    run_cli(lambda: run_evaluation(cfg, Path(hydra_cfg.runtime.output_dir), list(hydra_cfg.overrides.task)))


if __name__ == "__main__":
    main()
