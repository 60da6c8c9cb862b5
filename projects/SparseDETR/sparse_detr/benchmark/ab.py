"""A/B: two configurations of one config file timed in the same run, their turns interleaved.

Side A and side B are the config file with the common overrides, then their own (``KEY VALUE ...``); a side's
``MS_DEFORM_ATTN auto|pytorch|compiled`` is not a config key but the deformable attention it runs
(:data:`ATTENTION_KEY`), its ``FLOAT32_MATMUL auto|mkl|onednn`` where its fast path's float32 matrix products
run (:data:`MATMUL_KEY`), and its ``WINOGRAD_TILE 4|2`` the tile of its fast path's float32 Winograd convolutions
(:data:`WINOGRAD_KEY`). Both
sides are built before anything is timed, from the same seed (the same random weights where their parameters
agree), and take the same inputs. Each is warmed up (the warm-up runs of A, then those of B); then they take
turns, A, B, A, B, ..., so that a busy spell of a shared machine slows both alike. The step timed is one of:

* ``inference``: ``module(batched_inputs)`` on the path evaluation runs (``TEST.FAST_INFERENCE``,
  ``TEST.PRECISION``), on ``batch_size`` copies of one random image, without gradients; with
  ``sizes="varying"``, on a batch of random images of sizes drawn anew each turn, as below (an evaluation of
  images of many sizes: a new shape may cost a kernel generation and a weight packing);
* ``training``: one iteration of Detectron2's trainer, as ``train_net.py`` builds it (forward, loss, backward,
  optimizer step; ``SimpleTrainer``, or ``MixedPrecisionTrainer`` with ``SOLVER.AMP.ENABLED``; the backbone
  channels-last on the CPU), on one fixed batch of random images with random ground truth; each side's k-th
  turn starts from the same torch seed, so that dropout draws alike. With ``sizes="varying"`` each turn
  takes a batch of its own, as a training loader gives: every image's height and width drawn from
  [SIZE_SPREAD, 1] x the image size, the same draws for both sides, each side rounding them to its
  ``INPUT.SIDE_MULTIPLE`` as its data mapper would (a new shape costs oneDNN a kernel generation).

Each side's median over its turns gives the ratio ``b_over_a`` = median(B) / median(A): A's speed-up over B
(above 1 when A is faster). Its spread is the range of the per-turn ratios b_k / a_k, each taken from two
runs a moment apart.
"""
import itertools
import logging
import os
import shlex
import statistics
from contextlib import ExitStack, contextmanager, nullcontext
from pathlib import Path
from typing import Callable, Dict, Iterator, List, NamedTuple, Optional, Sequence, Tuple
from unittest import mock

import torch

from detectron2.config import CfgNode
from detectron2.engine import SimpleTrainer
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import EventStorage

from ..dataset_mapper import ResizeToMultiple
from ..engine import MixedPrecisionTrainer, channels_last_backbone, stream_seed
from ..allocator import CHOICES as MALLOC_CHOICES
from ..fusion import FLOAT32_MATMUL_CHOICES, FLOAT32_MATMUL_ENV, WINOGRAD_TILE_CHOICES, WINOGRAD_TILE_ENV
from ..inference import cpu_description
from ..layers.ms_deform_attn import IMPLEMENTATIONS, use_implementation
from ..solver import build_optimizer
from .models import build_benchmark_model, device_name, evaluation_path, random_image
from .tables import cpu_line
from .timing import Timing, image_batch, precision, take_turns

__all__ = ["ATTENTION_KEY", "MALLOC_KEY", "MATMUL_KEY", "WINOGRAD_KEY", "SIZES", "STEPS", "Ratio", "Run", "Side",
           "ab_benchmark", "ab_ratio", "ab_runs", "ab_table", "build_side", "inference_batches", "parse_overrides",
           "side_keys", "training_batch", "training_batches", "turn_image_sizes"]

logger = logging.getLogger(__name__)

STEPS = ("inference", "training")
SIZES = ("fixed", "varying")  # training: one batch for every turn, or a batch of images of new sizes each turn
BOXES_PER_IMAGE = 5  # ground truth of each training image
SIZE_SPREAD = 0.7  # varying sizes: each side drawn uniformly from [SIZE_SPREAD, 1] x the image size's


# Not a config key: a side's ``MS_DEFORM_ATTN pytorch|compiled|auto`` runs its step with that implementation of
# the deformable attention ($SPARSE_DETR_MS_DEFORM_ATTN set around each of its calls), so that one side can be the
# authors' code path: the plain model with the PyTorch attention (``TEST.FAST_INFERENCE False MS_DEFORM_ATTN pytorch``).
ATTENTION_KEY = "MS_DEFORM_ATTN"
# Not a config key either: a side's ``MALLOC keep|default`` is its process's $SPARSE_DETR_MALLOC
# (sparse_detr.allocator), so only a side in a process of its own takes it (ab_processes, ``--ab-processes``).
MALLOC_KEY = "MALLOC"
# Nor is a side's ``FLOAT32_MATMUL auto|mkl|onednn``: $SPARSE_DETR_FLOAT32_MATMUL while its evaluation path is built
# (sparse_detr.fusion.float32_matmul_library), e.g. MKL against oneDNN on the same machine.
MATMUL_KEY = "FLOAT32_MATMUL"
# And a side's ``WINOGRAD_TILE 4|2``: $SPARSE_DETR_WINOGRAD_TILE while its evaluation path is built
# (sparse_detr.fusion.winograd_tile), e.g. F(4x4, 3x3) against F(2x2, 3x3).
WINOGRAD_KEY = "WINOGRAD_TILE"
# each side key's values
_SIDE_KEYS = {ATTENTION_KEY: IMPLEMENTATIONS, MALLOC_KEY: MALLOC_CHOICES, MATMUL_KEY: FLOAT32_MATMUL_CHOICES,
              WINOGRAD_KEY: WINOGRAD_TILE_CHOICES}
# the side keys that set a variable while the side's evaluation path is built: the variable, and its path's label
_BUILD_KEYS = {MATMUL_KEY: (FLOAT32_MATMUL_ENV, "float32 products"), WINOGRAD_KEY: (WINOGRAD_TILE_ENV, "Winograd tile")}


def side_keys(label: str, text: str, in_own_process: bool = False) -> Tuple[Dict[str, str], List[str]]:
    """A side's overrides split into its side keys (:data:`ATTENTION_KEY`, :data:`MALLOC_KEY`, :data:`MATMUL_KEY`,
    :data:`WINOGRAD_KEY`) by name, checked, and its config overrides; a ValueError naming the side for a bad value
    or a key the run cannot honour."""
    items = parse_overrides(label, text)
    pairs = list(zip(items[0::2], items[1::2]))
    keys = {key: value for key, value in pairs if key in _SIDE_KEYS}
    with _naming_the_side(label, text):
        if MALLOC_KEY in keys and not in_own_process:
            raise ValueError(f"{MALLOC_KEY} is a process's setting: give --ab-processes to run each side in its own")
        for key, value in keys.items():
            if value not in _SIDE_KEYS[key]:
                raise ValueError(f"{key} is one of {', '.join(_SIDE_KEYS[key])}, got {value!r}")
    return keys, [item for key, value in pairs if key not in keys for item in (key, value)]


class Side(NamedTuple):
    """One side of an A/B run: its overrides, config (frozen) and model (on the CPU, random weights)."""

    label: str
    overrides: List[str]
    cfg: CfgNode
    model: torch.nn.Module
    attention: Optional[str] = None  # the side's ATTENTION_KEY value, None for the environment's choice
    matmul: Optional[str] = None  # the side's MATMUL_KEY value, None for the environment's choice
    winograd_tile: Optional[str] = None  # the side's WINOGRAD_KEY value, None for the environment's choice

    def build_keys(self) -> Dict[str, str]:
        """Its side keys of :data:`_BUILD_KEYS` that it sets, with their values."""
        given = {MATMUL_KEY: self.matmul, WINOGRAD_KEY: self.winograd_tile}
        return {key: value for key, value in given.items() if value is not None}


class Run(NamedTuple):
    """One side's step, ready to be timed."""

    call: Callable[[], object]  # runs the step once
    path: str  # what runs: "fast, bfloat16", "plain", "training, float32", ...
    module: Optional[torch.nn.Module] = None  # inference: the evaluation path's module


class Ratio(NamedTuple):
    median_a: float  # seconds
    median_b: float
    b_over_a: float  # median_b / median_a: A's speed-up over B
    per_turn_min: float  # the smallest b_k / a_k
    per_turn_max: float


@contextmanager
def _naming_the_side(label: str, text: str):
    """A KeyError or ValueError of the block (a bad override) as a ValueError that names the side first."""
    try:
        yield
    except (KeyError, ValueError) as e:
        raise ValueError(f"--ab side {label} {text!r}: {e.args[0] if e.args else type(e).__name__}") from None


def parse_overrides(label: str, text: str) -> List[str]:
    """``"KEY VALUE KEY VALUE"`` (shell quoting allowed) as a list; a ValueError naming the side otherwise."""
    with _naming_the_side(label, text):
        items = shlex.split(text)
        if len(items) % 2:
            raise ValueError(f"give KEY VALUE pairs (an odd number of items: {len(items)})")
    return items


def build_side(config_file: Path, opts: Sequence[str], label: str, text: str, num_classes: Optional[int] = None,
               seed: int = 0, in_own_process: bool = False) -> Side:
    """The config file with ``opts``, then the side's overrides ``text``; its model with weights drawn from ``seed``.

    A bad override is a ValueError naming the side and the key.
    """
    keys, config_overrides = side_keys(label, text, in_own_process)
    with _naming_the_side(label, text):
        torch.manual_seed(seed)
        cfg, model = build_benchmark_model(config_file, [*opts, *config_overrides], num_classes)
    return Side(label, parse_overrides(label, text), cfg, model, keys.get(ATTENTION_KEY), keys.get(MATMUL_KEY),
                keys.get(WINOGRAD_KEY))


def _with_attention(side: Side, run: Run) -> Run:
    """The side's run inside its attention implementation, its path label naming it."""
    if side.attention is None:
        return run

    def call():
        with use_implementation(side.attention):
            return run.call()

    return Run(call, f"{run.path}, {side.attention} attention", run.module)


def turn_image_sizes(image_size: Tuple[int, int], batch_size: int, seed: int) -> List[Tuple[int, int]]:
    """``batch_size`` (h, w), each side drawn uniformly from [:data:`SIZE_SPREAD`, 1] x ``image_size``'s."""
    fractions = SIZE_SPREAD + (1 - SIZE_SPREAD) * torch.rand((batch_size, 2), generator=torch.Generator().manual_seed(seed))
    return [(max(1, round(image_size[0] * a)), max(1, round(image_size[1] * b))) for a, b in fractions.tolist()]


def training_batch(image_size: Tuple[int, int], batch_size: int, num_classes: int, seed: int,
                   sizes: Optional[Sequence[Tuple[int, int]]] = None) -> List[Dict]:
    """``batch_size`` random (3, H, W) images, each with :data:`BOXES_PER_IMAGE` random boxes and classes;
    ``sizes`` gives each image its own (H, W) instead of ``image_size``."""
    generator = torch.Generator().manual_seed(seed)
    batch = []
    for index in range(batch_size):
        height, width = sizes[index] if sizes is not None else image_size
        corner = torch.rand((BOXES_PER_IMAGE, 2), generator=generator) * 0.5
        size = 0.05 + torch.rand((BOXES_PER_IMAGE, 2), generator=generator) * 0.45
        instances = Instances((height, width))
        instances.gt_boxes = Boxes(torch.cat([corner, corner + size], 1) * torch.tensor([width, height] * 2))
        instances.gt_classes = torch.randint(num_classes, (BOXES_PER_IMAGE,), generator=generator)
        batch.append({"image": random_image(height, width, seed + index), "height": height, "width": width,
                      "instances": instances})
    return batch


def _inference_run(side: Side, loader: Iterator[List[Dict]], device: torch.device) -> Run:
    keys = side.build_keys()
    environment = {_BUILD_KEYS[key][0]: value for key, value in keys.items()}
    with mock.patch.dict(os.environ, environment) if environment else nullcontext():  # read while the fast path is
        path = evaluation_path(side.cfg, side.model.to(device), device)                # built, restored after
    label = ", ".join([path.label, *(f"{_BUILD_KEYS[key][1]}: {value}" for key, value in keys.items())])
    return Run(lambda: path.module(next(loader)), label, path.module)


def _drawn_sizes(side: Side, image_size: Tuple[int, int], batch_size: int, turn_seed: int) -> List[Tuple[int, int]]:
    """A turn's image sizes (:func:`turn_image_sizes`), each side rounded to the side's ``INPUT.SIDE_MULTIPLE`` as
    its data mapper would."""
    multiple = side.cfg.INPUT.SIDE_MULTIPLE
    rounded = ResizeToMultiple(multiple).nearest if multiple else (lambda side_length: side_length)
    return [(rounded(h), rounded(w)) for h, w in turn_image_sizes(image_size, batch_size, turn_seed)]


def inference_batches(side: Side, image_size: Tuple[int, int], batch_size: int, seed: int, sizes: str, turns: int,
                      device: torch.device) -> Iterator[List[Dict]]:
    """What the side's inference takes: ``batch_size`` copies of one random image again and again, or ``turns``
    batches of random images of varying sizes in a cycle (the sizes of :func:`training_batches`, without boxes)."""
    if sizes == "fixed":
        return itertools.repeat(image_batch(random_image(*image_size, seed).to(device), batch_size))
    batches = []
    for turn in range(turns):
        turn_seed = stream_seed(seed, turn)
        batches.append([{"image": random_image(h, w, turn_seed + index).to(device), "height": h, "width": w}
                        for index, (h, w) in enumerate(_drawn_sizes(side, image_size, batch_size, turn_seed))])
    return itertools.cycle(batches)


def training_batches(side: Side, image_size: Tuple[int, int], batch_size: int, num_classes: int, seed: int,
                      sizes: str, turns: int, device: torch.device) -> Iterator[List[Dict]]:
    """What the side's trainer loads: one batch again and again, or ``turns`` batches of varying sizes in a cycle."""
    def on_device(batch):
        return [{**item, "image": item["image"].to(device), "instances": item["instances"].to(device)}
                for item in batch]

    if sizes == "fixed":
        return itertools.repeat(on_device(training_batch(image_size, batch_size, num_classes, seed)))
    batches = []
    for turn in range(turns):
        turn_seed = stream_seed(seed, turn)
        drawn = _drawn_sizes(side, image_size, batch_size, turn_seed)
        batches.append(on_device(training_batch(image_size, batch_size, num_classes, turn_seed, drawn)))
    return itertools.cycle(batches)


def _training_run(side: Side, loader: Iterator[List[Dict]], device: torch.device, seed: int) -> Run:
    cfg = side.cfg
    model = channels_last_backbone(side.model.to(device).train())
    optimizer = build_optimizer(cfg, model)
    if cfg.SOLVER.AMP.ENABLED:
        trainer = MixedPrecisionTrainer(model, loader, optimizer, precision=getattr(torch, cfg.SOLVER.AMP.PRECISION))
        label = f"training, {cfg.SOLVER.AMP.PRECISION} autocast"
    else:
        trainer = SimpleTrainer(model, loader, optimizer)
        label = "training, float32"
    turns = itertools.count()

    def run():
        torch.manual_seed(stream_seed(seed, next(turns)))
        trainer.run_step()

    return Run(run, label)


def ab_runs(sides: Sequence[Side], step: str, image_size: Tuple[int, int], batch_size: int, device: torch.device,
            seed: int = 0, sizes: str = "fixed", turns: int = 1) -> Dict[str, Run]:
    """Each side's ``step``, by label; every side gets the same inputs (``sizes``, ``turns``: see the module)."""
    if sizes not in SIZES:
        raise ValueError(f"the A/B image sizes are one of {SIZES}, got {sizes!r}")
    if step == "inference":
        def make(side):
            return _inference_run(side, inference_batches(side, image_size, batch_size, seed, sizes, turns, device),
                                  device)
    elif step == "training":
        num_classes = min(side.cfg.MODEL.SPARSE_DETR.NUM_CLASSES for side in sides)

        def make(side):
            batches = training_batches(side, image_size, batch_size, num_classes, seed, sizes, turns, device)
            return _training_run(side, batches, device, seed)
    else:
        raise ValueError(f"the A/B step is one of {STEPS}, got {step!r}")
    runs = {}
    for side in sides:
        with _naming_the_side(side.label, shlex.join(side.overrides)):  # values the config checks do not cover
            runs[side.label] = _with_attention(side, make(side))
    return runs


def ab_ratio(seconds_a: Sequence[float], seconds_b: Sequence[float]) -> Ratio:
    """The medians of A's and B's turns, B's over A's, and the range of the per-turn ratios b_k / a_k."""
    if len(seconds_a) != len(seconds_b) or not seconds_a:
        raise ValueError(f"A/B turns come in pairs: got {len(seconds_a)} of A and {len(seconds_b)} of B")
    per_turn = [b / a for a, b in zip(seconds_a, seconds_b)]
    median_a, median_b = statistics.median(seconds_a), statistics.median(seconds_b)
    return Ratio(median_a, median_b, median_b / median_a, min(per_turn), max(per_turn))


def ab_benchmark(config_file: Path, overrides: Tuple[str, str], opts: Sequence[str], timing: Timing, *,
                 step: str = "inference", num_classes: Optional[int] = None,
                 image_size: Tuple[int, int] = (850, 1040), batch_sizes: Sequence[int] = (1,), seed: int = 0,
                 sizes: str = "fixed") -> Dict:
    """Time ``step`` of side A (``opts`` + ``overrides[0]``) against side B (``opts`` + ``overrides[1]``) at each
    batch size, turns interleaved; the object ``--json`` prints (see the module docstring)."""
    sides = [build_side(config_file, opts, label, text, num_classes, seed) for label, text in zip("AB", overrides)]
    device = timing.device
    result = {"config": config_file.name, "step": step, "image_size": list(image_size), "sizes": sizes,
              "device": device.type,
              "device_name": device_name(device.type, timing.clock), "threads": torch.get_num_threads(),
              "cpu": cpu_description(), "dtype": timing.dtype, "warmup": timing.warmup, "turns": timing.repeats,
              "sides": {side.label: {"overrides": side.overrides} for side in sides}, "rows": []}
    for batch_size in batch_sizes:
        runs = ab_runs(sides, step, image_size, batch_size, device, seed, sizes, timing.warmup + timing.repeats)
        for label, run in runs.items():
            result["sides"][label]["path"] = run.path
        with ExitStack() as stack:
            if step == "inference":
                stack.enter_context(torch.no_grad())
                stack.enter_context(precision(device, timing.dtype))
            else:
                stack.enter_context(EventStorage())
            seconds = take_turns({label: run.call for label, run in runs.items()}, device, timing.warmup,
                                 timing.repeats, desc=f"A/B {step}, batch {batch_size}", clock=timing.timer)
        ratio = ab_ratio(seconds["A"], seconds["B"])
        logger.info("A/B %s, batch %d: A %.1f ms, B %.1f ms (medians), B/A %.3f (per turn %.3f-%.3f)", step,
                    batch_size, 1e3 * ratio.median_a, 1e3 * ratio.median_b, ratio.b_over_a, ratio.per_turn_min,
                    ratio.per_turn_max)
        result["rows"].append({"batch_size": batch_size, "seconds": seconds, **ratio._asdict()})
    return result


def _malloc(side: Dict) -> str:
    return f"; malloc: {side['malloc']}" if "malloc" in side else ""


def ab_table(result: Dict) -> str:
    """The A/B result as a heading, the two sides, a markdown table with a row per batch size, and the CPU."""
    a, b = result["sides"]["A"], result["sides"]["B"]
    size = f"{result['image_size'][0]}x{result['image_size'][1]}"
    if result.get("sizes") == "varying":
        size = f"sizes varying from {SIZE_SPREAD} x {size} to {size}, new each turn"
    where = ", each side in its own process" if result.get("processes") else ""
    lines = [f"A/B {result['step']} of {result['config']}, image {size}, "
             f"{result['device_name']}: {result['turns']} turns of each, interleaved{where}, after "
             f"{result['warmup']} warm-up run{'' if result['warmup'] == 1 else 's'} of each.",
             "",
             f"* A: {' '.join(a['overrides']) or '(no overrides)'} ({a['path']}{_malloc(a)})",
             f"* B: {' '.join(b['overrides']) or '(no overrides)'} ({b['path']}{_malloc(b)})",
             "",
             "| batch | A median (ms) | B median (ms) | B / A | B / A per turn (min–max) |",
             "|---:|---:|---:|---:|---|"]
    for row in result["rows"]:
        lines.append(f"| {row['batch_size']} | {1e3 * row['median_a']:.1f} | {1e3 * row['median_b']:.1f} "
                     f"| {row['b_over_a']:.2f}x | {row['per_turn_min']:.2f}–{row['per_turn_max']:.2f}x |")
    lines += ["", "B / A above 1: A is faster. " + cpu_line(result["cpu"])]
    return "\n".join(lines)
