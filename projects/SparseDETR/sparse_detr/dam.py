"""The decoder attention map (DAM) and its recall: which tokens the decoder's cross-attention looks at.

The DAM is the scoring network's training target (``criterion.py``), and its recall, the share of its mass on
the tokens the sparse encoder updated, is logged in training, reported in evaluation (``evaluation.py``,
``SparseDETR.evaluation_outputs``) and drawn (``visualization.py``).
"""
from typing import Dict, Tuple

import torch
from torch import Tensor

from .layers.ms_deform_attn import _use_compiled, compiled_cpu_ops_available
from .transformer import TransformerOutput

__all__ = ["dam_kernel_available", "dam_recall_masses", "dam_recall_summary", "decoder_attention_map", "output_dam",
           "updated_token_mask"]


def dam_kernel_available() -> bool:
    """Whether ``sparse_detr._C`` is loaded with its DAM kernel (a build older than it has none)."""
    return compiled_cpu_ops_available("decoder_attention_map")


@torch.no_grad()
def decoder_attention_map(spatial_shapes: Tensor, level_start_index: Tensor, sampling_locations: Tensor,
                          attention_weights: Tensor) -> Tensor:
    """Splat every decoder attention weight bilinearly onto the token grid and sum: the DAM.

    Args:
        sampling_locations: (N, ..., L, P, 2) in [0, 1]; attention_weights: (N, ..., L, P).
    Returns:
        (N, S): each cell gets the bilinear share of the weights at location * (W, H) (no half-pixel
        shift) from its four neighbours; shares falling outside a level's map are dropped.

    In float32 on the CPU, when the compiled kernels serve (``$SPARSE_DETR_MS_DEFORM_ATTN``, as for the attention),
    ``torch.ops.sparse_detr_C.decoder_attention_map`` (``csrc/dam_cpu.cpp``) computes the same map bit for bit in
    one pass over the samples instead of some 70 (at 800x1199 with 300 queries, 41 against 2.4 ms on the 2-core
    Xeon's two threads).
    """
    if (sampling_locations.device.type == "cpu" and sampling_locations.dtype == torch.float32
            and attention_weights.dtype == torch.float32 and dam_kernel_available()
            and _use_compiled(sampling_locations.device)):
        return torch.ops.sparse_detr_C.decoder_attention_map(spatial_shapes.cpu().long(),
                                                             level_start_index.cpu().long(), sampling_locations,
                                                             attention_weights)
    n, num_levels = sampling_locations.shape[0], spatial_shapes.shape[0]
    wh = spatial_shapes.flip(-1).to(sampling_locations.dtype)  # (L, 2) as (W, H)
    pixel = sampling_locations * wh[:, None, :]
    low = pixel.floor()
    frac = pixel - low
    low = low.long()
    weights, cells = [], []
    for dx, dy in ((0, 0), (1, 0), (0, 1), (1, 1)):
        col, row = low[..., 0] + dx, low[..., 1] + dy
        share = (frac[..., 0] if dx else 1 - frac[..., 0]) * (frac[..., 1] if dy else 1 - frac[..., 1])
        width, height = spatial_shapes[:, 1].view(num_levels, 1), spatial_shapes[:, 0].view(num_levels, 1)
        inside = (col >= 0) & (col < width) & (row >= 0) & (row < height)
        weights.append(attention_weights * share * inside)
        cells.append(torch.where(inside, level_start_index.view(num_levels, 1) + row * width + col, 0))
    total = int((spatial_shapes[:, 0] * spatial_shapes[:, 1]).sum())
    dam = attention_weights.new_zeros(n, total)
    return dam.scatter_add_(1, torch.stack(cells, -1).reshape(n, -1), torch.stack(weights, -1).reshape(n, -1))


def output_dam(out: TransformerOutput) -> Tensor:
    """(N, S) DAM of a model's predictions, in at least float32."""
    locations, weights = (x.to(torch.promote_types(x.dtype, torch.float32))  # float32 under autocast
                          for x in (out.dec_sampling_locations, out.dec_attention_weights))
    return decoder_attention_map(out.spatial_shapes, out.level_start_index, locations, weights)


def updated_token_mask(out: TransformerOutput) -> Tensor:
    """(N, S) bool: the tokens the sparse encoder updated, the first n_i of each image's kept tokens."""
    k = out.kept_tokens.shape[1]
    updated = torch.arange(k, device=out.kept_tokens.device)[None] < out.sparse_token_nums[:, None]
    mask = torch.zeros(out.kept_tokens.shape[0], int(out.spatial_shapes.prod(1).sum()), dtype=torch.bool,
                       device=out.kept_tokens.device)
    return mask.scatter_(1, out.kept_tokens, updated)


@torch.no_grad()
def dam_recall_masses(dam: Tensor, kept: Tensor, padding_mask: Tensor, spatial_shapes: Tensor) -> Tuple[Tensor, Tensor]:
    """Per image and level, the DAM's mass on the kept tokens and its whole mass (padding excluded).

    Args:
        dam: (N, S) decoder attention map; kept: (N, S) bool; padding_mask: (N, S) bool, True on padding.
    Returns:
        ``(kept_mass, total_mass)``, each (N, L). Their ratio is the DAM recall (the authors' "corr").
    """
    level = torch.repeat_interleave(torch.arange(spatial_shapes.shape[0], device=dam.device),
                                    spatial_shapes.prod(1).to(dam.device))
    mass = dam.masked_fill(padding_mask, 0)
    total = mass.new_zeros(dam.shape[0], spatial_shapes.shape[0])
    return total.index_add(1, level, mass * kept), total.index_add_(1, level, mass)


def dam_recall_summary(kept_mass: Tensor, total_mass: Tensor) -> Dict[str, float]:
    """``dam_recall`` and ``dam_recall_level{l}`` from summed (L,) masses: pooled shares of the DAM's mass."""
    kept_mass, total_mass = kept_mass.double().cpu(), total_mass.double().cpu()
    summary = {"dam_recall": (kept_mass.sum() / total_mass.sum().clamp(min=1e-12)).item()}
    for level, (k, t) in enumerate(zip(kept_mass.tolist(), total_mass.tolist())):
        summary[f"dam_recall_level{level}"] = k / t if t > 0 else float("nan")
    return summary
