"""Loading datasets for training and evaluation with clear errors for what users get wrong."""
import logging
import os
from typing import Dict, Iterable, Iterator, List, Optional, Sequence

from detectron2.data import DatasetCatalog, MetadataCatalog, build_detection_test_loader, get_detection_dataset_dicts
from detectron2.data.datasets import register_coco_instances

from .dataset_mapper import DetrDatasetMapper

__all__ = ["build_test_loader", "check_dataset_files", "check_num_classes", "dataset_category_ids", "load_train_dicts",
           "register_coco_json_datasets"]

logger = logging.getLogger(__name__)

UNREADABLE_KEY = "unreadable_image"  # the whole dataset dict of an image the test mapper could not read

COCO_LAYOUT = ("expected Detectron2's COCO layout under $DETECTRON2_DATASETS (now {root!r}): "
               "coco/annotations/instances_{{train,val}}2017.json and coco/{{train,val}}2017/*.jpg")


def register_coco_json_datasets(entries: Sequence[Sequence[str]]) -> None:
    """Register each (name, json file, image folder) of ``DATASETS.COCO_JSON`` with register_coco_instances.

    The same triple again is a no-op (every tool and process loads the config); another triple under a
    name already taken is an error.
    """
    for entry in entries:
        if not isinstance(entry, (list, tuple)) or len(entry) != 3 or not all(isinstance(x, str) for x in entry):
            raise ValueError(f"DATASETS.COCO_JSON takes [name, json file, image folder] triples, got {entry!r}")
        name, json_file, image_root = entry
        if name in DatasetCatalog.list():
            meta = MetadataCatalog.get(name)
            if (getattr(meta, "json_file", None), getattr(meta, "image_root", None)) == (json_file, image_root):
                continue
            raise ValueError(f"DATASETS.COCO_JSON: the name {name!r} is already taken by another dataset")
        register_coco_instances(name, {}, json_file, image_root)


def check_dataset_files(name: str) -> None:
    """Fail early, naming the dataset and the expected layout, when it is unregistered or its files are missing."""
    if name not in DatasetCatalog.list():
        raise KeyError(f"dataset {name!r} is not registered; name your COCO-json dataset in DATASETS.COCO_JSON "
                       f"(see the README)")
    meta = MetadataCatalog.get(name)
    for attr in ("json_file", "image_root"):
        path = getattr(meta, attr, None)
        if path and "://" not in path and not os.path.exists(path):
            hint = COCO_LAYOUT.format(root=os.environ.get("DETECTRON2_DATASETS", "datasets")) \
                if name.startswith("coco_") else f"check the paths given for {name!r} in DATASETS.COCO_JSON"
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


class _MarkUnreadable:
    """A test mapper that returns a marker for an unreadable image instead of None, which Detectron2's
    MapDataset would replace by another image of the dataset (right for training, wrong for evaluation)."""

    def __init__(self, mapper):
        self.mapper = mapper

    def __call__(self, dataset_dict: Dict) -> Dict:
        mapped = self.mapper(dataset_dict)
        return {UNREADABLE_KEY: dataset_dict.get("file_name")} if mapped is None else mapped


class _WithoutUnreadable:
    """The batches of a test loader without the marked images; after the last one, a warning with their number."""

    def __init__(self, loader: Iterable[List[Dict]], dataset_name: str):
        self.loader, self.dataset_name = loader, dataset_name

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[List[Dict]]:
        skipped, total = [], 0
        for batch in self.loader:
            total += len(batch)
            skipped += [d[UNREADABLE_KEY] for d in batch if UNREADABLE_KEY in d]
            readable = [d for d in batch if UNREADABLE_KEY not in d]
            if readable:
                yield readable
        if skipped:
            logger.warning("%s: %d of its %d images could not be read and were skipped; the evaluation counts them as "
                           "images without detections (e.g. %s)", self.dataset_name, len(skipped), total,
                           ", ".join(map(str, skipped[:3])))


def build_test_loader(cfg, dataset_name: str):
    """Detectron2's test loader of ``dataset_name`` where, as in training, an image that cannot be read (missing,
    corrupt, not of the size its annotation gives) is skipped with a warning instead of ending the evaluation.

    COCOEvaluator takes its ground truth from the dataset's json, so a skipped image counts as an image without
    detections: its objects are misses. The number skipped is logged after the last batch.
    """
    check_dataset_files(dataset_name)
    loader = build_detection_test_loader(cfg, dataset_name, mapper=_MarkUnreadable(DetrDatasetMapper(cfg, False)),
                                         batch_size=cfg.TEST.IMS_PER_BATCH)
    return _WithoutUnreadable(loader, dataset_name)
