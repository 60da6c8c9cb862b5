"""DETR's training augmentation from Detectron2 transforms, and a mapper that skips unreadable images."""
import logging
from typing import Dict, List, Optional, Sequence

import numpy as np

from detectron2.data import DatasetMapper
from detectron2.data import transforms as T

__all__ = ["RandomChoice", "ResizeToMultiple", "build_detr_augmentation", "DetrDatasetMapper", "side_rounding"]

logger = logging.getLogger(__name__)


class RandomChoice(T.Augmentation):
    """Apply one of several augmentation lists, chosen uniformly at random."""

    def __init__(self, choices: Sequence[Sequence[T.Augmentation]]):
        super().__init__()
        self.choices = [T.AugmentationList(list(c)) for c in choices]

    def __call__(self, aug_input) -> T.Transform:
        return self.choices[np.random.randint(len(self.choices))](aug_input)


class ResizeToMultiple(T.Augmentation):
    """Resize to the nearest height and width that are multiples of ``multiple`` (at least one multiple)."""

    def __init__(self, multiple: int):
        super().__init__()
        if multiple < 1:
            raise ValueError(f"the side multiple must be a positive number of pixels, got {multiple}")
        self.multiple = multiple

    def nearest(self, side: int) -> int:
        return max(self.multiple, int(side / self.multiple + 0.5) * self.multiple)

    def get_transform(self, image) -> T.Transform:
        height, width = image.shape[:2]
        new_height, new_width = self.nearest(height), self.nearest(width)
        if (new_height, new_width) == (height, width):
            return T.NoOpTransform()
        return T.ResizeTransform(height, width, new_height, new_width)


def side_rounding(cfg) -> List[T.Augmentation]:
    """``[ResizeToMultiple(INPUT.SIDE_MULTIPLE)]``, the last step of training's and evaluation's resize; ``[]`` at 0."""
    return [ResizeToMultiple(cfg.INPUT.SIDE_MULTIPLE)] if cfg.INPUT.SIDE_MULTIPLE else []


def build_detr_augmentation(cfg, is_train: bool) -> List[T.Augmentation]:
    """Train: horizontal flip, then either a multi-scale resize or (resize to 400/500/600, random crop with
    sides in INPUT.CROP.SIZE, multi-scale resize), each with probability 1/2. Test: shorter side MIN_SIZE_TEST.
    Both then round the sides to multiples of INPUT.SIDE_MULTIPLE when it is set."""
    rounding = side_rounding(cfg)
    if not is_train:
        return [T.ResizeShortestEdge(cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST), *rounding]
    resize = T.ResizeShortestEdge(cfg.INPUT.MIN_SIZE_TRAIN, cfg.INPUT.MAX_SIZE_TRAIN, cfg.INPUT.MIN_SIZE_TRAIN_SAMPLING)
    if not cfg.INPUT.CROP.ENABLED:
        return [T.RandomFlip(), resize, *rounding]
    crop_branch = [T.ResizeShortestEdge(cfg.INPUT.CROP_PRE_RESIZE, sample_style="choice"),
                   T.RandomCrop(cfg.INPUT.CROP.TYPE, cfg.INPUT.CROP.SIZE), resize]
    return [T.RandomFlip(), RandomChoice([[resize], crop_branch]), *rounding]


class DetrDatasetMapper(DatasetMapper):
    """Detectron2's DatasetMapper with the DETR augmentation; an unreadable image is skipped with a warning.

    Images without annotations become an empty ``Instances`` (kept, as in the authors' training); boxes
    cropped away are dropped by Detectron2's ``filter_empty_instances``.
    """

    def __init__(self, cfg, is_train: bool = True):
        super().__init__(cfg, is_train=is_train, augmentations=build_detr_augmentation(cfg, is_train),
                         image_format=cfg.INPUT.FORMAT, use_instance_mask=False, use_keypoint=False,
                         recompute_boxes=False)

    def __call__(self, dataset_dict: Dict) -> Optional[Dict]:
        try:
            return super().__call__(dataset_dict)
        except (OSError, ValueError) as e:  # what PIL raises on missing or corrupt files
            logger.warning("skipping unreadable image %s: %s", dataset_dict.get("file_name"), e)
            return None
