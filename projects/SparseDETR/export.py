#!/usr/bin/env python
"""Export a Sparse DETR model for one fixed input size: ONNX (ONNX Runtime, TensorRT) or a ``torch.export`` program.

    python projects/SparseDETR/export.py --config-file sparse_detr_r50_rho0.1.yaml --format onnx \\
        --height 800 --width 1216 --output sparse_detr_r50_rho0.1_800x1216.onnx MODEL.WEIGHTS model.pth
    python projects/SparseDETR/export.py --config-file sparse_detr_r50_rho0.1.yaml --format torch \\
        --height 800 --width 1216 --output sparse_detr_r50_rho0.1_800x1216.pt2 MODEL.WEIGHTS model.pth
    # time ONNX Runtime against PyTorch eager on the same input (here with random weights)
    python projects/SparseDETR/export.py --config-file sparse_detr_r50_rho0.1.yaml --format onnx \\
        --height 800 --width 1216 --output /tmp/sparse_detr.onnx --benchmark MODEL.WEIGHTS ""

Every row exports: Deformable DETR, Top-k & BBR, Efficient DETR and Sparse DETR, with R50 or Swin-T. A bare
config name is looked up in the project's configs folder; trailing KEY VALUE pairs override the config.
``MODEL.WEIGHTS`` must hold every tensor of the model (``MODEL.WEIGHTS ""``: random weights, for timing).

The graph (see ``sparse_detr/deploy.py``): input ``images`` (B, 3, H, W) float32 RGB on the 0-255 scale,
normalised inside, every image filling the whole H x W (resize and pad before, as ``demo.py --onnx`` does);
outputs ``scores`` (B, 100) float32, ``labels`` (B, 100) int64 contiguous class ids and ``boxes`` (B, 100, 4)
float32 xyxy in input pixels. Shapes are fixed: one export per input size and batch.
What the tool cannot do ends with one line ``error: ...`` and exit code 2.
"""
import argparse
import json
import logging
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import sparse_detr  # noqa: F401  (first: silences known-harmless warnings of the imports below)
import numpy as np
import torch

from detectron2.data import MetadataCatalog
from detectron2.modeling import build_model

from sparse_detr.benchmark.timing import CLOCKS, take_turns
from sparse_detr.checkpoint import SparseDETRCheckpointer
from sparse_detr.cli import check_weights_file, load_config, reports_user_errors, resolve_config_file
from sparse_detr.deploy import (DEFAULT_OPSET, INPUT_NAME, OUTPUT_NAMES, ExportableDetector, check_input_size,
                                export_onnx, export_program)
from sparse_detr.inference import FastInferenceModel, cpu_description, inference_precision
from sparse_detr.layers.ms_deform_attn_export import SAMPLERS
from sparse_detr.transformer import kept_token_count

logger = logging.getLogger("sparse_detr.export")

FORMATS = ("onnx", "torch")
TENSORRT_MAX_TOP_K = 3840  # ITopKLayer's limit on k
DYNAMIC_SIZE_WORDS = ("-1", "0?", "?", "dynamic", "auto", "none")


class OneLineErrorParser(argparse.ArgumentParser):
    """Argument errors as the tool's other errors: one line ``error: ...``, exit code 2."""

    def error(self, message):
        self.exit(2, f"error: {message}\n")


def fixed_size(text: str) -> int:
    if text.strip().lower() in DYNAMIC_SIZE_WORDS:
        raise argparse.ArgumentTypeError(
            f"{text!r}: dynamic sizes are not supported; the level shapes and the sparse encoder's token count "
            "follow from the input size, so export one model per size (resize and pad images to it)")
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", required=True, metavar="FILE",
                        help="config file; a bare name is looked up in the project's configs folder")
    parser.add_argument("--format", required=True, choices=FORMATS,
                        help="onnx: an ONNX model; torch: a torch.export program (.pt2)")
    parser.add_argument("--height", required=True, type=fixed_size, help="input height H (fixed)")
    parser.add_argument("--width", required=True, type=fixed_size, help="input width W (fixed)")
    parser.add_argument("--batch", default=1, type=fixed_size, help="images per run B (fixed, default 1)")
    parser.add_argument("--output", required=True, metavar="FILE", help="the .onnx or .pt2 file to write")
    parser.add_argument("--sampler", default="grid_sample", choices=sorted(SAMPLERS),
                        help="standard operators of the deformable attention's sampling: grid_sample (ONNX "
                             "GridSample, the faster on ONNX Runtime) or gather (Gather + MatMul)")
    parser.add_argument("--opset", type=int, default=DEFAULT_OPSET, help="ONNX opset (17 or later)")
    parser.add_argument("--benchmark", action="store_true",
                        help="--format onnx: then time ONNX Runtime against PyTorch eager on the same input")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads of PyTorch and ONNX Runtime in --benchmark (default: PyTorch's choice)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each runtime in --benchmark")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs before them")
    parser.add_argument("--clock", default="wall", choices=sorted(CLOCKS),
                        help="cpu: time --benchmark runs by the process's CPU time, for a busy machine")
    parser.add_argument("opts", nargs=argparse.REMAINDER, default=[],
                        help="config overrides as trailing KEY VALUE pairs, e.g. MODEL.WEIGHTS model.pth")
    return parser


def setup_cfg(config_file: Path, opts: Sequence[str]):
    cfg = load_config(str(config_file), opts)
    if cfg.INPUT.FORMAT != "RGB":
        raise ValueError(f"INPUT.FORMAT is {cfg.INPUT.FORMAT}: the exported graph takes RGB images")
    cfg.MODEL.DEVICE = "cpu"
    cfg.TEST.DAM_RECALL = False  # detections only (and the eager timing of --benchmark)
    cfg.freeze()
    return cfg


class CompleteCheckpointer(SparseDETRCheckpointer):
    """Loads every tensor of the model or raises: an exported model must not keep freshly initialised layers."""

    def _load_model(self, checkpoint):
        incompatible = super()._load_model(checkpoint)
        problems = []
        if incompatible.missing_keys:
            problems.append(f"{len(incompatible.missing_keys)} of the model's tensors are missing "
                            f"({', '.join(incompatible.missing_keys[:3])}, ...)")
        if incompatible.incorrect_shapes:
            key, have, want = incompatible.incorrect_shapes[0]
            problems.append(f"{len(incompatible.incorrect_shapes)} have another shape ({key}: {tuple(have)} in "
                            f"the file, {tuple(want)} in the model, ...)")
        if incompatible.unexpected_keys:
            problems.append(f"{len(incompatible.unexpected_keys)} of the file's tensors are not in the model "
                            f"({', '.join(incompatible.unexpected_keys[:3])}, ...)")
        if problems:
            raise ValueError("the weights do not fit the config: " + "; ".join(problems) + " (MODEL.WEIGHTS must be "
                             "a detector checkpoint of this config: train_net.py's or a converted authors' one)")
        return incompatible


def build_exported_model(cfg):
    """The config's model in eval mode on the CPU, every tensor loaded from MODEL.WEIGHTS (or random, seeded)."""
    weights = cfg.MODEL.WEIGHTS
    check_weights_file(weights)
    with torch.random.fork_rng():
        torch.manual_seed(0)  # random weights are the same in every run
        model = build_model(cfg).eval()
    if weights:
        CompleteCheckpointer(model).load(weights)
    else:
        logger.warning("MODEL.WEIGHTS is empty: exporting random weights (seed 0; good for timing only)")
    return model


def class_names(cfg) -> Optional[List[str]]:
    """The contiguous classes' names from the test set's metadata, when it names NUM_CLASSES classes."""
    if not cfg.DATASETS.TEST:
        return None
    names = MetadataCatalog.get(cfg.DATASETS.TEST[0]).get("thing_classes")
    return list(names) if names is not None and len(names) == cfg.MODEL.SPARSE_DETR.NUM_CLASSES else None


def onnx_metadata(cfg, config_file: Path, args) -> Dict[str, str]:
    """What ``demo.py --onnx`` needs besides the graph (padding value, class names, the config's test size to
    compare with the graph's), and the provenance."""
    return {"sparse_detr.config": config_file.name, "sparse_detr.weights": cfg.MODEL.WEIGHTS,
            "sparse_detr.input_size": f"{args.height}x{args.width}", "sparse_detr.sampler": args.sampler,
            "sparse_detr.min_size_test": str(cfg.INPUT.MIN_SIZE_TEST),
            "sparse_detr.max_size_test": str(cfg.INPUT.MAX_SIZE_TEST),
            "sparse_detr.side_multiple": str(cfg.INPUT.SIDE_MULTIPLE),
            "sparse_detr.pixel_mean": json.dumps(list(cfg.MODEL.PIXEL_MEAN)),
            "sparse_detr.confidence_threshold": str(cfg.TEST.CONFIDENCE_THRESHOLD),
            "sparse_detr.thing_classes": json.dumps(class_names(cfg))}


def example_images(batch: int, height: int, width: int) -> torch.Tensor:
    """A seeded random batch on the 0-255 scale: the shapes the export fixes (values do not matter)."""
    return torch.rand((batch, 3, height, width), generator=torch.Generator().manual_seed(0)) * 255


@torch.no_grad()
def benchmark(model, onnx_path: str, images: torch.Tensor, threads: int, warmup: int, repeats: int,
              clock_name: str) -> Dict:
    """Median time of PyTorch eager (Detectron2 interface) and ONNX Runtime on ``images``, runs interleaved."""
    import onnxruntime

    if repeats < 1:
        raise ValueError(f"--repeats must be at least 1, got {repeats}")
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    session = onnxruntime.InferenceSession(onnx_path, options, providers=["CPUExecutionProvider"])
    feed = {INPUT_NAME: images.numpy()}
    batched_inputs = [{"image": image} for image in images]
    clock = CLOCKS[clock_name]
    fast = FastInferenceModel(model, inference_precision("auto", images.device))
    runs = {"eager": lambda: model(batched_inputs), "fast": lambda: fast(batched_inputs),
            "onnxruntime": lambda: session.run(list(OUTPUT_NAMES), feed)}
    results = {}

    def keeping(name, run):  # the last run's result, for the comparison below
        return lambda: results.__setitem__(name, run())

    seconds = take_turns({name: keeping(name, run) for name, run in runs.items()}, images.device, warmup, repeats,
                         clock=clock)
    scores, labels, boxes = results["onnxruntime"]
    eager = [r["instances"] for r in results["eager"]]
    eager_boxes = np.stack([i.pred_boxes.tensor.numpy() for i in eager])
    height, width = images.shape[-2:]
    clipped = boxes.copy()  # as detector_postprocess does to the eager boxes
    clipped[..., 0::2] = clipped[..., 0::2].clip(0, width)
    clipped[..., 1::2] = clipped[..., 1::2].clip(0, height)
    same_count = eager_boxes.shape[1] == boxes.shape[1]  # detector_postprocess drops empty boxes
    return {
        "eager_s": statistics.median(seconds["eager"]), "onnxruntime_s": statistics.median(seconds["onnxruntime"]),
        "fast_s": statistics.median(seconds["fast"]), "fast_precision": str(fast.dtype).split(".")[-1],
        "eager_runs_s": seconds["eager"], "onnxruntime_runs_s": seconds["onnxruntime"], "fast_runs_s": seconds["fast"],
        "max_score_difference": float(np.abs(scores - np.stack([i.scores.numpy() for i in eager])).max()),
        "labels_equal": float((labels == np.stack([i.pred_classes.numpy() for i in eager])).mean()),
        "max_box_difference_px": float(np.abs(clipped - eager_boxes).max()) if same_count else None,
    }


def benchmark_report(result: Dict, config_name: str, images: torch.Tensor, threads: int, clock_name: str) -> str:
    batch, _, height, width = images.shape
    load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    box = result["max_box_difference_px"]
    lines = [f"{config_name}, batch {batch} of {height}x{width}, {cpu_description()['model']}, {threads} thread"
             f"{'s' if threads > 1 else ''}, {clock_name} clock, load average {load}",
             "",
             "| runtime | median (s) | runs (s) |",
             "|---|---:|---|",
             f"| PyTorch eager (model(batched_inputs)) | {result['eager_s']:.3f} | "
             f"{', '.join(f'{s:.3f}' for s in result['eager_runs_s'])} |",
             f"| PyTorch fast path (TEST.FAST_INFERENCE, {result['fast_precision']}) | {result['fast_s']:.3f} | "
             f"{', '.join(f'{s:.3f}' for s in result['fast_runs_s'])} |",
             f"| ONNX Runtime (CPUExecutionProvider) | {result['onnxruntime_s']:.3f} | "
             f"{', '.join(f'{s:.3f}' for s in result['onnxruntime_runs_s'])} |",
             "",
             f"eager / ONNX Runtime: {result['eager_s'] / result['onnxruntime_s']:.2f}x; fast path / ONNX Runtime: "
             f"{result['fast_s'] / result['onnxruntime_s']:.2f}x",
             f"agreement on this input: max |score difference| {result['max_score_difference']:.2g}, labels equal "
             f"{100 * result['labels_equal']:.1f} %" + ("" if box is None else f", max box difference {box:.2g} px "
                                                        "(boxes clipped as detector_postprocess does)")]
    return "\n".join(lines)


@reports_user_errors
def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.benchmark and args.format != "onnx":
        raise ValueError("--benchmark times the ONNX model: use it with --format onnx")
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be at least 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    config_file = resolve_config_file(args.config_file)
    cfg = setup_cfg(config_file, args.opts)
    model = build_exported_model(cfg)
    shapes = check_input_size(model, args.height, args.width)
    tokens = sum(h * w for h, w in shapes)
    logger.info("%s at %dx%d: feature levels %s, %d tokens", config_file.name, args.height, args.width, shapes,
                tokens)
    if model.transformer.rho > 0:
        kept = min(kept_token_count(tokens, model.transformer.rho), tokens)
        logger.info("the sparse encoder updates the top %d tokens", kept)
        if kept > TENSORRT_MAX_TOP_K:
            logger.warning("TensorRT's TopK takes k <= %d: this size's sparse encoder selects %d tokens, which "
                           "ONNX Runtime runs but TensorRT refuses (export a smaller size for TensorRT)",
                           TENSORRT_MAX_TOP_K, kept)
    detector = ExportableDetector(model, args.sampler)
    images = example_images(args.batch, args.height, args.width)
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    if args.format == "onnx":
        export_onnx(detector, images, str(output), args.opset, onnx_metadata(cfg, config_file, args))
    else:
        torch.export.save(export_program(detector, images), str(output))
    logger.info("wrote %s (%.1f MB) in %.0f s", output, output.stat().st_size / 2 ** 20,
                time.perf_counter() - start)
    if args.benchmark:
        threads = torch.get_num_threads()
        result = benchmark(model, str(output), images, threads, args.warmup, args.repeats, args.clock)
        print(benchmark_report(result, config_file.name, images, threads, args.clock))
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("sparse_detr").setLevel(logging.INFO)
    logging.getLogger("onnxscript").setLevel(logging.ERROR)  # the optimizer's notes on what it does not fold
    sys.exit(main())
