"""The training pipeline: augmentation, optimizer, train_net.py (train, eval, resume, two processes), errors."""
import json
import logging
import os
import platform
import socket
import subprocess
import sys

import cv2
import numpy as np
import pytest
import torch

from detectron2.config import get_cfg
from detectron2.modeling import build_model

import sparse_detr
from sparse_detr.cli import load_config
from sparse_detr.dataset_mapper import DetrDatasetMapper, ResizeToMultiple
from sparse_detr.engine import ResumableTrainLoader, channels_last_backbone, gradients_in_parameter_strides
from sparse_detr.output_dir import LOCK_NAME, OutputDirLock
from sparse_detr.solver import KeyOrigin, build_optimizer, settle_schedule

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROJECT = os.path.join(ROOT, "projects", "SparseDETR")
TRAIN_NET = os.path.join(PROJECT, "train_net.py")
DEMO_CONFIG = os.path.join(PROJECT, "configs", "demo.yaml")
# a very small demo model on very small images: a few seconds per run
TINY = ["MODEL.SPARSE_DETR.HIDDEN_DIM", "32", "MODEL.SPARSE_DETR.NHEADS", "2", "MODEL.SPARSE_DETR.ENC_LAYERS", "1",
        "MODEL.SPARSE_DETR.DEC_LAYERS", "1", "MODEL.SPARSE_DETR.NUM_QUERIES", "10",
        "MODEL.SPARSE_DETR.DIM_FEEDFORWARD", "32", "INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.MAX_SIZE_TRAIN", "96",
        "INPUT.MIN_SIZE_TEST", "64", "INPUT.MAX_SIZE_TEST", "96", "SOLVER.IMS_PER_BATCH", "2",
        "SOLVER.EPOCHS", "0", "DATALOADER.NUM_WORKERS", "0", "TEST.EVAL_PERIOD", "0", "TEST.IMS_PER_BATCH", "2"]


@pytest.fixture(scope="module")
def shapes_env(tmp_path_factory):
    """Environment for subprocesses: the generated dataset, small, in a temporary folder."""
    root = tmp_path_factory.mktemp("shapes")
    env = dict(os.environ, SPARSE_DETR_DATASETS=str(root), SPARSE_DETR_SHAPES_TRAIN_SIZE="12",
               SPARSE_DETR_SHAPES_VAL_SIZE="4", OMP_NUM_THREADS="1")
    return env


def run_train_net(env, *args, expect_ok=True):
    result = subprocess.run([sys.executable, TRAIN_NET, "--config-file", DEMO_CONFIG, *args], env=env,
                            capture_output=True, text=True, timeout=600)
    if expect_ok:
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def demo_cfg(*opts):
    cfg = get_cfg()
    sparse_detr.add_sparse_detr_config(cfg)
    cfg.merge_from_file(DEMO_CONFIG)
    cfg.merge_from_list(list(TINY) + list(opts))
    return cfg


# ---- augmentation ----------------------------------------------------------------------------------

def _record(tmp_path, boxes, size=(120, 160)):
    image = (np.random.default_rng(0).random((*size, 3)) * 255).astype(np.uint8)
    path = str(tmp_path / "image.png")
    cv2.imwrite(path, image)
    return {"file_name": path, "height": size[0], "width": size[1], "image_id": 0,
            "annotations": [{"bbox": b, "bbox_mode": 0, "category_id": 0, "iscrowd": 0} for b in boxes]}


def test_mapper_keeps_boxes_inside_images_through_every_augmentation(tmp_path):
    cfg = demo_cfg("INPUT.CROP.ENABLED", "True", "INPUT.CROP.SIZE", "(40, 80)", "INPUT.CROP_PRE_RESIZE", "(100,)",
                   "INPUT.MIN_SIZE_TRAIN", "(64, 96)", "INPUT.MAX_SIZE_TRAIN", "200", "INPUT.SIDE_MULTIPLE", "0")
    mapper = DetrDatasetMapper(cfg, is_train=True)
    record = _record(tmp_path, [[5, 5, 30, 40], [100, 60, 159, 119], [60, 10, 90, 30]])
    counts = set()
    for seed in range(40):
        np.random.seed(seed)
        out = mapper(dict(record))
        h, w = out["image"].shape[1:]
        boxes = out["instances"].gt_boxes.tensor
        assert (boxes[:, 0] >= 0).all() and (boxes[:, 1] >= 0).all()
        assert (boxes[:, 2] <= w).all() and (boxes[:, 3] <= h).all()
        assert (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all(), "empty boxes are dropped"
        assert min(h, w) in (64, 96) or max(h, w) == 200
        counts.add(len(boxes))
    assert len(counts) > 1 and max(counts) == 3, "some crops drop boxes, others keep all of them"


def test_images_get_sides_in_multiples_and_their_boxes_follow(tmp_path):
    rounding = ResizeToMultiple(32)
    assert [rounding.nearest(side) for side in (1, 15, 16, 47, 48, 100, 133, 224)] == [32, 32, 32, 32, 64, 96, 128, 224]
    assert type(rounding.get_transform(np.zeros((64, 96, 3), np.uint8))).__name__ == "NoOpTransform"
    with pytest.raises(ValueError, match="positive number of pixels, got 0"):
        ResizeToMultiple(0)

    boxes = np.array([[5, 5, 30, 40], [100, 60, 159, 119]], np.float32)
    record = _record(tmp_path, boxes.tolist())  # 120 x 160
    cfg = demo_cfg("INPUT.MIN_SIZE_TRAIN", "(100, 150)", "INPUT.MAX_SIZE_TRAIN", "1000", "INPUT.SIDE_MULTIPLE", "32",
                   "INPUT.MIN_SIZE_TEST", "100", "INPUT.MAX_SIZE_TEST", "1000")
    mapper = DetrDatasetMapper(cfg, is_train=True)
    sizes = set()
    for seed in range(12):
        np.random.seed(seed)
        out = mapper(dict(record))
        h, w = out["image"].shape[1:]
        sizes.add((h, w))
        # 100 x 133 -> 96 x 128, 150 x 200 -> 160 x 192: each side on its own, the boxes scaled with it
        scaled = boxes * np.array([w / 160, h / 120] * 2, np.float32)
        mirrored = scaled.copy()
        mirrored[:, [0, 2]] = w - scaled[:, [2, 0]]
        got = out["instances"].gt_boxes.tensor.numpy()
        assert np.allclose(got, scaled, atol=1e-3) or np.allclose(got, mirrored, atol=1e-3)
    assert sizes == {(96, 128), (160, 192)}
    # evaluation rounds its resize alike (100 x 133 -> 96 x 128); without a multiple it keeps the exact one
    assert tuple(DetrDatasetMapper(cfg, is_train=False)(dict(record))["image"].shape[1:]) == (96, 128)
    cfg.INPUT.SIDE_MULTIPLE = 0
    assert tuple(DetrDatasetMapper(cfg, is_train=False)(dict(record))["image"].shape[1:]) == (100, 133)
    with pytest.raises(ValueError, match="INPUT.SIDE_MULTIPLE is a number of pixels \\(0: off\\), got -1"):
        load_config(DEMO_CONFIG, ["INPUT.SIDE_MULTIPLE", "-1"])


def test_mapper_keeps_images_without_objects_and_skips_unreadable_ones(tmp_path, caplog):
    mapper = DetrDatasetMapper(demo_cfg(), is_train=True)
    out = mapper(_record(tmp_path, []))
    assert len(out["instances"]) == 0 and out["image"].shape[0] == 3
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    record = {"file_name": str(broken), "height": 10, "width": 10, "image_id": 1, "annotations": []}
    with caplog.at_level("WARNING"):
        assert mapper(record) is None
    assert "broken.png" in caplog.text


def test_resumable_loader_gives_the_same_batches_from_any_start():
    dataset = [{"i": i} for i in range(7)]

    def mapper(d):
        return {"i": d["i"], "draw": np.random.randint(1 << 30)}

    def batches(start, count, workers=0):
        loader = ResumableTrainLoader(dataset, mapper, batch_size=3, seed=5, num_workers=workers)
        loader.start_iter = start
        it = iter(loader)
        return [next(it) for _ in range(count)]

    full = batches(0, 6)
    assert batches(4, 2) == full[4:]
    assert batches(2, 4, workers=2) == full[2:]
    seen = [d["i"] for batch in full[:2] for d in batch] + [full[2][0]["i"]]
    assert sorted(seen) == list(range(7)), "each epoch is a permutation of the dataset"


# ---- optimizer --------------------------------------------------------------------------------------

def test_optimizer_groups_learning_rates_and_total_norm_clipping():
    cfg = demo_cfg("SOLVER.BASE_LR", "0.0002", "SOLVER.BACKBONE_MULTIPLIER", "0.1", "SOLVER.SQRT_LR_SCALING", "True",
                   "SOLVER.IMS_PER_BATCH", "4", "SOLVER.CLIP_GRADIENTS.CLIP_VALUE", "0.1")
    model = build_model(cfg)
    optimizer = build_optimizer(cfg, model)
    assert isinstance(optimizer, torch.optim.AdamW)
    lrs = {g["name"]: g["lr"] for g in optimizer.param_groups}
    scale = (4 / 16) ** 0.5
    assert lrs == pytest.approx({"backbone": 2e-5 * scale, "linear_proj": 2e-5 * scale, "other": 2e-4 * scale})
    names = {id(p): n for n, p in model.named_parameters()}
    for group in optimizer.param_groups:
        assert group["weight_decay"] == pytest.approx(1e-4)
        for p in group["params"]:
            name = names[id(p)]
            if group["name"] == "backbone":
                assert name.startswith("backbone.")
            elif group["name"] == "linear_proj":
                assert "sampling_offsets" in name or "reference_points" in name
    assert sum(len(g["params"]) for g in optimizer.param_groups) == sum(p.requires_grad for p in model.parameters())
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    optimizer.step()
    total = torch.cat([p.grad.flatten() for g in optimizer.param_groups for p in g["params"]]).double().norm()
    assert total == pytest.approx(0.1, rel=1e-4), "the norm of all gradients together is clipped to 0.1"


def schedule_origins(epochs, lr_drop_epochs, max_iter, steps):
    """Where the four schedule keys were set: the merge order of each (file i is "f<i>.yaml")."""
    orders = {"EPOCHS": epochs, "LR_DROP_EPOCHS": lr_drop_epochs, "MAX_ITER": max_iter, "STEPS": steps}
    return {f"SOLVER.{key}": KeyOrigin(order, f"f{order}.yaml") for key, order in orders.items()}


def test_the_schedule_key_set_last_decides(caplog):
    epochs = ["SOLVER.EPOCHS", "5", "SOLVER.LR_DROP_EPOCHS", "[4]", "SOLVER.IMS_PER_BATCH", "8"]
    cfg = demo_cfg(*epochs, "SOLVER.MAX_ITER", "20", "SOLVER.STEPS", "(10, 30)")
    with caplog.at_level(logging.INFO, logger="sparse_detr.solver"):
        settle_schedule(cfg, schedule_origins(2, 2, 1, 1), dataset_size=100)  # the epochs set last
    assert cfg.SOLVER.MAX_ITER == 5 * 13 and cfg.SOLVER.STEPS == (4 * 13,)
    assert caplog.messages[-1] == ("schedule: MAX_ITER 65 from SOLVER.EPOCHS 5 (f2.yaml): 100 images, 13 iterations "
                                   "an epoch; STEPS (52,) from SOLVER.LR_DROP_EPOCHS [4] (f2.yaml)")
    cfg = demo_cfg(*epochs, "SOLVER.MAX_ITER", "20", "SOLVER.STEPS", "(10, 30)")
    with caplog.at_level(logging.INFO, logger="sparse_detr.solver"):
        settle_schedule(cfg, schedule_origins(2, 2, 3, 1), dataset_size=100)  # MAX_ITER set last: 20 iterations
    assert cfg.SOLVER.MAX_ITER == 20 and cfg.SOLVER.STEPS == ()
    assert caplog.messages[-1] == ("schedule: MAX_ITER 20 from SOLVER.MAX_ITER (f3.yaml), set after SOLVER.EPOCHS 5 "
                                   "(f2.yaml), which gives 65; STEPS () from SOLVER.LR_DROP_EPOCHS [4] (f2.yaml), "
                                   "(52,) dropped: not before MAX_ITER 20")
    cfg = demo_cfg(*epochs, "SOLVER.MAX_ITER", "20", "SOLVER.STEPS", "(10, 30)")
    settle_schedule(cfg, schedule_origins(2, 1, 2, 2), dataset_size=100)  # one file sets both: its epochs
    assert cfg.SOLVER.MAX_ITER == 65 and cfg.SOLVER.STEPS == (10, 30), "STEPS set after LR_DROP_EPOCHS"
    cfg = demo_cfg("SOLVER.MAX_ITER", "20", "SOLVER.STEPS", "(10, 30)", "SOLVER.LR_DROP_EPOCHS", "[4]")
    with caplog.at_level(logging.INFO, logger="sparse_detr.solver"):
        settle_schedule(cfg, schedule_origins(3, 3, 1, 1))  # no epoch schedule (EPOCHS 0): iterations as given
    assert cfg.SOLVER.MAX_ITER == 20 and cfg.SOLVER.STEPS == (10,)
    assert caplog.messages[-1] == ("schedule: MAX_ITER 20 from SOLVER.MAX_ITER (f1.yaml); STEPS (10,) from "
                                   "SOLVER.STEPS (f1.yaml), (30,) dropped: not before MAX_ITER 20")


def test_bfloat16_autocast_training_step_is_finite():
    cfg = demo_cfg()
    model = build_model(cfg).train()
    image = torch.rand(3, 64, 80) * 255
    from detectron2.structures import Boxes, Instances

    inst = Instances((64, 80), gt_boxes=Boxes(torch.tensor([[5.0, 6.0, 40.0, 50.0]])), gt_classes=torch.tensor([1]))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = model([{"image": image, "instances": inst}, {"image": image[:, :50], "instances": inst[:0]}])
    total = sum(losses.values())
    total.backward()
    assert torch.isfinite(total)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_channels_last_backbone_trains_like_the_contiguous_one(make_batch):
    """Same state dict (values and shapes), same losses and gradients up to float32 rounding; weights channels-last."""
    torch.manual_seed(0)
    contiguous = build_model(demo_cfg()).train()
    fast = channels_last_backbone(build_model(demo_cfg()).train())
    fast.load_state_dict(contiguous.state_dict())
    convs = [p for name, p in fast.backbone.named_parameters() if p.dim() == 4]
    assert convs and all(p.is_contiguous(memory_format=torch.channels_last) for p in convs)
    assert any(not p.is_contiguous() for p in convs)  # 3x3 kernels really changed layout (1x1 ones are both)
    assert all(torch.equal(a, b) and a.shape == b.shape
               for a, b in zip(contiguous.state_dict().values(), fast.state_dict().values()))
    batch = make_batch(dict(height=96, width=128, boxes=[[10, 12, 60, 70]], classes=[1]),
                       dict(height=80, width=112, boxes=[[30, 5, 90, 50]], classes=[3]))
    losses = []
    for model in (contiguous, fast):
        torch.manual_seed(1)
        total = sum(model([dict(item) for item in batch]).values())
        total.backward()
        losses.append(total.item())
    assert losses[0] == pytest.approx(losses[1], rel=1e-4)
    for (name, a), b in zip(contiguous.named_parameters(), fast.parameters()):
        if a.grad is not None:
            torch.testing.assert_close(b.grad, a.grad, rtol=1e-3, atol=1e-4, msg=name)


class GradientIn(torch.autograd.Function):
    """The identity, whose backward hands on the gradient in the given layout."""

    @staticmethod
    def forward(ctx, x, memory_format):
        ctx.memory_format = memory_format
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad.clone(memory_format=ctx.memory_format), None


def test_gradients_come_in_the_parameters_strides():
    """A channels-last gradient of a (C, 1, 1, 1)-shaped parameter gets the parameter's strides, with its values;
    one whose layout really differs (3x3) is left to autograd, which lays it out like the parameter."""
    model = torch.nn.Module()
    model.kernel1x1 = torch.nn.Parameter(torch.randn(8, 4, 1, 1))
    model.kernel3x3 = torch.nn.Parameter(torch.randn(8, 4, 3, 3))
    model.bias = torch.nn.Parameter(torch.randn(8))
    upstream = {name: torch.randn_like(p) for name, p in model.named_parameters()}

    def backward():
        model.zero_grad(set_to_none=True)
        sum((GradientIn.apply(p, torch.channels_last if p.dim() == 4 else torch.contiguous_format) * upstream[n]).sum()
            for n, p in model.named_parameters()).backward()

    backward()
    assert model.kernel1x1.grad.stride() == (4, 1, 4, 4) != model.kernel1x1.stride(), "what DDP warns about"
    gradients_in_parameter_strides(model)
    backward()
    for name, p in model.named_parameters():
        assert p.grad.stride() == p.stride(), name
        torch.testing.assert_close(p.grad, upstream[name], rtol=0, atol=0)


def test_trainer_builds_channels_last_models_on_the_cpu():
    sys.path.insert(0, PROJECT)
    import train_net

    model = train_net.Trainer.build_model(demo_cfg())
    convs = [p for p in model.backbone.parameters() if p.dim() == 4]
    assert convs and all(p.is_contiguous(memory_format=torch.channels_last) for p in convs)


# ---- train_net.py -----------------------------------------------------------------------------------

def test_train_then_eval_only(shapes_env, tmp_path):
    out = str(tmp_path / "run")
    run_train_net(shapes_env, *TINY, "SOLVER.MAX_ITER", "4", "OUTPUT_DIR", out)
    assert os.path.isfile(os.path.join(out, "model_final.pth"))
    metrics = [json.loads(line) for line in open(os.path.join(out, "metrics.json"))]
    last = [m for m in metrics if "total_loss" in m][-1]
    assert last["iteration"] == 3 and "loss_mask_prediction" in last
    assert {"dam_recall", "dam_recall_level0", "dam_recall_level3"} <= set(last)
    result = run_train_net(shapes_env, "--eval-only", *TINY, "MODEL.WEIGHTS", os.path.join(out, "model_final.pth"),
                           "OUTPUT_DIR", str(tmp_path / "eval"))
    log = result.stdout + result.stderr
    assert "copypaste: AP,AP50" in log
    if platform.libc_ver()[0] == "glibc":  # an evaluation on the CPU keeps freed memory for reuse
        assert "malloc keeps freed memory for reuse" in log
    assert "malloc" not in (tmp_path / "run" / "log.txt").read_text()  # the training before it did not
    # the DAM recall evaluator's task follows COCO's: names, then values, all shares in [0, 1]
    lines = [line.split("copypaste: ", 1)[1] for line in log.splitlines() if "copypaste: " in line]
    names = lines[lines.index("Task: dam_recall") + 1].split(",")
    values = [float(v) for v in lines[lines.index("Task: dam_recall") + 2].split(",")]
    assert names == ["dam_recall"] + [f"dam_recall_level{i}" for i in range(4)]
    assert all(0.0 <= v <= 1.0 for v in values)
    assert os.path.isfile(tmp_path / "eval" / "inference" / "coco_instances_results.json")


def test_resume_ends_with_the_weights_of_an_uninterrupted_run(shapes_env, tmp_path):
    common = [*TINY, "SOLVER.CHECKPOINT_PERIOD", "3", "SOLVER.STEPS", "(4,)", "MODEL.SPARSE_DETR.DROPOUT", "0.1"]
    straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
    run_train_net(shapes_env, *common, "SOLVER.MAX_ITER", "6", "OUTPUT_DIR", straight)
    # stop after 3 iterations (as if killed after the checkpoint), then resume to 6
    run_train_net(shapes_env, *common, "SOLVER.MAX_ITER", "3", "OUTPUT_DIR", resumed)
    os.remove(os.path.join(resumed, "model_final.pth"))
    with open(os.path.join(resumed, "last_checkpoint"), "w") as f:
        f.write("model_0000002.pth")
    result = run_train_net(shapes_env, "--resume", *common, "SOLVER.MAX_ITER", "6", "OUTPUT_DIR", resumed)
    # the first part's 3 iterations dropped the step at 4 (beyond its end): both differ from the config.yaml it wrote
    assert (f"--resume with another schedule or data order than the run that wrote {resumed}/config.yaml: "
            f"SOLVER.MAX_ITER 3 -> 6, SOLVER.STEPS [] -> [4]; the run goes on from its checkpoint with the new "
            f"values, unlike an uninterrupted run") in result.stdout
    a = torch.load(os.path.join(straight, "model_final.pth"), weights_only=False)
    b = torch.load(os.path.join(resumed, "model_final.pth"), weights_only=False)
    assert a["iteration"] == b["iteration"] == 5
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key


TWO_PROCESS_SCRIPT = r"""
import os, sys
sys.path.insert(0, {project!r})
import train_net
import torch
from detectron2.engine import launch
from detectron2.utils import comm

def main(args, out):
    cfg = train_net.setup(args)
    trainer = train_net.Trainer(cfg)
    trainer.resume_or_load(resume=False)
    model = trainer.model.module if hasattr(trainer.model, "module") else trainer.model
    torch.save(model.state_dict(), os.path.join(out, f"rank{{comm.get_rank()}}_initial.pth"))
    trainer.train()
    torch.save(model.state_dict(), os.path.join(out, f"rank{{comm.get_rank()}}.pth"))

if __name__ == "__main__":
    args = train_net.default_argument_parser().parse_args(sys.argv[2:])
    launch(main, 2, dist_url="auto", args=(args, sys.argv[1]))
"""


def test_two_processes_train_identical_weights_without_ddp_warnings(shapes_env, tmp_path):
    """Also: DDP warns neither of a search for unused parameters that finds none, nor of gradient strides that
    differ from its buckets' (which the channels-last backbone's maps caused, with two threads a process), nor
    of a deprecated option; the log names the threads of each process."""
    script = tmp_path / "two_process.py"
    script.write_text(TWO_PROCESS_SCRIPT.format(project=PROJECT))
    out = tmp_path / "ddp"
    result = subprocess.run([sys.executable, str(script), str(tmp_path), "--config-file", DEMO_CONFIG, *TINY,
                             "SOLVER.MAX_ITER", "3", "SOLVER.IMS_PER_BATCH", "4", "OUTPUT_DIR", str(out)],
                            env=dict(shapes_env, OMP_NUM_THREADS="2"), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "Warning" not in result.stderr, result.stderr[-3000:]
    log = (out / "log.txt").read_text()
    assert "2 torch thread(s) in each of the 2 processes on this machine (OMP_NUM_THREADS=2)" in log
    assert "malloc" not in log  # a training leaves malloc as it is (sparse_detr.allocator: evaluation only)
    rank0, rank1 = torch.load(tmp_path / "rank0.pth"), torch.load(tmp_path / "rank1.pth")
    initial = torch.load(tmp_path / "rank0_initial.pth")
    for key, value in rank0.items():
        assert torch.equal(value, rank1[key]), key
    assert sum(not torch.equal(v, initial[k]) for k, v in rank0.items()) > len(rank0) // 2, "training changed weights"


def test_max_iter_of_a_config_wins_over_the_epochs_of_its_base(shapes_env, tmp_path):
    """The value set last decides: a user's yaml with ``_BASE_: demo.yaml`` and its own MAX_ITER trains that many
    iterations, not the 4 epochs of demo.yaml (24 here)."""
    config = tmp_path / "my.yaml"
    config.write_text(f'_BASE_: "{DEMO_CONFIG}"\nSOLVER:\n  MAX_ITER: 3\n')
    out = tmp_path / "run"
    opts = [item for key, value in zip(TINY[0::2], TINY[1::2]) if key != "SOLVER.EPOCHS" for item in (key, value)]
    result = subprocess.run([sys.executable, TRAIN_NET, "--config-file", str(config), *opts, "OUTPUT_DIR", str(out)],
                            env=shapes_env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    records = [json.loads(line) for line in open(out / "metrics.json")]
    assert [r["iteration"] for r in records if "total_loss" in r][-1] == 2
    assert ("schedule: MAX_ITER 3 from SOLVER.MAX_ITER (my.yaml), set after SOLVER.EPOCHS 4 (demo.yaml), which "
            "gives 24; STEPS () from SOLVER.LR_DROP_EPOCHS [3.4] (demo.yaml), (20,) dropped: not before MAX_ITER 3"
            in (out / "log.txt").read_text())
    assert not (out / LOCK_NAME).exists(), "the lock goes with the training"


def test_a_second_training_into_an_output_dir_is_refused_with_one_line(shapes_env, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    with OutputDirLock(str(out)):  # held by this process, as a training would hold it
        holder = json.loads((out / LOCK_NAME).read_text())
        result = run_train_net(shapes_env, *TINY, "SOLVER.MAX_ITER", "1", "OUTPUT_DIR", str(out), expect_ok=False)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: OUTPUT_DIR {out} is in use by another training (pid {os.getpid()} on {socket.gethostname()}, "
        f"started {holder['started']}, command: {holder['command']}; lock file {out / LOCK_NAME}): give this one "
        f"another OUTPUT_DIR, or end that one first"]
    assert [p.name for p in out.iterdir()] == [], "refused before writing anything"


FULL_DISK_SCRIPT = r"""
import sys
sys.path[:0] = [{project!r}, {tests!r}]
import train_net
import torch
from conftest import FullDisk

real_save, saves = torch.save, []


def save(obj, f, *args, **kwargs):  # the second checkpoint meets a full disk after 1000 bytes
    saves.append(f)
    return real_save(obj, FullDisk(f, 1000) if len(saves) == 2 else f, *args, **kwargs)


torch.save = save
train_net.invoke_main()
"""


def test_a_full_disk_ends_training_with_one_line_naming_the_last_good_checkpoint(shapes_env, tmp_path):
    script = tmp_path / "full_disk.py"
    script.write_text(FULL_DISK_SCRIPT.format(project=PROJECT, tests=os.path.dirname(os.path.abspath(__file__))))
    out = tmp_path / "run"
    result = subprocess.run([sys.executable, str(script), "--config-file", DEMO_CONFIG, *TINY, "SOLVER.MAX_ITER", "6",
                             "SOLVER.CHECKPOINT_PERIOD", "2", "OUTPUT_DIR", str(out)], env=shapes_env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 1, result.stdout[-3000:] + result.stderr[-3000:]
    assert result.stderr.strip().splitlines() == [
        f"error: could not write {out}/model_0000003.pth: No space left on device; the last good checkpoint is "
        f"{out}/model_0000001.pth (--resume continues from it)"]
    assert "Traceback" not in result.stdout, "nor a traceback in the log"
    assert (out / "last_checkpoint").read_text() == "model_0000001.pth"
    assert torch.load(out / "model_0000001.pth", weights_only=False)["iteration"] == 1
    assert sorted(p.name for p in out.glob("*.pth")) == ["model_0000001.pth"] and not list(out.glob(".tmp-*"))


# ---- errors -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("args, message", [
    (["MODEL.SPARSE_DETR.NO_SUCH_KEY", "1"], "Non-existent key: MODEL.SPARSE_DETR.NO_SUCH_KEY"),
    (["MODEL.WEIGHTS", "/nonexistent/weights.pth"], "MODEL.WEIGHTS file '/nonexistent/weights.pth' does not exist"),
    (["MODEL.SPARSE_DETR.NUM_CLASSES", "7"], "has 5 classes but MODEL.SPARSE_DETR.NUM_CLASSES is 7"),
    (["DATASETS.TRAIN", "('coco_2017_train',)"], "coco/annotations/instances_{train,val}2017.json"),
])
def test_clear_errors(shapes_env, tmp_path, args, message):
    env = dict(shapes_env, DETECTRON2_DATASETS=str(tmp_path / "no_datasets"))
    result = run_train_net(env, *TINY, "SOLVER.MAX_ITER", "1", "OUTPUT_DIR", str(tmp_path / "out"), *args,
                           expect_ok=False)
    assert result.returncode != 0
    assert message in result.stderr, result.stderr[-2000:]
    assert "Traceback" not in result.stderr, "a clear one-line error, not a stack trace"


def test_unknown_key_in_a_config_file(shapes_env, tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text(f"_BASE_: {DEMO_CONFIG}\nMODEL:\n  SPARSE_DETR:\n    RHOO: 0.2\n")
    result = subprocess.run([sys.executable, TRAIN_NET, "--config-file", str(config)], env=shapes_env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "Non-existent config key: MODEL.SPARSE_DETR.RHOO" in result.stderr
    assert "Traceback" not in result.stderr


def test_missing_config_file(shapes_env):
    result = subprocess.run([sys.executable, TRAIN_NET, "--config-file", "/nonexistent.yaml"], env=shapes_env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "config file '/nonexistent.yaml' does not exist" in result.stderr
    assert "Traceback" not in result.stderr


# ---- an own COCO-json dataset from a copied config, as a new user trains one ----------------------------

OWN_CONFIG = """_BASE_: "demo.yaml"
MODEL:
  SPARSE_DETR:
    NUM_CLASSES: 2
DATASETS:
  COCO_JSON: [["mine_train", "train.json", "images"], ["mine_val", "val.json", "images"]]
  TRAIN: ("mine_train",)
  TEST: ("mine_val",)
"""


def write_coco_dataset(root, split, names):
    """A COCO json of 80x64 images with a square (class 1) and a disc (class 2); a truncated JPEG where asked."""
    images, annotations = [], []
    rng = np.random.default_rng(len(names))
    for image_id, name in enumerate(names, 1):
        path = root / "images" / name
        picture = (rng.random((64, 80, 3)) * 60).astype(np.uint8)
        cv2.rectangle(picture, (8, 10), (30, 32), (250, 40, 40), -1)
        cv2.circle(picture, (56, 40), 12, (40, 250, 40), -1)
        cv2.imwrite(str(path), picture)
        if name.startswith("truncated"):
            path.write_bytes(path.read_bytes()[:400])
        images.append({"id": image_id, "file_name": name, "height": 64, "width": 80})
        annotations += [{"id": 2 * image_id, "image_id": image_id, "category_id": 1, "bbox": [8, 10, 23, 23],
                         "area": 529, "iscrowd": 0},
                        {"id": 2 * image_id + 1, "image_id": image_id, "category_id": 2, "bbox": [44, 28, 25, 25],
                         "area": 625, "iscrowd": 0}]
    categories = [{"id": 1, "name": "square"}, {"id": 2, "name": "disc"}]
    (root / f"{split}.json").write_text(json.dumps({"images": images, "annotations": annotations,
                                                    "categories": categories}))


@pytest.fixture(scope="module")
def own_dataset_run(tmp_path_factory):
    """train_net.py --config-file my.yaml, run from the dataset's folder: a config naming the demo config as its
    _BASE_ (not next to it), COCO-json datasets from DATASETS.COCO_JSON, the demo's 6-epoch schedule with
    SOLVER.MAX_ITER 2 on the command line, and an unreadable (truncated) image in each split."""
    root = tmp_path_factory.mktemp("mine")
    (root / "images").mkdir()
    write_coco_dataset(root, "train", ["a.png", "b.png", "c.png", "truncated_t.jpg"])
    write_coco_dataset(root, "val", ["d.png", "e.png", "truncated_v.jpg"])
    (root / "my.yaml").write_text(OWN_CONFIG)
    opts = [item for key, value in zip(TINY[0::2], TINY[1::2]) if key != "SOLVER.EPOCHS" for item in (key, value)]
    result = subprocess.run([sys.executable, TRAIN_NET, "--config-file", "my.yaml", *opts, "SOLVER.MAX_ITER", "2",
                             "DATALOADER.NUM_WORKERS", "1", "OUTPUT_DIR", "out"], cwd=root, capture_output=True,
                            text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return root / "out", result


def test_own_coco_dataset_trains_and_evaluates_from_the_config_alone(own_dataset_run):
    out, result = own_dataset_run
    assert (out / "model_final.pth").is_file()
    assert "copypaste: AP,AP50" in result.stdout
    assert (out / "inference" / "coco_instances_results.json").is_file()


def test_max_iter_on_the_command_line_wins_over_epochs_and_the_schedule_is_logged(own_dataset_run):
    out, _ = own_dataset_run
    records = [json.loads(line) for line in open(out / "metrics.json")]
    assert [r["iteration"] for r in records if "total_loss" in r][-1] == 1
    log = (out / "log.txt").read_text()
    assert ("schedule: MAX_ITER 2 from SOLVER.MAX_ITER (the command line), set after SOLVER.EPOCHS 4 (demo.yaml), "
            "which gives 8; STEPS () from SOLVER.LR_DROP_EPOCHS [3.4] (demo.yaml), (6,) dropped: not before "
            "MAX_ITER 2") in log
    assert "SOLVER.STEPS contains values larger than SOLVER.MAX_ITER" not in log


def test_unreadable_images_are_skipped_and_counted_in_training_and_evaluation(own_dataset_run):
    log = (own_dataset_run[0] / "log.txt").read_text()
    assert "1 training image(s) could not be read and were skipped" in log and "truncated_t.jpg" in log
    assert "mine_val: 1 of its 3 images could not be read and were skipped" in log and "truncated_v.jpg" in log


def test_tensorboard_event_files_are_written(own_dataset_run):
    assert list(own_dataset_run[0].glob("events.out.tfevents.*"))


def test_no_known_harmless_warning_is_shown(own_dataset_run):
    out, result = own_dataset_run
    assert result.stderr.strip() == "", result.stderr[-3000:]
    assert "not built correctly" not in (out / "log.txt").read_text()


def test_make_demo_trains_in_two_processes_where_the_machine_has_two_cores():
    def train_command(*variables):
        run = subprocess.run(["make", "-n", "demo", *variables], cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert run.returncode == 0, run.stderr
        return next(line for line in run.stdout.splitlines() if "train_net.py" in line)

    processes = 2 if len(os.sched_getaffinity(0)) >= 2 else 1
    assert f"train_net.py --num-gpus {processes} --resume --config-file {os.path.relpath(DEMO_CONFIG, ROOT)}" in (
        train_command())
    assert "OMP_NUM_THREADS" not in train_command(), "each process takes its share of the cores (train_net.py)"
    assert "--num-gpus 1 " in train_command("DEMO_PROCESSES=1")
