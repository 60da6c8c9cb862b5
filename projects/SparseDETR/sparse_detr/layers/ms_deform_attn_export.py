"""Multi-scale deformable attention's sampling in standard operators, for exported graphs (ONNX, ``torch.export``).

The operator ``sparse_detr::ms_deform_attn`` is a custom op: fast, but a graph that holds it needs this
package (``torch.export``) or a plugin (ONNX Runtime, TensorRT). The two functions here compute the same
sum with operators every runtime has, given the level shapes as Python ints (a fixed input size):

* :func:`sample_with_grid_sample`: one bilinear ``grid_sample`` per level (ONNX ``GridSample``, opset 16+;
  TensorRT's native grid-sample layer), then the attention-weighted sum;
* :func:`sample_with_gather`: the four neighbouring cells of every location as rows of the value table,
  gathered in one ``Gather``, then a batched matrix product with the bilinear x attention weights.

Both follow SPEC section 1: location (x, y) in [0, 1] of a level of W x H cells is the pixel
(x W - 0.5, y H - 0.5) (``align_corners=False``), bilinear, zeros outside. :func:`standard_op_attention`
makes every :class:`~sparse_detr.layers.MSDeformAttn` call one of them for the duration of a block.
"""
from contextlib import contextmanager
from typing import Callable, Dict, List, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from . import ms_deform_attn

__all__ = ["SAMPLERS", "sample_with_gather", "sample_with_grid_sample", "standard_op_attention"]

LevelShapes = Sequence[Tuple[int, int]]


def _check_tokens(value: Tensor, level_shapes: LevelShapes):
    tokens = sum(h * w for h, w in level_shapes)
    if value.shape[1] != tokens:
        raise ValueError(f"value has {value.shape[1]} tokens, the level shapes {list(level_shapes)} make {tokens}")


def sample_with_grid_sample(value: Tensor, level_shapes: LevelShapes, sampling_locations: Tensor,
                            attention_weights: Tensor) -> Tensor:
    """Deformable sampling with one ``grid_sample`` per level.

    Args:
        value: (N, S, M, D) values of the S flattened tokens of all levels, M heads of D channels.
        level_shapes: (H_l, W_l) of each level, Python ints.
        sampling_locations: (N, Lq, M, L, P, 2) (x, y) in [0, 1]; attention_weights: (N, Lq, M, L, P).
    Returns:
        (N, Lq, M * D).
    """
    _check_tokens(value, level_shapes)
    n, _, m, d = value.shape
    _, num_queries, _, num_levels, points, _ = sampling_locations.shape
    # grid_sample's (-1, -1) is the top-left corner of the top-left pixel: x in [0, 1] -> 2x - 1
    grids = (2 * sampling_locations - 1).transpose(1, 2).reshape(n * m, num_queries, num_levels, points, 2)
    sampled = []
    for level, (tokens, (h, w)) in enumerate(zip(value.split([h * w for h, w in level_shapes], dim=1), level_shapes)):
        level_value = tokens.permute(0, 2, 3, 1).reshape(n * m, d, h, w)
        sampled.append(F.grid_sample(level_value, grids[:, :, level], mode="bilinear", padding_mode="zeros",
                                     align_corners=False))  # (N * M, D, Lq, P)
    sampled = torch.cat(sampled, -1)  # (N * M, D, Lq, L * P)
    weights = attention_weights.transpose(1, 2).reshape(n * m, 1, num_queries, num_levels * points)
    out = (sampled * weights).sum(-1)  # (N * M, D, Lq)
    return out.view(n, m * d, num_queries).transpose(1, 2)


def sample_with_gather(value: Tensor, level_shapes: LevelShapes, sampling_locations: Tensor,
                       attention_weights: Tensor) -> Tensor:
    """Deformable sampling as one gather of the 4 neighbouring cells of every location and a batched product.

    Arguments and result as :func:`sample_with_grid_sample`.
    """
    _check_tokens(value, level_shapes)
    n, num_tokens, m, d = value.shape
    _, num_queries, _, num_levels, points, _ = sampling_locations.shape
    dtype, device = sampling_locations.dtype, sampling_locations.device
    sizes = torch.tensor([[w, h] for h, w in level_shapes], device=device)  # (L, 2) (W, H)
    starts = torch.tensor([0] + [h * w for h, w in level_shapes][:-1], device=device).cumsum(0)
    pixel = sampling_locations * sizes.to(dtype)[:, None] - 0.5  # (N, Lq, M, L, P, 2)
    low = pixel.floor()
    frac = (pixel - low)[..., None, :]  # (..., 1, 2)
    # corners (x0, y0), (x1, y0), (x0, y1), (x1, y1) as offsets of the low cell
    offsets = torch.tensor([[0, 0], [1, 0], [0, 1], [1, 1]], device=device)
    cells = low.long()[..., None, :] + offsets  # (N, Lq, M, L, P, 4, 2)
    level_sizes = sizes[:, None, None]  # (L, 1, 1, 2) against (..., L, P, 4, 2)
    inside = ((cells >= 0) & (cells < level_sizes)).all(-1)
    bilinear = torch.where(offsets.bool(), frac, 1 - frac).prod(-1)  # (N, Lq, M, L, P, 4)
    weights = attention_weights[..., None] * bilinear * inside.to(dtype)
    cells = torch.minimum(cells.clamp(min=0), level_sizes - 1)
    tokens = starts[:, None, None] + cells[..., 1] * level_sizes[..., 0] + cells[..., 0]
    # row of (image b, token s, head h) in value.reshape(N * S * M, D) is (b * S + s) * M + h
    image = torch.arange(n, device=device).view(n, 1, 1, 1, 1, 1) * num_tokens
    head = torch.arange(m, device=device).view(1, 1, m, 1, 1, 1)
    rows = (image + tokens) * m + head
    corners = num_levels * points * 4
    gathered = value.reshape(-1, d).index_select(0, rows.reshape(-1)).view(n * num_queries * m, corners, d)
    out = torch.bmm(weights.to(value.dtype).view(n * num_queries * m, 1, corners), gathered)
    return out.view(n, num_queries, m * d)


Sampler = Callable[[Tensor, LevelShapes, Tensor, Tensor], Tensor]
SAMPLERS: Dict[str, Sampler] = {"grid_sample": sample_with_grid_sample, "gather": sample_with_gather}


@contextmanager
def standard_op_attention(level_shapes: LevelShapes, sampler: str = "grid_sample"):
    """Within the block, every ``MSDeformAttn`` samples with ``SAMPLERS[sampler]`` at these level shapes.

    Replaces ``ms_deform_attn.multi_scale_deformable_attention`` (what ``MSDeformAttn.forward`` calls) and
    restores it on exit. The block must run at least one attention call with it: when none did (the
    module stopped calling that function), this raises instead of leaving the custom op in a graph.
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown deformable-attention sampler {sampler!r}; choose one of {sorted(SAMPLERS)}")
    sample = SAMPLERS[sampler]
    shapes: List[Tuple[int, int]] = [(int(h), int(w)) for h, w in level_shapes]
    calls = []

    def with_standard_ops(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
        calls.append(1)
        return sample(value, shapes, sampling_locations, attention_weights)

    original = ms_deform_attn.multi_scale_deformable_attention
    ms_deform_attn.multi_scale_deformable_attention = with_standard_ops
    try:
        yield
    finally:
        ms_deform_attn.multi_scale_deformable_attention = original
    if not calls:
        raise RuntimeError("no MSDeformAttn call went through ms_deform_attn.multi_scale_deformable_attention: "
                           "the standard-operator sampling was not used")
