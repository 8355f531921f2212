#!/usr/bin/env python
"""Train a segmentor (the installed command is ``segkit-train``). The defaults are the paper's recipe:

    python train_seg.py dataset=ade20k backbone=resnest101
    torchrun --nproc_per_node=8 train_seg.py dataset=cityscapes backbone=resnest200
"""
from segkit.cli import train_main

if __name__ == "__main__":
    train_main()
