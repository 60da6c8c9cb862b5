"""What a training keeps track of in its OUTPUT_DIR beyond Detectron2's files.

* :class:`OutputDirLock`: ``OUTPUT_DIR/train.lock``, so that two trainings never write into one OUTPUT_DIR.
* :func:`warn_of_changed_schedule` (:func:`changed_schedule`): for ``--resume``, the keys of the schedule and
  the data order whose values differ from those in the ``config.yaml`` the previous run wrote.
* :func:`last_good_checkpoint`: the checkpoint that ``last_checkpoint`` names (checkpoints are written
  atomically, so it is complete).
"""
import datetime
import fcntl
import json
import logging
import os
import shlex
import socket
import sys
from typing import List, Optional

import yaml

__all__ = ["LOCK_NAME", "RESUME_KEYS", "OutputDirInUse", "OutputDirLock", "changed_schedule", "last_good_checkpoint",
           "warn_of_changed_schedule"]

logger = logging.getLogger(__name__)

LOCK_NAME = "train.lock"
# Keys whose change makes a resumed run differ from an uninterrupted one: the schedule (length, learning
# rates and their drops) and the data order (which images, in which batches).
RESUME_KEYS = ("SOLVER.IMS_PER_BATCH", "SOLVER.MAX_ITER", "SOLVER.STEPS", "SOLVER.EPOCHS", "SOLVER.LR_DROP_EPOCHS",
               "SOLVER.BASE_LR", "SOLVER.GAMMA", "SOLVER.LR_SCHEDULER_NAME", "SOLVER.WARMUP_METHOD",
               "SOLVER.WARMUP_ITERS", "SOLVER.WARMUP_FACTOR", "SOLVER.SQRT_LR_SCALING", "DATASETS.TRAIN",
               "DATASETS.COCO_JSON", "DATALOADER.FILTER_EMPTY_ANNOTATIONS", "SEED")


class OutputDirInUse(OSError):
    """Another training holds the OUTPUT_DIR's lock."""


class OutputDirLock:
    """``OUTPUT_DIR/train.lock``: held (``flock``) by the one training that writes into OUTPUT_DIR.

    The file names its holder: host, pid, start time and command (JSON). The kernel releases a flock when
    its process ends, however it ends, so a lock file that no process holds was left by a killed run: it is
    taken over, with a warning that names that run. :meth:`release` removes the file. On a file system
    without locks (some network mounts) the lock is skipped with a warning.
    """

    def __init__(self, output_dir: str):
        self.path = os.path.join(output_dir, LOCK_NAME)
        self._fd: Optional[int] = None

    def acquire(self) -> None:
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_holder(fd)
                os.close(fd)
                raise OutputDirInUse(
                    f"OUTPUT_DIR {os.path.dirname(self.path)} is in use by another training "
                    f"({_describe(holder) if holder else 'its details are not written yet'}; lock file {self.path}): "
                    f"give this one another OUTPUT_DIR, or end that one first") from None
            except OSError as e:
                os.close(fd)
                logger.warning("%s: the file system does not support locks (%s): another training into this "
                               "OUTPUT_DIR would not be refused", self.path, e.strerror)
                return
            # a holder that released the lock in between removed the file we opened: lock the one at the path
            if _same_file(fd, self.path):
                break
            os.close(fd)
        stale = _read_holder(fd)
        if stale:
            logger.warning("taking over the lock %s left by a training that has ended (%s)", self.path,
                           _describe(stale))
        holder = {"host": socket.gethostname(), "pid": os.getpid(),
                  "started": datetime.datetime.now().isoformat(sep=" ", timespec="seconds"),
                  "command": shlex.join([os.path.basename(sys.executable), *sys.argv])}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(holder, indent=1).encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is None:
            return
        os.remove(self.path)  # before the flock goes: a run that opened the old file then sees it is gone
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> "OutputDirLock":
        self.acquire()
        return self

    def __exit__(self, *exc_info) -> None:
        self.release()


def _read_holder(fd: int) -> dict:
    try:
        holder = json.loads(os.pread(fd, 1 << 16, 0).decode())
    except ValueError:  # empty (a holder between creating and writing it) or not ours
        return {}
    return holder if isinstance(holder, dict) else {}


def _same_file(fd: int, path: str) -> bool:
    try:
        return os.stat(path).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        return False


def _describe(holder: dict) -> str:
    return (f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}, started {holder.get('started', '?')}, "
            f"command: {holder.get('command', '?')}")


def _plain(value):
    return [_plain(v) for v in value] if isinstance(value, (list, tuple)) else value


def _value_at(tree, full_key: str):
    for part in full_key.split("."):
        if not isinstance(tree, dict) or part not in tree:
            return None
        tree = tree[part]
    return _plain(tree)


def changed_schedule(previous_config: str, cfg) -> List[str]:
    """``KEY old -> new`` for each of :data:`RESUME_KEYS` whose value in ``cfg`` differs from the one in the yaml
    file ``previous_config`` (the ``config.yaml`` an earlier run wrote); [] when there is no such file."""
    try:
        with open(previous_config) as f:
            previous = yaml.safe_load(f)
    except FileNotFoundError:
        return []
    except yaml.YAMLError as e:
        logger.warning("%s is not readable YAML (%s): the schedule of the run before is unknown", previous_config,
                       " ".join(str(e).split()))
        return []
    changes = []
    for key in RESUME_KEYS:
        old, new = _value_at(previous, key), _value_at(cfg, key)
        if old is not None and old != new:
            changes.append(f"{key} {old} -> {new}")
    return changes


def warn_of_changed_schedule(cfg) -> None:
    """On ``--resume`` from a checkpoint of ``cfg.OUTPUT_DIR``: a warning with the :func:`changed_schedule` keys."""
    if not os.path.isfile(os.path.join(cfg.OUTPUT_DIR, "last_checkpoint")):
        return
    previous = os.path.join(cfg.OUTPUT_DIR, "config.yaml")
    changes = changed_schedule(previous, cfg)
    if changes:
        logger.warning("--resume with another schedule or data order than the run that wrote %s: %s; the run goes "
                       "on from its checkpoint with the new values, unlike an uninterrupted run", previous,
                       ", ".join(changes))


def last_good_checkpoint(output_dir: str) -> Optional[str]:
    """The checkpoint named by ``OUTPUT_DIR/last_checkpoint``, when both are there; else None."""
    try:
        with open(os.path.join(output_dir, "last_checkpoint")) as f:
            path = os.path.join(output_dir, f.read().strip())
    except OSError:
        return None
    return path if os.path.isfile(path) else None
