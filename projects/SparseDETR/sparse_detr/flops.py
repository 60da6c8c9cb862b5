"""FLOP counting for the Sparse DETR family with fvcore, covering the same operators as the authors' counter.

One FLOP is one multiply-add (fvcore's convention). The authors (``util/benchmark.py`` of their release)
ran ``fvcore.nn.FlopCountAnalysis`` with its default handles on their model with the deformable
attention switched to its PyTorch fallback (one ``F.grid_sample`` per level, then a weighted sum).
What that counted, and how each piece is reproduced here:

* convolutions, linear layers and matrix products (``aten::_convolution``, ``linear``, ``addmm``,
  ``matmul``, ``mm``, ``bmm``, ``einsum``): fvcore's handles.
* ``group_norm`` and ``layer_norm``: 5 per element (fvcore's handles). Batch norm was *not* counted: their
  ResNet's frozen batch norm is a multiply and an add, while Detectron2's ``FrozenBatchNorm2d`` calls
  ``F.batch_norm`` at inference, so ``aten::batch_norm`` is left out of the table.
* The decoder's self-attention was two ``bmm`` (q k^T and attn v) in their PyTorch; here
  ``nn.MultiheadAttention`` runs ``aten::scaled_dot_product_attention``, counted as the same two products.
* The deformable sampling: fvcore counts ``aten::grid_sampler`` as 4 per output element ("assume bilinear"),
  and the fallback's grid_sample outputs (N*M, D, Lq, P) per level, so the authors counted
  4 * N*Lq*M*L*P*D per call: the four bilinear taps of every sampled value. The attention weighting that
  follows (a multiply and a sum) is elementwise and went uncounted.
  :func:`ms_deform_attn_flop_jit` counts the custom op ``sparse_detr::ms_deform_attn`` the same way under
  ``ms_deform_attn_sampling`` and reports the weighting (1 * N*Lq*M*L*P*D) apart, under
  ``ms_deform_attn_weighting``: :attr:`FlopCount.total` leaves it out (the authors' count),
  :attr:`FlopCount.total_with_sampling` adds it (5 * N*Lq*M*L*P*D for the whole op).
* Everything else (additions, activations, softmax, top-k, gathers, sine embeddings) is not counted.

The authors' model returns every output set (decoder auxiliary outputs, two-stage and encoder auxiliary
outputs), so their trace keeps every head. :class:`InferenceOutputs` returns every tensor of
:class:`~sparse_detr.transformer.TransformerOutput` for the same reason: the jit tracer drops whatever does
not reach an output.
"""
import dataclasses
import logging
import warnings
from collections import Counter
from math import prod
from typing import Any, Dict, List, Tuple

import torch
from fvcore.nn import FlopCountAnalysis
from fvcore.nn.jit_handles import (Handle, addmm_flop_jit, bmm_flop_jit, conv_flop_jit, einsum_flop_jit,
                                   elementwise_flop_counter, get_shape, linear_flop_jit, matmul_flop_jit,
                                   norm_flop_counter)
from torch import Tensor, nn

from detectron2.structures import ImageList

__all__ = ["FlopCount", "InferenceOutputs", "SAMPLING_TAPS", "authors_op_handles", "count_flops",
           "deformable_sampled_values", "ms_deform_attn_flop_jit", "sdpa_flop_jit"]

logger = logging.getLogger(__name__)

SAMPLING_TAPS = 4  # bilinear interpolation: one multiply-add per corner of every sampled value
SAMPLING_KEY = "ms_deform_attn_sampling"
WEIGHTING_KEY = "ms_deform_attn_weighting"


def deformable_sampled_values(value_shape, sampling_locations_shape) -> int:
    """N * Lq * M * L * P * D: every (query, head, level, point) samples the D channels of its head.

    Args:
        value_shape: (N, S, M, D). sampling_locations_shape: (N, Lq, M, L, P, 2).
    """
    n, _, m, d = value_shape
    _, num_queries, _, num_levels, num_points, _ = sampling_locations_shape
    return n * num_queries * m * num_levels * num_points * d


def ms_deform_attn_flop_jit(inputs: List[Any], outputs: List[Any]) -> Counter:
    """fvcore handle of ``sparse_detr::ms_deform_attn(value, shapes, starts, locations, weights)``.

    ``ms_deform_attn_sampling`` = 4 * N*Lq*M*L*P*D (the bilinear taps, what the authors counted);
    ``ms_deform_attn_weighting`` = N*Lq*M*L*P*D (one multiply-add per sampled value and attention weight).
    """
    sampled = deformable_sampled_values(get_shape(inputs[0]), get_shape(inputs[3]))
    return Counter({SAMPLING_KEY: SAMPLING_TAPS * sampled, WEIGHTING_KEY: sampled})


def sdpa_flop_jit(inputs: List[Any], outputs: List[Any]) -> int:
    """``scaled_dot_product_attention(q (.., Lq, E), k (.., Lk, E), v (.., Lk, Ev))``: q k^T and attn v.

    B * Lq * Lk * (E + Ev), what fvcore's ``bmm`` handle gives the two products of the unfused attention.
    """
    q, k, v = (get_shape(x) for x in inputs[:3])
    return prod(q[:-1]) * k[-2] * (q[-1] + v[-1])


def authors_op_handles() -> Dict[str, Handle]:
    """The operators the authors' counter counted (see the module docstring), by TorchScript name."""
    return {
        "aten::_convolution": conv_flop_jit,
        "aten::addmm": addmm_flop_jit,
        "aten::bmm": bmm_flop_jit,
        "aten::einsum": einsum_flop_jit,
        "aten::linear": linear_flop_jit,
        "aten::matmul": matmul_flop_jit,
        "aten::mm": matmul_flop_jit,
        "aten::scaled_dot_product_attention": sdpa_flop_jit,
        "aten::group_norm": norm_flop_counter(2),
        "aten::layer_norm": norm_flop_counter(2),
        "aten::upsample_nearest2d": elementwise_flop_counter(0, 1),
        "aten::upsample_bilinear2d": elementwise_flop_counter(0, 4),
        "aten::adaptive_avg_pool2d": elementwise_flop_counter(1, 0),
        "aten::grid_sampler": elementwise_flop_counter(0, SAMPLING_TAPS),
        "sparse_detr::ms_deform_attn": ms_deform_attn_flop_jit,
    }


class InferenceOutputs(nn.Module):
    """``SparseDETR`` inference as a function of a batch tensor, returning every raw output tensor.

    It runs what ``SparseDETR.predict`` runs (normalisation, backbone, input projections, transformer with
    every head), with the image sizes fixed on the host: Detectron2's ``ImageList.from_tensors`` turns them
    into tensors while tracing. All images of the batch have the batch's size, so there is no padding.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images: Tensor) -> Tuple[Tensor, ...]:
        """(N, 3, H, W) RGB 0-255 -> every tensor of the ``TransformerOutput``, flattened."""
        model = self.model
        height, width = images.shape[-2:]
        normalised = (images - model.pixel_mean) / model.pixel_std
        batch = ImageList(normalised, [(int(height), int(width))] * images.shape[0])
        out = model.transformer(model.flatten_features(batch))
        tensors = []
        for f in dataclasses.fields(out):
            value = getattr(out, f.name)
            if isinstance(value, Tensor):
                tensors.append(value)
            elif isinstance(value, (list, tuple)):
                tensors.extend(v for v in value if isinstance(v, Tensor))
        return tuple(tensors)


@dataclasses.dataclass
class FlopCount:
    """fvcore's per-operator count of one inference, one multiply-add = one FLOP."""

    by_operator: Dict[str, int]  # includes ms_deform_attn_sampling and ms_deform_attn_weighting
    by_module: Dict[str, int]  # the model's submodules by name, "" the whole inference; weighting included
    unsupported: Dict[str, int]  # operators seen but not counted, with their number of calls

    @property
    def total(self) -> int:
        """The authors' count: every counted operator but the attention weighting of the deformable sampling."""
        return sum(v for k, v in self.by_operator.items() if k != WEIGHTING_KEY)

    @property
    def total_with_sampling(self) -> int:
        """Also counts the attention weighting: the deformable sampling costs 5 * N*Lq*M*L*P*D in all."""
        return sum(self.by_operator.values())


@torch.no_grad()
def count_flops(model: nn.Module, images: Tensor) -> FlopCount:
    """Count one inference of ``model`` (a ``SparseDETR``) on ``images`` (N, 3, H, W), RGB 0-255.

    The model is put in eval mode (and back) and traced once with fvcore's jit tracer. The count depends
    on the image size only (the sparse encoder keeps floor(rho * valid tokens) + 1 tokens whatever the
    weights), so random weights and a random image give the authors' numbers.
    """
    was_training = model.training
    model.eval()
    try:
        analysis = FlopCountAnalysis(InferenceOutputs(model), (images,))
        # fvcore's set_op_handle(name, None) keeps default handles: start from an empty table instead
        analysis.clear_op_handles().set_op_handle(**authors_op_handles())
        analysis.unsupported_ops_warnings(False)
        analysis.uncalled_modules_warnings(False)
        analysis.tracer_warnings("none")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the tracer's warnings about host values baked into the graph
            by_operator = dict(analysis.by_operator())
            # "" is the whole inference (the wrapper); the model's submodules keep their own names
            by_module = {name.split(".", 1)[1] if "." in name else name: count
                         for name, count in analysis.by_module().items() if name != "model"}
            unsupported = dict(analysis.unsupported_ops())
    finally:
        model.train(was_training)
    logger.debug("FLOPs by operator: %s", by_operator)
    return FlopCount(by_operator=by_operator, by_module=by_module, unsupported=unsupported)
