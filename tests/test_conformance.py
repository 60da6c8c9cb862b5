"""Behaviour against the authors' implementation, from the fixture committed in tests/data/conformance.

The authors'-format checkpoint is rebuilt from the fixture (tests/official_weights.py), converted by the
project's converter and loaded strictly into the model built from ``sparse_detr_r50_rho0.2.yaml``; in float64
its top-100 detections (eval mode) and every weighted loss term (training mode) must be the authors'. Where the
lead's reference checker is present (../shared/conformance), it must agree as well.
"""
import os
import subprocess
import sys

import pytest
import torch
from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import EventStorage

from conftest import CONFORMANCE_DIR, CONFORMANCE_FIXTURE, REPO_ROOT, build_config
from official_weights import official_state_dict
from sparse_detr.checkpoint import convert_checkpoint

pytestmark = pytest.mark.usefixtures("single_thread")

SCORE_TOL = 1e-5  # absolute, on sigmoid scores
BOX_TOL_PX = 0.05
LOSS_RTOL, LOSS_ATOL = 1e-5, 1e-6
REFERENCE_CHECK = CONFORMANCE_DIR / "check_equivalence.py"


@pytest.fixture(scope="module")
def fixture():
    fixture = torch.load(CONFORMANCE_FIXTURE, map_location="cpu", weights_only=False)
    flags = fixture["official_flags"]
    assert fixture["variant"] == "sparse" and flags[flags.index("--rho") + 1] == "0.2", "the rho = 0.2 fixture"
    return fixture


@pytest.fixture(scope="module")
def model(fixture, tmp_path_factory):
    """The converted authors' checkpoint, strictly loaded into the project's model, in float64."""
    folder = tmp_path_factory.mktemp("conformance")
    torch.save({"model": official_state_dict(fixture)}, folder / "official.pth")
    converted = convert_checkpoint(str(folder / "official.pth"), str(folder / "converted.pth"))
    model = build_model(build_config("sparse_detr_r50_rho0.2.yaml", tiny=False, NUM_CLASSES=fixture["num_classes"],
                                     DROPOUT=0.0))
    model.load_state_dict(converted, strict=True)
    return model.double()


def inputs(fixture, with_targets: bool):
    batch = []
    for image, target in zip(fixture["images_rgb_uint8"], fixture["targets"]):
        h, w = image.shape[-2:]
        item = {"image": image.double(), "height": h, "width": w}
        if with_targets:
            cx, cy, bw, bh = torch.tensor(target["boxes_cxcywh_norm"], dtype=torch.float64).unbind(-1)
            boxes = torch.stack([(cx - bw / 2) * w, (cy - bh / 2) * h, (cx + bw / 2) * w, (cy + bh / 2) * h], -1)
            item["instances"] = Instances((h, w), gt_boxes=Boxes(boxes),
                                          gt_classes=torch.tensor(target["labels"], dtype=torch.int64))
        batch.append(item)
    return batch


def test_detections_are_the_authors(fixture, model):
    model.eval()
    with torch.no_grad():
        outputs = model(inputs(fixture, with_targets=False))
    for expected, output in zip(fixture["expected"]["detections"], outputs):
        found = output["instances"]
        scores = torch.tensor(expected["scores"], dtype=torch.float64)
        assert len(found) == len(scores) == 100
        torch.testing.assert_close(found.scores.double().sort(descending=True).values,
                                   scores.sort(descending=True).values, rtol=0, atol=SCORE_TOL)
        # Detectron2 clips boxes to the image, the authors' code does not: compare clipped; tied scores may reorder
        h, w = found.image_size
        limits = torch.tensor([w, h, w, h], dtype=torch.float64)
        boxes = torch.minimum(found.pred_boxes.tensor.double().clamp(min=0), limits)
        expected_boxes = torch.minimum(torch.tensor(expected["boxes_xyxy"], dtype=torch.float64).clamp(min=0), limits)
        for score, label, box in zip(scores, expected["labels"], expected_boxes):
            same = ((found.scores.double() - score).abs() <= SCORE_TOL) & (found.pred_classes == label)
            assert same.any(), f"no detection of class {label} with score {score:.6f}"
            assert (boxes[same] - box).abs().max(-1).values.min() <= BOX_TOL_PX


def test_losses_are_the_authors(fixture, model):
    model.train()
    with torch.no_grad(), EventStorage():
        losses = model(inputs(fixture, with_targets=True))
    expected = fixture["expected"]["weighted_losses"]
    assert set(losses) == set(expected)
    for key, value in expected.items():
        assert float(losses[key]) == pytest.approx(value, rel=LOSS_RTOL, abs=LOSS_ATOL), key
    if REFERENCE_CHECK.exists():  # the lead's checker, on the committed fixture, agrees as well
        run = subprocess.run([sys.executable, str(REFERENCE_CHECK), "--fixture", str(CONFORMANCE_FIXTURE)],
                             cwd=REPO_ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                             timeout=600)
        assert run.returncode == 0 and run.stdout.strip().splitlines()[-1].startswith("PASS"), run.stdout[-3000:]
