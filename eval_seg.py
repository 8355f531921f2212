#!/usr/bin/env python
"""Evaluate a checkpoint (multi-scale + flip by default) and export masks (the installed command is
``segkit-eval``):

    python eval_seg.py checkpoint=runs/x/best.pt
    python eval_seg.py dataset=ade20k backbone=resnest101 checkpoint=PATH export.dir=masks/
    python eval_seg.py checkpoint=PATH predict.input=photos/ export.dir=out/
"""
from segkit.cli import eval_main

if __name__ == "__main__":
    eval_main()
