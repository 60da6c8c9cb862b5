#!/usr/bin/env python
"""Run a Sparse DETR model on images, a folder, a video or a webcam and draw what it finds.

    python projects/SparseDETR/demo.py --config-file projects/SparseDETR/configs/sparse_detr_r50_rho0.1.yaml \\
        --input photos/*.jpg --output out/ --confidence-threshold 0.5 --opts MODEL.WEIGHTS model.pth
    ... --input some/folder --show-kept-tokens      # also draw the tokens the sparse encoder updated
    ... --video-input clip.mp4 --output out.mp4
    ... --webcam
    # a model exported by export.py, run with ONNX Runtime (no config: the file has what the demo needs)
    python projects/SparseDETR/demo.py --onnx sparse_detr_r50_rho0.1_800x1216.onnx --input photos/ --output out/

The model always returns its top 100 detections; the demo keeps those above --confidence-threshold.
Pictures of images larger than MAX_DRAWN_SIDE pixels on a side are drawn smaller (the detections are those of
the full image). Every run ends with the line "N drawn, M skipped"; the exit status is 1 when nothing was drawn.
An ONNX model has a fixed input size: each image is resized to fit it (aspect kept) and padded with the
pixel mean at the bottom and right, and the boxes are mapped back to the image (see OnnxPredictor).
"""
import argparse
import glob
import json
import logging
import os
import sys
import time
from typing import NamedTuple, Optional, Tuple

import sparse_detr  # noqa: F401  (first: silences known-harmless warnings of the imports below)
import cv2
import numpy as np
import torch
import tqdm

from detectron2.data import MetadataCatalog
from detectron2.data import transforms as T
from detectron2.data.catalog import Metadata
from detectron2.structures import Boxes, Instances
from detectron2.utils.logger import setup_logger
from detectron2.utils.visualizer import ColorMode, Visualizer

from sparse_detr.allocator import keep_freed_memory
from sparse_detr.cli import check_weights_file, load_config, reports_user_errors
from sparse_detr.dataset_mapper import ResizeToMultiple
from sparse_detr.deploy import INPUT_NAME, OUTPUT_NAMES
from sparse_detr.predictor import SparseDETRPredictor
from sparse_detr.transformer import TransformerOutput
from sparse_detr.visualization import draw_kept_tokens, kept_token_masks

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
# Longest side of a picture: Visualizer's time and memory grow with the pixels drawn, while inference runs at the
# test size whatever the image's size.
MAX_DRAWN_SIDE = 2000
logger = logging.getLogger("sparse_detr.demo")


def setup_cfg(args):
    cfg = load_config(args.config_file, args.opts)
    check_weights_file(cfg.MODEL.WEIGHTS)
    cfg.freeze()
    return cfg


class Prediction(NamedTuple):
    instances: Instances  # the detections above the threshold, on the CPU
    best_score: float  # the highest score of all the model's detections (-inf when it returned none)
    output: Optional[TransformerOutput]  # the model's raw output (None from an exported model)
    resized: np.ndarray  # the RGB input the model saw, resized like the test loader does


class Predictor:
    """The package's SparseDETRPredictor (resize and format as Detectron2's DefaultPredictor, the evaluation path),
    keeping the model's raw output and the detections above the threshold."""

    def __init__(self, cfg, confidence_threshold: float):
        if not cfg.MODEL.WEIGHTS:
            logger.warning("no MODEL.WEIGHTS: the model is untrained (random weights) and its detections mean nothing; "
                           "give a checkpoint with --opts MODEL.WEIGHTS model.pth")
        self.predictor = SparseDETRPredictor(cfg)  # TEST.FAST_INFERENCE, TEST.PRECISION
        self.threshold = confidence_threshold
        self.metadata = MetadataCatalog.get(cfg.DATASETS.TEST[0] if cfg.DATASETS.TEST else "__unused")

    @torch.no_grad()
    def __call__(self, image_bgr: np.ndarray, name: str = "the image") -> Prediction:
        inputs = [self.predictor.preprocess(image_bgr, name)]
        model = self.predictor.model
        out = model.predict(inputs)
        instances = model.postprocess(out, inputs)[0]["instances"].to("cpu")
        best = float(instances.scores.max()) if len(instances) else float("-inf")
        return Prediction(instances[instances.scores >= self.threshold], best, out,
                          self.predictor.resized_rgb(inputs[0]))


class OnnxPredictor:
    """An exported model (``export.py --format onnx``) in ONNX Runtime, on images of any size.

    The graph takes one fixed H x W. Each image is resized by the largest factor that fits it in H x W, keeping
    its aspect (bilinear, as the test loader resizes), and padded at the bottom and right with the pixel mean,
    which the graph's normalisation turns into 0, the value Detectron2 pads with; unlike Detectron2's padding,
    these pixels are not masked (the graph has no padding mask), so detections near a large pad can differ a
    little from the PyTorch model's. Boxes are scaled back to the image and clipped, as detector_postprocess does.
    """

    def __init__(self, onnx_path: str, confidence_threshold: Optional[float]):
        import onnxruntime

        if not os.path.isfile(onnx_path):
            raise FileNotFoundError(f"--onnx {onnx_path!r}: no such file")
        try:
            self.session = onnxruntime.InferenceSession(onnx_path, providers=["CPUExecutionProvider"])
        except Exception as e:  # ONNX Runtime raises its own exception types for unreadable or invalid files
            raise ValueError(f"--onnx {onnx_path!r}: ONNX Runtime cannot load it ({str(e).splitlines()[0]})") from None
        self.height, self.width = self._check_signature(onnx_path)
        meta = self.session.get_modelmeta().custom_metadata_map
        if "sparse_detr.pixel_mean" not in meta:
            logger.warning("%s has no sparse_detr.pixel_mean metadata: padding with the ImageNet mean", onnx_path)
        self.pixel_mean = np.array(json.loads(meta.get("sparse_detr.pixel_mean", "[123.675, 116.28, 103.53]")),
                                   dtype=np.float32)
        self.metadata = Metadata(name=os.path.basename(onnx_path))
        names = json.loads(meta.get("sparse_detr.thing_classes", "null"))
        if names:
            self.metadata.set(thing_classes=names)
        self.threshold = confidence_threshold if confidence_threshold is not None else float(
            meta.get("sparse_detr.confidence_threshold", 0.5))
        self._compare_with_the_test_size(os.path.basename(onnx_path), meta)

    def _compare_with_the_test_size(self, name: str, meta) -> None:
        """One line when the config's test resize would not give an image of the graph's own aspect its H x W:
        the graph then sees objects at another scale than evaluation and ``demo.py --config-file`` do."""
        if "sparse_detr.min_size_test" not in meta:  # an export of an earlier export.py
            return
        short, longest = int(meta["sparse_detr.min_size_test"]), int(meta["sparse_detr.max_size_test"])
        multiple = int(meta.get("sparse_detr.side_multiple", 0))
        tested = T.ResizeShortestEdge.get_output_shape(self.height, self.width, short, longest)
        rounded = ""
        if multiple:
            tested = tuple(ResizeToMultiple(multiple).nearest(side) for side in tested)
            rounded = f", sides rounded to multiples of {multiple}"
        if tested != (self.height, self.width):
            logger.warning("%s takes %dx%d images, but its config (%s) tests at a short side of %d (long side at most "
                           "%d%s: %dx%d becomes %dx%d): images are scaled to %dx%d here, so the detections differ from "
                           "evaluation's and demo.py --config-file's; export at %dx%d for the same", name, self.height,
                           self.width, meta.get("sparse_detr.config", "?"), short, longest, rounded, self.height,
                           self.width, *tested, self.height, self.width, *tested)

    def _check_signature(self, onnx_path: str):
        """(H, W) of the model's input; a ValueError when the file is not a fixed-size export.py model."""
        inputs = self.session.get_inputs()
        outputs = {o.name for o in self.session.get_outputs()}
        if len(inputs) != 1 or inputs[0].name != INPUT_NAME or not outputs >= set(OUTPUT_NAMES):
            raise ValueError(f"--onnx {onnx_path!r} takes {[i.name for i in inputs]} and returns {sorted(outputs)}: "
                             f"not a model of export.py ({INPUT_NAME!r} -> {', '.join(OUTPUT_NAMES)})")
        shape = inputs[0].shape
        if len(shape) != 4 or not all(isinstance(d, int) for d in shape) or shape[1] != 3:
            raise ValueError(f"--onnx {onnx_path!r}: input {INPUT_NAME!r} has the shape {shape}, expected a fixed "
                             "(B, 3, H, W)")
        if shape[0] != 1:
            raise ValueError(f"--onnx {onnx_path!r} takes a batch of {shape[0]} images; the demo runs one image at "
                             "a time: export it with --batch 1")
        return shape[2], shape[3]

    def __call__(self, image_bgr: np.ndarray, name: str = "the image") -> Prediction:
        rgb = image_bgr[:, :, ::-1]
        h, w = rgb.shape[:2]
        scale = min(self.height / h, self.width / w)
        new_h, new_w = min(self.height, max(1, round(h * scale))), min(self.width, max(1, round(w * scale)))
        resized = T.ResizeTransform(h, w, new_h, new_w).apply_image(np.ascontiguousarray(rgb))
        canvas = np.empty((self.height, self.width, 3), dtype=np.float32)
        canvas[:] = self.pixel_mean
        canvas[:new_h, :new_w] = resized
        scores, labels, boxes = self.session.run(list(OUTPUT_NAMES), {INPUT_NAME: canvas.transpose(2, 0, 1)[None]})
        instances = Instances((h, w))
        instances.pred_boxes = Boxes(torch.from_numpy(boxes[0]))
        instances.pred_boxes.scale(w / new_w, h / new_h)
        instances.pred_boxes.clip((h, w))
        instances.scores = torch.from_numpy(scores[0])
        instances.pred_classes = torch.from_numpy(labels[0])
        instances = instances[instances.pred_boxes.nonempty()]
        best = float(instances.scores.max()) if len(instances) else float("-inf")
        return Prediction(instances[instances.scores >= self.threshold], best, None, resized)


def drawn_size(height: int, width: int) -> Tuple[int, int]:
    """(h, w) of the picture of a height x width image: its own size, or at most MAX_DRAWN_SIDE on a side."""
    scale = min(1.0, MAX_DRAWN_SIDE / max(height, width))
    return max(1, round(height * scale)), max(1, round(width * scale))


def render(predictor: "Predictor | OnnxPredictor", image_bgr: np.ndarray, show_kept_tokens: bool,
           name: str = "the image") -> np.ndarray:
    """Visualizer drawing (RGB) at :func:`drawn_size`, with the kept-token panels below it when asked."""
    prediction = predictor(image_bgr, name)
    if not len(prediction.instances):
        logger.info("%s: no detection reaches --confidence-threshold %g (the highest score is %.3f)", name,
                    predictor.threshold, prediction.best_score)
    height, width = image_bgr.shape[:2]
    size = drawn_size(height, width)
    instances = prediction.instances
    if size != (height, width):
        image_bgr = cv2.resize(image_bgr, size[::-1], interpolation=cv2.INTER_AREA)
        instances = Instances(size, **instances.get_fields())
        instances.pred_boxes = Boxes(prediction.instances.pred_boxes.tensor
                                     * torch.tensor([size[1] / width, size[0] / height] * 2))
    drawn = Visualizer(image_bgr[:, :, ::-1], predictor.metadata, instance_mode=ColorMode.IMAGE)
    # Visualizer colours the instances with picks from numpy's global random state: drawn from a fixed seed, the
    # same detections give the same picture whatever ran before, and the caller's random state is left as it was
    random_state = np.random.get_state()
    np.random.seed(0)
    try:
        picture = drawn.draw_instance_predictions(instances).get_image()
    finally:
        np.random.set_state(random_state)
    if show_kept_tokens:
        out = prediction.output
        if out.kept_tokens is None:
            logger.warning("--show-kept-tokens: this model keeps every token (RHO = 0); nothing to show")
        else:
            panels = draw_kept_tokens(prediction.resized, kept_token_masks(out, 0), out.image_sizes[0])
            scale = picture.shape[1] / panels.shape[1]
            panels = cv2.resize(panels, (picture.shape[1], max(1, round(panels.shape[0] * scale))))
            picture = np.concatenate([picture, panels], axis=0)
    return picture


def image_paths(inputs):
    paths = []
    for item in inputs:
        if os.path.isdir(item):
            images = sorted(p for p in glob.glob(os.path.join(item, "*")) if p.lower().endswith(IMAGE_EXTENSIONS))
            if not images:
                raise FileNotFoundError(f"--input {item!r}: the folder holds no image ({', '.join(IMAGE_EXTENSIONS)})")
            paths += images
        else:
            matches = sorted(glob.glob(os.path.expanduser(item)))
            if not matches:
                raise FileNotFoundError(f"--input {item!r}: no such file or folder")
            paths += matches
    return paths


def say_drawn_size(name: str, height: int, width: int) -> None:
    size = drawn_size(height, width)
    if size != (height, width):
        logger.info("%s is drawn at %dx%d, not %dx%d (pictures are at most %d px on a side); its detections are "
                    "those of the full image", name, *size, height, width, MAX_DRAWN_SIDE)


def run_images(predictor, args) -> Tuple[int, int]:
    """Draw every image of ``--input``; returns (drawn, skipped)."""
    paths = image_paths(args.input)
    drawn = skipped = 0
    for path in tqdm.tqdm(paths, disable=not args.output):
        image = cv2.imread(path, cv2.IMREAD_COLOR)
        if image is None:
            logger.warning("skipping %s: not a readable image", path)
            skipped += 1
            continue
        start = time.perf_counter()
        picture = render(predictor, image, args.show_kept_tokens, path)
        logger.info("%s: %.2fs", path, time.perf_counter() - start)
        say_drawn_size(path, *image.shape[:2])
        if args.output:
            target = args.output
            # a folder: an existing one, "out/", or for several images any name
            if os.path.isdir(args.output) or args.output.endswith(("/", os.sep)) or len(paths) > 1:
                os.makedirs(args.output, exist_ok=True)
                target = os.path.join(args.output, os.path.basename(path))
            os.makedirs(os.path.dirname(os.path.abspath(target)), exist_ok=True)
            try:
                written = cv2.imwrite(target, picture[:, :, ::-1])
            except cv2.error:  # no writer for the file's extension
                written = False
            if not written:
                raise ValueError(f"could not write {target!r}: give a folder (out/) or a file with an image extension")
        else:
            cv2.imshow("Sparse DETR", picture[:, :, ::-1])
        drawn += 1
        if not args.output and cv2.waitKey(0) == 27:
            break
    return drawn, skipped


def run_video(predictor, args) -> Tuple[int, int]:
    """Draw every frame of ``--video-input`` or the webcam; returns (drawn, skipped): frames are never skipped."""
    source = 0 if args.webcam else args.video_input
    capture = cv2.VideoCapture(source)
    if not capture.isOpened():
        raise FileNotFoundError(f"cannot open {'the webcam' if args.webcam else repr(args.video_input)}")
    writer = None
    drawn = 0
    frames = int(capture.get(cv2.CAP_PROP_FRAME_COUNT)) or None
    for _ in tqdm.tqdm(iter(int, 1), total=frames, disable=args.webcam):
        ok, frame = capture.read()
        if not ok:
            break
        if not drawn:
            say_drawn_size("the video", *frame.shape[:2])
        picture = render(predictor, frame, args.show_kept_tokens, "the frame")[:, :, ::-1]
        drawn += 1
        if args.output:
            if writer is None:
                fps = capture.get(cv2.CAP_PROP_FPS) or 15.0
                writer = cv2.VideoWriter(args.output, cv2.VideoWriter_fourcc(*"mp4v"), fps,
                                         (picture.shape[1], picture.shape[0]))
            writer.write(np.ascontiguousarray(picture))
        else:
            cv2.imshow("Sparse DETR", picture)
            if cv2.waitKey(1) == 27:
                break
    capture.release()
    if writer is not None:
        writer.release()
    return drawn, 0


def get_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    model = parser.add_mutually_exclusive_group(required=True)
    model.add_argument("--config-file", metavar="FILE")
    model.add_argument("--onnx", metavar="FILE", help="a model exported by export.py --format onnx, run with ONNX "
                                                      "Runtime (images resized and padded to its input size)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--input", nargs="+", help="images, glob patterns or folders")
    source.add_argument("--video-input", help="a video file")
    source.add_argument("--webcam", action="store_true", help="the first webcam")
    parser.add_argument("--output", help="file or folder for the pictures (a video file for --video-input); "
                                         "without it, pictures are shown in a window")
    parser.add_argument("--confidence-threshold", type=float, default=None,
                        help="a score in [0, 1]; default: the config's TEST.CONFIDENCE_THRESHOLD (0.5 for --onnx "
                             "models without one in their metadata)")
    parser.add_argument("--show-kept-tokens", action="store_true",
                        help="draw the tokens the sparse encoder updated on each level below the detections")
    parser.add_argument("--opts", default=[], nargs=argparse.REMAINDER, help="config overrides: KEY VALUE ...")
    return parser


@reports_user_errors
def main(argv=None) -> int:
    args = get_parser().parse_args(argv)
    setup_logger(name="sparse_detr")
    if args.confidence_threshold is not None and not 0.0 <= args.confidence_threshold <= 1.0:
        raise ValueError(f"--confidence-threshold is a score in [0, 1], got {args.confidence_threshold}")
    if args.onnx:
        if args.show_kept_tokens:
            raise ValueError("--show-kept-tokens needs the PyTorch model (--config-file): an exported graph "
                             "returns detections only")
        if args.opts:
            raise ValueError("--opts overrides a config: an --onnx model has none")
        predictor = OnnxPredictor(args.onnx, args.confidence_threshold)
    else:
        cfg = setup_cfg(args)
        if torch.device(cfg.MODEL.DEVICE).type == "cpu":
            keep_freed_memory()
        threshold = cfg.TEST.CONFIDENCE_THRESHOLD if args.confidence_threshold is None else args.confidence_threshold
        predictor = Predictor(cfg, threshold)
    drawn, skipped = run_images(predictor, args) if args.input else run_video(predictor, args)
    logger.log(logging.INFO if drawn else logging.ERROR, "%d drawn, %d skipped", drawn, skipped)
    return 0 if drawn else 1


if __name__ == "__main__":
    sys.exit(main())
