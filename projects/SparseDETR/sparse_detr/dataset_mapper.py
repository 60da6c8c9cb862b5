"""DETR's training augmentation from Detectron2 transforms, and a mapper that skips unreadable images."""
import logging
from typing import Dict, List, Optional, Sequence

import numpy as np

from detectron2.data import DatasetMapper
from detectron2.data import transforms as T

__all__ = ["RandomChoice", "build_detr_augmentation", "DetrDatasetMapper"]

logger = logging.getLogger(__name__)


class RandomChoice(T.Augmentation):
    """Apply one of several augmentation lists, chosen uniformly at random."""

    def __init__(self, choices: Sequence[Sequence[T.Augmentation]]):
        super().__init__()
        self.choices = [T.AugmentationList(list(c)) for c in choices]

    def __call__(self, aug_input) -> T.Transform:
        return self.choices[np.random.randint(len(self.choices))](aug_input)


def build_detr_augmentation(cfg, is_train: bool) -> List[T.Augmentation]:
    """Train: horizontal flip, then either a multi-scale resize or (resize to 400/500/600, random crop with
    sides in INPUT.CROP.SIZE, multi-scale resize), each with probability 1/2. Test: shorter side MIN_SIZE_TEST."""
    if not is_train:
        return [T.ResizeShortestEdge(cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST)]
    resize = T.ResizeShortestEdge(cfg.INPUT.MIN_SIZE_TRAIN, cfg.INPUT.MAX_SIZE_TRAIN, cfg.INPUT.MIN_SIZE_TRAIN_SAMPLING)
    if not cfg.INPUT.CROP.ENABLED:
        return [T.RandomFlip(), resize]
    crop_branch = [T.ResizeShortestEdge(cfg.INPUT.CROP_PRE_RESIZE, sample_style="choice"),
                   T.RandomCrop(cfg.INPUT.CROP.TYPE, cfg.INPUT.CROP.SIZE), resize]
    return [T.RandomFlip(), RandomChoice([[resize], crop_branch])]


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
