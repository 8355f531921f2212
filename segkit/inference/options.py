"""How a model predicts: one frozen object for every inference option, passed whole.

:class:`InferenceOptions` is built once (from ``eval.*`` at the config boundary, from a
:class:`~segkit.inference.predictor.Predictor`'s keyword arguments, or by a caller) and handed to
model preparation, the multi-scale algorithm, the dataset evaluation and the Predictor. Each field
has the name of its ``eval.*`` key, so a new option is one field here, one in
:class:`~segkit.settings.EvalSettings` and the code that uses it: :meth:`InferenceOptions.from_settings`
copies the fields by name.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from segkit.errors import ConfigError

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
                   "fp16": torch.float16, "float16": torch.float16}
#: a torch dtype or "bf16" / "fp16"; None runs in float32
AutocastDtype = torch.dtype | str | None
#: ``fusion`` choices: how the views' outputs are combined (:func:`~segkit.inference.multiscale.predict_multiscale`).
FUSIONS = ("softmax", "original")
#: ``window_placement`` choices: where the last window of a row or column goes.
WINDOW_PLACEMENTS = ("border", "original")


def torch_dtype(value: AutocastDtype, what: str) -> torch.dtype | None:
    """``value`` as a torch dtype (None: float32), or ConfigError naming ``what``."""
    if not isinstance(value, str):
        return value
    if value not in AUTOCAST_DTYPES:
        raise ConfigError(f"{what} dtype must be one of {sorted(AUTOCAST_DTYPES)} or null, got {value!r}")
    return AUTOCAST_DTYPES[value]


@dataclass(frozen=True)
class InferenceOptions:
    """Test-time augmentation, its numerics and the model's preparation; the defaults predict the
    whole image once in float32 with a folded, channels_last model.

    ``scales`` (None: the whole image at its size) and ``flip`` choose the views; ``align_corners``,
    ``fusion`` and ``window_placement`` how multi-scale views are resized, fused and tiled (the
    original PyTorch-Encoding behaviour is ``True`` / ``"original"`` / ``"original"``);
    ``max_batch`` the windows per forward (``"auto"``: per device and crop size); ``max_size``
    covers single-scale images with a longer side by crop windows; ``amp`` runs the forward under
    bf16/fp16 autocast. ``dtype``, ``channels_last``, ``fold_bn`` and ``compile`` say how
    :func:`~segkit.inference.prepare.prepare_model` prepares the network. Invalid values raise
    ValueError (ConfigError for a dtype) when the object is built.
    """

    scales: tuple[float, ...] | None = None
    flip: bool = False
    align_corners: bool = True
    fusion: str = "softmax"
    window_placement: str = "border"
    max_batch: int | str = "auto"
    max_size: int | None = None
    amp: AutocastDtype = None
    dtype: AutocastDtype = None
    channels_last: bool = True
    fold_bn: bool = True
    compile: bool = False

    def __post_init__(self) -> None:
        if self.fusion not in FUSIONS:
            raise ValueError(f"fusion must be one of {FUSIONS}, got {self.fusion!r}")
        if self.window_placement not in WINDOW_PLACEMENTS:
            raise ValueError(f"window_placement must be one of {WINDOW_PLACEMENTS}, got {self.window_placement!r}")
        if self.scales is not None:
            is_list = isinstance(self.scales, Sequence) and not isinstance(self.scales, str)
            scales = tuple(self.scales) if is_list else ()
            if not scales or not all(isinstance(s, (int, float)) and not isinstance(s, bool) and s > 0 for s in scales):
                raise ValueError(f"scales must be None or a non-empty list of numbers > 0, got {self.scales!r}")
            object.__setattr__(self, "scales", tuple(float(s) for s in scales))
        if self.max_batch != "auto" and (isinstance(self.max_batch, bool) or not isinstance(self.max_batch, int)
                                         or self.max_batch < 1):
            raise ConfigError(f"eval.max_batch must be a positive integer or 'auto', got {self.max_batch!r}")
        if self.max_size is not None and (isinstance(self.max_size, bool) or not isinstance(self.max_size, int)
                                          or self.max_size < 1):
            raise ValueError(f"max_size must be None or a positive integer, got {self.max_size!r}")
        torch_dtype(self.amp, "autocast")
        torch_dtype(self.dtype, "model")

    @classmethod
    def from_settings(cls, settings: Any) -> InferenceOptions:
        """The options ``settings`` hold (:class:`~segkit.settings.EvalSettings`: one key per field,
        of the field's name)."""
        return cls(**{f.name: getattr(settings, f.name) for f in dataclasses.fields(cls)})

    def replace(self, **changes: Any) -> InferenceOptions:
        return dataclasses.replace(self, **changes)
