"""Sparse DETR shapes: a generated COCO-format detection dataset for the CPU demo.

A newcomer without COCO or a GPU can still train and evaluate the whole model: the images are small
(width and height drawn independently from [160, 224]) and made on first use, in seconds, from a seed.

Each image is a textured background (smooth colour noise, stripes or a gradient, in random colours) with
0 to 6 shapes of ``CLASS_NAMES`` drawn in order, so later shapes occlude earlier ones. Colours are random
and independent of the class: only the shape tells the class. Object extents go from 12 px to half the
shorter image side, and a shape may run over the image border.

Annotation conventions:

* ``bbox`` is the extent of the *whole* shape (as if nothing occluded it) clipped to the image, in
  pixels, COCO ``[x, y, w, h]``; ``area`` is ``w * h`` of that box, which is also what Detectron2 computes
  when it converts box-only dataset dicts to COCO, so both ground truths agree.
* A shape whose visible part is less than ``MIN_VISIBLE_FRACTION`` of its full area (hidden behind later
  shapes or outside the image) is drawn but not annotated.

On disk (root: ``$SPARSE_DETR_DATASETS``, else ``$DETECTRON2_DATASETS/sparse_detr_shapes``)::

    <root>/train/000000.png ...      <root>/annotations/train.json
    <root>/val/000000.png ...        <root>/annotations/val.json

A split is complete when its json exists and its ``info`` records the requested generator version, seed
and image count; otherwise it is generated again. The json is written last and atomically, and a file lock
lets only one process generate a split, so an interrupted run or several workers starting together are safe.

Every image is drawn from its own random stream, seeded by (seed, split, index): the first images of a split
do not depend on how many follow, and the same seed gives byte-identical files.
"""
import argparse
import fcntl
import functools
import json
import logging
import math
import os
import shutil
import zlib
from typing import Dict, List, NamedTuple, Optional

import cv2
import numpy as np
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import load_coco_json

__all__ = ["CLASS_NAMES", "DEFAULT_SEED", "GENERATOR_VERSION", "SPLIT_SIZES", "Sample", "default_root",
           "generate_split", "load_shapes_split", "preview", "register_shapes_datasets", "render_sample"]

logger = logging.getLogger(__name__)

CLASS_NAMES = ("circle", "square", "triangle", "cross", "ring")  # COCO category_id = index + 1
GENERATOR_VERSION = 1  # bump whenever a change alters the images or annotations: caches regenerate
DEFAULT_SEED = 0
# Split -> (environment variable overriding the number of images, default number of images).
SPLIT_SIZES = {"train": ("SPARSE_DETR_SHAPES_TRAIN_SIZE", 2000), "val": ("SPARSE_DETR_SHAPES_VAL_SIZE", 300)}

IMAGE_SIDE_RANGE = (160, 224)  # width and height are drawn independently, inclusive
MAX_OBJECTS = 6
EMPTY_IMAGE_PROB = 0.07
MIN_OBJECT_EXTENT = 12  # px, diameter of the shape's circumscribed circle
MAX_OBJECT_EXTENT_RATIO = 0.5  # of the shorter image side
MIN_VISIBLE_FRACTION = 0.3  # annotate a shape only if at least this much of it can be seen
MIN_COLOUR_DISTANCE = 90.0  # RGB distance between a shape and what lies under it, so it stays visible
PIXEL_NOISE_STD = 4.0

_SUBPIXEL_BITS = 4  # cv2 drawing takes fixed-point coordinates with this many fractional bits


class Sample(NamedTuple):
    """One generated image and its annotations."""

    image: np.ndarray  # (H, W, 3) uint8, RGB
    boxes: np.ndarray  # (N, 4) float32, XYXY absolute pixels: full shape extent clipped to the image
    classes: np.ndarray  # (N,) int64, index into CLASS_NAMES


def _hsv_to_rgb(hue: float, saturation: float, value: float) -> np.ndarray:
    hsv = np.array([[[hue * 180.0, saturation * 255.0, value * 255.0]]], dtype=np.float32)
    return cv2.cvtColor(hsv.round().clip(0, 255).astype(np.uint8), cv2.COLOR_HSV2RGB)[0, 0].astype(np.float32)


def _background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A (H, W, 3) float32 texture: smooth colour noise, stripes or a two-colour gradient."""
    kind = rng.integers(3)
    if kind == 0:
        grid = int(rng.integers(2, 7))
        coarse = rng.uniform(0, 255, size=(grid, grid, 3)).astype(np.float32)
        return cv2.resize(coarse, (width, height), interpolation=cv2.INTER_CUBIC).clip(0, 255)
    first, second = rng.uniform(0, 255, size=(2, 3)).astype(np.float32)
    angle = rng.uniform(0, math.pi)
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    along = xs * math.cos(angle) + ys * math.sin(angle)
    if kind == 1:
        period = rng.uniform(8, 40)
        weight = 0.5 + 0.5 * np.sin(2 * math.pi * along / period + rng.uniform(0, 2 * math.pi))
    else:
        weight = (along - along.min()) / max(float(along.max() - along.min()), 1.0)
    return first + weight[..., None] * (second - first)


def _shape_mask(rng: np.random.Generator, class_index: int, radius: float) -> np.ndarray:
    """An anti-aliased uint8 coverage mask (2R+1, 2R+1) of one shape centred in the patch, rotated at random.

    ``radius`` is the circumradius of the shape; R leaves a margin for the cross's arms and anti-aliasing.
    """
    half = int(math.ceil(1.1 * radius)) + 2
    mask = np.zeros((2 * half + 1, 2 * half + 1), dtype=np.uint8)
    centre = np.array([half, half], dtype=np.float64) + rng.uniform(-0.5, 0.5, size=2)
    scale = 1 << _SUBPIXEL_BITS

    def fixed(points):
        return np.round(points * scale).astype(np.int32)

    name = CLASS_NAMES[class_index]
    if name in ("circle", "ring"):
        cv2.circle(mask, tuple(fixed(centre)), int(round(radius * scale)), 255, -1, cv2.LINE_AA, _SUBPIXEL_BITS)
        if name == "ring":
            inner = radius * rng.uniform(0.45, 0.65)
            cv2.circle(mask, tuple(fixed(centre)), int(round(inner * scale)), 0, -1, cv2.LINE_AA, _SUBPIXEL_BITS)
        return mask
    if name == "cross":
        arm = 0.33  # half-width of an arm relative to its length
        unit = np.array([(-arm, -1), (arm, -1), (arm, -arm), (1, -arm), (1, arm), (arm, arm), (arm, 1),
                         (-arm, 1), (-arm, arm), (-1, arm), (-1, -arm), (-arm, -arm)], dtype=np.float64)
    else:
        corners = 4 if name == "square" else 3
        angles = 2 * math.pi * np.arange(corners) / corners
        unit = np.stack([np.cos(angles), np.sin(angles)], axis=1)
    turn = rng.uniform(0, 2 * math.pi)
    rotation = np.array([[math.cos(turn), -math.sin(turn)], [math.sin(turn), math.cos(turn)]])
    cv2.fillPoly(mask, [fixed(centre + radius * unit @ rotation.T)], 255, cv2.LINE_AA, _SUBPIXEL_BITS)
    return mask


def _shape_colour(rng: np.random.Generator, references: np.ndarray) -> np.ndarray:
    """A saturated colour far enough from every (K, 3) reference colour (what it covers) to stay visible."""
    best, best_distance = None, -1.0
    for _ in range(8):
        colour = _hsv_to_rgb(rng.uniform(0, 1), rng.uniform(0.5, 1), rng.uniform(0.35, 1))
        distance = float(np.linalg.norm(references - colour, axis=1).min())
        if distance > best_distance:
            best, best_distance = colour, distance
        if distance >= MIN_COLOUR_DISTANCE:
            break
    return best


def render_sample(rng: np.random.Generator) -> Sample:
    """Draw one image and its annotations from ``rng`` (see the module docstring for the conventions)."""
    width, height = (int(v) for v in rng.integers(IMAGE_SIDE_RANGE[0], IMAGE_SIDE_RANGE[1] + 1, size=2))
    image = _background(rng, height, width)
    owner = np.full((height, width), -1, dtype=np.int16)  # index of the shape that shows at each pixel
    num_objects = 0 if rng.uniform() < EMPTY_IMAGE_PROB else int(rng.integers(1, MAX_OBJECTS + 1))
    max_extent = MAX_OBJECT_EXTENT_RATIO * min(height, width)

    boxes, classes, colours, full_areas = [], [], [], []
    for index in range(num_objects):
        class_index = int(rng.integers(len(CLASS_NAMES)))
        radius = 0.5 * math.exp(rng.uniform(math.log(MIN_OBJECT_EXTENT), math.log(max_extent)))
        mask = _shape_mask(rng, class_index, radius)
        half = mask.shape[0] // 2
        # At most ~40% of the shape's extent may lie outside the image along each axis.
        cx = int(rng.integers(int(0.2 * radius), width - int(0.2 * radius)))
        cy = int(rng.integers(int(0.2 * radius), height - int(0.2 * radius)))
        x0, y0 = cx - half, cy - half  # patch origin in the image
        ix0, iy0 = max(x0, 0), max(y0, 0)
        ix1, iy1 = min(x0 + mask.shape[1], width), min(y0 + mask.shape[0], height)
        alpha = mask[iy0 - y0:iy1 - y0, ix0 - x0:ix1 - x0].astype(np.float32) / 255.0
        window = image[iy0:iy1, ix0:ix1]

        # Stay distinct from the mean of what the shape covers and from each shape it overlaps, so that
        # neither it nor the visible rest of an occluded shape blends into its surroundings.
        covered = mask >= 128
        covered_window = covered[iy0 - y0:iy1 - y0, ix0 - x0:ix1 - x0]
        mean_under = (window * alpha[..., None]).sum((0, 1)) / max(float(alpha.sum()), 1e-6)
        overlapped = np.unique(owner[iy0:iy1, ix0:ix1][covered_window])
        colour = _shape_colour(rng, np.stack([mean_under] + [colours[i] for i in overlapped if i >= 0]))
        # A soft linear shading across the patch so a shape is not one flat colour.
        direction = rng.uniform(0, 2 * math.pi)
        ys, xs = np.mgrid[iy0 - cy:iy1 - cy, ix0 - cx:ix1 - cx].astype(np.float32)
        shade = 1.0 + 0.25 * (xs * math.cos(direction) + ys * math.sin(direction)) / max(radius, 1.0)
        fill = (colour * shade[..., None]).clip(0, 255)
        image[iy0:iy1, ix0:ix1] = window + alpha[..., None] * (fill - window)

        owner[iy0:iy1, ix0:ix1][covered_window] = index
        rows, cols = np.nonzero(covered)
        boxes.append([max(x0 + cols.min(), 0), max(y0 + rows.min(), 0),
                      min(x0 + cols.max() + 1, width), min(y0 + rows.max() + 1, height)])
        classes.append(class_index)
        colours.append(colour)
        full_areas.append(int(covered.sum()))

    noise = rng.normal(0, PIXEL_NOISE_STD, size=image.shape).astype(np.float32)
    image = (image + noise).round().clip(0, 255).astype(np.uint8)

    visible = np.bincount(owner.ravel() + 1, minlength=num_objects + 1)[1:]
    keep = [i for i in range(num_objects) if visible[i] >= MIN_VISIBLE_FRACTION * full_areas[i]]
    return Sample(
        image=image,
        boxes=np.array([boxes[i] for i in keep], dtype=np.float32).reshape(-1, 4),
        classes=np.array([classes[i] for i in keep], dtype=np.int64),
    )


def _image_rng(seed: int, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, zlib.crc32(split.encode()), index]))


def _split_info(split: str, num_images: int, seed: int) -> Dict:
    return {"description": "Sparse DETR synthetic shapes", "generator_version": GENERATOR_VERSION,
            "split": split, "seed": seed, "num_images": num_images}


def _is_complete(json_path: str, info: Dict) -> bool:
    try:
        with open(json_path) as f:
            return json.load(f).get("info") == info
    except (OSError, ValueError):
        return False


def _write_split(root: str, split: str, num_images: int, seed: int, json_path: str) -> None:
    # An outdated json goes first: were we interrupted below, it must not vouch for half-rewritten images.
    if os.path.exists(json_path):
        os.remove(json_path)
    image_dir = os.path.join(root, split)
    shutil.rmtree(image_dir, ignore_errors=True)
    os.makedirs(image_dir)

    images, annotations = [], []
    for index in range(num_images):
        sample = render_sample(_image_rng(seed, split, index))
        file_name = f"{index:06d}.png"
        if not cv2.imwrite(os.path.join(image_dir, file_name), cv2.cvtColor(sample.image, cv2.COLOR_RGB2BGR)):
            raise OSError(f"could not write {os.path.join(image_dir, file_name)}")
        height, width = sample.image.shape[:2]
        images.append({"id": index + 1, "file_name": file_name, "width": width, "height": height})
        for (x0, y0, x1, y1), class_index in zip(sample.boxes.tolist(), sample.classes.tolist()):
            annotations.append({"id": len(annotations) + 1, "image_id": index + 1, "category_id": class_index + 1,
                                "bbox": [x0, y0, x1 - x0, y1 - y0], "area": (x1 - x0) * (y1 - y0), "iscrowd": 0})
    coco = {
        "info": _split_info(split, num_images, seed),
        "images": images,
        "annotations": annotations,
        "categories": [{"id": i + 1, "name": name, "supercategory": "shape"} for i, name in enumerate(CLASS_NAMES)],
    }
    temporary = f"{json_path}.{os.getpid()}.tmp"
    with open(temporary, "w") as f:
        json.dump(coco, f)
    os.replace(temporary, json_path)


def generate_split(root: str, split: str, num_images: int, seed: int = DEFAULT_SEED) -> str:
    """Make sure ``<root>/{split}/`` and ``<root>/annotations/{split}.json`` hold the requested split.

    Generates it unless a complete split with the same generator version, seed and image count is there.
    Safe to call from several processes at once. Returns the path of the COCO json.
    """
    json_path = os.path.join(root, "annotations", f"{split}.json")
    info = _split_info(split, num_images, seed)
    if _is_complete(json_path, info):
        return json_path
    os.makedirs(os.path.dirname(json_path), exist_ok=True)
    with open(f"{json_path}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if not _is_complete(json_path, info):  # another process may have made it while we waited
            logger.info(f"Generating {num_images} images of the synthetic shapes '{split}' split in {root} ...")
            _write_split(root, split, num_images, seed, json_path)
    return json_path


def default_root() -> str:
    """``$SPARSE_DETR_DATASETS``, else ``$DETECTRON2_DATASETS/sparse_detr_shapes`` (``datasets/...``)."""
    if os.environ.get("SPARSE_DETR_DATASETS"):
        return os.environ["SPARSE_DETR_DATASETS"]
    return os.path.join(os.environ.get("DETECTRON2_DATASETS", "datasets"), "sparse_detr_shapes")


def _dataset_name(split: str) -> str:
    return f"sparse_detr_shapes_{split}"


def _set_metadata(dataset_name: str):
    return MetadataCatalog.get(dataset_name).set(
        thing_classes=list(CLASS_NAMES),  # a list: load_coco_json sets the same value and requires equality
        thing_dataset_id_to_contiguous_id={i + 1: i for i in range(len(CLASS_NAMES))},
        evaluator_type="coco",
    )


def load_shapes_split(split: str, root: Optional[str] = None) -> List[Dict]:
    """Detectron2 dataset dicts of one split, generated first if needed.

    ``root`` None reads ``default_root()`` now, and the size ``SPLIT_SIZES[split]`` from the environment,
    so both may be changed after import. The metadata's ``json_file`` is set here, once the file exists;
    a COCOEvaluator built before the first load falls back to converting the dataset dicts, which gives
    the same ground truth.
    """
    root = root or default_root()
    variable, default_size = SPLIT_SIZES[split]
    json_path = generate_split(root, split, int(os.environ.get(variable, default_size)), DEFAULT_SEED)
    name = _dataset_name(split)
    if MetadataCatalog.get(name).get("json_file", json_path) != json_path:  # the root changed since last load
        MetadataCatalog.remove(name)
        _set_metadata(name)
    MetadataCatalog.get(name).set(json_file=json_path)
    return load_coco_json(json_path, os.path.join(root, split), name)


def register_shapes_datasets(root: Optional[str] = None) -> None:
    """Register ``sparse_detr_shapes_{train,val}`` (again, replacing an earlier registration).

    Nothing is generated here: a split is made the first time ``DatasetCatalog.get`` asks for it.
    """
    for split in SPLIT_SIZES:
        name = _dataset_name(split)
        if name in DatasetCatalog.list():
            DatasetCatalog.remove(name)
            MetadataCatalog.remove(name)
        DatasetCatalog.register(name, functools.partial(load_shapes_split, split, root))
        _set_metadata(name)


def preview(output_path: str, dataset_name: str = "sparse_detr_shapes_train", num_images: int = 12,
            columns: int = 4, scale: float = 2.0) -> None:
    """Write a grid of the first ``num_images`` images of a registered dataset with their boxes drawn."""
    from detectron2.utils.visualizer import Visualizer  # plotting stays out of the import of the package

    metadata = MetadataCatalog.get(dataset_name)
    tiles = []
    for record in DatasetCatalog.get(dataset_name)[:num_images]:
        image = cv2.cvtColor(cv2.imread(record["file_name"]), cv2.COLOR_BGR2RGB)
        tiles.append(Visualizer(image, metadata, scale=scale).draw_dataset_dict(record).get_image())
    tile_height = max(t.shape[0] for t in tiles)
    tile_width = max(t.shape[1] for t in tiles)
    rows = -(-len(tiles) // columns)
    grid = np.full((rows * (tile_height + 4), columns * (tile_width + 4), 3), 255, dtype=np.uint8)
    for i, tile in enumerate(tiles):
        top, left = (i // columns) * (tile_height + 4), (i % columns) * (tile_width + 4)
        grid[top:top + tile.shape[0], left:left + tile.shape[1]] = tile
    cv2.imwrite(output_path, cv2.cvtColor(grid, cv2.COLOR_RGB2BGR))
    logger.info(f"Wrote a preview of {len(tiles)} images of {dataset_name} to {output_path}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Generate the synthetic shapes dataset and preview it.")
    parser.add_argument("--preview", metavar="PNG", help="write a grid of train images with their boxes here")
    parser.add_argument("--num-images", type=int, default=12, help="images in the preview")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    for split in SPLIT_SIZES:
        DatasetCatalog.get(_dataset_name(split))
    if args.preview:
        preview(args.preview, num_images=args.num_images)
