"""Trainable parameters (all, and the paper's count) and the CPU's peak rate: estimated from its clock and units,
and measured on oneDNN's 3x3 convolution.

FLOPs are counted by :mod:`sparse_detr.flops`.
"""
import time
from typing import Dict, List, Optional, Sequence

import torch

__all__ = ["convolution_gflops", "cpu_peak_gflops", "encoder_auxiliary_heads", "trainable_parameters"]


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
    (float32: 32 with AVX-512, 16 with AVX2 + FMA; bfloat16: 512 with AMX, 64 with AVX512-BF16; int8, the int8
    backbone's convolutions: 1024 with AMX, 128 with AVX512-VNNI), assuming two
    FMA units a core, as wide as the instructions; AMD's Zen 4 (family 25) runs a 512-bit instruction as two
    256-bit halves, so half that with AVX-512 (16 and 32). The clock is /proc/cpuinfo's, which in a VM is often
    the base clock: a core boosting above it makes the share of the peak look higher than it is.
    """
    if cpu["mhz"] is None:
        return None
    if dtype == torch.bfloat16:
        per_cycle = 512 if cpu["amx_bf16"] else 64 if cpu["avx512_bf16"] else None
    elif dtype == torch.int8:
        per_cycle = 1024 if cpu.get("amx_int8") else 128 if cpu.get("avx512_vnni") else None
    else:
        per_cycle = 32 if cpu["avx512f"] else 16 if cpu["avx2_fma"] else None
    if per_cycle in (32, 64, 128) and _half_width_avx512(cpu):  # the AVX-512 rates
        per_cycle //= 2
    return None if per_cycle is None else threads * cpu["mhz"] * 1e-3 * per_cycle


def _half_width_avx512(cpu: Dict) -> bool:
    """AMD Zen 4: AVX-512 on 256-bit units."""
    return cpu.get("vendor") == "AuthenticAMD" and cpu.get("family") == 25


@torch.no_grad()
def convolution_gflops(dtype: torch.dtype, repeats: int = 5) -> float:
    """The multiply-adds per second (G) oneDNN's 3x3 convolution reaches on this CPU in ``dtype`` with the current
    threads (256 -> 256 channels on a channels-last 100x150 map, 0.88 G multiply-adds, its weight packed; the fastest
    of ``repeats`` runs after two): the rate the backbone's convolutions can hope for, measured, where the clock
    and the width of the units :func:`cpu_peak_gflops` assumes may be wrong (a VM's base clock, a boost). int8:
    oneDNN's int8 convolution of uint8 codes, as the int8 backbone runs it."""
    shape, geometry = (1, 256, 100, 150), ([1, 1], [1, 1], [1, 1], 1)
    if dtype == torch.int8:
        x = torch.randint(0, 256, shape, dtype=torch.uint8).contiguous(memory_format=torch.channels_last)
        weight = torch.randint(-127, 128, (256, 256, 3, 3), dtype=torch.int8).contiguous(
            memory_format=torch.channels_last)
        scales, zero_points = torch.full((256,), 1e-3), torch.zeros(256, dtype=torch.long)
        packed = torch.ops.onednn.qconv_prepack(weight, scales, 0.01, 0, *geometry, list(shape))

        def convolve():
            torch.ops.onednn.qconv2d_pointwise(x, 0.01, 0, packed, scales, zero_points, None, *geometry, 0.05, 0,
                                               None, "none", [], "")
    else:
        x = torch.randn(shape).to(dtype).contiguous(memory_format=torch.channels_last)
        weight = torch.randn(256, 256, 3, 3).to(dtype) * 0.02
        packed = torch.ops.mkldnn._reorder_convolution_weight(weight, *geometry, list(shape))

        def convolve():
            torch.ops.mkldnn._convolution_pointwise(x, packed, None, *geometry, "none", [], "")
    best = float("inf")
    for index in range(repeats + 2):
        start = time.perf_counter()
        convolve()
        if index >= 2:
            best = min(best, time.perf_counter() - start)
    return 256 * 256 * 9 * 100 * 150 / best / 1e9
