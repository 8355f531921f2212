"""Fold eval-mode BatchNorm into the convolution that feeds it, for inference.

In eval mode ``bn(conv(x))`` is one affine map per output channel after the conv, so the conv's
weight and bias can absorb it: one op and one pass over the feature map fewer per pair (about 5%
of a ResNeSt forward on CPU), the same outputs up to float rounding.
"""
from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_weights
from torchvision.ops import FrozenBatchNorm2d

_FOLDABLE = (nn.BatchNorm2d, FrozenBatchNorm2d)


def _outputs(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    out = model(x)
    return list(out.values()) if isinstance(out, Mapping) else [out]


@torch.no_grad()
def fold_batchnorm(model: nn.Module, example: torch.Tensor) -> int:
    """Fold, in place, every norm layer whose only input is a ``Conv2d``'s output; returns how many.

    The pairs are found by running ``example`` through ``model`` (so only layers the eval forward
    uses are touched, wherever they sit in the module tree); each folded norm becomes
    ``nn.Identity``. The outputs for ``example`` are compared before and after, so a conv whose
    output also went elsewhere cannot be folded silently wrong. ``model`` must be in eval mode.
    """
    if model.training:
        raise ValueError("fold_batchnorm needs a model in eval mode (it folds the running statistics)")
    names = {m: name for name, m in model.named_modules()}
    produced: dict[int, tuple[nn.Conv2d, torch.Tensor]] = {}
    feeds: dict[nn.Module, list[nn.Module | None]] = {}

    def after_conv(conv: nn.Module, _inputs: tuple, output: torch.Tensor) -> None:
        produced[id(output)] = (conv, output)  # keep the tensor alive so that its id stays unique

    def before_norm(norm: nn.Module, inputs: tuple) -> None:
        source = produced.get(id(inputs[0]))
        feeds.setdefault(norm, []).append(source[0] if source and source[1] is inputs[0] else None)

    hooks = [m.register_forward_hook(after_conv) for m in model.modules() if isinstance(m, nn.Conv2d)]
    hooks += [m.register_forward_pre_hook(before_norm) for m in model.modules()
              if isinstance(m, _FOLDABLE) and m.running_mean is not None]
    try:
        reference = _outputs(model, example)
    finally:
        for hook in hooks:
            hook.remove()
    produced.clear()

    # A conv called more than once, or feeding two norms, or a norm applied more than once, is left alone.
    convs = [sources[0] for sources in feeds.values() if len(sources) == 1 and sources[0] is not None]
    pairs = [(sources[0], norm) for norm, sources in feeds.items()
             if len(sources) == 1 and sources[0] is not None and convs.count(sources[0]) == 1]
    for conv, norm in pairs:
        conv.weight, conv.bias = fuse_conv_bn_weights(conv.weight, conv.bias, norm.running_mean,
                                                      norm.running_var, norm.eps, norm.weight, norm.bias)
        parent, _, attr = names[norm].rpartition(".")
        setattr(model.get_submodule(parent), attr, nn.Identity())

    for before, after in zip(reference, _outputs(model, example)):
        tolerance = 1e-3 * before.abs().max().item() + 1e-5
        if not torch.allclose(before, after, rtol=0, atol=tolerance):
            raise RuntimeError(f"folding BatchNorm changed the output of {type(model).__name__} by "
                               f"{(before - after).abs().max().item():.3g}: a folded conv's output is "
                               "used elsewhere too")
    return len(pairs)
