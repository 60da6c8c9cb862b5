#!/usr/bin/env python
"""The GPU check of the compiled deformable-attention op: one command, on a machine with one GPU, in 8 minutes.

    python projects/SparseDETR/tools/gpu_check.py OUT_DIR                 # on the GPU machine
    python projects/SparseDETR/tools/gpu_check.py OUT_DIR --device cpu    # dry run on a CPU, small sizes

From the repository root, with detectron2, fvcore and pycocotools importable (scripts/fetch_device_wheels.py
brings them to a machine without network access; the root README says how). The steps, in the order of their
value, each with its time limit on one H100/H200 (:data:`STEPS`):

1. build (150 s): ``sparse_detr._C`` compiled in place for this GPU (``FORCE_CUDA=1``, ``TORCH_CUDA_ARCH_LIST``
   its compute capability), without installing anything; the other steps import it through ``PYTHONPATH``;
2. CUDA tests (80 s): every test of the operator's test files with ``cuda`` in its name (CUDA kernel against the
   CPU kernel in every dtype, forward and backward, edges, the scalar path, opcheck, a case past 2^31 elements);
3. self-check (30 s): ``python -m sparse_detr.layers.self_check --device cuda --json OUT_DIR/self_check.json``,
   the check that decides whether ``auto`` uses the compiled kernel on this GPU;
4. op benchmark (45 s): tools/benchmark_ms_deform_attn.py at the sparse (rho = 0.1) and dense encoder and the
   decoder shapes, batch 2, float32, float16 and bfloat16, the compiled kernel against the PyTorch implementation,
   with the bandwidth achieved and its share of the copy bandwidth;
5. model speed (60 s): benchmark.py FPS and B4FPS of deformable_detr_r50 and sparse_detr_r50_rho0.1 at 850x1040
   in fp32 and bf16 (autocast), through the CUDA kernel;
6. training (45 s): 20 iterations of sparse_detr_r50_rho0.1 through train_net.py with bf16 mixed precision on
   generated images (the shapes dataset) resized to COCO sizes (shorter side 480-800), through the CUDA kernel;
7. memcheck (55 s, and whatever the earlier steps left of the budget): ``compute-sanitizer --tool memcheck`` on a
   small forward and backward of the CUDA kernel in every dtype, on its vector and its scalar path, 32- and 64-bit
   indices (PyTorch's caching allocator off, so that every tensor is its own allocation).

Time: the whole check keeps to ``--budget`` seconds of wall clock (default 480, the build included). The limits
add up to 465 s; the rest is the check's own start and one killed step's grace. A step starts only when the
budget still holds its whole limit, else it is SKIPPED; a step whose command outlives the step's limit is FAILED.
Every command runs in its own session: at the step's limit its process group gets SIGTERM and, 5 s later, SIGKILL,
so that no grandchild (ninja and nvcc, the Python process under compute-sanitizer) keeps it going; when a command
has ended, what is left of its group is killed and its output is read for at most 2 s more (a process that left
the group may hold the pipes open). compute-sanitizer refusing the GPU ("Device not supported", as some machines
do) or missing makes memcheck SKIPPED.

Every step runs even when an earlier one failed; the output of all goes to OUT_DIR/log.txt, the numbers to
OUT_DIR/results.json, and one summary (also printed at the end) to OUT_DIR/summary.md: each step's status (ok,
SKIPPED, FAILED), time and limit. The exit status is 0 when no step FAILED. The dry run (``--device cpu``) skips the
build (``make setup`` built the CPU kernels), runs the memcheck workload without the sanitizer and the other steps
on tiny sizes, with every limit and the default budget 3 times longer (a shared CPU is slower and busier).
"""
import argparse
import codecs
import glob
import json
import math
import os
import re
import selectors
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, TextIO, Tuple

REPO = Path(__file__).resolve().parents[3]
PROJECT = REPO / "projects" / "SparseDETR"
SPEED_CONFIGS = ("deformable_detr_r50.yaml", "sparse_detr_r50_rho0.1.yaml")
TRAIN_CONFIG = "sparse_detr_r50_rho0.1.yaml"
TEST_FILES = ("tests/test_ms_deform_attn.py", "tests/test_ms_deform_attn_kernels.py")
# The dry run's model: the configs' switches on a small transformer (and, for training, small images).
TINY = ["MODEL.SPARSE_DETR.HIDDEN_DIM", "32", "MODEL.SPARSE_DETR.NHEADS", "2", "MODEL.SPARSE_DETR.ENC_LAYERS", "1",
        "MODEL.SPARSE_DETR.DEC_LAYERS", "1", "MODEL.SPARSE_DETR.DIM_FEEDFORWARD", "32",
        "MODEL.SPARSE_DETR.NUM_QUERIES", "10"]

DEFAULT_BUDGET = 480.0  # seconds of wall clock for the whole check on one H100/H200, the build included
OWN_TIME = 8.0  # what the check takes besides its steps (Python, torch, the GPU's name, the summary)
KILL_GRACE = 5.0  # seconds between SIGTERM and SIGKILL to the process group of a command past its limit
DRAIN = 2.0  # seconds a command's output is still read after its process ended
CPU_TIME_SCALE = 3.0  # the dry run's limits and default budget, against the GPU's
POLL = 0.1  # seconds between looks at whether a running command's process has ended
# compute-sanitizer refusing the machine; its reports of the program's own CUDA errors ("========= Program hit
# cudaErrorNotSupported ... operation not supported ...") are findings, not refusals.
SANITIZER_REFUSAL = re.compile(r"^(?!=+ Program hit).*"
                               r"(Device not supported|not supported on this (device|platform|system)).*$",
                               re.IGNORECASE | re.MULTILINE)

PASSED, SKIPPED, FAILED = "ok", "SKIPPED", "FAILED"


@dataclass
class Finished:
    """What one command did. ``returncode`` is None when it could not start or did not end after SIGKILL."""

    command: List[str]
    returncode: Optional[int]
    stdout: str
    stderr: str
    timed_out: bool
    seconds: float

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.timed_out

    @property
    def output(self) -> str:
        return self.stdout + self.stderr


def kill_group(group: int, sig: int):
    try:
        os.killpg(group, sig)
    except ProcessLookupError:  # nothing left in the group
        pass


def has_ended(pid: int) -> bool:
    """Whether the child ``pid`` has ended, without reaping it: until it is reaped, its pid (the number of its
    process group) cannot be reused, so that killing the group cannot hit another program's processes."""
    return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None


def run_command(command: Sequence[str], limit: float, env: Optional[Dict[str, str]] = None, cwd: Path = REPO,
                log: Optional[TextIO] = None, grace: float = KILL_GRACE, drain: float = DRAIN) -> Finished:
    """Run ``command`` in a session of its own for at most ``limit`` seconds, its output kept and written to ``log``
    line by line as it comes (stdout and stderr each whole lines).

    Past ``limit`` its process group gets SIGTERM, and SIGKILL ``grace`` seconds later. Once its own process has
    ended, what is left of the group is killed and the output is read for at most ``drain`` seconds more: a
    process that left the group may hold the pipes open, and nothing here waits for it. Whatever ends this
    function (an interrupt too) kills the group first.
    """
    command = [str(part) for part in command]
    started = time.monotonic()
    try:
        process = subprocess.Popen(command, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, start_new_session=True)
    except OSError as error:
        return Finished(command, None, "", f"could not start {command[0]}: {error}\n", False, 0.0)
    texts = {process.stdout: [], process.stderr: []}
    pending = {stream: "" for stream in texts}
    decoders = {stream: codecs.getincrementaldecoder("utf-8")(errors="replace") for stream in texts}
    selector = selectors.DefaultSelector()
    for stream in texts:
        selector.register(stream, selectors.EVENT_READ)

    def keep(stream, text: str):
        texts[stream].append(text)
        if log is not None:
            lines, newline, pending[stream] = (pending[stream] + text).rpartition("\n")
            if newline:
                log.write(lines + newline)

    deadline, kill_at, stop_at, ended, timed_out = started + limit, None, None, False, False
    try:
        while True:
            now = time.monotonic()
            if not ended and has_ended(process.pid):
                ended, stop_at = True, min(stop_at or math.inf, now + drain)
                kill_group(process.pid, signal.SIGKILL)  # the command is over: so is whatever it left running
            elif not ended and not timed_out and now >= deadline:
                timed_out, kill_at = True, now + grace
                kill_group(process.pid, signal.SIGTERM)
            elif not ended and kill_at is not None and now >= kill_at:
                kill_at, stop_at = None, now + drain  # a process stuck in the kernel may not even die of SIGKILL
                kill_group(process.pid, signal.SIGKILL)
            if (ended and not selector.get_map()) or (stop_at is not None and now >= stop_at):
                break
            if not selector.get_map():  # the pipes are closed, the process is not done yet
                time.sleep(POLL)
                continue
            for key, _ in selector.select(POLL):
                data = os.read(key.fd, 1 << 16)
                if data:
                    keep(key.fileobj, decoders[key.fileobj].decode(data))
                else:
                    selector.unregister(key.fileobj)
    finally:
        kill_group(process.pid, signal.SIGKILL)  # the process itself is not reaped yet: its group number is ours
        selector.close()
        for stream in texts:
            stream.close()
        try:
            returncode = process.wait(drain if stop_at is None else max(stop_at - time.monotonic(), 0))
        except subprocess.TimeoutExpired:
            returncode = None
    for stream in texts:
        keep(stream, decoders[stream].decode(b"", final=True))
        if log is not None and pending[stream]:
            log.write(pending[stream] + "\n")
    return Finished(command, returncode, "".join(texts[process.stdout]), "".join(texts[process.stderr]), timed_out,
                    time.monotonic() - started)


def failure(run: Finished) -> str:
    """A failed command in a few words: how it ended and its last line of output."""
    if run.timed_out:
        return f"timed out after {run.seconds:.0f} s"
    last = (run.stderr.strip() or run.stdout.strip() or "no output").splitlines()[-1]
    how = "did not end after SIGKILL" if run.returncode is None else f"exit status {run.returncode}"
    return f"{how}: {last[:200]}"


def last_json_line(text: str) -> Optional[Dict]:
    lines = text.strip().splitlines()
    try:
        return json.loads(lines[-1]) if lines else None
    except json.JSONDecodeError:
        return None


@dataclass(frozen=True)
class Step:
    """One step of the check: ``run(check)`` returns (status, details) and runs its commands through
    :meth:`Check.run`. ``limit``: its seconds on one H100/H200; ``takes_the_rest``: it may also use whatever the
    earlier steps left of the budget (the last step: there is no later one to starve)."""

    name: str
    limit: float
    run: Callable[["Check"], Tuple[str, str]]
    takes_the_rest: bool = False


@dataclass
class StepResult:
    name: str
    status: str
    seconds: float
    limit: float
    details: str


@dataclass
class Check:
    out_dir: Path
    work_dir: Path
    device: str
    budget: float
    start: float = field(default_factory=time.monotonic)
    steps: List[StepResult] = field(default_factory=list)
    results: Dict = field(default_factory=dict)
    step_deadline: float = 0.0
    step_timed_out: bool = False

    def __post_init__(self):
        self.log = open(self.out_dir / "log.txt", "w", buffering=1)

    @property
    def gpu(self) -> bool:
        return self.device == "cuda"

    @property
    def time_scale(self) -> float:
        return 1.0 if self.gpu else CPU_TIME_SCALE

    def env(self, **extra) -> Dict[str, str]:
        """The steps' environment: this checkout's package (with the in-place build) first on the path."""
        path = os.pathsep.join(p for p in (str(PROJECT), os.environ.get("PYTHONPATH", "")) if p)
        return {**os.environ, "PYTHONPATH": path, "PYTHONUNBUFFERED": "1", **extra}

    def time_left(self) -> float:
        """Seconds a step may still take: the budget less the time spent and the kill of a step past its limit."""
        return self.budget - (time.monotonic() - self.start) - KILL_GRACE - DRAIN

    def run(self, command: Sequence, env: Dict[str, str]) -> Finished:
        """Run one command of the current step, within what is left of the step's limit."""
        self.log.write(f"\n===== {shlex.join(str(part) for part in command)}\n")
        limit = self.step_deadline - time.monotonic()
        if limit <= 0:
            finished = Finished(list(command), None, "", "", True, 0.0)
        else:
            finished = run_command(command, limit, env, REPO, self.log)
        if finished.timed_out:
            self.step_timed_out = True
            self.log.write(f"----- killed at the step's limit, after {finished.seconds:.0f} s\n")
        return finished

    def run_step(self, step: Step) -> StepResult:
        """Run ``step`` if the budget still holds its limit (else SKIPPED); a step past its limit is FAILED, and so is
        one whose own code broke, so that the steps after it still run."""
        started = time.monotonic()
        limit, left = step.limit * self.time_scale, self.time_left()
        if left < limit:
            status, details = SKIPPED, f"not started: needs {limit:.0f} s, {max(left, 0):.0f} s of the budget left"
        else:
            limit = left if step.takes_the_rest else limit
            self.log.write(f"\n##### {step.name} (limit {limit:.0f} s)\n")
            self.step_deadline, self.step_timed_out = started + limit, False
            try:
                status, details = step.run(self)
            except KeyboardInterrupt:  # Ctrl-C or SIGTERM: the step's processes are gone; the summary says so
                self.steps.append(StepResult(step.name, FAILED, time.monotonic() - started, limit, "interrupted"))
                raise
            except Exception as error:  # a bug of this check: this step fails, the others still run
                self.log.write(traceback.format_exc())
                status, details = FAILED, f"error in the check: {type(error).__name__}: {error}"
            if self.step_timed_out and status != SKIPPED:
                status, details = FAILED, f"timed out: killed at its limit of {limit:.0f} s"
        result = StepResult(step.name, status, time.monotonic() - started, limit, details)
        self.steps.append(result)
        self.log.write(f"----- {step.name}: {status} in {result.seconds:.0f} s of {limit:.0f} s: {details}\n")
        print(f"[gpu check] {step.name}: {status} ({result.seconds:.0f} s of {limit:.0f} s) {details}", flush=True)
        return result

    def failed(self) -> List[StepResult]:
        return [step for step in self.steps if step.status == FAILED]


def verdict(ok: bool, details: str, run: Finished) -> Tuple[str, str]:
    return (PASSED, details) if ok else (FAILED, failure(run))


# ---- the steps ----------------------------------------------------------------------------------------


def build(check: Check) -> Tuple[str, str]:
    if not check.gpu:
        return SKIPPED, "on the CPU: `make setup` built the CPU kernels"
    import torch

    major, minor = torch.cuda.get_device_capability()
    arch = f"{major}.{minor}"
    check.results["build"] = {"arch": arch}
    run = check.run([sys.executable, "setup.py", "build_ext", "--inplace"],
                    check.env(FORCE_CUDA="1", TORCH_CUDA_ARCH_LIST=arch))
    if run.ok:
        run = check.run([sys.executable, "-c", "import sparse_detr._C as C; assert C.WITH_CUDA"], check.env())
    return verdict(run.ok, f"sm_{major}{minor}", run)


def cuda_tests(check: Check) -> Tuple[str, str]:
    run = check.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "-k", "cuda",
                     *TEST_FILES], check.env())
    counts = {kind: int(number) for number, kind in re.findall(r"(\d+) (passed|failed|skipped|error)", run.stdout)}
    check.results["cuda_tests"] = counts
    # on a GPU every selected test must run; on the CPU they all skip
    ok = run.ok and (not check.gpu or counts.get("skipped", 0) == 0)
    details = ", ".join(f"{n} {kind}" for kind, n in counts.items())
    return (PASSED, details) if ok else (FAILED, details or failure(run))


def self_check(check: Check) -> Tuple[str, str]:
    report = check.out_dir / "self_check.json"
    run = check.run([sys.executable, "-m", "sparse_detr.layers.self_check", "--device", check.device,
                     "--json", str(report)], check.env())
    summary_line = (run.stdout.strip() or "no output").splitlines()[-1]
    check.results["self_check"] = {"exit_status": run.returncode, "summary": summary_line}
    if run.ok or run.timed_out or not run.stdout.strip():
        return verdict(run.ok, summary_line, run)
    return FAILED, f"exit status {run.returncode}: {summary_line[:200]}"  # its summary line says what failed


def op_benchmark(check: Check) -> Tuple[str, str]:
    output = check.work_dir / "op_benchmark.json"
    sizes = (["--dtype", "float32", "float16", "bfloat16", "--batch", "2", "--repeats", "10", "--warmup", "2"]
             if check.gpu else
             ["--dtype", "float32", "--cases", "decoder", "--batch", "2", "--repeats", "1", "--warmup", "0"])
    run = check.run([sys.executable, PROJECT / "tools" / "benchmark_ms_deform_attn.py", "--device", check.device,
                     "--json", output, *sizes], check.env())
    if not run.ok or not output.exists():
        return FAILED, failure(run)
    measured = json.loads(output.read_text())
    measured["table"] = [line for line in run.stdout.splitlines() if line.startswith("|")]
    check.results["op_benchmark"] = measured
    return PASSED, "; ".join(op_goals(measured)) or "measured"


def op_goals(measured: Dict) -> List[str]:
    """The issue's GPU goals read off the op benchmark (where it measured their cases)."""
    rows = {(r["case"], r["batch"], r["dtype"]): r for r in measured["rows"]}
    lines = []
    fp32 = rows.get(("encoder_rho1.0", 2, "float32"))
    if fp32:
        gbps = fp32["forward_bytes"] / fp32["forward_ms"]["compiled"] / 1e6
        lines.append(f"rho=1.0 fp32 forward {gbps:.0f} GB/s = {gbps / measured['copy_gbps']:.0%} of copy (goal >= 50%)")
        bf16 = rows.get(("encoder_rho1.0", 2, "bfloat16"))
        if bf16:
            lines.append(f"bf16 forward {fp32['forward_ms']['compiled'] / bf16['forward_ms']['compiled']:.2f}x fp32 "
                         "(goal >= 1.5x)")
    speedups = [(r["forward_ms"]["pytorch"] / r["forward_ms"]["compiled"],
                 r["forward_backward_ms"]["pytorch"] / r["forward_backward_ms"]["compiled"]) for r in rows.values()]
    if speedups:
        lines.append("compiled/PyTorch fwd {:.2f}-{:.2f}x, f+b {:.2f}-{:.2f}x".format(
            min(s[0] for s in speedups), max(s[0] for s in speedups),
            min(s[1] for s in speedups), max(s[1] for s in speedups)))
    return lines


def model_speed(check: Check) -> Tuple[str, str]:
    configs = [item for config in SPEED_CONFIGS for item in ("--config-file", config)]
    sizes = (["--repeats", "10", "--warmup", "3"] if check.gpu else
             ["--image-size", "64", "96", "--batch-sizes", "1", "--repeats", "1", "--warmup", "0", *TINY])
    results, problems = {}, []
    for dtype in ("fp32", "bf16"):
        run = check.run([sys.executable, PROJECT / "benchmark.py", "--all", *configs, "--device", check.device,
                         "--dtype", dtype, "--num-classes", "91", "--skip-flops", "--json", *sizes],
                        check.env(SPARSE_DETR_MS_DEFORM_ATTN="compiled"))
        measured = last_json_line(run.stdout) if run.ok else None
        if measured is None:
            problems.append(f"{dtype}: {failure(run) if not run.ok else 'no JSON line on stdout'}")
            continue
        results[dtype] = measured
        problems += [f"{dtype} {name}: {r['error']}" for name, r in measured.items() if "error" in r]
    check.results["model_speed"] = results
    if problems or len(results) != 2:
        return FAILED, "; ".join(problems)
    return PASSED, ", ".join(f"{dtype} {len(r)} configs" for dtype, r in results.items())


def training(check: Check) -> Tuple[str, str]:
    iterations = 20 if check.gpu else 2
    output = check.work_dir / "train"
    command = [sys.executable, PROJECT / "train_net.py", "--config-file", PROJECT / "configs" / TRAIN_CONFIG,
               "--num-gpus", "1", "OUTPUT_DIR", output, "MODEL.DEVICE", check.device, "MODEL.WEIGHTS", "",
               "MODEL.SPARSE_DETR.NUM_CLASSES", "5", "DATASETS.TRAIN", "('sparse_detr_shapes_train',)",
               "DATASETS.TEST", "()", "SOLVER.EPOCHS", "0", "SOLVER.MAX_ITER", str(iterations), "SOLVER.STEPS", "()",
               "SOLVER.IMS_PER_BATCH", "2", "SOLVER.AMP.ENABLED", "True", "SOLVER.AMP.PRECISION", "bfloat16",
               "SOLVER.CHECKPOINT_PERIOD", "100000", "TEST.EVAL_PERIOD", "0",
               "DATALOADER.NUM_WORKERS", "4" if check.gpu else "0"]
    if not check.gpu:
        command += TINY + ["INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.MAX_SIZE_TRAIN", "96", "INPUT.CROP.ENABLED",
                           "False"]
    env = check.env(SPARSE_DETR_MS_DEFORM_ATTN="compiled", SPARSE_DETR_DATASETS=str(check.work_dir / "shapes"),
                    SPARSE_DETR_SHAPES_TRAIN_SIZE="64" if check.gpu else "8", SPARSE_DETR_SHAPES_VAL_SIZE="4")
    run = check.run(command, env)
    metrics_file = output / "metrics.json"
    records = ([json.loads(line) for line in metrics_file.read_text().splitlines() if line.strip()]
               if metrics_file.exists() else [])
    losses = [r["total_loss"] for r in records if "total_loss" in r]
    speed = re.search(r"Overall training speed: (\d+) iterations in \S+ \(([\d.]+) s / it\)", run.output)
    check.results["training"] = {"iterations": iterations, "total_loss": losses,
                                 "seconds_per_iteration": float(speed.group(2)) if speed else None,
                                 "last": records[-1] if records else None}
    ok = (run.ok and bool(records) and records[-1].get("iteration") == iterations - 1
          and all(math.isfinite(loss) for loss in losses))
    details = (f"{iterations} iterations, total loss {losses[-1]:.2f} at the last"
               + (f", {float(speed.group(2)):.3f} s/it" if speed else "")) if ok else ""
    return verdict(ok, details, run)


def memcheck(check: Check) -> Tuple[str, str]:
    workload = [sys.executable, Path(__file__).resolve(), "--workload", check.device]
    if not check.gpu:
        run = check.run(workload, check.env())
        return verdict(run.ok and "workload done" in run.stdout, "workload ran (no sanitizer on the CPU)", run)
    sanitizer = find_sanitizer()
    if sanitizer is None:
        return SKIPPED, "no compute-sanitizer on PATH or in the CUDA toolkit"
    run = check.run([sanitizer, "--tool", "memcheck", "--error-exitcode", "1", "--print-limit", "20", *workload],
                    check.env(PYTORCH_NO_CUDA_MEMORY_CACHING="1"))
    refusal = SANITIZER_REFUSAL.search(run.output)
    if refusal:
        return SKIPPED, f"compute-sanitizer refused this machine: {refusal.group(0).strip('= ')[:200]}"
    found = re.search(r"ERROR SUMMARY: (\d+) error", run.output)
    errors = int(found.group(1)) if found else None
    check.results["memcheck"] = {"errors": errors}
    return verdict(run.ok and "workload done" in run.stdout and errors == 0, f"{errors} errors", run)


def find_sanitizer() -> Optional[str]:
    """compute-sanitizer on the PATH, else in a CUDA toolkit (bin/ or its own folder)."""
    found = shutil.which("compute-sanitizer")
    if found:
        return found
    homes = [os.environ.get("CUDA_HOME", ""), "/usr/local/cuda", *sorted(glob.glob("/usr/local/cuda-*"), reverse=True)]
    for home in filter(None, homes):
        for candidate in (Path(home) / "bin" / "compute-sanitizer", Path(home) / "compute-sanitizer" / "compute-sanitizer"):
            if candidate.is_file() and os.access(candidate, os.X_OK):
                return str(candidate)
    return None


# In the order of their value: what a short lease must not miss comes first.
STEPS = (
    Step("build", 150, build),
    Step("CUDA tests", 80, cuda_tests),
    Step("self-check", 30, self_check),
    Step("op benchmark", 45, op_benchmark),
    Step("model speed", 60, model_speed),
    Step("training", 45, training),
    Step("memcheck", 55, memcheck, takes_the_rest=True),
)


# ---- the memcheck workload ------------------------------------------------------------------------------


def workload(device: str):
    """A small forward and backward of the compiled kernel: every dtype, the vector (head dim 32) and the scalar
    (head dim 30) path, 32- and 64-bit indices, locations inside, on the edges and outside the maps."""
    import torch

    import sparse_detr._C  # noqa: F401  (registers torch.ops.sparse_detr_C)

    generator = torch.Generator().manual_seed(0)
    shapes = torch.tensor([(7, 9), (4, 5), (1, 1)])
    areas = shapes.prod(1)
    starts = torch.cat([areas.new_zeros(1), areas.cumsum(0)[:-1]])
    for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        accumulation = torch.promote_types(dtype, torch.float32)
        for head_dim in (32, 30):
            for force_int64 in (False, True):
                value = torch.randn(2, int(areas.sum()), 2, head_dim, generator=generator).to(device, dtype)
                locations = (torch.rand(2, 5, 2, 3, 4, 2, generator=generator) * 1.4 - 0.2).to(device, accumulation)
                weights = torch.rand(2, 5, 2, 3, 4, generator=generator).to(device, accumulation)
                grad = torch.randn(2, 5, 2 * head_dim, generator=generator).to(device, dtype)
                inputs = (value, shapes.to(device), starts.to(device), locations, weights)
                out = torch.ops.sparse_detr_C.ms_deform_attn_forward(*inputs, force_int64)
                grads = torch.ops.sparse_detr_C.ms_deform_attn_backward(grad, *inputs, force_int64)
                assert all(torch.isfinite(t).all() for t in (out,) + tuple(grads))
    if device == "cuda":
        torch.cuda.synchronize()
    print("workload done", flush=True)


# ---- the summary ----------------------------------------------------------------------------------------


def summary(check: Check, machine: Dict) -> str:
    lines = [f"# GPU check ({check.device})", "",
             f"{machine['device']} | torch {machine['torch']} | CUDA {machine['cuda']} | {machine['when']}", "",
             "| step | result | time | limit | details |", "|---|---|---:|---:|---|"]
    for step in check.steps:
        shown = step.status if step.status == PASSED else f"**{step.status}**"
        lines.append(f"| {step.name} | {shown} | {step.seconds:.0f} s | {step.limit:.0f} s | {step.details} |")
    measured = check.results.get("op_benchmark")
    if measured:
        lines += ["", f"Op benchmark (copy bandwidth {measured['copy_gbps']:.0f} GB/s):", ""] + measured["table"]
        lines += [""] + [f"* {line}" for line in op_goals(measured)]
    speed = check.results.get("model_speed")
    if speed:
        lines += ["", "Model speed through the compiled kernel (benchmark.py, 91 classes):", "",
                  "| config | dtype | FPS | B4FPS | peak memory (MB) |", "|---|---|---:|---:|---:|"]
        for dtype, configs in speed.items():
            for name, r in configs.items():
                if "error" not in r:
                    memory = "–" if r["peak_mem_mb"] is None else f"{r['peak_mem_mb']:.0f}"
                    lines.append(f"| {name} | {dtype} | {r['fps']:.1f} | {_number(r['b4fps'])} | {memory} |")
    counts = {status: sum(step.status == status for step in check.steps) for status in (PASSED, SKIPPED, FAILED)}
    lines += ["", f"**{'FAIL' if counts[FAILED] else 'PASS'}**: {counts[PASSED]} ok, {counts[SKIPPED]} skipped, "
              f"{counts[FAILED]} failed, in {time.monotonic() - check.start:.0f} s of the {check.budget:.0f} s budget."]
    return "\n".join(lines) + "\n"


def _number(value) -> str:
    return "–" if value is None else f"{value:.1f}"


def machine_description(device: str) -> Dict:
    import torch

    name = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    return {"device": name, "torch": torch.__version__, "cuda": torch.version.cuda,
            "when": time.strftime("%Y-%m-%d %H:%M:%S %Z")}


def stop_on_sigterm(signum, frame):
    """SIGTERM ends the check like Ctrl-C: the running step's process group is killed, the summary written."""
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv=None, steps: Sequence[Step] = STEPS) -> int:
    start = time.monotonic()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", nargs="?", type=Path,
                        help="folder for log.txt, results.json, summary.md and self_check.json")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu: the dry run")
    parser.add_argument("--budget", type=float,
                        help=f"seconds of wall clock for the whole check (default {DEFAULT_BUDGET:.0f}; "
                             f"{CPU_TIME_SCALE:.0f} times that for the dry run)")
    parser.add_argument("--work-dir", type=Path, help="scratch folder (default: a temporary one, removed after)")
    parser.add_argument("--workload", choices=["cuda", "cpu"], help=argparse.SUPPRESS)  # the memcheck step's child
    args = parser.parse_args(argv)
    if args.workload:
        workload(args.workload)
        return 0
    if args.out_dir is None:
        parser.error("give the output folder")
    if args.out_dir.exists() and not args.out_dir.is_dir():
        parser.error(f"{args.out_dir} is a file, not a folder")
    if (args.out_dir / "results.json").exists():
        parser.error(f"{args.out_dir} holds an earlier check's results: give another folder or move them away")
    if args.budget is not None and args.budget <= 0:
        parser.error(f"--budget must be positive, got {args.budget:g}")
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            parser.error("no CUDA device: run the dry run with --device cpu")
    budget = args.budget or DEFAULT_BUDGET * (1.0 if args.device == "cuda" else CPU_TIME_SCALE)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    scratch = args.work_dir or Path(tempfile.mkdtemp(prefix="gpu_check_"))
    scratch.mkdir(parents=True, exist_ok=True)
    check = Check(args.out_dir, scratch, args.device, budget, start=start)
    machine = machine_description(args.device)
    previous_handler = signal.signal(signal.SIGTERM, stop_on_sigterm)
    interrupted = False
    try:
        for step in steps:
            check.run_step(step)
    except KeyboardInterrupt:
        interrupted = True
    finally:
        signal.signal(signal.SIGTERM, previous_handler)
        text = summary(check, machine)
        (args.out_dir / "summary.md").write_text(text)
        (args.out_dir / "results.json").write_text(json.dumps(
            {"machine": machine, "budget": budget, "steps": [vars(s) for s in check.steps], **check.results},
            indent=1, default=str))
        check.log.close()
        if args.work_dir is None:
            shutil.rmtree(scratch, ignore_errors=True)
    print(text)
    if interrupted:
        print(f"gpu check: interrupted; the steps run so far are in {args.out_dir / 'summary.md'}", file=sys.stderr)
        return 130
    return 1 if check.failed() else 0


if __name__ == "__main__":
    sys.exit(main())
