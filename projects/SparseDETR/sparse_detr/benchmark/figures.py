"""Every figure of one config: parameters, FLOPs, FPS / B4FPS, peak memory and, against the plain path, the
speed-up and the share of the machine's peak (the row of the tables and the object ``--json`` prints)."""
import logging
import statistics
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple

import torch

from ..flops import count_flops
from ..inference import cpu_description
from .counts import convolution_gflops, cpu_peak_gflops, encoder_auxiliary_heads, trainable_parameters
from .models import build_benchmark_model, device_name, evaluation_path, random_image
from .timing import Timing, compare_speeds, measure_speed

__all__ = ["benchmark_config"]

logger = logging.getLogger(__name__)


def benchmark_config(config_file: Path, opts: Sequence[str], timing: Timing, *, num_classes: Optional[int] = None,
                     image_size: Tuple[int, int] = (850, 1040), seed: int = 0, batch_sizes: Sequence[int] = (1, 4),
                     flops: bool = True, speed: bool = True, compare_plain: bool = False,
                     peak_gflops: Optional[float] = None) -> Dict:
    """The figures of ``config_file`` (with the overrides ``opts``) on one random ``image_size`` image.

    ``flops`` / ``speed`` False leave the FLOP count / the timings out (``None``). ``compare_plain`` also times
    the plain float32 path, taking turns with the evaluation path, and adds the speed-up, the CPU and the share
    of its peak (``peak_gflops`` overrides the peak :func:`cpu_peak_gflops` estimates) and of the rate oneDNN's
    3x3 convolution reaches on it in the timed path's dtype (:func:`convolution_gflops`, measured after the runs).
    """
    height, width = image_size
    cfg, model = build_benchmark_model(config_file, opts, num_classes)
    image = random_image(height, width, seed)
    count = None
    if flops:
        logger.info("%s: counting FLOPs at %dx%d", config_file.name, height, width)
        count = count_flops(model, image[None])
    result = {
        "config": config_file.name,
        "device": timing.device.type,
        "device_name": device_name(timing.device.type, timing.clock),
        "dtype": timing.dtype,
        "image_size": [height, width],
        "num_classes": cfg.MODEL.SPARSE_DETR.NUM_CLASSES,
        "class_columns": model.transformer.class_embed[0].out_features,
        "params_m": trainable_parameters(model) / 1e6,
        "params_paper_m": trainable_parameters(model, encoder_auxiliary_heads(model)) / 1e6,
        "gflops": None if count is None else count.total / 1e9,
        "gflops_with_sampling": None if count is None else count.total_with_sampling / 1e9,
        "fps": None, "fps_iqr": None, "b4fps": None, "b4fps_iqr": None, "peak_mem_mb": None,
        "fps_by_batch_size": {}, "peak_mem_mb_by_batch_size": {},
    }
    if not speed:
        return result
    device = timing.device
    model.to(device)
    image = image.to(device)
    path = evaluation_path(cfg, model, device)
    timed, result["inference_path"] = path.module, path.label
    for batch_size in batch_sizes:
        label = f"{config_file.stem} batch {batch_size}"
        if compare_plain:
            speeds = compare_speeds({"timed": timed, "plain": model}, image, batch_size, timing.warmup,
                                    timing.repeats, desc=label, clock=timing.timer)
            measured, plain = speeds["timed"], speeds["plain"]
            result.setdefault("plain_fps_by_batch_size", {})[str(batch_size)] = plain.fps
        else:
            measured = measure_speed(timed, image, batch_size, timing.warmup, timing.repeats, timing.dtype,
                                     desc=label, clock=timing.timer)
        logger.info("%s batch %d: median %.1f ms, %.2f img/s (IQR %.2f-%.2f), peak memory %s MB",
                    config_file.name, batch_size, 1e3 * statistics.median(measured.seconds), measured.fps,
                    *measured.fps_iqr, "n/a" if measured.peak_mem_mb is None else f"{measured.peak_mem_mb:.0f}")
        result["fps_by_batch_size"][str(batch_size)] = measured.fps
        result["peak_mem_mb_by_batch_size"][str(batch_size)] = measured.peak_mem_mb
        if batch_size == 1:
            result.update(fps=measured.fps, fps_iqr=measured.fps_iqr, peak_mem_mb=measured.peak_mem_mb)
        elif batch_size == 4:
            result.update(b4fps=measured.fps, b4fps_iqr=measured.fps_iqr)
    if compare_plain:
        plain_fps = result["plain_fps_by_batch_size"]
        first = str(batch_sizes[0])
        cpu = cpu_description() if device.type == "cpu" else None
        peak = peak_gflops or (cpu_peak_gflops(cpu, path.dtype, torch.get_num_threads()) if cpu else None)
        achieved = None if count is None else result["gflops"] * result["fps_by_batch_size"][first]
        rate = convolution_gflops(path.dtype) if cpu and torch.backends.mkldnn.is_available() else None
        result.update(plain_fps=plain_fps.get("1"), plain_b4fps=plain_fps.get("4"),
                      speedup=result["fps_by_batch_size"][first] / plain_fps[first], cpu=cpu,
                      achieved_gflops_per_s=achieved, peak_gflops_per_s=peak,
                      share_of_peak=None if peak is None or achieved is None else achieved / peak,
                      convolution_gflops_per_s=rate,
                      share_of_convolution_rate=None if rate is None or achieved is None else achieved / rate)
    return result
