"""The GPU check (projects/SparseDETR/tools/gpu_check.py): its dry run on the CPU, the goals it reads off the op
benchmark, the op benchmark's byte count, and the detectron2 wheel that scripts/fetch_device_wheels.py packs."""
import json
import os
import subprocess
import sys
import zipfile

import pytest

from conftest import REPO_ROOT, load_script

TOOLS = REPO_ROOT / "projects" / "SparseDETR" / "tools"


@pytest.fixture(scope="module")
def gpu_check():
    return load_script(TOOLS / "gpu_check.py", "gpu_check")


def test_dry_run_on_the_cpu(tmp_path):
    out = tmp_path / "out"
    run = subprocess.run([sys.executable, str(TOOLS / "gpu_check.py"), str(out), "--device", "cpu"], cwd=REPO_ROOT,
                         env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == ["log.txt", "results.json", "summary.md"]
    results = json.loads((out / "results.json").read_text())
    assert [step["name"] for step in results["steps"]] == ["build", "CUDA tests", "memcheck", "op benchmark",
                                                           "model speed", "training"]
    assert all(step["ok"] for step in results["steps"])
    assert results["cuda_tests"].get("skipped", 0) > 0  # no GPU here: the CUDA tests were collected, and skipped
    assert {row["case"] for row in results["op_benchmark"]["rows"]} == {"decoder"}
    assert set(results["model_speed"]) == {"fp32", "bf16"}
    assert set(results["model_speed"]["bf16"]) == {"deformable_detr_r50.yaml", "deformable_detr_r50_bbr_two_stage.yaml",
                                                   "sparse_detr_r50_rho0.1.yaml"}
    assert len(results["training"]["total_loss"]) >= 1
    assert "**PASS**: 6 of 6 steps" in (out / "summary.md").read_text()


def test_goals_read_off_the_op_benchmark(gpu_check):
    def row(dtype, compiled_fwd):
        return {"case": "encoder_rho1.0", "batch": 2, "dtype": dtype, "forward_bytes": 1.5e9,
                "forward_ms": {"pytorch": 4.0, "compiled": compiled_fwd},
                "forward_backward_ms": {"pytorch": 30.0, "compiled": 10.0}}

    goals = gpu_check.op_goals({"copy_gbps": 3000.0, "rows": [row("float32", 1.0), row("bfloat16", 0.5)]})
    assert goals == ["rho=1.0 fp32 forward 1500 GB/s = 50% of copy (goal >= 50%)",
                     "bf16 forward 2.00x fp32 (goal >= 1.5x)",
                     "compiled/PyTorch fwd 4.00-8.00x, f+b 3.00-3.00x"]


def test_op_benchmark_counts_each_input_once():
    benchmark = load_script(TOOLS / "benchmark_ms_deform_attn.py", "benchmark_ms_deform_attn")
    forward, both = benchmark.bytes_to_move(batch=1, num_queries=10, dtype=benchmark.DTYPES["bfloat16"])
    values = 19947 * 8 * 32 * 2
    outputs = 10 * 8 * 32 * 2
    locations_and_weights = 10 * 8 * 4 * 4 * 3 * 4  # (x, y, weight) in float32
    assert forward == values + locations_and_weights + outputs
    assert both == forward + outputs + 2 * values + 2 * locations_and_weights


def test_detectron2_wheel_keeps_the_python_package_only(tmp_path):
    sys.path.insert(0, str(REPO_ROOT / "scripts"))
    try:
        fetch = load_script(REPO_ROOT / "scripts" / "fetch_device_wheels.py", "fetch_device_wheels")
    finally:
        sys.path.remove(str(REPO_ROOT / "scripts"))
    source = tmp_path / "sal_detectron2-0.7.2-cp310-cp310-linux_x86_64.whl"
    with zipfile.ZipFile(source, "w") as archive:
        archive.writestr("detectron2/__init__.py", "__version__ = '0.7.2'\n")
        archive.writestr("detectron2/config/__init__.py", "")
        archive.writestr("detectron2/_C.cpython-310-x86_64-linux-gnu.so", b"\x7fELF")
        archive.writestr("tools/train_net.py", "")
    wheel = fetch.pure_detectron2_wheel(source, tmp_path)
    assert wheel.name == "detectron2-0.7.2-py3-none-any.whl"
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        record = archive.read("detectron2-0.7.2.dist-info/RECORD").decode()
    assert names == {"detectron2/__init__.py", "detectron2/config/__init__.py", "detectron2-0.7.2.dist-info/METADATA",
                     "detectron2-0.7.2.dist-info/WHEEL", "detectron2-0.7.2.dist-info/RECORD"}
    assert "detectron2/__init__.py,sha256=" in record and "Tag: py3-none-any" in archive_text(wheel, "WHEEL")


def archive_text(wheel, name):
    with zipfile.ZipFile(wheel) as archive:
        return archive.read(f"detectron2-0.7.2.dist-info/{name}").decode()
