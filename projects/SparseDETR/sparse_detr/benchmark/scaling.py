"""The scaling study: encoder and total inference time against the input size, for several configs.

``model.transformer._encode`` (token scoring and selection + encoder layers) and the whole inference are timed
at batch 1 for shorter sides 512 ... 1333 with the long side 1.5 x the shorter one (512x768 ... 1333x2000), for
Sparse DETR rho = 0.1 and 0.3 and the dense Deformable DETR by default. The plot is drawn by ``benchmark.py``.
"""
import logging
import statistics
from contextlib import ExitStack
from functools import partial
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch

from .models import build_benchmark_model, random_image
from .timing import Timing, precision, synchronize, take_turns

__all__ = ["SCALING_ASPECT", "SCALING_CONFIGS", "SCALING_SHORT_SIDES", "EncoderTimer", "scaling_study",
           "scaling_table"]

logger = logging.getLogger(__name__)

SCALING_CONFIGS = ("sparse_detr_r50_rho0.1.yaml", "sparse_detr_r50_rho0.3.yaml", "deformable_detr_r50.yaml")
SCALING_SHORT_SIDES = (512, 640, 800, 1024, 1333)
SCALING_ASPECT = 1.5  # long side = round(1.5 x shorter side): a 3:2 image, 800 x 1200 at the test scale


class EncoderTimer:
    """Times ``model.transformer._encode`` (token scoring and selection + encoder layers) on each call.

    The bound method is wrapped on the instance for the lifetime of the context; the model is not edited.
    """

    def __init__(self, model: torch.nn.Module, device: torch.device, clock):
        self.transformer = model.transformer
        self.device = device
        self.clock = clock
        self.seconds: List[float] = []

    def __enter__(self):
        encode = self.transformer._encode

        def timed_encode(*args, **kwargs):
            synchronize(self.device)
            start = self.clock()
            encoded = encode(*args, **kwargs)  # (memory, values)
            synchronize(self.device)
            self.seconds.append(self.clock() - start)
            return encoded

        self.transformer._encode = timed_encode
        return self

    def __exit__(self, *exc):
        del self.transformer._encode  # the class's method again
        return False


@torch.no_grad()
def scaling_study(config_files: Sequence[Path], opts: Sequence[str], timing: Timing, *,
                  num_classes: Optional[int] = None, short_sides: Sequence[int] = SCALING_SHORT_SIDES,
                  seed: int = 0) -> List[Dict]:
    """Median (and minimum) encoder and total inference time, batch 1, for each config and shorter side.

    The configs take turns run by run at each size (:func:`~sparse_detr.benchmark.timing.take_turns`).
    The models run as they train (no fast inference path), with ``timing.dtype``'s autocast.
    """
    device = timing.device
    models = {c.name: build_benchmark_model(c, opts, num_classes)[1].to(device) for c in config_files}
    rows = []
    for short in short_sides:
        long = round(SCALING_ASPECT * short)
        image = random_image(short, long, seed).to(device)
        batched_inputs = [{"image": image, "height": short, "width": long}]
        timers = {name: EncoderTimer(model, device, timing.timer) for name, model in models.items()}
        with ExitStack() as stack:
            for timer in timers.values():
                stack.enter_context(timer)
            stack.enter_context(precision(device, timing.dtype))
            totals = take_turns({name: partial(model, batched_inputs) for name, model in models.items()}, device,
                                timing.warmup, timing.repeats, desc=f"{short}x{long}", clock=timing.timer)
        for name in models:
            encoder, total = timers[name].seconds[timing.warmup:], totals[name]
            row = {"config": name, "short_side": short, "image_size": [short, long],
                   "encoder_ms": 1e3 * statistics.median(encoder), "total_ms": 1e3 * statistics.median(total),
                   "encoder_min_ms": 1e3 * min(encoder), "total_min_ms": 1e3 * min(total)}
            logger.info("%s %dx%d: encoder %.1f ms, total %.1f ms (minimum %.1f, %.1f)", name, short, long,
                        row["encoder_ms"], row["total_ms"], row["encoder_min_ms"], row["total_min_ms"])
            rows.append(row)
    return rows


def scaling_table(rows: List[Dict], device_name: str) -> str:
    lines = [f"Batch 1 on {device_name}, median (minimum) of the timed runs in ms; long side = {SCALING_ASPECT} x "
             "shorter side.", "",
             "| config | shorter side | input (HxW) | encoder (ms) | total (ms) | encoder share |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['config']} | {r['short_side']} | {r['image_size'][0]}x{r['image_size'][1]} "
                     f"| {r['encoder_ms']:.0f} ({r['encoder_min_ms']:.0f}) "
                     f"| {r['total_ms']:.0f} ({r['total_min_ms']:.0f}) | {r['encoder_ms'] / r['total_ms']:.0%} |")
    return "\n".join(lines)
