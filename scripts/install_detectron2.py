#!/usr/bin/env python
"""Install detectron2's pure-Python package into the running interpreter, unless one is importable.

detectron2 is not published on PyPI. The registry's ``sal-detectron2==0.7.2`` repackages
detectron2's Python code (mid-2024) as a wheel tagged for CPython 3.10 that also carries a
compiled ``_C`` built for 3.10, an extra top-level ``tools/`` folder and a ``numpy<2`` pin.
This project uses none of detectron2's compiled ops, and the Python code runs on newer
Pythons, torch releases and numpy 2. So this script downloads that wheel, copies only its
``detectron2/`` package (no ``.so``, no ``tools/``) into site-packages, records it as the
distribution ``detectron2`` (so ``pip show`` / ``pip uninstall detectron2`` work), and installs
the runtime dependencies without the numpy pin.

A detectron2 that is already importable (for example one built from source) is kept as it is.
"""
import argparse
import importlib.util
import subprocess
import sys
import sysconfig
import tempfile
import zipfile
from pathlib import Path

WHEEL_REQUIREMENT = "sal-detectron2==0.7.2"
WHEEL_PYTHON = "3.10"
DIST_NAME, DIST_VERSION = "detectron2", "0.7.2"
RUNTIME_DEPENDENCIES = [
    "Pillow>=7.1", "matplotlib", "pycocotools>=2.0.2", "termcolor>=1.1", "yacs>=0.1.8", "tabulate",
    "cloudpickle", "tqdm>4.29.0", "omegaconf>=2.1,<2.4", "hydra-core>=1.1", "packaging", "fvcore", "iopath",
]


def pip(*args):
    subprocess.run([sys.executable, "-m", "pip", *args], check=True)


def copy_package(wheel: Path, site_packages: Path) -> list:
    """Extract ``detectron2/`` from the wheel, skipping compiled extensions; return the written paths."""
    written = []
    with zipfile.ZipFile(wheel) as archive:
        for name in archive.namelist():
            if not name.startswith("detectron2/") or name.endswith((".so", ".pyd")) or name.endswith("/"):
                continue
            archive.extract(name, site_packages)
            written.append(name)
    if "detectron2/__init__.py" not in written:
        raise RuntimeError(f"{wheel.name} has no detectron2/ package; cannot install detectron2 from it")
    return written


def write_dist_info(site_packages: Path, files: list) -> None:
    dist_info = site_packages / f"{DIST_NAME}-{DIST_VERSION}.dist-info"
    dist_info.mkdir(exist_ok=True)
    (dist_info / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: {DIST_NAME}\nVersion: {DIST_VERSION}\n"
        f"Summary: detectron2's Python package, taken from {WHEEL_REQUIREMENT} without its compiled ops\n"
        + "".join(f"Requires-Dist: {dep}\n" for dep in RUNTIME_DEPENDENCIES)
    )
    (dist_info / "INSTALLER").write_text("sparse-detr-setup\n")
    records = files + [f"{dist_info.name}/{n}" for n in ("METADATA", "INSTALLER", "RECORD")]
    (dist_info / "RECORD").write_text("".join(f"{r},,\n" for r in records))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--wheel", type=Path, help="use this sal-detectron2 wheel instead of downloading it")
    args = parser.parse_args()

    spec = importlib.util.find_spec("detectron2")
    if spec is not None:
        print(f"detectron2 is importable from {Path(spec.origin).parent}: keeping it")
        pip("install", "--quiet", *RUNTIME_DEPENDENCIES)
        return

    site_packages = Path(sysconfig.get_paths()["purelib"])
    with tempfile.TemporaryDirectory() as tmp:
        wheel = args.wheel
        if wheel is None:
            pip("download", "--quiet", "--no-deps", "--only-binary=:all:", "--python-version", WHEEL_PYTHON,
                "--dest", tmp, WHEEL_REQUIREMENT)
            wheel = next(Path(tmp).glob("*.whl"))
        files = copy_package(wheel, site_packages)
    write_dist_info(site_packages, files)
    pip("install", "--quiet", *RUNTIME_DEPENDENCIES)
    print(f"installed detectron2 {DIST_VERSION} (Python code only) into {site_packages}")


if __name__ == "__main__":
    main()
