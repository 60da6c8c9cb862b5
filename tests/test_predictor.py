"""sparse_detr.SparseDETRPredictor: Detectron2's DefaultPredictor idiom on the evaluation path, demo.py's detections.

A tiny Sparse DETR (conftest's TINY transformer on the R50 backbone) with random weights saved to a checkpoint,
loaded through MODEL.WEIGHTS as a user would, on a random 60x80 BGR image resized to a short side of 64.
"""
import sys

import numpy as np
import pytest
import torch
from detectron2.engine import DefaultPredictor
from detectron2.modeling import build_model

from conftest import REPO_ROOT, build_config
from sparse_detr import SparseDETRPredictor
from sparse_detr.inference import FastInferenceModel
from sparse_detr.meta_arch import SparseDETR

sys.path.insert(0, str(REPO_ROOT / "projects" / "SparseDETR"))
import demo  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_thread")

CONFIG = "sparse_detr_r50_rho0.3.yaml"


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    torch.manual_seed(0)
    model = build_model(build_config(CONFIG))
    with torch.no_grad():  # away from the initialisation: distinct scores, boxes off their reference points
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    path = tmp_path_factory.mktemp("weights") / "model.pth"
    torch.save({"model": model.state_dict()}, path)
    return str(path)


def config(weights: str, **test_keys):
    cfg = build_config(CONFIG)
    cfg.MODEL.WEIGHTS = weights
    cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST = 64, 96
    for key, value in test_keys.items():
        cfg.TEST[key] = value
    return cfg


def bgr_image(seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).random((60, 80, 3)) * 255).astype(np.uint8)


def assert_same_instances(actual, expected, score_atol=0.0, box_atol=0.0):
    assert actual.image_size == expected.image_size == (60, 80)
    assert len(actual) == len(expected) > 0
    torch.testing.assert_close(actual.scores, expected.scores, rtol=0, atol=score_atol)
    assert torch.equal(actual.pred_classes, expected.pred_classes)
    torch.testing.assert_close(actual.pred_boxes.tensor, expected.pred_boxes.tensor, rtol=0, atol=box_atol)


def test_predictor_gives_demo_py_detections(weights):
    """The default precision ("auto": bf16 on CPUs with native bf16), the fast path, every detection."""
    cfg = config(weights)
    predictor = SparseDETRPredictor(cfg)
    assert isinstance(predictor.model, FastInferenceModel), "the evaluation path, not the plain model"
    image = bgr_image()
    output = predictor(image)
    expected = demo.Predictor(cfg, confidence_threshold=0.0)(image, "a.png").instances
    assert_same_instances(output["instances"].to("cpu"), expected)
    assert set(output) == {"instances", "dam_recall"}, "the evaluation output of a sparse model"


@pytest.mark.parametrize("input_format", ["RGB", "BGR"])
def test_predictor_is_a_drop_in_for_default_predictor(weights, input_format):
    """Same call, same input handling: with the fast path off, DefaultPredictor's output exactly; with it on
    (float32), the same detections within the fast path's tolerances."""
    image = bgr_image(1)
    plain = config(weights, FAST_INFERENCE=False)
    plain.INPUT.FORMAT = input_format
    expected = DefaultPredictor(plain)(image)["instances"]
    predictor = SparseDETRPredictor(plain)
    assert isinstance(predictor.model, SparseDETR)
    assert predictor.input_format == input_format and predictor.metadata.name == plain.DATASETS.TEST[0]
    assert_same_instances(predictor(image)["instances"], expected)

    fast = config(weights, PRECISION="float32")
    fast.INPUT.FORMAT = input_format
    assert_same_instances(SparseDETRPredictor(fast)(image)["instances"], expected, score_atol=1e-5, box_atol=1e-3)


def test_predictor_rounds_the_sides_as_evaluation_and_reports_in_the_images_own_size(weights):
    cfg = config(weights, PRECISION="float32")
    cfg.INPUT.SIDE_MULTIPLE = 32
    predictor = SparseDETRPredictor(cfg)
    model_input = predictor.preprocess(bgr_image())  # 60 x 80 -> 64 x 85 -> 64 x 96
    assert tuple(model_input["image"].shape) == (3, 64, 96) and (model_input["height"], model_input["width"]) == (60, 80)
    instances = predictor(bgr_image())["instances"]
    assert instances.image_size == (60, 80) and len(instances) > 0
    boxes = instances.pred_boxes.tensor
    assert (boxes >= 0).all() and (boxes[:, 0::2] <= 80).all() and (boxes[:, 1::2] <= 60).all()
    # the boxes the model gives in its 64 x 96 input's coordinates, each axis scaled back on its own
    in_input = predictor.model([dict(model_input, height=64, width=96)])[0]["instances"].pred_boxes.tensor
    torch.testing.assert_close(boxes, in_input * torch.tensor([80 / 96, 60 / 64] * 2), rtol=0, atol=1e-4)


def test_predictor_names_an_image_too_thin_to_resize(weights):
    predictor = SparseDETRPredictor(config(weights))
    with pytest.raises(ValueError, match="the 1x2000 image has a zero side once resized"):
        predictor(np.zeros((1, 2000, 3), np.uint8))
    bad = config(weights)
    bad.INPUT.FORMAT = "L"
    with pytest.raises(ValueError, match=r"INPUT.FORMAT must be one of \('RGB', 'BGR'\), got 'L'"):
        SparseDETRPredictor(bad)
