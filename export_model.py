#!/usr/bin/env python
"""Export a checkpoint as a release or a deployment graph (the installed command is ``segkit-export``):

    python export_model.py checkpoint=runs/x/best.pt out=release/
    python export_model.py checkpoint=runs/x/best.pt format=onnx normalize_inside=true out=onnx/
"""
from segkit.cli import export_main

if __name__ == "__main__":
    export_main()
