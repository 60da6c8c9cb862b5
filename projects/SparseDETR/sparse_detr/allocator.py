"""Keeping freed memory in the process for the next image (glibc's malloc, CPU processes).

glibc returns every block of 32 MiB or more to the kernel when it is freed (``mmap``), and the top of its heap
once more than twice the last such block is free; the next image's activations are then mapped afresh, and the
kernel zeroes each of their pages on its first write (a page fault per 4 KiB). At 800x1199 that is 80,000 faults
(320 MB) an image for the fast float32 path and 280,000 for the authors' code, measured on the 2-core Xeon: 7.5 %
of the fast path's time (4 % of the bf16 path's) and 22 % of the authors' code's. :func:`keep_freed_memory`
raises both thresholds (``mallopt``), so that freed blocks stay in the heap and are reused without faults, what
the allocators PyTorch's CPU tuning guide preloads (jemalloc, tcmalloc) do. The cost: the process keeps the
memory of its largest step until it ends (the resident size stays at its peak).

``train_net.py --eval-only``, ``demo.py`` and ``benchmark.py`` call it on the CPU (not a training: it gained
nothing there, and see train_net.py); ``SPARSE_DETR_MALLOC=default`` leaves
glibc's behaviour, and so does an allocator of the user's (``LD_PRELOAD`` or glibc's ``MALLOC_*_`` variables).
Other C libraries (musl, macOS) are left alone.
"""
import ctypes
import logging
import os
import platform

__all__ = ["ENV", "MMAP_THRESHOLD", "TRIM_THRESHOLD", "keep_freed_memory"]

logger = logging.getLogger(__name__)

ENV = "SPARSE_DETR_MALLOC"
CHOICES = ("keep", "default")
# blocks up to 256 MiB come from the heap (ResNet-50's largest activation at 800x1333 is 68 MB)
MMAP_THRESHOLD = 256 << 20
# -1: the top of the heap is never handed back (mallopt(3)); a whole forward's activations are freed at its end,
# and any threshold below their sum would hand them back to the kernel after every image
TRIM_THRESHOLD = -1
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # <malloc.h>
_USERS_OWN = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "GLIBC_TUNABLES")

_applied = None


def _users_own_allocator() -> str:
    """What the user set for the allocator (empty when nothing)."""
    preload = os.environ.get("LD_PRELOAD", "")
    if "malloc" in preload:  # jemalloc, tcmalloc, mimalloc
        return f"LD_PRELOAD={preload}"
    return next((f"{name} is set" for name in _USERS_OWN if name in os.environ), "")


def keep_freed_memory() -> bool:
    """Have glibc keep freed memory for reuse (see the module's docstring); returns whether it does now. Once a
    process: the thresholds are the process's, set for every thread. Logs what it did and why."""
    global _applied
    choice = os.environ.get(ENV, "keep")
    if choice not in CHOICES:
        raise ValueError(f"{ENV}={choice!r}: expected one of {', '.join(CHOICES)}")
    if _applied is not None:
        return _applied
    if choice == "default":
        reason = f"{ENV}=default"
    elif platform.libc_ver()[0] != "glibc":
        reason = "not glibc's malloc"
    else:
        reason = _users_own_allocator()
    if not reason:
        libc = ctypes.CDLL("libc.so.6")  # glibc's, checked above
        if libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) and libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD):
            logger.info("malloc keeps freed memory for reuse (blocks up to %d MiB from the heap, which is never "
                        "trimmed; %s=default leaves glibc's behaviour)", MMAP_THRESHOLD >> 20, ENV)
            _applied = True
            return True
        reason = "mallopt refused the thresholds"
    logger.info("malloc left as it is (%s)", reason)
    _applied = False
    return False
