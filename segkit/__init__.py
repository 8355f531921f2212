"""segkit: ResNeSt + DeepLabV3 semantic segmentation in pure PyTorch."""

__version__ = "0.1.0"
