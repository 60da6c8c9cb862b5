"""projects/SparseDETR/demo.py on a folder of images, with the kept-token panels."""
import json
import os
import subprocess
import sys

import cv2
import numpy as np
import pytest
import torch
from detectron2.modeling import build_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "projects", "SparseDETR"))

import demo  # noqa: E402

TINY = ["MODEL.SPARSE_DETR.HIDDEN_DIM", "32", "MODEL.SPARSE_DETR.NHEADS", "2", "MODEL.SPARSE_DETR.ENC_LAYERS", "1",
        "MODEL.SPARSE_DETR.DEC_LAYERS", "1", "MODEL.SPARSE_DETR.NUM_QUERIES", "10", "INPUT.MIN_SIZE_TEST", "64",
        "INPUT.MAX_SIZE_TEST", "96"]
CONFIG = os.path.join(ROOT, "projects", "SparseDETR", "configs", "demo.yaml")


def test_demo_draws_detections_and_kept_tokens_for_a_folder(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for name in ("a.png", "b.jpg"):
        cv2.imwrite(str(images / name), (rng.random((60, 80, 3)) * 255).astype(np.uint8))
    (images / "notes.txt").write_text("not an image")
    out = tmp_path / "out"
    assert demo.main(["--config-file", CONFIG, "--input", str(images), "--output", str(out),
                      "--confidence-threshold", "0.0", "--show-kept-tokens", "--opts", *TINY]) == 0
    assert sorted(os.listdir(out)) == ["a.png", "b.jpg"]
    plain_out = tmp_path / "plain"
    assert demo.main(["--config-file", CONFIG, "--input", str(images / "a.png"), "--output", str(plain_out / "a.png"),
                      "--confidence-threshold", "0.0", "--opts", *TINY]) == 0
    with_tokens = cv2.imread(str(out / "a.png"))
    plain = cv2.imread(str(plain_out / "a.png"))
    assert plain.shape[:2] == (60, 80), "the picture has the input image's size"
    assert with_tokens.shape[1] == 80 and with_tokens.shape[0] > 60, "kept-token panels are drawn below"


def test_demo_reports_a_missing_input(tmp_path, capsys):
    assert demo.main(["--config-file", CONFIG, "--input", str(tmp_path / "nope.png"), "--opts", *TINY]) == 2
    assert "no such file or folder" in capsys.readouterr().err


def test_demo_report_reads_the_last_evaluation_with_its_dam_recall_and_plots_per_level_curves(tmp_path):
    sys.path.insert(0, os.path.join(ROOT, "projects", "SparseDETR", "tools"))
    import demo_report

    records = [{"iteration": i, "total_loss": 10.0 - i, "dam_recall": 0.5 + 0.01 * i,
                **{f"dam_recall_level{level}": 0.4 + 0.1 * level for level in range(4)}} for i in range(20)]
    records.insert(10, {"iteration": 9, "bbox/AP": 1.0, "bbox/AP50": 2.0, "dam_recall/dam_recall": 0.3})
    records.append({"iteration": 19, "bbox/AP": 5.0, "bbox/AP50": 9.0, "dam_recall/dam_recall": 0.6,
                    "dam_recall/dam_recall_level0": 0.7})
    assert demo_report.evaluation_results(records) == {
        "iteration": 19, "bbox": {"AP": 5.0, "AP50": 9.0}, "dam_recall": {"dam_recall": 0.6, "dam_recall_level0": 0.7}}
    assert demo_report.evaluation_results(records[:5]) is None
    target = tmp_path / "curves.png"
    demo_report.plot_curves(records, str(target))
    picture = cv2.imread(str(target))
    assert picture is not None and picture.shape[1] > 2 * picture.shape[0]  # two panels side by side


def run_demo(*args):
    return demo.main(["--config-file", CONFIG, *args, "--opts", *TINY])


def write_image(path):
    cv2.imwrite(str(path), (np.random.default_rng(0).random((60, 80, 3)) * 255).astype(np.uint8))
    return str(path)


def test_demo_writes_one_image_into_a_new_folder_given_with_a_slash(tmp_path):
    image = write_image(tmp_path / "a.png")
    assert run_demo("--input", image, "--output", str(tmp_path / "out") + "/") == 0
    assert os.listdir(tmp_path / "out") == ["a.png"]


def test_demo_says_what_it_did_not_find(tmp_path, caplog):
    """An untrained model's detections clear no threshold of 1.0: the log says so, with the best score."""
    image = write_image(tmp_path / "a.png")
    logger = demo.logger
    logger.addHandler(caplog.handler)  # demo.main's logger does not propagate to pytest's handler
    try:
        assert run_demo("--input", image, "--output", str(tmp_path / "out.png"), "--confidence-threshold", "1") == 0
    finally:
        logger.removeHandler(caplog.handler)
    assert "no MODEL.WEIGHTS: the model is untrained" in caplog.text
    assert "a.png: no detection reaches --confidence-threshold 1 (the highest score is 0." in caplog.text


@pytest.mark.parametrize("args, message", [
    (["--input", "{empty}"], "the folder holds no image"),
    (["--input", "{image}", "--confidence-threshold", "1.5"], "--confidence-threshold is a score in [0, 1], got 1.5"),
    (["--input", "{image}", "--confidence-threshold", "-0.1"], "--confidence-threshold is a score in [0, 1], got -0.1"),
])
def test_demo_refuses_what_would_draw_nothing(args, message, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    image = write_image(tmp_path / "a.png")
    args = [a.format(empty=tmp_path / "empty", image=image) for a in args]
    assert run_demo(*args, "--output", str(tmp_path / "out/")) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("error: ") and message in last


def test_demo_report_calibrates_the_threshold_by_f1():
    import torch

    sys.path.insert(0, os.path.join(ROOT, "projects", "SparseDETR", "tools"))
    import demo_report

    gt_boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [20.0, 20.0, 30.0, 30.0]])
    gt_classes = torch.tensor([0, 1])
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 9.0], [20.0, 20.0, 30.0, 30.0],
                          [40.0, 40.0, 50.0, 50.0]])
    scores, classes = torch.tensor([0.9, 0.8, 0.3, 0.6], dtype=torch.float64), torch.tensor([0, 0, 0, 1])
    # 0.9 takes the class-0 box; 0.8 finds it taken; 0.3 overlaps the class-1 box with the wrong class; 0.6 misses
    pairs = demo_report.matched_scores(scores, classes, boxes, gt_classes, gt_boxes)
    assert sorted(pairs, reverse=True) == [(0.9, 1), (0.8, 0), (0.6, 0), (0.3, 0)]
    result = demo_report.calibrate(pairs + [(0.7, 1)], num_truths=3, used_threshold=0.65)
    # kept from the top: 0.9 (P 1, R 1/3, F1 .5), 0.8 (.5, 1/3, .4), 0.7 (2/3, 2/3, 2/3), 0.6 (.5, 2/3), ...
    assert result["best"]["threshold"] == 0.7 and abs(result["best"]["f1"] - 2 / 3) < 1e-9
    assert result["used"]["threshold"] == 0.65 and abs(result["used"]["precision"] - 2 / 3) < 1e-9


def test_demo_uses_the_configs_confidence_threshold(tmp_path, caplog):
    image = tmp_path / "a.png"
    cv2.imwrite(str(image), (np.random.default_rng(1).random((60, 80, 3)) * 255).astype(np.uint8))
    with caplog.at_level("INFO", logger="sparse_detr"):
        assert demo.main(["--config-file", CONFIG, "--input", str(image), "--output", str(tmp_path / "out") + "/",
                          "--opts", *TINY, "TEST.CONFIDENCE_THRESHOLD", "0.97"]) == 0
    assert "no detection reaches --confidence-threshold 0.97" in caplog.text


class DemoLog:
    """The records of demo.py's logger (it does not propagate to pytest's handlers once demo.main has run)."""

    def __init__(self, caplog):
        self.caplog = caplog

    def __enter__(self):
        demo.logger.addHandler(self.caplog.handler)
        return self.caplog

    def __exit__(self, *exc):
        demo.logger.removeHandler(self.caplog.handler)


def test_demo_ends_with_what_it_drew_and_skipped(tmp_path, caplog):
    images = tmp_path / "images"
    images.mkdir()
    write_image(images / "a.png")
    (images / "empty.jpg").write_bytes(b"")
    (images / "text.jpg").write_text("not a JPEG")
    with DemoLog(caplog):
        assert run_demo("--input", str(images), "--output", str(tmp_path / "out")) == 0
    assert caplog.records[-1].getMessage() == "1 drawn, 2 skipped"
    assert os.listdir(tmp_path / "out") == ["a.png"]


def test_demo_exits_non_zero_when_nothing_was_drawn(tmp_path):
    """A folder with only a zero-byte image: the command says so in its last line and fails."""
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "empty.jpg").write_bytes(b"")
    result = subprocess.run([sys.executable, os.path.join(ROOT, "projects", "SparseDETR", "demo.py"), "--config-file",
                             CONFIG, "--input", str(tmp_path / "images"), "--output", str(tmp_path / "out"), "--opts",
                             *TINY], capture_output=True, text=True, timeout=300)
    assert result.returncode == 1, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1].endswith(" 0 drawn, 1 skipped")
    assert "skipping " + str(tmp_path / "images" / "empty.jpg") + ": not a readable image" in result.stdout


def test_demo_draws_a_large_image_at_a_bounded_size_with_its_boxes_in_place(tmp_path, caplog):
    """A 2400x4000 image is drawn at 1200x2000; the one detection kept is drawn where its box, scaled, lies."""
    cfg = demo.load_config(CONFIG, TINY)
    torch.manual_seed(3)
    weights = tmp_path / "model.pth"
    torch.save({"model": build_model(cfg).state_dict()}, weights)
    background = np.array([40, 160, 90], np.uint8)
    image = np.empty((2400, 4000, 3), np.uint8)
    image[:] = background
    path = tmp_path / "large.png"
    cv2.imwrite(str(path), image)
    cfg.MODEL.WEIGHTS = str(weights)
    detections = demo.Predictor(cfg, 0.0)(image).instances
    first, second = detections.scores[:2].tolist()
    assert first > second
    x0, y0, x1, y1 = (detections.pred_boxes.tensor[0] / 2).tolist()  # the picture's scale: 2000 / 4000
    assert x1 - x0 > 20 and y1 - y0 > 20, "a box large enough to see its edges"

    with DemoLog(caplog):
        assert demo.main(["--config-file", CONFIG, "--input", str(path), "--output", str(tmp_path / "out.png"),
                          "--confidence-threshold", str((first + second) / 2),
                          "--opts", *TINY, "MODEL.WEIGHTS", str(weights)]) == 0
    assert "large.png is drawn at 1200x2000, not 2400x4000 (pictures are at most 2000 px on a side)" in caplog.text
    picture = cv2.imread(str(tmp_path / "out.png"))
    assert picture.shape == (1200, 2000, 3)
    changed = np.abs(picture.astype(int) - background).max(-1) > 24
    rows, cols = np.nonzero(changed)
    # the box's top-left corner is where the drawing starts (its label lies right of it, or below)
    assert abs(cols.min() - max(x0, 0)) < 4 and abs(rows.min() - max(y0, 0)) < 4, (cols.min(), rows.min(), x0, y0)
    for x, y in [(x0, (y0 + y1) / 2), (x1, (y0 + y1) / 2), ((x0 + x1) / 2, y1)]:  # left, right and bottom edges
        x, y = min(max(round(x), 0), 1999), min(max(round(y), 0), 1199)
        assert changed[max(y - 3, 0):y + 4, max(x - 3, 0):x + 4].any(), (x, y)


def test_demo_pictures_do_not_depend_on_the_global_random_state(tmp_path):
    """Visualizer picks the instances' colours at random: the demo draws them from a fixed seed, so the same
    detections give the same picture whatever numpy's global state was (which it leaves as it found it)."""
    cfg = demo.load_config(CONFIG, TINY)
    torch.manual_seed(3)
    weights = tmp_path / "model.pth"
    torch.save({"model": build_model(cfg).state_dict()}, weights)
    cfg.MODEL.WEIGHTS = str(weights)
    predictor = demo.Predictor(cfg, 0.0)
    image = np.random.default_rng(0).integers(0, 256, (96, 128, 3), dtype=np.uint8)
    pictures = []
    for seed in (1, 2):
        np.random.seed(seed)
        before = np.random.get_state()[1].copy()
        pictures.append(demo.render(predictor, image, show_kept_tokens=False))
        assert np.array_equal(np.random.get_state()[1], before)
    assert len(predictor(image).instances) > 1 and np.array_equal(pictures[0], pictures[1])


DEMO_WEIGHTS = os.path.join(ROOT, "tests", "data", "demo_model", "model_final_fp16.pth")
TRAIN_NET = os.path.join(ROOT, "projects", "SparseDETR", "train_net.py")


def test_demo_report_calibrates_on_the_evaluations_detections_and_runs_the_model_for_the_drawn_images(
        tmp_path, monkeypatch, caplog):
    """A run folder of the trained demo model (tests/data/demo_model) evaluated by ``train_net.py --eval-only`` on
    6 generated val images: the report's F1 and thresholds from the evaluation's detections are those it gets by
    predicting every image itself (the fallback, once the file is older than the weights), and with the file the
    model runs for the 2 drawn images only. The evaluation runs one image at a time, as the report predicts: in
    padded batches its detections would equal the report's only to float rounding."""
    import torch
    from detectron2.modeling import build_model

    from conftest import load_script
    from sparse_detr.checkpoint import SparseDETRCheckpointer
    from sparse_detr.cli import load_config
    from sparse_detr.inference import FastInferenceModel

    sys.path.insert(0, os.path.join(ROOT, "projects", "SparseDETR", "tools"))
    import demo_report

    monkeypatch.setenv("SPARSE_DETR_DATASETS", str(tmp_path / "shapes"))
    monkeypatch.setenv("SPARSE_DETR_SHAPES_VAL_SIZE", "6")
    config = tmp_path / "demo_batch1.yaml"
    config.write_text('_BASE_: "demo.yaml"\nTEST:\n  IMS_PER_BATCH: 1\n')
    run = tmp_path / "run"
    model = build_model(load_config(str(config)))
    state = torch.load(DEMO_WEIGHTS, map_location="cpu", weights_only=True)
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})
    SparseDETRCheckpointer(model, save_dir=str(run)).save("model_final")
    (run / "metrics.json").write_text(json.dumps({"iteration": 0, "total_loss": 1.0}) + "\n")
    train_net = load_script(TRAIN_NET, "sparse_detr_train_net")
    train_net.main(train_net.default_argument_parser().parse_args(
        ["--config-file", str(config), "--eval-only", "MODEL.WEIGHTS", str(run / "model_final.pth"),
         "OUTPUT_DIR", str(run)]))
    detections_file = run / "inference" / "coco_instances_results.json"
    assert detections_file.is_file()

    predicted_images = []
    predict = FastInferenceModel.predict

    def counted(self, batched_inputs):
        predicted_images.extend(tuple(x["image"].shape) for x in batched_inputs)
        return predict(self, batched_inputs)

    monkeypatch.setattr(FastInferenceModel, "predict", counted)
    demo_report.logger.addHandler(caplog.handler)  # its logger does not propagate to pytest's handler

    def report():
        predicted_images.clear()
        caplog.clear()
        assert demo_report.main(["--config-file", str(config), "--output-dir", str(run), "--num-images", "2"]) == 0
        return json.loads((run / "results.json").read_text())

    try:
        reused = report()
        assert len(predicted_images) == 2 and sorted(os.listdir(run / "predictions")) == ["000000.png", "000001.png"]
        assert "calibrating on the evaluation's detections" in caplog.text
        weights_time = os.path.getmtime(run / "model_final.pth")
        os.utime(detections_file, (weights_time - 60, weights_time - 60))
        fallback = report()
        assert len(predicted_images) == 6
        assert "is older than" in caplog.text and "the report predicts every val image" in caplog.text
    finally:
        demo_report.logger.removeHandler(caplog.handler)
    assert reused["calibrated_on"] == "inference/coco_instances_results.json"
    assert fallback["calibrated_on"] == "the report's own predictions"
    assert reused["confidence_threshold"] == fallback["confidence_threshold"]
    assert reused["confidence_threshold"]["best"]["f1"] > 0.3  # the trained model finds the shapes


def test_demo_report_predicts_itself_without_the_evaluations_detections(tmp_path, caplog):
    """A missing file, and one with an image the dataset does not hold, give no detections, with the reason."""
    sys.path.insert(0, os.path.join(ROOT, "projects", "SparseDETR", "tools"))
    import demo_report
    from detectron2.data import MetadataCatalog

    weights = tmp_path / "model_final.pth"
    weights.write_bytes(b"")
    records = [{"image_id": 1}, {"image_id": 2}]
    metadata = MetadataCatalog.get("sparse_detr_shapes_val")  # COCO ids 1..5 -> contiguous 0..4
    found = tmp_path / "found.json"
    found.write_text(json.dumps([{"image_id": 2, "category_id": 3, "bbox": [10.0, 20.0, 30.0, 5.0], "score": 0.75}]))
    demo_report.logger.addHandler(caplog.handler)
    try:
        missing = tmp_path / "missing.json"
        assert demo_report.evaluation_detections(str(missing), str(weights), records, metadata) is None
        assert "(the evaluation did not run): the report predicts every val image" in caplog.text
        detections = demo_report.evaluation_detections(str(found), str(weights), records, metadata)
        foreign = tmp_path / "foreign.json"
        foreign.write_text(json.dumps([{"image_id": 9, "category_id": 1, "bbox": [0, 0, 1, 1], "score": 0.5}]))
        assert demo_report.evaluation_detections(str(foreign), str(weights), records, metadata) is None
        assert "image id 9 is not one of sparse_detr_shapes_val's" in caplog.text
    finally:
        demo_report.logger.removeHandler(caplog.handler)
    assert len(detections[1].scores) == 0 and detections[1].boxes.shape == (0, 4)
    assert detections[2].scores.tolist() == [0.75] and detections[2].classes.tolist() == [2]
    assert detections[2].boxes.tolist() == [[10.0, 20.0, 40.0, 25.0]]
