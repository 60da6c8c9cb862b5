"""What the command-line tools share: loading a config with errors a user can act on, and one-line reports.

Every tool (``train_net.py``, ``demo.py``, ``benchmark.py``, the converter) loads its config with
:func:`load_config` and ends a user error (a missing or broken file, an unknown key, a value out of range)
with one line on stderr, ``error: <what is wrong and where>``, and exit status 2, instead of a traceback:
``main(argv) -> int`` functions take the :func:`reports_user_errors` decorator; ``train_net.py``'s ``main(args)``
exits with :func:`report_user_error`'s status (and is started by :func:`sparse_detr.launch.launch_training`).
"""
import ast
import functools
import logging
import os
import sys
from pathlib import Path
from typing import Collection, Dict, Sequence

import yaml

from detectron2.config import CfgNode, get_cfg
from detectron2.utils.file_io import PathManager

from .config import add_sparse_detr_config
from .config_files import CONFIG_DIR
from .datasets import register_coco_json_datasets
from .solver import KeyOrigin

__all__ = ["CONFIG_DIR", "USER_ERRORS", "ProjectConfig", "check_config", "check_weights_file", "key_origins",
           "load_config", "make_output_dir", "report_user_error", "reports_user_errors", "resolve_config_file"]

logger = logging.getLogger(__name__)

# What a user causes and can fix: wrong paths and files (OSError), wrong values (ValueError), unknown keys and
# datasets (KeyError). Anything else is a bug of ours and keeps its traceback.
USER_ERRORS = (KeyError, ValueError, OSError)


def user_error_message(error: BaseException) -> str:
    """The error as one line: KeyError without repr quotes, OSError as "file: reason"."""
    if isinstance(error, OSError) and error.strerror:
        text = f"{error.filename}: {error.strerror}" if error.filename else error.strerror
    elif isinstance(error, KeyError) and error.args:
        text = str(error.args[0])
    else:
        text = str(error) or type(error).__name__
    return " ".join(text.split())


def report_user_error(error: BaseException) -> int:
    """Print ``error: <one line>`` on stderr; returns the exit status of a user error, 2."""
    print(f"error: {user_error_message(error)}", file=sys.stderr)
    return 2


def reports_user_errors(main):
    """Decorate a tool's ``main(argv) -> int``: a user error (:data:`USER_ERRORS`) prints one line and returns 2."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except USER_ERRORS as e:
            return report_user_error(e)

    return wrapper


class ProjectConfig(CfgNode):
    """Detectron2's CfgNode that finds a ``_BASE_`` among the project's configs and takes integers for floats.

    * A ``_BASE_`` that does not resolve next to the file that names it is looked up by its file name in
      the project's configs (:data:`CONFIG_DIR`), so a config copied elsewhere (``cp configs/demo.yaml my/demo.yaml``)
      keeps working.
    * An integer given for a float key (``MODEL.SPARSE_DETR.RHO 0``, ``RHO: 1`` in a file) becomes a float,
      where yacs would refuse it as a type mismatch.
    """

    @classmethod
    def _open_cfg(cls, filename):
        if not PathManager.isfile(filename):
            fallback = CONFIG_DIR / os.path.basename(filename)
            if not fallback.is_file():
                raise FileNotFoundError(f"the _BASE_ file {filename!r} does not exist, nor is "
                                        f"{os.path.basename(filename)!r} one of the project's configs ({CONFIG_DIR})")
            logger.info("_BASE_ %s is not there: using the project's %s", filename, fallback)
            filename = str(fallback)
        return super()._open_cfg(filename)

    def merge_from_other_cfg(self, cfg_other):
        _floats_for_float_keys(cfg_other, self)
        return super().merge_from_other_cfg(cfg_other)

    def merge_from_list(self, cfg_list):
        cfg_list = list(cfg_list)
        for i in range(0, len(cfg_list) - 1, 2):
            if isinstance(self._value_at(cfg_list[i]), float):
                value = _literal(cfg_list[i + 1])
                if isinstance(value, int) and not isinstance(value, bool):
                    cfg_list[i + 1] = float(value)
        return super().merge_from_list(cfg_list)

    def _value_at(self, full_key: str):
        node = self
        for part in full_key.split("."):
            if not isinstance(node, dict) or part not in node:
                return None
            node = node[part]
        return node


def _literal(value):
    if not isinstance(value, str):
        return value
    try:
        return ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return value


def _floats_for_float_keys(loaded: dict, defaults: dict) -> None:
    """In place: integers of ``loaded`` where ``defaults`` holds a float become floats (nested nodes too)."""
    for key, value in loaded.items():
        default = defaults.get(key)
        if isinstance(value, dict) and isinstance(default, dict):
            _floats_for_float_keys(value, default)
        elif isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
            loaded[key] = float(value)


def resolve_config_file(name: str) -> Path:
    """``name`` when it is a file, else the project's config of that name (``sparse_detr_r50_rho0.1.yaml``)."""
    path = Path(name)
    if path.is_file():
        return path
    if (CONFIG_DIR / path.name).is_file() and path.name == name:
        return CONFIG_DIR / path.name
    raise FileNotFoundError(f"config file {name!r} does not exist (nor is it one of the project's configs in "
                            f"{CONFIG_DIR})")


def load_config(config_file: str, opts: Sequence[str] = (), *, world_size: int = 1) -> CfgNode:
    """get_cfg -> the Sparse DETR keys -> the file -> the overrides -> :func:`check_config`; not frozen.

    ``config_file`` is a path or the name of one of the project's configs (:func:`resolve_config_file`).
    Also registers the datasets of ``DATASETS.COCO_JSON``. Every problem is a ValueError, KeyError or
    FileNotFoundError whose message names the file (and line) or the key and says what is wrong.
    """
    defaults = get_cfg()
    add_sparse_detr_config(defaults)
    cfg = ProjectConfig(defaults)  # every node of the tree in the class, as yacs compares node types
    config_file = str(resolve_config_file(config_file))
    try:
        cfg.merge_from_file(config_file)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{mark.name}, line {mark.line + 1}" if mark is not None else config_file
        raise ValueError(f"{where}: not valid YAML ({getattr(e, 'problem', None) or e})") from None
    except (KeyError, ValueError, AssertionError) as e:  # yacs: unknown keys, wrong types
        raise ValueError(f"{config_file}: {user_error_message(e)}") from None
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{config_file}: {user_error_message(e)}") from None
    except (TypeError, AttributeError):  # fvcore on an empty file or one that is not a mapping
        raise ValueError(f"{config_file} (or a _BASE_ of it) is not a YAML mapping of config keys") from None
    try:
        cfg.merge_from_list(list(opts))
    except (KeyError, ValueError, AssertionError) as e:  # odd-length lists, unknown keys, wrong types
        raise ValueError(f"command line: {user_error_message(e)}") from None
    check_config(cfg, world_size)
    register_coco_json_datasets(cfg.DATASETS.COCO_JSON)
    return cfg


def key_origins(config_file: str, opts: Sequence[str], keys: Collection[str]) -> Dict[str, KeyOrigin]:
    """Where each of ``keys`` (full names: ``"SOLVER.MAX_ITER"``) got its value in :func:`load_config` of the same
    ``config_file`` and ``opts``: the defaults, the config file or one of its ``_BASE_`` files, or the command
    line (see :class:`sparse_detr.solver.KeyOrigin`)."""
    files = []

    class Recording(ProjectConfig):  # Detectron2's merge, noting each file after its _BASE_ files
        @classmethod
        def load_yaml_with_base(cls, filename, allow_unsafe=False):
            merged = super().load_yaml_with_base(filename, allow_unsafe)
            with cls._open_cfg(filename) as f:
                files.append((os.path.basename(filename), yaml.safe_load(f)))
            return merged

    Recording.load_yaml_with_base(str(resolve_config_file(config_file)))
    origins = {key: KeyOrigin(0, "the defaults") for key in keys}
    for order, (name, loaded) in enumerate(files, 1):
        for key in keys:
            if _sets(loaded, key):
                origins[key] = KeyOrigin(order, name)
    for order, key in enumerate(opts[0::2], len(files) + 1):
        if key in origins:
            origins[key] = KeyOrigin(order, "the command line")
    return origins


def _sets(loaded: dict, full_key: str) -> bool:
    *parents, leaf = full_key.split(".")
    for part in parents:
        loaded = loaded.get(part) if isinstance(loaded, dict) else None
    return isinstance(loaded, dict) and leaf in loaded


def check_config(cfg: CfgNode, world_size: int = 1) -> None:
    """Values the model or the loaders would otherwise fail on later, with a less helpful message."""
    sd = cfg.MODEL.SPARSE_DETR
    if sd.NUM_CLASSES < 1:
        raise ValueError(f"MODEL.SPARSE_DETR.NUM_CLASSES must be at least 1, got {sd.NUM_CLASSES}")
    if not 0.0 <= sd.RHO <= 1.0:
        raise ValueError(f"MODEL.SPARSE_DETR.RHO is a keeping ratio in [0, 1], got {sd.RHO}")
    for key in ("SOLVER", "TEST"):
        if cfg[key].IMS_PER_BATCH < 1:
            raise ValueError(f"{key}.IMS_PER_BATCH must be at least 1, got {cfg[key].IMS_PER_BATCH}")
    if cfg.INPUT.SIDE_MULTIPLE < 0:
        raise ValueError(f"INPUT.SIDE_MULTIPLE is a number of pixels (0: off), got "
                         f"{cfg.INPUT.SIDE_MULTIPLE}")
    batch = cfg.SOLVER.IMS_PER_BATCH
    if batch % world_size:
        raise ValueError(f"SOLVER.IMS_PER_BATCH {batch} is not divisible by the {world_size} processes "
                         f"(--num-gpus x --num-machines), which each take an equal share of the batch: "
                         f"use a multiple of {world_size}")


def check_weights_file(weights: str) -> None:
    """MODEL.WEIGHTS, when set to a local path, must exist (URLs and ``detectron2://`` are fetched later)."""
    if weights and "://" not in weights and not os.path.isfile(weights):
        raise FileNotFoundError(f"MODEL.WEIGHTS file {weights!r} does not exist")


def make_output_dir(path: str) -> None:
    """Create OUTPUT_DIR (and its parents), or say that it cannot be created and why."""
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise ValueError(f"OUTPUT_DIR {path!r} cannot be created: {e.strerror}") from None
