"""What is counted rather than timed: trainable parameters (all, and the paper's count) and the CPU's peak rate.

FLOPs are counted by :mod:`sparse_detr.flops`.
"""
from typing import Dict, List, Optional, Sequence

import torch

__all__ = ["cpu_peak_gflops", "encoder_auxiliary_heads", "trainable_parameters"]


def trainable_parameters(model: torch.nn.Module, exclude: Sequence[str] = ()) -> int:
    """Trainable parameters, without those whose names start with one of ``exclude``."""
    exclude = tuple(exclude)
    return sum(p.numel() for name, p in model.named_parameters() if p.requires_grad and not name.startswith(exclude))


def encoder_auxiliary_heads(model: torch.nn.Module) -> List[str]:
    """Name prefixes of Sparse DETR's encoder auxiliary heads (after the decoder's and the two-stage head),
    which the paper's parameter count leaves out."""
    transformer = model.transformer
    if not transformer.use_enc_aux_loss:
        return []
    first = transformer.num_decoder_layers + int(transformer.two_stage)
    return [f"transformer.{kind}.{i}." for kind in ("class_embed", "bbox_embed")
            for i in range(first, len(transformer.class_embed))]


def cpu_peak_gflops(cpu: Dict, dtype: torch.dtype, threads: int) -> Optional[float]:
    """Peak multiply-adds per second (G) of ``threads`` cores in ``dtype``; None when unknown.

    ``cpu`` is :func:`sparse_detr.inference.cpu_description`'s. threads x clock x multiply-adds a cycle and core
    (float32: 32 with AVX-512, 16 with AVX2 + FMA; bfloat16: 512 with AMX, 64 with AVX512-BF16), assuming two
    FMA units a core.
    """
    if cpu["mhz"] is None:
        return None
    if dtype == torch.bfloat16:
        per_cycle = 512 if cpu["amx_bf16"] else 64 if cpu["avx512_bf16"] else None
    else:
        per_cycle = 32 if cpu["avx512f"] else 16 if cpu["avx2_fma"] else None
    return None if per_cycle is None else threads * cpu["mhz"] * 1e-3 * per_cycle
