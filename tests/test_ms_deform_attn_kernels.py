"""The compiled deformable-attention kernels (csrc/): against the PyTorch implementation and the float64 reference,
their own paths (64-bit indices, instruction sets, thread partitioning), the switch, the whole model through them,
and the CUDA kernel (skipped without a GPU).

Tolerances. float64: 1e-10 against the PyTorch implementation and the reference. Every other dtype is judged by
the float64 reference (the PyTorch implementation in float64 on the same rounded inputs): the compiled kernel's
error may be at most 4 times the PyTorch implementation's own error in that dtype, plus 16 units in the last
place of the dtype at the tensor's magnitude (``assert_near_reference``), and the comparisons run over several
seeds. A fixed tolerance would sit near float32 noise (the kernel's float32 location-gradient error reached half
of 1e-5 at head dim 71): this one scales with the error the dtype itself makes.
"""
import os
import subprocess
import sys
import textwrap
from shutil import which

import pytest
import torch
from detectron2.utils.events import EventStorage

import sparse_detr._C
from sparse_detr.layers import multi_scale_deformable_attention, use_implementation
from sparse_detr.layers import ms_deform_attn as ms_deform_attn_module
from sparse_detr.layers import self_check

from conftest import REPO_ROOT
from test_ms_deform_attn import SHAPE_CASES, make_inputs, reference_ms_deform_attn

VARIABLE = ms_deform_attn_module.IMPLEMENTATION_VARIABLE
ACCUMULATION = {torch.float64: torch.float64, torch.float32: torch.float32, torch.float16: torch.float32,
                torch.bfloat16: torch.float32}
SEEDS = (0, 1, 2)
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def run_op(name, value, spatial_shapes, level_start_index, locations, weights, grad_output):
    """Output and (value, locations, weights) gradients of the public op through one implementation. The inputs
    keep their memory (an unaligned view stays unaligned)."""
    leaves = [t.detach().requires_grad_(True) for t in (value, locations, weights)]
    with use_implementation(name):
        out = multi_scale_deformable_attention(leaves[0], spatial_shapes, level_start_index, leaves[1], leaves[2])
        grads = torch.autograd.grad(out, leaves, grad_output.to(out.dtype))
    return (out.detach(),) + grads


def typed_inputs(dtype, shapes=((7, 9), (4, 5), (2, 3), (1, 1)), head_dim=32, queries=6, **kwargs):
    value, spatial_shapes, level_start_index, locations, weights = make_inputs(
        list(shapes), queries=queries, head_dim=head_dim, points=4, **kwargs)
    accumulation = ACCUMULATION[dtype]
    grad_output = torch.randn(value.shape[0], queries, value.shape[2] * head_dim, dtype=torch.float64,
                              generator=torch.Generator().manual_seed(1 + kwargs.get("seed", 0)))
    return (value.to(dtype), spatial_shapes, level_start_index, locations.to(accumulation),
            weights.to(accumulation)), grad_output.to(dtype)


RESULT_NAMES = ("output", "grad_value", "grad_sampling_locations", "grad_attention_weights")


def float64_reference(inputs, grad_output):
    """Output and gradients of the PyTorch implementation in float64, from the same (already rounded) inputs."""
    value, spatial_shapes, level_start_index, locations, weights = inputs
    return run_op("pytorch", value.cpu().double(), spatial_shapes.cpu(), level_start_index.cpu(),
                  locations.cpu().double(), weights.cpu().double(), grad_output.cpu().double())


def assert_near_reference(actual, baseline, inputs, grad_output):
    """Each of ``actual``'s results is as close to the float64 reference as ``baseline``'s (the PyTorch
    implementation's, or the CPU kernel's) allows: the self-check's rule (``self_check.compare``), error <=
    4 * baseline error + 16 eps(dtype) * max(1, |ref|)."""
    reference = float64_reference(inputs, grad_output)
    for name, a, b, r in zip(RESULT_NAMES, actual, baseline, reference):
        assert a.dtype == b.dtype and a.shape == b.shape, name
        comparison = self_check.compare(a.cpu(), b.cpu(), r, a.dtype)
        assert comparison.passed, (f"{name}: error {comparison.err_compiled:.3g} against float64, bound "
                                   f"{comparison.bound:.3g} (finite: {comparison.finite})")


def assert_results_close(actual, expected, dtype, inputs=None, grad_output=None):
    """float64: within 1e-10 of ``expected``; other dtypes: ``assert_near_reference`` with ``expected`` as baseline."""
    if dtype != torch.float64:
        assert_near_reference(actual, expected, inputs, grad_output)
        return
    for name, a, e in zip(RESULT_NAMES, actual, expected):
        assert a.dtype == e.dtype and a.shape == e.shape, name
        torch.testing.assert_close(a.cpu().double(), e.cpu().double(), rtol=1e-10, atol=1e-10, msg=name)


# ---- the build and the switch -------------------------------------------------------------------------


def test_extension_is_built_with_the_cuda_part_when_nvcc_is_found():
    assert ms_deform_attn_module.compiled_kernels_available("cpu")
    if which("nvcc") and os.environ.get("FORCE_CUDA") != "0":  # scripts/bootstrap.sh compiles it then (CI does)
        assert sparse_detr._C.WITH_CUDA == 1
    assert ms_deform_attn_module.compiled_kernels_available("cuda") == bool(sparse_detr._C.WITH_CUDA)


def test_compiled_cpu_ops_are_found_by_name_and_a_missing_one_is_not(monkeypatch):
    # what the kernels' *_available() checks share: every op named, in a loaded build
    ops = ("ms_deform_attn_forward", "max_pool3x3s2", "quantize_uint8", "decoder_attention_map", "winograd_conv3x3")
    assert ms_deform_attn_module.compiled_cpu_ops_available(*ops)
    assert not ms_deform_attn_module.compiled_cpu_ops_available("max_pool3x3s2", "an_op_no_build_has")
    monkeypatch.setattr(ms_deform_attn_module, "_compiled", None)  # no build loaded
    assert not ms_deform_attn_module.compiled_cpu_ops_available("max_pool3x3s2")


@pytest.mark.parametrize("name, compiled_calls", [(None, 2), ("auto", 2), ("pytorch", 0), ("compiled", 2)])
def test_switch_picks_the_implementation_on_the_cpu(name, compiled_calls, monkeypatch):
    calls = []
    for function in ("_compiled_forward", "_compiled_backward"):
        original = getattr(ms_deform_attn_module, function)
        monkeypatch.setattr(ms_deform_attn_module, function,
                            lambda *args, _original=original: calls.append(1) or _original(*args))
    if name is None:
        monkeypatch.delenv(VARIABLE, raising=False)
    else:
        monkeypatch.setenv(VARIABLE, name)
    value, spatial_shapes, level_start_index, locations, weights = make_inputs([(3, 4)], queries=2)
    value.requires_grad_(True)
    multi_scale_deformable_attention(value, spatial_shapes, level_start_index, locations, weights).sum().backward()
    assert len(calls) == compiled_calls


def test_switch_on_cuda_follows_the_self_check_under_auto(monkeypatch):
    """auto: the CUDA kernel where the GPU passed the self-check (tests/test_self_check.py); compiled: the CUDA kernel
    without asking."""
    from sparse_detr.layers import self_check

    cuda, asked = torch.device("cuda", 0), []
    monkeypatch.setattr(self_check, "verdict", lambda device: asked.append(device) or True)
    monkeypatch.setenv(VARIABLE, "compiled")
    if sparse_detr._C.WITH_CUDA:
        assert ms_deform_attn_module._use_compiled(cuda)
    else:
        with pytest.raises(RuntimeError, match="no cuda kernels"):
            ms_deform_attn_module._use_compiled(cuda)
        monkeypatch.setenv(VARIABLE, "auto")
        assert not ms_deform_attn_module._use_compiled(cuda)  # no CUDA kernel, nothing to check
    assert asked == []
    monkeypatch.setattr(ms_deform_attn_module, "compiled_kernels_available", lambda device_type="cpu": True)
    monkeypatch.setenv(VARIABLE, "auto")
    for passed in (True, False):
        monkeypatch.setattr(self_check, "verdict", lambda device, _passed=passed: asked.append(device) or _passed)
        assert ms_deform_attn_module._use_compiled(cuda) is passed
    assert asked == [cuda, cuda]


def test_auto_on_cuda_keeps_deterministic_mode_on_the_pytorch_backward(monkeypatch):
    """The CUDA value gradient is a sum of atomic adds: with deterministic algorithms on, ``auto`` routes a backward
    that needs it to the PyTorch implementation (the forward and a backward without value gradient stay compiled)."""
    monkeypatch.setattr(ms_deform_attn_module, "compiled_kernels_available", lambda device_type="cpu": True)
    monkeypatch.setattr(self_check, "verdict", lambda device: True)
    monkeypatch.setenv(VARIABLE, "auto")
    cuda = torch.device("cuda")
    was = torch.are_deterministic_algorithms_enabled()
    try:
        for deterministic in (False, True):
            torch.use_deterministic_algorithms(deterministic)
            assert ms_deform_attn_module._use_compiled(cuda)
            assert ms_deform_attn_module._use_compiled(cuda, atomic_value_grad=False)
            assert ms_deform_attn_module._use_compiled(cuda, atomic_value_grad=True) == (not deterministic)
            assert ms_deform_attn_module._use_compiled(torch.device("cpu"), atomic_value_grad=True)
    finally:
        torch.use_deterministic_algorithms(was)


def test_switch_rejects_unknown_values(monkeypatch):
    monkeypatch.setenv(VARIABLE, "cuda")
    with pytest.raises(ValueError, match=f"{VARIABLE} must be one of auto, pytorch, compiled, got 'cuda'"):
        multi_scale_deformable_attention(*make_inputs([(3, 4)], queries=2))


def test_use_implementation_sets_and_restores_the_switch(monkeypatch):
    compiled_calls = []
    original = ms_deform_attn_module._compiled_forward
    monkeypatch.setattr(ms_deform_attn_module, "_compiled_forward",
                        lambda *args: compiled_calls.append(1) or original(*args))
    monkeypatch.setenv(VARIABLE, "compiled")
    with use_implementation("pytorch"):
        assert os.environ[VARIABLE] == "pytorch"
        multi_scale_deformable_attention(*make_inputs([(3, 4)], queries=2))
    assert os.environ[VARIABLE] == "compiled" and compiled_calls == []
    monkeypatch.delenv(VARIABLE)
    with use_implementation("compiled"):
        multi_scale_deformable_attention(*make_inputs([(3, 4)], queries=2))
    assert VARIABLE not in os.environ and len(compiled_calls) == 1
    with pytest.raises(ValueError, match="must be one of auto, pytorch, compiled, got 'cuda'"):
        with use_implementation("cuda"):
            pass


# ---- the compiled CPU kernel against the PyTorch implementation ----------------------------------------


# 128 and 256: the CPU forward takes four 32-channel groups of a head at a time (wide heads)
@pytest.mark.parametrize("shapes", SHAPE_CASES.values(), ids=SHAPE_CASES.keys())
@pytest.mark.parametrize("head_dim", [16, 30, 32, 64, 71, 128, 256])
def test_float64_output_and_gradients_match(shapes, head_dim):
    inputs, grad_output = typed_inputs(torch.float64, shapes, head_dim, queries=4)
    compiled = run_op("compiled", *inputs, grad_output)
    assert_results_close(compiled, run_op("pytorch", *inputs, grad_output), torch.float64)
    torch.testing.assert_close(compiled[0], reference_ms_deform_attn(*inputs), rtol=0, atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("head_dim", [8, 16, 30, 32, 64, 71, 128])
def test_lower_precisions_match(dtype, head_dim):
    for seed in SEEDS:
        inputs, grad_output = typed_inputs(dtype, head_dim=head_dim, seed=seed)
        assert_near_reference(run_op("compiled", *inputs, grad_output), run_op("pytorch", *inputs, grad_output),
                              inputs, grad_output)


def test_tolerances_reject_an_error_beyond_the_dtypes_own():
    """The reference-derived bound is tight enough to catch a one-unit slip in float32 (1e-4 here)."""
    inputs, grad_output = typed_inputs(torch.float32, head_dim=32)
    compiled, pytorch = run_op("compiled", *inputs, grad_output), run_op("pytorch", *inputs, grad_output)
    for index in range(4):
        perturbed = list(compiled)
        perturbed[index] = perturbed[index] + 1e-4 * perturbed[index].abs().max()
        with pytest.raises(AssertionError, match=RESULT_NAMES[index]):
            assert_near_reference(perturbed, pytorch, inputs, grad_output)


@pytest.mark.parametrize("value_dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("location_dtype", [torch.float32, torch.float64])
def test_every_dtype_combination(value_dtype, location_dtype):
    """float64 locations with lower-precision values compute in float64, as the PyTorch implementation does."""
    (value, spatial_shapes, level_start_index, locations, weights), grad_output = typed_inputs(value_dtype)
    inputs = (value, spatial_shapes, level_start_index, locations.to(location_dtype), weights.to(location_dtype))
    compiled, pytorch = run_op("compiled", *inputs, grad_output), run_op("pytorch", *inputs, grad_output)
    assert [t.dtype for t in compiled] == [value_dtype, value_dtype, location_dtype, location_dtype]
    if location_dtype == torch.float64:  # computed in float64 by both
        for a, e in zip(compiled, pytorch):
            torch.testing.assert_close(a.double(), e.double(), rtol=1e-10, atol=1e-10)
    else:
        assert_near_reference(compiled, pytorch, inputs, grad_output)


def edge_locations(width, height):
    """(x, y) pairs on the edges of a width x height map and around them: pixel centres, pixel borders, the map's
    borders, just inside and outside them, far outside, and NaN-free extremes."""
    xs = [0.0, 1.0, 0.5 / width, 1.0 - 0.5 / width, 1.0 / width, -0.5 / width, 1.0 + 0.5 / width, -1e-7, 1 + 1e-7,
          -3.0, 4.0, 1e30, -1e30]
    ys = [0.0, 1.0, 0.5 / height, 1.0 - 0.5 / height, 1.0 / height, -0.5 / height, 1.0 + 0.5 / height, 0.37, 2.0]
    return torch.tensor([(x, y) for x in xs for y in ys], dtype=torch.float64)


@pytest.mark.parametrize("shapes", [[(5, 7)], [(1, 1)], [(1, 6), (4, 1)]], ids=["odd", "one_cell", "thin"])
def test_locations_on_and_outside_the_edges(shapes):
    value, spatial_shapes, level_start_index, _, _ = make_inputs(shapes, batch=1, queries=1, heads=1, head_dim=32,
                                                                 points=1)
    height, width = shapes[0]
    pairs = edge_locations(width, height)
    count, levels = pairs.shape[0], len(shapes)
    locations = pairs.view(1, count, 1, 1, 1, 2).expand(1, count, 1, levels, 1, 2).contiguous()
    weights = torch.rand(1, count, 1, levels, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    grad_output = torch.randn(1, count, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    inputs = (value, spatial_shapes, level_start_index, locations, weights)
    compiled = run_op("compiled", *inputs, grad_output)
    assert_results_close(compiled, run_op("pytorch", *inputs, grad_output), torch.float64)
    torch.testing.assert_close(compiled[0], reference_ms_deform_attn(*inputs), rtol=0, atol=1e-10)
    assert compiled[0][0, -4:].abs().max() == 0  # the four points at +-1e30 read nothing


def test_zero_queries_and_zero_batch():
    for batch, queries in [(2, 0), (0, 3)]:
        inputs, _ = typed_inputs(torch.float32, queries=queries, batch=batch)
        grad_output = torch.zeros(batch, queries, 64)
        out, grad_value, grad_locations, grad_weights = run_op("compiled", *inputs, grad_output)
        assert out.shape == (batch, queries, 64) and grad_locations.shape == inputs[3].shape
        assert torch.equal(grad_value, torch.zeros_like(grad_value))


def test_empty_levels_read_nothing():
    """A level of 0 rows reads no value and gets no gradient; with no level at all the output is zero."""
    (value, spatial_shapes, level_start_index, locations, weights), grad_output = typed_inputs(
        torch.float64, shapes=((3, 4), (2, 2)))
    with_empty = (value, torch.tensor([(3, 4), (0, 5), (2, 2)]), torch.tensor([0, 12, 12]),
                  torch.stack([locations[:, :, :, 0], locations[:, :, :, 0], locations[:, :, :, 1]], 3),
                  torch.stack([weights[:, :, :, 0], weights[:, :, :, 0], weights[:, :, :, 1]], 3))
    compiled = torch.ops.sparse_detr_C
    out = compiled.ms_deform_attn_forward(*with_empty)
    grads = compiled.ms_deform_attn_backward(grad_output, *with_empty)
    expected = run_op("pytorch", value, spatial_shapes, level_start_index, locations, weights, grad_output)
    torch.testing.assert_close(out, expected[0], rtol=0, atol=1e-12)
    torch.testing.assert_close(grads[0], expected[1], rtol=0, atol=1e-12)
    assert torch.equal(grads[1][:, :, :, 1], torch.zeros_like(grads[1][:, :, :, 1]))
    no_levels = (value[:, :0], torch.zeros(0, 2, dtype=torch.long), torch.zeros(0, dtype=torch.long),
                 locations[:, :, :, :0], weights[:, :, :, :0])
    assert torch.equal(compiled.ms_deform_attn_forward(*no_levels), torch.zeros_like(out))
    grad_value, grad_locations, _ = compiled.ms_deform_attn_backward(grad_output, *no_levels)
    assert grad_value.shape == (2, 0, 2, 32) and grad_locations.shape == (2, 6, 2, 0, 4, 2)


def test_non_contiguous_inputs():
    inputs, grad_output = typed_inputs(torch.float32, head_dim=32)
    value, spatial_shapes, level_start_index, locations, weights = inputs
    # the same values, strided: heads and channels transposed in memory, every other query, x and y apart
    strided_value = value.transpose(2, 3).contiguous().transpose(2, 3)
    strided_locations = torch.stack([locations[..., 0], locations[..., 1]], 0).permute(1, 2, 3, 4, 5, 0)
    strided_weights = torch.cat([weights, weights], -1)[..., :weights.shape[-1]]
    assert not any(t.is_contiguous() for t in (strided_value, strided_locations, strided_weights))
    expected = run_op("compiled", *inputs, grad_output)
    strided = (strided_value, spatial_shapes.t().contiguous().t(), level_start_index, strided_locations,
               strided_weights)
    strided_grad = grad_output.transpose(0, 1).contiguous().transpose(0, 1)
    with use_implementation("compiled"):  # the registered op, without the public function's .contiguous()
        direct = ((torch.ops.sparse_detr.ms_deform_attn(*strided),)
                  + torch.ops.sparse_detr.ms_deform_attn_backward(strided_grad, *strided))
    for actual in (run_op("compiled", *strided, grad_output), direct):
        for a, e in zip(actual, expected):
            torch.testing.assert_close(a, e, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("head_dim", [30, 32, 64])
def test_forced_int64_index_path(dtype, head_dim):
    """The 64-bit index path (taken when an offset exceeds 2^31) on small inputs gives the 32-bit path's result."""
    (value, spatial_shapes, level_start_index, locations, weights), grad_output = typed_inputs(dtype, head_dim=head_dim)
    results = {}
    for force in (False, True):
        out = torch.ops.sparse_detr_C.ms_deform_attn_forward(value, spatial_shapes, level_start_index, locations,
                                                             weights, force)
        grads = torch.ops.sparse_detr_C.ms_deform_attn_backward(grad_output, value, spatial_shapes, level_start_index,
                                                                 locations, weights, force)
        results[force] = (out,) + grads
    inputs = (value, spatial_shapes, level_start_index, locations, weights)
    assert_results_close(results[True], results[False], dtype, inputs, grad_output)
    assert_results_close(results[True], run_op("pytorch", *inputs, grad_output), dtype, inputs, grad_output)


def test_backward_does_not_depend_on_the_number_of_threads():
    """The CPU backward gives every value row one writer (work split by image, level and group of heads):
    deterministic. 8 threads split the heads of a level, fewer keep them together."""
    inputs, grad_output = typed_inputs(torch.float32, batch=3, queries=50)
    threads = torch.get_num_threads()
    try:
        results = []
        for count in (1, 3, 8):
            torch.set_num_threads(count)
            results.append(torch.ops.sparse_detr_C.ms_deform_attn_backward(grad_output, *inputs))
    finally:
        torch.set_num_threads(threads)
    for result in results[1:]:
        for a, e in zip(result, results[0]):
            assert torch.equal(a, e)


@pytest.mark.parametrize("name", ["compiled", "pytorch"])
def test_a_value_without_gradient_is_not_differentiated(name, monkeypatch):
    """autograd asks the backward for the value gradient only when value needs one; the location and weight
    gradients are the same either way."""
    requests = []
    for function in ("_compiled_backward", "_pytorch_backward"):
        original = getattr(ms_deform_attn_module, function)
        monkeypatch.setattr(ms_deform_attn_module, function,
                            lambda *args, _original=original: requests.append(args[-1]) or _original(*args))
    inputs, grad_output = typed_inputs(torch.float64, head_dim=32)
    value, spatial_shapes, level_start_index, locations, weights = inputs
    full = run_op(name, *inputs, grad_output)
    leaves = [t.detach().requires_grad_(True) for t in (locations, weights)]
    with use_implementation(name):
        out = multi_scale_deformable_attention(value, spatial_shapes, level_start_index, *leaves)
        grads = torch.autograd.grad(out, leaves, grad_output)
    assert requests == [True, False]
    for a, e in zip(grads, full[2:]):
        torch.testing.assert_close(a, e, rtol=0, atol=1e-12)
    no_value_grad = torch.ops.sparse_detr.ms_deform_attn_backward(grad_output, *inputs, False)
    assert no_value_grad[0].numel() == 0


def test_level_table_outside_value_is_an_error():
    value, spatial_shapes, level_start_index, locations, weights = make_inputs([(3, 4)], queries=2)
    with pytest.raises(RuntimeError, match="does not fit in the 12 tokens of value"):
        torch.ops.sparse_detr_C.ms_deform_attn_forward(value, spatial_shapes + 1, level_start_index, locations,
                                                       weights)


def test_every_instruction_set():
    """The CPU loops are compiled for any x86-64, AVX2 and AVX-512; ATEN_CPU_CAPABILITY picks one per process."""
    script = textwrap.dedent("""
        import sys, torch
        sys.path.insert(0, "tests")
        from test_ms_deform_attn_kernels import assert_near_reference, run_op, typed_inputs
        for dtype in (torch.float32, torch.bfloat16):
            for head_dim in (32, 16, 64, 30, 128):
                inputs, grad_output = typed_inputs(dtype, head_dim=head_dim)
                assert_near_reference(run_op("compiled", *inputs, grad_output), run_op("pytorch", *inputs, grad_output),
                                      inputs, grad_output)
        print(torch.backends.cpu.get_cpu_capability())
    """)
    for capability in ("default", "avx2"):
        run = subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
                             env={**os.environ, "ATEN_CPU_CAPABILITY": capability, "OMP_NUM_THREADS": "1"})
        assert run.returncode == 0, run.stderr[-3000:]


# ---- the whole model through the compiled kernel --------------------------------------------------------


def test_a_training_step_gives_the_same_gradients(tiny_model, make_batch, single_thread):
    batch = make_batch({"height": 20, "width": 30, "boxes": [[2, 3, 14, 15], [10, 4, 28, 19]], "classes": [1, 4]},
                       {"height": 24, "width": 18, "boxes": [[1, 1, 17, 12]], "classes": [0]})
    results = {}
    for name in ("pytorch", "compiled"):
        model = tiny_model("sparse_detr_r50_rho0.3.yaml", dtype=torch.float64).train()
        model.backbone.requires_grad_(False)
        with use_implementation(name), EventStorage():
            losses = model(batch)
            sum(losses.values()).backward()
        results[name] = ({k: v.detach() for k, v in losses.items()},
                         {n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    (losses, grads), (compiled_losses, compiled_grads) = results["pytorch"], results["compiled"]
    assert losses.keys() == compiled_losses.keys() and grads.keys() == compiled_grads.keys()
    for key in losses:
        torch.testing.assert_close(compiled_losses[key], losses[key], rtol=1e-10, atol=1e-12, msg=key)
    for key in grads:
        torch.testing.assert_close(compiled_grads[key], grads[key], rtol=1e-8, atol=1e-10, msg=key)
    sampling_offsets = [k for k in grads if k.endswith("sampling_offsets.weight")]
    assert sampling_offsets and all(grads[k].abs().sum() > 0 for k in sampling_offsets)


# ---- the CUDA kernel ------------------------------------------------------------------------------------


def cuda_results(name, inputs, grad_output):
    return run_op(name, *[t.cuda() for t in inputs], grad_output.cuda())


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("head_dim", [30, 32, 64, 71])
def test_cuda_kernel_matches_cpu_kernel(dtype, head_dim):
    for seed in SEEDS:
        inputs, grad_output = typed_inputs(dtype, head_dim=head_dim, queries=33, seed=seed)
        cpu = run_op("compiled", *inputs, grad_output)
        cuda = [t.cpu() for t in cuda_results("compiled", inputs, grad_output)]
        assert_results_close(cuda, cpu, dtype, inputs, grad_output)


@needs_cuda
def test_cuda_kernel_edges_and_forced_int64_index():
    value, spatial_shapes, level_start_index, _, _ = make_inputs([(5, 7), (1, 1)], batch=1, queries=1, heads=2,
                                                                 head_dim=32, points=1)
    pairs = edge_locations(7, 5)
    count = pairs.shape[0]
    locations = pairs.view(1, count, 1, 1, 1, 2).expand(1, count, 2, 2, 1, 2).contiguous()
    weights = torch.rand(1, count, 2, 2, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    grad_output = torch.randn(1, count, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    inputs = [t.cuda() for t in (value, spatial_shapes, level_start_index, locations, weights)]
    expected = run_op("pytorch", value, spatial_shapes, level_start_index, locations, weights, grad_output)
    for force in (False, True):
        out = torch.ops.sparse_detr_C.ms_deform_attn_forward(*inputs, force)
        grads = torch.ops.sparse_detr_C.ms_deform_attn_backward(grad_output.cuda(), *inputs, force)
        assert_results_close([t.cpu() for t in (out,) + grads], expected, torch.float64)


def unaligned_cuda(tensor):
    """``tensor`` on the GPU in a view that starts one element past a 16-byte boundary."""
    storage = torch.empty(tensor.numel() + 1, dtype=tensor.dtype, device="cuda")
    view = storage[1:].view(tensor.shape).copy_(tensor)
    assert view.data_ptr() % 16 != 0 and view.is_contiguous()
    return view


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cuda_kernel_unaligned_value_and_grad_output_take_the_scalar_path(dtype):
    """Views with a storage offset reach the kernel as they are (no clone): the launcher must fall back to one
    channel per unit, for an unaligned value (forward and backward) and an unaligned grad_output (backward)."""
    (value, *rest), grad_output = typed_inputs(dtype, head_dim=32)
    inputs = [value] + rest
    expected = run_op("compiled", *inputs, grad_output)
    cuda_rest = [t.cuda() for t in rest]
    ops = torch.ops.sparse_detr_C
    for cuda_value, cuda_grad in [(unaligned_cuda(value), grad_output.cuda()),
                                  (value.cuda(), unaligned_cuda(grad_output)),
                                  (unaligned_cuda(value), unaligned_cuda(grad_output))]:
        actual = (ops.ms_deform_attn_forward(cuda_value, *cuda_rest),) + tuple(
            ops.ms_deform_attn_backward(cuda_grad, cuda_value, *cuda_rest))
        assert_results_close([t.cpu() for t in actual], expected, dtype, inputs, grad_output)
        public = run_op("compiled", cuda_value, *cuda_rest, cuda_grad)
        assert_results_close([t.cpu() for t in public], expected, dtype, inputs, grad_output)


@needs_cuda
def test_cuda_kernel_skips_the_value_gradient_and_alerts_in_deterministic_mode():
    inputs, grad_output = typed_inputs(torch.float32, head_dim=32)
    cuda_inputs = [t.cuda() for t in inputs]
    ops = torch.ops.sparse_detr_C
    full = ops.ms_deform_attn_backward(grad_output.cuda(), *cuda_inputs)
    partial = ops.ms_deform_attn_backward(grad_output.cuda(), *cuda_inputs, value_grad=False)
    assert partial[0].numel() == 0
    for a, e in zip(partial[1:], full[1:]):
        assert torch.equal(a, e)  # one write per point: the same bits with or without the value gradient
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        with pytest.raises(RuntimeError, match="does not have a deterministic implementation"):
            ops.ms_deform_attn_backward(grad_output.cuda(), *cuda_inputs)
        ops.ms_deform_attn_backward(grad_output.cuda(), *cuda_inputs, value_grad=False)
    finally:
        torch.use_deterministic_algorithms(was)


@needs_cuda
def test_cuda_kernel_level_table_outside_value_stops_with_an_assertion():
    """A device-side assertion ends the CUDA context, so the bad call runs in a subprocess."""
    script = textwrap.dedent("""
        import sys, torch
        import sparse_detr._C
        sys.path.insert(0, "tests")
        from test_ms_deform_attn import make_inputs
        value, shapes, starts, locations, weights = make_inputs([(3, 4), (2, 2)], queries=2)
        out = torch.ops.sparse_detr_C.ms_deform_attn_forward(value.cuda(), shapes.cuda(), torch.tensor([0, 14]).cuda(),
                                                             locations.cuda(), weights.cuda())
        torch.cuda.synchronize()
        print("no error")
    """)
    run = subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode != 0 and "no error" not in run.stdout
    assert "does not fit in the tokens of value" in run.stdout + run.stderr


@needs_cuda
def test_cuda_kernel_opcheck(monkeypatch):
    monkeypatch.setenv(VARIABLE, "compiled")
    value, spatial_shapes, level_start_index, locations, weights = make_inputs([(3, 4), (1, 2)], queries=3,
                                                                               head_dim=4, points=2)
    args = (value.cuda().requires_grad_(True), spatial_shapes.cuda(), level_start_index.cuda(),
            locations.cuda().requires_grad_(True), weights.cuda().requires_grad_(True))
    torch.library.opcheck(torch.ops.sparse_detr.ms_deform_attn.default, args)


@needs_cuda
def test_cuda_kernel_beyond_32_bit_offsets():
    """N * Lq * M * D > 2^31: the output's offsets need the 64-bit path. The first and last thousand queries are
    checked against the CPU kernel; only they get a gradient, so the value gradient is theirs alone."""
    queries, head_dim = (1 << 24) + 7, 128  # 2^31 + 896 output elements: 4 GiB in bfloat16
    value, spatial_shapes, level_start_index, _, _ = make_inputs([(256, 256)], batch=1, queries=1, heads=1,
                                                                 head_dim=head_dim, points=1)
    value = value.bfloat16()
    generator = torch.Generator(device="cuda").manual_seed(0)
    locations = torch.rand(1, queries, 1, 1, 1, 2, device="cuda", generator=generator) * 1.2 - 0.1
    weights = torch.rand(1, queries, 1, 1, 1, device="cuda", generator=generator)
    inputs = [value.cuda(), spatial_shapes.cuda(), level_start_index.cuda(), locations, weights]
    out = torch.ops.sparse_detr_C.ms_deform_attn_forward(*inputs)
    assert out.numel() > 2 ** 31
    checked = [slice(0, 1000), slice(queries - 1000, queries)]
    grad_output = torch.zeros_like(out)
    for rows in checked:
        grad_output[:, rows] = torch.randn(1, 1000, head_dim, device="cuda", generator=generator).bfloat16()
    grad_value, grad_locations, grad_weights = torch.ops.sparse_detr_C.ms_deform_attn_backward(grad_output, *inputs)
    expected_grad_value = torch.zeros(value.shape)
    for rows in checked:
        cpu_inputs = (value, spatial_shapes, level_start_index, locations[:, rows].cpu(), weights[:, rows].cpu())
        torch.testing.assert_close(out[:, rows].cpu(), torch.ops.sparse_detr_C.ms_deform_attn_forward(*cpu_inputs),
                                   rtol=1.6e-2, atol=1.6e-2)
        cpu_grad_value, cpu_grad_locations, cpu_grad_weights = torch.ops.sparse_detr_C.ms_deform_attn_backward(
            grad_output[:, rows].cpu(), *cpu_inputs)
        torch.testing.assert_close(grad_locations[:, rows].cpu(), cpu_grad_locations, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(grad_weights[:, rows].cpu(), cpu_grad_weights, rtol=1e-4, atol=1e-4)
        expected_grad_value += cpu_grad_value.float()
    torch.testing.assert_close(grad_value.cpu().float(), expected_grad_value, rtol=1.6e-2, atol=1.6e-2)
