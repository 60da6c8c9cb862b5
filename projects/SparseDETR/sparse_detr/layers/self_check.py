"""The self-check that makes the compiled CUDA kernel of ms_deform_attn the default (``auto``) on a GPU.

The first time a process runs the op on a GPU under ``SPARSE_DETR_MS_DEFORM_ATTN=auto``, :func:`verdict` looks
up that GPU's verdict in the cache and, without one, runs the check in a subprocess, so that a crash of the
kernel cannot take the user's process down:

    python -m sparse_detr.layers.self_check --device cuda:N --json REPORT

:func:`run_self_check` runs forward and backward through the compiled kernel and through the PyTorch
implementation at a sparse-encoder and a decoder shape (:data:`SHAPES`: batch 2, 8 heads, 4 levels, 4 points),
on the vector channel path (head dim 32) and the one-channel path (30), in float32, float16 and bfloat16, and
compares both with a float64 reference computed from the same rounded inputs (:func:`within_tolerance`).
Pass: the compiled kernel serves that GPU. Fail, or a crash (a signal, an error, a timeout): the PyTorch
implementation, and one warning.

The verdict is cached per :class:`DeviceKey` (GPU name, compute capability, driver version, torch version, hash
of the built extension) in ``$XDG_CACHE_HOME/sparse_detr/`` (default ``~/.cache/sparse_detr/``), one JSON file
per key, next to the check's full report; an exclusive lock on a file next to it makes processes that start
together (DDP) run one check and read its verdict. Deleting the verdict file runs the check again.
``SPARSE_DETR_MS_DEFORM_ATTN=compiled`` or ``=pytorch`` chooses without the check.
"""
import argparse
import datetime
import fcntl
import functools
import hashlib
import itertools
import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Dict, Iterator, NamedTuple, Optional, Sequence, Tuple

import torch
from torch import Tensor

from ..checkpoint import write_atomically
from . import ms_deform_attn as op

__all__ = ["DeviceKey", "device_key", "run_self_check", "verdict", "verdict_path", "within_tolerance"]

logger = logging.getLogger(__name__)

# The check's command, to which --device and --json are appended (tests substitute a fake check), and its limit.
CHECK_COMMAND = [sys.executable, "-m", "sparse_detr.layers.self_check"]
CHECK_TIMEOUT_S = 300.0
VERDICTS = ("pass", "fail", "crash")
DRIVER_VERSION_FILE = Path("/proc/driver/nvidia/version")
# The folder that holds the sparse_detr package this process runs: the check imports the same one.
PACKAGE_ROOT = Path(__file__).resolve().parents[2]

LEVELS = ((25, 38), (13, 19), (7, 10), (4, 5))  # (H, W) of Sparse DETR's levels at a 200x300 image: 1287 tokens
# Queries of each shape: the sparse encoder's top ~10 % of the tokens, and the decoder's 300 object queries.
SHAPES = {"sparse_encoder": 129, "decoder": 300}
BATCH, HEADS, POINTS = 2, 8, 4
HEAD_DIMS = (32, 30)  # 32: the vector channel path (16-byte packs on a GPU); 30: one channel at a time
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
TENSORS = ("output", "grad_value", "grad_sampling_locations", "grad_attention_weights")


# ---- the check ------------------------------------------------------------------------------------------


class Comparison(NamedTuple):
    """One result tensor of the compiled kernel and of the PyTorch implementation against the float64 reference."""
    err_compiled: float  # max |compiled - reference|
    err_pytorch: float  # max |pytorch - reference|
    bound: float  # 4 * err_pytorch + 16 * eps * max(1, max |reference|)
    finite: bool  # both results free of inf and NaN

    @property
    def passed(self) -> bool:
        return self.finite and self.err_compiled <= self.bound

    @property
    def ratio(self) -> float:
        return self.err_compiled / self.bound if self.finite else float("inf")


def _max_abs(tensor: Tensor) -> float:
    return float(tensor.abs().max()) if tensor.numel() else 0.0


def compare(compiled: Tensor, pytorch: Tensor, reference: Tensor, dtype: torch.dtype) -> Comparison:
    """The errors of both results and the compiled kernel's bound (see :func:`within_tolerance`)."""
    reference = reference.double()
    err_compiled = _max_abs(compiled.double() - reference)
    err_pytorch = _max_abs(pytorch.double() - reference)
    bound = 4.0 * err_pytorch + 16.0 * torch.finfo(dtype).eps * max(1.0, _max_abs(reference))
    finite = bool(torch.isfinite(compiled).all() and torch.isfinite(pytorch).all())
    return Comparison(err_compiled, err_pytorch, bound, finite)


def within_tolerance(compiled: Tensor, pytorch: Tensor, reference: Tensor, dtype: torch.dtype) -> Tuple[bool, float]:
    """Whether the compiled kernel's result is as close to the float64 reference as the PyTorch implementation's.

    Passes iff both results are finite and ``max|compiled - ref| <= 4 * max|pytorch - ref| + 16 * eps *
    max(1, max|ref|)`` (in float64), with eps that of ``dtype``, the type the result was rounded to: the values'
    dtype for the output and the value gradient, the locations' (float32 for half-precision values) for the
    location and weight gradients. Returns (passed, error / bound), the ratio inf for a non-finite result.
    """
    comparison = compare(compiled, pytorch, reference, dtype)
    return comparison.passed, comparison.ratio


def _inputs(queries: int, head_dim: int, dtype: torch.dtype, seed: int):
    """Random operator inputs, rounded to ``dtype`` (values, grad_output) and float32 (locations, weights)."""
    generator = torch.Generator().manual_seed(seed)
    spatial_shapes = torch.tensor(LEVELS)
    areas = spatial_shapes.prod(1)
    level_start_index = torch.cat([areas.new_zeros(1), areas.cumsum(0)[:-1]])
    value = torch.randn(BATCH, int(areas.sum()), HEADS, head_dim, dtype=torch.float64, generator=generator)
    # a few locations fall just outside the map, as the encoder's and decoder's do
    locations = torch.rand(BATCH, queries, HEADS, len(LEVELS), POINTS, 2, dtype=torch.float64,
                           generator=generator) * 1.1 - 0.05
    logits = torch.randn(BATCH, queries, HEADS, len(LEVELS) * POINTS, dtype=torch.float64, generator=generator)
    weights = logits.softmax(-1).view(BATCH, queries, HEADS, len(LEVELS), POINTS)
    grad_output = torch.randn(BATCH, queries, HEADS * head_dim, dtype=torch.float64, generator=generator)
    inputs = (value.to(dtype), spatial_shapes, level_start_index, locations.float(), weights.float())
    return inputs, grad_output.to(dtype)


def _forward_backward(implementation: str, inputs: Sequence[Tensor], grad_output: Tensor) -> Tuple[Tensor, ...]:
    """Output and (value, locations, weights) gradients through one implementation (never ``auto``)."""
    value, spatial_shapes, level_start_index, locations, weights = inputs
    leaves = [t.detach().clone().requires_grad_(True) for t in (value, locations, weights)]
    with op.use_implementation(implementation):
        out = op.multi_scale_deformable_attention(leaves[0], spatial_shapes, level_start_index, leaves[1], leaves[2])
        grads = torch.autograd.grad(out, leaves, grad_output)
    return (out.detach(),) + grads


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"


def run_self_check(device: str) -> Dict:
    """Compare the compiled kernel on ``device`` and the PyTorch implementation with the float64 reference.

    In this process, at every shape, head dim and dtype (module docstring). Returns a JSON-able report:
    ``{"device", "gpu", "passed", "summary", "cases", "failures"}``; each case is one result tensor of one
    configuration, ``{"dtype", "shape", "head_dim", "tensor", "err_compiled", "err_pytorch", "bound", "passed"}``,
    and ``failures`` are the cases that did not pass.
    """
    target = torch.device(device)
    cases = []
    for seed, (shape, head_dim, dtype) in enumerate(itertools.product(SHAPES, HEAD_DIMS, DTYPES)):
        inputs, grad_output = _inputs(SHAPES[shape], head_dim, dtype, seed)
        reference = _forward_backward("pytorch", [t.double() if t.is_floating_point() else t for t in inputs],
                                      grad_output.double())
        on_device = [t.to(target) for t in inputs]
        compiled = _forward_backward("compiled", on_device, grad_output.to(target))
        pytorch = _forward_backward("pytorch", on_device, grad_output.to(target))
        for name, c, p, r in zip(TENSORS, compiled, pytorch, reference):
            comparison = compare(c.cpu(), p.cpu(), r, c.dtype)
            cases.append({"dtype": str(dtype).replace("torch.", ""), "shape": shape, "head_dim": head_dim,
                          "tensor": name, "err_compiled": comparison.err_compiled,
                          "err_pytorch": comparison.err_pytorch, "bound": comparison.bound,
                          "passed": comparison.passed})
    failures = [case for case in cases if not case["passed"]]
    name = _device_name(target)
    if failures:
        worst = max(failures, key=lambda case: case["err_compiled"] / case["bound"])
        summary = (f"ms_deform_attn self-check on {target} ({name}): FAILED {len(failures)} of {len(cases)} "
                   f"comparisons; the worst: {worst['dtype']} {worst['shape']} head dim {worst['head_dim']} "
                   f"{worst['tensor']}, error {worst['err_compiled']:.3g} against a bound of {worst['bound']:.3g}")
    else:
        largest = max(case["err_compiled"] / case["bound"] for case in cases)
        summary = (f"ms_deform_attn self-check on {target} ({name}): passed, {len(cases)} comparisons, the compiled "
                   f"kernel's largest error {largest:.2f} of its bound")
    return {"device": str(target), "gpu": name, "passed": not failures, "summary": summary, "cases": cases,
            "failures": failures}


# ---- the verdict cache ----------------------------------------------------------------------------------


class DeviceKey(NamedTuple):
    """What a verdict holds for: another GPU model, driver, torch or build of the extension is checked again."""
    gpu: str
    compute_capability: str
    driver: str
    torch: str
    extension: str  # sha256 of the sparse_detr._C shared library


def driver_version() -> str:
    """The NVIDIA kernel module's version, from :data:`DRIVER_VERSION_FILE` ("unknown" without it): torch has no
    public driver query (``torch.version.cuda`` is the CUDA runtime torch was built with)."""
    try:
        first_line = DRIVER_VERSION_FILE.read_text().partition("\n")[0]
    except OSError:
        return "unknown"
    version = re.search(r"\b\d+\.\d+(\.\d+)?\b", first_line)
    return version.group(0) if version else first_line.strip() or "unknown"


@functools.lru_cache(maxsize=None)
def extension_hash() -> str:
    """sha256 of the loaded ``sparse_detr._C`` file, computed once per process."""
    with open(op._compiled.__file__, "rb") as library:
        return hashlib.file_digest(library, "sha256").hexdigest()


def device_key(device: torch.device) -> DeviceKey:
    """The cache key of CUDA device ``device``."""
    properties = torch.cuda.get_device_properties(device)
    return DeviceKey(properties.name, f"{properties.major}.{properties.minor}", driver_version(), torch.__version__,
                     extension_hash())


def cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "sparse_detr"


def verdict_path(key: DeviceKey) -> Path:
    """``<cache dir>/ms_deform_attn_self_check_<hash of the key>.json``."""
    digest = hashlib.sha256(json.dumps(key._asdict(), sort_keys=True).encode()).hexdigest()
    return cache_dir() / f"ms_deform_attn_self_check_{digest[:16]}.json"


def read_verdict(path: Path) -> Optional[Dict]:
    """The record in ``path``; None when there is none, or an unreadable one (the check then runs again)."""
    try:
        record = json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        return None
    return record if isinstance(record, dict) and record.get("verdict") in VERDICTS else None


def _write_json(path: Path, data: Dict) -> None:
    write_atomically(str(path), lambda f: f.write(json.dumps(data, indent=1).encode()))


@contextmanager
def _exclusive(lock_path: Path, waiting_message: str) -> Iterator[None]:
    """Hold an exclusive lock on ``lock_path`` (created if need be) for the block; log once when waiting for it."""
    with open(lock_path, "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logger.info(waiting_message)
            fcntl.flock(lock, fcntl.LOCK_EX)
        yield  # closing the file releases the lock


def _last_lines(text, count: int = 20) -> str:
    if isinstance(text, bytes):  # a TimeoutExpired's output stays bytes even in text mode
        text = text.decode(errors="replace")
    return "\n".join((text or "").rstrip().splitlines()[-count:])


def _report_passed(report: Path) -> Optional[bool]:
    """The report's "passed", or None when the check wrote no readable report."""
    try:
        passed = json.loads(report.read_text()).get("passed")
    except (OSError, ValueError, AttributeError):
        return None
    return passed if isinstance(passed, bool) else None


def _run_check(device: torch.device, key: DeviceKey, path: Path) -> Dict:
    """Run the check in a subprocess and write its verdict into ``path``; returns the record."""
    report = path.with_suffix(".report.json")
    report.unlink(missing_ok=True)
    command = [*CHECK_COMMAND, "--device", str(device), "--json", str(report)]
    logger.info("ms_deform_attn: self-check of the compiled CUDA kernel on %s (%s), once per GPU model, driver and "
                "build: %s", device, key.gpu, " ".join(command))
    # this process's package first on the path; the check names the implementation of each of its calls, and the
    # variable set to pytorch makes sure that no other call in it can ask `auto` (and start another check)
    environment = {**os.environ, op.IMPLEMENTATION_VARIABLE: "pytorch", "PYTHONPATH": os.pathsep.join(
        p for p in (str(PACKAGE_ROOT), os.environ.get("PYTHONPATH", "")) if p)}
    try:
        run = subprocess.run(command, capture_output=True, text=True, errors="replace", env=environment,
                             timeout=CHECK_TIMEOUT_S)
    except subprocess.TimeoutExpired as expired:
        outcome, details = "crash", f"timed out after {CHECK_TIMEOUT_S:g} s; stderr:\n{_last_lines(expired.stderr)}"
    else:
        passed = _report_passed(report)
        summary = _last_lines(run.stdout, 1)
        if run.returncode == 0 and passed is True:
            outcome, details = "pass", summary
        elif run.returncode == 1 and passed is False:
            outcome, details = "fail", summary
        else:
            status = (f"killed by signal {-run.returncode} ({signal.strsignal(-run.returncode)})"
                      if run.returncode < 0 else f"exit status {run.returncode}")
            outcome, details = "crash", f"{status}; stderr:\n{_last_lines(run.stderr)}"
    record = {**key._asdict(), "verdict": outcome, "date": datetime.datetime.now().astimezone().isoformat(),
              "details": details, "report": str(report)}
    _write_json(path, record)
    return record


def _decide(device: torch.device) -> bool:
    """The cached verdict of ``device``'s key, the check run first when there is none; logs the outcome."""
    try:
        key = device_key(device)
        path = verdict_path(key)
        record, ran = read_verdict(path), False
        if record is None:
            path.parent.mkdir(parents=True, exist_ok=True)
            with _exclusive(path.with_suffix(".lock"), f"ms_deform_attn: waiting for another process's self-check "
                                                       f"of the compiled CUDA kernel on this GPU model ({path})"):
                record = read_verdict(path)  # another process may have written it while this one waited
                if record is None:
                    record, ran = _run_check(device, key, path), True
    except OSError as error:
        logger.warning("ms_deform_attn on %s: the PyTorch implementation runs, because the self-check of the "
                       "compiled CUDA kernel cannot keep its verdict in %s (%s); set XDG_CACHE_HOME to a writable "
                       "folder, or %s=compiled or %s=pytorch to choose without the check", device, cache_dir(),
                       error, op.IMPLEMENTATION_VARIABLE, op.IMPLEMENTATION_VARIABLE)
        return False
    outcome = record["verdict"]
    how = f"{'run now' if ran else 'cached'} in {path}"
    if outcome == "pass":
        logger.info("ms_deform_attn on %s (%s): the compiled CUDA kernel, which passed the self-check (%s)",
                    device, key.gpu, how)
        return True
    failed = "failed" if outcome == "fail" else "crashed in"
    logger.info("ms_deform_attn on %s (%s): the PyTorch implementation, because the compiled CUDA kernel %s the "
                "self-check (%s)", device, key.gpu, failed, how)
    logger.warning("The compiled CUDA kernel of ms_deform_attn %s its self-check on %s (%s), so the slower PyTorch "
                   "implementation runs; the verdict is in %s (delete it to check again); %s=compiled or "
                   "%s=pytorch forces either", failed, device, key.gpu, path, op.IMPLEMENTATION_VARIABLE,
                   op.IMPLEMENTATION_VARIABLE)
    return False


_VERDICTS: Dict[int, bool] = {}  # CUDA device index -> whether the compiled kernel serves it
_DECIDING = threading.Lock()


def verdict(device: torch.device) -> bool:
    """Whether the compiled kernel serves CUDA ``device`` under ``auto``: its GPU passed the self-check.

    Decided once per device and process (a dict lookup afterwards: the op asks at every call): from the cache,
    else by running the check (module docstring).
    """
    index = device.index if device.index is not None else torch.cuda.current_device()
    known = _VERDICTS.get(index)
    if known is None:
        with _DECIDING:
            known = _VERDICTS.get(index)
            if known is None:
                known = _VERDICTS[index] = _decide(torch.device("cuda", index))
    return known


# ---- the command line -----------------------------------------------------------------------------------


def _device_problem(text: str) -> Optional[str]:
    """Why ``--device text`` cannot be checked, or None."""
    try:
        device = torch.device(text)
    except RuntimeError:
        return f"--device {text!r} is not a device: cuda, cuda:N or cpu"
    if device.type not in ("cpu", "cuda"):
        return f"--device {text}: the compiled kernels are for cpu and cuda"
    if not op.compiled_kernels_available(device.type):
        return (f"--device {text}: sparse_detr._C has no {device.type} kernels (make setup builds them; "
                f"FORCE_CUDA=1 for CUDA)")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        return f"--device {text}: torch sees {torch.cuda.device_count()} CUDA device(s)"
    return None


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sparse_detr.layers.self_check", description=(
        "Check the compiled ms_deform_attn kernel against the PyTorch implementation and a float64 reference. "
        "Prints one summary line; exit status 0 when it passes, 1 when it fails, 2 for a wrong argument."))
    parser.add_argument("--device", default="cuda", help="cuda, cuda:N, or cpu for the compiled CPU kernel")
    parser.add_argument("--json", type=Path, help="also write the report (every comparison) into this file")
    args = parser.parse_args(argv)
    problem = _device_problem(args.device)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    report = run_self_check(args.device)
    if args.json:
        try:
            _write_json(args.json, report)
        except OSError as error:
            print(f"error: --json {args.json}: {error.strerror or error}", file=sys.stderr)
            return 2
    print(report["summary"])
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
