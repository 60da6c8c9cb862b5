"""Install the ``sparse_detr`` package (source: projects/SparseDETR/sparse_detr).

``pip install --no-build-isolation -e .`` (what ``make setup`` runs) makes ``import sparse_detr`` work
from any directory. When ``csrc/`` holds the CUDA deformable-attention sources and CUDA is available
(or ``FORCE_CUDA=1``), the compiled op ``sparse_detr._C`` is built as well; otherwise the pure-Python
package installs and the PyTorch implementation of the op is used everywhere.
"""
import glob
import os
import site
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
PACKAGE_DIR = "projects/SparseDETR/sparse_detr"
DEFAULT_CUDA_ARCHS = "7.0;7.5;8.0;8.6;8.9;9.0+PTX"  # Volta to Hopper, PTX for newer GPUs


def _toolkit_home():
    """The CUDA toolkit's own folder: the ``nvcc`` on PATH may be a wrapper script outside it."""
    if os.environ.get("CUDA_HOME"):
        return os.environ["CUDA_HOME"]
    from shutil import which

    nvcc = which("nvcc")
    if nvcc is None:
        return None
    with open(nvcc, "rb") as f:
        head = f.read(4096)
    if head.startswith(b"#!"):  # a wrapper: follow the nvcc it executes
        for token in head.decode(errors="ignore").split():
            if token.endswith("/bin/nvcc") and os.path.exists(token):
                nvcc = token
                break
    return os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))


def _pip_cuda_includes():
    """Headers that torch includes but only the pip CUDA packages ship (``cusparse.h``)."""
    roots = site.getsitepackages() + [site.getusersitepackages()]
    return sorted({os.path.dirname(h) for r in roots for h in glob.glob(os.path.join(r, "nvidia", "*", "include", "cusparse.h"))})


def _extensions():
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")) + glob.glob(os.path.join("csrc", "*.cu")))
    if not any(s.endswith(".cu") for s in sources):
        return [], {}
    home = _toolkit_home()
    if home:
        os.environ["CUDA_HOME"] = home  # torch.utils.cpp_extension reads it at import
    import torch
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    if not (torch.cuda.is_available() or os.environ.get("FORCE_CUDA") == "1"):
        print("sparse_detr: no CUDA device and FORCE_CUDA is not 1: installing without the compiled op", file=sys.stderr)
        return [], {}
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCHS)
    extension = CUDAExtension(
        "sparse_detr._C",
        sources,
        include_dirs=[os.path.join(ROOT, "csrc")] + _pip_cuda_includes(),
        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "--use_fast_math", "-lineinfo"]},
    )
    return [extension], {"build_ext": BuildExtension}


ext_modules, cmdclass = _extensions()

setup(
    name="sparse-detr",
    version="0.1.0",
    description="Sparse DETR (ICLR'22) as a Detectron2 plugin",
    license="Apache-2.0",
    python_requires=">=3.9",
    packages=["sparse_detr", "sparse_detr.data", "sparse_detr.layers"],
    package_dir={"sparse_detr": PACKAGE_DIR},
    install_requires=["torch", "torchvision", "fvcore", "pycocotools", "scipy", "matplotlib"],
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
