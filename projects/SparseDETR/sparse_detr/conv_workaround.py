"""A workaround for oneDNN's bf16 convolutions of stride 2 whose output is one column wide (CPU).

On the CPU, PyTorch's bf16 3x3 convolution of stride 2 (``F.conv2d`` and oneDNN's fused
``mkldnn._convolution_pointwise`` alike; float32 is fine) gives wrong values when its output is a single column:
input maps one or two columns wide, any number of channels we tried (256 to 2048), three rows or more. It reads
memory it did not write, so the result depends on what the allocator hands out: errors of 3-8 against outputs
of about 1, or NaN (measured with PyTorch 2.14.1 on the 2-core Xeon with AMX). Such maps come from narrow images:
ResNet-50's extra-level input projection reads res5 (stride 32), so bf16 inference or training on an image at
most 64 pixels wide met it; that is what made ``tools/gpu_check.py``'s bf16 training step on the CPU get
non-finite matcher costs when freed memory was kept (``sparse_detr.allocator``).

The workaround is exact: two more zero columns on the right of the input leave the first output column as it
was (it reads input columns -1 to 1) and make the output two columns wide, which oneDNN computes correctly; the
first column is kept. It costs a copy of a tiny map, and only where the bug would strike.
"""
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from detectron2.layers import Conv2d as D2Conv2d
from detectron2.layers import FrozenBatchNorm2d

__all__ = ["guard_one_column_convolutions", "is_guarded", "narrowed", "one_column_bf16", "widened"]

WIDENING = 2  # zero columns added on the right


def _runs_in_bf16(x: Tensor, weight_dtype: torch.dtype) -> bool:
    if x.dtype == torch.bfloat16 or weight_dtype == torch.bfloat16:
        return True
    return (x.dtype == torch.float32 and torch.is_autocast_enabled("cpu")
            and torch.get_autocast_dtype("cpu") == torch.bfloat16)


def one_column_bf16(x: Tensor, weight_dtype: torch.dtype, kernel_size: Sequence[int], stride: Sequence[int],
                    padding: Sequence[int], dilation: Sequence[int]) -> bool:
    """Whether a convolution of ``x`` (N, C, H, W) would be one the bug strikes: on the CPU, in bf16 (its dtype,
    its weight's, or a bf16 autocast's), stride 2 or more along the width, one output column. The dtype is checked
    before the shape, so a float32 trace or export never looks at the width."""
    if x.device.type != "cpu" or x.dim() != 4 or stride[1] < 2 or not _runs_in_bf16(x, weight_dtype):
        return False
    columns = (x.shape[3] + 2 * padding[1] - dilation[1] * (kernel_size[1] - 1) - 1) // stride[1] + 1
    return columns == 1


def widened(x: Tensor) -> Tensor:
    """``x`` with :data:`WIDENING` zero columns on the right (in its memory format: F.pad keeps channels-last)."""
    return F.pad(x, (0, WIDENING))


def narrowed(y: Tensor) -> Tensor:
    """The first output column of a widened input's convolution."""
    return y[..., :1]


def _widen_input(conv: nn.Conv2d, args):
    x = args[0]
    if isinstance(x, Tensor) and one_column_bf16(x, conv.weight.dtype, conv.kernel_size, conv.stride, conv.padding,
                                                 conv.dilation):
        conv._one_column_widened = True
        return (widened(x),) + tuple(args[1:])
    return None


def _narrow_output(conv: nn.Conv2d, args, output):
    if conv.__dict__.pop("_one_column_widened", False):
        return narrowed(output)
    return None


def _guardable(module: nn.Module) -> bool:
    """A convolution of stride 2 along the width with zero padding whose module output is per-column (no norm, or a
    frozen batch norm: a GroupNorm or a training batch norm would see the extra column)."""
    if not isinstance(module, nn.Conv2d) or module.padding_mode != "zeros" or not isinstance(module.padding, tuple):
        return False
    if module.stride[1] < 2:
        return False
    norm = getattr(module, "norm", None) if isinstance(module, D2Conv2d) else None
    return norm is None or isinstance(norm, FrozenBatchNorm2d)


def is_guarded(module: nn.Module) -> bool:
    """Whether ``module`` has the workaround's hooks."""
    return _widen_input in module._forward_pre_hooks.values()


def guard_one_column_convolutions(model: nn.Module) -> int:
    """Hook every convolution of ``model`` that the bug could strike (stride 2 along the width, its output per
    column) to widen its input and narrow its output when it would (:func:`one_column_bf16`); returns how many
    it hooked (none twice). The hooks are module-level functions (a model with them pickles) and do nothing in
    float32."""
    guarded = 0
    for module in model.modules():
        if _guardable(module) and not is_guarded(module):
            module.register_forward_pre_hook(_widen_input)
            module.register_forward_hook(_narrow_output)
            guarded += 1
    return guarded
