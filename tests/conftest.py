"""Shared fixtures: tiny Sparse DETR models built from the project's own config files, and input batches.

A tiny model keeps everything the config file switches on (two-stage, box refinement, rho, ...) but
shrinks the transformer to hidden 32, 2 heads, 2 encoder and 2 decoder layers, FFN 64, 10 queries and
5 classes, without dropout. The backbone stays the config's (ResNet-50 or Swin-T): its parameter layout
is what the checkpoint tests need, and on 20x30 images it costs little.
"""
import errno
import importlib.util
import logging
import os
from pathlib import Path

import pytest
import torch
from detectron2.config import get_cfg
from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances

from sparse_detr import add_sparse_detr_config

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = REPO_ROOT / "projects" / "SparseDETR" / "configs"
# the authors'-implementation fixture, committed (see its README); the lead's reference tools, where present
CONFORMANCE_FIXTURE = REPO_ROOT / "tests" / "data" / "conformance" / "sparse_r50_rho0.2.pt"
CONFORMANCE_DIR = REPO_ROOT.parent / "shared" / "conformance"

TINY = {"HIDDEN_DIM": 32, "NHEADS": 2, "ENC_LAYERS": 2, "DEC_LAYERS": 2, "DIM_FEEDFORWARD": 64,
        "NUM_QUERIES": 10, "NUM_CLASSES": 5, "DROPOUT": 0.0}


@pytest.fixture(autouse=True)
def logging_as_before():
    """Tools run in-process (train_net, demo, export) set up Detectron2's loggers with handlers on pytest's
    captured streams, which are closed after the test: remove them (and setup_logger's cache), so that later
    tests log normally, whatever the order."""
    from detectron2.utils.logger import setup_logger

    def handlers():
        named = [logging.getLogger(name) for name in list(logging.root.manager.loggerDict)]
        return {logger: list(logger.handlers) for logger in [logging.getLogger(), *named]}

    before = handlers()
    yield
    for logger, current in handlers().items():
        for handler in current:
            if handler not in before.get(logger, ()):
                logger.removeHandler(handler)
    setup_logger.cache_clear()


class FullDisk:
    """A file that takes ``room`` bytes, then refuses writes as a full disk does (for ``torch.save``)."""

    def __init__(self, file, room: int):
        self.file, self.room = file, room

    def write(self, data):
        if len(data) > self.room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= len(data)
        return self.file.write(data)

    def flush(self):
        self.file.flush()


def load_script(path, name: str):
    """A project script (train_net.py, benchmark.py, a tool) imported as the module ``name``."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def build_config(config_name: str, tiny: bool = True, **overrides):
    """The merged config of ``config_name``, shrunk to the tiny sizes when ``tiny``, on the CPU."""
    cfg = get_cfg()
    add_sparse_detr_config(cfg)
    cfg.merge_from_file(str(CONFIG_DIR / config_name))
    for key, value in {**(TINY if tiny else {}), **overrides}.items():
        cfg.MODEL.SPARSE_DETR[key] = value
    cfg.MODEL.DEVICE = "cpu"
    return cfg


@pytest.fixture(scope="module")
def single_thread():
    """Run a module's tiny models on one intra-op thread: their tensors are too small to gain from more, and
    on a busy machine every parallel op would wait for a second core (milliseconds per op)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def project_cfg():
    """``project_cfg(name, tiny=True, **SPARSE_DETR overrides)`` -> the merged config."""
    def make(config_name: str, tiny: bool = True, **overrides):
        return build_config(config_name, tiny, **overrides)
    return make


@pytest.fixture
def tiny_model():
    """``tiny_model(name, dtype=torch.float64, seed=0, tiny=True, **SPARSE_DETR overrides)`` -> model in eval mode."""
    def make(config_name: str, dtype=torch.float64, seed: int = 0, tiny: bool = True, **overrides):
        torch.manual_seed(seed)
        model = build_model(build_config(config_name, tiny, **overrides)).to(dtype)
        return model.eval()
    return make


def make_input(height: int, width: int, generator: torch.Generator, boxes=None, classes=None, out_size=None):
    """One Detectron2 input dict: a random uint8 RGB image and, when ``boxes`` is given, its ground truth."""
    item = {"image": torch.randint(0, 256, (3, height, width), generator=generator, dtype=torch.uint8)}
    if out_size is not None:
        item["height"], item["width"] = out_size
    if boxes is not None:
        instances = Instances((height, width))
        instances.gt_boxes = Boxes(torch.tensor(boxes, dtype=torch.float64).reshape(-1, 4))
        instances.gt_classes = torch.tensor(classes, dtype=torch.int64)
        item["instances"] = instances
    return item


@pytest.fixture
def make_batch():
    """``make_batch(*specs, seed=0)``: each spec is a dict of :func:`make_input`'s keyword arguments."""
    def make(*specs, seed: int = 0):
        generator = torch.Generator().manual_seed(seed)
        return [make_input(generator=generator, **spec) for spec in specs]
    return make
