#!/usr/bin/env python
"""Parameters, GFLOPs, FPS, B4FPS and peak memory of the Sparse DETR family, measured like the paper.

    python projects/SparseDETR/benchmark.py --config-file projects/SparseDETR/configs/sparse_detr_r50_rho0.1.yaml \
        --num-classes 91 --device cuda --json
    python projects/SparseDETR/benchmark.py --all --num-classes 91 --skip-fps        # every config, a markdown table
    python projects/SparseDETR/benchmark.py --scaling --device cuda                    # time against the input size
    python projects/SparseDETR/benchmark.py --config-file sparse_detr_r50_rho0.1.yaml --device cpu \
        --ab "TEST.PRECISION bfloat16" "TEST.FAST_INFERENCE False" --batch-sizes 1    # A/B, turns interleaved

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
  64 with AVX512-BF16), assuming two FMA units a core as wide as the instructions (AMD's Zen 4 runs AVX-512 on
  256-bit units: half those); the clock is /proc/cpuinfo's (``--peak-gflops`` overrides the estimate).
* ``peak_mem_mb``: on CUDA ``torch.cuda.max_memory_allocated`` during the batch-1 runs (weights included);
  on the CPU the rise of the process's peak resident set size (VmHWM, reset through
  ``/proc/self/clear_refs``) during the batch-1 runs over the resident size before them, after glibc's
  ``malloc_trim`` has returned the freed heap: the working memory of inference, weights excluded.

A/B (``--ab A B``, ``sparse_detr/benchmark/ab.py``): two configurations of one config file, each the config with
the trailing overrides and then its own ``KEY VALUE`` pairs, built before anything is timed (same seed) and timed
on the same inputs in the same run: the warm-up runs of A, then those of B, then ``--repeats`` turns
A, B, A, B, ... ``--ab-step inference`` (default) times the evaluation path at each of ``--batch-sizes`` on copies
of one random image; ``--ab-step training`` times one training iteration (forward, loss, backward, optimizer
step, as train_net.py's trainer runs it) on one fixed batch of ``--batch-sizes`` random images of
``--image-size`` with random boxes, each side's k-th turn seeded alike; ``--ab-sizes varying`` gives each turn a
batch of its own, as a training loader or an evaluation of many image sizes does (either step), each image's
sides drawn from 0.7-1 x ``--image-size`` (the same draws for both sides, each rounding them to its
``INPUT.SIDE_MULTIPLE``). Printed: each side's overrides and path,
the median of its turns, B's median over A's (A's speed-up over B) with the range of the per-turn ratios, and
the CPU (model name, native bf16 through AMX / AVX512-BF16).

Trailing ``KEY VALUE`` pairs override the config, as in Detectron2's tools. Results go to stdout
(``--json``: exactly one JSON object), diagnostics to stderr.
"""
import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import sparse_detr  # noqa: F401  (first: silences known-harmless warnings of the imports below)
import torch
from tqdm import tqdm

from sparse_detr.allocator import keep_freed_memory
from sparse_detr.benchmark import (CLOCKS, DTYPES, SCALING_ASPECT, SCALING_CONFIGS, Timing, ab_benchmark,
                                   ab_in_processes, ab_table,
                                   all_configs, benchmark_config, comparison_table, markdown_table, scaling_study,
                                   scaling_table)
from sparse_detr.benchmark.ab import SIZES, STEPS
from sparse_detr.benchmark.models import device_name
from sparse_detr.benchmark.scaling import SCALING_SHORT_SIDES
from sparse_detr.cli import CONFIG_DIR, reports_user_errors, resolve_config_file

logger = logging.getLogger("sparse_detr.benchmark")


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
    parser.add_argument("--ab", nargs=2, metavar=("A", "B"), default=None,
                        help="time two configurations of the --config-file in the same run, turns interleaved: "
                             "each a quoted string of KEY VALUE overrides (\"\" for none); the side keys "
                             "MS_DEFORM_ATTN auto|pytorch|compiled pick that side's deformable attention, "
                             "FLOAT32_MATMUL auto|mkl|onednn where its float32 products run, WINOGRAD_TILE 4|2 "
                             "its Winograd convolutions' tile")
    parser.add_argument("--ab-processes", action="store_true",
                        help="--ab inference with each side in its own process, turns interleaved; a side's key "
                             "MALLOC keep|default sets its $SPARSE_DETR_MALLOC (the authors' code as it runs: "
                             "\"TEST.FAST_INFERENCE False MS_DEFORM_ATTN pytorch MALLOC default\")")
    parser.add_argument("--ab-step", default="inference", choices=STEPS,
                        help="what --ab times: the evaluation path, or one training iteration")
    parser.add_argument("--ab-sizes", default="fixed", choices=SIZES,
                        help="--ab-step training: one batch of --image-size images for every turn, or a batch of "
                             "its own each turn, every image of a size drawn from 0.7-1 x --image-size (rounded "
                             "to each side's INPUT.SIDE_MULTIPLE), as a training loader gives")
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
    parser.add_argument("--repeats", type=int, default=20, help="timed runs per batch size (--ab: turns of each)")
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


def plot_scaling(rows: List[Dict], path: Path, device_name: str):
    """The scaling study's encoder and total times against the shorter side, a line per config, as a PNG."""
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


def check_arguments(args) -> None:
    """Sizes, counts and device choices that cannot work, as a ValueError naming the option."""
    if min(args.image_size) < 1:
        raise ValueError("--image-size takes a positive height and width, got {} {}".format(*args.image_size))
    for option, values in (("--batch-sizes", args.batch_sizes), ("--repeats", [args.repeats]),
                           ("--scaling-sizes", args.scaling_sizes), ("--scaling-repeats", [args.scaling_repeats])):
        if min(values) < 1:
            raise ValueError(f"{option} must be at least 1, got {min(values)}")
    for option, value in (("--warmup", args.warmup), ("--scaling-warmup", args.scaling_warmup)):
        if value < 0:
            raise ValueError(f"{option} must be at least 0, got {value}")
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads must be at least 1, got {args.threads}")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: CUDA is not available")
    if args.clock == "cpu" and args.device != "cpu":
        raise ValueError("--clock cpu times CPU runs only")
    if args.ab_processes and args.ab is None:
        raise ValueError("--ab-processes runs the two sides of --ab A B: give --ab")
    if args.ab is not None:
        others = [option for option, given in (("--all", args.all), ("--scaling", args.scaling),
                                               ("--compare-plain", args.compare_plain)) if given]
        if others:
            raise ValueError(f"--ab times one config's two sides: it does not go with {', '.join(others)}")
        if args.ab_processes and args.ab_step != "inference":
            raise ValueError("--ab-processes times inference (--ab-step inference)")
        if args.ab_sizes != "fixed" and args.ab_processes:
            raise ValueError("--ab-sizes varying runs both sides in one process (without --ab-processes)")
        if args.ab_step == "training" and args.dtype != "fp32":
            raise ValueError("--dtype is for inference: train in mixed precision through an --ab override "
                             "(SOLVER.AMP.ENABLED True SOLVER.AMP.PRECISION bfloat16)")


def render_tables(results: List[Dict], args) -> str:
    return markdown_table(results) + ("\n\n" + comparison_table(results) if args.compare_plain else "")


@reports_user_errors
def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s: %(message)s")
    check_arguments(args)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    configs = [resolve_config_file(c) for c in args.config_file]
    device = torch.device(args.device)
    if device.type == "cpu":
        keep_freed_memory()  # as train_net.py --eval-only and demo.py do: both sides of a comparison run with it
    timing = Timing(device, args.warmup, args.repeats, args.clock, args.dtype)

    if args.scaling:
        rows = scaling_study(configs or [CONFIG_DIR / c for c in SCALING_CONFIGS], args.opts,
                             Timing(device, args.scaling_warmup, args.scaling_repeats, args.clock, args.dtype),
                             num_classes=args.num_classes, short_sides=args.scaling_sizes, seed=args.seed)
        name = device_name(args.device, args.clock)
        plot_scaling(rows, Path(args.plot), name)
        logger.info("wrote %s", args.plot)
        print(json.dumps({"scaling": rows}) if args.json else scaling_table(rows, name))
        return 0

    settings = dict(num_classes=args.num_classes, image_size=tuple(args.image_size), seed=args.seed,
                    batch_sizes=args.batch_sizes)
    if args.all:
        results = []
        for config_file in tqdm(configs or all_configs(), desc="configs", file=sys.stderr):
            try:
                results.append(benchmark_config(config_file, args.opts, timing, flops=not args.skip_flops,
                                                speed=not args.skip_fps, compare_plain=args.compare_plain,
                                                peak_gflops=args.peak_gflops, **settings))
            except Exception as e:  # one broken config should not lose the others' rows
                logger.exception("%s failed", config_file.name)
                results.append({"config": config_file.name, "error": f"{type(e).__name__}: {e}"})
        print(json.dumps({r["config"]: r for r in results}) if args.json else render_tables(results, args))
        return 0

    if len(configs) != 1:
        raise ValueError("give one --config-file (or --all / --scaling for several)")
    if args.ab is not None and args.ab_processes:
        result = ab_in_processes(configs[0], tuple(args.ab), args.opts, timing, **settings)
        print(json.dumps({"ab": result}) if args.json else ab_table(result))
        return 0
    if args.ab is not None:
        result = ab_benchmark(configs[0], tuple(args.ab), args.opts, timing, step=args.ab_step, sizes=args.ab_sizes,
                              **settings)
        print(json.dumps({"ab": result}) if args.json else ab_table(result))
        return 0
    result = benchmark_config(configs[0], args.opts, timing, flops=not args.skip_flops, speed=not args.skip_fps,
                              compare_plain=args.compare_plain, peak_gflops=args.peak_gflops, **settings)
    print(json.dumps(result) if args.json else render_tables([result], args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
