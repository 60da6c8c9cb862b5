#!/usr/bin/env python
"""The GPU check of the compiled deformable-attention op: one command, on a machine with one GPU, < 8 minutes.

    python projects/SparseDETR/tools/gpu_check.py OUT_DIR                 # on the GPU machine
    python projects/SparseDETR/tools/gpu_check.py OUT_DIR --device cpu    # dry run on a CPU, small sizes

From the repository root, with detectron2, fvcore and pycocotools importable (scripts/fetch_device_wheels.py
brings them to a machine without network access; the root README says how). The steps, in order:

1. build: ``sparse_detr._C`` compiled in place for this GPU (``FORCE_CUDA=1``, ``TORCH_CUDA_ARCH_LIST`` its
   compute capability), without installing anything; the other steps import it through ``PYTHONPATH``;
2. CUDA tests: every test of the operator's test files with ``cuda`` in its name (CUDA kernel against the CPU
   kernel in every dtype, forward and backward, edges, the scalar path, opcheck, a case past 2^31 elements);
3. memcheck: ``compute-sanitizer --tool memcheck`` on a small forward and backward of the CUDA kernel in every
   dtype, on its vector and its scalar path, 32- and 64-bit indices (PyTorch's caching allocator off, so that
   every tensor is its own allocation);
4. op benchmark: tools/benchmark_ms_deform_attn.py, every dtype, batch 2 and 4, the compiled kernel against
   the PyTorch implementation, with the achieved share of the copy bandwidth;
5. model speed: benchmark.py FPS and B4FPS of deformable_detr_r50, deformable_detr_r50_bbr_two_stage and
   sparse_detr_r50_rho0.1 at 850x1040 in fp32 and bf16 (autocast), through the CUDA kernel;
6. training: 20 iterations of sparse_detr_r50_rho0.1 through train_net.py with bf16 mixed precision on
   generated images (the shapes dataset) resized to COCO sizes (shorter side 480-800), through the CUDA kernel.

Every step runs even when an earlier one failed, within an overall time budget (``--budget``); the output of all
goes to OUT_DIR/log.txt, the numbers to OUT_DIR/results.json, and one summary (also printed at the end) to
OUT_DIR/summary.md. The exit status is 0 when every step passed. The dry run (``--device cpu``) skips the build
(``make setup`` built the CPU kernels) and the sanitizer, and runs the other steps on tiny sizes.
"""
import argparse
import glob
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

REPO = Path(__file__).resolve().parents[3]
PROJECT = REPO / "projects" / "SparseDETR"
CONFIGS = ("deformable_detr_r50.yaml", "deformable_detr_r50_bbr_two_stage.yaml", "sparse_detr_r50_rho0.1.yaml")
TRAIN_CONFIG = "sparse_detr_r50_rho0.1.yaml"
TEST_FILES = ("tests/test_ms_deform_attn.py", "tests/test_ms_deform_attn_kernels.py")
# The dry run's model: the configs' switches on a small transformer (and, for training, small images).
TINY = ["MODEL.SPARSE_DETR.HIDDEN_DIM", "32", "MODEL.SPARSE_DETR.NHEADS", "2", "MODEL.SPARSE_DETR.ENC_LAYERS", "1",
        "MODEL.SPARSE_DETR.DEC_LAYERS", "1", "MODEL.SPARSE_DETR.DIM_FEEDFORWARD", "32",
        "MODEL.SPARSE_DETR.NUM_QUERIES", "10"]
# Seconds each step may take at most on a GPU (the overall budget may cut them shorter).
STEP_LIMITS = {"build": 300, "CUDA tests": 240, "memcheck": 240, "op benchmark": 180, "model speed": 240,
               "training": 240}


@dataclass
class Step:
    name: str
    ok: bool
    seconds: float
    details: str


@dataclass
class Check:
    out_dir: Path
    work_dir: Path
    device: str
    budget: float
    start: float = field(default_factory=time.monotonic)
    steps: List[Step] = field(default_factory=list)
    results: Dict = field(default_factory=dict)

    def __post_init__(self):
        self.log = open(self.out_dir / "log.txt", "w", buffering=1)

    @property
    def gpu(self) -> bool:
        return self.device == "cuda"

    def env(self, **extra) -> Dict[str, str]:
        """The steps' environment: this checkout's package (with the in-place build) first on the path."""
        path = os.pathsep.join(p for p in (str(PROJECT), os.environ.get("PYTHONPATH", "")) if p)
        return {**os.environ, "PYTHONPATH": path, "PYTHONUNBUFFERED": "1", **extra}

    def remaining(self) -> float:
        return self.budget - (time.monotonic() - self.start)

    def run(self, name: str, command: List[str], env: Dict[str, str]) -> Optional[subprocess.CompletedProcess]:
        """Run one command of a step, its output streamed into the log; None when it ran out of time."""
        limit = min(STEP_LIMITS[name], self.remaining())
        self.log.write(f"\n===== {name}: {' '.join(command)}\n")
        if limit <= 5:
            self.log.write("skipped: the time budget is spent\n")
            return None
        process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   text=True, errors="replace")
        captured = {"stdout": [], "stderr": []}

        def pump(stream, lines):
            for line in stream:
                lines.append(line)
                self.log.write(line)

        readers = [threading.Thread(target=pump, args=(process.stdout, captured["stdout"])),
                   threading.Thread(target=pump, args=(process.stderr, captured["stderr"]))]
        for reader in readers:
            reader.start()
        try:
            process.wait(timeout=limit)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            self.log.write(f"killed after {limit:.0f} s\n")
        for reader in readers:
            reader.join()
        return subprocess.CompletedProcess(command, process.returncode, "".join(captured["stdout"]),
                                           "".join(captured["stderr"]))

    def record(self, name: str, started: float, ok: bool, details: str):
        step = Step(name, ok, time.monotonic() - started, details)
        self.steps.append(step)
        self.log.write(f"----- {name}: {'ok' if ok else 'FAILED'} in {step.seconds:.0f} s: {details}\n")
        print(f"[gpu check] {name}: {'ok' if ok else 'FAILED'} ({step.seconds:.0f} s) {details}", flush=True)


def failure(run: Optional[subprocess.CompletedProcess]) -> str:
    if run is None:
        return "not run: out of time"
    last = (run.stderr.strip() or run.stdout.strip() or "no output").splitlines()[-1]
    return f"exit status {run.returncode}: {last[:200]}"


# ---- the steps ----------------------------------------------------------------------------------------


def build(check: Check):
    started = time.monotonic()
    if not check.gpu:
        check.record("build", started, True, "skipped on the CPU: `make setup` built the CPU kernels")
        return
    import torch

    major, minor = torch.cuda.get_device_capability()
    arch = f"{major}.{minor}"
    run = check.run("build", [sys.executable, "setup.py", "build_ext", "--inplace"],
                    check.env(FORCE_CUDA="1", TORCH_CUDA_ARCH_LIST=arch))
    ok = run is not None and run.returncode == 0
    if ok:
        probe = check.run("build", [sys.executable, "-c", "import sparse_detr._C as C; assert C.WITH_CUDA"],
                          check.env())
        ok = probe is not None and probe.returncode == 0
    check.results["build"] = {"arch": arch, "seconds": time.monotonic() - started}
    check.record("build", started, ok, f"sm_{major}{minor}" if ok else failure(run))


def cuda_tests(check: Check):
    started = time.monotonic()
    run = check.run("CUDA tests", [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "-k", "cuda",
                                   *TEST_FILES], check.env())
    counts = {}
    if run is not None:
        summary = re.findall(r"(\d+) (passed|failed|skipped|error)", run.stdout)
        counts = {kind: int(number) for number, kind in summary}
    check.results["cuda_tests"] = counts
    # on a GPU every selected test must run; on the CPU they all skip
    ok = run is not None and run.returncode == 0 and (not check.gpu or counts.get("skipped", 0) == 0)
    details = ", ".join(f"{n} {kind}" for kind, n in counts.items()) or failure(run)
    check.record("CUDA tests", started, ok, details if ok or counts else failure(run))


def memcheck(check: Check):
    started = time.monotonic()
    workload = [sys.executable, str(Path(__file__).resolve()), "--workload", check.device]
    if check.gpu:
        sanitizer = find_sanitizer()
        if sanitizer is None:
            check.record("memcheck", started, False, "no compute-sanitizer on PATH or in the CUDA toolkit")
            return
        command = [sanitizer, "--tool", "memcheck", "--error-exitcode", "1", "--print-limit", "20", *workload]
        run = check.run("memcheck", command, check.env(PYTORCH_NO_CUDA_MEMORY_CACHING="1"))
    else:
        run = check.run("memcheck", workload, check.env())
    errors = None
    if run is not None:
        found = re.search(r"ERROR SUMMARY: (\d+) error", run.stdout + run.stderr)
        errors = int(found.group(1)) if found else None
    check.results["memcheck"] = {"errors": errors}
    ok = run is not None and run.returncode == 0 and "workload done" in run.stdout and (not check.gpu or errors == 0)
    details = (f"{errors} errors" if check.gpu else "workload ran (no sanitizer on the CPU)") if ok else failure(run)
    check.record("memcheck", started, ok, details)


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


def op_benchmark(check: Check):
    started = time.monotonic()
    output = check.work_dir / "op_benchmark.json"
    sizes = (["--repeats", "20", "--warmup", "3"] if check.gpu else
             ["--dtype", "float32", "--cases", "decoder", "--batch", "2", "--repeats", "1", "--warmup", "0"])
    run = check.run("op benchmark", [sys.executable, str(PROJECT / "tools" / "benchmark_ms_deform_attn.py"),
                                     "--device", check.device, "--json", str(output), *sizes], check.env())
    if run is None or run.returncode != 0 or not output.exists():
        check.record("op benchmark", started, False, failure(run))
        return
    measured = json.loads(output.read_text())
    measured["table"] = [line for line in run.stdout.splitlines() if line.startswith("|")]
    check.results["op_benchmark"] = measured
    check.record("op benchmark", started, True, "; ".join(op_goals(measured)) or "measured")


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


def model_speed(check: Check):
    started = time.monotonic()
    configs = [item for config in CONFIGS for item in ("--config-file", config)]
    sizes = ([] if check.gpu else ["--image-size", "64", "96", "--batch-sizes", "1", "--repeats", "1", "--warmup", "0",
                                   *TINY])
    results, problems = {}, []
    for dtype in ("fp32", "bf16"):
        run = check.run("model speed", [sys.executable, str(PROJECT / "benchmark.py"), "--all", *configs,
                                        "--device", check.device, "--dtype", dtype, "--num-classes", "91",
                                        "--skip-flops", "--json", *sizes],
                        check.env(SPARSE_DETR_MS_DEFORM_ATTN="compiled"))
        if run is None or run.returncode != 0:
            problems.append(f"{dtype}: {failure(run)}")
            continue
        measured = json.loads(run.stdout.strip().splitlines()[-1])
        results[dtype] = measured
        problems += [f"{dtype} {name}: {r['error']}" for name, r in measured.items() if "error" in r]
    check.results["model_speed"] = results
    ok = not problems and len(results) == 2
    details = ", ".join(f"{dtype} {len(r)} configs" for dtype, r in results.items())
    check.record("model speed", started, ok, details if ok else "; ".join(problems))


def training(check: Check):
    started = time.monotonic()
    iterations = 20 if check.gpu else 2
    output = check.work_dir / "train"
    command = [sys.executable, str(PROJECT / "train_net.py"), "--config-file", str(PROJECT / "configs" / TRAIN_CONFIG),
               "--num-gpus", "1", "OUTPUT_DIR", str(output), "MODEL.DEVICE", check.device, "MODEL.WEIGHTS", "",
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
    run = check.run("training", command, env)
    metrics_file = output / "metrics.json"
    records = ([json.loads(line) for line in metrics_file.read_text().splitlines() if line.strip()]
               if metrics_file.exists() else [])
    losses = [r["total_loss"] for r in records if "total_loss" in r]
    speed = re.search(r"Overall training speed: (\d+) iterations in \S+ \(([\d.]+) s / it\)",
                      run.stdout + run.stderr if run else "")
    check.results["training"] = {"iterations": iterations, "total_loss": losses,
                                 "seconds_per_iteration": float(speed.group(2)) if speed else None,
                                 "last": records[-1] if records else None}
    ok = (run is not None and run.returncode == 0 and records and records[-1].get("iteration") == iterations - 1
          and all(math.isfinite(loss) for loss in losses))
    details = (f"{iterations} iterations, total loss {losses[-1]:.2f} at the last"
               + (f", {float(speed.group(2)):.3f} s/it" if speed else "")) if ok else failure(run)
    check.record("training", started, bool(ok), details)


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
             "| step | result | time | details |", "|---|---|---|---|"]
    for step in check.steps:
        lines.append(f"| {step.name} | {'ok' if step.ok else '**FAILED**'} | {step.seconds:.0f} s | {step.details} |")
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
    passed = all(step.ok for step in check.steps)
    lines += ["", f"**{'PASS' if passed else 'FAIL'}**: {sum(s.ok for s in check.steps)} of {len(check.steps)} steps "
              f"passed in {time.monotonic() - check.start:.0f} s."]
    return "\n".join(lines) + "\n"


def _number(value) -> str:
    return "–" if value is None else f"{value:.1f}"


def machine_description(device: str) -> Dict:
    import torch

    name = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    return {"device": name, "torch": torch.__version__, "cuda": torch.version.cuda,
            "when": time.strftime("%Y-%m-%d %H:%M:%S %Z")}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", nargs="?", type=Path, help="folder for log.txt, results.json and summary.md")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu: the dry run")
    parser.add_argument("--budget", type=float, default=450.0, help="seconds for all steps together")
    parser.add_argument("--work-dir", type=Path, help="scratch folder (default: a temporary one, removed after)")
    parser.add_argument("--workload", choices=["cuda", "cpu"], help=argparse.SUPPRESS)  # the memcheck step's child
    args = parser.parse_args(argv)
    if args.workload:
        workload(args.workload)
        return 0
    if args.out_dir is None:
        parser.error("give the output folder")
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            parser.error("no CUDA device: run the dry run with --device cpu")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    scratch = args.work_dir or Path(tempfile.mkdtemp(prefix="gpu_check_"))
    scratch.mkdir(parents=True, exist_ok=True)
    check = Check(args.out_dir, scratch, args.device, args.budget)
    machine = machine_description(args.device)
    try:
        for step in (build, cuda_tests, memcheck, op_benchmark, model_speed, training):
            step(check)
    finally:
        text = summary(check, machine)
        (args.out_dir / "summary.md").write_text(text)
        (args.out_dir / "results.json").write_text(json.dumps(
            {"machine": machine, "steps": [vars(s) for s in check.steps], **check.results}, indent=1, default=str))
        check.log.close()
        if args.work_dir is None:
            shutil.rmtree(scratch, ignore_errors=True)
    print(text)
    return 0 if check.steps and all(step.ok for step in check.steps) else 1


if __name__ == "__main__":
    sys.exit(main())
