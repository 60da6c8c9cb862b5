"""Loading datasets for training and evaluation with clear errors for what users get wrong."""
import os
from typing import Dict, List, Optional, Sequence

from detectron2.data import DatasetCatalog, MetadataCatalog, get_detection_dataset_dicts

__all__ = ["check_dataset_files", "check_num_classes", "dataset_category_ids", "load_train_dicts"]

COCO_LAYOUT = """expected Detectron2's COCO layout under $DETECTRON2_DATASETS (now {root!r}):
  coco/annotations/instances_{{train,val}}2017.json
  coco/{{train,val}}2017/*.jpg"""


def check_dataset_files(name: str) -> None:
    """Fail early, naming the dataset and the expected layout, when it is unregistered or its files are missing."""
    if name not in DatasetCatalog.list():
        raise KeyError(f"dataset {name!r} is not registered; register your COCO-json dataset with "
                       f"detectron2.data.datasets.register_coco_instances (see the README)")
    meta = MetadataCatalog.get(name)
    for attr in ("json_file", "image_root"):
        path = getattr(meta, attr, None)
        if path and "://" not in path and not os.path.exists(path):
            hint = COCO_LAYOUT.format(root=os.environ.get("DETECTRON2_DATASETS", "datasets")) \
                if name.startswith("coco_") else f"check the path given to register_coco_instances for {name!r}"
            raise FileNotFoundError(f"dataset {name!r}: {attr} {path!r} does not exist; {hint}")


def check_num_classes(name: str, num_classes: int) -> None:
    """The classification head must have one output per dataset class."""
    classes = getattr(MetadataCatalog.get(name), "thing_classes", None)
    if classes is not None and len(classes) != num_classes:
        raise ValueError(f"dataset {name!r} has {len(classes)} classes but MODEL.SPARSE_DETR.NUM_CLASSES is "
                         f"{num_classes}: set MODEL.SPARSE_DETR.NUM_CLASSES {len(classes)}")


def load_train_dicts(names: Sequence[str], num_classes: int, filter_empty: bool) -> List[Dict]:
    for name in names:
        check_dataset_files(name)
    dicts = get_detection_dataset_dicts(list(names), filter_empty=filter_empty)
    for name in names:
        check_num_classes(name, num_classes)
    return dicts


def dataset_category_ids(names: Sequence[str], load: bool = False) -> Optional[List[int]]:
    """The dataset's category id of each contiguous class (``thing_dataset_id_to_contiguous_id`` inverted).

    Read from the metadata of the first of ``names`` that has the mapping. Detectron2's builtin COCO has it
    from registration; a dataset registered with ``register_coco_instances`` records it when its json is
    loaded, which ``load=True`` does for the first registered dataset. None when no dataset has a mapping.
    """
    for name in names:
        meta = MetadataCatalog.get(name)
        if "thing_dataset_id_to_contiguous_id" not in meta.as_dict() and load and name in DatasetCatalog.list():
            DatasetCatalog.get(name)
        mapping = meta.get("thing_dataset_id_to_contiguous_id", None)
        if mapping:
            if sorted(mapping.values()) != list(range(len(mapping))):
                raise ValueError(f"dataset {name!r}: thing_dataset_id_to_contiguous_id must map onto 0 .. "
                                 f"{len(mapping) - 1}, got {mapping}")
            return sorted(mapping, key=mapping.get)
    return None
