"""The standard-operator samplings of deformable attention (for exported graphs) against the custom op."""
import pytest
import torch

from sparse_detr.layers import MSDeformAttn, ms_deform_attn, multi_scale_deformable_attention
from sparse_detr.layers.ms_deform_attn_export import SAMPLERS, standard_op_attention

# odd sizes, a 1x1 level and 1xW / Hx1 levels
LEVEL_SHAPES = [(5, 7), (3, 4), (1, 1), (1, 3), (2, 1)]


def random_inputs(batch=2, queries=6, heads=2, head_dim=4, points=3, seed=0):
    """Operator inputs in float64, locations uniform in [-0.3, 1.3] (outside the map on purpose)."""
    generator = torch.Generator().manual_seed(seed)
    tokens = sum(h * w for h, w in LEVEL_SHAPES)
    value = torch.randn(batch, tokens, heads, head_dim, dtype=torch.float64, generator=generator)
    shape = (batch, queries, heads, len(LEVEL_SHAPES), points)
    locations = -0.3 + 1.6 * torch.rand(*shape, 2, dtype=torch.float64, generator=generator)
    weights = torch.randn(*shape[:3], len(LEVEL_SHAPES) * points, dtype=torch.float64, generator=generator)
    return value, locations, weights.softmax(-1).view(shape)


def custom_op(value, locations, weights):
    shapes = torch.tensor(LEVEL_SHAPES)
    starts = torch.cat([shapes.new_zeros(1), shapes.prod(1).cumsum(0)[:-1]])
    return multi_scale_deformable_attention(value, shapes, starts, locations, weights)


@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
def test_sampler_equals_the_custom_op(sampler):
    value, locations, weights = random_inputs()
    # a location exactly on a pixel centre and one on the map's edge
    locations[0, 0, 0, 0, 0] = torch.tensor([0.5 / 7, 0.5 / 5], dtype=torch.float64)
    locations[0, 0, 0, 0, 1] = torch.tensor([1.0, 0.0], dtype=torch.float64)
    out = SAMPLERS[sampler](value, LEVEL_SHAPES, locations, weights)
    assert out.shape == (2, 6, 2 * 4)
    torch.testing.assert_close(out, custom_op(value, locations, weights), rtol=1e-12, atol=1e-12)


def test_sampler_rejects_level_shapes_that_do_not_fit_the_values():
    value, locations, weights = random_inputs()
    with pytest.raises(ValueError, match=r"value has 53 tokens, the level shapes .* make 51"):
        SAMPLERS["gather"](value, LEVEL_SHAPES[:-1], locations, weights)


def test_standard_op_attention_switches_every_module_and_restores_the_op():
    torch.manual_seed(0)
    attention = MSDeformAttn(d_model=8, n_levels=len(LEVEL_SHAPES), n_heads=2, n_points=3).double()
    value, _, _ = random_inputs()
    memory = value.flatten(2)
    query = torch.randn(2, 6, 8, dtype=torch.float64)
    references = torch.rand(2, 6, len(LEVEL_SHAPES), 2, dtype=torch.float64)
    shapes = torch.tensor(LEVEL_SHAPES)
    starts = torch.cat([shapes.new_zeros(1), shapes.prod(1).cumsum(0)[:-1]])
    expected = attention(query, references, memory, shapes, starts).output
    original = ms_deform_attn.multi_scale_deformable_attention
    with standard_op_attention(LEVEL_SHAPES, "gather"):
        assert ms_deform_attn.multi_scale_deformable_attention is not original
        switched = attention(query, references, memory, shapes, starts).output
    assert ms_deform_attn.multi_scale_deformable_attention is original
    torch.testing.assert_close(switched, expected, rtol=1e-12, atol=1e-12)
    with pytest.raises(RuntimeError, match="standard-operator sampling was not used"):
        with standard_op_attention(LEVEL_SHAPES):
            pass
    with pytest.raises(ValueError, match="unknown deformable-attention sampler 'loop'"):
        with standard_op_attention(LEVEL_SHAPES, "loop"):
            pass
