"""The models and inputs every benchmark job times: a config's model with random weights, random images,
the inference path evaluation takes, and the name of the device they run on."""
from pathlib import Path
from typing import List, NamedTuple, Optional, Sequence

import torch

from detectron2.modeling import build_model

from ..cli import CONFIG_DIR, load_config
from ..inference import FastInferenceModel, inference_precision

__all__ = ["EvaluationPath", "all_configs", "build_benchmark_model", "device_name", "evaluation_path", "random_image"]


def all_configs() -> List[Path]:
    """Every leaf config of the project (the Base-* files are only inherited from)."""
    return sorted(p for p in CONFIG_DIR.glob("*.yaml") if not p.name.startswith("Base-"))


def build_benchmark_model(config_file: Path, opts: Sequence[str], num_classes: Optional[int]):
    """(frozen config, the config's model on the CPU with random weights, in eval mode).

    ``MODEL.WEIGHTS`` is ignored: speed and FLOPs depend on the sizes only. ``TEST.DAM_RECALL`` is turned off,
    so that timings are those of detection alone.
    """
    cfg = load_config(str(config_file), opts)
    if num_classes is not None:
        cfg.MODEL.SPARSE_DETR.NUM_CLASSES = num_classes
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.WEIGHTS = ""
    cfg.TEST.DAM_RECALL = False
    cfg.freeze()
    return cfg, build_model(cfg).eval()


class EvaluationPath(NamedTuple):
    module: torch.nn.Module  # called as module(batched_inputs)
    dtype: torch.dtype  # of its convolutions and linear layers
    label: str  # "plain" or "fast, <dtype>"


def evaluation_path(cfg, model: torch.nn.Module, device: torch.device) -> EvaluationPath:
    """The inference path evaluation runs for ``model`` on ``device`` (``TEST.FAST_INFERENCE``, ``TEST.PRECISION``).

    What :func:`sparse_detr.inference.build_inference_model` builds, for ``device`` rather than
    ``MODEL.DEVICE`` (the benchmark's configs say "cpu" and move the model afterwards). With int8 the ranges are
    calibrated on one random image of the test size (the benchmark's models have random weights, and its timings
    do not depend on the ranges); the dtype is int8, the label names the rest's.
    """
    if not cfg.TEST.FAST_INFERENCE:
        return EvaluationPath(model, torch.float32, "plain")
    dtype = inference_precision(cfg.TEST.PRECISION, device)
    if dtype == torch.int8:
        short = cfg.INPUT.MIN_SIZE_TEST
        image = random_image(short, min(cfg.INPUT.MAX_SIZE_TEST, short * 3 // 2), seed=0).to(device)
        fast = FastInferenceModel(model, dtype, calibration=[{"image": image}])
        return EvaluationPath(fast, dtype, f"fast, int8 backbone and linear layers, {str(fast.dtype).split('.')[-1]}")
    return EvaluationPath(FastInferenceModel(model, dtype), dtype, f"fast, {str(dtype).split('.')[-1]}")


def random_image(height: int, width: int, seed: int) -> torch.Tensor:
    """(3, H, W) float RGB on the 0-255 scale."""
    return torch.rand((3, height, width), generator=torch.Generator().manual_seed(seed)) * 255


def device_name(device: str, clock: str = "wall") -> str:
    """The GPU's name, or "CPU (N threads)", with ", process CPU time" for the ``cpu`` clock."""
    if device == "cuda":
        return torch.cuda.get_device_name()
    threads = torch.get_num_threads()
    return f"CPU ({threads} thread{'s' if threads > 1 else ''}{', process CPU time' if clock == 'cpu' else ''})"
