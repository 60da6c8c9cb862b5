"""Multi-scale deformable attention (Deformable DETR, Zhu et al. 2021), as an operator and a module.

The operator ``torch.ops.sparse_detr.ms_deform_attn`` is a ``torch.library`` custom op with an
autograd formula and fake (meta) implementations, so ``torch.compile`` and ``torch.export`` trace
through it. It has two implementations:

* the compiled kernels of ``sparse_detr._C`` (``csrc/``): one kernel source whose bodies run in a plain
  loop on the CPU and in a CUDA grid-stride loop on a GPU, registered as this op's CPU and CUDA kernels;
* the PyTorch implementation below, the reference: exact in float64, used on every device without a
  compiled kernel.

Which one runs is chosen at every call by the environment variable ``SPARSE_DETR_MS_DEFORM_ATTN``:

* ``auto`` (default): the compiled kernel on the CPU; on CUDA, the compiled kernel if the GPU passed the
  self-check (``self_check.py``: run once per GPU model, driver and build, in a subprocess, its verdict
  cached), else the PyTorch implementation; the PyTorch implementation on any other device. Without
  ``sparse_detr._C`` (a package used without ``make setup``): PyTorch.
* ``pytorch``: the PyTorch implementation everywhere, without the self-check.
* ``compiled``: the compiled kernels on the CPU and on CUDA, without the self-check (an error if
  ``sparse_detr._C`` or its CUDA part is not built).

The PyTorch implementation: every sampling location contributes to the four neighbouring cells of its
level with bilinear weights, so the whole operator is one weighted gather-sum

    out[n, q, m] = sum_k  w[n, q, m, k] * value[n, idx[n, q, m, k], m]        (k over L * P * 4 corners)

that ``F.embedding_bag`` computes in one fused pass, without materialising the gathered values.
The backward differentiates the bilinear weights by hand; the value gradient is the transposed
gather-sum, computed as another ``F.embedding_bag`` over the corners grouped by value row (one sort).
On the CPU the queries are processed in chunks, so that temporaries stay small and the allocator reuses
them instead of mapping (and page-faulting) fresh memory for every step, and the per-location arithmetic
works on contiguous (N, Lq, M, L, P) tensors (x and y apart) against level constants broadcast over the
leading dimensions only, which vectorises.
"""
import logging
import math
import os
from contextlib import contextmanager
from typing import Iterator, NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["multi_scale_deformable_attention", "MSDeformAttn", "DeformableAttentionOutput", "UnprojectedValues",
           "use_implementation"]

logger = logging.getLogger(__name__)

IMPLEMENTATION_VARIABLE = "SPARSE_DETR_MS_DEFORM_ATTN"
IMPLEMENTATIONS = ("auto", "pytorch", "compiled")

try:  # importing the extension registers torch.ops.sparse_detr_C
    from .. import _C as _compiled
    _COMPILED_ERROR = None
except ImportError as error:
    _compiled, _COMPILED_ERROR = None, error
    if not isinstance(error, ModuleNotFoundError):  # built, but it does not load: say why
        logger.warning("sparse_detr._C does not load (%s): the PyTorch implementation of ms_deform_attn runs", error)

_EMBEDDING_BAG_SUM = 0
# Corner entries per chunk of queries on the CPU: the largest temporaries are then 4-8 MB, below
# glibc's largest mmap threshold (32 MB), so freed blocks are reused rather than unmapped.
_CPU_CHUNK_CORNERS = 1 << 20


def _compute_dtype(value: Tensor, sampling_locations: Tensor) -> torch.dtype:
    """Locations and accumulation stay in (at least) float32, even for half-precision values."""
    return torch.promote_types(torch.promote_types(value.dtype, torch.float32), sampling_locations.dtype)


def _index_dtype(value: Tensor) -> torch.dtype:
    """int32 rows of the value table when they fit: half the memory traffic of int64."""
    return torch.int32 if value.numel() // value.shape[-1] < 2 ** 31 else torch.int64


def _query_chunks(num_queries: int, corners_per_query: int, device: torch.device) -> list:
    """Slices of the query axis; a single slice off the CPU, where the caching allocator makes size cheap."""
    if device.type != "cpu":
        return [slice(0, num_queries)] if num_queries else []
    step = max(1, _CPU_CHUNK_CORNERS // max(1, corners_per_query))
    return [slice(start, start + step) for start in range(0, num_queries, step)]


class _Levels(NamedTuple):
    """Constants of each (head, level, point) slot, (1, 1, M, L, P), broadcast over images and queries."""
    width: Tensor  # W_l, compute dtype
    height: Tensor  # H_l
    last_column: Tensor  # W_l - 1
    last_row: Tensor  # H_l - 1
    row_stride: Tensor  # W_l * M, index dtype: table rows between vertically adjacent cells
    first_row: Tensor  # (N, 1, M, L, P) index dtype: table row of cell (0, 0) of level l, image n, head m


def _levels(spatial_shapes: Tensor, level_start_index: Tensor, value: Tensor, points: int, dtype: torch.dtype,
            index_dtype: torch.dtype) -> _Levels:
    n, num_tokens, m, _ = value.shape
    num_levels = spatial_shapes.shape[0]

    def per_slot(level_values: Tensor, to_dtype: torch.dtype) -> Tensor:
        return level_values.to(to_dtype).view(1, 1, 1, num_levels, 1).expand(1, 1, m, num_levels, points).contiguous()

    height, width = spatial_shapes.unbind(1)
    # row of (image n, token s, head m) in value.reshape(N * S * M, D) is (n * S + s) * M + m
    image = torch.arange(n, dtype=index_dtype, device=value.device).view(n, 1, 1, 1, 1) * (num_tokens * m)
    head = torch.arange(m, dtype=index_dtype, device=value.device).view(1, 1, m, 1, 1)
    return _Levels(per_slot(width, dtype), per_slot(height, dtype), per_slot(width - 1, dtype),
                   per_slot(height - 1, dtype), per_slot(width * m, index_dtype),
                   image + head + per_slot(level_start_index * m, index_dtype))


class _Axis(NamedTuple):
    """Linear interpolation along x or y: the two cells around a coordinate, each (N, q, M, L, P)."""
    cells: tuple  # (low, high) cell indices, clamped into the map (compute dtype, integral values)
    weights: tuple  # (1 - frac, frac), 0 for a cell outside the map
    inside: tuple  # 1.0 where the cell is inside the map, else 0.0


def _axis(coordinate: Tensor, size: Tensor, last: Tensor) -> _Axis:
    """Pixel centres at (i + 0.5) / size (``align_corners=False``), zeros outside the map."""
    pixel = coordinate * size - 0.5
    low = pixel.floor()
    frac = pixel - low
    high = low + 1.0
    low_cell = low.clamp(min=0.0).minimum(last)
    high_cell = high.clamp(min=0.0).minimum(last)
    low_inside = (low_cell == low).to(coordinate.dtype)
    high_inside = (high_cell == high).to(coordinate.dtype)
    return _Axis((low_cell, high_cell), ((1.0 - frac) * low_inside, frac * high_inside), (low_inside, high_inside))


class _Corners(NamedTuple):
    rows: Tensor  # (N, q, M, L, P, 4) rows of value.reshape(N * S * M, D)
    weights: Tensor  # (N, q, M, L, P, 4) attention weight x bilinear weight, 0 outside the map
    x: _Axis
    y: _Axis


def _corners(levels: _Levels, sampling_locations: Tensor, attention_weights: Tensor, dtype: torch.dtype) -> _Corners:
    """The four cells around each location and their weights, in the order (x0, y0), (x1, y0), (x0, y1), (x1, y1).

    Args:
        sampling_locations: (N, q, M, L, P, 2) (x, y) in [0, 1]. attention_weights: (N, q, M, L, P).
    """
    locations = sampling_locations.to(dtype)
    x = _axis(locations[..., 0], levels.width, levels.last_column)
    y = _axis(locations[..., 1], levels.height, levels.last_row)
    m = levels.width.shape[2]
    index_dtype = levels.row_stride.dtype
    columns = [cell.to(index_dtype) * m for cell in x.cells]
    rows = [cell.to(index_dtype) * levels.row_stride + levels.first_row for cell in y.cells]
    attention = attention_weights.to(dtype)
    y_weights = [attention * weight for weight in y.weights]
    return _Corners(torch.stack([row + column for row in rows for column in columns], -1),
                    torch.stack([wy * wx for wy in y_weights for wx in x.weights], -1), x, y)


def compiled_kernels_available(device_type: str = "cpu") -> bool:
    """Whether ``sparse_detr._C`` is built with kernels for ``device_type`` ("cpu" or "cuda")."""
    if _compiled is None:
        return False
    return device_type == "cpu" or (device_type == "cuda" and bool(_compiled.WITH_CUDA))


def compiled_cpu_ops_available(*names: str) -> bool:
    """Whether ``sparse_detr._C`` is loaded with the CPU ops ``names`` (``torch.ops.sparse_detr_C.<name>``; a build
    older than an op has none)."""
    return compiled_kernels_available("cpu") and all(hasattr(torch.ops.sparse_detr_C, name) for name in names)


def _use_compiled(device: torch.device, atomic_value_grad: bool = False) -> bool:
    """Whether the compiled kernel serves a call on ``device``: ``$SPARSE_DETR_MS_DEFORM_ATTN`` (module docstring).

    ``atomic_value_grad``: the call is a backward with a value gradient, which the CUDA kernel sums with atomic adds
    (not deterministic); under ``torch.use_deterministic_algorithms(True)`` ``auto`` then takes the PyTorch
    implementation on CUDA, and ``compiled`` raises PyTorch's determinism error."""
    choice = os.environ.get(IMPLEMENTATION_VARIABLE, "auto").strip().lower() or "auto"
    if choice not in IMPLEMENTATIONS:
        raise ValueError(f"{IMPLEMENTATION_VARIABLE} must be one of {', '.join(IMPLEMENTATIONS)}, got {choice!r}")
    if choice == "compiled":
        if _compiled is None:
            raise RuntimeError(f"{IMPLEMENTATION_VARIABLE}=compiled, but sparse_detr._C is not built "
                               f"({_COMPILED_ERROR}): run `make setup` (or pip install -e .)")
        if not compiled_kernels_available(device.type):
            raise RuntimeError(f"{IMPLEMENTATION_VARIABLE}=compiled, but sparse_detr._C has no {device.type} kernels"
                               + (": rebuild it with FORCE_CUDA=1" if device.type == "cuda" else ""))
        return True
    if choice == "pytorch" or _compiled is None:
        return False
    if device.type == "cuda" and compiled_kernels_available("cuda"):
        if atomic_value_grad and torch.are_deterministic_algorithms_enabled():
            return False
        # imported here: imported with this module, `python -m sparse_detr.layers.self_check` would find itself
        # in sys.modules before it runs (runpy's warning); after the first call this is a lookup
        from . import self_check
        return self_check.verdict(device)
    return device.type == "cpu"


@contextmanager
def use_implementation(name: str) -> Iterator[None]:
    """``$SPARSE_DETR_MS_DEFORM_ATTN`` set to ``name`` inside the block (one of ``IMPLEMENTATIONS``), restored after."""
    if name not in IMPLEMENTATIONS:
        raise ValueError(f"{IMPLEMENTATION_VARIABLE} must be one of {', '.join(IMPLEMENTATIONS)}, got {name!r}")
    previous = os.environ.get(IMPLEMENTATION_VARIABLE)
    os.environ[IMPLEMENTATION_VARIABLE] = name
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(IMPLEMENTATION_VARIABLE, None)
        else:
            os.environ[IMPLEMENTATION_VARIABLE] = previous


def _compiled_dtypes(value: Tensor, sampling_locations: Tensor, attention_weights: Tensor):
    """The inputs as the compiled kernels read them: values in their own dtype unless the locations ask for a
    wider computation (then in the compute dtype), locations and weights in the compute dtype."""
    dtype = _compute_dtype(value, sampling_locations)
    kernel_value = value if torch.promote_types(value.dtype, torch.float32) == dtype else value.to(dtype)
    return kernel_value, sampling_locations.to(dtype), attention_weights.to(dtype)


def _compiled_forward(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    kernel_value, locations, weights = _compiled_dtypes(value, sampling_locations, attention_weights)
    out = torch.ops.sparse_detr_C.ms_deform_attn_forward(kernel_value, spatial_shapes.long(), level_start_index.long(),
                                                         locations, weights)
    return out.to(value.dtype)


def _compiled_backward(grad_output, value, spatial_shapes, level_start_index, sampling_locations, attention_weights,
                       value_grad=True):
    kernel_value, locations, weights = _compiled_dtypes(value, sampling_locations, attention_weights)
    grad_value, grad_locations, grad_attention = torch.ops.sparse_detr_C.ms_deform_attn_backward(
        grad_output.to(kernel_value.dtype), kernel_value, spatial_shapes.long(), level_start_index.long(), locations,
        weights, value_grad=value_grad)
    return (grad_value.to(value.dtype), grad_locations.to(sampling_locations.dtype),
            grad_attention.to(attention_weights.dtype))


def _pytorch_forward(value: Tensor, spatial_shapes: Tensor, level_start_index: Tensor,
                     sampling_locations: Tensor, attention_weights: Tensor) -> Tensor:
    n, _, m, d = value.shape
    _, num_queries, _, num_levels, points, _ = sampling_locations.shape
    dtype = _compute_dtype(value, sampling_locations)
    levels = _levels(spatial_shapes, level_start_index, value, points, dtype, _index_dtype(value))
    table = value.reshape(-1, d).to(dtype)
    out = table.new_empty((n, num_queries, m * d))
    corners_per_bag = num_levels * points * 4
    for chunk in _query_chunks(num_queries, n * m * corners_per_bag, value.device):
        corners = _corners(levels, sampling_locations[:, chunk], attention_weights[:, chunk], dtype)
        sampled = F.embedding_bag(corners.rows.view(-1, corners_per_bag), table,
                                  per_sample_weights=corners.weights.view(-1, corners_per_bag), mode="sum")
        out[:, chunk] = sampled.view(out[:, chunk].shape)  # (-1 would be ambiguous for an empty batch)
    return out.to(value.dtype)


@torch.library.custom_op("sparse_detr::ms_deform_attn", mutates_args=())
def _ms_deform_attn(value: Tensor, spatial_shapes: Tensor, level_start_index: Tensor,
                    sampling_locations: Tensor, attention_weights: Tensor) -> Tensor:
    """The PyTorch implementation serves devices without a compiled kernel; CPU and CUDA: see below."""
    return _pytorch_forward(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)


@_ms_deform_attn.register_kernel(("cpu", "cuda"))
def _(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    forward = _compiled_forward if _use_compiled(value.device) else _pytorch_forward
    return forward(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)


@_ms_deform_attn.register_fake
def _(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    n, _, m, d = value.shape
    return value.new_empty((n, sampling_locations.shape[1], m * d))


def _transposed_bag_sum(rows: Tensor, weights: Tensor, grad: Tensor, num_rows: int) -> Tensor:
    """grad_table[r] = sum over corners k with rows[k] = r of weights[k] * grad[bag of k].

    The transpose of the forward's gather-sum: the corners are grouped by row (one sort), then each
    table row is a bag of gradient rows for ``F.embedding_bag``; rows no corner reaches are empty bags.

    Args:
        rows, weights: (bags, corners_per_bag), the forward's rows and per-corner weights.
        grad: (bags, D), the gradient of the forward's output.
    Returns:
        (num_rows, D).
    """
    corners_per_bag = rows.shape[1]
    sorted_rows, order = torch.sort(rows.reshape(-1), stable=True)
    counts = torch.bincount(sorted_rows, minlength=num_rows)
    offsets = counts.cumsum(0) - counts
    sorted_weights = weights.reshape(-1).index_select(0, order)
    source_bags = order.div_(corners_per_bag, rounding_mode="floor")
    return F.embedding_bag(source_bags, grad, offsets, per_sample_weights=sorted_weights, mode="sum")


def _pytorch_backward(grad_output: Tensor, value: Tensor, spatial_shapes: Tensor, level_start_index: Tensor,
                      sampling_locations: Tensor, attention_weights: Tensor,
                      value_grad: bool = True) -> tuple[Tensor, Tensor, Tensor]:
    """The gradients of value (an empty tensor unless ``value_grad``), sampling_locations and attention_weights."""
    n, _, m, d = value.shape
    _, num_queries, _, num_levels, points, _ = sampling_locations.shape
    dtype, index_dtype = _compute_dtype(value, sampling_locations), _index_dtype(value)
    levels = _levels(spatial_shapes, level_start_index, value, points, dtype, index_dtype)
    table = value.reshape(-1, d).to(dtype)
    grad = grad_output.to(dtype).view(n, num_queries, m, d)
    corners_per_bag = num_levels * points * 4
    # the corners of every query, kept for the value gradient (the transposed gather-sum over all of them)
    kept = num_queries if value_grad else 0
    all_rows = torch.empty((n, kept, m, corners_per_bag), dtype=index_dtype, device=value.device)
    all_weights = table.new_empty((n, kept, m, corners_per_bag))
    grad_locations = table.new_empty(sampling_locations.shape)
    grad_attention = table.new_empty(attention_weights.shape)
    no_offsets = torch.empty(0, dtype=index_dtype, device=value.device)
    for chunk in _query_chunks(num_queries, n * m * corners_per_bag, value.device):
        attention = attention_weights[:, chunk].to(dtype)
        corners = _corners(levels, sampling_locations[:, chunk], attention, dtype)
        if value_grad:
            all_rows[:, chunk] = corners.rows.view(all_rows[:, chunk].shape)
            all_weights[:, chunk] = corners.weights.view(all_weights[:, chunk].shape)
        flat_rows = corners.rows.view(-1)
        bags = flat_rows.numel() // corners_per_bag
        bag_of_corner = torch.arange(bags, dtype=index_dtype, device=value.device).view(-1, 1).expand(
            bags, corners_per_bag).reshape(-1)
        # d out[bag] / d w[k] = value row k, so grad w[k] = <grad_out[bag], value[row k]>
        grad_weight = torch.ops.aten._embedding_bag_per_sample_weights_backward(
            grad[:, chunk].reshape(bags, d), table, flat_rows, no_offsets, bag_of_corner, _EMBEDDING_BAG_SUM, -1)
        g00, g01, g10, g11 = grad_weight.view(-1, 4).t().contiguous().view((4,) + attention.shape).unbind(0)
        # w[i, j] = a * wy[i] * wx[j]: gradients of a * wy[i] and of a * wx[j] (the other axis contracted)
        (wx0, wx1), (wy0, wy1) = corners.x.weights, corners.y.weights
        grad_wy0, grad_wy1 = g00 * wx0 + g01 * wx1, g10 * wx0 + g11 * wx1
        grad_wx0, grad_wx1 = g00 * wy0 + g10 * wy1, g01 * wy0 + g11 * wy1
        grad_attention[:, chunk] = wy0 * grad_wy0 + wy1 * grad_wy1
        # (wx0, wx1) = (1 - frac, frac) inside the map: d / d frac = (-1, 1), and d frac / d x = W
        (in_x0, in_x1), (in_y0, in_y1) = corners.x.inside, corners.y.inside
        grad_x = (grad_wx1 * in_x1 - grad_wx0 * in_x0) * attention * levels.width
        grad_y = (grad_wy1 * in_y1 - grad_wy0 * in_y0) * attention * levels.height
        grad_locations[:, chunk] = torch.stack([grad_x, grad_y], -1)
    if not value_grad:
        grad_value = value.new_empty(0)
    else:
        grad_table = _transposed_bag_sum(all_rows.view(-1, corners_per_bag), all_weights.view(-1, corners_per_bag),
                                         grad.reshape(-1, d), table.shape[0])
        grad_value = grad_table.view(value.shape).to(value.dtype)
    return grad_value, grad_locations.to(sampling_locations.dtype), grad_attention.to(attention_weights.dtype)


@torch.library.custom_op("sparse_detr::ms_deform_attn_backward", mutates_args=())
def _ms_deform_attn_backward(grad_output: Tensor, value: Tensor, spatial_shapes: Tensor, level_start_index: Tensor,
                             sampling_locations: Tensor, attention_weights: Tensor,
                             value_grad: bool = True) -> tuple[Tensor, Tensor, Tensor]:
    """The gradients of value (empty unless ``value_grad``: a value that needs none is not computed), of the
    sampling locations and of the attention weights."""
    return _pytorch_backward(grad_output, value, spatial_shapes, level_start_index, sampling_locations,
                             attention_weights, value_grad)


@_ms_deform_attn_backward.register_kernel(("cpu", "cuda"))
def _(grad_output, value, spatial_shapes, level_start_index, sampling_locations, attention_weights, value_grad=True):
    backward = _compiled_backward if _use_compiled(value.device, atomic_value_grad=value_grad) else _pytorch_backward
    return backward(grad_output, value, spatial_shapes, level_start_index, sampling_locations, attention_weights,
                    value_grad)


@_ms_deform_attn_backward.register_fake
def _(grad_output, value, spatial_shapes, level_start_index, sampling_locations, attention_weights, value_grad=True):
    grad_value = torch.empty_like(value) if value_grad else value.new_empty(0)
    return grad_value, torch.empty_like(sampling_locations), torch.empty_like(attention_weights)


def _setup_context(ctx, inputs, output):
    value, spatial_shapes, level_start_index, sampling_locations, attention_weights = inputs
    ctx.save_for_backward(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)


def _backward(ctx, grad_output):
    value, spatial_shapes, level_start_index, sampling_locations, attention_weights = ctx.saved_tensors
    value_grad = ctx.needs_input_grad[0]
    grad_value, grad_locations, grad_attention = torch.ops.sparse_detr.ms_deform_attn_backward(
        grad_output.contiguous(), value, spatial_shapes, level_start_index, sampling_locations, attention_weights,
        value_grad)
    return grad_value if value_grad else None, None, None, grad_locations, grad_attention


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


class UnprojectedValues(NamedTuple):
    """An attention's values before its ``value_proj``, for :class:`MSDeformAttn` to sample first and project the
    samples (inference; see :meth:`MSDeformAttn.forward`): those of the first ``levels`` levels (every level when
    None), the other levels' tokens projected first, as without them."""
    tokens: Tensor  # (N, S, C), zero at padded tokens
    valid: Tensor  # (N, S, 1), 1 at unpadded tokens and 0 at padded ones, in the tokens' dtype
    levels: Optional[int] = None  # the levels (from the first) sampled first; None: all
    padding_mask: Optional[Tensor] = None  # (N, S), True at padded tokens; None when nothing is padded

    @classmethod
    def of(cls, tokens: Tensor, padding_mask: Optional[Tensor] = None,
           levels: Optional[int] = None) -> "UnprojectedValues":
        """``padding_mask``: (N, S), True at padded tokens; None when nothing is padded (``tokens`` is then taken
        as it is, not copied: an update of it in place reaches the attention)."""
        if padding_mask is None:
            return cls(tokens, tokens.new_ones((*tokens.shape[:2], 1)), levels)
        valid = ~padding_mask[..., None]
        return cls(torch.where(valid, tokens, 0.0), valid.to(tokens.dtype), levels, padding_mask)


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
            value: (N, S, C) flattened tokens of every level, or their :class:`UnprojectedValues` (inference).
            spatial_shapes: (L, 2) (H, W); level_start_index: (L,).
            padding_mask: (N, S), True at padded tokens (their values are zeroed; ignored with
                :class:`UnprojectedValues`, which carry their own).
        """
        n, num_queries, _ = query.shape
        m, num_levels, points = self.n_heads, self.n_levels, self.n_points
        if reference_points.shape[-1] not in (2, 4):
            raise ValueError(f"reference_points must end in 2 (points) or 4 (boxes), got {tuple(reference_points.shape)}")
        fast = self.fold_point_locations and not torch.is_grad_enabled()
        if reference_points.shape[-1] == 2 and fast:
            locations = self._folded_point_locations(query, reference_points, spatial_shapes)
        elif fast:  # boxes: centre + offsets * (size / 2P) in one pass, where the expression below takes four
            offsets = self.sampling_offsets(query).view(n, num_queries, m, num_levels, points, 2)
            boxes = reference_points[:, :, None, :, None]
            locations = torch.addcmul(boxes[..., :2], offsets, boxes[..., 2:] * (0.5 / points))
        else:
            offsets = self.sampling_offsets(query).view(n, num_queries, m, num_levels, points, 2)
            if reference_points.shape[-1] == 2:
                normalizer = torch.stack([spatial_shapes[..., 1], spatial_shapes[..., 0]], -1).to(offsets.dtype)
                locations = reference_points[:, :, None, :, None, :] + offsets / normalizer[None, None, None, :, None, :]
            else:
                locations = (reference_points[:, :, None, :, None, :2]
                             + offsets / points * reference_points[:, :, None, :, None, 2:] * 0.5)
        weights = self.attention_weights(query).view(n, num_queries, m, num_levels * points)
        weights = weights.softmax(-1).view(n, num_queries, m, num_levels, points)
        if isinstance(value, UnprojectedValues):
            sampled = self._sample_levels_first(value, spatial_shapes, level_start_index, locations, weights)
        else:
            values = self.value_proj(value)
            if padding_mask is not None:
                values = torch.where(padding_mask[..., None], 0.0, values)  # masked_fill's values, 2x faster
            values = values.view(n, value.shape[1], m, self.d_model // m)
            sampled = multi_scale_deformable_attention(values, spatial_shapes, level_start_index, locations, weights)
        return DeformableAttentionOutput(self.output_proj(sampled), locations, weights)

    # Inference on few queries (the decoder's): sampling and weighting are linear, so they commute with the value
    # projection. Head m's output is  W_m (sum_k a_k x_k) + b_m (sum_k a_k v_k)  over its bilinear taps k, where
    # x_k are the unprojected tokens (zero where padded), v_k their validity (1, or 0 where padded or outside the
    # map) and W_m, b_m head m's rows of value_proj: the S x C x C projection of every token becomes one of
    # M x C channels per query and head, plus sampling C + 1 channels for each head instead of C / M. At 800x1199,
    # 300 queries against 20k tokens: 1.31 G multiply-adds become 20 M and 16 M bilinear taps.
    # Only some levels may pay for it: sampling C channels instead of C / M costs per query and head, projecting per
    # token, and the first levels are the largest (at 800x1199 the sparse encoder's 2,000 queries against level 0's
    # 15,000 tokens; see SparseDeformableTransformer._levels_sampled_first). The levels after value.levels are
    # projected and sampled as without UnprojectedValues, and the two parts summed.
    @property
    def projects_samples(self) -> bool:
        """Whether :class:`UnprojectedValues` may be given: its value projection has a float weight to apply to the
        samples (the int8 path's has not, nor one calibrating)."""
        weight = getattr(self.value_proj, "weight", None)
        return weight is not None and weight.is_floating_point()

    def _sample_levels_first(self, value: UnprojectedValues, spatial_shapes: Tensor, level_start_index: Tensor,
                             locations: Tensor, weights: Tensor) -> Tensor:
        num_levels = spatial_shapes.shape[0]
        first = num_levels if value.levels is None else min(value.levels, num_levels)
        if first == num_levels:
            return self._sample_then_project(value, spatial_shapes, level_start_index, locations, weights)
        split = int(level_start_index[first])  # the tokens of the levels sampled first: [0, split)
        n, num_tokens, channels = value.tokens.shape
        projected = self.value_proj(value.tokens[:, split:])
        if value.padding_mask is not None:
            projected = torch.where(value.padding_mask[:, split:, None], 0.0, projected)
        projected = projected.view(n, num_tokens - split, self.n_heads, channels // self.n_heads)
        sampled = multi_scale_deformable_attention(projected, spatial_shapes[first:], level_start_index[first:] - split,
                                                   locations[:, :, :, first:], weights[:, :, :, first:])
        if first == 0:
            return sampled
        # the kernel reads the levels' rows only: the tokens after them need no copy
        sampled_first = self._sample_then_project(value, spatial_shapes[:first], level_start_index[:first],
                                                  locations[:, :, :, :first], weights[:, :, :, :first])
        return sampled + sampled_first.to(sampled.dtype)

    def _sample_then_project(self, value: UnprojectedValues, spatial_shapes: Tensor, level_start_index: Tensor,
                             locations: Tensor, weights: Tensor) -> Tensor:
        n, num_queries, m, num_levels, points, _ = locations.shape
        num_tokens, channels = value.tokens.shape[1:]
        # every (query, head) is a query of a single head that reads all C channels
        locations = locations.reshape(n, num_queries * m, 1, num_levels, points, 2)
        weights = weights.reshape(n, num_queries * m, 1, num_levels, points)
        samples = multi_scale_deformable_attention(value.tokens.view(n, num_tokens, 1, channels), spatial_shapes,
                                                   level_start_index, locations, weights)
        mass = multi_scale_deformable_attention(value.valid.view(n, num_tokens, 1, 1), spatial_shapes,
                                                level_start_index, locations, weights)
        weight = self.value_proj.weight.view(m, channels // m, channels).to(samples.dtype)
        bias = self.value_proj.bias.view(m, channels // m).to(samples.dtype)
        heads = torch.bmm(samples.view(n * num_queries, m, channels).transpose(0, 1), weight.transpose(1, 2))
        out = heads.transpose(0, 1).view(n, num_queries, m, -1) + mass.view(n, num_queries, m, 1) * bias
        return out.reshape(n, num_queries, channels)

    # Inference only (``fold_point_locations``, set by the fast inference path): with point references,
    # reference + offsets / (W_l, H_l) is an affine map of [query, reference], so the division and the
    # broadcast addition (two passes over (N, Lq, M, L, P, 2) with a 2-element inner loop, slow on the CPU)
    # fold into the sampling-offset layer's matrix multiplication: the weights scaled by 1 / (W_l, H_l) and
    # the reference copied to each (head, point) by extra 0/1 columns. In float32, within rounding of the
    # unfolded computation; the layer stays in float32 under a bf16 autocast. With box references (the two-stage
    # decoder's) the flag computes centre + offsets * (size / 2P) by one addcmul, where the training expression
    # takes four passes (300 queries: 0.17-0.22 against 0.35-0.37 ms a decoder layer; within rounding as well).
    fold_point_locations = False

    def _folded_point_locations(self, query: Tensor, reference_points: Tensor, spatial_shapes: Tensor) -> Tensor:
        n, num_queries, _ = query.shape
        m, num_levels, points = self.n_heads, self.n_levels, self.n_points
        linear = getattr(self.sampling_offsets, "module", self.sampling_offsets)  # a float32 wrapper's layer
        scale = 1.0 / spatial_shapes.flip(-1).to(torch.float32)  # (L, 2): 1 / (W_l, H_l)
        scale = scale.view(1, num_levels, 1, 2).expand(m, num_levels, points, 2).reshape(-1, 1)
        copies = torch.eye(num_levels * 2, device=query.device).view(1, num_levels, 1, 2, num_levels * 2)
        copies = copies.expand(m, num_levels, points, 2, num_levels * 2).reshape(-1, num_levels * 2)
        weight = torch.cat([linear.weight.float() * scale, copies], 1)
        with torch.autocast(query.device.type, enabled=False):
            inputs = torch.cat([query.float(), reference_points.flatten(2).float()], -1)
            locations = F.linear(inputs, weight, linear.bias.float() * scale[:, 0])
        return locations.view(n, num_queries, m, num_levels, points, 2)
