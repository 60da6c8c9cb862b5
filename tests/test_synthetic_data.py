"""The synthetic shapes dataset: deterministic, well-formed, cached on disk, safe to interrupt, registered."""
import json
import multiprocessing
import os

import numpy as np
import pytest
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.structures import BoxMode
from pycocotools.coco import COCO

from sparse_detr.data import synthetic
from sparse_detr.data.synthetic import CLASS_NAMES, generate_split, register_shapes_datasets, render_sample


def _files(root):
    """{relative path: bytes} of every file under ``root`` except lock files."""
    contents = {}
    for folder, _, names in os.walk(root):
        for name in names:
            if not name.endswith(".lock"):
                path = os.path.join(folder, name)
                with open(path, "rb") as f:
                    contents[os.path.relpath(path, root)] = f.read()
    return contents


def _mtimes(root):
    return {os.path.join(folder, name): os.stat(os.path.join(folder, name)).st_mtime_ns
            for folder, _, names in os.walk(root) for name in names if not name.endswith(".lock")}


def test_same_seed_same_bytes_other_seed_other_images(tmp_path):
    first = generate_split(str(tmp_path / "a"), "train", 4, seed=3)
    generate_split(str(tmp_path / "b"), "train", 4, seed=3)
    generate_split(str(tmp_path / "c"), "train", 4, seed=4)
    a, b, c = (_files(tmp_path / name) for name in "abc")
    assert len(a) == 5 and a == b
    pngs = [path for path in a if path.endswith(".png")]
    assert all(a[path] != c[path] for path in pngs)
    assert first == str(tmp_path / "a" / "annotations" / "train.json")


def test_splits_differ_under_the_same_seed():
    train = render_sample(synthetic._image_rng(0, "train", 0)).image
    val = render_sample(synthetic._image_rng(0, "val", 0)).image
    assert train.shape != val.shape or not np.array_equal(train, val)


def test_samples_are_well_formed_and_cover_every_class():
    samples = [render_sample(synthetic._image_rng(0, "train", i)) for i in range(150)]
    low, high = synthetic.IMAGE_SIDE_RANGE
    for sample in samples:
        height, width, channels = sample.image.shape
        assert low <= height <= high and low <= width <= high and channels == 3
        assert sample.image.dtype == np.uint8
        assert len(sample.boxes) == len(sample.classes) <= synthetic.MAX_OBJECTS
        x0, y0, x1, y1 = sample.boxes.T
        assert (x0 >= 0).all() and (y0 >= 0).all() and (x1 <= width).all() and (y1 <= height).all()
        assert (x1 - x0 >= 1).all() and (y1 - y0 >= 1).all()
    classes = np.concatenate([s.classes for s in samples])
    assert set(classes.tolist()) == set(range(len(CLASS_NAMES)))
    num_empty = sum(len(s.classes) == 0 for s in samples)
    assert 0 < num_empty < 0.2 * len(samples)
    sides = np.concatenate([np.maximum(s.boxes[:, 2] - s.boxes[:, 0], s.boxes[:, 3] - s.boxes[:, 1]) for s in samples])
    assert sides.min() <= 16 and sides.max() >= 80  # from small objects to half the image


def test_json_is_valid_coco(tmp_path):
    json_path = generate_split(str(tmp_path), "val", 12, seed=0)
    coco = COCO(json_path)
    assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == list(CLASS_NAMES)
    for annotation in coco.dataset["annotations"]:
        image = coco.imgs[annotation["image_id"]]
        x, y, w, h = annotation["bbox"]
        assert 0 <= x and 0 <= y and x + w <= image["width"] and y + h <= image["height"] and w >= 1 and h >= 1
        assert annotation["area"] == w * h and annotation["iscrowd"] == 0
        assert 1 <= annotation["category_id"] <= len(CLASS_NAMES)
    assert coco.dataset["info"] == {"description": "Sparse DETR synthetic shapes",
                                    "generator_version": synthetic.GENERATOR_VERSION, "split": "val", "seed": 0,
                                    "num_images": 12}
    assert sorted(os.listdir(tmp_path / "val")) == [image["file_name"] for image in coco.dataset["images"]]


def test_cache_is_reused(tmp_path, monkeypatch):
    generate_split(str(tmp_path), "train", 3, seed=0)
    before = _mtimes(tmp_path)

    def fail(*args, **kwargs):
        raise AssertionError("a complete split was generated again")

    monkeypatch.setattr(synthetic, "_write_split", fail)
    generate_split(str(tmp_path), "train", 3, seed=0)
    assert _mtimes(tmp_path) == before


def test_missing_json_regenerates(tmp_path):
    json_path = generate_split(str(tmp_path), "train", 3, seed=0)
    expected = _files(tmp_path)
    os.remove(json_path)
    generate_split(str(tmp_path), "train", 3, seed=0)
    assert _files(tmp_path) == expected


def test_interrupted_generation_completes_on_the_next_call(tmp_path, monkeypatch):
    expected = _files(os.path.dirname(os.path.dirname(generate_split(str(tmp_path / "clean"), "train", 4, seed=0))))
    calls = []

    def interrupted(rng):
        calls.append(rng)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return render_sample(rng)

    monkeypatch.setattr(synthetic, "render_sample", interrupted)
    with pytest.raises(KeyboardInterrupt):
        generate_split(str(tmp_path / "run"), "train", 4, seed=0)
    assert not os.path.exists(tmp_path / "run" / "annotations" / "train.json")
    monkeypatch.undo()
    generate_split(str(tmp_path / "run"), "train", 4, seed=0)
    assert _files(tmp_path / "run") == expected


def test_other_request_regenerates_and_drops_stale_images(tmp_path):
    json_path = generate_split(str(tmp_path), "train", 5, seed=0)
    generate_split(str(tmp_path), "train", 3, seed=0)
    with open(json_path) as f:
        assert json.load(f)["info"]["num_images"] == 3
    assert len(os.listdir(tmp_path / "train")) == 3


def _generate_small_split(root):
    generate_split(root, "val", 6, seed=0)


def test_concurrent_generation(tmp_path):
    context = multiprocessing.get_context("fork")
    workers = [context.Process(target=_generate_small_split, args=(str(tmp_path / "shared"),)) for _ in range(3)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=60)
    assert [worker.exitcode for worker in workers] == [0, 0, 0]
    generate_split(str(tmp_path / "alone"), "val", 6, seed=0)
    assert _files(tmp_path / "shared") == _files(tmp_path / "alone")


@pytest.fixture
def fresh_registration():
    """Leave no json_file of a deleted tmp root in the metadata for the tests that follow."""
    register_shapes_datasets()
    yield
    register_shapes_datasets()


def test_registered_datasets_generate_on_first_use(tmp_path, monkeypatch, fresh_registration):
    monkeypatch.setenv("SPARSE_DETR_DATASETS", str(tmp_path / "first"))
    monkeypatch.setenv("SPARSE_DETR_SHAPES_TRAIN_SIZE", "5")
    monkeypatch.setenv("SPARSE_DETR_SHAPES_VAL_SIZE", "3")
    assert not (tmp_path / "first").exists()  # registering generates nothing

    train = DatasetCatalog.get("sparse_detr_shapes_train")
    val = DatasetCatalog.get("sparse_detr_shapes_val")
    assert len(train) == 5 and len(val) == 3
    for record in train + val:
        assert os.path.isfile(record["file_name"])
        for annotation in record["annotations"]:
            assert annotation["bbox_mode"] == BoxMode.XYWH_ABS
            assert 0 <= annotation["category_id"] < len(CLASS_NAMES)
    metadata = MetadataCatalog.get("sparse_detr_shapes_val")
    assert metadata.thing_classes == list(CLASS_NAMES) and metadata.evaluator_type == "coco"
    assert metadata.json_file == str(tmp_path / "first" / "annotations" / "val.json")

    monkeypatch.setenv("SPARSE_DETR_DATASETS", str(tmp_path / "second"))  # read again at every load
    DatasetCatalog.get("sparse_detr_shapes_val")
    assert MetadataCatalog.get("sparse_detr_shapes_val").json_file == str(tmp_path / "second" / "annotations" / "val.json")
