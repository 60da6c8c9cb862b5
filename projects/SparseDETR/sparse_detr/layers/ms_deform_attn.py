"""Multi-scale deformable attention (Deformable DETR, Zhu et al. 2021), as an operator and a module.

The operator ``torch.ops.sparse_detr.ms_deform_attn`` is a ``torch.library`` custom op with an
autograd formula and fake (meta) implementations, so ``torch.compile`` and ``torch.export`` trace
through it. Its default implementation, used on every device that has no compiled kernel, is
written in PyTorch: every sampling location contributes to the four neighbouring cells of its
level with bilinear weights, so the whole operator is one weighted gather-sum

    out[n, q, m] = sum_k  w[n, q, m, k] * value[n, idx[n, q, m, k], m]        (k over L * P * 4 corners)

that ``F.embedding_bag`` computes in one fused pass, without materialising the gathered values.
The backward uses the matching aten kernels (scatter-add into the value table, dot products for
the per-corner weights) and differentiates the bilinear weights by hand.
"""
from typing import NamedTuple, Optional

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["multi_scale_deformable_attention", "MSDeformAttn", "DeformableAttentionOutput"]

_EMBEDDING_BAG_SUM = 0


def _compute_dtype(value: Tensor, sampling_locations: Tensor) -> torch.dtype:
    """Locations and accumulation stay in (at least) float32, even for half-precision values."""
    return torch.promote_types(torch.promote_types(value.dtype, torch.float32), sampling_locations.dtype)


def _bilinear_corners(spatial_shapes: Tensor, level_start_index: Tensor, sampling_locations: Tensor,
                      num_tokens: int, dtype: torch.dtype):
    """Rows of the flattened value table and bilinear weights of the four cells around each location.

    Args:
        spatial_shapes: (L, 2) int64 (H, W) of each level.
        level_start_index: (L,) start of each level in the flattened token axis.
        sampling_locations: (N, Lq, M, L, P, 2), (x, y) in [0, 1], pixel centres at (i + 0.5) / size.
        num_tokens: S, the length of the flattened token axis.

    Returns:
        rows: (N, Lq, M, L, P, 4) int64 rows of ``value.reshape(N * S * M, D)``.
        bilinear: (N, Lq, M, L, P, 4) bilinear weight of each corner, 0 outside the map.
        x_frac, y_frac, inside, width, height: what the backward needs to differentiate ``bilinear``.
    """
    n, _, m, num_levels, _, _ = sampling_locations.shape
    locations = sampling_locations.to(dtype)
    height = spatial_shapes[:, 0].view(num_levels, 1)
    width = spatial_shapes[:, 1].view(num_levels, 1)
    x = locations[..., 0] * width.to(dtype) - 0.5
    y = locations[..., 1] * height.to(dtype) - 0.5
    x0, y0 = x.floor(), y.floor()
    x_frac, y_frac = x - x0, y - y0
    x0, y0 = x0.long(), y0.long()
    # corner order: (x0, y0), (x0 + 1, y0), (x0, y0 + 1), (x0 + 1, y0 + 1)
    xs = torch.stack([x0, x0 + 1, x0, x0 + 1], dim=-1)
    ys = torch.stack([y0, y0, y0 + 1, y0 + 1], dim=-1)
    w4, h4 = width.unsqueeze(-1), height.unsqueeze(-1)
    inside = (xs >= 0) & (xs < w4) & (ys >= 0) & (ys < h4)
    token = level_start_index.view(num_levels, 1, 1) + ys.clamp(min=0) * w4 + xs.clamp(min=0)
    token = torch.where(inside, token, torch.zeros_like(token))
    batch = torch.arange(n, device=token.device).view(n, 1, 1, 1, 1, 1)
    head = torch.arange(m, device=token.device).view(1, 1, m, 1, 1, 1)
    rows = (batch * num_tokens + token) * m + head
    fx, fy = x_frac.unsqueeze(-1), y_frac.unsqueeze(-1)
    one = torch.ones_like(fx)
    wx = torch.cat([one - fx, fx, one - fx, fx], dim=-1)
    wy = torch.cat([one - fy, one - fy, fy, fy], dim=-1)
    bilinear = wx * wy * inside.to(dtype)
    return rows, bilinear, wx, wy, inside, width, height


@torch.library.custom_op("sparse_detr::ms_deform_attn", mutates_args=())
def _ms_deform_attn(value: Tensor, spatial_shapes: Tensor, level_start_index: Tensor,
                    sampling_locations: Tensor, attention_weights: Tensor) -> Tensor:
    n, num_tokens, m, d = value.shape
    num_queries = sampling_locations.shape[1]
    dtype = _compute_dtype(value, sampling_locations)
    rows, bilinear, *_ = _bilinear_corners(spatial_shapes, level_start_index, sampling_locations, num_tokens, dtype)
    weights = bilinear * attention_weights.to(dtype).unsqueeze(-1)
    table = value.reshape(n * num_tokens * m, d).to(dtype)
    bags = n * num_queries * m
    out = F.embedding_bag(rows.reshape(bags, -1), table, per_sample_weights=weights.reshape(bags, -1), mode="sum")
    return out.view(n, num_queries, m * d).to(value.dtype)


@_ms_deform_attn.register_fake
def _(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    n, _, m, d = value.shape
    return value.new_empty((n, sampling_locations.shape[1], m * d))


@torch.library.custom_op("sparse_detr::ms_deform_attn_backward", mutates_args=())
def _ms_deform_attn_backward(grad_output: Tensor, value: Tensor, spatial_shapes: Tensor, level_start_index: Tensor,
                             sampling_locations: Tensor, attention_weights: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    n, num_tokens, m, d = value.shape
    num_queries = sampling_locations.shape[1]
    dtype = _compute_dtype(value, sampling_locations)
    rows, bilinear, wx, wy, inside, width, height = _bilinear_corners(
        spatial_shapes, level_start_index, sampling_locations, num_tokens, dtype)
    attention = attention_weights.to(dtype).unsqueeze(-1)
    table = value.reshape(n * num_tokens * m, d).to(dtype)
    bags = n * num_queries * m
    corners = rows.shape[3] * rows.shape[4] * 4
    grad = grad_output.reshape(bags, d).to(dtype)
    flat_rows = rows.reshape(-1)
    offsets = torch.arange(0, bags * corners, corners, device=value.device)
    offset2bag = torch.arange(bags, device=value.device).repeat_interleave(corners)
    bag_size = torch.full((bags,), corners, dtype=torch.long, device=value.device)
    no_max = torch.empty(0, dtype=torch.long, device=value.device)
    weights = (bilinear * attention).reshape(-1)

    grad_table = torch.ops.aten._embedding_bag_dense_backward(
        grad, flat_rows, offset2bag, bag_size, no_max, table.shape[0], False, _EMBEDDING_BAG_SUM, weights, -1)
    # d out / d w[k] = value row k, so grad w[k] = <grad_out[bag], value[row k]>
    grad_corner = torch.ops.aten._embedding_bag_per_sample_weights_backward(
        grad, table, flat_rows, offsets, offset2bag, _EMBEDDING_BAG_SUM, -1).view(rows.shape)

    grad_attention = (grad_corner * bilinear).sum(-1)
    grad_bilinear = grad_corner * attention * inside.to(dtype)
    # bilinear = wx * wy with wx = (1 - fx, fx, 1 - fx, fx), fx = x * W - 0.5 - floor(...)
    sign_x = torch.tensor([-1.0, 1.0, -1.0, 1.0], dtype=dtype, device=value.device)
    sign_y = torch.tensor([-1.0, -1.0, 1.0, 1.0], dtype=dtype, device=value.device)
    grad_x = (grad_bilinear * wy * sign_x).sum(-1) * width.to(dtype)
    grad_y = (grad_bilinear * wx * sign_y).sum(-1) * height.to(dtype)
    grad_locations = torch.stack([grad_x, grad_y], dim=-1)
    return (grad_table.view(value.shape).to(value.dtype), grad_locations.to(sampling_locations.dtype),
            grad_attention.to(attention_weights.dtype))


@_ms_deform_attn_backward.register_fake
def _(grad_output, value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    return torch.empty_like(value), torch.empty_like(sampling_locations), torch.empty_like(attention_weights)


def _setup_context(ctx, inputs, output):
    value, spatial_shapes, level_start_index, sampling_locations, attention_weights = inputs
    ctx.save_for_backward(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)


def _backward(ctx, grad_output):
    value, spatial_shapes, level_start_index, sampling_locations, attention_weights = ctx.saved_tensors
    grad_value, grad_locations, grad_attention = torch.ops.sparse_detr.ms_deform_attn_backward(
        grad_output.contiguous(), value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    return grad_value, None, None, grad_locations, grad_attention


_ms_deform_attn.register_autograd(_backward, setup_context=_setup_context)


def _check(condition: bool, message: str):
    if not condition:
        raise ValueError(message)


def _validate(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    _check(value.dim() == 4, f"value must be (N, S, M, D), got {tuple(value.shape)}")
    _check(sampling_locations.dim() == 6 and sampling_locations.shape[-1] == 2,
           f"sampling_locations must be (N, Lq, M, L, P, 2), got {tuple(sampling_locations.shape)}")
    _check(attention_weights.dim() == 5,
           f"attention_weights must be (N, Lq, M, L, P), got {tuple(attention_weights.shape)}")
    _check(spatial_shapes.dim() == 2 and spatial_shapes.shape[1] == 2,
           f"spatial_shapes must be (L, 2) of (H, W), got {tuple(spatial_shapes.shape)}")
    _check(level_start_index.dim() == 1, f"level_start_index must be (L,), got {tuple(level_start_index.shape)}")
    _check(not spatial_shapes.is_floating_point() and not level_start_index.is_floating_point(),
           f"spatial_shapes and level_start_index must be integer tensors, got {spatial_shapes.dtype} and "
           f"{level_start_index.dtype}")
    for name, tensor in [("value", value), ("sampling_locations", sampling_locations),
                         ("attention_weights", attention_weights)]:
        _check(tensor.is_floating_point(), f"{name} must be a floating-point tensor, got {tensor.dtype}")
    n, _, m, _ = value.shape
    num_levels = spatial_shapes.shape[0]
    for dim, (name, expected) in enumerate([("N (batch)", n), ("Lq (queries)", sampling_locations.shape[1]),
                                            ("M (heads)", m), ("L (levels)", num_levels),
                                            ("P (points)", sampling_locations.shape[4])]):
        _check(sampling_locations.shape[dim] == expected,
               f"sampling_locations dimension {dim} ({name}) is {sampling_locations.shape[dim]}, expected {expected}")
        _check(attention_weights.shape[dim] == expected,
               f"attention_weights dimension {dim} ({name}) is {attention_weights.shape[dim]}, expected {expected}")
    _check(level_start_index.shape[0] == num_levels,
           f"level_start_index has {level_start_index.shape[0]} entries for {num_levels} levels in spatial_shapes")


def multi_scale_deformable_attention(value: Tensor, spatial_shapes: Tensor, level_start_index: Tensor,
                                     sampling_locations: Tensor, attention_weights: Tensor) -> Tensor:
    """Sample each head's values at the given locations of every level and sum them with the given weights.

    Args:
        value: (N, S, M, D) values of the S flattened tokens of all levels, M heads of D channels.
        spatial_shapes: (L, 2) int64, (H_l, W_l) of each level.
        level_start_index: (L,) int64, where each level starts in the token axis.
        sampling_locations: (N, Lq, M, L, P, 2), (x, y) in [0, 1] relative to each level;
            bilinear sampling, zeros outside, ``align_corners=False`` semantics.
        attention_weights: (N, Lq, M, L, P), A_{mlqk} of the paper (softmax over L * P already applied).

    Returns:
        (N, Lq, M * D) in the dtype of ``value``; half-precision values are accumulated in float32.
    """
    _validate(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    return torch.ops.sparse_detr.ms_deform_attn(value.contiguous(), spatial_shapes.long(), level_start_index.long(),
                                                sampling_locations.contiguous(), attention_weights.contiguous())


class DeformableAttentionOutput(NamedTuple):
    output: Tensor  # (N, Lq, C)
    sampling_locations: Tensor  # (N, Lq, M, L, P, 2), needed for the decoder attention map (DAM)
    attention_weights: Tensor  # (N, Lq, M, L, P)


class MSDeformAttn(nn.Module):
    """Multi-scale deformable attention module: offsets and weights predicted from the query.

    Args:
        d_model: C, the hidden dimension (must divide by ``n_heads``).
        n_levels: L, feature levels. n_heads: M. n_points: P, sampling points per head and level.
    """

    def __init__(self, d_model: int = 256, n_levels: int = 4, n_heads: int = 8, n_points: int = 4):
        super().__init__()
        if d_model % n_heads != 0:
            raise ValueError(f"d_model ({d_model}) must be divisible by n_heads ({n_heads})")
        self.d_model, self.n_levels, self.n_heads, self.n_points = d_model, n_levels, n_heads, n_points
        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(d_model, d_model)
        self.output_proj = nn.Linear(d_model, d_model)
        self.reset_parameters()

    def reset_parameters(self):
        nn.init.zeros_(self.sampling_offsets.weight)
        angles = torch.arange(self.n_heads, dtype=torch.float64) * (2.0 * math.pi / self.n_heads)
        directions = torch.stack([angles.cos(), angles.sin()], -1)
        directions = directions / directions.abs().max(-1, keepdim=True).values
        scales = torch.arange(1, self.n_points + 1, dtype=torch.float64).view(1, 1, -1, 1)
        bias = directions.view(self.n_heads, 1, 1, 2) * scales
        bias = bias.expand(self.n_heads, self.n_levels, self.n_points, 2)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(bias.reshape(-1))
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        for layer in (self.value_proj, self.output_proj):
            nn.init.xavier_uniform_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, query: Tensor, reference_points: Tensor, value: Tensor, spatial_shapes: Tensor,
                level_start_index: Tensor, padding_mask: Optional[Tensor] = None) -> DeformableAttentionOutput:
        """
        Args:
            query: (N, Lq, C), with position embedding added.
            reference_points: (N, Lq, L, 2) points (x, y) or (N, Lq, L, 4) boxes (cx, cy, w, h) in [0, 1],
                already scaled by each level's valid ratio.
            value: (N, S, C) flattened tokens of every level.
            spatial_shapes: (L, 2) (H, W); level_start_index: (L,).
            padding_mask: (N, S), True at padded tokens (their values are zeroed).
        """
        n, num_queries, _ = query.shape
        m, num_levels, points = self.n_heads, self.n_levels, self.n_points
        values = self.value_proj(value)
        if padding_mask is not None:
            values = values.masked_fill(padding_mask[..., None], 0.0)
        values = values.view(n, value.shape[1], m, self.d_model // m)
        offsets = self.sampling_offsets(query).view(n, num_queries, m, num_levels, points, 2)
        weights = self.attention_weights(query).view(n, num_queries, m, num_levels * points)
        weights = weights.softmax(-1).view(n, num_queries, m, num_levels, points)
        if reference_points.shape[-1] == 2:
            normalizer = torch.stack([spatial_shapes[..., 1], spatial_shapes[..., 0]], -1).to(offsets.dtype)
            locations = reference_points[:, :, None, :, None, :] + offsets / normalizer[None, None, None, :, None, :]
        elif reference_points.shape[-1] == 4:
            locations = (reference_points[:, :, None, :, None, :2]
                         + offsets / points * reference_points[:, :, None, :, None, 2:] * 0.5)
        else:
            raise ValueError(f"reference_points must end in 2 (points) or 4 (boxes), got {tuple(reference_points.shape)}")
        sampled = multi_scale_deformable_attention(values, spatial_shapes, level_start_index, locations, weights)
        return DeformableAttentionOutput(self.output_proj(sampled), locations, weights)
