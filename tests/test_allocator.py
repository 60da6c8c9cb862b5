"""sparse_detr.allocator: glibc keeps freed memory for reuse, unless the user says otherwise.

mallopt changes the whole process, so each case runs in a fresh interpreter: a "forward" of five elementwise
steps over 64 MiB tensors (above glibc's largest dynamic mmap threshold, 32 MiB: by default each result is
mapped afresh, and every page of it faults) runs eight times, then the page faults of eight more are counted.
(A freed block can be split from its neighbours by small allocations that follow it, so the heap settles over
the first rounds, as it does over a model's first images: out of 70 processes on the 2-core EPYC, up to 5 of
the first forward's 5 results were mapped afresh, up to 3 of the fifth's (a CI run failed on that, when only
the fifth was counted), and at most 1 of the 40 counted here.)
"""
import json
import os
import platform
import subprocess
import sys

import pytest

from test_training import PROJECT

PROBE = """
import json, logging, resource, sys
sys.path.insert(0, {project!r})
import torch
from sparse_detr.allocator import keep_freed_memory
logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")
kept = keep_freed_memory()
def forward():
    x = torch.ones(16 << 20)
    y = x * 2
    z = y + x
    del x
    w = z * 3
    del y, z
    v = w + 1
    del w, v
def faults():
    for _ in range(ROUNDS):
        forward()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(ROUNDS):
        forward()
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
ROUNDS = {rounds}
print(json.dumps({{"kept": kept, "again": keep_freed_memory(), "faults": faults()}}))
"""
ROUNDS = 8
PAGES = ROUNDS * 5 * (64 << 20) // 4096  # the five results of each counted forward
glibc = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt thresholds are glibc's")


def probe(**env):
    """Runs the probe with ``env`` on top of this environment (None removes a variable): its result, its log."""
    environment = {k: v for k, v in {**os.environ, **env}.items() if v is not None}
    result = subprocess.run([sys.executable, "-c", PROBE.format(project=str(PROJECT), rounds=ROUNDS)], env=environment,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1]), result.stderr


@glibc
def test_freed_memory_is_reused_without_page_faults_and_the_default_maps_it_again():
    unset = dict(SPARSE_DETR_MALLOC=None, LD_PRELOAD=None, MALLOC_MMAP_THRESHOLD_=None, MALLOC_TRIM_THRESHOLD_=None,
                 MALLOC_TOP_PAD_=None, GLIBC_TUNABLES=None)
    kept, log = probe(**unset)
    assert kept["kept"] and kept["again"]
    assert kept["faults"] < PAGES // 10, kept  # the freed blocks came back from the heap
    assert "malloc keeps freed memory for reuse (blocks up to 256 MiB from the heap" in log
    default, log = probe(**dict(unset, SPARSE_DETR_MALLOC="default"))
    assert not default["kept"] and not default["again"]
    assert default["faults"] > PAGES * 9 // 10, default  # glibc's own behaviour: every page faulted again
    assert "malloc left as it is (SPARSE_DETR_MALLOC=default)" in log


@glibc
def test_an_allocator_of_the_users_is_left_alone():
    result, log = probe(SPARSE_DETR_MALLOC=None, MALLOC_TRIM_THRESHOLD_="131072")
    assert not result["kept"]
    assert result["faults"] > PAGES * 9 // 10, result
    assert "malloc left as it is (MALLOC_TRIM_THRESHOLD_ is set)" in log


def test_a_wrong_setting_is_named(monkeypatch):
    from sparse_detr.allocator import keep_freed_memory
    monkeypatch.setenv("SPARSE_DETR_MALLOC", "jemalloc")
    with pytest.raises(ValueError, match=r"SPARSE_DETR_MALLOC='jemalloc': expected one of keep, default"):
        keep_freed_memory()
