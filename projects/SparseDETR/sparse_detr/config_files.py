"""The project's config files by name, in a repository checkout and in an installed package alike.

``pip install .`` ships ``projects/SparseDETR/configs/*.yaml`` as the package data ``sparse_detr/configs``;
in the repository (an editable install, or the package on ``PYTHONPATH``) they stay where they are.
"""
from pathlib import Path
from typing import List

__all__ = ["CONFIG_DIR", "config_names", "get_config_file"]


def _config_dir() -> Path:
    package = Path(__file__).resolve().parent
    installed = package / "configs"
    return installed if installed.is_dir() else package.parent / "configs"


CONFIG_DIR = _config_dir()


def config_names() -> List[str]:
    """The file names of the project's configs, sorted (``Base-*.yaml`` included)."""
    return sorted(p.name for p in CONFIG_DIR.glob("*.yaml"))


def get_config_file(name: str) -> str:
    """The path of the project's config ``name`` (``"sparse_detr_r50_rho0.1.yaml"``), from any folder: the
    counterpart of Detectron2's ``model_zoo.get_config_file``. An unknown name is a FileNotFoundError that
    lists the available ones."""
    path = CONFIG_DIR / name
    if Path(name).name != name or not path.is_file():
        raise FileNotFoundError(f"{name!r} is not one of the project's configs; they are: {', '.join(config_names())}")
    return str(path)
