"""Install the ``sparse_detr`` package (source: projects/SparseDETR/sparse_detr) and its compiled op ``sparse_detr._C``.

``pip install --no-build-isolation -e .`` (what ``make setup`` runs) makes ``import sparse_detr`` work
from any directory; ``pip install --no-build-isolation .`` installs a copy, with the configs
(projects/SparseDETR/configs) as the package data ``sparse_detr/configs``. The kernels compile against the
installed torch, so the build needs it: under pip's build isolation (without ``--no-build-isolation``), which
hides it, the build stops with one line saying so, rather than downloading another torch to build against.
``sparse_detr._C`` (the deformable-attention kernels in ``csrc/``) is always built:

* its CPU part, with the C++ compiler;
* its CUDA part as well when ``FORCE_CUDA=1``, or when ``FORCE_CUDA`` is unset and torch sees a GPU
  (``FORCE_CUDA=0``: the CPU part only), for the architectures of ``TORCH_CUDA_ARCH_LIST``
  (default ``DEFAULT_CUDA_ARCHS``).

A compile error fails the installation: there is no silent fallback to the pure-Python package.
"""
import glob
import os
import site
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
PACKAGE_DIR = "projects/SparseDETR/sparse_detr"
CONFIG_DIR = "projects/SparseDETR/configs"
# Turing to Hopper, and PTX that newer GPUs compile at load time. CUDA 13 dropped Volta (7.0) and older:
# `nvcc --list-gpu-arch` starts at compute_75.
DEFAULT_CUDA_ARCHS = "7.5;8.0;8.6;8.9;9.0+PTX"


def _require_torch():
    """Stop with one line when torch cannot be imported: pip's build isolation hides the installed one."""
    try:
        import torch  # noqa: F401
    except ImportError:
        raise SystemExit("sparse_detr: the kernels compile against the installed torch, which this build cannot "
                         "import: install torch (requirements.txt), then `pip install --no-build-isolation .` "
                         "(pip's build isolation hides the installed torch)") from None


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


def _build_cuda() -> bool:
    force = os.environ.get("FORCE_CUDA", "")
    if force not in ("", "0", "1"):
        raise SystemExit(f"FORCE_CUDA must be 0 or 1, got {force!r}")
    if force:
        return force == "1"
    import torch

    return torch.cuda.is_available()


def _extensions():
    _require_torch()
    home = _toolkit_home()
    if home:
        os.environ["CUDA_HOME"] = home  # torch.utils.cpp_extension reads it at import
    build_cuda = _build_cuda()
    if build_cuda and home is None:
        raise SystemExit("sparse_detr: building the CUDA kernels needs the CUDA toolkit (nvcc on PATH or CUDA_HOME); "
                         "FORCE_CUDA=0 builds the CPU kernels only")
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    # -fopenmp: at::parallel_for is an OpenMP region compiled into the extension (without it, it runs on one
    # thread); the extension then uses the libgomp torch has loaded already.
    options = {"include_dirs": [os.path.join(ROOT, "csrc")], "extra_compile_args": {"cxx": ["-O3", "-fopenmp"]},
               "extra_link_args": ["-fopenmp"]}
    if build_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCHS)
        print(f"sparse_detr: building the CPU and CUDA kernels (architectures {os.environ['TORCH_CUDA_ARCH_LIST']})",
              file=sys.stderr)
        sources += sorted(glob.glob(os.path.join("csrc", "*.cu")))
        options["include_dirs"] += _pip_cuda_includes()
        options["extra_compile_args"]["nvcc"] = ["-O3", "-lineinfo", "--threads=0"]
        options["define_macros"] = [("WITH_CUDA", None)]
        extension = CUDAExtension("sparse_detr._C", sources, **options)
    else:
        print("sparse_detr: building the CPU kernels (FORCE_CUDA=1 adds the CUDA kernels)", file=sys.stderr)
        extension = CppExtension("sparse_detr._C", sources, **options)
    return [extension], {"build_ext": BuildExtension}


ext_modules, cmdclass = _extensions()

setup(
    name="sparse-detr",
    version="0.1.0",
    description="Sparse DETR (ICLR'22) as a Detectron2 plugin",
    license="Apache-2.0",
    python_requires=">=3.9",
    packages=["sparse_detr", "sparse_detr.configs"] + [f"sparse_detr.{name}" for name in find_packages(PACKAGE_DIR)],
    package_dir={"sparse_detr": PACKAGE_DIR, "sparse_detr.configs": CONFIG_DIR},
    package_data={"sparse_detr.configs": ["*.yaml"]},
    install_requires=["torch", "torchvision", "fvcore", "pycocotools", "scipy", "matplotlib"],
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
