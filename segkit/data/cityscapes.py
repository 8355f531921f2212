"""Cityscapes fine annotations: 19 evaluated classes, 2975 train / 500 val images.

Masks are read from ``*_gtFine_labelTrainIds.png`` when present (what ``segkit.data.prepare
cityscapes`` writes) and otherwise from the official ``*_gtFine_labelIds.png``, mapped with the
table below (checked against ``cityscapesscripts.helpers.labels`` in the tests). Predictions are
encoded back to labelIds, the format the official evaluator reads.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from segkit.data.base import (
    SegmentationDataset,
    index_files,
    make_lut,
    missing_split_error,
    pair_samples,
)

IMAGE_ENDING = "_leftImg8bit.png"
LABEL_IDS_ENDING = "_gtFine_labelIds.png"
TRAIN_IDS_ENDING = "_gtFine_labelTrainIds.png"
NUM_LABEL_IDS = 34  # labelIds 0..33 occur in the PNGs; every one not listed below is ignored

# (labelId, name, colour) of the evaluated classes, in train id order.
_TRAIN_CLASSES = (
    (7, "road", (128, 64, 128)),
    (8, "sidewalk", (244, 35, 232)),
    (11, "building", (70, 70, 70)),
    (12, "wall", (102, 102, 156)),
    (13, "fence", (190, 153, 153)),
    (17, "pole", (153, 153, 153)),
    (19, "traffic light", (250, 170, 30)),
    (20, "traffic sign", (220, 220, 0)),
    (21, "vegetation", (107, 142, 35)),
    (22, "terrain", (152, 251, 152)),
    (23, "sky", (70, 130, 180)),
    (24, "person", (220, 20, 60)),
    (25, "rider", (255, 0, 0)),
    (26, "car", (0, 0, 142)),
    (27, "truck", (0, 0, 70)),
    (28, "bus", (0, 60, 100)),
    (31, "train", (0, 80, 100)),
    (32, "motorcycle", (0, 0, 230)),
    (33, "bicycle", (119, 11, 32)),
)
CITYSCAPES_CLASSES: tuple[str, ...] = tuple(name for _, name, _ in _TRAIN_CLASSES)
CITYSCAPES_PALETTE = np.array([colour for _, _, colour in _TRAIN_CLASSES], dtype=np.uint8)
TRAIN_ID_TO_LABEL_ID = np.array([label_id for label_id, _, _ in _TRAIN_CLASSES], dtype=np.uint8)
LABEL_ID_LUT = make_lut({
    **{label_id: 255 for label_id in range(NUM_LABEL_IDS)},
    **{label_id: train_id for train_id, (label_id, _, _) in enumerate(_TRAIN_CLASSES)},
})
TRAIN_ID_LUT = make_lut({**{t: t for t in range(len(_TRAIN_CLASSES))}, 255: 255})


class CityscapesDataset(SegmentationDataset):
    """``ROOT/leftImg8bit/<split>/<city>/*_leftImg8bit.png`` with
    ``ROOT/gtFine/<split>/<city>/*_gtFine_{labelTrainIds,labelIds}.png``; names are
    ``<city>/<city>_<seq>_<frame>``."""

    def __init__(self, root: str | Path, split: str = "train", **kwargs: Any) -> None:
        root = Path(root)
        image_dir, mask_dir = root / "leftImg8bit" / split, root / "gtFine" / split
        for directory in (image_dir, mask_dir):
            if not directory.is_dir():
                layout = (f"  {root}/leftImg8bit/{{train,val,test}}/<city>/*{IMAGE_ENDING}\n"
                          f"  {root}/gtFine/{{train,val,test}}/<city>/*{LABEL_IDS_ENDING}")
                hint = ("Download leftImg8bit_trainvaltest.zip and gtFine_trainvaltest.zip from "
                        f"https://www.cityscapes-dataset.com/downloads/ (login required) into {root}, "
                        f"then run: python -m segkit.data.prepare cityscapes --root {root}")
                raise missing_split_error("Cityscapes", root, split, directory, layout, hint)
        # Pre-converted train ids win over label ids for the same frame.
        masks = {**index_files(mask_dir, (LABEL_IDS_ENDING,)), **index_files(mask_dir, (TRAIN_IDS_ENDING,))}
        samples = pair_samples(index_files(image_dir, (IMAGE_ENDING,)), masks, image_dir, mask_dir)
        super().__init__(root, split, samples, CITYSCAPES_CLASSES, CITYSCAPES_PALETTE, LABEL_ID_LUT,
                         **kwargs)

    def label_lut_for(self, mask_path: Path) -> np.ndarray:
        return TRAIN_ID_LUT if mask_path.name.endswith(TRAIN_IDS_ENDING) else LABEL_ID_LUT

    def encode_prediction(self, pred: np.ndarray) -> np.ndarray:
        """Train ids -> labelIds, what ``cityscapesscripts`` evaluates."""
        return TRAIN_ID_TO_LABEL_ID[self._check_prediction(pred)]
