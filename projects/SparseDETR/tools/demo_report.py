#!/usr/bin/env python
"""Pictures and numbers of a finished training run: curves, predictions on val images, kept tokens.

    python projects/SparseDETR/tools/demo_report.py --config-file projects/SparseDETR/configs/demo.yaml \\
        --output-dir output/demo [--num-images 8] [--confidence-threshold 0.3]

Reads ``metrics.json`` and ``model_final.pth`` from the output folder and writes there:
``training_curves.png``, ``predictions/*.png`` (Detectron2 Visualizer, predictions beside ground truth),
``kept_tokens/*.png`` (the tokens the sparse encoder updated on each level), ``results.json``.

Pictures show the detections from ``--confidence-threshold`` (default: the config's TEST.CONFIDENCE_THRESHOLD).
The report also calibrates it: over the whole validation set, the threshold with the best F1 of detections
matched to ground truth of their class at IoU >= 0.5 (greedy by score, as COCO matches), with the precision and
recall there and at the threshold used.

The calibration takes the detections the evaluation after training wrote (COCOEvaluator's
``inference/coco_instances_results.json`` in the output folder, COCO category ids and XYWH boxes), so the model
runs only for the images drawn. Without that file, or with one older than ``model_final.pth``, the report
predicts every val image itself, and says so.
"""
import argparse
import json
import logging
import os
import sys
from collections import defaultdict
from typing import Dict, List, NamedTuple, Optional

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from detectron2.data import DatasetCatalog, MetadataCatalog, detection_utils  # noqa: E402
from detectron2.structures import BoxMode  # noqa: E402
from detectron2.utils.logger import setup_logger  # noqa: E402
from detectron2.utils.visualizer import Visualizer  # noqa: E402
from torchvision.ops import box_iou  # noqa: E402

import sparse_detr  # noqa: E402
from sparse_detr.cli import load_config, reports_user_errors  # noqa: E402
from sparse_detr.predictor import SparseDETRPredictor  # noqa: E402
from sparse_detr.visualization import draw_kept_tokens, kept_token_masks  # noqa: E402

logger = logging.getLogger("sparse_detr.report")
CURVES = [("total_loss", "total loss"), ("loss_ce", "classification (last layer)"),
          ("loss_bbox", "L1 box (last layer)"), ("loss_giou", "GIoU (last layer)"),
          ("loss_mask_prediction", "DAM prediction"), ("dam_recall", "DAM recall of kept tokens")]
# COCOEvaluator's detections, in the output folder (train_net.py evaluates into OUTPUT_DIR/inference)
EVALUATION_DETECTIONS = os.path.join("inference", "coco_instances_results.json")


class Detections(NamedTuple):
    """The detections of one image."""

    scores: torch.Tensor  # (N,) float32
    classes: torch.Tensor  # (N,) int64, contiguous class ids
    boxes: torch.Tensor  # (N, 4) float32, XYXY absolute pixels of the original image


def read_metrics(path):
    records = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line:
                records.append(json.loads(line))
    return records


def plot_curves(records, target):
    # a resumed run appends the iterations it repeats: keep the last record of each iteration
    records = sorted({(r["iteration"], tuple(sorted(r))): r for r in records}.values(), key=lambda r: r["iteration"])
    present = [(k, title) for k, title in CURVES if any(k in r for r in records)]
    fig, axes = plt.subplots(1, len(present), figsize=(3.6 * len(present), 3.2), squeeze=False)
    for ax, (key, title) in zip(axes[0], present):
        points = [(r["iteration"], r[key]) for r in records if key in r]
        ax.plot(*zip(*points), lw=1.4, label="all levels")
        levels = sorted({k for r in records for k in r if k.startswith(key + "_level")}) if key == "dam_recall" else []
        for level in levels:
            ax.plot(*zip(*[(r["iteration"], r[level]) for r in records if level in r]), lw=0.8, alpha=0.8,
                    label=level[len(key) + 1:])
        if levels:
            ax.legend(fontsize=7)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(target, dpi=110)
    plt.close(fig)


def evaluation_results(records):
    """The last evaluation's results found in metrics.json: COCO box metrics and, if present, DAM recall."""
    for record in reversed(records):
        boxes = {k.split("/", 1)[1]: v for k, v in record.items() if k.startswith("bbox/")}
        if boxes:
            results = {"iteration": record["iteration"], "bbox": boxes}
            recall = {k.split("/", 1)[1]: v for k, v in record.items() if k.startswith("dam_recall/")}
            if recall:
                results["dam_recall"] = recall
            return results
    return None


def matched_scores(scores, classes, boxes, gt_classes, gt_boxes, iou_threshold: float = 0.5):
    """(score, 1 if a true positive else 0) of each detection of one image: in the order of the scores, each takes
    the unmatched ground truth of its class it overlaps most, if at IoU >= ``iou_threshold``."""
    order = scores.argsort(descending=True)
    ious = box_iou(boxes[order], gt_boxes) if len(gt_boxes) else torch.zeros(len(order), 0)
    free = torch.ones(len(gt_boxes), dtype=torch.bool)
    pairs = []
    for row, index in enumerate(order.tolist()):
        candidates = ious[row] * (free & (gt_classes == classes[index])).float()
        best = int(candidates.argmax()) if len(gt_boxes) else -1
        hit = best >= 0 and candidates[best] >= iou_threshold
        if hit:
            free[best] = False
        pairs.append((float(scores[index]), int(hit)))
    return pairs


def calibrate(pairs, num_truths: int, used_threshold: float):
    """The F1-best score threshold over (score, true positive) pairs of a whole dataset, and the figures at both."""
    pairs = sorted(pairs, reverse=True)
    best, true_positives, at_used = None, 0, None
    for kept, (score, hit) in enumerate(pairs, 1):
        true_positives += hit
        precision, recall = true_positives / kept, true_positives / max(num_truths, 1)
        f1 = 2 * precision * recall / max(precision + recall, 1e-12)
        figures = {"threshold": score, "f1": f1, "precision": precision, "recall": recall}
        if best is None or f1 > best["f1"]:
            best = figures
        if score >= used_threshold:
            at_used = {**figures, "threshold": used_threshold}
    return {"best": best, "used": at_used}


def evaluation_detections(path: str, weights: str, dataset_dicts: List[Dict],
                          metadata) -> Optional[Dict[int, Detections]]:
    """The detections of every image of ``dataset_dicts`` in COCOEvaluator's ``path``, by image id, or None when
    they cannot stand for the model's: the file is missing, older than ``weights``, unreadable, or of other images
    or categories. The reason is logged in one line.

    COCO category ids go back to contiguous ids through the dataset's ``thing_dataset_id_to_contiguous_id``
    (COCOEvaluator's mapping, which it skips where the metadata has none); XYWH boxes become XYXY.
    """
    if not os.path.isfile(path):
        logger.info("no %s (the evaluation did not run): the report predicts every val image", path)
        return None
    if os.path.getmtime(path) < os.path.getmtime(weights):
        logger.info("%s is older than %s: the report predicts every val image", path, weights)
        return None
    mapping = metadata.get("thing_dataset_id_to_contiguous_id", None)
    by_image = defaultdict(list)
    try:
        with open(path) as f:
            results = json.load(f)
        image_ids = {record["image_id"] for record in dataset_dicts}
        for result in results:
            category = result["category_id"] if mapping is None else mapping[result["category_id"]]
            if result["image_id"] not in image_ids:
                raise ValueError(f"image id {result['image_id']} is not one of {metadata.name}'s")
            by_image[result["image_id"]].append((result["score"], category, result["bbox"]))
    except (OSError, ValueError, KeyError, TypeError) as e:
        logger.warning("%s does not hold this dataset's detections (%s: %s): the report predicts every val image",
                       path, type(e).__name__, e)
        return None
    detections = {}
    for image_id in image_ids:
        scores, classes, boxes = zip(*by_image[image_id]) if by_image[image_id] else ((), (), ())
        boxes = torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)
        detections[image_id] = Detections(torch.tensor(scores, dtype=torch.float32),
                                          torch.tensor(classes, dtype=torch.int64),
                                          BoxMode.convert(boxes, BoxMode.XYWH_ABS, BoxMode.XYXY_ABS))
    return detections


@reports_user_errors
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", required=True)
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--num-images", type=int, default=8)
    parser.add_argument("--confidence-threshold", type=float, default=None,
                        help="score of the drawn detections (default: the config's TEST.CONFIDENCE_THRESHOLD)")
    args = parser.parse_args(argv)
    setup_logger(name="sparse_detr")

    metrics_file = os.path.join(args.output_dir, "metrics.json")
    weights = os.path.join(args.output_dir, "model_final.pth")
    for path in (metrics_file, weights):
        if not os.path.isfile(path):
            print(f"error: {path} does not exist: train first (train_net.py --config-file {args.config_file})",
                  file=sys.stderr)
            return 2
    records = read_metrics(metrics_file)
    plot_curves(records, os.path.join(args.output_dir, "training_curves.png"))

    cfg = load_config(args.config_file)
    cfg.MODEL.DEVICE = "cpu"
    threshold = cfg.TEST.CONFIDENCE_THRESHOLD if args.confidence_threshold is None else args.confidence_threshold
    cfg.MODEL.WEIGHTS = weights
    predictor = SparseDETRPredictor(cfg)  # the model evaluation ran, with its test resize and input format
    model = predictor.model
    dataset = cfg.DATASETS.TEST[0]
    dataset_dicts = DatasetCatalog.get(dataset)
    metadata = MetadataCatalog.get(dataset)  # after loading: a COCO json's dataset sets its id mapping then
    detections_file = os.path.join(args.output_dir, EVALUATION_DETECTIONS)
    evaluated = evaluation_detections(detections_file, weights, dataset_dicts, metadata)
    if evaluated is not None:
        logger.info("calibrating on the evaluation's detections (%s); the model runs for the %d images drawn",
                    detections_file, min(args.num_images, len(dataset_dicts)))
    os.makedirs(os.path.join(args.output_dir, "predictions"), exist_ok=True)
    os.makedirs(os.path.join(args.output_dir, "kept_tokens"), exist_ok=True)
    pairs, num_truths = [], 0
    for index, record in enumerate(tqdm(dataset_dicts, desc="validation images", file=sys.stderr)):
        drawn = index < args.num_images
        if drawn or evaluated is None:
            image_bgr = detection_utils.read_image(record["file_name"], format="BGR")
            image = image_bgr[:, :, ::-1]
            inputs = [predictor.preprocess(image_bgr, record["file_name"])]
            with torch.no_grad():
                out = model.predict(inputs)
                instances = model.postprocess(out, inputs)[0]["instances"]
        truth = detection_utils.annotations_to_instances(record["annotations"], (record["height"], record["width"]))
        found = evaluated[record["image_id"]] if evaluated is not None else Detections(
            instances.scores, instances.pred_classes, instances.pred_boxes.tensor)
        pairs += matched_scores(*found, truth.gt_classes, truth.gt_boxes.tensor)
        num_truths += len(truth)
        if not drawn:
            continue
        instances = instances[instances.scores >= threshold]
        predicted = Visualizer(image, metadata, scale=2.0).draw_instance_predictions(instances).get_image()
        drawn_truth = Visualizer(image, metadata, scale=2.0).draw_dataset_dict(record).get_image()
        gap = np.full((predicted.shape[0], 8, 3), 255, np.uint8)
        name = os.path.splitext(os.path.basename(record["file_name"]))[0] + ".png"
        plt.imsave(os.path.join(args.output_dir, "predictions", name), np.concatenate([predicted, gap, drawn_truth], 1))
        if out.kept_tokens is not None:
            resized = predictor.resized_rgb(inputs[0])
            panels = draw_kept_tokens(np.kron(resized, np.ones((2, 2, 1), np.uint8)), kept_token_masks(out, 0),
                                      out.image_sizes[0])
            plt.imsave(os.path.join(args.output_dir, "kept_tokens", name), panels)
    calibration = calibrate(pairs, num_truths, threshold)

    results = {"evaluation": evaluation_results(records), "iterations": records[-1]["iteration"] + 1 if records else 0,
               "confidence_threshold": calibration,
               "calibrated_on": EVALUATION_DETECTIONS if evaluated is not None else "the report's own predictions",
               "pictures": {"curves": "training_curves.png", "predictions (left) and ground truth (right)":
                            "predictions/", "kept tokens per level": "kept_tokens/"}}
    with open(os.path.join(args.output_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    evaluation = results["evaluation"]
    if evaluation:
        logger.info("box AP %.1f, AP50 %.1f, AP75 %.1f (val, iteration %d)", evaluation["bbox"]["AP"],
                    evaluation["bbox"]["AP50"], evaluation["bbox"]["AP75"], evaluation["iteration"] + 1)
        if "dam_recall" in evaluation:
            recall = evaluation["dam_recall"]
            levels = ", ".join(f"{recall[k]:.3f}" for k in sorted(recall) if k.startswith("dam_recall_level"))
            logger.info("DAM recall %.3f (per level %s)", recall["dam_recall"], levels)
    best, used = calibration["best"], calibration["used"]
    if best is not None:
        logger.info("pictures drawn from score %.2f (TEST.CONFIDENCE_THRESHOLD): F1 %.3f (precision %.3f, recall %.3f) "
                    "on val at IoU 0.5; the F1-best threshold is %.2f (F1 %.3f)", threshold,
                    used["f1"] if used else 0.0, used["precision"] if used else 0.0, used["recall"] if used else 0.0,
                    best["threshold"], best["f1"])
    logger.info("pictures and results.json written to %s", args.output_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
