"""The self-check that puts the compiled CUDA kernel on (``auto``) on a GPU that passes it, tested on the CPU.

The machinery (cache key, verdict file, lock, fallback, logging) runs against a fake check, a small script that
passes, fails or crashes as told and appends a line to a marker file per run; the device key is a fixed one,
since there is no GPU. The check itself runs for real on the compiled CPU kernel, through its command line.
"""
import hashlib
import json
import logging
import multiprocessing
import os
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import pytest
import torch

import sparse_detr._C
from sparse_detr.layers import ms_deform_attn as ms_deform_attn_module
from sparse_detr.layers import self_check

VARIABLE = ms_deform_attn_module.IMPLEMENTATION_VARIABLE
KEY = self_check.DeviceKey(gpu="NVIDIA Fake 80GB", compute_capability="9.0", driver="570.86.15",
                           torch="2.14.1+cu130", extension="0" * 64)
CUDA0 = torch.device("cuda", 0)

FAKE_CHECK = textwrap.dedent("""
    import json, os, resource, signal, sys, time
    marker, outcome, delay = sys.argv[1], sys.argv[2], float(sys.argv[3])
    device, report = sys.argv[sys.argv.index("--device") + 1], sys.argv[sys.argv.index("--json") + 1]
    with open(marker, "a") as f:
        f.write(device + "\\n")
    time.sleep(delay)
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # no core file from the crashes below
    if outcome == "segfault":
        os.kill(os.getpid(), signal.SIGSEGV)
    if outcome == "abort":
        os.abort()
    if outcome == "error":
        raise RuntimeError("CUDA error: an illegal memory access was encountered")
    with open(report, "w") as f:
        json.dump({"passed": outcome == "pass", "implementation": os.environ.get("SPARSE_DETR_MS_DEFORM_ATTN")}, f)
    print("fake self-check:", outcome)
    sys.exit(0 if outcome == "pass" else 1)
""")


class FakeCheck(SimpleNamespace):
    """``use(outcome, delay)`` makes the fake check the self-check's command; ``runs()`` lists the devices it ran
    for; ``path`` is the fixed key's verdict file."""

    def use(self, outcome: str, delay: float = 0.0):
        self.monkeypatch.setattr(self_check, "CHECK_COMMAND",
                                 [sys.executable, str(self.script), str(self.marker), outcome, str(delay)])

    def runs(self):
        return self.marker.read_text().splitlines() if self.marker.exists() else []

    def record(self):
        return json.loads(self.path.read_text())


@pytest.fixture
def fake_check(tmp_path, monkeypatch, caplog):
    """A fresh process's state: an empty cache in tmp_path, no verdict in memory, the fixed device key, the op's
    CUDA kernels taken as built; self_check's log in caplog."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv(VARIABLE, raising=False)
    monkeypatch.setattr(self_check, "_VERDICTS", {})
    monkeypatch.setattr(self_check, "device_key", lambda device: KEY)
    monkeypatch.setattr(ms_deform_attn_module, "compiled_kernels_available", lambda device_type="cpu": True)
    script = tmp_path / "fake_check.py"
    script.write_text(FAKE_CHECK)
    # caplog's handler on the module's own logger: whether or not a tool made the package's loggers not propagate
    self_check.logger.addHandler(caplog.handler)
    monkeypatch.setattr(self_check.logger, "propagate", False)
    caplog.set_level(logging.INFO, logger=self_check.logger.name)
    yield FakeCheck(monkeypatch=monkeypatch, script=script, marker=tmp_path / "runs.txt",
                    path=self_check.verdict_path(KEY))
    self_check.logger.removeHandler(caplog.handler)


def warnings_of(caplog):
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


# ---- the cache key --------------------------------------------------------------------------------------


def test_device_key_fields(monkeypatch):
    properties = SimpleNamespace(name="NVIDIA H200", major=9, minor=0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: properties)
    monkeypatch.setattr(self_check, "driver_version", lambda: "570.86.15")
    key = self_check.device_key(CUDA0)
    with open(sparse_detr._C.__file__, "rb") as library:
        extension = hashlib.sha256(library.read()).hexdigest()
    assert key == ("NVIDIA H200", "9.0", "570.86.15", torch.__version__, extension)
    assert key._fields == ("gpu", "compute_capability", "driver", "torch", "extension")


@pytest.mark.parametrize("text, version", [
    ("NVRM version: NVIDIA UNIX x86_64 Kernel Module  535.104.05  Sat Aug 19 01:15:15 UTC 2023\nGCC version: 12\n",
     "535.104.05"),
    ("NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  570.86.15  Release Build  (dvs-builder@U16)\n",
     "570.86.15"),
    (None, "unknown"),
])
def test_driver_version_from_proc(text, version, tmp_path, monkeypatch):
    path = tmp_path / "version"
    if text is not None:
        path.write_text(text)
    monkeypatch.setattr(self_check, "DRIVER_VERSION_FILE", path)
    assert self_check.driver_version() == version


def test_verdict_file_is_stable_and_changes_with_every_field_of_the_key(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    path = self_check.verdict_path(KEY)
    assert path == tmp_path / "sparse_detr" / "ms_deform_attn_self_check_1f513e01740245d0.json"  # in any process
    others = {self_check.verdict_path(KEY._replace(**{field: KEY[i] + "x"})) for i, field in enumerate(KEY._fields)}
    assert len(others) == len(KEY) and path not in others
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert self_check.verdict_path(KEY) == tmp_path / "home" / ".cache" / "sparse_detr" / path.name


# ---- running the check, caching its verdict -------------------------------------------------------------


def test_a_fresh_cache_runs_the_check_once_and_keeps_its_verdict(fake_check, monkeypatch, caplog):
    fake_check.use("pass")
    assert self_check.verdict(CUDA0)
    assert fake_check.runs() == ["cuda:0"]
    record = fake_check.record()
    assert {k: record[k] for k in KEY._fields} == KEY._asdict()
    assert record["verdict"] == "pass" and record["details"] == "fake self-check: pass" and record["date"]
    # the check runs with an explicit implementation: it cannot start another check
    assert json.loads(open(record["report"]).read())["implementation"] == "pytorch"
    assert f"passed the self-check (run now in {fake_check.path})" in caplog.text
    monkeypatch.setattr(self_check, "_VERDICTS", {})  # another process
    caplog.clear()
    assert self_check.verdict(CUDA0)
    assert fake_check.runs() == ["cuda:0"]
    assert f"passed the self-check (cached in {fake_check.path})" in caplog.text
    assert warnings_of(caplog) == []


def test_a_deleted_or_unreadable_verdict_runs_the_check_again(fake_check, monkeypatch):
    fake_check.use("fail")
    assert not self_check.verdict(CUDA0)
    fake_check.path.write_text("{not json")
    fake_check.use("pass")
    monkeypatch.setattr(self_check, "_VERDICTS", {})
    assert self_check.verdict(CUDA0) and fake_check.record()["verdict"] == "pass"
    fake_check.path.unlink()
    monkeypatch.setattr(self_check, "_VERDICTS", {})
    assert self_check.verdict(CUDA0)
    assert fake_check.runs() == ["cuda:0"] * 3


def verdict_in_a_process(barrier, results):
    barrier.wait(timeout=60)
    results.put(self_check.verdict(CUDA0))


def test_processes_starting_together_run_one_check(fake_check):
    """Four processes (DDP ranks) ask at once; the check takes a second: one runs it, the others wait on the lock
    and read its verdict."""
    fake_check.use("pass", delay=1.0)
    context = multiprocessing.get_context("fork")  # the children keep the fixture's fake command and key
    barrier, results = context.Barrier(4), context.Queue()
    processes = [context.Process(target=verdict_in_a_process, args=(barrier, results)) for _ in range(4)]
    for process in processes:
        process.start()
    verdicts = [results.get(timeout=60) for _ in processes]
    for process in processes:
        process.join(timeout=60)
    assert [process.exitcode for process in processes] == [0] * 4
    assert verdicts == [True] * 4
    assert fake_check.runs() == ["cuda:0"]
    assert fake_check.record()["verdict"] == "pass"


def test_a_failing_check_gives_the_pytorch_implementation_and_one_warning(fake_check, caplog):
    fake_check.use("fail")
    assert not ms_deform_attn_module._use_compiled(CUDA0)
    assert not ms_deform_attn_module._use_compiled(CUDA0)
    assert fake_check.runs() == ["cuda:0"]
    record = fake_check.record()
    assert record["verdict"] == "fail" and record["details"] == "fake self-check: fail"
    [warning] = warnings_of(caplog)
    assert str(fake_check.path) in warning and "failed its self-check on cuda:0 (NVIDIA Fake 80GB)" in warning
    assert f"{VARIABLE}=compiled or {VARIABLE}=pytorch forces either" in warning
    assert "the PyTorch implementation, because the compiled CUDA kernel failed the self-check" in caplog.text


@pytest.mark.parametrize("outcome, details", [("segfault", "killed by signal 11"), ("abort", "killed by signal 6"),
                                              ("error", "exit status 1; stderr:"), ("hang", "timed out after 0.5 s")])
def test_a_crashing_check_gives_the_pytorch_implementation(outcome, details, fake_check, monkeypatch, caplog):
    """A signal, an error (exit status 1 but no report) or a timeout: a "crash" verdict; this process goes on."""
    monkeypatch.setattr(self_check, "CHECK_TIMEOUT_S", 0.5 if outcome == "hang" else 60.0)
    fake_check.use(outcome, delay=30.0 if outcome == "hang" else 0.0)
    assert not ms_deform_attn_module._use_compiled(CUDA0)
    record = fake_check.record()
    assert record["verdict"] == "crash" and details in record["details"]
    if outcome == "error":
        assert "RuntimeError: CUDA error: an illegal memory access" in record["details"]
    [warning] = warnings_of(caplog)
    assert "crashed in its self-check" in warning and str(fake_check.path) in warning


def test_after_the_first_call_the_verdict_comes_from_memory(fake_check, monkeypatch):
    fake_check.use("pass")
    assert self_check.verdict(CUDA0)

    def untouchable(*args):
        raise AssertionError("the cache was consulted again")

    for function in ("read_verdict", "device_key", "verdict_path", "_run_check"):
        monkeypatch.setattr(self_check, function, untouchable)
    assert self_check.verdict(CUDA0) and ms_deform_attn_module._use_compiled(CUDA0)


@pytest.mark.parametrize("name, compiled", [("compiled", True), ("pytorch", False)])
def test_compiled_and_pytorch_never_run_the_check(name, compiled, fake_check, monkeypatch):
    fake_check.use("fail")
    monkeypatch.setenv(VARIABLE, name)
    assert ms_deform_attn_module._use_compiled(CUDA0) is compiled
    assert fake_check.runs() == [] and not fake_check.path.exists()


def test_the_cpu_never_runs_the_check(fake_check):
    fake_check.use("fail")
    assert ms_deform_attn_module._use_compiled(torch.device("cpu"))
    assert fake_check.runs() == []


def test_an_unwritable_cache_gives_the_pytorch_implementation_and_says_why(fake_check, tmp_path, monkeypatch, caplog):
    (tmp_path / "not_a_folder").write_text("")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "not_a_folder"))
    fake_check.use("pass")
    assert not self_check.verdict(CUDA0)
    [warning] = warnings_of(caplog)
    assert "cannot keep its verdict in" in warning and "XDG_CACHE_HOME" in warning and f"{VARIABLE}=" in warning


# ---- the check itself -----------------------------------------------------------------------------------


def test_the_check_passes_on_the_compiled_cpu_kernel_through_its_command_line(tmp_path):
    report_path = tmp_path / "report.json"
    environment = {**os.environ, "PYTHONPATH": str(self_check.PACKAGE_ROOT), "OMP_NUM_THREADS": "1"}
    environment.pop(VARIABLE, None)
    run = subprocess.run([sys.executable, "-m", "sparse_detr.layers.self_check", "--device", "cpu", "--json",
                          str(report_path)], capture_output=True, text=True, env=environment, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.startswith("ms_deform_attn self-check on cpu (CPU): passed, 48 comparisons")
    assert len(run.stdout.splitlines()) == 1 and "RuntimeWarning" not in run.stderr  # runpy's, if imported twice
    report = json.loads(report_path.read_text())
    assert report["passed"] and report["failures"] == [] and report["summary"] == run.stdout.strip()
    assert {(c["dtype"], c["shape"], c["head_dim"]) for c in report["cases"]} == {
        (dtype, shape, head_dim) for dtype in ("float32", "float16", "bfloat16")
        for shape in ("sparse_encoder", "decoder") for head_dim in (32, 30)}
    assert all(c["err_compiled"] <= c["bound"] and c["err_pytorch"] > 0 for c in report["cases"])


def test_the_check_fails_a_wrong_kernel(monkeypatch, single_thread):
    original = ms_deform_attn_module._compiled_forward
    monkeypatch.setattr(ms_deform_attn_module, "_compiled_forward", lambda *args: original(*args) * 0.75)
    report = self_check.run_self_check("cpu")
    assert not report["passed"] and "FAILED 12 of 48 comparisons; the worst: " in report["summary"]
    assert [c["tensor"] for c in report["failures"]] == ["output"] * 12


def results(dtype):
    """(compiled, pytorch, float64 reference) results of a small case, each (output, three gradients)."""
    inputs, grad_output = self_check._inputs(queries=20, head_dim=32, dtype=dtype, seed=0)
    reference = self_check._forward_backward("pytorch", [t.double() if t.is_floating_point() else t for t in inputs],
                                             grad_output.double())
    return (self_check._forward_backward("compiled", inputs, grad_output),
            self_check._forward_backward("pytorch", inputs, grad_output), reference)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_within_tolerance_accepts_the_compiled_kernel(dtype, single_thread):
    for compiled, pytorch, reference in zip(*results(dtype)):
        passed, ratio = self_check.within_tolerance(compiled, pytorch, reference, compiled.dtype)
        assert passed and 0 <= ratio <= 1


def test_within_tolerance_rejects_a_perturbed_or_non_finite_result(single_thread):
    (output, *_), (pytorch_output, *_), (reference_output, *_) = results(torch.float32)
    passed, ratio = self_check.within_tolerance(output + 1e-2, pytorch_output, reference_output, torch.float32)
    assert not passed and ratio > 100
    not_finite = output.clone()
    not_finite[0, 0, 0] = float("nan")
    assert self_check.within_tolerance(not_finite, pytorch_output, reference_output, torch.float32) == (
        False, float("inf"))


@pytest.mark.parametrize("argv, message", [(["--device", "tpu"], "error: --device 'tpu' is not a device"),
                                           (["--device", "cuda:99"], "error: --device cuda:99: ")])
def test_the_command_line_rejects_a_device_it_cannot_check(argv, message, capsys):
    assert self_check.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(message) and err.count("\n") == 1
