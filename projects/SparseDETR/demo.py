#!/usr/bin/env python
"""Run a Sparse DETR model on images, a folder, a video or a webcam and draw what it finds.

    python projects/SparseDETR/demo.py --config-file projects/SparseDETR/configs/sparse_detr_r50_rho0.1.yaml \\
        --input photos/*.jpg --output out/ --confidence-threshold 0.5 --opts MODEL.WEIGHTS model.pth
    ... --input some/folder --show-kept-tokens      # also draw the tokens the sparse encoder updated
    ... --video-input clip.mp4 --output out.mp4
    ... --webcam

The model always returns its top 100 detections; the demo keeps those above --confidence-threshold.
"""
import argparse
import glob
import logging
import os
import sys
import time
from typing import NamedTuple

import sparse_detr  # noqa: F401  (first: silences known-harmless warnings of the imports below)
import cv2
import numpy as np
import torch
import tqdm

from detectron2.data import MetadataCatalog
from detectron2.data import transforms as T
from detectron2.modeling import build_model
from detectron2.structures import Instances
from detectron2.utils.logger import setup_logger
from detectron2.utils.visualizer import ColorMode, Visualizer

from sparse_detr.checkpoint import SparseDETRCheckpointer
from sparse_detr.inference import build_inference_model
from sparse_detr.cli import check_weights_file, load_config, reports_user_errors
from sparse_detr.transformer import TransformerOutput
from sparse_detr.visualization import draw_kept_tokens, kept_token_masks

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
logger = logging.getLogger("sparse_detr.demo")


def setup_cfg(args):
    cfg = load_config(args.config_file, args.opts)
    check_weights_file(cfg.MODEL.WEIGHTS)
    cfg.freeze()
    return cfg


class Prediction(NamedTuple):
    instances: Instances  # the detections above the threshold, on the CPU
    best_score: float  # the highest score of all the model's detections (-inf when it returned none)
    output: TransformerOutput  # the model's raw output
    resized: np.ndarray  # the RGB input the model saw, resized like the test loader does


class Predictor:
    """Resize like the test loader, run the model once, keep detections above the threshold."""

    def __init__(self, cfg, confidence_threshold: float):
        model = build_model(cfg).eval()
        if cfg.MODEL.WEIGHTS:
            SparseDETRCheckpointer(model).load(cfg.MODEL.WEIGHTS)
        else:
            logger.warning("no MODEL.WEIGHTS: the model is untrained (random weights) and its detections mean nothing; "
                           "give a checkpoint with --opts MODEL.WEIGHTS model.pth")
        self.model = build_inference_model(cfg, model)  # TEST.FAST_INFERENCE, TEST.PRECISION
        self.resize = T.ResizeShortestEdge(cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST)
        self.input_format = cfg.INPUT.FORMAT
        self.threshold = confidence_threshold
        names = cfg.DATASETS.TEST[0] if cfg.DATASETS.TEST else "__unused"
        self.metadata = MetadataCatalog.get(names)

    @torch.no_grad()
    def __call__(self, image_bgr: np.ndarray, name: str = "the image") -> Prediction:
        rgb = image_bgr[:, :, ::-1]
        resize = self.resize.get_transform(rgb)
        if min(resize.new_h, resize.new_w) < 1:
            raise ValueError(f"{name}: the {resize.h}x{resize.w} image has a zero side once resized to the test size "
                             f"(INPUT.MIN_SIZE_TEST, MAX_SIZE_TEST): {resize.new_h}x{resize.new_w}; it is too thin")
        resized = resize.apply_image(rgb)
        model_input = resized if self.input_format == "RGB" else resized[:, :, ::-1]
        tensor = torch.as_tensor(np.ascontiguousarray(model_input.transpose(2, 0, 1)), dtype=torch.float32)
        inputs = [{"image": tensor, "height": image_bgr.shape[0], "width": image_bgr.shape[1]}]
        out = self.model.predict(inputs)
        instances = self.model.postprocess(out, inputs)[0]["instances"].to("cpu")
        best = float(instances.scores.max()) if len(instances) else float("-inf")
        return Prediction(instances[instances.scores >= self.threshold], best, out, resized)


def render(predictor: Predictor, image_bgr: np.ndarray, show_kept_tokens: bool, name: str = "the image") -> np.ndarray:
    """Visualizer drawing (RGB), with the kept-token panels below it when asked."""
    prediction = predictor(image_bgr, name)
    if not len(prediction.instances):
        logger.info("%s: no detection reaches --confidence-threshold %g (the highest score is %.3f)", name,
                    predictor.threshold, prediction.best_score)
    rgb = image_bgr[:, :, ::-1]
    drawn = Visualizer(rgb, predictor.metadata, instance_mode=ColorMode.IMAGE)
    picture = drawn.draw_instance_predictions(prediction.instances).get_image()
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


def run_images(predictor, args):
    paths = image_paths(args.input)
    for path in tqdm.tqdm(paths, disable=not args.output):
        image = cv2.imread(path, cv2.IMREAD_COLOR)
        if image is None:
            logger.warning("skipping %s: not a readable image", path)
            continue
        start = time.perf_counter()
        picture = render(predictor, image, args.show_kept_tokens, path)
        logger.info("%s: %.2fs", path, time.perf_counter() - start)
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
            if cv2.waitKey(0) == 27:
                break


def run_video(predictor, args):
    source = 0 if args.webcam else args.video_input
    capture = cv2.VideoCapture(source)
    if not capture.isOpened():
        raise FileNotFoundError(f"cannot open {'the webcam' if args.webcam else repr(args.video_input)}")
    writer = None
    frames = int(capture.get(cv2.CAP_PROP_FRAME_COUNT)) or None
    for _ in tqdm.tqdm(iter(int, 1), total=frames, disable=args.webcam):
        ok, frame = capture.read()
        if not ok:
            break
        picture = render(predictor, frame, args.show_kept_tokens, "the frame")[:, :, ::-1]
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


def get_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", required=True, metavar="FILE")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--input", nargs="+", help="images, glob patterns or folders")
    source.add_argument("--video-input", help="a video file")
    source.add_argument("--webcam", action="store_true", help="the first webcam")
    parser.add_argument("--output", help="file or folder for the pictures (a video file for --video-input); "
                                         "without it, pictures are shown in a window")
    parser.add_argument("--confidence-threshold", type=float, default=0.5, help="a score in [0, 1]")
    parser.add_argument("--show-kept-tokens", action="store_true",
                        help="draw the tokens the sparse encoder updated on each level below the detections")
    parser.add_argument("--opts", default=[], nargs=argparse.REMAINDER, help="config overrides: KEY VALUE ...")
    return parser


@reports_user_errors
def main(argv=None) -> int:
    args = get_parser().parse_args(argv)
    setup_logger(name="sparse_detr")
    if not 0.0 <= args.confidence_threshold <= 1.0:
        raise ValueError(f"--confidence-threshold is a score in [0, 1], got {args.confidence_threshold}")
    cfg = setup_cfg(args)
    predictor = Predictor(cfg, args.confidence_threshold)
    if args.input:
        run_images(predictor, args)
    else:
        run_video(predictor, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
