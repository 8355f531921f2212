"""Reading ImageNet weights for a backbone: nothing, a local file, or an http(s) URL.

URLs go through torch.hub's cache (``$TORCH_HOME/hub/checkpoints``) with its hash check: a file
name of the form ``name-<sha256 prefix>.pth`` (the original ResNeSt release names) is verified after
download. ``pretrained: imagenet`` picks the original release of the chosen backbone. Every file is
read with ``weights_only=True``, and keys must match exactly (the ImageNet classifier may be dropped).
"""
from __future__ import annotations

import os
from urllib.error import URLError

import torch
from torch import nn

from segkit.files import load_file
from segkit.errors import CheckpointError

# The original ResNeSt releases (the hex is a sha256 prefix, checked by torch.hub on download);
# 14/26 are GluonCV's, as republished by timm.
IMAGENET_URLS: dict[str, str] = {
    "resnest14": "https://github.com/rwightman/pytorch-image-models/releases/download/v0.1-weights/gluon_resnest14-9c8fe254.pth",
    "resnest26": "https://github.com/rwightman/pytorch-image-models/releases/download/v0.1-weights/gluon_resnest26-50eb607c.pth",
    "resnest50": "https://github.com/zhanghang1989/ResNeSt/releases/download/weights_step1/resnest50-528c19ca.pth",
    "resnest101": "https://github.com/zhanghang1989/ResNeSt/releases/download/weights_step1/resnest101-22405ba7.pth",
    "resnest200": "https://github.com/zhanghang1989/ResNeSt/releases/download/weights_step1/resnest200-75117900.pth",
    "resnest269": "https://github.com/zhanghang1989/ResNeSt/releases/download/weights_step1/resnest269-0cc87c48.pth",
}

_CLASSIFIER_PREFIXES = ("fc.",)
# Containers that training frameworks wrap a state dict in, and the DDP / torch.compile key prefixes.
_WRAPPER_KEYS = ("state_dict", "model", "module")
_KEY_PREFIXES = ("module.", "_orig_mod.")


def resolve_source(source: str, backbone: str) -> str:
    """Map ``imagenet`` to the backbone's original release URL; pass paths and URLs through."""
    if source != "imagenet":
        return source
    if backbone not in IMAGENET_URLS:
        raise CheckpointError(
            f"no published ImageNet weights are known for backbone {backbone!r} (known: "
            f"{', '.join(IMAGENET_URLS)}); set pretrained to a local file or an http(s) URL instead")
    return IMAGENET_URLS[backbone]


def read_state_dict(source: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a state dict from a local file or an http(s) URL (cached, hash-checked by torch.hub)."""
    source = str(source)
    if not source.startswith(("http://", "https://")):
        return unwrap_state_dict(load_file(source), source)
    try:
        obj = torch.hub.load_state_dict_from_url(source, map_location="cpu", check_hash=True, weights_only=True)
    except URLError as e:
        raise CheckpointError(f"could not download {source} ({e.reason}); download it yourself and "
                              "set pretrained to the local file") from e
    except RuntimeError as e:
        # torch.hub reports a hash mismatch as RuntimeError('invalid hash value ...').
        raise CheckpointError(f"{source}: not a usable PyTorch weights file ({e})") from e
    return unwrap_state_dict(obj, source)


def unwrap_state_dict(obj: object, source: str) -> dict[str, torch.Tensor]:
    """Strip the usual containers ({'state_dict': ...}, {'model': ...}) and DDP/compile key prefixes."""
    while isinstance(obj, dict) and not _is_tensor_dict(obj):
        key = next((k for k in _WRAPPER_KEYS if k in obj), None)
        if key is None:
            raise CheckpointError(f"{source}: holds no state dict (top-level keys: {sorted(obj)[:8]})")
        obj = obj[key]
    if not isinstance(obj, dict):
        raise CheckpointError(f"{source}: expected a state dict, found {type(obj).__name__}")
    state = dict(obj)
    for prefix in _KEY_PREFIXES:
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def _is_tensor_dict(obj: dict) -> bool:
    return bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def load_into(model: nn.Module, state: dict[str, torch.Tensor], source: str, hint: str = "") -> None:
    """Strict load that drops an ImageNet classifier the model lacks and explains any mismatch."""
    own = model.state_dict()
    state = {k: v for k, v in state.items() if k in own or not k.startswith(_CLASSIFIER_PREFIXES)}
    # In module order, so the first keys listed show where the architectures part.
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong_shape = [k for k in own if k in state and own[k].shape != state[k].shape]
    if missing or unexpected or wrong_shape:
        lines = [f"{source} does not fit {type(model).__name__}:"]
        for label, keys in (("missing keys", missing), ("unexpected keys", unexpected),
                            ("shape mismatch", [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
                                                for k in wrong_shape])):
            if keys:
                lines.append(f"  {label} ({len(keys)}): {', '.join(keys[:6])}{' ...' if len(keys) > 6 else ''}")
        lines.append(hint or "  hint: the file was saved from another architecture or variant")
        raise CheckpointError("\n".join(lines))
    model.load_state_dict(state, strict=True)


def load_pretrained(model: nn.Module, source: str | None, backbone: str) -> None:
    """Load ImageNet weights into ``model`` (a backbone named ``backbone``) from ``source``.

    ``source`` is None/'' (keep the random init), ``imagenet`` (the original release), a local file
    or an http(s) URL.
    """
    if not source:
        return
    source = resolve_source(str(source), backbone)
    hint = (f"  hint: is this a {backbone} checkpoint? Pick the backbone the weights were trained as "
            f"(backbone=...), e.g. resnest50 weights have a 32-wide stem (conv1.0.weight 32x3x3x3), "
            f"resnest101/200/269 a 64-wide one")
    load_into(model, read_state_dict(source), source, hint)
