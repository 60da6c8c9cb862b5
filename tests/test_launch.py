"""sparse_detr.launch: workers that end with their launcher, the collective timeout, the CPU threads of each process.

The kill test starts two machines' ranks on this host (two launchers, each spawning one worker) and kills one
launcher with SIGKILL once training runs (Linux: /proc, prctl).
"""
import datetime
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
from detectron2.engine import default_argument_parser
from detectron2.engine.launch import DEFAULT_TIMEOUT

import sparse_detr.launch
from conftest import build_config
from sparse_detr.launch import CPU_TIMEOUT, collective_timeout, launch_training
from sparse_detr.output_dir import LOCK_NAME, OutputDirLock
from test_training import DEMO_CONFIG, TINY, TRAIN_NET, shapes_env  # noqa: F401 (a fixture)


def test_collective_timeout_is_short_on_cpus_and_can_be_set():
    cfg = build_config("demo.yaml")
    assert CPU_TIMEOUT == datetime.timedelta(minutes=5) < DEFAULT_TIMEOUT
    assert collective_timeout(cfg) == (DEFAULT_TIMEOUT if torch.cuda.is_available() else CPU_TIMEOUT)
    cfg.DIST_TIMEOUT = 20
    assert collective_timeout(cfg) == datetime.timedelta(seconds=20)
    cfg.DIST_TIMEOUT = -1
    with pytest.raises(ValueError, match="DIST_TIMEOUT is in seconds, 0 for the default, got -1"):
        collective_timeout(cfg)


def test_a_training_holds_the_lock_while_it_runs_and_eval_only_takes_none(tmp_path, monkeypatch):
    out = tmp_path / "run"
    launched = []  # whether the lock file was there when the processes would have started

    def launch(main, num_gpus, **kwargs):
        launched.append((out / LOCK_NAME).exists())

    monkeypatch.setattr(sparse_detr.launch, "launch", launch)
    train = ["--config-file", DEMO_CONFIG, "OUTPUT_DIR", str(out)]
    launch_training(print, default_argument_parser().parse_args(train))
    assert launched == [True] and not (out / LOCK_NAME).exists(), "held while it runs, released after"
    with OutputDirLock(str(out)):  # a training runs: an evaluation into its OUTPUT_DIR is not refused
        launch_training(print, default_argument_parser().parse_args(["--eval-only", *train]))
    assert len(launched) == 2


def _stat_fields(pid: int):
    """The fields of /proc/PID/stat after the command name: state, parent, ...; None once the process is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None


def spawned_workers(launcher: int):
    """The pids of the processes that torch.multiprocessing spawned from ``launcher``."""
    workers = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        fields = _stat_fields(int(entry))
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                spawned = b"spawn_main" in f.read()
        except OSError:
            continue
        if fields is not None and int(fields[1]) == launcher and spawned:
            workers.append(int(entry))
    return workers


def running(pid: int) -> bool:
    fields = _stat_fields(pid)
    return fields is not None and fields[0] != "Z"  # a zombie has ended, its new parent just did not reap it yet


def wait_until(condition, seconds: float, what: str):
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.2)


def test_killing_a_launcher_ends_its_worker_and_the_other_rank_with_one_line(shapes_env, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "run"
    env = {key: value for key, value in shapes_env.items() if key != "OMP_NUM_THREADS"}  # the split applies
    launchers, logs, workers = [], [], []
    try:
        for rank in (0, 1):
            logs.append((open(tmp_path / f"rank{rank}.out", "w"), open(tmp_path / f"rank{rank}.err", "w")))
            launchers.append(subprocess.Popen(
                [sys.executable, TRAIN_NET, "--config-file", DEMO_CONFIG, "--num-gpus", "1", "--num-machines", "2",
                 "--machine-rank", str(rank), "--dist-url", f"tcp://127.0.0.1:{port}", *TINY,
                 "SOLVER.IMS_PER_BATCH", "4", "SOLVER.MAX_ITER", "100000", "DIST_TIMEOUT", "30",
                 "OUTPUT_DIR", str(out)], env=env, stdout=logs[-1][0], stderr=logs[-1][1]))
        log = out / "log.txt"
        wait_until(lambda: log.exists() and "Starting training from iteration 0" in log.read_text(), 240,
                   "training did not start")
        workers = spawned_workers(launchers[1].pid)
        assert len(workers) == 1
        launchers[1].send_signal(signal.SIGKILL)
        killed = time.monotonic()
        wait_until(lambda: not running(workers[0]), 10, "the worker of the killed launcher trains on")
        assert launchers[0].wait(timeout=60) == 1
        assert time.monotonic() - killed < 30 + 10, "the other rank stops within the collective timeout"
        lines = (tmp_path / "rank0.err").read_text().strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: process 0 of 2 lost contact with the others ("), lines
        assert lines[0].endswith("): one of them ended, or did not answer within DIST_TIMEOUT; no checkpoint has "
                                 "been written yet")
        # every process took its share of the cores (two processes on this machine)
        cores = len(os.sched_getaffinity(0))
        assert (f"{max(1, cores // 2)} torch thread(s) in each of the 2 processes on this machine (their share of "
                f"the {cores} cores; OMP_NUM_THREADS sets another number)") in log.read_text()
    finally:
        for process in launchers:
            if process.poll() is None:
                process.kill()
                process.wait()
        for pid in workers:
            if running(pid):
                os.kill(pid, signal.SIGKILL)
        for files in logs:
            for f in files:
                f.close()
