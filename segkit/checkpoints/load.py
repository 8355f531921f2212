"""Reading a model from whatever a user points at: a segkit checkpoint, a release directory, a
PyTorch-Encoding DeepLabV3 state dict, a bare state dict or ``zoo:NAME``. It sits above the formats
(:mod:`segkit.checkpoints.checkpoint`, :mod:`segkit.checkpoints.release`) and the zoo
(:mod:`segkit.checkpoints.zoo`), which know nothing of each other's readers."""
from __future__ import annotations

from pathlib import Path

from segkit.checkpoints import zoo
from segkit.checkpoints.checkpoint import ModelCheckpoint, read_model_file
from segkit.checkpoints.release import read_release


def load_model(path: str | Path) -> ModelCheckpoint:
    """A segkit checkpoint or release directory, a PyTorch-Encoding DeepLabV3 state dict, a bare
    state dict, or ``zoo:NAME``: a released model by name (downloaded and converted once, see
    :mod:`segkit.checkpoints.zoo`)."""
    name = zoo.zoo_name(path)
    if name is not None:
        return read_release(zoo.fetch(name))
    path = Path(path).expanduser()
    if path.is_dir():
        return read_release(path)
    return read_model_file(path)
