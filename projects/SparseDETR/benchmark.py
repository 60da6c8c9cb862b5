#!/usr/bin/env python
"""Parameters, GFLOPs, FPS, B4FPS and peak memory of the Sparse DETR family, measured like the paper.

    python projects/SparseDETR/benchmark.py --config-file projects/SparseDETR/configs/sparse_detr_r50_rho0.1.yaml \
        --num-classes 91 --device cuda --json
    python projects/SparseDETR/benchmark.py --all --num-classes 91 --skip-fps        # every config, a markdown table
    python projects/SparseDETR/benchmark.py --scaling --device cuda                    # time against the input size

The scaling study times ``model.transformer._encode`` (token scoring and selection + encoder layers) and the
whole inference at batch 1 for shorter sides 512 ... 1333 with the long side 1.5 x the shorter one
(512x768 ... 1333x2000), for Sparse DETR rho = 0.1 and 0.3 and the dense Deformable DETR by default, and
writes a PNG (``--plot``) and a markdown table.

What is measured (SPEC section 6):

* ``params_m``: trainable parameters, in millions (frozen stem and res2 excluded, as the authors count).
  ``params_paper_m``: the same without Sparse DETR's encoder auxiliary heads, which the paper's count
  (40.9 M for Sparse DETR) leaves out; equal to ``params_m`` for the other rows.
* ``gflops``: fvcore's count of one inference on one random 3x850x1040 image (``--image-size``), one
  multiply-add = one FLOP, over the operators the authors' counter covered (see ``sparse_detr/flops.py``):
  it includes 4 multiply-adds per sampled value for the bilinear taps of the deformable attention, which
  fvcore's ``grid_sampler`` rule gave the authors' PyTorch fallback, but not the attention weighting.
  ``gflops_with_sampling`` adds the weighting: the deformable sampling then costs
  5 * N * Lq * M * L * P * D per attention call (4 bilinear taps + 1 weight, for each of the N images, Lq
  queries, M heads, L levels, P points and D channels per head).
  The paper configs have the authors' class heads on COCO, a column per category id (91), so the counts
  are theirs as they stand (``MODEL.SPARSE_DETR.CLASS_COLUMNS``).
  The count depends on the image size only, so the weights are random (``MODEL.WEIGHTS`` is ignored).
  ``--skip-flops`` leaves both counts out (``null``): the trace runs on the CPU and takes a while.
* ``fps`` and ``b4fps``: images per second through the Detectron2 interface (``model(batched_inputs)``,
  post-processing included) on the inference path that evaluation takes (``TEST.FAST_INFERENCE``,
  ``TEST.PRECISION``: see ``sparse_detr/inference.py``; ``TEST.FAST_INFERENCE False`` times the model as it
  trains) at batch 1 and batch 4 of the same image, from the median of ``--repeats``
  timed runs after ``--warmup`` untimed ones (``torch.cuda.synchronize`` around each on CUDA); the spread
  is the interquartile range. ``--dtype bf16|fp16`` runs under ``torch.autocast``. On a CPU shared with other
  work, ``--threads 1 --clock cpu`` times the runs by the process's CPU time instead of the elapsed time.
* ``--compare-plain`` also times the plain float32 path (the model as it trains, no autocast) in the same
  run, the two paths taking turns run by run, and adds ``plain_fps``, ``plain_b4fps``, ``speedup`` (batch 1),
  the machine (``cpu``: model name, native bf16 through AMX / AVX512-BF16) and the gap to its limit:
  ``achieved_gflops_per_s`` (``gflops`` x FPS) against ``peak_gflops_per_s``, the CPU's peak for the
  precision of the timed path in the same unit (a multiply-add is one FLOP): threads x clock x
  multiply-adds a cycle and core (float32: 32 with AVX-512, 16 with AVX2 + FMA; bfloat16: 512 with AMX,
  64 with AVX512-BF16), assuming two FMA units a core (``--peak-gflops`` overrides it).
* ``peak_mem_mb``: on CUDA ``torch.cuda.max_memory_allocated`` during the batch-1 runs (weights included);
  on the CPU the rise of the process's peak resident set size (VmHWM, reset through
  ``/proc/self/clear_refs``) during the batch-1 runs over the resident size before them, after glibc's
  ``malloc_trim`` has returned the freed heap: the working memory of inference, weights excluded.

Trailing ``KEY VALUE`` pairs override the config, as in Detectron2's tools. Results go to stdout
(``--json``: exactly one JSON object), diagnostics to stderr.
"""
import argparse
import ctypes
import gc
import json
import logging
import statistics
import sys
import time
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import sparse_detr  # noqa: F401  (first: silences known-harmless warnings of the imports below)
import torch
from tqdm import tqdm

from detectron2.modeling import build_model

from sparse_detr.cli import CONFIG_DIR, load_config, reports_user_errors, resolve_config_file
from sparse_detr.flops import count_flops
from sparse_detr.inference import FastInferenceModel, cpu_description, inference_precision

logger = logging.getLogger("sparse_detr.benchmark")

DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
SCALING_CONFIGS = ("sparse_detr_r50_rho0.1.yaml", "sparse_detr_r50_rho0.3.yaml", "deformable_detr_r50.yaml")
SCALING_SHORT_SIDES = (512, 640, 800, 1024, 1333)
SCALING_ASPECT = 1.5  # long side = round(1.5 x shorter side): a 3:2 image, 800 x 1200 at the test scale
# wall: elapsed time. cpu: this process's CPU time, for a CPU shared with other work, where with --threads 1
# it is the elapsed time the run would take alone.
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", action="append", default=[], metavar="FILE",
                        help="config file, repeatable with --all / --scaling; a bare name is looked up in the "
                             "project's configs folder")
    parser.add_argument("--all", action="store_true",
                        help="benchmark every config of the configs folder (or the --config-file list), "
                             "print a markdown table")
    parser.add_argument("--scaling", action="store_true",
                        help="time encoder and total inference against the input's shorter side, write a PNG")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="fp32", choices=sorted(DTYPES),
                        help="bf16 / fp16 run the timed inference under torch.autocast")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--image-size", type=int, nargs=2, default=[850, 1040], metavar=("H", "W"),
                        help="image of the FLOP count and the timings (the authors' 850 x 1040)")
    parser.add_argument("--num-classes", type=int, default=None,
                        help="override MODEL.SPARSE_DETR.NUM_CLASSES (contiguous class heads of that size)")
    parser.add_argument("--skip-fps", action="store_true", help="parameters and GFLOPs only")
    parser.add_argument("--skip-flops", action="store_true",
                        help="no FLOP count (the trace on the CPU takes a while): parameters and speed only")
    parser.add_argument("--compare-plain", action="store_true",
                        help="also time the plain float32 path in the same run: speed-up, machine, share of peak")
    parser.add_argument("--peak-gflops", type=float, default=None,
                        help="the device's peak (multiply-adds per second, in G) for --compare-plain's share")
    parser.add_argument("--repeats", type=int, default=20, help="timed runs per batch size")
    parser.add_argument("--warmup", type=int, default=5, help="untimed runs before them")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    parser.add_argument("--clock", default="wall", choices=sorted(CLOCKS),
                        help="cpu: time runs by the process's CPU time (--device cpu, best with --threads 1), "
                             "for a CPU shared with other work")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch.set_num_threads for the CPU (default: PyTorch's choice)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scaling-sizes", type=int, nargs="+", default=list(SCALING_SHORT_SIDES),
                        help="shorter sides of the scaling study (long side = 1.5 x)")
    parser.add_argument("--scaling-repeats", type=int, default=3, help="timed runs per size in the scaling study")
    parser.add_argument("--scaling-warmup", type=int, default=1)
    parser.add_argument("--plot", default="output/benchmark/scaling.png", help="PNG of the scaling study")
    parser.add_argument("opts", nargs=argparse.REMAINDER, default=[],
                        help="config overrides as trailing KEY VALUE pairs")
    return parser


def all_configs() -> List[Path]:
    """Every leaf config of the project (the Base-* files are only inherited from)."""
    return sorted(p for p in CONFIG_DIR.glob("*.yaml") if not p.name.startswith("Base-"))


def build_benchmark_model(config_file: Path, opts: Sequence[str], num_classes: Optional[int]):
    """(config, the config's model on the CPU with random weights, in eval mode)."""
    cfg = load_config(str(config_file), opts)
    if num_classes is not None:
        cfg.MODEL.SPARSE_DETR.NUM_CLASSES = num_classes
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.WEIGHTS = ""
    cfg.TEST.DAM_RECALL = False  # time detection alone
    cfg.freeze()
    return cfg, build_model(cfg).eval()


def trainable_parameters(model: torch.nn.Module, exclude: Sequence[str] = ()) -> int:
    """Trainable parameters, without those whose names start with one of ``exclude``."""
    exclude = tuple(exclude)
    return sum(p.numel() for name, p in model.named_parameters() if p.requires_grad and not name.startswith(exclude))


def encoder_auxiliary_heads(model: torch.nn.Module) -> List[str]:
    """Name prefixes of Sparse DETR's encoder auxiliary heads (after the decoder's and the two-stage head)."""
    transformer = model.transformer
    if not transformer.use_enc_aux_loss:
        return []
    first = transformer.num_decoder_layers + int(transformer.two_stage)
    return [f"transformer.{kind}.{i}." for kind in ("class_embed", "bbox_embed")
            for i in range(first, len(transformer.class_embed))]


def random_image(height: int, width: int, seed: int) -> torch.Tensor:
    """(3, H, W) float RGB on the 0-255 scale."""
    return torch.rand((3, height, width), generator=torch.Generator().manual_seed(seed)) * 255


# ---- timing and memory ----------------------------------------------------------------------------------


def _synchronize(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _proc_status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def _release_free_heap():
    """glibc keeps freed heap pages resident: hand them back, or the next runs reuse them unseen."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        logger.debug("no glibc malloc_trim: the CPU peak memory may miss memory reused from earlier runs")


@contextmanager
def peak_memory(device: torch.device):
    """Yields a dict whose "mb" is, after the block, the block's peak memory (see the module docstring)."""
    result = {"mb": None}
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        yield result
        torch.cuda.synchronize(device)
        result["mb"] = torch.cuda.max_memory_allocated(device) / 2 ** 20
        return
    gc.collect()
    _release_free_heap()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current resident size
        before = _proc_status_kb("VmRSS")
    except OSError as e:
        logger.warning("cannot reset the peak resident size (%s): no CPU memory figure", e)
        yield result
        return
    yield result
    result["mb"] = max(0, _proc_status_kb("VmHWM") - before) / 1024


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


def precision(device: torch.device, dtype: str):
    """fp32 as is; bf16 / fp16 as mixed precision under ``torch.autocast``."""
    return nullcontext() if DTYPES[dtype] is None else torch.autocast(device.type, dtype=DTYPES[dtype])


def timed_runs(run, device: torch.device, warmup: int, repeats: int, desc: Optional[str] = None,
               clock=time.perf_counter) -> List[float]:
    """Seconds of each of ``repeats`` calls of ``run()`` after ``warmup`` untimed ones, synchronised on CUDA.

    ``desc`` labels a progress bar on stderr (none without it); ``clock`` is one of :data:`CLOCKS`.
    """
    if repeats < 1:
        raise ValueError(f"the number of timed runs must be at least 1, got {repeats}")
    seconds = []
    for step in tqdm(range(warmup + repeats), desc=desc, leave=False, file=sys.stderr, disable=desc is None):
        _synchronize(device)
        start = clock()
        run()
        _synchronize(device)
        if step >= warmup:
            seconds.append(clock() - start)
    return seconds


def _batch(image: torch.Tensor, batch_size: int) -> List[Dict]:
    height, width = image.shape[-2:]
    return [{"image": image, "height": height, "width": width} for _ in range(batch_size)]


@torch.no_grad()
def measure_speed(model: torch.nn.Module, image: torch.Tensor, batch_size: int, warmup: int, repeats: int,
                  dtype: str = "fp32", desc: str = "", clock=time.perf_counter) -> Speed:
    """Time ``model(batched_inputs)`` on ``batch_size`` copies of ``image`` (already on the model's device)."""
    device = image.device
    with peak_memory(device) as memory, precision(device, dtype):
        seconds = timed_runs(partial(model, _batch(image, batch_size)), device, warmup, repeats,
                             desc or f"batch {batch_size}", clock)
    return Speed(batch_size, seconds, memory["mb"])


@torch.no_grad()
def compare_speeds(models: Dict[str, torch.nn.Module], image: torch.Tensor, batch_size: int, warmup: int,
                   repeats: int, desc: str = "", clock=time.perf_counter) -> Dict[str, Speed]:
    """Time several models on the same batch, taking turns run by run (a busy spell slows all alike)."""
    device, batched_inputs = image.device, _batch(image, batch_size)
    seconds = {name: [] for name in models}
    for step in tqdm(range(warmup + repeats), desc=desc, leave=False, file=sys.stderr):
        for name, model in models.items():
            run = timed_runs(partial(model, batched_inputs), device, 0, 1, clock=clock)
            if step >= warmup:
                seconds[name] += run
    return {name: Speed(batch_size, s, None) for name, s in seconds.items()}


def cpu_peak_gflops(cpu: Dict, dtype: torch.dtype, threads: int) -> Optional[float]:
    """Peak multiply-adds per second (G) of ``threads`` cores in ``dtype``; None when unknown (see the docstring)."""
    if cpu["mhz"] is None:
        return None
    if dtype == torch.bfloat16:
        per_cycle = 512 if cpu["amx_bf16"] else 64 if cpu["avx512_bf16"] else None
    else:
        per_cycle = 32 if cpu["avx512f"] else 16 if cpu["avx2_fma"] else None
    return None if per_cycle is None else threads * cpu["mhz"] * 1e-3 * per_cycle


# ---- one config ----------------------------------------------------------------------------------------


def benchmark_config(config_file: Path, args) -> Dict:
    """Every figure of one config, as the JSON object ``--json`` prints."""
    height, width = args.image_size
    cfg, model = build_benchmark_model(config_file, args.opts, args.num_classes)
    image = random_image(height, width, args.seed)
    flops = None
    if not args.skip_flops:
        logger.info("%s: counting FLOPs at %dx%d", config_file.name, height, width)
        flops = count_flops(model, image[None])
    result = {
        "config": config_file.name,
        "device": args.device,
        "device_name": device_name(args.device, args.clock),
        "dtype": args.dtype,
        "image_size": [height, width],
        "num_classes": cfg.MODEL.SPARSE_DETR.NUM_CLASSES,
        "class_columns": model.transformer.class_embed[0].out_features,
        "params_m": trainable_parameters(model) / 1e6,
        "params_paper_m": trainable_parameters(model, encoder_auxiliary_heads(model)) / 1e6,
        "gflops": None if flops is None else flops.total / 1e9,
        "gflops_with_sampling": None if flops is None else flops.total_with_sampling / 1e9,
        "fps": None, "fps_iqr": None, "b4fps": None, "b4fps_iqr": None, "peak_mem_mb": None,
        "fps_by_batch_size": {}, "peak_mem_mb_by_batch_size": {},
    }
    if not args.skip_fps:
        device = torch.device(args.device)
        model.to(device)
        image = image.to(device)
        path_dtype = inference_precision(cfg.TEST.PRECISION, device)
        timed = FastInferenceModel(model, path_dtype) if cfg.TEST.FAST_INFERENCE else model
        result["inference_path"] = f"fast, {str(path_dtype).split('.')[-1]}" if cfg.TEST.FAST_INFERENCE else "plain"
        for batch_size in args.batch_sizes:
            label = f"{config_file.stem} batch {batch_size}"
            if args.compare_plain:
                speeds = compare_speeds({"timed": timed, "plain": model}, image, batch_size, args.warmup,
                                        args.repeats, desc=label, clock=CLOCKS[args.clock])
                speed, plain = speeds["timed"], speeds["plain"]
                result.setdefault("plain_fps_by_batch_size", {})[str(batch_size)] = plain.fps
            else:
                speed = measure_speed(timed, image, batch_size, args.warmup, args.repeats, args.dtype, desc=label,
                                      clock=CLOCKS[args.clock])
            logger.info("%s batch %d: median %.1f ms, %.2f img/s (IQR %.2f-%.2f), peak memory %s MB",
                        config_file.name, batch_size, 1e3 * statistics.median(speed.seconds), speed.fps,
                        *speed.fps_iqr, "n/a" if speed.peak_mem_mb is None else f"{speed.peak_mem_mb:.0f}")
            result["fps_by_batch_size"][str(batch_size)] = speed.fps
            result["peak_mem_mb_by_batch_size"][str(batch_size)] = speed.peak_mem_mb
            if batch_size == 1:
                result.update(fps=speed.fps, fps_iqr=speed.fps_iqr, peak_mem_mb=speed.peak_mem_mb)
            elif batch_size == 4:
                result.update(b4fps=speed.fps, b4fps_iqr=speed.fps_iqr)
        if args.compare_plain:
            plain_fps = result["plain_fps_by_batch_size"]
            first = str(args.batch_sizes[0])
            cpu = cpu_description() if device.type == "cpu" else None
            peak = args.peak_gflops or (cpu_peak_gflops(cpu, path_dtype, torch.get_num_threads()) if cpu else None)
            achieved = None if flops is None else result["gflops"] * result["fps_by_batch_size"][first]
            result.update(plain_fps=plain_fps.get("1"), plain_b4fps=plain_fps.get("4"),
                          speedup=result["fps_by_batch_size"][first] / plain_fps[first], cpu=cpu,
                          achieved_gflops_per_s=achieved, peak_gflops_per_s=peak,
                          share_of_peak=None if peak is None or achieved is None else achieved / peak)
    return result


def _fmt(value, spec: str = ".1f", iqr=None) -> str:
    if value is None:
        return "–"
    text = format(value, spec)
    return text if iqr is None else f"{text} ({format(iqr[0], spec)}–{format(iqr[1], spec)})"


def markdown_table(results: List[Dict]) -> str:
    lines = ["| config | #params (M), paper | #params (M), all | GFLOPs | GFLOPs incl. sampling weighting "
             "| FPS (IQR) | B4FPS (IQR) | peak memory (MB) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['config']} | error: {r['error']} | | | | | | |")
            continue
        lines.append(f"| {r['config']} | {r['params_paper_m']:.1f} | {r['params_m']:.1f} | {_fmt(r['gflops'])} "
                     f"| {_fmt(r['gflops_with_sampling'])} "
                     f"| {_fmt(r['fps'], '.3g', r['fps_iqr'])} | {_fmt(r['b4fps'], '.3g', r['b4fps_iqr'])} "
                     f"| {_fmt(r['peak_mem_mb'], '.0f')} |")
    first = next((r for r in results if "error" not in r), None)
    if first is not None:
        lines.append("")
        lines.append(f"Image {first['image_size'][0]}x{first['image_size'][1]}, {first['num_classes']} classes "
                     f"({first['class_columns']} class columns), "
                     f"{first['device_name']}, {first['dtype']}.")
    return "\n".join(lines)


def comparison_table(results: List[Dict]) -> str:
    """--compare-plain: the fast path against the plain float32 path, and the gap to the machine's peak."""
    lines = ["| config | plain float32 (ms) | fast path (ms) | speed-up | fast path | GFLOPs | achieved GFLOP/s "
             "| peak GFLOP/s | share of peak |", "|---|---:|---:|---:|---|---:|---:|---:|---:|"]
    for r in results:
        if "error" in r or r.get("speedup") is None:
            continue
        lines.append(f"| {r['config']} | {1e3 / r['plain_fps']:.0f} | {1e3 / r['fps']:.0f} | {r['speedup']:.2f}x "
                     f"| {r['inference_path']} | {_fmt(r['gflops'])} | {_fmt(r['achieved_gflops_per_s'], '.0f')} "
                     f"| {_fmt(r['peak_gflops_per_s'], '.0f')} | {_fmt(r['share_of_peak'], '.0%')} |")
    cpu = next((r["cpu"] for r in results if r.get("cpu")), None)
    if cpu is not None:
        lines += ["", f"{cpu['model']} at {cpu['mhz']} MHz, {torch.get_num_threads()} threads; native bf16: "
                      f"{'yes' if cpu['native_bf16'] else 'no'} (amx_bf16 {cpu['amx_bf16']}, avx512_bf16 "
                      f"{cpu['avx512_bf16']}). Batch 1; GFLOPs as fvcore counts them (a multiply-add is one)."]
    return "\n".join(lines)


# ---- scaling study -------------------------------------------------------------------------------------


class EncoderTimer:
    """Times ``model.transformer._encode`` (token scoring and selection + encoder layers) on each call.

    The bound method is wrapped on the instance for the lifetime of the context; the model is not edited.
    """

    def __init__(self, model: torch.nn.Module, device: torch.device, clock=time.perf_counter):
        self.transformer = model.transformer
        self.device = device
        self.clock = clock
        self.seconds: List[float] = []

    def __enter__(self):
        encode = self.transformer._encode

        def timed_encode(*args, **kwargs):
            _synchronize(self.device)
            start = self.clock()
            memory = encode(*args, **kwargs)
            _synchronize(self.device)
            self.seconds.append(self.clock() - start)
            return memory

        self.transformer._encode = timed_encode
        return self

    def __exit__(self, *exc):
        del self.transformer._encode  # the class's method again
        return False


@torch.no_grad()
def scaling_study(config_files: Sequence[Path], args) -> List[Dict]:
    """Median (and minimum) encoder and total inference time, batch 1, for each config and shorter side.

    The configs take turns run by run at each size, so that a busy spell of a shared machine slows all of
    them alike instead of one config's whole series.
    """
    device = torch.device(args.device)
    models = {c.name: build_benchmark_model(c, args.opts, args.num_classes)[1].to(device) for c in config_files}
    rows = []
    for short in args.scaling_sizes:
        long = round(SCALING_ASPECT * short)
        image = random_image(short, long, args.seed).to(device)
        batched_inputs = [{"image": image, "height": short, "width": long}]
        timers = {name: EncoderTimer(model, device, CLOCKS[args.clock]) for name, model in models.items()}
        totals = {name: [] for name in models}
        with ExitStack() as stack:
            for timer in timers.values():
                stack.enter_context(timer)
            stack.enter_context(precision(device, args.dtype))
            for _ in tqdm(range(args.scaling_warmup + args.scaling_repeats), desc=f"{short}x{long}", leave=False,
                          file=sys.stderr):
                for name, model in models.items():
                    totals[name] += timed_runs(partial(model, batched_inputs), device, 0, 1, clock=CLOCKS[args.clock])
        for name in models:
            encoder, total = timers[name].seconds[args.scaling_warmup:], totals[name][args.scaling_warmup:]
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


def plot_scaling(rows: List[Dict], path: Path, device_name: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for config in dict.fromkeys(r["config"] for r in rows):
        mine = [r for r in rows if r["config"] == config]
        sides = [r["short_side"] for r in mine]
        label = Path(config).stem
        axes[0].plot(sides, [r["encoder_ms"] for r in mine], marker="o", label=label)
        axes[1].plot(sides, [r["total_ms"] for r in mine], marker="o", label=label)
    for ax, title in zip(axes, ["encoder (token scoring + encoder layers)", "total inference"]):
        ax.set_title(title)
        ax.set_xlabel(f"shorter side (px), long side = {SCALING_ASPECT} x")
        ax.set_ylabel("median time (ms)")
        ax.set_xticks(sorted({r["short_side"] for r in rows}))
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.suptitle(f"Sparse DETR vs Deformable DETR inference time, batch 1, {device_name}")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def device_name(device: str, clock: str = "wall") -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    threads = torch.get_num_threads()
    return f"CPU ({threads} thread{'s' if threads > 1 else ''}{', process CPU time' if clock == 'cpu' else ''})"


# ---- entry point ---------------------------------------------------------------------------------------


def check_arguments(args) -> None:
    """Sizes, counts and device choices that cannot work, as a ValueError naming the option."""
    if min(args.image_size) < 1:
        raise ValueError("--image-size takes a positive height and width, got {} {}".format(*args.image_size))
    for option, values in (("--batch-sizes", args.batch_sizes), ("--repeats", [args.repeats]),
                           ("--scaling-sizes", args.scaling_sizes), ("--scaling-repeats", [args.scaling_repeats])):
        if min(values) < 1:
            raise ValueError(f"{option} must be at least 1, got {min(values)}")
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads must be at least 1, got {args.threads}")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: CUDA is not available")
    if args.clock == "cpu" and args.device != "cpu":
        raise ValueError("--clock cpu times CPU runs only")


@reports_user_errors
def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s: %(message)s")
    check_arguments(args)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    configs = [resolve_config_file(c) for c in args.config_file]

    if args.scaling:
        rows = scaling_study(configs or [CONFIG_DIR / c for c in SCALING_CONFIGS], args)
        name = device_name(args.device, args.clock)
        plot_scaling(rows, Path(args.plot), name)
        logger.info("wrote %s", args.plot)
        print(json.dumps({"scaling": rows}) if args.json else scaling_table(rows, name))
        return 0

    if args.all:
        results = []
        for config_file in tqdm(configs or all_configs(), desc="configs", file=sys.stderr):
            try:
                results.append(benchmark_config(config_file, args))
            except Exception as e:  # one broken config should not lose the others' rows
                logger.exception("%s failed", config_file.name)
                results.append({"config": config_file.name, "error": f"{type(e).__name__}: {e}"})
        print(json.dumps({r["config"]: r for r in results}) if args.json else render_tables(results, args))
        return 0

    if len(configs) != 1:
        raise ValueError("give one --config-file (or --all / --scaling for several)")
    result = benchmark_config(configs[0], args)
    print(json.dumps(result) if args.json else render_tables([result], args))
    return 0


def render_tables(results: List[Dict], args) -> str:
    return markdown_table(results) + ("\n\n" + comparison_table(results) if args.compare_plain else "")


if __name__ == "__main__":
    sys.exit(main())
