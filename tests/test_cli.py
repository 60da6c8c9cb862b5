"""sparse_detr.cli and the tools' user errors: one line ``error: ...`` on stderr, exit status 2, no traceback.

Each tool runs once as a subprocess (the exit status, and a stderr without traceback or warnings: import-time
warnings are silenced too); the other cases call the tools' entry points in the test process, much cheaper.
"""
import os
import shutil
import subprocess
import sys

import cv2
import numpy as np
import pytest
import torch

from conftest import CONFIG_DIR, REPO_ROOT
from sparse_detr.cli import key_origins, load_config
from sparse_detr.solver import SCHEDULE_KEYS, KeyOrigin

PROJECT = REPO_ROOT / "projects" / "SparseDETR"
sys.path.insert(0, str(PROJECT))

import convert_official_weights  # noqa: E402
import demo  # noqa: E402
import train_net  # noqa: E402

DEMO_CONFIG = str(CONFIG_DIR / "demo.yaml")
TINY = ["MODEL.SPARSE_DETR.HIDDEN_DIM", "32", "MODEL.SPARSE_DETR.NHEADS", "2", "MODEL.SPARSE_DETR.ENC_LAYERS", "1",
        "MODEL.SPARSE_DETR.DEC_LAYERS", "1", "MODEL.SPARSE_DETR.NUM_QUERIES", "10", "INPUT.MIN_SIZE_TEST", "64",
        "INPUT.MAX_SIZE_TEST", "96"]


def write_image(path, height, width):
    cv2.imwrite(str(path), (np.random.default_rng(0).random((height, width, 3)) * 255).astype(np.uint8))
    return str(path)


def one_error_line(stderr: str) -> str:
    """The error line, last on stderr, checking that no traceback or warning came before it (progress bars may)."""
    lines = stderr.strip().splitlines()
    assert lines and lines[-1].startswith("error: "), stderr[-3000:]
    assert "Traceback" not in stderr and "Warning" not in stderr, stderr[-3000:]
    return lines[-1]


# ---- each tool as a subprocess ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def thin_image(tmp_path_factory):
    return write_image(tmp_path_factory.mktemp("thin") / "thin.png", 3, 5000)


@pytest.mark.parametrize("tool, args, message", [
    ("train_net.py", ["--config-file", DEMO_CONFIG, "--num-gpus", "2", "SOLVER.IMS_PER_BATCH", "5"],
     "SOLVER.IMS_PER_BATCH 5 is not divisible by the 2 processes"),
    ("demo.py", ["--config-file", DEMO_CONFIG, "--input", "{thin}", "--output", "{tmp}/out/", "--opts", *TINY],
     "thin.png: the 3x5000 image has a zero side once resized"),
    ("benchmark.py", ["--config-file", "demo.yaml", "--image-size", "0", "0"],
     "--image-size takes a positive height and width, got 0 0"),
    ("convert_official_weights.py", ["{thin}", "{tmp}"], "is a folder: give the file to write"),
], ids=["train_net", "demo", "benchmark", "converter"])
def test_each_tool_ends_a_user_error_with_one_line_and_status_2(tool, args, message, thin_image, tmp_path):
    args = [a.format(thin=thin_image, tmp=tmp_path) for a in args]
    # a small generated dataset, should a tool get past its error
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SPARSE_DETR_DATASETS": str(tmp_path / "shapes"),
           "SPARSE_DETR_SHAPES_TRAIN_SIZE": "4", "SPARSE_DETR_SHAPES_VAL_SIZE": "2"}
    run = subprocess.run([sys.executable, str(PROJECT / tool), *args], cwd=REPO_ROOT, capture_output=True, text=True,
                         env=env, timeout=300)
    assert run.returncode == 2, run.stderr[-3000:]
    assert message in one_error_line(run.stderr)


# ---- configs --------------------------------------------------------------------------------------------


def test_copied_config_finds_its_base_among_the_projects_configs(tmp_path):
    mine = tmp_path / "my" / "demo.yaml"
    mine.parent.mkdir()
    shutil.copy(DEMO_CONFIG, mine)  # its _BASE_ "Base-SparseDETR.yaml" is not next to it any more
    cfg = load_config(str(mine))
    assert cfg.MODEL.SPARSE_DETR.NUM_CLASSES == 5 and cfg.SOLVER.CLIP_GRADIENTS.CLIP_TYPE == "full_model"
    (tmp_path / "orphan.yaml").write_text('_BASE_: "my-base.yaml"\n')
    with pytest.raises(FileNotFoundError, match=r"orphan\.yaml: the _BASE_ file .*my-base\.yaml' does not exist"):
        load_config(str(tmp_path / "orphan.yaml"))


def test_a_bare_config_name_is_found_among_the_projects_configs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no demo.yaml here
    cfg = load_config("demo.yaml")
    assert cfg.MODEL.SPARSE_DETR.NUM_CLASSES == 5 and cfg.TEST.CONFIDENCE_THRESHOLD == 0.35
    with pytest.raises(FileNotFoundError, match="config file 'nothing.yaml' does not exist \\(nor is it one of the "
                                                "project's configs"):
        load_config("nothing.yaml")
    with pytest.raises(FileNotFoundError, match="config file 'sub/demo.yaml' does not exist"):
        load_config("sub/demo.yaml")  # a path is taken as given


def test_key_origins_follow_the_merge_order_of_the_files_and_the_command_line(tmp_path):
    (tmp_path / "base.yaml").write_text(f'_BASE_: "{DEMO_CONFIG}"\nSOLVER:\n  MAX_ITER: 100\n  STEPS: (50,)\n')
    (tmp_path / "mine.yaml").write_text('_BASE_: "base.yaml"\nSOLVER:\n  EPOCHS: 3\n')
    origins = key_origins(str(tmp_path / "mine.yaml"), ["SOLVER.STEPS", "(9,)", "SOLVER.MAX_ITER", "12"],
                          SCHEDULE_KEYS + ("SOLVER.GAMMA",))
    # merged: Base-SparseDETR.yaml (1), demo.yaml (2), base.yaml (3), mine.yaml (4), then the command line
    assert origins == {"SOLVER.LR_DROP_EPOCHS": KeyOrigin(2, "demo.yaml"), "SOLVER.EPOCHS": KeyOrigin(4, "mine.yaml"),
                       "SOLVER.STEPS": KeyOrigin(5, "the command line"),
                       "SOLVER.MAX_ITER": KeyOrigin(6, "the command line"), "SOLVER.GAMMA": KeyOrigin(0, "the defaults")}


def test_broken_yaml_names_the_file_and_the_line(tmp_path):
    broken = tmp_path / "broken.yaml"
    broken.write_text(f'_BASE_: "{DEMO_CONFIG}"\nMODEL:\n  SPARSE_DETR:\n    RHO: 0.2\n   NUM_CLASSES: 3\n')
    with pytest.raises(ValueError, match=r"broken\.yaml, line 5: not valid YAML"):
        load_config(str(broken))
    (tmp_path / "empty.yaml").write_text("")
    with pytest.raises(ValueError, match="is not a YAML mapping of config keys"):
        load_config(str(tmp_path / "empty.yaml"))


def test_rho_out_of_range_names_the_range_and_integers_are_accepted_for_floats(tmp_path):
    with pytest.raises(ValueError, match=r"RHO is a keeping ratio in \[0, 1\], got -0.1"):
        load_config(DEMO_CONFIG, ["MODEL.SPARSE_DETR.RHO", "-0.1"])
    for value in ("0", "1"):
        cfg = load_config(DEMO_CONFIG, ["MODEL.SPARSE_DETR.RHO", value, "SOLVER.BASE_LR", "1"])
        assert cfg.MODEL.SPARSE_DETR.RHO == float(value) and type(cfg.MODEL.SPARSE_DETR.RHO) is float
        assert type(cfg.SOLVER.BASE_LR) is float
    in_a_file = tmp_path / "rho1.yaml"
    in_a_file.write_text(f'_BASE_: "{DEMO_CONFIG}"\nMODEL:\n  SPARSE_DETR:\n    RHO: 1\n')
    assert load_config(str(in_a_file)).MODEL.SPARSE_DETR.RHO == 1.0


@pytest.mark.parametrize("opts, message", [
    (["MODEL.SPARSE_DETR.NUM_CLASSES", "0"], "MODEL.SPARSE_DETR.NUM_CLASSES must be at least 1, got 0"),
    (["SOLVER.IMS_PER_BATCH", "0"], "SOLVER.IMS_PER_BATCH must be at least 1, got 0"),
    (["MODEL.NO_SUCH_KEY", "1"], "command line: Non-existent key: MODEL.NO_SUCH_KEY"),
    (["MODEL.SPARSE_DETR.RHO"], "command line: Override list has odd length"),
    (["DATASETS.COCO_JSON", "[('mine', 'a.json')]"], "DATASETS.COCO_JSON takes [name, json file, image folder]"),
])
def test_values_that_cannot_work_are_refused_by_name(opts, message):
    with pytest.raises(ValueError) as info:
        load_config(DEMO_CONFIG, opts)
    assert message in str(info.value)


# ---- train_net.py in the test process ---------------------------------------------------------------------


def run_train_net(monkeypatch, capsys, *args) -> str:
    monkeypatch.setattr(sys, "argv", ["train_net.py", *args])
    with pytest.raises(SystemExit) as info:
        train_net.invoke_main()
    assert info.value.code == 2
    return one_error_line(capsys.readouterr().err)


def test_train_net_names_an_output_dir_it_cannot_create(monkeypatch, capsys):
    line = run_train_net(monkeypatch, capsys, "--config-file", DEMO_CONFIG, "OUTPUT_DIR", "/proc/nope")
    assert line == "error: OUTPUT_DIR '/proc/nope' cannot be created: No such file or directory"


def test_train_net_names_a_broken_config(monkeypatch, capsys, tmp_path):
    broken = tmp_path / "broken.yaml"
    broken.write_text("SOLVER:\n  IMS_PER_BATCH: [2\n")
    assert run_train_net(monkeypatch, capsys, "--config-file", str(broken)).startswith(f"error: {broken}, line 3")


# ---- demo.py and the converter in the test process -----------------------------------------------------------


@pytest.fixture(scope="module")
def weights_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("weights")
    (folder / "notes.pth").write_text("these are not weights\n")
    torch.save({"model": {"w": torch.zeros(1000)}}, folder / "whole.pth")
    (folder / "truncated.pth").write_bytes((folder / "whole.pth").read_bytes()[:1500])
    return folder


@pytest.mark.parametrize("case, message", [
    ("missing-config", "config file '/nonexistent.yaml' does not exist"),
    ("unknown-key", "Non-existent key: MODEL.NO_SUCH_KEY"),
    ("odd-list", "Override list has odd length"),
    ("missing-weights", "MODEL.WEIGHTS file '/nonexistent.pth' does not exist"),
    ("text-weights", "notes.pth is not a readable PyTorch checkpoint"),
    ("truncated-weights", "truncated.pth is not a readable PyTorch checkpoint"),
])
def test_demo_user_errors(case, message, weights_files, tmp_path, capsys):
    image = write_image(tmp_path / "a.png", 40, 50)
    config, opts = DEMO_CONFIG, list(TINY)
    if case == "missing-config":
        config = "/nonexistent.yaml"
    elif case == "unknown-key":
        opts += ["MODEL.NO_SUCH_KEY", "1"]
    elif case == "odd-list":
        opts += ["MODEL.WEIGHTS"]
    else:
        name = {"missing-weights": "/nonexistent.pth", "text-weights": str(weights_files / "notes.pth"),
                "truncated-weights": str(weights_files / "truncated.pth")}[case]
        opts += ["MODEL.WEIGHTS", name]
    assert demo.main(["--config-file", config, "--input", image, "--output", str(tmp_path / "out/"),
                      "--opts", *opts]) == 2
    assert message in one_error_line(capsys.readouterr().err)


def test_converter_on_a_truncated_checkpoint(weights_files, tmp_path, capsys):
    assert convert_official_weights.main([str(weights_files / "truncated.pth"), str(tmp_path / "out.pth")]) == 2
    assert "truncated.pth is not a PyTorch checkpoint" in one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "out.pth").exists()
