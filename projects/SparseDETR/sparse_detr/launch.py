"""Starting ``train_net.py``'s processes with Detectron2's ``launch``, and ending them together.

* :func:`launch_training`: checks the config before any process starts, locks OUTPUT_DIR for a training
  (:class:`sparse_detr.output_dir.OutputDirLock`), gives the collectives a timeout (``DIST_TIMEOUT``), has the
  spawned workers end with their launcher (:func:`end_with_launcher`), and ends with a worker's one-line error.
* :func:`share_cpu_threads`: on CPUs, each process of a machine takes its share of the cores.
"""
import contextlib
import ctypes
import datetime
import functools
import logging
import os
import signal
import socket
import sys
from typing import Callable

import torch
from torch.multiprocessing import ProcessExitedException

from detectron2.engine import launch
from detectron2.engine.launch import DEFAULT_TIMEOUT
from detectron2.utils import comm

from .cli import USER_ERRORS, load_config, make_output_dir, report_user_error
from .output_dir import OutputDirLock

__all__ = ["CPU_TIMEOUT", "collective_timeout", "end_with_launcher", "launch_training", "share_cpu_threads"]

logger = logging.getLogger(__name__)

CPU_TIMEOUT = datetime.timedelta(minutes=5)
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
# exit statuses of a worker that has printed its one "error: ..." line: a run stopped (1), a user error (2)
REPORTED_STATUSES = (1, 2)


def collective_timeout(cfg) -> datetime.timedelta:
    """``DIST_TIMEOUT`` seconds; 0: 5 minutes on CPUs (gloo), Detectron2's 30 minutes with GPUs (NCCL)."""
    if cfg.DIST_TIMEOUT < 0:
        raise ValueError(f"DIST_TIMEOUT is in seconds, 0 for the default, got {cfg.DIST_TIMEOUT}")
    if cfg.DIST_TIMEOUT > 0:
        return datetime.timedelta(seconds=cfg.DIST_TIMEOUT)
    return DEFAULT_TIMEOUT if torch.cuda.is_available() else CPU_TIMEOUT


def end_with_launcher(launcher_pid: int) -> None:
    """In a spawned worker: the kernel kills this process (SIGKILL) when its launcher ends, even by ``kill -9``.

    torch.multiprocessing asks for SIGINT, which a process started in the background (``nohup``, ``&`` in a
    script) ignores: such workers trained on alone. Linux only (prctl); elsewhere a no-op.
    """
    if not sys.platform.startswith("linux"):
        return
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    prctl.argtypes = [ctypes.c_int] + [ctypes.c_ulong] * 4
    if prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if os.getppid() != launcher_pid:  # the launcher ended before the request: nothing would signal us
        os.kill(os.getpid(), signal.SIGKILL)


def _worker(main: Callable, launcher_pid: int, args):
    if os.getpid() != launcher_pid:
        end_with_launcher(launcher_pid)
    return main(args)


def launch_training(main: Callable, args) -> None:
    """Detectron2's ``launch(main, ...)`` of ``train_net.py``, parsed by ``default_argument_parser``.

    Before any process starts, :func:`load_config` checks the config for the world size of ``--num-gpus`` x
    ``--num-machines``, and a training (not ``--eval-only``) locks OUTPUT_DIR in the launcher of machine rank 0,
    until it ends: their errors end the tool with one line, status 2. The workers get the collective timeout of
    :func:`collective_timeout` and end with their launcher. ``main`` ends with one ``error:`` line and status 2
    (user errors) or 1 (a run stopped: :func:`sparse_detr.engine.stop_message`); when one of several processes
    does, the launch ends with its status, without the multiprocessing traceback.
    """
    with contextlib.ExitStack() as stack:
        try:
            cfg = load_config(args.config_file, args.opts, world_size=args.num_gpus * args.num_machines)
            timeout = collective_timeout(cfg)
            if not args.eval_only and args.machine_rank == 0:
                make_output_dir(cfg.OUTPUT_DIR)
                stack.enter_context(OutputDirLock(cfg.OUTPUT_DIR))
        except USER_ERRORS as e:
            raise SystemExit(report_user_error(e))
        # it would log "Terminating process ..." for the others after the first one's error line
        logging.getLogger("torch.multiprocessing.spawn").setLevel(logging.ERROR)
        try:
            launch(functools.partial(_worker, main, os.getpid()), args.num_gpus, num_machines=args.num_machines,
                   machine_rank=args.machine_rank, dist_url=args.dist_url, args=(args,), timeout=timeout)
        except ProcessExitedException as e:
            if e.exit_code in REPORTED_STATUSES:
                raise SystemExit(e.exit_code) from None
            if e.signal_name:
                raise SystemExit(f"error: process {e.error_index} (pid {e.error_pid}) was ended by "
                                 f"{e.signal_name}") from None
            raise


def share_cpu_threads() -> None:
    """In a distributed run on CPUs: each process's torch threads are its share of the machine's cores (cores
    divided by the run's processes on this host, at least 1), unless OMP_NUM_THREADS is set; logs the number.

    Every process using every core (torch's default) makes N processes on N cores wait for each other's
    threads: on a busy 2-core machine 7.7x slower iterations than with one thread each.
    """
    if comm.get_world_size() == 1 or torch.cuda.is_available():
        return
    host = socket.gethostname()
    processes = comm.all_gather(host).count(host)
    if "OMP_NUM_THREADS" in os.environ:
        reason = f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']}"
    else:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        torch.set_num_threads(max(1, cores // processes))
        reason = f"their share of the {cores} cores; OMP_NUM_THREADS sets another number"
    logger.info("%d torch thread(s) in each of the %d processes on this machine (%s)", torch.get_num_threads(),
                processes, reason)
