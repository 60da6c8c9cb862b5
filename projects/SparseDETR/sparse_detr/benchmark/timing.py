"""Timing: synchronised runs, several runs taking turns, and the speed of a model at one batch size.

A run is timed by a clock of :data:`CLOCKS` between two ``torch.cuda.synchronize`` on CUDA. Runs that are
compared take turns (A, B, A, B, ...), so that a busy spell of a shared machine slows them alike instead of
one side's whole series.
"""
import statistics
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial
from typing import Callable, Dict, List, Mapping, Optional

import torch
from tqdm import tqdm

from .memory import peak_memory

__all__ = ["CLOCKS", "DTYPES", "Speed", "Timing", "compare_speeds", "image_batch", "measure_speed", "precision",
           "synchronize", "take_turns", "timed_runs"]

DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
# wall: elapsed time. cpu: this process's CPU time, for a CPU shared with other work, where with one thread
# it is the elapsed time the run would take alone.
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


@dataclass(frozen=True)
class Timing:
    """How runs are timed: ``warmup`` untimed and ``repeats`` timed runs on ``device``, by the :data:`CLOCKS`
    clock ``clock``, under the :data:`DTYPES` precision ``dtype``."""

    device: torch.device
    warmup: int = 5
    repeats: int = 20
    clock: str = "wall"
    dtype: str = "fp32"

    @property
    def timer(self):
        """The clock's function."""
        return CLOCKS[self.clock]


def precision(device: torch.device, dtype: str):
    """A :data:`DTYPES` name as a context: fp32 as is; bf16 / fp16 as mixed precision under ``torch.autocast``."""
    return nullcontext() if DTYPES[dtype] is None else torch.autocast(device.type, dtype=DTYPES[dtype])


def synchronize(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_runs(run: Callable[[], object], device: torch.device, warmup: int, repeats: int,
               desc: Optional[str] = None, clock=time.perf_counter) -> List[float]:
    """Seconds of each of ``repeats`` calls of ``run()`` after ``warmup`` untimed ones, synchronised on CUDA.

    ``desc`` labels a progress bar on stderr (none without it); ``clock`` is one of :data:`CLOCKS`.
    """
    if repeats < 1:
        raise ValueError(f"the number of timed runs must be at least 1, got {repeats}")
    seconds = []
    for step in tqdm(range(warmup + repeats), desc=desc, leave=False, file=sys.stderr, disable=desc is None):
        synchronize(device)
        start = clock()
        run()
        synchronize(device)
        if step >= warmup:
            seconds.append(clock() - start)
    return seconds


def take_turns(runs: Mapping[str, Callable[[], object]], device: torch.device, warmup: int, repeats: int,
               desc: Optional[str] = None, clock=time.perf_counter) -> Dict[str, List[float]]:
    """Seconds of ``repeats`` timed calls of each of ``runs``, the runs taking turns in their order
    (A, B, A, B, ...), after ``warmup`` untimed calls of each (A's, then B's, ...)."""
    for run in runs.values():
        for _ in range(warmup):
            run()
    synchronize(device)
    seconds = {name: [] for name in runs}
    for _ in tqdm(range(repeats), desc=desc, leave=False, file=sys.stderr, disable=desc is None):
        for name, run in runs.items():
            seconds[name] += timed_runs(run, device, 0, 1, clock=clock)
    return seconds


@dataclass
class Speed:
    batch_size: int
    seconds: List[float]  # one per timed run
    peak_mem_mb: Optional[float]

    @property
    def fps(self) -> float:
        """Images per second at the median run time."""
        return self.batch_size / statistics.median(self.seconds)

    @property
    def fps_iqr(self) -> List[float]:
        """Images per second at the 3rd and 1st quartiles of the run times."""
        if len(self.seconds) < 2:
            return [self.fps, self.fps]
        q1, _, q3 = statistics.quantiles(self.seconds, n=4, method="inclusive")
        return [self.batch_size / q3, self.batch_size / q1]


def image_batch(image: torch.Tensor, batch_size: int) -> List[Dict]:
    """Detectron2's ``batched_inputs``: ``batch_size`` times the (3, H, W) ``image``."""
    height, width = image.shape[-2:]
    return [{"image": image, "height": height, "width": width} for _ in range(batch_size)]


@torch.no_grad()
def measure_speed(model: torch.nn.Module, image: torch.Tensor, batch_size: int, warmup: int, repeats: int,
                  dtype: str = "fp32", desc: str = "", clock=time.perf_counter) -> Speed:
    """Time ``model(batched_inputs)`` on ``batch_size`` copies of ``image`` (already on the model's device)."""
    device = image.device
    with peak_memory(device) as memory, precision(device, dtype):
        seconds = timed_runs(partial(model, image_batch(image, batch_size)), device, warmup, repeats,
                             desc or f"batch {batch_size}", clock)
    return Speed(batch_size, seconds, memory["mb"])


@torch.no_grad()
def compare_speeds(models: Dict[str, torch.nn.Module], image: torch.Tensor, batch_size: int, warmup: int,
                   repeats: int, desc: str = "", clock=time.perf_counter) -> Dict[str, Speed]:
    """Time several models on the same batch, taking turns run by run (:func:`take_turns`)."""
    batched_inputs = image_batch(image, batch_size)
    seconds = take_turns({name: partial(model, batched_inputs) for name, model in models.items()}, image.device,
                         warmup, repeats, desc, clock)
    return {name: Speed(batch_size, s, None) for name, s in seconds.items()}
