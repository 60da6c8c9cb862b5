"""Installing the package as Python users do: ``pip wheel`` / ``pip install`` of the repository, not editable.

The wheel is built once for the module from a copy of what the build reads (setup.py, pyproject.toml, csrc/,
the package and its configs), with the CPU kernels only (FORCE_CUDA=0: about a minute on 2 cores), and
installed into a scratch venv that reuses this environment's torch and detectron2 (a .pth file naming its
site-packages). Everything else runs from another folder, in subprocesses without PYTHONPATH.
"""
import json
import os
import shutil
import site
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import CONFIG_DIR, REPO_ROOT
from sparse_detr import get_config_file
from sparse_detr.config_files import config_names

BUILD_INPUTS = ["setup.py", "pyproject.toml", "csrc", "projects/SparseDETR/sparse_detr", "projects/SparseDETR/configs"]
REFUSAL = ("sparse_detr: the kernels compile against the installed torch, which this build cannot import: install "
           "torch (requirements.txt), then `pip install --no-build-isolation .` (pip's build isolation hides the "
           "installed torch)")


def copy_build_inputs(target: Path) -> Path:
    for name in BUILD_INPUTS:
        source = REPO_ROOT / name
        if source.is_dir():
            shutil.copytree(source, target / name, ignore=shutil.ignore_patterns("__pycache__", "*.so"))
        else:
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / name)
    return target


def clean_environment(**variables):
    """This process's environment without PYTHONPATH (which would put the repository's package first)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(variables)
    return env


def run(args, **kwargs):
    result = subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=900, **kwargs)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def installed_python(tmp_path_factory) -> Path:
    """The interpreter of a scratch venv holding the wheel of the repository, built with the CPU kernels."""
    root = tmp_path_factory.mktemp("packaging")
    sources = copy_build_inputs(root / "src")
    run([sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "--no-index", "--no-cache-dir",
         "-w", root / "dist", sources], env=clean_environment(FORCE_CUDA="0"))
    wheel, = (root / "dist").glob("sparse_detr-*.whl")
    run([sys.executable, "-m", "venv", "--without-pip", root / "venv"])
    python = root / "venv" / "bin" / "python"
    venv_site = Path(run([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"]).stdout.strip())
    (venv_site / "outer_environment.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    run([sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index", "--ignore-installed",
         wheel], env=clean_environment())
    return python


USE_THE_INSTALLED_PACKAGE = r"""
import json
from pathlib import Path
import torch
import sparse_detr
from detectron2.config import get_cfg
from sparse_detr import add_sparse_detr_config, get_config_file
from sparse_detr.cli import resolve_config_file
from sparse_detr.layers import multi_scale_deformable_attention, use_implementation

generator = torch.Generator().manual_seed(0)
shapes = torch.tensor([[6, 8], [3, 4]])
starts = torch.tensor([0, 48])
inputs = (torch.randn(2, 60, 2, 4, generator=generator, dtype=torch.float64), shapes, starts,
          torch.rand(2, 5, 2, 2, 3, 2, generator=generator, dtype=torch.float64),
          torch.rand(2, 5, 2, 2, 3, generator=generator, dtype=torch.float64))
compiled = multi_scale_deformable_attention(*inputs)  # SPARSE_DETR_MS_DEFORM_ATTN=compiled: the kernel or an error
with use_implementation("pytorch"):
    reference = multi_scale_deformable_attention(*inputs)

config = get_config_file("sparse_detr_r50_rho0.1.yaml")
cfg = get_cfg()
add_sparse_detr_config(cfg)
cfg.merge_from_file(config)
try:
    get_config_file("nope.yaml")
    unknown = None
except FileNotFoundError as e:
    unknown = str(e)
print(json.dumps({
    "package": sparse_detr.__file__, "kernels": sparse_detr._C.__file__, "shape": list(compiled.shape),
    "difference": (compiled - reference).abs().max().item(), "config": config,
    "resolved": str(resolve_config_file("demo.yaml")), "rho": cfg.MODEL.SPARSE_DETR.RHO,
    "meta_architecture": cfg.MODEL.META_ARCHITECTURE, "stride_in_1x1": cfg.MODEL.RESNETS.STRIDE_IN_1X1,
    "unknown": unknown,
    "modules": sorted(str(p.relative_to(Path(sparse_detr.__file__).parent)) for p in
                      Path(sparse_detr.__file__).parent.rglob("*.py"))}))
"""


def test_the_wheel_installs_the_package_its_kernels_and_its_configs(installed_python, tmp_path):
    result = run([installed_python, "-c", USE_THE_INSTALLED_PACKAGE], cwd=tmp_path,
                 env=clean_environment(SPARSE_DETR_MS_DEFORM_ATTN="compiled"))
    found = json.loads(result.stdout.strip().splitlines()[-1])
    site_packages = installed_python.parent.parent / "lib"
    package = Path(found["package"]).parent
    assert package.is_relative_to(site_packages), "the installed copy, not the repository's package"
    source = REPO_ROOT / "projects" / "SparseDETR" / "sparse_detr"
    assert found["modules"] == sorted(str(p.relative_to(source)) for p in source.rglob("*.py")), \
        "every module and subpackage of the package is in the wheel"
    assert Path(found["kernels"]).parent == package
    assert found["shape"] == [2, 5, 8] and found["difference"] < 1e-10, "the compiled kernel's float64 result"
    assert found["config"] == str(package / "configs" / "sparse_detr_r50_rho0.1.yaml")
    assert found["resolved"] == str(package / "configs" / "demo.yaml"), "a bare name on the command line"
    # the leaf and its _BASE_ chain (Base-SparseDETR-R50.yaml, Base-SparseDETR.yaml) from the package data
    assert (found["rho"], found["stride_in_1x1"], found["meta_architecture"]) == (0.1, False, "SparseDETR")
    assert found["unknown"].startswith("'nope.yaml' is not one of the project's configs; they are: ")
    assert "sparse_detr_r50_rho0.1.yaml, sparse_detr_r50_rho0.2.yaml" in found["unknown"]


def test_the_build_refuses_build_isolation_in_one_line(tmp_path):
    """pip's isolated build runs setup.py without the environment's torch (the first hook it calls, here with
    torch hidden): one line saying to use --no-build-isolation, before anything compiles."""
    sources = copy_build_inputs(tmp_path / "src")
    hide_torch = "import sys; sys.modules['torch'] = None; from setuptools import build_meta; " \
                 "build_meta.get_requires_for_build_wheel()"
    result = subprocess.run([sys.executable, "-c", hide_torch], cwd=sources, capture_output=True, text=True,
                            timeout=120, env=clean_environment())
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [REFUSAL]
    assert not (sources / "build").exists()


def test_get_config_file_finds_every_config_by_name_and_lists_them_for_an_unknown_one():
    names = config_names()
    assert names == sorted(p.name for p in CONFIG_DIR.glob("*.yaml")) and "demo.yaml" in names
    assert get_config_file("demo.yaml") == str(CONFIG_DIR / "demo.yaml")
    for wrong in ("demo", "configs/demo.yaml", "../configs/demo.yaml"):
        with pytest.raises(FileNotFoundError) as error:
            get_config_file(wrong)
        assert str(error.value) == f"{wrong!r} is not one of the project's configs; they are: {', '.join(names)}"
