#!/usr/bin/env python
"""Download, into ``.whl/``, the packages the GPU check needs on a machine without network access.

The GPU machines lent to this project (see projects/SparseDETR/tools/gpu_check.py) have Python 3.12 and
torch 2.11 with CUDA 13.0, nvcc, numpy, scipy, matplotlib, OpenCV, timm and PyYAML, but no detectron2,
fvcore or pycocotools, and cannot reach a package registry. Run this where pip can (the project's venv
will do); it writes to ``.whl/`` (ignored by git):

* pure-Python wheels of detectron2's other runtime dependencies that the machine lacks (built by
  ``pip wheel`` where the registry has only a source archive);
* the CPython 3.12 manylinux wheel of pycocotools;
* ``detectron2-0.7.2-py3-none-any.whl``: detectron2's Python package, taken out of the registry's
  ``sal-detectron2`` wheel (tagged for CPython 3.10, with a compiled ``_C`` this project does not use; see
  scripts/install_detectron2.py) and packed as a pure-Python wheel that pip installs on any Python.

On the GPU machine, one command installs them all (the device tool's ``run`` carries ``.whl``):

    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site
"""
import argparse
import base64
import hashlib
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from install_detectron2 import DIST_NAME, DIST_VERSION, WHEEL_PYTHON, WHEEL_REQUIREMENT, copy_package  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
# The versions this project's venv runs; pure Python, so one wheel fits every Python.
PURE_PYTHON = ["fvcore==0.1.5.post20221221", "iopath==0.1.10", "yacs==0.1.8", "termcolor==3.3.0",
               "omegaconf==2.3.1", "antlr4-python3-runtime==4.9.3"]
COMPILED = ["pycocotools==2.0.11"]
DEVICE_PYTHON = "3.12"
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux1_x86_64"]


def pip(*args):
    subprocess.run([sys.executable, "-m", "pip", "--disable-pip-version-check", *args], check=True)


def record_line(name: str, data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{name},sha256={digest},{len(data)}\n"


def pure_detectron2_wheel(sal_wheel: Path, destination: Path) -> Path:
    """detectron2's Python package from ``sal_wheel`` as ``detectron2-<version>-py3-none-any.whl``."""
    dist_info = f"{DIST_NAME}-{DIST_VERSION}.dist-info"
    target = destination / f"{DIST_NAME}-{DIST_VERSION}-py3-none-any.whl"
    with tempfile.TemporaryDirectory() as tmp:
        files = copy_package(sal_wheel, Path(tmp))
        metadata = (f"Metadata-Version: 2.1\nName: {DIST_NAME}\nVersion: {DIST_VERSION}\n"
                    f"Summary: detectron2's Python package, taken from {WHEEL_REQUIREMENT} without its compiled ops\n")
        wheel = "Wheel-Version: 1.0\nGenerator: sparse-detr fetch_device_wheels\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
        records = []
        with zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as archive:
            for name in sorted(files):
                data = (Path(tmp) / name).read_bytes()
                archive.writestr(name, data)
                records.append(record_line(name, data))
            for name, text in (("METADATA", metadata), ("WHEEL", wheel)):
                archive.writestr(f"{dist_info}/{name}", text)
                records.append(record_line(f"{dist_info}/{name}", text.encode()))
            archive.writestr(f"{dist_info}/RECORD", "".join(records) + f"{dist_info}/RECORD,,\n")
    return target


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dest", type=Path, default=ROOT / ".whl", help="where the wheels go (default: .whl/)")
    args = parser.parse_args()
    args.dest.mkdir(parents=True, exist_ok=True)
    pip("wheel", "--quiet", "--no-deps", "--wheel-dir", str(args.dest), *PURE_PYTHON)
    platforms = [item for platform in PLATFORMS for item in ("--platform", platform)]
    pip("download", "--quiet", "--no-deps", "--only-binary=:all:", "--python-version", DEVICE_PYTHON,
        "--implementation", "cp", *platforms, "--dest", str(args.dest), *COMPILED)
    with tempfile.TemporaryDirectory() as tmp:
        pip("download", "--quiet", "--no-deps", "--only-binary=:all:", "--python-version", WHEEL_PYTHON,
            "--dest", tmp, WHEEL_REQUIREMENT)
        wheel = pure_detectron2_wheel(next(Path(tmp).glob("*.whl")), args.dest)
    for path in sorted(args.dest.glob("*.whl")):
        print(f"{path.stat().st_size / 1e6:6.2f} MB  {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}")
    print(f"{wheel.name} and its dependencies are in {args.dest}")


if __name__ == "__main__":
    main()
