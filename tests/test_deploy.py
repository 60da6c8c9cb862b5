"""Deployment: export.py to ONNX (run in ONNX Runtime) and to a torch.export program, and demo.py --onnx.

Two models, each trained for a few iterations on random boxes (so no head is at its initialisation) and
exported once for the module by ``export.py`` at 64x96: the demo config (Sparse DETR, rho = 0.3, batch 1) to
ONNX and to a ``torch.export`` program, and the dense Deformable DETR config shrunk to the tiny sizes (batch 2)
to ONNX. The exported graphs must return the Detectron2 model's own detections (``model.inference``, before
the rescale to another size) on two inputs.
"""
import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances

from conftest import REPO_ROOT, TINY, build_config
from sparse_detr.deploy import OUTPUT_NAMES, ExportableDetector

sys.path.insert(0, str(REPO_ROOT / "projects" / "SparseDETR"))
import demo  # noqa: E402
import export  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_thread")

HEIGHT, WIDTH = 64, 96
TINY_OPTS = [item for key, value in TINY.items() for item in (f"MODEL.SPARSE_DETR.{key}", str(value))]


def trained_model(config_name: str, tiny: bool, steps: int = 3):
    """The config's model after a few AdamW steps on two images with random boxes, in eval mode."""
    torch.manual_seed(0)
    model = build_model(build_config(config_name, tiny)).train()
    generator = torch.Generator().manual_seed(1)
    batch = []
    for height, width in [(HEIGHT, WIDTH), (56, 80)]:
        item = {"image": torch.randint(0, 256, (3, height, width), generator=generator).float()}
        instances = Instances((height, width))
        corners = torch.rand(3, 2, 2, generator=generator) * torch.tensor([width, height])
        instances.gt_boxes = Boxes(torch.cat([corners.min(1).values, corners.max(1).values + 4], 1))
        instances.gt_classes = torch.randint(0, model.transformer.class_embed[0].out_features, (3,),
                                             generator=generator)  # contiguous heads: a column per class
        item["instances"] = instances
        batch.append(item)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    for _ in range(steps):
        losses = model(batch)
        optimizer.zero_grad()
        sum(losses.values()).backward()
        optimizer.step()
    return model.eval()


def random_images(batch: int, seed: int) -> torch.Tensor:
    return torch.rand((batch, 3, HEIGHT, WIDTH), generator=torch.Generator().manual_seed(seed)) * 255


@torch.no_grad()
def model_detections(model, images: torch.Tensor):
    """(scores, labels, boxes) of the Detectron2 model on unpadded images, before any rescale, as numpy."""
    out = model.predict([{"image": image} for image in images])
    results = model.inference(model.class_logits(out.pred_logits[-1]), out.pred_boxes[-1], out.image_sizes)
    return (torch.stack([r.scores for r in results]).numpy(), torch.stack([r.pred_classes for r in results]).numpy(),
            torch.stack([r.pred_boxes.tensor for r in results]).numpy())


def assert_same_detections(actual, expected):
    scores, labels, boxes = (np.asarray(a) for a in actual)
    expected_scores, expected_labels, expected_boxes = expected
    assert scores.dtype == np.float32 and labels.dtype == np.int64 and boxes.dtype == np.float32
    assert scores.shape == expected_scores.shape and boxes.shape == expected_boxes.shape
    np.testing.assert_array_equal(labels, expected_labels)
    np.testing.assert_allclose(scores, expected_scores, rtol=0, atol=1e-4)
    np.testing.assert_allclose(boxes, expected_boxes, rtol=0, atol=0.01)


def export_with_the_tool(folder: Path, config_name: str, tiny: bool, batch: int, formats):
    """(model, its weights file, the files export.py wrote) of a config's model trained for a few steps."""
    model = trained_model(config_name, tiny)
    weights = folder / "model.pth"
    torch.save({"model": model.state_dict()}, weights)
    args = ["--config-file", config_name, "--height", str(HEIGHT), "--width", str(WIDTH), "--batch", str(batch)]
    opts = ["MODEL.WEIGHTS", str(weights)] + (TINY_OPTS if tiny else [])
    files = {"onnx": folder / "model.onnx", "torch": folder / "model.pt2"}
    for name in formats:
        assert export.main(args + ["--format", name, "--output", str(files[name])] + opts) == 0
    return {"config": config_name, "batch": batch, "model": model, "weights": weights, "folder": folder,
            "onnx": files["onnx"], "pt2": files["torch"]}


@pytest.fixture(scope="module")
def demo_export(tmp_path_factory):
    """The demo config (Sparse DETR, rho = 0.3) at batch 1, to ONNX and to a .pt2 program."""
    return export_with_the_tool(tmp_path_factory.mktemp("demo"), "demo.yaml", False, 1, ("onnx", "torch"))


@pytest.fixture(scope="module")
def dense_export(tmp_path_factory):
    """The dense Deformable DETR config shrunk to the tiny sizes, at batch 2, to ONNX."""
    return export_with_the_tool(tmp_path_factory.mktemp("dense"), "deformable_detr_r50.yaml", True, 2, ("onnx",))


@pytest.mark.parametrize("export_fixture", ["demo_export", "dense_export"])
def test_onnx_runtime_gives_the_models_detections(export_fixture, request):
    exported = request.getfixturevalue(export_fixture)
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = 1
    session = onnxruntime.InferenceSession(str(exported["onnx"]), options, providers=["CPUExecutionProvider"])
    batch = exported["batch"]
    assert [(i.name, i.shape, i.type) for i in session.get_inputs()] == [("images", [batch, 3, HEIGHT, WIDTH],
                                                                          "tensor(float)")]
    assert [o.name for o in session.get_outputs()] == list(OUTPUT_NAMES)
    for seed in (1, 2):
        images = random_images(batch, seed)
        outputs = session.run(list(OUTPUT_NAMES), {"images": images.numpy()})
        assert_same_detections(outputs, model_detections(exported["model"], images))

    graph = onnx.load(str(exported["onnx"]), load_external_data=False)
    assert {op.domain for op in graph.opset_import} <= {"", "ai.onnx"} and graph.opset_import[0].version >= 17
    assert {node.domain for node in graph.graph.node} <= {""}, "standard ONNX operators only (no plugin)"
    assert "GridSample" in {node.op_type for node in graph.graph.node}
    assert not list(exported["folder"].glob("*.data")), "one self-contained file"
    meta = {p.key: p.value for p in graph.metadata_props}
    assert meta["sparse_detr.input_size"] == f"{HEIGHT}x{WIDTH}" and meta["sparse_detr.config"] == exported["config"]
    names = json.loads(meta["sparse_detr.thing_classes"])
    assert names == (["circle", "square", "triangle", "cross", "ring"] if exported["config"] == "demo.yaml" else None)


def test_torch_export_program_gives_the_models_detections(demo_export):
    exported = demo_export
    program = torch.export.load(str(exported["pt2"]))
    targets = {str(node.target) for node in program.graph.nodes if node.op == "call_function"}
    assert not any("sparse_detr" in t for t in targets), "standard ATen operators: loading needs no sparse_detr"
    module = program.module()
    for seed in (1, 2):
        images = random_images(exported["batch"], seed)
        with torch.no_grad():
            outputs = [t.numpy() for t in module(images)]
        assert_same_detections(outputs, model_detections(exported["model"], images))


@pytest.mark.parametrize("sampler", ["grid_sample", "gather"])
def test_wrapper_gives_predict_and_postprocess_of_a_91_column_sparse_model(sampler):
    """The paper configs' class heads (a column per COCO id): contiguous labels, the 80 used columns only."""
    torch.manual_seed(0)
    model = build_model(build_config("sparse_detr_r50_rho0.1.yaml", tiny=True, NUM_CLASSES=80)).eval()
    assert model.transformer.class_embed[0].out_features == 91
    with torch.no_grad():
        for p in model.parameters():  # away from the initialisation: distinct scores, boxes off their references
            p.add_(0.05 * torch.randn_like(p))
    images = random_images(2, seed=3)
    detector = ExportableDetector(model, sampler)
    with torch.no_grad():
        scores, labels, boxes = detector(images)
        inputs = [{"image": image, "height": HEIGHT, "width": WIDTH} for image in images]
        results = model.postprocess(model.predict(inputs), inputs)
    assert scores.shape == labels.shape == (2, 100) and boxes.shape == (2, 100, 4)
    assert labels.max() < 80
    assert_same_detections((scores.numpy(), labels.numpy(), boxes.numpy()), model_detections(model, images))
    for i, result in enumerate(results):  # postprocess clips the boxes to the image and drops empty ones
        instances = result["instances"]
        clipped = boxes[i].clone()
        clipped[:, 0::2] = clipped[:, 0::2].clamp(0, WIDTH)
        clipped[:, 1::2] = clipped[:, 1::2].clamp(0, HEIGHT)
        kept = (clipped[:, 2] > clipped[:, 0]) & (clipped[:, 3] > clipped[:, 1])
        torch.testing.assert_close(instances.pred_boxes.tensor, clipped[kept], rtol=0, atol=1e-4)
        torch.testing.assert_close(instances.scores, scores[i][kept])
        assert torch.equal(instances.pred_classes, labels[i][kept])


def export_error(args, capsys) -> str:
    """export.py's one-line error for ``args`` (exit code 2)."""
    try:
        code = export.main(args)
    except SystemExit as e:  # argument errors
        code = e.code
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err and err[-1].startswith("error: ")
    return err[-1]


def test_export_errors(tmp_path, capsys):
    base = ["--config-file", "demo.yaml", "--format", "onnx", "--output", str(tmp_path / "m.onnx")]
    size = ["--height", str(HEIGHT), "--width", str(WIDTH)]
    assert "dynamic sizes are not supported" in export_error(base + ["--height", "dynamic", "--width", "96"], capsys)
    assert "dynamic sizes are not supported" in export_error(base + ["--height", "64", "--width", "-1"], capsys)
    assert "must be a positive integer, got 0" in export_error(base + ["--height", "0", "--width", "96"], capsys)
    assert "invalid choice: 'tflite'" in export_error(base[:2] + ["--format", "tflite"] + base[4:] + size, capsys)
    assert "config file 'nope.yaml' does not exist" in export_error(["--config-file", "nope.yaml"] + base[2:] + size, capsys)
    assert "use it with --format onnx" in export_error(
        base[:2] + ["--format", "torch"] + base[4:] + size + ["--benchmark"], capsys)
    assert "fewer than the 30 proposals the two-stage head selects" in export_error(
        base + ["--height", "16", "--width", "16"], capsys)
    assert "MODEL.WEIGHTS file" in export_error(base + size + ["MODEL.WEIGHTS", str(tmp_path / "no.pth")], capsys)
    assert "Non-existent key: MODEL.NOT_A_KEY" in export_error(base + size + ["MODEL.NOT_A_KEY", "1"], capsys)

    torch.manual_seed(0)
    model = build_model(build_config("demo.yaml", tiny=False))
    backbone_only = {k: v for k, v in model.state_dict().items() if k.startswith("backbone.")}
    torch.save({"model": backbone_only}, tmp_path / "backbone.pth")
    message = export_error(base + size + ["MODEL.WEIGHTS", str(tmp_path / "backbone.pth")], capsys)
    assert message.startswith("error: the weights do not fit the config:") and "tensors are missing" in message
    torch.save({"model": model.state_dict()}, tmp_path / "five_classes.pth")
    message = export_error(base + size + ["MODEL.WEIGHTS", str(tmp_path / "five_classes.pth"),
                                          "MODEL.SPARSE_DETR.NUM_CLASSES", "7"], capsys)
    assert "class heads have 5 rows" in message
    (tmp_path / "notes.pth").write_text("not a checkpoint")
    assert "not a readable PyTorch checkpoint" in export_error(base + size + ["MODEL.WEIGHTS", str(tmp_path / "notes.pth")], capsys)
    assert not (tmp_path / "m.onnx").exists()


def test_export_error_is_one_line_from_the_command_line(tmp_path):
    script = REPO_ROOT / "projects" / "SparseDETR" / "export.py"
    result = subprocess.run([sys.executable, str(script), "--config-file", "demo.yaml", "--format", "onnx",
                             "--height", "dynamic", "--width", "96", "--output", str(tmp_path / "m.onnx")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    # (importing detectron2 may print a FutureWarning of torch.jit before it)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == [result.stderr.splitlines()[-1]]
    assert errors[0].startswith("error: argument --height: 'dynamic': dynamic sizes are not supported")


def test_demo_onnx_draws_detections_in_the_original_image(demo_export, dense_export, tmp_path, capsys):
    exported = demo_export
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for name, shape in [("wide.png", (40, 120, 3)), ("tall.jpg", (90, 50, 3))]:  # aspects other than the model's
        cv2.imwrite(str(images / name), (rng.random(shape) * 255).astype(np.uint8))
    out = tmp_path / "out"
    assert demo.main(["--onnx", str(exported["onnx"]), "--input", str(images), "--output", str(out),
                      "--confidence-threshold", "0.0"]) == 0
    assert cv2.imread(str(out / "wide.png")).shape == (40, 120, 3)
    assert cv2.imread(str(out / "tall.jpg")).shape == (90, 50, 3)

    predictor = demo.OnnxPredictor(str(exported["onnx"]), 0.0)
    image = (rng.random((HEIGHT, WIDTH, 3)) * 255).astype(np.uint8)  # the model's size: no resize, no padding
    instances = predictor(image).instances
    rgb = torch.from_numpy(np.ascontiguousarray(image[:, :, ::-1].transpose(2, 0, 1))).float()
    with torch.no_grad():
        inputs = [{"image": rgb}]
        expected = exported["model"].postprocess(exported["model"].predict(inputs), inputs)[0]["instances"]
    torch.testing.assert_close(instances.scores, expected.scores, rtol=0, atol=1e-4)
    torch.testing.assert_close(instances.pred_boxes.tensor, expected.pred_boxes.tensor, rtol=0, atol=0.01)
    assert torch.equal(instances.pred_classes, expected.pred_classes)

    assert demo.main(["--onnx", str(exported["onnx"]), "--input", str(images), "--show-kept-tokens"]) == 2
    assert "--show-kept-tokens needs the PyTorch model" in capsys.readouterr().err
    assert demo.main(["--onnx", str(exported["weights"]), "--input", str(images)]) == 2
    assert "ONNX Runtime cannot load it" in capsys.readouterr().err
    assert demo.main(["--onnx", str(dense_export["onnx"]), "--input", str(images)]) == 2
    assert "takes a batch of 2 images; the demo runs one image at a time" in capsys.readouterr().err


def test_demo_onnx_says_when_the_export_size_is_not_the_configs_test_size(demo_export, tmp_path, capsys):
    """demo.yaml tests at a short side of 224 (long side at most 320, sides in multiples of 32), which makes a 64x96
    image 224x320: the graph sees objects at under a third of the scale. An export whose size the test resize
    keeps says nothing."""
    image = tmp_path / "a.png"
    cv2.imwrite(str(image), (np.random.default_rng(0).random((HEIGHT, WIDTH, 3)) * 255).astype(np.uint8))
    graph = onnx.load(str(demo_export["onnx"]))
    meta = {p.key: p.value for p in graph.metadata_props}
    assert (meta["sparse_detr.min_size_test"], meta["sparse_detr.max_size_test"]) == ("224", "320")
    assert meta["sparse_detr.side_multiple"] == "32"
    args = ["--input", str(image), "--output", str(tmp_path / "out") + "/"]
    assert demo.main(["--onnx", str(demo_export["onnx"]), *args]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    said = [line for line in lines if "tests at a short side" in line]
    assert said == [lines[0]], "one line, at start-up"
    assert said[0].endswith("model.onnx takes 64x96 images, but its config (demo.yaml) tests at a short side of 224 "
                            "(long side at most 320, sides rounded to multiples of 32: 64x96 becomes 224x320): images "
                            "are scaled to 64x96 here, so the detections differ from evaluation's and demo.py "
                            "--config-file's; export at 224x320 for the same")

    for prop in graph.metadata_props:
        prop.value = {"sparse_detr.min_size_test": "64", "sparse_detr.max_size_test": "100"}.get(prop.key, prop.value)
    onnx.save(graph, str(tmp_path / "matching.onnx"))
    assert demo.main(["--onnx", str(tmp_path / "matching.onnx"), *args]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines and not any("tests at a short side" in line for line in lines)
