"""The CUDA launcher (csrc/ms_deform_attn_cuda.cu) executed on the CPU: every line of it but the CUDA runtime calls,
compiled for the host under csrc/emulation/cuda_emulation.h (tests/cuda_emulation.py builds it). Each emulated
launch runs every block and thread of its grid in a shuffled order; outputs and location/weight gradients start
as NaN; every 16-byte access checks its alignment; the sm_90 four-float atomic and the scalar atomics of older
GPUs are both emulated.

The emulated CUDA path is compared with the CPU kernel (the same bodies, the CPU launcher): float64 to 1e-12, the
other dtypes by the float64 reference error (``assert_near_reference``).
"""
import pytest
import torch

from cuda_emulation import emulated_ops
from test_ms_deform_attn import make_inputs
from test_ms_deform_attn_kernels import assert_near_reference, typed_inputs

DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
ARCHS = [900, 750]  # Hopper's vector atomics; scalar atomics (Turing to Ada)


@pytest.fixture(scope="module")
def emulated():
    ops = emulated_ops()
    yield ops
    ops.configure(900, 0, 1)


def cpu_kernel(inputs, grad_output, force_int64=False, value_grad=True):
    ops = torch.ops.sparse_detr_C
    return ((ops.ms_deform_attn_forward(*inputs, force_int64),)
            + tuple(ops.ms_deform_attn_backward(grad_output, *inputs, force_int64, value_grad)))


def emulated_kernel(ops, inputs, grad_output, arch=900, seed=0, multiprocessors=1, force_int64=False,
                    value_grad=True):
    ops.configure(arch, seed, multiprocessors)
    ops.take_launches()
    out = ops.ms_deform_attn_forward(*inputs, force_int64)
    grads = ops.ms_deform_attn_backward(grad_output, *inputs, force_int64, value_grad)
    return (out,) + tuple(grads), ops.take_launches()


def unaligned_copy(tensor):
    """The same values in a view whose data starts one element past a 16-byte boundary."""
    storage = torch.empty(tensor.numel() + 1, dtype=tensor.dtype)
    view = storage[1:].view(tensor.shape).copy_(tensor)
    assert view.data_ptr() % 16 != 0 and view.is_contiguous()
    return view


def assert_same_as_cpu_kernel(actual, expected, inputs, grad_output, dtype):
    names = ("output", "grad_value", "grad_sampling_locations", "grad_attention_weights")
    for name, a, e in zip(names, actual, expected):
        assert a.dtype == e.dtype and a.shape == e.shape, name
        assert not a.isnan().any(), f"{name}: an element was never written"
    if dtype == torch.float64:
        for name, a, e in zip(names, actual, expected):
            torch.testing.assert_close(a, e, rtol=0, atol=1e-12, msg=name)
    else:
        assert_near_reference(actual, expected, inputs, grad_output)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [2, 4, 8, 16, 30, 32, 64, 71])
def test_emulated_cuda_launcher_matches_the_cpu_kernel(emulated, dtype, head_dim):
    """Every dtype and head dim, both index types, aligned and unaligned value and grad_output, both atomic paths."""
    inputs, grad_output = typed_inputs(dtype, head_dim=head_dim, queries=5)
    expected = cpu_kernel(inputs, grad_output)
    vector = 16 // inputs[0].element_size()
    for force_int64 in (False, True):
        for case in ("aligned", "unaligned value", "unaligned grad_output"):
            value = unaligned_copy(inputs[0]) if case == "unaligned value" else inputs[0]
            grad = unaligned_copy(grad_output) if case == "unaligned grad_output" else grad_output
            case_inputs = (value,) + inputs[1:]
            for arch in ARCHS:
                actual, launches = emulated_kernel(emulated, case_inputs, grad, arch=arch, force_int64=force_int64)
                assert_same_as_cpu_kernel(actual, expected, inputs, grad_output, dtype)
                forward_path, backward_path = (launch.split()[0] for launch in launches)
                vectors = head_dim % vector == 0
                assert forward_path == ("forward_kernel<kVector>" if vectors and case != "unaligned value"
                                        else "forward_kernel<1>"), case
                assert backward_path == ("backward_kernel<kVector>" if vectors and case == "aligned"
                                         else "backward_kernel<1>"), case


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_every_thread_loops_when_the_grid_is_smaller_than_the_work(emulated, dtype):
    """With one emulated multiprocessor the grid holds 32 blocks of 256 threads: 9,600 forward units and 2,400
    backward points x 4 levels make every thread run its grid-stride loop several times; with 1,000
    multiprocessors every unit has its own thread. Both give the CPU kernel's result, for several shuffles."""
    inputs, grad_output = typed_inputs(dtype, shapes=((7, 9), (4, 5), (2, 3), (1, 1)), head_dim=32, queries=300,
                                       batch=2)
    expected = cpu_kernel(inputs, grad_output)
    units = 2 * 300 * 2 * (32 // (16 // inputs[0].element_size()))
    for multiprocessors, blocks in [(1, 32), (1000, -(-units // 256))]:
        for seed in (0, 1):
            actual, launches = emulated_kernel(emulated, inputs, grad_output, seed=seed,
                                               multiprocessors=multiprocessors)
            assert launches[0] == f"forward_kernel<kVector> blocks={blocks} threads=256"
            assert_same_as_cpu_kernel(actual, expected, inputs, grad_output, dtype)
    assert units > 32 * 256


@pytest.mark.parametrize("shapes, batch, queries", [
    (((1, 1),), 2, 3), (((1, 1), (1, 1), (2, 1)), 1, 4), (((3, 4),), 0, 3), (((3, 4), (1, 1)), 2, 0),
], ids=["one_cell", "one_cell_levels", "zero_batch", "zero_queries"])
def test_emulated_edges(emulated, shapes, batch, queries):
    for dtype in (torch.float64, torch.float32):
        inputs, grad_output = typed_inputs(dtype, shapes=shapes, head_dim=32, queries=queries, batch=batch)
        expected = cpu_kernel(inputs, grad_output)
        for arch in ARCHS:
            actual, _ = emulated_kernel(emulated, inputs, grad_output, arch=arch)
            assert_same_as_cpu_kernel(actual, expected, inputs, grad_output, dtype)


def test_a_level_table_outside_value_stops_the_cuda_launcher(emulated):
    """Where a GPU stops with a device-side assertion before reading or writing outside value, the emulation raises
    the CPU launcher's error, in the forward and the backward."""
    value, spatial_shapes, level_start_index, locations, weights = make_inputs([(3, 4), (2, 2)], queries=2)
    grad_output = torch.randn(2, 2, 16, dtype=torch.float64)
    bad_tables = [(spatial_shapes, torch.tensor([0, 14]), "level 1 \\(2 x 2 cells from token 14\\)"),
                  (spatial_shapes, torch.tensor([0, 17]), "level 1 \\(2 x 2 cells from token 17\\)"),
                  (torch.tensor([(5, 4), (2, 2)]), level_start_index, "level 0 \\(5 x 4 cells from token 0\\)"),
                  (spatial_shapes, torch.tensor([-1, 12]), "level 0 \\(3 x 4 cells from token -1\\)")]
    for shapes, starts, message in bad_tables:
        inputs = (value, shapes, starts, locations, weights)
        for run in (lambda: emulated.ms_deform_attn_forward(*inputs),
                    lambda: emulated.ms_deform_attn_backward(grad_output, *inputs)):
            with pytest.raises(RuntimeError, match=message + " does not fit in the 16 tokens of value"):
                run()
        with pytest.raises(RuntimeError, match=message + " does not fit in the 16 tokens of value"):
            torch.ops.sparse_detr_C.ms_deform_attn_forward(*inputs)


def test_the_value_gradient_is_skipped_when_not_asked_for(emulated):
    inputs, grad_output = typed_inputs(torch.float32, head_dim=32)
    full, _ = emulated_kernel(emulated, inputs, grad_output)
    partial, _ = emulated_kernel(emulated, inputs, grad_output, value_grad=False)
    cpu_partial = cpu_kernel(inputs, grad_output, value_grad=False)
    for result in (partial, cpu_partial):
        assert result[1].numel() == 0
        for a, e in zip(result[2:], full[2:]):
            torch.testing.assert_close(a, e, rtol=1e-6, atol=1e-6)


def test_deterministic_mode_refuses_the_atomic_value_gradient(emulated):
    """The CUDA value gradient sums atomic adds in thread order: under torch.use_deterministic_algorithms(True) it
    raises, as PyTorch's own atomics-based kernels do. Without a value gradient the backward is deterministic
    (every point writes its own gradients once) and runs; the CPU kernel is deterministic and always runs."""
    inputs, grad_output = typed_inputs(torch.float32, head_dim=32)
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        with pytest.raises(RuntimeError, match="ms_deform_attn_backward .*does not have a deterministic"):
            emulated.ms_deform_attn_backward(grad_output, *inputs)
        first = emulated.ms_deform_attn_backward(grad_output, *inputs, value_grad=False)
        emulated.configure(900, 7, 1)
        second = emulated.ms_deform_attn_backward(grad_output, *inputs, value_grad=False)
        for a, e in zip(first[1:], second[1:]):
            assert torch.equal(a, e)
        cpu_kernel(inputs, grad_output)
    finally:
        torch.use_deterministic_algorithms(was)
