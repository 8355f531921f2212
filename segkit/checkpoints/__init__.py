"""Checkpoint formats, at the bottom of the layers above the models: segkit's training checkpoints
(:mod:`~segkit.checkpoints.checkpoint`), release directories (:mod:`~segkit.checkpoints.release`) and
:func:`~segkit.checkpoints.load.load_model`, which reads either (or a foreign state dict)."""
