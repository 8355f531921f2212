"""Reading a model from whatever a user points at: a segkit checkpoint, a release directory, a
PyTorch-Encoding DeepLabV3 state dict or a bare state dict. It sits above both formats
(:mod:`segkit.checkpoints.checkpoint`, :mod:`segkit.checkpoints.release`), which know nothing of each
other's readers."""
from __future__ import annotations

from pathlib import Path

from segkit.checkpoints.checkpoint import ModelCheckpoint, read_label_space
from segkit.checkpoints.release import read_release
from segkit.files import load_file
from segkit.models.convert import convert_encoding_state_dict, is_encoding_state_dict
from segkit.models.pretrained import unwrap_state_dict


def load_model(path: Path) -> ModelCheckpoint:
    """A segkit checkpoint or release directory, a PyTorch-Encoding DeepLabV3 state dict or a bare
    state dict."""
    path = Path(path).expanduser()
    if path.is_dir():
        return read_release(path)
    obj = load_file(path)
    if isinstance(obj, dict) and "model" in obj and "config" in obj:
        space = read_label_space(obj["label_space"], path) if "label_space" in obj else None
        return ModelCheckpoint(path, obj["model"], obj["config"], space, obj.get("iteration"), obj.get("metrics"))
    state = unwrap_state_dict(obj, str(path))
    return ModelCheckpoint(path, convert_encoding_state_dict(state) if is_encoding_state_dict(state) else state,
                           None)
