"""sparse_detr.output_dir: the OUTPUT_DIR lock, the resume comparison with the previous config, the last checkpoint."""
import json
import logging
import os
import socket
import sys

import pytest
import yaml

from sparse_detr.output_dir import (LOCK_NAME, OutputDirInUse, OutputDirLock, changed_schedule,
                                    last_good_checkpoint)
from conftest import build_config


def test_a_held_lock_refuses_a_second_holder_and_names_the_first(tmp_path):
    with OutputDirLock(str(tmp_path)):
        holder = json.loads((tmp_path / LOCK_NAME).read_text())
        assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
        assert holder["started"] and holder["command"].startswith(os.path.basename(sys.executable))
        with pytest.raises(OutputDirInUse) as info:
            OutputDirLock(str(tmp_path)).acquire()  # another open file: flock refuses it as it would another process
        message = str(info.value)
        assert message.startswith(f"OUTPUT_DIR {tmp_path} is in use by another training (pid {os.getpid()} on "
                                  f"{socket.gethostname()}, started {holder['started']}, command: ")
        assert message.endswith(f"lock file {tmp_path / LOCK_NAME}): give this one another OUTPUT_DIR, or end that "
                                f"one first")
    assert not (tmp_path / LOCK_NAME).exists(), "released on exit"
    with OutputDirLock(str(tmp_path)):  # and free again
        pass


def test_a_lock_left_by_a_killed_run_is_taken_over_with_a_warning(tmp_path, caplog):
    dead = {"host": "elsewhere", "pid": 4321, "started": "2025-01-02 03:04:05", "command": "python train_net.py"}
    (tmp_path / LOCK_NAME).write_text(json.dumps(dead))  # the file, but no process holds its flock
    with caplog.at_level(logging.WARNING, logger="sparse_detr.output_dir"):
        with OutputDirLock(str(tmp_path)):
            assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
    assert (f"taking over the lock {tmp_path / LOCK_NAME} left by a training that has ended (pid 4321 on elsewhere, "
            f"started 2025-01-02 03:04:05, command: python train_net.py)") in caplog.text
    assert not (tmp_path / LOCK_NAME).exists()


def test_resume_compares_the_schedule_and_data_order_keys_with_the_previous_config(tmp_path):
    cfg = build_config("demo.yaml")
    cfg.SOLVER.MAX_ITER, cfg.SOLVER.STEPS = 10, (8,)
    previous = tmp_path / "config.yaml"
    previous.write_text(cfg.dump())
    assert changed_schedule(str(previous), cfg) == []
    changed = cfg.clone()
    changed.merge_from_list(["SOLVER.STEPS", "(6,)", "SOLVER.IMS_PER_BATCH", "4", "SEED", "7", "DATASETS.TRAIN",
                             "('sparse_detr_shapes_val',)", "MODEL.SPARSE_DETR.DROPOUT", "0.3"])
    assert changed_schedule(str(previous), changed) == [
        "SOLVER.IMS_PER_BATCH 8 -> 4", "SOLVER.STEPS [8] -> [6]", "DATASETS.TRAIN ['sparse_detr_shapes_train'] -> "
        "['sparse_detr_shapes_val']", "SEED 42 -> 7"], "keys that change neither (the dropout) are not named"
    assert changed_schedule(str(tmp_path / "missing.yaml"), changed) == []
    # a config of an older version, without some of the keys: those are not compared
    older = yaml.safe_load(previous.read_text())
    del older["SOLVER"]["EPOCHS"], older["SEED"]
    previous.write_text(yaml.safe_dump(older))
    assert changed_schedule(str(previous), changed) == [
        "SOLVER.IMS_PER_BATCH 8 -> 4", "SOLVER.STEPS [8] -> [6]", "DATASETS.TRAIN ['sparse_detr_shapes_train'] -> "
        "['sparse_detr_shapes_val']"]


def test_last_good_checkpoint_is_the_one_last_checkpoint_names_when_it_is_there(tmp_path):
    assert last_good_checkpoint(str(tmp_path)) is None
    (tmp_path / "last_checkpoint").write_text("model_0000009.pth")
    assert last_good_checkpoint(str(tmp_path)) is None, "named, but not there"
    (tmp_path / "model_0000009.pth").write_bytes(b"")
    assert last_good_checkpoint(str(tmp_path)) == str(tmp_path / "model_0000009.pth")
