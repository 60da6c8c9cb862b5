"""Peak memory of a block of runs: CUDA's allocator peak, or the rise of the CPU process's peak resident size."""
import ctypes
import gc
import logging
from contextlib import contextmanager

import torch

__all__ = ["peak_memory"]

logger = logging.getLogger(__name__)


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
    """Yields a dict whose "mb" is, after the block, the block's peak memory in MiB, or None where unknown.

    On CUDA ``torch.cuda.max_memory_allocated`` during the block (weights included). On the CPU the rise of
    the process's peak resident set size (VmHWM, reset through ``/proc/self/clear_refs``) during the block
    over the resident size before it, after glibc's ``malloc_trim`` has returned the freed heap: the working
    memory of the block, weights excluded.
    """
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
