"""Backbones (ResNeSt family), heads and the DeepLabV3 segmentor."""
from segkit.models.pretrained import load_pretrained
from segkit.models.resnest import BACKBONES, ResNeSt, create_backbone
from segkit.models.segmentor import Segmentor, build_segmentor

__all__ = ["BACKBONES", "ResNeSt", "Segmentor", "build_segmentor", "create_backbone", "load_pretrained"]
