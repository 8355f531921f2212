"""segkit: ResNeSt + DeepLabV3 semantic segmentation in pure PyTorch."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from segkit.inference.predictor import Prediction, Predictor

__all__ = ["Prediction", "Predictor", "__version__"]


def __getattr__(name: str) -> Any:
    # segkit.Predictor imports torch and the models on first use, not on `import segkit`.
    if name in ("Prediction", "Predictor"):
        from segkit.inference import predictor

        return getattr(predictor, name)
    raise AttributeError(f"module 'segkit' has no attribute {name!r}")
