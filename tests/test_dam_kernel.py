"""The decoder attention map's CPU kernel (csrc/dam_cpu.cpp): dam.py's PyTorch computation bit for bit, and when
decoder_attention_map takes it."""
import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from sparse_detr.dam import dam_kernel_available, decoder_attention_map
from sparse_detr.layers.ms_deform_attn import use_implementation

pytestmark = pytest.mark.skipif(not dam_kernel_available(), reason="sparse_detr._C is not built (make setup)")

# the fast path's four levels at a small image, a 1 x 1 level, and a level of one row
SHAPES = torch.tensor([[10, 15], [5, 8], [1, 1], [1, 6]])
STARTS = torch.cat([SHAPES.new_zeros(1), SHAPES.prod(1).cumsum(0)[:-1]])


def pytorch_map(locations, weights, shapes=SHAPES, starts=STARTS):
    with use_implementation("pytorch"):
        return decoder_attention_map(shapes, starts, locations, weights)


def kernel_map(locations, weights, shapes=SHAPES, starts=STARTS):
    return torch.ops.sparse_detr_C.decoder_attention_map(shapes, starts, locations, weights)


def samples(leading, seed=0, points=3):
    """Locations over and beyond [0, 1] (corners outside every side), some on exact grid lines, and weights of both
    signs; (*leading, L, P, 2) and (*leading, L, P)."""
    generator = torch.Generator().manual_seed(seed)
    shape = (*leading, SHAPES.shape[0], points)
    locations = torch.rand(*shape, 2, generator=generator) * 1.4 - 0.2
    on_grid = torch.rand(shape, generator=generator) < 0.2  # location * size an integer: a zero fraction
    size = SHAPES.flip(-1).float().view(-1, 1, 2)
    locations = torch.where(on_grid[..., None], (locations * size).round() / size, locations)
    weights = torch.randn(shape, generator=generator)
    return locations, weights


def assert_same_bits(actual, expected):
    assert actual.shape == expected.shape and actual.dtype == expected.dtype == torch.float32
    nan = expected.isnan()
    assert torch.equal(actual.isnan(), nan)
    assert torch.equal(actual.view(torch.int32)[~nan], expected.view(torch.int32)[~nan])


@pytest.mark.parametrize("leading", [(1, 7, 2), (3, 2, 5, 4), (2, 1)])
def test_kernel_equals_the_pytorch_map_bit_for_bit(leading):
    """Every token's sum in the same order, every share rounded the same: the same bits, for one or several images
    and any layout of the samples' leading axes (the DAM's (N, layers, queries, heads, ...))."""
    locations, weights = samples(leading)
    expected = pytorch_map(locations, weights)
    assert expected.abs().sum() > 0 and (expected == 0).any()  # tokens reached and tokens not
    assert_same_bits(kernel_map(locations, weights), expected)


def test_kernel_keeps_nan_and_infinite_samples_where_pytorch_puts_them():
    """A NaN or infinite location (its corners outside the map) or weight: PyTorch adds NaN to token 0, or to the
    tokens a NaN weight reaches; the kernel gives the same map."""
    locations, weights = samples((2, 6, 3), seed=1)
    locations[0, 1, 2, 0, 0, 0] = float("nan")
    locations[0, 3, 0, 1, 1, 1] = float("inf")
    locations[1, 0, 0, 2, 2, 0] = -float("inf")
    weights[1, 4, 1, 0, 1] = float("nan")
    expected = pytorch_map(locations, weights)
    assert expected[0, 0].isnan() and expected[1].isnan().any()
    assert_same_bits(kernel_map(locations, weights), expected)


def test_decoder_attention_map_takes_the_kernel_unless_told_pytorch():
    """float32 on the CPU: the kernel under ``auto`` (and ``compiled``), PyTorch's operations under ``pytorch`` (the
    authors' code as the benchmark runs it), float64 always PyTorch's; the same map every way."""
    locations, weights = samples((1, 4, 2))

    def run(implementation, dtype=torch.float32):
        with use_implementation(implementation), profile(activities=[ProfilerActivity.CPU]) as trace:
            dam = decoder_attention_map(SHAPES, STARTS, locations.to(dtype), weights.to(dtype))
        return dam, any(e.name == "sparse_detr_C::decoder_attention_map" for e in trace.events())

    (auto, auto_kernel), (compiled, compiled_kernel), (plain, plain_kernel) = (
        run(name) for name in ("auto", "compiled", "pytorch"))
    assert auto_kernel and compiled_kernel and not plain_kernel
    assert_same_bits(auto, plain)
    assert_same_bits(compiled, plain)
    double, double_kernel = run("auto", torch.float64)
    assert not double_kernel and double.dtype == torch.float64
    torch.testing.assert_close(double.float(), plain, rtol=1e-5, atol=1e-6)


def test_kernel_handles_empty_inputs():
    locations, weights = samples((0, 3, 2))
    assert kernel_map(locations, weights).shape == (0, int(SHAPES.prod(1).sum()))
    locations, weights = samples((2, 0, 2))
    assert torch.equal(kernel_map(locations, weights), torch.zeros(2, int(SHAPES.prod(1).sum())))


def test_kernel_rejects_wrong_inputs_by_name():
    locations, weights = samples((1, 2, 2))
    with pytest.raises(RuntimeError, match="sampling_locations and attention_weights must be float32"):
        kernel_map(locations.double(), weights.double())
    with pytest.raises(RuntimeError, match=r"sampling_locations must be \(N, ..., L, P, 2\)"):
        kernel_map(locations, weights[..., :2])
    with pytest.raises(RuntimeError, match=r"spatial_shapes must be \(L, 2\) int64"):
        kernel_map(locations, weights, shapes=SHAPES.int())
    with pytest.raises(RuntimeError, match="level_start_index must start each level where the previous one ends"):
        kernel_map(locations, weights, starts=torch.tensor([0, 150, 150, 190]))
