"""Multi-scale deformable attention: the operator against a slow loop reference, its gradients, the module.

The operator tests run through both implementations (the ``implementation`` fixture): the PyTorch one and the
compiled CPU kernel. tests/test_ms_deform_attn_kernels.py compares the two directly and tests the kernels' own
paths (64-bit indices, instruction sets, CUDA).
"""
import math

import numpy as np
import pytest
import torch

from sparse_detr.layers import DeformableAttentionOutput, MSDeformAttn, multi_scale_deformable_attention
from sparse_detr.layers import ms_deform_attn as ms_deform_attn_module


@pytest.fixture(params=["pytorch", "compiled"])
def implementation(request, monkeypatch):
    """Run the test through the PyTorch implementation, then through the compiled kernel."""
    monkeypatch.setenv(ms_deform_attn_module.IMPLEMENTATION_VARIABLE, request.param)
    return request.param


def reference_ms_deform_attn(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    """Bilinear sampling with zero padding and pixel centres at (i + 0.5) / size, one location at a time.

    Same arguments as :func:`multi_scale_deformable_attention`; returns (N, Lq, M * D) in float64.
    """
    value = value.detach().double().numpy()
    locations = sampling_locations.detach().double().numpy()
    weights = attention_weights.detach().double().numpy()
    n, _, m, d = value.shape
    _, num_queries, _, num_levels, num_points, _ = locations.shape
    out = np.zeros((n, num_queries, m, d))
    for b in range(n):
        for q in range(num_queries):
            for h in range(m):
                for level in range(num_levels):
                    height, width = (int(s) for s in spatial_shapes[level])
                    start = int(level_start_index[level])
                    for p in range(num_points):
                        x = locations[b, q, h, level, p, 0] * width - 0.5
                        y = locations[b, q, h, level, p, 1] * height - 0.5
                        for row in (math.floor(y), math.floor(y) + 1):
                            for col in (math.floor(x), math.floor(x) + 1):
                                if 0 <= row < height and 0 <= col < width:
                                    bilinear = (1.0 - abs(x - col)) * (1.0 - abs(y - row))
                                    token = start + row * width + col
                                    out[b, q, h] += weights[b, q, h, level, p] * bilinear * value[b, token, h]
    return torch.from_numpy(out.reshape(n, num_queries, m * d))


def make_inputs(shapes, batch=2, queries=5, heads=2, head_dim=8, points=3, dtype=torch.float64,
                location_range=(-0.3, 1.3), seed=0):
    """Random operator inputs; locations are uniform in ``location_range`` (outside [0, 1] on purpose)."""
    generator = torch.Generator().manual_seed(seed)
    spatial_shapes = torch.tensor(shapes, dtype=torch.long)
    areas = spatial_shapes.prod(1)
    level_start_index = torch.cat([areas.new_zeros(1), areas.cumsum(0)[:-1]])
    levels = len(shapes)
    value = torch.randn(batch, int(areas.sum()), heads, head_dim, dtype=torch.float64, generator=generator)
    low, high = location_range
    locations = low + (high - low) * torch.rand(batch, queries, heads, levels, points, 2, dtype=torch.float64,
                                                generator=generator)
    logits = torch.randn(batch, queries, heads, levels * points, dtype=torch.float64, generator=generator)
    weights = logits.softmax(-1).view(batch, queries, heads, levels, points)
    return value.to(dtype), spatial_shapes, level_start_index, locations.to(dtype), weights.to(dtype)


# (H, W) of each level: odd sizes, 1x1 and 1xW / Hx1 levels, one and several levels
SHAPE_CASES = {
    "one_level": [(4, 6)],
    "odd_sizes": [(5, 7), (3, 3), (1, 1)],
    "thin_levels": [(1, 5), (6, 1), (2, 3), (1, 1)],
}


@pytest.mark.parametrize("shapes", SHAPE_CASES.values(), ids=SHAPE_CASES.keys())
@pytest.mark.parametrize("head_dim", [30, 32, 64, 71])
def test_matches_reference_in_float64(shapes, head_dim, implementation):
    inputs = make_inputs(shapes, queries=4, heads=2, head_dim=head_dim, points=3)
    out = multi_scale_deformable_attention(*inputs)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, reference_ms_deform_attn(*inputs), rtol=0, atol=1e-10)


@pytest.mark.parametrize("points", [1, 4])
def test_matches_reference_with_more_heads_and_points(points, implementation):
    inputs = make_inputs([(6, 9), (3, 5), (2, 3), (1, 2)], batch=1, queries=3, heads=4, head_dim=5, points=points)
    torch.testing.assert_close(multi_scale_deformable_attention(*inputs), reference_ms_deform_attn(*inputs),
                               rtol=0, atol=1e-10)


def test_locations_on_pixel_centres_read_the_pixel(implementation):
    value, spatial_shapes, level_start_index, _, _ = make_inputs([(3, 4)], batch=1, queries=1, heads=1, points=1)
    row, col = 1, 2
    locations = torch.tensor([(col + 0.5) / 4, (row + 0.5) / 3], dtype=torch.float64).view(1, 1, 1, 1, 1, 2)
    weights = torch.ones(1, 1, 1, 1, 1, dtype=torch.float64)
    out = multi_scale_deformable_attention(value, spatial_shapes, level_start_index, locations, weights)
    torch.testing.assert_close(out[0, 0], value[0, row * 4 + col, 0], rtol=0, atol=1e-12)


def test_locations_far_outside_give_zero(implementation):
    value, spatial_shapes, level_start_index, _, weights = make_inputs([(3, 4), (2, 2)], queries=3)
    locations = torch.full((2, 3, 2, 2, 3, 2), -0.6, dtype=torch.float64)
    locations[..., 1] = 1.8
    out = multi_scale_deformable_attention(value, spatial_shapes, level_start_index, locations, weights)
    assert torch.equal(out, torch.zeros_like(out))


def test_zero_queries(implementation):
    value, spatial_shapes, level_start_index, locations, weights = make_inputs([(3, 4), (1, 1)], queries=0)
    value.requires_grad_(True)
    out = multi_scale_deformable_attention(value, spatial_shapes, level_start_index, locations, weights)
    assert out.shape == (2, 0, 2 * 8)
    out.sum().backward()
    assert torch.equal(value.grad, torch.zeros_like(value))


def test_gradcheck_float64(implementation):
    value, spatial_shapes, level_start_index, locations, weights = make_inputs(
        [(3, 4), (2, 3), (1, 1)], batch=2, queries=3, heads=2, head_dim=3, points=2)
    for tensor in (value, locations, weights):
        tensor.requires_grad_(True)

    def op(value, locations, weights):
        return multi_scale_deformable_attention(value, spatial_shapes, level_start_index, locations, weights)

    assert torch.autograd.gradcheck(op, (value, locations, weights), eps=1e-6, atol=1e-7)


def test_query_chunks_match_reference(monkeypatch):
    monkeypatch.setenv(ms_deform_attn_module.IMPLEMENTATION_VARIABLE, "pytorch")
    # 2 * 2 * 3 * 2 * 4 = 96 corners per query: 2 queries per chunk, the last chunk shorter
    monkeypatch.setattr(ms_deform_attn_module, "_CPU_CHUNK_CORNERS", 200)
    value, spatial_shapes, level_start_index, locations, weights = make_inputs(
        [(3, 4), (2, 3), (1, 1)], batch=2, queries=5, heads=2, head_dim=3, points=2)
    out = multi_scale_deformable_attention(value, spatial_shapes, level_start_index, locations, weights)
    torch.testing.assert_close(out, reference_ms_deform_attn(value, spatial_shapes, level_start_index, locations,
                                                             weights), rtol=0, atol=1e-10)
    for tensor in (value, locations, weights):
        tensor.requires_grad_(True)

    def op(value, locations, weights):
        return multi_scale_deformable_attention(value, spatial_shapes, level_start_index, locations, weights)

    assert torch.autograd.gradcheck(op, (value, locations, weights), eps=1e-6, atol=1e-7)


def test_float32_matches_float64_reference(implementation):
    inputs = make_inputs([(7, 9), (4, 5), (2, 3), (1, 1)], queries=6, heads=2, head_dim=32, points=4,
                         dtype=torch.float32)
    out = multi_scale_deformable_attention(*inputs)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), reference_ms_deform_attn(*inputs), rtol=0, atol=1e-5)


# Half-precision values are accumulated in float32, so the error is the rounding of the result:
# 2^-11 (float16) and 2^-8 (bfloat16) relative, on outputs of magnitude ~1.
@pytest.mark.parametrize("dtype, tolerance", [(torch.float16, 2e-3), (torch.bfloat16, 1.6e-2)])
def test_half_precision_values(dtype, tolerance, implementation):
    value, spatial_shapes, level_start_index, locations, weights = make_inputs(
        [(7, 9), (4, 5), (1, 1)], queries=6, heads=2, head_dim=32, points=4)
    value = value.to(dtype)
    locations, weights = locations.float(), weights.float()
    out = multi_scale_deformable_attention(value, spatial_shapes, level_start_index, locations, weights)
    assert out.dtype == dtype
    expected = reference_ms_deform_attn(value, spatial_shapes, level_start_index, locations, weights)
    torch.testing.assert_close(out.double(), expected, rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_gradients_have_input_dtypes(dtype, implementation):
    value, spatial_shapes, level_start_index, locations, weights = make_inputs([(4, 5), (2, 2)], queries=3)
    value = value.to(dtype).requires_grad_(True)
    locations = locations.float().requires_grad_(True)
    weights = weights.float().requires_grad_(True)
    multi_scale_deformable_attention(value, spatial_shapes, level_start_index, locations, weights).sum().backward()
    assert (value.grad.dtype, locations.grad.dtype, weights.grad.dtype) == (dtype, torch.float32, torch.float32)
    assert all(torch.isfinite(g).all() for g in (value.grad, locations.grad, weights.grad))


def test_opcheck(implementation):
    value, spatial_shapes, level_start_index, locations, weights = make_inputs([(3, 4), (1, 2)], queries=3,
                                                                               head_dim=4, points=2)
    args = (value.requires_grad_(True), spatial_shapes, level_start_index, locations.requires_grad_(True),
            weights.requires_grad_(True))
    torch.library.opcheck(torch.ops.sparse_detr.ms_deform_attn.default, args)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype, tolerance", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_cuda_matches_cpu(dtype, tolerance):
    inputs = make_inputs([(7, 9), (4, 5), (2, 3), (1, 1)], queries=6, heads=2, head_dim=32, points=4, dtype=dtype)
    cpu = [tensor.clone().requires_grad_(tensor.is_floating_point()) for tensor in inputs]
    cuda = [tensor.cuda().requires_grad_(tensor.is_floating_point()) for tensor in inputs]
    grad_output = torch.randn(2, 6, 64, dtype=dtype)
    out_cpu, out_cuda = multi_scale_deformable_attention(*cpu), multi_scale_deformable_attention(*cuda)
    torch.testing.assert_close(out_cuda.cpu(), out_cpu, rtol=0, atol=tolerance)
    out_cpu.backward(grad_output)
    out_cuda.backward(grad_output.cuda())
    for index in (0, 3, 4):
        torch.testing.assert_close(cuda[index].grad.cpu(), cpu[index].grad, rtol=0, atol=10 * tolerance)


class TestValidation:
    def inputs(self):
        return list(make_inputs([(3, 4), (2, 2)], queries=3))

    def test_wrong_ndim(self):
        value, *rest = self.inputs()
        with pytest.raises(ValueError, match="value must be"):
            multi_scale_deformable_attention(value.flatten(2), *rest)
        inputs = self.inputs()
        inputs[3] = inputs[3][..., 0]
        with pytest.raises(ValueError, match="sampling_locations must be"):
            multi_scale_deformable_attention(*inputs)
        inputs = self.inputs()
        inputs[4] = inputs[4].flatten(3)
        with pytest.raises(ValueError, match="attention_weights must be"):
            multi_scale_deformable_attention(*inputs)
        inputs = self.inputs()
        inputs[1] = inputs[1].flatten()
        with pytest.raises(ValueError, match="spatial_shapes must be"):
            multi_scale_deformable_attention(*inputs)

    def test_mismatched_heads(self):
        inputs = self.inputs()
        inputs[3] = inputs[3][:, :, :1]
        with pytest.raises(ValueError, match=r"sampling_locations dimension 2 \(M \(heads\)\) is 1, expected 2"):
            multi_scale_deformable_attention(*inputs)

    def test_mismatched_points(self):
        inputs = self.inputs()
        inputs[4] = inputs[4][..., :2]
        with pytest.raises(ValueError, match=r"attention_weights dimension 4 \(P \(points\)\) is 2, expected 3"):
            multi_scale_deformable_attention(*inputs)

    def test_mismatched_levels(self):
        inputs = self.inputs()
        inputs[1], inputs[2] = inputs[1][:1], inputs[2][:1]
        with pytest.raises(ValueError, match=r"sampling_locations dimension 3 \(L \(levels\)\) is 2, expected 1"):
            multi_scale_deformable_attention(*inputs)
        inputs = self.inputs()
        inputs[2] = inputs[2][:1]
        with pytest.raises(ValueError, match="level_start_index has 1 entries for 2 levels"):
            multi_scale_deformable_attention(*inputs)

    def test_mismatched_batch(self):
        inputs = self.inputs()
        inputs[4] = inputs[4][:1]
        with pytest.raises(ValueError, match=r"attention_weights dimension 0 \(N \(batch\)\) is 1, expected 2"):
            multi_scale_deformable_attention(*inputs)

    def test_integer_value(self):
        value, *rest = self.inputs()
        with pytest.raises(ValueError, match="value must be a floating-point tensor"):
            multi_scale_deformable_attention(value.long(), *rest)

    def test_float_spatial_shapes(self):
        inputs = self.inputs()
        inputs[1] = inputs[1].float()
        with pytest.raises(ValueError, match="spatial_shapes and level_start_index must be integer"):
            multi_scale_deformable_attention(*inputs)


SHAPES = [(6, 8), (3, 4), (2, 2)]


def module_inputs(reference_dim, batch=2, queries=7, d_model=16, seed=0):
    generator = torch.Generator().manual_seed(seed)
    spatial_shapes = torch.tensor(SHAPES, dtype=torch.long)
    areas = spatial_shapes.prod(1)
    level_start_index = torch.cat([areas.new_zeros(1), areas.cumsum(0)[:-1]])
    query = torch.randn(batch, queries, d_model, dtype=torch.float64, generator=generator)
    value = torch.randn(batch, int(areas.sum()), d_model, dtype=torch.float64, generator=generator)
    reference = torch.rand(batch, queries, len(SHAPES), reference_dim, dtype=torch.float64, generator=generator)
    return query, reference, value, spatial_shapes, level_start_index


def random_module(d_model=16, n_heads=2, n_points=3, seed=1):
    """A module with random offset and weight layers, so that the test is not about the initialisation."""
    torch.manual_seed(seed)
    module = MSDeformAttn(d_model=d_model, n_levels=len(SHAPES), n_heads=n_heads, n_points=n_points).double()
    with torch.no_grad():
        for layer in (module.sampling_offsets, module.attention_weights, module.value_proj, module.output_proj):
            layer.weight.normal_(0.0, 0.3)
            layer.bias.normal_(0.0, 0.3)
    return module


@pytest.mark.parametrize("reference_dim", [2, 4])
def test_module_matches_reference(reference_dim):
    module = random_module()
    query, reference, value, spatial_shapes, level_start_index = module_inputs(reference_dim)
    out = module(query, reference, value, spatial_shapes, level_start_index)
    assert isinstance(out, DeformableAttentionOutput)

    n, lq, _ = query.shape
    m, levels, points = 2, len(SHAPES), 3
    offsets = module.sampling_offsets(query).view(n, lq, m, levels, points, 2)
    ref = reference[:, :, None, :, None, :]
    if reference_dim == 2:
        size_xy = spatial_shapes.flip(-1).double()[None, None, None, :, None, :]
        expected_locations = ref + offsets / size_xy
    else:
        expected_locations = ref[..., :2] + offsets / points * ref[..., 2:] * 0.5
    logits = module.attention_weights(query).view(n, lq, m, levels * points)
    expected_weights = logits.softmax(-1).view(n, lq, m, levels, points)
    values = module.value_proj(value).view(n, value.shape[1], m, -1)
    sampled = reference_ms_deform_attn(values, spatial_shapes, level_start_index, expected_locations,
                                       expected_weights)
    expected = module.output_proj(sampled)

    assert out.sampling_locations.shape == (n, lq, m, levels, points, 2)
    assert out.attention_weights.shape == (n, lq, m, levels, points)
    assert out.output.shape == (n, lq, 16)
    torch.testing.assert_close(out.sampling_locations, expected_locations, rtol=0, atol=1e-12)
    torch.testing.assert_close(out.attention_weights, expected_weights, rtol=0, atol=1e-12)
    torch.testing.assert_close(out.attention_weights.sum((-2, -1)), torch.ones(n, lq, m, dtype=torch.float64),
                               rtol=0, atol=1e-12)
    torch.testing.assert_close(out.output, expected, rtol=0, atol=1e-10)


@pytest.mark.parametrize("reference_dim", [2, 4])
def test_module_ignores_padded_values(reference_dim):
    module = random_module()
    query, reference, value, spatial_shapes, level_start_index = module_inputs(reference_dim)
    # image 0 fills the maps; image 1 is padded on the right half of every level
    padding_mask = torch.zeros(value.shape[:2], dtype=torch.bool)
    for (height, width), start in zip(SHAPES, level_start_index.tolist()):
        columns = torch.arange(height * width) % width
        padding_mask[1, start:start + height * width] = columns >= width // 2
    out = module(query, reference, value, spatial_shapes, level_start_index, padding_mask)

    changed = value.clone()
    changed[padding_mask] = 1e3 * torch.randn(int(padding_mask.sum()), value.shape[-1], dtype=torch.float64)
    out_changed = module(query, reference, changed, spatial_shapes, level_start_index, padding_mask)
    assert torch.equal(out.output, out_changed.output)

    unmasked = module(query, reference, changed, spatial_shapes, level_start_index)
    assert not torch.allclose(unmasked.output[1], out.output[1])
    torch.testing.assert_close(unmasked.output[0], out.output[0], rtol=0, atol=0)


def test_module_initialisation():
    module = MSDeformAttn(d_model=32, n_levels=3, n_heads=8, n_points=4)
    # head h looks along (cos, sin)(2 pi h / 8) scaled so that the largest component is 1
    directions = torch.tensor([(1, 0), (1, 1), (0, 1), (-1, 1), (-1, 0), (-1, -1), (0, -1), (1, -1)],
                              dtype=torch.float32)
    point_scale = torch.arange(1, 5, dtype=torch.float32).view(1, 4, 1)
    expected = (directions.view(8, 1, 2) * point_scale).view(8, 1, 4, 2).expand(8, 3, 4, 2)
    torch.testing.assert_close(module.sampling_offsets.bias.view(8, 3, 4, 2), expected, rtol=0, atol=1e-6)
    assert torch.equal(module.sampling_offsets.weight, torch.zeros_like(module.sampling_offsets.weight))
    for tensor in (module.attention_weights.weight, module.attention_weights.bias, module.value_proj.bias,
                   module.output_proj.bias):
        assert torch.equal(tensor, torch.zeros_like(tensor))
    # Xavier-uniform bound for a square 32x32 matrix
    bound = math.sqrt(6.0 / (32 + 32))
    for layer in (module.value_proj, module.output_proj):
        assert layer.weight.abs().max() <= bound and layer.weight.std() > 0.3 * bound

    query = torch.randn(1, 2, 32)
    weights = module(query, torch.rand(1, 2, 3, 2), torch.randn(1, 6 * 8 + 3 * 4 + 2 * 2, 32),
                     torch.tensor([(6, 8), (3, 4), (2, 2)]), torch.tensor([0, 48, 60])).attention_weights
    torch.testing.assert_close(weights, torch.full_like(weights, 1.0 / 12))


def test_module_three_heads_initialisation():
    module = MSDeformAttn(d_model=12, n_levels=1, n_heads=3, n_points=1)
    # (cos, sin)(120 deg) = (-1/2, sqrt(3)/2), divided by sqrt(3)/2
    expected = torch.tensor([(1.0, 0.0), (-1 / math.sqrt(3), 1.0), (-1 / math.sqrt(3), -1.0)])
    torch.testing.assert_close(module.sampling_offsets.bias.view(3, 2), expected, rtol=0, atol=1e-6)


def test_module_rejects_bad_reference_and_width():
    module = MSDeformAttn(d_model=16, n_levels=3, n_heads=2, n_points=3).double()
    query, reference, value, spatial_shapes, level_start_index = module_inputs(3)
    with pytest.raises(ValueError, match="reference_points must end in 2"):
        module(query, reference, value, spatial_shapes, level_start_index)
    with pytest.raises(ValueError, match="divisible"):
        MSDeformAttn(d_model=30, n_heads=8)
