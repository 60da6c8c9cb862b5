"""The test-only build of the CUDA launcher for the host (csrc/emulation/): ms_deform_attn_cuda.cu compiled as C++
under the emulation of csrc/emulation/cuda_emulation.h, its ops registered as torch.ops.sparse_detr_C_emulated.*
on the CPU key. Built once per source change with torch.utils.cpp_extension into build/cuda_emulation (about a
minute on two cores), never installed."""
import os
from functools import lru_cache

import torch
from torch.utils.cpp_extension import load

from conftest import REPO_ROOT

CSRC = REPO_ROOT / "csrc"
BUILD_DIR = REPO_ROOT / "build" / "cuda_emulation"


@lru_cache(maxsize=None)
def emulated_ops():
    """torch.ops.sparse_detr_C_emulated, built (or reused) on first use."""
    BUILD_DIR.mkdir(parents=True, exist_ok=True)
    load(name="sparse_detr_cuda_emulation",
         sources=[str(CSRC / "emulation" / "ms_deform_attn_cuda_emulated.cpp"), str(CSRC / "ms_deform_attn.cpp")],
         extra_include_paths=[str(CSRC)],
         extra_cflags=["-O2", "-DMSDA_EMULATE_CUDA", "-DMSDA_LIBRARY=sparse_detr_C_emulated"],
         build_directory=str(BUILD_DIR), verbose=bool(os.environ.get("SPARSE_DETR_VERBOSE_BUILD")))
    return torch.ops.sparse_detr_C_emulated
