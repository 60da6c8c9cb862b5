"""The behaviour check against the authors' implementation (../shared/conformance), run as the SPEC describes:
from the repository root, with the project's Python, on the Sparse DETR rho = 0.2 fixture, through the compiled
deformable-attention kernel (the CPU default; tests/test_ms_deform_attn_kernels.py checks that a training step
through it gives the PyTorch implementation's gradients)."""
import os
import subprocess
import sys

import pytest

from conftest import CONFORMANCE_DIR, REPO_ROOT

CHECK = CONFORMANCE_DIR / "check_equivalence.py"
FIXTURE = CONFORMANCE_DIR / "sparse_r50_rho0.2.pt"


@pytest.mark.skipif(not CHECK.exists() or not FIXTURE.exists(), reason=f"no conformance check in {CONFORMANCE_DIR}")
def test_matches_the_official_implementation():
    # one intra-op thread: the check's model is small for a CPU, and on a busy machine two threads wait on
    # each other at every op (three times slower)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SPARSE_DETR_MS_DEFORM_ATTN": "compiled"}
    run = subprocess.run([sys.executable, str(CHECK), "--fixture", str(FIXTURE)], cwd=REPO_ROOT, env=env,
                         capture_output=True, text=True, timeout=600)
    lines = run.stdout.strip().splitlines()
    report = "\n".join(lines[-60:]) + "\n" + run.stderr[-3000:]
    assert run.returncode == 0, report
    assert lines and lines[-1].startswith("PASS"), report
