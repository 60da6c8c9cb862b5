"""A/B inference with each side in a process of its own (``benchmark.py --ab ... --ab-processes``).

For what belongs to a process rather than to a model: the side key ``MALLOC keep|default`` sets the side's
``$SPARSE_DETR_MALLOC`` (:mod:`sparse_detr.allocator`), so that one side can be the authors' code as it runs
for its users (``TEST.FAST_INFERENCE False MS_DEFORM_ATTN pytorch MALLOC default``: glibc's malloc as it is)
and the other this project's evaluation path as ``train_net.py`` runs it. Each side's process (spawned, with
this process's torch threads) builds its side as :func:`~sparse_detr.benchmark.ab.build_side` does, warms it up
and waits; then the sides take turns, A, B, A, B, ..., one process running while the other waits, and report
each turn's seconds by the chosen clock. The result has the shape of
:func:`~sparse_detr.benchmark.ab.ab_benchmark`'s, with
``"processes": True`` and each side's ``"malloc"``: "keep" where its process kept freed memory, "as it was" where
it left glibc's malloc as it was.
"""
import multiprocessing
import os
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple

import torch

from ..allocator import ENV, keep_freed_memory
from ..inference import cpu_description
from .ab import MALLOC_KEY, ab_ratio, ab_runs, build_side, parse_overrides, side_keys
from .models import device_name
from .timing import CLOCKS, Timing, precision, synchronize

__all__ = ["ab_in_processes"]


def _serve(conn, label: str, text: str, config_file: Path, opts: Sequence[str],
           num_classes: Optional[int], seed: int, image_size: Tuple[int, int], batch_size: int, timing: Timing,
           threads: int) -> None:
    """One side's process: build, warm up, say "ready" with the path, then time one run per "run" received."""
    try:
        malloc = side_keys(label, text, in_own_process=True)[0].get(MALLOC_KEY)
        if malloc is not None:
            os.environ[ENV] = malloc
        torch.set_num_threads(threads)
        device = timing.device
        kept = keep_freed_memory() if device.type == "cpu" else False
        side = build_side(config_file, opts, label, text, num_classes, seed, in_own_process=True)
        run = ab_runs([side], "inference", image_size, batch_size, device, seed)[label]
        clock = CLOCKS[timing.clock]
        with torch.no_grad(), precision(device, timing.dtype):
            for _ in range(timing.warmup):
                run.call()
            conn.send(("ready", (run.path, "keep" if kept else "as it was")))
            while conn.recv() == "run":
                synchronize(device)
                start = clock()
                run.call()
                synchronize(device)
                conn.send(("seconds", clock() - start))
    except Exception as e:  # reported by the parent, naming the side
        user_error = isinstance(e, ValueError) and e.args
        conn.send(("error", str(e.args[0]) if user_error else f"{type(e).__name__}: {e}"))
    finally:
        conn.close()


def _answer(conn, label: str, expected: str):
    kind, value = conn.recv()
    if kind == "error":
        raise ValueError(value if value.startswith("--ab side") else f"--ab side {label}: {value}")
    assert kind == expected, (kind, expected)
    return value


def ab_in_processes(config_file: Path, overrides: Tuple[str, str], opts: Sequence[str], timing: Timing, *,
                    num_classes: Optional[int] = None, image_size: Tuple[int, int] = (850, 1040),
                    batch_sizes: Sequence[int] = (1,), seed: int = 0) -> Dict:
    """Time the inference of side A against side B, each in its own process, turns interleaved."""
    sides = dict(zip("AB", overrides))
    for label, text in sides.items():
        side_keys(label, text, in_own_process=True)  # a bad side fails here, before any process starts
    device = timing.device
    result = {"config": config_file.name, "step": "inference", "image_size": list(image_size), "sizes": "fixed",
              "device": device.type, "device_name": device_name(device.type, timing.clock),
              "threads": torch.get_num_threads(), "cpu": cpu_description(), "dtype": timing.dtype,
              "warmup": timing.warmup, "turns": timing.repeats, "processes": True,
              "sides": {label: {"overrides": parse_overrides(label, text)} for label, text in sides.items()},
              "rows": []}
    context = multiprocessing.get_context("spawn")
    for batch_size in batch_sizes:
        workers = {}
        try:
            for label, text in sides.items():
                parent, child = context.Pipe()
                process = context.Process(target=_serve, daemon=True, args=(
                    child, label, text, config_file, list(opts), num_classes, seed, tuple(image_size),
                    batch_size, timing, torch.get_num_threads()))
                process.start()
                child.close()
                workers[label] = (process, parent)
            for label, (_, conn) in workers.items():
                result["sides"][label]["path"], result["sides"][label]["malloc"] = _answer(conn, label, "ready")
            seconds = {label: [] for label in workers}
            for _ in range(timing.repeats):
                for label, (_, conn) in workers.items():
                    conn.send("run")
                    seconds[label].append(_answer(conn, label, "seconds"))
        finally:
            for process, conn in workers.values():
                try:
                    conn.send("stop")
                except (BrokenPipeError, OSError):
                    pass
                process.join(timeout=60)
                if process.is_alive():
                    process.kill()
        ratio = ab_ratio(seconds["A"], seconds["B"])
        result["rows"].append({"batch_size": batch_size, "seconds": seconds, **ratio._asdict()})
    return result
